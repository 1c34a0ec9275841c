//! The server's part in a cluster (`crate::cluster`): what clients register is claimed
//! cluster-wide, every TCP port another node holds is listened on here too, and visitors
//! for ports and host names held elsewhere are relayed to a node that holds them; the
//! visitors other nodes relay here are served as if they had come in here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::accept::{accept_until, AcceptErrors};
use super::endpoints::{Endpoint, Member};
use super::handshakes::{Handshake, Sorted};
use super::hosts::{host_endpoint, NameKind};
use super::http_head::Head;
use super::session::SessionShared;
use super::{http, sni, tcp, ServerShared};
pub(crate) use crate::cluster::NodeEntrance;
use crate::cluster::{Arrival, ClaimKind, ClaimRecord, ClaimRefused, Cluster, NodeVisit};
use crate::proto::RegisterError;

/// Listeners on TCP ports that other nodes hold, by port.
#[derive(Default)]
pub(crate) struct RemotePorts {
    running: Mutex<HashMap<u16, RemotePort>>,
}

struct RemotePort {
    stop: CancellationToken,
    /// Cancelled once the listener is closed.
    closed: CancellationToken,
}

impl RemotePorts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, RemotePort>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where a visitor of a name (HTTP, TLS passthrough) came from: a listener here, or another
/// node of the cluster (never relayed again, so stale tables cannot pass a visitor around).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrived {
    Here,
    FromNode,
}

/// Claims `name` of `kind` (reached by `route`, for names) cluster-wide for a tunnel of
/// `user` (nothing without a cluster).
pub(crate) async fn claim(
    shared: &ServerShared,
    (kind, name, route): (ClaimKind, &str, &str),
    user: &str,
    record: ClaimRecord,
) -> Result<(), RegisterError> {
    let Some(cluster) = shared.cluster() else { return Ok(()) };
    cluster.claim((kind, name, route), user, &record).await.map_err(|refused| {
        warn!(%kind, name, user, %refused, "cluster claim refused");
        match (refused, kind) {
            (ClaimRefused::Taken { .. }, ClaimKind::Tcp | ClaimKind::Udp) => {
                RegisterError::PortTaken { port: name.parse().unwrap_or_default() }
            }
            (refused, _) => {
                RegisterError::Other { message: format!("'{name}' cannot be registered: {refused}") }
            }
        }
    })
}

/// Gives this node's claim back (in the background: the tunnel is already gone).
pub(crate) fn release(
    shared: &ServerShared,
    (kind, name, route): (ClaimKind, String, &'static str),
    user: String,
) {
    if let Some(cluster) = shared.cluster().cloned() {
        tokio::spawn(async move { cluster.release((kind, &name, route), &user).await });
    }
}

/// The route word of a name kind in claims.
fn route_of(kind: NameKind) -> &'static str {
    match kind {
        NameKind::Http => "http",
        NameKind::Sni => "sni",
        NameKind::Peer => "peer",
    }
}

/// Claims a host name that `member` just reserved here; gives it back here when refused.
pub(crate) async fn claim_name(
    shared: &ServerShared,
    (name, kind): (&str, NameKind),
    member: &Member,
) -> Result<(), RegisterError> {
    if shared.cluster().is_none() {
        return Ok(());
    }
    let record = ClaimRecord { session: member.session.id, service: member.tunnel.name.clone() };
    let claimed = claim(shared, (ClaimKind::Name, name, route_of(kind)), &member.session.user, record).await;
    if claimed.is_err() {
        shared.endpoints.release_host((name, kind), member.tunnel.service);
    }
    claimed
}

/// Gives a host name's claim back once no tunnel here serves it as `kind`.
pub(crate) fn release_name(shared: &ServerShared, (name, kind): (&str, NameKind), user: &str) {
    if shared.cluster().is_none() || shared.endpoints.lock().pools.contains_key(&host_endpoint(name, kind)) {
        return;
    }
    release(shared, (ClaimKind::Name, name.to_owned(), route_of(kind)), user.to_owned());
}

/// Takes `session`'s place in its user's `sessions` limit counted cluster-wide (nothing
/// without a cluster or a limit); `Err(limit)` when every place is taken. With etcd away
/// the session is counted on this node only (logged).
pub(crate) async fn take_session_slot(shared: &ServerShared, session: &SessionShared) -> Result<(), u32> {
    let (Some(cluster), Some(limit)) = (shared.cluster(), session.account.rules().sessions) else {
        return Ok(());
    };
    match cluster.take_session_slot((&session.user, limit), (session.id, &session.instance)).await {
        Ok(key) => {
            *session.cluster_slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(key);
            Ok(())
        }
        Err(ClaimRefused::Taken { .. }) => Err(limit),
        Err(ClaimRefused::Unavailable(why)) => {
            warn!(user = %session.user, %why, "etcd is away: this session counts against the sessions limit on this node only");
            Ok(())
        }
    }
}

