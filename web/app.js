// The built-in page: peers in the LAN room or a shared named room; chat to everyone or to
// picked peers, files to many. Everything it does goes through tern.js (docs/client.md):
// `tern.chat` for messages with per-peer delivery marks, `tern.sendFiles` for one transfer
// per (peer, file), `transfer` events for files arriving (streamed to disk, SHA-256 checked),
// `step` events for the path being tried. Peer-supplied text (names, messages, file names)
// only ever reaches the DOM through textContent.

import { STEP_TEXT as STEP, Tern } from '/tern.js';

const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'), me: $('me'), name: $('name'), meDevice: $('me-device'), peers: $('peers'),
  noPeers: $('no-peers'), everyone: $('everyone'), count: $('count'), hint: $('send-hint'),
  path: $('path'), pathLog: $('path-log'), retry: $('retry'), files: $('files'), drop: $('drop'),
  textForm: $('text-form'), text: $('text'), send: $('send'), transfers: $('transfers'),
  messages: $('messages'), share: $('share'), shareOut: $('share-out'), shareLink: $('share-link'),
  copy: $('copy'), copied: $('copied'),
};

let tern;
let room = null; // the named room of this tab (from the URL or "Share a link")
let everyone = true;
const picked = new Set();
const active = new Set(); // transfers in progress
let offline = null; // why signaling is down

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1 << 30) return `${(n / (1 << 20)).toFixed(1)} MiB`;
  return `${(n / (1 << 30)).toFixed(2)} GiB`;
}

// Builds an element; `text` goes in as textContent, never as markup.
function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else e.setAttribute(k, v);
  }
  e.append(...kids);
  return e;
}

function peerName(id) {
  return tern.peers().find((p) => p.id === id)?.name || tern.info.get(id)?.name || id;
}

// Everyone = the members of this tab's named room, or of its LAN room without one.
function roomPeers() {
  return room ? tern.peers(room) : tern.peers('lan');
}

function recipients() {
  const here = new Set(tern.peers().map((p) => p.id));
  return everyone ? roomPeers().map((p) => p.id) : [...picked].filter((id) => here.has(id));
}

// One line for a peer's channel: the step being tried, the path in use, or why it failed.
function channelText(id) {
  const ch = tern.channels.get(id);
  if (ch && ch.state === 'open') return { state: 'open', text: ch.path };
  if (ch && ch.state === 'connecting' && ch.step) return { state: 'connecting', text: `${STEP[ch.step]}…` };
  if (ch && ch.state === 'connecting') return { state: 'connecting', text: 'connecting…' };
  const f = failedWhy.get(id);
  if (f) return { state: 'failed', text: `failed: ${f}` };
  return { state: 'idle', text: '' };
}
const failedWhy = new Map(); // peer id -> why its last channel failed

