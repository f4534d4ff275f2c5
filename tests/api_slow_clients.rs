//! The real `tern serve` against slow and excess HTTP clients: slowloris clients (plain, and
//! TLS after and during the handshake) and idle keep-alive connections are closed after
//! `api.header_read_timeout_secs` while normal requests keep being answered; past
//! `api.max_connections` / `api.max_connections_per_ip` new connections are closed at
//! once and counted, and the held ones keep working; WebSocket sessions outlive the header
//! timeout. Loopback only, every loop bounded.

use crate::common;
use crate::signal_common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::scrape::{scrape_until, value};
use common::*;
use signal_common::{get, next_json, send_text, ws, TOKEN};

/// The header timeout these tests configure, and the generous bound for "eventually closed"
/// (slow machines; this is not a timing assertion on the timeout itself).
const HEADER_TIMEOUT_SECS: u64 = 2;
const CLOSED_WITHIN: Duration = Duration::from_secs(HEADER_TIMEOUT_SECS + 25);

/// A daemon with the API (and these extra `[api]` lines, which may set their own
/// `header_read_timeout_secs`) and metrics.
fn start(relay_min: u16, api_extra: &str, sections: &str) -> Tern {
    let timeout = if api_extra.contains("header_read_timeout_secs") {
        String::new()
    } else {
        format!("header_read_timeout_secs = {HEADER_TIMEOUT_SECS}\n")
    };
    let tern = Tern::start(TernOpts {
        api: Some(format!("tokens = [\"{TOKEN}\"]\n{timeout}{api_extra}")),
        extra_sections: sections.to_string(),
        metrics: true,
        ..TernOpts::new(relay_min)
    });
    // The readiness probe's connection is gone before a test counts connections.
    scrape_until(tern.metrics_port, "no HTTP connection open", |s| {
        value(s, "tern_http_connections", &[]) == 0.0
    });
    tern
}

fn closed_count(scrape: &str, reason: &str) -> f64 {
    value(
        scrape,
        "tern_http_connections_closed_total",
        &[("reason", reason)],
    )
}

