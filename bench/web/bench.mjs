// Browser transfer benchmark: a bare RTCDataChannel against the built-in page (tern.js),
// same run, same two headless Chromiums on loopback, same bytes, on two paths: direct
// (host candidates) and through Tern's own TURN relay (iceTransportPolicy 'relay').
//
// Bare: one data channel, 64 KiB messages from one reused buffer, sent while
// bufferedAmount is under 4 MiB and resumed at bufferedamountlow (1 MiB): the usual
// well-behaved sender, nothing read, hashed or stored. File: the same bare channel moving
// the same file, the least a sender of a file does: the file picked in an input, read
// through its stream, each chunk sent in 64 KiB messages with the same backpressure; the
// receiver counts the bytes (nothing hashed or stored). Page: the file picked in the page's
// file input, one peer picked; the clock runs from the pick to the receiver's row showing
// the file stored (OPFS) with every piece checked against the sender's SHA-256 and the
// digests of both ends equal, so it includes reading the file in pieces, hashing each on
// both sides and writing to disk. After the clock the file's own SHA-256 is read back in
// the page (its button) and checked against Node's. The channel is connected before
// either clock starts; the end is signalled by the page (a MutationObserver), not polled.
//
// Trustworthy on a shared box: --rounds rounds, each running bare and page back to back on
// each path, the order alternating between rounds (so a load change hits both kinds alike);
// reported are the median, the spread (min–max) and the ratio of medians, plus the median
// of the per-round ratios (page run / the bare run next to it), and each round's ratio. Also
// the CPU time both browsers used per MiB moved, in all, per side (the sending browser's
// processes, the receiving one's; from /proc) and per thread of each side, and the daemon's
// (--tern-pid: on the TURN path it relays every packet): it does not depend on the CPU share
// the scheduler gave the run, so it shows what the page costs even on a busy box.
//
// --pin puts each browser on its own CPU (taskset: the sender's on CPU 0, the receiver's on
// CPU 1), as two one-core machines: on the two-core test box the browsers' dozen busy
// threads, left to the scheduler, move between the shared cores, and the same bare
// transfer took twice the CPU per MiB pinned than not (110 against 53-60 ms) at half the
// speed. Pinned, each side's own cost limits the speed (the slower side sets it); unpinned
// (the default, as in every earlier run) both browsers' costs add up.
//
// usage: node bench/web/bench.mjs --url http://127.0.0.1:API [--mib 200] [--rounds 3]
//        [--paths direct,turn] [--web DIR]  (serve the page's files from DIR instead of
//        the daemon's embedded copy: for trying a change without rebuilding)
//        [--kinds bare,file,page]  (which kinds run each round: `page` alone against an
//        earlier run's bare figures is not a same-run ratio, so a table needs both)
//        [--pin]  (each browser on its own CPU: see above)
//        [--profile]  (a CPU profile of each side in the first page run per path: the
//        functions with the most self time) [--tern-pid PID]  (run.sh passes it)
// Prints a Markdown table and one JSON line.

import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, open, readFile, rm } from 'node:fs/promises';
import { cpus, tmpdir } from 'node:os';
import { join } from 'node:path';
import { browserPids, cpuSecs, launchChromium, parseArgs, threadCpu } from '../../tests/browser/lib.mjs';

