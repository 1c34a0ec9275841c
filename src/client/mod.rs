//! The private side: logs in to the server, keeps tunnels registered across
//! reconnects, and relays visitors to local services.
//!
//! [`Client`] is the handle; a driver task (`driver.rs`) owns the control
//! connection and reconnects with backoff; `pool.rs` keeps data connections
//! ready for visitors.

mod backoff;
mod driver;
mod forward;
mod ha;
mod login;
mod peering;
mod pool;
mod remotes;
mod udp;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{ClientConfig, ForwardConfig, ServiceConfig, ServiceKind};
use crate::error::ClientError;
use crate::proto::{Answer, CloseReason, ProtocolError, Query, RegisterError, ServiceInfo};
use driver::{Command, Driver, Listeners, Wanted};
pub use forward::{Forward, ForwardCounts};
use peering::Peering;
#[cfg(feature = "cli")]
pub(crate) use remotes::ask_remote_api_until_answered;
use remotes::Remotes;

/// Where the client stands with the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientState {
    /// Dialing and logging in.
    Connecting,
    /// Logged in; tunnels are registered.
    Connected {
        /// The server's session number.
        session: u64,
    },
    /// The link is down; the client will try again.
    Disconnected {
        /// Why the link went down.
        reason: String,
    },
    /// The client was shut down and will not reconnect.
    Stopped,
    /// A final error stopped the client (see [`ClientError::is_fatal`]); it will not reconnect.
    Failed {
        /// The error.
        reason: String,
    },
}

impl fmt::Display for ClientState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientState::Connecting => f.write_str("connecting"),
            ClientState::Connected { session } => write!(f, "connected (session {session})"),
            ClientState::Disconnected { reason } => write!(f, "disconnected: {reason}"),
            ClientState::Stopped => f.write_str("stopped"),
            ClientState::Failed { reason } => write!(f, "failed: {reason}"),
        }
    }
}

/// A connected ferry client. Dropping it, or calling [`shutdown`](Client::shutdown), stops it.
///
/// ```no_run
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// use ferry::{Client, ClientConfig, RemoteAddr, ServiceConfig};
/// let remote = RemoteAddr::parse("tcp://tunnel.example.com:7000")?;
/// let client = Client::connect(ClientConfig::new(remote, "id1", "secret1")).await?;
/// let mut ssh = client.add_service(ServiceConfig::tcp("127.0.0.1:22").with_remote_port(2222)).await?;
/// println!("ssh is reachable at {}", ssh.public_addr());
/// ssh.cancel();
/// println!("tunnel ended: {}", ssh.closed().await);
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping a Client stops it and closes its tunnels"]
pub struct Client {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<ClientState>,
    next_key: AtomicU64,
    driver: JoinHandle<()>,
    token: CancellationToken,
    _stop_on_drop: DropGuard,
    /// Which servers the driver dials, and how; shared, for [`rebind`](Client::rebind).
    remotes: Arc<Remotes>,
    /// P2P: the direct-connection endpoint and signalling, shared with the driver.
    peering: Arc<Peering>,
    /// With `ha-connections`: clients logged in to the other remotes, each serving every
    /// tunnel on the same port or host (`ha.rs`).
    standby: Vec<Client>,
}

