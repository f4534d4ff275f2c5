//! Reload against the real daemon (issue 4): SIGHUP and `tern reload` re-read the config
//! file; a rotated secret stops new allocations with the old one (401) while a relay
//! running across the reload loses nothing; a broken file is refused with one log line
//! naming the key and the old config stays; listener changes are reported as needing a
//! restart, not applied.

use crate::common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const LIMIT: Duration = Duration::from_secs(90);

fn all_echoed(r: &UclientReport) -> bool {
    r.sent > 0 && r.received == r.sent && r.lost == Some(0)
}

/// uclient with REST credentials minted from `secret` (as an HTTP API would).
fn uclient_secret(tern: &Tern, peer: u16, secret: &str, args: &[&str]) -> UclientReport {
    let user = format!("{}:tester", unix_now() + 3600);
    let pw = rest_password(secret, &user);
    uclient_with(tern, peer, &user, &pw, args, LIMIT)
}

/// Rewrites the daemon's config file, replacing `from` with `to`.
fn edit_config(tern: &Tern, from: &str, to: &str) {
    let text = std::fs::read_to_string(tern.config_path()).unwrap();
    assert!(text.contains(from), "{from:?} not in the config");
    std::fs::write(tern.config_path(), text.replace(from, to)).unwrap();
}

