// tern.js: the client library for a Tern server (an ES module, no dependencies).
//
//   import { Tern } from '/tern.js';
//   const tern = await Tern.connect();                 // signaling on /ws, ICE from /api/ice
//   tern.addEventListener('peers', () => console.log(tern.peers()));
//   const ch = await tern.open(peerId);                // direct -> TURN -> WebSocket relay
//   ch.addEventListener('message', (e) => console.log(e.data));
//   await ch.send('hello');                            // resolves when under the high-water mark
//   console.log(ch.path);                              // direct | turn-udp | turn-tcp | turn-tls | ws-relay
//   const msg = tern.chat('hi all');                   // everyone in my rooms, marks per peer
//   const [t] = tern.sendFiles([peerId], [file]);      // streamed, SHA-256 checked, cancellable
//   tern.addEventListener('transfer', (e) => e.transfer.done.then((f) => ...)); // to disk (OPFS)
//
// Paths, in order (docs/client.md): "direct" — WebRTC with host/srflx candidates only, for
// `directMs` (3 s); "turn" — a new ICE session through the server's TURN relay only, for
// `turnMs` (5 s); "ws-relay" — the WebSocket relay (/relay), end-to-end encrypted with
// AES-GCM under an ECDH P-256 key agreed over signaling, so the server cannot read it. An
// ICE failure moves to the next step at once. Every step is a `step` event. Debug switch:
// `?path=turn` (start at TURN) or `?path=ws` (relay at once) in the page URL, or `path`.

// Queued bytes above which send() waits, and the bufferedAmountLowThreshold it waits for:
// enough in the SCTP queue to keep a long (TURN) path busy while the sender sleeps.
const HIGH_WATER = 4 << 20;
const LOW_WATER = 1 << 20;
// Largest frame on a data channel (when the negotiated SCTP max message size allows it:
// Chromium offers 256 KiB). A file chunk is one message: fewer, larger messages mean fewer
// send calls and message events on the two main threads; the SCTP packets are the same.
const MAX_FRAME = 256 << 10;
const WS_CHUNK = 64 << 10; // payload per relay frame (well under relay_ws.max_frame_bytes)
const HEARTBEAT_MS = 2000;
const DEAD_AFTER_MS = 12000;
const RELAY_MS = 15000; // the WebSocket relay step, from asking for a ticket to both hellos
// A file moves in pieces of PIECE bytes: the sender reads the file through one stream into
// a piece at a time (the next one being read meanwhile) and sends the piece's SHA-256 from
// WebCrypto (native) in the frame of its last chunk (K_PIECE); the receiver checks each
// piece the same way (in its piece worker, BATCH pieces per message) and writes a batch as
// one storage write. Both ends take the transfer's digest, the SHA-256 of the piece hashes
// in order; the sender's goes with the last piece and the receiver compares it with its own.
// The file's own SHA-256 (`Sha256`, incremental, 6-7x the CPU of native SHA-256) is taken on
// request from the stored file (`fileSha256()`), or alongside where the page cannot read the
// stored file back (a download).
// 255 KiB: one 256 KiB SCTP message between Chromiums with its frame header, so the
// receiver checks a piece as it came (no joining copy), and a piece's buffers stay in
// cache; 1 MiB pieces cost the page 11-29 ms more CPU per MiB in bench/web.
const PIECE = 255 << 10;
const PROGRESS_MS = 500; // at most one progress event per transfer this often (each redraws)
const HASH_STEP = 64 << 10; // the receiver hashes a piece this much at a time, letting
// channel messages in between: a whole piece at once blocks the main thread long enough
// (~25 ms on a busy machine) for the SCTP receive window to close
// The receiver hands its checker (the piece worker) this many pieces at a time, ~1 MiB: one
// message to the worker and one storage write per batch instead of per piece (each is a
// thread hop, and an OPFS write a message to the browser process too). In bench/web, pieces
// of 64 KiB, each handed on alone, cost 23 ms of CPU per MiB more than 255 KiB ones: the
// per-piece hops, not the bytes.
const BATCH = 4;
const WINDOW = 16 << 20; // bytes a sender may have in flight beyond the receiver's last ack
const ACK_EVERY = 2 << 20; // the receiver acks after writing this much
const MAX_CHAT_BYTES = 32 << 10; // chat text (UTF-8): under signaling's 64 KiB message cap

// Frame kinds (first byte of every frame on a channel).
const K_BIN = 0; // binary fragment, more follow
const K_BIN_END = 1; // last fragment of a binary message
const K_TXT = 2; // text fragment, more follow
const K_TXT_END = 3; // last fragment of a text message
const K_PING = 4;
const K_PONG = 5;
const K_HELLO = 6; // first frame over the WebSocket relay: proves both sides hold the key
const K_CTL = 7; // the library's own JSON (chat, file offers, acks, cancel): never a `message`
const K_DATA = 8; // a file chunk: u32 transfer id, then bytes
const K_PIECE = 9; // a piece's last chunk: u32 transfer id, the piece's SHA-256 (32 bytes), then bytes
const DATA_HEAD = 5; // kind and id before a K_DATA chunk's bytes
const PIECE_HEAD = 37; // kind, id and SHA-256 before a K_PIECE chunk's bytes

const enc = new TextEncoder();
const dec = new TextDecoder();

function randomId() {
  const b = crypto.getRandomValues(new Uint8Array(8));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

// SHA-256 round constants (FIPS 180-4 §4.2.2).
const K256 = new Int32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);

// The SHA-256 compression function in WebAssembly: web/wasm/sha256.wat, hand-written,
// assembled into this base64 by web/wasm/build.mjs (run it after changing the .wat). The
// page's CSP allows it with 'wasm-unsafe-eval' (WebAssembly compilation only, no JS eval:
// docs/client.md); where a policy forbids it, Sha256 runs its JS rounds.
const SHA256_WASM = 'AGFzbQEAAAABCwJgAX8Bf2ACf38AAwMCAAEFAwEAAgcTAgZtZW1vcnkCAAZibG9ja3MAAQrvAwIiAQF/IAAoAgAhASABQQh3Qf+B/AdxIAFBCHhBgP6DeHFyC8kDAQ1/AkADQCABRQ0BQQAhDANAIAwgACAMahAANgKgAiAMQQRqIQwgDEHAAEkNAAsDQCAMKALkASENIAwoApgCIQ4gDCAMKALgASANQQd4IA1BEnhzIA1BA3ZzaiAMKAKEAiAOQRF4IA5BE3hzIA5BCnZzamo2AqACIAxBBGohDCAMQYACSQ0AC0EAKAIAIQJBACgCBCEDQQAoAgghBEEAKAIMIQVBACgCECEGQQAoAhQhB0EAKAIYIQhBACgCHCEJQQAhDANAIAkgBkEGeCAGQQt4cyAGQRl4c2ogCCAGIAcgCHNxc2ogDCgCICAMKAKgAmpqIQogAkECeCACQQ14cyACQRZ4cyACIANxIAQgAiADc3FzaiELIAghCSAHIQggBiEHIAUgCmohBiAEIQUgAyEEIAIhAyAKIAtqIQIgDEEEaiEMIAxBgAJJDQALQQBBACgCACACajYCAEEAQQAoAgQgA2o2AgRBAEEAKAIIIARqNgIIQQBBACgCDCAFajYCDEEAQQAoAhAgBmo2AhBBAEEAKAIUIAdqNgIUQQBBACgCGCAIajYCGEEAQQAoAhwgCWo2AhwgAEHAAGohACABQQFrIQEMAAsLCw==';
let wasmSha; // undefined: not tried yet; null: unavailable

function sha256Wasm() {
  if (wasmSha === undefined) {
    wasmSha = null;
    try {
      const bytes = Uint8Array.from(atob(SHA256_WASM), (c) => c.charCodeAt(0));
      // Synchronous compile: the module is ~0.5 KiB, well under the main thread's limit.
      const ex = new WebAssembly.Instance(new WebAssembly.Module(bytes)).exports;
      const mem = ex.memory.buffer; // never grows: the views below stay valid
      new Int32Array(mem, 32, 64).set(K256);
      wasmSha = { blocks: ex.blocks, h: new Int32Array(mem, 0, 8), input: new Uint8Array(mem, 65536, 65536) };
    } catch {
      /* no WebAssembly, or a CSP without 'wasm-unsafe-eval' */
    }
  }
  return wasmSha;
}

/**
 * Incremental SHA-256 (FIPS 180-4). WebCrypto only digests a whole buffer at once, which
 * would hold a whole file in memory; this hashes it slice by slice.
 *   const h = new Sha256(); h.update(u8); h.update(u8b); h.hex() // 64 hex digits
 */
export class Sha256 {
  constructor() {
    this._h = new Int32Array([
      0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ]);
    this._w = new Int32Array(64);
    this._buf = new Uint8Array(64);
    this._bufLen = 0;
    this._len = 0; // bytes hashed so far (exact in a double up to 2^53)
    this._done = null;
  }

  /** Adds bytes (a Uint8Array or ArrayBuffer). */
  update(data) {
    if (this._done) throw new Error('Sha256: update after digest');
    const p = data instanceof Uint8Array ? data : new Uint8Array(data);
    const n = p.length;
    this._len += n;
    let i = 0;
    if (this._bufLen > 0) {
      const take = Math.min(64 - this._bufLen, n);
      this._buf.set(p.subarray(0, take), this._bufLen);
      this._bufLen += take;
      i = take;
      if (this._bufLen < 64) return this;
      this._blocks(this._buf, 0, 64);
      this._bufLen = 0;
    }
    i = this._blocks(p, i, n);
    if (i < n) {
      this._buf.set(p.subarray(i), 0);
      this._bufLen = n - i;
    }
    return this;
  }

  // Hashes the whole 64-byte blocks of p[i..end); returns where they stop. WebAssembly
  // where the page allows it (~1.5-2.5x less CPU than the JS rounds below), else JS.
  _blocks(p, i, end) {
    const w = sha256Wasm();
    if (!w) {
      for (; i + 64 <= end; i += 64) this._block(p, i);
      return i;
    }
    w.h.set(this._h);
    while (i + 64 <= end) {
      const len = Math.min(end - i, w.input.length) & ~63;
      w.input.set(p.subarray(i, i + len));
      w.blocks(w.input.byteOffset, len >> 6);
      i += len;
    }
    this._h.set(w.h);
    return i;
  }

