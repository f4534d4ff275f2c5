//! IO drivers around the sans-IO TURN core: worker threads that own UDP and TCP listener
//! sockets (SO_REUSEPORT), TCP framing, relay sockets, batched syscalls and data-path counters;
//! for RFC 6062 TCP allocations also the relay listeners, peer connections, the handover of a
//! client data connection to the worker owning its CONNECTION-ID, and the byte splicing.
//!
//! Owns sockets, threads and the event loops. It must not interpret STUN beyond
//! classification and framing (that is `crate::stun` / `crate::turn`), and it must not
//! allocate, lock, log or copy per relayed packet (DESIGN.md principle 2).

mod gso;
mod link;
mod mmsg;
mod relay_addr;
mod socket;
mod stats;
mod tcp;
pub mod udp_segment;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{Config, TlsConfig, TurnConfig};
use crate::tls::TlsContext;
use crate::turn::RelayAddr;

pub use stats::{NetStats, PortUse, TurnStatsSource, WorkerStats};

/// Errors starting the network service.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

struct WorkerHandle {
    waker: Arc<mio::Waker>,
    config_in: worker::ConfigSlot,
    thread: JoinHandle<()>,
    stats: Arc<Mutex<WorkerStats>>,
}

/// The running TURN listeners and workers.
pub struct TurnService {
    addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    tls: Option<TlsContext>,
    relay_ips: Vec<RelayAddr>,
    stop: Arc<AtomicBool>,
    workers: Vec<WorkerHandle>,
    /// The TURN core's cross-shard state (drain flag, allocation count).
    shared: Arc<crate::turn::Shared>,
    /// The kernel fast path's program and attachments (`turn.kernel_fast_path`); declared
    /// after `workers` so it is detached after they are joined.
    fast_path: Option<crate::fastpath::FastPath>,
}

impl TurnService {
    /// Binds every listener (UDP and TCP on each `turn.listen` address, RFC 8656 §3.1) and
    /// starts the workers, each with its own shard of the TURN server.
    pub fn start(cfg: &Config) -> Result<TurnService, NetError> {
        let tls = TlsContext::from_config(&cfg.tls).map_err(|e| NetError::Other(e.to_string()))?;
        Self::start_tls(cfg, tls)
    }

    /// As [`Self::start`], with the process's TLS context (shared with the HTTPS API, so one
    /// reload swaps the certificate everywhere). TLS listeners on `tls.listen` (RFC 8656
    /// §3.1) start when `tls` is given.
    pub fn start_tls(cfg: &Config, tls: Option<TlsContext>) -> Result<TurnService, NetError> {
        let relay_ips = relay_addr::choose(&cfg.turn);
        let scfg = Arc::new(
            crate::turn::ServerConfig::from_config(cfg, relay_ips.clone())
                .map_err(|e| NetError::Other(e.to_string()))?,
        );
        let shared = Arc::new(crate::turn::Shared::new(&scfg));
        let tls = tls.map(|ctx| (cfg.tls.clone(), ctx));
        Self::spawn(&cfg.turn, tls, relay_ips, scfg, shared)
    }

