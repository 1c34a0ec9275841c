//! The JSON the API answers with, built from the live server state.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::Filter;
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
    services: Vec<ServiceView>,
}

/// One open tunnel (proxylite's ServiceInfo and more).
#[derive(Debug, Serialize)]
pub(crate) struct ServiceView {
    id: u32,
    cid: u64,
    user: String,
    tags: Vec<String>,
    name: String,
    kind: &'static str,
    /// TCP: the public port; 0 for HTTP and HTTPS.
    port: u16,
    /// HTTP and HTTPS: the public host name.
    host: Option<String>,
    /// Seconds since the Unix epoch.
    birth: u64,
    /// Visitors connected now.
    online: u32,
    /// Visitors allowed at once (`max-serve-conn`).
    capacity: Option<u32>,
    /// Visitors admitted so far.
    served: u64,
    /// Visitors allowed in all (`max-serve-count`).
    total_allowed: Option<u64>,
    /// When it closes (`max-serve-time`), seconds since the Unix epoch.
    deadline: Option<u64>,
    /// Bytes from visitors to the service.
    bytes_in: u64,
    /// Bytes from the service to visitors.
    bytes_out: u64,
}

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

fn service_view(session: &SessionShared, tunnel: &Tunnel) -> ServiceView {
    let (online, served) = tunnel.visitors();
    let (bytes_in, bytes_out) = tunnel.traffic.get();
    let control = tunnel.control();
    let (port, host) = tunnel.endpoint.get().cloned().unwrap_or_default();
    ServiceView {
        id: tunnel.service,
        cid: session.id,
        user: session.user.clone(),
        tags: session.tags.clone(),
        name: tunnel.name.clone(),
        kind: tunnel.kind,
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
    }
}

/// Open tunnels of `session`, by service id.
fn open_services(session: &SessionShared) -> Vec<ServiceView> {
    let tunnels: Vec<_> = session.tunnels().values().cloned().collect();
    let mut views: Vec<ServiceView> = tunnels
        .iter()
        .filter(|t| !t.token.is_cancelled() && t.endpoint.get().is_some())
        .map(|t| service_view(session, t))
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
            address: s.peer.to_string(),
            connected_since: unix_seconds(s.since),
            services: open_services(s),
        })
        .collect()
}

/// Open services of the clients that pass the filter.
pub(crate) fn services(shared: &ServerShared, filter: &Filter) -> Vec<ServiceView> {
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

/// Up to `limit` free ports, checked by binding them.
pub(crate) async fn free_ports(shared: &ServerShared, limit: usize) -> FreePorts {
    let ranges = &shared.config.tcp_ranges;
    let held = shared.registry.held_ports();
    let mut free = Vec::new();
    'ranges: for range in ranges {
        for port in range.start..=range.end {
            if free.len() >= limit {
                break 'ranges;
            }
            if !held.contains(&port)
                && tokio::net::TcpListener::bind((shared.config.addr.ip(), port)).await.is_ok()
            {
                free.push(port);
            }
        }
    }
    FreePorts { ranges: ranges.iter().map(ToString::to_string).collect(), used: held.len(), free }
}
