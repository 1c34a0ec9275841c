//! A new connection from a client: TLS, preamble, then the control or data path.
//!
//! On the TLS listener a banned source is closed right after accept, before any TLS
//! work: it gets no refusal message (there is no channel to say it on), and HTTPS
//! visitors from it are turned away too while the ban lasts.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::bans::Offender;
use super::handshakes::{Handshake, Sorted};
use super::nodes::Arrived;
use super::pool::DataPool;
use super::{http, peers, session, sni, ServerShared};
use crate::proto::{
    fill_to, read_frame_buffered, read_preamble_buffered, write_frame, ControlChannel, DataHello, LinkKind,
    LoginRefusal, ProtocolError, ServerMessage, MAGIC,
};
use crate::transport::{accept_stream, accept_websocket, websocket_upgrade_response, Stream};

/// Longest wait for a client to close a QUIC connection whose session is over.
const QUIC_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Room for the preamble and a data hello, read in one go.
const FIRST_READ: usize = 512;

/// Reads the preamble of a new link and hands it to the control or data path.
pub(super) async fn serve_link(
    shared: Arc<ServerShared>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    http_only: bool,
    handshake: Handshake,
) {
    if tls.is_some() && shared.bans.banned(&Offender::source(peer.ip())).is_some() {
        // No TLS handshake for a banned source, and no way to say why without one.
        return debug!(%peer, "banned address on the TLS port; closing before the handshake");
    }
    let _ = tcp.set_nodelay(true);
    let limit = shared.config.handshake_timeout;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let over_tls = tls.is_some();
    let mut read = BytesMut::with_capacity(FIRST_READ);
    let opened = open_link(tcp, tls, http_only, &mut read);
    let (kind, stream) = match tokio::time::timeout(limit, opened).await {
        Ok(Ok(Opened::Ferry(kind, stream))) => (kind, stream),
        Ok(Ok(Opened::Visitor(stream))) => {
            let Some(handshake) = shared.handshakes.sort(handshake, Sorted::Visitor) else {
                return debug!(%peer, "too many visitors in their handshake; closing");
            };
            let here = (peer, Arrived::Here);
            return http::serve_visitor(shared, stream, here, read, scheme, handshake).await;
        }
        Ok(Err((err, stream))) => return refuse_link(stream, err, peer).await,
        Err(_) => return debug!(%peer, "link timed out before its preamble"),
    };
    let Some(handshake) = shared.handshakes.sort(handshake, Sorted::ClientLink) else {
        return debug!(%peer, "too many client links in their handshake; closing");
    };
    serve_opened(shared, (kind, stream, read), peer, over_tls, handshake).await
}

/// A client that came as a WebSocket upgrade request for `ws-path` on an HTTP-serving
/// listener (its head is parsed, `key` is its `Sec-WebSocket-Key`): the upgrade is
/// answered, then the link inside is served as any other.
pub(super) async fn serve_websocket_link(
    shared: Arc<ServerShared>,
    stream: Stream,
    peer: SocketAddr,
    (key, read_ahead): (&[u8], BytesMut),
    over_tls: bool,
    handshake: Handshake,
) {
    let Some(handshake) = shared.handshakes.sort(handshake, Sorted::ClientLink) else {
        return debug!(%peer, "too many client links in their handshake; closing");
    };
    let limit = shared.config.handshake_timeout;
    let mut read = BytesMut::with_capacity(FIRST_READ);
    let opened = open_websocket(stream, key, read_ahead, &mut read);
    let (kind, stream) = match tokio::time::timeout(limit, opened).await {
        Ok(Ok(opened)) => opened,
        Ok(Err((err, stream))) => return refuse_link(stream, err, peer).await,
        Err(_) => return debug!(%peer, "websocket link timed out before its preamble"),
    };
    debug!(%peer, "client link over websocket");
    serve_opened(shared, (kind, stream, read), peer, over_tls, handshake).await
}

async fn open_websocket(
    mut stream: Stream,
    key: &[u8],
    read_ahead: BytesMut,
    read: &mut BytesMut,
) -> Result<(LinkKind, Stream), LinkRefusal> {
    let answer = websocket_upgrade_response(key);
    if let Err(err) = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.flush().await
    }
    .await
    {
        return Err((err.into(), None));
    }
    let mut stream = accept_websocket(stream, read_ahead.to_vec()).await;
    match read_ferry_preamble(&mut stream, read).await {
        Ok(Some(kind)) => Ok((kind, stream)),
        Ok(None) => Err((ProtocolError::Malformed("not a ferry link inside the websocket".into()), None)),
        Err(err) => Err((err, Some(stream))),
    }
}

