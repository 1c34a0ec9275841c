//! Messages exchanged on control and data connections, by direction.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::peer::{PeerOffer, PeerPath, PeerPolicy, PeerRefusal};

/// What a client asks the server to expose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "snake_case")]
pub enum ServiceSpec {
    /// A raw TCP port on the server.
    Tcp {
        /// Name of the service, for logs and discovery.
        name: String,
        /// Port asked for; `None` lets the server pick one from its range.
        port: Option<u16>,
        /// Fall back to a free port in the range when `port` is taken or not allowed.
        random: bool,
        /// Tell the local service who the visitor is with a PROXY protocol header.
        #[serde(default)]
        proxy_protocol: Option<ProxyProtocol>,
        /// For a P2P service: the prefix of its P2P name (`None`: the client's id).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prefix: Option<String>,
    },
    /// A virtual host on the server's HTTP port, routed by the request's host name.
    Http {
        /// Name of the service, for logs and discovery.
        name: String,
        /// Host prefix asked for; `None` routes the client's id itself.
        prefix: Option<String>,
        /// Replace the routing header of requests with this value (`use-local-as-http-host`).
        #[serde(default)]
        local_host: Option<String>,
    },
    /// A TLS service reached through the server's `sni-addr`, routed by the ClientHello's
    /// server name; the bytes pass through encrypted.
    Https {
        /// Name of the service, for logs and discovery.
        name: String,
        /// Host prefix asked for; `None` routes the client's id itself.
        prefix: Option<String>,
    },
    /// A UDP port on the server: each visitor address is a flow of datagrams.
    Udp {
        /// Name of the service, for logs and discovery.
        name: String,
        /// Port asked for; `None` lets the server pick one from its UDP range.
        port: Option<u16>,
        /// Fall back to a free port in the range when `port` is taken or not allowed.
        random: bool,
    },
}

impl ServiceSpec {
    /// The service's name.
    pub fn name(&self) -> &str {
        match self {
            ServiceSpec::Tcp { name, .. }
            | ServiceSpec::Http { name, .. }
            | ServiceSpec::Https { name, .. }
            | ServiceSpec::Udp { name, .. } => name,
        }
    }
}

/// Which transport protocol a public port is of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP ports (`tcp-range`).
    #[default]
    Tcp,
    /// UDP ports (`udp-range`).
    Udp,
}

impl PortProtocol {
    /// `TCP` or `UDP`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "TCP",
            PortProtocol::Udp => "UDP",
        }
    }
}

impl std::fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        })
    }
}

/// Which PROXY protocol header announces a visitor to a TCP service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// The human-readable header: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header.
    V2,
}

impl std::str::FromStr for ProxyProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" | "1" => Ok(ProxyProtocol::V1),
            "v2" | "2" => Ok(ProxyProtocol::V2),
            other => Err(format!("'{other}' is not a PROXY protocol version (use v1 or v2)")),
        }
    }
}

/// How a service's data links are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Zstandard, at its fastest level.
    Zstd,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!("'{other}' is not a compression ferry knows (use zstd)")),
        }
    }
}

/// proxylite's service control: limits the server enforces on one tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceControl {
    /// At most this many visitors at once; the next is refused at once.
    #[serde(default)]
    pub max_serve_conn: Option<u32>,
    /// This many visitors in total, then the tunnel closes.
    #[serde(default)]
    pub max_serve_count: Option<u64>,
    /// The tunnel closes this long after it opened, in milliseconds.
    #[serde(default)]
    pub max_serve_time_ms: Option<u64>,
    /// Only visitors from these networks are let in (when not empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ip: Vec<ipnet::IpNet>,
    /// Visitors from these networks are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_ip: Vec<ipnet::IpNet>,
    /// A free-form description shown by discovery and the API (proxylite's message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Seal this service's data connections with the session key (`encrypt`, frp's
    /// `use_encryption`): each visitor gets keys of its own, see `OpenStream::seal`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypt: bool,
    /// Compress this service's data links (`compress`). The server answers `registered`
    /// with the compression it agreed to; both sides use only that one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<Compression>,
    /// Other clients may reach this service peer-to-peer (`p2p`), by its P2P name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p: Option<PeerPolicy>,
    /// Browsers may reach this service over WebRTC data channels (`webrtc`): the server
    /// passes their offers to the client.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub webrtc: bool,
}

