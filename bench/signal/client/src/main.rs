//! PeerJS-protocol signaling load client (bench/signal): the same load against Tern's
//! `/peerjs` and the `peer` npm server, cheap enough per message that the server, not the
//! client, is what is measured on a 2-core box (the Node client saturates first).
//!
//! Connects `--peers` clients, `--batch` at a time (the connect ramp: opens/s and opens
//! slower than 900 ms, i.e. SYN retries), from `--addrs` loopback addresses 127.0.0.2...,
//! holds them, then drives one shape for `--secs` seconds:
//! - `offer`: `--pairs` sender->receiver pairs, `--window` OFFERs in flight per pair, each
//!   carrying `--bytes` of SDP; the receiver answers each with an ANSWER of the same size
//!   (closed loop); the other peers are held idle.
//! - `bounce`: every pair bounces CANDIDATEs (`--window` in flight), the original shape.
//! - `idle`: connect, measure memory, exit.
//!
//! Each message carries its send time; a delivery's latency is measured in this process
//! (one clock). Prints one JSON line. Bounded: at most 19,000 sockets, 120 s of load,
//! loopback URLs only; it starts no process.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{client_async, WebSocketStream};

type Ws = WebSocketStream<TcpStream>;

/// Latency histogram: 10 µs buckets up to 5 s, then one overflow bucket.
const BUCKET_US: u64 = 10;
const BUCKETS: usize = 500_000;

struct Stats {
    delivered: AtomicU64,
    hist: Vec<AtomicU64>,
    closed_early: AtomicU64,
}

static EPOCH: OnceLock<Instant> = OnceLock::new();
fn now_us() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

struct Args {
    host: SocketAddr,
    /// Two-node mode (`--url2`): odd peers connect here, so each pair spans the nodes.
    host2: Option<SocketAddr>,
    pid2: u32,
    /// Two-node mode: the redis-server between the nodes (its CPU per message).
    redis_pid: u32,
    path: String,
    key: String,
    pid: u32,
    peers: usize,
    batch: usize,
    addrs: u8,
    kind: String,
    pairs: usize,
    window: usize,
    bytes: usize,
    secs: u64,
    threads: usize,
}

fn args() -> Args {
    let mut a = std::collections::HashMap::new();
    let v: Vec<String> = std::env::args().skip(1).collect();
    for w in v.chunks(2) {
        if let [k, val] = w {
            a.insert(k.trim_start_matches("--").to_string(), val.clone());
        }
    }
    let get = |k: &str, d: &str| a.get(k).cloned().unwrap_or_else(|| d.to_string());
    let url = get("url", "");
    // ws://127.x.y.z:PORT/path
    let rest = url
        .strip_prefix("ws://")
        .expect("--url ws://127.0.0.1:PORT/path");
    let (hp, path) = rest.split_at(rest.find('/').expect("a path"));
    let host: SocketAddr = hp.parse().expect("--url host must be an IP:port");
    assert!(host.ip().is_loopback(), "loopback URLs only");
    let host2 = a.get("url2").map(|u| {
        let rest = u.strip_prefix("ws://").expect("--url2 ws://127.0.0.1:PORT/path");
        let h: SocketAddr = rest[..rest.find('/').expect("a path")]
            .parse()
            .expect("--url2 host must be an IP:port");
        assert!(h.ip().is_loopback(), "loopback URLs only");
        h
    });
    let peers: usize = get("peers", "5000").parse().unwrap();
    let kind = get("kind", "offer");
    Args {
        host,
        host2,
        pid2: get("pid2", "0").parse().unwrap(),
        redis_pid: get("redis-pid", "0").parse().unwrap(),
        path: path.to_string(),
        key: get("key", "peerjs"),
        pid: get("pid", "0").parse().unwrap(),
        peers: peers.min(19_000) & !1,
        batch: get("batch", "200").parse::<usize>().unwrap().max(1),
        addrs: get("addrs", "4").parse::<u8>().unwrap().clamp(1, 200),
        pairs: get("pairs", if kind == "bounce" { "1000000" } else { "200" })
            .parse()
            .unwrap(),
        kind,
        window: get("window", "8").parse().unwrap(),
        bytes: get("bytes", "1000").parse().unwrap(),
        secs: get("secs", "15").parse::<u64>().unwrap().min(120),
        threads: get("threads", "2").parse().unwrap(),
    }
}

fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let l = s.lines().find(|l| l.starts_with(field))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) used by `pid` ("self" for this process).
fn cpu_secs(pid: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit_once(") ")
        .map(|x| x.1)
        .unwrap_or("")
        .split(' ')
        .collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

async fn open(a: &Args, i: usize, id: &str) -> Result<Ws, String> {
    let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % a.addrs as usize) as u8));
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(local, 0))
        .map_err(|e| e.to_string())?;
    let host = match a.host2 {
        Some(h) if i % 2 == 1 => h,
        _ => a.host,
    };
    let s = sock.connect(host).await.map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let url = format!(
        "ws://{}{}?key={}&id={id}&token=t{i}&version=1.5.5",
        host, a.path, a.key
    );
    let (mut ws, _) = client_async(url, s).await.map_err(|e| e.to_string())?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"OPEN\"") => return Ok(ws),
            Some(Ok(Message::Text(t))) => return Err(t.to_string()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed".into()),
        }
    }
}

