//! Usage accounting through the TURN core (issue 14) with a simulated clock: the records an
//! allocation emits at its start, at each interim interval and at its end, and the per-user
//! byte budgets on Allocate and Refresh, including a reload that raises them.

use std::sync::Arc;

use super::*;
use crate::stun::{attr, method};
use crate::usage::{Granularity, Ledger};

fn usage(bytes: u64, packets: u64) -> RelayUsage {
    RelayUsage {
        to_peer_bytes: bytes,
        to_peer_packets: packets,
        to_client_bytes: 2 * bytes,
        to_client_packets: 2 * packets,
    }
}

/// The day row of `user` in the ledger (the hour row must agree within one hour).
fn day(l: &Ledger, user: &str) -> crate::usage::Counts {
    l.pending(user)
        .into_iter()
        .find(|(k, _)| k.granularity == Granularity::Day)
        .map(|(_, c)| c)
        .unwrap_or_default()
}

fn harness(per_day: u64) -> (H, Arc<Ledger>) {
    let h = H::new(|c| {
        c.turn.user_bytes_per_day = per_day;
        c.usage.interim_secs = 60;
    });
    let l = Arc::new(Ledger::new(false));
    h.shared.set_usage(Arc::clone(&l));
    (h, l)
}

fn relay_of(h: &H) -> RelayId {
    let local: std::net::IpAddr = RELAY_V4.parse().unwrap();
    *h.io
        .open
        .iter()
        .find(|(_, a)| a.ip() == local)
        .expect("an open relay")
        .0
}

#[test]
fn start_interim_and_end_records_add_up_to_the_relay_counters() {
    let (mut h, l) = harness(0);
    let (u, k) = cred("alice", 3600);
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 300),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let lifetime = u64::from(r.lifetime());
    let relay = relay_of(&h);
    assert_eq!(day(&l, "alice").allocations, 1);
    assert_eq!(day(&l, "alice").peak_allocations, 1);
    h.io.usage.insert(relay, usage(1000, 10));
    h.advance(61);
    // The interim read at 60 s has what the relay counted so far.
    assert_eq!(day(&l, "alice").to_peer_bytes, 1000);
    assert_eq!(day(&l, "alice").to_client_packets, 20);
    h.io.usage.insert(relay, usage(1500, 15));
    // At expiry the end record carries the rest, nothing twice.
    h.advance(lifetime);
    let c = day(&l, "alice");
    assert_eq!((c.to_peer_bytes, c.to_peer_packets), (1500, 15));
    assert_eq!((c.to_client_bytes, c.to_client_packets), (3000, 30));
    assert_eq!(c.allocation_ms, lifetime * 1000);
    assert_eq!(c.allocations, 1);
    assert_eq!(h.server.allocation_count(), 0);
    // A second credential of alice (another expiry) counts under the same user.
    let (u2, k2) = cred("alice", 7200);
    assert_ne!(u, u2);
    let r = h.auth(client(2), &Req::new(method::ALLOCATE).udp(), &u2, &k2);
    assert_eq!(r.code(), 0);
    assert_eq!(day(&l, "alice").allocations, 2);
}

#[test]
fn budget_refuses_refresh_and_allocate_until_a_reload_raises_it() {
    let (mut h, l) = harness(10_000);
    let (u, k) = h.alice();
    let r = h.auth(
        client(1),
        &Req::new(method::ALLOCATE).udp().u32(attr::LIFETIME, 600),
        &u,
        &k,
    );
    assert_eq!(r.code(), 0);
    let relay = relay_of(&h);
    h.io.usage.insert(relay, usage(4000, 4)); // 12000 bytes both ways
    h.advance(61);
    let r = h.auth(
        client(1),
        &Req::new(method::REFRESH).u32(attr::LIFETIME, 600),
        &u,
        &k,
    );
    assert_eq!(r.code(), 486);
    let reason = r.attr(attr::ERROR_CODE).expect("ERROR-CODE");
    assert!(String::from_utf8_lossy(&reason[4..]).contains("budget for today"));
    // The running allocation keeps its lifetime, then ends.
    assert_eq!(h.server.allocation_count(), 1);
    let r = h.auth(client(2), &Req::new(method::ALLOCATE).udp(), &u, &k);
    assert_eq!(r.code(), 486);
    assert_eq!(
        l.stats.budget_refusals[0].load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    h.advance(600);
    assert_eq!(h.server.allocation_count(), 0);
    // Another user is not affected.
    let (ub, kb) = cred("bob", 3600);
    assert_eq!(
        h.auth(client(3), &Req::new(method::ALLOCATE).udp(), &ub, &kb)
            .code(),
        0
    );
    // A reload raising the budget admits alice again.
    let mut cfg = crate::config::Config::default();
    cfg.turn.auth_secrets = vec![SECRET.into()];
    cfg.turn.realm = REALM.into();
    cfg.turn.user_bytes_per_day = 100_000;
    let relay = vec![RelayAddr {
        local: RELAY_V4.parse().unwrap(),
        advertised: ADV_V4.parse().unwrap(),
    }];
    h.server
        .set_config(Arc::new(ServerConfig::from_config(&cfg, relay).unwrap()));
    assert_eq!(
        h.auth(client(4), &Req::new(method::ALLOCATE).udp(), &u, &k)
            .code(),
        0
    );
}
