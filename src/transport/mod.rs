//! The link between client and server: TCP, TLS, WebSocket (over either), one boxed
//! stream type for all.

mod addr;
mod proxy;
mod tls;
mod ws;

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use addr::{parse_listen_addr, AddrError, RemoteAddr, Scheme};
pub use proxy::{ProxyAddr, ProxyKind};
pub use tls::{client_tls_config, server_tls_acceptor, RemoteTrust, TlsError, TlsVersion};
pub use ws::WsStream;
pub(crate) use ws::{
    accept as accept_websocket, upgrade_key as websocket_upgrade_key,
    upgrade_response as websocket_upgrade_response,
};

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
    timeout: Duration,
}

impl Connector {
    /// Builds a connector; `trust` matters only for `tls://` and `wss://` addresses.
    pub fn new(remote: RemoteAddr, trust: &RemoteTrust, timeout: Duration) -> Result<Self, TlsError> {
        let tls = match remote.scheme {
            Scheme::Tcp | Scheme::Ws => None,
            Scheme::Tls | Scheme::Wss => {
                let config = client_tls_config(trust)?;
                let name = rustls_pki_types::ServerName::try_from(remote.host.clone())
                    .map_err(|_| TlsError::BadServerName(remote.host.clone()))?;
                Some((tokio_rustls::TlsConnector::from(config), name))
            }
        };
        Ok(Connector { remote, proxy: None, tls, timeout })
    }

    /// Reaches the server through `proxy` (HTTP CONNECT or SOCKS5), if given.
    pub fn with_proxy(mut self, proxy: Option<ProxyAddr>) -> Self {
        self.proxy = proxy;
        self
    }

    /// The address this connector dials.
    pub fn remote(&self) -> &RemoteAddr {
        &self.remote
    }

    /// Opens one link to the server, within the connect timeout.
    pub async fn connect(&self) -> io::Result<Stream> {
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
