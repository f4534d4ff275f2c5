//! Self-probe: a STUN Binding request (RFC 8489 §3, §6) sent over loopback to the daemon's
//! own UDP listener. An answer proves a worker loop is reading, parsing and writing; the
//! watchdog is fed only when it comes.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::stun::{class, message_type, method, MessageWriter, HEADER_LEN, MAGIC_COOKIE};

const BINDING_REQUEST: u16 = message_type(method::BINDING, class::REQUEST);
const BINDING_SUCCESS: u16 = message_type(method::BINDING, class::SUCCESS);
const BINDING_ERROR: u16 = message_type(method::BINDING, class::ERROR);

/// Why a probe got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no STUN answer from {0} in time")]
    Timeout(SocketAddr),
    #[error("probe socket: {0}")]
    Io(#[from] io::Error),
}

/// Where to probe a listener bound to `addr`: the loopback address of the same family when
/// it is bound to the unspecified address, else the address itself.
pub fn target_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// A Binding request with a fresh transaction id (RFC 8489 §5: 20-byte header, no attributes).
fn binding_request() -> ([u8; HEADER_LEN], [u8; 12]) {
    let txid: [u8; 12] = rand::random();
    let mut msg = [0u8; HEADER_LEN];
    MessageWriter::new(&mut msg, BINDING_REQUEST, txid).expect("a header fits");
    (msg, txid)
}

/// True for a Binding success or error response (either way a loop answered) to `txid`.
fn is_answer(buf: &[u8], txid: &[u8; 12]) -> bool {
    if buf.len() < 20 {
        return false;
    }
    let kind = u16::from_be_bytes([buf[0], buf[1]]);
    let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    (kind == BINDING_SUCCESS || kind == BINDING_ERROR)
        && cookie == MAGIC_COOKIE
        && &buf[8..20] == txid
}

/// Sends one Binding request to `target` from a fresh ephemeral socket (so successive probes
/// hash to different SO_REUSEPORT workers) and waits up to `timeout` for its answer.
pub fn stun_binding(target: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(target)?;
    let (msg, txid) = binding_request();
    sock.send(&msg)?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProbeError::Timeout(target));
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv(&mut buf) {
            Ok(n) if is_answer(&buf[..n], &txid) => return Ok(()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ProbeError::Timeout(target))
            }
            // ECONNREFUSED from an earlier ICMP: nothing listens there.
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_listeners_are_probed_on_loopback() {
        assert_eq!(
            target_for("0.0.0.0:3478".parse().unwrap()),
            "127.0.0.1:3478".parse().unwrap()
        );
        assert_eq!(
            target_for("[::]:3478".parse().unwrap()),
            "[::1]:3478".parse().unwrap()
        );
        let a: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        assert_eq!(target_for(a), a);
    }

    /// A fake server that answers only the right transaction id: the probe must ignore
    /// stray datagrams and accept the matching answer.
    #[test]
    fn probe_accepts_only_its_own_answer() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let (n, from) = server.recv_from(&mut buf).unwrap();
            assert_eq!(n, 20);
            let mut stray = [0u8; 20];
            stray[0..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
            stray[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            server.send_to(&stray, from).unwrap();
            let mut answer = buf;
            answer[0..2].copy_from_slice(&BINDING_SUCCESS.to_be_bytes());
            server.send_to(&answer[..20], from).unwrap();
        });
        stun_binding(addr, Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn silent_listener_times_out() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = stun_binding(server.local_addr().unwrap(), Duration::from_millis(200));
        assert!(matches!(err, Err(ProbeError::Timeout(_))), "{err:?}");
    }
}
