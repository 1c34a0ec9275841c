//! TCP tunnels: accept visitors on a public port and pair each with a data connection.
//!
//! Every public port is served by a [`TcpPool`]: usually one tunnel, but clients of
//! one user that share a tag and expose a service of the same name join the pool of
//! the first one (AeRO's tags), and visitors are spread over them round-robin. A
//! member that leaves is dropped from the pool; the port closes with the last one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::proxy_header::proxy_header;
use super::session::SessionShared;
use super::tunnel::{Refusal, Tunnel, Visit};
use super::visit::{relay_visitor, take_data, visitor_allowed, Relay};
use super::ServerShared;
use crate::proto::{OpenStream, ProxyProtocol};
use crate::transport::reset_on_drop;

/// One tunnel serving a pool.
#[derive(Clone)]
struct Member {
    session: Arc<SessionShared>,
    tunnel: Arc<Tunnel>,
    proxy_protocol: Option<ProxyProtocol>,
}

/// The tunnels behind one public TCP port.
pub(crate) struct TcpPool {
    port: u16,
    user: String,
    name: String,
    members: Mutex<Vec<Member>>,
    next: AtomicUsize,
    /// Cancelled when the last member has left; the port closes.
    empty: CancellationToken,
    /// Cancelled once the listener is closed and the port given back.
    released: CancellationToken,
}

/// Every TCP pool by port.
#[derive(Default)]
pub(crate) struct TcpPools {
    pools: Mutex<HashMap<u16, Arc<TcpPool>>>,
}

impl TcpPools {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Arc<TcpPool>>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pool `session` may join with a service called `name`: same user, same name, a tag
    /// in common with a live member, and the port asked for (if any).
    pub(crate) fn joinable(
        &self,
        session: &SessionShared,
        name: &str,
        port: Option<u16>,
    ) -> Option<Arc<TcpPool>> {
        if session.tags.is_empty() {
            return None;
        }
        let pools = self.lock();
        let mut candidates = pools.values().filter(|pool| {
            pool.user == session.user
                && pool.name == name
                && port.map_or(true, |p| p == pool.port)
                && !pool.empty.is_cancelled()
        });
        candidates.find(|pool| pool.members().iter().any(|m| shares_tag(&m.session, session))).cloned()
    }
}

fn shares_tag(a: &SessionShared, b: &SessionShared) -> bool {
    a.tags.iter().any(|tag| b.tags.contains(tag))
}

impl TcpPool {
    fn members(&self) -> std::sync::MutexGuard<'_, Vec<Member>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The port it serves.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Members in round-robin order from the next one, skipping closed ones.
    fn rotation(&self) -> Vec<Member> {
        let members = self.members();
        let live: Vec<&Member> = members.iter().filter(|m| !m.tunnel.token.is_cancelled()).collect();
        if live.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % live.len();
        live.iter().cycle().skip(start).take(live.len()).map(|m| (*m).clone()).collect()
    }

    /// Adds a tunnel to the pool; it leaves when its token is cancelled.
    pub(crate) fn join(
        self: &Arc<Self>,
        session: &Arc<SessionShared>,
        tunnel: Arc<Tunnel>,
        proxy_protocol: Option<ProxyProtocol>,
    ) {
        let service = tunnel.service;
        let token = tunnel.token.clone();
        self.members().push(Member { session: session.clone(), tunnel, proxy_protocol });
        let (pool, owner) = (self.clone(), session.clone());
        session.tasks.spawn(async move {
            token.cancelled().await;
            let left = {
                let mut members = pool.members();
                members.retain(|m| m.tunnel.service != service);
                members.len()
            };
            owner.forget_tunnel(service);
            debug!(service, port = pool.port, left, "tunnel left its port");
            if left == 0 {
                // The session counts as closed only once its port can be bound again.
                pool.empty.cancel();
                pool.released.cancelled().await;
            }
        });
    }
}

/// Opens a new pool on `listener` with `tunnel` as its first member.
pub(crate) fn open_pool(
    shared: &Arc<ServerShared>,
    session: &Arc<SessionShared>,
    tunnel: Arc<Tunnel>,
    (port, listener): (u16, TcpListener),
    proxy_protocol: Option<ProxyProtocol>,
) {
    let pool = Arc::new(TcpPool {
        port,
        user: session.user.clone(),
        name: tunnel.name.clone(),
        members: Mutex::default(),
        next: AtomicUsize::new(0),
        empty: CancellationToken::new(),
        released: CancellationToken::new(),
    });
    pool.join(session, tunnel, proxy_protocol);
    shared.tcp_pools.lock().insert(port, pool.clone());
    let shared = shared.clone();
    let span = tracing::info_span!("port", port);
    tokio::spawn(
        async move {
            accept_visitors(&shared, &pool, &listener).await;
            // Drop the socket before giving the port back, so a re-registration can bind it.
            drop(listener);
            {
                let mut pools = shared.tcp_pools.lock();
                if pools.get(&port).is_some_and(|p| Arc::ptr_eq(p, &pool)) {
                    pools.remove(&port);
                }
            }
            shared.registry.release_port(port);
            pool.released.cancel();
            info!("tcp port closed");
        }
        .instrument(span),
    );
}

