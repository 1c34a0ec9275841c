//! Flags and config-file keys: one struct per command serves both, so every
//! flag has a key of the same name. Precedence is flag > file > default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::file::{self, one_or_many};
pub use super::file::{load_users_file, overlay, HostOptions, TcpOptions, UserOptions};
use super::process::command_options;
pub use super::process::{CommandOptions, ProcessOptions, ProcessSignal};
pub use super::users_key::UsersOption;
use super::{
    AuthApiConfig, ClientConfig, ClusterConfig, ClusterTls, ConfigError, ForwardConfig, PortRange,
    RemoteStrategy, ServerConfig, ServiceConfig, ServiceKind,
};
use crate::auth::Secret;
use crate::proto::{Compression, PeerPolicy, ProxyProtocol};
use crate::transport::{parse_listen_addr, Congestion, ProxyAddr, RemoteAddr, RemoteTrust, TlsVersion};

command_options! {
"server",
/// Server flags; each is also a config-file key of the same name.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServerOptions {
    /// Config file: YAML, or TOML when the name ends in .toml.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address for clients: 0.0.0.0:7000, :7000 or 7000. [default: 0.0.0.0:7000]
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub addr: Option<String>,
    /// Address for clients over TLS (needs --cert-file and --key-file).
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub tls_addr: Option<String>,
    /// PEM certificate chain for --tls-addr; repeatable with --key-file (several
    /// certificates, picked by the server name each visitor asks for).
    #[arg(long)]
    #[serde(deserialize_with = "one_or_many")]
    pub cert_file: Vec<PathBuf>,
    /// PEM private key of the matching --cert-file.
    #[arg(long)]
    #[serde(deserialize_with = "one_or_many")]
    pub key_file: Vec<PathBuf>,
    /// Oldest TLS version accepted on --tls-addr: tls1.2 or tls1.3. [default: tls1.2]
    #[arg(long)]
    pub tls_min_version: Option<TlsVersion>,
    /// A user id; repeatable, the i-th --id goes with the i-th --secret.
    #[arg(long)]
    pub id: Vec<String>,
    /// The secret of the matching --id.
    #[arg(long)]
    pub secret: Vec<Secret>,
    /// A YAML (or .toml) file of users by id, re-read on reload; it overrides the config
    /// file's users, and --id/--secret override it. In a config file, `users:` takes the
    /// path of such a file or the users themselves: `users: {id1: {secret: s1, speed: 1048576}}`.
    #[arg(long, value_name = "FILE", value_parser = UsersOption::from_flag)]
    pub users: Option<UsersOption>,
    /// Ask this HTTP service whether ids that are not configured here may log in:
    /// https://..., or http:// on a loopback address (it receives the secret).
    #[arg(long)]
    pub auth_api: Option<String>,
    /// An auth API answer not complete in this time is a refusal. [default: 5s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub auth_api_timeout: Option<Duration>,
    /// How long an id and secret accepted by the auth API are remembered. [default: 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub auth_api_cache: Option<Duration>,
    /// Bytes per second each user may move, each direction, across all their visitors.
    /// [default: no limit]
    #[arg(long)]
    pub speed: Option<u64>,
    /// Visitor connections each user may have open at once. [default: no limit]
    #[arg(long)]
    pub connections: Option<u32>,
    /// Client sessions each user may have connected at once. [default: no limit]
    #[arg(long)]
    pub sessions: Option<u32>,
    /// Accept any id; the first secret seen for an id wins.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub allow_any_client: Option<bool>,
    /// Ports TCP tunnels may use, e.g. 1024-65535; repeatable. Without it TCP tunnels are refused.
    #[arg(long)]
    pub tcp_range: Vec<PortRange>,
    /// How many TCP ports one user may hold at a time. [default: no limit]
    #[arg(long)]
    pub tcp_number: Option<u32>,
    /// Ports UDP tunnels may use, e.g. 10000-10100; repeatable. Without it UDP tunnels are refused.
    #[arg(long)]
    pub udp_range: Vec<PortRange>,
    /// How many UDP ports one user may hold at a time. [default: no limit]
    #[arg(long)]
    pub udp_number: Option<u32>,
    /// A UDP flow (one visitor address) silent both ways this long ends, e.g. 30s. [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub udp_timeout: Option<Duration>,
    /// A client silent this long is dropped, e.g. 30s. [default: 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Option<Duration>,
    /// Limit for each handshake read from a new connection. [default: 10s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Option<Duration>,
    /// A client's pooled data connection unused this long is closed (the client opens
    /// fresh ones as visitors come). [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Option<Duration>,
    /// A listener for HTTP visitors only; --addr serves HTTP visitors too.
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub http_addr: Option<String>,
    /// A listener for TLS visitors, routed by the server name of their ClientHello and
    /// passed through encrypted to clients' https:// services.
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub sni_addr: Option<String>,
    /// The server's domain (e.g. example.com), so clients are told their full host names.
    #[arg(long)]
    pub domain: Option<String>,
    /// How many host names one user may hold at a time. [default: no limit]
    #[arg(long)]
    pub host_number: Option<u32>,
    /// A pattern host prefixes must match; repeatable (any one matches).
    #[arg(long)]
    pub host_regex: Vec<String>,
    /// Route ID-PREFIX.domain instead of PREFIX.domain.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub host_with_id: Option<bool>,
    /// The request header that routes HTTP visitors. [default: Host]
    #[arg(long)]
    pub http_mux_header: Option<String>,
    /// Also route http://server/ID/PREFIX/rest, for servers without wildcard DNS.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub http_path_routing: Option<bool>,
    /// Accept clients over WebSocket at this path (e.g. /ferry) on every HTTP-serving
    /// listener (addr, http-addr, tls-addr), so they can sit behind an HTTP reverse proxy.
    /// [default: off]
    #[arg(long)]
    pub ws_path: Option<String>,
    /// A UDP address for clients over QUIC (quic://), e.g. 0.0.0.0:7443, with the
    /// certificates of cert-file/key-file; it may share the port number of tls-addr.
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub quic_addr: Option<String>,
    /// The congestion controller of QUIC links: bbr or cubic. [default: bbr]
    #[arg(long)]
    pub quic_congestion: Option<Congestion>,
    /// A UDP address for a STUN server (RFC 8489 Binding), e.g. 3478: clients behind NAT
    /// learn their public address there for peer-to-peer connections. [default: off]
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub stun_addr: Option<String>,
    /// etcd's client URL (e.g. http://127.0.0.1:2379): this server joins the cluster of
    /// servers sharing it (one routing table; visitors at any node reach every tunnel).
    /// [default: no cluster]
    #[arg(long)]
    pub cluster_etcd: Option<String>,
    /// This node's id in the cluster, unique among live nodes. [default: the host name]
    #[arg(long)]
    pub node_id: Option<String>,
    /// Where other nodes reach this one (UDP, QUIC with mutual certificates pinned through
    /// etcd), e.g. 10.0.0.1:7100. [default: 127.0.0.1:7100]
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub node_addr: Option<String>,
    /// A node silent this long (its etcd lease) is gone from the cluster, with its routes.
    /// [default: 10s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub node_ttl: Option<Duration>,
    /// PEM certificate of this node for node links, naming its node id; with
    /// --cluster-key and --cluster-ca, nodes accept only certificates of that CA (besides
    /// pinning each node's certificate through etcd). [default: one made at start]
    #[arg(long)]
    pub cluster_cert: Option<PathBuf>,
    /// PEM private key of --cluster-cert.
    #[arg(long)]
    pub cluster_key: Option<PathBuf>,
    /// PEM CA certificate that every node's --cluster-cert chains to.
    #[arg(long)]
    pub cluster_ca: Option<PathBuf>,
    /// Failed logins in a row, from one address or for one id, before a ban; 0 turns bans off.
    /// [default: 3]
    #[arg(long)]
    pub reconnect_times: Option<u32>,
    /// How long a ban lasts. [default: 5m]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub reconnect_duration: Option<Duration>,
    /// Close a visitor connection with no traffic either way for this long, e.g. 90s.
    /// [default: never]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// With --timeout: also close a visitor whose traffic has gone one way only for that long.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub timeout_on_unidirectional_traffic: Option<bool>,
    /// Close HTTP visitors whose request head is not complete in this time. [default: 10s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub http_header_timeout: Option<Duration>,
    /// Address of the management API and dashboard, e.g. 127.0.0.1:7500.
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub api_addr: Option<String>,
    /// PEM certificate to serve the API over HTTPS (with --api-key-file).
    #[arg(long)]
    pub api_cert_file: Option<PathBuf>,
    /// PEM private key of --api-cert-file.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Oldest TLS version the API accepts over HTTPS: tls1.2 or tls1.3. [default: tls1.2]
    #[arg(long)]
    pub api_tls_min_version: Option<TlsVersion>,
    /// Bearer token for the API (or FERRY_API_TOKEN); required unless --api-addr is loopback.
    #[arg(long, env = "FERRY_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,
}
}

