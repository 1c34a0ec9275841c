//! One client's control connection: login, tunnel registration, heartbeats.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::api::views;
use super::endpoints::{Member, RELEASE_WAIT};
use super::handshakes::Handshake;
use super::hooks::{ClientInfo, DisconnectReason};
use super::pool::DataPool;
use super::tunnel::Tunnel;
use super::users::{Account, Counted, Grant, Slot, Users};
use super::{http, login, nodes, peers, tcp, udp, webrtc, ServerShared};
use crate::auth::{ReplayGuard, SessionKey, Verifier};
use crate::config::{PortRange, ServiceKind};
use crate::proto::{
    check_service, Answer, ClientMessage, CloseReason, ControlChannel, LoginRefusal, ProtocolError,
    ProxyProtocol, Query, RegisterError, ServerMessage, ServiceControl, ServiceSpec,
};
use crate::seal::{FrameCipher, Side};
use crate::transport::Stream;

/// Most tunnels one session may hold.
const MAX_SERVICES_PER_SESSION: usize = 1024;

/// What the rest of the server knows about a live session.
pub(crate) struct SessionShared {
    pub(crate) id: u64,
    pub(crate) user: String,
    pub(crate) instance: String,
    /// The user's live account: rules, counters, speed buckets.
    pub(crate) account: Arc<Account>,
    /// What the client proved it holds and how it was accepted, for reloads.
    credential: Verifier,
    grant: Grant,
    /// This session's place in the user's `sessions` limit.
    slot: Mutex<Option<Slot>>,
    /// Its place in the limit counted cluster-wide: the etcd key of its slot.
    pub(crate) cluster_slot: Mutex<Option<String>>,
    /// The client's address.
    pub(crate) peer: SocketAddr,
    /// The client's tags (`--tag`).
    pub(crate) tags: Vec<String>,
    /// When the client logged in.
    pub(crate) since: SystemTime,
    /// Round trips asked for by the API, by ping number.
    pings: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    pub(crate) key: SessionKey,
    replay: Mutex<ReplayGuard>,
    /// Visitors of `encrypt` services numbered so far (each number gives its keys).
    visits: AtomicU64,
    pub(crate) pool: DataPool,
    /// Messages for the client from tunnel tasks (e.g. "open more data connections").
    pub(crate) outbox: mpsc::Sender<ServerMessage>,
    /// Cancelled when the session starts closing; parent of every tunnel token.
    pub(crate) closing: CancellationToken,
    /// Cancelled once every tunnel and visitor of the session is gone.
    pub(crate) released: CancellationToken,
    pub(crate) tasks: TaskTracker,
    /// Open tunnels by service number; cancelling one closes the tunnel and its visitors.
    pub(crate) tunnels: Mutex<HashMap<u32, Arc<Tunnel>>>,
    /// UDP flows over the session's QUIC connection, by number.
    pub(crate) flows: udp::Flows,
    /// P2P services this client asked to reach, and whether it reaches each directly.
    pub(crate) grants: peers::Grants,
    /// Browser peers the client answered, each counted as a visitor until it leaves.
    pub(crate) browser_peers: webrtc::BrowserPeers,
}

impl SessionShared {
    /// Checks a data connection's hello: right key, sequence number not used before.
    pub(crate) fn admit_data(&self, seq: u64, mac: &[u8; 32]) -> bool {
        self.key.verify_data_mac(self.id, seq, mac)
            && self.replay.lock().unwrap_or_else(|e| e.into_inner()).accept(seq)
    }

