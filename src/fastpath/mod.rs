//! The opt-in kernel fast path for established channel bindings (`turn.kernel_fast_path`,
//! issue 15 item 3): loads one of the two BPF programs built from `bpf/` (TC:
//! `tern_fastpath.bpf.c`, XDP: `tern_fastpath_xdp.bpf.c`, sharing `tern_fastpath.h`; the
//! objects are committed beside their sources and embedded here), attaches it to the
//! configured interfaces, and gives each TURN worker an [`Offload`]: its own handles on the
//! maps plus a mirror of the bindings it put there. Both programs have the same maps, so
//! nothing past [`FastPath::start`] depends on the mode.
//!
//! Owns: the BPF object, its attachments, and the map entries of each worker's channel
//! bindings (one writer per entry: the worker owning the allocation). Reads the per-binding
//! counters the program keeps and hands their growth to the caller, which adds it to the
//! same relay usage and data-path counters the user-space path feeds.
//! Must not: decide what is offloaded (the TURN core's channel and permission tables do,
//! through `ChannelRoute`s), run per packet in user space, or fail the daemon: when BPF
//! cannot load or attach, [`FastPath::start`] logs one line and Tern relays in user space
//! (XDP first falls back to generic mode, then to TC, each with that one line).

mod maps;
mod route;

pub use maps::Budget;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};

use aya::maps::{DevMapHash, HashMap as BpfHashMap, MapData};
use aya::programs::{tc, SchedClassifier, TcAttachType, Xdp, XdpFlags};
use aya::Ebpf;
use rustc_hash::FxHashMap;

use crate::turn::{ChannelRoute, RelayId, RelayUsage, Transport};
use maps::{BudgetKey, C2pKey, C2pVal, P2cKey, P2cVal, V4Binding};
use route::RouteSocket;

/// `turn.kernel_fast_path`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Everything in user space (the default until the fast path is proven).
    #[default]
    Off,
    /// A TC (clsact ingress) classifier on each interface in
    /// `turn.kernel_fast_path_interfaces`.
    Tc,
    /// An XDP program on each interface in `turn.kernel_fast_path_interfaces` (native mode,
    /// else generic), forwarding with XDP_TX / a devmap redirect; falls back to TC when XDP
    /// cannot run there (docs/fastpath.md).
    Xdp,
}

/// What relays established channel bindings in this process (`tern_fastpath_mode`):
/// the mode [`FastPath::start`] ended in after its fallbacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Effective {
    /// User space: the fast path is off, or it could not load or attach.
    UserSpace = 0,
    /// The TC program (asked for, or XDP's fallback).
    Tc = 1,
    /// The XDP program in native (driver) mode on every interface.
    XdpNative = 2,
    /// The XDP program, in generic (skb) mode on at least one interface.
    XdpGeneric = 3,
}

impl Effective {
    pub const ALL: [Effective; 4] = [
        Effective::UserSpace,
        Effective::Tc,
        Effective::XdpNative,
        Effective::XdpGeneric,
    ];

    /// Whether Tern's UDP listener and relay sockets may ask for UDP GRO (`UDP_GRO`) in
    /// this mode. With GRO on, the receive path coalesces consecutive datagrams of a flow
    /// into one GSO buffer before the TC hook and generic XDP see them; the programs pass
    /// such buffers up untouched, so a burst misses the fast path (bench runs with GRO on
    /// veths offloaded only 59-65 % of the datagrams, 100 % without). Native XDP runs in the
    /// driver before GRO, and user space gains from it.
    pub fn allows_udp_gro(self) -> bool {
        match self {
            Effective::UserSpace | Effective::XdpNative => true,
            Effective::Tc | Effective::XdpGeneric => false,
        }
    }

    /// The `mode` label of `tern_fastpath_mode`.
    pub fn label(self) -> &'static str {
        match self {
            Effective::UserSpace => "user_space",
            Effective::Tc => "tc",
            Effective::XdpNative => "xdp_native",
            Effective::XdpGeneric => "xdp_generic",
        }
    }
}

