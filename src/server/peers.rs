//! P2P services on the server: their names, who may reach them, the signalling that
//! introduces two clients so they can punch a direct path, and the forward links that carry
//! a peer's connection through the server when no direct path works.
//!
//! The server never sees a direct connection's bytes. A forward link is served like any
//! visitor (`dispatch.rs`): the service's limits, allow-ip/deny-ip and hooks apply, and its
//! bytes count in the service's traffic.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::{debug, info};

use super::dispatch::{dispatch, Entrance, NotServed};
use super::endpoints::{Endpoint, Member};
use super::handshakes::Handshake;
use super::hosts::NameKind;
use super::session::SessionShared;
use super::tunnel::Tunnel;
use super::{nodes, ServerShared};
use crate::proto::{
    encode_frame, read_frame_buffered, ForwardAnswer, ForwardHello, PeerOffer, PeerPath, PeerReady,
    PeerRefusal, RegisterError, ServerMessage,
};
use crate::transport::Stream;

/// Longest reason a serving client may give for offering no direct path.
const MAX_REASON_CHARS: usize = 256;

/// Reserves the P2P name of `tunnel` (from `prefix`, or the user's id) and gives it back
/// when the tunnel closes; returns the name.
pub(crate) async fn open_peer_name(
    shared: &Arc<ServerShared>,
    session: &Arc<SessionShared>,
    tunnel: &Arc<Tunnel>,
    (prefix, alone): (Option<String>, bool),
) -> Result<String, RegisterError> {
    let rules = session.account.rules();
    let is_user = |id: &str| shared.is_user_id(id);
    let name = shared.endpoints.key_for(&rules, &session.user, prefix.as_deref(), is_user)?;
    let member = Member { prefix, ..Member::new(session.clone(), tunnel.clone()) };
    shared.endpoints.reserve_host(&rules, (&name, NameKind::Peer), member.clone()).await?;
    nodes::claim_name(shared, (&name, NameKind::Peer), &member).await?;
    let _ = tunnel.peer_name.set(name.clone());
    let (owner, sessions, watched, key) = (shared.clone(), session.clone(), tunnel.clone(), name.clone());
    session.tasks.spawn(async move {
        watched.token.cancelled().await;
        owner.endpoints.release_host((&key, NameKind::Peer), watched.service);
        nodes::release_name(&owner, (&key, NameKind::Peer), &sessions.user);
        sessions.forget_tunnel(watched.service);
        // A service with a public endpoint too says it is gone once that one is free.
        if alone {
            watched.gone.cancel();
        }
        info!(name = %key, "p2p name closed");
    });
    Ok(name)
}

/// The tunnels serving the P2P name `name` that `user` may reach, in the order to try them.
fn reachable(shared: &ServerShared, name: &str, user: &str) -> Result<Vec<Member>, PeerRefusal> {
    let name = name.to_ascii_lowercase();
    let endpoint = Endpoint::Peer(name.clone());
    let all = shared.endpoints.rotation(&endpoint, |_| true);
    if all.is_empty() {
        return Err(PeerRefusal::Unknown { name });
    }
    let admitted: Vec<Member> = all.into_iter().filter(|m| admits(m, user)).collect();
    if admitted.is_empty() {
        return Err(PeerRefusal::NotAllowed { name });
    }
    Ok(admitted)
}

/// Whether `user` may reach `member`'s service.
fn admits(member: &Member, user: &str) -> bool {
    let control = member.tunnel.control();
    control.p2p.as_ref().is_some_and(|policy| policy.admits(&member.session.user, user))
}

/// Where a serving client's answer goes: the client that asked, its request number, and
/// the service asked for.
pub(crate) struct PeerWaiter {
    asker: Arc<SessionShared>,
    request: u64,
    service: u32,
}

/// The services a session asked to reach, and whether each has a direct path now.
#[derive(Default)]
pub(crate) struct Grants {
    services: Mutex<HashMap<u32, (Arc<Tunnel>, bool)>>,
}

impl Grants {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (Arc<Tunnel>, bool)>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets whether the path to `service` is direct; the tunnel's count follows.
    fn set_direct(&self, service: u32, direct: bool) -> bool {
        let mut services = self.lock();
        let Some((tunnel, was)) = services.get_mut(&service) else { return false };
        if *was != direct {
            tunnel.peers.set_direct(direct);
            *was = direct;
        }
        true
    }

