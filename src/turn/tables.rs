//! The allocation tables of one shard: the slab of allocations and every index over it
//! (by client 5-tuple, by relay, permissions, channels both ways, RFC 6062 peer
//! connections). This file is their only writer: each insert/remove method updates the
//! slab and all indexes together, so "the data path sees exactly the live permissions and
//! active channels" is checked here and nowhere else.
//!
//! Plain data, no IO, no counters, no timers: methods return what changed and the
//! [`super::Server`] counts it, arms timers and closes sockets.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rustc_hash::FxHashMap;

use super::allocation::{family_index, Allocation, Channel, ConnState, PeerConn, Relay};
use super::{ChannelNumber, ChannelRoute, ConnId, FiveTuple, PeerRoute, RelayId};

/// Low 24 bits of a CONNECTION-ID: the per-shard counter (the top 8 name the shard).
const CONN_COUNTER_MASK: u32 = 0x00FF_FFFF;

#[derive(Default)]
pub(super) struct Tables {
    slots: Vec<Option<Allocation>>,
    free_slots: Vec<usize>,
    /// Ids are unique for the life of the server (timers of a reused slot compare them).
    next_id: u64,
    by_tuple: FxHashMap<FiveTuple, usize>,
    by_relay: FxHashMap<RelayId, usize>,
    /// Permission expiry by (relay of the peer's family, peer IP). Mirrors `Allocation::perms`.
    perms: FxHashMap<(RelayId, IpAddr), Instant>,
    /// Channel number by (relay, peer), for peer → client. Active channels only.
    peer_channels: FxHashMap<(RelayId, SocketAddr), ChannelNumber>,
    /// (relay, peer) by (client 5-tuple, channel), for client → peer. Active channels only.
    client_channels: FxHashMap<(FiveTuple, ChannelNumber), (RelayId, SocketAddr)>,
    /// RFC 6062 peer connections. Mirrors `Allocation::conns`.
    tcp_conns: FxHashMap<ConnId, PeerConn>,
    /// Low 24 bits of the last CONNECTION-ID handed out.
    next_conn: u32,
    /// Bumped whenever an entry joins or leaves `perms` or `client_channels`, i.e. when
    /// the set [`Tables::channel_routes`] yields may have changed (the kernel fast path
    /// re-syncs on a change; nothing per packet).
    routes_gen: u64,
}

/// What a channel binding did (RFC 8656 §11.2).
pub(super) struct ChannelBound {
    /// A new binding (its timer must be armed).
    pub created: bool,
    /// It entered the data path (new, or revived from its cooldown).
    pub activated: bool,
}

/// What went with a family's relay (RFC 8656 §7.3).
pub(super) struct FamilyRemoved {
    pub relay: Relay,
    pub perms: usize,
    pub active_channels: usize,
    pub old_family: usize,
    pub new_family: usize,
}

/// What a Refresh needs from the caller.
pub(super) enum Refreshed {
    /// No allocation in the slot.
    Gone,
    /// Its pending timer entry picks the new expiry up.
    Done,
    /// The expiry moved earlier than the pending entry: arm one for allocation `id`.
    RearmEarlier { id: u64 },
}

/// A permission's expiry check.
pub(super) enum PermissionExpiry {
    Removed {
        transport: super::Transport,
    },
    /// Refreshed since: expires at this later time.
    Later(Instant),
    Gone,
}

impl Tables {
    // ---- lookups ----

    /// Allocations held.
    pub fn len(&self) -> usize {
        self.by_tuple.len()
    }

    pub fn get(&self, slot: usize) -> Option<&Allocation> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    /// The allocation in `slot` if it is still the one with `id`.
    pub fn live(&self, slot: usize, id: u64) -> Option<&Allocation> {
        self.get(slot).filter(|a| a.id == id)
    }

    pub fn slot_of(&self, tuple: &FiveTuple) -> Option<usize> {
        self.by_tuple.get(tuple).copied()
    }

    pub fn slot_of_relay(&self, relay: RelayId) -> Option<usize> {
        self.by_relay.get(&relay).copied()
    }

    /// The permission for `ip` on `relay` expires at this time.
    pub fn permission(&self, relay: RelayId, ip: IpAddr) -> Option<Instant> {
        self.perms.get(&(relay, ip)).copied()
    }

