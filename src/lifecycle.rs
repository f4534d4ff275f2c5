//! The daemon's lifecycle: the pid file `tern reload` signals through, what a reload
//! (SIGHUP) may change live and what needs a restart, and the ready/draining state that
//! `/readyz` reports.
//!
//! Owns decisions and process-level state only. It must not open listeners or touch
//! protocol state: `daemon.rs` applies a reload to the faces, which swap their own config.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::config::{Config, ConfigError};

/// Errors of `tern reload` and the pid file.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("cannot read pid file {path}: {source} (is `tern serve` running with daemon.pid_file = {path}?)")]
    ReadPid {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pid file {0} does not hold a process id")]
    BadPid(PathBuf),
    #[error("process {pid} from {path} is not a running tern daemon (stale pid file?)")]
    NotTern { pid: i32, path: PathBuf },
    #[error("signalling process {pid}: {source}")]
    Kill { pid: i32, source: std::io::Error },
    #[error("writing pid file {path}: {source}")]
    WritePid {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Readiness as a load balancer should see it: ready once every listener serves, not
/// ready again while draining. One per process; `/readyz`, `tern_draining` and the HTTP
/// face (503 to new signaling connections) read [`STATE`]. The TURN cores keep their own
/// copy (`turn::Shared::set_draining`, set at the same moment by the daemon) because a
/// sans-IO core reads nothing outside its inputs.
#[derive(Debug)]
pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
}

/// The process's lifecycle state.
pub static STATE: Lifecycle = Lifecycle {
    ready: AtomicBool::new(false),
    draining: AtomicBool::new(false),
};

impl Lifecycle {
    /// True while the daemon serves and accepts new work (false before start-up
    /// completes and from the first SIGTERM on).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && !self.draining()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, on: bool) {
        self.ready.store(on, Ordering::Relaxed);
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }
}

/// Where the running configuration came from, so a reload layers the same way: the file
/// (re-read), and the environment and `--set` flags captured at start.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    pub sets: Vec<String>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(self.file.as_deref(), self.env.clone(), &self.sets)
    }
}

fn differs<T: Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

/// Keeps in `new` the running values of keys that only a restart can change (listeners,
/// relay addresses and ports, worker counts, routes, the relay hub, metrics, logging) and
/// returns the names of those that differed, for the "needs a restart" log line. Nothing
/// of them is applied half-way.
pub fn keep_restart_only(running: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($name:literal => $($f:ident).+;)*) => {$(
            if differs(&running.$($f).+, &new.$($f).+) {
                changed.push($name);
                new.$($f).+ = running.$($f).+.clone();
            }
        )*};
    }
    keep! {
        "turn.listen" => turn.listen;
        "turn.relay_ip" => turn.relay_ip;
        "turn.external_ip" => turn.external_ip;
        "turn.min_port" => turn.min_port;
        "turn.max_port" => turn.max_port;
        "turn.workers" => turn.workers;
        "turn.socket_buffer_bytes" => turn.socket_buffer_bytes;
        "turn.tcp_idle_timeout_secs" => turn.tcp_idle_timeout_secs;
        "turn.tcp_max_per_ip" => turn.tcp_max_per_ip;
        "api.enabled" => api.enabled;
        "api.listen" => api.listen;
        "api.listen_backlog" => api.listen_backlog;
        "api.workers" => api.workers;
        "signal.peerjs_enabled" => signal.peerjs_enabled;
        "signal.peerjs_path" => signal.peerjs_path;
        "signal.send_queue" => signal.send_queue;
        "signal.send_queue_bytes" => signal.send_queue_bytes;
        "signal.relay_ticket_ttl_secs" => signal.relay_ticket_ttl_secs;
        "relay_ws" => relay_ws;
        "metrics" => metrics;
        "log" => log;
        "daemon.pid_file" => daemon.pid_file;
        "turn.sniff_tls" => turn.sniff_tls;
        "api.tls" => api.tls;
        "tls.listen" => tls.listen;
        "tls.handshake_timeout_secs" => tls.handshake_timeout_secs;
        "usage.enabled" => usage.enabled;
        "usage.path" => usage.path;
        "usage.flush_ms" => usage.flush_ms;
        "usage.retention_days" => usage.retention_days;
        "usage.fold_anonymous" => usage.fold_anonymous;
        "usage.node_id" => usage.node_id;
        "usage.stream_maxlen" => usage.stream_maxlen;
        "usage.stream_queue" => usage.stream_queue;
    }
    changed
}

