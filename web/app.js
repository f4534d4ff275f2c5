// The built-in page: peers in the LAN room (or a shared named room), files and text to a
// picked peer over a tern.js channel.
//
// File protocol on a channel: a JSON text message {t:'file', id, name, size, mime, sha256}
// announces a file; binary messages [u32 id][u32 seq][bytes] carry it in order, so several
// files can be in flight at once; the receiver checks the size and the SHA-256 before it
// offers the download. {t:'text', body} is a chat message.

import { Tern } from '/tern.js';

const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'), me: $('me'), meDevice: $('me-device'), peers: $('peers'), noPeers: $('no-peers'),
  target: $('target'), path: $('path'), retry: $('retry'), files: $('files'), drop: $('drop'),
  textForm: $('text-form'), text: $('text'), transfers: $('transfers'), messages: $('messages'),
  share: $('share'), shareOut: $('share-out'), shareLink: $('share-link'),
};

let tern;
let target = null; // selected peer id
let failed = null; // reason the selected peer's channel failed
let nextFileId = 1;
const active = new Set(); // transfers in progress (send or receive)
const incoming = new Map(); // `${peer}:${id}` -> receive state
const wired = new WeakSet();

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

async function sha256Hex(buf) {
  const d = new Uint8Array(await crypto.subtle.digest('SHA-256', buf));
  return Array.from(d, (b) => b.toString(16).padStart(2, '0')).join('');
}

function setStatus() {
  let s = 'waiting';
  const ch = target && tern?.channels.get(target);
  if (active.size > 0) s = 'transferring';
  else if (failed) s = 'failed';
  else if (ch && ch.state === 'open') s = 'connected';
  ui.status.textContent = failed && s === 'failed' ? `failed: ${failed}` : s;
  ui.status.className = `status ${s}`;
  ui.status.dataset.state = s;
  ui.path.textContent = ch && ch.state === 'open' ? ch.path : '–';
  ui.retry.hidden = !failed;
}

function renderPeers() {
  const peers = tern.peers();
  ui.noPeers.hidden = peers.length > 0;
  ui.peers.replaceChildren(
    ...peers.map((p) => {
      const li = document.createElement('li');
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'peer';
      b.dataset.id = p.id;
      b.dataset.name = p.name;
      b.setAttribute('aria-pressed', String(p.id === target));
      const where = p.rooms.map((r) => (r === 'lan' ? 'same network' : `room ${r}`)).join(', ');
      b.innerHTML = '<strong></strong> <span class="device"></span><br><span class="meta"></span>';
      b.querySelector('strong').textContent = p.name;
      b.querySelector('.device').textContent = p.device;
      b.querySelector('.meta').textContent = where;
      b.onclick = () => pick(p.id, p.name);
      li.append(b);
      return li;
    }),
  );
}

async function pick(id, name) {
  target = id;
  failed = null;
  ui.target.textContent = name;
  renderPeers();
  setStatus();
  await ensureChannel();
}

async function ensureChannel() {
  if (!target) throw new Error('pick a peer first');
  const cur = tern.channels.get(target);
  if (cur && cur.state === 'open') return cur;
  if (cur && cur.state === 'connecting') return cur.ready;
  try {
    const ch = await tern.open(target);
    wire(ch);
    failed = null;
    setStatus();
    return ch;
  } catch (e) {
    failed = e.message;
    setStatus();
    throw e;
  }
}

function row(dir, name, size) {
  const li = document.createElement('li');
  li.className = 'transfer';
  li.dataset.dir = dir;
  li.dataset.name = name;
  li.dataset.state = dir === 'out' ? 'sending' : 'receiving';
  li.innerHTML = '<div><strong class="name"></strong> <span class="meta size"></span></div>' +
    '<progress max="1" value="0"></progress><div class="meta info"></div>';
  li.querySelector('.name').textContent = (dir === 'out' ? '↑ ' : '↓ ') + name;
  li.querySelector('.size').textContent = fmtBytes(size);
  ui.transfers.prepend(li);
  return li;
}

function progress(t, done) {
  t.done = done;
  const secs = Math.max((performance.now() - t.t0) / 1000, 0.001);
  t.li.querySelector('progress').value = t.size ? done / t.size : 1;
  t.li.querySelector('.info').textContent =
    `${fmtBytes(done)} of ${fmtBytes(t.size)} · ${fmtBytes(Math.round(done / secs))}/s · ${t.ch.path}`;
}

