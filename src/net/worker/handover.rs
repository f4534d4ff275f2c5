//! Moving a client connection to the worker that owns its RFC 6062 peer connection.
//!
//! SO_REUSEPORT hashes the client's new data connection to any worker, but the peer
//! connection it binds (ConnectionBind, §5.4) lives on the worker whose shard handed out
//! the CONNECTION-ID ([`crate::turn::conn_shard`]). The connection (deregistered socket,
//! TLS state, unconsumed input with the ConnectionBind frame, output queue, 5-tuple and
//! per-IP permit) goes through the target's inbox, and its waker makes it pick it up.
//! Happens once per data connection, never on the data path.
//!
//! Owns: one worker's inbox (shared with the others, the only cross-worker state here).
//! Must not: look inside the connection beyond marking it moved.

use std::sync::{Arc, Mutex};

use super::conns::Conn;

/// A worker's inbox of connections handed over by other workers.
pub struct Inbox {
    conns: Mutex<Vec<Conn>>,
    waker: Arc<mio::Waker>,
}

impl Inbox {
    pub fn new(waker: Arc<mio::Waker>) -> Inbox {
        Inbox {
            conns: Mutex::new(Vec::new()),
            waker,
        }
    }

    /// Hands connection `c` (taken from the sending worker's table, its ConnectionBind
    /// frame still unconsumed in the InBuf) to this inbox's worker, and wakes it.
    pub(super) fn hand_over(&self, mut c: Conn) {
        c.hand_over();
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).push(c);
        if let Err(e) = self.waker.wake() {
            tracing::warn!(error = %e, "cannot wake a TURN worker for a handed-over connection");
        }
    }

    /// The connections other workers handed over since the last call.
    pub(super) fn take(&self) -> Vec<Conn> {
        std::mem::take(&mut *self.conns.lock().unwrap_or_else(|p| p.into_inner()))
    }
}
