// The Service Worker download, tern.js's storage where the Origin Private File System has no
// writable streams: the receiving page is made such a browser (FileSystemFileHandle's
// createWritable removed before any script runs), so tern.js falls back to streaming each
// received file into the browser's downloads through /tern-sw.js. The sending page is made a
// browser whose file streams have no BYOB reader (getReader({mode: 'byob'}) throws), so
// tern.js copies the stream's chunks into its pieces (Chromium's own file streams take the
// BYOB path, which the other tests cover).
//  1. a file of --bytes (24 MiB by default: several times the worker's 4 MiB queue and the
//     sender's window, so backpressure runs) is sent direct; the receiver's row ends "done"
//     with storage 'download', the browser's download completes, and the downloaded file's
//     SHA-256 (computed here, by Node) equals the file's; the receiver's OPFS holds nothing;
//  2. a second send is cancelled by the receiver a few percent in: both rows end
//     "cancelled" and the browser's download fails (no file is kept);
//  3. one byte of one chunk is flipped on its way out of the sender (its data channel's
//     send patched): the receiver's check of that piece fails, both rows end
//     "failed" saying so, and the browser's download fails;
//  4. the download is cancelled in the browser (its download manager, as a user would):
//     the receiver's row fails saying so, and so does the sender's (it stops sending);
//  5. a third page, whose browser runs no Worker (the constructor throws, as where tern.js
//     is loaded from another origin), receives the file: its main thread checks the pieces
//     in batches and an OPFS writable stream stores them; the row ends "done" with storage
//     'opfs', and the stored file's SHA-256 (its button, read back) equals the file's;
//  6. a piece's frame (kind 9) is cut short before its SHA-256 on its way out of the
//     sender: the receiver fails the transfer saying so, and the sender hears why.
//
// usage: node web_save.mjs --url http://127.0.0.1:API --out DIR [--bytes N]
// Prints one JSON line and "PASS" on success.

import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { finish, launchChromium, parseArgs } from './lib.mjs';

const args = parseArgs(process.argv.slice(2));
const BASE = args.url;
const OUT = args.out;
const BYTES = Number(args.bytes || 24 << 20);
const STEP_MS = 120_000;
const NO_WRITABLE = () => {
  delete FileSystemFileHandle.prototype.createWritable;
};
const NO_BYOB = () => {
  const get = ReadableStream.prototype.getReader;
  window.byobRefused = 0;
  ReadableStream.prototype.getReader = function getReader(o) {
    if (o?.mode === 'byob') {
      window.byobRefused++;
      throw new TypeError('no BYOB reader in this browser');
    }
    return get.call(this, o);
  };
};

const NO_WORKER = () => {
  window.workerRefused = 0;
  window.Worker = function Worker() {
    window.workerRefused++;
    throw new DOMException('no workers in this browser', 'SecurityError');
  };
};

const inRow = (page) => page.locator('#transfers li.transfer[data-dir="in"]').first();
const endState = (page, dir) => page.waitForFunction((d) => {
  const li = document.querySelector(`#transfers li.transfer[data-dir="${d}"]`);
  return li && ['done', 'failed', 'cancelled'].includes(li.dataset.state) && li.dataset.state;
}, dir, { timeout: STEP_MS, polling: 100 }).then((h) => h.jsonValue());

