//! Public error types, one per operation.

use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::proto::{LoginRefusal, ProtocolError, RegisterError};
use crate::transport::TlsError;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} ({key}): {cause}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The config key it came from.
        key: &'static str,
        /// The socket error (not a `source`: the message already names it, and printers
        /// that follow sources would say it twice).
        cause: std::io::Error,
    },
    /// The TLS listener could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The server could not join its cluster (`cluster-etcd`).
    #[error("cannot join the cluster: {0}")]
    Cluster(String),
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
    /// The server spoke out of turn or the link failed mid-handshake. The text shows the
    /// cause, which is not also a `source()`: a chain printed whole would say it twice.
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
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
    /// An allow-any-client server asked to enroll the id again, over a connection that does
    /// not authenticate it, after this process had logged in there: a man in the middle
    /// after the verifier, or a server that restarted and forgot the id.
    #[error("the server asks to enroll id '{id}' again, which it knew when this client last logged in: a man in the middle may be after its verifier, or the server restarted and forgot the id; restart the client to enroll again (or use tls://)")]
    EnrollAgain {
        /// The id.
        id: String,
    },
    /// The client was shut down.
    #[error("the client is shut down")]
    Stopped,
    /// The client is between connections; try again once it is connected.
    #[error("the client is not connected to the server right now")]
    NotConnected,
    /// A setting cannot be used (such as a `remote_api` URL that is not https://).
    #[error("{0}")]
    Config(String),
}

impl From<ProtocolError> for ClientError {
    fn from(err: ProtocolError) -> Self {
        ClientError::Protocol(err)
    }
}

impl ClientError {
    /// Whether the error is final: retrying with the same settings cannot help, so a
    /// client stops instead of retrying. Final are a wrong secret (`AuthFailed`), an id
    /// the server does not have (`UnknownId`) or cannot take (`InvalidId`, `TooManyIds`),
    /// a secret it needs and cannot get safely (`SecretNeeded`), a malformed login, a
    /// protocol version mismatch, and TLS errors (configuration, or a certificate the
    /// client does not trust), and a server that is not the one the secret belongs to
    /// (`ServerNotVerified`) or asks for a verifier unprotected (`EnrollUnprotected`,
    /// `EnrollAgain`). Not final: the network (refused, reset, timed out), a ban
    /// (it ends; see [`retry_after`](Self::retry_after)), an auth API that cannot be
    /// asked (`AuthUnavailable`) and a user's sessions limit (`TooManySessions`).
    pub fn is_fatal(&self) -> bool {
        match self {
            ClientError::LoginRefused(refusal) => !matches!(
                refusal,
                LoginRefusal::Banned { .. }
                    | LoginRefusal::AuthUnavailable
                    | LoginRefusal::TooManySessions { .. }
            ),
            ClientError::Tls(_)
            | ClientError::ServerNotVerified
            | ClientError::EnrollUnprotected { .. }
            | ClientError::EnrollAgain { .. }
            | ClientError::Config(_) => true,
            // A TLS handshake the client refused (an untrusted certificate) or the server did.
            ClientError::Connect(err) => err.kind() == std::io::ErrorKind::InvalidData,
            ClientError::Protocol(err) => matches!(err, ProtocolError::VersionMismatch { .. }),
            ClientError::Register(_) | ClientError::Stopped | ClientError::NotConnected => false,
        }
    }

    /// The least time to wait before trying again: what is left of a ban.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            ClientError::LoginRefused(LoginRefusal::Banned { seconds }) => {
                Some(std::time::Duration::from_secs(*seconds))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_errors_and_passing_ones() {
        let refused = |refusal| ClientError::LoginRefused(refusal);
        assert!(refused(LoginRefusal::AuthFailed { id: "a".into() }).is_fatal());
        assert!(refused(LoginRefusal::UnknownId { id: "a".into() }).is_fatal());
        assert!(refused(LoginRefusal::InvalidId).is_fatal());
        assert!(refused(LoginRefusal::VersionMismatch { server: 3, client: 2 }).is_fatal());
        let banned = refused(LoginRefusal::Banned { seconds: 7 });
        assert!(!banned.is_fatal());
        assert_eq!(banned.retry_after(), Some(std::time::Duration::from_secs(7)));
        assert!(!refused(LoginRefusal::AuthUnavailable).is_fatal());
        assert!(!refused(LoginRefusal::TooManySessions { id: "a".into(), limit: 1 }).is_fatal());
        let refused_tcp = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!ClientError::Connect(refused_tcp).is_fatal());
        let untrusted = std::io::Error::new(std::io::ErrorKind::InvalidData, "invalid peer certificate");
        assert!(ClientError::Connect(untrusted).is_fatal());
        assert!(!ClientError::Protocol(ProtocolError::Closed).is_fatal());
        assert!(ClientError::ServerNotVerified.is_fatal(), "an impostor does not turn honest");
    }
}
