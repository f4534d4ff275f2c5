//! A small TURN client for driving the workers with the real core (RFC 8656, RFC 6062):
//! long-term credentials of one static user, over UDP or a TCP/TLS byte stream. Setup and
//! control messages only; relay loops send prebuilt buffers. Written against the crate's
//! public API (`crate::config`, `crate::stun`, `crate::turn`) so that `tests/net_hot_path.rs`
//! uses this same file.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::config::{Config, StaticUser};
use crate::stun::{attr, class, message_type, method, MessageWriter, HEADER_LEN, MAGIC_COOKIE};
use crate::turn::auth::Key;

pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
pub const REALM: &str = "tern-test";
/// REQUESTED-TRANSPORT values (RFC 8656 §18.11, RFC 6062 §6.1).
pub const UDP: u8 = 17;
pub const TCP: u8 = 6;

/// A one-worker configuration on 127.0.0.1 (port 0) whose relays bind 127.0.0.1 and may
/// reach loopback peers, with [`USER`] as its one user.
pub fn config(workers: usize) -> Config {
    let mut cfg = Config::default();
    let t = &mut cfg.turn;
    t.listen = vec!["127.0.0.1:0".parse().unwrap()];
    t.relay_ip = vec!["127.0.0.1".parse().unwrap()];
    t.allowed_peer_ranges = vec!["127.0.0.0/8".parse().unwrap()];
    t.realm = REALM.into();
    t.users = vec![StaticUser {
        name: USER.into(),
        password: Some(PASSWORD.into()),
        key: None,
    }];
    t.workers = workers;
    t.socket_buffer_bytes = 1 << 16;
    // Tests send unauthenticated requests on purpose (forged ConnectionBinds, first tries).
    t.unauth_rate_per_sec = 1000;
    t.unauth_burst = 1000;
    cfg
}

/// How a client reaches the server: datagrams, or a STUN-framed byte stream.
pub enum Wire<S> {
    Udp(UdpSocket, SocketAddr),
    Stream(S),
}

impl<S: Read + Write> Wire<S> {
    pub fn send(&mut self, m: &[u8]) {
        match self {
            Wire::Udp(s, to) => {
                s.send_to(m, *to).unwrap();
            }
            Wire::Stream(s) => s.write_all(m).unwrap(),
        }
    }

    /// The next STUN message (a datagram, or one framed message of the stream).
    pub fn recv(&mut self) -> Vec<u8> {
        match self {
            Wire::Udp(s, _) => {
                let mut b = vec![0u8; 2048];
                let n = s.recv(&mut b).unwrap();
                b.truncate(n);
                b
            }
            Wire::Stream(s) => read_msg(s),
        }
    }
}

/// One STUN message from a byte stream.
pub fn read_msg(s: &mut impl Read) -> Vec<u8> {
    let mut m = vec![0u8; HEADER_LEN];
    s.read_exact(&mut m).unwrap();
    let len = u16::from_be_bytes([m[2], m[3]]) as usize;
    m.resize(HEADER_LEN + len, 0);
    s.read_exact(&mut m[HEADER_LEN..]).unwrap();
    m
}

/// A connected TCP stream that gives up reading after 10 s.
pub fn tcp(server: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(server).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// A UDP socket on 127.0.0.1 that gives up reading after 10 s.
pub fn udp_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The message type of `m`.
pub fn type_of(m: &[u8]) -> u16 {
    u16::from_be_bytes([m[0], m[1]])
}

/// 0 for a success response, else its ERROR-CODE (RFC 8489 §14.8).
pub fn code(m: &[u8]) -> u16 {
    if type_of(m) & 0x0110 != class::ERROR {
        return 0;
    }
    let v = crate::stun::find_attr(m, attr::ERROR_CODE).expect("ERROR-CODE");
    u16::from(v[2] & 7) * 100 + u16::from(v[3])
}

/// An XOR-*-ADDRESS attribute of `m` (RFC 8489 §14.2).
pub fn xor_addr(m: &[u8], ty: u16) -> Option<SocketAddr> {
    let v = crate::stun::find_attr(m, ty)?;
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    let mut key = MAGIC_COOKIE.to_be_bytes().to_vec();
    key.extend_from_slice(&m[8..20]);
    let b: Vec<u8> = v[4..].iter().zip(&key).map(|(a, k)| a ^ k).collect();
    let ip: IpAddr = match v[1] {
        1 => <[u8; 4]>::try_from(&b[..]).ok()?.into(),
        _ => <[u8; 16]>::try_from(&b[..]).ok()?.into(),
    };
    Some(SocketAddr::new(ip, port))
}

/// CONNECTION-ID of `m` (RFC 6062 §6.2.1).
pub fn conn_id(m: &[u8]) -> u32 {
    let v = crate::stun::find_attr(m, attr::CONNECTION_ID).expect("CONNECTION-ID");
    u32::from_be_bytes(v.try_into().unwrap())
}

/// A STUN message of `ty` with `attrs` (and XOR-PEER-ADDRESS `peer`), signed with the
/// user's key when `nonce` is given.
pub fn message(
    ty: u16,
    attrs: &[(u16, &[u8])],
    peer: Option<SocketAddr>,
    nonce: Option<&[u8]>,
) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let txid: [u8; 12] = rand::random();
    let mut w = MessageWriter::new(&mut buf, ty, txid).unwrap();
    for (t, v) in attrs {
        w.attr(*t, v).unwrap();
    }
    if let Some(p) = peer {
        w.xor_addr(attr::XOR_PEER_ADDRESS, p).unwrap();
    }
    if let Some(nonce) = nonce {
        w.attr(attr::USERNAME, USER.as_bytes()).unwrap();
        w.attr(attr::REALM, REALM.as_bytes()).unwrap();
        w.attr(attr::NONCE, nonce).unwrap();
        w.integrity_sha1(Key::md5(USER, REALM, PASSWORD).as_bytes())
            .unwrap();
    }
    let n = w.finish_with_fingerprint().unwrap();
    buf.truncate(n);
    buf
}

