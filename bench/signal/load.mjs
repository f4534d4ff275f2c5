// PeerJS-protocol signaling load against any server speaking the `peer` npm server's
// protocol (Tern's /peerjs, or `peer` itself). Forks --procs worker processes (worker.mjs),
// each holding --peers/--procs WebSocket clients from its own loopback address
// (127.0.0.2, 127.0.0.3, ...), then drives one load shape for --secs seconds:
//   --kind offer   --pairs P --window W --bytes B: P sender->receiver pairs, W OFFERs in
//                  flight per pair, B-byte SDP; the receiver answers each OFFER with an
//                  ANSWER of the same size (closed loop); the other peers are held idle.
//   --kind bounce  every pair bounces CANDIDATEs (W in flight), the original bench shape.
//   --kind idle    connect, measure memory, disconnect.
// The connect phase is the ramp: --batch clients connecting at a time in all (each worker
// --batch/--procs), reported as opens/s and opens slower than 900 ms (SYN retries).
//
// usage: node load.mjs --url ws://127.0.0.1:P/peerjs/peerjs --key peerjs --pid SERVER_PID
//          [--procs 2] [--peers 5000] [--batch 200] [--kind offer] [--pairs 200]
//          [--window 8] [--bytes 1000] [--secs 15]
// Prints one JSON line. Bounded: <= 5000 sockets per worker, <= 20000 in all, <= 120 s of
// load; loopback only; the workers are the only processes it starts, and it ends them.
import { fork } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const here = path.dirname(fileURLToPath(import.meta.url));
const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const url = args.url;
const key = args.key || 'peerjs';
const pid = Number(args.pid || 0);
const procs = Math.max(1, Math.min(Number(args.procs || 2), 8));
const peers = Math.min(Number(args.peers || 5000), 20000, procs * 5000);
const batch = Number(args.batch || 200);
const kind = args.kind || 'offer';
const pairs = Number(args.pairs || (kind === 'bounce' ? peers / 2 : 200));
const windowSize = Number(args.window || 8);
const bytes = Number(args.bytes || 1000);
const secs = Math.min(Number(args.secs || 15), 120);
if (!/^ws:\/\/(127\.\d+\.\d+\.\d+|\[::1\]|localhost):\d+\//.test(url || '')) {
  console.error('--url must be a loopback ws:// URL');
  process.exit(2);
}

function status(kindName) {
  if (!pid) return null;
  const m = readFileSync(`/proc/${pid}/status`, 'utf8').match(new RegExp(`${kindName}:\\s+(\\d+) kB`));
  return m ? Number(m[1]) : null;
}
// CPU seconds (user + system) the server has used.
function cpuSecs() {
  if (!pid) return 0;
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const workers = [];
function ask(w, msg, reply) {
  return new Promise((resolve, reject) => {
    const on = (m) => {
      if (m.cmd === reply) { w.off('message', on); resolve(m); }
      if (m.cmd === 'error') { w.off('message', on); reject(new Error(m.error)); }
    };
    w.on('message', on);
    w.send(msg);
  });
}

const rssIdle = status('VmRSS');
const share = (n, k) => Math.floor(n / procs) + (k < n % procs ? 1 : 0);
for (let k = 0; k < procs; k++) workers.push(fork(path.join(here, 'worker.mjs'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }));
const t0 = performance.now();
const conns = await Promise.all(workers.map((w, k) => ask(w, {
  cmd: 'connect', url, key, count: share(peers, k) & ~1, prefix: `w${k}p`,
  batch: Math.max(1, Math.round(batch / procs)), localAddress: `127.0.0.${2 + k}`,
}, 'connected')));
const connectSecs = (performance.now() - t0) / 1000;
const opened = conns.reduce((a, c) => a + c.opened, 0);
await sleep(2000);
const rssConnected = status('VmRSS');

let result = {
  kind, peers, procs, opened, failed: conns.reduce((a, c) => a + c.failed, 0),
  slow_opens: conns.reduce((a, c) => a + c.slow_opens, 0),
  connect_secs: +connectSecs.toFixed(2), opens_per_sec: Math.round(opened / connectSecs),
  rss_kib_idle: rssIdle, rss_kib_connected: rssConnected,
  bytes_per_peer: opened ? Math.round(((rssConnected - rssIdle) * 1024) / opened) : null,
};

if (kind !== 'idle') {
  const cpu0 = cpuSecs();
  const s0 = performance.now();
  await Promise.all(workers.map((w, k) => ask(w, {
    cmd: 'go', kind, pairs: share(pairs, k), window: windowSize, bytes,
  }, 'going')));
  await sleep(secs * 1000);
  const stops = await Promise.all(workers.map((w) => ask(w, { cmd: 'stop' }, 'stopped')));
  const elapsed = (performance.now() - s0) / 1000;
  const cpu = (cpuSecs() - cpu0) / elapsed;
  const hist = new Map();
  for (const s of stops) for (const [b, n] of s.hist) hist.set(b, (hist.get(b) || 0) + n);
  const total = [...hist.values()].reduce((a, b) => a + b, 0);
  const pct = (p) => {
    let acc = 0;
    for (const b of [...hist.keys()].sort((x, y) => x - y)) {
      acc += hist.get(b);
      if (acc >= p * total) return b / 10;
    }
    return null;
  };
  // Whole seconds only (the last partial one is left out), summed over the workers.
  const n = Math.min(...stops.map((s) => s.per_sec.length));
  const perSec = Array.from({ length: n }, (_, i) => stops.reduce((a, s) => a + s.per_sec[i], 0));
  const delivered = stops.reduce((a, s) => a + s.delivered, 0);
  result = {
    ...result, pairs, window: windowSize, bytes, secs: +elapsed.toFixed(2),
    msgs: delivered, msgs_per_sec: Math.round(delivered / elapsed),
    per_sec_min: perSec.length ? Math.min(...perSec.slice(1)) : null,
    per_sec_max: perSec.length ? Math.max(...perSec) : null,
    p50_ms: pct(0.5), p99_ms: pct(0.99), p999_ms: pct(0.999),
    cpu_cores: +cpu.toFixed(2),
    held: stops.reduce((a, s) => a + s.held, 0),
    closed_early: stops.reduce((a, s) => a + s.closed_early, 0),
    rss_kib_end: status('VmRSS'), hwm_kib: status('VmHWM'),
  };
}
for (const w of workers) w.send({ cmd: 'exit' });
await Promise.all(workers.map((w) => new Promise((r) => (w.exitCode !== null ? r() : w.on('exit', r)))));
console.log(JSON.stringify(result));
process.exit(0);
