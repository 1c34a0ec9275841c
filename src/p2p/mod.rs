//! Direct connections between clients (P2P): a UDP socket shared by STUN and QUIC,
//! candidates, punching, and QUIC with pinned certificates. The server only introduces
//! the two sides (`server/peers.rs`); the client decides when to use a direct path and
//! when to go through the server (`client/peering.rs`).

mod browsers;
mod endpoint;
mod socket;

pub(crate) use browsers::Browsers;
pub(crate) use endpoint::PeerEndpoint;