function setStatus() {
  const to = recipients();
  const single = !everyone && to.length === 1 ? to[0] : null;
  const chs = to.map((id) => tern?.channels.get(id)).filter(Boolean);
  let s;
  let text;
  if (offline) [s, text] = ['offline', `offline: ${offline}`];
  else if (active.size > 0) [s, text] = ['transferring', 'transferring'];
  else if (single && channelText(single).state === 'failed') [s, text] = ['failed', channelText(single).text];
  else if (chs.some((c) => c.state === 'connecting')) {
    const c = chs.find((x) => x.state === 'connecting');
    [s, text] = ['connecting', `${peerName(c.peer)}: ${c.step ? STEP[c.step] : 'connecting'}…`];
  } else if (chs.length > 0 && chs.every((c) => c.state === 'open')) [s, text] = ['connected', 'connected'];
  else if (tern && tern.peers().length === 0) [s, text] = ['alone', 'nobody else here'];
  else [s, text] = ['waiting', 'waiting'];
  ui.status.textContent = text;
  ui.status.className = `status ${s}`;
  ui.status.dataset.state = s;

  // The path line and log follow the single picked peer.
  const sc = single && tern.channels.get(single);
  ui.path.textContent = sc && sc.state === 'open' ? sc.path : sc ? `${STEP[sc.step] || 'connecting'}…` : '–';
  const steps = sc ? sc.steps : single ? lastSteps.get(single) || [] : [];
  ui.pathLog.replaceChildren(...steps.map((st) => el('li', {
    'data-step': st.step, text: `${st.text}… ${st.result || ''}`.trim(),
  })));
  ui.retry.hidden = !(single && !sc && failedWhy.has(single));

  // Why sending is not possible, in words.
  let hint = '';
  let canSend = true;
  let canFiles = true;
  if (offline) {
    hint = `Not connected to the Tern server (${offline}): reload the page.`;
    canSend = canFiles = false;
  } else if (tern && tern.peers().length === 0) {
    hint = 'Nobody else is here yet: share a link, or open this page on another device on your network.';
    canSend = canFiles = false;
  } else if (to.length === 0) {
    hint = 'Pick a peer above, or “Everyone in the room”, to send.';
    canSend = canFiles = false;
  } else if (single && channelText(single).state === 'failed') {
    hint = `No connection to ${peerName(single)}: ${failedWhy.get(single)}. Files cannot go until Retry ` +
      'connects; messages still go through the server.';
    canFiles = false;
  } else if (single && sc && sc.state === 'connecting') {
    hint = `Connecting to ${peerName(single)}: ${STEP[sc.step] || 'starting'}… Files wait for the connection; ` +
      'messages go through the server meanwhile.';
  } else {
    hint = everyone ? `To everyone in the room (${to.length}).` : `To ${to.map(peerName).join(', ')}.`;
  }
  ui.hint.textContent = hint;
  ui.hint.classList.toggle('err', !canSend || !canFiles);
  ui.send.disabled = !canSend;
  ui.files.disabled = !canFiles;
  ui.drop.classList.toggle('off', !canFiles);
}
const lastSteps = new Map(); // peer id -> steps of its last channel (kept after it closes)

function renderPeers() {
  const peers = tern.peers();
  for (const id of [...picked]) if (!peers.some((p) => p.id === id)) picked.delete(id);
  ui.noPeers.hidden = peers.length > 0;
  ui.count.textContent = String(roomPeers().length);
  ui.everyone.checked = everyone;
  ui.peers.replaceChildren(...peers.map((p) => {
    const box = el('input', { type: 'checkbox', class: 'pick' });
    box.checked = picked.has(p.id);
    box.onchange = () => togglePeer(p.id, box.checked);
    const where = p.rooms.map((r) => (r === 'lan' ? 'same network' : `room ${r}`)).join(', ');
    const c = channelText(p.id);
    const who = el('span', { class: 'who' }, el('strong', { text: p.name }), ' ',
      el('span', { class: 'device', text: p.device }), el('br'), el('span', { class: 'meta', text: where }));
    const li = el('li', { class: 'peer', 'data-id': p.id }, el('label', {}, box, who,
      el('span', { class: 'path', 'data-state': c.state, text: c.text })));
    li.dataset.name = p.name;
    return li;
  }));
  setStatus();
}

function togglePeer(id, on) {
  if (on) picked.add(id);
  else picked.delete(id);
  everyone = picked.size === 0;
  renderPeers();
  // One peer picked: connect now, so its path shows before anything is sent.
  if (on && picked.size === 1) tern.open(id).catch(() => {});
}

// ---- chat ----

function markText(mark) {
  return { sending: '…', sent: '✓', delivered: '✓✓', failed: '✗' }[mark] || mark;
}

function addMessage({ from, to, body, room: toRoom, msg }) {
  const head = from === tern.id ? 'you' : peerName(from);
  const dest = toRoom ? 'everyone' : to.length === 1 && to[0] === tern.id ? 'you' : to.map((id) => (id === tern.id ? 'you' : peerName(id))).join(', ');
  const li = el('li', { class: 'message' }, el('span', { class: 'meta', text: `${head} → ${dest}:` }), ' ',
    el('span', { class: 'body', text: body }));
  li.dataset.from = head;
  if (msg) {
    const marks = el('div', { class: 'marks meta' });
    const draw = () => marks.replaceChildren(...msg.to.map((id) => el('span', {
      class: 'mark', 'data-peer': id, 'data-name': peerName(id), 'data-mark': msg.marks.get(id),
      title: msg.via.get(id) ? `via ${msg.via.get(id)}` : '', text: `${peerName(id)} ${markText(msg.marks.get(id))}`,
    })));
    msg.addEventListener('mark', draw);
    draw();
    li.append(marks);
  }
  ui.messages.prepend(li);
}

