//! `tern serve`: starts every face on the shared config, reloads it on SIGHUP, drains on
//! SIGTERM (a second SIGTERM or `daemon.drain_timeout_secs` ends the drain), stops at
//! once on SIGINT. Owns process-level wiring only; protocol logic lives in the faces'
//! modules, reload policy in `crate::lifecycle`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::HttpService;
use crate::config::Config;
use crate::lifecycle::{self, ConfigSource, STATE};
use crate::net::TurnService;

/// Errors that stop the daemon at start-up.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Registry(#[from] crate::metrics::RegistryError),
    #[error("usage.path: {0}")]
    Usage(#[from] crate::usage::StoreError),
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Cluster mode (`[cluster]`): starts the driver and hands its snapshots to the TURN core
/// (quota, ALTERNATE-SERVER) and the HTTP face (`/api/ice` steering).
fn start_cluster(
    cfg: &Config,
    faces: &Faces,
) -> Result<crate::cluster::ClusterService, DaemonError> {
    use crate::cluster::{Advertised, ClusterService, CountsFn, LoadFn, LocalLoad};
    let api_cfg = faces.api_config(cfg);
    let advertised = Advertised::from_config(&api_cfg, crate::api::ice::turns_port(&api_cfg));
    let shared = Arc::clone(faces.turn.shared());
    let turn_stats = faces.turn.stats_source();
    let http_stats = faces.http.as_ref().map(HttpService::stats_source);
    let load_shared = Arc::clone(&shared);
    let load: LoadFn = Box::new(move || {
        let n = turn_stats.net();
        let h = http_stats
            .as_ref()
            .map(|h| h.snapshot())
            .unwrap_or_default();
        let turn_bytes = n.client_to_peer_udp_bytes
            + n.client_to_peer_tcp_bytes
            + n.client_to_peer_tls_bytes
            + n.peer_to_client_udp_bytes
            + n.peer_to_client_tcp_bytes
            + n.peer_to_client_tls_bytes;
        LocalLoad {
            allocations: load_shared.total_allocations(),
            relayed_bytes: turn_bytes + h.relay_bytes_forwarded,
            signal_peers: (h.signal_peers + h.peerjs_clients) as u64,
            draining: load_shared.draining(),
        }
    });
    let counts_shared = Arc::clone(&shared);
    let counts: CountsFn = Box::new(move |users| counts_shared.local_user_counts(users));
    let rooms = faces.http.as_ref().map(HttpService::rooms_hub);
    let peerjs = faces.http.as_ref().map(HttpService::peerjs_hub);
    let svc = ClusterService::start(cfg, advertised, load, counts, rooms, peerjs)?;
    shared.set_cluster(svc.hook());
    if let Some(h) = &faces.http {
        h.set_cluster(svc.view())?;
    }
    Ok(svc)
}

/// The running faces, as a reload or drain sees them.
struct Faces {
    turn: TurnService,
    http: Option<HttpService>,
    /// The certificate store TURN over TLS and HTTPS share (`[tls]`), if configured.
    tls: Option<crate::tls::TlsContext>,
}

impl Faces {
    /// The HTTP face's view of `cfg`: ICE URLs carry the TURN port actually bound (it may
    /// have been configured as 0).
    fn api_config(&self, cfg: &Config) -> Config {
        let mut api_cfg = cfg.clone();
        if !self.turn.local_addrs().is_empty() {
            api_cfg.turn.listen = self.turn.local_addrs().to_vec();
        }
        api_cfg.tls.listen = self.turn.local_tls_addrs().to_vec();
        api_cfg
    }

    /// What a drain waits for: TURN allocations and `/relay` sessions.
    fn in_flight(&self) -> (u32, usize) {
        let relay = self.http.as_ref().map_or(0, HttpService::relay_sessions);
        (self.turn.allocations(), relay)
    }
}

/// Runs until SIGINT, or SIGTERM and the drain, then stops the listeners and returns.
/// `source` is where `cfg` came from; SIGHUP loads it again.
pub fn run(mut cfg: Config, source: ConfigSource) -> Result<(), DaemonError> {
    // Kept across reloads while the config still names no secret and no user.
    let mut ephemeral = None;
    if cfg.add_ephemeral_secret_if_none()? {
        ephemeral = cfg.turn.auth_secrets.last().cloned();
        tracing::warn!(
            "no turn.auth_secrets, turn.secret_file or turn.users configured: using a random \
             secret for this run only (the built-in page and /api/ice work; a backend minting its \
             own credentials needs turn.secret_file)"
        );
    }
    match crate::ops::memory::map_in() {
        Ok(bytes) => tracing::debug!(kib = bytes / 1024, "executable mapped in"),
        Err(e) => {
            tracing::info!("executable not mapped in at start (its pages fault in as used): {e}")
        }
    }
    let int = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    let hup = Arc::new(AtomicBool::new(false));
    for (sig, flag) in [
        (signal_hook::consts::SIGINT, &int),
        (signal_hook::consts::SIGTERM, &term),
        (signal_hook::consts::SIGHUP, &hup),
    ] {
        signal_hook::flag::register(sig, Arc::clone(flag)).map_err(DaemonError::Signals)?;
    }
    let mut sup = crate::ops::supervisor::Supervisor::from_env();
    sup.status("starting");
    let failed = |e: &dyn std::fmt::Display| format!("failed to start: {e}");
    // One certificate store for TURN over TLS and HTTPS: one reload swaps both.
    let tls =
        crate::tls::TlsContext::from_config(&cfg.tls).inspect_err(|e| sup.status(&failed(e)))?;
    let usage = crate::usage::start(&cfg).inspect_err(|e| sup.status(&failed(e)))?;
    let turn = TurnService::start_tls(&cfg, tls.clone()).inspect_err(|e| sup.status(&failed(e)))?;
    if let Some(u) = &usage {
        turn.set_usage(Arc::clone(u.ledger()));
    }
    for addr in turn.local_addrs() {
        tracing::info!(%addr, sniff_tls = cfg.turn.sniff_tls && tls.is_some(), "TURN listening (udp+tcp)");
    }
    for addr in turn.local_tls_addrs() {
        tracing::info!(%addr, "TURN listening (tls)");
    }
    let mut faces = Faces {
        turn,
        http: None,
        tls,
    };
    if cfg.api.enabled {
        let https = faces.tls.clone().filter(|_| cfg.api.tls);
        let http = HttpService::start_tls(&faces.api_config(&cfg), https)
            .inspect_err(|e| sup.status(&failed(e)))?;
        tracing::info!(addr = %http.local_addr(), "HTTP API and signaling listening");
        faces.http = Some(http);
    }
    let cluster = if cfg.cluster.enabled() {
        Some(start_cluster(&cfg, &faces).inspect_err(|e| sup.status(&failed(e)))?)
    } else {
        None
    };
    // /healthz answers from here on; /readyz once STATE says ready (below).
    let metrics = if cfg.metrics.enabled {
        let mut registry = crate::metrics::Metrics::new(
            Some(faces.turn.stats_source()),
            faces.http.as_ref().map(HttpService::stats_source),
        )
        .inspect_err(|e| sup.status(&failed(e)))?;
        if let Some(u) = &usage {
            registry
                .register_usage(Arc::clone(u.ledger()))
                .inspect_err(|e| sup.status(&failed(e)))?;
        }
        if let Some(c) = &cluster {
            registry
                .add_cluster(c.view())
                .inspect_err(|e| sup.status(&failed(e)))?;
        }
        let m = crate::metrics::MetricsService::start(cfg.metrics.listen, registry)
            .inspect_err(|e| sup.status(&failed(e)))?;
        tracing::info!(addr = %m.local_addr(), "metrics listening (/metrics, /healthz, /readyz)");
        Some(m)
    } else {
        None
    };
    let _pid = write_pid_file(&cfg);
    // READY=1 once every listener is bound and TURN answers; WATCHDOG=1 only while it does.
    sup.watch_turn(faces.turn.local_addrs());
    // /readyz says ready before READY=1 goes out: whoever acts on READY=1 (the service
    // manager, a test) and then asks /readyz must not see 503.
    STATE.set_ready(true);
    sup.ready(&crate::ops::supervisor::serving_status(
        faces.turn.local_addrs(),
    ));
    let mut running = cfg;
    let mut drain: Option<Instant> = None;
    let mut last_status = (u32::MAX, usize::MAX);
    let mut trim = crate::ops::memory::HeapTrim::new(Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(100));
        sup.tick();
        trim.tick(Instant::now());
        if int.load(Ordering::Relaxed) {
            tracing::info!("SIGINT received, shutting down");
            break;
        }
        if hup.swap(false, Ordering::Relaxed) {
            sup.reloading();
            let applied = reload(&source, ephemeral.as_deref(), &mut running, &faces);
            sup.reloaded(if applied { "" } else { "last reload refused" });
        }
        if term.swap(false, Ordering::Relaxed) {
            if drain.is_some() {
                tracing::info!("second SIGTERM: ending the drain now");
                break;
            }
            let (allocs, relays) = faces.in_flight();
            let timeout = running.daemon.drain_timeout_secs;
            if (allocs == 0 && relays == 0) || timeout == 0 {
                tracing::info!("SIGTERM received, shutting down");
                break;
            }
            STATE.set_draining(true);
            faces.turn.set_draining(true);
            if let Some(c) = &cluster {
                c.announce_now();
            }
            tracing::info!(
                allocations = allocs,
                relay_sessions = relays,
                timeout_secs = timeout,
                "SIGTERM received: draining (new allocations and signaling connections are refused; a second SIGTERM stops at once)"
            );
            sup.stopping(&drain_status(allocs, relays));
            last_status = (allocs, relays);
            drain = Some(Instant::now() + Duration::from_secs(timeout.into()));
        }
        if let Some(deadline) = drain {
            let (allocs, relays) = faces.in_flight();
            if allocs == 0 && relays == 0 {
                tracing::info!("drain complete: no allocations or relay sessions left");
                break;
            }
            if Instant::now() >= deadline {
                tracing::info!(
                    allocations = allocs,
                    relay_sessions = relays,
                    "drain timeout reached; closing what is left"
                );
                break;
            }
            if (allocs, relays) != last_status {
                last_status = (allocs, relays);
                sup.status(&drain_status(allocs, relays));
            }
        }
    }
    STATE.set_ready(false);
    sup.stopping("shutting down");
    if let Some(http) = faces.http.take() {
        http.shutdown();
    }
    if let Some(c) = cluster {
        c.shutdown();
    }
    faces.turn.shutdown();
    // Writes the rollups still pending (allocations cut by the stop count up to their
    // last interim report).
    if let Some(u) = usage {
        u.shutdown();
    }
    if let Some(m) = metrics {
        m.shutdown();
    }
    Ok(())
}

