//! The link between client and server: TCP, TLS, WebSocket (over either), one boxed
//! stream type for all.

mod addr;
mod json_api;
mod proxy;
mod quic;
mod tls;
mod ws;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use addr::{parse_listen_addr, AddrError, RemoteAddr, Scheme};
pub(crate) use json_api::{api_endpoint, JsonApi};
#[cfg(feature = "fuzzing")]
pub(crate) use proxy::{no_proxy_covers, read_connect_answer};
pub use proxy::{ProxyAddr, ProxyKind};
use quic::QuicDialer;
pub(crate) use quic::{
    accept_stream, open_stream, server_endpoint as quic_server_endpoint, transport as quic_transport,
    PinnedIdentity,
};
pub use quic::{Congestion, QuicLink, QuicStream, ALPN as QUIC_ALPN};
pub(crate) use tls::fingerprint;
pub use tls::{client_tls_config, server_tls_acceptor, server_tls_config, RemoteTrust, TlsError, TlsVersion};
pub use ws::WsStream;
pub(crate) use ws::{
    accept as accept_websocket, upgrade_key as websocket_upgrade_key,
    upgrade_response as websocket_upgrade_response,
};

/// How long a QUIC link may stay silent before it is dead, until the client's settings say.
const DEFAULT_QUIC_IDLE: Duration = Duration::from_secs(30);

/// Anything that carries bytes both ways.
pub trait AsyncStream: AsyncRead + AsyncWrite + Send + Unpin {
    /// The TCP socket the stream runs on, if any: a transfer that was cut off ends with a
    /// reset on it, so the peer can tell it from a complete one.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl AsyncStream for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl AsyncStream for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
}

impl AsyncStream for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0)
    }
}

impl AsyncStream for tokio::io::DuplexStream {}

/// Ends `stream` with a reset (RST) instead of a normal close when it is dropped: for a
/// transfer cut off because the other end died.
pub fn reset_on_drop(stream: &TcpStream) {
    if let Err(err) = stream.set_zero_linger() {
        tracing::debug!(%err, "could not set SO_LINGER 0");
    }
}

/// The type-erased link stream every layer above the transport works with.
pub type Stream = Box<dyn AsyncStream>;

/// Dials the server: TCP, then TLS when the remote address says `tls://` or `wss://`,
/// then the WebSocket upgrade for `ws://` and `wss://`; through a proxy if it has one.
#[derive(Clone)]
pub struct Connector {
    remote: RemoteAddr,
    proxy: Option<ProxyAddr>,
    tls: Option<(tokio_rustls::TlsConnector, rustls_pki_types::ServerName<'static>)>,
    /// For `quic://`: the client's QUIC settings and the TLS configuration they came from.
    quic: Option<(QuicDialer, Arc<rustls::ClientConfig>)>,
    /// The endpoint (UDP socket) of the last QUIC link, shared by every clone.
    last_quic: Arc<std::sync::Mutex<Option<quinn::Endpoint>>>,
    timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("remote", &self.remote)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl Connector {
    /// Builds a connector; `trust` matters only for `tls://`, `wss://` and `quic://` addresses.
    pub fn new(remote: RemoteAddr, trust: &RemoteTrust, timeout: Duration) -> Result<Self, TlsError> {
        let (mut tls, mut quic) = (None, None);
        if remote.scheme.is_tls() {
            let config = client_tls_config(trust)?;
            let name = rustls_pki_types::ServerName::try_from(remote.host.clone())
                .map_err(|_| TlsError::BadServerName(remote.host.clone()))?;
            if remote.scheme == Scheme::Quic {
                let dialer = QuicDialer::new(&config, Congestion::default(), DEFAULT_QUIC_IDLE)?;
                quic = Some((dialer, config));
            } else {
                tls = Some((tokio_rustls::TlsConnector::from(config), name));
            }
        }
        Ok(Connector { remote, proxy: None, tls, quic, last_quic: Arc::default(), timeout })
    }

    /// Sets the congestion controller of `quic://` links, and how long the server may stay
    /// silent before the link counts as dead (the heartbeat timeout).
    pub fn with_quic(mut self, congestion: Congestion, idle_timeout: Duration) -> Result<Self, TlsError> {
        if let Some((_, config)) = self.quic.take() {
            let dialer = QuicDialer::new(&config, congestion, idle_timeout)?;
            self.quic = Some((dialer, config));
        }
        Ok(self)
    }

    /// Reaches the server through `proxy` (HTTP CONNECT or SOCKS5), if given.
    pub fn with_proxy(mut self, proxy: Option<ProxyAddr>) -> Self {
        self.proxy = proxy;
        self
    }

    /// Moves the last QUIC link this connector opened to `socket`: the connection goes on
    /// from the new address (QUIC connection migration).
    pub fn rebind_quic(&self, socket: std::net::UdpSocket) -> io::Result<()> {
        let endpoint = self.last_quic.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match endpoint {
            Some(endpoint) => endpoint.rebind(socket),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no QUIC link to move (not quic://, or never connected)",
            )),
        }
    }

    /// Whether this connector has opened a QUIC link.
    pub fn has_quic_link(&self) -> bool {
        self.last_quic.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Whether this connector dials `quic://`.
    pub fn is_quic(&self) -> bool {
        self.quic.is_some()
    }

    /// The address this connector dials.
    pub fn remote(&self) -> &RemoteAddr {
        &self.remote
    }

    /// Opens a control link: a link as [`connect`](Self::connect) opens, or for `quic://`
    /// the first stream of a new QUIC connection, with that connection.
    pub async fn connect_control(&self) -> io::Result<(Stream, Option<QuicLink>)> {
        let Some((dialer, _)) = &self.quic else {
            return Ok((self.connect().await?, None));
        };
        let target = format!("{}:{}", self.remote.host, self.remote.port);
        let attempt = async {
            let server = tokio::net::lookup_host((self.remote.host.as_str(), self.remote.port))
                .await?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address for the host"))?;
            dialer.connect(server, &self.remote.host).await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok((stream, link))) => {
                *self.last_quic.lock().unwrap_or_else(|e| e.into_inner()) = Some(link.endpoint.clone());
                Ok((stream, Some(link)))
            }
            Ok(Err(e)) => Err(io::Error::new(e.kind(), format!("connect to quic://{target}: {e}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect to quic://{target}: no QUIC answer within {:?}: UDP to the server may be blocked \
                     (try tls:// or another --remote)",
                    self.timeout
                ),
            )),
        }
    }

    /// Opens one link to the server, within the connect timeout. A `quic://` connector
    /// opens none: visitors come as streams of the control link's connection.
    pub async fn connect(&self) -> io::Result<Stream> {
        if self.quic.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "quic:// links carry visitors as streams",
            ));
        }
        let target = format!("{}:{}", self.remote.host, self.remote.port);
        let attempt = async {
            let tcp = match &self.proxy {
                Some(proxy) => proxy.connect(&self.remote.host, self.remote.port).await?,
                None => TcpStream::connect(&target).await?,
            };
            tcp.set_nodelay(true)?;
            let link: Stream = match &self.tls {
                None => Box::new(tcp),
                Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
            };
            if self.remote.scheme.is_websocket() {
                return ws::connect(link, &self.remote.websocket_url()).await;
            }
            Ok(link)
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(result) => result.map_err(|e: io::Error| {
                let why = tls::explain_tls_failure(&e, &self.remote.host).unwrap_or_else(|| e.to_string());
                io::Error::new(e.kind(), format!("connect to {target}: {why}"))
            }),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {target}: timed out after {:?}", self.timeout),
            )),
        }
    }
}
