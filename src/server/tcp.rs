//! TCP tunnels: accept visitors on a public port and pair each with a data connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

use super::proxy_header::proxy_header;
use super::session::SessionShared;
use super::tunnel::{Refusal, Tunnel, Visit};
use super::visit::{relay_visitor, take_data};
use super::ServerShared;
use crate::chunked::IdleLimit;
use crate::proto::{OpenStream, ProxyProtocol};

/// Starts accepting visitors on `listener` until the tunnel or its session closes.
pub(crate) fn spawn_tunnel(
    shared: &Arc<ServerShared>,
    session: &Arc<SessionShared>,
    tunnel: Arc<Tunnel>,
    port: u16,
    listener: TcpListener,
    proxy_protocol: Option<ProxyProtocol>,
) {
    let service = tunnel.service;
    let (shared, session) = (shared.clone(), session.clone());
    let span = tracing::info_span!("tunnel", service, port);
    let tasks = session.tasks.clone();
    tasks.spawn(
        async move {
            accept_visitors(&shared, &session, &tunnel, proxy_protocol, &listener).await;
            // Drop the socket before giving the port back, so a re-registration can bind it.
            drop(listener);
            shared.registry.release_port(port);
            session.forget_tunnel(service);
            info!("tcp tunnel closed");
        }
        .instrument(span),
    );
}

async fn accept_visitors(
    shared: &ServerShared,
    session: &Arc<SessionShared>,
    tunnel: &Arc<Tunnel>,
    proxy_protocol: Option<ProxyProtocol>,
    listener: &TcpListener,
) {
    loop {
        let accepted = tokio::select! {
            _ = tunnel.token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((visitor, addr)) => {
                // Over a max-serve limit the visitor is closed at once.
                let admitted = match tunnel.admit() {
                    Ok(admitted) => admitted,
                    Err(Refusal::UserLimit { limit }) => {
                        warn!(%addr, user = %session.user, limit, "visitor refused: the user's connections limit is reached");
                        continue;
                    }
                    Err(refusal) => {
                        debug!(%addr, ?refusal, "visitor refused by the tunnel's limits");
                        continue;
                    }
                };
                shared.metrics.visitor();
                let visit = serve_visitor(
                    session.clone(),
                    (shared.config.data_wait_timeout, shared.config.idle_limit()),
                    (tunnel.clone(), admitted),
                    proxy_protocol,
                    visitor,
                    addr,
                );
                session.tasks.spawn(visit.instrument(tracing::debug_span!("visitor", %addr)));
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

async fn serve_visitor(
    session: Arc<SessionShared>,
    (wait, idle): (Duration, Option<IdleLimit>),
    (tunnel, _admitted): (Arc<Tunnel>, Visit),
    proxy_protocol: Option<ProxyProtocol>,
    mut visitor: TcpStream,
    addr: SocketAddr,
) {
    let _ = visitor.set_nodelay(true);
    let Some(data) = take_data(&session, wait).await else {
        return warn!(?wait, "no data connection from the client in time; closing visitor");
    };
    // What the local service reads first: the PROXY header, then whatever the visitor
    // already sent, all in the open message's write.
    let mut early = match (proxy_protocol, visitor.local_addr()) {
        (Some(version), Ok(public)) => proxy_header(version, addr, public),
        _ => Vec::new(),
    };
    let header = early.len();
    early.resize(header + EARLY_BYTES, 0);
    let read = visitor.try_read(&mut early[header..]).unwrap_or(0);
    early.truncate(header + read);
    let open = OpenStream { service: tunnel.service, visitor: addr };
    relay_visitor(&session, &tunnel, data, &mut visitor, &open, (early, read), idle).await;
}
