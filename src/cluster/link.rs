//! Node-to-node links: one QUIC endpoint per node on `--node-addr`, one connection to each
//! other node that it relays visitors to, a stream per visitor. Each stream starts with a
//! [`NodeVisit`] frame (which entrance the visitor came in by, from where), answered by one
//! byte when the other node takes the visitor, then carries the visitor's bytes both ways.
//!
//! Each node shows a certificate (made at start, or issued by the cluster's CA with
//! `cluster-cert`/`cluster-key`/`cluster-ca`) whose fingerprint it publishes with its node
//! record in etcd; both ends pin the other's by that fingerprint (mutual TLS), and with a
//! CA also require a certificate of that CA naming the node, so only nodes of the cluster
//! can open streams, and nobody on the path reads them.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::proto::{encode_frame, read_frame_buffered};
use crate::transport::{accept_stream, open_stream, quic_transport, Congestion, PinnedIdentity, Stream};

/// The ALPN protocol name of node links.
const ALPN: &[u8] = b"ferry-node";

/// Streams (visitors) another node may have open at once on one link.
const MAX_NODE_STREAMS: u32 = 16_384;

/// A link silent this long is dead (keep-alives go out at a third of it).
const DEAD_LINK: Duration = Duration::from_secs(6);

/// How long connecting to another node may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A node that could not be reached is not tried again for this long.
const UNREACHABLE_FOR: Duration = Duration::from_secs(3);

/// How long the other node may take to take a visitor (one round trip between nodes).
const TAKEN_TIMEOUT: Duration = Duration::from_secs(1);

/// The byte a node answers a relayed visitor's first frame with.
const TAKEN: [u8; 1] = [1];

/// How long the first frame of a stream may take.
const VISIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The name a certificate made at start is for (not checked: the fingerprint is; a
/// CA-issued node certificate names its node id, which is checked).
pub(crate) const NODE_NAME: &str = "ferry-node";

/// Which entrance of the first node a relayed visitor came in by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum NodeEntrance {
    /// A public TCP port.
    Port(u16),
    /// An HTTP listener (`tls`: after the first node ended TLS).
    Http { tls: bool },
    /// The TLS passthrough listener (`sni-addr`).
    Sni,
}

/// The first frame of a relayed visitor's stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct NodeVisit {
    pub(crate) entrance: NodeEntrance,
    /// The visitor's own address.
    pub(crate) visitor: SocketAddr,
    /// The address the visitor connected to, on the first node.
    pub(crate) public: SocketAddr,
}

/// A relayed visitor as the node serving it receives it.
pub(crate) struct Arrival {
    pub(crate) visit: NodeVisit,
    pub(crate) stream: Stream,
    /// Bytes that came after the frame, read with it.
    pub(crate) read: bytes::BytesMut,
}

/// Says whether a node certificate, by its SHA-256, belongs to a live node.
pub(crate) type KnownNode = Arc<dyn Fn(&[u8; 32]) -> bool + Send + Sync>;

/// This node's end of the node links.
pub(crate) struct NodeLink {
    endpoint: quinn::Endpoint,
    identity: PinnedIdentity,
    connections: tokio::sync::Mutex<HashMap<String, quinn::Connection>>,
    unreachable: Mutex<HashMap<String, Instant>>,
}

impl NodeLink {
    /// Binds the node link on `addr`, showing `identity`; streams from nodes that `known`
    /// accepts (and, with a CA, whose certificate it issued) arrive on the receiver until
    /// `stop`.
    pub(crate) fn bind(
        (addr, identity): (SocketAddr, PinnedIdentity),
        known: KnownNode,
        stop: CancellationToken,
    ) -> io::Result<(Arc<Self>, mpsc::Receiver<Arrival>)> {
        let transport = Arc::new(quic_transport(Congestion::default(), MAX_NODE_STREAMS, DEAD_LINK));
        let endpoint = quinn::Endpoint::server(identity.server_config(known, ALPN, transport)?, addr)?;
        let link = Arc::new(NodeLink {
            endpoint,
            identity,
            connections: tokio::sync::Mutex::default(),
            unreachable: Mutex::default(),
        });
        let (arrivals, received) = mpsc::channel(1024);
        tokio::spawn(accept_links(link.endpoint.clone(), arrivals, stop));
        Ok((link, received))
    }

