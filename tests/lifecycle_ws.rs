//! WebSocket sessions across a reload and a drain, against the real daemon: an open `/ws`
//! session keeps working after SIGHUP and during the drain, while new ones are refused
//! once draining.

use crate::common;
use crate::signal_common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use signal_common::{next_json, send_text, ws};

fn wait_log(tern: &Tern, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !tern.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            tern.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_signaling_sessions_survive_reload_and_drain() {
    let mut opts = TernOpts::new(32760);
    opts.relay_ports = 5;
    opts.drain_timeout_secs = 600;
    opts.api = Some(String::new());
    let mut tern = Tern::start(opts);
    let http = SocketAddr::from(([127, 0, 0, 1], tern.api_port));
    let mut a = ws(http, "/ws").await;
    assert_eq!(next_json(&mut a).await["type"], "welcome");
    assert_eq!(next_json(&mut a).await["type"], "room");

    // Reload with a changed signaling limit: the open session carries on.
    let cfg = std::fs::read_to_string(tern.config_path()).unwrap();
    let mut changed = cfg.clone();
    changed.push_str("\n[signal]\nmax_rooms_per_peer = 3\n");
    std::fs::write(tern.config_path(), changed).unwrap();
    tern.signal(libc::SIGHUP);
    wait_log(&tern, "configuration reloaded");
    send_text(&mut a, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut a).await["type"], "pong");
    let mut b = ws(http, "/ws").await;
    assert_eq!(next_json(&mut b).await["type"], "welcome");
    assert_eq!(next_json(&mut a).await["type"], "peer-joined");

    // A live allocation keeps the daemon draining after SIGTERM.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let first = udp_transaction(&sock, tern.addr(), &allocate_unauthenticated()).unwrap();
    let (realm, nonce) = realm_and_nonce(&first).unwrap();
    let user = format!("{}:ws", unix_now() + 600);
    let pw = rest_password(&tern.secret, &user);
    let resp = udp_transaction(
        &sock,
        tern.addr(),
        &allocate_authenticated(&user, &pw, &realm, &nonce),
    )
    .unwrap();
    assert_eq!(error_code(&resp), None, "{}", tern.log());
    tern.signal(libc::SIGTERM);
    wait_log(&tern, "draining");
    // New sessions are refused; open ones still talk.
    let refused = tokio_tungstenite::connect_async(format!("ws://{http}/ws")).await;
    assert!(
        refused.is_err(),
        "a new signaling session was accepted while draining"
    );
    send_text(&mut a, r#"{"type":"ping"}"#).await;
    assert_eq!(next_json(&mut a).await["type"], "pong");
    tern.signal(libc::SIGTERM);
    let status = tern.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success());
}
