//! Moving a client connection to the worker that owns its RFC 6062 peer connection.
//!
//! SO_REUSEPORT hashes the client's new data connection to any worker, but the peer
//! connection it binds (ConnectionBind, §5.4) lives on the worker whose shard handed out
//! the CONNECTION-ID ([`crate::turn::conn_shard`]). The connection (deregistered socket,
//! TLS state, unconsumed input with the ConnectionBind frame, output queue, 5-tuple and
//! per-IP permit) goes through the target's inbox, and its waker makes it pick it up.
//! Happens once per data connection, never on the data path.

use std::sync::{Arc, Mutex};

use super::conns::Conn;
use super::token::Tok;
use super::Worker;
use crate::turn::Now;

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
}

impl Worker {
    /// Hands client connection `ci` to worker `target` (its ConnectionBind frame still
    /// unconsumed in the InBuf).
    pub(super) fn hand_over(&mut self, ci: usize, target: usize) {
        let Some(inbox) = self.inboxes.get(target) else {
            return;
        };
        let Some(mut c) = self.conns.get_mut(ci).and_then(Option::take) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.sock);
        self.conn_by_tuple.remove(&c.tuple);
        self.free_conns.push(ci);
        c.dirty = false;
        c.handed_over = true;
        self.stats.tcp_handovers += 1;
        tracing::debug!(client = %c.tuple.client, from = self.index, to = target, "RFC 6062 data connection handed over");
        inbox
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c);
        if let Err(e) = inbox.waker.wake() {
            tracing::warn!(error = %e, "cannot wake a TURN worker for a handed-over connection");
        }
    }

    /// Takes the connections other workers handed over and processes their buffered
    /// frames at once (the socket may have nothing new to report).
    pub(super) fn take_inbox(&mut self, now: Now) {
        let Some(inbox) = self.inboxes.get(self.index) else {
            return;
        };
        let handed = std::mem::take(&mut *inbox.conns.lock().unwrap_or_else(|p| p.into_inner()));
        for mut c in handed {
            let ci = match self.register_conn(&mut c.sock) {
                Ok(ci) => ci,
                Err(e) => {
                    tracing::debug!(error = %e, "TCP register failed for a handed-over connection");
                    continue;
                }
            };
            self.conn_by_tuple.insert(c.tuple, ci);
            self.conns[ci] = Some(c);
            if self.conn_readable(ci, now) {
                self.pending.push(Tok::Conn(ci));
            }
        }
    }
}
