//! Issue 5's migration check, end to end: a coturn config with use-auth-secret goes through
//! `tern migrate-coturn`; the result passes `tern check-config`, starts `tern serve` (ports
//! moved to free ones), and credentials minted for coturn's secret by coturn's own client
//! (`turnutils_uclient -W SECRET`) relay traffic through it, while a wrong secret does not.

use crate::ops_common;

use std::io::Read;
use std::net::UdpSocket;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ops_common::{serving_addrs, NotifyAddr, Supervised};

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing (apt-get install coturn)"
        );
        eprintln!("SKIPPED: {tool} not installed (apt-get install coturn)");
    }
    found
}

/// Runs `cmd` to completion, killing it after `limit`.
fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// `turnutils_peer` echoing on 127.0.0.1, killed on drop.
struct Peer(Child, u16);

impl Peer {
    fn start() -> Peer {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn turnutils_peer");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            assert!(Instant::now() < deadline, "turnutils_peer did not bind");
            std::thread::sleep(Duration::from_millis(20));
        }
        Peer(child, port)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (sent, received) from uclient's `tot_send_msgs=N, tot_recv_msgs=M` line.
fn totals(text: &str) -> (u64, u64) {
    let after = |line: &str, key: &str| -> u64 {
        let i = line.find(key).unwrap() + key.len();
        line[i..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap()
    };
    text.lines()
        .rev()
        .find(|l| l.contains("tot_send_msgs=") && l.contains("tot_recv_msgs="))
        .map(|l| (after(l, "tot_send_msgs="), after(l, "tot_recv_msgs=")))
        .unwrap_or((0, 0))
}

#[test]
fn coturn_rest_config_migrates_and_serves_coturn_credentials() {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
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
    let peer = Peer::start();
    let uclient = |secret: &str| {
        let out = run_limited(
            Command::new("turnutils_uclient")
                .args(["-W", secret, "-u", "migrated", "-p", &port.to_string()])
                .args(["-e", "127.0.0.1", "-r", &peer.1.to_string()])
                .args(["-m", "2", "-n", "30", "-l", "120", "-c", "-s", "127.0.0.1"]),
            Duration::from_secs(60),
        );
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let good = uclient(&secret);
    let (sent, received) = totals(&good);
    assert!(
        sent >= 60 && received == sent,
        "coturn credentials did not relay: sent={sent} received={received}\n{good}\n{}",
        tern.log()
    );
    let bad = uclient("not-the-secret");
    let (_, received) = totals(&bad);
    assert_eq!(received, 0, "a wrong secret relayed traffic:\n{bad}");

    let (_, clean) = tern.terminate();
    assert!(clean);
}
