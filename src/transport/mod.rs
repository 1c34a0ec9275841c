//! The link between client and server: TCP or TLS today, one boxed stream type
//! for all, so that QUIC or WebSocket transports can slot in later.

mod addr;
mod tls;

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub use addr::{parse_listen_addr, AddrError, RemoteAddr, Scheme};
pub use tls::{client_tls_config, server_tls_acceptor, RemoteTrust, TlsError, TlsVersion};

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

/// Dials the server: TCP, then TLS when the remote address says `tls://`.
#[derive(Clone)]
pub struct Connector {
    remote: RemoteAddr,
    tls: Option<(tokio_rustls::TlsConnector, rustls_pki_types::ServerName<'static>)>,
    timeout: Duration,
}

impl Connector {
    /// Builds a connector; `trust` matters only for `tls://` addresses.
    pub fn new(remote: RemoteAddr, trust: &RemoteTrust, timeout: Duration) -> Result<Self, TlsError> {
        let tls = match remote.scheme {
            Scheme::Tcp => None,
            Scheme::Tls => {
                let config = client_tls_config(trust)?;
                let name = rustls_pki_types::ServerName::try_from(remote.host.clone())
                    .map_err(|_| TlsError::BadServerName(remote.host.clone()))?;
                Some((tokio_rustls::TlsConnector::from(config), name))
            }
        };
        Ok(Connector { remote, tls, timeout })
    }

    /// The address this connector dials.
    pub fn remote(&self) -> &RemoteAddr {
        &self.remote
    }

    /// Opens one link to the server, within the connect timeout.
    pub async fn connect(&self) -> io::Result<Stream> {
        let target = format!("{}:{}", self.remote.host, self.remote.port);
        let attempt = async {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            match &self.tls {
                None => Ok(Box::new(tcp) as Stream),
                Some((connector, name)) => {
                    let tls = connector.connect(name.clone(), tcp).await?;
                    Ok(Box::new(tls) as Stream)
                }
            }
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
