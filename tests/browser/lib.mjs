// Shared helpers for Tern's real-browser tests: Debian Chromium driven by playwright-core,
// pages served from a tiny loopback HTTP server, TURN REST credentials, and the in-page
// helper that reads the selected ICE candidate pair from getStats().

import { createHmac } from 'node:crypto';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.TERN_CHROMIUM || '/usr/bin/chromium';

// Flags that keep Chromium quiet on a machine without outside network (see TESTING-NOTES).
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/**
 * Launches Chromium with a fresh user-data-dir in a temp dir; with `cpus` (a `taskset -c`
 * list, e.g. "1"), the browser and every process it starts run only on those CPUs.
 * Returns { context, profile, newPage(), close() }; close() also removes the profile.
 */
export async function launchChromium({ extraArgs = [], cpus = null } = {}) {
  const profile = await mkdtemp(join(tmpdir(), 'tern-chromium-'));
  let context;
  let executablePath = CHROMIUM;
  try {
    if (cpus !== null) {
      // Playwright runs an executable, not a command line: a script in the profile that
      // execs the browser under taskset (the affinity is inherited by its children).
      executablePath = join(profile, 'taskset-chromium.sh');
      await writeFile(executablePath, `#!/bin/sh\nexec taskset -c '${cpus}' '${CHROMIUM}' "$@"\n`, { mode: 0o755 });
    }
    context = await chromium.launchPersistentContext(profile, {
      executablePath,
      headless: true,
      args: [...CHROMIUM_ARGS, ...extraArgs],
    });
  } catch (e) {
    await rm(profile, { recursive: true, force: true });
    throw e;
  }
  return {
    context,
    profile,
    async newPage() {
      const page = await context.newPage();
      // Page console output helps when a test fails; keep it on stderr, off the result line.
      page.on('console', (m) => process.stderr.write(`[page ${m.type()}] ${m.text()}\n`));
      page.on('pageerror', (e) => process.stderr.write(`[page error] ${e.message}\n`));
      return page;
    },
    async close() {
      await context.close().catch(() => {});
      await rm(profile, { recursive: true, force: true });
    },
  };
}

/** A data: URL holding `html` (for pages that need no secure context). */
export function dataUrl(html) {
  return 'data:text/html;base64,' + Buffer.from(html).toString('base64');
}

/**
 * Serves `html` at http://127.0.0.1:PORT/ (a secure context, so WebCrypto works).
 * Returns { url, close() }.
 */