/// The process's [`Effective`] mode: one TURN service per daemon sets it at start, and the
/// metrics face reads it (a process-wide fact, like the program's attachments).
static EFFECTIVE: AtomicU8 = AtomicU8::new(Effective::UserSpace as u8);

/// The mode in effect now (user space before the service starts and after it stops).
pub fn effective() -> Effective {
    Effective::ALL[usize::from(EFFECTIVE.load(Ordering::Relaxed)).min(3)]
}

fn set_effective(e: Effective) {
    EFFECTIVE.store(e as u8, Ordering::Relaxed);
}

/// The compiled programs (`bpf/build.sh` rebuilds them), 8-byte aligned for the ELF parser.
#[repr(C, align(8))]
struct Aligned<B: ?Sized>(B);
static OBJECT_TC: &Aligned<[u8]> = &Aligned(*include_bytes!("../../bpf/tern_fastpath.bpf.o"));
static OBJECT_XDP: &Aligned<[u8]> = &Aligned(*include_bytes!("../../bpf/tern_fastpath_xdp.bpf.o"));

/// The embedded objects and their files under `bpf/` (tests compare them with a fresh
/// build).
pub fn objects() -> [(&'static str, &'static [u8]); 2] {
    [
        ("tern_fastpath.bpf.o", &OBJECT_TC.0),
        ("tern_fastpath_xdp.bpf.o", &OBJECT_XDP.0),
    ]
}

const TC_PROGRAM: &str = "tern_tc_ingress";
const XDP_PROGRAM: &str = "tern_xdp";
/// The XDP program's redirect targets: the interfaces it is attached to.
const EGRESS: &str = "tern_egress";
const C2P: &str = "tern_c2p";
const P2C: &str = "tern_p2c";
const BUDGET: &str = "tern_budget";
/// Map capacity (the `max_entries` in the C source): bindings past it stay in user space.
pub const MAX_BINDINGS: usize = 65536;
/// ChannelData header the program adds or strips, counted in `peer_to_client_udp_bytes`
/// like the user-space path counts it.
pub const CHANNEL_DATA_HEADER: u64 = 4;

/// The loaded and attached program. Dropping it detaches it (TCX and XDP links, netlink
/// filters alike); the maps go with the last worker handle.
pub struct FastPath {
    _ebpf: Ebpf,
    effective: Effective,
    c2p_id: u32,
    p2c_id: u32,
    budget_id: u32,
}

impl FastPath {
    /// Loads the program for `mode` and attaches it to every interface in `interfaces`;
    /// `None` (after ONE warning line saying why) when `mode` is off or nothing could
    /// attach. XDP that cannot run natively on an interface runs in generic mode there, and
    /// XDP that cannot run at all falls back to TC; either says so in its one line.
    pub fn start(mode: Mode, interfaces: &[String]) -> Option<FastPath> {
        let fp = Self::start_any(mode, interfaces);
        set_effective(fp.as_ref().map_or(Effective::UserSpace, |f| f.effective));
        fp
    }

    fn start_any(mode: Mode, interfaces: &[String]) -> Option<FastPath> {
        let xdp_error = match mode {
            Mode::Off => return None,
            Mode::Tc => None,
            Mode::Xdp => match Self::try_start_xdp(interfaces) {
                Ok((fp, generic)) if generic.is_empty() => {
                    tracing::info!(
                        interfaces = ?interfaces,
                        "kernel fast path on: XDP program attached (native mode)"
                    );
                    return Some(fp);
                }
                Ok((fp, generic)) => {
                    tracing::warn!(
                        interfaces = ?interfaces,
                        generic = ?generic,
                        "kernel fast path on: XDP program attached, in generic (skb) mode on \
                         the interfaces whose driver refused native mode (slower)"
                    );
                    return Some(fp);
                }
                Err(e) => Some(e),
            },
        };
        match (Self::try_start_tc(interfaces), xdp_error) {
            (Ok(fp), None) => {
                tracing::info!(
                    interfaces = ?interfaces,
                    "kernel fast path on: TC ingress program attached"
                );
                Some(fp)
            }
            (Ok(fp), Some(xdp)) => {
                tracing::warn!(
                    interfaces = ?interfaces,
                    xdp_error = %xdp,
                    "kernel fast path on: TC ingress program attached (XDP unavailable)"
                );
                Some(fp)
            }
            (Err(e), xdp) => {
                let error = match xdp {
                    Some(x) => format!("XDP: {x}; TC: {e}"),
                    None => e,
                };
                tracing::warn!(error = %error, "kernel fast path unavailable; relaying in user space");
                None
            }
        }
    }

