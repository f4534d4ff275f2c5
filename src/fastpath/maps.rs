//! The BPF maps' keys and values, byte-for-byte the structs in `bpf/tern_fastpath.h`
//! (addresses and ports in network byte order, channel numbers in host order).
//!
//! Owns: the layouts and the translation of a binding into its two entries. Must not: touch
//! the maps (`super::Offload` does).

use std::net::SocketAddrV4;

/// `tern_c2p` key: ChannelData from a client (its 5-tuple and the channel number).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct C2pKey {
    client_ip: u32,
    server_ip: u32,
    client_port: u16,
    server_port: u16,
    channel: u16,
    pad: u16,
}

/// `tern_c2p` value: where the data goes, and what went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct C2pVal {
    relay_ip: u32,
    peer_ip: u32,
    relay_port: u16,
    peer_port: u16,
    ifindex: u32,
    /// 1: the program spends from the relay's `tern_budget` entry; 0: it never looks.
    capped: u32,
    pad: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// `tern_p2c` key: a datagram from a peer to a relay address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct P2cKey {
    peer_ip: u32,
    relay_ip: u32,
    peer_port: u16,
    relay_port: u16,
}

/// `tern_p2c` value: the client it goes to as ChannelData, and what went.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct P2cVal {
    server_ip: u32,
    client_ip: u32,
    ifindex: u32,
    server_port: u16,
    client_port: u16,
    channel: u16,
    pad: u16,
    /// As in [`C2pVal`].
    capped: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// `tern_budget` key: a capped relayed address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BudgetKey {
    relay_ip: u32,
    relay_port: u16,
    pad: u16,
}

impl BudgetKey {
    pub fn new(relay: SocketAddrV4) -> BudgetKey {
        BudgetKey {
            relay_ip: ip(&relay),
            relay_port: port(&relay),
            pad: 0,
        }
    }
}

/// `tern_budget` value: payload bytes the program may still forward, per direction
/// (slightly negative after racing CPUs overdraw).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub to_peer: i64,
    pub to_client: i64,
}

// SAFETY: plain `repr(C)` integers with explicit padding fields: every bit pattern is valid.
unsafe impl aya::Pod for C2pKey {}
// SAFETY: as above.
unsafe impl aya::Pod for C2pVal {}
// SAFETY: as above.
unsafe impl aya::Pod for P2cKey {}
// SAFETY: as above.
unsafe impl aya::Pod for P2cVal {}
// SAFETY: as above.
unsafe impl aya::Pod for BudgetKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Budget {}

fn ip(a: &SocketAddrV4) -> u32 {
    u32::from_ne_bytes(a.ip().octets())
}

fn port(a: &SocketAddrV4) -> u16 {
    a.port().to_be()
}

/// One channel binding as the program sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V4Binding {
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
    pub channel: u16,
    pub relay: SocketAddrV4,
    pub peer: SocketAddrV4,
    /// The relay has a `turn.max_bytes_per_sec` cap: the program spends from its budget
    /// entry (which must exist first, or every datagram goes up to user space).
    pub capped: bool,
}

/// The two map entries of binding `b`: client → peer (out through `to_peer_if`) and
/// peer → client (out through `to_client_if`).
pub fn entries(
    b: &V4Binding,
    to_peer_if: u32,
    to_client_if: u32,
) -> (C2pKey, C2pVal, P2cKey, P2cVal) {
    let V4Binding {
        client,
        server,
        channel,
        relay,
        peer,
        capped,
    } = *b;
    let capped = u32::from(capped);
    (
        C2pKey {
            client_ip: ip(&client),
            server_ip: ip(&server),
            client_port: port(&client),
            server_port: port(&server),
            channel,
            pad: 0,
        },
        C2pVal {
            relay_ip: ip(&relay),
            peer_ip: ip(&peer),
            relay_port: port(&relay),
            peer_port: port(&peer),
            ifindex: to_peer_if,
            capped,
            ..Default::default()
        },
        P2cKey {
            peer_ip: ip(&peer),
            relay_ip: ip(&relay),
            peer_port: port(&peer),
            relay_port: port(&relay),
        },
        P2cVal {
            server_ip: ip(&server),
            client_ip: ip(&client),
            server_port: port(&server),
            client_port: port(&client),
            channel,
            ifindex: to_client_if,
            capped,
            ..Default::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layouts the BPF program was compiled against (sizes with the C padding).
    #[test]
    fn layouts_match_the_bpf_structs() {
        assert_eq!(std::mem::size_of::<C2pKey>(), 16);
        assert_eq!(std::mem::size_of::<C2pVal>(), 40);
        assert_eq!(std::mem::size_of::<P2cKey>(), 12);
        assert_eq!(std::mem::size_of::<P2cVal>(), 40);
        assert_eq!(std::mem::size_of::<BudgetKey>(), 8);
        assert_eq!(std::mem::size_of::<Budget>(), 16);
    }

    /// Channel 0x4001 with every address 10.1.2.3:4660 (port 0x1234).
    fn one_address_binding(capped: bool) -> V4Binding {
        let a: SocketAddrV4 = "10.1.2.3:4660".parse().unwrap();
        V4Binding {
            client: a,
            server: a,
            channel: 0x4001,
            relay: a,
            peer: a,
            capped,
        }
    }

    #[test]
    fn addresses_and_ports_are_in_network_order() {
        let (k, ..) = entries(&one_address_binding(false), 7, 8);
        let bytes: [u8; 16] = unsafe { std::mem::transmute(k) };
        assert_eq!(&bytes[..4], &[10, 1, 2, 3]);
        assert_eq!(&bytes[8..10], &[0x12, 0x34]);
        assert_eq!(u16::from_ne_bytes([bytes[12], bytes[13]]), 0x4001);
    }

    /// The `capped` flag sits where the C structs have it (after `ifindex` in `c2p_val`,
    /// after `pad` in `p2c_val`), 1 or 0, in both values of a binding.
    #[test]
    fn capped_flag_is_where_the_program_reads_it() {
        let flag = |capped| {
            let (_, cv, _, pv) = entries(&one_address_binding(capped), 7, 8);
            // SAFETY: plain integers, sizes checked above.
            let c: [u8; 40] = unsafe { std::mem::transmute(cv) };
            let p: [u8; 40] = unsafe { std::mem::transmute(pv) };
            (
                u32::from_ne_bytes(c[16..20].try_into().unwrap()),
                u32::from_ne_bytes(p[20..24].try_into().unwrap()),
            )
        };
        assert_eq!(flag(true), (1, 1));
        assert_eq!(flag(false), (0, 0));
    }
}
