//! QUIC as a link transport (quinn): one QUIC connection per client session. The client
//! opens the first bidirectional stream for its control link; the server opens one stream
//! per visitor, so there is no pool of data connections and no round trip to open one.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::tls::{
    fingerprint, fingerprint_server_config, load_ca, load_identity, pinned_client_config, AcceptsFingerprint,
};
use super::{AsyncStream, Stream, TlsError};

/// The ALPN protocol name of ferry over QUIC.
pub const ALPN: &[u8] = b"ferry";

/// Streams the server may open to one client at once: visitors served at once by that
/// client over QUIC. A visitor past it waits for a stream like one waiting for a data
/// connection.
const MAX_VISITOR_STREAMS: u32 = 4096;

/// Streams a client may open at once: its control link (one spare for a control link
/// opened again) and its forward links (connections to other clients' P2P services).
const MAX_CLIENT_STREAMS: u32 = 2 + 1024;

/// The congestion controller of QUIC links (`--quic-congestion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC, as Linux TCP uses by default.
    Cubic,
    /// BBR: paces by measured bandwidth and round trip rather than by loss. The default:
    /// at 50 ms it moved 5.0-5.9 MB/s where CUBIC (quinn's) moved 3.0-3.6 at 1% loss, and
    /// 5.0-5.5 against 0.3 at 2% (bench/RESULTS.md, transports).
    #[default]
    Bbr,
}

impl FromStr for Congestion {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            other => Err(format!("'{other}' is not a congestion controller (use cubic or bbr)")),
        }
    }
}

impl fmt::Display for Congestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
        })
    }
}

