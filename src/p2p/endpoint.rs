//! One client's end of direct connections: a UDP socket (in `p2p-min-port..=p2p-max-port`)
//! shared by STUN and a QUIC endpoint that both dials peers and accepts them. Each side
//! shows a self-signed certificate made at start; the peer's is pinned by the fingerprint
//! the server relayed, both ways (mutual TLS), so only the client that was introduced
//! can connect, and nobody on the path can read or change what is carried.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rustls_pki_types::CertificateDer;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::socket::{Datagrams, DemuxSocket, StunInbox};
use crate::proto::{binding_request, parse_binding_success, PeerOffer};
use crate::transport::{fingerprint, quic_transport, Congestion, PinnedIdentity};

/// The ALPN protocol name of direct connections between clients.
const ALPN: &[u8] = b"ferry-p2p";

/// Streams a peer may open at once: connections it forwards at once.
const MAX_PEER_STREAMS: u32 = 1024;

/// A direct connection silent this long is dead (keep-alives go out at a third of it):
/// a peer that vanished is noticed within it.
const DEAD_PEER: Duration = Duration::from_secs(9);

/// The round trip assumed before one is measured.
const INITIAL_RTT: Duration = Duration::from_millis(100);

/// How often, and how long, punch packets go out to a peer's candidates.
const PUNCH_EVERY: Duration = Duration::from_millis(100);

/// Tries of a STUN request, and the wait for each answer.
const STUN_TRIES: u32 = 3;
const STUN_WAIT: Duration = Duration::from_millis(400);

/// The name a peer's certificate is made for (not checked: the fingerprint is).
const PEER_NAME: &str = "ferry-peer";

/// The socket, QUIC endpoint and certificate of one client's direct connections.
pub(crate) struct PeerEndpoint {
    socket: Arc<DemuxSocket>,
    endpoint: quinn::Endpoint,
    identity: PinnedIdentity,
    stun: tokio::sync::Mutex<StunInbox>,
    /// Certificates of peers let in, until when.
    accepted: Arc<Mutex<HashMap<[u8; 32], Instant>>>,
    /// Punching toward introduced peers, by certificate, until each connects.
    punching: Mutex<HashMap<[u8; 32], CancellationToken>>,
    /// What browsers send to this socket, for the WebRTC engine (taken once).
    browsers: Mutex<Option<Datagrams>>,
}

impl PeerEndpoint {
    /// Binds a UDP socket in `ports` (any port when `None`) and starts the endpoint.
    pub(crate) fn bind(ports: Option<(u16, u16)>) -> io::Result<Arc<Self>> {
        let socket = bind_in(ports)?;
        let (socket, stun, browsers) = DemuxSocket::new(socket)?;
        let identity = PinnedIdentity::generate(PEER_NAME)?;
        let accepted: Arc<Mutex<HashMap<[u8; 32], Instant>>> = Arc::default();
        let admitted = accepted.clone();
        let accepts = Arc::new(move |print: &[u8; 32]| {
            let admitted = admitted.lock().unwrap_or_else(|e| e.into_inner());
            admitted.get(print).is_some_and(|until| *until > Instant::now())
        });
        let server = identity.server_config(accepts, ALPN, peer_transport())?;
        let mut config = quinn::EndpointConfig::default();
        // QUIC's fixed bit stays set, so STUN can be told apart by its first bits.
        config.grease_quic_bit(false);
        let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
        let endpoint =
            quinn::Endpoint::new_with_abstract_socket(config, Some(server), socket.clone(), runtime)?;
        Ok(Arc::new(PeerEndpoint {
            socket,
            endpoint,
            identity,
            stun: tokio::sync::Mutex::new(stun),
            accepted,
            punching: Mutex::default(),
            browsers: Mutex::new(Some(browsers)),
        }))
    }

