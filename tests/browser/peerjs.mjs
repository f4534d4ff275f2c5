// The real `peerjs` client (1.5.5) in headless Chromium against Tern's PeerJS endpoint:
// two Peers get ids from the server, open a DataConnection, exchange text both ways and a
// 5 MiB binary blob whose SHA-256 is checked on arrival; then a second DataConnection whose
// OFFER carries 1 MiB of metadata through the server (a 1 MiB signal, default settings).
//
// Usage: TERN_PORT=8080 node tests/browser/peerjs.mjs   (prints "PASS ..." and exits 0)
// With TERN_PORT_B (cluster mode, another node): Peer B registers there, under an id of its
// own choosing (no cross-origin id fetch), and everything between A and B crosses nodes.
// With TERN_API_TOKEN too: relay-only ICE (`iceTransportPolicy: 'relay'`), each side with
// TURN credentials from its own node's /api/ice (one user per connection and side, so
// the per-user quota is not what is tested), and the selected pair must be relay/relay.
import { chromium } from 'playwright-core';
import { fileURLToPath } from 'node:url';
import path from 'node:path';
import fs from 'node:fs';
import os from 'node:os';

const here = path.dirname(fileURLToPath(import.meta.url));
const port = Number(process.env.TERN_PORT);
const portB = Number(process.env.TERN_PORT_B || port);
const peerPath = process.env.TERN_PEERJS_PATH || '/peerjs';
const key = process.env.TERN_PEERJS_KEY || 'peerjs';
if (!port) {
  console.error('TERN_PORT is required');
  process.exit(2);
}

const flags = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  // Host candidates on 127.0.0.1 (TESTING-NOTES.md): needs this flag and media permission.
  '--allow-loopback-in-peer-connection',
];

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-peerjs-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: flags,
});
const watchdog = setTimeout(() => {
  console.error('FAIL: timed out after 120 s');
  process.exit(1);
}, 120_000);

