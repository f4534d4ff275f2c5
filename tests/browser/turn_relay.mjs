// Real-browser TURN test: two RTCPeerConnections in one headless Chromium page, relay-only,
// with one TURN server as the only ICE server; a data channel carries N bytes (default 20 MiB)
// checked with SHA-256 on both sides, and getStats must show a relay/relay pair whose local
// candidates use the expected relay protocol.
//
// usage: node turn_relay.mjs --port PORT [--host 127.0.0.1] [--transport udp|tcp|tls]
//          [--spki BASE64]   (tls: turns:HOST:PORT?transport=tcp; BASE64 is the SHA-256 of the
//                             self-signed certificate's SPKI, which Chromium is told to accept)
//          (--secret S | --secret-file F | env TERN_TEST_SECRET) [--user U] [--bytes N]
//          [--timeout SECONDS]
// Prints one JSON line ({"ok":true,...} or {"ok":false,"error":...}); exit status 0 or 1.

import {
  PAGE_HELPERS,
  finish,
  launchChromium,
  parseArgs,
  readSecret,
  restCredential,
  servePage,
} from './lib.mjs';

const PAGE = `<!doctype html><meta charset="utf-8"><title>tern turn relay test</title>
<script>
${PAGE_HELPERS}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(what)), ms); }),
  ]);
}

// Resolves when ICE gathering completes (all candidates are in localDescription).
function gathered(pc) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') resolve();
    });
  });
}

function relayCandidates(pc) {
  return (pc.localDescription?.sdp || '').split(/\\r?\\n/).filter((l) => / typ relay /.test(l));
}

async function hex(buf) {
  const d = new Uint8Array(await crypto.subtle.digest('SHA-256', buf));
  return Array.from(d, (b) => b.toString(16).padStart(2, '0')).join('');
}

async function runRelayTest({ iceServer, transport, totalBytes, chunkBytes, stepTimeoutMs }) {
  const config = { iceServers: [iceServer], iceTransportPolicy: 'relay' };
  const a = new RTCPeerConnection(config);
  const b = new RTCPeerConnection(config);
  const noRelay = (side) =>
    'peer ' + side + ' gathered no relay candidate from ' + iceServer.urls +
    ': TURN authentication failed or the server is unreachable (Chromium reports no error for this)';
  try {
    // Non-trickle: each side's description carries all its candidates, so the relay
    // candidates can be checked before connecting.
    const dc = a.createDataChannel('bulk', { ordered: true });
    dc.binaryType = 'arraybuffer';
    await a.setLocalDescription(await a.createOffer());
    await withTimeout(gathered(a), stepTimeoutMs, noRelay('A') + ' (gathering timed out)');
    const relaysA = relayCandidates(a);
    if (relaysA.length === 0) throw new Error(noRelay('A'));
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await withTimeout(gathered(b), stepTimeoutMs, noRelay('B') + ' (gathering timed out)');
    const relaysB = relayCandidates(b);
    if (relaysB.length === 0) throw new Error(noRelay('B'));

    const incoming = new Promise((resolve) => { b.ondatachannel = (e) => resolve(e.channel); });
    await a.setRemoteDescription(b.localDescription);
    const opened = new Promise((resolve, reject) => {
      dc.onopen = resolve;
      dc.onerror = (e) => reject(new Error('data channel error: ' + (e.error?.message || e)));
    });
    await withTimeout(opened, stepTimeoutMs,
      'data channel did not open (ICE state ' + a.iceConnectionState + '/' + b.iceConnectionState + ')');
    const rx = await withTimeout(incoming, stepTimeoutMs, 'receiver saw no data channel');
    rx.binaryType = 'arraybuffer';

    // Random payload, hashed by the sender before sending.
    const data = new Uint8Array(totalBytes);
    for (let off = 0; off < totalBytes; off += 65536) {
      crypto.getRandomValues(data.subarray(off, Math.min(off + 65536, totalBytes)));
    }
    const sentHash = await hex(data);

    const received = new Uint8Array(totalBytes);
    let got = 0;
    const done = new Promise((resolve, reject) => {
      rx.onmessage = (e) => {
        const chunk = new Uint8Array(e.data);
        if (got + chunk.length > totalBytes) {
          reject(new Error('receiver got more than ' + totalBytes + ' bytes'));
          return;
        }
        received.set(chunk, got);
        got += chunk.length;
        if (got === totalBytes) resolve();
      };
      rx.onclose = () => reject(new Error('channel closed after ' + got + ' bytes'));
    });

    const t0 = performance.now();
    dc.bufferedAmountLowThreshold = 1 << 20;
    for (let off = 0; off < totalBytes; off += chunkBytes) {
      if (dc.bufferedAmount > 4 << 20) {
        await withTimeout(new Promise((r) => { dc.onbufferedamountlow = r; }), stepTimeoutMs,
          'send buffer did not drain (' + got + ' bytes received)');
      }
      dc.send(data.subarray(off, Math.min(off + chunkBytes, totalBytes)));
    }
    await withTimeout(done, stepTimeoutMs * 4, 'transfer stalled at ' + got + ' of ' + totalBytes + ' bytes');
    const seconds = (performance.now() - t0) / 1000;
    const receivedHash = await hex(received);

    return {
      bytes: got,
      seconds,
      sentHash,
      receivedHash,
      relayCandidates: { a: relaysA.length, b: relaysB.length },
      pairA: await selectedPair(a),
      pairB: await selectedPair(b),
    };
  } finally {
    a.close();
    b.close();
  }
}
window.runRelayTest = runRelayTest;
</script>`;

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const host = args.host || '127.0.0.1';
  const port = Number(args.port);
  const transport = args.transport || 'udp';
  const totalBytes = Number(args.bytes || 20 * 1024 * 1024);
  const timeoutSecs = Number(args.timeout || 180);
  if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new Error('--port PORT is required');
  if (!['udp', 'tcp', 'tls'].includes(transport)) throw new Error('--transport must be udp, tcp or tls');
  const secret = await readSecret(args);
  const { username, credential } = restCredential(secret, args.user || 'browser-test');
  // TURN over TLS is `turns:` over TCP; getStats reports its relayProtocol as `tls`.
  const url = transport === 'tls'
    ? `turns:${host}:${port}?transport=tcp`
    : `turn:${host}:${port}?transport=${transport}`;
  const iceServer = { urls: url, username, credential };

  const base = { transport, url: iceServer.urls };
  const server = await servePage(PAGE);
  const browser = await launchChromium({
    extraArgs: args.spki ? [`--ignore-certificate-errors-spki-list=${args.spki}`] : [],
  });
  // Playwright kills the browser it launched when this process exits, so a hung run ends here.
  const overall = setTimeout(() => {
    finish({ ok: false, ...base, error: `timed out after ${timeoutSecs}s` });
  }, timeoutSecs * 1000);
  let result;
  try {
    const page = await browser.newPage();
    await page.goto(server.url);
    const r = await page.evaluate((cfg) => window.runRelayTest(cfg), {
      iceServer,
      transport,
      totalBytes,
      chunkBytes: 64 * 1024,
      stepTimeoutMs: 30_000,
    });
    const problems = [];
    if (r.bytes !== totalBytes) problems.push(`received ${r.bytes} of ${totalBytes} bytes`);
    if (r.sentHash !== r.receivedHash) problems.push('SHA-256 mismatch');
    for (const [side, pair] of [['A', r.pairA], ['B', r.pairB]]) {
      if (!pair) {
        problems.push(`peer ${side}: getStats shows no selected candidate pair`);
        continue;
      }
      if (pair.local.candidateType !== 'relay' || pair.remote.candidateType !== 'relay') {
        problems.push(
          `peer ${side}: selected pair is ${pair.local.candidateType}/${pair.remote.candidateType}, not relay/relay`,
        );
      }
      if (pair.local.relayProtocol !== transport) {
        problems.push(`peer ${side}: local relayProtocol is ${pair.local.relayProtocol}, expected ${transport}`);
      }
    }
    result = {
      ok: problems.length === 0,
      ...base,
      ...(problems.length ? { error: problems.join('; ') } : {}),
      bytes: r.bytes,
      sha256: r.receivedHash,
      sha256Match: r.sentHash === r.receivedHash,
      seconds: Number(r.seconds.toFixed(3)),
      mbitPerSec: Number(((r.bytes * 8) / r.seconds / 1e6).toFixed(1)),
      relayCandidates: r.relayCandidates,
      pairA: r.pairA,
      pairB: r.pairB,
    };
  } catch (e) {
    // Keep the page's own message: drop Playwright's prefix and the in-page stack.
    const msg = (e.message || String(e)).split('\n')[0].replace(/^page\.evaluate: (Error: )?/, '');
    result = { ok: false, ...base, error: msg };
  } finally {
    clearTimeout(overall);
    await browser.close();
    await server.close();
  }
  finish(result);
}

main().catch((e) => finish({ ok: false, error: e.message || String(e) }));
