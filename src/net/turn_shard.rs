//! The sans-IO TURN server (`crate::turn::Server`) as a worker's [`Shard`].

use std::net::SocketAddr;
use std::time::Instant;

use super::shard::{Shard, OUT_LEN};
use crate::stun::ChannelNumber;
use crate::turn::{
    ChannelRoute, ConnId, FiveTuple, Now, Output, PeerRoute, RelayId, RelayIo, Server, TurnStats,
};

impl Shard for Server {
    fn handle_stun(
        &mut self,
        now: Now,
        from: FiveTuple,
        msg: &[u8],
        out: &mut [u8; OUT_LEN],
        io: &mut impl RelayIo,
    ) {
        Server::handle_stun(self, now, from, msg, out, io)
    }

    fn poll_output(&mut self) -> Option<Output> {
        Server::poll_output(self)
    }

    fn channel_routes_generation(&self) -> u64 {
        Server::channel_routes_generation(self)
    }

    fn channel_routes(&self, f: impl FnMut(ChannelRoute)) {
        Server::channel_routes(self, f)
    }

    fn channel_to_peer(
        &mut self,
        from: &FiveTuple,
        channel: ChannelNumber,
    ) -> Option<(RelayId, SocketAddr)> {
        Server::channel_to_peer(self, from, channel)
    }

    fn peer_to_client(&mut self, relay: RelayId, peer: SocketAddr) -> Option<PeerRoute> {
        Server::peer_to_client(self, relay, peer)
    }

    fn handle_timeout(&mut self, now: Now, io: &mut impl RelayIo) {
        Server::handle_timeout(self, now, io)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Server::poll_timeout(self)
    }

    fn client_closed(&mut self, client: &FiveTuple, now: Now, io: &mut impl RelayIo) {
        Server::client_closed(self, client, now, io)
    }

    fn record_request_time(&mut self, took: std::time::Duration) {
        Server::record_request_time(self, took)
    }

    fn set_config(&mut self, cfg: std::sync::Arc<crate::turn::ServerConfig>) {
        Server::set_config(self, cfg)
    }

    fn turn_stats(&self) -> Option<&TurnStats> {
        Some(Server::stats(self))
    }

    fn set_shard_index(&mut self, index: u8) {
        Server::set_shard_index(self, index)
    }

    fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        Server::has_allocation(self, tuple)
    }

    fn tcp_connect_done(&mut self, now: Now, conn: ConnId, ok: bool) -> bool {
        Server::tcp_connect_done(self, now, conn, ok)
    }

    fn tcp_peer_accepted(&mut self, now: Now, relay: RelayId, peer: SocketAddr) -> Option<ConnId> {
        Server::tcp_peer_accepted(self, now, relay, peer)
    }

    fn tcp_conn_closed(&mut self, conn: ConnId) {
        Server::tcp_conn_closed(self, conn)
    }
}
