//! Send indication (RFC 8656 §10.2): forwarded from the allocation's relay if a
//! permission exists, else silently dropped (counted). Allocation-free: the driver sends
//! the payload straight out of its receive buffer (`Output::Forward`).

use stun_types::attribute::AttributeType;
use stun_types::message::Message;
use turn_types::attribute::XorPeerAddress;

use super::Cx;
use crate::stun::attr;
use crate::turn::{FiveTuple, Output};

/// Send indication (RFC 8656 §10.2): forwarded if a permission exists, else silently
/// dropped (counted).
pub(super) fn indication(cx: &mut Cx, m: &Message<'_>, from: &FiveTuple) -> Option<Output> {
    let Some(slot) = cx.tables.slot_of(from) else {
        cx.stats.sends_dropped += 1;
        return None;
    };
    // RFC 6062 §5: a TCP allocation relays over peer connections only.
    if cx.tables.get(slot).is_some_and(|a| a.tcp) {
        cx.stats.sends_dropped += 1;
        return None;
    }
    let tid = m.transaction_id();
    let peer = match m.attribute::<XorPeerAddress>() {
        Ok(p) => p.addr(tid),
        Err(_) => {
            cx.stats.malformed += 1;
            return None;
        }
    };
    let Some((off, data)) = m.raw_attribute_and_offset(AttributeType::new(attr::DATA)) else {
        cx.stats.malformed += 1;
        return None;
    };
    let len = data.header.length() as usize;
    let relay = cx.tables.get(slot).and_then(|a| a.relay_for(peer.ip()));
    match relay {
        Some(r) if cx.tables.permission(r.id, peer.ip()).is_some() => {
            cx.stats.sends_forwarded += 1;
            Some(Output::Forward {
                relay: r.id,
                peer,
                payload: off + 4..off + 4 + len,
            })
        }
        _ => {
            cx.stats.sends_dropped += 1;
            None
        }
    }
}