    /// Hands a reloaded configuration to every worker through its waker; each swaps it in
    /// between events (RFC 8656 state is untouched: allocations keep running).
    pub fn set_config(&self, cfg: Arc<crate::turn::ServerConfig>) {
        for w in &self.workers {
            *w.config_in.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&cfg));
            if let Err(e) = w.waker.wake() {
                tracing::warn!(error = %e, "cannot wake a TURN worker for the new configuration");
            }
        }
    }

    /// Starts or ends a graceful drain: new Allocate requests get 300 (an alternate) or
    /// 508; existing allocations are untouched.
    pub fn set_draining(&self, on: bool) {
        self.shared.set_draining(on);
    }

    /// Turns usage accounting on (`crate::usage`): allocations report to `ledger`.
    pub fn set_usage(&self, ledger: Arc<crate::usage::Ledger>) {
        self.shared.set_usage(ledger);
    }

    /// The TURN core's cross-shard state (cluster mode installs its hook there).
    pub fn shared(&self) -> &Arc<crate::turn::Shared> {
        &self.shared
    }

    /// Allocations alive across all workers.
    pub fn allocations(&self) -> u32 {
        self.shared.total_allocations()
    }

    /// Binds the listeners (TLS ones too when `tls` is given) and starts the workers, each
    /// with its own shard of the TURN server, built on the worker's thread.
    fn spawn(
        t: &TurnConfig,
        tls: Option<(TlsConfig, TlsContext)>,
        relay_ips: Vec<RelayAddr>,
        scfg: Arc<crate::turn::ServerConfig>,
        shared: Arc<crate::turn::Shared>,
    ) -> Result<TurnService, NetError> {
        let n = t.worker_count();
        // Loaded before the workers, dropped (detached) after they are joined; and before
        // the UDP sockets, whose GRO depends on the mode it ends up in.
        let fast_path =
            crate::fastpath::FastPath::start(t.kernel_fast_path, &t.kernel_fast_path_interfaces);
        let udp_gro = fast_path
            .as_ref()
            .is_none_or(|fp| fp.effective().allows_udp_gro());
        let default_listen = t.listen == TurnConfig::default().listen;
        let (addrs, per_worker) = bind_each(&t.listen, default_listen, n, "", |addr| {
            socket::bind_listeners(addr, n, t.socket_buffer_bytes, udp_gro)
        })?;
        let (tls_addrs, tls_per_worker) = match &tls {
            Some((tc, _)) => {
                let default_tls = tc.listen == TlsConfig::default().listen;
                bind_each(&tc.listen, default_tls, n, " TLS", |addr| {
                    socket::bind_tcp_listeners(addr, n, t.socket_buffer_bytes)
                })?
            }
            None => (Vec::new(), (0..n).map(|_| Vec::new()).collect()),
        };
        let tls_ctx = tls.map(|(_, x)| x);
        let handshake_timeout = tls_ctx
            .as_ref()
            .map_or(Duration::from_secs(10), |x| x.handshake_timeout);
        let stop = Arc::new(AtomicBool::new(false));
        let per_ip = tcp::PerIpLimit::new(t.tcp_max_per_ip);
        let mut workers = Vec::with_capacity(n);
        let mut service = TurnService {
            addrs,
            tls_addrs,
            tls: tls_ctx.clone(),
            relay_ips,
            stop: Arc::clone(&stop),
            workers: Vec::new(),
            shared: Arc::clone(&shared),
            fast_path: None,
        };
        // Every worker's poll and waker first: each worker can hand RFC 6062 data
        // connections to any other through its inbox.
        let mut polls = Vec::with_capacity(n);
        let mut wakers = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = mio::Poll::new().map_err(|e| NetError::Other(format!("poll: {e}")))?;
            let waker = mio::Waker::new(poll.registry(), worker::waker_token())
                .map_err(|e| NetError::Other(format!("waker: {e}")))?;
            polls.push(poll);
            wakers.push(Arc::new(waker));
        }
        let inboxes: Arc<[worker::Inbox]> = wakers
            .iter()
            .map(|w| worker::Inbox::new(Arc::clone(w)))
            .collect();
        for (index, ((listeners, tls_listeners), (poll, waker))) in per_worker
            .into_iter()
            .zip(tls_per_worker)
            .zip(polls.into_iter().zip(wakers))
            .enumerate()
        {
            let stats = Arc::new(Mutex::new(WorkerStats::default()));
            let config_in: worker::ConfigSlot = Arc::new(Mutex::new(None));
            let params = worker::WorkerParams {
                index,
                listeners,
                tls_listeners,
                tls: tls_ctx.as_ref().map(|x| Arc::clone(&x.server_config)),
                handshake_timeout,
                sniff_tls: t.sniff_tls,
                buffer_bytes: t.socket_buffer_bytes,
                udp_gro,
                max_bytes_per_sec: t.max_bytes_per_sec,
                tcp_idle: Duration::from_secs(t.tcp_idle_timeout_secs.max(1).into()),
                per_ip: per_ip.clone(),
                stop: Arc::clone(&stop),
                stats_out: Arc::clone(&stats),
                config_in: Arc::clone(&config_in),
                inboxes: Arc::clone(&inboxes),
                offload: fast_path.as_ref().and_then(|fp| match fp.offload() {
                    Ok(o) => Some(o),
                    Err(e) => {
                        tracing::warn!(worker = index, error = %e, "kernel fast path maps unavailable to this worker; it relays in user space");
                        None
                    }
                }),
            };
            let (scfg, shared) = (Arc::clone(&scfg), Arc::clone(&shared));
            let (ready_tx, ready_rx) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("tern-turn-{index}"))
                .spawn(move || {
                    // Built here: the worker's buffers and shard never leave this thread.
                    let core = crate::turn::Server::new(scfg, shared);
                    match worker::Worker::new(params, poll, core) {
                        Ok(w) => {
                            let _ = ready_tx.send(Ok(()));
                            w.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| NetError::Other(format!("spawn worker: {e}")))?;
            let ready = ready_rx.recv();
            workers.push(WorkerHandle {
                waker,
                config_in,
                thread,
                stats,
            });
            match ready {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    service.workers = workers;
                    service.stop_and_join();
                    return Err(NetError::Other(format!("worker {index}: {e}")));
                }
                Err(_) => {
                    service.workers = workers;
                    service.stop_and_join();
                    return Err(NetError::Other(format!("worker {index} died at start")));
                }
            }
        }
        service.workers = workers;
        service.fast_path = fast_path;
        tracing::info!(workers = n, "TURN workers started");
        Ok(service)
    }

    /// The bound listener addresses (with real ports when port 0 was configured).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The bound TURN over TLS listener addresses.
    pub fn local_tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    /// The TLS context (certificate store) in use, for reloading the certificate.
    pub fn tls(&self) -> Option<&TlsContext> {
        self.tls.as_ref()
    }

    /// The relay addresses in use (local and advertised).
    pub fn relay_ips(&self) -> &[RelayAddr] {
        &self.relay_ips
    }

    /// Data-path counters summed over workers (each publishes about twice a second).
    pub fn stats(&self) -> NetStats {
        self.stats_source().net()
    }

    /// The TURN core's counters summed over the workers' shards (same cadence).
    pub fn turn_stats(&self) -> crate::turn::TurnStats {
        self.stats_source().turn()
    }

    /// A handle that reads the workers' counters, for the metrics face.
    pub fn stats_source(&self) -> TurnStatsSource {
        TurnStatsSource {
            workers: self.workers.iter().map(|w| Arc::clone(&w.stats)).collect(),
            shared: Some(Arc::clone(&self.shared)),
            relay_ips: self.relay_ips.iter().map(|r| r.local).collect(),
        }
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &self.workers {
            let _ = w.waker.wake();
        }
        for w in self.workers.drain(..) {
            if w.thread.join().is_err() {
                tracing::error!("a TURN worker panicked");
            }
        }
    }

    /// Stops the workers and joins them.
    pub fn shutdown(mut self) {
        self.stop_and_join();
        tracing::info!("TURN stopped");
    }
}

impl Drop for TurnService {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Listeners of every worker for each configured address: the bound addresses, and per
/// worker its `(address, listener)` list. The built-in `[::]` default (`default`) is best
/// effort: hosts without IPv6 still work.
#[allow(clippy::type_complexity)]
fn bind_each<T>(
    listen: &[SocketAddr],
    default: bool,
    workers: usize,
    what: &str,
    bind: impl Fn(SocketAddr) -> std::io::Result<(SocketAddr, Vec<T>)>,
) -> Result<(Vec<SocketAddr>, Vec<Vec<(SocketAddr, T)>>), NetError> {
    let mut addrs = Vec::new();
    let mut per_worker: Vec<Vec<(SocketAddr, T)>> = (0..workers).map(|_| Vec::new()).collect();
    for &addr in listen {
        match bind(addr) {
            Ok((bound, each)) => {
                addrs.push(bound);
                for (w, l) in each.into_iter().enumerate() {
                    per_worker[w].push((bound, l));
                }
            }
            Err(e) if default && addr.is_ipv6() => {
                tracing::warn!(%addr, error = %e, "IPv6{what} listener not available; continuing without it");
            }
            Err(source) => return Err(NetError::Bind { addr, source }),
        }
    }
    Ok((addrs, per_worker))
}
