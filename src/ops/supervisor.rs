//! The daemon's side of systemd supervision: READY=1 once the listeners answer, STATUS=
//! lines, STOPPING=1, and WATCHDOG=1 only while a self-probe of the TURN listeners gets
//! answers (sd_notify(3), sd_watchdog_enabled(3)). Without `$NOTIFY_SOCKET` it does nothing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::notify::{self, Notifier};
use super::probe;

/// How long start-up waits for the first self-probe answer before sending READY anyway.
const READY_PROBE_WINDOW: Duration = Duration::from_secs(5);

/// Supervision state, driven from the daemon's main loop.
#[derive(Debug)]
pub struct Supervisor {
    notifier: Option<Notifier>,
    watchdog: Option<Duration>,
    targets: Vec<SocketAddr>,
    next_target: usize,
    next_ping: Instant,
    failing: bool,
    status: String,
}

impl Supervisor {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`; a malformed value is
    /// logged and supervision (or the watchdog) is left off.
    pub fn from_env() -> Supervisor {
        let notifier = Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "systemd notification disabled");
            None
        });
        let watchdog = if notifier.is_some() {
            notify::watchdog_from_env().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "systemd watchdog disabled");
                None
            })
        } else {
            None
        };
        Supervisor {
            notifier,
            watchdog,
            targets: Vec::new(),
            next_target: 0,
            next_ping: Instant::now(),
            failing: false,
            status: String::new(),
        }
    }

    /// With an explicit notifier and watchdog interval (tests, or callers that read the
    /// environment themselves).
    pub fn with(notifier: Option<Notifier>, watchdog: Option<Duration>) -> Supervisor {
        Supervisor {
            notifier,
            watchdog,
            targets: Vec::new(),
            next_target: 0,
            next_ping: Instant::now(),
            failing: false,
            status: String::new(),
        }
    }

    /// True when a service manager is listening.
    pub fn enabled(&self) -> bool {
        self.notifier.is_some()
    }

    /// The TURN listener addresses to self-probe (UDP, RFC 8489 Binding).
    pub fn watch_turn(&mut self, listen: &[SocketAddr]) {
        self.targets = listen.iter().copied().map(probe::target_for).collect();
    }

    fn send(&self, state: &str) {
        if let Some(n) = &self.notifier {
            if let Err(e) = n.notify(state) {
                tracing::debug!(error = %e, "sd_notify failed");
            }
        }
    }

    /// Sends `STATUS=text`.
    pub fn status(&mut self, text: &str) {
        self.status = text.to_string();
        self.send(&notify::status_line(text));
    }

    fn probe_once(&mut self, timeout: Duration) -> bool {
        if self.targets.is_empty() {
            return true;
        }
        let target = self.targets[self.next_target % self.targets.len()];
        self.next_target = self.next_target.wrapping_add(1);
        match probe::stun_binding(target, timeout) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "self-probe failed");
                false
            }
        }
    }

    /// Sends READY=1 with `status` once a self-probe of every TURN listener is answered (or
    /// after a few seconds without answers, logged, so a probe problem cannot block start).
    pub fn ready(&mut self, status: &str) {
        if !self.enabled() {
            return;
        }
        let deadline = Instant::now() + READY_PROBE_WINDOW;
        for i in 0..self.targets.len() {
            let target = self.targets[i];
            while probe::stun_binding(target, Duration::from_millis(500)).is_err() {
                if Instant::now() >= deadline {
                    tracing::warn!(%target, "TURN listener does not answer its self-probe; reporting ready anyway");
                    break;
                }
                // A refused probe fails at once: do not spin.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.status = status.to_string();
        self.send(&format!("READY=1\n{}", notify::status_line(status)));
        self.next_ping = Instant::now();
    }

    /// Called often from the main loop: when a watchdog ping is due, probes one TURN
    /// listener and pings only if it answered.
    pub fn tick(&mut self) {
        let Some(interval) = self.watchdog else {
            return;
        };
        let now = Instant::now();
        if now < self.next_ping {
            return;
        }
        // Ping at half the interval (sd_watchdog_enabled(3)); a probe may take a quarter.
        let probe_timeout = (interval / 4).clamp(Duration::from_millis(50), Duration::from_secs(2));
        if self.probe_once(probe_timeout) {
            self.send("WATCHDOG=1");
            if self.failing {
                self.failing = false;
                tracing::info!("TURN self-probe answered again");
                let s = self.status.clone();
                self.send(&notify::status_line(&s));
            }
            self.next_ping = now + interval / 2;
        } else {
            if !self.failing {
                self.failing = true;
                tracing::warn!("TURN self-probe unanswered; withholding watchdog pings");
                self.send(&notify::status_line(
                    "TURN listener not answering its self-probe",
                ));
            }
            // Retry soon: one lost datagram must not cost a restart.
            self.next_ping = now + (interval / 8).min(Duration::from_secs(1));
        }
    }

    /// Sends STOPPING=1 with a status line.
    pub fn stopping(&mut self, status: &str) {
        self.send(&format!("STOPPING=1\n{}", notify::status_line(status)));
    }

    /// A reload starts: RELOADING=1 with the monotonic time (sd_notify(3)); follow with
    /// [`Self::reloaded`].
    pub fn reloading(&mut self) {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// The reload is over (applied or refused): READY=1 again, with the serving status and
    /// `note` (e.g. "reload refused").
    pub fn reloaded(&mut self, note: &str) {
        let status = if note.is_empty() {
            self.status.clone()
        } else {
            format!("{}; {note}", self.status)
        };
        self.send(&format!("READY=1\n{}", notify::status_line(&status)));
    }
}

/// The STATUS= line while serving: the TURN listener addresses.
pub fn serving_status(turn: &[SocketAddr]) -> String {
    let addrs: Vec<String> = turn.iter().map(|a| a.to_string()).collect();
    format!("serving TURN on {}", addrs.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A STUN responder that answers Binding requests while `answer` is set.
    fn responder(answer: Arc<AtomicBool>, done: Arc<AtomicBool>) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !done.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if n >= 20 && answer.load(Ordering::Relaxed) {
                        buf[0..2].copy_from_slice(&0x0101u16.to_be_bytes());
                        let _ = sock.send_to(&buf[..20], from);
                    }
                }
            }
        });
        addr
    }

    fn recv(sock: &UnixDatagram) -> Option<String> {
        let mut buf = [0u8; 512];
        sock.recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    #[test]
    fn ready_then_watchdog_only_while_the_listener_answers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let answer = Arc::new(AtomicBool::new(true));
        let done = Arc::new(AtomicBool::new(false));
        let addr = responder(Arc::clone(&answer), Arc::clone(&done));

        let notifier = Notifier::new(path.to_str().unwrap()).unwrap();
        let mut sup = Supervisor::with(Some(notifier), Some(Duration::from_millis(200)));
        sup.watch_turn(&[addr]);
        sup.ready("serving");
        assert_eq!(recv(&server).as_deref(), Some("READY=1\nSTATUS=serving"));

        // Healthy: pings keep coming (bounded loop, generous limit).
        let mut pings = 0;
        for _ in 0..500 {
            sup.tick();
            while let Some(m) = recv(&server) {
                assert_eq!(m, "WATCHDOG=1");
                pings += 1;
            }
            if pings >= 3 {
                break;
            }
        }
        assert!(pings >= 3, "only {pings} watchdog pings");

        // The listener stops answering: a status line, and no ping while it stays silent.
        answer.store(false, Ordering::Relaxed);
        let mut seen = Vec::new();
        for _ in 0..30 {
            sup.tick();
            while let Some(m) = recv(&server) {
                seen.push(m);
            }
        }
        assert!(
            seen.contains(&"STATUS=TURN listener not answering its self-probe".to_string()),
            "{seen:?}"
        );
        let after = seen.iter().position(|m| m.starts_with("STATUS=")).unwrap();
        assert!(!seen[after..].iter().any(|m| m == "WATCHDOG=1"), "{seen:?}");

        // It answers again: pings resume and the serving status is restored.
        answer.store(true, Ordering::Relaxed);
        let mut back = Vec::new();
        for _ in 0..500 {
            sup.tick();
            while let Some(m) = recv(&server) {
                back.push(m);
            }
            if back.iter().any(|m| m == "WATCHDOG=1") {
                break;
            }
        }
        assert!(back.iter().any(|m| m == "WATCHDOG=1"), "{back:?}");
        assert!(back.contains(&"STATUS=serving".to_string()), "{back:?}");

        sup.stopping("bye");
        assert_eq!(recv(&server).as_deref(), Some("STOPPING=1\nSTATUS=bye"));
        done.store(true, Ordering::Relaxed);
    }

    #[test]
    fn without_a_notify_socket_nothing_is_sent_or_probed() {
        let mut sup = Supervisor::with(None, None);
        assert!(!sup.enabled());
        // A target that would time out: ready() must not wait on it without a manager.
        sup.watch_turn(&["127.0.0.1:9".parse().unwrap()]);
        sup.ready("x");
        sup.tick();
    }
}
