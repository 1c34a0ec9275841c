//! The JSON the API answers with, built from the live server state.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Filter;
use crate::config::{PortRange, ServiceKind};
use crate::proto::{PeerCounts, PortProtocol, ServiceInfo};
use crate::server::session::SessionShared;
use crate::server::tunnel::Tunnel;
use crate::server::ServerShared;

/// One connected client.
#[derive(Debug, Serialize)]
pub(crate) struct ClientView {
    /// The client id (session number), for `/ping?cid=` and `DELETE /clients/{cid}`.
    cid: u64,
    user: String,
    tags: Vec<String>,
    address: String,
    /// Seconds since the Unix epoch.
    connected_since: u64,
    services: Vec<ServiceInfo>,
}

/// Longest service description shown.
const MAX_MESSAGE_CHARS: usize = 256;

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn matches(session: &SessionShared, filter: &Filter) -> bool {
    if filter.id.as_ref().is_some_and(|id| *id != session.user) || filter.cid.is_some_and(|c| c != session.id)
    {
        return false;
    }
    match &filter.tags {
        Some(tags) => tags.split(',').map(str::trim).any(|tag| session.tags.iter().any(|t| t == tag)),
        None => true,
    }
}

/// What discovery and the API tell about one tunnel.
pub(crate) fn service_info(session: &SessionShared, tunnel: &Tunnel) -> ServiceInfo {
    let (online, served) = tunnel.visitors();
    let (bytes_in, bytes_out) = tunnel.traffic.get();
    let control = tunnel.control();
    let (port, host) = tunnel.endpoint.get().cloned().unwrap_or_default();
    ServiceInfo {
        id: tunnel.service,
        cid: session.id,
        user: session.user.clone(),
        tags: session.tags.clone(),
        name: tunnel.name.clone(),
        message: control.message.as_ref().map(|m| m.chars().take(MAX_MESSAGE_CHARS).collect()),
        kind: tunnel.kind_name().to_owned(),
        address: tunnel.address.get().cloned().unwrap_or_default(),
        port,
        host,
        birth: unix_seconds(tunnel.born),
        online,
        capacity: control.max_serve_conn,
        served,
        total_allowed: control.max_serve_count,
        deadline: control.max_serve_time_ms.map(|ms| unix_seconds(tunnel.born + Duration::from_millis(ms))),
        bytes_in,
        bytes_out,
        datagrams: (tunnel.kind == ServiceKind::Udp).then(|| tunnel.datagrams.get()),
        p2p: tunnel.peer_name.get().map(|name| {
            let (direct, relayed) = tunnel.peers.get();
            PeerCounts { name: name.clone(), direct, relayed }
        }),
    }
}

/// Open tunnels of `session`, by service id.
pub(crate) fn open_services(session: &SessionShared) -> Vec<ServiceInfo> {
    let tunnels: Vec<_> = session.tunnels().values().cloned().collect();
    let mut views: Vec<ServiceInfo> = tunnels
        .iter()
        .filter(|t| !t.token.is_cancelled() && t.endpoint.get().is_some())
        .map(|t| service_info(session, t))
        .collect();
    views.sort_by_key(|v| v.id);
    views
}

fn live_sessions(shared: &ServerShared, filter: &Filter) -> Vec<std::sync::Arc<SessionShared>> {
    let mut sessions: Vec<_> = shared
        .registry
        .sessions()
        .into_iter()
        .filter(|s| !s.closing.is_cancelled() && matches(s, filter))
        .collect();
    sessions.sort_by_key(|s| s.id);
    sessions
}

/// Connected clients that pass the filter.
pub(crate) fn clients(shared: &ServerShared, filter: &Filter) -> Vec<ClientView> {
    live_sessions(shared, filter)
        .iter()
        .map(|s| ClientView {
            cid: s.id,
            user: s.user.clone(),
            tags: s.tags.clone(),
            // Over QUIC the client may have moved since it logged in (connection migration).
            address: s.pool.quic().map_or(s.peer, |c| c.remote_address()).to_string(),
            connected_since: unix_seconds(s.since),
            services: open_services(s),
        })
        .collect()
}

/// Open services of the clients that pass the filter.
pub(crate) fn services(shared: &ServerShared, filter: &Filter) -> Vec<ServiceInfo> {
    live_sessions(shared, filter).iter().flat_map(|s| open_services(s)).collect()
}

/// Free ports in the server's TCP ranges.
#[derive(Debug, Serialize)]
pub(crate) struct FreePorts {
    /// The server-wide ranges.
    ranges: Vec<String>,
    /// Ports held by tunnels now.
    used: usize,
    /// Up to `limit` ports that are free now (not held and bindable).
    free: Vec<u16>,
}

/// How many free ports `/ports/free` lists without `?limit=`.
pub(crate) const DEFAULT_FREE_PORTS: usize = 10;
/// Most free ports one `/ports/free` request lists: each is checked by binding it.
pub(crate) const MAX_FREE_PORTS: usize = 100;

/// Up to `limit` (default [`DEFAULT_FREE_PORTS`], at most [`MAX_FREE_PORTS`]) free ports of
/// the server's ranges.
pub(crate) async fn free_ports(shared: &ServerShared, limit: Option<usize>) -> FreePorts {
    let limit = limit.unwrap_or(DEFAULT_FREE_PORTS).min(MAX_FREE_PORTS);
    let ranges = &shared.config.tcp_ranges;
    let free = free_ports_in(shared, ranges, limit).await;
    let used = shared.endpoints.held_ports(PortProtocol::Tcp).len();
    FreePorts { ranges: ranges.iter().map(ToString::to_string).collect(), used, free }
}

/// Up to `limit` ports of `ranges` that no tunnel holds and that bind now; gives up after
/// a bounded number of tries.
pub(crate) async fn free_ports_in(shared: &ServerShared, ranges: &[PortRange], limit: usize) -> Vec<u16> {
    let held = shared.endpoints.held_ports(PortProtocol::Tcp);
    let mut tries = limit.saturating_mul(4).saturating_add(100);
    let mut free = Vec::new();
    for port in ranges.iter().flat_map(|r| r.start..=r.end) {
        if free.len() >= limit || tries == 0 {
            break;
        }
        if held.contains(&port) {
            continue;
        }
        tries -= 1;
        if tokio::net::TcpListener::bind((shared.config.public_ip(), port)).await.is_ok() {
            free.push(port);
        }
    }
    free
}