command_options! {
"client",
/// Client flags; each is also a config-file key of the same name.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ClientOptions {
    /// Config file: YAML, or TOML when the name ends in .toml.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The server: tcp://host:port, tls://host:port, quic://host:port,
    /// ws://host:port/path, wss://host:port/path or host:port. Repeatable: each login
    /// tries them in order until one can be reached (e.g. quic:// then tls://).
    #[arg(long)]
    #[serde(deserialize_with = "one_or_many")]
    pub remote: Vec<String>,
    /// Ask this API for the server at every login (GT's remoteAPI): GET URL?id=ID answering
    /// {"remote": "tls://host:port"} or a list; https://, or http:// on loopback. --remote,
    /// if given, serves when the API cannot be asked.
    #[arg(long)]
    pub remote_api: Option<String>,
    /// The order remotes are tried in at each login: in-order (the first that answers) or
    /// random (spreads clients over a cluster's servers). [default: in-order]
    #[arg(long)]
    pub remote_strategy: Option<RemoteStrategy>,
    /// Sessions kept at once, each to another --remote (servers of one cluster): every
    /// tunnel is served by each, on the same ports and hosts, so losing a server costs
    /// no reconnect (cloudflared's model). [default: 1]
    #[arg(long)]
    pub ha_connections: Option<u32>,
    /// Most visitors (data connections, or QUIC streams) one tunnel serves at once; lowers
    /// each service's max-serve-conn. [default: no limit]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub remote_connections: Option<u32>,
    /// Reach the server through this proxy: http://[user:pass@]host:port (HTTP CONNECT) or
    /// socks5://[user:pass@]host:port. [default: HTTPS_PROXY or ALL_PROXY unless NO_PROXY
    /// names the server]
    #[arg(long)]
    pub proxy: Option<String>,
    /// The congestion controller of a quic:// link: cubic or bbr. [default: cubic]
    #[arg(long)]
    pub quic_congestion: Option<Congestion>,
    /// User id.
    #[arg(long)]
    pub id: Option<String>,
    /// User secret (or the FERRY_SECRET environment variable); never sent over the wire.
    #[arg(long, env = "FERRY_SECRET", hide_env_values = true)]
    pub secret: Option<Secret>,
    /// CA certificate (PEM) to trust for tls:// instead of the system roots, or the server's own
    /// certificate (e.g. a self-signed one), which is then pinned.
    #[arg(long)]
    pub remote_cert: Option<PathBuf>,
    /// Accept any server certificate on tls:// (encrypted but not authenticated).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub remote_cert_insecure: Option<bool>,
    /// Enroll with an allow-any-client server (the first login of a new id) even where the
    /// connection does not authenticate the server (tcp:// to another host): a man in the
    /// middle of that one login could learn a stretched verifier of the secret.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub remote_enroll_insecure: Option<bool>,
    /// Limit for connecting to the server and each handshake read. [default: 10s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub remote_timeout: Option<Duration>,
    /// Data connections kept ready for visitors. [default: 8]
    #[arg(long)]
    pub remote_idle_connections: Option<usize>,
    /// First delay before reconnecting; doubles up to 10 s, with jitter. [default: 1s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub reconnect_delay: Option<Duration>,
    /// A server silent this long is considered gone. [default: 30s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub heartbeat_timeout: Option<Duration>,
    /// Limit for dialing a local service. [default: 10s]
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub local_timeout: Option<Duration>,
    /// A label for this client; repeatable. Clients of one user sharing a tag and a
    /// service name share that service's public address, visitors spread round-robin.
    #[arg(long)]
    pub tag: Vec<String>,
    /// Listen here and carry each connection to another client's P2P service (GT's tcp
    /// forward), directly when punching works, else through the server; repeatable, paired
    /// in order with --tcp-forward-host-prefix.
    #[arg(long)]
    #[serde(deserialize_with = "one_or_many")]
    pub tcp_forward_addr: Vec<String>,
    /// The P2P name (host prefix) of the service each --tcp-forward-addr reaches.
    #[arg(long)]
    #[serde(deserialize_with = "one_or_many")]
    pub tcp_forward_host_prefix: Vec<String>,
    /// Most connections each --tcp-forward-addr forwards at once (one value: all of them).
    /// [default: no limit]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    #[serde(deserialize_with = "one_or_many")]
    pub tcp_forward_connections: Vec<u32>,
    /// The STUN server (host:port) that tells this client its public address for P2P.
    /// [default: the server's host, port 3478]
    #[arg(long)]
    pub remote_stun: Option<String>,
    /// Lowest UDP port P2P may bind (GT: webrtc-min-port). [default: any]
    #[arg(long, alias = "webrtc-min-port")]
    #[serde(alias = "webrtc-min-port")]
    pub p2p_min_port: Option<u16>,
    /// Highest UDP port P2P may bind (GT: webrtc-max-port). [default: any]
    #[arg(long, alias = "webrtc-max-port")]
    #[serde(alias = "webrtc-max-port")]
    pub p2p_max_port: Option<u16>,
    /// A direct P2P connection with nothing to carry for this long closes (GT:
    /// webrtc-connection-idle-timeout). [default: 5m]
    #[arg(long, alias = "webrtc-connection-idle-timeout", value_parser = humantime::parse_duration)]
    #[serde(alias = "webrtc-connection-idle-timeout", with = "humantime_serde")]
    pub p2p_idle_timeout: Option<Duration>,
    /// Services to expose: each `--local` on the command line starts one (config file: `services:`).
    #[arg(skip)]
    pub services: Vec<ServiceOptions>,
}
}