/// One bidirectional QUIC stream as a byte stream.
pub struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl QuicStream {
    /// The stream of `send` and `recv`.
    pub fn new((send, recv): (quinn::SendStream, quinn::RecvStream)) -> Self {
        QuicStream { send, recv }
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf).map_err(io::Error::from)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

impl AsyncStream for QuicStream {}

/// Packets that may overtake one before it counts as lost: enough that time decides.
const REORDERING_PACKETS: u32 = 1000;

/// How late, as a share of the round trip, a packet may be before it counts as lost
/// (quinn's default is 9/8; RACK allows a quarter of a round trip).
const REORDERING_TIME: f32 = 1.25;

/// The transport settings of either side: `peer_streams` is how many streams the peer may
/// open at once; the connection is dead after `idle_timeout` without a packet (keep-alives
/// go out at a third of it).
pub(crate) fn transport(
    congestion: Congestion,
    peer_streams: u32,
    idle_timeout: Duration,
) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(peer_streams.into());
    transport.max_concurrent_uni_streams(0u32.into());
    transport.keep_alive_interval(Some(idle_timeout / 3));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    // Loss is told by time, as Linux TCP's RACK does, not by 3 packets overtaking: paths
    // that reorder (links with jitter, bonded or multipath links) otherwise look lossy and
    // the congestion controller backs off for nothing (bench/RESULTS.md, transports).
    transport.packet_threshold(REORDERING_PACKETS);
    transport.time_threshold(REORDERING_TIME);
    match congestion {
        Congestion::Cubic => {
            transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    transport
}

/// Binds the server's QUIC endpoint on `addr` with the certificates of `tls`.
pub(crate) fn server_endpoint(
    addr: SocketAddr,
    tls: &rustls::ServerConfig,
    congestion: Congestion,
    idle_timeout: Duration,
) -> io::Result<quinn::Endpoint> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| io::Error::other(format!("QUIC TLS: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(congestion, MAX_CLIENT_STREAMS, idle_timeout)));
    quinn::Endpoint::server(config, addr)
}

/// The client's side: a QUIC configuration made once, an endpoint (UDP socket) per link.
#[derive(Clone)]
pub(crate) struct QuicDialer {
    config: quinn::ClientConfig,
}

/// A QUIC link the client opened: the control stream and the connection it belongs to,
/// whose further streams the server opens for visitors.
pub struct QuicLink {
    /// The connection; the server opens a stream on it per visitor.
    pub connection: quinn::Connection,
    /// The endpoint (UDP socket) it runs on, e.g. to move it to another socket.
    pub endpoint: quinn::Endpoint,
}

impl QuicDialer {
    /// A dialer trusting what `tls` trusts.
    pub(crate) fn new(
        tls: &rustls::ClientConfig,
        congestion: Congestion,
        idle_timeout: Duration,
    ) -> Result<Self, TlsError> {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(transport(congestion, MAX_VISITOR_STREAMS, idle_timeout)));
        Ok(QuicDialer { config })
    }

    /// Connects to `server` (named `name` for its certificate) from a new UDP socket and
    /// opens the control stream.
    pub(crate) async fn connect(&self, server: SocketAddr, name: &str) -> io::Result<(Stream, QuicLink)> {
        let local: SocketAddr =
            if server.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal");
        let endpoint = quinn::Endpoint::client(local)?;
        let connecting = endpoint
            .connect_with(self.config.clone(), server, name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let connection = connecting.await.map_err(explain_connection_error)?;
        let stream = connection.open_bi().await.map_err(explain_connection_error)?;
        let link = QuicLink { connection, endpoint };
        Ok((Box::new(QuicStream::new(stream)), link))
    }
}

/// A failed QUIC connection in words; a silent server is most often blocked UDP.
fn explain_connection_error(err: quinn::ConnectionError) -> io::Error {
    match err {
        quinn::ConnectionError::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "no QUIC answer: UDP to the server may be blocked (try tls:// or another --remote)",
        ),
        quinn::ConnectionError::TransportError(err) => {
            io::Error::new(io::ErrorKind::InvalidData, format!("QUIC handshake failed: {err}"))
        }
        other => io::Error::new(io::ErrorKind::ConnectionAborted, format!("QUIC: {other}")),
    }
}

/// Opens a stream to the peer (the server does, for each visitor).
pub(crate) async fn open_stream(connection: &quinn::Connection) -> io::Result<Stream> {
    let stream = connection.open_bi().await.map_err(explain_connection_error)?;
    Ok(Box::new(QuicStream::new(stream)))
}

/// The next stream the peer opened (a client's control stream, a server's visitor
/// stream); `None` once the connection is gone.
pub(crate) async fn accept_stream(connection: &quinn::Connection) -> Option<Stream> {
    let stream = connection.accept_bi().await.ok()?;
    Some(Box::new(QuicStream::new(stream)))
}

/// A self-signed certificate made at start, for QUIC connections whose ends pin each
/// other's certificate by its SHA-256 (mutual TLS): between clients (P2P) and between
/// cluster nodes.
pub(crate) struct PinnedIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: [u8; 32],
    /// The CA the other end's certificate must also chain to, if any.
    ca: Option<Arc<rustls::RootCertStore>>,
}

impl PinnedIdentity {
    /// A fresh certificate for `name` (not checked by the other end: the fingerprint is).
    pub(crate) fn generate(name: &str) -> io::Result<Self> {
        let made = rcgen::generate_simple_self_signed(vec![name.to_owned()])
            .map_err(|e| io::Error::other(format!("certificate: {e}")))?;
        let certificate = made.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
        Ok(PinnedIdentity { fingerprint: fingerprint(&certificate), chain: vec![certificate], key, ca: None })
    }

    /// A certificate issued by a CA (PEM files), for ends that are pinned and must also
    /// show a certificate of the CA of `ca`.
    pub(crate) fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Self, TlsError> {
        let (chain, key) = load_identity(cert, key)?;
        let fingerprint = fingerprint(&chain[0]);
        Ok(PinnedIdentity { chain, key, fingerprint, ca: Some(load_ca(ca)?) })
    }

    /// SHA-256 of the certificate.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    fn pair(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }

    /// The accepting side: asks every client for a certificate that `accepts` lets in.
    pub(crate) fn server_config(
        &self,
        accepts: AcceptsFingerprint,
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> io::Result<quinn::ServerConfig> {
        let mut tls = fingerprint_server_config(self.pair(), accepts, self.ca.clone())
            .map_err(|e| io::Error::other(e.to_string()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| io::Error::other(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }

    /// The connecting side: accepts only the certificate of SHA-256 `pinned`.
    pub(crate) fn client_config(
        &self,
        pinned: [u8; 32],
        alpn: &[u8],
        transport: Arc<quinn::TransportConfig>,
    ) -> io::Result<quinn::ClientConfig> {
        let mut tls = pinned_client_config(pinned, self.pair(), self.ca.clone())
            .map_err(|e| io::Error::other(e.to_string()))?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| io::Error::other(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport);
        Ok(config)
    }
}