    fn try_start_tc(interfaces: &[String]) -> Result<FastPath, String> {
        let mut ebpf =
            Ebpf::load(&OBJECT_TC.0).map_err(|e| format!("loading the BPF object: {e}"))?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TC_PROGRAM)
            .ok_or("no program in the BPF object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load()
            .map_err(|e| format!("loading the program: {e}"))?;
        for iface in interfaces {
            // Kernels before 6.6 attach through netlink and need the clsact qdisc; newer
            // ones use a TCX link and do not.
            if prog.attach(iface, TcAttachType::Ingress).is_err() {
                let _ = tc::qdisc_add_clsact(iface);
                prog.attach(iface, TcAttachType::Ingress)
                    .map_err(|e| format!("attaching to {iface}: {e}"))?;
            }
        }
        Self::with_maps(ebpf, Effective::Tc)
    }

    /// The XDP program on every interface, and those where it runs in generic mode.
    fn try_start_xdp(interfaces: &[String]) -> Result<(FastPath, Vec<String>), String> {
        // bpf_fib_lookup answers "forwarding disabled" on an ingress interface without it:
        // every datagram would go up to user space.
        for iface in interfaces {
            let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
            let on = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            if on.trim() != "1" {
                return Err(format!(
                    "net.ipv4.conf.{iface}.forwarding is off (bpf_fib_lookup needs it)"
                ));
            }
        }
        let mut ebpf =
            Ebpf::load(&OBJECT_XDP.0).map_err(|e| format!("loading the BPF object: {e}"))?;
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or("no program in the BPF object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load()
            .map_err(|e| format!("loading the program: {e}"))?;
        let mut generic = Vec::new();
        let mut ifindexes = Vec::new();
        for iface in interfaces {
            if prog.attach(iface, XdpFlags::DRV_MODE).is_err() {
                prog.attach(iface, XdpFlags::SKB_MODE)
                    .map_err(|e| format!("attaching to {iface}: {e}"))?;
                generic.push(iface.clone());
            }
            let name = std::ffi::CString::new(iface.as_str()).map_err(|e| format!("{e}"))?;
            // SAFETY: a NUL-terminated name.
            ifindexes.push(unsafe { libc::if_nametoindex(name.as_ptr()) });
        }
        let mut egress = DevMapHash::try_from(ebpf.map_mut(EGRESS).ok_or("no map tern_egress")?)
            .map_err(|e| format!("{e}"))?;
        for ifindex in ifindexes {
            egress
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| format!("tern_egress: {e}"))?;
        }
        let effective = if generic.is_empty() {
            Effective::XdpNative
        } else {
            Effective::XdpGeneric
        };
        Ok((Self::with_maps(ebpf, effective)?, generic))
    }

    /// The loaded program with the ids of its binding maps (for the workers' handles).
    fn with_maps(ebpf: Ebpf, effective: Effective) -> Result<FastPath, String> {
        let id = |name: &str| -> Result<u32, String> {
            let map = ebpf.map(name).ok_or(format!("no map {name}"))?;
            let data: &MapData = match map {
                aya::maps::Map::HashMap(d) => d,
                _ => return Err(format!("map {name} is not a hash map")),
            };
            Ok(data.info().map_err(|e| format!("{e}"))?.id())
        };
        let (c2p_id, p2c_id, budget_id) = (id(C2P)?, id(P2C)?, id(BUDGET)?);
        Ok(FastPath {
            _ebpf: ebpf,
            effective,
            c2p_id,
            p2c_id,
            budget_id,
        })
    }

