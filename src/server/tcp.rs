//! TCP tunnels: accept visitors on a public port and pair each with a data connection.
//!
//! A port's tunnels are a pool of the endpoint table (`endpoints.rs`); the port closes
//! with its last member, and is given back once its listener is dropped.

use std::borrow::Cow;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use super::accept::{accept_until, AcceptErrors};
use super::dispatch::{dispatch, Entrance, NotServed};
use super::endpoints::{Endpoint, Member};
use super::ports::{reserve_port, run_port, Bound};
use super::proxy_header::proxy_header;
use super::ServerShared;
use crate::proto::{PortProtocol, RegisterError};
use crate::transport::{reset_on_drop, Stream};

/// Watches a member of a port's pool (`endpoint`): when its tunnel closes it leaves the
/// pool, and the last one to leave closes the port and waits until the port is given back.
pub(crate) fn watch_member(shared: &Arc<ServerShared>, member: &Member, endpoint: Endpoint) {
    let tunnel = member.tunnel.clone();
    let (shared, owner) = (shared.clone(), member.session.clone());
    member.session.tasks.spawn(async move {
        let service = tunnel.service;
        tunnel.token.cancelled().await;
        let last = shared.endpoints.leave(&endpoint, service);
        owner.forget_tunnel(service);
        debug!(service, ?endpoint, last = last.is_some(), "tunnel left its port");
        if let Some((closed, released)) = last {
            // The session counts as closed only once its port can be bound again.
            closed.cancel();
            released.cancelled().await;
        }
        tunnel.gone.cancel();
    });
}

/// Opens a tunnel on a public port of `protocol`: it joins a port of clients sharing a tag
/// with it (returns `None` then), or gets a port of its own (the one asked for, or a
/// random one when allowed), bound, with the token that closes it with its last member.
pub(crate) async fn open_port(
    shared: &Arc<ServerShared>,
    member: &Member,
    protocol: PortProtocol,
    (asked, random): (Option<u16>, bool),
) -> Result<(u16, Option<(Bound, CancellationToken)>), RegisterError> {
    // Clients of one user that share a tag serve a service of the same name together.
    let wanted = |e: &Endpoint| e.port_of(protocol).is_some_and(|p| asked.map_or(true, |a| a == p));
    if let Some(port) = shared.endpoints.join(wanted, member).and_then(|e| e.port_of(protocol)) {
        info!(port, %protocol, name = ?member.tunnel.name, "joining the clients that serve this port");
        watch_member(shared, member, Endpoint::port(protocol, port));
        return Ok((port, None));
    }
    let (port, bound) = reserve_port(shared, member, protocol, (asked, random)).await?;
    let endpoint = Endpoint::port(protocol, port);
    let closed = shared.endpoints.lock().pools.get(&endpoint).map(|p| p.closed.clone());
    watch_member(shared, member, endpoint);
    Ok((port, Some((bound, closed.unwrap_or_default()))))
}

/// Opens a TCP tunnel (see [`open_port`]). Returns the port.
pub(crate) async fn open_tcp(
    shared: &Arc<ServerShared>,
    member: Member,
    asked: Option<u16>,
    random: bool,
) -> Result<u16, RegisterError> {
    let (port, bound) = open_port(shared, &member, PortProtocol::Tcp, (asked, random)).await?;
    let Some((Bound::Tcp(listener), closed)) = bound else { return Ok(port) };
    let serving = shared.clone();
    let serve = async move { accept_visitors(&serving, port, &listener, &closed).await };
    run_port(shared, Endpoint::Port(port), tracing::info_span!("port", port), serve);
    Ok(port)
}

async fn accept_visitors(
    shared: &Arc<ServerShared>,
    port: u16,
    listener: &TcpListener,
    closed: &CancellationToken,
) {
    let mut errors = AcceptErrors::new(shared);
    while let Some((visitor, addr)) = accept_until(listener, closed, &mut errors).await {
        let rotation = shared.endpoints.rotation(&Endpoint::Port(port), |m| !m.tunnel.token.is_cancelled());
        // Admission and hooks run in the visitor's own task, never in the accept loop.
        let _ = visitor.set_nodelay(true);
        let visit = serve_visitor(shared.clone(), rotation, visitor, addr);
        tokio::spawn(visit.instrument(tracing::debug_span!("visitor", %addr)));
    }
}

/// Most visitor bytes sent along with the open message.
const EARLY_BYTES: usize = 16 * 1024;

