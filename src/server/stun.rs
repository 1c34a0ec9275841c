//! The server's STUN responder (`--stun-addr`, GT's `-stunAddr`): it answers each Binding
//! request with the address the request came from, so a client behind NAT learns its
//! public (server-reflexive) address for peer-to-peer connections.
//!
//! Anything but a well-formed Binding request, and anything from a banned address, gets
//! no answer; an answer is at most 44 bytes for a request of at least 20, so the port is a
//! poor amplifier.

use std::sync::Arc;

use tokio::net::UdpSocket;
use tracing::debug;

use super::bans::Offender;
use super::ServerShared;
use crate::proto::{binding_success, parse_binding_request, MAX_STUN_MESSAGE};

/// Answers Binding requests on `socket` until the server shuts down.
pub(crate) async fn serve_stun(shared: Arc<ServerShared>, socket: UdpSocket) {
    let mut buf = [0u8; MAX_STUN_MESSAGE];
    loop {
        let received = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        // A datagram longer than the buffer arrives cut, and its length field then no longer
        // matches: it is not answered.
        let (len, peer) = match received {
            Ok(received) => received,
            Err(err) => {
                debug!(%err, "stun receive failed");
                continue;
            }
        };
        if shared.bans.banned(&Offender::source(peer.ip())).is_some() {
            continue;
        }
        let Some(transaction) = parse_binding_request(&buf[..len]) else { continue };
        if let Err(err) = socket.try_send_to(&binding_success(transaction, peer), peer) {
            debug!(%peer, %err, "stun answer not sent");
        }
        shared.metrics.stun_answered();
    }
}
