// Browser transfer benchmark: a bare RTCDataChannel against the built-in page (tern.js),
// same run, same two headless Chromiums on loopback, same bytes, on two paths: direct
// (host candidates) and through Tern's own TURN relay (iceTransportPolicy 'relay').
//
// Bare: one data channel, 64 KiB messages from one reused buffer, sent while
// bufferedAmount is under 4 MiB and resumed at bufferedamountlow (1 MiB): the usual
// well-behaved sender, nothing read, hashed or stored. Page: the file picked in the page's
// file input, one peer picked; the clock runs from the pick to the receiver's row showing
// the file stored (OPFS) and its SHA-256 verified, so it includes reading the file in
// slices, hashing on both sides and writing to disk. The channel is connected before
// either clock starts.
//
// usage: node bench/web/bench.mjs --url http://127.0.0.1:API [--mib 200] [--runs 2]
// Prints a Markdown table and one JSON line.

import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { launchChromium, parseArgs } from '../../tests/browser/lib.mjs';

const args = parseArgs(process.argv.slice(2));
const BASE = args.url;
const MIB = Number(args.mib || 200);
const RUNS = Number(args.runs || 2);
const BYTES = MIB * 1024 * 1024;

// In-page: a bare peer connection for `step` ('direct': STUN only; 'turn': relay only),
// non-trickle (the SDP carries all candidates once gathering completes).
const PC = String.raw`
window.bare = async (step, offer) => {
  const cfg = await (await fetch('/api/ice', { cache: 'no-store' })).json();
  const want = step === 'direct' ? /^stuns?:/ : /^turns?:/;
  const iceServers = cfg.iceServers.map((s) => ({ ...s, urls: [].concat(s.urls).filter((u) => want.test(u)) }))
    .filter((s) => s.urls.length);
  const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: step === 'turn' ? 'relay' : 'all' });
  window.pc = pc;
  const gathered = new Promise((r) => { pc.onicegatheringstatechange = () => pc.iceGatheringState === 'complete' && r(); });
  window.opened = new Promise((r) => {
    const use = (dc) => { dc.binaryType = 'arraybuffer'; window.dc = dc; dc.onopen = () => r(); if (dc.readyState === 'open') r(); };
    if (offer) pc.ondatachannel = (e) => use(e.channel); else use(pc.createDataChannel('bench', { ordered: true }));
  });
  if (offer) {
    await pc.setRemoteDescription(offer);
    await pc.setLocalDescription(await pc.createAnswer());
  } else await pc.setLocalDescription(await pc.createOffer());
  await gathered;
  return pc.localDescription.toJSON();
};
window.bareRecv = (bytes) => new Promise((r) => {
  let got = 0;
  window.dc.onmessage = (e) => { got += e.data.byteLength; if (got >= bytes) r(got); };
});
window.bareSend = async (bytes) => {
  const dc = window.dc;
  dc.bufferedAmountLowThreshold = 1 << 20;
  const buf = new Uint8Array(64 << 10);
  crypto.getRandomValues(buf);
  for (let sent = 0; sent < bytes;) {
    if (dc.bufferedAmount > 4 << 20) await new Promise((r) => { dc.onbufferedamountlow = r; });
    const n = Math.min(buf.length, bytes - sent);
    dc.send(n === buf.length ? buf : buf.subarray(0, n));
    sent += n;
  }
};
window.barePath = async () => {
  const st = await window.pc.getStats();
  let pair;
  st.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pair = st.get(s.selectedCandidatePairId); });
  const l = pair && st.get(pair.localCandidateId);
  return l?.candidateType === 'relay' ? 'turn-' + l.relayProtocol : l ? 'direct' : '?';
};
`;

async function bare(a, b, step) {
  for (const p of [a, b]) await p.evaluate(PC);
  const offer = await a.evaluate((s) => window.bare(s, null), step);
  const answer = await b.evaluate(([s, o]) => window.bare(s, o), [step, offer]);
  await a.evaluate((ans) => window.pc.setRemoteDescription(ans), answer);
  await Promise.all([a.evaluate(() => window.opened), b.evaluate(() => window.opened)]);
  const path = await a.evaluate(() => window.barePath());
  const recv = b.evaluate((n) => window.bareRecv(n), BYTES);
  const t = Date.now();
  await a.evaluate((n) => window.bareSend(n), BYTES);
  await recv;
  const secs = (Date.now() - t) / 1000;
  await Promise.all([a.evaluate(() => window.pc.close()), b.evaluate(() => window.pc.close())]);
  return { path, secs };
}