/// A client of [`USER`]: its wire and the server's latest nonce.
pub struct Client<S = TcpStream> {
    pub wire: Wire<S>,
    pub nonce: Vec<u8>,
}

impl Client<TcpStream> {
    /// A client over UDP from a fresh socket on 127.0.0.1.
    pub fn udp(server: SocketAddr) -> Client {
        Client::new(Wire::Udp(udp_socket(), server))
    }

    /// A client over a new TCP connection.
    pub fn tcp(server: SocketAddr) -> Client {
        Client::new(Wire::Stream(tcp(server)))
    }
}

impl<S: Read + Write> Client<S> {
    pub fn new(wire: Wire<S>) -> Client<S> {
        Client {
            wire,
            nonce: Vec::new(),
        }
    }

    /// The UDP socket of a UDP client.
    pub fn sock(&self) -> &UdpSocket {
        match &self.wire {
            Wire::Udp(s, _) => s,
            Wire::Stream(_) => panic!("not a UDP client"),
        }
    }

    /// The stream of a TCP/TLS client.
    pub fn stream(&mut self) -> &mut S {
        match &mut self.wire {
            Wire::Stream(s) => s,
            Wire::Udp(..) => panic!("not a stream client"),
        }
    }

    /// `msg` signed with the current nonce.
    pub fn signed(&self, m: u16, attrs: &[(u16, &[u8])], peer: Option<SocketAddr>) -> Vec<u8> {
        message(
            message_type(m, class::REQUEST),
            attrs,
            peer,
            Some(self.nonce.as_slice()),
        )
    }

    /// An authenticated request; the final answer (after taking a nonce from a 401 or 438).
    pub fn request(&mut self, m: u16, attrs: &[(u16, &[u8])], peer: Option<SocketAddr>) -> Vec<u8> {
        for _ in 0..3 {
            let req = if self.nonce.is_empty() {
                message(message_type(m, class::REQUEST), attrs, peer, None)
            } else {
                self.signed(m, attrs, peer)
            };
            self.wire.send(&req);
            let resp = self.wire.recv();
            assert_eq!(resp[8..20], req[8..20], "answer to this request");
            if matches!(code(&resp), 401 | 438) {
                if let Some(n) = crate::stun::find_attr(&resp, attr::NONCE) {
                    self.nonce = n.to_vec();
                    continue;
                }
            }
            return resp;
        }
        panic!("no nonce accepted");
    }

    /// Allocates a relay of `transport` ([`UDP`] or [`TCP`]); its relayed address.
    pub fn allocate(&mut self, transport: u8) -> SocketAddr {
        let r = self.request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, &[transport, 0, 0, 0])],
            None,
        );
        assert_eq!(code(&r), 0, "Allocate");
        xor_addr(&r, attr::XOR_RELAYED_ADDRESS).expect("XOR-RELAYED-ADDRESS")
    }

    /// Binds `channel` to `peer` (RFC 8656 §11), which also permits it.
    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) {
        let b = channel.to_be_bytes();
        let r = self.request(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, &[b[0], b[1], 0, 0])],
            Some(peer),
        );
        assert_eq!(code(&r), 0, "ChannelBind");
    }

    /// Permits peers at `peer`'s IP address (RFC 8656 §9).
    pub fn create_permission(&mut self, peer: SocketAddr) {
        let r = self.request(method::CREATE_PERMISSION, &[], Some(peer));
        assert_eq!(code(&r), 0, "CreatePermission");
    }
}

/// ChannelData `channel` carrying `payload`, padded to 4 bytes when `pad` (RFC 8656 §12.5).
pub fn channel_data(channel: u16, payload: &[u8], pad: bool) -> Vec<u8> {
    let mut m = channel.to_be_bytes().to_vec();
    m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    m.extend_from_slice(payload);
    while pad && m.len() % 4 != 0 {
        m.push(0);
    }
    m
}