/// One service: on the command line a `--local` and the flags after it, in a file an item of `services:`.
#[derive(Debug, Clone, Default, clap::Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct ServiceOptions {
    /// The local service: tcp://127.0.0.1:22 (or 127.0.0.1:22), http://127.0.0.1:8080 (a virtual
    /// host on the server's HTTP port), https://127.0.0.1:8443 (TLS passed through by SNI) or
    /// udp://127.0.0.1:53 (a public UDP port).
    #[arg(long)]
    pub local: Option<String>,
    /// Public port to ask the server for.
    #[arg(long)]
    pub remote_tcp_port: Option<u16>,
    /// Take a random free port when --remote-tcp-port is taken or not allowed.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub remote_tcp_random: Option<bool>,
    /// Public UDP port to ask the server for (udp:// services).
    #[arg(long)]
    pub remote_udp_port: Option<u16>,
    /// Take a random free UDP port when --remote-udp-port is taken or not allowed.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub remote_udp_random: Option<bool>,
    /// TCP: announce each visitor to the local service with a PROXY header (v1 or v2).
    #[arg(long)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// HTTP: reach the service at PREFIX.domain (or ID-PREFIX.domain) instead of ID.domain.
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub host_prefix: Option<String>,
    /// HTTP: send requests to the local service with its own address as Host.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub use_local_as_http_host: Option<bool>,
    /// At most this many visitors at once; the next is refused at once.
    #[arg(long)]
    pub max_serve_conn: Option<u32>,
    /// Serve this many visitors in total, then close the tunnel.
    #[arg(long)]
    pub max_serve_count: Option<u64>,
    /// Close the tunnel this long after it opened, e.g. 10m.
    #[arg(long, value_parser = humantime::parse_duration)]
    #[serde(with = "humantime_serde")]
    pub max_serve_time: Option<Duration>,
    /// Only let in visitors from this network (CIDR, e.g. 203.0.113.0/24); repeatable.
    #[arg(long, value_parser = parse_net)]
    pub allow_ip: Vec<ipnet::IpNet>,
    /// Refuse visitors from this network (CIDR); repeatable; wins over --allow-ip.
    #[arg(long, value_parser = parse_net)]
    pub deny_ip: Vec<ipnet::IpNet>,
    /// A description shown by discovery and the server's API.
    #[arg(long)]
    pub message: Option<String>,
    /// Seal this service's data with the session key (ChaCha20-Poly1305), like frp's
    /// use_encryption: for tcp:// links across networks you do not trust.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub encrypt: Option<bool>,
    /// Compress this service's traffic between client and server (zstd), when the server
    /// agrees: pays on text, logs and other compressible data over slow links.
    #[arg(long)]
    pub compress: Option<Compression>,
    /// Let this user's other clients reach the service peer-to-peer (their
    /// --tcp-forward-host-prefix names its --host-prefix, or this client's id).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub p2p: Option<bool>,
    /// Peers only: no public port or host at all (implies --p2p).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub p2p_only: Option<bool>,
    /// Let clients of this user id reach the P2P service too; repeatable.
    #[arg(long)]
    pub p2p_allow_id: Vec<String>,
    /// Let browsers reach this service directly over WebRTC data channels (pages use
    /// the server's /.well-known/ferry/p2p.js); http:// and tcp:// services.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub webrtc: Option<bool>,
    /// A name for logs. [default: the local address]
    #[arg(long)]
    pub name: Option<String>,
}

