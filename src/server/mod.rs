//! The public side: accepts clients, authenticates them, opens their tunnels.
//!
//! One [`Server`] owns the client listeners. Each control connection becomes a
//! session (`session.rs`); each tunnel accepts visitors (`tcp.rs`) and pairs
//! them with idle data connections from the session's pool (`pool.rs`).

mod accept;
pub(crate) mod api;
pub(crate) mod auth_api;
mod bans;
mod dispatch;
mod endpoints;
mod handshakes;
pub mod hooks;
mod hosts;
mod http;
pub(crate) mod http_head;
pub(crate) mod http_requests;
mod link;
pub(crate) mod login;
mod nodes;
mod peers;
mod pool;
mod ports;
pub(crate) mod proxy_header;
mod registry;
mod session;
mod signals;
pub(crate) mod sni;
mod stun;
mod tcp;
mod tunnel;
mod udp;
pub(crate) mod users;
mod visit;
mod webrtc;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::cluster::{Arrival, Cluster};
use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::transport::{quic_server_endpoint, server_tls_acceptor, server_tls_config, TlsVersion};
use bans::Bans;
use endpoints::Endpoints;
use handshakes::{Handshakes, Sorted};
use hooks::{NoHooks, ServerHooks};
use registry::Registry;
use users::{Directory, Users};

/// How long shutdown waits for QUIC connections to close before letting go of the port.
const QUIC_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// How long shutdown waits for sessions to close before returning anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by every task of one server.
pub(crate) struct ServerShared {
    pub(crate) config: ServerConfig,
    /// Who may log in and with which rules; replaced on reload.
    pub(crate) users: Users,
    pub(crate) registry: Registry,
    /// Cancelled on shutdown; parent of every session token.
    pub(crate) shutdown: CancellationToken,
    /// Budgets for connections that have not finished their handshake.
    pub(crate) handshakes: Handshakes,
    /// Public endpoints (TCP ports, HTTP hosts, TLS server names) and the tunnels behind each.
    pub(crate) endpoints: Endpoints,
    /// Failed client logins and bans.
    pub(crate) bans: Bans,
    /// Wrong API tokens and bans from the API, apart from client logins.
    pub(crate) api_bans: Bans,
    /// Event counters for `/metrics`.
    pub(crate) metrics: api::Metrics,
    /// Offers between clients waiting for answers (P2P).
    pub(crate) peer_signals: signals::Signals<peers::PeerWaiter>,
    /// Browsers' offers waiting for their clients' answers (WebRTC).
    pub(crate) browser_signals: signals::Signals<webrtc::BrowserWaiter>,
    /// Offers per browser address, for the rate limit.
    pub(crate) browser_offers: webrtc::OfferRate,
    /// The embedding program's hooks, if it gave any.
    hooks: OnceLock<Arc<dyn ServerHooks>>,
    /// This node's membership, in a cluster (`cluster-etcd`).
    cluster: OnceLock<Arc<Cluster>>,
    /// Listeners on ports other cluster nodes hold.
    pub(crate) remote_ports: nodes::RemotePorts,
}

impl ServerShared {
    /// The state of a server with `config` (already validated), before anything is served.
    /// The fuzz targets build one without listeners.
    pub(crate) fn new(config: ServerConfig) -> Result<Arc<Self>, ServerError> {
        let bans = Bans::new(config.reconnect_times, config.reconnect_duration);
        let api_bans = Bans::new(config.reconnect_times, config.reconnect_duration);
        let directory = Directory::new(&config)?;
        if directory.is_closed() {
            warn!("no users, no auth-api and allow-any-client is off: every client will be refused");
        }
        let users = Users::new(directory);
        let endpoints = Endpoints::new(hosts::name_grace(config.heartbeat_timeout));
        Ok(Arc::new(ServerShared {
            config,
            users,
            registry: Registry::default(),
            shutdown: CancellationToken::new(),
            handshakes: Handshakes::default(),
            endpoints,
            bans,
            api_bans,
            metrics: api::Metrics::default(),
            peer_signals: signals::Signals::default(),
            browser_signals: signals::Signals::default(),
            browser_offers: webrtc::OfferRate::default(),
            hooks: OnceLock::new(),
            cluster: OnceLock::new(),
            remote_ports: nodes::RemotePorts::default(),
        }))
    }