    /// What browsers send to this socket; `None` after the first call.
    pub(crate) fn take_browser_inbox(&self) -> Option<Datagrams> {
        self.browsers.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Sends one datagram from this socket (WebRTC's).
    pub(crate) async fn send_to(&self, destination: SocketAddr, contents: &[u8]) -> io::Result<()> {
        self.socket.send_to(destination, contents).await
    }

    /// SHA-256 of this client's certificate.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        self.identity.fingerprint()
    }

    /// The local address of the socket.
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Lets the peer with certificate `print` connect for `how_long`.
    pub(crate) fn accept_peer(&self, print: [u8; 32], how_long: Duration) {
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        accepted.retain(|_, until| *until > now);
        accepted.insert(print, now + how_long);
    }

    /// The next peer connection, once its handshake is done; `None` when the endpoint closed.
    pub(crate) async fn accept(&self) -> Option<io::Result<(quinn::Connection, [u8; 32])>> {
        let incoming = self.endpoint.accept().await?;
        Some(
            async {
                let connection =
                    incoming.await.map_err(|e| io::Error::other(format!("peer handshake: {e}")))?;
                let print = peer_fingerprint(&connection)
                    .ok_or_else(|| io::Error::other("peer showed no certificate"))?;
                // It got through: no more punching toward it.
                if let Some(stop) = self.punching.lock().unwrap_or_else(|e| e.into_inner()).remove(&print) {
                    stop.cancel();
                }
                Ok((connection, print))
            }
            .await,
        )
    }

    /// Where peers may reach this client: its own address toward `stun` (host), then the
    /// address `stun` saw (server-reflexive) when it answers.
    pub(crate) async fn candidates(&self, stun: Option<SocketAddr>) -> Vec<SocketAddr> {
        let port = self.local_addr().map(|a| a.port()).unwrap_or_default();
        let mut candidates = Vec::new();
        let toward = stun.map(|s| s.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        if let Some(ip) = local_ip_toward(toward) {
            candidates.push(SocketAddr::new(ip, port));
        }
        if let Some(stun) = stun {
            match self.reflexive(stun).await {
                Ok(seen) if !candidates.contains(&seen) => candidates.push(seen),
                Ok(_) => {}
                Err(err) => debug!(%stun, %err, "no server-reflexive address"),
            }
        }
        candidates
    }

    /// This socket's address as the STUN server `stun` sees it.
    pub(crate) async fn reflexive(&self, stun: SocketAddr) -> io::Result<SocketAddr> {
        let mut answers = self.stun.lock().await;
        for _ in 0..STUN_TRIES {
            let transaction: [u8; 12] = rand::random();
            self.socket.expect_answer(transaction, true);
            self.socket.send_to(stun, &binding_request(transaction)).await?;
            let deadline = Instant::now() + STUN_WAIT;
            while let Ok(Some((from, message))) = tokio::time::timeout_at(deadline, answers.recv()).await {
                if from == stun {
                    if let Some(seen) = parse_binding_success(&message, transaction) {
                        self.socket.expect_answer(transaction, false);
                        return Ok(seen);
                    }
                }
            }
            self.socket.expect_answer(transaction, false);
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer from the STUN server {stun}")))
    }

    /// Sends punch packets (STUN Binding requests, which the peer's socket drops) to
    /// `targets`: the first round before returning, then every 100 ms for `how_long` or
    /// until the token returned is cancelled, so this side's NAT lets the peer's packets in.
    pub(crate) async fn punch(
        self: &Arc<Self>,
        targets: Vec<SocketAddr>,
        how_long: Duration,
    ) -> CancellationToken {
        self.punch_round(&targets).await;
        let (this, stop) = (self.clone(), CancellationToken::new());
        let stopped = stop.clone();
        tokio::spawn(stopped.run_until_cancelled_owned(async move {
            let until = Instant::now() + how_long;
            while Instant::now() < until {
                tokio::time::sleep(PUNCH_EVERY).await;
                this.punch_round(&targets).await;
            }
        }));
        stop
    }

    /// [`punch`](Self::punch) toward the peer with certificate `print`, until it connects.
    pub(crate) async fn punch_for(
        self: &Arc<Self>,
        print: [u8; 32],
        targets: Vec<SocketAddr>,
        how_long: Duration,
    ) {
        let stop = self.punch(targets, how_long).await;
        let mut punching = self.punching.lock().unwrap_or_else(|e| e.into_inner());
        punching.retain(|_, token| !token.is_cancelled());
        if let Some(earlier) = punching.insert(print, stop) {
            earlier.cancel();
        }
    }

    async fn punch_round(&self, targets: &[SocketAddr]) {
        for target in targets {
            let _ = self.socket.send_to(*target, &binding_request(rand::random())).await;
        }
    }

    /// Connects to the peer of `offer` at the first of its candidates that answers within
    /// `deadline`, punching toward all of them meanwhile.
    pub(crate) async fn connect(
        self: &Arc<Self>,
        offer: &PeerOffer,
        deadline: Duration,
    ) -> io::Result<quinn::Connection> {
        let config = self.identity.client_config(offer.fingerprint, ALPN, peer_transport())?;
        let _stop_punching = self.punch(offer.candidates.clone(), deadline).await.drop_guard();
        let mut attempts = FuturesUnordered::new();
        for candidate in &offer.candidates {
            match self.endpoint.connect_with(config.clone(), *candidate, PEER_NAME) {
                Ok(connecting) => attempts.push(async move { (candidate, connecting.await) }),
                Err(err) => debug!(%candidate, %err, "peer candidate not tried"),
            }
        }
        let first = async {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the peer offered no candidate");
            while let Some((candidate, result)) = attempts.next().await {
                match result {
                    Ok(connection) => return Ok(connection),
                    Err(err) => {
                        debug!(%candidate, %err, "peer candidate failed");
                        last = io::Error::other(format!("{candidate}: {err}"));
                    }
                }
            }
            Err(last)
        };
        match tokio::time::timeout(deadline, first).await {
            Ok(result) => result,
            Err(_) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, format!("no direct path within {deadline:?}")))
            }
        }
    }
}

