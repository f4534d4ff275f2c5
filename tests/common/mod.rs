//! Shared helpers for the TURN integration tests: free ports, the real `tern` binary with a
//! generated config, coturn's client tools (`turnutils_peer`, `turnutils_uclient`,
//! `turnutils_stunclient`), and hand-built STUN messages. Everything runs on loopback.
#![allow(dead_code)]

pub mod scrape;
pub mod tls;

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use hmac::{Hmac, Mac};
use stun_types::attribute::{Nonce, Realm, Username};
use stun_types::message::{
    IntegrityAlgorithm, LongTermCredentials, Message, MessageWrite, MessageWriteExt,
    MessageWriteVec, Method, BINDING,
};

/// TURN Allocate (RFC 8656 §7).
pub const ALLOCATE: Method = Method::new(0x003);

/// A port free for both UDP and TCP on 127.0.0.1 (from the ephemeral range, so it never
/// collides with the relay ranges below 32768 that tests use).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// Like [`free_port`], and also free on ::1.
pub fn free_port_v4_v6() -> u16 {
    for _ in 0..100 {
        let p = free_port();
        if UdpSocket::bind(("::1", p)).is_ok() && TcpListener::bind(("::1", p)).is_ok() {
            return p;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

/// True if this machine has IPv6 loopback.
pub fn have_ipv6() -> bool {
    UdpSocket::bind("[::1]:0").is_ok()
}

/// True if coturn's client tool `name` is installed. When it is missing the test is skipped
/// locally, but fails under CI (the `CI` variable), where .ci/run must have installed it.
pub fn have_tool(name: &str) -> bool {
    have_tool_from(name, "coturn")
}

/// True if the program `name` (from the Debian package `package`) is installed; skipped
/// locally and failing under CI when it is not, as [`have_tool`].
pub fn have_tool_from(name: &str, package: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing (apt-get install {package})"
        );
        eprintln!("SKIPPED: {name} not installed (apt-get install {package})");
    }
    found
}

/// A random secret for one daemon.
pub fn random_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The TURN REST API password for `username` (base64 HMAC-SHA1 of the shared secret).
pub fn rest_password(secret: &str, username: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// How to start a daemon for one test.
pub struct TernOpts {
    /// First port of this test's private relay range (ranges must not overlap between tests
    /// that run at the same time; keep them below 32768).
    pub relay_min: u16,
    pub relay_ports: u16,
    /// Allow loopback peers (false: the default peer policy, which refuses them).
    pub allow_loopback: bool,
    /// Also listen and relay on ::1 (same port).
    pub ipv6: bool,
    /// Extra `[turn]` lines.
    pub extra_turn: String,
    /// Longest graceful drain after SIGTERM (short, so `terminate` stays quick).
    pub drain_timeout_secs: u32,
    /// Serve the HTTP API on a free loopback port, with these extra `[api]` lines
    /// (None: `[api] enabled = false`).
    pub api: Option<String>,
    /// Extra sections appended to the config (e.g. `[signal]`, `[relay_ws]`); `{api_port}`
    /// in them becomes the HTTP API port.
    pub extra_sections: String,
    /// Also listen on this IPv4 address (same port), e.g. one on a test's veth.
    pub extra_listen: Option<String>,
    /// Relay from this address instead of the loopback.
    pub relay_ip: Option<String>,
    /// Serve `/metrics`, `/healthz`, `/readyz` on a free loopback port (false: disabled).
    pub metrics: bool,
    /// The REST secret (None: a random one); nodes of one cluster share theirs.
    pub secret: Option<String>,
    /// A command (and its arguments) that runs `tern`, e.g. `setpriv` dropping capabilities
    /// (empty: run it directly).
    pub wrapper: Vec<String>,
}

impl TernOpts {
    pub fn new(relay_min: u16) -> TernOpts {
        TernOpts {
            relay_min,
            relay_ports: 400,
            allow_loopback: true,
            ipv6: false,
            // Many clients from 127.0.0.1 at once: lift the per-source limits that protect
            // a public server (the abuse tests set their own).
            extra_turn: "unauth_rate_per_sec = 5000\nunauth_burst = 5000\nuser_quota = 1000\n"
                .into(),
            drain_timeout_secs: 5,
            api: None,
            extra_sections: String::new(),
            extra_listen: None,
            relay_ip: None,
            metrics: false,
            secret: None,
            wrapper: Vec::new(),
        }
    }
}

/// A running `tern serve`, killed on drop.
pub struct Tern {
    child: Child,
    pub port: u16,
    /// The HTTP API port (0 when the API is disabled).
    pub api_port: u16,
    /// The metrics port (0 when metrics are disabled).
    pub metrics_port: u16,
    pub secret: String,
    pub dir: tempfile::TempDir,
}

impl Tern {
    pub fn start(opts: TernOpts) -> Tern {
        let dir = tempfile::tempdir().unwrap();
        let secret = opts.secret.clone().unwrap_or_else(random_secret);
        let port = if opts.ipv6 {
            free_port_v4_v6()
        } else {
            free_port()
        };
        let allowed = match (opts.allow_loopback, opts.ipv6) {
            (false, _) => "",
            (true, false) => "allowed_peer_ranges = [\"127.0.0.0/8\"]\n",
            (true, true) => "allowed_peer_ranges = [\"127.0.0.0/8\", \"::1/128\"]\n",
        };
        let (mut listen, mut relay) = if opts.ipv6 {
            (
                format!("\"127.0.0.1:{port}\", \"[::1]:{port}\""),
                "\"127.0.0.1\", \"::1\"".to_string(),
            )
        } else {
            (format!("\"127.0.0.1:{port}\""), "\"127.0.0.1\"".to_string())
        };
        if let Some(ip) = &opts.extra_listen {
            listen += &format!(", \"{ip}:{port}\"");
        }
        if let Some(ip) = &opts.relay_ip {
            relay = format!("\"{ip}\"");
        }
        let api_port = if opts.api.is_some() { free_port() } else { 0 };
        let api = match &opts.api {
            Some(lines) => format!("[api]\nlisten = \"127.0.0.1:{api_port}\"\n{lines}\n"),
            None => "[api]\nenabled = false\n".into(),
        };
        let metrics_port = if opts.metrics { free_port() } else { 0 };
        let metrics = if opts.metrics {
            format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n")
        } else {
            "[metrics]\nenabled = false\n".into()
        };
        // Each daemon keeps its usage store in its own directory (never /var/lib/tern).
        let usage = if opts.extra_sections.contains("[usage]") {
            String::new()
        } else {
            format!("[usage]\npath = {:?}\n", dir.path().join("usage.db"))
        };
        let config = format!(
            "[turn]\n\
             listen = [{listen}]\n\
             relay_ip = [{relay}]\n\
             min_port = {min}\n\
             max_port = {max}\n\
             auth_secrets = [\"{secret}\"]\n\
             {allowed}\
             workers = 2\n\
             {extra}\n\
             {api}\
             {sections}\n\
             {metrics}\
             {usage}\
             [log]\nlevel = \"info,tern=debug\"\n\
             [daemon]\npid_file = {pid:?}\ndrain_timeout_secs = {drain}\n",
            min = opts.relay_min,
            max = opts.relay_min + opts.relay_ports - 1,
            extra = opts.extra_turn,
            pid = dir.path().join("tern.pid"),
            drain = opts.drain_timeout_secs,
            // A node announcing its own HTTP address (cluster mode) names it before the
            // port is known.
            sections = opts
                .extra_sections
                .replace("{api_port}", &api_port.to_string()),
        );
        let cfg_path = dir.path().join("tern.toml");
        std::fs::write(&cfg_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("tern.log")).unwrap();
        let bin = env!("CARGO_BIN_EXE_tern");
        let mut cmd = match opts.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("serve")
            .arg("--config")
            .arg(&cfg_path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tern");
        let mut t = Tern {
            child,
            port,
            api_port,
            metrics_port,
            secret,
            dir,
        };
        t.wait_ready();
        if api_port != 0 {
            t.wait_tcp_ready(t.api_addr(), "HTTP");
        }
        if metrics_port != 0 {
            t.wait_tcp_ready(SocketAddr::from(([127, 0, 0, 1], metrics_port)), "metrics");
        }
        t
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid file the daemon writes (for `tern reload --pid-file`).
    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("tern.pid")
    }

    /// The config file the daemon was started with (tests may rewrite it and reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tern.toml")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tern.log")
    }

    /// The daemon's log so far, without terminal colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.log_path()).unwrap_or_default())
    }

    /// Waits until a STUN Binding request over UDP is answered.
    fn wait_ready(&mut self) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let req = binding_request();
        let mut buf = [0u8; 1500];
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tern exited at start ({status}):\n{}", self.log());
            }
            sock.send_to(&req, self.addr()).unwrap();
            if sock.recv_from(&mut buf).is_ok() {
                return;
            }
        }
        panic!(
            "tern did not answer a Binding request in time:\n{}",
            self.log()
        );
    }

    /// The HTTP API address (when started with `api`).
    pub fn api_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    /// Waits until a TCP listener of the daemon (`what`) accepts connections: the HTTP and
    /// metrics listeners bind after TURN answers.
    fn wait_tcp_ready(&mut self, addr: SocketAddr, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(addr).is_ok() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tern exited at start ({status}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("tern's {what} listener did not come up:\n{}", self.log());
    }

    /// Still running (not crashed)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set size in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends `sig` (e.g. `libc::SIGHUP`) to the daemon without waiting.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `limit` for the daemon to exit; its status, or `None` if still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status success.
    pub fn terminate(mut self) -> bool {
        // SAFETY: plain kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- tern log ----\n{}", self.log());
        }
    }
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `turnutils_peer`: a UDP echo peer on 127.0.0.1, killed on drop.
pub struct EchoPeer {
    child: Child,
    pub port: u16,
}