const result = { ok: false, steps: {} };
let ba;
let bb;
const t0 = Date.now();
const file = join(OUT, 'in', 'save-me.bin');
try {
  await mkdir(join(OUT, 'in'), { recursive: true });
  const data = randomBytes(BYTES);
  await writeFile(file, data);
  const want = createHash('sha256').update(data).digest('hex');
  const ARGS = ['--allow-loopback-in-peer-connection'];
  ba = await launchChromium({ extraArgs: ARGS });
  bb = await launchChromium({ extraArgs: ARGS });
  for (const br of [ba, bb]) await br.context.grantPermissions(['camera', 'microphone'], { origin: BASE });
  const a = await ba.newPage();
  const b = await bb.newPage();
  await b.addInitScript(NO_WRITABLE);
  await a.addInitScript(NO_BYOB);
  await a.goto(`${BASE}/`);
  await b.goto(`${BASE}/`);
  for (const p of [a, b]) await p.waitForSelector('body[data-ready="true"]');
  const idB = await b.evaluate(() => window.tern.id);
  await a.locator(`#peers li.peer[data-id="${idB}"] input.pick`).check({ timeout: STEP_MS });
  await a.waitForFunction(() => document.getElementById('status').dataset.state === 'connected', null, { timeout: 60_000 });

  // 1. Through the Service Worker into the browser's downloads.
  let s = Date.now();
  const download = b.waitForEvent('download', { timeout: STEP_MS });
  await a.locator('#files').setInputFiles([file]);
  const dl = await download;
  const state = await endState(b, 'in');
  if (state !== 'done') throw new Error(`receive ended ${state}: ${await inRow(b).textContent()}`);
  const failure = await dl.failure();
  if (failure) throw new Error(`the browser's download failed: ${failure}`);
  const got = createHash('sha256').update(await readFile(await dl.path())).digest('hex');
  if (got !== want) throw new Error(`downloaded file's SHA-256 ${got}, the file's ${want}`);
  const shown = await inRow(b).getAttribute('data-sha256');
  if (shown !== want) throw new Error(`receiver's SHA-256 ${shown}, the file's ${want}`);
  if ((await endState(a, 'out')) !== 'done') throw new Error('sender row not done');
  const storage = await inRow(b).getAttribute('data-storage');
  if (storage !== 'download') throw new Error(`receiver stored the file in ${storage}, not a download`);
  if (!(await a.evaluate(() => window.byobRefused))) throw new Error('the sender never asked for a BYOB reader');
  const opfs = await b.evaluate(async () => {
    const names = [];
    const walk = async (dir, prefix) => {
      for await (const [name, h] of dir.entries()) {
        if (h.kind === 'directory') await walk(h, `${prefix}${name}/`);
        else names.push(prefix + name);
      }
    };
    await walk(await navigator.storage.getDirectory(), '');
    return names;
  });
  if (opfs.length) throw new Error(`the receiver's OPFS holds ${JSON.stringify(opfs)}`);
  result.steps.download = {
    bytes: BYTES, secs: (Date.now() - s) / 1000, suggested: dl.suggestedFilename(), storage,
    shown: await inRow(b).locator('.info').textContent(),
  };
  if (dl.suggestedFilename() !== 'save-me.bin') throw new Error(`download named ${dl.suggestedFilename()}`);
  if (!result.steps.download.shown.includes('saved to your downloads')) throw new Error('the row does not say where the file went');

  // 2. A cancelled receive fails its download.
  s = Date.now();
  const second = b.waitForEvent('download', { timeout: STEP_MS });
  await a.locator('#files').setInputFiles([file]);
  const dl2 = await second;
  await b.waitForFunction(() => {
    const li = document.querySelectorAll('#transfers li.transfer[data-dir="in"]');
    const p = li.length >= 2 && li[0].querySelector('progress');
    return p && p.value > 0.03;
  }, null, { timeout: STEP_MS, polling: 50 });
  await inRow(b).locator('button.cancel').click();
  const [sa, sb] = [await endState(a, 'out'), await endState(b, 'in')];
  if (sa !== 'cancelled' || sb !== 'cancelled') throw new Error(`cancel: sender ${sa}, receiver ${sb}`);
  const failure2 = await dl2.failure();
  if (!failure2) throw new Error('the cancelled download completed');
  result.steps.cancel = { secs: (Date.now() - s) / 1000, downloadFailure: failure2 };

  // 3. A corrupted chunk fails its piece's SHA-256 check.
  s = Date.now();
  await a.evaluate(() => {
    const send = RTCDataChannel.prototype.send;
    let flipped = false;
    RTCDataChannel.prototype.send = function (d) {
      if (!flipped && d instanceof Uint8Array && (d[0] === 8 || d[0] === 9) && d.length > 1000) { // a file chunk (kind 8 or 9)
        flipped = true;
        d = d.slice();
        d[d.length - 1] ^= 1;
      }
      return send.call(this, d);
    };
  });
  const third = b.waitForEvent('download', { timeout: STEP_MS });
  await a.locator('#files').setInputFiles([file]);
  const dl3 = await third;
  const [sa3, sb3] = [await endState(a, 'out'), await endState(b, 'in')];
  const why = { receiver: await inRow(b).locator('.info').textContent(), sender: await a.locator('#transfers li.transfer[data-dir="out"]').first().locator('.info').textContent() };
  if (sa3 !== 'failed' || sb3 !== 'failed') throw new Error(`corrupted chunk: sender ${sa3}, receiver ${sb3}`);
  if (!why.receiver.includes('SHA-256') || !why.sender.includes('SHA-256')) throw new Error(`corrupted chunk, rows say ${JSON.stringify(why)}`);
  const failure3 = await dl3.failure();
  if (!failure3) throw new Error('the corrupted download completed');
  result.steps.corrupt = { secs: (Date.now() - s) / 1000, ...why, downloadFailure: failure3 };

  // 4. The user cancels the download in the browser.
  s = Date.now();
  const fourth = b.waitForEvent('download', { timeout: STEP_MS });
  await a.locator('#files').setInputFiles([file]);
  const dl4 = await fourth;
  await dl4.cancel();
  const [sa4, sb4] = [await endState(a, 'out'), await endState(b, 'in')];
  const why4 = { receiver: await inRow(b).locator('.info').textContent(), sender: await a.locator('#transfers li.transfer[data-dir="out"]').first().locator('.info').textContent() };
  if (sa4 !== 'failed' || sb4 !== 'failed' || !why4.sender.includes('download was cancelled')) {
    throw new Error(`download cancelled in the browser: sender ${sa4}, receiver ${sb4}, rows say ${JSON.stringify(why4)}`);
  }
  result.steps.browserCancel = { secs: (Date.now() - s) / 1000, ...why4 };

  // 5. No piece worker: the receiving main thread checks, a writable stream stores.
  s = Date.now();
  const c = await bb.newPage();
  await c.addInitScript(NO_WORKER);
  await c.goto(`${BASE}/`);
  await c.waitForSelector('body[data-ready="true"]');
  const idC = await c.evaluate(() => window.tern.id);
  await a.locator(`#peers li.peer[data-id="${idB}"] input.pick`).uncheck({ timeout: STEP_MS });
  await a.locator(`#peers li.peer[data-id="${idC}"] input.pick`).check({ timeout: STEP_MS });
  await a.waitForFunction(() => document.getElementById('status').dataset.state === 'connected', null, { timeout: 60_000 });
  await a.locator('#files').setInputFiles([file]);
  const sc5 = await endState(c, 'in');
  if (sc5 !== 'done') throw new Error(`no worker: receive ended ${sc5}: ${await inRow(c).textContent()}`);
  const storage5 = await inRow(c).getAttribute('data-storage');
  if (storage5 !== 'opfs') throw new Error(`no worker: stored in ${storage5}, not OPFS`);
  if (!(await c.evaluate(() => window.workerRefused))) throw new Error('the receiving page never tried to start a worker');
  await inRow(c).locator('button.sha').click();
  await inRow(c).locator('div.sha').waitFor({ timeout: STEP_MS });
  const sha5 = await inRow(c).getAttribute('data-sha256');
  if (sha5 !== want) throw new Error(`no worker: the stored file's SHA-256 ${sha5}, the file's ${want}`);
  result.steps.noWorker = { secs: (Date.now() - s) / 1000, storage: storage5, shown: await inRow(c).locator('.info').textContent() };

  // 6. A piece frame cut short before its SHA-256.
  s = Date.now();
  await a.evaluate(() => {
    const send = RTCDataChannel.prototype.send;
    let cut = false;
    RTCDataChannel.prototype.send = function (d) {
      if (!cut && d instanceof Uint8Array && d[0] === 9) { // a piece's last chunk (kind 9)
        cut = true;
        d = d.slice(0, 20);
      }
      return send.call(this, d);
    };
  });
  await a.locator('#files').setInputFiles([file]);
  const outRow = a.locator('#transfers li.transfer[data-dir="out"]').first();
  const [sa6, sc6] = [await endState(a, 'out'), await endState(c, 'in')];
  const why6 = { receiver: await inRow(c).locator('.info').textContent(), sender: await outRow.locator('.info').textContent() };
  if (sa6 !== 'failed' || sc6 !== 'failed' || !why6.receiver.includes('shorter than its') || !why6.sender.includes('shorter than its')) {
    throw new Error(`a piece frame cut short: sender ${sa6}, receiver ${sc6}, rows say ${JSON.stringify(why6)}`);
  }
  result.steps.shortFrame = { secs: (Date.now() - s) / 1000, ...why6 };
  result.ok = true;
} catch (e) {
  result.error = String(e?.stack || e);
} finally {
  result.secs = (Date.now() - t0) / 1000;
  await rm(file, { force: true });
  await ba?.close();
  await bb?.close();
}
if (result.ok) process.stdout.write('PASS\n');
finish(result);
