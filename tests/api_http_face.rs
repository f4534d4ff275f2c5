//! The real `tern serve`'s HTTP face under hostile and bursty clients: a connect burst is
//! queued by the listen backlog (no SYN dropped and retried), a request head over
//! `api.max_header_bytes` gets 431 and is counted, a header flood costs a bounded amount
//! of memory, PeerJS routes answer CORS preflights as the `peer` server does, and the log
//! written to a file or a pipe carries no terminal colour codes. Loopback only, every loop
//! bounded.

use crate::common;
use crate::signal_common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::scrape::{get as scrape_get, scrape_until, value};
use common::*;
use signal_common::{request, TOKEN};

/// A daemon with the API (these extra `[api]` lines) and metrics.
fn start(relay_min: u16, api_extra: &str) -> Tern {
    let mut opts = TernOpts::new(relay_min);
    opts.relay_ports = 100;
    opts.api = Some(format!("tokens = [\"{TOKEN}\"]\n{api_extra}"));
    opts.metrics = true;
    let tern = Tern::start(opts);
    // The readiness probe's connection is gone before a test counts connections.
    scrape_until(tern.metrics_port, "no HTTP connection open", |s| {
        value(s, "tern_http_connections", &[]) == 0.0
    });
    tern
}

fn too_large_count(scrape: &str) -> f64 {
    value(
        scrape,
        "tern_http_connections_closed_total",
        &[("reason", "header_too_large")],
    )
}

fn somaxconn() -> String {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// 2000 connections, 500 started at once, then the next 500: with a backlog of 128 (std's
/// `TcpListener::bind`) the kernel drops SYNs past the queue and the client retries after
/// a second; with the backlog at the system's maximum every connect completes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_burst_opens_without_syn_retries() {
    const BATCH: usize = 500;
    const TOTAL: usize = 2000;
    let tern = tokio::task::spawn_blocking(|| start(21400, "max_connections_per_ip = 4000\n"))
        .await
        .unwrap();
    let addr = tern.api_addr();
    let mut held = Vec::with_capacity(TOTAL);
    let mut times = Vec::with_capacity(TOTAL);
    for _ in 0..TOTAL / BATCH {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..BATCH {
            set.spawn(async move {
                let t0 = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect(addr),
                )
                .await;
                (t0.elapsed(), r)
            });
        }
        while let Some(j) = set.join_next().await {
            let (took, r) = j.unwrap();
            let s = r
                .expect("connect finished within 10 s")
                .expect("connect succeeded");
            times.push(took);
            held.push(s);
        }
    }
    times.sort();
    let slow = times
        .iter()
        .filter(|t| **t > Duration::from_millis(900))
        .count();
    eprintln!(
        "somaxconn={} connects={} median={:?} p99={:?} max={:?} over 900 ms: {slow}",
        somaxconn(),
        times.len(),
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times[times.len() - 1],
    );
    assert_eq!(
        slow, 0,
        "connects waited for a SYN retry (the listen backlog overflowed)"
    );
    // The daemon really accepted and holds them all (none refused by a cap).
    let port = tern.metrics_port;
    tokio::task::spawn_blocking(move || {
        scrape_until(port, "all burst connections held", |s| {
            value(s, "tern_http_connections", &[]) == TOTAL as f64
        })
    })
    .await
    .unwrap();
    drop(held);
}

/// Sends `GET /api/ice` with one header of `header_bytes` and reads the status line (the
/// header is written on another thread: the server may answer before reading it all).
fn status_with_header(addr: SocketAddr, header_bytes: usize) -> Option<u16> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let head = format!(
            "GET /api/ice HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Connection: close\r\nCookie: c={}\r\n\r\n",
            "a".repeat(header_bytes)
        );
        // A server that refuses early resets the rest of the upload: not an error here.
        let _ = w.write_all(head.as_bytes());
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(2).any(|w| w == b"\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let _ = writer.join();
    let line = String::from_utf8_lossy(&raw).to_string();
    line.split(' ').nth(1).and_then(|c| c.parse().ok())
}

