//! The systemd notification protocol (sd_notify(3)): newline-separated `KEY=VALUE`
//! assignments sent as one datagram to the AF_UNIX socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract-namespace name when it starts with `@`).

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Errors reading the notification environment.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract name")]
    BadSocket(String),
    #[error("WATCHDOG_USEC={0:?} is not a positive integer")]
    BadWatchdog(String),
    #[error("notify socket: {0}")]
    Io(#[from] io::Error),
}

/// A connection to the service manager's notification socket.
#[derive(Debug)]
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; `Ok(None)` when it is unset or empty (not run by systemd).
    pub fn from_env() -> Result<Option<Notifier>, NotifyError> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(v) if !v.is_empty() => Notifier::new(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// For a socket name as systemd writes it: `/run/systemd/notify` or `@name`.
    pub fn new(name: &str) -> Result<Notifier, NotifyError> {
        let addr = if let Some(abs) = name.strip_prefix('@') {
            SocketAddr::from_abstract_name(abs.as_bytes())?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name)?
        } else {
            return Err(NotifyError::BadSocket(name.to_string()));
        };
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier { sock, addr })
    }

    /// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) as one datagram.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let n = self.sock.send_to_addr(state.as_bytes(), &self.addr)?;
        if n != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to notify socket",
            ));
        }
        Ok(())
    }
}

/// The watchdog interval systemd expects pings within (`$WATCHDOG_USEC`), when it is meant
/// for this process (`$WATCHDOG_PID` unset or equal to our pid), per sd_watchdog_enabled(3).
pub fn watchdog_from_env() -> Result<Option<Duration>, NotifyError> {
    watchdog_from(|k| std::env::var(k).ok(), std::process::id())
}

/// [`watchdog_from_env`] over any variable lookup (tests must not mutate the environment).
pub fn watchdog_from(
    var: impl Fn(&str) -> Option<String>,
    pid: u32,
) -> Result<Option<Duration>, NotifyError> {
    let usec = match var("WATCHDOG_USEC") {
        Some(v) if !v.is_empty() => v,
        _ => return Ok(None),
    };
    if let Some(p) = var("WATCHDOG_PID") {
        if !p.is_empty() && p.trim() != pid.to_string() {
            return Ok(None);
        }
    }
    match usec.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(Duration::from_micros(n))),
        _ => Err(NotifyError::BadWatchdog(usec)),
    }
}

/// A `STATUS=` value on one line: newlines would start a new assignment.
pub fn status_line(text: &str) -> String {
    let one: String = text
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={one}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_socket_receives_datagrams() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.notify("READY=1\nSTATUS=up").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=up");
    }

    #[test]
    fn abstract_socket_receives_datagrams() {
        let name = format!("tern-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::new(&format!("@{name}")).unwrap();
        n.notify("WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn relative_names_are_refused() {
        assert!(matches!(
            Notifier::new("run/notify"),
            Err(NotifyError::BadSocket(_))
        ));
    }

    #[test]
    fn watchdog_only_for_this_pid() {
        let env = |usec: &'static str, pid: Option<&'static str>| {
            move |k: &str| match k {
                "WATCHDOG_USEC" => Some(usec.to_string()),
                "WATCHDOG_PID" => pid.map(str::to_string),
                _ => None,
            }
        };
        let d = watchdog_from(env("30000000", None), 7).unwrap();
        assert_eq!(d, Some(Duration::from_secs(30)));
        assert_eq!(watchdog_from(env("30000000", Some("7")), 7).unwrap(), d);
        assert_eq!(watchdog_from(env("30000000", Some("8")), 7).unwrap(), None);
        assert!(watchdog_from(env("0", None), 7).is_err());
        assert!(watchdog_from(env("soon", None), 7).is_err());
        assert_eq!(watchdog_from(|_| None, 7).unwrap(), None);
    }

    #[test]
    fn status_stays_on_one_line() {
        assert_eq!(status_line("a\nb\rc"), "STATUS=a b c");
    }
}