  _block(p, o) {
    const w = this._w;
    const h = this._h;
    for (let j = 0; j < 16; j++, o += 4) w[j] = (p[o] << 24) | (p[o + 1] << 16) | (p[o + 2] << 8) | p[o + 3];
    for (let j = 16; j < 64; j++) {
      const x = w[j - 15];
      const y = w[j - 2];
      const s0 = ((x >>> 7) | (x << 25)) ^ ((x >>> 18) | (x << 14)) ^ (x >>> 3);
      const s1 = ((y >>> 17) | (y << 15)) ^ ((y >>> 19) | (y << 13)) ^ (y >>> 10);
      w[j] = (w[j - 16] + s0 + w[j - 7] + s1) | 0;
    }
    let a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (let j = 0; j < 64; j++) {
      const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
      const t1 = (k + S1 + ((e & f) ^ (~e & g)) + K256[j] + w[j]) | 0;
      const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
      const t2 = (S0 + ((a & b) ^ (a & c) ^ (b & c))) | 0;
      k = g;
      g = f;
      f = e;
      e = (d + t1) | 0;
      d = c;
      c = b;
      b = a;
      a = (t1 + t2) | 0;
    }
    h[0] = (h[0] + a) | 0;
    h[1] = (h[1] + b) | 0;
    h[2] = (h[2] + c) | 0;
    h[3] = (h[3] + d) | 0;
    h[4] = (h[4] + e) | 0;
    h[5] = (h[5] + f) | 0;
    h[6] = (h[6] + g) | 0;
    h[7] = (h[7] + k) | 0;
  }

  /** The 32-byte digest (the hash is finished: no update after this). */
  digest() {
    if (!this._done) {
      const bits = this._len * 8;
      const padLen = (this._bufLen < 56 ? 56 : 120) - this._bufLen;
      const pad = new Uint8Array(padLen + 8);
      pad[0] = 0x80;
      const dv = new DataView(pad.buffer);
      dv.setUint32(padLen, Math.floor(bits / 2 ** 32));
      dv.setUint32(padLen + 4, bits >>> 0);
      this.update(pad);
      const out = new Uint8Array(32);
      const ov = new DataView(out.buffer);
      for (let j = 0; j < 8; j++) ov.setInt32(j * 4, this._h[j]);
      this._done = out;
    }
    return this._done;
  }

  hex() {
    return hex(this.digest());
  }
}

/** A device type guessed from the user agent, for peer lists. */
export function deviceType() {
  const ua = navigator.userAgent;
  if (/iPad|Tablet/i.test(ua)) return 'tablet';
  if (/Mobi|Android|iPhone/i.test(ua)) return 'phone';
  return 'desktop';
}

/** The forced path from the page URL (`?path=turn|ws`), or null. */
export function pathFromUrl() {
  const p = new URLSearchParams(location.search).get('path');
  return p === 'turn' || p === 'ws' ? p : null;
}

function store(kind) {
  try {
    return kind === 'local' ? window.localStorage : window.sessionStorage;
  } catch {
    return null; // storage blocked (privacy settings): nothing persists
  }
}

function cleanName(s) {
  return String(s || '').replace(/\s+/g, ' ').trim().slice(0, 40);
}

/**
 * A connection to Tern's signaling service (docs/signaling.md §2).
 * Events: `welcome`, `peers` (room membership or peer info changed), `channel` (a peer
 * opened a channel to us: `e.channel`), `step` (`e.peer`, `e.step`, `e.why`: a path being
 * tried), `chat` (`e.message`), `transfer` (`e.transfer`: a file is coming), `close`
 * (signaling lost).
 */
export class Tern extends EventTarget {
  /**
   * Options: `server` (http(s) origin, default this page's), `path` (null | 'turn' | 'ws',
   * default from the page URL), `directMs` (3000), `turnMs` (5000), `device` (default from
   * the UA), `persist` (false: with true, the resume token and display name live in this
   * tab's sessionStorage, so a reload keeps the peer id, name and rooms), `name` (a display
   * name to announce instead of the server's), `storage` ('opfs' default, 'download' or
   * 'memory': where received files are written; 'opfs' falls back to 'download' where OPFS
   * has no writable streams, and either to 'memory' where no Service Worker can run).
   */
  static async connect(opts = {}) {
    const t = new Tern(opts);
    await t._open();
    return t;
  }

  constructor(opts = {}) {
    super();
    this.server = (opts.server || location.origin).replace(/\/$/, '');
    this.forcePath = opts.path === undefined ? pathFromUrl() : opts.path;
    this.directMs = opts.directMs ?? 3000;
    this.turnMs = opts.turnMs ?? 5000;
    this.device = opts.device || deviceType();
    this.persist = !!opts.persist;
    this.storageKind = opts.storage || 'opfs';
    this.id = null;
    this.name = null;
    this.resumed = false;
    this._chosenName = cleanName(opts.name) || (this.persist ? cleanName(store('session')?.getItem('tern.name')) : '');
    this.rooms = new Map(); // room -> Map(id -> {id, name})
    this.info = new Map(); // peer id -> {device, name}
    this.channels = new Map(); // peer id -> Channel (the current one)
    this.chats = new Map(); // message id -> outgoing ChatMessage (for receipts)
    this._seenChats = new Set(); // incoming message ids (a message may come by two routes)
    this._ws = null;
    this._store = null; // Promise<ReceiveStore>
  }

  _open() {
    let url = this.server.replace(/^http/, 'ws') + '/ws';
    const token = this.persist ? store('session')?.getItem('tern.resume') : null;
    if (token) url += '?resume=' + encodeURIComponent(token);
    const ws = new WebSocket(url);
    this._ws = ws;
    return new Promise((resolve, reject) => {
      ws.onerror = () => reject(new Error('signaling connection failed'));
      ws.onclose = () => {
        reject(new Error('signaling closed'));
        this.closed = true;
        for (const ch of this.channels.values()) ch._fail('signaling lost');
        this.dispatchEvent(new Event('close'));
      };
      ws.onmessage = (e) => {
        let m;
        try {
          m = JSON.parse(e.data);
        } catch {
          return;
        }
        if (m.type === 'welcome') {
          this.id = m.id;
          this.serverName = m.name;
          this.resumed = !!m.resumed;
          if (this.persist) {
            store('session')?.setItem('tern.resume', m.resume);
            // The first name this tab got stays its name, even after the resume grace.
            if (!this._chosenName) {
              this._chosenName = m.name;
              store('session')?.setItem('tern.name', m.name);
            }
          }
          this.name = this._chosenName || m.name;
          this.dispatchEvent(new Event('welcome'));
          resolve();
        }
        this._onMessage(m);
      };
      // Application-level ping keeps NATs and proxies from idling the socket out.
      this._pinger = setInterval(() => this._send({ type: 'ping' }), 15000);
    });
  }