    /// The mode this program runs in (after its fallbacks).
    pub fn effective(&self) -> Effective {
        self.effective
    }

    /// A worker's own handles on the maps (its own descriptors: no lock between workers).
    pub fn offload(&self) -> Result<Offload, String> {
        let open = |id: u32| MapData::from_id(id).map_err(|e| format!("{e}"));
        let c2p = BpfHashMap::try_from(aya::maps::Map::HashMap(open(self.c2p_id)?))
            .map_err(|e| format!("{e}"))?;
        let p2c = BpfHashMap::try_from(aya::maps::Map::HashMap(open(self.p2c_id)?))
            .map_err(|e| format!("{e}"))?;
        let budget = BpfHashMap::try_from(aya::maps::Map::HashMap(open(self.budget_id)?))
            .map_err(|e| format!("{e}"))?;
        Ok(Offload {
            c2p,
            p2c,
            budget,
            budgets: FxHashMap::default(),
            routes: RouteSocket::new().map_err(|e| format!("netlink route socket: {e}"))?,
            by_relay: FxHashMap::default(),
            synced: None,
            failed: 0,
        })
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        // Detached with `_ebpf` right after this.
        set_effective(Effective::UserSpace);
    }
}

/// One channel binding in the maps, with the counters already handed to the caller.
struct Binding {
    route: ChannelRoute,
    /// What the entries' `capped` flag says (a reload that caps or uncaps the relay
    /// replaces them).
    capped: bool,
    c2p: C2pKey,
    p2c: P2cKey,
    folded: RelayUsage,
}

/// A channel binding the worker wants offloaded, with its relay socket's bound address.
#[derive(Clone, Copy, Debug)]
pub struct Wanted {
    pub route: ChannelRoute,
    pub relay_addr: SocketAddr,
    /// The relay has a `turn.max_bytes_per_sec` cap: the program only forwards within the
    /// budgets granted through [`Offload::exchange_budgets`]. Uncapped bindings carry a 0
    /// flag in their map values, and the program does not look up a budget for them.
    pub capped: bool,
}

impl Wanted {
    /// What the program can rewrite: a UDP client, IPv4 throughout.
    fn v4(&self) -> Option<V4Binding> {
        let r = &self.route;
        if r.client.transport != Transport::Udp {
            return None;
        }
        match (r.client.client, r.client.server, self.relay_addr, r.peer) {
            (
                SocketAddr::V4(client),
                SocketAddr::V4(server),
                SocketAddr::V4(relay),
                SocketAddr::V4(peer),
            ) => Some(V4Binding {
                client,
                server,
                channel: r.channel.get(),
                relay,
                peer,
                capped: self.capped,
            }),
            _ => None,
        }
    }
}

/// One worker's side of the fast path: its map handles and the bindings it put there.
/// Runs on the worker's control path only (after the TURN core changed its channel or
/// permission tables, and at housekeeping).
pub struct Offload {
    c2p: BpfHashMap<MapData, C2pKey, C2pVal>,
    p2c: BpfHashMap<MapData, P2cKey, P2cVal>,
    budget: BpfHashMap<MapData, BudgetKey, Budget>,
    /// Capped relays with an entry in `budget`.
    budgets: FxHashMap<RelayId, BudgetKey>,
    routes: RouteSocket,
    by_relay: FxHashMap<RelayId, Vec<Binding>>,
    /// The core's route generation the maps reflect (`None`: sync at the next chance).
    synced: Option<u64>,
    /// Bindings the maps refused (full): they stay in user space.
    pub failed: u64,
}

impl Offload {
    /// Whether the maps reflect the core's route generation `generation`.
    pub fn is_synced(&self, generation: u64) -> bool {
        self.synced == Some(generation)
    }

    /// Forces a sync at the next chance (e.g. bandwidth caps changed on reload).
    pub fn invalidate(&mut self) {
        self.synced = None;
    }