/// The QUIC settings of direct connections: a first round trip guessed at 100 ms rather
/// than quinn's 333 ms, so an Initial lost to a NAT not yet punched open is sent again
/// after ~0.3 s instead of ~1 s (it happened in one run of four in the NAT lab).
fn peer_transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quic_transport(Congestion::Bbr, MAX_PEER_STREAMS, DEAD_PEER);
    transport.initial_rtt(INITIAL_RTT);
    Arc::new(transport)
}

/// SHA-256 of the certificate the peer of `connection` showed.
fn peer_fingerprint(connection: &quinn::Connection) -> Option<[u8; 32]> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|cert| fingerprint(cert))
}

/// A UDP socket on a port of `ports` (tried from a random one on), or any port.
fn bind_in(ports: Option<(u16, u16)>) -> io::Result<UdpSocket> {
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let Some((low, high)) = ports else { return UdpSocket::bind(SocketAddr::new(any, 0)) };
    let span = u32::from(high.saturating_sub(low)) + 1;
    let start = rand::random::<u32>() % span;
    let mut last = io::Error::new(io::ErrorKind::AddrInUse, format!("no free UDP port in {low}-{high}"));
    for step in 0..span {
        let port = low + ((start + step) % span) as u16;
        match UdpSocket::bind(SocketAddr::new(any, port)) {
            Ok(socket) => return Ok(socket),
            Err(err) => last = err,
        }
    }
    Err(last)
}

/// The local address the system would send from toward `ip` (no packet is sent).
fn local_ip_toward(ip: IpAddr) -> Option<IpAddr> {
    let probe = UdpSocket::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)).ok()?;
    probe.connect(SocketAddr::new(ip, 9)).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}
