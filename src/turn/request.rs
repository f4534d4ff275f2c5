//! Decoding a request's attributes into typed values (RFC 8656 §7-§11, RFC 6062 §6), so
//! the handlers in `method/` see `Allocate { transport, family, .. }`
//! and never raw attribute bytes or bare error numbers.
//!
//! Each decoder is pure (no state, no counters) and is called by its handler at the point
//! RFC 8656's error precedence puts it: after the state checks that must answer first
//! (437 for a 5-tuple that already has an allocation comes before 400 for a bad
//! attribute), so the answers are the same as when parsing was inline.

use std::net::SocketAddr;

use stun_types::attribute::AttributeType;
use stun_types::message::Message;
use turn_types::attribute::XorPeerAddress;

use super::{ConnId, Transport};
use crate::stun::{attr, ChannelNumber, ErrorCode};

/// REQUESTED-TRANSPORT value for UDP (RFC 8656 §18.7).
const PROTO_UDP: u8 = 17;
/// REQUESTED-TRANSPORT for an RFC 6062 TCP allocation.
const PROTO_TCP: u8 = 6;

/// An address family (RFC 8656 §18.8, §18.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Family {
    V4,
    V6,
}

impl Family {
    pub fn is_v6(self) -> bool {
        self == Family::V6
    }
}

/// An ADDRESS-FAMILY-like attribute value (REQUESTED-ADDRESS-FAMILY,
/// ADDITIONAL-ADDRESS-FAMILY).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FamilyValue {
    Known(Family),
    /// Well-formed but neither 0x01 nor 0x02.
    Unknown,
}

/// EVEN-PORT (RFC 8656 §18.6): an even relay port; with the R bit the next port is
/// reserved too (RESERVATION-TOKEN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct EvenPort {
    pub reserve_next: bool,
}

/// An Allocate request (RFC 8656 §7.2; RFC 6062 §5.1 for `tcp`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Allocate {
    /// An RFC 6062 TCP allocation (else UDP).
    pub tcp: bool,
    /// REQUESTED-ADDRESS-FAMILY.
    pub family: Option<Family>,
    /// ADDITIONAL-ADDRESS-FAMILY asked for IPv6 too (a dual allocation).
    pub additional_v6: bool,
    /// EVEN-PORT.
    pub even_port: Option<EvenPort>,
    /// RESERVATION-TOKEN.
    pub token: Option<u64>,
    /// LIFETIME.
    pub lifetime: Option<u32>,
}

impl Allocate {
    /// `client` is the transport the request came over; `tcp_relay` whether RFC 6062
    /// allocations are switched on (`turn.tcp_relay`).
    pub fn decode(
        m: &Message<'_>,
        client: Transport,
        tcp_relay: bool,
    ) -> Result<Allocate, ErrorCode> {
        let bad = Err(ErrorCode::BadRequest);
        let Some(rt) = raw(m, attr::REQUESTED_TRANSPORT) else {
            return bad;
        };
        if rt.len() != 4 {
            return bad;
        }
        // RFC 6062 §5.1: a TCP allocation needs a TCP or TLS control connection; asked for
        // over UDP it is a bad request. Switched off by `turn.tcp_relay`: 442.
        let tcp = rt[0] == PROTO_TCP;
        if tcp && client == Transport::Udp {
            return bad;
        }
        if (tcp && !tcp_relay) || (!tcp && rt[0] != PROTO_UDP) {
            return Err(ErrorCode::UnsupportedTransport);
        }
        // RFC 6062 §5.1: these make no sense for a TCP relay.
        let udp_only = [
            attr::EVEN_PORT,
            attr::RESERVATION_TOKEN,
            attr::DONT_FRAGMENT,
            attr::ADDITIONAL_ADDRESS_FAMILY,
        ];
        if tcp && udp_only.iter().any(|&t| raw(m, t).is_some()) {
            return bad;
        }
        let token = match raw(m, attr::RESERVATION_TOKEN) {
            None => None,
            Some(t) => match <[u8; 8]>::try_from(t) {
                Ok(b) => Some(u64::from_be_bytes(b)),
                Err(_) => return bad,
            },
        };
        let even_port = match raw(m, attr::EVEN_PORT) {
            None => None,
            Some([b, ..]) => Some(EvenPort {
                reserve_next: b & 0x80 != 0,
            }),
            Some(_) => return bad,
        };
        let family = match raw(m, attr::REQUESTED_ADDRESS_FAMILY).map(family_value) {
            None => None,
            Some(None) => return bad,
            Some(Some(FamilyValue::Unknown)) => return Err(ErrorCode::AddressFamilyNotSupported),
            Some(Some(FamilyValue::Known(f))) => Some(f),
        };
        let additional_v6 = match raw(m, attr::ADDITIONAL_ADDRESS_FAMILY).map(family_value) {
            None => false,
            Some(Some(FamilyValue::Known(Family::V6))) => true,
            Some(_) => return bad,
        };
        if (token.is_some() && (even_port.is_some() || family.is_some() || additional_v6))
            || (additional_v6 && (family.is_some() || even_port.is_some()))
        {
            return bad;
        }
        let lifetime = lifetime(m)?;
        Ok(Allocate {
            tcp,
            family,
            additional_v6,
            even_port,
            token,
            lifetime,
        })
    }
}

