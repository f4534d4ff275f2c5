// Tables for bench/signal/run.sh: one per load shape, Tern and `peer` side by side with the
// Tern/peer ratio, the median over rounds (each round's figures are in the JSON files);
// `tern2` is two Tern nodes sharing one redis-server, every message crossing nodes.
// usage: node summary.mjs OUT_DIR
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';

const dir = process.argv[2];
const runs = {};
for (const f of readdirSync(dir)) {
  const m = f.match(/^(tern2|tern|peer)-(\w+)-(\d+)\.json$/);
  if (!m) continue;
  const text = readFileSync(path.join(dir, f), 'utf8').trim();
  if (!text) continue;
  const r = JSON.parse(text.split('\n').pop());
  if (r.msgs_per_sec) r.cpu_us_per_msg = +((r.cpu_cores * 1e6) / r.msgs_per_sec).toFixed(1);
  ((runs[m[2]] ??= {})[m[1]] ??= []).push(r);
}
const median = (xs) => {
  const v = xs.filter((x) => typeof x === 'number').sort((a, b) => a - b);
  return v.length ? v[(v.length - 1) >> 1] : null;
};
const rows = [
  ['connections held', 'opened'],
  ['connect ramp, opens/s', 'opens_per_sec'],
  ['opens slower than 900 ms', 'slow_opens'],
  ['messages/s', 'msgs_per_sec'],
  ['messages/s, slowest second', 'per_sec_min'],
  ['messages/s, fastest second', 'per_sec_max'],
  ['latency p50 (ms)', 'p50_ms'],
  ['latency p99 (ms)', 'p99_ms'],
  ['latency p99.9 (ms)', 'p999_ms'],
  ['server CPU (cores)', 'cpu_cores'],
  ['server CPU per message (µs)', 'cpu_us_per_msg'],
  ['RSS per connected peer (bytes)', 'bytes_per_peer'],
  ['RSS connected (KiB)', 'rss_kib_connected'],
  ['peak RSS (KiB)', 'hwm_kib'],
  ['Redis CPU (cores)', 'redis_cpu_cores'],
  ['Redis CPU per message (µs)', 'redis_us_per_msg'],
];
for (const [shape, by] of Object.entries(runs)) {
  const t = by.tern || [];
  const t2 = by.tern2 || [];
  const p = by.peer || [];
  const n = Math.max(t.length, t2.length, p.length);
  console.log(`\n### ${shape} (${n} round${n === 1 ? '' : 's'}, median)\n`);
  const any = t[0] || t2[0] || p[0];
  if (any.pairs !== undefined) {
    console.log(`${any.peers} peers held, ${any.pairs} pairs x ${any.window} in flight, ${any.bytes}-byte payloads, ${any.secs} s; ${any.client || 'node'} client\n`);
  } else {
    console.log(`${any.peers} peers held; ${any.client || 'node'} client\n`);
  }
  const two = t2.length > 0;
  console.log(two
    ? '| metric | tern | tern2 (2 nodes + Redis) | peer | tern/peer | tern2/peer |\n|---|---|---|---|---|---|'
    : '| metric | tern | peer | tern/peer |\n|---|---|---|---|');
  const ratio = (a, b) => (a !== null && b ? (a / b).toFixed(2) : 'n/a');
  for (const [label, key] of rows) {
    const a = median(t.map((r) => r[key]));
    const a2 = median(t2.map((r) => r[key]));
    const b = median(p.map((r) => r[key]));
    if (a === null && a2 === null && b === null) continue;
    if (two) {
      console.log(`| ${label} | ${a ?? 'n/a'} | ${a2 ?? 'n/a'} | ${b ?? 'n/a'} | ${ratio(a, b)} | ${ratio(a2, b)} |`);
    } else {
      console.log(`| ${label} | ${a ?? 'n/a'} | ${b ?? 'n/a'} | ${ratio(a, b)} |`);
    }
  }
}