const args = parseArgs(process.argv.slice(2));
const BASE = args.url;
const MIB = Number(args.mib || 200);
const ROUNDS = Number(args.rounds || 3);
const PATHS = String(args.paths || 'direct,turn').split(',');
const WEB = args.web || null;
const PROFILE = !!args.profile;
const KINDS = String(args.kinds || 'bare,file,page').split(',');
for (const k of KINDS) if (!['bare', 'file', 'page'].includes(k)) throw new Error(`--kinds: unknown kind ${k}`);
const TERN_PID = args['tern-pid'] || null; // run.sh passes the daemon's: its CPU (the TURN relay's work) per round
const BYTES = MIB * 1024 * 1024;
const PIN = !!args.pin;
if (PIN && cpus().length < 2) throw new Error('--pin needs two CPUs');

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
// Sends u8 in 64 KiB messages, waiting for bufferedamountlow (1 MiB) above 4 MiB queued.
window.bareWrite = async (u8) => {
  const dc = window.dc;
  dc.bufferedAmountLowThreshold = 1 << 20;
  for (let o = 0; o < u8.length; o += 64 << 10) {
    if (dc.bufferedAmount > 4 << 20) await new Promise((r) => { dc.onbufferedamountlow = r; });
    dc.send(u8.subarray(o, Math.min(o + (64 << 10), u8.length)));
  }
};
window.bareSend = async (bytes) => {
  const buf = new Uint8Array(64 << 10);
  crypto.getRandomValues(buf);
  for (let sent = 0; sent < bytes; sent += buf.length) await window.bareWrite(buf.subarray(0, Math.min(buf.length, bytes - sent)));
};
window.bareSendFile = async () => {
  const r = document.getElementById('bench-file').files[0].stream().getReader();
  for (;;) {
    const { done, value } = await r.read();
    if (done) return;
    await window.bareWrite(value);
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

// In-page: packet counters of a peer connection's selected transport (getStats), to give
// packets per MiB and packets lost (sent by one side, not received by the other) per kind.
const PKTS = String.raw`
window.pcPackets = async (peer) => {
  const pc = peer === null ? window.pc : window.tern.channels.get(peer)._pc;
  const st = await pc.getStats();
  const o = { sent: 0, received: 0, discarded: 0, messagesSent: 0, messagesReceived: 0 };
  st.forEach((s) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) {
      o.sent += s.packetsSent || 0;
      o.received += s.packetsReceived || 0;
      o.discarded += st.get(s.selectedCandidatePairId)?.packetsDiscardedOnSend || 0;
    }
    if (s.type === 'data-channel') {
      o.messagesSent += s.messagesSent || 0;
      o.messagesReceived += s.messagesReceived || 0;
    }
  });
  return o;
};
`;

// The packet counters in page `p` of the bare peer connection (peer null) or of the page's
// channel to `peer`.
async function packets(p, peer) {
  await p.evaluate(PKTS);
  return p.evaluate((id) => window.pcPackets(id), peer);
}

// Per MiB moved between two packets() readings: data packets sent, lost (sent by the sender
// and not received by the receiver: drops on loopback are the socket buffers'), discarded on
// send, and messages.
function packetRates([s0, r0], [s1, r1]) {
  return {
    pktsPerMiB: (s1.sent - s0.sent) / MIB,
    lostPerMiB: (s1.sent - s0.sent - (r1.received - r0.received)) / MIB,
    discardedPerMiB: (s1.discarded - s0.discarded) / MIB,
    msgsPerMiB: (s1.messagesSent - s0.messagesSent) / MIB,
  };
}

// A bare channel moving BYTES from memory, or with `file` that file (picked in page a's own
// input inside the clock, as the page's file is).
async function bare(a, b, step, clock, file = null) {
  for (const p of [a, b]) await p.evaluate(PC);
  if (file) await a.evaluate(() => document.body.insertAdjacentHTML('beforeend', '<input type="file" id="bench-file" hidden>'));
  const offer = await a.evaluate((s) => window.bare(s, null), step);
  const answer = await b.evaluate(([s, o]) => window.bare(s, o), [step, offer]);
  await a.evaluate((ans) => window.pc.setRemoteDescription(ans), answer);
  // Bounded: on an overloaded box ICE may never finish (a stalled bench says nothing).
  const opened = Promise.all([a.evaluate(() => window.opened), b.evaluate(() => window.opened)]);
  let timer;
  await Promise.race([opened, new Promise((_, bad) => {
    timer = setTimeout(() => bad(new Error(`the bare ${step} channel did not open within 120 s`)), 120_000);
  })]).finally(() => clearTimeout(timer));
  const path = await a.evaluate(() => window.barePath());
  const recv = b.evaluate((n) => window.bareRecv(n), BYTES);
  const p0 = await Promise.all([a, b].map((p) => packets(p, null)));
  await clock.start();
  if (file) {
    await a.locator('#bench-file').setInputFiles([file.path]);
    await a.evaluate(() => window.bareSendFile());
  } else await a.evaluate((n) => window.bareSend(n), BYTES);
  await recv;
  const r = await clock.stop();
  r.packets = packetRates(p0, await Promise.all([a, b].map((p) => packets(p, null))));
  await Promise.all([a.evaluate(() => window.pc.close()), b.evaluate(() => window.pc.close())]);
  return { path, ...r };
}

async function page(a, b, file, clock, profile) {
  const idB = await b.evaluate(() => window.tern.id);
  await a.locator(`#peers li.peer[data-id="${idB}"] input.pick`).check();
  await a.waitForFunction(() => document.getElementById('status').dataset.state === 'connected', null, { timeout: 60_000 });
  const path = await a.locator('#path').textContent();
  const prof = profile ? await Promise.all([a, b].map(startProfile)) : null;
  const idA = await a.evaluate(() => window.tern.id);
  const packetsBoth = () => Promise.all([packets(a, idB), packets(b, idA)]);
  const p0 = await packetsBoth();
  await clock.start();
  await a.locator('#files').setInputFiles([file.path]);
  // Told by the page when the row's state changes (no polling, which would add main-thread
  // work to the page's runs only).
  const state = await b.evaluate(() => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no end state within 600 s')), 600_000);
    const check = () => {
      const li = document.querySelector('#transfers li.transfer[data-dir="in"]');
      if (!li || !['done', 'failed', 'cancelled'].includes(li.dataset.state)) return;
      obs.disconnect();
      clearTimeout(timer);
      resolve(li.dataset.state);
    };
    const obs = new MutationObserver(check);
    obs.observe(document.getElementById('transfers'), { subtree: true, childList: true, attributeFilter: ['data-state'] });
    check();
  }));
  const r = await clock.stop();
  r.packets = packetRates(p0, await packetsBoth());
  if (state !== 'done') throw new Error(`page transfer ${state}`);
  // Outside the clock: the stored file's own SHA-256 (the page's button, read back) against
  // Node's hash of the file (in the clock every piece was checked against the sender's).
  const row = b.locator('#transfers li.transfer[data-dir="in"]').first();
  await row.locator('button.sha').click();
  await row.locator('div.sha').waitFor({ timeout: 300_000 });
  const sha = await row.getAttribute('data-sha256');
  if (sha !== file.sha) throw new Error(`page transfer ${state}, stored file's SHA-256 ${sha}`);
  const top = prof ? { sender: await prof[0](), receiver: await prof[1]() } : undefined;
  return { path, ...r, top };
}

