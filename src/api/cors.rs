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

/// Checks `Origin` against `allowed` ("*" allows any). The API's own origin (same host
/// and port as the `Host` header) is always allowed, as is a same-origin fetch that
/// carries no `Origin` (`Sec-Fetch-Site: same-origin`).
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> OriginCheck {
    let Some(origin) = headers.get(header::ORIGIN) else {
        let same = headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"same-origin");
        return if same {
            OriginCheck::Allowed(None)
        } else {
            OriginCheck::Absent
        };
    };
    let Ok(o) = origin.to_str() else {
        return OriginCheck::Denied;
    };
    let listed = allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(o));
    let own = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|host| {
            o.split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
        });
    if listed || own {
        OriginCheck::Allowed(Some(origin.clone()))
    } else {
        OriginCheck::Denied
    }
}

/// Adds `Access-Control-Allow-Origin: <origin>` (never `*`, so responses are not cached
/// across origins) and `Vary: Origin`.
pub fn allow(headers: &mut HeaderMap, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// Preflight answer headers.
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
            check_origin(&h(&[("origin", "https://app.example.org")]), &allowed),
            OriginCheck::Allowed(Some(_))
        ));
        assert_eq!(
            check_origin(&h(&[("origin", "https://evil.example")]), &allowed),
            OriginCheck::Denied
        );
        // Own origin: the built-in page.
        assert!(matches!(
            check_origin(
                &h(&[
                    ("origin", "http://turn.example:8080"),
                    ("host", "turn.example:8080")
                ]),
                &[]
            ),
            OriginCheck::Allowed(Some(_))
        ));
        assert_eq!(check_origin(&h(&[]), &allowed), OriginCheck::Absent);
        assert_eq!(
            check_origin(&h(&[("sec-fetch-site", "same-origin")]), &[]),
            OriginCheck::Allowed(None)
        );
        assert!(matches!(
            check_origin(&h(&[("origin", "https://x.test")]), &["*".to_string()]),
            OriginCheck::Allowed(Some(_))
        ));
    }
}