fn msg(kind: &str, offer_side: bool, dst: &str, sdp: &str) -> Message {
    let t = now_us();
    let text = if kind == "offer" {
        let (ty, lower) = if offer_side {
            ("OFFER", "offer")
        } else {
            ("ANSWER", "answer")
        };
        format!(
            r#"{{"type":"{ty}","dst":"{dst}","payload":{{"t":{t},"type":"{lower}","sdp":"{sdp}"}}}}"#
        )
    } else {
        format!(r#"{{"type":"CANDIDATE","dst":"{dst}","payload":{{"t":{t},"candidate":"{sdp}"}}}}"#)
    };
    Message::Text(text.into())
}

/// The send time a delivered message carries (`"t":MICROS`; the servers order keys
/// differently).
fn sent_at(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let rest = &text[i..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// What one active socket needs.
struct Side {
    kind: Arc<str>,
    /// Sends OFFERs (answered by the other side); in `bounce` both sides are.
    offer_side: bool,
    partner: String,
    sdp: Arc<str>,
    window: usize,
    stats: Arc<Stats>,
    running: Arc<AtomicBool>,
}

/// One active socket: answer every delivery, recording its latency; writes are flushed once
/// per burst of deliveries already received.
async fn active(mut ws: Ws, side: Side) {
    let Side {
        kind,
        offer_side,
        partner,
        sdp,
        window,
        stats,
        running,
    } = side;
    if offer_side {
        for _ in 0..window {
            if ws.feed(msg(&kind, true, &partner, &sdp)).await.is_err() {
                return;
            }
        }
        let _ = ws.flush().await;
    }
    let mut next = ws.next().await;
    loop {
        match next {
            Some(Ok(Message::Text(t))) => {
                if running.load(Relaxed) {
                    if let Some(sent) = sent_at(&t) {
                        let us = now_us().saturating_sub(sent);
                        let b = ((us / BUCKET_US) as usize).min(BUCKETS);
                        stats.hist[b].fetch_add(1, Relaxed);
                        stats.delivered.fetch_add(1, Relaxed);
                        // The offering side sends the next OFFER; the other answers.
                        let _ = ws.feed(msg(&kind, offer_side, &partner, &sdp)).await;
                    }
                }
            }
            Some(Ok(_)) => {}
            _ => {
                if running.load(Relaxed) {
                    stats.closed_early.fetch_add(1, Relaxed);
                }
                return;
            }
        }
        // More already here? Take it before flushing; else flush and wait.
        next = match ws.next().now_or_never() {
            Some(n) => n,
            None => {
                if ws.flush().await.is_err() {
                    return;
                }
                ws.next().await
            }
        };
    }
}

/// An idle peer: reads (and drops) whatever comes, sends HEARTBEAT every 20 s (the
/// servers drop a client silent for 60 s).
async fn idle(mut ws: Ws) {
    let mut hb = tokio::time::interval(Duration::from_secs(20));
    hb.tick().await;
    loop {
        tokio::select! {
            m = ws.next() => if !matches!(m, Some(Ok(_))) { return },
            _ = hb.tick() => if ws.send(Message::Text(r#"{"type":"HEARTBEAT"}"#.into())).await.is_err() { return },
        }
    }
}

fn main() {
    let a = Arc::new(args());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.threads)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(a));
}

async fn run(a: Arc<Args>) {
    now_us();
    let tag = std::process::id();
    let ids: Arc<Vec<String>> = Arc::new((0..a.peers).map(|i| format!("c{tag}x{i}")).collect());
    let rss_idle = proc_status(a.pid, "VmRSS:");

    // The connect ramp.
    let t0 = Instant::now();
    let mut socks: Vec<Option<Ws>> = Vec::with_capacity(a.peers);
    let mut slow = 0u64;
    for start in (0..a.peers).step_by(a.batch) {
        let end = (start + a.batch).min(a.peers);
        let hs: Vec<_> = (start..end)
            .map(|i| {
                let (a, ids) = (Arc::clone(&a), Arc::clone(&ids));
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = tokio::time::timeout(Duration::from_secs(30), open(&a, i, &ids[i]))
                        .await
                        .map_err(|_| "timeout".to_string())
                        .and_then(|r| r);
                    (r, t.elapsed())
                })
            })
            .collect();
        for h in hs {
            let (r, took) = h.await.unwrap();
            if took > Duration::from_millis(900) {
                slow += 1;
            }
            match r {
                Ok(ws) => socks.push(Some(ws)),
                Err(e) => {
                    if socks.iter().all(Option::is_some) {
                        eprintln!("open failed: {e}");
                    }
                    socks.push(None);
                }
            }
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let opened = socks.iter().filter(|s| s.is_some()).count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_connected = proc_status(a.pid, "VmRSS:");
    let per_peer = match (rss_idle, rss_connected) {
        (Some(i), Some(c)) if opened > 0 => Some((c.saturating_sub(i) * 1024) / opened as u64),
        _ => None,
    };
    let mut out = format!(
        r#"{{"client":"rust","kind":"{}","peers":{},"opened":{opened},"failed":{},"slow_opens":{slow},"connect_secs":{connect_secs:.2},"opens_per_sec":{},"rss_kib_idle":{},"rss_kib_connected":{},"bytes_per_peer":{}"#,
        a.kind,
        a.peers,
        a.peers - opened,
        (opened as f64 / connect_secs).round(),
        rss_idle.unwrap_or(0),
        rss_connected.unwrap_or(0),
        per_peer.map_or("null".into(), |v| v.to_string()),
    );
    if a.kind != "idle" {
        let stats = Arc::new(Stats {
            delivered: AtomicU64::new(0),
            hist: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            closed_early: AtomicU64::new(0),
        });
        let running = Arc::new(AtomicBool::new(true));
        let sdp: Arc<str> = "v".repeat(a.bytes).into();
        let kind: Arc<str> = a.kind.as_str().into();
        let pairs = a.pairs.min(a.peers / 2);
        let cpu0 = cpu_secs(&a.pid.to_string());
        let cpu2_0 = cpu_secs(&a.pid2.to_string());
        let redis0 = cpu_secs(&a.redis_pid.to_string());
        let self0 = cpu_secs("self");
        let s0 = Instant::now();
        let mut tasks = Vec::new();
        for (i, s) in socks.into_iter().enumerate() {
            let Some(ws) = s else { continue };
            if i < 2 * pairs {
                let side = Side {
                    kind: Arc::clone(&kind),
                    // In `bounce` both sides start; in `offer` the even side does.
                    offer_side: i % 2 == 0 || &*kind == "bounce",
                    partner: ids[i ^ 1].clone(),
                    sdp: Arc::clone(&sdp),
                    window: a.window,
                    stats: Arc::clone(&stats),
                    running: Arc::clone(&running),
                };
                tasks.push(tokio::spawn(active(ws, side)));
            } else {
                tasks.push(tokio::spawn(idle(ws)));
            }
        }
        let mut per_sec = Vec::new();
        let mut last = 0;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        for _ in 0..a.secs {
            tick.tick().await;
            let d = stats.delivered.load(Relaxed);
            per_sec.push(d - last);
            last = d;
        }
        running.store(false, Relaxed);
        let elapsed = s0.elapsed().as_secs_f64();
        let cpu = (cpu_secs(&a.pid.to_string()) - cpu0) / elapsed;
        let cpu2 = (cpu_secs(&a.pid2.to_string()) - cpu2_0) / elapsed;
        let redis_cpu = (cpu_secs(&a.redis_pid.to_string()) - redis0) / elapsed;
        // Two-node mode: both nodes (Redis reported apart).
        let cpu_total = cpu + cpu2;
        let client_cpu = (cpu_secs("self") - self0) / elapsed;
        let delivered = stats.delivered.load(Relaxed);
        let counts: Vec<u64> = stats.hist.iter().map(|h| h.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        let pct = |p: f64| {
            let mut acc = 0;
            for (b, n) in counts.iter().enumerate() {
                acc += n;
                if total > 0 && acc as f64 >= p * total as f64 {
                    return format!("{:.2}", (b as u64 * BUCKET_US) as f64 / 1000.0);
                }
            }
            "null".into()
        };
        let steady = &per_sec[1.min(per_sec.len())..];
        out += &format!(
            r#","pairs":{pairs},"window":{},"bytes":{},"secs":{elapsed:.2},"msgs":{delivered},"msgs_per_sec":{},"per_sec_min":{},"per_sec_max":{},"p50_ms":{},"p99_ms":{},"p999_ms":{},"cpu_cores":{cpu_total:.2},"client_cpu_cores":{client_cpu:.2},"closed_early":{},"rss_kib_end":{},"hwm_kib":{}"#,
            a.window,
            a.bytes,
            (delivered as f64 / elapsed).round(),
            steady.iter().min().copied().unwrap_or(0),
            steady.iter().max().copied().unwrap_or(0),
            pct(0.5),
            pct(0.99),
            pct(0.999),
            stats.closed_early.load(Relaxed),
            proc_status(a.pid, "VmRSS:").unwrap_or(0),
            proc_status(a.pid, "VmHWM:").unwrap_or(0),
        );
        if a.host2.is_some() {
            // Both nodes' CPU, and Redis's per delivered (cross-node) message.
            out += &format!(
                r#","nodes":2,"node_a_cpu_cores":{cpu:.2},"node_b_cpu_cores":{cpu2:.2},"redis_cpu_cores":{redis_cpu:.3},"redis_us_per_msg":{:.2}"#,
                if delivered > 0 {
                    redis_cpu * elapsed * 1e6 / delivered as f64
                } else {
                    0.0
                }
            );
        }
        for t in &tasks {
            t.abort();
        }
    }
    out.push('}');
    println!("{out}");
    // Sockets close as the process exits.
    std::process::exit(0);
}