  _send(m) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) {
      this._ws.send(JSON.stringify(m));
      return true;
    }
    return false;
  }

  /** Signals `data` to peer `to` (opaque to the server). False when signaling is down. */
  signal(to, data) {
    return this._send({ type: 'signal', to, data });
  }

  /** Joins a named room (a share link carries its name). */
  join(room) {
    this._send({ type: 'join', room });
  }

  leave(room) {
    this._send({ type: 'leave', room });
  }

  /** Sets this peer's display name (≤ 40 characters), announces it to every known peer. */
  setName(name) {
    const n = cleanName(name);
    if (!n) return;
    this._chosenName = n;
    this.name = n;
    if (this.persist) store('session')?.setItem('tern.name', n);
    for (const p of this.peers()) this._hello(p.id, true);
  }

  /**
   * Members of `room` (default: every room), each {id, name, device, rooms}; `name` is the
   * peer's own display name when it announced one (plain text: show it with textContent).
   */
  peers(room) {
    const out = new Map();
    for (const [r, members] of this.rooms) {
      if (room && r !== room) continue;
      for (const p of members.values()) {
        const info = this.info.get(p.id);
        const cur = out.get(p.id) || { id: p.id, name: info?.name || p.name, device: info?.device || '', rooms: [] };
        cur.rooms.push(r);
        out.set(p.id, cur);
      }
    }
    return [...out.values()];
  }

  _hello(to, reply) {
    this.signal(to, { kind: 'hello', device: this.device, name: this.name, reply });
  }

  _onMessage(m) {
    switch (m.type) {
      case 'room': {
        const members = new Map();
        for (const p of m.peers) {
          members.set(p.id, p);
          this._hello(p.id, false);
        }
        this.rooms.set(m.room, members);
        this.dispatchEvent(new Event('peers'));
        break;
      }
      case 'peer-joined':
        if (!this.rooms.has(m.room)) this.rooms.set(m.room, new Map());
        this.rooms.get(m.room).set(m.peer.id, m.peer);
        this.dispatchEvent(new Event('peers'));
        break;
      case 'peer-left': {
        this.rooms.get(m.room)?.delete(m.id);
        if (!this.peers().some((p) => p.id === m.id)) this.channels.get(m.id)?._fail('peer left');
        this.dispatchEvent(new Event('peers'));
        break;
      }
      case 'left':
        this.rooms.delete(m.room);
        this.dispatchEvent(new Event('peers'));
        break;
      case 'signal':
        this._onSignal(m.from, m.data);
        break;
      case 'relay-ticket':
        this.channels.get(m.peer)?._onTicket(m.ticket, m.path || '/relay');
        break;
      case 'error':
        if (m.to) {
          // Only a channel still being set up depends on signaling.
          const ch = this.channels.get(m.to);
          if (ch?.state === 'connecting') ch._fail(`signaling: ${m.code}`);
          for (const msg of this.chats.values()) msg._signalError(m.to, m.code);
        }
        break;
      default:
        break;
    }
  }

  _onSignal(from, d) {
    if (!d || typeof d !== 'object') return;
    if (d.kind === 'hello') {
      this.info.set(from, { device: String(d.device || '').slice(0, 16), name: cleanName(d.name) });
      if (!d.reply) this._hello(from, true);
      this.dispatchEvent(new Event('peers'));
      return;
    }
    if (d.kind === 'chat' || d.kind === 'chat-ack') {
      this._onCtl(from, d, 'signaling');
      return;
    }
    if (d.kind === 'open') {
      const old = this.channels.get(from);
      // Both sides opened at once: the lower id's channel wins, the other gives way.
      if (old && old.initiator && old.state === 'connecting' && this.id < from) return;
      if (old) old._fail('replaced by a new channel');
      const ch = new Channel(this, from, d.cid, false);
      this.channels.set(from, ch);
      ch._accept(d).catch((e) => ch._fail(e.message));
      this.dispatchEvent(Object.assign(new Event('channel'), { channel: ch }));
      return;
    }
    const ch = this.channels.get(from);
    if (ch && ch.cid === d.cid) ch._onSignal(d).catch((e) => ch._fail(e.message));
  }

  /** ICE servers from /api/ice (short-lived TURN credentials). */
  async iceConfig() {
    const r = await fetch(this.server + '/api/ice', { cache: 'no-store' });
    if (!r.ok) throw new Error(`/api/ice: ${r.status}`);
    const cfg = await r.json();
    return { iceServers: cfg.iceServers || [] };
  }

  /**
   * A channel to `peerId` that carries data: the open one, the one being set up, or a new
   * one. Resolves once it is open on some path.
   */
  async open(peerId) {
    for (let tries = 0; tries < 3; tries++) {
      let ch = this.channels.get(peerId);
      if (ch && ch.state === 'open') return ch;
      if (!ch || ch.state === 'closed') {
        ch = new Channel(this, peerId, randomId(), true);
        this.channels.set(peerId, ch);
        ch._start().catch((e) => ch._fail(e.message));
        this.dispatchEvent(Object.assign(new Event('channel'), { channel: ch }));
      }
      try {
        return await ch.ready;
      } catch (e) {
        // Lost a simultaneous open to the peer's own channel: use that one.
        const cur = this.channels.get(peerId);
        if (!cur || cur === ch || cur.state === 'closed') throw e;
      }
    }
    throw new Error('could not open a channel');
  }

  /**
   * Sends a chat message to `opts.to` (peer ids; default: everyone in `opts.room`, or in
   * all my rooms). Each peer gets it over its open channel, or through signaling when no
   * channel is up. Returns a ChatMessage whose `marks` (peer id -> 'sent' | 'delivered' |
   * 'failed') change with `mark` events as receipts arrive.
   */
  chat(body, opts = {}) {
    const text = String(body);
    if (enc.encode(text).length > MAX_CHAT_BYTES) throw new Error(`message longer than ${MAX_CHAT_BYTES} bytes`);
    const to = opts.to ? [...new Set(opts.to)] : this.peers(opts.room).map((p) => p.id);
    if (to.length === 0) throw new Error('nobody to send to');
    const msg = new ChatMessage(randomId(), text, to, !opts.to);
    this.chats.set(msg.id, msg);
    const wire = { kind: 'chat', id: msg.id, body: text, to, room: !opts.to };
    for (const peer of to) {
      const ch = this.channels.get(peer);
      const viaSignal = () => {
        msg.via.set(peer, 'signaling');
        msg._mark(peer, this.signal(peer, wire) ? 'sent' : 'failed');
      };
      if (ch && ch.state === 'open') {
        msg.via.set(peer, 'channel');
        ch._sendCtl(wire).then(() => msg._mark(peer, 'sent'), viaSignal);
      } else viaSignal();
    }
    return msg;
  }

  // Library messages from a peer (over its channel, or signaling for chat).
  _onCtl(from, d, via, ch) {
    switch (d.kind) {
      case 'chat': {
        const ack = { kind: 'chat-ack', id: String(d.id) };
        if (ch) ch._sendCtl(ack).catch(() => this.signal(from, ack));
        else this.signal(from, ack);
        if (this._seenChats.has(d.id) || typeof d.body !== 'string') return;
        this._seenChats.add(d.id);
        if (this._seenChats.size > 10000) this._seenChats.delete(this._seenChats.values().next().value);
        const message = {
          id: String(d.id), from, body: d.body, via,
          to: Array.isArray(d.to) ? d.to.map(String) : [this.id], room: !!d.room,
        };
        this.dispatchEvent(Object.assign(new Event('chat'), { message }));
        return;
      }
      case 'chat-ack':
        this.chats.get(d.id)?._mark(from, 'delivered');
        return;
      default:
        if (ch) ch._onFileCtl(d);
    }
  }

  /**
   * Sends each file to each peer: one OutgoingTransfer per (peer, file), each with its own
   * channel path, progress and cancel. The File objects are only read slice by slice.
   */
  sendFiles(peerIds, files) {
    const out = [];
    for (const peer of peerIds) for (const f of files) out.push(new OutgoingTransfer(this, peer, f));
    return out;
  }

  /** Where received files go: this tab's folder in the Origin Private File System. */
  _receiveStore() {
    if (!this._store) this._store = ReceiveStore.open(this.storageKind, this.server);
    return this._store;
  }

  close() {
    clearInterval(this._pinger);
    for (const ch of this.channels.values()) ch.close();
    this._ws?.close();
  }
}

/**
 * An outgoing chat message. `marks`: peer id -> 'sending' | 'sent' | 'delivered' |
 * 'failed'; `via`: peer id -> 'channel' | 'signaling'. Event `mark` (`e.peer`, `e.mark`).
 */
export class ChatMessage extends EventTarget {
  constructor(id, body, to, room) {
    super();
    this.id = id;
    this.body = body;
    this.to = to;
    this.room = room;
    this.marks = new Map(to.map((p) => [p, 'sending']));
    this.via = new Map();
  }

  _mark(peer, mark) {
    const cur = this.marks.get(peer);
    if (cur === undefined || cur === 'delivered' || (cur === 'failed' && mark === 'sent')) return;
    this.marks.set(peer, mark);
    this.dispatchEvent(Object.assign(new Event('mark'), { peer, mark }));
  }

  _signalError(peer, code) {
    if (this.via.get(peer) === 'signaling' && this.marks.get(peer) === 'sent') {
      this.marks.set(peer, 'failed');
      this.dispatchEvent(Object.assign(new Event('mark'), { peer, mark: 'failed', why: code }));
    }
  }
}

// The ICE servers a step may use: STUN only for "direct", TURN only for "turn".
function serversFor(step, cfg) {
  const want = step === 'direct' ? /^stuns?:/ : /^turns?:/;
  return (cfg.iceServers || [])
    .map((s) => ({ ...s, urls: [].concat(s.urls || []).filter((u) => want.test(u)) }))
    .filter((s) => s.urls.length > 0);
}

/** Words for each step, as the page shows them. */
export const STEP_TEXT = { direct: 'direct', turn: "through Tern's TURN", 'ws-relay': 'WebSocket relay' };

/**
 * A reliable, ordered message channel to one peer. `send(string | ArrayBuffer | view)`
 * resolves when the data is queued under the high-water mark (await it for backpressure).
 * `step` is the path being tried ('direct' | 'turn' | 'ws-relay'), `steps` the history
 * ({step, text, at, result}). Events: `step`, `open`, `path` (path changed), `message`
 * (`e.data`: string or ArrayBuffer), `close` (`e.reason`; set when the path died or the
 * peer left).
 */
export class Channel extends EventTarget {
  constructor(tern, peer, cid, initiator) {
    super();
    this.tern = tern;
    this.peer = peer;
    this.cid = cid;
    this.initiator = initiator;
    this.path = null;
    this.step = null;
    this.steps = [];
    this.state = 'connecting'; // connecting | open | closed
    this.closeReason = null;
    /** Largest payload one frame carries (from the SCTP max message size or the relay). */
    this.chunkSize = 16 << 10;
    this.ready = new Promise((res, rej) => {
      this._ready = res;
      this._readyFail = rej;
    });
    this.ready.catch(() => {});
    this._pc = null;
    this._dc = null;
    this._ws = null;
    this._gen = 0; // ICE attempt number: signals of an older attempt are ignored
    this._cfg = null;
    this._keys = null; // { pair, remote, aes }
    this._sendCtr = 0n;
    this._recvCtr = 0n;
    this._sendChain = Promise.resolve();
    this._queued = 0; // frames in _sendChain not yet handed to the transport
    this._scratch = null; // the reused buffer of _sendData's direct path
    this._recvChain = Promise.resolve();
    this._frag = [];
    this._lastHeard = Date.now();
    this._timer = null;
    this._beat = null;
    this._pendingIce = [];
    this._out = new Map(); // transfer id -> OutgoingTransfer
    this._in = new Map(); // transfer id -> IncomingTransfer
  }

  _setStep(step, why) {
    const prev = this.steps[this.steps.length - 1];
    if (prev && !prev.result) prev.result = why || 'gave up';
    this.step = step;
    const entry = { step, text: STEP_TEXT[step] || step, at: Date.now(), result: null };
    this.steps.push(entry);
    const ev = () => Object.assign(new Event('step'), { peer: this.peer, step, why, channel: this });
    this.dispatchEvent(ev());
    this.tern.dispatchEvent(ev());
  }

  async _keyPair() {
    this._keys = { pair: await crypto.subtle.generateKey({ name: 'ECDH', namedCurve: 'P-256' }, false, ['deriveKey']) };
    return crypto.subtle.exportKey('jwk', this._keys.pair.publicKey);
  }

  async _deriveKey(jwk) {
    const pub = await crypto.subtle.importKey('jwk', jwk, { name: 'ECDH', namedCurve: 'P-256' }, false, []);
    this._keys.aes = await crypto.subtle.deriveKey(
      { name: 'ECDH', public: pub },
      this._keys.pair.privateKey,
      { name: 'AES-GCM', length: 256 },
      false,
      ['encrypt', 'decrypt'],
    );
  }

  _signal(d) {
    this.tern.signal(this.peer, { ...d, cid: this.cid });
  }

  // Initiator: offer the key, then direct, then TURN, then the WebSocket relay.
  async _start() {
    const pub = await this._keyPair();
    this._signal({ kind: 'open', pub, path: this.tern.forcePath });
    if (this.tern.forcePath === 'ws') {
      this._setStep('ws-relay', 'forced by ?path=ws');
      return; // wait for 'accept', then request the relay
    }
    this._cfg = await this.tern.iceConfig();
    if (this.tern.forcePath === 'turn') this._tryTurn();
    else this._attempt('direct', this.tern.directMs, (why) => this._tryTurn(why));
  }

  _tryTurn(why) {
    if (serversFor('turn', this._cfg).length === 0) this._fallback(why ? `${why}; no TURN server offered` : 'no TURN server offered');
    else this._attempt('turn', this.tern.turnMs, (w) => this._fallback(w), why);
  }

  // One ICE attempt of `step`, given up after `ms` (or at ICE failure) for `next`.
  _attempt(step, ms, next, why) {
    if (this.state !== 'connecting') return;
    this._dropRtc();
    const gen = ++this._gen;
    this._next = next;
    this._setStep(step, why);
    this._startRtc(true, step, gen).catch((e) => this._advance(gen, e.message));
    this._timer = setTimeout(() => this._advance(gen, `no connection within ${ms / 1000} s`), ms);
  }

  _advance(gen, why) {
    if (gen !== this._gen || this.state !== 'connecting' || this._fellBack) return;
    clearTimeout(this._timer);
    this._next(why);
  }

  // Acceptor: answer with our key; WebRTC offers arrive by signal.
  async _accept(d) {
    const pub = await this._keyPair();
    await this._deriveKey(d.pub);
    this._signal({ kind: 'accept', pub });
  }