    /// This node's cluster membership, in a cluster.
    pub(crate) fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// The embedding program's hooks (ones that change nothing when it gave none).
    pub(crate) fn hooks(&self) -> &dyn ServerHooks {
        match self.hooks.get() {
            Some(hooks) => hooks.as_ref(),
            None => &NoHooks,
        }
    }

    /// Whether some user has this id, ignoring case: a configured one, or one with a
    /// live session (allow-any-client, auth API). Such ids and names under them
    /// (`ID-...`) are host names only their user may take.
    pub(crate) fn is_user_id(&self, id: &str) -> bool {
        self.users.directory().has_id_ignoring_case(id) || self.registry.has_user_ignoring_case(id)
    }

    /// Whether the program gave hooks (so visitor callbacks are worth building).
    pub(crate) fn has_hooks(&self) -> bool {
        self.hooks.get().is_some()
    }
}

/// A bound ferry server, ready to [`run`](Server::run).
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use ferry::{Server, ServerConfig};
/// let mut config = ServerConfig::default().with_user("id1", "secret1");
/// config.tcp_ranges = vec!["10000-20000".parse()?];
/// let server = Server::bind(config).await?;
/// println!("clients connect to {}", server.local_addr());
/// server.run(async { let _ = tokio::signal::ctrl_c().await; }).await;
/// # Ok(()) }
/// ```
pub struct Server {
    shared: Arc<ServerShared>,
    listeners: Vec<Listener>,
    /// The management API's listener and TLS, if `api-addr` is set.
    api: Option<(TcpListener, Option<TlsAcceptor>)>,
    /// The QUIC endpoint for clients, if `quic-addr` is set.
    quic: Option<quinn::Endpoint>,
    /// The STUN server's socket, if `stun-addr` is set.
    stun: Option<tokio::net::UdpSocket>,
    /// Visitors other cluster nodes relay here, in a cluster.
    arrivals: Option<tokio::sync::mpsc::Receiver<Arrival>>,
}

/// One bound listener and what it serves.
struct Listener {
    socket: TcpListener,
    /// The config key it came from, for logs and lookups.
    key: &'static str,
    /// TLS is terminated here (clients over TLS, HTTPS visitors).
    tls: Option<TlsAcceptor>,
    /// Who connects here.
    serves: Serves,
}

/// What a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serves {
    /// Clients and HTTP visitors, told apart by their first bytes (`addr`, `tls-addr`).
    ClientsAndHttp,
    /// HTTP visitors only (`http-addr`).
    HttpOnly,
    /// TLS visitors routed by server name and passed through (`sni-addr`).
    TlsPassthrough,
}

