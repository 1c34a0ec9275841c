//! TCP tunnels: accept visitors on a public port and pair each with a data connection.
//!
//! Every public port is served by a [`TcpPool`]: usually one tunnel, but clients of
//! one user that share a tag and expose a service of the same name join the pool of
//! the first one (AeRO's tags), and visitors are spread over them round-robin. A
//! member that leaves is dropped from the pool; the port closes with the last one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use super::accept::accept_until;
use super::dispatch::{dispatch, Candidate, Entrance, NotServed};
use super::proxy_header::proxy_header;
use super::session::SessionShared;
use super::tunnel::Tunnel;
use super::ServerShared;
use crate::proto::ProxyProtocol;
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
    /// Cancelled when the last member has left or the server shuts down; the port closes.
    closing: CancellationToken,
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
                && !pool.closing.is_cancelled()
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
                pool.closing.cancel();
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
        closing: shared.shutdown.child_token(),
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
    while let Some((visitor, addr)) = accept_until(listener, &pool.closing).await {
        // Admission and hooks run in the visitor's own task, never in the accept loop.
        let visit = serve_visitor(shared.clone(), pool.rotation(), visitor, addr);
        tokio::spawn(visit.instrument(tracing::debug_span!("visitor", %addr)));
    }
}

/// Most visitor bytes sent along with the open message.
const EARLY_BYTES: usize = 16 * 1024;

/// Serves a visitor through the first of `rotation` that lets it in; when that member's
/// client turns out to be gone before it answered, the visitor moves on to the next.
async fn serve_visitor(
    shared: Arc<ServerShared>,
    rotation: Vec<Member>,
    mut visitor: TcpStream,
    addr: SocketAddr,
) {
    let _ = visitor.set_nodelay(true);
    let mut entrance = PortEntrance { rotation: rotation.into_iter(), current: None, early: None, addr };
    dispatch(&shared, &mut entrance, &mut visitor, addr).await;
}

/// A visitor of a public TCP port, offered to the port's members in round-robin order.
struct PortEntrance {
    rotation: std::vec::IntoIter<Member>,
    /// The member last offered the visitor.
    current: Option<Member>,
    /// The visitor's first bytes, read once and kept so they can be offered again.
    early: Option<Vec<u8>>,
    addr: SocketAddr,
}

impl Entrance for PortEntrance {
    type Visitor = TcpStream;
    /// No member of the port is open.
    type Unrouted = ();
    const PASSES_ON_REFUSAL: bool = true;

    fn next_candidate(&mut self, _: &ServerShared) -> Result<Candidate, NotServed<()>> {
        let offered_before = self.current.is_some();
        let Some(member) = self.rotation.next() else {
            return Err(if offered_before { NotServed::Exhausted } else { NotServed::Unrouted(()) });
        };
        let candidate = Candidate { session: member.session.clone(), tunnel: member.tunnel.clone() };
        self.current = Some(member);
        Ok(candidate)
    }

    fn first_bytes(&mut self, visitor: &mut TcpStream) -> (Cow<'_, [u8]>, usize) {
        let early = self.early.get_or_insert_with(|| read_early(visitor));
        let read = early.len();
        match self.current.as_ref().and_then(|m| proxy_header_for(m, visitor, self.addr, early)) {
            Some(with_header) => (Cow::Owned(with_header), read),
            None => (Cow::Borrowed(early.as_slice()), read),
        }
    }

    async fn answer(&mut self, visitor: &mut TcpStream, why: NotServed<()>) {
        if let NotServed::Cut = why {
            reset_on_drop(visitor);
        }
    }
}

/// Reads what the visitor already sent (without waiting).
fn read_early(visitor: &mut TcpStream) -> Vec<u8> {
    let mut early = vec![0; EARLY_BYTES];
    let read = visitor.try_read(&mut early).unwrap_or(0);
    early.truncate(read);
    early.shrink_to_fit();
    early
}

/// The PROXY header and the early bytes, when the member's service asks for the header.
fn proxy_header_for(member: &Member, visitor: &TcpStream, addr: SocketAddr, early: &[u8]) -> Option<Vec<u8>> {
    let version = member.proxy_protocol?;
    let public = visitor.local_addr().ok()?;
    let mut first = proxy_header(version, addr, public);
    first.extend_from_slice(early);
    Some(first)
}
