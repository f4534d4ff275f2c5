//! The real daemon speaks sd_notify to a fake service manager: STATUS while starting, READY=1
//! only once its TURN port answers, WATCHDOG=1 periodically when WATCHDOG_USEC is set (and
//! never when it is not), STOPPING=1 on SIGTERM; path and abstract-namespace sockets.

use crate::ops_common;

use std::time::Duration;

use ops_common::{binding_answered, serving_addrs, NotifyAddr, Supervised};

fn config(dir: &std::path::Path) -> std::path::PathBuf {
    let secret: u64 = rand::random();
    let p = dir.join("tern.toml");
    std::fs::write(
        &p,
        format!(
            "[turn]\nlisten = [\"127.0.0.1:0\"]\nrelay_ip = [\"127.0.0.1\"]\n\
             min_port = 31000\nmax_port = 31049\nauth_secrets = [\"{secret:x}\"]\nworkers = 2\n\
             [api]\nenabled = false\n[metrics]\nenabled = false\n"
        ),
    )
    .unwrap();
    p
}

#[test]
fn ready_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut t = Supervised::start(
        &cfg,
        &[],
        NotifyAddr::Path,
        Some(Duration::from_millis(400)),
    );
    let before = t.until_ready();
    assert_eq!(before[0], "STATUS=starting", "{before:?}");
    let ready = before.last().unwrap();
    assert!(ready.starts_with("READY=1\n"), "{ready:?}");
    let addrs = serving_addrs(ready);
    assert_eq!(addrs.len(), 1);
    assert_ne!(addrs[0].port(), 0, "status shows the bound port");
    // READY means the TURN port answers now, with no retry.
    assert!(
        binding_answered(addrs[0], Duration::from_secs(5)),
        "READY=1 sent but {} does not answer a Binding request",
        addrs[0]
    );

    // Watchdog pings keep coming while it serves (bounded wait, generous limit).
    let mut pings = 0;
    for _ in 0..100 {
        match t.next(Duration::from_secs(2)) {
            Some(m) if m == "WATCHDOG=1" => pings += 1,
            Some(m) => panic!("unexpected notification {m:?}"),
            None => {}
        }
        if pings >= 5 {
            break;
        }
    }
    assert!(pings >= 5, "only {pings} WATCHDOG=1 messages");

    let (after, clean) = t.terminate();
    assert!(clean, "tern did not exit cleanly on SIGTERM: {after:?}");
    assert!(
        after
            .iter()
            .any(|m| m == "STOPPING=1\nSTATUS=shutting down"),
        "{after:?}"
    );
}

#[test]
fn abstract_socket_without_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut t = Supervised::start(&cfg, &[], NotifyAddr::Abstract, None);
    let msgs = t.until_ready();
    let addrs = serving_addrs(msgs.last().unwrap());
    assert!(binding_answered(addrs[0], Duration::from_secs(5)));
    // Serving traffic for a while: no watchdog pings were asked for, none arrive.
    for _ in 0..20 {
        assert!(binding_answered(addrs[0], Duration::from_secs(5)));
    }
    let (after, clean) = t.terminate();
    assert!(clean);
    assert!(!after.iter().any(|m| m.contains("WATCHDOG")), "{after:?}");
}

#[test]
fn start_failure_is_reported_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // The TURN port is taken: the daemon cannot start and must say why before exiting.
    let busy = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let args = vec![
        "--set".to_string(),
        format!("turn.listen=[\"127.0.0.1:{port}\"]"),
    ];
    let t = Supervised::start(&cfg, &args, NotifyAddr::Path, None);
    let (msgs, clean) = t.until_exit();
    assert!(!clean, "tern exited successfully with its port taken");
    assert!(!msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    let last = msgs.last().expect("no notification at all");
    assert!(
        last.starts_with("STATUS=failed to start: ") && last.contains(&port.to_string()),
        "{msgs:?}"
    );
}