impl Server {
    /// Binds the listeners: `addr` (clients and HTTP visitors), `tls-addr` with its
    /// certificate (clients over TLS and HTTPS visitors) and `http-addr` (HTTP visitors).
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        Self::build(config, None).await
    }

    /// Like [`bind`](Server::bind), but serves clients and HTTP visitors on `listener`,
    /// which the caller bound (mini-redis's `run(listener, ...)`): nobody races for a port
    /// between choosing it and binding it. `config.addr` is not used.
    pub async fn with_listener(config: ServerConfig, listener: TcpListener) -> Result<Server, ServerError> {
        Self::build(config, Some(listener)).await
    }

    async fn build(config: ServerConfig, main: Option<TcpListener>) -> Result<Server, ServerError> {
        config.validate()?;
        let socket = match (main, config.addr) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => Some(bind(addr, "addr").await?),
            (None, None) => None,
        };
        let mut listeners: Vec<Listener> = socket
            .map(|socket| Listener { socket, key: "addr", tls: None, serves: Serves::ClientsAndHttp })
            .into_iter()
            .collect();
        let pairs: Vec<_> = config.cert_file.iter().cloned().zip(config.key_file.iter().cloned()).collect();
        if let Some(addr) = config.tls_addr {
            let acceptor = server_tls_acceptor(&pairs, config.tls_min_version)?;
            let socket = bind(addr, "tls-addr").await?;
            listeners.push(Listener {
                socket,
                key: "tls-addr",
                tls: Some(acceptor),
                serves: Serves::ClientsAndHttp,
            });
        }
        let quic = match config.quic_addr {
            Some(addr) => {
                let tls = server_tls_config(&pairs, TlsVersion::Tls13)?;
                let idle = config.heartbeat_timeout;
                let endpoint = quic_server_endpoint(addr, &tls, config.quic_congestion, idle)
                    .map_err(|cause| ServerError::Bind { addr, key: "quic-addr", cause })?;
                Some(endpoint)
            }
            None => None,
        };
        if let Some(addr) = config.http_addr {
            let socket = bind(addr, "http-addr").await?;
            listeners.push(Listener { socket, key: "http-addr", tls: None, serves: Serves::HttpOnly });
        }
        if let Some(addr) = config.sni_addr {
            let socket = bind(addr, "sni-addr").await?;
            listeners.push(Listener { socket, key: "sni-addr", tls: None, serves: Serves::TlsPassthrough });
        }
        let api = match config.api_addr {
            Some(addr) => {
                let tls = match &config.api_tls {
                    Some(pair) => {
                        Some(server_tls_acceptor(std::slice::from_ref(pair), config.api_tls_min_version)?)
                    }
                    None => None,
                };
                Some((bind(addr, "api-addr").await?, tls))
            }
            None => None,
        };
        let stun = match config.stun_addr {
            Some(addr) => {
                Some(tokio::net::UdpSocket::bind(addr).await.map_err(|cause| ServerError::Bind {
                    addr,
                    key: "stun-addr",
                    cause,
                })?)
            }
            None => None,
        };
        let shared = ServerShared::new(config)?;
        let arrivals = match &shared.config.cluster {
            Some(cluster) => {
                let (member, arrivals) = Cluster::join(cluster, shared.shutdown.child_token())
                    .await
                    .map_err(ServerError::Cluster)?;
                let _ = shared.cluster.set(member);
                Some(arrivals)
            }
            None => None,
        };
        Ok(Server { shared, listeners, api, quic, stun, arrivals })
    }

    fn addr_of(&self, key: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|l| l.key == key).and_then(|l| l.socket.local_addr().ok())
    }

    /// The address clients (and HTTP visitors) connect to; useful when bound to port 0.
    /// Without a plain listener (`addr` unset), the first of `tls-addr`, `sni-addr`, `http-addr`.
    pub fn local_addr(&self) -> SocketAddr {
        ["addr", "tls-addr", "sni-addr", "http-addr"]
            .into_iter()
            .find_map(|key| self.addr_of(key))
            .unwrap_or_else(|| SocketAddr::new(self.shared.config.public_ip(), 0))
    }

    /// The TLS address (clients over TLS, HTTPS visitors), if TLS is on.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.addr_of("tls-addr")
    }

    /// The HTTP-only address, if `http-addr` is set.
    pub fn http_local_addr(&self) -> Option<SocketAddr> {
        self.addr_of("http-addr")
    }

    /// The TLS passthrough address, if `sni-addr` is set.
    pub fn sni_local_addr(&self) -> Option<SocketAddr> {
        self.addr_of("sni-addr")
    }

    /// The management API's address, if `api-addr` is set.
    pub fn api_local_addr(&self) -> Option<SocketAddr> {
        self.api.as_ref().and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// The QUIC address (UDP), if `quic-addr` is set.
    pub fn quic_local_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|endpoint| endpoint.local_addr().ok())
    }

    /// The STUN server's address (UDP), if `stun-addr` is set.
    pub fn stun_local_addr(&self) -> Option<SocketAddr> {
        self.stun.as_ref().and_then(|socket| socket.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then closes every tunnel and returns.
    ///
    /// Spawn this future on the runtime (or use [`spawn`](Server::spawn)) rather than
    /// awaiting it on `block_on`'s thread, where every accept would cross threads.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server { shared, listeners, api, quic, stun, arrivals } = self;
        if let Some(arrivals) = arrivals {
            nodes::start(&shared, arrivals);
        }
        let links = TaskTracker::new();
        let mut accepting = Vec::with_capacity(listeners.len() + 1);
        if let Some((listener, tls)) = api {
            let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            info!(%addr, listener = "api-addr", https = tls.is_some(), "listening");
            accepting.push(tokio::spawn(api::serve(shared.clone(), listener, tls, shared.shutdown.clone())));
        }
        for listener in listeners {
            let addr = listener.socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
            info!(%addr, listener = listener.key, "listening");
            accepting.push(tokio::spawn(accept_links(shared.clone(), listener, links.clone())));
        }
        if let Some(endpoint) = quic {
            let addr = endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default();
            info!(%addr, listener = "quic-addr", "listening");
            accepting.push(tokio::spawn(accept_quic(shared.clone(), endpoint, links.clone())));
        }
        if let Some(socket) = stun {
            let addr = socket.local_addr().map(|a| a.to_string()).unwrap_or_default();
            info!(%addr, listener = "stun-addr", "listening");
            accepting.push(tokio::spawn(stun::serve_stun(shared.clone(), socket)));
        }
        shutdown.await;
        info!("shutting down");
        shared.shutdown.cancel();
        // The listeners are closed once their accept loops are gone: the ports are free on return.
        for accept in accepting {
            let _ = accept.await;
        }
        links.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, links.wait()).await.is_err() {
            warn!("some sessions did not close within {SHUTDOWN_GRACE:?}");
        }
    }

    /// Installs the embedding program's hooks (custom authentication and callbacks).
    pub fn with_hooks(self, hooks: Arc<dyn ServerHooks>) -> Self {
        if self.shared.hooks.set(hooks).is_err() {
            warn!("hooks were installed already; keeping the first ones");
        }
        self
    }

    /// A handle that reloads the users of this server while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader { shared: self.shared.clone() }
    }

    /// Runs the server on a background task; the handle stops it.
    pub fn spawn(self) -> ServerHandle {
        let token = CancellationToken::new();
        let (addr, tls_addr, http_addr) = (self.local_addr(), self.tls_local_addr(), self.http_local_addr());
        let sni_addr = self.sni_local_addr();
        let api_addr = self.api_local_addr();
        let quic_addr = self.quic_local_addr();
        let stun_addr = self.stun_local_addr();
        let stop = token.clone();
        let reloader = self.reloader();
        let task = tokio::spawn(async move { self.run(stop.cancelled_owned()).await });
        let task = Some(task);
        let udp = (quic_addr, stun_addr);
        ServerHandle { token, task, addr, tls_addr, http_addr, sni_addr, api_addr, udp, reloader }
    }
}