/// Gives a session's slot of the cluster-wide `sessions` limit back.
pub(crate) fn release_session_slot(shared: &ServerShared, key: String) {
    if let Some(cluster) = shared.cluster().cloned() {
        tokio::spawn(async move { cluster.release_session_slot(&key).await });
    }
}

/// Closes this node's listener for another node's port, before a tunnel here binds it.
pub(crate) async fn take_port_over(shared: &ServerShared, port: u16) {
    let running = shared.remote_ports.lock().remove(&port);
    if let Some(remote) = running {
        remote.stop.cancel();
        remote.closed.cancelled().await;
        debug!(port, "a tunnel here takes the port over from the relay");
    }
}

/// Runs this node's cluster work until shutdown: serves visitors relayed here, and keeps
/// a listener on every TCP port only other nodes hold.
pub(crate) fn start(shared: &Arc<ServerShared>, arrivals: mpsc::Receiver<Arrival>) {
    let Some(cluster) = shared.cluster().cloned() else { return };
    tokio::spawn(serve_arrivals(shared.clone(), arrivals));
    tokio::spawn(follow_ports(shared.clone(), cluster));
}

async fn serve_arrivals(shared: Arc<ServerShared>, mut arrivals: mpsc::Receiver<Arrival>) {
    while let Some(arrival) = arrivals.recv().await {
        let span = tracing::debug_span!("relayed visitor", visitor = %arrival.visit.visitor);
        tokio::spawn(serve_arrival(shared.clone(), arrival).instrument(span));
    }
}

/// Serves a visitor another node relayed here, by the entrance it came in by there.
async fn serve_arrival(shared: Arc<ServerShared>, Arrival { visit, stream, read }: Arrival) {
    shared.metrics.node_relay("in");
    let peer = visit.visitor;
    match visit.entrance {
        NodeEntrance::Port(port) => {
            let rotation =
                shared.endpoints.rotation(&Endpoint::Port(port), |m| !m.tunnel.token.is_cancelled());
            let visitor = tcp::Relayed { stream, public: visit.public, early: read.to_vec() };
            tcp::serve_visitor(shared, rotation, visitor, peer).await
        }
        NodeEntrance::Sni => {
            let Some(handshake) = visitor_handshake(&shared, peer) else { return };
            let visitor = tcp::Relayed { stream, public: visit.public, early: read.to_vec() };
            sni::serve_visitor(shared, visitor, (peer, Arrived::FromNode), handshake).await
        }
        NodeEntrance::Http { tls } => {
            let Some(handshake) = visitor_handshake(&shared, peer) else { return };
            let scheme = if tls { "https" } else { "http" };
            http::serve_visitor(shared, stream, (peer, Arrived::FromNode), read, scheme, handshake).await
        }
    }
}

/// A relayed visitor's place in the handshake budgets, as its own address's.
fn visitor_handshake(shared: &ServerShared, peer: SocketAddr) -> Option<Handshake> {
    let Some(handshake) = shared.handshakes.admit(peer.ip()) else {
        debug!(%peer, "too many handshakes from this address; closing");
        return None;
    };
    let handshake = shared.handshakes.sort(handshake, Sorted::Visitor);
    if handshake.is_none() {
        debug!(%peer, "too many visitors in their handshake; closing");
    }
    handshake
}

