//! The integration tests, as one test binary: each `tests/<name>.rs` is a module here.
//!
//! One binary instead of one per file: linking some thirty 50 MB release test binaries
//! filled a CI machine's disk (the linker died with SIGBUS) and cost minutes of link time.
//! Run one file's tests with `cargo test --release --test integration <name>::`.
//! `tests/net_hot_path.rs` stays a binary of its own: it installs a counting global
//! allocator, which other tests running beside it would disturb.

mod common;
mod ops_common;
mod signal_common;

mod api_binary;
mod api_http_face;
mod api_ice;
mod api_slow_clients;
mod browser_turn;
mod cluster;
mod example_config;
mod fastpath;
mod firewall_nft;
mod firewall_script;
mod install_script;
mod lifecycle_drain;
mod lifecycle_notify;
mod lifecycle_reload;
mod lifecycle_tls_reload;
mod lifecycle_ws;
mod metrics_live;
mod migrate_coturn;
mod relay_ws_backpressure;
mod relay_ws_transfer;
mod sd_notify;
mod signal_browser;
mod signal_peerjs;
mod signal_ws;
mod systemd_unit;
mod turn_bad_input;
mod turn_relay;
mod turn_tcp_relay;
mod turn_tls;
mod usage_accounting;
mod usage_cluster;
mod web_page;