/// A server running on a background task. Dropping the handle stops it (without waiting);
/// [`shutdown`](ServerHandle::shutdown) stops it and waits until every tunnel is closed.
#[must_use = "dropping a ServerHandle stops the server"]
pub struct ServerHandle {
    token: CancellationToken,
    task: Option<JoinHandle<()>>,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    sni_addr: Option<SocketAddr>,
    api_addr: Option<SocketAddr>,
    /// The QUIC and STUN addresses, if set.
    udp: (Option<SocketAddr>, Option<SocketAddr>),
    reloader: Reloader,
}

impl ServerHandle {
    /// Applies the users of `config` to the running server; see [`Reloader::reload`].
    pub fn reload(&self, config: &ServerConfig) -> Result<usize, ServerError> {
        self.reloader.reload(config)
    }

    /// The address clients (and HTTP visitors) connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS address, if TLS is on.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The HTTP-only address, if `http-addr` is set.
    pub fn http_local_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The TLS passthrough address, if `sni-addr` is set.
    pub fn sni_local_addr(&self) -> Option<SocketAddr> {
        self.sni_addr
    }

    /// The management API's address, if `api-addr` is set.
    pub fn api_local_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// The QUIC address (UDP), if `quic-addr` is set.
    pub fn quic_local_addr(&self) -> Option<SocketAddr> {
        self.udp.0
    }