// ---- files ----

// A finished row's own SHA-256 of the file (what `sha256sum` prints): shown at once when
// the receiver took it alongside (a download), else a button reads the file back and
// hashes it (~4-5 ms of CPU per MiB; every piece was already checked in transit).
function fileHash(li, t, dir) {
  const show = (hex) => {
    li.dataset.sha256 = hex;
    li.querySelector('.sha')?.remove();
    li.append(el('div', { class: 'meta sha', text: `SHA-256 ${hex}` }));
  };
  if (t.sha256) {
    show(t.sha256);
    return;
  }
  if (dir === 'in' && !t.file) return;
  const b = el('button', { class: 'sha', type: 'button', text: 'SHA-256 of the file' });
  b.onclick = async () => {
    b.disabled = true;
    b.textContent = 'hashing…';
    try {
      show(await t.fileSha256());
    } catch (e) {
      b.replaceWith(el('div', { class: 'meta sha err', text: `SHA-256: ${e.message}` }));
    }
  };
  li.append(b);
}

function transferRow(t, dir) {
  const who = dir === 'out' ? `to ${peerName(t.peer)}` : `from ${peerName(t.peer)}`;
  const cancel = el('button', { type: 'button', class: 'cancel', text: 'Cancel' });
  cancel.onclick = () => t.cancel();
  const li = el('li', { class: 'transfer', 'data-dir': dir, 'data-peer': t.peer },
    cancel,
    el('div', {}, el('strong', { class: 'name', text: (dir === 'out' ? '↑ ' : '↓ ') + t.name }), ' ',
      el('span', { class: 'meta size', text: `${fmtBytes(t.size)} ${who}` })),
    el('progress', { max: '1', value: '0' }), el('div', { class: 'meta info' }));
  li.dataset.name = t.name;
  li.dataset.state = t.state;
  const info = li.querySelector('.info');
  const bar = li.querySelector('progress');
  const update = () => {
    const n = dir === 'out' ? t.sent : t.received;
    li.dataset.state = t.state;
    bar.value = t.size ? n / t.size : t.state === 'done' ? 1 : 0;
    const path = t.path || t.ch?.path || '';
    if (t.state === 'done') {
      info.textContent = `${dir === 'out' ? 'delivered' : 'received'} ${fmtBytes(t.size)} in ${t.secs.toFixed(1)} s · ` +
        `${fmtBytes(Math.round(t.size / Math.max(t.secs, 0.001)))}/s · ${path} · every piece's SHA-256 verified `;
    } else if (t.state === 'failed' || t.state === 'cancelled') {
      info.textContent = `${t.state}: ${t.error}`;
    } else if (t.state === 'connecting') {
      const c = channelText(t.peer);
      info.textContent = c.text || 'connecting…';
    } else {
      info.textContent = `${fmtBytes(n)} of ${fmtBytes(t.size)} · ${fmtBytes(Math.round(t.rate))}/s · ${path}` +
        (t.state === 'verifying' ? ' · verifying' : '');
    }
    info.classList.toggle('err', t.state === 'failed');
    cancel.hidden = ['done', 'failed', 'cancelled'].includes(t.state);
  };
  t.addEventListener('progress', update);
  t.addEventListener('state', () => {
    update();
    if (['done', 'failed', 'cancelled'].includes(t.state)) {
      active.delete(t);
      setStatus();
    }
    if (t.state === 'done') {
      li.dataset.digest = t.digest;
      fileHash(li, t, dir);
    }
    if (dir === 'in' && t.storage) li.dataset.storage = t.storage;
    if (t.state === 'done' && dir === 'in' && t.file) {
      const a = el('a', { class: 'download', text: 'Download' });
      a.href = URL.createObjectURL(t.file);
      a.download = t.name;
      info.append(a);
    } else if (t.state === 'done' && dir === 'in') {
      info.append(el('span', { class: 'saved', text: '· saved to your downloads' }));
    }
  });
  update();
  active.add(t);
  ui.transfers.prepend(li);
  setStatus();
}