    /// Starts tracking a tunnel. Its token closes it and its visitors; when the server
    /// closes it (a limit reached), the client is told why.
    pub(crate) fn open_tunnel(
        self: &Arc<Self>,
        shared: &Arc<ServerShared>,
        (service, name, kind): (u32, String, ServiceKind),
        control: ServiceControl,
    ) -> Arc<Tunnel> {
        let tunnel =
            Tunnel::new((service, name, kind), self.closing.child_token(), control, self.account.clone());
        self.tunnels().insert(service, tunnel.clone());
        let (watched, outbox) = (tunnel.clone(), self.outbox.clone());
        let (shared, session) = (shared.clone(), self.clone());
        self.tasks.spawn(async move {
            let deadline = async {
                match watched.max_serve_time() {
                    Some(limit) => tokio::time::sleep(limit).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = watched.token.cancelled() => {}
                _ = deadline => {
                    let millis = watched.max_serve_time().unwrap_or_default().as_millis() as u64;
                    watched.close(CloseReason::MaxServeTime { millis });
                }
            }
            if watched.endpoint.get().is_some() && shared.has_hooks() {
                shared.hooks().tunnel_closed(&views::service_info(&session, &watched));
            }
            if let Some(reason) = watched.reason() {
                info!(service = watched.service, %reason, "tunnel closed by its limits");
                let _ = outbox
                    .send(ServerMessage::ServiceClosed { service: watched.service, reason: reason.clone() })
                    .await;
            }
        });
        tunnel
    }

    /// What hooks are told about this client.
    pub(crate) fn client_info(&self) -> ClientInfo {
        ClientInfo {
            cid: self.id,
            user: self.user.clone(),
            tags: self.tags.clone(),
            address: self.peer,
            since: self.since,
        }
    }

    /// Stops tracking a tunnel and closes it.
    pub(crate) fn forget_tunnel(&self, service: u32) {
        if let Some(tunnel) = self.tunnels().remove(&service) {
            tunnel.token.cancel();
        }
    }

    /// Closes one tunnel at the client's request; false if it does not exist.
    pub(crate) fn close_tunnel(&self, service: u32) -> Option<Arc<Tunnel>> {
        let tunnel = self.tunnels().get(&service).cloned()?;
        tunnel.token.cancel();
        Some(tunnel)
    }

    /// Tells the client once `tunnel`, closed at its request, has given its endpoint back
    /// (or after [`RELEASE_WAIT`], should that take longer), so it may register it again.
    fn confirm_closed(&self, tunnel: Arc<Tunnel>) {
        let outbox = self.outbox.clone();
        self.tasks.spawn(async move {
            let _ = tokio::time::timeout(RELEASE_WAIT, tunnel.gone.cancelled()).await;
            let closed =
                ServerMessage::ServiceClosed { service: tunnel.service, reason: CloseReason::Cancelled };
            let _ = outbox.send(closed).await;
        });
    }

    pub(crate) fn tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Tunnel>>> {
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the user may keep this session under the current directory (after a reload).
    pub(crate) fn still_allowed(&self, users: &Users) -> bool {
        users.still_allowed(&self.user, &self.credential, self.grant)
    }

    /// Measures a round trip to the client over the control connection.
    pub(crate) async fn ping(&self, timeout: Duration) -> Option<Duration> {
        // API pings use the upper half of the sequence space; heartbeats count from 1.
        let seq = (1 << 63) | rand::random::<u64>() >> 1;
        let (done, answered) = oneshot::channel();
        self.pings.lock().unwrap_or_else(|e| e.into_inner()).insert(seq, done);
        let started = Instant::now();
        let sent = self.outbox.send(ServerMessage::Ping { seq }).await.is_ok();
        let answered = sent && matches!(tokio::time::timeout(timeout, answered).await, Ok(Ok(())));
        self.pings.lock().unwrap_or_else(|e| e.into_inner()).remove(&seq);
        answered.then(|| started.elapsed())
    }

    fn pong(&self, seq: u64) {
        if let Some(done) = self.pings.lock().unwrap_or_else(|e| e.into_inner()).remove(&seq) {
            let _ = done.send(());
        }
    }

    /// A number for a visitor of an `encrypt` service, never used before in this session.
    pub(crate) fn next_visit(&self) -> u64 {
        self.visits.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the client for more data connections, without blocking.
    pub(crate) fn request_data(&self) {
        let _ = self.outbox.try_send(ServerMessage::NeedData { count: 1 });
    }
}

/// Serves a control connection from its first message to its end.
pub(crate) async fn serve_control(
    shared: Arc<ServerShared>,
    mut chan: ControlChannel<Stream>,
    peer: SocketAddr,
    (tls, pool): (bool, DataPool),
    handshake: Handshake,
) {
    let Some(accepted) = login::login(&shared, &mut chan, peer, tls).await else {
        return;
    };
    drop(handshake);
    let (session, inbox) = SessionShared::open(&shared, accepted, peer, pool);
    let span = tracing::info_span!("session", id = session.id, user = %session.user, %peer);
    async move {
        if !admit(&shared, &session, &mut chan).await {
            shared.registry.remove_session(session.id);
            return;
        }
        let Some(interval) = welcome(&shared, &session, &mut chan).await else {
            return close_session(&shared, &session).await;
        };
        let client = session.client_info();
        info!("client connected");
        shared.hooks().client_connected(&client);
        let reason = Control { shared: &shared, session: &session, chan, inbox }.run(interval).await;
        info!(%reason, "client disconnected");
        close_session(&shared, &session).await;
        shared.hooks().client_disconnected(&client, &reason);
    }
    .instrument(span)
    .await
}

impl SessionShared {
    /// The session of a login the server accepted, and the inbox of its control loop.
    fn open(
        shared: &ServerShared,
        accepted: login::Accepted,
        peer: SocketAddr,
        pool: DataPool,
    ) -> (Arc<Self>, mpsc::Receiver<ServerMessage>) {
        let (outbox, inbox) = mpsc::channel(64);
        let account = shared.users.account(&accepted.id, accepted.rules, accepted.grant);
        let session = Arc::new(SessionShared {
            id: shared.registry.next_session_id(),
            user: accepted.id,
            instance: accepted.instance,
            account,
            credential: accepted.credential,
            grant: accepted.grant,
            slot: Mutex::new(None),
            cluster_slot: Mutex::new(None),
            peer,
            tags: accepted.tags,
            since: SystemTime::now(),
            pings: Mutex::default(),
            key: accepted.session_key,
            replay: Mutex::default(),
            visits: AtomicU64::new(0),
            pool,
            outbox,
            closing: shared.shutdown.child_token(),
            released: CancellationToken::new(),
            tasks: TaskTracker::new(),
            tunnels: Mutex::default(),
            flows: udp::Flows::default(),
            grants: peers::Grants::default(),
            browser_peers: webrtc::BrowserPeers::default(),
        });
        if let Some(connection) = session.pool.quic().cloned() {
            session.tasks.spawn(udp::deliver_datagrams(session.clone(), connection));
        }
        (session, inbox)
    }
}

/// Registers the session, replacing a stale one of the same client, and checks the user's
/// sessions limit and the program's hook; false (the client told why) when refused.
async fn admit(
    shared: &ServerShared,
    session: &Arc<SessionShared>,
    chan: &mut ControlChannel<Stream>,
) -> bool {
    if let Some(stale) = shared.registry.insert_session(session.clone()) {
        info!(stale = stale.id, "replacing a stale session of the same client");
        stale.closing.cancel();
        stale.released.cancelled().await;
    }
    // Counted once a stale session of the same client has given its place back.
    let refusal = match session.account.admit(Counted::Sessions) {
        Ok(slot) => {
            *session.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
            if let Err(limit) = nodes::take_session_slot(shared, session).await {
                warn!(limit, "login refused: the user's sessions limit is reached in the cluster");
                let refusal = LoginRefusal::TooManySessions { id: session.user.clone(), limit };
                let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
                return false;
            }
            match shared.hooks().check_login(&session.client_info()) {
                Ok(()) => return true,
                Err(why) => {
                    warn!(%why, "login refused by the program's hook");
                    LoginRefusal::AuthFailed { id: session.user.clone() }
                }
            }
        }
        Err(limit) => {
            warn!(limit, "login refused: the user's sessions limit is reached");
            LoginRefusal::TooManySessions { id: session.user.clone(), limit }
        }
    };
    let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
    false
}

/// Sends the welcome, which proves the server's key, and seals the channel from then on;
/// the heartbeat interval, or `None` if the client is gone.
async fn welcome(
    shared: &ServerShared,
    session: &SessionShared,
    chan: &mut ControlChannel<Stream>,
) -> Option<Duration> {
    let interval = heartbeat_interval(shared.config.heartbeat_timeout);
    let heartbeat_interval_ms = interval.as_millis() as u64;
    let confirm = session.key.welcome_confirm(session.id, heartbeat_interval_ms);
    let welcome = ServerMessage::Welcome { session: session.id, heartbeat_interval_ms, confirm };
    chan.send(&welcome).await.ok()?;
    chan.encrypt(FrameCipher::new(&session.key, Side::Server));
    Some(interval)
}

fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 3).max(Duration::from_millis(10))
}

/// Stops every tunnel and visitor of the session, then forgets it.
async fn close_session(shared: &ServerShared, session: &SessionShared) {
    if let Some(key) = session.cluster_slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
        nodes::release_session_slot(shared, key);
    }
    session.closing.cancel();
    session.grants.clear();
    session.pool.clear();
    session.tasks.close();
    session.tasks.wait().await;
    shared.registry.remove_session(session.id);
    session.released.cancel();
}