// RTCConfigurations for relay-only ICE: [connection][side], from each node's /api/ice.
const token = process.env.TERN_API_TOKEN;
const iceFrom = async (p, user) => {
  const r = await fetch(`http://127.0.0.1:${p}/api/ice?user=${user}`,
    { headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) throw new Error(`/api/ice on ${p}: ${r.status} ${await r.text()}`);
  const ice = await r.json();
  // Only the UDP TURN URL: one allocation per side and connection.
  const urls = ice.iceServers.flatMap((s) => [].concat(s.urls))
    .filter((u) => u.startsWith('turn:') && u.endsWith('transport=udp'));
  if (urls.length === 0) throw new Error(`no turn: UDP URL from ${p}: ${JSON.stringify(ice)}`);
  const s = ice.iceServers.find((s) => [].concat(s.urls).includes(urls[0]));
  return { iceServers: [{ urls, username: s.username, credential: s.credential }],
    iceTransportPolicy: 'relay' };
};

let code = 1;
try {
  const relayCfg = token ? [
    [await iceFrom(port, 'conn1-a'), await iceFrom(portB, 'conn1-b')],
    [await iceFrom(port, 'conn2-a'), await iceFrom(portB, 'conn2-b')],
  ] : null;
  const origin = `http://127.0.0.1:${port}`;
  await context.grantPermissions(['camera', 'microphone'], { origin });
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => console.error(`[page] ${m.text()}`));
  // A page on Tern's own origin (the PeerJS info route), so fetches are same-origin.
  await page.goto(`${origin}${peerPath}`);
  await page.addScriptTag({ path: path.join(here, 'node_modules/peerjs/dist/peerjs.min.js') });
  const result = await page.evaluate(async ({ port, portB, peerPath, key, relayCfg }) => {
    const opts = { host: '127.0.0.1', port, path: peerPath, key, secure: false, debug: 1,
      config: relayCfg ? relayCfg[0][0] : { iceServers: [] } };
    // PeerJS builds each RTCPeerConnection from `peer.options.config` when the connection
    // starts (A: connect; B: the OFFER), so each connection gets its own credentials.
    const useCfg = (i) => {
      if (!relayCfg) return;
      a.options.config = relayCfg[i][0];
      b.options.config = relayCfg[i][1];
    };
    // The candidate types of the pair ICE selected (e.g. "relay/relay").
    const pairTypes = async (pc) => {
      const s = await pc.getStats();
      let pair;
      s.forEach((r) => {
        if (r.type === 'transport' && r.selectedCandidatePairId) pair = s.get(r.selectedCandidatePairId);
      });
      if (!pair) {
        s.forEach((r) => {
          if (r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') pair = r;
        });
      }
      if (!pair) return 'none';
      return `${s.get(pair.localCandidateId)?.candidateType}/${s.get(pair.remoteCandidateId)?.candidateType}`;
    };
    const open = (p) => new Promise((res, rej) => {
      p.on('open', res);
      p.on('error', (e) => rej(new Error(`peer error ${e.type}: ${e.message}`)));
    });
    const a = new Peer(opts);
    const b = portB === port ? new Peer(opts)
      : new Peer(`b-${crypto.randomUUID()}`, { ...opts, port: portB });
    const [idA, idB] = await Promise.all([open(a), open(b)]);
    const hex = async (buf) => Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', buf)))
      .map((x) => x.toString(16).padStart(2, '0')).join('');

    // 5 MiB of pseudo-random bytes (xorshift), so a lost or reordered chunk changes the hash.
    const blob = new Uint8Array(5 * 1024 * 1024);
    let x = 0x12345678;
    for (let i = 0; i < blob.length; i++) {
      x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
      blob[i] = x & 0xff;
    }
    const sentHash = await hex(blob);

    const got = new Promise((resolve, reject) => {
      b.on('connection', (conn) => {
        const msgs = [];
        conn.on('data', async (d) => {
          if (typeof d === 'string') {
            msgs.push(d);
            conn.send(`pong:${d}`);
          } else {
            const buf = d instanceof ArrayBuffer ? d : d.buffer.slice(d.byteOffset, d.byteOffset + d.byteLength);
            resolve({ from: conn.peer, msgs, bytes: buf.byteLength, hash: await hex(buf) });
          }
        });
        conn.on('error', reject);
      });
    });
    useCfg(0);
    const conn = a.connect(idB, { reliable: true });
    await new Promise((res, rej) => { conn.on('open', res); conn.on('error', rej); });
    const pair = await pairTypes(conn.peerConnection);
    const reply = new Promise((res) => conn.on('data', (d) => { if (typeof d === 'string') res(d); }));
    conn.send('hello from A');
    const replyText = await reply;
    conn.send(blob.buffer);
    const r = await got;

    // A 1 MiB signal: PeerJS sends `metadata` inside the OFFER, through the server.
    let big = '';
    const letters = 'abcdefghijklmnopqrstuvwxyz0123456789';
    for (let i = 0; i < 1024 * 1024; i++) {
      x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
      big += letters[(x >>> 0) % letters.length];
    }
    const bigHash = await hex(new TextEncoder().encode(big));
    const gotMeta = new Promise((resolve) => {
      b.on('connection', (c) => {
        if (!c.metadata || !c.metadata.big) return;
        c.on('open', async () => resolve({
          metaBytes: c.metadata.big.length,
          metaHash: await hex(new TextEncoder().encode(c.metadata.big)),
        }));
      });
    });
    useCfg(1);
    const c2 = a.connect(idB, { reliable: true, metadata: { big } });
    await new Promise((res, rej) => { c2.on('open', res); c2.on('error', rej); });
    const m = await gotMeta;
    const errorsSeen = [];
    a.on('error', (e) => errorsSeen.push(e.type));
    a.destroy();
    b.destroy();
    return { idA, idB, pair, replyText, sentHash, ...r, bigHash, ...m, errorsSeen };
  }, { port, portB, peerPath, key, relayCfg });

  const ok = result.from === result.idA
    && result.msgs[0] === 'hello from A'
    && result.replyText === 'pong:hello from A'
    && result.bytes === 5 * 1024 * 1024
    && result.hash === result.sentHash
    && result.metaBytes === 1024 * 1024
    && result.metaHash === result.bigHash
    && /^[0-9a-f-]{36}$/.test(result.idA)
    && (!relayCfg || result.pair === 'relay/relay');
  console.log(`${ok ? 'PASS' : 'FAIL'} ${JSON.stringify(result)}`);
  code = ok ? 0 : 1;
} catch (e) {
  console.error(`FAIL: ${e && e.stack ? e.stack : e}`);
  code = 1;
} finally {
  clearTimeout(watchdog);
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
