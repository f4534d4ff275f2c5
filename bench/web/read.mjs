// How much CPU reading a picked file costs in Chromium, by way of reading it: what the
// page's sender pays before the data channel sees a byte (bench/web/bench.mjs measures the
// whole transfer). A file of --mib MiB is picked in a page's file input (as a user's file:
// Chromium reads it through the browser process), then read --reps times each way, in
// pieces of 255 KiB (tern.js's PIECE); reported per way: CPU of every browser process per
// MiB (/proc) and the read speed.
//   stream-copy: File.stream() with a default reader, the chunks copied into one piece buffer
//   stream-touch: the same stream, the chunks only looked at (no copy: the floor of a stream)
//   byob: File.stream() with a BYOB reader reading straight into the piece buffer (tern.js)
//   slice: slice(o, o + piece).arrayBuffer() per piece, one at a time
//   file-reader: FileReader.readAsArrayBuffer per piece
//
// usage: node bench/web/read.mjs [--mib 200] [--reps 3]
// Prints one line per way and read, then one JSON line.

import { randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { measuredPage, parseArgs } from '../../tests/browser/lib.mjs';

const args = parseArgs(process.argv.slice(2));
const MIB = Number(args.mib || 200);
const REPS = Number(args.reps || 3);
const PIECE = 255 << 10;

const PAGE = `<input type="file" id="f"><script>
const PIECE = ${PIECE};
window.ways = {
  'stream-copy': async (f) => {
    const r = f.stream().getReader();
    const buf = new Uint8Array(PIECE);
    let n = 0;
    for (;;) {
      const { done, value } = await r.read();
      if (done) return;
      for (let o = 0; o < value.length;) {
        const t = Math.min(PIECE - n, value.length - o);
        buf.set(value.subarray(o, o + t), n);
        n = (n + t) % PIECE;
        o += t;
      }
    }
  },
  'stream-touch': async (f) => {
    const r = f.stream().getReader();
    for (let x = 0; ;) {
      const { done, value } = await r.read();
      if (done) return x;
      x ^= value[0];
    }
  },
  byob: async (f) => {
    const r = f.stream().getReader({ mode: 'byob' });
    let ab = new ArrayBuffer(PIECE);
    for (let n = 0; ;) {
      const { done, value } = await r.read(new Uint8Array(ab, n, PIECE - n));
      if (done) return;
      ab = value.buffer;
      n = (n + value.length) % PIECE;
    }
  },
  slice: async (f) => {
    for (let o = 0; o < f.size; o += PIECE) await f.slice(o, o + PIECE).arrayBuffer();
  },
  'file-reader': async (f) => {
    for (let o = 0; o < f.size; o += PIECE) {
      await new Promise((res, rej) => {
        const fr = new FileReader();
        fr.onload = res;
        fr.onerror = () => rej(fr.error);
        fr.readAsArrayBuffer(f.slice(o, o + PIECE));
      });
    }
  },
};
</script>`;

const dir = await mkdtemp(join(tmpdir(), 'tern-bench-read-'));
const path = join(dir, 'read.bin');
const fh = await open(path, 'w');
for (let left = MIB << 20; left > 0; left -= 16 << 20) await fh.write(randomBytes(Math.min(left, 16 << 20)));
await fh.close();
const { page: p, cpu, close } = await measuredPage(PAGE);
const out = [];
try {
  await p.locator('#f').setInputFiles([path]);
  for (let rep = 0; rep < REPS; rep++) {
    for (const way of ['stream-copy', 'stream-touch', 'byob', 'slice', 'file-reader']) {
      const c0 = await cpu();
      const t0 = performance.now();
      await p.evaluate((w) => window.ways[w](document.getElementById('f').files[0]), way);
      const secs = (performance.now() - t0) / 1000;
      const row = { way, rep, cpuMsPerMiB: ((await cpu()) - c0) * 1000 / MIB, mbps: MIB * 1.048576 / secs };
      out.push(row);
      console.log(`${way}: ${row.cpuMsPerMiB.toFixed(2)} ms CPU per MiB, ${row.mbps.toFixed(0)} MB/s`);
    }
  }
} finally {
  await close();
  await rm(dir, { recursive: true, force: true });
}
console.log(JSON.stringify({ mib: MIB, reps: REPS, rows: out }));
