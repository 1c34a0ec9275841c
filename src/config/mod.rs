//! Plain configuration structs for the library, and the file/flag layer that fills them.
//!
//! [`ServerConfig`], [`ClientConfig`] and [`ServiceConfig`] are what a program
//! embedding ferry builds by hand. The CLI builds the same structs from flags
//! and a YAML or TOML file through [`options`].

mod error;
pub(crate) mod file;
#[cfg(feature = "cli")]
pub(crate) mod gt;
#[cfg(feature = "cli")]
pub mod options;
mod port_range;
#[cfg(feature = "cli")]
mod process;
mod users_key;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use error::ConfigError;
pub use file::{load_file, load_users_file, overlay, HostOptions, TcpOptions, UserOptions};
pub use port_range::PortRange;
pub use users_key::UsersOption;

use crate::auth::Secret;
use crate::proto::{Compression, PeerPolicy, ProxyProtocol, ServiceControl};
use crate::relay::IdleLimit;
use crate::transport::{Congestion, ProxyAddr, RemoteAddr, RemoteTrust, TlsVersion};

/// Default heartbeat timeout on both sides.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a UDP flow lives without a datagram either way, by default.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(60);

/// Shortest management API token accepted, in bytes.
pub const MIN_API_TOKEN_LEN: usize = 16;

/// Settings of one user on the server; `None` (or empty) falls back to the server-wide value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserConfig {
    /// The user's secret.
    pub secret: Secret,
    /// TCP ports the user may open: each range with how many ports of it at a time.
    /// `None` uses the server's `tcp-range`/`tcp-number`; `Some(empty)` allows no TCP tunnels.
    pub tcp: Option<Vec<TcpAllowance>>,
    /// UDP ports, in the same shape: `None` uses the server's `udp-range`/`udp-number`.
    pub udp: Option<Vec<TcpAllowance>>,
    /// How many host names the user may hold at a time.
    pub host_number: Option<u32>,
    /// Patterns the user's host prefixes must match (any of them).
    pub host_regex: Option<Vec<String>>,
    /// Route the user's hosts as `ID-PREFIX.domain`.
    pub host_with_id: Option<bool>,
    /// Bytes per second across all the user's visitors, each direction.
    pub speed: Option<u64>,
    /// Visitor connections the user may have open at once.
    pub connections: Option<u32>,
    /// Client sessions the user may have connected at once.
    pub sessions: Option<u32>,
}

impl UserConfig {
    /// A user with only a secret: every limit is the server's.
    pub fn new(secret: &str) -> Self {
        UserConfig { secret: Secret::new(secret), ..UserConfig::default() }
    }
}

/// Up to `number` ports at a time out of `range` (GT's `tcp: [{number, range}]`; the same
/// shape serves a user's `udp:` list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpAllowance {
    /// The ports.
    pub range: PortRange,
    /// How many of them one user may hold at a time; `None` is no limit.
    pub number: Option<u32>,
}

/// An external HTTP service that says whether an id and secret may log in (`--auth-api`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthApiConfig {
    /// `https://...`, or `http://` on a loopback address.
    pub url: String,
    /// An answer not complete within this time counts as a refusal.
    pub timeout: Duration,
    /// How long an accepted id and secret are remembered without asking again.
    pub cache: Duration,
}

