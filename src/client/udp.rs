//! The client's end of UDP flows: one local UDP socket per flow (per visitor address),
//! connected to the local service, so its replies go back to that visitor alone.
//!
//! The server opens a flow with an open message on a data link and ends it by closing
//! that link (after `udp-timeout` of silence, or with the tunnel). Datagrams come framed
//! on the link; over QUIC, after the first ones, as QUIC datagrams tagged with the flow's
//! number, and the replies go back the same way. A reply too large for the QUIC path is
//! dropped, and counted in the log at debug level, as the network would drop it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use crate::proto::{read_datagram, untag_datagram, OpenStream, StreamStatus};
use crate::relay::flow::send_datagram;
use crate::transport::Stream;

/// Room for any UDP datagram: one is never truncated.
const RECV_BUFFER: usize = 65_536;

/// The local sockets of a session's flows over QUIC, by flow number.
#[derive(Default)]
pub(crate) struct Flows {
    sockets: Mutex<HashMap<u32, Arc<UdpSocket>>>,
}

impl Flows {
    fn sockets(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<UdpSocket>>> {
        self.sockets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Forgets a flow's socket when the flow ends.
struct FlowGuard<'a> {
    flows: &'a Flows,
    number: u32,
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.flows.sockets().remove(&self.number);
    }
}

/// Binds a socket connected to the local service `local` (`host:port`).
async fn local_socket(local: &str, timeout: Duration) -> std::io::Result<UdpSocket> {
    let resolved = tokio::time::timeout(timeout, tokio::net::lookup_host(local)).await;
    let target = resolved
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "resolving timed out"))??
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any).await?;
    socket.connect(target).await?;
    Ok(socket)
}

/// Serves the flow `open` announced on `link` until the server ends it.
pub(crate) async fn serve_flow(
    mut link: Stream,
    open: &OpenStream,
    mut read: BytesMut,
    (local, local_timeout): (&str, Duration),
    quic: Option<(&quinn::Connection, &Flows)>,
) {
    let socket = match local_socket(local, local_timeout).await {
        Ok(socket) => Arc::new(socket),
        Err(err) => {
            warn!(%local, %err, "local udp service unavailable; closing the flow");
            let _ = link.write_all(&[StreamStatus::LocalUnavailable as u8]).await;
            return;
        }
    };
    let quic = quic.zip(open.flow);
    let _forget = quic.map(|((_, flows), number)| {
        flows.sockets().insert(number, socket.clone());
        FlowGuard { flows, number }
    });
    if link.write_all(&[StreamStatus::Ready as u8]).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        tokio::select! {
            datagram = read_datagram(&mut link, &mut read) => match datagram {
                Ok(Some(datagram)) => {
                    if let Err(err) = socket.send(&datagram).await {
                        debug!(%err, "datagram not sent to the local service");
                    }
                }
                Ok(None) => return debug!("the server ended the udp flow"),
                Err(err) => return debug!(%err, "data link failed; udp flow ends"),
            },
            received = socket.recv(&mut buf) => match received {
                Ok(len) => {
                    if !send_back(&mut link, quic.map(|((c, _), n)| (c, n)), &buf[..len]).await {
                        return debug!("data link failed; udp flow ends");
                    }
                }
                // An ICMP "port unreachable": the local service is not listening (yet).
                Err(err) => debug!(%err, "local udp service did not take a datagram"),
            },
        }
    }
}

/// Sends a reply of the local service to the server (see [`send_datagram`]); false when
/// the link failed.
async fn send_back(link: &mut Stream, quic: Option<(&quinn::Connection, u32)>, reply: &[u8]) -> bool {
    match send_datagram(link, quic, reply).await {
        Ok(sent) => {
            if !sent {
                debug!(len = reply.len(), "reply too large for the QUIC path; dropped");
            }
            true
        }
        Err(_) => false,
    }
}

/// Hands each QUIC datagram the server sends to its flow's local socket, until the
/// connection ends. Datagrams of unknown flows (ended ones) are dropped.
pub(crate) async fn deliver_datagrams(flows: Arc<Flows>, connection: quinn::Connection) {
    while let Ok(datagram) = connection.read_datagram().await {
        let Some((number, payload)) = untag_datagram(datagram) else { continue };
        let socket = flows.sockets().get(&number).cloned();
        match socket {
            Some(socket) => {
                if let Err(err) = socket.try_send(&payload) {
                    debug!(%err, "datagram not sent to the local service");
                }
            }
            None => debug!(number, "datagram of an ended udp flow; dropped"),
        }
    }
}