    /// The STUN server's address (UDP), if `stun-addr` is set.
    pub fn stun_local_addr(&self) -> Option<SocketAddr> {
        self.udp.1
    }

    /// Stops accepting, closes every tunnel and waits for the server to finish.
    pub async fn shutdown(mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// Reloads a running server's users (`ferry server -s reload`, SIGHUP).
#[derive(Clone)]
pub struct Reloader {
    shared: Arc<ServerShared>,
}

impl Reloader {
    /// Applies the users part of `config`: users and their settings, `allow-any-client`,
    /// `auth-api`, and the server-wide per-user limits (`tcp-range`, `tcp-number`, `host-*`,
    /// `speed`, `connections`, `sessions`). Sessions of users who are gone, or whose secret
    /// changed, are closed; changed limits apply to new connections and tunnels, but a
    /// changed `speed` applies at once, to running transfers too (one budget per user). Listeners,
    /// certificates and timeouts keep their values until a restart. Returns how many
    /// sessions were closed.
    pub fn reload(&self, config: &ServerConfig) -> Result<usize, ServerError> {
        config.validate()?;
        let directory = Directory::new(config)?;
        self.shared.users.replace(directory);
        let mut closed = 0;
        for session in self.shared.registry.sessions() {
            if !session.closing.is_cancelled() && !session.still_allowed(&self.shared.users) {
                info!(session = session.id, user = %session.user, "closing the session of a removed user");
                session.closing.cancel();
                closed += 1;
            }
        }
        info!(users = config.users.len(), closed, "users reloaded");
        Ok(closed)
    }
}

async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, ServerError> {
    accept::bind(addr).map_err(|cause| ServerError::Bind { addr, key, cause })
}

async fn accept_links(shared: Arc<ServerShared>, listener: Listener, links: TaskTracker) {
    let mut errors = accept::AcceptErrors::new(&shared);
    while let Some((tcp, peer)) = accept::accept_until(&listener.socket, &shared.shutdown, &mut errors).await
    {
        // Unauthenticated peers are bounded, per source and per stage: past a
        // limit, new ones are dropped at once (see `handshakes.rs`).
        let admitted = shared.handshakes.admit(peer.ip());
        let sorted = match listener.serves {
            // An HTTP-only listener knows what comes in before the first byte.
            Serves::HttpOnly => admitted.and_then(|h| shared.handshakes.sort(h, Sorted::Visitor)),
            Serves::ClientsAndHttp | Serves::TlsPassthrough => admitted,
        };
        let Some(handshake) = sorted else {
            debug!(%peer, "too many handshakes in progress; dropping connection");
            continue;
        };
        let shared = shared.clone();
        match listener.serves {
            Serves::TlsPassthrough => links.spawn(link::serve_sni_link(shared, tcp, peer, handshake)),
            serves => {
                let http_only = serves == Serves::HttpOnly;
                let tls = listener.tls.clone();
                links.spawn(link::serve_link(shared, tcp, peer, tls, http_only, handshake))
            }
        };
    }
}

/// Accepts QUIC connections from clients until shutdown; the endpoint closes on return.
async fn accept_quic(shared: Arc<ServerShared>, endpoint: quinn::Endpoint, links: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shared.shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let Some(handshake) = shared.handshakes.admit(incoming.remote_address().ip()) else {
            debug!(peer = %incoming.remote_address(), "too many handshakes in progress; refusing QUIC connection");
            incoming.refuse();
            continue;
        };
        links.spawn(link::serve_quic_link(shared.clone(), incoming, handshake));
    }
    endpoint.close(0u32.into(), b"server shutting down");
    let _ = tokio::time::timeout(QUIC_CLOSE_WAIT, endpoint.wait_idle()).await;
    let addr = endpoint.local_addr();
    drop(endpoint);
    // quinn lets go of the socket on its own task: wait until the port can be bound again,
    // so that it is free when `run` returns, as the TCP ports are.
    if let Ok(addr) = addr {
        for _ in 0..100 {
            if std::net::UdpSocket::bind(addr).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