/// A config error as one log line without source excerpts or quoted values: TOML parse
/// errors quote the offending line or value (`invalid type: string "…"`), which may be a
/// secret. Key names (in backticks or before the colon) stay.
pub fn one_line(e: &ConfigError) -> String {
    let text = match e {
        ConfigError::Parse { .. } => redact_quoted(&e.to_string()),
        _ => e.to_string(),
    };
    text.lines()
        .map(str::trim)
        .filter(|l| {
            let digits = l.bytes().take_while(u8::is_ascii_digit).count();
            let excerpt = l.starts_with('|') || (digits > 0 && l[digits..].starts_with(" |"));
            !l.is_empty() && !excerpt
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `"anything"` becomes `"…"`.
fn redact_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for c in text.chars() {
        if c == '"' {
            if inside {
                out.push('…');
            }
            inside = !inside;
            out.push(c);
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// The pid file of a running daemon, removed on drop if it still names this process.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's id to `path` (mode 0644: `tern reload` may run as another
    /// user than the daemon).
    pub fn create(path: &Path) -> Result<PidFile, LifecycleError> {
        use std::os::unix::fs::OpenOptionsExt;
        let write = || -> std::io::Result<()> {
            let tmp = path.with_extension("pid.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp)?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|source| LifecycleError::WritePid {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PidFile {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Another daemon may have taken the path over since: only remove our own.
        let ours = std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `tern reload`: sends SIGHUP to the daemon named in `pid_file`, after checking that the
/// process is a tern (a stale pid file must not signal some other program).
pub fn signal_reload(pid_file: &Path) -> Result<i32, LifecycleError> {
    let text = std::fs::read_to_string(pid_file).map_err(|source| LifecycleError::ReadPid {
        path: pid_file.to_path_buf(),
        source,
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| LifecycleError::BadPid(pid_file.to_path_buf()))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.trim().starts_with("tern") {
        return Err(LifecycleError::NotTern {
            pid,
            path: pid_file.to_path_buf(),
        });
    }
    // SAFETY: kill(2) with a checked positive pid and a constant signal number.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(LifecycleError::Kill {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_keys_are_kept_and_named() {
        let running = Config::default();
        let mut new = Config::default();
        new.turn.listen = vec!["127.0.0.1:5000".parse().unwrap()];
        new.turn.max_port = 60000;
        new.turn.realm = "changed".into();
        new.turn.auth_secrets = vec!["new".into()];
        new.api.tokens = vec!["0123456789abcdef".into()];
        new.log.level = "debug".into();
        let changed = keep_restart_only(&running, &mut new);
        assert_eq!(changed, ["turn.listen", "turn.max_port", "log"]);
        assert_eq!(new.turn.listen, running.turn.listen);
        assert_eq!(new.turn.max_port, running.turn.max_port);
        assert_eq!(new.log.level, running.log.level);
        // Live keys keep their new values.
        assert_eq!(new.turn.realm, "changed");
        assert_eq!(new.turn.auth_secrets, ["new"]);
        assert_eq!(new.api.tokens.len(), 1);
        assert!(keep_restart_only(&running, &mut new).is_empty());
    }

    #[test]
    fn config_errors_become_one_line_without_source_excerpts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, "[turn]\nauth_secrets = [\"s3cr3t-value\n").unwrap();
        let e = Config::load(Some(&p), Vec::new(), &[]).unwrap_err();
        let line = one_line(&e);
        assert!(!line.contains('\n'), "{line}");
        assert!(!line.contains("s3cr3t"), "the secret leaked: {line}");
        assert!(line.contains("t.toml"), "{line}");
        std::fs::write(&p, "[turn]\nauth_secrets = \"s3cr3t-value\"\n").unwrap();
        let e = Config::load(Some(&p), Vec::new(), &[]).unwrap_err();
        let line = one_line(&e);
        assert!(!line.contains("s3cr3t"), "the secret leaked: {line}");
        std::fs::write(&p, "[turn]\nmin_port = 7000\nmax_port = 6000\n").unwrap();
        let e = Config::load(Some(&p), Vec::new(), &[]).unwrap_err();
        assert!(one_line(&e).starts_with("turn.min_port"));
    }

    #[test]
    fn pid_file_round_trip_and_stale_pids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tern.pid");
        {
            let _f = PidFile::create(&p).unwrap();
            let text = std::fs::read_to_string(&p).unwrap();
            assert_eq!(text.trim(), std::process::id().to_string());
        }
        assert!(!p.exists(), "removed on drop");
        assert!(matches!(
            signal_reload(&p),
            Err(LifecycleError::ReadPid { .. })
        ));
        std::fs::write(&p, "garbage\n").unwrap();
        assert!(matches!(signal_reload(&p), Err(LifecycleError::BadPid(_))));
        // pid 1 (init) is never signalled.
        std::fs::write(&p, "1\n").unwrap();
        assert!(matches!(signal_reload(&p), Err(LifecycleError::BadPid(_))));
        // A live process that is not tern (a stale pid file reused): refused, not signalled.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&p, format!("{}\n", other.id())).unwrap();
        let r = signal_reload(&p);
        let _ = other.kill();
        let _ = other.wait();
        assert!(matches!(r, Err(LifecycleError::NotTern { .. })), "{r:?}");
    }
}
