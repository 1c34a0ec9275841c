//! The public side: accepts clients, authenticates them, opens their tunnels.
//!
//! One [`Server`] owns the client listeners. Each control connection becomes a
//! session (`session.rs`); each tunnel accepts visitors (`tcp.rs`) and pairs
//! them with idle data connections from the session's pool (`pool.rs`).

mod pool;
mod registry;
mod session;
mod tcp;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::UserTable;
use crate::config::ServerConfig;
use crate::error::ServerError;
use crate::proto::{
    read_frame, read_preamble, write_frame, DataHello, LinkKind, LoginRefusal, ProtocolError,
    ServerMessage,
};
use crate::transport::{server_tls_acceptor, Stream};
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
                links.spawn(serve_link(shared.clone(), tcp, peer, tls.clone()));
            }
            Err(err) => {
                warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads the preamble of a new link and hands it to the control or data path.
async fn serve_link(
    shared: Arc<ServerShared>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
) {
    let _ = tcp.set_nodelay(true);
    let limit = shared.config.handshake_timeout;
    let opened = tokio::time::timeout(limit, open_link(tcp, tls)).await;
    let (kind, stream) = match opened {
        Ok(Ok(link)) => link,
        Ok(Err((err, stream))) => return refuse_link(stream, err, peer).await,
        Err(_) => return debug!(%peer, "link timed out before its preamble"),
    };
    match kind {
        // The session watches the shutdown token itself, so it always runs its clean-up.
        LinkKind::Control => session::serve_control(shared, stream, peer).await,
        LinkKind::Data => attach_data(&shared, stream, peer).await,
    }
}

type LinkRefusal = (ProtocolError, Option<Stream>);

async fn open_link(
    tcp: TcpStream,
    tls: Option<TlsAcceptor>,
) -> Result<(LinkKind, Stream), LinkRefusal> {
    let mut stream: Stream = match tls {
        Some(acceptor) => Box::new(acceptor.accept(tcp).await.map_err(|e| (e.into(), None))?),
        None => Box::new(tcp),
    };
    match read_preamble(&mut stream).await {
        Ok(kind) => Ok((kind, stream)),
        Err(err) => Err((err, Some(stream))),
    }
}

/// Drops a link whose preamble was wrong; a ferry of another version is told why first.
async fn refuse_link(stream: Option<Stream>, err: ProtocolError, peer: SocketAddr) {
    debug!(%peer, %err, "link refused");
    if let (Some(mut stream), ProtocolError::VersionMismatch { peer: client, ours }) = (stream, err)
    {
        let refusal = LoginRefusal::VersionMismatch {
            server: ours,
            client,
        };
        let _ = write_frame(&mut stream, &ServerMessage::LoginRefused { refusal }).await;
    }
}

/// Checks a data connection's hello and parks it in its session's pool.
async fn attach_data(shared: &ServerShared, mut stream: Stream, peer: SocketAddr) {
    let limit = shared.config.handshake_timeout;
    let hello = match tokio::time::timeout(limit, read_frame::<_, DataHello>(&mut stream)).await {
        Ok(Ok(hello)) => hello,
        Ok(Err(err)) => return debug!(%peer, %err, "bad data hello"),
        Err(_) => return debug!(%peer, "data hello timed out"),
    };
    let Some(session) = shared.registry.session(hello.session) else {
        return debug!(%peer, session = hello.session, "data connection for an unknown session");
    };
    if session.closing.is_cancelled() || !session.admit_data(hello.seq, &hello.mac) {
        return warn!(%peer, session = hello.session, "data connection refused: bad or replayed proof");
    }
    if !session.pool.push(stream) {
        debug!(
            session = session.id,
            "data pool full; closing extra connection"
        );
    }
}