    /// The session ended: its direct paths are gone.
    pub(crate) fn clear(&self) {
        for (_, (tunnel, direct)) in self.lock().drain() {
            if direct {
                tunnel.peers.set_direct(false);
            }
        }
    }
}

/// A client asks to reach `name` directly: the offer goes to a serving client, whose
/// answer comes back later; a refusal is the answer now.
pub(crate) fn connect(
    shared: &ServerShared,
    asker: &Arc<SessionShared>,
    (request, name): (u64, String),
    offer: PeerOffer,
) -> Option<ServerMessage> {
    let refuse = |refusal| Some(ServerMessage::PeerAnswer { request, answer: Err(refusal) });
    let members = match reachable(shared, &name, &asker.user) {
        Ok(members) => members,
        Err(refusal) => {
            debug!(%name, %refusal, "peer connection refused");
            return refuse(refusal);
        }
    };
    let Some(member) = members.into_iter().find(|m| !m.session.closing.is_cancelled()) else {
        return refuse(PeerRefusal::Unknown { name });
    };
    let service = member.tunnel.service;
    asker.grants.lock().insert(service, (member.tunnel.clone(), false));
    let waiter = PeerWaiter { asker: asker.clone(), request, service };
    let Some(attempt) = shared.peer_signals.insert(asker.id, member.session.id, waiter) else {
        return refuse(PeerRefusal::Other {
            message: "too many peer connections pending; try again shortly".into(),
        });
    };
    let offer =
        ServerMessage::PeerOffer { attempt, service, from: asker.user.clone(), offer: offer.capped() };
    if member.session.outbox.try_send(offer).is_err() {
        return refuse(PeerRefusal::Other { message: "the serving client is too busy to answer".into() });
    }
    shared.metrics.peer_event(PeerEvent::Attempt);
    None
}

/// A serving client answered offer `attempt`: the answer goes to the client that asked.
pub(crate) fn answered(
    shared: &ServerShared,
    server: &SessionShared,
    attempt: u64,
    answer: Result<PeerOffer, String>,
) {
    let Some(pending) = shared.peer_signals.take(attempt, server.id) else {
        return debug!(attempt, "answer to an unknown or late peer offer");
    };
    // A serving client's reason is passed on, but not at any length.
    let answer = answer.map(PeerOffer::capped).map_err(|why| why.chars().take(MAX_REASON_CHARS).collect());
    let ready = PeerReady { service: pending.service, offer: answer };
    let message = ServerMessage::PeerAnswer { request: pending.request, answer: Ok(ready) };
    let _ = pending.asker.outbox.try_send(message);
}

/// What the server counts about peer connections.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PeerEvent {
    /// An offer went to a serving client.
    Attempt,
    /// A direct path came up.
    Direct,
    /// Punching gave up: connections go through the server.
    Fallback,
    /// A direct path came up after connections had gone through the server.
    Upgrade,
}

/// A client says what became of its peer connection to `service`.
pub(crate) fn reported(shared: &ServerShared, session: &SessionShared, service: u32, path: PeerPath) {
    let direct = matches!(path, PeerPath::Direct | PeerPath::Upgraded);
    if !session.grants.set_direct(service, direct) {
        return debug!(service, "report about a peer service never asked for");
    }
    let event = match path {
        PeerPath::Direct => PeerEvent::Direct,
        PeerPath::Relayed => PeerEvent::Fallback,
        PeerPath::Upgraded => PeerEvent::Upgrade,
        PeerPath::Closed => return,
    };
    info!(service, ?path, "peer connection");
    shared.metrics.peer_event(event);
}