/// Reads the preamble of a link into `read`; `None` when its first bytes are not ferry's.
async fn read_ferry_preamble(
    stream: &mut Stream,
    read: &mut BytesMut,
) -> Result<Option<LinkKind>, ProtocolError> {
    fill_to(stream, read, MAGIC.len()).await?;
    if !read.starts_with(MAGIC) {
        return Ok(None);
    }
    read_preamble_buffered(stream, read).await.map(Some)
}

/// A client link whose preamble was read: its control session or its data connection.
async fn serve_opened(
    shared: Arc<ServerShared>,
    (kind, stream, read): (LinkKind, Stream, BytesMut),
    peer: SocketAddr,
    over_tls: bool,
    handshake: Handshake,
) {
    match kind {
        // The session watches the shutdown token itself, so it always runs its clean-up.
        LinkKind::Control => {
            let chan = ControlChannel::with_buffer(stream, read);
            session::serve_control(shared, chan, peer, (over_tls, DataPool::default()), handshake).await
        }
        LinkKind::Data => {
            attach_data(&shared, stream, read, peer).await;
            drop(handshake);
        }
        LinkKind::Forward => peers::serve_forward(shared, (stream, read), peer, Some(handshake)).await,
    }
}

/// A new QUIC connection: its first stream must be a control link, whose session then
/// opens a stream of the connection per visitor.
pub(super) async fn serve_quic_link(
    shared: Arc<ServerShared>,
    incoming: quinn::Incoming,
    handshake: Handshake,
) {
    let peer = incoming.remote_address();
    if shared.bans.banned(&Offender::source(peer.ip())).is_some() {
        incoming.refuse();
        return debug!(%peer, "banned address on the QUIC port; refused before the handshake");
    }
    let Some(handshake) = shared.handshakes.sort(handshake, Sorted::ClientLink) else {
        incoming.refuse();
        return debug!(%peer, "too many client links in their handshake; refusing");
    };
    let mut read = BytesMut::with_capacity(FIRST_READ);
    let opened = async {
        let connection =
            incoming.await.map_err(|e| (ProtocolError::Malformed(format!("QUIC handshake: {e}")), None))?;
        let stream = accept_stream(&connection).await.ok_or_else(|| {
            (ProtocolError::Malformed("QUIC connection closed before its control stream".into()), None)
        })?;
        let mut stream = stream;
        match read_ferry_preamble(&mut stream, &mut read).await {
            Ok(Some(LinkKind::Control)) => Ok((connection, stream)),
            Ok(_) => Err((ProtocolError::Malformed("not a control link over QUIC".into()), None)),
            Err(err) => Err((err, Some(stream))),
        }
    };
    let (connection, stream) = match tokio::time::timeout(shared.config.handshake_timeout, opened).await {
        Ok(Ok(opened)) => opened,
        Ok(Err((err, stream))) => return refuse_link(stream, err, peer).await,
        Err(_) => return debug!(%peer, "QUIC link timed out before its preamble"),
    };
    debug!(%peer, "client link over QUIC");
    let chan = ControlChannel::with_buffer(stream, read);
    let pool = DataPool::over_quic(connection.clone());
    // Streams the client opens after its control stream are forward links.
    tokio::select! {
        _ = session::serve_control(shared.clone(), chan, peer, (true, pool), handshake) => {}
        _ = accept_forward_streams(&shared, &connection, peer) => {}
    }
    // Closing at once would drop what the control stream still has to deliver (a login
    // refusal, a goodbye): the client closes once it has read it, or the grace ends.
    let grace = shared.config.handshake_timeout.min(QUIC_CLOSE_GRACE);
    let _ = tokio::time::timeout(grace, connection.closed()).await;
    connection.close(0u32.into(), b"session over");
}

