//! The HTTP face's metrics: its one definition table (per-route requests, the listener's
//! connection counters) and [`HttpMetrics`], the per-route request counters the router's
//! middleware updates. `crate::metrics` lists the table in the full list and reads the
//! connection counters at scrape time; the request counters register themselves.

use std::sync::Arc;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

use crate::metrics_def::{metric_table, Def};

metric_table! { pub DEFS;
    HTTP_REQUESTS: Counter "tern_http_requests_total" ["route", "status"]
        "HTTP requests by route template and status code (WebSocket upgrades count as 101; \
        heads refused before routing, e.g. 431, under route \"unparsed\").";
    HTTP_DURATION: Histogram "tern_http_request_duration_seconds" ["route"]
        "Time to answer an HTTP request (for WebSockets: the upgrade only).";
    HTTP_CONNECTIONS: Gauge "tern_http_connections" []
        "HTTP connections open on the API listener (plain or TLS, WebSockets included).";
    HTTP_CONNECTIONS_ACCEPTED: Counter "tern_http_connections_accepted_total" []
        "HTTP connections admitted under api.max_connections and api.max_connections_per_ip.";
    HTTP_CONNECTIONS_REFUSED: Counter "tern_http_connections_refused_total" ["reason"]
        "HTTP connections closed right after accept, by the cap reached.";
    HTTP_CONNECTIONS_CLOSED: Counter "tern_http_connections_closed_total" ["reason"]
        "HTTP connections closed by Tern: failed TLS handshake, no request head in time, a \
        client that stopped reading a response, or a request head over api.max_header_bytes \
        (answered 431).";
}

/// Upper bounds (seconds) of the HTTP request duration histogram.
const HTTP_SECONDS_BOUNDS: [f64; 10] = [
    0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// Per-route HTTP counters, updated by the API's middleware (control path: one request,
/// one labelled increment).
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl HttpMetrics {
    pub fn new() -> Arc<HttpMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(HTTP_REQUESTS.name, HTTP_REQUESTS.help),
            HTTP_REQUESTS.labels,
        )
        .expect("valid metric definition");
        let duration = HistogramVec::new(
            HistogramOpts::new(HTTP_DURATION.name, HTTP_DURATION.help)
                .buckets(HTTP_SECONDS_BOUNDS.to_vec()),
            HTTP_DURATION.labels,
        )
        .expect("valid metric definition");
        Arc::new(HttpMetrics { requests, duration })
    }

    /// One answered request. `route` is the matched route template (bounded) or
    /// "unmatched"; never the raw path.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        let mut buf = [0u8; 3];
        let status = status_label(status, &mut buf);
        self.requests.with_label_values(&[route, status]).inc();
        self.duration.with_label_values(&[route]).observe(seconds);
    }

    /// One request refused by the HTTP parser before any route saw it (431 for a head over
    /// `api.max_header_bytes`): counted under route "unparsed", with no duration.
    pub fn refused_unparsed(&self, status: u16) {
        let mut buf = [0u8; 3];
        let status = status_label(status, &mut buf);
        self.requests.with_label_values(&["unparsed", status]).inc();
    }

    /// Whether `d` is one of the metrics [`HttpMetrics`] registers itself (the rest of
    /// [`DEFS`] is read at scrape time).
    pub fn registers(d: &Def) -> bool {
        d.name == HTTP_REQUESTS.name || d.name == HTTP_DURATION.name
    }

    /// The request counters, to register in the metrics registry.
    pub fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 2] {
        [
            Box::new(self.requests.clone()),
            Box::new(self.duration.clone()),
        ]
    }
}

fn status_label(status: u16, buf: &mut [u8; 3]) -> &str {
    if !(100..=599).contains(&status) {
        return "other";
    }
    buf[0] = b'0' + (status / 100) as u8;
    buf[1] = b'0' + (status / 10 % 10) as u8;
    buf[2] = b'0' + (status % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;

    #[test]
    fn status_labels() {
        let mut b = [0u8; 3];
        assert_eq!(status_label(200, &mut b), "200");
        assert_eq!(status_label(101, &mut b), "101");
        assert_eq!(status_label(503, &mut b), "503");
        assert_eq!(status_label(42, &mut b), "other");
    }

    #[test]
    fn http_metrics_encode() {
        let registry = Registry::new();
        let m = HttpMetrics::new();
        registry.register(Box::new(m.requests.clone())).unwrap();
        registry.register(Box::new(m.duration.clone())).unwrap();
        m.observe("/api/ice", 200, 0.002);
        m.observe("/api/ice", 200, 0.003);
        m.observe("unmatched", 404, 0.0001);
        m.refused_unparsed(431);
        let text = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(text.contains("tern_http_requests_total{route=\"/api/ice\",status=\"200\"} 2"));
        assert!(text.contains("tern_http_requests_total{route=\"unmatched\",status=\"404\"} 1"));
        assert!(text.contains("tern_http_requests_total{route=\"unparsed\",status=\"431\"} 1"));
        assert!(!text.contains("tern_http_request_duration_seconds_count{route=\"unparsed\"}"));
        assert!(text.contains("tern_http_request_duration_seconds_count{route=\"/api/ice\"} 2"));
    }
}