// A CPU profile of one page (Chrome DevTools Protocol); the returned function stops it and
// gives the 12 functions with the most self time, in % of the samples.
async function startProfile(p) {
  const cdp = await p.context().newCDPSession(p);
  await cdp.send('Profiler.enable');
  await cdp.send('Profiler.setSamplingInterval', { interval: 500 });
  await cdp.send('Profiler.start');
  return async () => {
    const { profile } = await cdp.send('Profiler.stop');
    const self = new Map();
    const dt = profile.timeDeltas;
    const byId = new Map(profile.nodes.map((n) => [n.id, n]));
    let total = 0;
    profile.samples.forEach((id, i) => {
      const n = byId.get(id);
      const f = n.callFrame;
      const key = `${f.functionName || '(anon)'} ${f.url.split('/').pop()}:${f.lineNumber + 1}`;
      self.set(key, (self.get(key) || 0) + dt[i]);
      total += dt[i];
    });
    await cdp.detach();
    return [...self].sort((x, y) => y[1] - x[1]).slice(0, 12).map(([k, v]) => `${(v / total * 100).toFixed(1)}% ${k}`);
  };
}

// Wall clock and both browsers' CPU seconds between start() and stop(), in all, by process
// type (browser, renderer, the network and storage services, gpu...) and by thread (side,
// type and thread name: "rcv:renderer:chromium" is the receiving renderer's main thread).
function makeClock(browsers) {
  let t;
  let procs;
  let cpu0;
  let threads0;
  let tern0;
  const typeOf = async (pid) => {
    const cmd = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0').join(' ');
    const m = /--type=(\S+)/.exec(cmd);
    const sub = /--utility-sub-type=(\S+)/.exec(cmd);
    return m ? (sub ? sub[1].split('.').slice(-2).join('.') : m[1]) : 'browser';
  };
  const cpu = () => Promise.all(procs.map((p) => cpuSecs(p.pid)));
  // "type:thread name" -> CPU seconds, over every thread of every process.
  const threads = async () => {
    const out = new Map();
    for (const p of procs) {
      for (const t of await threadCpu(p.pid)) {
        const key = `${['snd', 'rcv'][p.side]}:${p.type}:${t.name}`;
        out.set(key, (out.get(key) || 0) + t.user + t.sys);
      }
    }
    return out;
  };
  return {
    async start() {
      const pids = await Promise.all(browsers.map((br) => browserPids(br.profile)));
      procs = await Promise.all(pids.flatMap((list, side) => list.map(async (pid) => ({ pid, side, type: await typeOf(pid) }))));
      threads0 = await threads();
      tern0 = TERN_PID ? await cpuSecs(TERN_PID) : 0;
      cpu0 = await cpu();
      t = performance.now();
    },
    async stop() {
      const secs = (performance.now() - t) / 1000;
      const now = await cpu();
      const threads1 = await threads();
      const tern = TERN_PID ? (await cpuSecs(TERN_PID)) - tern0 : null;
      const byType = {};
      const bySide = browsers.map(() => 0); // [sender's browser, receiver's]
      procs.forEach((p, i) => {
        byType[p.type] = (byType[p.type] || 0) + now[i] - cpu0[i];
        bySide[p.side] += now[i] - cpu0[i];
      });
      const byThread = {};
      for (const [k, v] of threads1) if (v - (threads0.get(k) || 0) > 0) byThread[k] = v - (threads0.get(k) || 0);
      return { secs, cpu: now.reduce((x, y) => x + y, 0) - cpu0.reduce((x, y) => x + y, 0), bySide, byType, byThread, tern };
    },
  };
}