impl Client {
    /// Connects and logs in once; from then on the client reconnects by itself.
    ///
    /// Fails if the server cannot be reached or refuses the login.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let (config, standby) = ha::standby(config)?;
        let remotes = Arc::new(Remotes::new(&config)?);
        let instance = format!("{:032x}", rand::random::<u128>());
        let connectors = remotes.for_login().await;
        let first = login::login_first_reachable(&connectors, &config, &instance).await?;
        let state = ClientState::Connected { session: first.session };
        let dialers = remotes.clone();
        let p2p = (config.p2p.clone(), config.remote.host.clone(), config.local_timeout);
        let driver = |links| Driver::new(config, remotes, instance, links);
        Ok(Client { standby, ..Client::start((driver, dialers, p2p), state, Some(first), None) })
    }

    /// Starts a client that logs in by itself, without waiting for it.
    fn spawn(config: ClientConfig) -> Result<Client, ClientError> {
        let remotes = Arc::new(Remotes::new(&config)?);
        let instance = format!("{:032x}", rand::random::<u128>());
        let dialers = remotes.clone();
        let p2p = (config.p2p.clone(), config.remote.host.clone(), config.local_timeout);
        let driver = |links| Driver::new(config, remotes, instance, links);
        Ok(Client::start((driver, dialers, p2p), ClientState::Connecting, None, None))
    }

    /// Connects and logs in, retrying what may pass (the server not up yet or unreachable,
    /// a ban, an overloaded auth API) with the same backoff as after a lost connection,
    /// as a service started before its server needs. Fails only with a final error
    /// ([`ClientError::is_fatal`]).
    pub async fn connect_retrying(config: ClientConfig) -> Result<Client, ClientError> {
        let (config, standby) = ha::standby(config)?;
        let remotes = Arc::new(Remotes::new(&config)?);
        let instance = format!("{:032x}", rand::random::<u128>());
        let (fatal, mut failed) = oneshot::channel();
        let dialers = remotes.clone();
        let p2p = (config.p2p.clone(), config.remote.host.clone(), config.local_timeout);
        let driver = |links| Driver::new(config, remotes, instance, links);
        let client = Client::start((driver, dialers, p2p), ClientState::Connecting, None, Some(fatal));
        let client = Client { standby, ..client };
        let mut state = client.state();
        tokio::select! {
            biased;
            Ok(err) = &mut failed => Err(err),
            connected = state.wait_for(|s| matches!(s, ClientState::Connected { .. })) => {
                let connected = connected.is_ok();
                if connected { Ok(client) } else { Err(failed.try_recv().unwrap_or(ClientError::Stopped)) }
            }
        }
    }

    /// Spawns the driver task.
    fn start(
        (driver, remotes, p2p): (
            impl FnOnce(DriverLinks) -> Driver,
            Arc<Remotes>,
            (crate::config::PeerConfig, String, std::time::Duration),
        ),
        state: ClientState,
        first: Option<login::LoggedIn>,
        fatal: Option<oneshot::Sender<ClientError>>,
    ) -> Client {
        let (commands, inbox) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(state);
        let token = CancellationToken::new();
        let peering = Peering::new(p2p, commands.clone(), token.clone());
        let links =
            DriverLinks { inbox, state: state_tx, token: token.clone(), fatal, peering: peering.clone() };
        let driver = driver(links);
        let driver = tokio::spawn(driver.run(first));
        Client {
            commands,
            state,
            next_key: AtomicU64::new(1),
            driver,
            _stop_on_drop: token.clone().drop_guard(),
            token,
            remotes,
            peering,
            standby: Vec::new(),
        }
    }

    /// Listens on `config.listen` and carries each connection there to the P2P service
    /// `config.name` of another client (GT's tcp forward): directly when the two can punch
    /// through their NATs, through the server otherwise. Fails when the address cannot be
    /// bound; a service that cannot be reached fails each connection (it is logged).
    pub async fn forward(&self, config: ForwardConfig) -> Result<Forward, ClientError> {
        forward::start(self.peering.clone(), config, self.token.clone()).await
    }

    /// Moves a `quic://` client's link to `socket`, after a network change for instance:
    /// the QUIC connection, its tunnels and their visitors go on from the new address
    /// (connection migration). Fails when the client is not on `quic://` or has never
    /// connected.
    pub fn rebind(&self, socket: std::net::UdpSocket) -> std::io::Result<()> {
        let connectors = self.remotes.latest();
        let quic = connectors.iter().find(|c| c.is_quic() && c.has_quic_link());
        match quic {
            Some(connector) => connector.rebind_quic(socket),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no QUIC link to move (not quic://, or never connected)",
            )),
        }
    }

    /// The open services of this client's user on the server, with live figures
    /// (proxylite's DiscoverServices).
    pub async fn discover(&self) -> Result<Vec<ServiceInfo>, ClientError> {
        match self.ask(Query::Services).await? {
            Answer::Services { services } => Ok(services),
            other => Err(unexpected_answer(other)),
        }
    }

    /// Up to `limit` ports this client's user could open a TCP tunnel on now
    /// (proxylite's AvailablePorts; `free_ports(1)` is AskFreePort).
    pub async fn free_ports(&self, limit: u32) -> Result<Vec<u16>, ClientError> {
        match self.ask(Query::FreePorts { limit }).await? {
            Answer::FreePorts { ports } => Ok(ports),
            other => Err(unexpected_answer(other)),
        }
    }

    async fn ask(&self, query: Query) -> Result<Answer, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Ask { query, reply }).map_err(|_| ClientError::Stopped)?;
        answer.await.map_err(|_| ClientError::NotConnected)?
    }

    /// Opens a tunnel to a local service and waits until the server has opened its public port.
    ///
    /// While the client is disconnected this waits for the next connection. A refusal
    /// is returned; after a reconnect, a refusal that may pass (a name or port taken, a
    /// limit reached) is asked again with backoff instead of closing the tunnel.
    pub async fn add_service(&self, service: ServiceConfig) -> Result<Registration, ClientError> {
        self.add(service, false).await
    }

    /// Like [`add_service`](Client::add_service), but a refusal that may pass is asked
    /// again with backoff (and logged) until the server opens the tunnel; only a lasting
    /// refusal ([`RegisterError::is_lasting`]) is returned. The CLI opens its services so.
    pub async fn add_service_retrying(&self, service: ServiceConfig) -> Result<Registration, ClientError> {
        self.add(service, true).await
    }

    async fn add(&self, service: ServiceConfig, keep_trying: bool) -> Result<Registration, ClientError> {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let (closed_tx, closed) = watch::channel(None);
        let (public_tx, public) = watch::channel(None);
        let listeners = Listeners { reply, closed: closed_tx, public: public_tx };
        let wanted = Box::new(Wanted::new(service.clone(), listeners, keep_trying));
        self.commands.send(Command::Add { key, wanted }).map_err(|_| ClientError::Stopped)?;
        // Given up before the answer (dropped or timed out): the driver forgets the tunnel.
        let abandoned = AbandonGuard { key, commands: Some(self.commands.clone()) };
        let endpoint = answer.await.map_err(|_| ClientError::Stopped)?.map_err(ClientError::Register)?;
        abandoned.disarm();
        let standby = self.standby.iter().map(|client| client.serve_too(&service, endpoint.port)).collect();
        Ok(Registration {
            key,
            port: endpoint.port,
            host: endpoint.host,
            public_addr: endpoint.public,
            closed,
            public,
            commands: self.commands.clone(),
            standby,
        })
    }

    /// Opens `service` on this standby client too, on the `port` the first client got
    /// (asked again until it opens); the tunnel's key and this client's commands, to close it.
    fn serve_too(&self, service: &ServiceConfig, port: u16) -> (u64, mpsc::UnboundedSender<Command>) {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let listeners = Listeners {
            reply: oneshot::channel().0,
            closed: watch::channel(None).0,
            public: watch::channel(None).0,
        };
        let wanted = Box::new(Wanted::new(ha::same_endpoint(service, port), listeners, true));
        let _ = self.commands.send(Command::Add { key, wanted });
        (key, self.commands.clone())
    }

    /// Watches the connection state (connecting, connected, disconnected with a reason, stopped).
    pub fn state(&self) -> watch::Receiver<ClientState> {
        self.state.clone()
    }

    /// Closes every tunnel and the connection, and waits for the client to stop.
    pub async fn shutdown(self) {
        self.token.cancel();
        let Client { driver, standby, .. } = self;
        for client in standby {
            Box::pin(client.shutdown()).await;
        }
        let _ = driver.await;
    }
}