/// REQUESTED-ADDRESS-FAMILY of a Refresh (RFC 8656 §7.3): only a known family is valid.
pub(super) fn refresh_family(m: &Message<'_>) -> Result<Option<Family>, ErrorCode> {
    match raw(m, attr::REQUESTED_ADDRESS_FAMILY).map(family_value) {
        None => Ok(None),
        Some(Some(FamilyValue::Known(f))) => Ok(Some(f)),
        Some(_) => Err(ErrorCode::BadRequest),
    }
}

/// LIFETIME (RFC 8656 §18.2), if present: 400 when malformed.
pub(super) fn lifetime(m: &Message<'_>) -> Result<Option<u32>, ErrorCode> {
    match raw(m, attr::LIFETIME) {
        None => Ok(None),
        Some(l) => u32_attr(l).map(Some).ok_or(ErrorCode::BadRequest),
    }
}

/// A ChannelBind request (RFC 8656 §11.2).
#[derive(Clone, Copy, Debug)]
pub(super) struct ChannelBind {
    pub number: ChannelNumber,
    pub peer: SocketAddr,
}

impl ChannelBind {
    pub fn decode(m: &Message<'_>) -> Result<ChannelBind, ErrorCode> {
        let number = match raw(m, attr::CHANNEL_NUMBER) {
            Some([a, b, _, _]) => u16::from_be_bytes([*a, *b]),
            _ => return Err(ErrorCode::BadRequest),
        };
        let peer = one_peer(m)?;
        let number = ChannelNumber::new(number).ok_or(ErrorCode::BadRequest)?;
        Ok(ChannelBind { number, peer })
    }
}

/// The XOR-PEER-ADDRESSes of a CreatePermission (RFC 8656 §9.2): at least one, all valid.
pub(super) fn permission_peers(m: &Message<'_>) -> Result<Vec<SocketAddr>, ErrorCode> {
    match peer_addresses(m) {
        Ok(p) if !p.is_empty() => Ok(p),
        _ => Err(ErrorCode::BadRequest),
    }
}

/// Exactly one valid XOR-PEER-ADDRESS (ChannelBind §11.2, Connect RFC 6062 §5.2).
pub(super) fn one_peer(m: &Message<'_>) -> Result<SocketAddr, ErrorCode> {
    match peer_addresses(m).as_deref() {
        Ok([p]) => Ok(*p),
        _ => Err(ErrorCode::BadRequest),
    }
}

/// CONNECTION-ID (RFC 6062 §6.2.1) of a ConnectionBind.
pub(super) fn connection_id(m: &Message<'_>) -> Option<ConnId> {
    raw(m, attr::CONNECTION_ID)
        .and_then(u32_attr)
        .map(ConnId::from_wire)
}

/// The value of attribute `t`, if present.
pub(super) fn raw<'m>(m: &'m Message<'_>, t: u16) -> Option<&'m [u8]> {
    m.raw_attribute_and_offset(AttributeType::new(t))
        .map(|(off, a)| {
            let b = m.as_bytes();
            &b[off + 4..off + 4 + a.header.length() as usize]
        })
}

fn u32_attr(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

/// Parses an ADDRESS-FAMILY-like attribute value; `None` if malformed.
fn family_value(v: &[u8]) -> Option<FamilyValue> {
    // RFC 8656 §18.8 says 4 bytes (family + 3 reserved); some clients send just the family.
    if v.is_empty() || v.len() > 4 {
        return None;
    }
    Some(match v[0] {
        0x01 => FamilyValue::Known(Family::V4),
        0x02 => FamilyValue::Known(Family::V6),
        _ => FamilyValue::Unknown,
    })
}

/// Every XOR-PEER-ADDRESS in the request, or `Err` if one is malformed.
fn peer_addresses(m: &Message<'_>) -> Result<Vec<SocketAddr>, ()> {
    let tid = m.transaction_id();
    let mut v = Vec::new();
    for (_, a) in m.iter_attributes() {
        if a.header.get_type().value() == attr::XOR_PEER_ADDRESS {
            let p = XorPeerAddress::try_from(&a).map_err(|_| ())?;
            v.push(p.addr(tid));
        }
    }
    Ok(v)
}
