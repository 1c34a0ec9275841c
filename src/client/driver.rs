//! The task that owns the control connection: logs in again after a failure,
//! re-registers every tunnel, answers heartbeats and follows the server's
//! messages.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::backoff::Backoff;
use super::login::{login_first_reachable, LoggedIn};
use super::peering::{Peering, SessionLinks};
use super::pool::{DataPool, Route, Routes};
use super::remotes::Remotes;
use super::{public_address, ClientState, DriverLinks, Endpoint, RegisterReply};
use crate::config::{ClientConfig, ServiceConfig, ServiceKind};
use crate::error::ClientError;
use crate::proto::{
    Answer, ClientMessage, CloseReason, ControlChannel, PeerOffer, PeerReady, PeerRefusal, ProtocolError,
    Query, RegisterError, ServerMessage, ServiceControl, ServiceSpec,
};
use crate::transport::Stream;

/// How long a cancelled tunnel waits for the server to confirm it gave the endpoint back
/// (the server itself waits at most 5 s for that).
const CONFIRM_WAIT: Duration = Duration::from_secs(10);

/// Requests from the [`Client`](super::Client) handle.
pub(crate) enum Command {
    Add {
        key: u64,
        wanted: Box<Wanted>,
    },
    Remove {
        key: u64,
    },
    Ask {
        query: Query,
        reply: oneshot::Sender<Result<Answer, ClientError>>,
    },
    /// Asks the server to introduce this client to the serving client of a P2P name.
    PeerConnect {
        name: String,
        offer: PeerOffer,
        reply: oneshot::Sender<Result<PeerReady, PeerRefusal>>,
    },
    /// Sends a message as it is (P2P answers and reports); dropped while offline.
    Send(ClientMessage),
}

/// A tunnel the client wants, kept across reconnects.
pub(crate) struct Wanted {
    config: ServiceConfig,
    /// The port the server gave last time; asked for again after a reconnect.
    port: Option<u16>,
    /// The server's number for it in the current session.
    server_id: Option<u32>,
    /// Pending answer to `add_service`, until the first registration.
    reply: Option<RegisterReply>,
    closed: watch::Sender<Option<CloseReason>>,
    /// When the server first opened it: `max-serve-time` runs from here, across reconnects.
    opened: Option<Instant>,
    /// Visitors served so far, across reconnects (for `max-serve-count`).
    served: Arc<AtomicU64>,
    /// Where visitors reach it while it is open; `None` while it is not.
    public: watch::Sender<Option<String>>,
    /// A refusal that may pass is asked again even for the first registration.
    keep_trying: bool,
    /// Delays between asking again after refusals that may pass, until it opens.
    backoff: Option<Backoff>,
    /// When to ask again after a refusal that may pass.
    retry_at: Option<Instant>,
}

/// How the [`Client`](super::Client) hears about one tunnel.
pub(crate) struct Listeners {
    pub(crate) reply: RegisterReply,
    pub(crate) closed: watch::Sender<Option<CloseReason>>,
    pub(crate) public: watch::Sender<Option<String>>,
}

impl Wanted {
    pub(crate) fn new(config: ServiceConfig, listeners: Listeners, keep_trying: bool) -> Self {
        let Listeners { reply, closed, public } = listeners;
        Wanted {
            config,
            port: None,
            server_id: None,
            reply: Some(reply),
            closed,
            opened: None,
            served: Arc::default(),
            public,
            keep_trying,
            backoff: None,
            retry_at: None,
        }
    }

    /// Whether a refusal ends the tunnel: a lasting one always, any one for a first
    /// registration whose caller wants to hear it (`add_service`).
    fn gives_up_on(&self, error: &RegisterError) -> bool {
        error.is_lasting() || (self.reply.is_some() && !self.keep_trying)
    }

    /// Schedules asking again with backoff; returns the delay.
    fn ask_again_later(&mut self, config: &ClientConfig) -> Duration {
        let backoff = self
            .backoff
            .get_or_insert_with(|| Backoff::new(config.reconnect_delay, config.max_reconnect_delay));
        let delay = backoff.next_delay();
        self.retry_at = Some(Instant::now() + delay);
        delay
    }