/// Everything a [`Server`](crate::Server) needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where clients and HTTP visitors connect (`--addr`); `None` (GT's `-addr ""`) for no
    /// plain listener, e.g. a server reached only on `tls-addr` or `sni-addr`.
    pub addr: Option<SocketAddr>,
    /// Where clients connect over TLS (`--tls-addr`), if anywhere.
    pub tls_addr: Option<SocketAddr>,
    /// PEM certificate chains for the TLS listener; the i-th goes with the i-th key,
    /// and each handshake gets the one valid for its server name.
    pub cert_file: Vec<PathBuf>,
    /// PEM private keys for the TLS listener.
    pub key_file: Vec<PathBuf>,
    /// The oldest TLS version accepted on the TLS listener.
    pub tls_min_version: TlsVersion,
    /// Known users by id.
    pub users: BTreeMap<String, UserConfig>,
    /// Accept any id; the first secret seen for an id wins.
    pub allow_any_client: bool,
    /// Ask an HTTP service about ids that are not in `users`.
    pub auth_api: Option<AuthApiConfig>,
    /// Bytes per second per user (each direction, across the user's visitors); `None` is no limit.
    pub speed: Option<u64>,
    /// Visitor connections per user at once; `None` is no limit.
    pub connections: Option<u32>,
    /// Client sessions per user at once; `None` is no limit.
    pub sessions: Option<u32>,
    /// Ports the server may open for TCP tunnels; empty means no TCP tunnels.
    pub tcp_ranges: Vec<PortRange>,
    /// How many TCP ports one user may hold at a time; `None` is no limit.
    pub tcp_number: Option<u32>,
    /// Ports the server may open for UDP tunnels; empty means no UDP tunnels.
    pub udp_ranges: Vec<PortRange>,
    /// How many UDP ports one user may hold at a time; `None` is no limit.
    pub udp_number: Option<u32>,
    /// A UDP flow (one visitor address) silent both ways this long ends.
    pub udp_timeout: Duration,
    /// A client silent this long is considered gone.
    pub heartbeat_timeout: Duration,
    /// Limit for every handshake read (preamble, login, data hello).
    pub handshake_timeout: Duration,
    /// How long a visitor may wait for a free data connection.
    pub data_wait_timeout: Duration,
    /// A pooled data connection unused this long is closed (`--pool-idle-timeout`).
    pub pool_idle_timeout: Duration,
    /// A listener for HTTP visitors only (`--http-addr`); `addr` serves them too.
    pub http_addr: Option<SocketAddr>,
    /// A listener for TLS visitors routed by server name and passed through (`--sni-addr`).
    pub sni_addr: Option<SocketAddr>,
    /// The server's domain, e.g. `example.com`, to tell clients their full host names.
    pub domain: Option<String>,
    /// How many host names one user may hold at a time; `None` is no limit.
    pub host_number: Option<u32>,
    /// Patterns a host prefix must match (any of them); empty allows any valid label.
    pub host_regex: Vec<String>,
    /// Route `ID-PREFIX.domain` instead of `PREFIX.domain`.
    pub host_with_id: bool,
    /// The request header that routes HTTP visitors.
    pub http_mux_header: String,
    /// Also route `http://server/ID/PREFIX/rest` (for servers without wildcard DNS).
    pub http_path_routing: bool,
    /// Clients may connect over WebSocket at this path on the HTTP-serving listeners.
    pub ws_path: Option<String>,
    /// A UDP address for clients over QUIC (`--quic-addr`), with the certificates of
    /// `cert_file`/`key_file`.
    pub quic_addr: Option<SocketAddr>,
    /// The congestion controller of QUIC links.
    pub quic_congestion: Congestion,
    /// A UDP address for the STUN server (`--stun-addr`), if any.
    pub stun_addr: Option<SocketAddr>,
    /// A request head not complete within this time closes the visitor.
    pub http_header_timeout: Duration,
    /// Failed logins in a row (per address, and per id) before a ban; 0 turns bans off.
    pub reconnect_times: u32,
    /// How long a ban lasts.
    pub reconnect_duration: Duration,
    /// Close a visitor connection with no traffic in either direction for this long.
    pub timeout: Option<Duration>,
    /// With `timeout`: also close one whose traffic has gone one way only for that long.
    pub timeout_on_unidirectional_traffic: bool,
    /// The management API and dashboard (`--api-addr`), if anywhere.
    pub api_addr: Option<SocketAddr>,
    /// PEM certificate and key to serve the API over HTTPS.
    pub api_tls: Option<(PathBuf, PathBuf)>,
    /// Oldest TLS version the API accepts (GT's `apiTLSVersion`).
    pub api_tls_min_version: TlsVersion,
    /// Bearer token the API requires; needed unless `api_addr` is a loopback address, and
    /// at least [`MIN_API_TOKEN_LEN`] bytes when given.
    pub api_token: Option<Secret>,
    /// Membership of a cluster of servers (`--cluster-etcd`), if any.
    pub cluster: Option<ClusterConfig>,
}