#[test]
fn a_request_head_over_the_cap_gets_431_and_is_counted() {
    let tern = start(21500, "");
    let addr = tern.api_addr();
    // Well under the default 16 KiB: served.
    assert_eq!(status_with_header(addr, 12 * 1024), Some(200));
    // A 100 KB cookie: refused before it is buffered.
    assert_eq!(status_with_header(addr, 100 * 1000), Some(431));
    // Just over the cap too.
    assert_eq!(status_with_header(addr, 17 * 1024), Some(431));
    let s = scrape_until(tern.metrics_port, "two header_too_large closes", |s| {
        too_large_count(s) == 2.0
    });
    assert_eq!(
        value(&s, "tern_http_connections_closed_total", &[]),
        2.0,
        "only the oversized heads were closed by Tern"
    );
    assert_eq!(
        value(
            &s,
            "tern_http_requests_total",
            &[("route", "unparsed"), ("status", "431")]
        ),
        2.0
    );

    // The cap is a setting.
    let tern = start(21600, "max_header_bytes = 131072\n");
    assert_eq!(status_with_header(tern.api_addr(), 100 * 1000), Some(200));
    assert_eq!(status_with_header(tern.api_addr(), 140 * 1000), Some(431));
}

/// 250 connections from one address each send (or try to) an unfinished 380 KB header
/// block and stay open. hyper's default buffer (~400 KB a connection) grew the daemon by
/// about 94 MiB under this load; capped, each connection costs at most the header cap.
#[test]
fn a_header_flood_grows_memory_by_little() {
    const CONNS: usize = 250;
    const BLOCK: usize = 380 * 1000;
    // Raise the per-IP cap past the flood, so every connection reaches hyper.
    let tern = start(
        21700,
        "max_connections_per_ip = 1000\nheader_read_timeout_secs = 60\n",
    );
    let addr = tern.api_addr();
    // Warm up: runtime threads, a refused head and a served request have run once.
    assert_eq!(status_with_header(addr, 100), Some(200));
    assert_eq!(status_with_header(addr, 20 * 1024), Some(431));
    scrape_until(tern.metrics_port, "warm-up done", |s| {
        too_large_count(s) == 1.0 && value(s, "tern_http_connections", &[]) == 0.0
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = tern.rss_kib();

    let mut head = b"GET /api/ice HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: ".to_vec();
    head.resize(BLOCK, b'a');
    let mut conns: Vec<(TcpStream, usize, bool)> = (0..CONNS)
        .map(|_| {
            let s = TcpStream::connect(addr).unwrap();
            s.set_nonblocking(true).unwrap();
            (s, 0, false)
        })
        .collect();
    // Write round-robin until every block is sent or refused; sample RSS as we go.
    let mut peak = before;
    let deadline = Instant::now() + Duration::from_secs(60);
    while conns.iter().any(|(_, sent, done)| !done && *sent < BLOCK) {
        assert!(Instant::now() < deadline, "flood did not finish in 60 s");
        let mut progress = false;
        for (s, sent, done) in conns.iter_mut().filter(|c| !c.2 && c.1 < BLOCK) {
            match s.write(&head[*sent..]) {
                Ok(n) => {
                    *sent += n;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // Refused (431, then closed): the rest is not sent.
                Err(_) => *done = true,
            }
        }
        peak = peak.max(tern.rss_kib());
        if !progress {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // hyper reads what the kernel buffered after the writes are done: keep sampling until
    // every connection is refused, then a little longer.
    let mut refused = 0.0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && refused < 1.0 + CONNS as f64 {
        peak = peak.max(tern.rss_kib());
        refused = too_large_count(&scrape_get(tern.metrics_port, "/metrics").1);
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(tern.rss_kib());
    }
    let grown = peak.saturating_sub(before);
    eprintln!(
        "header flood: {CONNS} connections x {BLOCK} bytes: RSS {before} KiB -> peak {peak} KiB (+{grown} KiB)"
    );
    assert!(
        grown < 16 * 1024,
        "RSS grew by {grown} KiB under the header flood"
    );
    // Every connection was refused by the header cap (none by a connection cap).
    assert_eq!(
        refused,
        1.0 + CONNS as f64,
        "flood connections not refused with 431"
    );
    let s = scrape_get(tern.metrics_port, "/metrics").1;
    assert_eq!(
        value(&s, "tern_http_connections_refused_total", &[]),
        0.0,
        "a connection cap refused flood connections: the test would measure nothing"
    );
    drop(conns);
}

#[test]
fn peerjs_routes_answer_cors_preflights_like_peer() {
    let svc = signal_common::start("", "");
    let a = svc.local_addr();
    for path in [
        "/peerjs",
        "/peerjs/",
        "/peerjs/peerjs/id",
        "/peerjs/peerjs/peers",
        "/peerjs/peerjs?key=peerjs&id=x&token=t",
    ] {
        let r = request(
            a,
            "OPTIONS",
            path,
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "content-type,x-peer"),
            ],
        );
        assert_eq!(r.status, 204, "{path}: {}", r.body);
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.example"),
            "{path}"
        );
        assert_eq!(
            r.header("access-control-allow-methods"),
            Some("GET,HEAD,PUT,PATCH,POST,DELETE"),
            "{path}"
        );
        assert_eq!(
            r.header("access-control-allow-headers"),
            Some("content-type,x-peer"),
            "{path}"
        );
        assert!(r.body.is_empty(), "{path}");
    }
    // The credential routes keep their own origin rules: a foreign page's preflight is
    // refused there.
    let r = request(
        a,
        "OPTIONS",
        "/api/ice",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "GET"),
        ],
    );
    assert_eq!(r.status, 403);
    assert!(r.header("access-control-allow-origin").is_none());
}