    /// Bindings currently offloaded.
    pub fn bindings(&self) -> usize {
        self.by_relay.values().map(Vec::len).sum()
    }

    /// Makes the maps hold exactly `wanted` (those the program can rewrite). Bindings that
    /// leave hand their last counters to `fold` first.
    pub fn sync(
        &mut self,
        generation: u64,
        wanted: &[Wanted],
        mut fold: impl FnMut(RelayId, RelayUsage),
    ) {
        let mut want: FxHashMap<C2pKey, (Wanted, V4Binding)> = FxHashMap::default();
        for w in wanted {
            if let Some(b) = w.v4() {
                // A capped relay's budget entry (empty until the next grant) goes in
                // before its bindings: the program sends a capped binding's datagrams up
                // to user space while there is none.
                if w.capped && !self.budgets.contains_key(&w.route.relay) {
                    let key = BudgetKey::new(b.relay);
                    if self.budget.insert(key, Budget::default(), 0).is_err() {
                        self.failed += 1;
                        continue;
                    }
                    self.budgets.insert(w.route.relay, key);
                }
                // The interfaces do not matter for the key.
                let (ck, ..) = maps::entries(&b, 0, 0);
                want.insert(ck, (*w, b));
            }
        }
        let mut gone = Vec::new();
        for (relay, list) in &mut self.by_relay {
            list.retain(|b| {
                let keep = want
                    .get(&b.c2p)
                    .is_some_and(|(w, ..)| w.route == b.route && w.capped == b.capped);
                if keep {
                    want.remove(&b.c2p);
                } else {
                    gone.push((*relay, b.c2p, b.p2c, b.folded));
                }
                keep
            });
        }
        self.by_relay.retain(|_, l| !l.is_empty());
        for (relay, c2p, p2c, folded) in gone {
            let delta = self.delta(&c2p, &p2c, folded);
            let _ = self.c2p.remove(&c2p);
            let _ = self.p2c.remove(&p2c);
            fold(relay, delta);
        }
        for (_, (w, b)) in want {
            // Where each direction leaves; a destination without a route, or a local
            // one, stays in user space.
            let (Ok(Some(to_peer)), Ok(Some(to_client))) = (
                self.routes.oif(*b.relay.ip(), *b.peer.ip()),
                self.routes.oif(*b.server.ip(), *b.client.ip()),
            ) else {
                continue;
            };
            let (ck, cv, pk, pv) = maps::entries(&b, to_peer, to_client);
            // Peer → client first: the client's ChannelData is never offloaded while the
            // way back is not.
            if self.p2c.insert(pk, pv, 0).is_err() {
                self.failed += 1;
                continue;
            }
            if self.c2p.insert(ck, cv, 0).is_err() {
                let _ = self.p2c.remove(&pk);
                self.failed += 1;
                continue;
            }
            self.by_relay
                .entry(w.route.relay)
                .or_default()
                .push(Binding {
                    route: w.route,
                    capped: w.capped,
                    c2p: ck,
                    p2c: pk,
                    folded: RelayUsage::default(),
                });
        }
        self.synced = Some(generation);
    }

    /// Settles the budgets of capped relays (after a sync and at housekeeping): `settle`
    /// gets what the program left unspent (to put back in the relay's token buckets) and
    /// whether the relay still has bindings, and returns the next grant (to peer, to
    /// client). A relay without bindings, or no longer capped (`None`), loses its entry.
    pub fn exchange_budgets(
        &mut self,
        mut settle: impl FnMut(RelayId, Budget, bool) -> Option<Budget>,
    ) {
        let by_relay = &self.by_relay;
        let budget = &mut self.budget;
        self.budgets.retain(|relay, key| {
            let left = budget.get(key, 0).unwrap_or_default();
            let live = by_relay.contains_key(relay);
            match settle(*relay, left, live) {
                Some(grant) if live => budget.insert(*key, grant, 0).is_ok(),
                _ => {
                    let _ = budget.remove(key);
                    false
                }
            }
        });
    }

