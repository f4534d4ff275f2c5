//! Origin rules and CORS headers (Fetch standard, "CORS protocol"), by hand.

use axum::http::header::{self, HeaderMap, HeaderValue};

/// What the request's origin means for anonymous minting.
#[derive(Debug, PartialEq, Eq)]
pub enum OriginCheck {
    /// A browser page from an allowed origin (or the API's own origin).
    Allowed(Option<HeaderValue>),
    /// A browser page from another origin.
    Denied,
    /// No `Origin`: not a cross-origin browser request (a backend, curl).
    Absent,
}

/// Checks `Origin` against `allowed` ("*" allows any). The API's own origin is always
/// allowed, as is a same-origin fetch that carries no `Origin` (`Sec-Fetch-Site:
/// same-origin`).
///
/// The own origin is the one whose host and port are the `Host` header's, and, when
/// `public_host` (`api.public_host`) is set, whose host is `public_host`: a DNS-rebound
/// page sends `Origin` and `Host` both naming the attacker's domain, so `Host` alone
/// proves nothing. For the same reason a same-origin fetch without `Origin` counts only
/// when `Host` names `public_host`.
pub fn check_origin(headers: &HeaderMap, allowed: &[String], public_host: &str) -> OriginCheck {
    let public = public_host.trim_start_matches('[').trim_end_matches(']');
    let is_public =
        |authority: &str| public.is_empty() || strip_port(authority).eq_ignore_ascii_case(public);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let Some(origin) = headers.get(header::ORIGIN) else {
        let same = headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"same-origin");
        return match (same, host) {
            (false, _) => OriginCheck::Absent,
            (true, Some(h)) if is_public(h) => OriginCheck::Allowed(None),
            (true, None) if public.is_empty() => OriginCheck::Allowed(None),
            (true, _) => OriginCheck::Denied,
        };
    };
    let Ok(o) = origin.to_str() else {
        return OriginCheck::Denied;
    };
    let listed = allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(o));
    let own = o.split_once("://").is_some_and(|(_, authority)| {
        host.is_some_and(|h| authority.eq_ignore_ascii_case(h)) && is_public(authority)
    });
    if listed || own {
        OriginCheck::Allowed(Some(origin.clone()))
    } else {
        OriginCheck::Denied
    }
}

/// The host of a `host[:port]` authority (an IPv6 literal without its brackets).
pub fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => h,
    }
}

/// Adds `Access-Control-Allow-Origin: <origin>` (never `*`, so responses are not cached
/// across origins) and `Vary: Origin`.
pub fn allow(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Preflight answer headers for the PeerJS routes, as the `peer` server's `cors` middleware
/// (defaults, `origin: true`) sends them: any origin reflected, its default methods, the
/// requested headers reflected, no max age. Nothing here grants credentials: the PeerJS
/// routes hand out ids and sockets that any page may have, as with `peer`.
pub fn peerjs_preflight(request: &HeaderMap, headers: &mut HeaderMap) {
    if let Some(o) = request.get(header::ORIGIN) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
    }
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET,HEAD,PUT,PATCH,POST,DELETE"),
    );
    if let Some(h) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone());
    }
    headers.insert(
        header::VARY,
        HeaderValue::from_static("Origin, Access-Control-Request-Headers"),
    );
}