impl ServiceControl {
    /// Whether a visitor from `ip` passes `allow-ip` and `deny-ip`.
    pub fn admits_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        !self.deny_ip.iter().any(|net| net.contains(&ip))
            && (self.allow_ip.is_empty() || self.allow_ip.iter().any(|net| net.contains(&ip)))
    }
}

/// Messages a client sends on its control connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Sent first, in the same write as the preamble: who the client is. The server checks
    /// the id (well-formed, not banned) before it does any cryptographic work.
    Hello {
        /// The user id.
        id: String,
        /// Random id of this client process; a reconnect with the same one replaces a stale session.
        instance: String,
        /// The client's software version.
        software: String,
        /// Labels of this client, for load balancing and the management API.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tags: Vec<String>,
    },
    /// Sent once, in answer to [`ServerMessage::Challenge`]: proves the client knows the
    /// secret of the id its hello named, in the way the challenge asked for.
    Login {
        /// The proof.
        proof: Proof,
    },
    /// Asks for a tunnel; answered by `Registered` or `RegisterFailed` with the same `request`.
    Register {
        /// Chosen by the client to match the answer.
        request: u64,
        /// What to expose.
        spec: ServiceSpec,
        /// Limits for the tunnel.
        #[serde(default)]
        control: ServiceControl,
    },
    /// Closes a tunnel the client no longer wants.
    Unregister {
        /// The id the server gave in `Registered`.
        service: u32,
    },
    /// Asks the server something; answered by `Answer` with the same `request`.
    Query {
        /// Chosen by the client to match the answer.
        request: u64,
        /// The question.
        query: Query,
    },
    /// Heartbeat; the peer answers `Pong` with the same number.
    Ping {
        /// Echoed back.
        seq: u64,
    },
    /// Answer to a server `Ping`.
    Pong {
        /// The number of the ping answered.
        seq: u64,
    },
    /// Asks to reach the P2P service `name` directly; answered by `PeerAnswer` with the
    /// same `request`, once the serving client answered the offer the server passed on.
    PeerConnect {
        /// Chosen by the client to match the answer.
        request: u64,
        /// The P2P name.
        name: String,
        /// Where to punch to this client, and its certificate.
        offer: PeerOffer,
    },
    /// The serving client's answer to [`ServerMessage::PeerOffer`].
    PeerAnswer {
        /// The offer's attempt number.
        attempt: u64,
        /// Where to punch to this client and its certificate, or why not.
        answer: Result<PeerOffer, String>,
    },
    /// The answer to [`ServerMessage::BrowserOffer`]: an SDP answer (JSON, as
    /// `RTCSessionDescription` writes it), or why there is none.
    BrowserAnswer {
        /// The offer's attempt number.
        attempt: u64,
        /// The answer, or why not.
        answer: Result<String, String>,
    },
    /// The browser peer of [`ServerMessage::BrowserOffer`] `attempt` left (its peer
    /// connection closed or went idle): the server stops counting it as a visitor.
    BrowserClosed {
        /// The offer's attempt number.
        attempt: u64,
    },
    /// What became of a peer connection this client asked for (see [`PeerPath`]).
    PeerReport {
        /// The service, as `PeerAnswer` named it.
        service: u32,
        /// What became of it.
        path: PeerPath,
    },
}

