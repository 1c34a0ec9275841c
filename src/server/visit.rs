//! The steps of one offer of a visitor to a tunnel (see `dispatch.rs`): its
//! allow-ip/deny-ip and hook, a pooled data connection, the open message and the relay.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::hooks::VisitorInfo;
use super::session::SessionShared;
use super::tunnel::Tunnel;
use super::ServerShared;
use crate::proto::encode_chunk;
use crate::proto::{encode_frame, OpenStream};
use crate::relay::compress::compressed;
use crate::relay::throttle::{Meter, Metered};
use crate::relay::{relay_chunked_until, IdleLimit, RelayError, Relayed, Status};
use crate::seal::{visitor_keys, SealedStream, Side};
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
/// visitor bytes were read before the relay; they are counted with the rest. For an
/// `encrypt` service everything after the open message is sealed with keys of this visitor.
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
    let seal = tunnel.control().encrypt.then(|| session.next_visit());
    let open = OpenStream { seal, ..open.clone() };
    // On a compressed link the first bytes go into the compressor, after the open message.
    let (early, compress_first) = match tunnel.control().compress {
        Some(_) => (&[][..], Some(early)),
        None => (early, None),
    };
    let later = (compress_first, read_ahead, idle);
    // The open message leaves with the visitor's first bytes, in one write.
    let mut first = Vec::with_capacity(128 + early.len());
    if let Err(err) = encode_frame(&open, &mut first) {
        debug!(%err, "open message not encoded");
        return Relay::Finished;
    }
    let (outcome, reusable) = match seal {
        Some(visit) => {
            let keys = visitor_keys(&session.key, session.id, open.service, visit, Side::Server);
            // Boxed: the keys and buffers of a sealed stream would otherwise grow every
            // visitor's task, sealed or not, by their size: unboxed, 1000 idle visitors took
            // 17.3 MiB on the server instead of 15.6 (bench/run.sh, this stop).
            let mut sealed = Box::new(SealedStream::new(&mut data, keys, BytesMut::new()));
            if !early.is_empty() {
                let mut chunk = Vec::with_capacity(4 + early.len());
                encode_chunk(early, &mut chunk);
                sealed.seal_into(&chunk, &mut first);
            }
            // The open message itself is not sealed: it says which keys the rest needs.
            if let Err(err) = sealed.get_mut().write_all(&first).await {
                debug!(%err, "data connection failed before use");
                return Relay::Unanswered;
            }
            drop(first);
            let outcome = relay_link(session, tunnel, &mut sealed, visitor, later).await;
            let rest_empty = sealed.into_parts().is_some_and(|(_, raw)| raw.is_empty());
            (outcome, rest_empty && compress_first.is_none())
        }
        None => {
            if !early.is_empty() {
                encode_chunk(early, &mut first);
            }
            if let Err(err) = data.write_all(&first).await {
                debug!(%err, "data connection failed before use");
                return Relay::Unanswered;
            }
            drop(first);
            (relay_link(session, tunnel, &mut data, visitor, later).await, compress_first.is_none())
        }
    };
    settle(session, tunnel, data, reusable, outcome)
}

/// Says how the relay ended, and gives the data connection back to the pool after a
/// clean end on both sides (`reusable`: nothing sealed left over).
fn settle(
    session: &SessionShared,
    tunnel: &Tunnel,
    data: Stream,
    reusable: bool,
    outcome: Result<Relayed, RelayError>,
) -> Relay {
    match outcome {
        Ok(relayed) => {
            debug!(up = relayed.out, down = relayed.r#in, "visitor done");
            // A clean end on both sides: the data connection serves the next visitor.
            if reusable && relayed.leftover.is_empty() && !tunnel.token.is_cancelled() {
                session.pool.push(data);
            }
            Relay::Finished
        }
        Err(failed) if failed.unanswered() => {
            debug!(err = %failed, "data connection broke before the client answered");
            Relay::Unanswered
        }
        Err(RelayError::LocalUnavailable) => {
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

/// Relays over `link` (the open message is out, and the first chunk unless the link is
/// compressed: then `compress_first` holds the visitor's first bytes), metering the
/// visitor's bytes for the tunnel and the user.
async fn relay_link<V, L>(
    session: &SessionShared,
    tunnel: &Tunnel,
    link: &mut L,
    visitor: &mut V,
    (compress_first, read_ahead, idle): (Option<&[u8]>, usize, Option<IdleLimit>),
) -> Result<Relayed, RelayError>
where
    V: AsyncRead + AsyncWrite + Unpin + ?Sized,
    L: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
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
    let Some(first) = compress_first else {
        return relay_chunked_until(&mut metered, link, Status::Expect, BytesMut::new(), idle, &tunnel.token)
            .await;
    };
    let mut squeezed = compressed(link, BytesMut::new());
    if !first.is_empty() {
        let mut chunk = Vec::with_capacity(4 + first.len());
        encode_chunk(first, &mut chunk);
        let sent = async {
            squeezed.write_all(&chunk).await?;
            squeezed.flush().await
        };
        if let Err(error) = sent.await {
            return Err(RelayError::Link { error, unanswered: true, delivered: false });
        }
    }
    relay_chunked_until(&mut metered, &mut squeezed, Status::Expect, BytesMut::new(), idle, &tunnel.token)
        .await
}