/// True if `text` holds an escape sequence (ESC, 0x1b).
fn has_escape(text: &[u8]) -> bool {
    text.contains(&0x1b)
}

#[test]
fn logs_to_a_file_or_a_pipe_carry_no_colour_codes() {
    // A file: the harness sends the daemon's stderr to one.
    let tern = start(21800, "");
    // A 431 adds a debug line from the HTTP face.
    assert_eq!(status_with_header(tern.api_addr(), 20 * 1024), Some(431));
    let logged = std::fs::read(tern.log_path()).unwrap();
    let text = String::from_utf8_lossy(&logged);
    assert!(text.contains("INFO"), "no log lines in the file:\n{text}");
    assert!(
        !has_escape(&logged),
        "escape sequences in a log file:\n{text:?}"
    );
    let config = std::fs::read_to_string(tern.config_path()).unwrap();
    assert!(tern.terminate(), "daemon did not stop cleanly");

    // A pipe: the same config, a fresh daemon (its own pid file) with stderr piped.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tern.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("serve")
        .arg("--config")
        .arg(&cfg)
        .arg("--set")
        .arg(format!("daemon.pid_file={:?}", dir.path().join("tern.pid")))
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    let err = child.stderr.take().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut err = std::io::BufReader::new(err);
        let mut out = Vec::new();
        loop {
            let at = out.len();
            match std::io::BufRead::read_until(&mut err, b'\n', &mut out) {
                Ok(0) | Err(_) => return out,
                Ok(_) if out[at..].windows(19).any(|w| w == b"HTTP API and signal") => {
                    let _ = started_tx.send(());
                }
                Ok(_) => {}
            }
        }
    });
    // Once it has started and logged, stop it (SIGTERM: a clean drain logs more lines).
    let started = started_rx.recv_timeout(Duration::from_secs(30)).is_ok();
    // SAFETY: kill(2) on the PID of the child started above, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let piped = reader.join().unwrap();
    let text = String::from_utf8_lossy(&piped);
    assert!(started, "the daemon did not log its start:\n{text}");
    assert!(
        text.contains("INFO"),
        "no log lines through the pipe:\n{text}"
    );
    assert!(
        !has_escape(&piped),
        "escape sequences in a piped log:\n{text:?}"
    );
}