/// How the server asks a client to prove its secret (see `auth` and docs/protocol.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Challenge {
    /// The server holds the user's verifier: a SPAKE2 exchange, of which this is the
    /// server's message.
    Pake {
        /// The server's SPAKE2 message.
        message: Vec<u8>,
        /// Whether the verifier is the Argon2id-stretched one (ids learned by
        /// allow-any-client) rather than the plain one.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stretched: bool,
    },
    /// allow-any-client has not met this id: send the stretched verifier it will keep,
    /// sealed under an X25519 exchange.
    Enroll {
        /// The server's X25519 ephemeral key.
        ephemeral_key: [u8; 32],
    },
    /// The server's auth API needs the secret itself: send it sealed under an X25519 exchange.
    Reveal {
        /// The server's X25519 ephemeral key.
        ephemeral_key: [u8; 32],
    },
}

/// A client's answer to a [`Challenge`], of the same method.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Proof {
    /// The client's SPAKE2 message and its confirmation of the key.
    Pake {
        /// The client's SPAKE2 message.
        message: Vec<u8>,
        /// `auth`'s client key confirmation.
        confirm: [u8; 32],
    },
    /// The stretched verifier, sealed.
    Enroll {
        /// The client's X25519 ephemeral key.
        ephemeral_key: [u8; 32],
        /// The verifier, sealed with the agreed key.
        sealed: Vec<u8>,
    },
    /// The secret, sealed.
    Reveal {
        /// The client's X25519 ephemeral key.
        ephemeral_key: [u8; 32],
        /// The secret, sealed with the agreed key.
        sealed: Vec<u8>,
    },
}

/// Which side to upgrade when versions differ.
fn upgrade_hint(server: u16, client: u16) -> &'static str {
    if client < server {
        "upgrade the client to the server's ferry version"
    } else {
        "upgrade the server to the client's ferry version"
    }
}

/// Why the server refused a login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum LoginRefusal {
    /// Wrong secret, or (with allow-any-client) another secret than the first seen.
    #[error("authentication failed for id '{id}'")]
    AuthFailed {
        /// The id that was refused.
        id: String,
    },
    /// The client speaks another protocol version.
    #[error("protocol version mismatch: the server speaks {server}, the client {client}; {}", upgrade_hint(*server, *client))]
    VersionMismatch {
        /// The server's protocol version.
        server: u16,
        /// The client's protocol version.
        client: u16,
    },
    /// Too many failed logins from this address or for this id.
    #[error("too many failed logins; banned for {seconds} more second(s)")]
    Banned {
        /// How long the ban still lasts.
        seconds: u64,
    },
    /// The id is not one the server accepts (see [`ID_RULE`](super::ID_RULE)).
    #[error("the id is not valid: use {}", super::ID_RULE)]
    InvalidId,
    /// The server has no user with this id (never added, or removed): not a failed guess,
    /// so it counts toward no ban, and retrying will not help until the operator adds it.
    #[error("the server has no user '{id}' (never added, or removed); ask its operator")]
    UnknownId {
        /// The id that was refused.
        id: String,
    },
    /// The server (with allow-any-client) already remembers as many ids as it keeps; it
    /// learns no new ones until it restarts. Ids it knows still log in.
    #[error("the server accepts no new ids: it already remembers the most it keeps (allow-any-client); ask its operator")]
    TooManyIds,
    /// The auth API could not be asked; try again later.
    #[error("the server cannot check credentials right now; try again later")]
    AuthUnavailable,
    /// The user already has as many client sessions as allowed.
    #[error("user '{id}' already has {limit} client session(s) connected, the most allowed")]
    TooManySessions {
        /// The user.
        id: String,
        /// The limit.
        limit: u32,
    },
    /// The server needs the secret for its auth API, and the connection cannot carry it safely.
    #[error("the server checks this id with an auth API, which needs the secret: connect with tls:// and a verified certificate")]
    SecretNeeded,
    /// The message was not a valid login.
    #[error("malformed login: {message}")]
    Malformed {
        /// What was wrong.
        message: String,
    },
}