/// Waits until the log holds `n` occurrences of `what`.
fn wait_log(tern: &Tern, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while tern.log().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            tern.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tern_reload(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("reload")
        .args(args)
        .env_remove("TERN_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn sighup_rotates_the_secret_without_touching_a_running_relay() {
    if !have_tool("turnutils_uclient") {
        return;
    }
    let mut opts = TernOpts::new(32400);
    opts.relay_ports = 100;
    let tern = Tern::start(opts);
    let peer = EchoPeer::start();
    let old = tern.secret.clone();
    let new = random_secret();
    let running = std::thread::scope(|s| {
        // 2 clients x 250 channel messages, 20 ms apart: about 5 s, across the reload.
        let run = s.spawn(|| uclient(&tern, peer.port, &["-m", "2", "-n", "250", "-c"], LIMIT));
        wait_log(&tern, "allocation created", 2);
        std::thread::sleep(Duration::from_millis(500));
        edit_config(&tern, &old, &new);
        tern.signal(libc::SIGHUP);
        wait_log(&tern, "configuration reloaded", 1);
        run.join().unwrap()
    });
    assert!(
        running.sent >= 500 && all_echoed(&running),
        "the relay running across the reload lost packets: sent={} received={} lost={:?}\n{}",
        running.sent,
        running.received,
        running.lost,
        running.output
    );
    eprintln!(
        "relay across SIGHUP: sent={} received={} lost={:?}",
        running.sent, running.received, running.lost
    );
    // New allocations: the old secret is refused, the new one relays.
    let stale = uclient_secret(&tern, peer.port, &old, &["-n", "5", "-c"]);
    assert_eq!(
        stale.received, 0,
        "the removed secret still allocates:\n{}",
        stale.output
    );
    // Refused by authentication (401), not by anything else.
    assert!(
        tern.log().contains("authentication failed"),
        "{}",
        tern.log()
    );
    let fresh = uclient_secret(&tern, peer.port, &new, &["-n", "20", "-c"]);
    assert!(
        all_echoed(&fresh),
        "the new secret does not relay:\n{}",
        fresh.output
    );
    let log = tern.log();
    assert!(
        !log.contains(&new) && !log.contains(&old),
        "a secret reached the log"
    );
}

#[test]
fn a_broken_config_is_refused_and_the_old_one_stays() {
    if !have_tool("turnutils_uclient") {
        return;
    }
    let mut opts = TernOpts::new(32500);
    opts.relay_ports = 100;
    let tern = Tern::start(opts);
    let peer = EchoPeer::start();
    let good = std::fs::read_to_string(tern.config_path()).unwrap();
    let new = random_secret();

    // A bad value with a new secret: nothing of it applies, one line names the key.
    edit_config(&tern, "workers = 2", "workers = 2\ntotal_quota = 0");
    edit_config(&tern, &tern.secret.clone(), &new);
    tern.signal(libc::SIGHUP);
    wait_log(&tern, "reload refused", 1);
    let refused: Vec<_> = tern
        .log()
        .lines()
        .filter(|l| l.contains("reload refused"))
        .map(str::to_string)
        .collect();
    assert_eq!(refused.len(), 1);
    assert!(refused[0].contains("turn.total_quota"), "{}", refused[0]);

    // A TOML syntax error holding a secret: refused, and the secret is not logged.
    let leaked = "not-a-secret-for-logs-0123456789";
    std::fs::write(
        tern.config_path(),
        good.replace(
            "workers = 2",
            &format!("workers = 2\nauth_secrets = [\"{leaked}\""),
        ),
    )
    .unwrap();
    // `tern reload` checks the file first and leaves the daemon alone.
    let cfg = tern.config_path();
    let pid = tern.pid_file();
    let out = tern_reload(&[
        "--config",
        cfg.to_str().unwrap(),
        "--pid-file",
        pid.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reloading"));
    // Signalled anyway (the pid file alone): the daemon refuses it too.
    let out = tern_reload(&["--pid-file", pid.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    wait_log(&tern, "reload refused", 2);
    assert!(
        !tern.log().contains(leaked),
        "a config excerpt reached the log"
    );

    // The old secret still allocates and relays.
    let r = uclient(&tern, peer.port, &["-n", "20", "-c"], LIMIT);
    assert!(all_echoed(&r), "the old config is gone:\n{}", r.output);
    assert!(!tern.log().contains("configuration reloaded"));
}

#[test]
fn tern_reload_applies_live_keys_and_reports_restart_only_ones() {
    if !have_tool("turnutils_uclient") {
        return;
    }
    let mut opts = TernOpts::new(32600);
    opts.relay_ports = 50;
    let tern = Tern::start(opts);
    let peer = EchoPeer::start();
    let new = random_secret();
    let port = tern.port.to_string();
    let other = free_port().to_string();
    edit_config(&tern, &tern.secret.clone(), &new);
    edit_config(
        &tern,
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{other}"),
    );
    let pid = tern.pid_file();
    let out = tern_reload(&["--pid-file", pid.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("reload requested"));
    wait_log(&tern, "configuration reloaded", 1);
    let log = tern.log();
    let restart = log
        .lines()
        .find(|l| l.contains("need a restart"))
        .unwrap_or_else(|| panic!("no restart line:\n{log}"));
    assert!(restart.contains("turn.listen"), "{restart}");
    // The listener stays where it was; the secret changed.
    let fresh = uclient_secret(&tern, peer.port, &new, &["-n", "20", "-c"]);
    assert!(all_echoed(&fresh), "{}", fresh.output);
    let stale = uclient(&tern, peer.port, &["-n", "5", "-c"], LIMIT);
    assert_eq!(stale.received, 0, "{}", stale.output);
}

#[test]
fn certbot_deploy_hook_installs_the_certificate_and_reloads() {
    use std::os::unix::fs::PermissionsExt;
    let mut opts = TernOpts::new(32700);
    opts.relay_ports = 50;
    let tern = Tern::start(opts);
    let lineage = tern.dir.path().join("live");
    std::fs::create_dir(&lineage).unwrap();
    std::fs::write(lineage.join("fullchain.pem"), "CHAIN\n").unwrap();
    std::fs::write(lineage.join("privkey.pem"), "KEY\n").unwrap();
    let tls = tern.dir.path().join("tls");
    // The daemon's config names its pid file; the hook finds the daemon through it.
    let out = Command::new("sh")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/certbot-deploy-hook.sh"
        ))
        .env("RENEWED_LINEAGE", &lineage)
        .env("TERN_TLS_DIR", &tls)
        .env("TERN_GROUP", "root")
        .env("TERN_BIN", env!("CARGO_BIN_EXE_tern"))
        .env("TERN_CONFIG_FILE", tern.config_path())
        .env_remove("TERN_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for (f, body) in [("fullchain.pem", "CHAIN\n"), ("privkey.pem", "KEY\n")] {
        let p = tls.join(f);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), body);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640, "{f} is mode {mode:o}");
    }
    wait_log(&tern, "configuration reloaded", 1);
}
