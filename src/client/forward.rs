//! Forwards (GT's tcp forward): a local port whose connections reach another client's P2P
//! service, over a direct QUIC connection when punching works and through the server
//! otherwise.
//!
//! The first connection waits for punching at most `punch_deadline`, then goes through the
//! server. After a failure no connection waits: they go through the server at once while
//! punching is retried in the background with backoff, and new connections go direct as
//! soon as a retry works (connections already relayed stay where they are).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn, Instrument};

use super::backoff::Backoff;
use super::peering::{already_answered, join_streams, open_peer_stream, Peering};
use crate::config::ForwardConfig;
use crate::error::ClientError;
use crate::proto::{read_frame_buffered, ForwardAnswer, PeerPath, PeerRefusal};

/// First and longest pause between punching retries while connections are relayed.
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(15);

/// A forwarded local port. Dropping it, or [`close`](Forward::close), stops listening;
/// connections in progress go on.
#[derive(Debug)]
#[must_use = "dropping a Forward stops it"]
pub struct Forward {
    local_addr: SocketAddr,
    counts: Arc<ForwardCounts>,
    _stop: DropGuard,
}

/// How a forward's connections went.
#[derive(Debug, Default)]
pub struct ForwardCounts {
    direct: AtomicU64,
    relayed: AtomicU64,
    failed: AtomicU64,
}

impl ForwardCounts {
    /// Connections carried directly so far.
    pub fn direct(&self) -> u64 {
        self.direct.load(Ordering::Relaxed)
    }

    /// Connections carried through the server so far.
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }

    /// Connections that could not reach the service (refused, peer offline).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Forward {
    /// Where the forward listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How its connections went so far.
    pub fn counts(&self) -> &ForwardCounts {
        &self.counts
    }

    /// Stops listening.
    pub fn close(self) {}
}

/// Binds `config.listen` and forwards its connections until the forward or the client stops.
pub(crate) async fn start(
    peering: Arc<Peering>,
    config: ForwardConfig,
    token: CancellationToken,
) -> Result<Forward, ClientError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| ClientError::Config(format!("tcp-forward-addr {}: {e}", config.listen)))?;
    let local_addr = listener.local_addr().map_err(|e| ClientError::Config(e.to_string()))?;
    let counts = Arc::new(ForwardCounts::default());
    let stop = token.child_token();
    let paths = Arc::new(Paths::new(peering, config.name.clone(), stop.clone()));
    let limit = config.connections.map(|n| Arc::new(Semaphore::new(n as usize)));
    let span = tracing::info_span!("forward", name = %config.name, listen = %local_addr);
    let serving = (paths, counts.clone(), limit);
    tokio::spawn(stop.clone().run_until_cancelled_owned(accept_loop(listener, serving)).instrument(span));
    info!(listen = %local_addr, name = %config.name, "forwarding to the P2P service");
    Ok(Forward { local_addr, counts, _stop: stop.drop_guard() })
}

async fn accept_loop(
    listener: TcpListener,
    (paths, counts, limit): (Arc<Paths>, Arc<ForwardCounts>, Option<Arc<Semaphore>>),
) {
    loop {
        let (local, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match &limit {
            Some(limit) => match limit.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    warn!(%from, "tcp-forward-connections reached; closing the connection");
                    continue;
                }
            },
            None => None,
        };
        let _ = local.set_nodelay(true);
        let (paths, counts) = (paths.clone(), counts.clone());
        tokio::spawn(
            async move {
                paths.forward(local, &counts).await;
                drop(permit);
            }
            .in_current_span(),
        );
    }
}

/// The direct connection to the serving client, when there is one.
#[derive(Clone)]
struct Direct {
    connection: quinn::Connection,
    service: u32,
}

/// Where a forward's connections go, and the punching that decides it.
struct Paths {
    peering: Arc<Peering>,
    name: String,
    state: Mutex<PathState>,
    /// Says `true` whenever an attempt ends (a direct path or not).
    attempted: watch::Sender<u64>,
    /// Streams open on the direct connection now, for its idle timeout.
    open_streams: AtomicUsize,
    token: CancellationToken,
}

struct PathState {
    direct: Option<Direct>,
    /// When the attempt in flight started.
    attempting: Option<Instant>,
    /// A punching attempt has failed since the last direct path: connections do not wait.
    failed_before: bool,
    /// Connections went through the server since the last direct path.
    relayed_before: bool,
    backoff: Backoff,
    /// The retry loop runs.
    retrying: bool,
}

/// Which way one connection goes.
enum Path {
    Direct(Direct),
    Relay,
}