async function page(a, b, file) {
  const idB = await b.evaluate(() => window.tern.id);
  await a.locator(`#peers li.peer[data-id="${idB}"] input.pick`).check();
  await a.waitForFunction(() => document.getElementById('status').dataset.state === 'connected', null, { timeout: 60_000 });
  const path = await a.locator('#path').textContent();
  const t = Date.now();
  await a.locator('#files').setInputFiles([file.path]);
  const state = await b.waitForFunction(() => {
    const li = document.querySelector('#transfers li.transfer[data-dir="in"]');
    return li && ['done', 'failed', 'cancelled'].includes(li.dataset.state) && li.dataset.state;
  }, null, { timeout: 600_000, polling: 20 }).then((h) => h.jsonValue());
  const secs = (Date.now() - t) / 1000;
  const sha = await b.locator('#transfers li.transfer[data-dir="in"]').first().getAttribute('data-sha256');
  if (state !== 'done' || sha !== file.sha) throw new Error(`page transfer ${state}, SHA-256 ${sha}`);
  return { path, secs };
}

const dir = await mkdtemp(join(tmpdir(), 'tern-bench-web-'));
const file = { path: join(dir, 'bench.bin') };
{
  const h = createHash('sha256');
  const f = await open(file.path, 'w');
  for (let left = BYTES; left > 0; left -= 16 << 20) {
    const b = randomBytes(Math.min(left, 16 << 20));
    h.update(b);
    await f.write(b);
  }
  await f.close();
  file.sha = h.digest('hex');
}
const ARGS = ['--allow-loopback-in-peer-connection'];
const ba = await launchChromium({ extraArgs: ARGS });
const bb = await launchChromium({ extraArgs: ARGS });
for (const br of [ba, bb]) await br.context.grantPermissions(['camera', 'microphone'], { origin: BASE });
const rows = [];
try {
  for (const step of ['direct', 'turn']) {
    const q = step === 'turn' ? '?path=turn' : '';
    for (let run = 0; run < RUNS; run++) {
      for (const kind of ['bare', 'page']) {
        const a = await ba.newPage();
        const b = await bb.newPage();
        await a.goto(`${BASE}/${q}`);
        await b.goto(`${BASE}/${q}`);
        for (const p of [a, b]) await p.waitForSelector('body[data-ready="true"]');
        const r = kind === 'bare' ? await bare(a, b, step) : await page(a, b, file);
        rows.push({ step, run, kind, path: r.path, secs: r.secs, mbps: BYTES / 1e6 / r.secs });
        process.stderr.write(`${step} ${kind} run ${run}: ${r.path} ${(BYTES / 1e6 / r.secs).toFixed(1)} MB/s\n`);
        await a.close();
        await b.close();
      }
    }
  }
} finally {
  await ba.close();
  await bb.close();
  await rm(dir, { recursive: true, force: true });
}
const best = (step, kind) => Math.max(...rows.filter((r) => r.step === step && r.kind === kind).map((r) => r.mbps));
const med = (step, kind) => {
  const v = rows.filter((r) => r.step === step && r.kind === kind).map((r) => r.mbps).sort((x, y) => x - y);
  return v[Math.floor((v.length - 1) / 2)];
};
console.log(`| path | bare RTCDataChannel MB/s (best / median) | page MB/s (best / median) | page / bare (best) |`);
console.log('|---|---|---|---|');
for (const step of ['direct', 'turn']) {
  const [bb1, pb] = [best(step, 'bare'), best(step, 'page')];
  console.log(`| ${step} (${rows.find((r) => r.step === step && r.kind === 'page').path}) | ${bb1.toFixed(1)} / ${med(step, 'bare').toFixed(1)} | ${pb.toFixed(1)} / ${med(step, 'page').toFixed(1)} | ${(pb / bb1 * 100).toFixed(0)} % |`);
}
console.log(JSON.stringify({ mib: MIB, runs: RUNS, rows }));