  async _startRtc(offerer, step, gen) {
    if (!this._cfg) this._cfg = await this.tern.iceConfig();
    if (gen !== this._gen) return;
    const cfg = { iceServers: serversFor(step, this._cfg) };
    if (step === 'turn') cfg.iceTransportPolicy = 'relay';
    const pc = new RTCPeerConnection(cfg);
    this._pc = pc;
    pc.onicecandidate = (e) => {
      if (e.candidate && pc === this._pc) this._signal({ kind: 'ice', gen, candidate: e.candidate.toJSON() });
    };
    pc.oniceconnectionstatechange = () => {
      if (pc !== this._pc || pc.iceConnectionState !== 'failed') return;
      if (this.state === 'connecting' && this.initiator) this._advance(gen, 'ICE failed');
      else if (this.state === 'open' && this.path !== 'ws-relay') this._fail('ICE failed');
    };
    if (offerer) {
      this._useDc(pc.createDataChannel('tern', { ordered: true }));
      await pc.setLocalDescription(await pc.createOffer());
      if (pc === this._pc) this._signal({ kind: 'sdp', gen, step, sdp: pc.localDescription.toJSON() });
    } else {
      pc.ondatachannel = (e) => this._useDc(e.channel);
    }
  }

  _useDc(dc) {
    dc.binaryType = 'arraybuffer';
    dc.bufferedAmountLowThreshold = LOW_WATER;
    this._dc = dc;
    dc.onopen = async () => {
      if (dc !== this._dc || this.state !== 'connecting') return;
      clearTimeout(this._timer);
      const max = this._pc.sctp?.maxMessageSize || 65536;
      // Frames up to the negotiated SCTP max message size, capped at MAX_FRAME.
      this.chunkSize = Math.max(1024, Math.min(max, MAX_FRAME) - 1);
      this.path = await this._rtcPath();
      this._opened();
    };
    dc.onmessage = (e) => this._onFrame(new Uint8Array(e.data));
    dc.onclose = () => {
      if (dc === this._dc && this.path !== 'ws-relay') this._fail('data channel closed');
    };
  }

  // The path from getStats(): the selected pair's candidate types and relay protocol.
  async _rtcPath() {
    try {
      const stats = await this._pc.getStats();
      let pair = null;
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
      });
      if (!pair) stats.forEach((s) => { if (!pair && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s; });
      const local = pair && stats.get(pair.localCandidateId);
      const remote = pair && stats.get(pair.remoteCandidateId);
      if (local?.candidateType === 'relay') return 'turn-' + (local.relayProtocol || 'udp');
      if (remote?.candidateType === 'relay') return 'turn-udp';
      return 'direct';
    } catch {
      return 'direct';
    }
  }

  async _onSignal(d) {
    switch (d.kind) {
      case 'accept':
        await this._deriveKey(d.pub);
        if (this.tern.forcePath === 'ws') this._fallback('forced by ?path=ws');
        break;
      case 'sdp': {
        if (d.sdp?.type === 'offer') {
          // A new attempt from the initiator: this side follows its step.
          if (this.initiator || typeof d.gen !== 'number' || d.gen <= this._gen) return;
          this._dropRtc();
          this._gen = d.gen;
          const step = d.step === 'turn' ? 'turn' : 'direct';
          this._setStep(step);
          await this._startRtc(false, step, d.gen);
        } else if (d.gen !== this._gen) return;
        const pc = this._pc;
        if (!pc || this._gen !== d.gen) return;
        await pc.setRemoteDescription(d.sdp);
        for (const c of this._pendingIce.splice(0)) {
          if (c.gen === d.gen) await pc.addIceCandidate(c.candidate).catch(() => {});
        }
        if (d.sdp.type === 'offer') {
          await pc.setLocalDescription(await pc.createAnswer());
          if (pc === this._pc) this._signal({ kind: 'sdp', gen: d.gen, sdp: pc.localDescription.toJSON() });
        }
        break;
      }
      case 'ice':
        if (this._pc?.remoteDescription && d.gen === this._gen) await this._pc.addIceCandidate(d.candidate).catch(() => {});
        else if (d.gen >= this._gen) this._pendingIce.push(d);
        break;
      case 'fallback':
        if (this.state !== 'connecting') return;
        this._dropRtc();
        this._setStep('ws-relay', d.why);
        break;
      case 'close':
        this._fail(d.reason || 'closed by peer');
        break;
      default:
        break;
    }
  }

  _dropRtc() {
    clearTimeout(this._timer);
    const pc = this._pc;
    this._pc = null;
    this._dc = null;
    this._pendingIce = this._pendingIce.filter((c) => c.gen > this._gen);
    pc?.close();
  }

  // Initiator: give up on ICE; both sides move to the WebSocket relay.
  _fallback(why) {
    if (this.state !== 'connecting' || this._fellBack) return;
    this._fellBack = true;
    this.fallbackReason = why;
    this._dropRtc();
    if (this.step !== 'ws-relay') this._setStep('ws-relay', why);
    this._signal({ kind: 'fallback', why });
    this.tern._send({ type: 'relay', to: this.peer });
    this._relayTimer = setTimeout(() => this._fail(`the WebSocket relay did not connect within ${RELAY_MS / 1000} s`), RELAY_MS);
  }

  _onTicket(ticket, path) {
    if (this.state !== 'connecting') return;
    this._dropRtc();
    const url = this.tern.server.replace(/^http/, 'ws') + path + '?ticket=' + encodeURIComponent(ticket);
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    this._ws = ws;
    this.chunkSize = WS_CHUNK;
    ws.onopen = () => this._sendFrame(K_HELLO, new Uint8Array(0));
    ws.onmessage = (e) => {
      const frame = new Uint8Array(e.data);
      this._recvChain = this._recvChain.then(() => this._decrypt(frame)).then(
        (plain) => this._onFrame(plain),
        () => this._fail('relay frame failed authentication'),
      );
    };
    ws.onclose = () => this._fail('relay closed');
  }

  // AES-GCM with a 96-bit IV = direction byte + 64-bit frame counter: never reused under
  // one key, and a dropped, replayed or reordered frame fails authentication.
  _iv(dir, ctr) {
    const iv = new Uint8Array(12);
    iv[0] = dir;
    new DataView(iv.buffer).setBigUint64(4, ctr);
    return iv;
  }

  async _encrypt(plain) {
    const iv = this._iv(this.initiator ? 1 : 2, this._sendCtr++);
    return new Uint8Array(await crypto.subtle.encrypt({ name: 'AES-GCM', iv }, this._keys.aes, plain));
  }

  async _decrypt(frame) {
    if (this.state === 'closed') return new Uint8Array([K_PONG]);
    const iv = this._iv(this.initiator ? 2 : 1, this._recvCtr++);
    return new Uint8Array(await crypto.subtle.decrypt({ name: 'AES-GCM', iv }, this._keys.aes, frame));
  }

  _opened() {
    if (this.state !== 'connecting') return;
    this.state = 'open';
    clearTimeout(this._relayTimer);
    const last = this.steps[this.steps.length - 1];
    if (last) last.result = 'connected';
    this._lastHeard = Date.now();
    this._beat = setInterval(() => {
      if (Date.now() - this._lastHeard > DEAD_AFTER_MS) this._fail('heartbeat lost');
      else this._sendFrame(K_PING, new Uint8Array(0)).catch(() => {});
    }, HEARTBEAT_MS);
    // What receiving a file needs (the storage folder, the piece worker) is set up now, so
    // the first transfer does not wait for it.
    this.tern._receiveStore().then(() => pieceWorker()).catch(() => {});
    this._ready(this);
    this.dispatchEvent(new Event('open'));
    this.dispatchEvent(new Event('path'));
  }

  _onFrame(f) {
    if (f.length === 0 || this.state === 'closed') return;
    this._lastHeard = Date.now();
    const kind = f[0];
    const body = f.subarray(1);
    switch (kind) {
      case K_HELLO:
        // Both sides hold the key: the relay path works.
        this.path = 'ws-relay';
        this._opened();
        return;
      case K_PING:
        this._sendFrame(K_PONG, new Uint8Array(0)).catch(() => {});
        return;
      case K_PONG:
        return;
      case K_CTL: {
        let d;
        try {
          d = JSON.parse(dec.decode(body));
        } catch {
          return;
        }
        if (d && typeof d === 'object') this.tern._onCtl(this.peer, d, 'channel', this);
        return;
      }
      case K_DATA:
        if (body.length >= 4) {
          const id = new DataView(body.buffer, body.byteOffset, 4).getUint32(0);
          this._in.get(id)?._onData(body.subarray(4));
        }
        return;
      case K_PIECE:
        if (body.length >= 4) {
          const t = this._in.get(new DataView(body.buffer, body.byteOffset, 4).getUint32(0));
          // Cut short before its SHA-256: the transfer fails and the sender is told why.
          if (body.length < PIECE_HEAD - 1) t?._bad(`a piece frame of ${body.length + 1} bytes, shorter than its ${PIECE_HEAD}-byte header`);
          else {
            t?._onData(body.subarray(PIECE_HEAD - 1));
            t?._onPiece(hex(body.subarray(4, PIECE_HEAD - 1)));
          }
        }
        return;
      case K_BIN:
      case K_TXT:
        this._frag.push(body.slice());
        return;
      case K_BIN_END:
      case K_TXT_END: {
        let data;
        if (this._frag.length === 0) data = body.slice();
        else {
          this._frag.push(body);
          const n = this._frag.reduce((a, b) => a + b.length, 0);
          data = new Uint8Array(n);
          let o = 0;
          for (const p of this._frag) {
            data.set(p, o);
            o += p.length;
          }
          this._frag = [];
        }
        const value = kind === K_TXT_END ? dec.decode(data) : data.buffer;
        this.dispatchEvent(Object.assign(new Event('message'), { data: value }));
        return;
      }
      default:
        return;
    }
  }

  // File transfer control from the peer (offers, acks, results, cancels).
  _onFileCtl(d) {
    const id = Number(d.id) >>> 0;
    switch (d.kind) {
      case 'file':
        if (!this._in.has(id) && Number.isSafeInteger(d.size) && d.size >= 0) {
          const t = new IncomingTransfer(this, id, d);
          this.tern.dispatchEvent(Object.assign(new Event('transfer'), { transfer: t }));
        }
        return;
      case 'file-end':
        this._in.get(id)?._onEnd(String(d.digest || ''));
        return;
      case 'file-piece': // a piece's SHA-256 apart from its chunk (tern.js before K_PIECE)
        this._in.get(id)?._onPiece(String(d.sha256 || ''));
        return;
      case 'file-ack':
        this._out.get(id)?._onAck(Number(d.bytes) || 0);
        return;
      case 'file-ok':
      case 'file-bad':
        this._out.get(id)?._onResult(d.kind === 'file-ok', String(d.why || ''), String(d.digest || ''), String(d.sha256 || ''));
        return;
      case 'file-cancel':
        if (d.from === 'receiver') this._out.get(id)?._fail('cancelled by the receiver', 'cancelled');
        else this._in.get(id)?._fail('cancelled by the sender', 'cancelled');
        return;
      default:
        return;
    }
  }

  _sendCtl(obj) {
    return this._sendFrame(K_CTL, enc.encode(JSON.stringify(obj)));
  }

  /**
   * A file chunk (`bytes` ≤ `dataStep`): K_DATA, or with `sha256` (the piece's, 32 bytes)
   * K_PIECE, its piece's last chunk. On a data channel with no frame queued before it, it
   * is sent at once (`send` copies it): framed in place when `room` says the bytes before
   * `bytes` in its buffer are the caller's headroom (PieceReader's: no copy at all), else in
   * one reused buffer; no allocation or promise per chunk. Returns null when the caller may
   * send the next chunk at once, else a promise to await (the queue is above HIGH_WATER, or
   * the chunk went behind queued frames).
   */
  _sendData(id, bytes, sha256 = null, room = false) {
    const head = sha256 ? PIECE_HEAD : DATA_HEAD;
    const n = bytes.length + head;
    const dc = this._dc;
    if (this._queued === 0 && dc && !this._ws && this.state === 'open') {
      if (dc.readyState !== 'open') return Promise.reject(new Error('data channel closed'));
      let f;
      if (room && bytes.byteOffset >= head) f = new Uint8Array(bytes.buffer, bytes.byteOffset - head, n);
      else {
        if (!this._scratch || this._scratch.length < n) this._scratch = new Uint8Array(Math.max(n, this.chunkSize + 1));
        f = this._scratch.subarray(0, n);
        f.set(bytes, head);
      }
      frameHead(f, id, sha256);
      dc.send(f);
      return dc.bufferedAmount > HIGH_WATER ? this._drained(dc) : null;
    }
    const frame = new Uint8Array(n);
    frameHead(frame, id, sha256);
    frame.set(bytes, head);
    return this._queue(frame);
  }

  /** File bytes per chunk: pieces split evenly into frames of at most `chunkSize`. */
  get dataStep() {
    return Math.ceil(PIECE / Math.ceil(PIECE / (this.chunkSize - (PIECE_HEAD - 1))));
  }

  /** Sends a string or binary message; large messages are split into `chunkSize` frames. */
  async send(data) {
    if (this.state !== 'open') throw new Error(`channel is ${this.state}`);
    const text = typeof data === 'string';
    let bytes;
    if (text) bytes = enc.encode(data);
    else if (data instanceof ArrayBuffer) bytes = new Uint8Array(data);
    else bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    const n = this.chunkSize;
    let off = 0;
    do {
      const end = Math.min(off + n, bytes.length);
      const last = end === bytes.length;
      const kind = text ? (last ? K_TXT_END : K_TXT) : last ? K_BIN_END : K_BIN;
      await this._sendFrame(kind, bytes.subarray(off, end));
      off = end;
    } while (off < bytes.length);
  }

  _sendFrame(kind, body) {
    const frame = new Uint8Array(body.length + 1);
    frame[0] = kind;
    frame.set(body, 1);
    return this._queue(frame);
  }

  // Frames go out in order through one promise chain (encryption is async).
  _queue(frame) {
    this._queued++;
    const p = this._sendChain.then(() => this._sendNow(frame)).finally(() => { this._queued--; });
    this._sendChain = p.catch(() => {});
    return p;
  }

  // Resolves when the data channel's queue is down to LOW_WATER (or the channel closed).
  _drained(dc) {
    return new Promise((resolve) => {
      const done = () => {
        dc.removeEventListener('bufferedamountlow', done);
        dc.removeEventListener('close', done);
        resolve();
      };
      dc.addEventListener('bufferedamountlow', done);
      dc.addEventListener('close', done);
    });
  }

  async _sendNow(frame) {
    if (this.state === 'closed') throw new Error('channel closed');
    if (this._ws) {
      const ws = this._ws;
      const sealed = await this._encrypt(frame);
      if (ws.readyState !== WebSocket.OPEN) throw new Error('relay closed');
      ws.send(sealed);
      // WebSocket has no bufferedamountlow event: poll until the queue drains.
      while (ws.bufferedAmount > HIGH_WATER && ws.readyState === WebSocket.OPEN) {
        await new Promise((r) => setTimeout(r, 10));
      }
      return;
    }
    const dc = this._dc;
    if (!dc || dc.readyState !== 'open') throw new Error('data channel closed');
    dc.send(frame);
    if (dc.bufferedAmount > HIGH_WATER) await this._drained(dc);
  }

  _fail(reason) {
    if (this.state === 'closed') return;
    const wasOpen = this.state === 'open';
    this.state = 'closed';
    this.closeReason = reason;
    const last = this.steps[this.steps.length - 1];
    if (last && !last.result) last.result = reason;
    clearTimeout(this._timer);
    clearTimeout(this._relayTimer);
    clearInterval(this._beat);
    this._dropRtc();
    this._ws?.close();
    this._ws = null;
    if (this.tern.channels.get(this.peer) === this) this.tern.channels.delete(this.peer);
    for (const t of [...this._out.values(), ...this._in.values()]) t._fail(`connection lost (${reason})`);
    this._readyFail(new Error(reason));
    this.dispatchEvent(Object.assign(new Event('close'), { reason, wasOpen }));
  }

  /** Closes the channel and tells the peer. */
  close() {
    if (this.state === 'closed') return;
    this._signal({ kind: 'close', reason: 'closed by peer' });
    this._fail('closed');
  }
}

