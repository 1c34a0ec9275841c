//! `ha-connections`: a client logged in to several servers of a cluster at once (each
//! session to another remote), every tunnel served by each on the same public port or
//! host, so a server lost costs visitors nothing: the others serve them meanwhile.
//!
//! The first session is the client itself; the others are standby clients with the
//! remotes in another order, no forwards and no P2P. All carry one tag of their own, so
//! two sessions that land on the same server share their tunnels there (as tags do)
//! instead of refusing each other.

use crate::config::{ClientConfig, PeerConfig, ServiceConfig, ServiceKind};
use crate::error::ClientError;

use super::Client;

/// `config` with the shared tag, and the standby clients it asks for (none for one session).
pub(super) fn standby(mut config: ClientConfig) -> Result<(ClientConfig, Vec<Client>), ClientError> {
    if config.ha_connections <= 1 {
        return Ok((config, Vec::new()));
    }
    config.tags.push(format!("ha-{:016x}", rand::random::<u64>()));
    let remotes: Vec<_> =
        std::iter::once(config.remote.clone()).chain(config.fallback_remotes.clone()).collect();
    let mut standby = Vec::new();
    for turn in 1..config.ha_connections as usize {
        let mut order = remotes.clone();
        order.rotate_left(turn % remotes.len());
        let mut other = config.clone();
        other.remote = order.remove(0);
        other.fallback_remotes = order;
        other.ha_connections = 1;
        other.forwards = Vec::new();
        other.p2p = PeerConfig::default();
        standby.push(Client::spawn(other)?);
    }
    Ok((config, standby))
}

/// `service` asking for the endpoint the first session got: its port (TCP, UDP); host
/// names are the same already.
pub(super) fn same_endpoint(service: &ServiceConfig, port: u16) -> ServiceConfig {
    let mut service = service.clone();
    match service.kind {
        ServiceKind::Tcp if port != 0 => {
            (service.remote_tcp_port, service.remote_tcp_random) = (Some(port), false)
        }
        ServiceKind::Udp if port != 0 => {
            (service.remote_udp_port, service.remote_udp_random) = (Some(port), false)
        }
        _ => {}
    }
    service
}