/// True once the server has closed `s` (EOF or reset); any bytes it sends first (a 408) are
/// read and ignored. False if still open after `wait`.
fn closed_by_server(s: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A slowloris: a request line, then one header byte every 200 ms, never the blank line.
/// Returns how long the server took to close the connection, or `None` if it never did
/// within [`CLOSED_WITHIN`].
fn slowloris<S: Read + Write>(s: &mut S, set_timeout: impl Fn(&mut S)) -> Option<Duration> {
    let t0 = Instant::now();
    set_timeout(s);
    if s.write_all(b"GET /api/ice HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .is_err()
    {
        return Some(t0.elapsed());
    }
    let drip = b"X-Slow: aaaaaaaa\r\n";
    let mut buf = [0u8; 1024];
    for i in 0.. {
        if t0.elapsed() > CLOSED_WITHIN {
            return None;
        }
        if s.write_all(&drip[i % drip.len()..][..1]).is_err() {
            return Some(t0.elapsed());
        }
        // The read timeout paces the drip.
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(t0.elapsed()),
        }
    }
    unreachable!()
}

fn tcp_slowloris(addr: SocketAddr) -> Option<Duration> {
    let mut s = TcpStream::connect(addr).unwrap();
    slowloris(&mut s, |s| {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap()
    })
}

/// Sends one keep-alive GET on `s` and reads its response: the status.
fn keep_alive_get(s: &mut TcpStream, path: &str) -> Option<u16> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .expect("a Content-Length response");
    while raw.len() < head_end + len {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    head.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn slow_and_idle_clients_on_the_plain_listener_are_closed_while_others_are_served() {
    let tern = start(21000, "", "");
    let addr = tern.api_addr();

    // Three slowloris clients and one that never sends a byte.
    let slow: Vec<_> = (0..3)
        .map(|_| thread::spawn(move || tcp_slowloris(addr)))
        .collect();
    let mut silent = TcpStream::connect(addr).unwrap();
    // A keep-alive client: one answered request, then a second one dripped slowly (the
    // timeout applies to every request), and one that just idles after its request.
    let mut second_slow = TcpStream::connect(addr).unwrap();
    assert_eq!(keep_alive_get(&mut second_slow, "/api/ice"), Some(200));
    let mut idle = TcpStream::connect(addr).unwrap();
    assert_eq!(keep_alive_get(&mut idle, "/api/ice"), Some(200));
    let second = thread::spawn(move || {
        slowloris(&mut second_slow, |s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap()
        })
    });

    // Meanwhile a normal client is answered, again and again.
    for _ in 0..5 {
        let r = get(
            addr,
            "/api/ice",
            &[("Authorization", &format!("Bearer {TOKEN}"))],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.contains("iceServers"));
        thread::sleep(Duration::from_millis(300));
    }

    for t in slow {
        let took = t.join().unwrap();
        assert!(
            took.is_some(),
            "a slowloris was still connected after {CLOSED_WITHIN:?}"
        );
        eprintln!("plain slowloris closed after {:?}", took.unwrap());
    }
    let took = second.join().unwrap();
    assert!(
        took.is_some(),
        "a slow second request on a keep-alive connection was kept"
    );
    assert!(
        closed_by_server(&mut silent, CLOSED_WITHIN),
        "a silent connection was kept"
    );
    assert!(
        closed_by_server(&mut idle, CLOSED_WITHIN),
        "an idle keep-alive connection was kept"
    );

    let s = scrape_until(tern.metrics_port, "the timeouts counted", |s| {
        closed_count(s, "header_timeout") >= 4.0 && closed_count(s, "idle_timeout") >= 2.0
    });
    assert_eq!(value(&s, "tern_http_connections_refused_total", &[]), 0.0);
    // Still serving after all that.
    let r = get(
        addr,
        "/api/ice",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(r.status, 200);
    scrape_until(tern.metrics_port, "every connection closed", |s| {
        value(s, "tern_http_connections", &[]) == 0.0
    });
}

/// `openssl s_client` as a TLS client whose request bytes we write to its stdin.
fn s_client(port: u16) -> Child {
    Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client")
}

/// Drips a never-ending request head into `s_client`; how long until it exits (the server
/// closed the TLS connection), or `None`.
fn tls_slowloris(port: u16) -> Option<Duration> {
    let mut c = s_client(port);
    let t0 = Instant::now();
    let mut stdin = c.stdin.take().unwrap();
    let _ = stdin.write_all(b"GET /api/ice HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let drip = b"X-Slow: aaaaaaaa\r\n";
    let mut i = 0;
    let done = loop {
        if let Ok(Some(_)) = c.try_wait() {
            break Some(t0.elapsed());
        }
        if t0.elapsed() > CLOSED_WITHIN {
            break None;
        }
        let _ = stdin.write_all(&drip[i % drip.len()..][..1]);
        let _ = stdin.flush();
        i += 1;
        thread::sleep(Duration::from_millis(200));
    };
    let _ = c.kill();
    let _ = c.wait();
    done
}

fn curl_ice(port: u16) -> String {
    let o = Command::new("curl")
        .args(["-sS", "-k", "-m", "20", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!("https://127.0.0.1:{port}/api/ice"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn slow_clients_on_the_tls_listener_are_closed_while_others_are_served() {
    if !have_tool("openssl") || !have_tool("curl") {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = common::tls::self_signed(certs.path(), "api", "localhost");
    let tern = start(
        21400,
        "tls = true\n",
        &format!(
            "[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nlisten = []\n\
             handshake_timeout_secs = {HEADER_TIMEOUT_SECS}\n"
        ),
    );
    let port = tern.api_port;
    // The readiness probe (a plain TCP connect) failed its handshake; counted once.
    let before = scrape_until(tern.metrics_port, "the probe's handshake counted", |s| {
        closed_count(s, "tls_handshake") >= 1.0
    });

    // After the handshake: a slow request head.
    let slow: Vec<_> = (0..2)
        .map(|_| thread::spawn(move || tls_slowloris(port)))
        .collect();
    // During the handshake: a ClientHello that never completes (record header, then one
    // byte at a time).
    let addr = tern.api_addr();
    let hs = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
        slowloris(&mut s, |s| {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap()
        })
    });

    for _ in 0..3 {
        assert!(curl_ice(port).contains("iceServers"));
        thread::sleep(Duration::from_millis(300));
    }
    for t in slow {
        let took = t.join().unwrap();
        assert!(took.is_some(), "a TLS slowloris was still connected");
        eprintln!("TLS slowloris closed after {:?}", took.unwrap());
    }
    let took = hs.join().unwrap();
    assert!(took.is_some(), "an unfinished TLS handshake was kept");
    eprintln!("unfinished handshake closed after {:?}", took.unwrap());

    let after = scrape_until(tern.metrics_port, "TLS timeouts counted", |s| {
        closed_count(s, "header_timeout") >= closed_count(&before, "header_timeout") + 2.0
            && closed_count(s, "tls_handshake") > closed_count(&before, "tls_handshake")
    });
    // s_client's handshakes succeeded: only the stalled ClientHello failed one.
    assert_eq!(
        closed_count(&after, "tls_handshake"),
        closed_count(&before, "tls_handshake") + 1.0
    );
    assert!(curl_ice(port).contains("iceServers"));
}

fn get_scrape(tern: &Tern) -> String {
    let (status, body) = common::scrape::get(tern.metrics_port, "/metrics");
    assert_eq!(status, 200);
    body
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all local).
fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{from}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    sock.connect(&to.into()).unwrap();
    sock.into()
}

#[test]
fn connections_past_the_caps_are_closed_and_the_held_ones_served() {
    // A long header timeout: the held connections must stay open on their own.
    let tern = start(
        21800,
        "max_connections = 6\nmax_connections_per_ip = 3\nheader_read_timeout_secs = 120\n",
        "",
    );
    let addr = tern.api_addr();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", addr);
        assert_eq!(keep_alive_get(&mut s, "/api/ice"), Some(200));
        held.push(s);
    }
    // A fourth from the same address is closed right after accept ...
    let mut extra = connect_from("127.0.0.1", addr);
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(20)),
        "a connection past max_connections_per_ip was kept"
    );
    // ... while other addresses are admitted up to the total.
    for ip in ["127.0.0.2", "127.0.0.2", "127.0.0.3"] {
        let mut s = connect_from(ip, addr);
        assert_eq!(keep_alive_get(&mut s, "/api/ice"), Some(200), "from {ip}");
        held.push(s);
    }
    let mut extra = connect_from("127.0.0.4", addr);
    assert!(
        closed_by_server(&mut extra, Duration::from_secs(20)),
        "a connection past max_connections was kept"
    );

    let s = get_scrape(&tern);
    let refused = |reason| {
        value(
            &s,
            "tern_http_connections_refused_total",
            &[("reason", reason)],
        )
    };
    assert_eq!(refused("max_connections_per_ip"), 1.0, "{s}");
    assert_eq!(refused("max_connections"), 1.0, "{s}");
    assert_eq!(value(&s, "tern_http_connections", &[]), 6.0, "{s}");

    // The held connections are still served, on the same sockets.
    for s in &mut held {
        assert_eq!(keep_alive_get(s, "/api/ice"), Some(200));
    }
    // One closes: a new client gets its place (once the server has seen the close).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut s = connect_from("127.0.0.5", addr);
        if keep_alive_get(&mut s, "/api/ice") == Some(200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the freed place was never reused"
        );
        thread::sleep(Duration::from_millis(100));
    }

    // Raised caps apply on SIGHUP to new connections; the held ones stay.
    let text = std::fs::read_to_string(tern.config_path()).unwrap();
    let text = text
        .replace("max_connections = 6\n", "max_connections = 10\n")
        .replace(
            "max_connections_per_ip = 3\n",
            "max_connections_per_ip = 5\n",
        );
    std::fs::write(tern.config_path(), text).unwrap();
    tern.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tern.log().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", tern.log());
        thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.1", addr);
        assert_eq!(keep_alive_get(&mut s, "/api/ice"), Some(200));
        held.push(s);
    }
    for s in &mut held {
        assert_eq!(keep_alive_get(s, "/api/ice"), Some(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_sessions_outlive_the_header_timeout() {
    let tern = start(22200, "", "");
    let addr = tern.api_addr();
    let mut native = ws(addr, "/ws").await;
    assert_eq!(next_json(&mut native).await["type"], "welcome");
    assert_eq!(next_json(&mut native).await["type"], "room");
    let mut a = ws(addr, "/peerjs/peerjs?key=peerjs&id=peer-a&token=ta").await;
    let mut b = ws(addr, "/peerjs/peerjs?key=peerjs&id=peer-b&token=tb").await;
    assert_eq!(next_json(&mut a).await["type"], "OPEN");
    assert_eq!(next_json(&mut b).await["type"], "OPEN");

    // Quiet for well past the header timeout: an upgraded socket is no longer hyper's.
    tokio::time::sleep(Duration::from_secs(3 * HEADER_TIMEOUT_SECS)).await;

    send_text(&mut native, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut native).await["type"], "pong");
    send_text(
        &mut a,
        r#"{"type":"OFFER","dst":"peer-b","payload":{"sdp":"x"}}"#,
    )
    .await;
    let got = next_json(&mut b).await;
    assert_eq!(got["type"], "OFFER");
    assert_eq!(got["src"], "peer-a");

    // The sessions hold their connections (counted) until they end.
    let port = tern.metrics_port;
    let s = tokio::task::spawn_blocking(move || common::scrape::get(port, "/metrics").1)
        .await
        .unwrap();
    assert_eq!(value(&s, "tern_http_connections", &[]), 3.0, "{s}");
    drop((native, a, b));
    tokio::task::spawn_blocking(move || {
        scrape_until(port, "WebSocket connections released", |s| {
            value(s, "tern_http_connections", &[]) == 0.0
        })
    })
    .await
    .unwrap();
}

#[test]
fn a_client_that_stops_reading_its_responses_is_disconnected() {
    let tern = start(20400, "write_stall_timeout_secs = 2\n", "");
    let addr = tern.api_addr();
    // Pipelined requests for far more than the socket buffers hold (about 40 MiB of
    // /tern.js), through a small receive window, and then no read at all.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let requests = 2000;
    let req = "GET /tern.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(requests);
    let _ = s.write_all(req.as_bytes());

    scrape_until(tern.metrics_port, "the stalled reader cut", |m| {
        closed_count(m, "write_stall") == 1.0
    });
    // Others are served meanwhile and after.
    let r = get(
        addr,
        "/api/ice",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    assert_eq!(r.status, 200);
    // What was sent before the cut is readable, then the stream ends, well short of every
    // response.
    let (_, js) = common::scrape::get(tern.api_port, "/tern.js");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("no end of stream after {got} bytes: {e}"),
        }
    }
    assert!(
        got < requests * js.len() / 2,
        "{got} bytes: the stalled connection kept being served"
    );
}
