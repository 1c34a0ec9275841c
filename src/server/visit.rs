//! One visitor, TCP or HTTP: pair it with a data connection and relay.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::session::SessionShared;
use crate::cancel::until_cancelled;
use crate::chunked::{encode_chunk, relay_chunked, IdleLimit, Status};
use crate::proto::{encode_frame, OpenStream, ProtocolError};
use crate::throttle::Throttled;
use crate::transport::Stream;

/// Takes an idle data connection of `session`, asking the client for more while none is ready.
pub(crate) async fn take_data(session: &SessionShared, wait: Duration) -> Option<Stream> {
    session.pool.take(wait, || session.request_data()).await
}

/// Sends the open message with `early` visitor bytes in one write, relays until both sides
/// are done, and gives the data connection back to the pool after a clean end.
pub(crate) async fn relay_visitor<V>(
    session: &SessionShared,
    mut data: Stream,
    visitor: &mut V,
    open: &OpenStream,
    early: Vec<u8>,
    token: &CancellationToken,
    idle: Option<IdleLimit>,
) where
    V: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    if let Err(err) = send_open(&mut data, open, early).await {
        return debug!(%err, "data connection failed before use");
    }
    let account = &session.account;
    let relayed = if account.is_throttled() {
        // Reads from the visitor are uploads, writes to it downloads; both shared by the user.
        let mut throttled = Throttled::new(visitor, &account.upload, &account.download);
        let relay = relay_chunked(&mut throttled, &mut data, Status::Expect, BytesMut::new(), idle);
        until_cancelled(token, relay).await
    } else {
        let relay = relay_chunked(visitor, &mut data, Status::Expect, BytesMut::new(), idle);
        until_cancelled(token, relay).await
    };
    let Some(relayed) = relayed else {
        return debug!("visitor closed with its tunnel");
    };
    match relayed {
        Ok(relayed) => {
            debug!(up = relayed.out, down = relayed.r#in, "visitor done");
            // A clean end on both sides: the data connection serves the next visitor.
            if relayed.leftover.is_empty() && !token.is_cancelled() {
                session.pool.push(data);
            }
        }
        Err(err) => debug!(%err, "visitor closed"),
    }
}

/// Writes the open message and the first chunk; both buffers are freed before the relay,
/// so an idle visitor holds only the relay's own buffers.
async fn send_open(data: &mut Stream, open: &OpenStream, early: Vec<u8>) -> Result<(), ProtocolError> {
    let mut first = Vec::with_capacity(128 + early.len());
    encode_frame(open, &mut first)?;
    if !early.is_empty() {
        encode_chunk(&early, &mut first);
    }
    drop(early);
    data.write_all(&first).await?;
    Ok(())
}