/// Accepts a number where a string is meant (GT's `hostPrefix: 1`).
fn string_or_number<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(Option::<serde_json::Value>::deserialize(deserializer)?.and_then(|value| match value {
        serde_json::Value::String(text) => Some(text),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }))
}

/// A network in CIDR notation; a bare address is a network of one.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("'{text}' is not an address or network such as 10.0.0.0/8"))
}

/// Reads a command's config file, in ferry's shape or in GT's (`options:`, `version:`,
/// camelCase keys: see `gt.rs`). Errors name the file, and the key and line where they can.
pub fn load_file<T: DeserializeOwned + Default>(path: &Path) -> Result<T, ConfigError> {
    let file = format!("config file {}", path.display());
    parse_config(&file::read_text(path, &file)?, file::is_toml(path), &file)
}

/// Parses the text of the config file named `file` (TOML when `toml`, else YAML), in
/// ferry's shape or in GT's.
pub(crate) fn parse_config<T: DeserializeOwned + Default>(
    text: &str,
    toml: bool,
    file: &str,
) -> Result<T, ConfigError> {
    let Ok(mut value) = file::parse_text::<serde_json::Value>(text, toml, file) else {
        return file::parse_text(text, toml, file);
    };
    let service_keys = match serde_json::to_value(ServiceOptions::default()) {
        Ok(serde_json::Value::Object(keys)) => keys.into_iter().map(|(key, _)| key).collect(),
        _ => Vec::new(),
    };
    if !super::gt::adopt_file(&mut value, &service_keys).map_err(|e| e.within(&format!("{file}: ")))? {
        // Parsed again from the text, so errors keep their line numbers.
        return file::parse_text(text, toml, file);
    }
    serde_json::from_value(value).map_err(|e| ConfigError::new(file, e.to_string()))
}

