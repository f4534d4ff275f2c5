//! Issue 5's migration check, end to end: a coturn config with use-auth-secret goes through
//! `tern migrate-coturn`; the result passes `tern check-config`, starts `tern serve` (ports
//! moved to free ones), and credentials minted for coturn's secret by coturn's own client
//! (`turnutils_uclient -W SECRET`) relay traffic through it, while a wrong secret does not.

use crate::common;
use crate::ops_common;

use std::process::Command;
use std::time::Duration;

use common::{have_tool, uclient_run_port, EchoPeer};
use ops_common::{serving_addrs, NotifyAddr, Supervised};

#[test]
fn coturn_rest_config_migrates_and_serves_coturn_credentials() {
    if !have_tool("turnutils_uclient") || !have_tool("turnutils_peer") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("coturn-{:x}", rand::random::<u64>());
    let coturn = dir.path().join("turnserver.conf");
    std::fs::write(
        &coturn,
        format!(
            "# a typical coturn setup for a web app backend that mints REST credentials\n\
             listening-port=3478\n\
             tls-listening-port=5349\n\
             listening-ip=127.0.0.1\n\
             relay-ip=127.0.0.1\n\
             min-port=31100\n\
             max-port=31199\n\
             realm=migrate.example.org\n\
             fingerprint\n\
             lt-cred-mech\n\
             use-auth-secret\n\
             static-auth-secret={secret}\n\
             total-quota=100\n\
             user-quota=20\n\
             stale-nonce=600\n\
             allow-loopback-peers\n\
             no-multicast-peers\n\
             no-cli\n\
             no-tlsv1\n\
             log-file=/var/log/turnserver.log\n\
             simple-log\n"
        ),
    )
    .unwrap();

    // 1. Migrate, with the secret moved to a file.
    let secret_file = dir.path().join("secret");
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("migrate-coturn")
        .arg(&coturn)
        .arg("--secret-file")
        .arg(&secret_file)
        .output()
        .unwrap();
    let toml_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{toml_text}\n{stderr}");
    assert!(!toml_text.contains(&secret), "secret printed:\n{toml_text}");
    for opt in [
        "tls-listening-port",
        "fingerprint",
        "stale-nonce",
        "log-file",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("not carried over: ") && l.contains(opt)),
            "{opt} not reported:\n{stderr}"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&secret_file).unwrap().permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);
    let cfg = dir.path().join("tern.toml");
    std::fs::write(&cfg, &toml_text).unwrap();

    // 2. check-config accepts it as is.
    let check = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    // 3. Serve it, with the listener moved to a free port (and the HTTP listener off).
    let overrides: Vec<String> = [
        "turn.listen=[\"127.0.0.1:0\"]",
        "api.enabled=false",
        "metrics.enabled=false",
        // uclient leaves its allocations to expire; a short drain keeps the SIGTERM quick.
        "daemon.drain_timeout_secs=1",
    ]
    .iter()
    .flat_map(|s| ["--set".to_string(), s.to_string()])
    .collect();
    let mut tern = Supervised::start(&cfg, &overrides, NotifyAddr::Path, None);
    let ready = tern.until_ready();
    let port = serving_addrs(ready.last().unwrap())[0].port();

    // 4. coturn's client mints credentials from coturn's secret (-W) and relays through Tern
    // (Send indications, -s: what is under test is the credential, not the framing).
    let peer = EchoPeer::start();
    let uclient = |secret: &str| {
        let mut cmd = Command::new("turnutils_uclient");
        cmd.args(["-W", secret, "-u", "migrated"]);
        let args = ["-m", "2", "-n", "30", "-l", "120", "-c", "-s"];
        uclient_run_port(
            &mut cmd,
            port,
            "127.0.0.1",
            peer.port,
            &args,
            Duration::from_secs(60),
        )
    };
    let good = uclient(&secret);
    assert!(
        good.sent >= 60 && good.received == good.sent,
        "coturn credentials did not relay: sent={} received={}\n{}\n{}",
        good.sent,
        good.received,
        good.output,
        tern.log()
    );
    let bad = uclient("not-the-secret");
    assert_eq!(
        bad.received, 0,
        "a wrong secret relayed traffic:\n{}",
        bad.output
    );

    let (_, clean) = tern.terminate();
    assert!(clean);
}
