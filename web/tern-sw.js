// tern-sw.js: the Service Worker behind tern.js's `download` storage, for browsers where the
// Origin Private File System has no writable streams (docs/client.md). A received file is
// streamed into the browser's own downloads as it arrives, as StreamSaver does: the page
// hands this worker a MessagePort per file, then opens /tern-sw/dl/<id>/<name> in a hidden
// frame; the worker answers that request with a stream fed from the port, so the browser's
// download manager writes the bytes to disk and neither side holds the file.
//
// Port protocol (page -> worker): {type: 'chunk', seq, buf} (buf: an ArrayBuffer,
// transferred), {type: 'end'}, {type: 'abort', why}; (worker -> page): {type: 'ready'},
// {type: 'ack', seq} once a chunk is queued and the queue is under its high-water mark (so
// the page holds at most one chunk beyond HIGH_WATER), {type: 'cancelled'} when the user
// cancelled the download. An aborted stream fails the download: the browser keeps no file.
// Registered with scope /tern-sw/ so it never controls the page itself.

const HIGH_WATER = 4 << 20; // bytes queued in the response stream before acks wait
const pending = new Map(); // id -> {stream, name, size, mime} until its request comes

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil(self.clients.claim()));

self.addEventListener('message', (e) => {
  const d = e.data;
  // {type: 'ping'} only keeps this worker alive while a download runs.
  if (!d || d.type !== 'download' || !e.ports[0]) return;
  const port = e.ports[0];
  const id = String(d.id);
  let ctl;
  let waiting = null; // seq of the chunk whose ack waits for the queue to drain
  const stream = new ReadableStream({
    start(c) {
      ctl = c;
    },
    pull() {
      if (waiting !== null) {
        port.postMessage({ type: 'ack', seq: waiting });
        waiting = null;
      }
    },
    cancel() {
      pending.delete(id);
      port.postMessage({ type: 'cancelled' });
    },
  }, { highWaterMark: HIGH_WATER, size: (c) => c.byteLength });
  port.onmessage = (m) => {
    const x = m.data;
    try {
      if (x.type === 'chunk') {
        ctl.enqueue(new Uint8Array(x.buf));
        if (ctl.desiredSize > 0) port.postMessage({ type: 'ack', seq: x.seq });
        else waiting = x.seq;
      } else if (x.type === 'end') {
        ctl.close();
        port.close();
      } else if (x.type === 'abort') {
        pending.delete(id);
        ctl.error(new Error(String(x.why || 'aborted')));
        port.close();
      }
    } catch {
      port.postMessage({ type: 'cancelled' }); // the stream is gone (download cancelled)
    }
  };
  pending.set(id, { stream, name: String(d.name || 'file'), size: Number(d.size), mime: String(d.mime || '') });
  port.postMessage({ type: 'ready' });
});

self.addEventListener('fetch', (e) => {
  const u = new URL(e.request.url);
  const m = /^\/tern-sw\/dl\/([0-9a-f]+)\//.exec(u.pathname);
  if (!m) return;
  const p = pending.get(m[1]);
  if (!p) {
    e.respondWith(new Response('no such download', { status: 404 }));
    return;
  }
  pending.delete(m[1]);
  const headers = {
    'content-type': 'application/octet-stream',
    // RFC 6266 §4.3: the UTF-8 name, percent-encoded; the plain one for old agents.
    'content-disposition': `attachment; filename="${p.name.replace(/[^\x20-\x7e]|["\\]/g, '_')}"; ` +
      `filename*=UTF-8''${encodeURIComponent(p.name)}`,
    'x-content-type-options': 'nosniff',
  };
  if (Number.isSafeInteger(p.size)) headers['content-length'] = String(p.size);
  e.respondWith(new Response(p.stream, { headers }));
});