impl EchoPeer {
    pub fn start() -> EchoPeer {
        EchoPeer::start_on("127.0.0.1")
    }

    /// An echo peer listening on `ip` (a loopback address). The free port is picked before
    /// turnutils_peer binds it, so another process may take it first: then turnutils_peer
    /// exits and the peer is started again on a new port. The wait is long because a
    /// loaded 2-core machine was seen to need more than 10 s to start it.
    pub fn start_on(ip: &str) -> EchoPeer {
        let mut last_exit = None;
        for _ in 0..3 {
            let port = if ip.contains(':') {
                free_port_v4_v6()
            } else {
                free_port()
            };
            let mut child = Command::new("turnutils_peer")
                .args(["-L", ip, "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn turnutils_peer");
            // Wait until its UDP port is taken (or it has exited).
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if UdpSocket::bind((ip, port)).is_err() {
                    return EchoPeer { child, port };
                }
                if let Ok(Some(status)) = child.try_wait() {
                    last_exit = Some(status);
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("turnutils_peer did not bind {ip}:{port} in 30 s");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("turnutils_peer exited three times before binding (last: {last_exit:?})");
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The summary `turnutils_uclient` prints.
#[derive(Debug, Default, Clone)]
pub struct UclientReport {
    pub success: bool,
    pub sent: u64,
    pub received: u64,
    pub lost: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub output: String,
}

/// Runs `turnutils_uclient` against `tern` with REST credentials from its secret, the echo
/// peer on 127.0.0.1:`peer_port`, and `args` (e.g. `-m 10 -n 20 -c -s -t`). Killed if it
/// runs longer than `limit`.
pub fn uclient(tern: &Tern, peer_port: u16, args: &[&str], limit: Duration) -> UclientReport {
    uclient_at(tern, "127.0.0.1", peer_port, args, limit)
}

/// Like [`uclient`], with the server and the peer both at `ip` (127.0.0.1 or ::1).
pub fn uclient_at(
    tern: &Tern,
    ip: &str,
    peer_port: u16,
    args: &[&str],
    limit: Duration,
) -> UclientReport {
    uclient_run_port(
        &mut rest_uclient(tern),
        tern.port,
        ip,
        peer_port,
        args,
        limit,
    )
}

/// Like [`uclient`] against another listener of the daemon: `port` (its TLS port, say).
pub fn uclient_port(
    tern: &Tern,
    port: u16,
    peer_port: u16,
    args: &[&str],
    limit: Duration,
) -> UclientReport {
    uclient_run_port(
        &mut rest_uclient(tern),
        port,
        "127.0.0.1",
        peer_port,
        args,
        limit,
    )
}

/// Like [`uclient`] but with explicit long-term credentials (`-u USER -w PASSWORD`).
pub fn uclient_with(
    tern: &Tern,
    peer_port: u16,
    user: &str,
    password: &str,
    args: &[&str],
    limit: Duration,
) -> UclientReport {
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(["-u", user, "-w", password]);
    uclient_run_port(&mut cmd, tern.port, "127.0.0.1", peer_port, args, limit)
}

/// `turnutils_uclient` with REST credentials (`-W`) from the daemon's secret.
fn rest_uclient(tern: &Tern) -> Command {
    let mut cmd = Command::new("turnutils_uclient");
    cmd.args(["-W", &tern.secret, "-u", "tester"]);
    cmd
}

/// Runs `cmd` (`turnutils_uclient` with its credential options) against the TURN server
/// at `ip`:`port`, the echo peer at `ip`:`peer_port`, with `args`; killed after `limit`.
pub fn uclient_run_port(
    cmd: &mut Command,
    port: u16,
    ip: &str,
    peer_port: u16,
    args: &[&str],
    limit: Duration,
) -> UclientReport {
    cmd.args(["-p", &port.to_string(), "-e", ip])
        .args(["-r", &peer_port.to_string()])
        .args(args)
        .arg(ip)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = run_with_limit(cmd, limit);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let mut r = parse_uclient(&text);
    r.success = out.status.success();
    r.output = text;
    r
}

/// Runs `cmd`, killing it after `limit`.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd.spawn().expect("spawn");
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
        v
    });
    let err_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut v);
        }
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
        stdout: out_thread.join().unwrap(),
        stderr: err_thread.join().unwrap(),
    }
}

