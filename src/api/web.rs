//! The built-in web page (`/`) and the client library (`/tern.js`), embedded in the binary
//! at build time from `web/` so `cargo build` alone yields a daemon that serves them.
//!
//! Owns only static responses: no state, no templating, nothing read from disk at runtime.

use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};

/// One embedded asset: its URL path, media type and bytes.
pub(super) struct Asset {
    pub path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// Every file the page needs. `/` is `index.html`.
pub(super) const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../web/index.html"),
    },
    Asset {
        path: "/tern.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/tern.js"),
    },
    Asset {
        // tern.js's `download` storage: streams a received file into the browser's
        // downloads where OPFS has no writable streams (scope /tern-sw/, never the page).
        path: "/tern-sw.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/tern-sw.js"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../web/app.js"),
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../web/style.css"),
    },
];

/// The response for `asset`: no-cache (revalidate after an upgrade), nosniff, and a CSP
/// that allows only this origin's scripts (and workers) and WebSocket/fetch back to it.
/// `'wasm-unsafe-eval'` lets tern.js compile its own WebAssembly SHA-256 (embedded in
/// tern.js, built from web/wasm/sha256.wat); it allows WebAssembly compilation only, not
/// JS `eval` or `new Function` (docs/client.md).
pub(super) fn serve(asset: &'static Asset) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; \
                     connect-src 'self' ws: wss:; img-src 'self' blob: data:; \
                     object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
                ),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        asset.body,
    )
        .into_response()
}