impl Paths {
    fn new(peering: Arc<Peering>, name: String, token: CancellationToken) -> Self {
        let state = PathState {
            direct: None,
            attempting: None,
            failed_before: false,
            relayed_before: false,
            backoff: Backoff::new(RETRY_FIRST, RETRY_MAX),
            retrying: false,
        };
        Paths {
            peering,
            name,
            state: Mutex::new(state),
            attempted: watch::channel(0).0,
            open_streams: AtomicUsize::new(0),
            token,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PathState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries one local connection to the service.
    async fn forward(self: &Arc<Self>, local: TcpStream, counts: &ForwardCounts) {
        let from = local.peer_addr().ok();
        if let Path::Direct(direct) = self.choose().await {
            match open_peer_stream(&direct.connection, direct.service).await {
                Ok(stream) => {
                    counts.direct.fetch_add(1, Ordering::Relaxed);
                    info!(?from, path = "direct", "connection forwarded");
                    self.open_streams.fetch_add(1, Ordering::Relaxed);
                    let result = join_streams(local, stream, already_answered).await;
                    self.open_streams.fetch_sub(1, Ordering::Relaxed);
                    return log_end(result);
                }
                Err(err) => {
                    warn!(%err, "direct stream failed; this connection goes through the server");
                    self.lost_direct(&direct);
                }
            }
        }
        self.state().relayed_before = true;
        if let Err(err) = self.relay(local, counts).await {
            warn!(?from, %err, "connection not forwarded");
        }
    }

    /// The path for a new connection: the direct one if up; else, on first contact,
    /// whatever punching gives within the deadline; else through the server.
    async fn choose(self: &Arc<Self>) -> Path {
        let deadline = self.peering.config().punch_deadline;
        let (wait_until, mut attempted) = {
            let mut state = self.state();
            if let Some(direct) = state.direct.clone().filter(|d| d.connection.close_reason().is_none()) {
                return Path::Direct(direct);
            }
            if state.failed_before {
                self.keep_retrying(&mut state);
                return Path::Relay;
            }
            let started = *state.attempting.get_or_insert_with(|| {
                self.spawn_attempt();
                Instant::now()
            });
            (started + deadline, self.attempted.subscribe())
        };
        let _ = tokio::time::timeout_at(wait_until, attempted.changed()).await;
        match self.state().direct.clone() {
            Some(direct) => Path::Direct(direct),
            None => Path::Relay,
        }
    }

    /// Starts the background retries, unless they run.
    fn keep_retrying(self: &Arc<Self>, state: &mut PathState) {
        if std::mem::replace(&mut state.retrying, true) {
            return;
        }
        let paths = self.clone();
        tokio::spawn(self.token.clone().run_until_cancelled_owned(async move {
            loop {
                let delay = paths.state().backoff.next_delay();
                tokio::time::sleep(delay).await;
                if paths.state().direct.is_some() {
                    break;
                }
                paths.state().attempting = Some(Instant::now());
                if paths.attempt().await {
                    break;
                }
            }
            paths.state().retrying = false;
        }));
    }

    fn spawn_attempt(self: &Arc<Self>) {
        let paths = self.clone();
        tokio::spawn(self.token.clone().run_until_cancelled_owned(async move {
            if !paths.attempt().await {
                let mut state = paths.state();
                paths.keep_retrying(&mut state);
            }
        }));
    }

    /// One punching attempt; true when a direct path is up.
    async fn attempt(self: &Arc<Self>) -> bool {
        let deadline = self.peering.config().punch_deadline;
        let outcome = self.punch(deadline).await;
        let mut state = self.state();
        state.attempting = None;
        let up = match outcome {
            Ok(direct) => {
                let path = if state.relayed_before { PeerPath::Upgraded } else { PeerPath::Direct };
                info!(peer = %direct.connection.remote_address(), ?path, "direct path up");
                self.peering.report(direct.service, path);
                state.direct = Some(direct.clone());
                (state.failed_before, state.relayed_before) = (false, false);
                state.backoff.reset();
                self.watch_direct(direct);
                true
            }
            Err((service, err)) => {
                // The server counts a fallback once, not each retry that fails after it.
                if !state.failed_before {
                    info!(%err, "no direct path; connections go through the server");
                    if let Some(service) = service {
                        self.peering.report(service, PeerPath::Relayed);
                    }
                } else {
                    debug!(%err, "still no direct path");
                }
                state.failed_before = true;
                false
            }
        };
        self.attempted.send_modify(|n| *n += 1);
        up
    }

    /// Introduces this client to the serving one and punches; the service's number when
    /// the introduction got that far.
    async fn punch(&self, deadline: Duration) -> Result<Direct, (Option<u32>, String)> {
        let started = Instant::now();
        let (endpoint, offer) = self.peering.offer().await.map_err(|e| (None, e))?;
        let introduced = tokio::time::timeout(deadline, self.peering.introduce(&self.name, offer)).await;
        let ready = match introduced {
            Ok(Ok(ready)) => ready,
            Ok(Err(refusal @ PeerRefusal::Unknown { .. })) => {
                return Err((None, format!("peer offline: {refusal}")));
            }
            Ok(Err(refusal)) => return Err((None, refusal.to_string())),
            Err(_) => return Err((None, "the serving client did not answer in time".into())),
        };
        let service = ready.service;
        let offer = ready
            .offer
            .map_err(|why| (Some(service), format!("the serving client offers no direct path: {why}")))?;
        let left = deadline.saturating_sub(started.elapsed()).max(Duration::from_millis(500));
        let connection = endpoint.connect(&offer, left).await.map_err(|e| (Some(service), e.to_string()))?;
        Ok(Direct { connection, service })
    }

    /// Watches a direct connection: closes it after the idle timeout, and forgets it
    /// when it ends.
    fn watch_direct(self: &Arc<Self>, direct: Direct) {
        let paths = self.clone();
        let idle = self.peering.config().idle_timeout;
        tokio::spawn(async move {
            let mut idle_since = Instant::now();
            let check = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = direct.connection.closed() => break,
                    _ = paths.token.cancelled() => {
                        direct.connection.close(0u32.into(), b"forward closed");
                        break;
                    }
                    _ = tokio::time::sleep(check) => {
                        if paths.open_streams.load(Ordering::Relaxed) > 0 {
                            idle_since = Instant::now();
                        } else if idle_since.elapsed() >= idle {
                            info!("direct connection idle; closing it");
                            direct.connection.close(0u32.into(), b"idle");
                            break;
                        }
                    }
                }
            }
            paths.lost_direct(&direct);
        });
    }