/// Parses uclient's closing lines: `tot_send_msgs=N, tot_recv_msgs=M`, `Total lost packets
/// N (...)`, `Average round trip delay X ms`.
pub fn parse_uclient(text: &str) -> UclientReport {
    let mut r = UclientReport::default();
    let num_after = |line: &str, key: &str| -> Option<String> {
        let i = line.find(key)? + key.len();
        Some(
            line[i..]
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect(),
        )
    };
    for line in text.lines() {
        if line.contains("tot_send_msgs=") && line.contains("tot_recv_msgs=") {
            if let Some(v) = num_after(line, "tot_send_msgs=").and_then(|s| s.parse().ok()) {
                r.sent = v;
            }
            if let Some(v) = num_after(line, "tot_recv_msgs=").and_then(|s| s.parse().ok()) {
                r.received = v;
            }
        }
        if let Some(v) = num_after(line, "Total lost packets") {
            r.lost = v.parse().ok();
        }
        if let Some(v) = num_after(line, "Average round trip delay") {
            r.rtt_ms = v.parse().ok();
        }
    }
    r
}

/// A STUN Binding request (RFC 8489 §3), no attributes.
pub fn binding_request() -> Vec<u8> {
    Message::builder_request(BINDING, MessageWriteVec::new()).finish()
}

