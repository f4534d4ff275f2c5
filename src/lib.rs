//! Tern: one daemon for STUN/TURN (RFC 8489, RFC 8656, RFC 6062), ephemeral ICE
//! credentials, WebSocket signaling and a WebSocket data relay. See DESIGN.md for the layout.

pub mod api;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod fastpath;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod metrics_def;
pub mod net;
pub mod ops;
pub mod rate;
pub mod relay_ws;
pub mod signal;
pub mod stun;
pub mod tls;
pub mod turn;
pub mod usage;