/// Serves a forward link: checks its hello (holding `handshake`, its place in the
/// handshake budget, until then), then offers it to the service like a visitor.
pub(crate) async fn serve_forward(
    shared: Arc<ServerShared>,
    (mut stream, mut read): (Stream, BytesMut),
    peer: SocketAddr,
    handshake: Option<Handshake>,
) {
    let limit = shared.config.handshake_timeout;
    let hello = tokio::time::timeout(limit, read_frame_buffered::<_, ForwardHello>(&mut stream, &mut read));
    let hello = match hello.await {
        Ok(Ok(hello)) => hello,
        Ok(Err(err)) => return debug!(%peer, ?err, "bad forward hello"),
        Err(_) => return debug!(%peer, "forward hello timed out"),
    };
    let Some(session) = shared.registry.session(hello.session) else {
        return debug!(%peer, session = hello.session, "forward link for an unknown session");
    };
    if session.closing.is_cancelled() || !session.admit_data(hello.seq, &hello.mac) {
        return debug!(%peer, session = hello.session, "forward link refused: bad or replayed proof");
    }
    drop(handshake);
    let mut visitor = Announced { inner: stream, pending: Vec::new(), announced: false };
    let rotation = match reachable(&shared, &hello.name, &session.user) {
        Ok(rotation) => rotation,
        Err(refusal) => return visitor.refuse(refusal).await,
    };
    let mut entrance = PeerEntrance {
        name: hello.name.to_ascii_lowercase(),
        rotation: rotation.into_iter(),
        current: None,
        early: read.to_vec(),
    };
    // The visitor address the serving client sees is the forwarding client's.
    dispatch(&shared, &mut entrance, &mut visitor, session.peer).await;
}

/// A forward link offered to the tunnels of a P2P name in turn.
struct PeerEntrance {
    name: String,
    rotation: std::vec::IntoIter<Member>,
    /// The tunnel offered the link last, counted among its relayed peers while it is.
    current: Option<Relayed>,
    /// Bytes the forwarding client sent with its hello.
    early: Vec<u8>,
}

/// One forward link counted among a tunnel's relayed peers.
struct Relayed(Arc<Tunnel>);

impl Relayed {
    fn new(tunnel: Arc<Tunnel>) -> Self {
        tunnel.peers.relayed(1);
        Relayed(tunnel)
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        self.0.peers.relayed(-1);
    }
}

impl Entrance for PeerEntrance {
    type Visitor = Announced;
    type Unrouted = PeerRefusal;
    const PASSES_ON_REFUSAL: bool = true;

    fn next_candidate(&mut self, _: &ServerShared) -> Result<Member, NotServed<PeerRefusal>> {
        let Some(member) = self.rotation.next() else {
            return Err(match self.current {
                Some(_) => NotServed::Exhausted,
                None => NotServed::Unrouted(PeerRefusal::Unknown { name: self.name.clone() }),
            });
        };
        self.current = Some(Relayed::new(member.tunnel.clone()));
        Ok(member)
    }

    fn first_bytes(&mut self, visitor: &mut Announced) -> (Cow<'_, [u8]>, usize) {
        if let Some(Relayed(tunnel)) = &self.current {
            visitor.announce(tunnel.service);
        }
        (Cow::Borrowed(&self.early), self.early.len())
    }

    async fn answer(&mut self, visitor: &mut Announced, why: NotServed<PeerRefusal>) {
        let name = self.name.clone();
        let refusal = match why {
            NotServed::Unrouted(refusal) => refusal,
            NotServed::Exhausted => PeerRefusal::Unknown { name },
            NotServed::Denied => PeerRefusal::Refused {
                name,
                why: "allow-ip/deny-ip or the server's hook turned it away".into(),
            },
            NotServed::Refused(refusal) => PeerRefusal::Refused { name, why: refusal.to_string() },
            NotServed::NoData => PeerRefusal::Other {
                message: format!("the client serving '{name}' had no data connection ready in time"),
            },
            NotServed::LocalUnavailable => PeerRefusal::LocalUnavailable { name },
            NotServed::Cut => return,
        };
        visitor.refuse(refusal).await;
    }
}

/// A forward link whose first frame says whether it was accepted: `Accepted` goes out
/// before the first byte relayed to it.
pub(crate) struct Announced {
    inner: Stream,
    pending: Vec<u8>,
    announced: bool,
}

impl Announced {
    /// Queues the `Accepted` frame for `service`, once.
    fn announce(&mut self, service: u32) {
        if !std::mem::replace(&mut self.announced, true) {
            let _ = encode_frame(&ForwardAnswer::Accepted { service }, &mut self.pending);
        }
    }

    /// Says why the link is refused, unless it was accepted already.
    async fn refuse(&mut self, refusal: PeerRefusal) {
        debug!(%refusal, "forward link refused");
        if self.announced {
            return;
        }
        let mut frame = Vec::new();
        if encode_frame(&ForwardAnswer::Refused { refusal }, &mut frame).is_ok() {
            let _ = self.inner.write_all(&frame).await;
            let _ = self.inner.shutdown().await;
        }
    }

    /// Writes what is queued; ready once nothing is.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while !self.pending.is_empty() {
            let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..written);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Announced {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Announced {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