/// The control loop of one session.
struct Control<'a> {
    shared: &'a Arc<ServerShared>,
    session: &'a Arc<SessionShared>,
    chan: ControlChannel<Stream>,
    inbox: mpsc::Receiver<ServerMessage>,
}

impl Control<'_> {
    /// Runs until the client leaves, goes silent, or the server shuts down; returns why.
    async fn run(mut self, interval: Duration) -> DisconnectReason {
        let timeout = self.shared.config.heartbeat_timeout;
        let mut ticker = tokio::time::interval(interval);
        let mut last_heard = Instant::now();
        let mut ping_seq = 0u64;
        let mut services = 0usize;
        loop {
            let result = tokio::select! {
                _ = self.session.closing.cancelled() => return DisconnectReason::ClosedByServer,
                message = self.chan.recv::<ClientMessage>() => match message {
                    Ok(message) => {
                        last_heard = Instant::now();
                        self.handle(message, &mut services).await
                    }
                    Err(ProtocolError::Closed) => return DisconnectReason::ClosedByClient,
                    Err(err) => return DisconnectReason::Failed(err.to_string()),
                },
                Some(message) = self.inbox.recv() => self.chan.send(&message).await,
                // Silence ends the session when it reaches the timeout, not a tick later.
                _ = tokio::time::sleep_until(last_heard + timeout) => return DisconnectReason::NoHeartbeat(timeout),
                _ = ticker.tick() => {
                    ping_seq += 1;
                    self.session.pool.trim(self.shared.config.pool_idle_timeout);
                    self.chan.send(&ServerMessage::Ping { seq: ping_seq }).await
                }
            };
            if let Err(err) = result {
                return DisconnectReason::Failed(err.to_string());
            }
        }
    }

    async fn handle(&mut self, message: ClientMessage, services: &mut usize) -> Result<(), ProtocolError> {
        match message {
            ClientMessage::Register { request, spec, control } => {
                let reply = if *services >= MAX_SERVICES_PER_SESSION {
                    ServerMessage::RegisterFailed {
                        request,
                        error: RegisterError::Other {
                            message: format!("at most {MAX_SERVICES_PER_SESSION} tunnels per client"),
                        },
                    }
                } else {
                    self.register(request, spec, control).await
                };
                if matches!(reply, ServerMessage::Registered { .. }) {
                    *services += 1;
                }
                self.chan.send(&reply).await
            }
            ClientMessage::Unregister { service } => {
                if let Some(tunnel) = self.session.close_tunnel(service) {
                    *services = services.saturating_sub(1);
                    self.session.confirm_closed(tunnel);
                }
                Ok(())
            }
            ClientMessage::Query { request, query } => {
                let answer = answer(self.shared, self.session, query).await;
                self.chan.send(&ServerMessage::Answer { request, answer }).await
            }
            ClientMessage::Ping { seq } => self.chan.send(&ServerMessage::Pong { seq }).await,
            ClientMessage::Pong { seq } => {
                self.session.pong(seq);
                Ok(())
            }
            ClientMessage::PeerConnect { request, name, offer } => {
                match peers::connect(self.shared, self.session, (request, name), offer) {
                    Some(refused) => self.chan.send(&refused).await,
                    None => Ok(()),
                }
            }
            ClientMessage::PeerAnswer { attempt, answer } => {
                peers::answered(self.shared, self.session, attempt, answer);
                Ok(())
            }
            ClientMessage::BrowserAnswer { attempt, answer } => {
                webrtc::answered(self.shared, self.session, attempt, answer);
                Ok(())
            }
            ClientMessage::BrowserClosed { attempt } => {
                self.session.browser_peers.left(attempt);
                Ok(())
            }
            ClientMessage::PeerReport { service, path } => {
                peers::reported(self.shared, self.session, service, path);
                Ok(())
            }
            ClientMessage::Hello { .. } | ClientMessage::Login { .. } => {
                Err(ProtocolError::Malformed("login sent twice".into()))
            }
        }
    }

    async fn register(&mut self, request: u64, spec: ServiceSpec, control: ServiceControl) -> ServerMessage {
        let name = spec.name().to_owned();
        let kind: ServiceKind = match &spec {
            ServiceSpec::Tcp { .. } => ServiceKind::Tcp,
            ServiceSpec::Http { .. } => ServiceKind::Http,
            ServiceSpec::Https { .. } => ServiceKind::Https,
            ServiceSpec::Udp { .. } => ServiceKind::Udp,
        };
        if let Err(error) = check_service(&name, control.message.as_deref()) {
            warn!(?name, %error, "tunnel refused");
            return ServerMessage::RegisterFailed { request, error };
        }
        let peer = control.p2p.as_ref().map(|policy| policy.only);
        if peer.is_some() && kind == ServiceKind::Udp {
            let error = RegisterError::Other {
                message: "UDP services cannot be P2P (p2p carries TCP streams)".into(),
            };
            return ServerMessage::RegisterFailed { request, error };
        }
        let service = self.shared.registry.next_service_id();
        let tunnel = self.session.open_tunnel(self.shared, (service, name.clone(), kind), control);
        let peer_prefix = match &spec {
            ServiceSpec::Tcp { prefix, .. }
            | ServiceSpec::Http { prefix, .. }
            | ServiceSpec::Https { prefix, .. } => prefix.clone(),
            ServiceSpec::Udp { .. } => None,
        };
        let opened = match spec {
            // A peers-only service has no public endpoint: its P2P name is all it holds.
            _ if peer == Some(true) => Ok((0, None)),
            ServiceSpec::Tcp { port, random, proxy_protocol, .. } => {
                self.open_tcp(tunnel.clone(), port, random, proxy_protocol).await
            }
            ServiceSpec::Http { prefix, local_host, .. } => {
                http::open_host(self.shared, self.session, tunnel.clone(), prefix, local_host, false).await
            }
            ServiceSpec::Https { prefix, .. } => {
                http::open_host(self.shared, self.session, tunnel.clone(), prefix, None, true).await
            }
            ServiceSpec::Udp { port, random, .. } => {
                let member = Member::new(self.session.clone(), tunnel.clone());
                udp::open_udp(self.shared, member, port, random).await.map(|port| (port, None))
            }
        };
        let opened = match (opened, peer) {
            (Ok((port, host)), Some(alone)) => {
                let named =
                    peers::open_peer_name(self.shared, self.session, &tunnel, (peer_prefix, alone)).await;
                // A TCP service's P2P name is shown as its host.
                named.map(|name| (port, host.or(Some(name))))
            }
            (opened, _) => opened,
        };
        if opened.is_err() {
            self.session.forget_tunnel(service);
        }
        match opened {
            Ok((port, host)) => {
                let tunnel = self.session.tunnels().get(&service).cloned();
                if let Some(tunnel) = tunnel {
                    let _ = tunnel.endpoint.set((port, host.clone()));
                    let address = match (&host, &self.shared.config.domain) {
                        (Some(host), _) => host.clone(),
                        (None, Some(domain)) => format!("{domain}:{port}"),
                        (None, None) => SocketAddr::new(self.shared.config.public_ip(), port).to_string(),
                    };
                    let _ = tunnel.address.set(address);
                    if self.shared.has_hooks() {
                        self.shared.hooks().tunnel_opened(&views::service_info(self.session, &tunnel));
                    }
                }
                info!(service, port, host, ?name, "tunnel opened");
                // This server compresses whatever a client asks (zstd is all there is).
                let compress = self.session.tunnels().get(&service).and_then(|t| t.control().compress);
                ServerMessage::Registered { request, service, port, host, compress }
            }
            Err(error) => {
                warn!(?name, %error, "tunnel refused");
                ServerMessage::RegisterFailed { request, error }
            }
        }
    }

    async fn open_tcp(
        &mut self,
        tunnel: Arc<Tunnel>,
        port: Option<u16>,
        random: bool,
        proxy_protocol: Option<ProxyProtocol>,
    ) -> Result<(u16, Option<String>), RegisterError> {
        let member = Member { proxy_protocol, ..Member::new(self.session.clone(), tunnel) };
        Ok((tcp::open_tcp(self.shared, member, port, random).await?, None))
    }
}

/// Discovery: the user's own open services, and free ports of the user's ranges.
async fn answer(shared: &ServerShared, session: &SessionShared, query: Query) -> Answer {
    match query {
        Query::Services => {
            let mut sessions = shared.registry.sessions();
            sessions.retain(|s| s.user == session.user && !s.closing.is_cancelled());
            sessions.sort_by_key(|s| s.id);
            Answer::Services { services: sessions.iter().flat_map(|s| views::open_services(s)).collect() }
        }
        Query::FreePorts { limit } => {
            let ranges: Vec<PortRange> = session.account.rules().tcp.iter().map(|a| a.range).collect();
            let limit = usize::try_from(limit).unwrap_or(usize::MAX).min(views::MAX_FREE_PORTS);
            Answer::FreePorts { ports: views::free_ports_in(shared, &ranges, limit).await }
        }
    }
}