/// REQUESTED-TRANSPORT = UDP (RFC 8656 §18.11).
pub fn requested_transport_udp() -> stun_types::attribute::RawAttribute<'static> {
    stun_types::attribute::RawAttribute::new(0x0019.into(), &[17, 0, 0, 0])
}

/// An Allocate request without credentials (the first step of RFC 8656 §7.1).
pub fn allocate_unauthenticated() -> Vec<u8> {
    let mut m = Message::builder_request(ALLOCATE, MessageWriteVec::new());
    m.add_attribute(&requested_transport_udp()).unwrap();
    m.finish()
}

/// An authenticated Allocate with USERNAME, REALM, NONCE and MESSAGE-INTEGRITY keyed with
/// `password` (RFC 8489 §9.2).
pub fn allocate_authenticated(user: &str, password: &str, realm: &str, nonce: &str) -> Vec<u8> {
    let mut m = Message::builder_request(ALLOCATE, MessageWriteVec::new());
    m.add_attribute(&requested_transport_udp()).unwrap();
    m.add_attribute(&Username::new(user).unwrap()).unwrap();
    m.add_attribute(&Realm::new(realm).unwrap()).unwrap();
    m.add_attribute(&Nonce::new(nonce).unwrap()).unwrap();
    let creds = LongTermCredentials::new(user.into(), password.into()).to_key(realm.into());
    m.add_message_integrity(&creds.into(), IntegrityAlgorithm::Sha1)
        .unwrap();
    m.finish()
}

/// The error code of a STUN error response, if it is one.
pub fn error_code(resp: &[u8]) -> Option<u16> {
    let msg = Message::from_bytes(resp).ok()?;
    let e = msg.attribute::<stun_types::attribute::ErrorCode>().ok()?;
    Some(e.code())
}

/// REALM and NONCE of a 401 response.
pub fn realm_and_nonce(resp: &[u8]) -> Option<(String, String)> {
    let msg = Message::from_bytes(resp).ok()?;
    let realm = msg.attribute::<Realm>().ok()?.realm().to_string();
    let nonce = msg.attribute::<Nonce>().ok()?.nonce().to_string();
    Some((realm, nonce))
}

