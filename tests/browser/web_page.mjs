// The built-in page (/) and tern.js in two headless Chromium instances against a real daemon:
//  1. default path: both see each other in the LAN room; A sends B two files (one 50 MiB)
//     and a text; B's downloads match byte for byte (SHA-256);
//  2. ?path=turn and ?path=ws: the page reports the path, files arrive intact, and the
//     daemon's metrics show the bytes on the TURN relay / the WS relay;
//  3. a named room joined through the share link;
//  4. fault: A's page is closed mid-transfer: B shows a failed transfer with no download,
//     and a new transfer works afterwards.
// Screenshots (desktop + phone) go to --out.
//
// usage: node web_page.mjs --url http://127.0.0.1:API --metrics http://127.0.0.1:M --out DIR
// Prints one JSON line ({"ok":true,...} or {"ok":false,"error":...}) and "PASS" on success.

import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { finish, launchChromium, parseArgs } from './lib.mjs';

const args = parseArgs(process.argv.slice(2));
const BASE = args.url;
const METRICS = args.metrics;
const OUT = args.out;
const BIG = Number(args['big-bytes'] || 50 * 1024 * 1024);
const STEP_MS = 120_000;

const sha = (buf) => createHash('sha256').update(buf).digest('hex');

async function metric(name) {
  const text = await (await fetch(`${METRICS}/metrics`)).text();
  let sum = 0;
  for (const line of text.split('\n')) {
    if (line.startsWith(name + ' ') || line.startsWith(name + '{')) sum += Number(line.split(' ').pop());
  }
  return sum;
}

async function makeFile(name, bytes) {
  const buf = randomBytes(bytes);
  const path = join(OUT, 'in', name);
  await writeFile(path, buf);
  return { name, path, size: bytes, sha: sha(buf) };
}

async function openPage(browser, query = '') {
  const page = await browser.newPage();
  await page.goto(`${BASE}/${query}`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: STEP_MS });
  return page;
}

const myName = (page) => page.locator('#me').textContent();

// Waits until `page` lists the peer named `name` (optionally in a named room) and picks it.
async function pickPeer(page, name, roomLabel) {
  const sel = `#peers li.peer[data-name="${name}"]`;
  const box = page.locator(sel + ' input.pick');
  await box.waitFor({ timeout: STEP_MS });
  if (roomLabel) await page.locator(sel + ' .meta', { hasText: roomLabel }).waitFor({ timeout: STEP_MS });
  await box.check();
  await page.waitForFunction(() => document.getElementById('status').dataset.state === 'connected',
    null, { timeout: STEP_MS });
  return page.locator('#path').textContent();
}

// Sends `files` from A, waits for B to verify each, downloads and hashes them in Node.
async function transfer(a, b, files) {
  await a.locator('#files').setInputFiles(files.map((f) => f.path));
  const results = [];
  for (const f of files) {
    const row = b.locator(`#transfers li.transfer[data-dir="in"][data-name="${f.name}"]`);
    await row.waitFor({ timeout: STEP_MS });
    // An end state: 'verifying' (between the last byte and the file's hash) is not one.
    await b.waitForFunction((n) => {
      const li = document.querySelector(`#transfers li.transfer[data-dir="in"][data-name="${n}"]`);
      return li && ['done', 'failed', 'cancelled'].includes(li.dataset.state);
    }, f.name, { timeout: STEP_MS, polling: 200 });
    const state = await row.getAttribute('data-state');
    if (state !== 'done') throw new Error(`${f.name}: ${state}: ${await row.textContent()}`);
    const [dl] = await Promise.all([b.waitForEvent('download', { timeout: STEP_MS }), row.locator('a.download').click()]);
    if (dl.suggestedFilename() !== f.name) throw new Error(`download named ${dl.suggestedFilename()}, not ${f.name}`);
    const got = await readFile(await dl.path());
    if (got.length !== f.size || sha(got) !== f.sha) throw new Error(`${f.name}: download differs from the sent file`);
    results.push({ name: f.name, bytes: got.length });
    await dl.delete();
  }
  // The sender's rows finish too.
  await a.waitForFunction((n) => [...document.querySelectorAll('#transfers li.transfer[data-dir="out"]')]
    .filter((li) => li.dataset.state === 'done').length >= n, files.length, { timeout: STEP_MS });
  return results;
}

async function sendText(a, b, text) {
  await a.fill('#text', text);
  await a.click('#send');
  await b.locator('#messages li.message .body', { hasText: text }).waitFor({ timeout: STEP_MS });
}

