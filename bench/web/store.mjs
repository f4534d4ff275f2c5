// How much CPU the receiver's work on a piece costs in Chromium, apart from the transport
// (bench/web/bench.mjs measures whole transfers, whose noise hides a millisecond per MiB):
// --mib MiB moved as pieces of 255 KiB (tern.js's PIECE), each a fresh 256 KiB buffer filled
// on the page's main thread as a data channel message is, to a dedicated worker and there,
// by way:
//   post: transferred to the worker, which answers (the hop's floor)
//   digest: + WebCrypto's SHA-256 of the piece (tern.js checks every piece so)
//   write: + an OPFS write of the piece (FileSystemSyncAccessHandle, tern.js's store)
//   digest-write: both (tern.js's piece worker)
//   digest-write-1m: both, the pieces gathered in a 1 MiB buffer and written 4 at a time
//   batch4-digest-write-1m: as digest-write-1m, 4 pieces per message to the worker
// Reported per way: CPU of every browser process per MiB (/proc) and the speed. The page
// keeps up to 16 messages in flight (tern.js does not wait for the worker either: the
// channel delivers the next piece meanwhile).
//
// usage: node bench/web/store.mjs [--mib 200] [--reps 3]
// Prints one line per way and rep, then one JSON line.

import { measuredPage, parseArgs, threadCpu } from '../../tests/browser/lib.mjs';

const args = parseArgs(process.argv.slice(2));
const MIB = Number(args.mib || 200);
const REPS = Number(args.reps || 3);
const PIECE = 255 << 10;
const WAYS = ['post', 'digest', 'write', 'digest-write', 'digest-write-1m', 'batch4-digest-write-1m'];

// The worker: one OPFS file per run, written at increasing offsets, removed at the end.
const WORKER = String.raw`
let ah = null, at = 0, scratch = null, fill = 0, n = 0;
const flush = () => { if (fill) { ah.write(scratch.subarray(0, fill), { at }); at += fill; fill = 0; } };
onmessage = async (e) => {
  const m = e.data;
  if (m.op === 'open') {
    const root = await navigator.storage.getDirectory();
    const fh = await root.getFileHandle('store-bench', { create: true });
    ah = await fh.createSyncAccessHandle();
    ah.truncate(0);
    at = 0; fill = 0; n = 0;
    scratch = new Uint8Array(4 * ${PIECE});
    postMessage(0);
    return;
  }
  if (m.op === 'close') {
    flush();
    ah.flush();
    ah.close();
    await (await navigator.storage.getDirectory()).removeEntry('store-bench');
    postMessage(n);
    return;
  }
  for (const buf of m.bufs) {
    const u8 = new Uint8Array(buf, 5, ${PIECE});
    if (m.digest) await crypto.subtle.digest('SHA-256', u8);
    if (m.write === 'piece') { ah.write(u8, { at }); at += u8.length; }
    if (m.write === '1m') { scratch.set(u8, fill); fill += u8.length; if (fill === scratch.length) flush(); }
    n += u8.length;
  }
  postMessage(m.seq);
};
`;

const PAGE = `<script>
const PIECE = ${PIECE};
const w = new Worker(URL.createObjectURL(new Blob([${JSON.stringify(WORKER)}], { type: 'text/javascript' })));
const call = (m, t = []) => new Promise((r) => { w.onmessage = (e) => r(e.data); w.postMessage(m, t); });
window.run = async (way, bytes) => {
  await call({ op: 'open' });
  const digest = way.includes('digest');
  const write = way.endsWith('-1m') ? '1m' : way.includes('write') ? 'piece' : null;
  const per = way.startsWith('batch4') ? 4 : 1;
  // Up to 16 messages in flight: each answer frees a slot.
  let inflight = 0, wake = null, seq = 0;
  w.onmessage = () => { inflight--; wake?.(); };
  for (let sent = 0; sent < bytes; sent += per * PIECE) {
    while (inflight >= 16) await new Promise((r) => { wake = r; });
    const bufs = [];
    // Filled here, as a message's buffer is when it arrives (its pages are touched on this
    // thread, not first in the worker).
    for (let i = 0; i < per; i++) bufs.push(new Uint8Array(PIECE + 5).fill(sent & 255).buffer);
    inflight++;
    w.postMessage({ seq: ++seq, bufs, digest, write }, bufs);
  }
  while (inflight > 0) await new Promise((r) => { wake = r; });
  return call({ op: 'close' });
};
</script>`;

const { page: p, pids, cpu, close } = await measuredPage(PAGE);
const out = [];
try {
  // "thread name user|sys" -> CPU seconds, over every process.
  const threads = async () => {
    const m = new Map();
    for (const pid of pids) {
      for (const t of await threadCpu(pid)) {
        for (const k of ['user', 'sys']) m.set(`${t.name} ${k}`, (m.get(`${t.name} ${k}`) || 0) + t[k]);
      }
    }
    return m;
  };
  const bytes = Math.floor((MIB << 20) / (4 * PIECE)) * 4 * PIECE;
  for (let rep = 0; rep < REPS; rep++) {
    for (const way of WAYS) {
      const th0 = await threads();
      const c0 = await cpu();
      const t0 = performance.now();
      const n = await p.evaluate(([w, b]) => window.run(w, b), [way, bytes]);
      if (n !== bytes) throw new Error(`${way}: the worker saw ${n} of ${bytes} bytes`);
      const secs = (performance.now() - t0) / 1000;
      const row = { way, rep, cpuMsPerMiB: ((await cpu()) - c0) * 1000 / (bytes / 1048576), mbps: bytes / 1e6 / secs };
      const th1 = await threads();
      row.threads = Object.fromEntries([...th1].map(([k, v]) => [k, (v - (th0.get(k) || 0)) * 1000 / (bytes / 1048576)])
        .filter(([, v]) => v >= 0.1).sort((x, y) => y[1] - x[1]).map(([k, v]) => [k, Math.round(v * 100) / 100]));
      out.push(row);
      console.log(`${way}: ${row.cpuMsPerMiB.toFixed(2)} ms CPU per MiB, ${row.mbps.toFixed(0)} MB/s; by thread: ${JSON.stringify(row.threads)}`);
    }
  }
} finally {
  await close();
}
console.log(JSON.stringify({ mib: MIB, reps: REPS, rows: out }));