/// Loads the config file (if any) and lays the flags over it: flag > file > default.
pub fn resolve<T: Serialize + DeserializeOwned + Default>(
    flags: T,
    config: Option<&Path>,
) -> Result<T, ConfigError> {
    match config {
        Some(path) => overlay(load_file(path)?, flags),
        None => Ok(flags),
    }
}

/// Parses the listen address of `key`, if given.
fn listen_addr(key: &str, addr: &Option<String>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    addr.as_deref().map(parse_listen_addr).transpose().map_err(|e| ConfigError::new(key, e.to_string()))
}

impl ServerOptions {
    /// Checks every value and builds the server configuration; errors name the key.
    pub fn into_config(mut self) -> Result<ServerConfig, ConfigError> {
        let mut config = ServerConfig::default();
        self.listeners_into(&mut config)?;
        self.users_into(&mut config)?;
        config.speed = self.speed;
        config.connections = self.connections;
        config.sessions = self.sessions;
        config.tcp_ranges = self.tcp_range;
        config.tcp_number = self.tcp_number;
        config.udp_ranges = self.udp_range;
        config.udp_number = self.udp_number;
        config.udp_timeout = self.udp_timeout.unwrap_or(config.udp_timeout);
        config.heartbeat_timeout = self.heartbeat_timeout.unwrap_or(config.heartbeat_timeout);
        config.handshake_timeout = self.handshake_timeout.unwrap_or(config.handshake_timeout);
        config.pool_idle_timeout = self.pool_idle_timeout.unwrap_or(config.pool_idle_timeout);
        config.domain = self.domain;
        config.host_number = self.host_number;
        config.host_regex = self.host_regex;
        config.host_with_id = self.host_with_id.unwrap_or(false);
        if let Some(header) = self.http_mux_header {
            config.http_mux_header = header;
        }
        config.http_path_routing = self.http_path_routing.unwrap_or(false);
        config.ws_path = self.ws_path;
        config.quic_congestion = self.quic_congestion.unwrap_or_default();
        config.http_header_timeout = self.http_header_timeout.unwrap_or(config.http_header_timeout);
        config.reconnect_times = self.reconnect_times.unwrap_or(config.reconnect_times);
        config.timeout = self.timeout;
        config.timeout_on_unidirectional_traffic = self.timeout_on_unidirectional_traffic.unwrap_or(false);
        config.reconnect_duration = self.reconnect_duration.unwrap_or(config.reconnect_duration);
        config.validate()?;
        Ok(config)
    }