/// Serves a visitor through the first of `rotation` that lets it in; when that member's
/// client turns out to be gone before it answered, the visitor moves on to the next.
pub(crate) async fn serve_visitor<V: PortVisitor>(
    shared: Arc<ServerShared>,
    rotation: Vec<Member>,
    mut visitor: V,
    addr: SocketAddr,
) {
    let mut entrance = PortEntrance {
        rotation: rotation.into_iter(),
        current: None,
        early: None,
        addr,
        visitor: PhantomData,
    };
    dispatch(&shared, &mut entrance, &mut visitor, addr).await;
}

/// A visitor of a public port: a TCP connection, or one another node of a cluster
/// relayed here.
pub(crate) trait PortVisitor: AsyncRead + AsyncWrite + Unpin + Send {
    /// What the visitor already sent, read without waiting.
    fn read_early(&mut self) -> Vec<u8>;
    /// The public address the visitor came to.
    fn public_addr(&self) -> Option<SocketAddr>;
    /// Makes the close a reset, for a transfer that was cut off.
    fn reset_on_drop(&self);
}

impl PortVisitor for TcpStream {
    fn read_early(&mut self) -> Vec<u8> {
        let mut early = vec![0; EARLY_BYTES];
        let read = self.try_read(&mut early).unwrap_or(0);
        early.truncate(read);
        early.shrink_to_fit();
        early
    }

    fn public_addr(&self) -> Option<SocketAddr> {
        self.local_addr().ok()
    }

    fn reset_on_drop(&self) {
        reset_on_drop(self);
    }
}

/// A visitor of a port that another node of the cluster accepted and relayed here.
pub(crate) struct Relayed {
    pub(crate) stream: Stream,
    /// The address the visitor came to, on that node.
    pub(crate) public: SocketAddr,
    /// Bytes that came along with the relay's first frame: the first bytes read, unless
    /// taken as early bytes first.
    pub(crate) early: Vec<u8>,
}

impl PortVisitor for Relayed {
    fn read_early(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.early)
    }

    fn public_addr(&self) -> Option<SocketAddr> {
        Some(self.public)
    }

    fn reset_on_drop(&self) {}
}

impl AsyncRead for Relayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.early.is_empty() {
            let given = self.early.len().min(buf.remaining());
            buf.put_slice(&self.early[..given]);
            self.early.drain(..given);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Relayed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A visitor of a public TCP port, offered to the port's members in round-robin order.
struct PortEntrance<V> {
    rotation: std::vec::IntoIter<Member>,
    /// The member last offered the visitor.
    current: Option<Member>,
    /// The visitor's first bytes, read once and kept so they can be offered again.
    early: Option<Vec<u8>>,
    addr: SocketAddr,
    visitor: PhantomData<fn(V)>,
}

impl<V: PortVisitor> Entrance for PortEntrance<V> {
    type Visitor = V;
    /// No member of the port is open.
    type Unrouted = ();
    const PASSES_ON_REFUSAL: bool = true;

    fn next_candidate(&mut self, _: &ServerShared) -> Result<Member, NotServed<()>> {
        let offered_before = self.current.is_some();
        let Some(member) = self.rotation.next() else {
            return Err(if offered_before { NotServed::Exhausted } else { NotServed::Unrouted(()) });
        };
        self.current = Some(member.clone());
        Ok(member)
    }

    fn first_bytes(&mut self, visitor: &mut V) -> (Cow<'_, [u8]>, usize) {
        let early = self.early.get_or_insert_with(|| visitor.read_early());
        let read = early.len();
        match self.current.as_ref().and_then(|m| proxy_header_for(m, visitor, self.addr, early)) {
            Some(with_header) => (Cow::Owned(with_header), read),
            None => (Cow::Borrowed(early.as_slice()), read),
        }
    }

    async fn answer(&mut self, visitor: &mut V, why: NotServed<()>) {
        if let NotServed::Cut = why {
            visitor.reset_on_drop();
        }
    }
}

/// The PROXY header and the early bytes, when the member's service asks for the header.
fn proxy_header_for(
    member: &Member,
    visitor: &impl PortVisitor,
    addr: SocketAddr,
    early: &[u8],
) -> Option<Vec<u8>> {
    let version = member.proxy_protocol?;
    let public = visitor.public_addr()?;
    let mut first = proxy_header(version, addr, public);
    first.extend_from_slice(early);
    Some(first)
}