/// Membership of a cluster of servers sharing one routing table in etcd.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd's client URL.
    pub etcd: String,
    /// This node's id, unique among live nodes.
    pub node_id: String,
    /// Where other nodes reach this one (UDP); port 0 picks one.
    pub node_addr: SocketAddr,
    /// A node silent this long is gone from the cluster (its etcd lease).
    pub lease_ttl: Duration,
    /// Node links show this certificate (PEM chain and key) and accept only nodes whose
    /// certificate chains to the CA (`cluster-cert`, `cluster-key`, `cluster-ca`), besides
    /// the pinning through etcd; `None`: a certificate made at start, pinned only.
    pub tls: Option<ClusterTls>,
}

/// The certificates of node links (`cluster-cert`, `cluster-key`, `cluster-ca`). A node's
/// certificate must name its node id (DNS name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterTls {
    /// PEM certificate chain of this node.
    pub cert: PathBuf,
    /// PEM private key of this node.
    pub key: PathBuf,
    /// PEM CA certificate every node's certificate chains to.
    pub ca: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: Some(SocketAddr::from(([0, 0, 0, 0], 7000))),
            tls_addr: None,
            cert_file: Vec::new(),
            key_file: Vec::new(),
            tls_min_version: TlsVersion::Tls12,
            users: BTreeMap::new(),
            allow_any_client: false,
            auth_api: None,
            speed: None,
            connections: None,
            sessions: None,
            tcp_ranges: Vec::new(),
            tcp_number: None,
            udp_ranges: Vec::new(),
            udp_number: None,
            udp_timeout: DEFAULT_UDP_TIMEOUT,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            handshake_timeout: Duration::from_secs(10),
            data_wait_timeout: Duration::from_secs(10),
            pool_idle_timeout: Duration::from_secs(60),
            http_addr: None,
            sni_addr: None,
            domain: None,
            host_number: None,
            host_regex: Vec::new(),
            host_with_id: false,
            http_mux_header: "Host".into(),
            http_path_routing: false,
            ws_path: None,
            quic_addr: None,
            quic_congestion: Congestion::default(),
            stun_addr: None,
            http_header_timeout: Duration::from_secs(10),
            reconnect_times: 3,
            reconnect_duration: Duration::from_secs(300),
            timeout: None,
            timeout_on_unidirectional_traffic: false,
            api_addr: None,
            api_tls: None,
            api_tls_min_version: TlsVersion::Tls12,
            api_token: None,
            cluster: None,
        }
    }
}

impl ServerConfig {
    /// The idle rule for visitor connections, if `timeout` is set.
    pub(crate) fn idle_limit(&self) -> Option<IdleLimit> {
        self.timeout
            .map(|timeout| IdleLimit { timeout, unidirectional: self.timeout_on_unidirectional_traffic })
    }

    /// Whether the management API must demand a token: it listens off loopback.
    pub fn api_token_required(&self) -> bool {
        self.api_addr.is_some_and(|addr| !addr.ip().is_loopback())
    }

    /// The address tunnels' ports are bound on and announced with: that of `addr`, or else
    /// of `tls-addr`, `sni-addr` or `http-addr`, whichever is set first.
    pub fn public_ip(&self) -> std::net::IpAddr {
        [self.addr, self.tls_addr, self.sni_addr, self.http_addr]
            .into_iter()
            .flatten()
            .map(|addr| addr.ip())
            .next()
            .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]))
    }

    /// Adds a user with a secret; a convenience for programs and tests.
    pub fn with_user(mut self, id: &str, secret: &str) -> Self {
        self.users.insert(id.to_owned(), UserConfig::new(secret));
        self
    }
}