    /// The listeners, their certificates and the management API.
    fn listeners_into(&mut self, config: &mut ServerConfig) -> Result<(), ConfigError> {
        // GT's `-addr ""`: no plain listener.
        if self.addr.as_deref() == Some("") {
            config.addr = None;
        } else if let Some(addr) = listen_addr("addr", &self.addr)? {
            config.addr = Some(addr);
        }
        config.tls_addr = listen_addr("tls-addr", &self.tls_addr)?;
        config.quic_addr = listen_addr("quic-addr", &self.quic_addr)?;
        config.stun_addr = listen_addr("stun-addr", &self.stun_addr)?;
        config.cert_file = std::mem::take(&mut self.cert_file);
        config.key_file = std::mem::take(&mut self.key_file);
        config.tls_min_version = self.tls_min_version.unwrap_or_default();
        config.http_addr = listen_addr("http-addr", &self.http_addr)?;
        config.sni_addr = listen_addr("sni-addr", &self.sni_addr)?;
        config.api_addr = listen_addr("api-addr", &self.api_addr)?;
        config.api_tls_min_version = self.api_tls_min_version.unwrap_or_default();
        config.api_tls = match (self.api_cert_file.take(), self.api_key_file.take()) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(ConfigError::new("api-cert-file", "needs api-key-file, and the other way round"))
            }
        };
        config.api_token = self.api_token.take();
        config.cluster = self.cluster_into()?;
        Ok(())
    }

    /// The cluster membership, when `cluster-etcd` is given.
    fn cluster_into(&mut self) -> Result<Option<ClusterConfig>, ConfigError> {
        let Some(etcd) = self.cluster_etcd.take() else {
            for (key, given) in [("node-id", self.node_id.is_some()), ("node-addr", self.node_addr.is_some())]
            {
                if given {
                    return Err(ConfigError::new(key, "needs cluster-etcd"));
                }
            }
            return Ok(None);
        };
        // A DNS name: node certificates name their node id.
        let is_name = |id: &str| {
            !id.is_empty()
                && id.len() <= 63
                && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                && !id.starts_with(['-', '.'])
        };
        let node_id = match self.node_id.take() {
            Some(id) if !is_name(&id) => {
                return Err(ConfigError::new("node-id", "1 to 63 letters, digits, '-' or '.' (a DNS name)"))
            }
            Some(id) => id,
            None => std::env::var("HOSTNAME").ok().filter(|h| is_name(h)).unwrap_or_else(|| "node".into()),
        };
        let tls = match (self.cluster_cert.take(), self.cluster_key.take(), self.cluster_ca.take()) {
            (Some(cert), Some(key), Some(ca)) => Some(ClusterTls { cert, key, ca }),
            (None, None, None) => None,
            _ => {
                return Err(ConfigError::new(
                    "cluster-cert",
                    "give cluster-cert, cluster-key and cluster-ca together",
                ))
            }
        };
        let node_addr = listen_addr("node-addr", &self.node_addr)?
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 7100)));
        if node_addr.ip().is_unspecified() {
            // Other nodes dial this address: it must be one of this machine's own.
            return Err(ConfigError::new(
                "node-addr",
                "give the address other nodes reach this one at, not 0.0.0.0 or ::",
            ));
        }
        let lease_ttl = self.node_ttl.unwrap_or(Duration::from_secs(10));
        if lease_ttl < Duration::from_secs(2) {
            return Err(ConfigError::new("node-ttl", "at least 2s"));
        }
        Ok(Some(ClusterConfig { etcd, node_id, node_addr, lease_ttl, tls }))
    }

    /// The users, by precedence: --id/--secret > users file > the config file's `users:`;
    /// and who else may log in.
    fn users_into(&mut self, config: &mut ServerConfig) -> Result<(), ConfigError> {
        if self.id.len() != self.secret.len() {
            let reason = format!(
                "{} id(s) but {} secret(s); give one --secret per --id",
                self.id.len(),
                self.secret.len()
            );
            return Err(ConfigError::new("id", reason));
        }
        let users = self.users.take().unwrap_or_default();
        for (id, options) in users.inline {
            let user = options.into_config(true).map_err(|e| e.within(&format!("users.{id}.")))?;
            config.users.insert(id, user);
        }
        if let Some(path) = &users.file {
            config.users.extend(load_users_file(path)?);
        }
        for (id, secret) in self.id.drain(..).zip(self.secret.drain(..)) {
            config.users.entry(id).or_default().secret = secret;
        }
        config.allow_any_client = self.allow_any_client.unwrap_or(false);
        config.auth_api = self.auth_api.take().map(|url| AuthApiConfig {
            url,
            timeout: self.auth_api_timeout.unwrap_or(Duration::from_secs(5)),
            cache: self.auth_api_cache.unwrap_or(Duration::from_secs(30)),
        });
        Ok(())
    }
}

