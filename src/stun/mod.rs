//! STUN wire format only (RFC 8489): classification, ChannelData framing (RFC 8656 §12),
//! TCP stream framing. Zero-copy over `&[u8]`; no state, no IO.