/// What the driver task is given to talk with the [`Client`] handle.
pub(crate) struct DriverLinks {
    pub(crate) inbox: mpsc::UnboundedReceiver<Command>,
    pub(crate) state: watch::Sender<ClientState>,
    pub(crate) token: CancellationToken,
    pub(crate) fatal: Option<oneshot::Sender<ClientError>>,
    pub(crate) peering: Arc<Peering>,
}

/// Cancels a tunnel whose `add_service` was given up before the server answered.
struct AbandonGuard {
    key: u64,
    commands: Option<mpsc::UnboundedSender<Command>>,
}

impl AbandonGuard {
    fn disarm(mut self) {
        self.commands = None;
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::Remove { key: self.key });
        }
    }
}

/// One open tunnel. Dropping it leaves the tunnel open; [`cancel`](Registration::cancel) closes it.
#[derive(Debug)]
#[must_use = "dropping a Registration leaves the tunnel open; keep it to watch or cancel the tunnel"]
pub struct Registration {
    key: u64,
    port: u16,
    host: Option<String>,
    public_addr: String,
    closed: watch::Receiver<Option<CloseReason>>,
    public: watch::Receiver<Option<String>>,
    commands: mpsc::UnboundedSender<Command>,
    /// The same tunnel on the standby clients (`ha-connections`).
    standby: Vec<(u64, mpsc::UnboundedSender<Command>)>,
}

