//! One dispatcher for every kind of visitor (TCP port, HTTP host, TLS server name).
//!
//! A visitor is offered to candidate tunnels in turn: allow-ip/deny-ip and the program's
//! hook, then the tunnel's limits (service control), then a pooled data connection, then
//! the open message with the first bytes and the relay. When a data connection breaks
//! before its client answered, or a client leaves while the visitor waits, the visitor is
//! offered to the next candidate. What sets the kinds apart is an [`Entrance`]: where the
//! candidates come from, which bytes go first, and how a visitor that is not served is
//! answered (closed, reset, or an HTTP error page).

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::endpoints::Member;
use super::tunnel::{Refusal, Visit};
use super::visit::{relay_visitor, take_data, visitor_allowed, Relay};
use super::ServerShared;
use crate::proto::OpenStream;

/// Why a visitor was not served, or how its service ended badly.
#[derive(Debug)]
pub(crate) enum NotServed<U> {
    /// No tunnel serves what the visitor asked for; the entrance says why.
    Unrouted(U),
    /// allow-ip/deny-ip or the program's hook turned the visitor away.
    Denied,
    /// The tunnel's limits, or its user's, turned the visitor away.
    Refused(Refusal),
    /// The client had no free data connection in time.
    NoData,
    /// Every client offered the visitor left before answering.
    Exhausted,
    /// The client could not reach its local service; the visitor got nothing yet.
    LocalUnavailable,
    /// The transfer was cut off; the visitor should see a reset.
    Cut,
}

/// Most clients one visitor is offered to when the chosen ones turn out to be gone.
const MAX_ATTEMPTS: usize = 4;

/// The offers of an entrance that looks its route up again for each one (a host name
/// finds the next client serving it).
#[derive(Default)]
pub(crate) struct Attempts(usize);

impl Attempts {
    /// Counts one more offer; `Exhausted` past [`MAX_ATTEMPTS`].
    pub(crate) fn another<U>(&mut self) -> Result<(), NotServed<U>> {
        self.0 += 1;
        if self.0 > MAX_ATTEMPTS {
            return Err(NotServed::Exhausted);
        }
        Ok(())
    }
}

/// What sets one kind of visitor apart.
pub(crate) trait Entrance {
    /// The visitor's stream, as the relay reads and writes it.
    type Visitor: AsyncRead + AsyncWrite + Unpin + Send;
    /// Why no tunnel serves the visitor, as this entrance finds out.
    type Unrouted: std::fmt::Debug + Send;
    /// Whether a candidate that turns the visitor away passes it to the next candidate
    /// (a TCP port's members) rather than ending its visit.
    const PASSES_ON_REFUSAL: bool;

    /// The next tunnel to offer the visitor to, or why there is none.
    fn next_candidate(&mut self, shared: &ServerShared) -> Result<Member, NotServed<Self::Unrouted>>;