/// Sends `req` over UDP from `sock` to `to` and waits (up to 5 s) for a response with the
/// same transaction id.
pub fn udp_transaction(sock: &UdpSocket, to: SocketAddr, req: &[u8]) -> Option<Vec<u8>> {
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for _ in 0..10 {
        sock.send_to(req, to).unwrap();
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) if n >= 20 && buf[8..20] == req[8..20] => {
                    return Some(buf[..n].to_vec())
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    None
}

/// Path of a file next to the test config.
pub fn in_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A minimal hand-built TURN client over UDP (RFC 8656), for the paths uclient cannot
/// aim at precisely: long-term credentials from the daemon's secret, retry on 401/438.
pub struct TurnClient {
    pub sock: UdpSocket,
    server: SocketAddr,
    user: String,
    password: String,
    realm: String,
    nonce: String,
}

impl TurnClient {
    /// Allocates a UDP relay; returns the client and its XOR-RELAYED-ADDRESS.
    pub fn allocate(tern: &Tern) -> (TurnClient, SocketAddr) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        Self::allocate_from(tern, sock, tern.addr())
    }

    /// As [`Self::allocate`] from `sock` (e.g. made in another network namespace) to the
    /// daemon's listener at `server`.
    pub fn allocate_from(
        tern: &Tern,
        sock: UdpSocket,
        server: SocketAddr,
    ) -> (TurnClient, SocketAddr) {
        let first = udp_transaction(&sock, server, &allocate_unauthenticated())
            .expect("401 to the first Allocate");
        let (realm, nonce) = realm_and_nonce(&first).expect("REALM and NONCE");
        let user = format!("{}:hand", unix_now() + 3600);
        let password = rest_password(&tern.secret, &user);
        let mut c = TurnClient {
            sock,
            server,
            user,
            password,
            realm,
            nonce,
        };
        let resp = c.request(ALLOCATE, |m| {
            m.add_attribute(&requested_transport_udp()).unwrap()
        });
        assert_eq!(error_code(&resp), None, "Allocate refused");
        let msg = Message::from_bytes(&resp).unwrap();
        let relayed = msg
            .attribute::<turn_types::attribute::XorRelayedAddress>()
            .expect("XOR-RELAYED-ADDRESS")
            .addr(msg.transaction_id());
        (c, relayed)
    }

    /// Sends an authenticated request built by `add` and returns the final response
    /// (retrying once with a fresh nonce on 438).
    pub fn request(&mut self, method: Method, add: impl Fn(&mut MessageWriteVec)) -> Vec<u8> {
        for _ in 0..2 {
            let mut m = Message::builder_request(method, MessageWriteVec::new());
            add(&mut m);
            m.add_attribute(&Username::new(&self.user).unwrap())
                .unwrap();
            m.add_attribute(&Realm::new(&self.realm).unwrap()).unwrap();
            m.add_attribute(&Nonce::new(&self.nonce).unwrap()).unwrap();
            let creds = LongTermCredentials::new(self.user.clone(), self.password.clone())
                .to_key(self.realm.clone());
            m.add_message_integrity(&creds.into(), IntegrityAlgorithm::Sha1)
                .unwrap();
            let resp = udp_transaction(&self.sock, self.server, &m.finish()).expect("answer");
            if error_code(&resp) == Some(438) {
                if let Some((realm, nonce)) = realm_and_nonce(&resp) {
                    self.realm = realm;
                    self.nonce = nonce;
                    continue;
                }
            }
            return resp;
        }
        panic!("stale nonce twice");
    }

    /// CreatePermission for `peer` (RFC 8656 §10); returns the error code, if any.
    pub fn create_permission(&mut self, peer: SocketAddr) -> Option<u16> {
        let resp = self.request(turn_types::message::CREATE_PERMISSION, |m| {
            let tid = m.transaction_id();
            m.add_attribute(&turn_types::attribute::XorPeerAddress::new(peer, tid))
                .unwrap();
        });
        error_code(&resp)
    }

    /// ChannelBind `channel` to `peer` (RFC 8656 §11); returns the error code, if any.
    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Option<u16> {
        let resp = self.request(turn_types::message::CHANNEL_BIND, |m| {
            let tid = m.transaction_id();
            m.add_attribute(&turn_types::attribute::ChannelNumber::new(channel))
                .unwrap();
            m.add_attribute(&turn_types::attribute::XorPeerAddress::new(peer, tid))
                .unwrap();
        });
        error_code(&resp)
    }

    /// Sends `payload` as ChannelData on `channel` (RFC 8656 §12.4).
    pub fn channel_data(&self, channel: u16, payload: &[u8]) {
        let mut m = channel.to_be_bytes().to_vec();
        m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        m.extend_from_slice(payload);
        self.sock.send_to(&m, self.server).unwrap();
    }
}

/// Held while a test drives headless Chromium: one browser at a time, since two would fight
/// over a 2-core machine's cores (all integration tests share one process).
pub fn browser_lock() -> MutexGuard<'static, ()> {
    static BROWSER: Mutex<()> = Mutex::new(());
    BROWSER.lock().unwrap_or_else(|e| e.into_inner())
}