/// Everything a [`Client`](crate::Client) needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server (`--remote`), e.g. `tcp://example.com:7000`, `tls://example.com` or
    /// `wss://example.com/ferry`.
    pub remote: RemoteAddr,
    /// More servers (`--remote` given again), tried in order at each login when the ones
    /// before cannot be reached: e.g. `tls://` after `quic://` for networks that block UDP.
    pub fallback_remotes: Vec<RemoteAddr>,
    /// An API asked for the servers to use at every login (`--remote-api`, GT's
    /// `remoteAPI`; `https://`, or `http://` on loopback): `GET URL?id=ID` answering
    /// `{"remote": "tls://host:port"}` or a list. `remote` and `fallback_remotes` serve when
    /// it cannot be asked.
    pub remote_api: Option<String>,
    /// The order remotes are tried in at each login (`--remote-strategy`).
    pub remote_strategy: RemoteStrategy,
    /// Sessions kept at once, each to another remote (`--ha-connections`): with 2 or more
    /// the client is logged in to several servers of a cluster, each serving its tunnels
    /// on the same public ports and hosts, so losing one server costs no reconnect.
    pub ha_connections: u32,
    /// Most visitors (each a data connection, or a QUIC stream) one tunnel of this client
    /// serves at once (`--remote-connections`); lowers each service's `max_serve_conn`.
    pub remote_connections: Option<u32>,
    /// The user id.
    pub id: String,
    /// The user secret; never sent: it proves itself in a password-authenticated key exchange.
    pub secret: Secret,
    /// How to check the server's certificate on `tls://` and `wss://`.
    pub remote_trust: RemoteTrust,
    /// The congestion controller of `quic://` links (`--quic-congestion`).
    pub quic_congestion: Congestion,
    /// A proxy to reach the server through (`--proxy`; the CLI also reads `HTTPS_PROXY`,
    /// `ALL_PROXY` and `NO_PROXY`, see [`ProxyAddr::from_env`]).
    pub proxy: Option<ProxyAddr>,
    /// Enroll with an allow-any-client server over a connection that does not authenticate
    /// it (`tcp://` to another host, or `--remote-cert-insecure`): a man in the middle of
    /// that first login could learn the stretched verifier of the secret.
    pub remote_enroll_insecure: bool,
    /// First delay before reconnecting; doubles up to `max_reconnect_delay`.
    pub reconnect_delay: Duration,
    /// Upper bound of the reconnect delay (10 s by default: a client finds its server
    /// back within seconds of an outage ending, at the cost of one connect per 10 s while
    /// it lasts).
    pub max_reconnect_delay: Duration,
    /// A server silent this long is considered gone.
    pub heartbeat_timeout: Duration,
    /// Limit for connecting and for each handshake read.
    pub remote_timeout: Duration,
    /// Data connections kept open and idle, ready for visitors.
    pub remote_idle_connections: usize,
    /// Limit for dialing a local service.
    pub local_timeout: Duration,
    /// Labels for this client (`--tag`): clients of one user with a tag in common that
    /// expose services of the same name share their public address, round-robin.
    pub tags: Vec<String>,
    /// How this client makes direct connections to other clients (P2P).
    pub p2p: PeerConfig,
    /// Local ports forwarded to other clients' P2P services (the CLI's `tcp-forward-addr`;
    /// a program calls [`Client::forward`](crate::Client::forward)).
    pub forwards: Vec<ForwardConfig>,
}

/// The order a client tries its remotes in at each login.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteStrategy {
    /// As given: the first that can be reached.
    #[default]
    InOrder,
    /// Shuffled at each login, spreading clients over the servers of a cluster.
    Random,
}

impl std::str::FromStr for RemoteStrategy {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "in-order" => Ok(RemoteStrategy::InOrder),
            "random" => Ok(RemoteStrategy::Random),
            other => Err(format!("'{other}' is not a remote strategy (use in-order or random)")),
        }
    }
}

/// How a client makes direct (P2P) connections to other clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The STUN server that tells this client its public address (`remote-stun`,
    /// `host:port`); `None`: the server's host, on port 3478.
    pub remote_stun: Option<String>,
    /// The UDP ports P2P may use (`p2p-min-port`/`p2p-max-port`); `None`: any.
    pub ports: Option<(u16, u16)>,
    /// A direct connection with no stream for this long closes (`p2p-idle-timeout`).
    pub idle_timeout: Duration,
    /// How long a connection waits for punching before it goes through the server.
    pub punch_deadline: Duration,
}

impl Default for PeerConfig {
    fn default() -> Self {
        PeerConfig {
            remote_stun: None,
            ports: None,
            idle_timeout: Duration::from_secs(300),
            punch_deadline: Duration::from_secs(3),
        }
    }
}

