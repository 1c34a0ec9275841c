//! A client's part in P2P: its direct-connection endpoint (made at first use), the
//! signalling it does through the driver's control connection, and serving the peers the
//! server introduced to its own P2P services. Forwarding to other clients' services is in
//! `forward.rs`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::driver::Command;
use super::pool::{DataPool, Routes};
use crate::config::PeerConfig;
use crate::p2p::{Browsers, PeerEndpoint};
use crate::proto::{
    ClientMessage, PeerOffer, PeerPath, PeerReady, PeerRefusal, StreamStatus, PEER_STREAM_HEADER,
};
use crate::transport::{QuicStream, Stream};

/// How long a peer the server introduced may take to connect.
const PEER_WELCOME: Duration = Duration::from_secs(30);

/// Longest wait for the first bytes of a peer's stream.
const STREAM_HEADER_WAIT: Duration = Duration::from_secs(10);

/// Bytes moved per read and write between a local connection and its link: large
/// enough that a QUIC stream is written in big pieces (with tokio's 8 KiB a direct
/// stream moved a third less on loopback).
const COPY_BUF: usize = 64 * 1024;

/// Copies `from` into `to` until `from` ends, [`COPY_BUF`] at a time; the bytes copied.
pub(crate) async fn copy<R, W>(from: &mut R, to: &mut W) -> io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buffered = tokio::io::BufReader::with_capacity(COPY_BUF, from);
    tokio::io::copy_buf(&mut buffered, to).await
}

/// The STUN port asked when `remote-stun` is not given (the standard one).
const STUN_PORT: u16 = 3478;

/// What the current session lends to P2P: its data links and its services.
#[derive(Clone)]
pub(crate) struct SessionLinks {
    pub(crate) pool: Arc<DataPool>,
    pub(crate) routes: Routes,
}

impl std::fmt::Debug for Peering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peering").field("config", &self.config).finish_non_exhaustive()
    }
}

/// One client's P2P state, shared by the driver, forwards and the peers it serves.
pub(crate) struct Peering {
    config: PeerConfig,
    /// The server's host, for the default STUN server.
    server_host: String,
    local_timeout: Duration,
    endpoint: OnceCell<Result<Arc<PeerEndpoint>, String>>,
    /// The WebRTC engine for browser peers, started at the first offer.
    browsers: OnceCell<Option<Browsers>>,
    commands: mpsc::UnboundedSender<Command>,
    session: watch::Sender<Option<SessionLinks>>,
    /// The services each introduced peer (by certificate) may reach.
    grants: Mutex<HashMap<[u8; 32], HashSet<u32>>>,
    token: CancellationToken,
}

