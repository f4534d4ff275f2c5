// One load process for bench/signal/load.mjs (forked by it; talks over IPC). It holds a
// share of the PeerJS-protocol WebSocket clients and, when told, drives its share of the
// traffic. Several processes spread the sockets (this box allows 20,000 open files per
// process) and the client's CPU work over the cores.
//
// Bounded: the parent gives the socket count (<= 5000 per process), the seconds, and only
// loopback URLs; every socket is terminated before the process exits.
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '../../tests/browser/package.json'));
const WebSocket = require('ws');

const HIST_MS = 5000; // latency histogram: 0.1 ms buckets up to 5 s, then one overflow bucket
const hist = new Uint32Array(HIST_MS * 10 + 1);
const record = (ms) => { hist[Math.min(Math.max(0, Math.round(ms * 10)), hist.length - 1)]++; };

let sockets = [];
let ids = [];
let running = false;
let delivered = 0;
let closedEarly = 0;
let heartbeat = null;
let perSec = [];
let secTimer = null;

function send(ws, s) {
  if (ws.readyState === 1) ws.send(s);
}

// Shapes. `offer`: peer 2k sends OFFERs (payload `bytes` of SDP plus its send time) to peer
// 2k+1, which answers each with an ANSWER carrying the same SDP; each delivery is one
// message, and its latency is the time since that hop was sent (same process, same clock).
// `bounce`: as the original bench, both sides bounce CANDIDATEs.
let shape = null;

function onData(i, data) {
  const s = typeof data === 'string' ? data : data.toString();
  if (!running) return;
  // Read only what is needed: the servers order JSON keys differently.
  const ti = s.indexOf('"t":');
  if (ti < 0) return;
  const sent = parseFloat(s.slice(ti + 4, ti + 24));
  delivered++;
  record(performance.now() - sent);
  const partner = ids[i ^ 1];
  if (shape.kind === 'offer') {
    const type = (i & 1) ? 'ANSWER' : 'OFFER';
    send(sockets[i], `{"type":"${type}","dst":"${partner}","payload":{"t":${performance.now()},"type":"${type.toLowerCase()}","sdp":"${shape.sdp}"}}`);
  } else {
    send(sockets[i], `{"type":"CANDIDATE","dst":"${partner}","payload":{"t":${performance.now()},"candidate":"${shape.sdp}"}}`);
  }
}

function open(url, key, i, localAddress) {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const ws = new WebSocket(`${url}?key=${key}&id=${ids[i]}&token=t${i}&version=1.5.5`, {
      localAddress,
      perMessageDeflate: false,
    });
    sockets[i] = ws;
    let done = false;
    const finish = (ok) => { if (!done) { done = true; clearTimeout(timer); resolve({ ok, ms: performance.now() - t0 }); } };
    const timer = setTimeout(() => finish(false), 30_000);
    ws.on('message', (d) => {
      if (!done) {
        if (d.toString().includes('"OPEN"')) finish(true);
        return;
      }
      onData(i, d);
    });
    ws.on('error', () => finish(false));
    ws.on('close', () => { if (running) closedEarly++; finish(false); });
  });
}

async function connect(m) {
  if (!/^ws:\/\/(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d+\//.test(m.url)) throw new Error('loopback only');
  const n = Math.min(m.count, 5000);
  sockets = new Array(n);
  ids = Array.from({ length: n }, (_, i) => `${m.prefix}${i}x${Math.random().toString(36).slice(2, 8)}`);
  const t0 = performance.now();
  let ok = 0;
  let slow = 0; // opens that took over 900 ms (a dropped SYN is retried after 1 s)
  for (let i = 0; i < n; i += m.batch) {
    const rs = await Promise.all(
      Array.from({ length: Math.min(m.batch, n - i) }, (_, j) => open(m.url, m.key, i + j, m.localAddress)),
    );
    for (const r of rs) { if (r.ok) ok++; if (r.ms > 900) slow++; }
  }
  const secs = (performance.now() - t0) / 1000;
  // The real client sends HEARTBEAT every 5 s; every 20 s is enough for the servers' 60 s.
  heartbeat = setInterval(() => { for (const ws of sockets) send(ws, '{"type":"HEARTBEAT"}'); }, 20_000);
  return { opened: ok, failed: n - ok, slow_opens: slow, connect_secs: secs };
}

function go(m) {
  shape = { kind: m.kind, sdp: 'v'.repeat(m.bytes) };
  running = true;
  delivered = 0;
  hist.fill(0);
  perSec = [];
  let last = 0;
  secTimer = setInterval(() => { perSec.push(delivered - last); last = delivered; }, 1000);
  const pairs = Math.min(m.pairs, sockets.length >> 1);
  for (let p = 0; p < pairs; p++) {
    const a = 2 * p;
    for (let w = 0; w < m.window; w++) {
      if (m.kind === 'offer') {
        send(sockets[a], `{"type":"OFFER","dst":"${ids[a + 1]}","payload":{"t":${performance.now()},"type":"offer","sdp":"${shape.sdp}"}}`);
      } else {
        send(sockets[a], `{"type":"CANDIDATE","dst":"${ids[a + 1]}","payload":{"t":${performance.now()},"candidate":"${shape.sdp}"}}`);
      }
    }
  }
}

function stop() {
  running = false;
  clearInterval(secTimer);
  const sparse = [];
  for (let i = 0; i < hist.length; i++) if (hist[i]) sparse.push([i, hist[i]]);
  const held = sockets.filter((s) => s && s.readyState === 1).length;
  return { delivered, hist: sparse, held, closed_early: closedEarly, per_sec: perSec };
}

process.on('message', async (m) => {
  try {
    if (m.cmd === 'connect') process.send({ cmd: 'connected', ...(await connect(m)) });
    else if (m.cmd === 'go') { go(m); process.send({ cmd: 'going' }); }
    else if (m.cmd === 'stop') process.send({ cmd: 'stopped', ...stop() });
    else if (m.cmd === 'exit') {
      clearInterval(heartbeat);
      for (const ws of sockets) if (ws) ws.terminate();
      process.exit(0);
    }
  } catch (e) {
    process.send({ cmd: 'error', error: String(e) });
  }
});
// Never outlive the parent.
process.on('disconnect', () => process.exit(0));