impl ClientOptions {
    /// Checks every value and builds the client and service configurations; errors name the key.
    pub fn into_config(self) -> Result<(ClientConfig, Vec<ServiceConfig>), ConfigError> {
        let missing = |key: &str, hint: &str| ConfigError::new(key, format!("missing{hint}"));
        let mut remotes = self.remote.iter().map(|remote| RemoteAddr::parse(remote));
        let remote = remotes
            .next()
            .ok_or_else(|| missing("remote", " (e.g. --remote tcp://example.com:7000, or --remote-api URL)"))?
            .map_err(|e| ConfigError::new("remote", e.to_string()))?;
        let fallback_remotes =
            remotes.collect::<Result<Vec<_>, _>>().map_err(|e| ConfigError::new("remote", e.to_string()))?;
        let id = self.id.ok_or_else(|| missing("id", ""))?;
        let secret = self.secret.ok_or_else(|| missing("secret", " (or set FERRY_SECRET)"))?;
        let mut config = ClientConfig::new(remote, &id, secret.expose());
        config.fallback_remotes = fallback_remotes;
        config.remote_api = self.remote_api;
        config.remote_strategy = self.remote_strategy.unwrap_or_default();
        config.ha_connections = self.ha_connections.unwrap_or(1);
        config.remote_connections = self.remote_connections;
        config.remote_trust = match (self.remote_cert, self.remote_cert_insecure.unwrap_or(false)) {
            (Some(_), true) => {
                return Err(ConfigError::new("remote-cert-insecure", "cannot be combined with remote-cert"))
            }
            (Some(path), false) => RemoteTrust::CaFile(path),
            (None, true) => RemoteTrust::Insecure,
            (None, false) => RemoteTrust::System,
        };
        config.proxy = match self.proxy {
            Some(url) => Some(ProxyAddr::parse(&url)),
            None => ProxyAddr::from_env(&config.remote.host),
        }
        .transpose()
        .map_err(|e| ConfigError::new("proxy", e.to_string()))?;
        config.quic_congestion = self.quic_congestion.unwrap_or_default();
        config.remote_enroll_insecure = self.remote_enroll_insecure.unwrap_or(false);
        config.remote_timeout = self.remote_timeout.unwrap_or(config.remote_timeout);
        config.remote_idle_connections =
            self.remote_idle_connections.unwrap_or(config.remote_idle_connections);
        config.reconnect_delay = self.reconnect_delay.unwrap_or(config.reconnect_delay);
        config.heartbeat_timeout = self.heartbeat_timeout.unwrap_or(config.heartbeat_timeout);
        config.local_timeout = self.local_timeout.unwrap_or(config.local_timeout);
        config.tags = self.tag;
        config.forwards =
            forwards(self.tcp_forward_addr, self.tcp_forward_host_prefix, self.tcp_forward_connections)?;
        config.p2p.remote_stun = self.remote_stun;
        config.p2p.ports = match (self.p2p_min_port, self.p2p_max_port) {
            (None, None) => None,
            (min, max) => Some((min.unwrap_or(1024), max.unwrap_or(u16::MAX))),
        };
        config.p2p.idle_timeout = self.p2p_idle_timeout.unwrap_or(config.p2p.idle_timeout);
        config.validate()?;
        let services = self
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.into_config().map_err(|e| e.within(&format!("services[{i}]."))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((config, services))
    }
}

impl ServiceOptions {
    /// Checks the values and builds the service configuration.
    pub fn into_config(self) -> Result<ServiceConfig, ConfigError> {
        let local = self.local.ok_or_else(|| ConfigError::new("local", "missing"))?;
        let (kind, address) = match local.split_once("://") {
            Some(("tcp", rest)) => (ServiceKind::Tcp, rest),
            Some(("http", rest)) => (ServiceKind::Http, rest),
            Some(("https", rest)) => (ServiceKind::Https, rest),
            Some(("udp", rest)) => (ServiceKind::Udp, rest),
            Some((scheme, _)) => {
                return Err(ConfigError::new(
                    "local",
                    format!("scheme '{scheme}' is not supported (use tcp://, http://, https:// or udp://)"),
                ))
            }
            None => (ServiceKind::Tcp, local.as_str()),
        };
        let address = address.trim_end_matches('/').to_owned();
        let address = match (kind, address.contains(':')) {
            (_, true) => address,
            (ServiceKind::Http, false) => format!("{address}:80"),
            (ServiceKind::Https, false) => format!("{address}:443"),
            (ServiceKind::Tcp | ServiceKind::Udp, false) => {
                return Err(ConfigError::new(
                    "local",
                    format!("'{local}' needs a port, e.g. tcp://127.0.0.1:22 or udp://127.0.0.1:53"),
                ))
            }
        };
        if kind != ServiceKind::Udp && (self.remote_udp_port.is_some() || self.remote_udp_random.is_some()) {
            return Err(ConfigError::new("remote-udp-port and remote-udp-random", "are for udp:// services"));
        }
        if kind == ServiceKind::Udp && self.remote_tcp_random.is_some() {
            return Err(ConfigError::new(
                "remote-tcp-random",
                "is for tcp:// services (use remote-udp-random)",
            ));
        }
        if kind == ServiceKind::Udp && self.compress.is_some() {
            return Err(ConfigError::new("compress", "is for stream services, not udp://"));
        }
        if kind == ServiceKind::Udp && self.encrypt == Some(true) {
            return Err(ConfigError::new(
                "encrypt",
                "is for stream services; a udp:// service is sealed only inside tls://, wss:// or quic://",
            ));
        }
        if kind != ServiceKind::Tcp && (self.remote_tcp_port.is_some() || self.proxy_protocol.is_some()) {
            return Err(ConfigError::new("remote-tcp-port and proxy-protocol", "are for tcp:// services"));
        }
        if kind == ServiceKind::Https && self.use_local_as_http_host.is_some() {
            return Err(ConfigError::new("use-local-as-http-host", "is for http:// services"));
        }
        let p2p =
            self.p2p.unwrap_or(false) || self.p2p_only.unwrap_or(false) || !self.p2p_allow_id.is_empty();
        if self.webrtc == Some(true) && matches!(kind, ServiceKind::Udp | ServiceKind::Https) {
            return Err(ConfigError::new("webrtc", "is for http:// and tcp:// services"));
        }
        if p2p && kind == ServiceKind::Udp {
            return Err(ConfigError::new("p2p", "is for stream services, not udp://"));
        }
        // A P2P TCP service is named by its host prefix.
        let prefix_allowed = kind == ServiceKind::Tcp && p2p && self.use_local_as_http_host.is_none();
        if matches!(kind, ServiceKind::Tcp | ServiceKind::Udp)
            && !prefix_allowed
            && (self.host_prefix.is_some() || self.use_local_as_http_host.is_some())
        {
            return Err(ConfigError::new(
                "host-prefix and use-local-as-http-host",
                "are for http:// services",
            ));
        }
        Ok(ServiceConfig {
            name: self.name.unwrap_or_else(|| address.clone()),
            local: address,
            kind,
            remote_tcp_port: self.remote_tcp_port,
            remote_tcp_random: self.remote_tcp_random.unwrap_or(false),
            remote_udp_port: self.remote_udp_port,
            remote_udp_random: self.remote_udp_random.unwrap_or(false),
            proxy_protocol: self.proxy_protocol,
            host_prefix: self.host_prefix,
            use_local_as_http_host: self.use_local_as_http_host.unwrap_or(false),
            max_serve_conn: self.max_serve_conn,
            max_serve_count: self.max_serve_count,
            max_serve_time: self.max_serve_time,
            allow_ip: self.allow_ip,
            deny_ip: self.deny_ip,
            message: self.message,
            encrypt: self.encrypt.unwrap_or(false),
            compress: self.compress,
            p2p: p2p
                .then(|| PeerPolicy { only: self.p2p_only.unwrap_or(false), allow_ids: self.p2p_allow_id }),
            webrtc: self.webrtc.unwrap_or(false),
        })
    }
}

/// The forwards of `tcp-forward-addr`, each with the name and limit at its position.
fn forwards(
    addrs: Vec<String>,
    names: Vec<String>,
    limits: Vec<u32>,
) -> Result<Vec<ForwardConfig>, ConfigError> {
    if addrs.len() != names.len() {
        return Err(ConfigError::new(
            "tcp-forward-host-prefix",
            format!(
                "{} given for {} tcp-forward-addr; give one per address, in the same order",
                names.len(),
                addrs.len()
            ),
        ));
    }
    if limits.len() > 1 && limits.len() != addrs.len() {
        return Err(ConfigError::new(
            "tcp-forward-connections",
            "give one value for all forwards, or one per tcp-forward-addr",
        ));
    }
    addrs
        .iter()
        .zip(names)
        .enumerate()
        .map(|(i, (addr, name))| {
            let listen =
                parse_listen_addr(addr).map_err(|e| ConfigError::new("tcp-forward-addr", e.to_string()))?;
            let connections = limits.get(i).or(limits.first()).copied();
            Ok(ForwardConfig { listen, name, connections })
        })
        .collect()
}
