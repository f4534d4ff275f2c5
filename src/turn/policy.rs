//! Which peer addresses a client may relay to (DESIGN.md principle 5; RFC 8656 §21
//! security considerations). Denies by default every range that reaches the server's own
//! host or private networks, unless `allowed_peer_ranges` covers it; `denied_peer_ranges`
//! always wins.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Peer address policy, built from `turn.allowed_peer_ranges` / `turn.denied_peer_ranges`.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allowed: Vec<IpNet>,
    denied: Vec<IpNet>,
}

impl PeerPolicy {
    pub fn new(allowed: Vec<IpNet>, denied: Vec<IpNet>) -> PeerPolicy {
        PeerPolicy { allowed, denied }
    }

    /// True if a permission or channel to `ip` may be installed (else 403).
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.denied.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        !denied_by_default(ip)
    }
}

/// The built-in deny list.
pub fn denied_by_default(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => v4_denied(a),
        IpAddr::V6(a) => v6_denied(a),
    }
}

fn v4_denied(a: Ipv4Addr) -> bool {
    let o = a.octets();
    a.is_unspecified()
        || o[0] == 0 // 0.0.0.0/8 "this network"
        || a.is_loopback()
        || a.is_private()
        || (o[0] == 100 && (o[1] & 0xC0) == 64) // 100.64.0.0/10 CGNAT
        || a.is_link_local()
        || a.is_multicast()
        || a.is_broadcast()
        || o[0] >= 240 // 240.0.0.0/4 reserved
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF protocol assignments
        || (o[0] == 192 && o[1] == 0 && o[2] == 2) // documentation
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
        || (o[0] == 198 && (o[1] & 0xFE) == 18) // 198.18.0.0/15 benchmarking
}

fn v6_denied(a: Ipv6Addr) -> bool {
    let s = a.segments();
    if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
        return true;
    }
    // IPv4-mapped ::ffff:0:0/96 and IPv4-compatible ::/96: never a real IPv6 peer.
    if s[..5] == [0; 5] && (s[5] == 0xffff || s[5] == 0) {
        return true;
    }
    let embedded_v4 = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    match s[0] {
        0xfc00..=0xfdff => true, // fc00::/7 ULA
        0xfe80..=0xfebf => true, // fe80::/10 link-local
        0xfec0..=0xfeff => true, // fec0::/10 deprecated site-local
        0x0064 if s[1] == 0xff9b => {
            // 64:ff9b::/96 NAT64 (and 64:ff9b:1::/48 local-use NAT64)
            s[2] != 0 || v4_denied(embedded_v4(s[6], s[7]))
        }
        0x0100 if s[1..4] == [0, 0, 0] => true, // 100::/64 discard
        0x2001 if s[1] == 0x0db8 => true,       // 2001:db8::/32 documentation
        0x2001 if s[1] == 0x0002 && s[2] == 0 => true, // 2001:2::/48 benchmarking
        0x2001 if (0x0010..=0x002f).contains(&s[1]) => true, // ORCHID 2001:10::/28, 2001:20::/28
        // Teredo 2001::/32: server IPv4 in bits 32-63, client IPv4 (inverted) in the last 32.
        0x2001 if s[1] == 0 => {
            v4_denied(embedded_v4(s[2], s[3])) || v4_denied(embedded_v4(!s[6], !s[7]))
        }
        // 6to4 2002::/16: IPv4 in bits 16-47.
        0x2002 => v4_denied(embedded_v4(s[1], s[2])),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_denies_private_and_special_ranges() {
        let p = PeerPolicy::default();
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.1.1",
            "224.0.0.1",
            "0.1.2.3",
            "255.255.255.255",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.9",
            "198.18.0.1",
            "198.19.255.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            // Teredo with a loopback server address, then with client 10.0.0.1 (inverted).
            "2001:0:7f00:1::1",
            "2001:0:808:808::f5ff:fffe",
        ] {
            assert!(!p.allows(ip(s)), "{s} must be denied");
        }
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:0:808:808::f7f7:f7f7",
        ] {
            assert!(p.allows(ip(s)), "{s} must be allowed");
        }
    }

    #[test]
    fn allow_and_deny_lists() {
        let p = PeerPolicy::new(
            vec![
                "127.0.0.0/8".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            vec![
                "8.8.8.0/24".parse().unwrap(),
                "10.9.0.0/16".parse().unwrap(),
            ],
        );
        assert!(p.allows(ip("127.0.0.1")));
        assert!(p.allows(ip("10.1.1.1")));
        assert!(!p.allows(ip("10.9.1.1")), "denied wins over allowed");
        assert!(!p.allows(ip("8.8.8.8")));
        assert!(p.allows(ip("8.8.4.4")));
        assert!(!p.allows(ip("192.168.0.1")));
    }
}