    /// Hands every binding's counter growth since the last call to `fold` (housekeeping).
    pub fn poll(&mut self, mut fold: impl FnMut(RelayId, RelayUsage)) {
        let mut by_relay = std::mem::take(&mut self.by_relay);
        for (relay, list) in &mut by_relay {
            for b in list.iter_mut() {
                let now = self.read(&b.c2p, &b.p2c);
                let delta = minus(now, b.folded);
                if delta != RelayUsage::default() {
                    b.folded = now;
                    fold(*relay, delta);
                }
            }
        }
        self.by_relay = by_relay;
    }

    /// Relay `relay`'s counter growth not yet handed out (for usage reports in between).
    pub fn pending(&self, relay: RelayId) -> RelayUsage {
        let mut sum = RelayUsage::default();
        for b in self.by_relay.get(&relay).into_iter().flatten() {
            sum += self.delta(&b.c2p, &b.p2c, b.folded);
        }
        sum
    }

    /// Takes relay `relay`'s bindings out of the maps (its socket closes), handing their
    /// last counters to `fold`.
    pub fn remove_relay(&mut self, relay: RelayId, mut fold: impl FnMut(RelayId, RelayUsage)) {
        if let Some(key) = self.budgets.remove(&relay) {
            let _ = self.budget.remove(&key);
        }
        for b in self.by_relay.remove(&relay).unwrap_or_default() {
            // Read just before removal: what the kernel forwards in between is not counted
            // (a window of one syscall).
            let delta = self.delta(&b.c2p, &b.p2c, b.folded);
            let _ = self.c2p.remove(&b.c2p);
            let _ = self.p2c.remove(&b.p2c);
            fold(relay, delta);
        }
    }

    fn read(&self, c2p: &C2pKey, p2c: &P2cKey) -> RelayUsage {
        let c = self.c2p.get(c2p, 0).unwrap_or_default();
        let p = self.p2c.get(p2c, 0).unwrap_or_default();
        RelayUsage {
            to_peer_bytes: c.bytes,
            to_peer_packets: c.packets,
            to_client_bytes: p.bytes,
            to_client_packets: p.packets,
        }
    }

    fn delta(&self, c2p: &C2pKey, p2c: &P2cKey, folded: RelayUsage) -> RelayUsage {
        minus(self.read(c2p, p2c), folded)
    }
}

fn minus(a: RelayUsage, b: RelayUsage) -> RelayUsage {
    RelayUsage {
        to_peer_bytes: a.to_peer_bytes.saturating_sub(b.to_peer_bytes),
        to_peer_packets: a.to_peer_packets.saturating_sub(b.to_peer_packets),
        to_client_bytes: a.to_client_bytes.saturating_sub(b.to_client_bytes),
        to_client_packets: a.to_client_packets.saturating_sub(b.to_client_packets),
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::Effective;

    /// UDP GRO only where the program sees datagrams before GRO would coalesce them.
    #[test]
    fn udp_gro_only_where_the_program_sees_datagrams_first() {
        let allowed: Vec<_> = Effective::ALL
            .into_iter()
            .filter(|e| e.allows_udp_gro())
            .collect();
        assert_eq!(allowed, [Effective::UserSpace, Effective::XdpNative]);
    }

    /// The committed objects are what `bpf/build.sh` makes from the committed sources (CI
    /// installs clang; elsewhere the check is skipped loudly without it).
    #[test]
    fn fastpath_object_matches_its_source() {
        let root = env!("CARGO_MANIFEST_DIR");
        let clang = Command::new("clang")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !clang {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "clang missing under CI (.ci/run installs it)"
            );
            eprintln!("\n*** SKIPPED: no clang: the BPF objects in bpf/ not checked against their sources ***\n");
            return;
        }
        let out = Command::new(format!("{root}/bpf/build.sh"))
            .arg("--check")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for (name, embedded) in super::objects() {
            let file = std::fs::read(format!("{root}/bpf/{name}")).unwrap();
            assert!(
                embedded == file.as_slice(),
                "the embedded object differs from bpf/{name}: rebuild Tern"
            );
        }
    }
}
