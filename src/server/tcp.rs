//! TCP tunnels: accept visitors on a public port and pair each with a data connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::session::SessionShared;
use super::ServerShared;
use crate::chunked::{relay_chunked, Status};
use crate::proto::{encode_frame, OpenStream, ProtocolError};
use crate::transport::Stream;

/// Starts accepting visitors on `listener` until the tunnel or its session closes.
pub(crate) fn spawn_tunnel(
    shared: &Arc<ServerShared>,
    session: &Arc<SessionShared>,
    service: u32,
    port: u16,
    listener: TcpListener,
) {
    let token = session.closing.child_token();
    session
        .tunnels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(service, token.clone());
    let (shared, session) = (shared.clone(), session.clone());
    let span = tracing::info_span!("tunnel", service, port);
    let tasks = session.tasks.clone();
    tasks.spawn(
        async move {
            accept_visitors(&shared, &session, service, &listener, &token).await;
            // Drop the socket before giving the port back, so a re-registration can bind it.
            drop(listener);
            shared.registry.release_port(port);
            session
                .tunnels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&service);
            info!("tcp tunnel closed");
        }
        .instrument(span),
    );
}

/// Closes one tunnel of a session; false if it does not exist.
pub(crate) fn close_tunnel(session: &SessionShared, service: u32) -> bool {
    let token = session
        .tunnels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&service)
        .cloned();
    token.map(|t| t.cancel()).is_some()
}

async fn accept_visitors(
    shared: &ServerShared,
    session: &Arc<SessionShared>,
    service: u32,
    listener: &TcpListener,
    token: &CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((visitor, addr)) => {
                let visit = serve_visitor(
                    session.clone(),
                    shared.config.data_wait_timeout,
                    service,
                    visitor,
                    addr,
                    token.clone(),
                );
                session
                    .tasks
                    .spawn(visit.instrument(tracing::debug_span!("visitor", %addr)));
            }
            Err(err) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_visitor(
    session: Arc<SessionShared>,
    wait: Duration,
    service: u32,
    mut visitor: TcpStream,
    addr: SocketAddr,
    token: CancellationToken,
) {
    let _ = visitor.set_nodelay(true);
    let Some(mut data) = session.pool.take(wait, || session.request_data()).await else {
        warn!(
            ?wait,
            "no data connection from the client in time; closing visitor"
        );
        return;
    };
    let open = OpenStream {
        service,
        visitor: addr,
    };
    if let Err(err) = send_open(&mut data, &open, &visitor).await {
        debug!(%err, "data connection failed before use");
        return;
    }
    let relay = relay_chunked(&mut visitor, &mut data, Status::Expect, BytesMut::new());
    let relayed = tokio::select! {
        _ = token.cancelled() => return debug!("visitor closed with its tunnel"),
        relayed = relay => relayed,
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

/// Most visitor bytes sent along with the open message.
const EARLY_BYTES: usize = 16 * 1024;

/// Writes the open message, together with whatever the visitor already sent,
/// in one write: one segment instead of two for the common "visitor speaks
/// first" case.
async fn send_open(
    data: &mut Stream,
    open: &OpenStream,
    visitor: &TcpStream,
) -> Result<(), ProtocolError> {
    let mut first = Vec::with_capacity(128 + EARLY_BYTES);
    encode_frame(open, &mut first)?;
    let chunk = first.len();
    first.resize(chunk + 4 + EARLY_BYTES, 0);
    match visitor.try_read(&mut first[chunk + 4..]) {
        Ok(early) if early > 0 => {
            first[chunk..chunk + 4].copy_from_slice(&(early as u32).to_be_bytes());
            first.truncate(chunk + 4 + early);
        }
        // Nothing yet, or the visitor already left: the relay finds out next.
        _ => first.truncate(chunk),
    }
    data.write_all(&first).await?;
    Ok(())
}
