//! The relay sockets of one worker's allocations (opened and closed by its shard through
//! [`RelayIo`]) and the batch that sends client→peer datagrams out of them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};

use mio::net::UdpSocket;
use mio::{Interest, Registry};

use super::{token, INDEX_MASK, K_RELAY};
use crate::net::mmsg::SendBatch;
use crate::net::socket;
use crate::net::stats::NetStats;
use crate::turn::{RelayId, RelayIo, RelayUsage, Transport};

/// A relay socket and what it carried (plain integers: only this worker writes them).
pub(super) struct RelaySock {
    sock: UdpSocket,
    usage: RelayUsage,
}

/// The relay sockets of this worker's allocations; the shard opens and closes them.
pub struct Relays {
    pub(super) registry: Registry,
    pub(super) socks: Vec<Option<RelaySock>>,
    pub(super) free: Vec<u32>,
    pub(super) buffer_bytes: usize,
}

impl Relays {
    pub(super) fn fd(&self, id: RelayId) -> Option<RawFd> {
        self.socks
            .get(id.0 as usize)
            .and_then(|s| s.as_ref())
            .map(|s| s.sock.as_raw_fd())
    }

    /// The socket to send `len` payload bytes to a peer from, counting them for the
    /// allocation's log line.
    pub(super) fn peer_send_fd(&mut self, id: RelayId, len: usize) -> Option<RawFd> {
        let s = self.socks.get_mut(id.0 as usize)?.as_mut()?;
        s.usage.to_peer_bytes += len as u64;
        s.usage.to_peer_packets += 1;
        Some(s.sock.as_raw_fd())
    }

    /// Counts payload relayed from peers to the client of relay `id`.
    pub(super) fn count_to_client(&mut self, id: RelayId, bytes: u64, packets: u64) {
        if let Some(s) = self.socks.get_mut(id.0 as usize).and_then(Option::as_mut) {
            s.usage.to_client_bytes += bytes;
            s.usage.to_client_packets += packets;
        }
    }
}

impl RelayIo for Relays {
    fn open_relay(&mut self, addr: SocketAddr) -> io::Result<RelayId> {
        let mut sock = UdpSocket::from_std(socket::relay_socket(addr, self.buffer_bytes)?);
        let idx = match self.free.pop() {
            Some(i) => i as usize,
            None => {
                if self.socks.len() > INDEX_MASK {
                    return Err(io::Error::other("too many relay sockets in one worker"));
                }
                self.socks.push(None);
                self.socks.len() - 1
            }
        };
        if let Err(e) = self
            .registry
            .register(&mut sock, token(K_RELAY, idx), Interest::READABLE)
        {
            self.free.push(idx as u32);
            return Err(e);
        }
        self.socks[idx] = Some(RelaySock {
            sock,
            usage: RelayUsage::default(),
        });
        Ok(RelayId(idx as u32))
    }

    fn close_relay(&mut self, relay: RelayId) {
        let idx = relay.0 as usize;
        if let Some(mut s) = self.socks.get_mut(idx).and_then(Option::take) {
            let _ = self.registry.deregister(&mut s.sock);
            self.free.push(relay.0);
        }
    }

    fn usage(&self, relay: RelayId) -> RelayUsage {
        self.socks
            .get(relay.0 as usize)
            .and_then(Option::as_ref)
            .map(|s| s.usage)
            .unwrap_or_default()
    }
}

/// Client→peer datagrams for one relay socket at a time, sent with one sendmmsg.
pub(super) struct PeerBatch {
    pub(super) batch: SendBatch,
    pub(super) fd: RawFd,
    pub(super) transport: Transport,
}

impl PeerBatch {
    /// Queues `data` to `peer` from relay socket `fd`, flushing first if the batch holds
    /// another socket's datagrams or is full.
    ///
    /// # Safety
    /// `data` must stay valid until the next [`Self::flush`].
    pub(super) unsafe fn push(
        &mut self,
        fd: RawFd,
        transport: Transport,
        data: &[u8],
        peer: SocketAddr,
        stats: &mut NetStats,
    ) {
        if !self.batch.is_empty() && (self.fd != fd || self.transport != transport) {
            self.flush(stats);
        }
        if self.batch.is_full() {
            self.flush(stats);
        }
        self.fd = fd;
        self.transport = transport;
        self.batch.push(data, peer, None);
    }

    pub(super) fn flush(&mut self, stats: &mut NetStats) {
        if self.batch.is_empty() {
            return;
        }
        let f = self.batch.flush(self.fd);
        let (packets, bytes) = match self.transport {
            Transport::Udp => (
                &mut stats.client_to_peer_udp_packets,
                &mut stats.client_to_peer_udp_bytes,
            ),
            Transport::Tcp => (
                &mut stats.client_to_peer_tcp_packets,
                &mut stats.client_to_peer_tcp_bytes,
            ),
            Transport::Tls => (
                &mut stats.client_to_peer_tls_packets,
                &mut stats.client_to_peer_tls_bytes,
            ),
        };
        *packets += f.sent as u64;
        *bytes += f.sent_bytes as u64;
        stats.drop_send_error += f.failed as u64;
    }
}
