// tern.js: the client library for a Tern server (an ES module, no dependencies).
//
//   import { Tern } from '/tern.js';
//   const tern = await Tern.connect();                 // signaling on /ws, ICE from /api/ice
//   tern.addEventListener('peers', () => console.log(tern.peers()));
//   const ch = await tern.open(peerId);                // direct -> TURN -> WebSocket relay
//   ch.addEventListener('message', (e) => console.log(e.data));
//   await ch.send('hello');                            // resolves when under the high-water mark
//   console.log(ch.path);                              // direct | turn-udp | turn-tcp | turn-tls | ws-relay
//
// Paths: WebRTC with the server's ICE list (host/srflx first, TURN relay candidates as ICE
// picks them); if the data channel is not open after `relayAfterMs` (8 s) or ICE fails, the
// WebSocket relay (/relay), end-to-end encrypted with AES-GCM under an ECDH P-256 key agreed
// over signaling, so the server cannot read it. Debug switch: `?path=turn` (ICE relay only)
// or `?path=ws` (WebSocket relay at once) in the page URL, or the `path` option.

const HIGH_WATER = 1 << 20; // queued bytes above which send() waits
const LOW_WATER = 256 << 10; // bufferedAmountLowThreshold
const WS_CHUNK = 64 << 10; // payload per relay frame (well under relay_ws.max_frame_bytes)
const HEARTBEAT_MS = 2000;
const DEAD_AFTER_MS = 12000;

// Frame kinds (first byte of every frame on a channel).
const K_BIN = 0; // binary fragment, more follow
const K_BIN_END = 1; // last fragment of a binary message
const K_TXT = 2; // text fragment, more follow
const K_TXT_END = 3; // last fragment of a text message
const K_PING = 4;
const K_PONG = 5;
const K_HELLO = 6; // first frame over the WebSocket relay: proves both sides hold the key

const enc = new TextEncoder();
const dec = new TextDecoder();