/// Serves each further stream the client opens on its QUIC connection as a forward link.
async fn accept_forward_streams(
    shared: &Arc<ServerShared>,
    connection: &quinn::Connection,
    peer: SocketAddr,
) {
    while let Some(mut stream) = accept_stream(connection).await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut read = BytesMut::with_capacity(FIRST_READ);
            let limit = shared.config.handshake_timeout;
            match tokio::time::timeout(limit, read_ferry_preamble(&mut stream, &mut read)).await {
                Ok(Ok(Some(LinkKind::Forward))) => {
                    peers::serve_forward(shared, (stream, read), peer, None).await
                }
                _ => debug!(%peer, "a QUIC stream from the client that is not a forward link"),
            }
        });
    }
    // The connection is gone: the control stream ends with it.
    std::future::pending::<()>().await
}

/// A connection to `sni-addr`: a TLS ClientHello is a visitor, passed through by its
/// server name; the ferry preamble is a client (GT's clients may reach the server there,
/// e.g. with `-addr ""`). Only the first byte is looked at, without taking it.
pub(super) async fn serve_sni_link(
    shared: Arc<ServerShared>,
    tcp: TcpStream,
    peer: SocketAddr,
    handshake: Handshake,
) {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(shared.config.handshake_timeout, tcp.peek(&mut first)).await;
    match peeked {
        Ok(Ok(1)) if first[0] == MAGIC[0] => serve_link(shared, tcp, peer, None, false, handshake).await,
        Ok(Ok(1)) => match shared.handshakes.sort(handshake, Sorted::Visitor) {
            Some(handshake) => {
                let _ = tcp.set_nodelay(true);
                sni::serve_visitor(shared, tcp, (peer, Arrived::Here), handshake).await
            }
            None => debug!(%peer, "too many visitors in their handshake; closing"),
        },
        _ => debug!(%peer, "nothing arrived on the SNI port in time"),
    }
}

type LinkRefusal = (ProtocolError, Option<Stream>);

/// A new connection, told apart by its first bytes.
enum Opened {
    /// A ferry client's control or data connection.
    Ferry(LinkKind, Stream),
    /// Anything else: an HTTP visitor.
    Visitor(Stream),
}

async fn open_link(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
    http_only: bool,
    read: &mut BytesMut,
) -> Result<Opened, LinkRefusal> {
    let mut stream: Stream = match tls {
        Some(acceptor) => Box::new(acceptor.accept(tcp).await.map_err(|e| (e.into(), None))?),
        None => Box::new(tcp),
    };
    if http_only {
        return Ok(Opened::Visitor(stream));
    }
    match read_ferry_preamble(&mut stream, read).await {
        Ok(Some(kind)) => Ok(Opened::Ferry(kind, stream)),
        Ok(None) => Ok(Opened::Visitor(stream)),
        Err(err) => Err((err, Some(stream))),
    }
}

/// Drops a link whose preamble was wrong; a ferry of another version is told why first.
async fn refuse_link(stream: Option<Stream>, err: ProtocolError, peer: SocketAddr) {
    debug!(%peer, ?err, "link refused");
    if let (Some(mut stream), ProtocolError::VersionMismatch { peer: client, ours }) = (stream, err) {
        let refusal = LoginRefusal::VersionMismatch { server: ours, client };
        let _ = write_frame(&mut stream, &ServerMessage::LoginRefused { refusal }).await;
    }
}

/// Checks a data connection's hello and parks it in its session's pool.
async fn attach_data(shared: &ServerShared, mut stream: Stream, mut read: BytesMut, peer: SocketAddr) {
    let limit = shared.config.handshake_timeout;
    let hello = tokio::time::timeout(limit, read_frame_buffered::<_, DataHello>(&mut stream, &mut read));
    let hello = match hello.await {
        Ok(Ok(hello)) => hello,
        Ok(Err(err)) => return debug!(%peer, ?err, "bad data hello"),
        Err(_) => return debug!(%peer, "data hello timed out"),
    };
    if !read.is_empty() {
        return debug!(%peer, "data connection sent bytes before being used");
    }
    let Some(session) = shared.registry.session(hello.session) else {
        return debug!(%peer, session = hello.session, "data connection for an unknown session");
    };
    if session.closing.is_cancelled() || !session.admit_data(hello.seq, &hello.mac) {
        return warn!(%peer, session = hello.session, "data connection refused: bad or replayed proof");
    }
    if !session.pool.push(stream) {
        debug!(session = session.id, "data pool full; closing extra connection");
    }
}
