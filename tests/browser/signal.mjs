// Tern's native signaling in headless Chromium: two pages' worth of peers in one page use
// /api/ice for the RTCConfiguration, /ws to find each other in their LAN room and exchange
// SDP and ICE candidates, open an RTCDataChannel, then fall back to /relay and move 2 MiB
// with a SHA-256 check.
//
// Usage: TERN_PORT=8080 node tests/browser/signal.mjs   (prints "PASS ..." and exits 0)
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const port = Number(process.env.TERN_PORT);
if (!port) {
  console.error('TERN_PORT is required');
  process.exit(2);
}
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tern-signal-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--allow-loopback-in-peer-connection'],
});
const watchdog = setTimeout(() => { console.error('FAIL: timed out after 120 s'); process.exit(1); }, 120_000);
let code = 1;
try {
  const origin = `http://127.0.0.1:${port}`;
  await context.grantPermissions(['camera', 'microphone'], { origin });
  const page = context.pages()[0] || (await context.newPage());
  page.on('console', (m) => console.error(`[page] ${m.text()}`));
  await page.goto(`${origin}/peerjs`);
  const result = await page.evaluate(async () => {
    const ice = await (await fetch('/api/ice')).json();
    const wsUrl = `ws://${location.host}/ws`;
    // A tiny client: a socket plus a queue of parsed messages.
    const client = () => new Promise((resolve) => {
      const ws = new WebSocket(wsUrl);
      const queue = [];
      const waiters = [];
      ws.onmessage = (e) => {
        const m = JSON.parse(e.data);
        const i = waiters.findIndex((w) => w.type === m.type);
        if (i >= 0) waiters.splice(i, 1)[0].resolve(m); else queue.push(m);
      };
      const next = (type) => new Promise((res) => {
        const i = queue.findIndex((m) => m.type === type);
        if (i >= 0) res(queue.splice(i, 1)[0]); else waiters.push({ type, resolve: res });
      });
      ws.onopen = () => resolve({ ws, next, send: (m) => ws.send(JSON.stringify(m)) });
    });
    const a = await client();
    const wa = await a.next('welcome');
    await a.next('room');
    const b = await client();
    const wb = await b.next('welcome');
    const roomB = await b.next('room');
    if (!roomB.peers.some((p) => p.id === wa.id)) throw new Error('B does not see A in its LAN room');

    // WebRTC over the signaling channel.
    const pa = new RTCPeerConnection(ice);
    const pb = new RTCPeerConnection(ice);
    pa.onicecandidate = (e) => e.candidate && a.send({ type: 'signal', to: wb.id, data: { candidate: e.candidate.toJSON() } });
    pb.onicecandidate = (e) => e.candidate && b.send({ type: 'signal', to: wa.id, data: { candidate: e.candidate.toJSON() } });
    const pump = async (me, pc, peerId) => {
      for (;;) {
        const m = await me.next('signal');
        if (m.from !== peerId) throw new Error(`signal from ${m.from}, expected ${peerId}`);
        if (m.data.sdp) {
          await pc.setRemoteDescription(m.data.sdp);
          if (m.data.sdp.type === 'offer') {
            await pc.setLocalDescription();
            me.send({ type: 'signal', to: peerId, data: { sdp: pc.localDescription.toJSON() } });
          }
        } else if (m.data.candidate) {
          await pc.addIceCandidate(m.data.candidate).catch(() => {});
        }
      }
    };
    pump(a, pa, wb.id);
    pump(b, pb, wa.id);
    const dc = pa.createDataChannel('chat');
    const gotText = new Promise((res) => { pb.ondatachannel = (e) => { e.channel.onmessage = (m) => res(m.data); }; });
    await pa.setLocalDescription();
    a.send({ type: 'signal', to: wb.id, data: { sdp: pa.localDescription.toJSON() } });
    await new Promise((res) => { dc.onopen = res; });
    dc.send('hello over WebRTC');
    const text = await gotText;

    // The /relay fallback.
    a.send({ type: 'relay', to: wb.id });
    const [ta, tb] = await Promise.all([a.next('relay-ticket'), b.next('relay-ticket')]);
    const open = (t) => new Promise((res, rej) => {
      const ws = new WebSocket(`ws://${location.host}${t.path}?ticket=${t.ticket}`);
      ws.binaryType = 'arraybuffer';
      ws.onopen = () => res(ws);
      ws.onerror = rej;
    });
    const [ra, rb] = await Promise.all([open(ta), open(tb)]);
    const blob = new Uint8Array(2 * 1024 * 1024);
    for (let i = 0; i < blob.length; i += 65536) crypto.getRandomValues(blob.subarray(i, i + 65536));
    const hex = async (buf) => Array.from(new Uint8Array(await crypto.subtle.digest('SHA-256', buf)))
      .map((x) => x.toString(16).padStart(2, '0')).join('');
    const received = new Promise((res) => {
      const parts = [];
      let n = 0;
      rb.onmessage = (e) => {
        parts.push(new Uint8Array(e.data));
        n += e.data.byteLength;
        if (n >= blob.length) {
          const all = new Uint8Array(n);
          let o = 0;
          for (const p of parts) { all.set(p, o); o += p.length; }
          res(all);
        }
      };
    });
    for (let i = 0; i < blob.length; i += 65536) ra.send(blob.subarray(i, i + 65536));
    const all = await received;
    const closed = new Promise((res) => { rb.onclose = (e) => res(e.code); });
    ra.close();
    const closeCode = await closed;
    return {
      text, ticketPeerA: ta.peer, ticketPeerB: tb.peer, idA: wa.id, idB: wb.id,
      relayBytes: all.length, relayOk: (await hex(all)) === (await hex(blob)), closeCode,
      iceUrls: ice.iceServers[0].urls,
    };
  });
  const ok = result.text === 'hello over WebRTC' && result.ticketPeerA === result.idB
    && result.ticketPeerB === result.idA && result.relayOk && result.relayBytes === 2 * 1024 * 1024
    && result.closeCode === 1000;
  console.log(`${ok ? 'PASS' : 'FAIL'} ${JSON.stringify(result)}`);
  code = ok ? 0 : 1;
} catch (e) {
  console.error(`FAIL: ${e && e.stack ? e.stack : e}`);
} finally {
  clearTimeout(watchdog);
  await context.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(code);