/// A local port whose connections reach another client's P2P service (GT's tcp forward).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardConfig {
    /// Where to listen (`tcp-forward-addr`).
    pub listen: SocketAddr,
    /// The P2P name of the service (`tcp-forward-host-prefix`).
    pub name: String,
    /// Most connections forwarded at once (`tcp-forward-connections`); `None`: no limit.
    pub connections: Option<u32>,
}

impl ForwardConfig {
    /// Forwards connections to `listen` to the P2P service `name`.
    pub fn new(listen: SocketAddr, name: &str) -> Self {
        ForwardConfig { listen, name: name.to_owned(), connections: None }
    }
}

impl ClientConfig {
    /// A configuration with defaults for everything but the server and credentials.
    pub fn new(remote: RemoteAddr, id: &str, secret: &str) -> Self {
        ClientConfig {
            remote,
            fallback_remotes: Vec::new(),
            remote_api: None,
            remote_strategy: RemoteStrategy::default(),
            ha_connections: 1,
            remote_connections: None,
            id: id.to_owned(),
            secret: Secret::new(secret),
            remote_trust: RemoteTrust::System,
            proxy: None,
            quic_congestion: Congestion::default(),
            remote_enroll_insecure: false,
            reconnect_delay: Duration::from_secs(1),
            max_reconnect_delay: Duration::from_secs(10),
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            remote_timeout: Duration::from_secs(10),
            remote_idle_connections: 8,
            local_timeout: Duration::from_secs(10),
            tags: Vec::new(),
            p2p: PeerConfig::default(),
            forwards: Vec::new(),
        }
    }
}

/// What kind of public endpoint a service gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceKind {
    /// Its own public TCP port (`--local tcp://...`).
    #[default]
    Tcp,
    /// A virtual host on the server's HTTP port (`--local http://...`).
    Http,
    /// A TLS service behind the server's SNI port, passed through encrypted (`--local https://...`).
    Https,
    /// Its own public UDP port (`--local udp://...`): datagrams, each visitor address a flow.
    Udp,
}

/// One local service to expose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Name for logs and discovery; defaults to the local address.
    pub name: String,
    /// The local service as `host:port`.
    pub local: String,
    /// TCP port or HTTP virtual host.
    pub kind: ServiceKind,
    /// Public TCP port to ask for; `None` lets the server choose.
    pub remote_tcp_port: Option<u16>,
    /// Take any free port when the one asked for is unavailable.
    pub remote_tcp_random: bool,
    /// Public UDP port to ask for (`udp://` services); `None` lets the server choose.
    pub remote_udp_port: Option<u16>,
    /// Take any free UDP port when the one asked for is unavailable.
    pub remote_udp_random: bool,
    /// Announce each visitor to a TCP service with a PROXY protocol header.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// HTTP: reach the service at `PREFIX.domain` instead of `ID.domain`.
    pub host_prefix: Option<String>,
    /// HTTP: send the local address as the Host of requests.
    pub use_local_as_http_host: bool,
    /// At most this many visitors at once (`max-serve-conn`); the next is refused at once.
    pub max_serve_conn: Option<u32>,
    /// This many visitors in total, then the tunnel closes (`max-serve-count`).
    pub max_serve_count: Option<u64>,
    /// The tunnel closes this long after it opened (`max-serve-time`).
    pub max_serve_time: Option<Duration>,
    /// Only visitors from these networks (`allow-ip`, CIDR); empty allows all.
    pub allow_ip: Vec<ipnet::IpNet>,
    /// Visitors from these networks are refused (`deny-ip`, CIDR).
    pub deny_ip: Vec<ipnet::IpNet>,
    /// A description shown by discovery and the management API (`message`).
    pub message: Option<String>,
    /// Seal the service's data connections with the session key (`encrypt`), for a
    /// `tcp://` link across networks you do not trust; redundant inside `tls://`.
    pub encrypt: bool,
    /// Compress the service's data links (`compress`), when the server agrees.
    pub compress: Option<Compression>,
    /// Other clients may reach the service peer-to-peer (`p2p`, `p2p-only`, `p2p-allow-id`).
    pub p2p: Option<PeerPolicy>,
    /// Browsers may reach the service over WebRTC data channels (`webrtc`).
    pub webrtc: bool,
}

