//! Reload and drain as a service manager sees them (sd_notify(3)): SIGHUP sends
//! RELOADING=1 with MONOTONIC_USEC, then READY=1 with the status (noting a refused reload);
//! SIGTERM with a live allocation sends STOPPING=1 and a STATUS counting what is left, and
//! `/readyz` turns 503.

use crate::common;
use crate::ops_common;

use std::net::UdpSocket;
use std::time::Duration;

use ops_common::{serving_addrs, NotifyAddr, Supervised};

/// The status line of `GET /readyz` on the metrics listener.
fn readyz(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text.lines().next().unwrap_or_default().to_string()
}

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
    let metrics = common::free_port();
    let cfg = dir.path().join("tern.toml");
    let text = format!(
        "[turn]\nlisten = [\"127.0.0.1:0\"]\nrelay_ip = [\"127.0.0.1\"]\n\
         min_port = 32750\nmax_port = 32759\nauth_secrets = [\"{secret:x}\"]\nworkers = 2\n\
         [api]\nenabled = false\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
         [daemon]\npid_file = \"\"\ndrain_timeout_secs = 600\n"
    );
    std::fs::write(&cfg, &text).unwrap();
    let mut t = Supervised::start(&cfg, &[], NotifyAddr::Path, None);
    let ready = t.until_ready();
    let addr = serving_addrs(ready.last().unwrap())[0];
    assert!(readyz(metrics).contains(" 200 "), "{}", readyz(metrics));

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
    // Load balancers see it leave.
    let status = readyz(metrics);
    assert!(status.contains(" 503 "), "/readyz while draining: {status}");
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