function finishRow(t, state, text, isError) {
  t.li.dataset.state = state;
  const info = t.li.querySelector('.info');
  info.textContent = text;
  info.classList.toggle('err', !!isError);
  active.delete(t);
  setStatus();
}

async function sendFile(file) {
  const ch = await ensureChannel();
  const id = nextFileId++;
  const t = { li: row('out', file.name, file.size), size: file.size, t0: performance.now(), ch, done: 0 };
  active.add(t);
  setStatus();
  try {
    const buf = await file.arrayBuffer();
    const sha256 = await sha256Hex(buf);
    await ch.send(JSON.stringify({ t: 'file', id, name: file.name, size: file.size, mime: file.type, sha256 }));
    t.t0 = performance.now();
    const step = ch.chunkSize - 8;
    let seq = 0;
    for (let off = 0; off < buf.byteLength || seq === 0; off += step, seq++) {
      const part = new Uint8Array(buf, off, Math.min(step, buf.byteLength - off));
      const frame = new Uint8Array(part.length + 8);
      const dv = new DataView(frame.buffer);
      dv.setUint32(0, id);
      dv.setUint32(4, seq);
      frame.set(part, 8);
      await ch.send(frame);
      progress(t, off + part.length);
      if (buf.byteLength === 0) break;
    }
    const secs = (performance.now() - t.t0) / 1000;
    finishRow(t, 'done', `sent ${fmtBytes(file.size)} in ${secs.toFixed(1)} s · ${ch.path}`);
  } catch (e) {
    finishRow(t, 'failed', `failed: ${ch.closeReason || e.message}`, true);
  }
}

async function sendFiles(list) {
  const files = [...list];
  if (files.length === 0) return;
  try {
    await ensureChannel();
  } catch {
    return;
  }
  await Promise.all(files.map(sendFile));
}

function addMessage(who, body) {
  const li = document.createElement('li');
  li.className = 'message';
  li.dataset.from = who;
  li.innerHTML = '<span class="meta"></span> <span class="body"></span>';
  li.querySelector('.meta').textContent = who + ':';
  li.querySelector('.body').textContent = body;
  ui.messages.prepend(li);
}

function peerName(id) {
  return tern.peers().find((p) => p.id === id)?.name || id;
}

function onControl(ch, m) {
  if (m.t === 'text' && typeof m.body === 'string') {
    addMessage(peerName(ch.peer), m.body);
    return;
  }
  if (m.t === 'file' && Number.isInteger(m.id) && Number.isSafeInteger(m.size) && m.size >= 0) {
    const name = String(m.name || 'file').slice(0, 255);
    const t = {
      li: row('in', name, m.size), size: m.size, t0: performance.now(), ch, done: 0,
      name, mime: String(m.mime || 'application/octet-stream'), sha256: String(m.sha256 || ''),
      parts: [], next: 0,
    };
    incoming.set(`${ch.peer}:${m.id}`, t);
    active.add(t);
    setStatus();
    if (m.size === 0) complete(`${ch.peer}:${m.id}`, t);
  }
}

function onChunk(ch, data) {
  if (data.byteLength < 8) return;
  const dv = new DataView(data);
  const key = `${ch.peer}:${dv.getUint32(0)}`;
  const seq = dv.getUint32(4);
  const t = incoming.get(key);
  if (!t) return;
  if (seq !== t.next) {
    fail(key, t, `chunk ${seq} out of order (expected ${t.next})`);
    return;
  }
  t.next++;
  const part = new Uint8Array(data, 8);
  t.parts.push(part);
  const done = t.done + part.length;
  progress(t, done);
  if (done > t.size) fail(key, t, `received ${fmtBytes(done)}, more than the announced ${fmtBytes(t.size)}`);
  else if (done === t.size) complete(key, t);
}

function fail(key, t, why) {
  incoming.delete(key);
  t.parts = null;
  finishRow(t, 'failed', `failed: ${why}`, true);
}