impl ServiceConfig {
    /// A TCP service for `local` (`host:port`), on any port the server picks.
    pub fn tcp(local: &str) -> Self {
        ServiceConfig {
            name: local.to_owned(),
            local: local.to_owned(),
            kind: ServiceKind::Tcp,
            remote_tcp_port: None,
            remote_tcp_random: false,
            remote_udp_port: None,
            remote_udp_random: false,
            proxy_protocol: None,
            host_prefix: None,
            use_local_as_http_host: false,
            max_serve_conn: None,
            max_serve_count: None,
            max_serve_time: None,
            allow_ip: Vec::new(),
            deny_ip: Vec::new(),
            message: None,
            encrypt: false,
            compress: None,
            p2p: None,
            webrtc: false,
        }
    }

    /// An HTTP service for `local` (`host:port`), reached by host name on the server's HTTP port.
    pub fn http(local: &str) -> Self {
        ServiceConfig { kind: ServiceKind::Http, ..ServiceConfig::tcp(local) }
    }

    /// A TLS service for `local` (`host:port`), reached through the server's SNI port; the
    /// server relays the encrypted bytes and never holds the key.
    pub fn https(local: &str) -> Self {
        ServiceConfig { kind: ServiceKind::Https, ..ServiceConfig::tcp(local) }
    }

    /// A UDP service for `local` (`host:port`), on any UDP port the server picks.
    pub fn udp(local: &str) -> Self {
        ServiceConfig { kind: ServiceKind::Udp, ..ServiceConfig::tcp(local) }
    }

    /// Asks for a specific public port (TCP, or UDP for a UDP service).
    pub fn with_remote_port(mut self, port: u16) -> Self {
        match self.kind {
            ServiceKind::Udp => self.remote_udp_port = Some(port),
            _ => self.remote_tcp_port = Some(port),
        }
        self
    }

    /// Falls back to a random free port when the asked one is unavailable.
    pub fn with_random_fallback(mut self) -> Self {
        match self.kind {
            ServiceKind::Udp => self.remote_udp_random = true,
            _ => self.remote_tcp_random = true,
        }
        self
    }

    /// HTTP: asks for the host prefix `prefix`.
    pub fn with_host_prefix(mut self, prefix: &str) -> Self {
        self.host_prefix = Some(prefix.to_owned());
        self
    }

    /// Limits the tunnel (proxylite's service control): visitors at once, in total, and lifetime.
    pub fn with_limits(
        mut self,
        at_once: Option<u32>,
        in_total: Option<u64>,
        lifetime: Option<Duration>,
    ) -> Self {
        self.max_serve_conn = at_once;
        self.max_serve_count = in_total;
        self.max_serve_time = lifetime;
        self
    }

    /// `max_serve_time` in milliseconds, as the protocol carries it.
    pub fn max_serve_time_ms(&self) -> Option<u64> {
        self.max_serve_time.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// The limits as the protocol carries them.
    pub fn control(&self) -> ServiceControl {
        ServiceControl {
            max_serve_conn: self.max_serve_conn,
            max_serve_count: self.max_serve_count,
            max_serve_time_ms: self.max_serve_time_ms(),
            allow_ip: self.allow_ip.clone(),
            deny_ip: self.deny_ip.clone(),
            message: self.message.clone(),
            encrypt: self.encrypt,
            compress: self.compress,
            p2p: self.p2p.clone(),
            webrtc: self.webrtc,
        }
    }

    /// Lets other clients reach the service peer-to-peer, as `policy` says; its P2P name
    /// is its host prefix (or the client's id).
    pub fn with_p2p(mut self, policy: PeerPolicy) -> Self {
        self.p2p = Some(policy);
        self
    }

    /// TCP: announces visitors with a PROXY protocol header.
    pub fn with_proxy_protocol(mut self, version: ProxyProtocol) -> Self {
        self.proxy_protocol = Some(version);
        self
    }
}