fn drain_status(allocs: u32, relays: usize) -> String {
    format!("draining: {allocs} allocations, {relays} relay sessions left")
}

/// Writes `daemon.pid_file` if set. A failure is logged, not fatal: the daemon serves
/// without it, only `tern reload` cannot find it (`systemctl reload` still works).
fn write_pid_file(cfg: &Config) -> Option<lifecycle::PidFile> {
    let path = &cfg.daemon.pid_file;
    if path.as_os_str().is_empty() {
        return None;
    }
    match lifecycle::PidFile::create(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "no pid file; `tern reload` will not find this daemon (send SIGHUP instead)");
            None
        }
    }
}

/// SIGHUP: loads the configuration again the way it was loaded at start and applies what
/// can change live. Anything invalid refuses the whole reload with one log line; keys
/// that need a restart keep their running values and are named in one log line.
/// Returns whether the new configuration was applied.
fn reload(
    source: &ConfigSource,
    ephemeral: Option<&str>,
    running: &mut Config,
    faces: &Faces,
) -> bool {
    let refuse = |why: String| {
        tracing::error!("reload refused, the running configuration stays in force: {why}");
        false
    };
    let mut new = match source.load() {
        Ok(c) => c,
        Err(e) => return refuse(lifecycle::one_line(&e)),
    };
    if let Some(secret) = ephemeral {
        if new.turn_secrets().is_ok_and(|s| s.is_empty()) && new.turn.users.is_empty() {
            new.turn.auth_secrets.push(secret.to_string());
        }
    }
    let restart = lifecycle::keep_restart_only(running, &mut new);
    let scfg = match crate::turn::ServerConfig::from_config(&new, faces.turn.relay_ips().to_vec()) {
        Ok(s) => Arc::new(s),
        Err(e) => return refuse(lifecycle::one_line(&e)),
    };
    // The HTTP face re-reads secret and token files: the only step left that can fail,
    // so it goes first and nothing is applied if it does.
    if let Some(http) = &faces.http {
        if let Err(e) = http.reload(&faces.api_config(&new)) {
            return refuse(e.to_string());
        }
    }
    // The certificate files were loaded and checked by the config validation above; a
    // failure here (a file replaced in between) keeps the old certificate.
    match (&faces.tls, new.tls.enabled()) {
        (Some(tls), true) => {
            if let Err(e) = tls.reload(&new.tls) {
                tracing::error!("TLS certificate not reloaded, the old one stays in use: {e}");
            }
        }
        (None, true) => {
            tracing::warn!("[tls] was enabled by a reload: TLS listeners start on restart")
        }
        (Some(_), false) => tracing::warn!(
            "[tls] removed by a reload: the running certificate stays in use until restart"
        ),
        (None, false) => {}
    }
    faces.turn.set_config(scfg);
    let secrets = new.turn_secrets().map_or(0, |s| s.len());
    tracing::info!(
        secrets,
        static_users = new.turn.users.len(),
        "configuration reloaded"
    );
    if !restart.is_empty() {
        tracing::warn!(
            "changed keys need a restart and keep their running values until then: {}",
            restart.join(", ")
        );
    }
    *running = new;
    true
}