    /// SHA-256 of the certificate this node shows.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        self.identity.fingerprint()
    }

    /// The address the link listens on.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Whether `node` failed to answer a moment ago.
    pub(crate) fn is_unreachable(&self, node: &str) -> bool {
        let unreachable = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
        unreachable.get(node).is_some_and(|until| *until > Instant::now())
    }

    /// Opens a stream to `node` (at `addr`, showing the certificate `print`) for `visit`.
    pub(crate) async fn open(
        &self,
        (node, addr, print): (&str, SocketAddr, [u8; 32]),
        visit: &NodeVisit,
    ) -> io::Result<Stream> {
        let opened = async {
            let connection = self.connection(node, addr, print).await?;
            let mut stream = open_stream(&connection).await?;
            let mut frame = Vec::new();
            encode_frame(visit, &mut frame).map_err(io::Error::other)?;
            stream.write_all(&frame).await?;
            // The other node takes the visitor with one byte: a node that died a moment
            // ago (its link not timed out yet) is told apart within a round trip.
            let mut taken = [0u8; 1];
            match tokio::time::timeout(TAKEN_TIMEOUT, stream.read_exact(&mut taken)).await {
                Ok(Ok(_)) if taken == TAKEN => Ok(stream),
                Ok(Ok(_)) => {
                    Err(io::Error::new(io::ErrorKind::InvalidData, "the node answered something else"))
                }
                Ok(Err(err)) => Err(err),
                // Only this stream fails: other visitors on the link may be fine.
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("node {node} did not take the visitor"),
                )),
            }
        };
        let opened = opened.await;
        if opened.is_err() {
            let mut unreachable = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
            unreachable.insert(node.to_owned(), Instant::now() + UNREACHABLE_FOR);
        }
        opened
    }

    /// The live connection to `node`, made if there is none.
    async fn connection(
        &self,
        node: &str,
        addr: SocketAddr,
        print: [u8; 32],
    ) -> io::Result<quinn::Connection> {
        let mut connections = self.connections.lock().await;
        if let Some(connection) = connections.get(node).filter(|c| c.close_reason().is_none()) {
            return Ok(connection.clone());
        }
        let transport = Arc::new(quic_transport(Congestion::default(), 0, DEAD_LINK));
        let config = self.identity.client_config(print, ALPN, transport)?;
        let connecting = self
            .endpoint
            .connect_with(config, addr, node)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, format!("node {node} at {addr} did not answer"))
            })?
            .map_err(|e| io::Error::other(format!("node {node} at {addr}: {e}")))?;
        debug!(node, %addr, "node link up");
        connections.insert(node.to_owned(), connection.clone());
        Ok(connection)
    }

    /// Closes every link.
    pub(crate) fn close(&self) {
        self.endpoint.close(0u32.into(), b"node leaving");
    }
}

/// Accepts links from other nodes and the visitors' streams on them.
async fn accept_links(endpoint: quinn::Endpoint, arrivals: mpsc::Sender<Arrival>, stop: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        let (arrivals, stop) = (arrivals.clone(), stop.clone());
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(err) => return warn!(%err, "a node link failed its handshake"),
            };
            debug!(from = %connection.remote_address(), "node link accepted");
            loop {
                let stream = tokio::select! {
                    _ = stop.cancelled() => return,
                    stream = accept_stream(&connection) => stream,
                };
                let Some(stream) = stream else { return };
                tokio::spawn(arrive(stream, arrivals.clone()));
            }
        });
    }
}

/// Reads a stream's first frame and hands the visitor over.
async fn arrive(mut stream: Stream, arrivals: mpsc::Sender<Arrival>) {
    let mut read = bytes::BytesMut::new();
    let visit =
        tokio::time::timeout(VISIT_TIMEOUT, read_frame_buffered::<_, NodeVisit>(&mut stream, &mut read));
    match visit.await {
        Ok(Ok(visit)) => {
            if stream.write_all(&TAKEN).await.is_ok() {
                let _ = arrivals.send(Arrival { visit, stream, read }).await;
            }
        }
        Ok(Err(err)) => warn!(%err, "a node sent a broken visit frame"),
        Err(_) => warn!("a node opened a stream and sent nothing"),
    }
}
