// Three pages of the built-in page in one room made by "Share a link" (one Chromium, three
// tabs), against a real daemon:
//  1. the creator's address carries the room at once; the copy-link button answers;
//  2. one chat message to everyone appears on both others, with two delivery marks;
//  3. one pick of two files to everyone arrives at both others (SHA-256 checked in Node
//     on the downloads);
//  4. the same file picked again for one peer while its first send runs is sent again;
//  5. markup in a display name, a chat text and a file name shows as text: no element is
//     made from it, nothing runs;
//  6. the creator reloads: same id, same name, still in the room; the others see it back.
// A screenshot of the creator's page with its two peers goes to --out.
//
// usage: node web_group.mjs --url http://127.0.0.1:API --out DIR
// Prints one JSON line ({"ok":true,...} or {"ok":false,"error":...}) and "PASS" on success.

import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { finish, launchChromium, parseArgs } from './lib.mjs';

const args = parseArgs(process.argv.slice(2));
const BASE = args.url;
const OUT = args.out;
const STEP_MS = 60_000;
const XSS = '<img src=x onerror="window.__xss=1">';

const sha = (buf) => createHash('sha256').update(buf).digest('hex');

async function makeFile(name, bytes) {
  const buf = randomBytes(bytes);
  const path = join(OUT, 'in', name);
  await writeFile(path, buf);
  return { name, path, size: bytes, sha: sha(buf) };
}

const ready = (page) => page.waitForSelector('body[data-ready="true"]', { timeout: STEP_MS });
const peerRow = (page, id) => page.locator(`#peers li.peer[data-id="${id}"]`);
const myId = (page) => page.evaluate(() => window.tern.id);

// Waits until `page` lists every id in `ids` as a member of `room`.
async function seesInRoom(page, ids, room) {
  for (const id of ids) await peerRow(page, id).locator('.meta', { hasText: `room ${room}` }).waitFor({ timeout: STEP_MS });
}

// Waits for `page`'s incoming rows named `name` (from peer `from`) to finish; downloads
// each and checks its bytes against `f`.
async function received(page, f, from, count = 1) {
  const sel = `#transfers li.transfer[data-dir="in"][data-peer="${from}"]`;
  await page.waitForFunction(([s, n, c]) => [...document.querySelectorAll(s)]
    .filter((li) => li.dataset.name === n && ['done', 'failed', 'cancelled'].includes(li.dataset.state)).length >= c,
  [sel, f.name, count], { timeout: STEP_MS, polling: 200 });
  const rows = page.locator(sel).filter({ has: page.locator('.name', { hasText: f.name }) });
  const out = [];
  for (let i = 0; i < (await rows.count()); i++) {
    const row = rows.nth(i);
    if ((await row.getAttribute('data-name')) !== f.name) continue;
    const state = await row.getAttribute('data-state');
    if (state !== 'done') throw new Error(`${f.name} from ${from}: ${state}: ${await row.textContent()}`);
    const [dl] = await Promise.all([page.waitForEvent('download', { timeout: STEP_MS }), row.locator('a.download').click()]);
    const got = await readFile(await dl.path());
    if (/^[\w.-]+$/.test(f.name) && dl.suggestedFilename() !== f.name) throw new Error(`download named ${dl.suggestedFilename()}`);
    if (got.length !== f.size || sha(got) !== f.sha) throw new Error(`${f.name}: download differs from the sent file`);
    await dl.delete();
    out.push(got.length);
  }
  return out;
}

