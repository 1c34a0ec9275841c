//! Messages of peer-to-peer services: who may reach a service from another client, how two
//! clients tell each other where to punch, and the forward link that carries a peer's
//! connection through the server when no direct path works.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Most candidate addresses one side may offer; more are dropped by the server.
pub const MAX_CANDIDATES: usize = 8;

/// How a service may be reached by other clients (`--p2p`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPolicy {
    /// Peers only: no public port or host (`--p2p-only`, frp's secret tunnel).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only: bool,
    /// Users besides the service's own who may reach it (`--p2p-allow-id`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ids: Vec<String>,
}

impl PeerPolicy {
    /// Whether `user` may reach a service of `owner` with this policy.
    pub fn admits(&self, owner: &str, user: &str) -> bool {
        owner == user || self.allow_ids.iter().any(|id| id == user)
    }
}

/// Where one side of a peer connection may be reached, and the certificate it will show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerOffer {
    /// UDP addresses to punch: the side's own (host) and as the STUN server saw it
    /// (server-reflexive), best first.
    pub candidates: Vec<SocketAddr>,
    /// SHA-256 of the side's certificate (DER); the other side accepts no other.
    pub fingerprint: [u8; 32],
}

impl PeerOffer {
    /// The offer with at most [`MAX_CANDIDATES`] candidates.
    pub fn capped(mut self) -> Self {
        self.candidates.truncate(MAX_CANDIDATES);
        self
    }
}

/// Why a client may not reach a peer service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum PeerRefusal {
    /// No client serves a P2P service of that name now.
    #[error("no client serves a P2P service named '{name}' now")]
    Unknown {
        /// The name asked for.
        name: String,
    },
    /// The service's owner does not let this user in (`--p2p-allow-id`).
    #[error(
        "the P2P service '{name}' belongs to another user and does not list this id in its p2p-allow-id"
    )]
    NotAllowed {
        /// The name asked for.
        name: String,
    },
    /// The service turned the peer away: its limits, allow-ip/deny-ip or the server's hook.
    #[error("the P2P service '{name}' refused the connection: {why}")]
    Refused {
        /// The name asked for.
        name: String,
        /// Why, in words.
        why: String,
    },
    /// The serving client could not reach its local service.
    #[error("the client serving '{name}' could not reach its local service")]
    LocalUnavailable {
        /// The name asked for.
        name: String,
    },
    /// Anything else, said in words.
    #[error("{message}")]
    Other {
        /// What went wrong.
        message: String,
    },
}

/// The first frame of a forward link (link kind `F`): a peer's connection to the P2P
/// service `name`, carried through the server. Proven like a data connection's hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardHello {
    /// The session from `Welcome`.
    pub session: u64,
    /// A number used once per session (shared with data connections).
    pub seq: u64,
    /// HMAC-SHA256 of session and seq under the session key.
    pub mac: [u8; 32],
    /// The P2P service to reach.
    pub name: String,
}

/// The server's first frame on a forward link; after `Accepted`, raw bytes both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ForwardAnswer {
    /// The serving client took the connection.
    Accepted {
        /// The server's number for the service.
        service: u32,
    },
    /// The connection was refused; the link closes.
    Refused {
        /// Why.
        refusal: PeerRefusal,
    },
}

/// What became of a peer connection, as the connecting client reports it (for the
/// server's counters and API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerPath {
    /// Punching worked: a direct QUIC connection is up.
    Direct,
    /// Punching failed within its deadline: connections go through the server.
    Relayed,
    /// A retry found a direct path after connections had gone through the server.
    Upgraded,
    /// The direct connection ended.
    Closed,
}

/// The first bytes of a stream on a direct peer connection: the server's number for the
/// service it is for (big-endian), which the connection's offer must have named.
pub const PEER_STREAM_HEADER: usize = 4;
