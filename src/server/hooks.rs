//! Hooks for programs that embed the server: their own user lookup and login checks
//! (gotunnel's auth middleware), and callbacks on clients, tunnels and visitors.
//!
//! Hooks run on the server's tasks: they must return quickly and must not block
//! (keep a cache, or hand slow work to a task of your own).

use std::net::SocketAddr;
use std::time::SystemTime;

use crate::auth::Secret;
use crate::proto::ServiceInfo;

/// A client, as hooks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client id (session number), as in the management API.
    pub cid: u64,
    /// The user id.
    pub user: String,
    /// The client's tags.
    pub tags: Vec<String>,
    /// Where the client connects from.
    pub address: SocketAddr,
    /// When it logged in.
    pub since: SystemTime,
}

/// A visitor about to be let into a tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitorInfo {
    /// Where the visitor connects from.
    pub address: SocketAddr,
    /// The tunnel's id.
    pub service: u32,
    /// The tunnel's name.
    pub name: String,
    /// The tunnel's user.
    pub user: String,
    /// The client serving the tunnel.
    pub cid: u64,
}

/// Callbacks into a program that embeds the server; every method has a default that
/// changes nothing, so implement only what you need.
pub trait ServerHooks: Send + Sync + 'static {
    /// The secret of an id the configuration does not know, e.g. from the program's own
    /// user store; `None` leaves the id to `auth-api` and `allow-any-client`. The client
    /// still proves it holds the secret; it never crosses the wire.
    fn secret_for(&self, _id: &str) -> Option<Secret> {
        None
    }

    /// Called after a client proved its credentials, before it is let in; an error refuses
    /// the login (the client is told its authentication failed; the reason is logged).
    fn check_login(&self, _client: &ClientInfo) -> Result<(), String> {
        Ok(())
    }

    /// A client logged in.
    fn client_connected(&self, _client: &ClientInfo) {}

    /// A client's session ended.
    fn client_disconnected(&self, _client: &ClientInfo, _reason: &DisconnectReason) {}

    /// A tunnel opened.
    fn tunnel_opened(&self, _tunnel: &ServiceInfo) {}

    /// A tunnel closed (its figures are the final ones).
    fn tunnel_closed(&self, _tunnel: &ServiceInfo) {}

    /// A visitor arrived; `false` refuses it (TCP: closed at once; HTTP: 403).
    fn allow_visitor(&self, _visitor: &VisitorInfo) -> bool {
        true
    }
}

/// The hooks of a server that has none.
pub(crate) struct NoHooks;

impl ServerHooks for NoHooks {}

/// Why a client's session ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DisconnectReason {
    /// The server closed it: shutdown, a reload that removed the user, the API.
    #[error("session closed by the server")]
    ClosedByServer,
    /// The client closed its control connection.
    #[error("connection closed by client")]
    ClosedByClient,
    /// The client was silent for the heartbeat timeout.
    #[error("no heartbeat for {0:?}")]
    NoHeartbeat(std::time::Duration),
    /// The control connection failed or carried what is not a message.
    #[error("control connection failed: {0}")]
    Failed(String),
}