/// Why the server refused to open a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum RegisterError {
    /// The user may open no TCP ports: the server has no `tcp-range`, or the user's own
    /// `tcp` list is empty.
    #[error("{whose} tcp-range is empty: no TCP ports to offer")]
    TcpDisabled {
        /// Whose setting it is: "the server's" or "user ID's".
        #[serde(default = "the_servers")]
        whose: String,
    },
    /// The user may open no UDP ports: the server has no `udp-range`, or the user's own
    /// `udp` list is empty.
    #[error("{whose} udp-range is empty: no UDP ports to offer")]
    UdpDisabled {
        /// Whose setting it is: "the server's" or "user ID's".
        #[serde(default = "the_servers")]
        whose: String,
    },
    /// The port is outside every allowed range.
    #[error("port {port} is not allowed; {whose} {protocol}-range is {ranges}")]
    PortNotAllowed {
        /// The port asked for.
        port: u16,
        /// The allowed ranges, as configured.
        ranges: String,
        /// Whose ranges they are: "the server's" or "user ID's".
        #[serde(default = "the_servers")]
        whose: String,
        /// TCP or UDP.
        #[serde(default)]
        protocol: PortProtocol,
    },
    /// Another tunnel or program holds the port.
    #[error("port {port} is already in use")]
    PortTaken {
        /// The port asked for.
        port: u16,
    },
    /// The user already holds as many ports as `tcp-number` (or a range's `number`) allows.
    #[error("this user already holds {limit} {} port(s), {whose} {protocol}-number", protocol.name())]
    PortLimit {
        /// The configured limit.
        limit: u32,
        /// Whose limit it is: "the server's" or "user ID's".
        #[serde(default = "the_servers")]
        whose: String,
        /// TCP or UDP.
        #[serde(default)]
        protocol: PortProtocol,
    },
    /// Every port in the range is taken.
    #[error("no free port left in {ranges}")]
    NoFreePort {
        /// The allowed ranges, as configured.
        ranges: String,
    },
    /// Another service already holds the host name.
    #[error("host '{host}' is already in use")]
    HostTaken {
        /// The routing key asked for.
        host: String,
    },
    /// The user already holds as many host names as `host-number` allows.
    #[error("this user already holds {limit} host name(s), {whose} host-number")]
    HostLimit {
        /// The configured limit.
        limit: u32,
        /// Whose limit it is: "the server's" or "user ID's".
        #[serde(default = "the_servers")]
        whose: String,
    },
    /// The prefix matches none of the server's `host-regex` patterns, or is not a valid label.
    #[error("host prefix '{}' is not allowed{why}", prefix.escape_debug())]
    HostNotAllowed {
        /// The prefix asked for.
        prefix: String,
        /// More detail, starting with a separator, or empty.
        why: String,
    },
    /// The service's name or message breaks its rule (see [`crate::proto::SERVICE_NAME_RULE`]).
    #[error("the service's {field} is not valid: use {rule}")]
    InvalidService {
        /// `name` or `message`.
        field: String,
        /// What it may be made of.
        rule: String,
    },
    /// Anything else, said in words.
    #[error("{message}")]
    Other {
        /// What went wrong.
        message: String,
    },
}

impl RegisterError {
    /// Whether asking again cannot help until the server's rules or the service's settings
    /// change: no TCP ports, a port or prefix the rules do not allow, an invalid name or
    /// message, anything else the server said in words. A name or port taken, a limit
    /// reached or no free port may pass as other tunnels close: clients ask again later.
    pub fn is_lasting(&self) -> bool {
        !matches!(
            self,
            RegisterError::PortTaken { .. }
                | RegisterError::PortLimit { .. }
                | RegisterError::NoFreePort { .. }
                | RegisterError::HostTaken { .. }
                | RegisterError::HostLimit { .. }
        )
    }
}

/// Whose a limit is when a peer does not say: the server's, as before per-user limits were named.
fn the_servers() -> String {
    "the server's".into()
}

/// Why a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum CloseReason {
    /// The owner cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// The client shut down.
    #[error("client shut down")]
    ClientShutdown,
    /// The server closed it, for the reason given.
    #[error("closed by the server: {message}")]
    ByServer {
        /// The server's words.
        message: String,
    },
    /// It served its `max-serve-count` visitors.
    #[error("served its {count} visitors (max-serve-count)")]
    MaxServeCount {
        /// The limit.
        count: u64,
    },
    /// It was open for its `max-serve-time`.
    #[error("open for its max-serve-time ({millis} ms)")]
    MaxServeTime {
        /// The limit, in milliseconds.
        millis: u64,
    },
    /// Re-registering after a reconnect failed.
    #[error("could not re-register: {0}")]
    Refused(RegisterError),
}