async function complete(key, t) {
  incoming.delete(key);
  const blob = new Blob(t.parts, { type: t.mime });
  t.parts = null;
  const got = await sha256Hex(await blob.arrayBuffer());
  if (blob.size !== t.size || got !== t.sha256) {
    finishRow(t, 'failed', `failed: integrity check (size ${blob.size}/${t.size}, SHA-256 mismatch)`, true);
    return;
  }
  const secs = (performance.now() - t.t0) / 1000;
  finishRow(t, 'done', `received ${fmtBytes(t.size)} in ${secs.toFixed(1)} s · ${t.ch.path} · SHA-256 verified `);
  const a = document.createElement('a');
  a.className = 'download';
  a.href = URL.createObjectURL(blob);
  a.download = t.name;
  a.textContent = 'Download';
  t.li.querySelector('.info').append(a);
}

function wire(ch) {
  if (wired.has(ch)) return;
  wired.add(ch);
  ch.addEventListener('message', (e) => {
    if (typeof e.data === 'string') {
      let m;
      try {
        m = JSON.parse(e.data);
      } catch {
        return;
      }
      onControl(ch, m);
    } else onChunk(ch, e.data);
  });
  ch.addEventListener('open', setStatus);
  ch.addEventListener('path', setStatus);
  ch.addEventListener('close', (e) => {
    // Nothing half-received is ever offered: every open receive on this channel fails.
    for (const [key, t] of [...incoming]) {
      if (t.ch === ch) fail(key, t, `connection lost (${e.reason})`);
    }
    if (ch.peer === target && e.reason !== 'replaced by a new channel') failed = e.reason;
    setStatus();
  });
}

function randomRoom() {
  const b = crypto.getRandomValues(new Uint8Array(5));
  return 'r-' + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function showShare(room) {
  const u = new URL(location.href);
  u.search = '';
  u.searchParams.set('room', room);
  const path = new URLSearchParams(location.search).get('path');
  if (path) u.searchParams.set('path', path);
  ui.shareLink.href = u.href;
  ui.shareLink.textContent = u.href;
  ui.shareOut.hidden = false;
}

async function main() {
  try {
    tern = await Tern.connect();
  } catch (e) {
    failed = e.message;
    setStatus();
    return;
  }
  window.tern = tern; // for debugging from the console
  ui.me.textContent = tern.name;
  ui.meDevice.textContent = tern.device;
  tern.addEventListener('peers', () => {
    renderPeers();
    if (target && !tern.peers().some((p) => p.id === target)) ui.target.textContent += ' (left)';
  });
  tern.addEventListener('channel', (e) => {
    wire(e.channel);
    e.channel.addEventListener('open', () => {
      // A peer that connects to us becomes the target if none is picked yet, so replying works.
      if (!target) pick(e.channel.peer, peerName(e.channel.peer)).catch(() => {});
      setStatus();
    });
  });
  tern.addEventListener('close', () => {
    failed = 'signaling connection lost (reload the page)';
    setStatus();
  });
  const room = new URLSearchParams(location.search).get('room');
  if (room) {
    tern.join(room);
    showShare(room);
  }
  let shared = room;
  ui.share.onclick = () => {
    if (!shared) {
      shared = randomRoom();
      tern.join(shared);
    }
    showShare(shared);
  };
  ui.retry.onclick = () => {
    failed = null;
    setStatus();
    ensureChannel().catch(() => {});
  };
  ui.files.onchange = () => {
    sendFiles(ui.files.files).finally(() => { ui.files.value = ''; });
  };
  ui.drop.addEventListener('dragover', (e) => {
    e.preventDefault();
    ui.drop.classList.add('over');
  });
  ui.drop.addEventListener('dragleave', () => ui.drop.classList.remove('over'));
  ui.drop.addEventListener('drop', (e) => {
    e.preventDefault();
    ui.drop.classList.remove('over');
    sendFiles(e.dataTransfer.files);
  });
  ui.textForm.onsubmit = async (e) => {
    e.preventDefault();
    const body = ui.text.value;
    if (!body) return;
    try {
      const ch = await ensureChannel();
      await ch.send(JSON.stringify({ t: 'text', body }));
      addMessage('you', body);
      ui.text.value = '';
    } catch {
      /* the status shows why */
    }
  };
  setStatus();
  document.body.dataset.ready = 'true';
}

main();
