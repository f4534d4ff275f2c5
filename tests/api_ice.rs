//! `/api/ice` and `/api/turn`: who may mint, what they get, CORS.

use crate::signal_common;

use signal_common::{get, request, start, SECRET, TOKEN};
use tern::turn::auth::rest_password;

const ORIGIN: &str = "https://app.example.org";

fn api_extra() -> String {
    format!("allowed_origins = [\"{ORIGIN}\"]\nanonymous_burst = 3\nanonymous_rate_per_min = 1\n")
}

#[test]
fn anonymous_browser_from_allowed_origin_gets_working_short_credentials() {
    let svc = start(&api_extra(), "");
    let a = svc.local_addr();
    let r = get(
        a,
        "/api/ice",
        &[("Origin", ORIGIN), ("Host", "turn.example:8080")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    assert_eq!(j["ttl"], 600);
    let s = &j["iceServers"][0];
    let urls: Vec<&str> = s["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    // Host from the Host header (no public_host configured), port from turn.listen.
    assert_eq!(
        urls,
        [
            "stun:turn.example:34780",
            "turn:turn.example:34780?transport=udp",
            "turn:turn.example:34780?transport=tcp"
        ]
    );
    let user = s["username"].as_str().unwrap();
    let (expiry, id) = user.split_once(':').unwrap();
    assert!(id.starts_with("anon-"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry > now && expiry <= now + 601);
    // The password is what the TURN server will compute from the shared secret.
    assert_eq!(s["credential"], rest_password(SECRET, user).as_str());
}

#[test]
fn token_and_origin_rules() {
    let svc = start(&api_extra(), "");
    let a = svc.local_addr();
    // No token, no origin (a script, curl): 401 with a JSON error.
    let r = get(a, "/api/ice", &[]);
    assert_eq!(r.status, 401);
    assert!(r.json()["error"].as_str().unwrap().contains("token"));
    // A page from another origin: 403, and no CORS header for it.
    let r = get(a, "/api/ice", &[("Origin", "https://evil.example")]);
    assert_eq!(r.status, 403);
    assert!(r.header("access-control-allow-origin").is_none());
    // Wrong token: 401 even from an allowed origin.
    let r = get(
        a,
        "/api/ice",
        &[
            ("Authorization", "Bearer nope-nope-nope-nope"),
            ("Origin", ORIGIN),
        ],
    );
    assert_eq!(r.status, 401);
    // Backend with a token: its user id and TTL.
    let auth = format!("Bearer {TOKEN}");
    let r = get(
        a,
        "/api/ice?user=alice&ttl=3600",
        &[("Authorization", &auth)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["ttl"], 3600);
    let user = j["iceServers"][0]["username"].as_str().unwrap();
    assert!(user.ends_with(":alice"));
    // TTL above api.max_ttl_secs: 400.
    let r = get(a, "/api/ice?ttl=999999", &[("Authorization", &auth)]);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("ttl"));
    // Preflight from an allowed origin, refused for others.
    let r = request(
        a,
        "OPTIONS",
        "/api/ice",
        &[("Origin", ORIGIN), ("Access-Control-Request-Method", "GET")],
    );
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("Authorization"));
    let r = request(
        a,
        "OPTIONS",
        "/api/ice",
        &[("Origin", "https://evil.example")],
    );
    assert_eq!(r.status, 403);
}

#[test]
fn draft_uberti_rest_form() {
    let svc = start(&api_extra(), "");
    let a = svc.local_addr();
    let r = get(
        a,
        &format!("/api/turn?service=turn&username=bob&key={TOKEN}"),
        &[("Host", "[2001:db8::5]:8080")],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let user = j["username"].as_str().unwrap();
    assert!(user.ends_with(":bob"));
    assert_eq!(j["password"], rest_password(SECRET, user).as_str());
    assert_eq!(j["ttl"], 86400);
    assert_eq!(j["uris"][0], "turn:[2001:db8::5]:34780?transport=udp");
    let r = get(a, &format!("/api/turn?service=stun&key={TOKEN}"), &[]);
    assert_eq!(r.status, 400);
}

#[test]
fn anonymous_minting_is_rate_limited_per_client() {
    let svc = start(&api_extra(), "");
    let a = svc.local_addr();
    for _ in 0..3 {
        assert_eq!(get(a, "/api/ice", &[("Origin", ORIGIN)]).status, 200);
    }
    let r = get(a, "/api/ice", &[("Origin", ORIGIN)]);
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert!(r.json()["error"].is_string());
    // A backend token is not subject to the anonymous limit.
    let auth = format!("Bearer {TOKEN}");
    assert_eq!(get(a, "/api/ice", &[("Authorization", &auth)]).status, 200);
}

#[test]
fn public_host_and_disabled_anonymous() {
    let svc = start(
        &format!(
            "{}public_host = \"turn.example.net\"\nanonymous_enabled = false\n",
            api_extra()
        ),
        "",
    );
    let a = svc.local_addr();
    let r = get(a, "/api/ice", &[("Origin", ORIGIN)]);
    assert_eq!(r.status, 401);
    let auth = format!("Bearer {TOKEN}");
    let r = get(a, "/api/ice", &[("Authorization", &auth)]);
    assert_eq!(
        r.json()["iceServers"][0]["urls"][1],
        "turn:turn.example.net:34780?transport=udp"
    );
}

/// DNS rebinding: a page at `http://rebind.evil.example` whose name now resolves to this
/// server sends `Origin` and `Host` both naming the attacker. With `api.public_host` set the
/// own-origin rule compares against it, so that page gets nothing; the page this API serves
/// under its public name still mints.
#[test]
fn a_forged_host_matching_a_foreign_origin_gets_no_credentials() {
    let svc = start("public_host = \"turn.example\"\n", "");
    let a = svc.local_addr();
    let rebound = [
        ("Origin", "http://rebind.evil.example"),
        ("Host", "rebind.evil.example"),
    ];
    let r = get(a, "/api/ice", &rebound);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.json().get("iceServers").is_none());
    assert!(r.header("access-control-allow-origin").is_none());
    let r = get(a, "/api/turn?service=turn", &rebound);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.json().get("password").is_none());
    let r = request(a, "OPTIONS", "/api/ice", &rebound);
    assert_eq!(r.status, 403);
    // The rebound page's same-origin GET carries no Origin, only Sec-Fetch-Site.
    let r = get(
        a,
        "/api/ice",
        &[
            ("Sec-Fetch-Site", "same-origin"),
            ("Host", "rebind.evil.example"),
        ],
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // The own origin, by its public name (any port the Host header carries).
    let own = [
        ("Origin", "http://turn.example:8080"),
        ("Host", "turn.example:8080"),
    ];
    let r = get(a, "/api/ice", &own);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["iceServers"][0]["credential"].is_string());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("http://turn.example:8080")
    );
}

#[test]
fn no_secret_is_a_clear_503() {
    // Build a config without any TURN secret.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(
        &p,
        format!("[api]\nlisten = \"127.0.0.1:0\"\ntokens = [\"{TOKEN}\"]\n"),
    )
    .unwrap();
    let cfg = tern::config::Config::load(Some(&p), Vec::new(), &[]).unwrap();
    let svc = tern::api::HttpService::start(&cfg).unwrap();
    let auth = format!("Bearer {TOKEN}");
    let r = get(svc.local_addr(), "/api/ice", &[("Authorization", &auth)]);
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("turn.auth_secrets"));
    svc.shutdown();
}
