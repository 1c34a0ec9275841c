//! One visitor, TCP or HTTP: pair it with a data connection and relay.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::hooks::VisitorInfo;
use super::session::SessionShared;
use super::tunnel::Tunnel;
use super::ServerShared;
use crate::chunked::{encode_chunk, relay_chunked_until, IdleLimit, Status};
use crate::proto::{encode_frame, OpenStream, ProtocolError};
use crate::throttle::{Meter, Metered};
use crate::transport::Stream;

/// Whether a visitor from `peer` may use `tunnel`: its `allow-ip`/`deny-ip`, then the
/// embedding program's hook.
pub(crate) fn visitor_allowed(
    shared: &ServerShared,
    session: &SessionShared,
    tunnel: &Tunnel,
    peer: SocketAddr,
) -> bool {
    if !tunnel.control().admits_ip(peer.ip()) {
        debug!(%peer, service = tunnel.service, "visitor refused by allow-ip/deny-ip");
        return false;
    }
    if !shared.has_hooks() {
        return true;
    }
    let visitor = VisitorInfo {
        address: peer,
        service: tunnel.service,
        name: tunnel.name.clone(),
        user: session.user.clone(),
        cid: session.id,
    };
    let allowed = shared.hooks().allow_visitor(&visitor);
    if !allowed {
        debug!(%peer, service = tunnel.service, "visitor refused by the program's hook");
    }
    allowed
}

/// Takes an idle data connection of `session`, asking the client for more while none is
/// ready; `None` after `wait`, or at once when the session closes.
pub(crate) async fn take_data(session: &SessionShared, wait: Duration) -> Option<Stream> {
    tokio::select! {
        data = session.pool.take(wait, || session.request_data()) => data,
        _ = session.closing.cancelled() => None,
    }
}

/// How a visitor's relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relay {
    /// Served, or failed in a way that ends the visitor.
    Finished,
    /// The data connection broke before the client answered and before any visitor byte
    /// beyond the open message's went out: another client may serve the visitor.
    Unanswered,
    /// The client could not reach its local service; the visitor got nothing yet.
    LocalUnavailable,
    /// The transfer was cut off: the client or its local service died, or the tunnel
    /// closed. The visitor should see a reset, not a normal end.
    Cut,
}

/// Sends the open message with `early` bytes in one write, relays until both sides are
/// done, and gives the data connection back to the pool after a clean end. `read_ahead`
/// visitor bytes were read before the relay; they are counted with the rest.
pub(crate) async fn relay_visitor<V>(
    session: &SessionShared,
    tunnel: &Tunnel,
    mut data: Stream,
    visitor: &mut V,
    open: &OpenStream,
    (early, read_ahead): (&[u8], usize),
    idle: Option<IdleLimit>,
) -> Relay
where
    V: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if let Err(err) = send_open(&mut data, open, early).await {
        debug!(%err, "data connection failed before use");
        return Relay::Unanswered;
    }
    let token = &tunnel.token;
    let account = &session.account;
    let shaped = account.is_throttled();
    // Reads from the visitor are uploads, writes to it downloads: counted for the tunnel and
    // the user, and shaped by the user's buckets (shared by all the user's visitors).
    let up = Meter {
        bucket: shaped.then_some(&account.upload),
        counters: [&tunnel.traffic.up, &account.traffic.up],
    };
    let down = Meter {
        bucket: shaped.then_some(&account.download),
        counters: [&tunnel.traffic.down, &account.traffic.down],
    };
    up.record(read_ahead);
    let mut metered = Metered::new(visitor, up, down);
    let relayed = relay_chunked_until(&mut metered, &mut data, Status::Expect, BytesMut::new(), idle, token);
    match relayed.await {
        Ok(relayed) => {
            debug!(up = relayed.out, down = relayed.r#in, "visitor done");
            // A clean end on both sides: the data connection serves the next visitor.
            if relayed.leftover.is_empty() && !token.is_cancelled() {
                session.pool.push(data);
            }
            Relay::Finished
        }
        Err(failed) if failed.unanswered => {
            debug!(err = %failed, "data connection broke before the client answered");
            Relay::Unanswered
        }
        Err(failed) if failed.local_unavailable => {
            debug!("the client could not reach its local service");
            Relay::LocalUnavailable
        }
        Err(failed) if failed.cut_off() => {
            debug!(err = %failed, "transfer cut off; resetting the visitor");
            Relay::Cut
        }
        Err(failed) => {
            debug!(err = %failed, "visitor closed");
            Relay::Finished
        }
    }
}

/// Writes the open message and the first chunk in one write.
async fn send_open(data: &mut Stream, open: &OpenStream, early: &[u8]) -> Result<(), ProtocolError> {
    let mut first = Vec::with_capacity(128 + early.len());
    encode_frame(open, &mut first)?;
    if !early.is_empty() {
        encode_chunk(early, &mut first);
    }
    data.write_all(&first).await?;
    Ok(())
}