// The page's files from disk (--web), with the daemon's headers apart from the body.
async function routeWeb(context) {
  const types = { js: 'text/javascript; charset=utf-8', css: 'text/css; charset=utf-8', html: 'text/html; charset=utf-8' };
  await context.route(/\/(tern\.js|tern-sw\.js|app\.js|style\.css|index\.html)?(\?.*)?$/, async (route) => {
    const u = new URL(route.request().url());
    if (!u.href.startsWith(BASE)) return route.continue();
    const name = u.pathname === '/' ? 'index.html' : u.pathname.slice(1);
    // The daemon may close an idle keep-alive connection just as it is reused: retry.
    let resp;
    for (let i = 0; ; i++) {
      try {
        resp = await route.fetch();
        break;
      } catch (e) {
        if (i === 2) throw e;
      }
    }
    const headers = { ...resp.headers(), 'content-type': types[name.split('.').pop()] };
    await route.fulfill({ status: 200, headers, body: await readFile(join(WEB, name)) });
  });
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
// A fulfilled response carries no address, so Chromium would take the page for a public
// one and block its connections back to loopback.
if (WEB) ARGS.push('--disable-features=LocalNetworkAccessChecks');
const ba = await launchChromium({ extraArgs: ARGS, cpus: PIN ? '0' : null });
const bb = await launchChromium({ extraArgs: ARGS, cpus: PIN ? '1' : null });
for (const br of [ba, bb]) {
  await br.context.grantPermissions(['camera', 'microphone'], { origin: BASE });
  if (WEB) await routeWeb(br.context);
}
const clock = makeClock([ba, bb]);
const rows = [];
const load = [];
const loadavg = async () => Number((await readFile('/proc/loadavg', 'utf8')).split(' ')[0]);
try {
  for (let round = 0; round < ROUNDS; round++) {
    for (const step of PATHS) {
      const q = step === 'turn' ? '?path=turn' : '';
      const kinds = round % 2 === 0 ? KINDS : [...KINDS].reverse();
      for (const kind of kinds) {
        const a = await ba.newPage();
        const b = await bb.newPage();
        await a.goto(`${BASE}/${q}`);
        await b.goto(`${BASE}/${q}`);
        for (const p of [a, b]) await p.waitForSelector('body[data-ready="true"]');
        load.push(await loadavg());
        const profile = PROFILE && kind === 'page' && round === 0;
        const r = kind === 'page' ? await page(a, b, file, clock, profile) : await bare(a, b, step, clock, kind === 'file' ? file : null);
        const row = {
          step, round, kind, path: r.path, secs: r.secs, mbps: BYTES / 1e6 / r.secs, cpuMsPerMiB: r.cpu * 1000 / MIB,
          senderCpuMsPerMiB: r.bySide[0] * 1000 / MIB, receiverCpuMsPerMiB: r.bySide[1] * 1000 / MIB,
          ternCpuMsPerMiB: r.tern === null ? null : r.tern * 1000 / MIB, ...r.packets,
        };
        row.cpuMsPerMiBByType = Object.fromEntries(Object.entries(r.byType).map(([k, v]) => [k, Math.round(v * 10000 / MIB) / 10]));
        row.cpuMsPerMiBByThread = Object.fromEntries(Object.entries(r.byThread).sort((x, y) => y[1] - x[1])
          .filter(([, v]) => v * 1000 / MIB >= 0.1).map(([k, v]) => [k, Math.round(v * 10000 / MIB) / 10]));
        rows.push(row);
        process.stderr.write(`round ${round} ${step} ${kind}: ${r.path} ${row.mbps.toFixed(1)} MB/s, ` +
          `${row.cpuMsPerMiB.toFixed(1)} ms CPU/MiB (sender ${row.senderCpuMsPerMiB.toFixed(1)}, receiver ` +
          `${row.receiverCpuMsPerMiB.toFixed(1)}) ${JSON.stringify(row.cpuMsPerMiBByType)}, ` +
          `${row.ternCpuMsPerMiB === null ? '' : `Tern ${row.ternCpuMsPerMiB.toFixed(1)} ms/MiB, `}load ${load[load.length - 1]}\n` +
          `  per MiB: ${row.pktsPerMiB.toFixed(0)} packets, ${row.lostPerMiB.toFixed(1)} lost, ${row.discardedPerMiB.toFixed(1)} ` +
          `discarded on send, ${row.msgsPerMiB.toFixed(1)} messages\n` +
          `  by thread (ms/MiB): ${JSON.stringify(row.cpuMsPerMiBByThread)}\n`);
        if (r.top) process.stderr.write(`  sender: ${r.top.sender.join('\n          ')}\n  receiver: ${r.top.receiver.join('\n            ')}\n`);
        if (r.top) row.top = r.top;
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
const median = (v) => {
  const s = [...v].sort((x, y) => x - y);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const cell = (step, kind, key = 'mbps') => rows.filter((r) => r.step === step && r.kind === kind).map((r) => r[key]);
const pct = (x) => `${(x * 100).toFixed(0)} %`;
console.log(`${MIB} MiB, ${ROUNDS} rounds of ${KINDS.join(', ')} (the order reversed every other round); load average during the runs ` +
  `${Math.min(...load).toFixed(1)}–${Math.max(...load).toFixed(1)} on ${cpus().length} cores, ${PIN ? "the sender's browser on CPU 0, the receiver's on CPU 1" : 'the browsers unpinned'}${WEB ? `; page files from ${WEB}` : ''}\n`);
if (KINDS.length < 2 || !KINDS.includes('page')) {
  // Without the page against another kind: each kind's figures alone.
  console.log('| path | kind | MB/s median (min–max) | CPU ms/MiB: both, sender, receiver (medians) | packets per MiB (lost) |');
  console.log('|---|---|---|---|---|');
  for (const step of PATHS) {
    for (const kind of KINDS) {
      const v = cell(step, kind);
      const m = (key) => median(cell(step, kind, key)).toFixed(1);
      console.log(`| ${step} | ${kind} | ${median(v).toFixed(1)} (${Math.min(...v).toFixed(1)}–${Math.max(...v).toFixed(1)}) | ` +
        `${m('cpuMsPerMiB')}, ${m('senderCpuMsPerMiB')}, ${m('receiverCpuMsPerMiB')} | ${m('pktsPerMiB')} (${m('lostPerMiB')}) |`);
    }
  }
}
// The page against each other kind in the run, same rounds.
for (const ref of KINDS.includes('page') ? KINDS.filter((k) => k !== 'page') : []) {
  console.log(`\npage against ${ref === 'bare' ? 'the bare channel (from memory)' : 'the bare channel moving the same file'}:\n`);
  console.log(`| path | ${ref} MB/s median (min–max) | page MB/s median (min–max) | page / ${ref} (medians) | per-round page / ${ref}: median (min–max) | per-round ratios | CPU ms per MiB, ${ref} / page (medians) | sender CPU ms/MiB ${ref} / page | receiver CPU ms/MiB ${ref} / page | Tern CPU ms/MiB ${ref} / page | page median / fastest ${ref} | packets per MiB ${ref} / page (lost) |`);
  console.log('|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const step of PATHS) {
    const two = (key) => `${median(cell(step, ref, key)).toFixed(1)} / ${median(cell(step, 'page', key)).toFixed(1)}`;
    const [b, p] = [cell(step, ref), cell(step, 'page')];
    const paired = [];
    for (let r = 0; r < ROUNDS; r++) {
      const x = rows.find((o) => o.step === step && o.kind === ref && o.round === r);
      const y = rows.find((o) => o.step === step && o.kind === 'page' && o.round === r);
      if (x && y) paired.push(y.mbps / x.mbps);
    }
    const f = (v) => `${median(v).toFixed(1)} (${Math.min(...v).toFixed(1)}–${Math.max(...v).toFixed(1)})`;
    const path = rows.find((r) => r.step === step && r.kind === 'page')?.path;
    console.log(`| ${step} (${path}) | ${f(b)} | ${f(p)} | ${pct(median(p) / median(b))} | ${pct(median(paired))} ` +
      `(${pct(Math.min(...paired))}–${pct(Math.max(...paired))}) | ${paired.map((x) => (x * 100).toFixed(0)).join(', ')} | ` +
      `${two('cpuMsPerMiB')} | ${two('senderCpuMsPerMiB')} | ${two('receiverCpuMsPerMiB')} | ` +
      (TERN_PID ? `${two('ternCpuMsPerMiB')} |` : '– |') +
      // The strictest reference: the other kind's best round, as on a box with no other load.
      ` ${pct(median(p) / Math.max(...b))} | ${median(cell(step, ref, 'pktsPerMiB')).toFixed(0)} ` +
      `(${median(cell(step, ref, 'lostPerMiB')).toFixed(1)}) / ${median(cell(step, 'page', 'pktsPerMiB')).toFixed(0)} ` +
      `(${median(cell(step, 'page', 'lostPerMiB')).toFixed(1)}) |`);
  }
}
console.log(JSON.stringify({ mib: MIB, rounds: ROUNDS, web: WEB, pinned: PIN, load, rows }));