export async function servePage(html) {
  const server = createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(html);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}/`,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}

/**
 * A TURN REST API credential (draft-uberti-behave-turn-rest-00 §2.2, coturn's use-auth-secret):
 * username `expiry:user`, password base64(HMAC-SHA1(secret, username)).
 */
export function restCredential(secret, user, ttlSecs = 3600, separator = ':') {
  const expiry = Math.floor(Date.now() / 1000) + ttlSecs;
  const username = user ? `${expiry}${separator}${user}` : `${expiry}`;
  const credential = createHmac('sha1', secret).update(username).digest('base64');
  return { username, credential };
}

/** The shared secret from --secret, --secret-file or TERN_TEST_SECRET (first non-comment line). */
export async function readSecret(args) {
  if (args.secret) return args.secret;
  const file = args['secret-file'] || process.env.TERN_TEST_SECRET_FILE;
  if (file) {
    const line = (await readFile(file, 'utf8'))
      .split('\n')
      .map((l) => l.trim())
      .find((l) => l && !l.startsWith('#'));
    if (!line) throw new Error(`${file} holds no secret`);
    return line;
  }
  if (process.env.TERN_TEST_SECRET) return process.env.TERN_TEST_SECRET;
  throw new Error('no TURN secret: pass --secret, --secret-file or set TERN_TEST_SECRET');
}

/** Parses `--key value` and `--flag` arguments into an object. */
export function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    const key = a.slice(2);
    if (i + 1 < argv.length && !argv[i + 1].startsWith('--')) out[key] = argv[++i];
    else out[key] = true;
  }
  return out;
}

/**
 * In-page JavaScript (a string to put in a page's <script>): `selectedPair(pc)` resolves to
 * the candidate pair ICE selected, as
 * { state, local: {candidateType, relayProtocol, protocol, address, port}, remote: {...} },
 * or null when no pair is selected.
 */
export const PAGE_HELPERS = String.raw`
async function selectedPair(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((s) => {
    if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
  });
  if (!pair) {
    stats.forEach((s) => {
      if (!pair && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
    });
  }
  if (!pair) return null;
  const cand = (id) => {
    const c = stats.get(id) || {};
    return {
      candidateType: c.candidateType,
      relayProtocol: c.relayProtocol,
      protocol: c.protocol,
      address: c.address,
      port: c.port,
    };
  };
  return { state: pair.state, local: cand(pair.localCandidateId), remote: cand(pair.remoteCandidateId) };
}
`;

/** Prints the one JSON result line on stdout and exits with 0 (ok) or 1. */
export function finish(result) {
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(result.ok ? 0 : 1);
}

/**
 * PIDs of the processes of the Chromium using `profile` (its browser process and every
 * child: renderers, network service, GPU...), or only those of `type` ('renderer', ...).
 */
export async function browserPids(profile, type) {
  const procs = [];
  for (const d of await readdir('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      // Zygote children rewrite their title: one string with spaces, not NUL-separated.
      const cmd = (await readFile(`/proc/${d}/cmdline`, 'utf8')).split('\0').join(' ');
      const stat = await readFile(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      procs.push({ pid: Number(d), ppid, cmd });
    } catch {
      /* gone */
    }
  }
  const root = procs.find((p) => !p.cmd.includes('--type=') && p.cmd.includes(profile));
  if (!root) return [];
  const tree = new Set([root.pid]);
  for (let grew = true; grew;) {
    grew = false;
    for (const p of procs) if (!tree.has(p.pid) && tree.has(p.ppid)) { tree.add(p.pid); grew = true; }
  }
  return procs.filter((p) => tree.has(p.pid) && (!type || p.cmd.includes(`--type=${type} `))).map((p) => p.pid);
}

/** A process's resident memory (VmRSS) in MiB, 0 when it is gone. */
export async function rssMiB(pid) {
  try {
    const s = await readFile(`/proc/${pid}/status`, 'utf8');
    return Number(/VmRSS:\s+(\d+)/.exec(s)[1]) / 1024;
  } catch {
    return 0;
  }
}

/**
 * One Chromium with one page on `html` (servePage), for measuring what work in a page
 * costs: { page, pids, cpu() (CPU seconds every process of that browser has used), close() }.
 */
export async function measuredPage(html) {
  const srv = await servePage(html);
  const br = await launchChromium();
  const close = async () => {
    await br.close();
    await srv.close();
  };
  try {
    const page = await br.newPage();
    await page.goto(srv.url);
    const pids = await browserPids(br.profile);
    const cpu = async () => (await Promise.all(pids.map((x) => cpuSecs(x)))).reduce((a, c) => a + c, 0);
    return { page, pids, cpu, close };
  } catch (e) {
    await close();
    throw e;
  }
}

/**
 * Every thread of process `pid` (none when it is gone): [{ name, user, sys }], the name
 * without its trailing digits (so a pool's threads share one), CPU in seconds.
 */
export async function threadCpu(pid) {
  const out = [];
  for (const tid of await readdir(`/proc/${pid}/task`).catch(() => [])) {
    const stat = await readFile(`/proc/${pid}/task/${tid}/stat`, 'utf8').catch(() => null);
    if (!stat) continue;
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out.push({
      name: stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')')).replace(/[0-9]+$/, ''),
      user: Number(f[11]) / 100,
      sys: Number(f[12]) / 100,
    });
  }
  return out;
}

/** CPU seconds (user + system) a process (`pid`, or `pid/task/tid` for one thread) has used, 0 when it is gone. */
export async function cpuSecs(pid) {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100; // utime, stime in USER_HZ (100 on Linux)
  } catch {
    return 0;
  }
}
