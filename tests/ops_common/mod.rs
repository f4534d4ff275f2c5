//! Helpers for the deploy-kit integration tests: the real `tern serve` started under a fake
//! service manager (a `NOTIFY_SOCKET` datagram socket the test binds), read back message by
//! message. Everything runs on loopback.
#![allow(dead_code)]

use std::net::{SocketAddr, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the fake service manager listens.
pub enum NotifyAddr {
    /// A socket file in the test's temporary directory.
    Path,
    /// An abstract-namespace name (`@name` in `NOTIFY_SOCKET`).
    Abstract,
}

/// `tern serve` under a fake systemd.
pub struct Supervised {
    pub child: Child,
    pub notify: UnixDatagram,
    pub dir: tempfile::TempDir,
}

impl Supervised {
    /// Starts `tern serve --config CONFIG ARGS...` with `NOTIFY_SOCKET` (and `WATCHDOG_USEC`
    /// when `watchdog` is set) pointing at a socket this test owns.
    pub fn start(
        config: &Path,
        args: &[String],
        addr: NotifyAddr,
        watchdog: Option<Duration>,
    ) -> Supervised {
        let dir = tempfile::tempdir().unwrap();
        let (notify, name) = match addr {
            NotifyAddr::Path => {
                let p = dir.path().join("notify");
                (UnixDatagram::bind(&p).unwrap(), p.display().to_string())
            }
            NotifyAddr::Abstract => {
                let name = format!("tern-test-{}-{}", std::process::id(), rand::random::<u32>());
                let a = UnixAddr::from_abstract_name(name.as_bytes()).unwrap();
                (UnixDatagram::bind_addr(&a).unwrap(), format!("@{name}"))
            }
        };
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let log = std::fs::File::create(dir.path().join("tern.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .args(args)
            .env("NOTIFY_SOCKET", name)
            // The usage store in this test's directory, never /var/lib/tern.
            .env("TERN_USAGE__PATH", dir.path().join("usage.db"))
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(w) = watchdog {
            cmd.env("WATCHDOG_USEC", w.as_micros().to_string());
        }
        let child = cmd.spawn().expect("spawn tern serve");
        Supervised { child, notify, dir }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tern.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The next notification, waiting up to `limit`; panics (with the log) if the daemon
    /// exits first.
    pub fn next(&mut self, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("tern exited ({status}):\n{}", self.log());
            }
        }
        None
    }

    /// Messages up to and including the one with READY=1 (bounded wait).
    pub fn until_ready(&mut self) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(m) = self.next(Duration::from_secs(1)) {
                let ready = m.lines().any(|l| l == "READY=1");
                seen.push(m);
                if ready {
                    return seen;
                }
            }
        }
        panic!("no READY=1 in time; got {seen:?}\n{}", self.log());
    }

    /// Messages until the daemon exits on its own (bounded wait), and its exit success.
    pub fn until_exit(mut self) -> (Vec<String>, bool) {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                continue;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                while let Ok(n) = self.notify.recv(&mut buf) {
                    seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                return (seen, status.success());
            }
        }
        panic!("tern did not exit; sent {seen:?}\n{}", self.log());
    }

    /// SIGTERM, then the messages sent until exit and whether it exited successfully.
    pub fn terminate(mut self) -> (Vec<String>, bool) {
        // SAFETY: kill(2) on the PID of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                continue;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                while let Ok(n) = self.notify.recv(&mut buf) {
                    seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
                return (seen, status.success());
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        (seen, false)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- tern log ----\n{}", self.log());
        }
    }
}

/// The TURN addresses from a `STATUS=serving TURN on A B ...` line.
pub fn serving_addrs(msg: &str) -> Vec<SocketAddr> {
    msg.lines()
        .find_map(|l| l.strip_prefix("STATUS=serving TURN on "))
        .unwrap_or_else(|| panic!("no serving status in {msg:?}"))
        .split_whitespace()
        .map(|a| a.parse().unwrap())
        .collect()
}

/// One STUN Binding request (RFC 8489 §5 header, no attributes) answered with a Binding
/// success response carrying our transaction id, within `limit`.
pub fn binding_answered(addr: SocketAddr, limit: Duration) -> bool {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(limit)).unwrap();
    let mut req = [0u8; 20];
    req[0..2].copy_from_slice(&[0x00, 0x01]);
    req[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    let txid: [u8; 12] = rand::random();
    req[8..20].copy_from_slice(&txid);
    sock.send_to(&req, addr).unwrap();
    let mut buf = [0u8; 1500];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => n >= 20 && buf[0..2] == [0x01, 0x01] && buf[8..20] == txid,
        Err(_) => false,
    }
}
