//! Public error types, one per operation.

use std::net::SocketAddr;

use crate::proto::{LoginRefusal, ProtocolError, RegisterError};
use crate::transport::TlsError;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The config key it came from.
        key: &'static str,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS listener could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the server: {0}")]
    Connect(std::io::Error),
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The server refused the login.
    #[error("{0}")]
    LoginRefused(LoginRefusal),
    /// The server refused to open a tunnel.
    #[error("the server refused the tunnel: {0}")]
    Register(RegisterError),
    /// The server spoke out of turn or the link failed mid-handshake.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server's welcome did not prove it derived the session key: it does not hold this
    /// user's verifier, so it is not the server the secret belongs to.
    #[error("the server could not prove it knows this user's secret: it may be a man in the middle, or another server than intended; check --remote")]
    ServerNotVerified,
    /// An allow-any-client server asked to enroll the id over a connection that does not
    /// authenticate it, and the client was not told to accept that.
    #[error("the server has not met id '{id}' yet (allow-any-client) and asks to keep a verifier of its secret, over a connection that does not prove who the server is: use tls:// with a verified certificate, or pass --remote-enroll-insecure to accept that a man in the middle of this first login could learn it")]
    EnrollUnprotected {
        /// The id.
        id: String,
    },
    /// The client was shut down.
    #[error("the client is shut down")]
    Stopped,
    /// The client is between connections; try again once it is connected.
    #[error("the client is not connected to the server right now")]
    NotConnected,
}

impl ClientError {
    /// Whether retrying later may help (the network), or not (credentials, version).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ClientError::LoginRefused(refusal)
                if !matches!(refusal, LoginRefusal::AuthUnavailable | LoginRefusal::TooManySessions { .. })
        ) || matches!(
            self,
            ClientError::Tls(_)
                | ClientError::Protocol(ProtocolError::VersionMismatch { .. })
                | ClientError::ServerNotVerified
                | ClientError::EnrollUnprotected { .. }
        )
    }
}