/// Messages the server sends on a control connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The answer to a hello whose id may log in: how the client must prove its secret.
    Challenge {
        /// The way, and the server's first message of it.
        challenge: Challenge,
    },
    /// The login succeeded. Every later frame, both ways, is sealed with the session key.
    Welcome {
        /// Session number, quoted by data connections.
        session: u64,
        /// How often the server pings, in milliseconds.
        heartbeat_interval_ms: u64,
        /// Proof that the server derived the same session key (see
        /// `auth::SessionKey::welcome_confirm`); after a PAKE, that it knows the verifier.
        confirm: [u8; 32],
    },
    /// The login failed; the server closes the connection after this.
    LoginRefused {
        /// Why.
        refusal: LoginRefusal,
    },
    /// A tunnel is open.
    Registered {
        /// The client's request number.
        request: u64,
        /// The server's id for the tunnel, used in `OpenStream`.
        service: u32,
        /// The public port (0 for HTTP services).
        port: u16,
        /// For HTTP services: the host name label that routes to it.
        #[serde(default)]
        host: Option<String>,
        /// The compression of the service's data links, when the server agreed to the one
        /// asked for; absent: none (a server that does not know compression says nothing).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        compress: Option<Compression>,
    },
    /// A tunnel could not be opened.
    RegisterFailed {
        /// The client's request number.
        request: u64,
        /// Why.
        error: RegisterError,
    },
    /// The server closed a tunnel on its own.
    ServiceClosed {
        /// The tunnel.
        service: u32,
        /// Why.
        reason: CloseReason,
    },
    /// The answer to a `Query`.
    Answer {
        /// The client's request number.
        request: u64,
        /// The answer.
        answer: Answer,
    },
    /// Visitors are waiting for data connections: open this many more.
    NeedData {
        /// How many.
        count: u32,
    },
    /// Heartbeat; the peer answers `Pong` with the same number.
    Ping {
        /// Echoed back.
        seq: u64,
    },
    /// Answer to a client `Ping`.
    Pong {
        /// The number of the ping answered.
        seq: u64,
    },
    /// Another client wants to reach one of this client's P2P services: answer with
    /// `PeerAnswer` and the same attempt, then punch to the offer's candidates and accept
    /// a QUIC connection showing its certificate.
    PeerOffer {
        /// Numbers this attempt.
        attempt: u64,
        /// The service wanted.
        service: u32,
        /// The user of the client asking.
        from: String,
        /// Where to punch, and the certificate to accept.
        offer: PeerOffer,
    },
    /// A browser wants to reach `service` over WebRTC: answer with `BrowserAnswer` and the
    /// same attempt, then accept its data channels.
    BrowserOffer {
        /// Numbers this attempt.
        attempt: u64,
        /// The service.
        service: u32,
        /// The browser's address, as the server saw it.
        visitor: SocketAddr,
        /// The browser's SDP offer (JSON, as `RTCSessionDescription` writes it).
        offer: String,
    },
    /// The answer to a `PeerConnect`.
    PeerAnswer {
        /// The client's request number.
        request: u64,
        /// The service and the serving client's offer (none: it offers no direct path,
        /// go through the server), or why the service may not be reached.
        answer: Result<PeerReady, PeerRefusal>,
    },
}

/// A P2P service that may be reached, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReady {
    /// The server's number for the service; named in each direct stream.
    pub service: u32,
    /// The serving client's offer, or why it made none.
    pub offer: Result<PeerOffer, String>,
}

/// First frame of a data connection: which session it belongs to, proven with the session key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataHello {
    /// The session from `Welcome`.
    pub session: u64,
    /// A number used once per session, so a recorded hello cannot be replayed.
    pub seq: u64,
    /// HMAC-SHA256 of session and seq under the session key.
    pub mac: [u8; 32],
}

