// Any size with bounded memory, between two pages of the built-in page (two Chromiums, so
// the receiver's renderer is a process of its own):
//  1. tern.js's incremental SHA-256 equals WebCrypto's digest (sizes around the block
//     and padding edges, random slicing, one 33 MiB buffer), and its speed;
//  2. a file of --bytes (1 GiB by default, generated here) moves direct; each tab's
//     renderer's resident memory (/proc/PID/status VmRSS of every renderer process of the
//     receiving browser and of the sending one, sampled every 200 ms) stays under
//     --bound-mib, also while the receiver reads the stored file back for its own SHA-256
//     and the sender reads the picked file again for its (each row's button), both of
//     which must equal Node's hash of the file; both rows show the same
//     digest (the SHA-256 of the pieces' SHA-256);
//  3. a sender whose digest (file-end) does not match the pieces it sent: the receiver
//     refuses the file, both rows end "failed" naming the digest, nothing of it is stored;
//  4. the receiver cancels one send and the sender cancels another: both rows end
//     "cancelled" on both sides, and the receiver's Origin Private File System then holds
//     nothing but the finished file.
// A screenshot of the receiver mid-transfer goes to --out.
//
// usage: node web_big.mjs --url http://127.0.0.1:API --out DIR [--bytes N] [--bound-mib M]
// Prints one JSON line and "PASS" on success.

