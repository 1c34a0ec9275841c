//! The integration suite, one binary (one link) for every feature area: real servers, clients
//! and local services on loopback.

mod common;
mod compression;

mod api;
mod auth;
mod auth_api;
mod balance;
mod bans;
mod browsers;
mod cli;
mod client_process;
mod cluster;
mod dashboard;
mod discovery;
mod eavesdropper;
mod errors;
mod faults;
mod flood;
mod gt;
mod hooks;
mod hostile;
mod http;
mod layers;
mod names;
mod p2p;
mod ports;
mod proxies;
mod quic_transport;
mod reconnect;
mod remote_api;
mod reuse;
mod sentry;
mod service_control;
mod stun;
mod tcp_tunnel;
mod timeouts;
mod tls;
mod udp_tunnel;
mod users;
mod websocket_tls;
mod ws_transport;