/// Sent by the server on a pooled data connection when a visitor arrives; raw bytes follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenStream {
    /// The tunnel the visitor came to.
    pub service: u32,
    /// The visitor's address.
    pub visitor: SocketAddr,
    /// For an `encrypt` service: the visitor's number in the session, from which both
    /// sides derive its keys; what follows this message is sealed records (`seal`). A
    /// client refuses a number it has seen, so a replayed open message cannot make it
    /// reuse a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<u64>,
    /// For a UDP flow over QUIC: the number that tags the flow's QUIC datagrams both ways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<u32>,
}

/// One byte the client writes back on a data connection after dialing the local service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStatus {
    /// The local service answered; raw bytes follow.
    Ready = 0,
    /// The local service could not be reached; the connection closes.
    LocalUnavailable = 1,
}

impl StreamStatus {
    /// Decodes the status byte; anything unknown counts as a failure.
    pub fn from_byte(byte: u8) -> Self {
        if byte == 0 {
            StreamStatus::Ready
        } else {
            StreamStatus::LocalUnavailable
        }
    }
}

/// Questions a client may ask the server (proxylite's discovery and free ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "query", rename_all = "snake_case")]
pub enum Query {
    /// The open services of the client's user, with live figures.
    Services,
    /// Up to `limit` ports the user could open a TCP tunnel on now.
    FreePorts {
        /// Most ports wanted (the server caps it at 100).
        limit: u32,
    },
}

/// The server's answers to [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// Open services.
    Services {
        /// One per open tunnel.
        services: Vec<ServiceInfo>,
    },
    /// Free ports.
    FreePorts {
        /// Ports free now (another program may take one before it is asked for).
        ports: Vec<u16>,
    },
}

/// One open service, as discovery and the management API show it (proxylite's ServiceInfo).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The server's id for the tunnel.
    pub id: u32,
    /// The client (session) serving it.
    pub cid: u64,
    /// Its user.
    pub user: String,
    /// Its client's tags.
    pub tags: Vec<String>,
    /// The client's name for it.
    pub name: String,
    /// The client's description of it (`message`).
    pub message: Option<String>,
    /// `tcp`, `http` or `https`.
    pub kind: String,
    /// Where visitors reach it: `host:port` for TCP (the server's domain, else its
    /// listening address), the host name for HTTP and HTTPS.
    pub address: String,
    /// TCP: the public port; 0 for HTTP and HTTPS.
    pub port: u16,
    /// HTTP and HTTPS: the public host name.
    pub host: Option<String>,
    /// Opened at, seconds since the Unix epoch.
    pub birth: u64,
    /// Visitors connected now.
    pub online: u32,
    /// Visitors allowed at once (`max-serve-conn`).
    pub capacity: Option<u32>,
    /// Visitors admitted so far.
    pub served: u64,
    /// Visitors allowed in all (`max-serve-count`).
    pub total_allowed: Option<u64>,
    /// Closes at (`max-serve-time`), seconds since the Unix epoch.
    pub deadline: Option<u64>,
    /// Bytes from visitors to the service.
    pub bytes_in: u64,
    /// Bytes from the service to visitors.
    pub bytes_out: u64,
    /// UDP services: datagrams carried and dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datagrams: Option<DatagramCounts>,
    /// P2P services: their name and the peers connected now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p: Option<PeerCounts>,
}

/// Peers of a P2P service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerCounts {
    /// The name peers reach it by.
    pub name: String,
    /// Peer clients whose direct connection is up.
    pub direct: u32,
    /// Peer connections carried through the server now.
    pub relayed: u32,
}

/// Datagrams through a UDP tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatagramCounts {
    /// From visitors to the service.
    #[serde(rename = "in")]
    pub r#in: u64,
    /// From the service to visitors.
    pub out: u64,
    /// Dropped: too large for the link (over QUIC), past the tunnel's flow cap, refused
    /// visitors, or a flow's queue full while its link opened.
    pub dropped: u64,
}
