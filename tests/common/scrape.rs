//! Reading the metrics listener from tests: one GET, a sample's value, scraping until a
//! condition holds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One GET on the metrics listener: (status, body).
pub fn get(port: u16, path: &str) -> (u16, String) {
    get_bearer(port, path, None)
}

/// One GET on a loopback HTTP listener, with `Authorization: Bearer TOKEN` if given.
pub fn get_bearer(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The sum of every sample named `name` whose labels include all of `labels`.
pub fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let (series, v) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (n, l) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        if labels
            .iter()
            .all(|(k, val)| l.contains(&format!("{k}=\"{val}\"")))
        {
            sum += v.parse::<f64>().unwrap();
        }
    }
    sum
}

/// Scrapes until `ok` holds (workers publish about twice a second), or panics.
pub fn scrape_until(port: u16, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get(port, "/metrics");
        assert_eq!(status, 200);
        if ok(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} never seen in:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