impl Peering {
    pub(crate) fn new(
        (config, server_host, local_timeout): (PeerConfig, String, Duration),
        commands: mpsc::UnboundedSender<Command>,
        token: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Peering {
            config,
            server_host,
            local_timeout,
            endpoint: OnceCell::new(),
            browsers: OnceCell::new(),
            commands,
            session: watch::channel(None).0,
            grants: Mutex::default(),
            token,
        })
    }

    /// How P2P is configured.
    pub(crate) fn config(&self) -> &PeerConfig {
        &self.config
    }

    /// A new session started (`Some`) or ended (`None`). Grants name services of the
    /// session that gave them, so they end with it.
    pub(crate) fn set_session(&self, links: Option<SessionLinks>) {
        self.grants.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.session.send_replace(links);
    }

    /// The current session's links, once there is one.
    pub(crate) async fn session(&self) -> Option<SessionLinks> {
        let mut watch = self.session.subscribe();
        let links = watch.wait_for(Option::is_some).await.ok()?;
        links.clone()
    }

    /// The session's links now, if connected.
    pub(crate) fn session_now(&self) -> Option<SessionLinks> {
        self.session.borrow().clone()
    }

    /// The endpoint, bound at first use; its accept loop serves introduced peers.
    pub(crate) async fn endpoint(self: &Arc<Self>) -> Result<Arc<PeerEndpoint>, String> {
        let made = self
            .endpoint
            .get_or_init(|| async {
                let endpoint =
                    PeerEndpoint::bind(self.config.ports).map_err(|e| format!("P2P socket: {e}"))?;
                if let Ok(addr) = endpoint.local_addr() {
                    info!(%addr, "P2P endpoint ready");
                }
                let (peering, serving) = (self.clone(), endpoint.clone());
                let token = self.token.clone();
                tokio::spawn(async move { token.run_until_cancelled(peering.serve_peers(serving)).await });
                Ok(endpoint)
            })
            .await;
        made.clone()
    }

    /// The STUN server to ask, resolved now; `None` when it cannot be.
    pub(crate) async fn stun_server(&self) -> Option<SocketAddr> {
        let target = match &self.config.remote_stun {
            Some(target) => target.clone(),
            None if self.server_host.contains(':') => format!("[{}]:{STUN_PORT}", self.server_host),
            None => format!("{}:{STUN_PORT}", self.server_host),
        };
        let found =
            tokio::net::lookup_host(target.as_str()).await.map(|mut addrs| addrs.find(SocketAddr::is_ipv4));
        match found {
            Ok(addr) => addr,
            Err(err) => {
                debug!(%target, %err, "STUN server not resolved");
                None
            }
        }
    }

    /// This client's offer: its candidates and certificate.
    pub(crate) async fn offer(self: &Arc<Self>) -> Result<(Arc<PeerEndpoint>, PeerOffer), String> {
        let endpoint = self.endpoint().await?;
        let candidates = endpoint.candidates(self.stun_server().await).await;
        let fingerprint = endpoint.fingerprint();
        Ok((endpoint, PeerOffer { candidates, fingerprint }))
    }

    /// Asks the server to introduce this client to the serving client of `name`.
    pub(crate) async fn introduce(&self, name: &str, offer: PeerOffer) -> Result<PeerReady, PeerRefusal> {
        let (reply, answer) = oneshot::channel();
        let command = Command::PeerConnect { name: name.to_owned(), offer, reply };
        let offline = || PeerRefusal::Other { message: "not connected to the server".into() };
        self.commands.send(command).map_err(|_| offline())?;
        answer.await.map_err(|_| offline())?
    }

    /// Tells the server what became of a peer connection.
    pub(crate) fn report(&self, service: u32, path: PeerPath) {
        let _ = self.commands.send(Command::Send(ClientMessage::PeerReport { service, path }));
    }

    /// The server introduces a peer to `service`: answer with this client's offer, let the
    /// peer's certificate in, and punch toward it.
    pub(crate) fn offered(self: &Arc<Self>, (attempt, service, from): (u64, u32, String), offer: PeerOffer) {
        let peering = self.clone();
        tokio::spawn(async move {
            let known = peering
                .session_now()
                .is_some_and(|s| s.routes.read().unwrap_or_else(|e| e.into_inner()).contains_key(&service));
            let answer = match peering.offer().await {
                _ if !known => Err(format!("service {service} is not open here")),
                Ok((endpoint, mine)) => {
                    endpoint.accept_peer(offer.fingerprint, PEER_WELCOME);
                    peering.grant(offer.fingerprint, service);
                    let how_long = peering.config.punch_deadline * 2;
                    endpoint.punch_for(offer.fingerprint, offer.candidates.clone(), how_long).await;
                    info!(%from, service, candidates = ?mine.candidates, "peer introduced; punching");
                    Ok(mine)
                }
                Err(err) => {
                    warn!(%err, "cannot offer a direct path; peers go through the server");
                    Err(err)
                }
            };
            let _ = peering.commands.send(Command::Send(ClientMessage::PeerAnswer { attempt, answer }));
        });
    }

    /// A browser at `visitor` offers a WebRTC connection to `service`: answer it with
    /// this client's candidates, or say why not.
    pub(crate) fn browser_offered(
        self: &Arc<Self>,
        (attempt, service, visitor): (u64, u32, SocketAddr),
        offer: String,
    ) {
        let peering = self.clone();
        tokio::spawn(async move {
            let answer = peering.answer_browser(attempt, service, offer).await;
            match &answer {
                Ok(_) => info!(%visitor, service, "browser offer answered"),
                Err(why) => warn!(%visitor, service, %why, "browser offer refused"),
            }
            let _ = peering.commands.send(Command::Send(ClientMessage::BrowserAnswer { attempt, answer }));
        });
    }

    async fn answer_browser(
        self: &Arc<Self>,
        attempt: u64,
        service: u32,
        offer: String,
    ) -> Result<String, String> {
        let route = self
            .session_now()
            .and_then(|s| s.routes.read().unwrap_or_else(|e| e.into_inner()).get(&service).cloned());
        let route = route.ok_or_else(|| format!("service {service} is not open here"))?;
        if !route.webrtc || route.udp {
            return Err("this service does not take browser peers (webrtc)".into());
        }
        let (endpoint, mine) = self.offer().await?;
        let browsers = self
            .browsers
            .get_or_init(|| async {
                // The server counts each browser peer as a visitor until it hears it left.
                let commands = self.commands.clone();
                let gone = move |attempt| {
                    let _ = commands.send(Command::Send(ClientMessage::BrowserClosed { attempt }));
                };
                Browsers::start(endpoint, self.local_timeout, self.token.clone(), gone)
            })
            .await
            .clone()
            .ok_or("the WebRTC engine could not start")?;
        browsers.answer(attempt, offer, route.local.clone(), mine.candidates).await
    }

    fn grant(&self, print: [u8; 32], service: u32) {
        self.grants.lock().unwrap_or_else(|e| e.into_inner()).entry(print).or_default().insert(service);
    }

    fn granted(&self, print: &[u8; 32], service: u32) -> bool {
        self.grants.lock().unwrap_or_else(|e| e.into_inner()).get(print).is_some_and(|s| s.contains(&service))
    }

    /// Serves every peer that connects to the endpoint.
    async fn serve_peers(self: Arc<Self>, endpoint: Arc<PeerEndpoint>) {
        while let Some(accepted) = endpoint.accept().await {
            match accepted {
                Ok((connection, print)) => {
                    info!(peer = %connection.remote_address(), "peer connected directly");
                    let peering = self.clone();
                    tokio::spawn(async move { peering.serve_peer(connection, print).await });
                }
                Err(err) => debug!(%err, "peer connection failed"),
            }
        }
    }

    /// Serves each stream of one peer connection: a connection to one of the services
    /// the peer was introduced to.
    async fn serve_peer(self: Arc<Self>, connection: quinn::Connection, print: [u8; 32]) {
        while let Ok(stream) = connection.accept_bi().await {
            let peering = self.clone();
            tokio::spawn(async move {
                if let Err(err) = peering.serve_stream(QuicStream::new(stream), print).await {
                    debug!(%err, "peer stream ended");
                }
            });
        }
        info!(peer = %connection.remote_address(), "peer connection closed");
    }

    async fn serve_stream(&self, mut stream: QuicStream, print: [u8; 32]) -> io::Result<()> {
        let mut header = [0u8; PEER_STREAM_HEADER];
        tokio::time::timeout(STREAM_HEADER_WAIT, stream.read_exact(&mut header))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no stream header"))??;
        let service = u32::from_be_bytes(header);
        let local = self.granted(&print, service).then(|| self.local_of(service)).flatten();
        let Some(local) = local else {
            let _ = stream.write_all(&[StreamStatus::LocalUnavailable as u8]).await;
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("peer not introduced to service {service}"),
            ));
        };
        let dialed = tokio::time::timeout(self.local_timeout, TcpStream::connect(&local)).await;
        let mut local = match dialed {
            Ok(Ok(local)) => local,
            Ok(Err(err)) => return refuse(stream, &local, err).await,
            Err(_) => return refuse(stream, &local, io::ErrorKind::TimedOut.into()).await,
        };
        let _ = local.set_nodelay(true);
        stream.write_all(&[StreamStatus::Ready as u8]).await?;
        let (up, down) =
            tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut local, COPY_BUF, COPY_BUF).await?;
        debug!(service, from_peer = up, to_peer = down, "peer stream done");
        Ok(())
    }

    /// The local address of the current session's service `service`.
    fn local_of(&self, service: u32) -> Option<String> {
        let session = self.session_now()?;
        let routes = session.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.get(&service).filter(|r| !r.udp).map(|r| r.local.clone())
    }
}