    /// The service's limits less what it used before a reconnect; the reason it is over
    /// when nothing is left.
    fn remaining_control(&self) -> Result<ServiceControl, CloseReason> {
        let mut control = self.config.control();
        let Some(opened) = self.opened else { return Ok(control) };
        if let Some(millis) = control.max_serve_time_ms {
            let used = u64::try_from(opened.elapsed().as_millis()).unwrap_or(u64::MAX);
            let left = millis.checked_sub(used).filter(|&left| left > 0);
            control.max_serve_time_ms = Some(left.ok_or(CloseReason::MaxServeTime { millis })?);
        }
        if let Some(count) = control.max_serve_count {
            let left = count.checked_sub(self.served.load(Ordering::Relaxed)).filter(|&left| left > 0);
            control.max_serve_count = Some(left.ok_or(CloseReason::MaxServeCount { count })?);
        }
        Ok(control)
    }

    fn spec(&self) -> ServiceSpec {
        let config = &self.config;
        match config.kind {
            ServiceKind::Tcp => ServiceSpec::Tcp {
                name: config.name.clone(),
                port: self.port.or(config.remote_tcp_port),
                random: config.remote_tcp_random,
                proxy_protocol: config.proxy_protocol,
                prefix: config.p2p.as_ref().and(config.host_prefix.clone()),
            },
            ServiceKind::Http => ServiceSpec::Http {
                name: config.name.clone(),
                prefix: config.host_prefix.clone(),
                local_host: config.use_local_as_http_host.then(|| config.local.clone()),
            },
            ServiceKind::Https => {
                ServiceSpec::Https { name: config.name.clone(), prefix: config.host_prefix.clone() }
            }
            ServiceKind::Udp => ServiceSpec::Udp {
                name: config.name.clone(),
                port: self.port.or(config.remote_udp_port),
                random: config.remote_udp_random,
            },
        }
    }

    /// The server knows only the limits left after a reconnect: name the configured ones.
    fn whole_limit(&self, reason: CloseReason) -> CloseReason {
        match reason {
            CloseReason::MaxServeCount { count } => {
                CloseReason::MaxServeCount { count: self.config.max_serve_count.unwrap_or(count) }
            }
            CloseReason::MaxServeTime { millis } => {
                CloseReason::MaxServeTime { millis: self.config.max_serve_time_ms().unwrap_or(millis) }
            }
            other => other,
        }
    }

    /// The registration, with the limits that are left.
    /// `remote_connections` (the client's `--remote-connections`) lowers `max_serve_conn`.
    fn register(&self, request: u64, remote_connections: Option<u32>) -> Result<ClientMessage, CloseReason> {
        let mut control = self.remaining_control()?;
        control.max_serve_conn = match (control.max_serve_conn, remote_connections) {
            (Some(own), Some(cap)) => Some(own.min(cap)),
            (own, cap) => own.or(cap),
        };
        Ok(ClientMessage::Register { request, spec: self.spec(), control })
    }

    fn close(self, reason: CloseReason) {
        match self.reply {
            Some(reply) => {
                let error = match reason {
                    CloseReason::Refused(error) => error,
                    other => crate::proto::RegisterError::Other { message: other.to_string() },
                };
                let _ = reply.send(Err(error));
            }
            None => {
                let _ = self.closed.send(Some(reason));
            }
        }
    }
}