    /// ChannelData from a client (RFC 8656 §12.5). O(1), no allocation.
    pub fn channel_to_peer(
        &self,
        from: &FiveTuple,
        channel: ChannelNumber,
    ) -> Option<(RelayId, SocketAddr)> {
        let &(relay, peer) = self.client_channels.get(&(*from, channel))?;
        self.perms
            .contains_key(&(relay, peer.ip()))
            .then_some((relay, peer))
    }

    /// Changes whenever [`Tables::channel_routes`] may yield a different set.
    pub fn routes_generation(&self) -> u64 {
        self.routes_gen
    }

    /// Every active channel whose peer permission is alive: exactly the (client 5-tuple,
    /// channel) pairs `channel_to_peer` forwards, and so the (relay, peer) pairs that
    /// `peer_to_client` frames as ChannelData.
    pub fn channel_routes(&self, mut f: impl FnMut(ChannelRoute)) {
        for (&(client, channel), &(relay, peer)) in &self.client_channels {
            if self.perms.contains_key(&(relay, peer.ip())) {
                f(ChannelRoute {
                    client,
                    channel,
                    relay,
                    peer,
                });
            }
        }
    }

    /// Peer data on a relay (RFC 8656 §11.6, §12.5). O(1), no allocation.
    pub fn peer_to_client(&self, relay: RelayId, peer: SocketAddr) -> Option<PeerRoute> {
        if !self.perms.contains_key(&(relay, peer.ip())) {
            return None;
        }
        let a = self.get(self.slot_of_relay(relay)?)?;
        Some(PeerRoute {
            client: a.tuple,
            channel: self.peer_channels.get(&(relay, peer)).copied(),
        })
    }

    pub fn conn(&self, conn: ConnId) -> Option<&PeerConn> {
        self.tcp_conns.get(&conn)
    }

    /// Whether the allocation in `slot` has a peer connection (any state) to `peer`.
    pub fn has_conn_to(&self, slot: usize, peer: SocketAddr) -> bool {
        self.get(slot).is_some_and(|a| {
            a.conns
                .iter()
                .any(|c| self.tcp_conns.get(c).is_some_and(|pc| pc.peer == peer))
        })
    }

    // ---- allocations ----