function sendFiles(list) {
  const files = [...list];
  const to = recipients();
  if (files.length === 0 || to.length === 0 || ui.files.disabled) return;
  for (const t of tern.sendFiles(to, files)) {
    transferRow(t, 'out');
    t.done.catch(() => {});
  }
}

// ---- rooms and links ----

function randomRoom() {
  const b = crypto.getRandomValues(new Uint8Array(5));
  return 'r-' + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function roomUrl(r) {
  const u = new URL(location.href);
  const path = u.searchParams.get('path');
  u.search = '';
  u.hash = '';
  u.searchParams.set('room', r);
  if (path) u.searchParams.set('path', path);
  return u.href;
}

function enterRoom(r) {
  room = r;
  tern.join(r);
  const link = roomUrl(r);
  // This tab's own address carries the room at once: a reload comes back into it.
  if (location.href !== link) history.replaceState(null, '', link);
  ui.shareLink.href = link;
  ui.shareLink.textContent = link;
  ui.shareOut.hidden = false;
  renderPeers();
}

async function copyLink() {
  const link = ui.shareLink.href;
  try {
    await navigator.clipboard.writeText(link);
  } catch {
    // No clipboard permission (or no secure context): select the link for Ctrl+C.
    const r = document.createRange();
    r.selectNodeContents(ui.shareLink);
    getSelection().removeAllRanges();
    getSelection().addRange(r);
    document.execCommand?.('copy');
  }
  ui.copied.hidden = false;
  setTimeout(() => { ui.copied.hidden = true; }, 2000);
}

async function main() {
  try {
    tern = await Tern.connect({ persist: true });
  } catch (e) {
    offline = e.message;
    setStatus();
    return;
  }
  window.tern = tern; // for debugging from the console
  ui.me.textContent = tern.name;
  ui.name.value = tern.name;
  ui.meDevice.textContent = tern.device;
  ui.name.onchange = () => {
    tern.setName(ui.name.value);
    ui.name.value = tern.name;
    ui.me.textContent = tern.name;
  };
  tern.addEventListener('peers', renderPeers);
  tern.addEventListener('step', renderPeers);
  tern.addEventListener('channel', (e) => {
    const ch = e.channel;
    failedWhy.delete(ch.peer);
    ch.addEventListener('open', renderPeers);
    ch.addEventListener('close', (ev) => {
      lastSteps.set(ch.peer, ch.steps);
      if (ev.reason !== 'replaced by a new channel' && ev.reason !== 'peer left') failedWhy.set(ch.peer, ev.reason);
      renderPeers();
    });
    renderPeers();
  });
  tern.addEventListener('chat', (e) => addMessage(e.message));
  tern.addEventListener('transfer', (e) => transferRow(e.transfer, 'in'));
  tern.addEventListener('close', () => {
    offline = 'signaling connection lost';
    setStatus();
  });
  const fromUrl = new URLSearchParams(location.search).get('room');
  if (fromUrl) enterRoom(fromUrl);
  ui.share.onclick = () => enterRoom(room || randomRoom());
  ui.copy.onclick = () => copyLink();
  ui.everyone.onchange = () => {
    everyone = ui.everyone.checked;
    if (everyone) picked.clear();
    renderPeers();
  };
  ui.retry.onclick = () => {
    const [id] = recipients();
    failedWhy.delete(id);
    tern.open(id).catch(() => {});
    setStatus();
  };
  ui.files.onchange = () => {
    // Read and cleared at once: the same file can be picked again straight away.
    const files = [...ui.files.files];
    ui.files.value = '';
    sendFiles(files);
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
  ui.textForm.onsubmit = (e) => {
    e.preventDefault();
    const body = ui.text.value;
    const to = recipients();
    if (!body || to.length === 0) return;
    try {
      const msg = tern.chat(body, everyone ? { room: room || 'lan' } : { to });
      addMessage({ from: tern.id, to: msg.to, body, room: everyone, msg });
      ui.text.value = '';
    } catch (err) {
      ui.hint.textContent = err.message;
    }
  };
  renderPeers();
  document.body.dataset.ready = 'true';
}

main();