const result = { ok: false, steps: {} };
let br;
const t0 = Date.now();
try {
  await mkdir(join(OUT, 'in'), { recursive: true });
  br = await launchChromium({ extraArgs: ['--allow-loopback-in-peer-connection'] });
  await br.context.grantPermissions(['camera', 'microphone', 'clipboard-read', 'clipboard-write'], { origin: BASE });

  // 1. A makes the room; its own address has it at once.
  const a = await br.newPage();
  await a.goto(`${BASE}/`);
  await ready(a);
  await a.click('#share');
  const room = new URL(a.url()).searchParams.get('room');
  if (!room) throw new Error(`creator's address has no room after "Share a link": ${a.url()}`);
  const link = await a.locator('#share-link').getAttribute('href');
  if (new URL(link).searchParams.get('room') !== room) throw new Error(`link ${link} is not the room ${room}`);
  await a.click('#copy');
  await a.locator('#copied').waitFor({ state: 'visible', timeout: 5000 });
  const clip = await a.evaluate(() => navigator.clipboard.readText().catch((e) => `error: ${e.message}`));
  if (clip !== link) throw new Error(`clipboard holds ${clip}, not ${link}`);
  // A markup-laden display name.
  await a.locator('#name').fill(`Ann ${XSS}`);
  await a.locator('#name').dispatchEvent('change');
  const nameA = await a.evaluate(() => window.tern.name);

  const b = await br.newPage();
  await b.goto(link);
  await ready(b);
  const c = await br.newPage();
  await c.goto(link);
  await ready(c);
  const [idA, idB, idC] = [await myId(a), await myId(b), await myId(c)];
  await seesInRoom(a, [idB, idC], room);
  await seesInRoom(b, [idA, idC], room);
  await seesInRoom(c, [idA, idB], room);
  // The name arrives as text.
  for (const p of [b, c]) {
    await peerRow(p, idA).locator('strong', { hasText: 'Ann' }).waitFor({ timeout: STEP_MS });
    const shown = await peerRow(p, idA).locator('strong').textContent();
    if (shown !== nameA) throw new Error(`name shown as ${JSON.stringify(shown)}, not ${JSON.stringify(nameA)}`);
  }
  result.steps.room = { room, secs: (Date.now() - t0) / 1000 };

  // 2. One chat message to everyone.
  let s = Date.now();
  const text = `hello all ${XSS} ✓`;
  await a.fill('#text', text);
  await a.click('#send');
  for (const p of [b, c]) {
    await p.locator('#messages li.message .body').filter({ hasText: 'hello all' }).first().waitFor({ timeout: STEP_MS });
    const body = await p.locator('#messages li.message .body').first().textContent();
    if (body !== text) throw new Error(`message shown as ${JSON.stringify(body)}`);
    const n = await p.locator('#messages li.message').count();
    if (n !== 1) throw new Error(`${n} messages shown, not 1`);
  }
  await a.waitForFunction(() => document.querySelectorAll('#messages li.message .mark[data-mark="delivered"]').length === 2,
    null, { timeout: STEP_MS });
  const marks = await a.locator('#messages li.message .marks').first().textContent();
  result.steps.chat = { marks, secs: (Date.now() - s) / 1000 };

  // 3. Two files in one pick, to everyone.
  s = Date.now();
  const f1 = await makeFile('photos.bin', 3 * 1024 * 1024 + 17);
  const f2 = await makeFile(`${XSS}.txt`, 20_000);
  await a.locator('#files').setInputFiles([f1.path, f2.path]);
  const outRows = await a.locator('#transfers li.transfer[data-dir="out"]').count();
  if (outRows !== 4) throw new Error(`${outRows} outgoing transfers for 2 files to 2 peers, not 4`);
  const got = {};
  for (const [p, name] of [[b, 'B'], [c, 'C']]) got[name] = [...await received(p, f1, idA), ...await received(p, f2, idA)];
  await a.waitForFunction(() => [...document.querySelectorAll('#transfers li.transfer[data-dir="out"]')]
    .every((li) => li.dataset.state === 'done'), null, { timeout: STEP_MS });
  const paths = await a.$$eval('#transfers li.transfer[data-dir="out"] .info', (els) => els.map((e) => e.textContent.split(' · ')[2]));
  result.steps.everyone = { received: got, paths, secs: (Date.now() - s) / 1000 };

  // 4. The same file again for B while its first send runs.
  s = Date.now();
  const f3 = await makeFile('again.bin', 96 * 1024 * 1024);
  await peerRow(a, idB).locator('input.pick').check();
  await a.waitForFunction(() => document.getElementById('status').dataset.state === 'connected', null, { timeout: STEP_MS });
  await a.locator('#files').setInputFiles([f3.path]);
  const firstState = await a.locator('#transfers li.transfer[data-dir="out"]').first().getAttribute('data-state');
  await a.locator('#files').setInputFiles([f3.path]);
  const again = a.locator('#transfers li.transfer[data-dir="out"][data-name="again.bin"]');
  const n3 = await again.count();
  if (n3 !== 2) throw new Error(`picking again.bin twice made ${n3} transfers`);
  const firstStateAtSecond = await again.nth(1).getAttribute('data-state');
  if (!['connecting', 'sending'].includes(firstStateAtSecond)) throw new Error(`the first send had already ended (${firstStateAtSecond})`);
  const twice = await received(b, f3, idA, 2);
  if (twice.length !== 2) throw new Error(`B received again.bin ${twice.length} times`);
  if ((await c.locator('#transfers li.transfer[data-name="again.bin"]').count()) !== 0) throw new Error('C got a file sent to B only');
  result.steps.again = { firstState, firstStateAtSecond, received: twice, secs: (Date.now() - s) / 1000 };

  // 5. Nothing from the markup became an element or ran.
  for (const p of [a, b, c]) {
    const bad = await p.evaluate(() => ({
      xss: window.__xss === 1,
      imgs: document.querySelectorAll('main img').length,
    }));
    if (bad.xss || bad.imgs) throw new Error(`markup became live: ${JSON.stringify(bad)}`);
  }
  const fileShown = await b.locator(`#transfers li.transfer[data-dir="in"] .name`).filter({ hasText: 'onerror' }).first().textContent();
  if (!fileShown.includes(XSS)) throw new Error(`file name shown as ${fileShown}`);

  // Screenshot: A with its two peers, messages and transfers.
  await a.locator('#everyone').check();
  await a.setViewportSize({ width: 1100, height: 1000 });
  await a.screenshot({ path: join(OUT, 'web-three-peers.png'), fullPage: true });

  // 6. A reloads: same id and name, back in the room; B and C see it come back.
  s = Date.now();
  const seenLeft = b.evaluate((id) => new Promise((res) => {
    const t = window.tern;
    const check = () => {
      if (!t.peers().some((p) => p.id === id)) {
        t.removeEventListener('peers', check);
        res(true);
      }
    };
    t.addEventListener('peers', check);
    setTimeout(() => res(false), 20000);
  }), idA);
  await a.reload();
  await ready(a);
  const left = await seenLeft;
  const back = { id: await myId(a), name: await a.evaluate(() => window.tern.name), url: a.url(), resumed: await a.evaluate(() => window.tern.resumed) };
  if (back.id !== idA) throw new Error(`reloaded creator has id ${back.id}, not ${idA}`);
  if (back.name !== nameA) throw new Error(`reloaded creator is named ${back.name}, not ${nameA}`);
  if (new URL(back.url).searchParams.get('room') !== room) throw new Error(`reloaded address ${back.url}`);
  await seesInRoom(a, [idB, idC], room);
  await seesInRoom(b, [idA], room);
  await seesInRoom(c, [idA], room);
  // And it works: a message from the reloaded creator reaches both.
  await a.fill('#text', 'back again');
  await a.click('#send');
  for (const p of [b, c]) await p.locator('#messages li.message .body', { hasText: 'back again' }).waitFor({ timeout: STEP_MS });
  result.steps.reload = { ...back, othersSawItLeave: left, secs: (Date.now() - s) / 1000 };
  result.ok = true;
} catch (e) {
  result.error = String(e?.stack || e);
} finally {
  result.secs = (Date.now() - t0) / 1000;
  await br?.close();
}
if (result.ok) process.stdout.write('PASS\n');
finish(result);
