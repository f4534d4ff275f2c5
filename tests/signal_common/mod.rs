//! Helpers for the HTTP / signaling / relay integration tests: start Tern's HTTP face on
//! loopback ephemeral ports, plain HTTP/1.1 requests, WebSocket clients.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use tern::api::HttpService;
use tern::config::Config;

pub const SECRET: &str = "integration-test-secret";
pub const TOKEN: &str = "backend-token-0123456789";

/// Starts the HTTP service on 127.0.0.1:0 with `extra` TOML appended to a base config
/// (sections in `extra` must not repeat `[api]`/`[turn]`; use `api_extra` for those keys).
pub fn start(api_extra: &str, extra: &str) -> HttpService {
    let toml = format!(
        "[turn]\nlisten = [\"127.0.0.1:34780\"]\nauth_secrets = [\"{SECRET}\"]\n\
         [api]\nlisten = \"127.0.0.1:0\"\ntokens = [\"{TOKEN}\"]\n{api_extra}\n{extra}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tern.toml");
    std::fs::write(&p, toml).unwrap();
    let cfg = Config::load(Some(&p), Vec::new(), &[]).expect("test config is valid");
    HttpService::start(&cfg).expect("HTTP service starts")
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// One HTTP/1.1 request with `Connection: close`.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req += "Connection: close\r\n";
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req += &format!("Host: {addr}\r\n");
    }
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<HashMap<_, _>>();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out += &rest[..n];
        s = &rest[n + 2..];
    }
    out
}

pub fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    request(addr, "GET", path, headers)
}

/// Resident set size of a process in KiB (`/proc/PID/status` VmRSS).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket to `ws://addr{path}`.
pub async fn ws(addr: SocketAddr, path: &str) -> Ws {
    let (s, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .expect("websocket connects");
    s
}

/// The next frame that is not a ping/pong, within a generous timeout (no hang).
pub async fn next_msg(ws: &mut Ws) -> Option<tokio_tungstenite::tungstenite::Message> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("no frame within 20 s")?;
        match m {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(m) => return Some(m),
            Err(_) => return None,
        }
    }
}

/// The next JSON text message.
pub async fn next_json(ws: &mut Ws) -> serde_json::Value {
    match next_msg(ws).await {
        Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
            serde_json::from_str(t.as_str()).unwrap()
        }
        other => panic!("expected a JSON text frame, got {other:?}"),
    }
}

/// Reads until a Close frame and returns its code (None if the stream just ended).
pub async fn close_code(ws: &mut Ws) -> Option<u16> {
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match next_msg(ws).await {
            Some(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Some(_) => continue,
            None => return None,
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(text.into()))
        .await
        .unwrap();
}

/// A native `/ws` client past its `welcome` and LAN `room` messages: (socket, welcome).
pub async fn native(addr: SocketAddr) -> (Ws, serde_json::Value) {
    let mut s = ws(addr, "/ws").await;
    let w = next_json(&mut s).await;
    assert_eq!(w["type"], "welcome");
    assert_eq!(next_json(&mut s).await["type"], "room");
    (s, w)
}

/// Sends `ping` and waits for `pong`, skipping membership news: the client is still served.
pub async fn ping_pong(s: &mut Ws) {
    send_text(s, r#"{"type":"ping"}"#).await;
    loop {
        let m = next_json(s).await;
        match m["type"].as_str().unwrap() {
            "room" | "peer-joined" | "peer-left" => continue,
            "pong" => return,
            other => panic!("unexpected {other}: {m}"),
        }
    }
}
