//! Who the client is: its address behind trusted reverse proxies, and the LAN room that
//! address belongs to (Snapdrop-style grouping by public address).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The client's address. `X-Forwarded-For` / `Forwarded` are believed only when the TCP
/// peer is in `trusted`; the chain is then walked from the right, skipping trusted hops,
/// so a client cannot spoof its address by sending the header itself.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let chain = forwarded_chain(headers);
    let mut current = peer;
    for hop in chain.iter().rev() {
        match hop {
            Some(ip) => {
                current = canonical(*ip);
                if !is_trusted(&current) {
                    return current;
                }
            }
            // An unparsable hop: stop at the last address we could trust.
            None => return current,
        }
    }
    current
}

/// Hops from `Forwarded` (RFC 7239 `for=`) if present, else `X-Forwarded-For`, left to right.
fn forwarded_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut out = Vec::new();
    let fwd: Vec<&str> = headers
        .get_all("forwarded")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !fwd.is_empty() {
        for element in fwd.iter().flat_map(|v| v.split(',')) {
            let for_value = element.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                k.eq_ignore_ascii_case("for").then_some(v.trim())
            });
            if let Some(v) = for_value {
                out.push(parse_forwarded_node(v));
            }
        }
        return out;
    }
    for v in headers.get_all("x-forwarded-for").iter() {
        let Ok(v) = v.to_str() else {
            out.push(None);
            continue;
        };
        for part in v.split(',') {
            out.push(parse_forwarded_node(part.trim()));
        }
    }
    out
}

/// `1.2.3.4`, `1.2.3.4:80`, `"[2001:db8::1]:80"`, `2001:db8::1`.
fn parse_forwarded_node(v: &str) -> Option<IpAddr> {
    let v = v.trim_matches('"');
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = v.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    v.rsplit_once(':')?
        .0
        .parse::<Ipv4Addr>()
        .ok()
        .map(IpAddr::V4)
}

/// IPv4-mapped IPv6 addresses become IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The LAN room key for a client address: IPv4 by full address, IPv6 by its
/// `v6_prefix_len` prefix, and every loopback / private / link-local / ULA address in one
/// shared local room (those clients are on the server's own network).
pub fn lan_key(ip: IpAddr, v6_prefix_len: u8) -> String {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            if v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() {
                "local".into()
            } else {
                format!("v4:{v4}")
            }
        }
        IpAddr::V6(v6) => {
            let seg0 = v6.segments()[0];
            let ula = seg0 & 0xfe00 == 0xfc00;
            let link_local = seg0 & 0xffc0 == 0xfe80;
            if v6.is_loopback() || v6.is_unspecified() || ula || link_local {
                return "local".into();
            }
            let bits = u128::from(v6);
            let len = u32::from(v6_prefix_len.min(128));
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            format!("v6:{}/{len}", Ipv6Addr::from(bits & mask))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn lan_grouping() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(lan_key(ip("203.0.113.7"), 64), "v4:203.0.113.7");
        assert_ne!(
            lan_key(ip("203.0.113.7"), 64),
            lan_key(ip("203.0.113.8"), 64)
        );
        // IPv6: same /64 shares a room, another /64 does not.
        assert_eq!(
            lan_key(ip("2001:db8:1:2:aaaa::1"), 64),
            lan_key(ip("2001:db8:1:2:bbbb::2"), 64)
        );
        assert_ne!(
            lan_key(ip("2001:db8:1:2::1"), 64),
            lan_key(ip("2001:db8:1:3::1"), 64)
        );
        assert_eq!(lan_key(ip("2001:db8:1:2::1"), 64), "v6:2001:db8:1:2::/64");
        assert_eq!(
            lan_key(ip("2001:db8:1:2::1"), 48),
            lan_key(ip("2001:db8:1:3::1"), 48)
        );
        for local in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.9",
            "172.16.0.1",
            "::1",
            "fd00::5",
            "fe80::1",
            "::ffff:192.168.1.1",
        ] {
            assert_eq!(lan_key(ip(local), 64), "local", "{local}");
        }
        assert_eq!(lan_key(ip("::ffff:203.0.113.7"), 64), "v4:203.0.113.7");
    }

    #[test]
    fn forwarded_headers_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = h(&[("x-forwarded-for", "198.51.100.1, 203.0.113.9")]);
        // Untrusted peer: its header is ignored (PairDrop would believe it).
        let direct: IpAddr = "192.0.2.50".parse().unwrap();
        assert_eq!(client_ip(direct, &xff, &trusted), direct);
        // Trusted proxy: the rightmost untrusted hop is the client; the leftmost entry,
        // which the client could have written itself, is not believed.
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(
            client_ip(proxy, &xff, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // Chained trusted proxies are skipped.
        let chain = h(&[("x-forwarded-for", "203.0.113.9, 10.0.0.3")]);
        assert_eq!(
            client_ip(proxy, &chain, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        // RFC 7239 Forwarded wins over X-Forwarded-For, quoted IPv6 with port.
        let fwd = h(&[
            ("forwarded", "for=\"[2001:db8::7]:4711\";proto=https"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            client_ip(proxy, &fwd, &trusted),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        // Garbage stops the walk at the proxy.
        let bad = h(&[("x-forwarded-for", "not-an-ip")]);
        assert_eq!(client_ip(proxy, &bad, &trusted), proxy);
        // No header from a trusted proxy: the proxy itself.
        assert_eq!(client_ip(proxy, &HeaderMap::new(), &trusted), proxy);
    }
}