const ARGS = ['--allow-loopback-in-peer-connection'];
const result = { ok: false, steps: {} };
let ba;
let bb;
const t0 = Date.now();
try {
  await mkdir(join(OUT, 'in'), { recursive: true });
  ba = await launchChromium({ extraArgs: ARGS });
  bb = await launchChromium({ extraArgs: ARGS });
  // Camera/microphone permission lets Chromium offer loopback host candidates (direct path).
  for (const b of [ba, bb]) await b.context.grantPermissions(['camera', 'microphone'], { origin: BASE });

  const big = await makeFile('big.bin', BIG);
  const small = await makeFile('notes.txt', 123_457);

  // 1. Default path, LAN room.
  let s = Date.now();
  let a = await openPage(ba);
  let b = await openPage(bb);
  const nameA = await myName(a);
  const nameB = await myName(b);
  const path1 = await pickPeer(a, nameB);
  const files1 = await transfer(a, b, [big, small]);
  await sendText(a, b, 'hello from A ✓');
  result.steps.lan = { path: path1, files: files1, secs: (Date.now() - s) / 1000 };
  if (!['direct', 'turn-udp', 'turn-tcp', 'turn-tls'].includes(path1)) throw new Error(`default path ${path1}`);

  // Screenshots: desktop and phone viewport of the receiver.
  await b.setViewportSize({ width: 1100, height: 900 });
  await b.screenshot({ path: join(OUT, 'web-desktop.png'), fullPage: true });
  await b.setViewportSize({ width: 390, height: 844 });
  await b.screenshot({ path: join(OUT, 'web-phone.png'), fullPage: true });
  const phoneOverflow = await b.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  if (phoneOverflow) throw new Error('the page scrolls sideways on a 390 px wide viewport');
  await a.close();
  await b.close();

  // 2. Forced paths, with the daemon's metrics.
  const mid = await makeFile('mid.bin', 6 * 1024 * 1024);
  for (const [flag, want, counter] of [
    ['turn', /^turn-/, 'tern_relay_bytes_total'],
    ['ws', /^ws-relay$/, 'tern_ws_relay_bytes_total'],
  ]) {
    s = Date.now();
    const before = await metric(counter);
    a = await openPage(ba, `?path=${flag}`);
    b = await openPage(bb, `?path=${flag}`);
    const path = await pickPeer(a, await myName(b));
    if (!want.test(path)) throw new Error(`?path=${flag} reported path ${path}`);
    const files = await transfer(a, b, [mid, small]);
    const recvPath = await b.locator('#transfers li.transfer[data-dir="in"] .info').first().textContent();
    if (!recvPath.split(' · ').some((part) => want.test(part))) throw new Error(`receiver shows ${recvPath}`);
    const delta = (await metric(counter)) - before;
    if (delta < mid.size + small.size) throw new Error(`${counter} grew by ${delta}, less than the files`);
    result.steps[flag] = { path, files, [counter]: delta, secs: (Date.now() - s) / 1000 };
    await a.close();
    await b.close();
  }

  // 3. Share link: A creates a named room, B opens the link.
  s = Date.now();
  a = await openPage(ba);
  await a.click('#share');
  const link = await a.locator('#share-link').getAttribute('href');
  const room = new URL(link).searchParams.get('room');
  if (!room) throw new Error(`share link without a room: ${link}`);
  b = await bb.newPage();
  await b.goto(link);
  await b.waitForSelector('body[data-ready="true"]');
  const pathShare = await pickPeer(b, await myName(a), `room ${room}`);
  await transfer(b, a, [small]);
  await sendText(b, a, 'via the share link');
  result.steps.share = { room, path: pathShare, secs: (Date.now() - s) / 1000 };
  await a.close();
  await b.close();

  // 4. Fault: A's page closes mid-transfer.
  s = Date.now();
  a = await openPage(ba, '?path=ws');
  b = await openPage(bb, '?path=ws');
  const nameB4 = await myName(b);
  await pickPeer(a, nameB4);
  // Four times the big file, closed at 2%: the sender's in-flight window (16 MiB) cannot
  // carry the rest before the close, even on a loaded machine where the poll runs late.
  const fault = await makeFile('fault.bin', 4 * BIG);
  await a.locator('#files').setInputFiles([fault.path]);
  await b.waitForFunction(() => {
    const p = document.querySelector('#transfers li.transfer[data-dir="in"] progress');
    return p && p.value > 0.02;
  }, null, { timeout: STEP_MS, polling: 50 });
  const partial = await b.locator('#transfers li.transfer[data-dir="in"] progress').getAttribute('value');
  await a.close();
  await b.waitForFunction(() => {
    const li = document.querySelector('#transfers li.transfer[data-dir="in"]');
    return li && li.dataset.state !== 'receiving';
  }, null, { timeout: STEP_MS, polling: 200 });
  const row = b.locator('#transfers li.transfer[data-dir="in"]').first();
  const state = await row.getAttribute('data-state');
  if (state !== 'failed') throw new Error(`receiver row is ${state} after the sender closed (at ${partial})`);
  if ((await row.locator('a.download').count()) !== 0) throw new Error('a partial file is offered for download');
  const failText = await row.locator('.info').textContent();
  // A new sender page; the transfer works afterwards.
  a = await openPage(ba, '?path=ws');
  await pickPeer(a, nameB4);
  await transfer(a, b, [small]);
  result.steps.fault = { receivedBeforeClose: Number(partial), shown: failText, secs: (Date.now() - s) / 1000 };
  result.names = { a: nameA, b: nameB };
  result.ok = true;
} catch (e) {
  result.error = String(e?.stack || e);
} finally {
  result.secs = (Date.now() - t0) / 1000;
  await ba?.close();
  await bb?.close();
}
if (result.ok) process.stdout.write('PASS\n');
finish(result);
