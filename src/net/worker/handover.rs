//! Moving a client connection to the worker that owns its RFC 6062 peer connection.
//!
//! SO_REUSEPORT hashes the client's new data connection to any worker, but the peer
//! connection it binds (ConnectionBind, §5.4) lives on the worker whose shard handed out
//! the CONNECTION-ID ([`crate::turn::conn_shard`]). The connection (deregistered socket,
//! TLS state, unconsumed input with the ConnectionBind frame, output queue, 5-tuple and
//! per-IP permit) goes through the target's inbox, and its waker makes it pick it up.
//! Happens once per data connection, never on the data path.

use std::sync::{Arc, Mutex};

use mio::Interest;

use super::tcp_conns::Conn;
use super::{token, Worker, K_CONN};
use crate::net::shard::Shard;
use crate::stun::{attr, class, message_type, method, HEADER_LEN, MAGIC_COOKIE};
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

/// The CONNECTION-ID of a ConnectionBind request (RFC 6062 §6.2.1), if `frame` is one.
/// Only locates the attribute: the owning shard's core checks everything else.
pub(super) fn connection_bind_id(frame: &[u8]) -> Option<u32> {
    if frame.len() < HEADER_LEN
        || u16::from_be_bytes([frame[0], frame[1]])
            != message_type(method::CONNECTION_BIND, class::REQUEST)
        || u32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]) != MAGIC_COOKIE
    {
        return None;
    }
    let mut rest = &frame[HEADER_LEN..];
    while rest.len() >= 4 {
        let ty = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let value = rest.get(4..4 + len)?;
        if ty == attr::CONNECTION_ID {
            return Some(u32::from_be_bytes(value.try_into().ok()?));
        }
        rest = rest.get(4 + len.next_multiple_of(4)..)?;
    }
    None
}

impl<S: Shard> Worker<S> {
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
            let ci = match self.free_conns.pop() {
                Some(i) => i,
                None => {
                    self.conns.push(None);
                    self.conns.len() - 1
                }
            };
            if let Err(e) = self.poll.registry().register(
                &mut c.sock,
                token(K_CONN, ci),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::debug!(error = %e, "TCP register failed for a handed-over connection");
                self.free_conns.push(ci);
                continue;
            }
            self.conn_by_tuple.insert(c.tuple, ci);
            self.conns[ci] = Some(c);
            if self.conn_readable(ci, now) {
                self.pending.push(token(K_CONN, ci));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_request(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = message_type(method::CONNECTION_BIND, class::REQUEST)
            .to_be_bytes()
            .to_vec();
        m.extend_from_slice(&[0, 0]);
        m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        m.extend_from_slice(&[7; 12]);
        for (ty, v) in attrs {
            m.extend_from_slice(&ty.to_be_bytes());
            m.extend_from_slice(&(v.len() as u16).to_be_bytes());
            m.extend_from_slice(v);
            while m.len() % 4 != 0 {
                m.push(0);
            }
        }
        let len = (m.len() - HEADER_LEN) as u16;
        m[2..4].copy_from_slice(&len.to_be_bytes());
        m
    }

    #[test]
    fn finds_the_connection_id_after_other_attributes() {
        let m = bind_request(&[
            (attr::USERNAME, b"alice"),
            (attr::CONNECTION_ID, &0x0100_0007u32.to_be_bytes()),
        ]);
        assert_eq!(connection_bind_id(&m), Some(0x0100_0007));
    }

    #[test]
    fn ignores_other_methods_and_malformed_attributes() {
        let mut m = bind_request(&[(attr::CONNECTION_ID, &[0, 0, 0, 1])]);
        assert_eq!(connection_bind_id(&m), Some(1));
        m[1] = 0x0A; // Connect, not ConnectionBind
        assert_eq!(connection_bind_id(&m), None);
        let short = bind_request(&[(attr::CONNECTION_ID, &[0, 1])]);
        assert_eq!(connection_bind_id(&short), None);
        let mut truncated = bind_request(&[(attr::USERNAME, b"bob")]);
        truncated[HEADER_LEN + 3] = 200; // attribute longer than the message
        assert_eq!(connection_bind_id(&truncated), None);
        assert_eq!(connection_bind_id(&[0u8; 8]), None);
    }
}