/// Keeps listeners on the TCP ports other nodes hold, as the claims change.
async fn follow_ports(shared: Arc<ServerShared>, cluster: Arc<Cluster>) {
    let mut changes = cluster.subscribe();
    for port in cluster.names_of(ClaimKind::Tcp).keys() {
        reconcile_port(&shared, &cluster, port).await;
    }
    loop {
        let change = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            change = changes.recv() => change,
        };
        match change {
            Ok((ClaimKind::Tcp, port)) => reconcile_port(&shared, &cluster, &port).await,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let mut ports: Vec<String> = cluster.names_of(ClaimKind::Tcp).into_keys().collect();
                ports.extend(shared.remote_ports.lock().keys().map(u16::to_string));
                for port in ports {
                    reconcile_port(&shared, &cluster, &port).await;
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Listens on `port` here if other nodes hold it and this one does not; stops otherwise.
async fn reconcile_port(shared: &Arc<ServerShared>, cluster: &Cluster, port: &str) {
    let Ok(port) = port.parse::<u16>() else { return };
    let holders = cluster.holders(ClaimKind::Tcp, &port.to_string());
    let held_here = holders.iter().any(|h| h.node == cluster.node)
        || shared.endpoints.lock().pools.contains_key(&Endpoint::Port(port));
    let wanted = !held_here && !holders.is_empty();
    let running = shared.remote_ports.lock().contains_key(&port);
    if wanted && !running {
        let addr = SocketAddr::new(shared.config.public_ip(), port);
        match super::accept::bind(addr) {
            Ok(listener) => {
                let (stop, closed) = (shared.shutdown.child_token(), CancellationToken::new());
                let remote = RemotePort { stop: stop.clone(), closed: closed.clone() };
                shared.remote_ports.lock().insert(port, remote);
                info!(port, "relaying a port another node holds");
                let serving = shared.clone();
                tokio::spawn(async move {
                    relay_port(&serving, port, listener, &stop).await;
                    closed.cancel();
                });
            }
            Err(err) => warn!(port, %err, "cannot listen on a port another node holds"),
        }
    } else if !wanted && running {
        let remote = shared.remote_ports.lock().remove(&port);
        if let Some(remote) = remote {
            remote.stop.cancel();
            remote.closed.cancelled().await;
            debug!(port, "stopped relaying a port");
        }
    }
}

/// Accepts visitors of `port` and relays each to a node that holds it.
async fn relay_port(
    shared: &Arc<ServerShared>,
    port: u16,
    listener: tokio::net::TcpListener,
    stop: &CancellationToken,
) {
    let mut errors = AcceptErrors::new(shared);
    while let Some((visitor, addr)) = accept_until(&listener, stop, &mut errors).await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = visitor.set_nodelay(true);
            let public =
                visitor.local_addr().unwrap_or_else(|_| SocketAddr::new(shared.config.public_ip(), port));
            let visit = NodeVisit { entrance: NodeEntrance::Port(port), visitor: addr, public };
            relay(&shared, (ClaimKind::Tcp, &port.to_string()), &visit, visitor, &[]).await;
        });
    }
}

/// Whether no tunnel here serves the name `label` as `kind` and a tunnel on another node
/// does: its visitors go there ([`relay_name`]).
pub(crate) fn held_elsewhere(shared: &ServerShared, label: &str, kind: NameKind) -> bool {
    let Some(cluster) = shared.cluster() else { return false };
    if shared.endpoints.lock().pools.contains_key(&host_endpoint(label, kind)) {
        return false;
    }
    let elsewhere = cluster.holders(ClaimKind::Name, label);
    elsewhere.iter().any(|h| h.node != cluster.node && h.route == route_of(kind))
}

/// The host name an HTTP request routes by (its first label), if a tunnel on another node
/// serves it and none here does.
pub(crate) fn http_held_elsewhere(shared: &ServerShared, head: &Head) -> Option<String> {
    shared.cluster()?;
    let label = head.route_host.split('.').next().unwrap_or_default().to_ascii_lowercase();
    held_elsewhere(shared, &label, NameKind::Http).then_some(label)
}

/// Relays a visitor of the name `label` (see [`held_elsewhere`]) that came in by
/// `entrance` (HTTP, or TLS passthrough) from `peer` to `public`, with the bytes read
/// from it.
pub(crate) async fn relay_name(
    shared: &ServerShared,
    (label, entrance): (&str, NodeEntrance),
    (visitor, read): (impl AsyncRead + AsyncWrite + Unpin, &[u8]),
    (peer, public): (SocketAddr, Option<SocketAddr>),
) {
    let public = public.unwrap_or_else(|| SocketAddr::new(shared.config.public_ip(), 0));
    let visit = NodeVisit { entrance, visitor: peer, public };
    relay(shared, (ClaimKind::Name, label), &visit, visitor, read).await;
}

/// Carries `visitor` to a node that holds `name`, with `read` (bytes already read from it)
/// first; closes it when no node answers.
async fn relay(
    shared: &ServerShared,
    (kind, name): (ClaimKind, &str),
    visit: &NodeVisit,
    mut visitor: impl AsyncRead + AsyncWrite + Unpin,
    read: &[u8],
) {
    let Some(cluster) = shared.cluster() else { return };
    // A name's holders of the route the visitor came by (an HTTP name is not a P2P one).
    let route = match visit.entrance {
        NodeEntrance::Port(_) => "",
        NodeEntrance::Http { .. } => route_of(NameKind::Http),
        NodeEntrance::Sni => route_of(NameKind::Sni),
    };
    let mut holders = cluster.holders(kind, name);
    holders.retain(|h| h.route == route);
    let Some((node, mut stream)) = cluster.relay_to(&holders, visit).await else {
        return debug!(%kind, name, "no node holding it answered; closing the visitor");
    };
    shared.metrics.node_relay("out");
    debug!(%kind, name, node, "visitor relayed to another node");
    if !read.is_empty() && stream.write_all(read).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut visitor, &mut stream).await {
        Ok((sent, got)) => debug!(sent, got, node, "relayed visitor done"),
        Err(err) => debug!(%err, node, "relayed visitor ended"),
    }
}
