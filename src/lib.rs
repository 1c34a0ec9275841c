//! ferry: reverse tunnels that expose services behind NAT through a public server.
//!
//! A [`Server`] runs on a public host; a [`Client`] runs next to the private
//! services, logs in over one control connection and asks the server to open
//! public ports ([`Client::add_service`]). Each visitor of a public port is
//! paired with a data connection the client opened in advance; the client
//! dials the local service and bytes are relayed both ways.
//!
//! # Layout
//! - [`proto`]: the wire protocol (preamble, frames, messages); no sockets.
//! - [`transport`]: TCP and TLS links behind one boxed stream type.
//! - [`auth`]: the login's key exchange (SPAKE2), verifiers, session keys.
//! - [`seal`]: encryption of control frames and of `encrypt` services' data.
//! - `server` and `client`: the two actors; [`config`]: what they are built from.
//! - `relay`: the data path: the pump that moves a visitor's bytes as chunks (so data
//!   connections can be reused), its idle watch and traffic accounting.
//!
//! # Features
//! - `cli` (default): the `ferry` binary's parts: flags and config files
//!   (`config::options`), log files, pid files, signals, the demo. Brings clap,
//!   tracing-subscriber, file-rotate, nix and anyhow.
//! - `sentry` (default, needs `cli`): error reporting to Sentry (`--sentry-dsn`).
//!
//! A program embedding ferry needs neither: `ferry = { version = "0.1", default-features = false }`.
//! See `examples/embed_server.rs` and `examples/embed_client.rs`.
//!
//! # Example
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ferry::{Client, ClientConfig, RemoteAddr, Server, ServerConfig, ServiceConfig};
//! let mut config = ServerConfig::default().with_user("id1", "secret1");
//! config.addr = Some("127.0.0.1:0".parse()?);
//! config.tcp_ranges = vec!["20000-30000".parse()?];
//! let server = Server::bind(config).await?.spawn();
//!
//! let remote = RemoteAddr::parse(&server.local_addr().to_string())?;
//! let client = Client::connect(ClientConfig::new(remote, "id1", "secret1")).await?;
//! let tunnel = client.add_service(ServiceConfig::tcp("127.0.0.1:22")).await?;
//! println!("visitors connect to {}", tunnel.public_addr());
//! client.shutdown().await;
//! server.shutdown().await;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
mod client;
mod cluster;
pub mod config;
mod error;
// Entry points for the fuzz targets in fuzz/ (see fuzz/README.md); not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod p2p;
pub mod proto;
pub(crate) mod relay;
pub mod seal;
mod server;
mod session_key;
pub mod transport;

// The `ferry` binary's own parts: flags, logs, pid files, signals, the demo, running them.
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod demo;
#[cfg(feature = "cli")]
pub mod error_reporting;
#[cfg(feature = "cli")]
pub mod logging;
#[cfg(feature = "cli")]
pub mod pid_file;
#[cfg(feature = "cli")]
pub mod run;
#[cfg(feature = "cli")]
pub mod signals;

pub use client::{discover, free_ports, Client, ClientState, Forward, ForwardCounts, Registration};
pub use config::{
    AuthApiConfig, ClientConfig, ClusterConfig, ClusterTls, ConfigError, ForwardConfig, PeerConfig,
    PortRange, RemoteStrategy, ServerConfig, ServiceConfig, TcpAllowance, UserConfig,
};
pub use error::{ClientError, ServerError};
pub use proto::{
    CloseReason, DatagramCounts, LoginRefusal, PeerCounts, PeerPolicy, PeerRefusal, PortProtocol,
    RegisterError, ServiceInfo,
};
pub use server::hooks::{ClientInfo, DisconnectReason, ServerHooks, VisitorInfo};
pub use server::{Reloader, Server, ServerHandle};
pub use transport::{ProxyAddr, ProxyKind, RemoteAddr, RemoteTrust, Scheme};