// Lets queued events (channel messages) run: scheduler.yield where there is one, else a
// message to self (a timer would be clamped to 4 ms when chained).
function yieldToEvents() {
  if (globalThis.scheduler?.yield) return globalThis.scheduler.yield();
  return new Promise((r) => {
    const { port1, port2 } = new MessageChannel();
    port1.onmessage = () => {
      port1.close();
      r();
    };
    port2.postMessage(null);
  });
}

// A transfer's `progress` event, at most every PROGRESS_MS and at the last byte.
function progress(t, n) {
  const now = performance.now();
  if (n === t.size || now - (t._lastProgress || 0) >= PROGRESS_MS) {
    t._lastProgress = now;
    t.dispatchEvent(new Event('progress'));
  }
}

// A file chunk's frame header: K_DATA and the transfer id, or K_PIECE, the id and the
// piece's SHA-256.
function frameHead(f, id, sha256) {
  f[0] = sha256 ? K_PIECE : K_DATA;
  f[1] = id >>> 24;
  f[2] = (id >>> 16) & 255;
  f[3] = (id >>> 8) & 255;
  f[4] = id & 255;
  if (sha256) f.set(sha256, DATA_HEAD);
}

function cleanFileName(s) {
  // Path separators and control characters never reach a download name.
  return String(s || 'file').replace(/[\u0000-\u001f\u007f/\\]/g, '_').slice(0, 255) || 'file';
}

/**
 * A file read in pieces of PIECE bytes (the last one shorter) through one `stream()` of it,
 * into two buffers used in turn. The file's stream is a byte stream where the browser has
 * them (Chromium): a BYOB reader reads straight into the piece's buffer (bench/web/read.mjs:
 * 1.4-2.5 ms of CPU per MiB against 2.3-4.1 for a default reader's chunks copied in, and
 * 8.5-9.2 for a `slice().arrayBuffer()` per piece); elsewhere the chunks are copied in. `next()` resolves to the next piece and starts reading the one after it; a
 * piece stays valid until the next call after that, so the caller hands it on (the channel
 * and WebCrypto copy what they take) before asking again. With `room`, each piece's buffer
 * keeps that many bytes before the piece for the caller (a frame header).
 */
class PieceReader {
  constructor(file, size, room = 0) {
    this._size = size;
    this._room = room;
    this._byob = false;
    this._reader = null;
    if (size > 0) {
      const stream = file.stream();
      try {
        this._reader = stream.getReader({ mode: 'byob' });
        this._byob = true;
      } catch {
        this._reader = stream.getReader();
      }
    }
    this._spare = null; // the buffer of the piece before the last one handed out
    this._left = null; // the unused end of the last chunk read (default reader)
    this._read = 0; // bytes taken from the stream
    this._next = this._reader ? this._fill(this._buffer()) : null;
    this._next?.catch(() => {}); // a read still running when the transfer stops
  }

  async next() {
    if (!this._next) throw new Error('read past the end of the file');
    const piece = await this._next;
    if (this._read < this._size) {
      this._next = this._fill(this._spare || this._buffer());
      this._next.catch(() => {});
    } else this._next = null;
    this._spare = piece.buffer;
    return piece;
  }

  _buffer() {
    return new ArrayBuffer(this._room + Math.min(PIECE, this._size));
  }

  // Reads the next piece into `ab` after its room (a BYOB read transfers it: the piece is a
  // view of the buffer the last read gave back).
  async _fill(ab) {
    const at = this._room;
    const want = Math.min(ab.byteLength - at, this._size - this._read);
    let n = 0;
    while (n < want) {
      if (this._byob) {
        const { done, value } = await this._reader.read(new Uint8Array(ab, at + n, want - n));
        if (done) throw new Error('the file shrank while it was read');
        ab = value.buffer;
        n += value.length;
        continue;
      }
      let c = this._left;
      this._left = null;
      if (!c) {
        const { done, value } = await this._reader.read();
        if (done) throw new Error('the file shrank while it was read');
        c = value;
      }
      const take = Math.min(c.length, want - n);
      new Uint8Array(ab, at + n, take).set(take === c.length ? c : c.subarray(0, take));
      n += take;
      if (take < c.length) this._left = c.subarray(take);
    }
    this._read += n;
    return new Uint8Array(ab, at, n);
  }

  close() {
    this._reader?.cancel().catch(() => {});
    this._reader = null;
  }
}

/**
 * One file to one peer. Fields: `id`, `peer`, `name`, `size`, `sent` (bytes handed to the
 * channel), `state` ('connecting' | 'sending' | 'verifying' | 'done' | 'failed' |
 * 'cancelled'), `path`, `error`, `digest` (the SHA-256 of the pieces' SHA-256, sent with
 * the last piece), `sha256` (the file's own, once known: see `fileSha256()`). `done`
 * resolves when the receiver has stored every piece, each matching its SHA-256, and its
 * digest matched. Events: `state`, `progress`. `cancel()` stops it on both sides.
 */