pub(crate) struct Driver {
    config: ClientConfig,
    /// Told the final error that stops the driver, if someone waits for it (the first login).
    fatal: Option<oneshot::Sender<ClientError>>,
    remotes: Arc<Remotes>,
    instance: String,
    inbox: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<ClientState>,
    token: CancellationToken,
    wanted: BTreeMap<u64, Wanted>,
    /// Tunnels cancelled in this session, by the server's number, until the server confirms
    /// it has given their endpoints back (or [`CONFIRM_WAIT`] passes).
    closing: HashMap<u32, (Wanted, Instant)>,
    /// Questions sent in this session, by request number.
    questions: HashMap<u64, oneshot::Sender<Result<Answer, ClientError>>>,
    /// Introductions asked for in this session, by request number.
    introductions: HashMap<u64, oneshot::Sender<Result<PeerReady, PeerRefusal>>>,
    next_question: u64,
    /// This client's P2P state.
    peering: Arc<Peering>,
}

impl Driver {
    pub(crate) fn new(
        config: ClientConfig,
        remotes: Arc<Remotes>,
        instance: String,
        links: DriverLinks,
    ) -> Self {
        let DriverLinks { inbox, state, token, fatal, peering } = links;
        Driver {
            config,
            fatal,
            remotes,
            instance,
            inbox,
            state,
            token,
            wanted: BTreeMap::new(),
            closing: HashMap::new(),
            questions: HashMap::new(),
            introductions: HashMap::new(),
            next_question: 0,
            peering,
        }
    }

    /// Serves the first session (when logged in already), then logs in again with backoff
    /// after each failure, until cancelled or stopped by a final error.
    pub(crate) async fn run(mut self, first: Option<LoggedIn>) {
        let mut backoff = Backoff::new(self.config.reconnect_delay, self.config.max_reconnect_delay);
        let mut next = first;
        let mut failed = None;
        while !self.token.is_cancelled() {
            let attempt = Instant::now();
            let logged = match next.take() {
                Some(logged) => logged,
                None => match self.reconnect().await {
                    Some(Ok(logged)) => logged,
                    Some(Err(err)) if err.is_fatal() => {
                        failed = Some(self.give_up(err));
                        break;
                    }
                    Some(Err(err)) => {
                        // The wait counts from the attempt's start: after a connect that
                        // timed out (a cut link) the next one starts at once, so a healed
                        // link is found within seconds, not a backoff step later.
                        let delay = backoff.next_delay().saturating_sub(attempt.elapsed());
                        let delay = delay.max(err.retry_after().unwrap_or_default());
                        warn!(%err, retry_in = ?delay, "login failed; retrying");
                        self.set_state(ClientState::Disconnected { reason: err.to_string() });
                        self.pause(delay).await;
                        continue;
                    }
                    None => break,
                },
            };
            backoff.reset();
            self.set_state(ClientState::Connected { session: logged.session });
            let reason = self.serve(logged).await;
            if self.token.is_cancelled() {
                break;
            }
            warn!(%reason, "disconnected from the server; reconnecting");
            self.set_state(ClientState::Disconnected { reason });
            self.pause(backoff.next_delay()).await;
        }
        for (_, wanted) in std::mem::take(&mut self.wanted) {
            wanted.close(CloseReason::ClientShutdown);
        }
        self.set_state(match failed {
            Some(reason) => ClientState::Failed { reason },
            None => ClientState::Stopped,
        });
    }

    /// A final error: logged, and handed to whoever waits for the first login; returns its text.
    fn give_up(&mut self, err: ClientError) -> String {
        error!(%err, "login failed; stopping (retrying cannot help)");
        let reason = err.to_string();
        if let Some(fatal) = self.fatal.take() {
            let _ = fatal.send(err);
        }
        reason
    }

    fn set_state(&self, state: ClientState) {
        self.state.send_replace(state);
    }

    /// One login attempt; `None` when cancelled.
    async fn reconnect(&mut self) -> Option<Result<LoggedIn, ClientError>> {
        self.set_state(ClientState::Connecting);
        tokio::select! {
            _ = self.token.cancelled() => None,
            attempt = async {
                // The remote API, if any, is asked again at every login.
                let connectors = self.remotes.for_login().await;
                login_first_reachable(&connectors, &self.config, &self.instance).await
            } => Some(attempt),
        }
    }