/// Preflight answer headers for the credential routes.
pub fn preflight(headers: &mut HeaderMap, origin: &HeaderValue) {
    allow(headers, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn origin_rules() {
        let allowed = vec!["https://app.example.org".to_string()];
        assert!(matches!(
            check_origin(&h(&[("origin", "https://app.example.org")]), &allowed, ""),
            OriginCheck::Allowed(Some(_))
        ));
        assert_eq!(
            check_origin(&h(&[("origin", "https://evil.example")]), &allowed, ""),
            OriginCheck::Denied
        );
        // Own origin: the built-in page.
        let own = h(&[
            ("origin", "http://turn.example:8080"),
            ("host", "turn.example:8080"),
        ]);
        assert!(matches!(
            check_origin(&own, &[], ""),
            OriginCheck::Allowed(Some(_))
        ));
        assert_eq!(check_origin(&h(&[]), &allowed, ""), OriginCheck::Absent);
        assert_eq!(
            check_origin(&h(&[("sec-fetch-site", "same-origin")]), &[], ""),
            OriginCheck::Allowed(None)
        );
        assert!(matches!(
            check_origin(&h(&[("origin", "https://x.test")]), &["*".to_string()], ""),
            OriginCheck::Allowed(Some(_))
        ));
    }

    #[test]
    fn own_origin_is_public_host_when_set() {
        // DNS rebinding: the page's origin and the Host header both name the attacker.
        let rebound = h(&[
            ("origin", "http://rebind.evil.example"),
            ("host", "rebind.evil.example"),
        ]);
        assert!(matches!(
            check_origin(&rebound, &[], ""),
            OriginCheck::Allowed(Some(_))
        ));
        assert_eq!(
            check_origin(&rebound, &[], "turn.example"),
            OriginCheck::Denied
        );
        // The rebound page's same-origin fetch carries no Origin (a GET), only its Host.
        let same = h(&[
            ("sec-fetch-site", "same-origin"),
            ("host", "rebind.evil.example"),
        ]);
        assert_eq!(
            check_origin(&same, &[], "turn.example"),
            OriginCheck::Denied
        );
        let same = h(&[("sec-fetch-site", "same-origin"), ("host", "turn.example")]);
        assert_eq!(
            check_origin(&same, &[], "turn.example"),
            OriginCheck::Allowed(None)
        );
        let own = h(&[
            ("origin", "http://TURN.example:8080"),
            ("host", "turn.example:8080"),
        ]);
        assert!(matches!(
            check_origin(&own, &[], "turn.example"),
            OriginCheck::Allowed(Some(_))
        ));
        // The public host in Origin but another Host: not the page this API served.
        let other = h(&[
            ("origin", "http://turn.example:8080"),
            ("host", "rebind.evil.example:8080"),
        ]);
        assert_eq!(
            check_origin(&other, &[], "turn.example"),
            OriginCheck::Denied
        );
        let v6 = h(&[
            ("origin", "http://[2001:db8::1]:8080"),
            ("host", "[2001:db8::1]:8080"),
        ]);
        assert!(matches!(
            check_origin(&v6, &[], "2001:db8::1"),
            OriginCheck::Allowed(Some(_))
        ));
        assert!(matches!(
            check_origin(&v6, &[], "[2001:db8::1]"),
            OriginCheck::Allowed(Some(_))
        ));
    }

    #[test]
    fn peerjs_preflight_is_the_cors_package_default() {
        let mut out = HeaderMap::new();
        peerjs_preflight(
            &h(&[
                ("origin", "https://app.example"),
                ("access-control-request-headers", "content-type,x-any"),
            ]),
            &mut out,
        );
        assert_eq!(out["access-control-allow-origin"], "https://app.example");
        assert_eq!(
            out["access-control-allow-methods"],
            "GET,HEAD,PUT,PATCH,POST,DELETE"
        );
        assert_eq!(out["access-control-allow-headers"], "content-type,x-any");
        assert!(out.get("access-control-max-age").is_none());
        let mut bare = HeaderMap::new();
        peerjs_preflight(&h(&[]), &mut bare);
        assert!(bare.get("access-control-allow-origin").is_none());
        assert!(bare.get("access-control-allow-headers").is_none());
    }

    #[test]
    fn host_header_port_is_stripped() {
        assert_eq!(strip_port("turn.example:8080"), "turn.example");
        assert_eq!(strip_port("turn.example"), "turn.example");
        assert_eq!(strip_port("[2001:db8::1]:8080"), "2001:db8::1");
        assert_eq!(strip_port("2001:db8::1"), "2001:db8::1");
    }
}