export class OutgoingTransfer extends EventTarget {
  constructor(tern, peer, file) {
    super();
    this.tern = tern;
    this.peer = peer;
    this.file = file;
    this.id = crypto.getRandomValues(new Uint32Array(1))[0];
    this.name = cleanFileName(file.name);
    this.size = file.size;
    this.sent = 0;
    this.acked = 0;
    this.state = 'connecting';
    this.path = null;
    this.error = null;
    this.sha256 = null;
    this.digest = null;
    this.t0 = performance.now();
    this._wake = null;
    this.done = new Promise((res, rej) => {
      this._resolve = res;
      this._reject = rej;
    });
    this.done.catch(() => {});
    this._run().catch((e) => this._fail(e.message));
  }

  _set(state) {
    this.state = state;
    this.dispatchEvent(new Event('state'));
  }

  _live() {
    if (this.state === 'failed' || this.state === 'cancelled') throw new Error(this.error || this.state);
  }

  async _run() {
    const ch = await this.tern.open(this.peer);
    this._live();
    this.ch = ch;
    this.path = ch.path;
    ch._out.set(this.id, this);
    this._set('sending');
    await ch._sendCtl({ kind: 'file', id: this.id, name: this.name, size: this.size, mime: this.file.type || '' });
    this.t0 = performance.now();
    const step = ch.dataStep;
    // Pieces are read with room for a frame header before them: a piece that is one frame
    // goes to `send` as it was read.
    const reader = new PieceReader(this.file, this.size, PIECE_HEAD);
    this._reader = reader;
    const list = new PieceList();
    let off = 0;
    while (off < this.size) {
      // One piece in hand and the next one being read: never more of the file in memory.
      const buf = await reader.next();
      this._live();
      // The piece's SHA-256 goes in the frame of its last chunk (the channel's queue, 1-4 MiB,
      // keeps the path busy meanwhile).
      const d = new Uint8Array(await crypto.subtle.digest('SHA-256', buf));
      this._live();
      list.push(d);
      for (let i = 0; i < buf.length; i += step) {
        while (this.sent - this.acked > WINDOW) {
          await new Promise((r) => { this._wake = r; });
          this._live();
        }
        const end = Math.min(i + step, buf.length);
        const chunk = buf.subarray(i, end);
        const wait = ch._sendData(this.id, chunk, end === buf.length ? d : null, i === 0);
        if (wait) {
          await wait;
          this._live();
        } else if (this.state !== 'sending') this._live();
        this.sent += chunk.length;
      }
      off += buf.length;
      progress(this, this.sent);
    }
    reader.close();
    this.digest = await list.hex();
    await ch._sendCtl({ kind: 'file-end', id: this.id, digest: this.digest });
    this._live();
    this._set('verifying');
  }

  /** Bytes per second since the first byte. */
  get rate() {
    return this.sent / Math.max((performance.now() - this.t0) / 1000, 0.001);
  }

  /** The file's own SHA-256 (hex, what `sha256sum` prints), read through `Sha256`. */
  async fileSha256() {
    this.sha256 ??= await sha256File(this.file);
    return this.sha256;
  }

  _onAck(bytes) {
    this.acked = Math.max(this.acked, bytes);
    this._wake?.();
  }

  _onResult(ok, why, digest, sha256) {
    if (this.state !== 'verifying' && this.state !== 'sending') return;
    if (!ok) {
      this._fail(`the receiver rejected the file: ${why}`);
      return;
    }
    if (digest !== this.digest) {
      this._fail(`the receiver's digest ${digest.slice(0, 16) || '(none)'}… is not the file's`);
      return;
    }
    this.sha256 = /^[0-9a-f]{64}$/.test(sha256) ? sha256 : null;
    this.secs = (performance.now() - this.t0) / 1000;
    this.ch?._out.delete(this.id);
    this._set('done');
    this._resolve(this);
  }

  _fail(why, state = 'failed') {
    if (this.state === 'done' || this.state === 'failed' || this.state === 'cancelled') return;
    this.error = why;
    this.ch?._out.delete(this.id);
    this._reader?.close();
    this._set(state);
    this._wake?.();
    this._reject(new Error(why));
  }

  /** Stops sending; the receiver drops what it stored. */
  cancel() {
    if (this.ch && this.ch.state === 'open' && this.state !== 'done') {
      this.ch._sendCtl({ kind: 'file-cancel', id: this.id, from: 'sender' }).catch(() => {});
    }
    this._fail('cancelled', 'cancelled');
  }
}

/**
 * One file arriving from a peer, written to storage as it comes (this tab's folder in the
 * Origin Private File System, the browser's downloads through a Service Worker where OPFS has no
 * writable streams, or memory), each piece checked against the sender's SHA-256 of it.
 * Fields: `id`, `peer`, `name` (plain text), `size`, `mime`, `received`, `state`
 * ('receiving' | 'verifying' | 'done' | 'failed' | 'cancelled'), `path`, `error`,
 * `digest` (the SHA-256 of the pieces' SHA-256, equal to the sender's), `sha256` (the
 * file's own: see `fileSha256()`), `storage` ('opfs' | 'download' | 'memory'), `file` (a disk-backed
 * File once done; null for `download`: the file is in the browser's downloads). `done`
 * resolves to that File (or null).
 * `cancel()` stops it on both sides and deletes what was stored; `discard()` deletes a
 * finished file. `cleaned` resolves once a failed or cancelled transfer's storage is gone.
 * Events: `state`, `progress`.
 */
export class IncomingTransfer extends EventTarget {
  constructor(ch, id, d) {
    super();
    this.tern = ch.tern;
    this.ch = ch;
    this.id = id;
    this.peer = ch.peer;
    this.name = cleanFileName(d.name);
    this.size = d.size;
    this.mime = String(d.mime || '').slice(0, 100) || 'application/octet-stream';
    this.path = ch.path;
    this.received = 0;
    this.state = 'receiving';
    this.error = null;
    this.sha256 = null;
    this.digest = null;
    this.file = null;
    this.t0 = performance.now();
    this._parts = [];
    this._partsLen = 0;
    this._batch = []; // pieces complete and not yet handed to _pieces: [{parts, n, sha256}]
    this._batchLen = 0;
    this._written = 0;
    this._acked = 0;
    this.done = new Promise((res, rej) => {
      this._resolve = res;
      this._reject = rej;
    });
    this.done.catch(() => {});
    this.cleaned = new Promise((res) => { this._cleanedRes = res; });
    this.storage = null; // 'opfs' | 'download' | 'memory', once the store is open
    this._sink = null;
    this._pieces = null; // checks, hashes (and with the piece worker, stores) each piece
    ch._in.set(id, this);
    // Pieces are handed to _pieces as soon as it exists, in order, without waiting for the
    // one before (the worker works through them while the channel delivers the next).
    this._ready = this.tern._receiveStore().then(async (st) => {
      this.storage = st.kind;
      const meta = { name: this.name, size: this.size, mime: this.mime };
      [this._sink, this._pieces] = await st.open(`${this.peer}-${id}`, meta);
    });
    this._chain = this._ready;
    this._chain.catch((e) => this._bad(`storage: ${e.message}`));
  }

  get rate() {
    return this.received / Math.max((performance.now() - this.t0) / 1000, 0.001);
  }

  _set(state) {
    this.state = state;
    this.dispatchEvent(new Event('state'));
  }

  _onData(bytes) {
    if (this.state !== 'receiving') return;
    this.received += bytes.length;
    this._partsLen += bytes.length;
    if (this.received > this.size) {
      this._fail(`received more than the announced ${this.size} bytes`);
      return;
    }
    if (this._partsLen > PIECE) {
      this._fail(`a piece longer than ${PIECE} bytes`);
      return;
    }
    this._parts.push(bytes);
    progress(this, this.received);
  }

  // The chunks since the last piece, with the sender's SHA-256 of them: one piece, handed
  // on in a batch of BATCH.
  _onPiece(sha256) {
    if (this.state !== 'receiving') return;
    this._batch.push({ parts: this._parts, n: this._partsLen, sha256 });
    this._batchLen += this._partsLen;
    this._parts = [];
    this._partsLen = 0;
    if (this._batch.length >= BATCH) this._handOn();
  }

  // The pieces batched: checked, added to the transfer's digest and written (one storage
  // write), in order.
  _handOn() {
    if (this._batch.length === 0) return;
    const list = this._batch;
    const n = this._batchLen;
    this._batch = [];
    this._batchLen = 0;
    const checked = this._ready.then(() => this._pieces.take(list));
    checked.catch(() => {});
    this._chain = this._chain.then(async () => {
      if (this.state !== 'receiving') return;
      let back;
      try {
        back = await checked;
      } catch (e) {
        this._bad(e.message);
        return;
      }
      if (this.state !== 'receiving') return;
      if (back) await this._sink.write(back);
      this._written += n;
      // The sender keeps at most WINDOW bytes beyond this ack in flight: memory here stays
      // bounded however slow the disk or the hash is.
      if (this._written - this._acked >= ACK_EVERY) {
        this._acked = this._written;
        this.ch._sendCtl({ kind: 'file-ack', id: this.id, bytes: this._written }).catch(() => {});
      }
    });
    this._chain.catch((e) => this._bad(`storage: ${e.message}`));
  }

  // Fails the transfer and tells the sender why (a storage error included: the sender
  // would otherwise wait for acks that never come).
  _bad(why) {
    if (this.state === 'receiving' || this.state === 'verifying') {
      this.ch._sendCtl({ kind: 'file-bad', id: this.id, why }).catch(() => {});
    }
    this._fail(why);
  }

  // The sender's digest (its pieces' SHA-256 in order) against the one of the pieces
  // checked here: a piece missing, repeated or out of order fails the transfer.
  _onEnd(digest) {
    if (this._partsLen > 0) this._bad('data after the last piece');
    this._handOn();
    this._chain = this._chain.then(async () => {
      if (this.state !== 'receiving') return;
      this._set('verifying');
      if (this._written !== this.size) {
        this._bad(`${this._written} of ${this.size} bytes arrived`);
        return;
      }
      const r = await this._pieces.finish();
      if (r.digest !== digest) {
        this._bad(`the pieces' digest ${r.digest.slice(0, 16)}… is not the sender's ${digest.slice(0, 16)}…`);
        return;
      }
      this.digest = r.digest;
      this.sha256 = r.sha256;
      this.file = await this._sink.close();
      this.secs = (performance.now() - this.t0) / 1000;
      this.ch._in.delete(this.id);
      this.ch._sendCtl({ kind: 'file-ok', id: this.id, digest: this.digest, sha256: this.sha256 }).catch(() => {});
      this._set('done');
      this._resolve(this.file);
    });
    this._chain.catch((e) => this._bad(`storage: ${e.message}`));
  }