    /// Waits before the next attempt, still taking commands.
    async fn pause(&mut self, delay: Duration) {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return,
                _ = self.token.cancelled() => return,
                Some(command) = self.inbox.recv() => self.apply_offline(command),
            }
        }
    }

    fn apply_offline(&mut self, command: Command) {
        match command {
            Command::Add { key, wanted } => {
                self.wanted.insert(key, *wanted);
            }
            Command::Remove { key } => {
                if let Some(wanted) = self.wanted.remove(&key) {
                    wanted.close(CloseReason::Cancelled);
                }
            }
            Command::Ask { reply, .. } => {
                let _ = reply.send(Err(ClientError::NotConnected));
            }
            Command::PeerConnect { reply, .. } => {
                let _ = reply.send(Err(PeerRefusal::Other { message: "not connected to the server".into() }));
            }
            Command::Send(_) => {}
        }
    }

    /// Runs one session until it fails; returns why.
    async fn serve(&mut self, logged: LoggedIn) -> String {
        let LoggedIn { chan, session, key, heartbeat_interval, quic, connector } = logged;
        let quic_connection = quic.as_ref().map(|link| link.connection.clone());
        // Public addresses are on the host of the remote that was reached.
        let remote_host = connector.remote().host.clone();
        let session_token = self.token.child_token();
        let _stop_pool = session_token.clone().drop_guard();
        let routes = Routes::default();
        let pool = DataPool::start(
            (connector, quic_connection),
            session,
            key,
            routes.clone(),
            self.config.remote_idle_connections,
            self.config.local_timeout,
            session_token,
        );
        self.peering.set_session(Some(SessionLinks { pool: pool.clone(), routes: routes.clone() }));
        let mut session = Session { chan, routes, pool, remote_host, heartbeat_interval };
        let reason = match self.session_loop(&mut session).await {
            Ok(reason) => reason,
            Err(err) => format!("control connection failed: {err}"),
        };
        self.peering.set_session(None);
        for (_, introduction) in self.introductions.drain() {
            let _ =
                introduction.send(Err(PeerRefusal::Other { message: "disconnected from the server".into() }));
        }
        session.pool.stop().await;
        if let Some(link) = quic {
            link.connection.close(0u32.into(), b"session over");
        }
        for (_, question) in self.questions.drain() {
            let _ = question.send(Err(ClientError::NotConnected));
        }
        for wanted in self.wanted.values_mut() {
            wanted.server_id = None;
            wanted.public.send_replace(None);
        }
        // The session that held them is gone, and their endpoints with it.
        for (_, (wanted, _)) in self.closing.drain() {
            wanted.close(CloseReason::Cancelled);
        }
        reason
    }

    /// Asks the server for the tunnels of `keys` (all of them after a login).
    async fn register(&mut self, keys: Vec<u64>, session: &mut Session) -> Result<(), ProtocolError> {
        let mut spent = Vec::new();
        for key in keys {
            let Some(wanted) = self.wanted.get_mut(&key) else { continue };
            wanted.retry_at = None;
            match wanted.register(key, self.config.remote_connections) {
                Ok(register) => session.chan.send(&register).await?,
                Err(reason) => spent.push((key, reason)),
            }
        }
        // Limits used up while disconnected: the tunnel ends as it would have on the server.
        for (key, reason) in spent {
            if let Some(wanted) = self.wanted.remove(&key) {
                warn!(local = %wanted.config.local, %reason, "tunnel closed by its limits");
                wanted.close(reason);
            }
        }
        Ok(())
    }

    /// When the next refused tunnel is due to be asked for again, if any.
    fn next_retry(&self) -> Option<Instant> {
        self.wanted.values().filter_map(|w| w.retry_at).min()
    }

    async fn session_loop(&mut self, session: &mut Session) -> Result<String, ProtocolError> {
        let keys = self.wanted.keys().copied().collect();
        self.register(keys, session).await?;
        let timeout = self.config.heartbeat_timeout;
        let every = (timeout / 3).min(session.heartbeat_interval).max(Duration::from_millis(10));
        let mut ticker = tokio::time::interval(every);
        let mut last_heard = Instant::now();
        let mut ping_seq = 0;
        loop {
            let retry = self.next_retry();
            let retry_due = async move {
                match retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = self.token.cancelled() => return Ok("client shut down".into()),
                _ = retry_due => {
                    let now = Instant::now();
                    let due = self.wanted.iter().filter(|(_, w)| w.retry_at.is_some_and(|at| at <= now));
                    let keys = due.map(|(key, _)| *key).collect();
                    self.register(keys, session).await?;
                }
                command = self.inbox.recv() => match command {
                    Some(command) => self.apply_online(command, session).await?,
                    None => return Ok("client handle dropped".into()),
                },
                message = session.chan.recv::<ServerMessage>() => {
                    last_heard = Instant::now();
                    match message {
                        Ok(message) => self.on_message(message, session).await?,
                        Err(ProtocolError::Closed) => return Ok("server closed the connection".into()),
                        Err(err) => return Err(err),
                    }
                }
                // A deadline of its own, not a check per tick: silence is noticed when it
                // reaches the timeout, not up to a tick later.
                _ = tokio::time::sleep_until(last_heard + timeout) => {
                    return Ok(format!("no heartbeat from the server for {timeout:?}"));
                }
                _ = ticker.tick() => {
                    self.give_up_confirmations();
                    ping_seq += 1;
                    session.chan.send(&ClientMessage::Ping { seq: ping_seq }).await?;
                }
            }
        }
    }

    /// Closes cancelled tunnels whose confirmation is overdue (a server that never sends one).
    fn give_up_confirmations(&mut self) {
        let now = Instant::now();
        let overdue: Vec<u32> =
            self.closing.iter().filter(|(_, (_, by))| *by <= now).map(|(s, _)| *s).collect();
        for service in overdue {
            if let Some((wanted, _)) = self.closing.remove(&service) {
                wanted.close(CloseReason::Cancelled);
            }
        }
    }

    async fn apply_online(&mut self, command: Command, session: &mut Session) -> Result<(), ProtocolError> {
        match command {
            Command::Add { key, wanted } => {
                if let Ok(register) = wanted.register(key, self.config.remote_connections) {
                    session.chan.send(&register).await?;
                }
                self.wanted.insert(key, *wanted);
            }
            Command::Remove { key } => {
                if let Some(wanted) = self.wanted.remove(&key) {
                    info!(local = %wanted.config.local, "tunnel cancelled");
                    match wanted.server_id {
                        Some(service) => {
                            session.routes.write().unwrap_or_else(|e| e.into_inner()).remove(&service);
                            self.closing.insert(service, (wanted, Instant::now() + CONFIRM_WAIT));
                            session.chan.send(&ClientMessage::Unregister { service }).await?;
                        }
                        None => wanted.close(CloseReason::Cancelled),
                    }
                }
            }
            Command::Ask { query, reply } => {
                self.next_question += 1;
                let request = self.next_question;
                session.chan.send(&ClientMessage::Query { request, query }).await?;
                self.questions.insert(request, reply);
            }
            Command::PeerConnect { name, offer, reply } => {
                self.next_question += 1;
                let request = self.next_question;
                session.chan.send(&ClientMessage::PeerConnect { request, name, offer }).await?;
                self.introductions.retain(|_, waiting| !waiting.is_closed());
                self.introductions.insert(request, reply);
            }
            Command::Send(message) => session.chan.send(&message).await?,
        }
        Ok(())
    }

    async fn on_message(
        &mut self,
        message: ServerMessage,
        session: &mut Session,
    ) -> Result<(), ProtocolError> {
        match message {
            ServerMessage::Registered { request, service, port, host, compress } => {
                let Some(wanted) = self.wanted.get_mut(&request) else {
                    // Cancelled while the request was in flight.
                    return session.chan.send(&ClientMessage::Unregister { service }).await;
                };
                if wanted.port.is_some_and(|old| old != port) {
                    warn!(old = wanted.port, new = port, "the server gave a different public port");
                }
                wanted.port = Some(port);
                wanted.server_id = Some(service);
                (wanted.backoff, wanted.retry_at) = (None, None);
                wanted.opened.get_or_insert_with(Instant::now);
                let route = Route {
                    local: wanted.config.local.clone(),
                    served: wanted.served.clone(),
                    encrypt: wanted.config.encrypt,
                    udp: wanted.config.kind == ServiceKind::Udp,
                    compress,
                    webrtc: wanted.config.webrtc,
                };
                if wanted.config.compress.is_some() && compress.is_none() {
                    warn!(name = %wanted.config.name, "the server did not agree to compress this service; sending it as it is");
                }
                session.routes.write().unwrap_or_else(|e| e.into_inner()).insert(service, route);
                let peers_only = wanted.config.p2p.as_ref().is_some_and(|p| p.only);
                let shape = (wanted.config.kind, peers_only);
                let public = public_address(&session.remote_host, port, host.as_deref(), shape);
                info!(%public, local = %wanted.config.local, "tunnel open");
                wanted.public.send_replace(Some(public.clone()));
                if let Some(reply) = wanted.reply.take() {
                    let _ = reply.send(Ok(Endpoint { port, host, public }));
                }
            }
            ServerMessage::RegisterFailed { request, error } => self.refused(request, error),
            ServerMessage::ServiceClosed { service, reason } => {
                if let Some((wanted, _)) = self.closing.remove(&service) {
                    wanted.close(CloseReason::Cancelled);
                    return Ok(());
                }
                session.routes.write().unwrap_or_else(|e| e.into_inner()).remove(&service);
                let key = self.wanted.iter().find(|(_, w)| w.server_id == Some(service)).map(|(k, _)| *k);
                if let Some(wanted) = key.and_then(|k| self.wanted.remove(&k)) {
                    let reason = wanted.whole_limit(reason);
                    warn!(local = %wanted.config.local, %reason, "tunnel closed by the server");
                    wanted.close(reason);
                }
            }
            ServerMessage::NeedData { count } => session.pool.grow(count),
            ServerMessage::Answer { request, answer } => {
                if let Some(question) = self.questions.remove(&request) {
                    let _ = question.send(Ok(answer));
                }
            }
            ServerMessage::PeerOffer { attempt, service, from, offer } => {
                self.peering.offered((attempt, service, from), offer);
            }
            ServerMessage::BrowserOffer { attempt, service, visitor, offer } => {
                self.peering.browser_offered((attempt, service, visitor), offer);
            }
            ServerMessage::PeerAnswer { request, answer } => {
                if let Some(introduction) = self.introductions.remove(&request) {
                    let _ = introduction.send(answer);
                }
            }
            ServerMessage::Ping { seq } => session.chan.send(&ClientMessage::Pong { seq }).await?,
            ServerMessage::Pong { .. } => {}
            other => {
                return Err(ProtocolError::Malformed(format!("unexpected message after login: {other:?}")));
            }
        }
        Ok(())
    }
}

impl Driver {
    /// The server refused a tunnel: it ends, or is asked for again later when the
    /// refusal may pass (see [`RegisterError::is_lasting`]).
    fn refused(&mut self, request: u64, error: RegisterError) {
        let Some(wanted) = self.wanted.get_mut(&request) else { return };
        if wanted.gives_up_on(&error) {
            if let Some(wanted) = self.wanted.remove(&request) {
                error!(local = %wanted.config.local, %error, "tunnel refused by the server");
                wanted.close(CloseReason::Refused(error));
            }
            return;
        }
        let delay = wanted.ask_again_later(&self.config);
        warn!(local = %wanted.config.local, %error, retry_in = ?delay, "tunnel refused by the server; asking again later");
    }
}

/// The parts of one connected session.
struct Session {
    chan: ControlChannel<Stream>,
    routes: Routes,
    pool: std::sync::Arc<DataPool>,
    remote_host: String,
    /// How often the server pings; the client pings at least as often.
    heartbeat_interval: Duration,
}