import { createHash, randomBytes } from 'node:crypto';
import { open, mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { browserPids, finish, launchChromium, parseArgs, rssMiB } from './lib.mjs';

const args = parseArgs(process.argv.slice(2));
const BASE = args.url;
const OUT = args.out;
const BYTES = Number(args.bytes || 1024 * 1024 * 1024);
const BOUND_MIB = Number(args['bound-mib'] || 400);
// A step may take as long as the file needs at 1 MiB/s on a busy machine (5 min at least).
const STEP_MS = Math.max(300_000, BYTES / 1048576 * 1000);

// Writes `bytes` of random data in 16 MiB pieces, hashing on the way (never all in memory).
async function bigFile(path, bytes) {
  const h = createHash('sha256');
  const f = await open(path, 'w');
  for (let left = bytes; left > 0;) {
    const n = Math.min(left, 16 << 20);
    const b = randomBytes(n);
    h.update(b);
    await f.write(b);
    left -= n;
  }
  await f.close();
  return h.digest('hex');
}

const inRow = (page) => page.locator('#transfers li.transfer[data-dir="in"]').first();
const outRow = (page) => page.locator('#transfers li.transfer[data-dir="out"]').first();
const rows = (page, dir) => page.locator(`#transfers li.transfer[data-dir="${dir}"]`).count();
// Waits until the page has `n` rows of `dir` and the newest one's bar is past `frac`.
const progressOver = (page, dir, frac, n) => page.waitForFunction(([d, f, k]) => {
  const all = document.querySelectorAll(`#transfers li.transfer[data-dir="${d}"]`);
  const p = all.length >= k && all[0].querySelector('progress');
  return p && p.value > f;
}, [dir, frac, n], { timeout: STEP_MS, polling: 100 });
const endState = (page, dir) => page.waitForFunction((d) => {
  const li = document.querySelector(`#transfers li.transfer[data-dir="${d}"]`);
  return li && ['done', 'failed', 'cancelled'].includes(li.dataset.state) && li.dataset.state;
}, dir, { timeout: STEP_MS, polling: 200 }).then((h) => h.jsonValue());

const result = { ok: false, steps: {} };
let ba;
let bb;
const t0 = Date.now();
const bigPath = join(OUT, 'in', 'big-file.bin');
const liarPath = join(OUT, 'in', 'digest-liar.bin');
try {
  await mkdir(join(OUT, 'in'), { recursive: true });
  const ARGS = ['--allow-loopback-in-peer-connection'];
  ba = await launchChromium({ extraArgs: ARGS });
  bb = await launchChromium({ extraArgs: ARGS });
  for (const b of [ba, bb]) await b.context.grantPermissions(['camera', 'microphone'], { origin: BASE });
  const a = await ba.newPage();
  const b = await bb.newPage();
  await a.goto(`${BASE}/`);
  await b.goto(`${BASE}/`);
  for (const p of [a, b]) await p.waitForSelector('body[data-ready="true"]');

  // 1. Incremental SHA-256 against WebCrypto.
  result.steps.sha256 = await a.evaluate(async () => {
    const { Sha256 } = await import('/tern.js');
    const hex = (u8) => Array.from(u8, (x) => x.toString(16).padStart(2, '0')).join('');
    const sizes = [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 121, 1000, 4096, (1 << 20) + 3, 33 << 20];
    const fill = (n) => {
      const u = new Uint8Array(n);
      for (let o = 0; o < n; o += 65536) crypto.getRandomValues(u.subarray(o, Math.min(n, o + 65536)));
      return u;
    };
    let speed = 0;
    for (const n of sizes) {
      const data = fill(n);
      const want = hex(new Uint8Array(await crypto.subtle.digest('SHA-256', data)));
      const h = new Sha256();
      const t = performance.now();
      for (let o = 0; o < n;) {
        const k = n > 1e6 ? 1 << 20 : 1 + Math.floor(Math.random() * 97);
        h.update(data.subarray(o, o + k));
        o += k;
      }
      const got = h.hex();
      if (n === 33 << 20) speed = n / 1048576 / ((performance.now() - t) / 1000);
      if (got !== want) throw new Error(`SHA-256 of ${n} bytes: ${got}, WebCrypto ${want}`);
    }
    return { sizes: sizes.length, mibPerSec: Math.round(speed) };
  });

  // 2. The big file, direct.
  let s = Date.now();
  const want = await bigFile(bigPath, BYTES);
  result.steps.generate = { bytes: BYTES, secs: (Date.now() - s) / 1000 };
  const idB = await b.evaluate(() => window.tern.id);
  await a.locator(`#peers li.peer[data-id="${idB}"] input.pick`).check({ timeout: STEP_MS });
  await a.waitForFunction(() => document.getElementById('status').dataset.state === 'connected', null, { timeout: 60_000 });
  const path = await a.locator('#path').textContent();
  if (path !== 'direct') throw new Error(`path ${path}, not direct`);
  const pids = await browserPids(bb.profile, 'renderer');
  const sendPids = await browserPids(ba.profile, 'renderer');
  if (pids.length === 0 || sendPids.length === 0) throw new Error('no renderer process found for a browser');
  let peak = 0;
  let sendPeak = 0;
  let peakHeap = 0;
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      for (const pid of pids) peak = Math.max(peak, await rssMiB(pid));
      for (const pid of sendPids) sendPeak = Math.max(sendPeak, await rssMiB(pid));
      await new Promise((r) => setTimeout(r, 200));
    }
  })();
  const heapSampler = setInterval(() => {
    b.evaluate(() => performance.memory?.usedJSHeapSize || 0).then((h) => { peakHeap = Math.max(peakHeap, h); }, () => {});
  }, 500);
  const baseline = Math.max(...await Promise.all(pids.map(rssMiB)));
  const sendBaseline = Math.max(...await Promise.all(sendPids.map(rssMiB)));
  s = Date.now();
  await a.locator('#files').setInputFiles([bigPath]);
  await progressOver(b, 'in', 0.3, 1);
  await b.setViewportSize({ width: 1100, height: 900 });
  await b.screenshot({ path: join(OUT, 'web-large-transfer.png'), fullPage: true });
  const state = await endState(b, 'in');
  const secs = (Date.now() - s) / 1000;
  let hashSecs = null;
  try {
    if (state !== 'done') throw new Error(`1 GiB receive ended ${state}: ${await inRow(b).textContent()}`);
    if ((await endState(a, 'out')) !== 'done') throw new Error('sender row not done');
    const digests = [await inRow(b).getAttribute('data-digest'), await outRow(a).getAttribute('data-digest')];
    if (!/^[0-9a-f]{64}$/.test(digests[0]) || digests[0] !== digests[1]) throw new Error(`digests receiver/sender: ${digests}`);
    const h0 = Date.now();
    await inRow(b).locator('button.sha').click();
    await inRow(b).locator('div.sha').waitFor({ timeout: STEP_MS });
    hashSecs = (Date.now() - h0) / 1000;
    const got = await inRow(b).getAttribute('data-sha256');
    if (got !== want) throw new Error(`the stored file's SHA-256 ${got}, the file's ${want}`);
    // The sender's own button: the picked file read again (in its piece worker).
    await outRow(a).locator('button.sha').click();
    await outRow(a).locator('div.sha').waitFor({ timeout: STEP_MS });
    const sent = await outRow(a).getAttribute('data-sha256');
    if (sent !== want) throw new Error(`the sender's SHA-256 of the file ${sent}, Node's ${want}`);
  } finally {
    sampling = false;
    clearInterval(heapSampler);
    await sampler;
  }
  result.steps.big = {
    bytes: BYTES, secs, mibPerSec: Math.round(BYTES / 1048576 / secs), path, renderers: pids.length, hashSecs,
    rendererRssBaselineMiB: Math.round(baseline), rendererRssPeakMiB: Math.round(peak),
    senderRssBaselineMiB: Math.round(sendBaseline), senderRssPeakMiB: Math.round(sendPeak),
    jsHeapPeakMiB: Math.round(peakHeap / 1048576), boundMiB: BOUND_MIB, shown: await inRow(b).locator('.info').textContent(),
  };
  if (peak > BOUND_MIB) throw new Error(`receiving renderer reached ${Math.round(peak)} MiB RSS, over the ${BOUND_MIB} MiB bound`);
  if (sendPeak > BOUND_MIB) throw new Error(`sending renderer reached ${Math.round(sendPeak)} MiB RSS, over the ${BOUND_MIB} MiB bound`);

  // 3. A digest that is not the pieces' (the sender's channel patched to send a wrong one):
  // refused by the receiver, the reason on both sides, its storage freed (checked below).
  s = Date.now();
  await bigFile(liarPath, 3 * 1048576 + 12345);
  await a.evaluate(async (id) => {
    const ch = await window.tern.open(id);
    const send = ch._sendCtl.bind(ch);
    ch._sendCtl = (o) => send(o.kind === 'file-end' ? { ...o, digest: '0'.repeat(64) } : o);
    window.unpatchDigest = () => { delete ch._sendCtl; };
  }, idB);
  const [nIn, nOut] = [(await rows(b, 'in')) + 1, (await rows(a, 'out')) + 1];
  await a.locator('#files').setInputFiles([liarPath]);
  await progressOver(b, 'in', -1, nIn);
  await progressOver(a, 'out', -1, nOut);
  const liar = [await endState(a, 'out'), await endState(b, 'in')];
  await a.evaluate(() => window.unpatchDigest());
  const liarShows = { sender: await outRow(a).locator('.info').textContent(), receiver: await inRow(b).locator('.info').textContent() };
  if (liar[0] !== 'failed' || liar[1] !== 'failed' || !/digest/.test(liarShows.sender) || !/digest/.test(liarShows.receiver)) {
    throw new Error(`a wrong digest: sender ${liar[0]}, receiver ${liar[1]}: ${JSON.stringify(liarShows)}`);
  }
  result.steps.wrongDigest = { ...liarShows, secs: (Date.now() - s) / 1000 };

  // 4. Cancels from either side free the receiver's storage.
  s = Date.now();
  const cancels = {};
  for (const who of ['receiver', 'sender']) {
    const n = (await rows(b, 'in')) + 1;
    await a.locator('#files').setInputFiles([bigPath]);
    await progressOver(b, 'in', 0.03, n);
    if (who === 'receiver') await inRow(b).locator('button.cancel').click();
    else await outRow(a).locator('button.cancel').click();
    const [sa, sb] = [await endState(a, 'out'), await endState(b, 'in')];
    if (sa !== 'cancelled' || sb !== 'cancelled') throw new Error(`${who} cancel: sender ${sa}, receiver ${sb}`);
    cancels[who] = { receiverShows: await inRow(b).locator('.info').textContent(), senderShows: await outRow(a).locator('.info').textContent() };
  }
  // The finished file is all the receiver stores (no partial file, no .crswap); removal
  // runs after any write in progress, so give it a moment.
  const listStored = () => b.evaluate(async () => {
    const files = [];
    const walk = async (dir, prefix) => {
      for await (const [name, h] of dir.entries()) {
        if (h.kind === 'directory') await walk(h, `${prefix}${name}/`);
        else files.push({ name: prefix + name, size: (await h.getFile()).size });
      }
    };
    await walk(await navigator.storage.getDirectory(), '');
    return files;
  });
  let stored = await listStored();
  for (let i = 0; i < 40 && !(stored.length === 1 && stored[0].size === BYTES); i++) {
    await new Promise((r) => setTimeout(r, 500));
    stored = await listStored();
  }
  if (!(stored.length === 1 && stored[0].size === BYTES)) throw new Error(`receiver's storage after the cancels: ${JSON.stringify(stored)}`);
  result.steps.cancel = { ...cancels, stored, secs: (Date.now() - s) / 1000 };
  result.ok = true;
} catch (e) {
  result.error = String(e?.stack || e);
} finally {
  result.secs = (Date.now() - t0) / 1000;
  await rm(bigPath, { force: true });
  await rm(liarPath, { force: true });
  await ba?.close();
  await bb?.close();
}
if (result.ok) process.stdout.write('PASS\n');
finish(result);
