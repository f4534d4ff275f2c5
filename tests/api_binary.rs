//! The real `tern serve`: credentials from `/api/ice` and `/api/turn` are accepted by Tern's
//! own TURN listener (coturn's turnutils_uclient allocates and relays with them) and refused
//! once expired; signaling works on the daemon's HTTP listener.

use crate::common;
use crate::signal_common;

use std::time::{Duration, Instant};

use common::*;
use signal_common::{get, next_json, send_text, ws, TOKEN};

const ORIGIN: &str = "https://app.example.org";

fn start(relay_min: u16) -> Tern {
    Tern::start(TernOpts {
        api: Some(format!(
            "tokens = [\"{TOKEN}\"]\nallowed_origins = [\"{ORIGIN}\"]\n"
        )),
        ..TernOpts::new(relay_min)
    })
}

fn assert_relayed(r: &UclientReport, n: u64) {
    assert!(
        r.success && r.sent >= n && r.received == r.sent && r.lost == Some(0),
        "uclient did not relay with minted credentials: sent={} received={} lost={:?}\n{}",
        r.sent,
        r.received,
        r.lost,
        r.output
    );
}

#[test]
fn minted_credentials_allocate_on_terns_turn_listener_and_expire() {
    if !have_tool("turnutils_uclient") {
        return;
    }
    let tern = start(30000);
    let peer = EchoPeer::start();

    // A browser from an allowed origin: anonymous, short-lived credentials.
    let r = get(tern.api_addr(), "/api/ice", &[("Origin", ORIGIN)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let s = &j["iceServers"][0];
    let urls: Vec<&str> = s["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    // The URLs point at the TURN listener this daemon really bound.
    assert!(
        urls.contains(&format!("turn:127.0.0.1:{}?transport=udp", tern.port).as_str()),
        "{urls:?}"
    );
    let (user, pass) = (
        s["username"].as_str().unwrap(),
        s["credential"].as_str().unwrap(),
    );
    for transport in [&[][..], &["-t"][..]] {
        let mut args = vec!["-n", "10", "-c"];
        args.extend_from_slice(transport);
        let r = uclient_with(&tern, peer.port, user, pass, &args, Duration::from_secs(60));
        assert_relayed(&r, 10);
        eprintln!(
            "anonymous /api/ice credential {args:?}: sent={} received={}",
            r.sent, r.received
        );
    }

    // A backend's REST-form credential with a 1 s TTL: works now, refused once expired.
    let auth = format!("Bearer {TOKEN}");
    let r = get(
        tern.api_addr(),
        "/api/turn?service=turn&username=backend-user&ttl=2",
        &[("Authorization", &auth)],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    let (user, pass) = (
        j["username"].as_str().unwrap().to_string(),
        j["password"].as_str().unwrap().to_string(),
    );
    let expiry: u64 = user.split(':').next().unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while unix_now() <= expiry + 1 {
        assert!(Instant::now() < deadline, "clock did not pass the expiry");
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = uclient_with(
        &tern,
        peer.port,
        &user,
        &pass,
        &["-n", "5", "-c"],
        Duration::from_secs(30),
    );
    assert!(
        !r.success && r.received == 0 && r.output.contains("Cannot complete Allocation"),
        "an expired minted credential was not refused:\n{}",
        r.output
    );
}

#[test]
fn token_credentials_for_a_user_relay_and_origins_are_enforced() {
    if !have_tool("turnutils_uclient") {
        return;
    }
    let tern = start(30400);
    let peer = EchoPeer::start();
    let auth = format!("Bearer {TOKEN}");
    let r = get(
        tern.api_addr(),
        "/api/ice?user=alice&ttl=300",
        &[("Authorization", &auth)],
    );
    let j = r.json();
    let s = &j["iceServers"][0];
    let user = s["username"].as_str().unwrap();
    assert!(user.ends_with(":alice"));
    let r = uclient_with(
        &tern,
        peer.port,
        user,
        s["credential"].as_str().unwrap(),
        &["-n", "10", "-c", "-s"],
        Duration::from_secs(60),
    );
    assert_relayed(&r, 10);
    assert_eq!(get(tern.api_addr(), "/api/ice", &[]).status, 401);
    assert_eq!(
        get(
            tern.api_addr(),
            "/api/ice",
            &[("Origin", "https://evil.example")]
        )
        .status,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_signaling() {
    let tern = tokio::task::spawn_blocking(|| start(32000)).await.unwrap();
    let addr = tern.api_addr();
    let mut a = ws(addr, "/ws").await;
    let a_id = next_json(&mut a).await["id"].as_str().unwrap().to_string();
    next_json(&mut a).await;
    let mut b = ws(addr, "/ws").await;
    let b_id = next_json(&mut b).await["id"].as_str().unwrap().to_string();
    next_json(&mut b).await;
    assert_eq!(next_json(&mut a).await["type"], "peer-joined");
    send_text(
        &mut a,
        &format!(r#"{{"type":"signal","to":"{b_id}","data":{{"candidate":"c"}}}}"#),
    )
    .await;
    let m = next_json(&mut b).await;
    assert_eq!(m["from"], a_id.as_str());
    // The PeerJS endpoint too.
    let mut p = ws(addr, "/peerjs/peerjs?key=peerjs&id=one&token=t").await;
    assert_eq!(next_json(&mut p).await["type"], "OPEN");
    let mut tern = tern;
    assert!(tern.alive());
}
