//! Alternate servers for 300 Try Alternate (RFC 8489 §10, §14.15 ALTERNATE-SERVER, §14.16
//! ALTERNATE-DOMAIN; RFC 8656 §7.2): offered when this server is at capacity or draining.

use std::net::SocketAddr;

use super::Transport;
use crate::config::TurnConfig;

/// One redirection target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alternate<'a> {
    pub addr: SocketAddr,
    /// The name the alternate's certificate carries (TLS alternates only).
    pub domain: Option<&'a str>,
}

/// The configured alternates, per client transport (`turn.alternate_udp/_tcp/_tls`).
#[derive(Debug, Clone, Default)]
pub struct Alternates {
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<(SocketAddr, String)>,
}

impl Alternates {
    pub fn from_config(t: &TurnConfig) -> Alternates {
        Alternates {
            udp: t.alternate_udp.clone(),
            tcp: t.alternate_tcp.clone(),
            tls: t
                .alternate_tls
                .iter()
                .map(|a| (a.addr, a.domain.clone()))
                .collect(),
        }
    }

    /// Alternates from lists (cluster mode builds them from the node registry).
    pub fn from_lists(
        udp: Vec<SocketAddr>,
        tcp: Vec<SocketAddr>,
        tls: Vec<(SocketAddr, String)>,
    ) -> Alternates {
        Alternates { udp, tcp, tls }
    }

    pub fn is_empty(&self) -> bool {
        self.udp.is_empty() && self.tcp.is_empty() && self.tls.is_empty()
    }

    /// The `n`-th (modulo their number) alternate for a client reaching us over
    /// `transport` from an address of family `v6`: ALTERNATE-SERVER must have the family
    /// of the request's source (RFC 8489 §14.15). `None` when no alternate fits.
    pub fn pick(&self, transport: Transport, v6: bool, n: usize) -> Option<Alternate<'_>> {
        let fits = |a: &SocketAddr| a.is_ipv6() == v6;
        match transport {
            Transport::Udp | Transport::Tcp => {
                let list = if transport == Transport::Udp {
                    &self.udp
                } else {
                    &self.tcp
                };
                let count = list.iter().filter(|a| fits(a)).count();
                let addr = *list.iter().filter(|a| fits(a)).nth(n.checked_rem(count)?)?;
                Some(Alternate { addr, domain: None })
            }
            Transport::Tls => {
                let count = self.tls.iter().filter(|(a, _)| fits(a)).count();
                let (addr, domain) = self
                    .tls
                    .iter()
                    .filter(|(a, _)| fits(a))
                    .nth(n.checked_rem(count)?)?;
                Some(Alternate {
                    addr: *addr,
                    domain: Some(domain),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsAlternate;

    #[test]
    fn round_robin_within_transport_and_family() {
        let t = TurnConfig {
            alternate_udp: vec![
                "192.0.2.1:3478".parse().unwrap(),
                "[2001:db8::1]:3478".parse().unwrap(),
                "192.0.2.2:3478".parse().unwrap(),
            ],
            alternate_tls: vec![TlsAlternate {
                addr: "192.0.2.9:5349".parse().unwrap(),
                domain: "turn2.example.org".into(),
            }],
            ..TurnConfig::default()
        };
        let a = Alternates::from_config(&t);
        let v4: Vec<_> = (0..4)
            .map(|n| a.pick(Transport::Udp, false, n).unwrap().addr.to_string())
            .collect();
        assert_eq!(
            v4,
            [
                "192.0.2.1:3478",
                "192.0.2.2:3478",
                "192.0.2.1:3478",
                "192.0.2.2:3478"
            ]
        );
        assert_eq!(
            a.pick(Transport::Udp, true, 7).unwrap().addr.to_string(),
            "[2001:db8::1]:3478"
        );
        assert_eq!(a.pick(Transport::Tcp, false, 0), None);
        let tls = a.pick(Transport::Tls, false, 3).unwrap();
        assert_eq!(tls.domain, Some("turn2.example.org"));
        assert_eq!(a.pick(Transport::Tls, true, 0), None);
    }
}
