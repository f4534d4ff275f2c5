//! Chooses the addresses relay sockets bind to (turn.relay_ip, else the detected primary
//! address) and what XOR-RELAYED-ADDRESS advertises (turn.external_ip, RFC 8656 §7.3).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};

use crate::config::TurnConfig;

use crate::turn::RelayAddr;

/// The address the kernel would use to reach the public Internet: a UDP `connect` picks a
/// route and source address without sending anything.
fn routed_source(probe: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if probe.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(probe).ok()?;
    let ip = s.local_addr().ok()?.ip();
    usable(ip).then_some(ip)
}

fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_loopback() && !v4.is_link_local(),
        // Link-local IPv6 needs a scope id, and IPv6 is rarely NATed, so a unique-local
        // (fc00::/7) relay address would be unreachable for peers: only global ones count.
        IpAddr::V6(v6) => {
            let s0 = v6.segments()[0];
            !v6.is_unspecified()
                && !v6.is_loopback()
                && (s0 & 0xffc0) != 0xfe80
                && (s0 & 0xfe00) != 0xfc00
        }
    }
}

/// First non-loopback IPv4 address of an interface that is up.
fn first_interface_ipv4() -> Option<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let up = ifa.ifa_flags & libc::IFF_UP as libc::c_uint != 0;
        if !up || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family we check before reading more.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
        if family != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET means it is a sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let ip = IpAddr::V4(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()));
        if usable(ip) {
            found = Some(ip);
            break;
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

/// The local relay addresses when turn.relay_ip is empty: the routed IPv4 source (else the
/// first interface address, else 127.0.0.1), plus the routed IPv6 source if it is global.
pub fn detect() -> Vec<IpAddr> {
    let v4 = routed_source("8.8.8.8:53".parse().unwrap())
        .or_else(first_interface_ipv4)
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    let mut out = vec![v4];
    if let Some(v6) = routed_source("[2001:4860:4860::8888]:53".parse().unwrap()) {
        out.push(v6);
    }
    out
}

/// Relay addresses from the config: `relay_ip` (or detected ones), each paired with the
/// `external_ip` at the same index, or of the same family when `relay_ip` was detected.
pub fn choose(cfg: &TurnConfig) -> Vec<RelayAddr> {
    let detected = cfg.relay_ip.is_empty();
    let locals = if detected {
        detect()
    } else {
        cfg.relay_ip.clone()
    };
    let out: Vec<RelayAddr> = locals
        .iter()
        .enumerate()
        .map(|(i, &local)| {
            let advertised = if cfg.external_ip.is_empty() {
                local
            } else if !detected {
                cfg.external_ip[i]
            } else {
                cfg.external_ip
                    .iter()
                    .copied()
                    .find(|e| e.is_ipv4() == local.is_ipv4())
                    .unwrap_or(local)
            };
            RelayAddr { local, advertised }
        })
        .collect();
    for r in &out {
        tracing::info!(
            local = %r.local,
            advertised = %r.advertised,
            source = if detected { "detected" } else { "turn.relay_ip" },
            "TURN relay address"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_finds_a_bindable_address() {
        let ips = detect();
        assert!(!ips.is_empty());
        for ip in ips {
            // Whatever was chosen must be usable for relay sockets on this machine.
            UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        }
    }

    #[test]
    fn external_ip_pairs_by_index_or_family() {
        let mut cfg = TurnConfig {
            relay_ip: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            external_ip: vec![
                "203.0.113.5".parse().unwrap(),
                "2001:db8::5".parse().unwrap(),
            ],
            ..TurnConfig::default()
        };
        let r = choose(&cfg);
        assert_eq!(r[0].local, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(r[0].advertised, "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_eq!(r[1].advertised, "2001:db8::5".parse::<IpAddr>().unwrap());

        cfg.relay_ip.clear();
        cfg.external_ip = vec!["203.0.113.9".parse().unwrap()];
        let r = choose(&cfg);
        let v4 = r.iter().find(|r| r.local.is_ipv4()).unwrap();
        assert_eq!(v4.advertised, "203.0.113.9".parse::<IpAddr>().unwrap());
        for v6 in r.iter().filter(|r| r.local.is_ipv6()) {
            assert_eq!(v6.advertised, v6.local);
        }
    }
}