  _fail(why, state = 'failed') {
    if (this.state === 'done' || this.state === 'failed' || this.state === 'cancelled') return;
    this.error = why;
    this._parts = [];
    this._partsLen = 0;
    this._batch = [];
    this._batchLen = 0;
    this.ch._in.delete(this.id);
    this._set(state);
    this._reject(new Error(why));
    // After any write in progress: nothing of a failed file stays stored.
    this._chain = this._chain.catch(() => {})
      .then(() => this._pieces?.drop())
      .then(() => this._sink?.remove())
      .catch(() => {});
    this._chain.then(() => this._cleanedRes());
  }

  /** Stops receiving, tells the sender, deletes what was stored. */
  cancel() {
    if (this.state !== 'receiving' && this.state !== 'verifying') return;
    if (this.ch.state === 'open') this.ch._sendCtl({ kind: 'file-cancel', id: this.id, from: 'receiver' }).catch(() => {});
    this._fail('cancelled', 'cancelled');
  }

  /**
   * The stored file's own SHA-256 (hex, what `sha256sum` prints): known at `done` for a
   * download (hashed alongside: it cannot be read back), else read back from storage now
   * (~4-5 ms of CPU per MiB on the test machine) and kept in `sha256`.
   */
  async fileSha256() {
    if (!this.sha256) {
      if (this.state !== 'done' || !this.file) throw new Error(`no stored file to hash (${this.state}, ${this.storage})`);
      this.sha256 = await sha256File(this.file, this._sink?.handle);
    }
    return this.sha256;
  }

  /** Deletes a received file from storage (its `file` can no longer be read). */
  async discard() {
    if (this.state === 'done') await this._sink?.remove();
  }
}

/**
 * A transfer's digest: the SHA-256 of its pieces' SHA-256 digests (32 bytes each), in order
 * (a hash list). Both ends keep one; the receiver compares the sender's (sent with the last
 * piece) with its own, so a piece lost, repeated or out of order anywhere fails the
 * transfer. 32 bytes per piece.
 */
class PieceList {
  constructor() {
    this._b = new Uint8Array(32 * 64);
    this._n = 0;
  }

  push(d) {
    if (this._n + 32 > this._b.length) {
      const b = new Uint8Array(this._b.length * 2);
      b.set(this._b);
      this._b = b;
    }
    this._b.set(d, this._n);
    this._n += 32;
  }

  async hex() {
    return hex(new Uint8Array(await crypto.subtle.digest('SHA-256', this._b.subarray(0, this._n))));
  }
}

/**
 * The receiver's checks: `check(u8, sha256)` rejects a piece whose WebCrypto SHA-256 is
 * not the sender's and adds it to the transfer's `list`. With `flat` (where the stored file
 * cannot be read back) `add(u8, sha256)` also feeds the file's own SHA-256 (`hash`, `step`
 * bytes at a time, awaiting `pause()` in between); without it `hash` is null.
 */
class PieceHasher {
  constructor(flat) {
    this.hash = flat ? new Sha256() : null;
    this.list = new PieceList();
    this.at = 0;
  }

  async check(u8, sha256) {
    const d = new Uint8Array(await crypto.subtle.digest('SHA-256', u8));
    if (hex(d) !== sha256) throw new Error(`the piece at byte ${this.at} does not match its SHA-256`);
    this.list.push(d);
    this.at += u8.length;
  }

  async add(u8, sha256, step = u8.length, pause = null) {
    await this.check(u8, sha256);
    if (!this.hash) return;
    for (let o = 0; o < u8.length; o += step) {
      this.hash.update(u8.subarray(o, o + step));
      if (pause) await pause();
    }
  }

  /** {digest, sha256}: the transfer's digest, and the file's SHA-256 when it was fed. */
  async finish() {
    return { digest: await this.list.hex(), sha256: this.hash ? this.hash.hex() : null };
  }
}

/**
 * The SHA-256 (hex) of a Blob or File, read in pieces (PieceReader) with `Sha256`. In the tab's
 * piece worker when one runs, off the main thread; given the file's OPFS handle (`fh`) the
 * worker reads it through a sync access handle into one reused buffer, so no memory
 * beyond that buffer is used however large the file (a stream's chunks are garbage until
 * the worker's next collection: a 1 GiB read-back took its renderer to 529 MiB).
 */
export async function sha256File(blob, fh = null) {
  const w = typeof window !== 'undefined' ? await pieceWorker() : null;
  if (w) return w.call({ op: 'sha256', file: blob, fh });
  return blobSha256(blob);
}

// The worker's side of sha256File with an OPFS handle.
async function storedSha256(fh) {
  const ah = await fh.createSyncAccessHandle();
  try {
    const h = new Sha256();
    const buf = new Uint8Array(PIECE);
    const size = ah.getSize();
    for (let at = 0; at < size;) {
      const n = ah.read(buf, { at });
      if (n <= 0) throw new Error('storage: short read');
      h.update(n === buf.length ? buf : buf.subarray(0, n));
      at += n;
    }
    return h.hex();
  } finally {
    ah.close();
  }
}

// Read through PieceReader into its two piece buffers (a BYOB reader in Chromium): like
// storedSha256's one buffer, no garbage however large the file (the stream's own chunks
// are garbage until the worker's next collection).
async function blobSha256(blob) {
  const h = new Sha256();
  const r = new PieceReader(blob, blob.size);
  try {
    for (let at = 0; at < blob.size;) {
      const piece = await r.next();
      h.update(piece);
      at += piece.length;
    }
  } finally {
    r.close();
  }
  return h.hex();
}

// The `n` bytes of `parts` (Uint8Arrays) in one buffer: `into` when given (its first n
// bytes), else a new one.
function concat(parts, n, into = null) {
  const u8 = into ? into.subarray(0, n) : new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    u8.set(p, o);
    o += p.length;
  }
  return u8;
}

/**
 * Pieces checked (and with `flat` hashed) on the main thread, in order (where no worker can
 * run: tern.js loaded from another origin). `take(list)` (a batch of pieces, each
 * `{parts, n, sha256}`: its chunks, their length and the sender's SHA-256) resolves to the
 * batch in one buffer for the sink to write; `finish()` to `{digest, sha256}` (PieceHasher's).
 */
class InlinePieces {
  constructor(flat) {
    this._h = new PieceHasher(flat);
    this._c = Promise.resolve();
  }

  take(list) {
    const u8 = concat(list.flatMap((p) => p.parts), batchLength(list));
    const p = this._c.then(async () => {
      let o = 0;
      for (const { n, sha256 } of list) {
        // HASH_STEP at a time, letting channel messages in between.
        await this._h.add(u8.subarray(o, o + n), sha256, HASH_STEP, yieldToEvents);
        o += n;
      }
      return u8;
    });
    this._c = p.catch(() => {});
    return p;
  }

  async finish() {
    await this._c;
    return this._h.finish();
  }

  async drop() {}
}

/** The bytes in a batch of pieces. */
function batchLength(list) {
  return list.reduce((a, p) => a + p.n, 0);
}

/**
 * Pieces of one file in the piece worker: a batch's chunks are transferred (not copied) to
 * it in one message; it checks each piece, and the batch comes back in one buffer only
 * where the main thread's sink writes it (`download`, `memory`); with a file handle the
 * worker writes it. Same interface as InlinePieces.
 */
class WorkerPieces {
  static async open(w, key, fh, flat) {
    await w.call({ op: 'open', key, fh, flat });
    return new WorkerPieces(w, key);
  }

  constructor(w, key) {
    this._w = w;
    this._key = key;
  }

  async take(list) {
    // Each chunk is a view into its own channel message's buffer.
    const bufs = [...new Set(list.flatMap((p) => p.parts.map((c) => c.buffer)))];
    const back = await this._w.call({ op: 'pieces', key: this._key, list }, bufs);
    return back ? new Uint8Array(back) : null;
  }

  finish() {
    return this._w.call({ op: 'close', key: this._key });
  }

  drop() {
    return this._w.call({ op: 'drop', key: this._key }).catch(() => {});
  }
}

// The piece worker: this module again, in a dedicated Worker named PIECE_WORKER, one per
// tab. It takes the receiver's per-piece work off the main thread (which then only
// gathers a piece's chunks from the channel): the piece's SHA-256 check (WebCrypto) and,
// in OPFS, the write through a FileSystemSyncAccessHandle (a file write from the renderer,
// where a writable stream sends every piece through the browser process). The file's own
// SHA-256 (the WebAssembly pass, ~4-5 ms per MiB on the test machine against ~0.7 for
// WebCrypto's) runs here alongside only for a download, which cannot be read back; else on
// request (`fileSha256`). Taken for every file, alongside or read back at the end, it cost
// the page 10-25 % of its speed in bench/web on two cores (docs/client.md, Speed).
const PIECE_WORKER = 'tern-pieces';
let pieceWorkerP = null;

/** The tab's piece worker, or null where none runs (another origin, blocked by policy). */
function pieceWorker() {
  if (!pieceWorkerP) {
    pieceWorkerP = (async () => {
      let w;
      try {
        w = new Worker(import.meta.url, { type: 'module', name: PIECE_WORKER });
      } catch {
        return null; // cross-origin script or no Worker
      }
      const pw = new PieceWorkerClient(w);
      const ok = await Promise.race([
        pw.call({ op: 'ping' }).then(() => true, () => false),
        new Promise((r) => setTimeout(() => r(false), 10000)),
      ]);
      if (!ok) w.terminate();
      return ok ? pw : null;
    })();
  }
  return pieceWorkerP;
}

// Calls into the piece worker: one reply per call, in order.
class PieceWorkerClient {
  constructor(w) {
    this._w = w;
    this._seq = 0;
    this._calls = new Map(); // seq -> {res, rej}
    w.onmessage = (e) => {
      const m = e.data;
      const c = this._calls.get(m.seq);
      this._calls.delete(m.seq);
      if (m.error === undefined) c?.res(m.value);
      else c?.rej(new Error(m.error));
    };
    w.onerror = (e) => {
      e.preventDefault?.();
      this._dead = new Error('the piece worker stopped');
      for (const c of this._calls.values()) c.rej(this._dead);
      this._calls.clear();
    };
  }

  call(msg, transfer = []) {
    if (this._dead) return Promise.reject(this._dead);
    const seq = ++this._seq;
    return new Promise((res, rej) => {
      this._calls.set(seq, { res, rej });
      this._w.postMessage({ ...msg, seq }, transfer);
    });
  }
}