    /// A direct connection ended or failed: the next connection punches again.
    fn lost_direct(&self, direct: &Direct) {
        let mut state = self.state();
        if state.direct.as_ref().is_some_and(|d| d.connection.stable_id() == direct.connection.stable_id()) {
            state.direct = None;
            info!("direct connection closed");
            self.peering.report(direct.service, PeerPath::Closed);
        }
    }

    /// Carries `local` through the server on a forward link.
    /// Counts the connection (relayed or failed) before `local` closes, so whoever sees
    /// it close sees the count.
    async fn relay(&self, local: TcpStream, counts: &ForwardCounts) -> Result<(), String> {
        let link = match self.peering.session().await {
            Some(session) => {
                session.pool.open_forward(&self.name).await.map_err(|e| format!("forward link: {e}"))
            }
            None => Err("not connected to the server".to_string()),
        };
        let link = link.inspect_err(|_| {
            counts.failed.fetch_add(1, Ordering::Relaxed);
        })?;
        info!(from = ?local.peer_addr().ok(), path = "relayed", "connection forwarded");
        relay_answered(local, link, counts).await
    }
}

/// Relays `local` over a forward link once the server's first frame says it was accepted;
/// local bytes go out meanwhile (a service may wait for the client to speak first).
async fn relay_answered(
    local: TcpStream,
    link: crate::transport::Stream,
    counts: &ForwardCounts,
) -> Result<(), String> {
    let accepted = |mut read| async move {
        let mut buffered = BytesMut::with_capacity(4096);
        let answer = read_frame_buffered::<_, ForwardAnswer>(&mut read, &mut buffered).await;
        let answer = answer.map_err(|e| format!("no answer from the server: {e}"));
        match answer {
            Ok(ForwardAnswer::Accepted { service }) => {
                counts.relayed.fetch_add(1, Ordering::Relaxed);
                debug!(service, "forward link accepted");
                Ok((read, buffered))
            }
            Ok(ForwardAnswer::Refused { refusal }) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::other(refusal.to_string()))
            }
            Err(err) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                Err(io::Error::other(err))
            }
        }
    };
    let (sent, got) = join_streams(local, link, accepted).await.map_err(|e| e.to_string())?;
    debug!(sent, got, "relayed connection done");
    Ok(())
}

fn log_end(result: io::Result<(u64, u64)>) {
    match result {
        Ok((sent, got)) => debug!(sent, got, "direct connection done"),
        Err(err) => debug!(%err, "direct connection ended"),
    }
}