async fn accept_visitors(shared: &Arc<ServerShared>, pool: &Arc<TcpPool>, listener: &TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = pool.empty.cancelled() => return,
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((visitor, addr)) => {
                let rotation = pool.rotation();
                // The first member whose limits let the visitor in serves it.
                let mut refusal = None;
                let chosen = rotation
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| visitor_allowed(shared, &m.session, &m.tunnel, addr))
                    .find_map(|(i, member)| match member.tunnel.admit() {
                        Ok(admitted) => Some((i, admitted)),
                        Err(why) => {
                            refusal.get_or_insert((why, member.session.user.clone()));
                            None
                        }
                    });
                let Some((first, admitted)) = chosen else {
                    match refusal {
                        Some((Refusal::UserLimit { limit }, user)) => {
                            warn!(%addr, %user, limit, "visitor refused: the user's connections limit is reached")
                        }
                        other => {
                            info!(%addr, refusal = ?other.map(|r| r.0), "visitor refused by the tunnel's limits")
                        }
                    }
                    continue;
                };
                shared.metrics.visitor();
                let member = rotation[first].clone();
                let fallbacks: Vec<Member> = rotation.into_iter().skip(first + 1).collect();
                let visit =
                    serve_visitor(shared.clone(), (member.clone(), admitted), fallbacks, visitor, addr);
                member.session.tasks.spawn(visit.instrument(tracing::debug_span!("visitor", %addr)));
            }
            Err(err) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Most visitor bytes sent along with the open message.
const EARLY_BYTES: usize = 16 * 1024;

/// Serves a visitor through `member`; when that member's client turns out to be gone
/// before it answered, the visitor moves on to the `fallbacks`.
async fn serve_visitor(
    shared: Arc<ServerShared>,
    (mut member, mut admitted): (Member, Visit),
    mut fallbacks: Vec<Member>,
    mut visitor: TcpStream,
    addr: SocketAddr,
) {
    let _ = visitor.set_nodelay(true);
    let wait = shared.config.data_wait_timeout;
    // The visitor's first bytes, kept until a client answers so they can be offered again.
    let mut early = Vec::new();
    let mut read_ahead = None;
    loop {
        if let Some(data) = take_data(&member.session, wait).await {
            let read = *read_ahead.get_or_insert_with(|| read_early(&mut visitor, &mut early));
            let with_header = proxy_header_for(&member, &visitor, addr, &early);
            let open = OpenStream { service: member.tunnel.service, visitor: addr, seal: None };
            let idle = shared.config.idle_limit();
            let first = (with_header.as_deref().unwrap_or(&early), read);
            let relay =
                relay_visitor(&member.session, &member.tunnel, data, &mut visitor, &open, first, idle);
            match relay.await {
                Relay::Finished | Relay::LocalUnavailable => return,
                Relay::Cut => return reset_on_drop(&visitor),
                Relay::Unanswered => {}
            }
            read_ahead = Some(0);
            debug!(cid = member.session.id, "client did not answer; offering the visitor to the next one");
        } else if !member.session.closing.is_cancelled() {
            return warn!(?wait, "no data connection from the client in time; closing visitor");
        }
        // Its client left while the visitor waited: try the next member of the pool.
        drop(admitted);
        let next = std::iter::from_fn(|| (!fallbacks.is_empty()).then(|| fallbacks.remove(0)))
            .filter(|m| visitor_allowed(&shared, &m.session, &m.tunnel, addr))
            .find_map(|m| m.tunnel.admit().ok().map(|admitted| (m, admitted)));
        let Some((next, next_admitted)) = next else {
            return debug!("the client left and no other serves this port; closing visitor");
        };
        (member, admitted) = (next, next_admitted);
    }
}

/// Reads what the visitor already sent (without waiting) into `early`; returns its length.
fn read_early(visitor: &mut TcpStream, early: &mut Vec<u8>) -> usize {
    early.resize(EARLY_BYTES, 0);
    let read = visitor.try_read(early).unwrap_or(0);
    early.truncate(read);
    early.shrink_to_fit();
    read
}

/// The PROXY header and the early bytes, when the member's service asks for the header.
fn proxy_header_for(member: &Member, visitor: &TcpStream, addr: SocketAddr, early: &[u8]) -> Option<Vec<u8>> {
    let version = member.proxy_protocol?;
    let public = visitor.local_addr().ok()?;
    let mut first = proxy_header(version, addr, public);
    first.extend_from_slice(early);
    Some(first)
}
