//! The public side: accepts clients, authenticates them, opens their tunnels.
//!
//! One [`Server`] owns the client listeners. Each control connection becomes a
//! session (`session.rs`); each tunnel accepts visitors (`tcp.rs`) and pairs
//! them with idle data connections from the session's pool (`pool.rs`).

mod link;
mod pool;
mod registry;
mod session;
mod tcp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::UserTable;
use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::transport::server_tls_acceptor;
use registry::Registry;

/// How long shutdown waits for sessions to close before returning anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// State shared by every task of one server.
pub(crate) struct ServerShared {
    pub(crate) config: ServerConfig,
    pub(crate) users: UserTable,
    pub(crate) registry: Registry,
    /// Cancelled on shutdown; parent of every session token.
    pub(crate) shutdown: CancellationToken,
    /// One permit per connection that has not finished its handshake.
    pub(crate) handshakes: Arc<Semaphore>,
}

/// Most connections that may be in their handshake at once.
const MAX_HANDSHAKES: usize = 4096;

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
    listener: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
}

impl Server {
    /// Binds the client listeners (`addr`, and `tls_addr` with its certificate).
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let listener = bind(config.addr, "addr").await?;
        let tls = match config.tls_addr {
            None => None,
            Some(addr) => {
                let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
                    return Err(ServerError::Config(
                        "tls-addr needs cert-file and key-file".into(),
                    ));
                };
                let acceptor = server_tls_acceptor(cert, key)?;
                Some((bind(addr, "tls-addr").await?, acceptor))
            }
        };
        let users = UserTable::new(
            config.users.iter().map(|(id, u)| (id.as_str(), &u.secret)),
            config.allow_any_client,
        );
        if config.users.is_empty() && !config.allow_any_client {
            warn!("no users configured and allow-any-client is off: every client will be refused");
        }
        let shared = Arc::new(ServerShared {
            config,
            users,
            registry: Registry::default(),
            shutdown: CancellationToken::new(),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        });
        Ok(Server {
            shared,
            listener,
            tls,
        })
    }

    /// The address clients connect to (useful when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.config.addr)
    }

    /// The TLS address clients connect to, if TLS is on.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Serves until `shutdown` completes, then closes every tunnel and returns.
    ///
    /// The accept loops run inside this future: spawn it on the runtime (or use
    /// [`spawn`](Server::spawn)) rather than awaiting it from `block_on`'s thread.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            shared,
            listener,
            tls,
        } = self;
        let links = TaskTracker::new();
        info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening for clients");
        let plain = accept_links(shared.clone(), listener, None, links.clone());
        let secure = async {
            match tls {
                Some((listener, acceptor)) => {
                    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening for tls clients");
                    accept_links(shared.clone(), listener, Some(acceptor), links.clone()).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown => {},
            _ = plain => {},
            _ = secure => {},
        }
        info!("shutting down");
        shared.shutdown.cancel();
        links.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, links.wait())
            .await
            .is_err()
        {
            warn!("some sessions did not close within {SHUTDOWN_GRACE:?}");
        }
    }

    /// Runs the server on a background task; the handle stops it.
    pub fn spawn(self) -> ServerHandle {
        let token = CancellationToken::new();
        let addr = self.local_addr();
        let tls_addr = self.tls_local_addr();
        let stop = token.clone();
        let task = tokio::spawn(async move { self.run(stop.cancelled_owned()).await });
        ServerHandle {
            token,
            task,
            addr,
            tls_addr,
        }
    }
}

/// A server running on a background task. Dropping the handle leaves it running;
/// call [`shutdown`](ServerHandle::shutdown) to stop it.
pub struct ServerHandle {
    token: CancellationToken,
    task: JoinHandle<()>,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
}

impl ServerHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The TLS address clients connect to, if TLS is on.
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Stops accepting, closes every tunnel and waits for the server to finish.
    pub async fn shutdown(self) {
        self.token.cancel();
        let _ = self.task.await;
    }
}

async fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, key, source })
}

async fn accept_links(
    shared: Arc<ServerShared>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    links: TaskTracker,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                // Unauthenticated peers are bounded: past the limit, new ones are dropped at once.
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    debug!(%peer, "too many handshakes in progress; dropping connection");
                    continue;
                };
                links.spawn(link::serve_link(
                    shared.clone(),
                    tcp,
                    peer,
                    tls.clone(),
                    permit,
                ));
            }
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