    /// The bytes that go out with the open message to the candidate last given, and how
    /// many bytes were read from the visitor for them.
    fn first_bytes(&mut self, visitor: &mut Self::Visitor) -> (Cow<'_, [u8]>, usize);

    /// Answers a visitor that is not served, or whose transfer ended badly.
    fn answer(
        &mut self,
        visitor: &mut Self::Visitor,
        why: NotServed<Self::Unrouted>,
    ) -> impl Future<Output = ()> + Send;
}

/// How one offer to a candidate ended.
enum Offer<U> {
    /// Served (or failed in a way that ends the visitor without an answer).
    Done,
    /// The candidate's client is gone: offer the visitor to the next one.
    Next,
    /// The visitor gets an answer and its visit ends.
    End(NotServed<U>),
}

/// Serves one visitor from `peer` through the tunnels `entrance` offers.
pub(crate) async fn dispatch<E: Entrance>(
    shared: &ServerShared,
    entrance: &mut E,
    visitor: &mut E::Visitor,
    peer: SocketAddr,
) {
    // The visitor's bytes read ahead are counted once, with the first relay.
    let mut first_offer = true;
    let mut counted = false;
    loop {
        let (candidate, admitted) = match admit_next(shared, entrance, peer) {
            Ok(admitted) => admitted,
            Err(why) => return end(entrance, visitor, peer, why).await,
        };
        if !std::mem::replace(&mut counted, true) {
            shared.metrics.visitor();
        }
        // The session waits for its visitors when it closes.
        let session = candidate.session.clone();
        let offer = offer(shared, entrance, visitor, peer, (candidate, admitted), &mut first_offer);
        match session.tasks.track_future(offer).await {
            Offer::Done => return,
            Offer::Next => debug!(cid = session.id, "client gone; offering the visitor to the next one"),
            Offer::End(why) => return end(entrance, visitor, peer, why).await,
        }
    }
}

/// The next candidate that lets the visitor in, with its admission.
fn admit_next<E: Entrance>(
    shared: &ServerShared,
    entrance: &mut E,
    peer: SocketAddr,
) -> Result<(Member, Visit), NotServed<E::Unrouted>> {
    admit_first(shared, || entrance.next_candidate(shared), E::PASSES_ON_REFUSAL, peer)
}

/// The first candidate `next` gives that lets a visitor from `peer` in (allow-ip/deny-ip,
/// the program's hook, the tunnel's and the user's limits), with its admission. When one
/// refuses, the next is asked only if `passes_on_refusal`; the first refusal is the answer
/// when none lets the visitor in.
pub(crate) fn admit_first<U>(
    shared: &ServerShared,
    mut next: impl FnMut() -> Result<Member, NotServed<U>>,
    passes_on_refusal: bool,
    peer: SocketAddr,
) -> Result<(Member, Visit), NotServed<U>> {
    let mut first_refusal = None;
    loop {
        let candidate = match next() {
            Ok(candidate) => candidate,
            Err(why) => return Err(first_refusal.unwrap_or(why)),
        };
        let refused = if !visitor_allowed(shared, &candidate.session, &candidate.tunnel, peer) {
            NotServed::Denied
        } else {
            match candidate.tunnel.admit() {
                Ok(admitted) => return Ok((candidate, admitted)),
                Err(refusal) => {
                    if let Refusal::UserLimit { limit } = refusal {
                        let user = &candidate.session.user;
                        warn!(%peer, %user, limit, "visitor refused: the user's connections limit is reached");
                    }
                    NotServed::Refused(refusal)
                }
            }
        };
        if !passes_on_refusal {
            return Err(refused);
        }
        first_refusal.get_or_insert(refused);
    }
}

/// Offers the admitted visitor to one candidate: a data connection, the first bytes, the relay.
async fn offer<E: Entrance>(
    shared: &ServerShared,
    entrance: &mut E,
    visitor: &mut E::Visitor,
    peer: SocketAddr,
    (candidate, _admitted): (Member, Visit),
    first_offer: &mut bool,
) -> Offer<E::Unrouted> {
    let Member { session, tunnel, .. } = &candidate;
    let Some(data) = take_data(session, shared.config.data_wait_timeout).await else {
        // A client that left while the visitor waited passes it on; a live one was too slow.
        return if session.closing.is_cancelled() { Offer::Next } else { Offer::End(NotServed::NoData) };
    };
    let (early, read_ahead) = entrance.first_bytes(visitor);
    let read_ahead = if std::mem::replace(first_offer, false) { read_ahead } else { 0 };
    let open = OpenStream { service: tunnel.service, visitor: peer, seal: None, flow: None };
    let idle = shared.config.idle_limit();
    match relay_visitor(session, tunnel, data, visitor, &open, (&early, read_ahead), idle).await {
        Relay::Finished => Offer::Done,
        Relay::Unanswered => Offer::Next,
        Relay::LocalUnavailable => Offer::End(NotServed::LocalUnavailable),
        Relay::Cut => Offer::End(NotServed::Cut),
    }
}

/// Logs why the visitor was not served and lets the entrance answer it.
async fn end<E: Entrance>(
    entrance: &mut E,
    visitor: &mut E::Visitor,
    peer: SocketAddr,
    why: NotServed<E::Unrouted>,
) {
    match &why {
        NotServed::Unrouted(unrouted) => debug!(%peer, ?unrouted, "no tunnel for this visitor"),
        NotServed::Denied => debug!(%peer, "visitor refused by allow-ip/deny-ip or the program's hook"),
        NotServed::Refused(refusal) => info!(%peer, ?refusal, "visitor refused by the tunnel's limits"),
        NotServed::NoData => warn!(%peer, "no data connection from the client in time; closing visitor"),
        NotServed::Exhausted => debug!(%peer, "no client answered; closing visitor"),
        NotServed::LocalUnavailable => debug!(%peer, "the client could not reach its local service"),
        NotServed::Cut => debug!(%peer, "transfer cut off; resetting the visitor"),
    }
    entrance.answer(visitor, why).await;
}
