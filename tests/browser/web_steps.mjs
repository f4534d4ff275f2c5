// A path you can watch: ICE is made to fail (in both pages no remote candidate ever
// reaches ICE: addIceCandidate does nothing and candidate lines are cut from remote SDP,
// as on a network where no pair can work), so the channel goes through every step. The sender's status line names each step as it is
// tried ("direct…", "through Tern's TURN…"), the path log lists them with why each was
// given up, and the WebSocket relay then carries a file intact. Before that, with the peer
// picked and nothing connected, the page says why sending files waits.
//
// usage: node web_steps.mjs --url http://127.0.0.1:API --out DIR
// Prints one JSON line and "PASS" on success.

import { createHash, randomBytes } from 'node:crypto';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { finish, launchChromium, parseArgs } from './lib.mjs';

const args = parseArgs(process.argv.slice(2));
const BASE = args.url;
const OUT = args.out;
const STEP_MS = 60_000;
const NO_CANDIDATES = () => {
  RTCPeerConnection.prototype.addIceCandidate = function () {
    return Promise.resolve();
  };
  const setRemote = RTCPeerConnection.prototype.setRemoteDescription;
  RTCPeerConnection.prototype.setRemoteDescription = function (d) {
    const sdp = d.sdp.split('\r\n').filter((l) => !l.startsWith('a=candidate')).join('\r\n');
    return setRemote.call(this, { type: d.type, sdp });
  };
};

const result = { ok: false };
let ba;
let bb;
const t0 = Date.now();
try {
  await mkdir(join(OUT, 'in'), { recursive: true });
  const ARGS = ['--allow-loopback-in-peer-connection'];
  ba = await launchChromium({ extraArgs: ARGS });
  bb = await launchChromium({ extraArgs: ARGS });
  for (const br of [ba, bb]) await br.context.grantPermissions(['camera', 'microphone'], { origin: BASE });
  const pages = [];
  for (const br of [ba, bb]) {
    const p = await br.newPage();
    await p.addInitScript(NO_CANDIDATES);
    await p.goto(`${BASE}/`);
    await p.waitForSelector('body[data-ready="true"]', { timeout: STEP_MS });
    pages.push(p);
  }
  const [a, b] = pages;
  // Every status text the sender shows, in order.
  await a.evaluate(() => {
    window.__statuses = [];
    const st = document.getElementById('status');
    const note = () => {
      if (window.__statuses[window.__statuses.length - 1] !== st.textContent) window.__statuses.push(st.textContent);
    };
    new MutationObserver(note).observe(st, { childList: true, characterData: true, subtree: true });
  });
  const idB = await b.evaluate(() => window.tern.id);
  await a.locator(`#peers li.peer[data-id="${idB}"] input.pick`).check({ timeout: STEP_MS });
  // While the channel is being set up the page says why files wait.
  await a.locator('#send-hint', { hasText: 'Files wait for the connection' }).waitFor({ timeout: 5000 }).catch(async () => {
    throw new Error(`hint: ${await a.locator('#send-hint').textContent()}; statuses ${JSON.stringify(await a.evaluate(() => window.__statuses))}`);
  });
  const hint = await a.locator('#send-hint').textContent();
  await a.waitForFunction(() => document.getElementById('path').textContent === 'ws-relay', null, { timeout: STEP_MS });
  const statuses = await a.evaluate(() => window.__statuses);
  const log = await a.$$eval('#path-log li', (els) => els.map((e) => e.textContent));
  const want = ['direct…', "through Tern's TURN…", 'WebSocket relay…'];
  for (const w of want) {
    if (!statuses.some((s) => s.includes(w))) throw new Error(`status never said ${w}: ${JSON.stringify(statuses)}`);
  }
  const order = want.map((w) => statuses.findIndex((s) => s.includes(w)));
  if (!(order[0] < order[1] && order[1] < order[2])) throw new Error(`steps out of order: ${JSON.stringify(statuses)}`);
  const gaveUp = /… (no connection within \d+ s|ICE failed)$/;
  if (log.length !== 3 || !log[0].startsWith('direct… ') || !gaveUp.test(log[0]) ||
    !log[1].startsWith("through Tern's TURN… ") || !gaveUp.test(log[1]) || log[2] !== 'WebSocket relay… connected') {
    throw new Error(`path log ${JSON.stringify(log)}`);
  }
  // The receiver watched the same steps.
  const logB = await b.$$eval('#peers li.peer .path', (els) => els.map((e) => e.textContent));
  // The relay carries a file.
  const buf = randomBytes(2 * 1024 * 1024 + 5);
  const f = join(OUT, 'in', 'steps.bin');
  await writeFile(f, buf);
  await a.locator('#files').setInputFiles([f]);
  const row = b.locator('#transfers li.transfer[data-dir="in"]').first();
  await b.waitForFunction(() => ['done', 'failed', 'cancelled'].includes(document.querySelector('#transfers li.transfer[data-dir="in"]')?.dataset.state),
    null, { timeout: STEP_MS });
  if ((await row.getAttribute('data-state')) !== 'done') throw new Error(`relay transfer: ${await row.textContent()}`);
  const [dl] = await Promise.all([b.waitForEvent('download'), row.locator('a.download').click()]);
  const got = await readFile(await dl.path());
  if (createHash('sha256').update(got).digest('hex') !== createHash('sha256').update(buf).digest('hex')) throw new Error('relayed file differs');
  Object.assign(result, { hint, statuses, log, receiverPeerPath: logB, relayed: got.length, shown: await row.locator('.info').textContent() });
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
