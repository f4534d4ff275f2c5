//! TURN control messages for the load generator (RFC 8656): Allocate with long-term
//! credentials (RFC 8489 §9.2, TURN REST usernames), ChannelBind, and Refresh with lifetime 0.
//! Built and parsed with stun-types/turn-types; blocking, with retransmission.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, Mac};
use stun_types::attribute::{ErrorCode, Nonce, Realm, Username};
use stun_types::message::{
    IntegrityAlgorithm, LongTermKeyCredentials, Message, MessageClass, MessageIntegrityCredentials,
    MessageWrite, MessageWriteExt, MessageWriteVec, Method,
};
use turn_types::attribute::{
    ChannelNumber, Lifetime, RequestedTransport, XorPeerAddress, XorRelayedAddress,
};
use turn_types::message::{ALLOCATE, CHANNEL_BIND, REFRESH};

/// TURN REST API password: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &str, username: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The realm and nonce last handed out by the server, reused until it says they are stale.
#[derive(Clone, Default)]
pub struct Challenge {
    pub realm: String,
    pub nonce: String,
}

/// One client's control session with the server over its own UDP socket.
pub struct Session {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub username: String,
    pub password: String,
}

enum Reply {
    Ok(Vec<u8>),
    Error(u16, Vec<u8>),
}

impl Session {
    /// Sends a request built by `build` (auth attributes added when `ch` has a nonce) and
    /// waits for its response, retransmitting on silence (RFC 8489 §6.2.1, simplified).
    fn transact(
        &self,
        method: Method,
        ch: &Challenge,
        build: &dyn Fn(&mut MessageWriteVec),
    ) -> io::Result<Reply> {
        let mut msg = Message::builder_request(method, MessageWriteVec::new());
        build(&mut msg);
        if !ch.nonce.is_empty() {
            let user = Username::new(&self.username).map_err(other)?;
            let realm = Realm::new(&ch.realm).map_err(other)?;
            let nonce = Nonce::new(&ch.nonce).map_err(other)?;
            msg.add_attribute(&user).map_err(other)?;
            msg.add_attribute(&realm).map_err(other)?;
            msg.add_attribute(&nonce).map_err(other)?;
            let creds: MessageIntegrityCredentials = LongTermKeyCredentials::new(
                self.username.clone(),
                self.password.clone(),
                ch.realm.clone(),
            )
            .into();
            msg.add_message_integrity(&creds, IntegrityAlgorithm::Sha1)
                .map_err(other)?;
        }
        msg.add_fingerprint().map_err(other)?;
        let tid = msg.transaction_id();
        let bytes = msg.finish();
        let mut buf = [0u8; 2048];
        for attempt in 0..6u32 {
            self.sock.send_to(&bytes, self.server)?;
            self.sock
                .set_read_timeout(Some(Duration::from_millis(250 << attempt.min(3))))?;
            loop {
                let n = match self.sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::TimedOut =>
                    {
                        break
                    }
                    Err(e) => return Err(e),
                };
                let Ok(resp) = Message::from_bytes(&buf[..n]) else {
                    continue; // ChannelData or junk: not our answer
                };
                if resp.transaction_id() != tid {
                    continue;
                }
                return Ok(match resp.class() {
                    MessageClass::Success => Reply::Ok(buf[..n].to_vec()),
                    _ => {
                        let code = resp.attribute::<ErrorCode>().map(|e| e.code()).unwrap_or(0);
                        Reply::Error(code, buf[..n].to_vec())
                    }
                });
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer to {} from {}", name(method), self.server),
        ))
    }

    /// Runs a request, answering 401 and 438 challenges with the new realm/nonce.
    fn authed(
        &self,
        method: Method,
        ch: &mut Challenge,
        build: &dyn Fn(&mut MessageWriteVec),
    ) -> io::Result<Vec<u8>> {
        for _ in 0..3 {
            match self.transact(method, ch, build)? {
                Reply::Ok(bytes) => return Ok(bytes),
                Reply::Error(code @ (401 | 438), bytes) => {
                    let resp = Message::from_bytes(&bytes).map_err(other)?;
                    let (Ok(realm), Ok(nonce)) =
                        (resp.attribute::<Realm>(), resp.attribute::<Nonce>())
                    else {
                        return Err(other(format!("{code} without REALM/NONCE")));
                    };
                    let fresh = Challenge {
                        realm: realm.realm().to_string(),
                        nonce: nonce.nonce().to_string(),
                    };
                    if code == 401 && !ch.nonce.is_empty() && fresh.nonce == ch.nonce {
                        return Err(other(format!(
                            "{} refused with 401: wrong secret or expired username",
                            name(method)
                        )));
                    }
                    *ch = fresh;
                }
                Reply::Error(code, _) => {
                    return Err(io::Error::other(Refused {
                        method: name(method),
                        code,
                    }))
                }
            }
        }
        Err(other(format!("{}: challenged three times", name(method))))
    }

    /// Allocate a UDP relay (RFC 8656 §7.1); returns XOR-RELAYED-ADDRESS.
    pub fn allocate(&self, ch: &mut Challenge) -> io::Result<SocketAddr> {
        let bytes = self.authed(ALLOCATE, ch, &|m| {
            m.add_attribute(&RequestedTransport::new(RequestedTransport::UDP))
                .expect("fits");
        })?;
        let resp = Message::from_bytes(&bytes).map_err(other)?;
        let relayed = resp
            .attribute::<XorRelayedAddress>()
            .map_err(|e| other(format!("Allocate success without XOR-RELAYED-ADDRESS: {e}")))?;
        Ok(relayed.addr(resp.transaction_id()))
    }

    /// Bind `channel` to `peer` (RFC 8656 §11.1); also installs the permission.
    pub fn channel_bind(
        &self,
        ch: &mut Challenge,
        channel: u16,
        peer: SocketAddr,
    ) -> io::Result<()> {
        self.authed(CHANNEL_BIND, ch, &|m| {
            m.add_attribute(&ChannelNumber::new(channel)).expect("fits");
            let tid = m.transaction_id();
            m.add_attribute(&XorPeerAddress::new(peer, tid))
                .expect("fits");
        })?;
        Ok(())
    }

    /// Delete the allocation: Refresh with LIFETIME 0 (RFC 8656 §7.2).
    pub fn release(&self, ch: &mut Challenge) -> io::Result<()> {
        self.authed(REFRESH, ch, &|m| {
            m.add_attribute(&Lifetime::new(0)).expect("fits");
        })?;
        Ok(())
    }
}

/// The server answered a request with an error response.
#[derive(Debug)]
pub struct Refused {
    pub method: &'static str,
    pub code: u16,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} refused with error {}", self.method, self.code)
    }
}

impl std::error::Error for Refused {}

/// The error code when `e` is a server's error response.
pub fn refused_code(e: &io::Error) -> Option<u16> {
    e.get_ref()?.downcast_ref::<Refused>().map(|r| r.code)
}

fn name(m: Method) -> &'static str {
    match m {
        ALLOCATE => "Allocate",
        CHANNEL_BIND => "ChannelBind",
        REFRESH => "Refresh",
        _ => "request",
    }
}

fn other(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}
