//! Sans-IO TURN server (RFC 8656): allocations, permissions, channels, nonces, auth,
//! quotas and peer policy. Takes bytes, the sender and `now`; never touches a socket or clock.

pub mod auth;
