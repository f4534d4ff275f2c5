// PeerJS-protocol signaling load: N WebSocket peers in pairs, each pair bouncing CANDIDATE
// messages back and forth (WINDOW in flight per pair) for SECS seconds. Works against any
// server speaking the `peer` npm server's protocol (Tern's /peerjs, or `peer` itself).
//
// usage: node load.mjs --url ws://127.0.0.1:P/peerjs/peerjs --key peerjs --peers 2000
//                      --secs 15 --pid SERVER_PID [--window 4]
// Prints one JSON line. Bounded: at most --peers sockets (<= 5000), --secs seconds and
// --max-msgs messages; only loopback URLs are accepted.
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '../../tests/browser/package.json'));
const WebSocket = require('ws');

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const url = args.url;
const key = args.key || 'peerjs';
const peers = Math.min(Number(args.peers || 2000), 5000) & ~1;
const secs = Math.min(Number(args.secs || 15), 120);
const windowSize = Number(args.window || 4);
const maxMsgs = Number(args['max-msgs'] || 50_000_000);
const pid = Number(args.pid || 0);
if (!/^ws:\/\/(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d+\//.test(url || '')) {
  console.error('--url must be a loopback ws:// URL');
  process.exit(2);
}

function rss(kind = 'VmRSS') {
  if (!pid) return null;
  const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(new RegExp(`${kind}:\\s+(\\d+) kB`));
  return m ? Number(m[1]) : null;
}

const sockets = new Array(peers);
const ids = Array.from({ length: peers }, (_, i) => `b${i}x${Math.random().toString(36).slice(2, 8)}`);
let opened = 0;
let failed = 0;
let received = 0;
let sending = false;
let closedEarly = 0;

function onMessage(i, data) {
  let m;
  try { m = JSON.parse(data.toString()); } catch { return; }
  if (m.type === 'OPEN') return;
  if (m.type !== 'CANDIDATE') return;
  received++;
  if (sending && received < maxMsgs) {
    // Bounce it back to the sender (the partner).
    sockets[i].send(JSON.stringify({ type: 'CANDIDATE', dst: ids[i ^ 1], payload: m.payload }));
  }
}

function open(i) {
  return new Promise((resolve) => {
    const ws = new WebSocket(`${url}?key=${key}&id=${ids[i]}&token=t${i}&version=1.5.5`);
    sockets[i] = ws;
    const t = setTimeout(() => { failed++; resolve(); }, 20_000);
    ws.on('message', (d) => {
      const s = d.toString();
      if (s.includes('"OPEN"')) { opened++; clearTimeout(t); resolve(); return; }
      onMessage(i, d);
    });
    ws.on('error', () => { clearTimeout(t); failed++; resolve(); });
    ws.on('close', () => { if (sending) closedEarly++; });
  });
}

const t0 = Date.now();
for (let i = 0; i < peers; i += 250) {
  const batch = [];
  for (let j = i; j < Math.min(i + 250, peers); j++) batch.push(open(j));
  await Promise.all(batch);
}
const connectSecs = (Date.now() - t0) / 1000;
await new Promise((r) => setTimeout(r, 1000));
const rssConnected = rss();

// Heartbeats as the real client sends them (every 5 s).
const hb = setInterval(() => {
  for (const ws of sockets) if (ws && ws.readyState === 1) ws.send('{"type":"HEARTBEAT"}');
}, 5000);

sending = true;
const start = Date.now();
for (let i = 0; i < peers; i += 2) {
  for (let w = 0; w < windowSize; w++) {
    if (sockets[i].readyState === 1) {
      sockets[i].send(JSON.stringify({ type: 'CANDIDATE', dst: ids[i + 1], payload: { candidate: 'candidate:1 1 udp 2122260223 192.0.2.1 54321 typ host', w } }));
    }
  }
}
await new Promise((r) => setTimeout(r, secs * 1000));
sending = false;
const elapsed = (Date.now() - start) / 1000;
const msgs = received;
const rssEnd = rss();
const hwm = rss('VmHWM');
const held = sockets.filter((s) => s && s.readyState === 1).length;
clearInterval(hb);
for (const ws of sockets) if (ws) ws.terminate();
console.log(JSON.stringify({
  peers, opened, failed, held, closed_early: closedEarly, connect_secs: connectSecs,
  msgs, secs: elapsed, msgs_per_sec: Math.round(msgs / elapsed),
  rss_kib_connected: rssConnected, rss_kib_end: rssEnd, hwm_kib: hwm,
}));
process.exit(0);