// The worker's side: files by key, each with its hash, its sync access handle (or none)
// and a queue, so one file's operations run in order.
function pieceWorkerMain() {
  const files = new Map(); // key -> {h: PieceHasher, ah, scratch, queue, dead}
  const run = async (f, m) => {
    switch (m.op) {
      case 'open':
        if (m.fh) f.ah = await m.fh.createSyncAccessHandle();
        return [null];
      case 'pieces': {
        if (f.dead) throw new Error(f.dead);
        if (m.list.length > BATCH || m.list.some((p) => p.n > PIECE)) {
          throw new Error(`more than ${BATCH} pieces of at most ${PIECE} bytes`);
        }
        const n = batchLength(m.list);
        // Written here in one write: a lone chunk as it came (a piece is one message between
        // Chromiums), else the batch joined in one buffer reused for every batch; handed
        // back: a new buffer.
        let u8;
        if (f.ah && m.list.length === 1 && m.list[0].parts.length === 1) u8 = m.list[0].parts[0];
        else {
          if (f.ah && !f.scratch) f.scratch = new Uint8Array(BATCH * PIECE);
          u8 = concat(m.list.flatMap((p) => p.parts), n, f.ah ? f.scratch : null);
        }
        const at = f.h.at;
        try {
          let o = 0;
          for (const p of m.list) {
            await f.h.add(u8.subarray(o, o + p.n), p.sha256);
            o += p.n;
          }
        } catch (e) {
          f.dead = e.message;
          throw e;
        }
        if (!f.ah) return [u8.buffer, [u8.buffer]];
        try {
          if (f.ah.write(u8, { at }) !== u8.length) throw new Error('short write');
        } catch (e) {
          f.dead = `storage: ${e.message}`;
          throw new Error(f.dead);
        }
        return [null];
      }
      case 'close':
        if (f.ah) {
          try {
            f.ah.flush();
            const size = f.ah.getSize();
            if (size !== f.h.at) throw new Error(`storage: ${size} bytes stored, ${f.h.at} received`);
          } finally {
            f.ah.close();
          }
        }
        files.delete(m.key);
        return [await f.h.finish()];
      case 'drop':
        files.delete(m.key);
        f.ah?.close();
        return [null];
      default:
        throw new Error(`unknown operation ${m.op}`);
    }
  };
  globalThis.onmessage = (e) => {
    const m = e.data;
    if (m.op === 'ping') {
      globalThis.postMessage({ seq: m.seq, value: null });
      return;
    }
    if (m.op === 'sha256') {
      (m.fh ? storedSha256(m.fh) : blobSha256(m.file)).then(
        (value) => globalThis.postMessage({ seq: m.seq, value }),
        (err) => globalThis.postMessage({ seq: m.seq, error: String(err?.message || err) }),
      );
      return;
    }
    if (m.op === 'open') {
      files.set(m.key, { h: new PieceHasher(!!m.flat), ah: null, scratch: null, queue: Promise.resolve(), dead: null });
    }
    const f = files.get(m.key);
    if (!f) {
      globalThis.postMessage({ seq: m.seq, error: 'no such file' });
      return;
    }
    f.queue = f.queue.then(() => run(f, m)).then(
      ([value, transfer]) => globalThis.postMessage({ seq: m.seq, value }, transfer || []),
      (err) => globalThis.postMessage({ seq: m.seq, error: String(err?.message || err) }),
    );
  };
}

/**
 * Where a tab stores received files. `opfs`: its own folder `tern-<random>` in the Origin
 * Private File System, held by a Web Lock of the same name for the tab's life (folders whose
 * lock nobody holds belong to closed tabs and are removed when a tab starts). `download`:
 * where OPFS has no writable streams, each file is streamed into the browser's downloads
 * through the Service Worker /tern-sw.js (as StreamSaver does). `memory`: the last resort.
 */
class ReceiveStore {
  static async open(kind, server) {
    const writable = typeof FileSystemFileHandle !== 'undefined' && 'createWritable' in FileSystemFileHandle.prototype;
    if (kind === 'opfs' && writable && navigator.storage?.getDirectory) {
      try {
        const root = await navigator.storage.getDirectory();
        const name = 'tern-' + randomId();
        if (navigator.locks) {
          await new Promise((granted) => {
            navigator.locks.request(name, () => {
              granted();
              return new Promise(() => {}); // held until the tab goes
            });
          });
          const held = new Set((await navigator.locks.query()).held.map((l) => l.name));
          for await (const [entry] of root.entries()) {
            if (entry.startsWith('tern-') && !held.has(entry)) await root.removeEntry(entry, { recursive: true }).catch(() => {});
          }
        }
        return new ReceiveStore('opfs', await root.getDirectoryHandle(name, { create: true }));
      } catch {
        /* OPFS refused (private mode, quota): try a download, else memory */
      }
    }
    // The worker must come from the page's own origin (a Service Worker cannot be
    // registered across origins).
    if ((kind === 'opfs' || kind === 'download') && navigator.serviceWorker && server === location.origin) {
      try {
        const reg = await navigator.serviceWorker.register(`${server}/tern-sw.js`, { scope: `${server}/tern-sw/` });
        const sw = reg.installing || reg.waiting || reg.active;
        if (sw.state !== 'activated') {
          await new Promise((ok, bad) => {
            sw.addEventListener('statechange', () => {
              if (sw.state === 'activated') ok();
              else if (sw.state === 'redundant') bad(new Error('service worker failed to install'));
            });
          });
        }
        return new ReceiveStore('download', null, reg);
      } catch {
        /* no service worker (blocked, insecure context): memory */
      }
    }
    return new ReceiveStore('memory');
  }

  constructor(kind, dir, reg) {
    this.kind = kind;
    this.dir = dir;
    this.reg = reg;
    this._downloads = 0;
    this._ping = null;
  }

  /**
   * Storage and piece checking for one incoming file: [sink, pieces]. With the piece worker,
   * the worker checks and hashes each piece and, in OPFS, writes it itself through a sync
   * access handle (the sink then only names the file); without it, the main thread checks
   * and hashes (`InlinePieces`) and the sink writes.
   */
  async open(key, meta) {
    const w = await pieceWorker();
    const flat = this.kind === 'download'; // the file's SHA-256 alongside: no read-back there
    if (w && this.kind === 'opfs') {
      const fh = await this.dir.getFileHandle(key, { create: true });
      const sink = {
        write: null,
        handle: fh, // for the file's own SHA-256, read back (sha256File)
        close: async () => new File([await fh.getFile()], meta.name, { type: meta.mime }),
        remove: () => this.dir.removeEntry(key).catch(() => {}),
      };
      try {
        return [sink, await WorkerPieces.open(w, key, fh, false)];
      } catch {
        await sink.remove(); // no sync access handle here: the writable stream below
      }
    }
    const sink = await this.create(key, meta);
    if (w) {
      try {
        return [sink, await WorkerPieces.open(w, key, null, flat)];
      } catch {
        /* the worker is gone: check and hash here */
      }
    }
    return [sink, new InlinePieces(flat)];
  }

  /**
   * A sink for one file (`key` unique in this tab; `meta`: {name, size, mime}):
   * write(u8) in order, close() -> File (null for a download: it is in the browser's
   * downloads), remove() (deletes what was stored; a download is failed, so the browser
   * keeps no file).
   */
  async create(key, meta) {
    if (this.kind === 'download') return this._download(meta);
    const dir = this.dir;
    if (!dir) {
      let parts = [];
      return {
        write: async (u8) => { parts.push(u8); },
        close: async () => new File(parts, meta.name, { type: meta.mime }),
        remove: async () => { parts = []; },
      };
    }
    const fh = await dir.getFileHandle(key, { create: true });
    const w = await fh.createWritable();
    let open = true;
    return {
      write: (u8) => w.write(u8),
      close: async () => {
        await w.close();
        open = false;
        const f = await fh.getFile(); // disk-backed: not read into memory
        return new File([f], meta.name, { type: meta.mime });
      },
      remove: async () => {
        if (open) {
          open = false;
          await w.abort().catch(() => {});
        }
        await dir.removeEntry(key).catch(() => {});
      },
    };
  }

  // A download fed through the Service Worker: a port per file, a hidden frame that
  // requests it; each write waits for the worker's ack (its stream under 4 MiB).
  async _download(meta) {
    const id = randomId();
    const { port1: port, port2 } = new MessageChannel();
    let seq = 0;
    const acks = new Map(); // seq -> resolve
    let cancelled = null;
    const ready = new Promise((ok) => {
      port.onmessage = (m) => {
        const x = m.data;
        if (x.type === 'ready') ok();
        else if (x.type === 'ack') {
          acks.get(x.seq)?.();
          acks.delete(x.seq);
        } else if (x.type === 'cancelled') {
          cancelled = new Error('the download was cancelled in the browser');
          for (const r of acks.values()) r();
          acks.clear();
        }
      };
    });
    this.reg.active.postMessage({ type: 'download', id, name: meta.name, size: meta.size, mime: meta.mime }, [port2]);
    await ready;
    const frame = document.createElement('iframe');
    frame.hidden = true;
    frame.src = `${this.reg.scope}dl/${id}/${encodeURIComponent(meta.name)}`;
    document.body.append(frame);
    // Messages to the worker keep it alive while the download runs (browsers stop an idle
    // worker after ~30 s, and port messages do not count).
    if (this._downloads++ === 0) this._ping = setInterval(() => this.reg.active?.postMessage({ type: 'ping' }), 10000);
    let open = true;
    const finish = () => {
      if (!open) return;
      open = false;
      if (--this._downloads === 0) clearInterval(this._ping);
      setTimeout(() => frame.remove(), 1000);
    };
    return {
      write: async (u8) => {
        if (cancelled) throw cancelled;
        const buf = u8.byteOffset === 0 && u8.byteLength === u8.buffer.byteLength ? u8.buffer : u8.slice().buffer;
        const n = ++seq;
        const acked = new Promise((r) => acks.set(n, r));
        port.postMessage({ type: 'chunk', seq: n, buf }, [buf]);
        await acked;
        if (cancelled) throw cancelled;
      },
      close: async () => {
        port.postMessage({ type: 'end' });
        finish();
        return null;
      },
      remove: async () => {
        if (open) port.postMessage({ type: 'abort', why: 'transfer failed or cancelled' });
        finish();
      },
    };
  }
}

if (typeof WorkerGlobalScope !== 'undefined' && globalThis instanceof WorkerGlobalScope && globalThis.name === PIECE_WORKER) {
  pieceWorkerMain();
}