async fn refuse(mut stream: QuicStream, local: &str, err: io::Error) -> io::Result<()> {
    warn!(%local, %err, "local service unavailable; refusing the peer's connection");
    let _ = stream.write_all(&[StreamStatus::LocalUnavailable as u8]).await;
    let _ = stream.shutdown().await;
    Ok(())
}

/// Copies both ways between `local` and `link`, closing each side's writes after the
/// other's end; the bytes sent and received. Local bytes go out at once (a service may
/// wait for its client to speak first); link bytes are copied once `answered` has read
/// the link's answer, which gives back the read half and the bytes read past the answer
/// ([`already_answered`] for a link that answered before).
pub(crate) async fn join_streams<L, A, F>(local: TcpStream, link: L, answered: A) -> io::Result<(u64, u64)>
where
    L: tokio::io::AsyncRead + AsyncWrite + Unpin,
    A: FnOnce(ReadHalf<L>) -> F,
    F: std::future::Future<Output = io::Result<(ReadHalf<L>, BytesMut)>>,
{
    let (link_read, mut link_write) = tokio::io::split(link);
    let (mut local_read, mut local_write) = local.into_split();
    let up = async {
        let sent = copy(&mut local_read, &mut link_write).await?;
        let _ = link_write.shutdown().await;
        Ok::<u64, io::Error>(sent)
    };
    let down = async {
        let (mut link_read, leftover) = answered(link_read).await?;
        local_write.write_all(&leftover).await?;
        let got = copy(&mut link_read, &mut local_write).await?;
        let _ = local_write.shutdown().await;
        Ok::<u64, io::Error>(got + leftover.len() as u64)
    };
    tokio::try_join!(up, down)
}

/// For [`join_streams`]: a link whose answer was read before, with nothing past it.
pub(crate) fn already_answered<R>(read: R) -> std::future::Ready<io::Result<(R, BytesMut)>> {
    std::future::ready(Ok((read, BytesMut::new())))
}

/// Opens a stream to a peer for `service` and reads its answer.
pub(crate) async fn open_peer_stream(connection: &quinn::Connection, service: u32) -> io::Result<Stream> {
    let mut stream = QuicStream::new(connection.open_bi().await.map_err(io::Error::other)?);
    stream.write_all(&service.to_be_bytes()).await?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status).await?;
    match StreamStatus::from_byte(status[0]) {
        StreamStatus::Ready => Ok(Box::new(stream)),
        StreamStatus::LocalUnavailable => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "the peer could not reach its local service",
        )),
    }
}