    /// A fresh allocation id.
    pub fn next_alloc_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Adds an allocation (no permissions, channels or connections yet) and indexes it
    /// by 5-tuple and relays. Returns its slot.
    pub fn insert(&mut self, alloc: Allocation) -> usize {
        debug_assert!(
            alloc.perms.is_empty() && alloc.channels.is_empty() && alloc.conns.is_empty()
        );
        let tuple = alloc.tuple;
        let relays = alloc.relays;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(alloc);
                s
            }
            None => {
                self.slots.push(Some(alloc));
                self.slots.len() - 1
            }
        };
        self.by_tuple.insert(tuple, slot);
        for r in relays.iter().flatten() {
            self.by_relay.insert(r.id, slot);
        }
        slot
    }

    /// Removes an allocation and every index entry of it, its peer connections included.
    /// Returns it (its `perms` and `channels` say what went) and the removed connections.
    pub fn remove(&mut self, slot: usize) -> Option<(Allocation, Vec<(ConnId, PeerConn)>)> {
        let a = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free_slots.push(slot);
        self.routes_gen += 1;
        self.by_tuple.remove(&a.tuple);
        for ip in &a.perms {
            if let Some(r) = a.relay_for(*ip) {
                self.perms.remove(&(r.id, *ip));
            }
        }
        for ch in a.channels.iter().filter(|c| c.active) {
            if let Some(r) = a.relay_for(ch.peer.ip()) {
                self.peer_channels.remove(&(r.id, ch.peer));
            }
            self.client_channels.remove(&(a.tuple, ch.number));
        }
        let conns = a
            .conns
            .iter()
            .filter_map(|&c| self.tcp_conns.remove(&c).map(|pc| (c, pc)))
            .collect();
        for r in a.relays.iter().flatten() {
            self.by_relay.remove(&r.id);
        }
        Some((a, conns))
    }

    /// Removes one family's relay with its permissions and channels (RFC 8656 §7.3); the
    /// allocation stays with the other family.
    pub fn remove_family(&mut self, slot: usize, fi: usize) -> Option<FamilyRemoved> {
        let a = self.slots.get_mut(slot).and_then(Option::as_mut)?;
        let old_family = a.family();
        let r = a.relays[fi].take()?;
        self.routes_gen += 1;
        let tuple = a.tuple;
        let mut perms = 0;
        for ip in a.perms.iter().filter(|ip| family_index(**ip) == fi) {
            self.perms.remove(&(r.id, *ip));
            perms += 1;
        }
        a.perms.retain(|ip| family_index(*ip) != fi);
        let mut active_channels = 0;
        for c in a
            .channels
            .iter()
            .filter(|c| family_index(c.peer.ip()) == fi && c.active)
        {
            self.peer_channels.remove(&(r.id, c.peer));
            self.client_channels.remove(&(tuple, c.number));
            active_channels += 1;
        }
        a.channels.retain(|c| family_index(c.peer.ip()) != fi);
        let new_family = a.family();
        self.by_relay.remove(&r.id);
        Some(FamilyRemoved {
            relay: r,
            perms,
            active_channels,
            old_family,
            new_family,
        })
    }

    /// Sets when the allocation's pending timer entry fires.
    pub fn set_timer_at(&mut self, slot: usize, at: Instant) {
        if let Some(a) = self.slots[slot].as_mut() {
            a.timer_at = at;
        }
    }

    /// A Refresh (RFC 8656 §7.3): the new expiry and lifetime.
    pub fn refresh(&mut self, slot: usize, expires: Instant, lifetime: u32) -> Refreshed {
        let Some(a) = self.slots[slot].as_mut() else {
            return Refreshed::Gone;
        };
        a.expires = expires;
        a.lifetime_secs = lifetime;
        // A longer lifetime is picked up when the pending entry fires; a shorter one
        // needs an earlier entry.
        if expires < a.timer_at {
            a.timer_at = expires;
            Refreshed::RearmEarlier { id: a.id }
        } else {
            Refreshed::Done
        }
    }

    // ---- permissions ----

    /// Installs or refreshes a permission (RFC 8656 §9). `Some(id)` of the allocation when
    /// the permission is new (its timer must be armed).
    pub fn add_permission(
        &mut self,
        slot: usize,
        relay: Relay,
        ip: IpAddr,
        exp: Instant,
    ) -> Option<u64> {
        let a = self.slots[slot].as_mut()?;
        if self.perms.insert((relay.id, ip), exp).is_none() {
            self.routes_gen += 1;
            a.perms.push(ip);
            return Some(a.id);
        }
        None
    }

    /// A permission's timer fired at `now`.
    pub fn expire_permission(
        &mut self,
        slot: usize,
        id: u64,
        ip: IpAddr,
        now: Instant,
    ) -> PermissionExpiry {
        let Some(a) = self.live(slot, id) else {
            return PermissionExpiry::Gone;
        };
        let Some(relay) = a.relay_for(ip) else {
            return PermissionExpiry::Gone;
        };
        let transport = a.tuple.transport;
        let key = (relay.id, ip);
        match self.perms.get(&key).copied() {
            Some(e) if e <= now => {
                self.perms.remove(&key);
                self.routes_gen += 1;
                if let Some(a) = self.slots[slot].as_mut() {
                    a.perms.retain(|p| *p != ip);
                }
                PermissionExpiry::Removed { transport }
            }
            Some(e) => PermissionExpiry::Later(e),
            None => PermissionExpiry::Gone,
        }
    }

    // ---- channels ----

    /// Binds or refreshes channel `number` to `peer` on `relay` (RFC 8656 §11.2; the
    /// caller checked the rebind rules and the limit).
    pub fn bind_channel(
        &mut self,
        slot: usize,
        relay: Relay,
        number: ChannelNumber,
        peer: SocketAddr,
        expires: Instant,
    ) -> Option<ChannelBound> {
        let a = self.slots[slot].as_mut()?;
        let tuple = a.tuple;
        let (created, activated) = match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => {
                // Its pending timer entry (expiry or cooldown end) re-arms itself.
                c.expires = expires;
                (false, !std::mem::replace(&mut c.active, true))
            }
            None => {
                a.channels.push(Channel {
                    number,
                    peer,
                    expires,
                    active: true,
                });
                (true, true)
            }
        };
        if activated {
            self.routes_gen += 1;
            self.peer_channels.insert((relay.id, peer), number);
            self.client_channels
                .insert((tuple, number), (relay.id, peer));
        }
        Some(ChannelBound { created, activated })
    }

    /// Takes an expired channel out of the data path; it stays in the allocation for the
    /// cooldown. Returns its peer if it was active.
    pub fn deactivate_channel(&mut self, slot: usize, number: ChannelNumber) -> Option<SocketAddr> {
        let a = self.slots[slot].as_mut()?;
        let tuple = a.tuple;
        let relays = a.relays;
        let ch = a
            .channels
            .iter_mut()
            .find(|c| c.number == number && c.active)?;
        ch.active = false;
        let peer = ch.peer;
        if let Some(relay) = relays[family_index(peer.ip())] {
            self.peer_channels.remove(&(relay.id, peer));
        }
        self.client_channels.remove(&(tuple, number));
        self.routes_gen += 1;
        Some(peer)
    }

    /// Forgets an inactive channel whose cooldown ended.
    pub fn drop_channel(&mut self, slot: usize, number: ChannelNumber) {
        if let Some(a) = self.slots[slot].as_mut() {
            a.channels.retain(|c| c.number != number);
        }
    }

    // ---- RFC 6062 peer connections ----

    /// A fresh CONNECTION-ID: `shard` on top, a 24-bit counter below, never 0 there and
    /// never one in use. `None` only if all 2^24 - 1 are in use.
    pub fn new_conn_id(&mut self, shard: u8) -> Option<ConnId> {
        if self.tcp_conns.len() >= CONN_COUNTER_MASK as usize {
            return None;
        }
        loop {
            self.next_conn = (self.next_conn + 1) & CONN_COUNTER_MASK;
            if self.next_conn == 0 {
                continue;
            }
            let id = ConnId::new(shard, self.next_conn);
            if !self.tcp_conns.contains_key(&id) {
                return Some(id);
            }
        }
    }

    /// Records a new peer connection of the allocation in `slot`.
    pub fn add_conn(
        &mut self,
        slot: usize,
        conn: ConnId,
        peer: SocketAddr,
        state: ConnState,
        deadline: Instant,
    ) -> bool {
        let Some(a) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        a.conns.push(conn);
        self.tcp_conns.insert(
            conn,
            PeerConn {
                slot,
                alloc_id: a.id,
                peer,
                state,
                deadline,
            },
        );
        true
    }

    /// Moves `conn` to `state`; returns the state it left.
    pub fn set_conn_state(
        &mut self,
        conn: ConnId,
        state: ConnState,
        deadline: Instant,
    ) -> Option<ConnState> {
        let pc = self.tcp_conns.get_mut(&conn)?;
        pc.deadline = deadline;
        Some(std::mem::replace(&mut pc.state, state))
    }

    /// Drops `conn` from the tables.
    pub fn remove_conn(&mut self, conn: ConnId) -> Option<PeerConn> {
        let pc = self.tcp_conns.remove(&conn)?;
        if let Some(a) = self.slots.get_mut(pc.slot).and_then(Option::as_mut) {
            if a.id == pc.alloc_id {
                a.conns.retain(|&c| c != conn);
            }
        }
        Some(pc)
    }
}

/// Index sizes, for tests that check nothing is left behind.
#[cfg(test)]
pub(super) struct IndexSizes {
    pub perms: usize,
    pub peer_channels: usize,
    pub client_channels: usize,
    pub by_relay: usize,
}

#[cfg(test)]
impl Tables {
    pub fn sizes(&self) -> IndexSizes {
        IndexSizes {
            perms: self.perms.len(),
            peer_channels: self.peer_channels.len(),
            client_channels: self.client_channels.len(),
            by_relay: self.by_relay.len(),
        }
    }

    /// Sets the CONNECTION-ID counter (tests of its wrap-around).
    pub fn set_next_conn(&mut self, n: u32) {
        self.next_conn = n;
    }
}