impl Registration {
    /// Where visitors connect: `host:port` for TCP; `http://HOST` for HTTP, where HOST is
    /// the full host name when the server has a `domain`, else the label that routes.
    pub fn public_addr(&self) -> &str {
        &self.public_addr
    }

    /// The public port on the server (0 for HTTP services, which share the server's HTTP port).
    pub fn remote_port(&self) -> u16 {
        self.port
    }

    /// HTTP services: the host name (or its first label) that routes to this service.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// Watches where visitors reach the tunnel: `Some(address)` each time the server opens
    /// it (again after every reconnect, when the address may have changed), `None` while
    /// it is not open. It ends when the tunnel does.
    pub fn watch_public_addr(&self) -> watch::Receiver<Option<String>> {
        self.public.clone()
    }

    /// Asks the server to close the tunnel; [`closed`](Registration::closed) then completes
    /// once the server confirms the tunnel's port or host name is free again (so registering
    /// it anew cannot race the old one), or at once while the client is offline.
    pub fn cancel(&self) {
        let _ = self.commands.send(Command::Remove { key: self.key });
        for (key, commands) in &self.standby {
            let _ = commands.send(Command::Remove { key: *key });
        }
    }

    /// Completes when the tunnel ends, with the reason.
    pub async fn closed(&mut self) -> CloseReason {
        match self.closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or(CloseReason::ClientShutdown),
            Err(_) => CloseReason::ClientShutdown,
        }
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The answer to an add-service request.
type RegisterReply = oneshot::Sender<Result<Endpoint, RegisterError>>;

/// Where the server exposes a service.
pub(crate) struct Endpoint {
    port: u16,
    host: Option<String>,
    public: String,
}

/// How visitors reach a service: `host:port` for TCP and UDP, `http://host` or
/// `https://host` otherwise; `p2p://name` for a peers-only service (`port` 0 and no public host).
fn public_address(
    remote_host: &str,
    port: u16,
    host: Option<&str>,
    (kind, peers_only): (ServiceKind, bool),
) -> String {
    match (host, kind) {
        (Some(name), _) if peers_only => format!("p2p://{name}"),
        (Some(host), ServiceKind::Https) => format!("https://{host}"),
        (Some(host), ServiceKind::Http) => format!("http://{host}"),
        _ => join_host_port(remote_host, port),
    }
}

fn unexpected_answer(answer: Answer) -> ClientError {
    ClientError::Protocol(ProtocolError::Malformed(format!("unexpected answer: {answer:?}")))
}

/// Connects with `config`, lists the open services of its user, and disconnects.
pub async fn discover(config: ClientConfig) -> Result<Vec<ServiceInfo>, ClientError> {
    let client = Client::connect(config).await?;
    let services = client.discover().await;
    client.shutdown().await;
    services
}

/// Connects with `config`, asks for up to `limit` free ports, and disconnects.
pub async fn free_ports(config: ClientConfig, limit: u32) -> Result<Vec<u16>, ClientError> {
    let client = Client::connect(config).await?;
    let ports = client.free_ports(limit).await;
    client.shutdown().await;
    ports
}