function randomId() {
  const b = crypto.getRandomValues(new Uint8Array(8));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
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

/**
 * A connection to Tern's signaling service (docs/signaling.md §2).
 * Events: `welcome`, `peers` (room membership or peer info changed), `channel` (a peer
 * opened a channel to us: `e.channel`), `close` (signaling lost).
 */
export class Tern extends EventTarget {
  /**
   * Options: `server` (http(s) origin, default this page's), `path` (null | 'turn' | 'ws',
   * default from the page URL), `relayAfterMs` (8000), `device` (default from the UA).
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
    this.relayAfterMs = opts.relayAfterMs ?? 8000;
    this.device = opts.device || deviceType();
    this.id = null;
    this.name = null;
    this.rooms = new Map(); // room -> Map(id -> {id, name})
    this.info = new Map(); // peer id -> {device}
    this.channels = new Map(); // peer id -> Channel (the current one)
    this._ws = null;
  }

  _open() {
    const url = this.server.replace(/^http/, 'ws') + '/ws';
    const ws = new WebSocket(url);
    this._ws = ws;
    return new Promise((resolve, reject) => {
      ws.onerror = () => reject(new Error('signaling connection failed'));
      ws.onclose = () => {
        reject(new Error('signaling closed'));
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
          this.name = m.name;
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
    if (this._ws && this._ws.readyState === WebSocket.OPEN) this._ws.send(JSON.stringify(m));
  }

  /** Signals `data` to peer `to` (opaque to the server). */
  signal(to, data) {
    this._send({ type: 'signal', to, data });
  }

  /** Joins a named room (a share link carries its name). */
  join(room) {
    this._send({ type: 'join', room });
  }

  leave(room) {
    this._send({ type: 'leave', room });
  }

  /** Members of `room` (default: every room), each {id, name, device, rooms}. */
  peers(room) {
    const out = new Map();
    for (const [r, members] of this.rooms) {
      if (room && r !== room) continue;
      for (const p of members.values()) {
        const cur = out.get(p.id) || { id: p.id, name: p.name, device: this.info.get(p.id)?.device || '', rooms: [] };
        cur.rooms.push(r);
        out.set(p.id, cur);
      }
    }
    return [...out.values()];
  }

  _hello(to, reply) {
    this.signal(to, { kind: 'hello', device: this.device, reply });
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
        if (m.to) this.channels.get(m.to)?._fail(`signaling: ${m.code}`);
        break;
      default:
        break;
    }
  }

  _onSignal(from, d) {
    if (!d || typeof d !== 'object') return;
    if (d.kind === 'hello') {
      this.info.set(from, { device: String(d.device || '').slice(0, 16) });
      if (!d.reply) this._hello(from, true);
      this.dispatchEvent(new Event('peers'));
      return;
    }
    if (d.kind === 'open') {
      const old = this.channels.get(from);
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

  /** Opens a reliable channel to `peerId`; resolves once it carries data. */
  async open(peerId) {
    const old = this.channels.get(peerId);
    if (old) old._fail('replaced by a new channel');
    const ch = new Channel(this, peerId, randomId(), true);
    this.channels.set(peerId, ch);
    ch._start().catch((e) => ch._fail(e.message));
    await ch.ready;
    return ch;
  }

  close() {
    clearInterval(this._pinger);
    for (const ch of this.channels.values()) ch.close();
    this._ws?.close();
  }
}

/**
 * A reliable, ordered message channel to one peer. `send(string | ArrayBuffer | view)`
 * resolves when the data is queued under the high-water mark (await it for backpressure).
 * Events: `open`, `path` (path changed), `message` (`e.data`: string or ArrayBuffer),
 * `close` (`e.reason`; set when the path died or the peer left).
 */
export class Channel extends EventTarget {
  constructor(tern, peer, cid, initiator) {
    super();
    this.tern = tern;
    this.peer = peer;
    this.cid = cid;
    this.initiator = initiator;
    this.path = null;
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
    this._keys = null; // { pair, remote, aes }
    this._sendCtr = 0n;
    this._recvCtr = 0n;
    this._sendChain = Promise.resolve();
    this._recvChain = Promise.resolve();
    this._frag = [];
    this._lastHeard = Date.now();
    this._timer = null;
    this._beat = null;
    this._pendingIce = [];
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

  // Initiator: offer the key, then try WebRTC (unless forced to the relay).
  async _start() {
    const pub = await this._keyPair();
    this._signal({ kind: 'open', pub, path: this.tern.forcePath });
    if (this.tern.forcePath === 'ws') return; // wait for 'accept', then request the relay
    await this._startRtc(true);
    this._timer = setTimeout(() => this._fallback('ICE did not connect in time'), this.tern.relayAfterMs);
  }

  // Acceptor: answer with our key; WebRTC offers arrive by signal.
  async _accept(d) {
    const pub = await this._keyPair();
    await this._deriveKey(d.pub);
    this._forced = d.path === 'ws' || d.path === 'turn' ? d.path : null;
    this._signal({ kind: 'accept', pub });
  }

  async _startRtc(offerer) {
    const cfg = await this.tern.iceConfig();
    const forced = this.tern.forcePath || this._forced;
    if (forced === 'turn') cfg.iceTransportPolicy = 'relay';
    const pc = new RTCPeerConnection(cfg);
    this._pc = pc;
    pc.onicecandidate = (e) => {
      if (e.candidate) this._signal({ kind: 'ice', candidate: e.candidate.toJSON() });
    };
    pc.oniceconnectionstatechange = () => {
      if (pc !== this._pc) return;
      if (pc.iceConnectionState === 'failed') {
        if (this.state === 'connecting' && this.initiator) this._fallback('ICE failed');
        else if (this.state === 'open' && this.path !== 'ws-relay') this._fail('ICE failed');
      }
    };
    if (offerer) {
      this._useDc(pc.createDataChannel('tern', { ordered: true }));
      await pc.setLocalDescription(await pc.createOffer());
      this._signal({ kind: 'sdp', sdp: pc.localDescription.toJSON() });
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
      // Chunks from the negotiated SCTP max message size, capped at 64 KiB (larger
      // messages block the SCTP stream longer and help nothing).
      this.chunkSize = Math.max(1024, Math.min(max, 64 << 10) - 1);
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
        if (!this._pc) await this._startRtc(false);
        const pc = this._pc;
        await pc.setRemoteDescription(d.sdp);
        for (const c of this._pendingIce.splice(0)) await pc.addIceCandidate(c).catch(() => {});
        if (d.sdp.type === 'offer') {
          await pc.setLocalDescription(await pc.createAnswer());
          this._signal({ kind: 'sdp', sdp: pc.localDescription.toJSON() });
        }
        break;
      }
      case 'ice':
        if (this._pc?.remoteDescription) await this._pc.addIceCandidate(d.candidate).catch(() => {});
        else this._pendingIce.push(d.candidate);
        break;
      case 'fallback':
        this._dropRtc();
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
    pc?.close();
  }

  // Initiator: give up on ICE; both sides move to the WebSocket relay.
  _fallback(why) {
    if (this.state !== 'connecting' || this._fellBack) return;
    this._fellBack = true;
    this.fallbackReason = why;
    this._dropRtc();
    this._signal({ kind: 'fallback', why });
    this.tern._send({ type: 'relay', to: this.peer });
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
    this._lastHeard = Date.now();
    this._beat = setInterval(() => {
      if (Date.now() - this._lastHeard > DEAD_AFTER_MS) this._fail('heartbeat lost');
      else this._sendFrame(K_PING, new Uint8Array(0)).catch(() => {});
    }, HEARTBEAT_MS);
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

  // Frames go out in order through one promise chain (encryption is async).
  _sendFrame(kind, body) {
    const frame = new Uint8Array(body.length + 1);
    frame[0] = kind;
    frame.set(body, 1);
    const p = this._sendChain.then(() => this._sendNow(frame));
    this._sendChain = p.catch(() => {});
    return p;
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
    if (dc.bufferedAmount > HIGH_WATER) {
      await new Promise((resolve) => {
        const done = () => {
          dc.removeEventListener('bufferedamountlow', done);
          dc.removeEventListener('close', done);
          resolve();
        };
        dc.addEventListener('bufferedamountlow', done);
        dc.addEventListener('close', done);
      });
    }
  }

  _fail(reason) {
    if (this.state === 'closed') return;
    const wasOpen = this.state === 'open';
    this.state = 'closed';
    this.closeReason = reason;
    clearTimeout(this._timer);
    clearInterval(this._beat);
    this._dropRtc();
    this._ws?.close();
    this._ws = null;
    if (this.tern.channels.get(this.peer) === this) this.tern.channels.delete(this.peer);
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
