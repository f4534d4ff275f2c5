//! The native signaling protocol on `/ws`: JSON text frames with a `type` field.
//! docs/signaling.md describes every message with an example.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Messages a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ClientMsg {
    /// Join a named room (a share link carries its name).
    Join {
        room: String,
    },
    /// Leave a room (named or `lan`).
    Leave {
        room: String,
    },
    /// Opaque payload (SDP, ICE candidates) for a peer sharing a room.
    Signal {
        to: String,
        data: Value,
    },
    /// Ask for a `/relay` session with a peer sharing a room.
    Relay {
        to: String,
    },
    /// Application-level keepalive; answered with `pong`.
    Ping,
    Pong,
}

/// Types the server knows, to tell "unknown type" from "bad fields".
pub const CLIENT_TYPES: &[&str] = &["join", "leave", "signal", "relay", "ping", "pong"];

/// A peer as others see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PeerInfo {
    pub id: String,
    pub name: String,
}

/// Messages the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ServerMsg<'a> {
    Welcome {
        id: &'a str,
        name: &'a str,
        resume: &'a str,
        resumed: bool,
        rooms: Vec<&'a str>,
    },
    /// Full member list of a room the peer is now in (the peer itself excluded).
    Room {
        room: &'a str,
        peers: Vec<PeerInfo>,
    },
    PeerJoined {
        room: &'a str,
        peer: PeerInfo,
    },
    PeerLeft {
        room: &'a str,
        id: &'a str,
    },
    Left {
        room: &'a str,
    },
    Signal {
        from: &'a str,
        data: &'a Value,
    },
    RelayTicket {
        peer: &'a str,
        ticket: &'a str,
        path: &'a str,
        /// Cluster mode: the session is hosted by another node; connect to this URL
        /// (`ws(s)://…/relay`) rather than `path` on this host.
        #[serde(skip_serializing_if = "Option::is_none")]
        url: Option<&'a str>,
        expires_in: u32,
    },
    Pong,
    Error {
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<&'a str>,
    },
}

impl ServerMsg<'_> {
    /// The JSON text frame.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }
}

/// A `rate-limited` error: `refused` is the number of messages refused since the previous
/// such error (the first one of an episode counts the message that started it).
pub fn rate_limited_text(message: &str, refused: u64) -> String {
    #[derive(Serialize)]
    struct RateLimited<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        code: ErrorCode,
        message: &'a str,
        refused: u64,
    }
    serde_json::to_string(&RateLimited {
        kind: "error",
        code: ErrorCode::RateLimited,
        message,
        refused,
    })
    .expect("serializes")
}

/// Machine-readable error codes in `{"type":"error","code":...}`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    BadMessage,
    BinaryNotSupported,
    TooLarge,
    RateLimited,
    PeerNotFound,
    NotInSharedRoom,
    BadRoom,
    RoomFull,
    TooManyRooms,
    NotInRoom,
    RelayUnavailable,
    /// Cluster mode: the target is on another node and Redis is unreachable.
    ClusterUnavailable,
    /// Cluster mode: the target is on another node and the queue to Redis is full.
    ClusterBusy,
}
