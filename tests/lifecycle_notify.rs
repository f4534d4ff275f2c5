//! Reload and drain as a service manager sees them (sd_notify(3)): SIGHUP sends
//! RELOADING=1 with MONOTONIC_USEC, then READY=1 with the status (noting a refused reload);
//! SIGTERM with a live allocation sends STOPPING=1 and a STATUS counting what is left.

mod common;
mod ops_common;

use std::net::UdpSocket;
use std::time::Duration;

use ops_common::{serving_addrs, NotifyAddr, Supervised};

fn signal(t: &Supervised, sig: i32) {
    // SAFETY: kill(2) on the PID of a child we started and have not reaped.
    unsafe { libc::kill(t.child.id() as i32, sig) };
}

/// Notifications until one satisfies `pred` (bounded wait).
fn until(t: &mut Supervised, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let mut seen = Vec::new();
    for _ in 0..20 {
        if let Some(m) = t.next(Duration::from_secs(1)) {
            let done = pred(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
    panic!("not seen; got {seen:?}\n{}", t.log());
}

#[test]
fn reload_and_drain_are_reported_to_the_service_manager() {
    let dir = tempfile::tempdir().unwrap();
    let secret: u64 = rand::random();
    let cfg = dir.path().join("tern.toml");
    let text = format!(
        "[turn]\nlisten = [\"127.0.0.1:0\"]\nrelay_ip = [\"127.0.0.1\"]\n\
         min_port = 32750\nmax_port = 32759\nauth_secrets = [\"{secret:x}\"]\nworkers = 2\n\
         [api]\nenabled = false\n[metrics]\nenabled = false\n\
         [daemon]\npid_file = \"\"\ndrain_timeout_secs = 600\n"
    );
    std::fs::write(&cfg, &text).unwrap();
    let mut t = Supervised::start(&cfg, &[], NotifyAddr::Path, None);
    let ready = t.until_ready();
    let addr = serving_addrs(ready.last().unwrap())[0];

    signal(&t, libc::SIGHUP);
    let seen = until(&mut t, |m| m.starts_with("READY=1"));
    assert!(
        seen.iter()
            .any(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC=")),
        "{seen:?}"
    );
    assert!(seen.last().unwrap().contains("serving TURN on"), "{seen:?}");

    std::fs::write(
        &cfg,
        text.replace("workers = 2", "workers = 2\ntotal_quota = 0"),
    )
    .unwrap();
    signal(&t, libc::SIGHUP);
    let seen = until(&mut t, |m| m.starts_with("READY=1"));
    assert!(
        seen.last().unwrap().contains("last reload refused"),
        "{seen:?}"
    );

    // A live allocation, then SIGTERM: STOPPING=1 with what the drain waits for.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let first = common::udp_transaction(&sock, addr, &common::allocate_unauthenticated()).unwrap();
    let (realm, nonce) = common::realm_and_nonce(&first).unwrap();
    let user = format!("{}:notify", common::unix_now() + 600);
    let pw = common::rest_password(&format!("{secret:x}"), &user);
    let resp = common::udp_transaction(
        &sock,
        addr,
        &common::allocate_authenticated(&user, &pw, &realm, &nonce),
    )
    .unwrap();
    assert_eq!(common::error_code(&resp), None, "{}", t.log());
    signal(&t, libc::SIGTERM);
    let seen = until(&mut t, |m| m.starts_with("STOPPING=1"));
    assert_eq!(
        seen.last().unwrap(),
        "STOPPING=1\nSTATUS=draining: 1 allocations, 0 relay sessions left"
    );
    // A second SIGTERM ends it.
    signal(&t, libc::SIGTERM);
    let (after, clean) = t.until_exit();
    assert!(clean, "{after:?}");
    assert!(
        after
            .iter()
            .any(|m| m == "STOPPING=1\nSTATUS=shutting down"),
        "{after:?}"
    );
}
