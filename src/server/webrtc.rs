//! Browser peers (WebRTC): the server answers `/.well-known/ferry/` itself, on every HTTP
//! port and for every host, before any tunnel. `p2p.js` is the module pages import;
//! `offer` takes a browser's SDP offer for the host it was sent to, passes it to the
//! client serving that host (a service with `webrtc`), and answers with the client's SDP
//! answer. The data channels then run between the browser and the client; the server
//! carries none of their bytes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::{debug, info};

use super::dispatch::{admit_first, NotServed};
use super::http::find_route;
use super::http_head::{BodyLength, Head};
use super::session::SessionShared;
use super::signals::ANSWER_WAIT;
use super::tunnel::{Refusal, Visit};
use super::ServerShared;
use crate::proto::ServerMessage;
use crate::transport::Stream;

/// Where the server's own paths start.
pub(crate) const WELL_KNOWN: &str = "/.well-known/ferry/";

/// The module pages import.
const P2P_JS: &str = include_str!("webrtc/p2p.js");

/// Largest SDP offer taken (Chromium's are 1-5 KiB).
const MAX_OFFER: u64 = 64 * 1024;

/// Where a client's answer to a browser's offer goes.
pub(crate) type BrowserWaiter = oneshot::Sender<Result<String, String>>;

/// Offers one address (IPv4, or IPv6 /64) may make per [`OFFER_WINDOW`].
const OFFERS_PER_WINDOW: u32 = 30;
const OFFER_WINDOW: Duration = Duration::from_secs(60);

/// Addresses remembered for the rate limit; past it, windows that ended are forgotten.
const MAX_OFFERERS: usize = 10_000;

/// Browser peers one session may have at once.
const MAX_BROWSER_PEERS: usize = 4096;

/// A session's browser peers, by offer number, each holding its place among the service's
/// visitors (`max-serve-conn`, `max-serve-count`, the user's `connections`) until the
/// client says it left or the session ends.
#[derive(Default)]
pub(crate) struct BrowserPeers(Mutex<HashMap<u64, Visit>>);

impl BrowserPeers {
    /// Whether the session may take one more.
    fn has_room(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len() < MAX_BROWSER_PEERS
    }

    fn joined(&self, attempt: u64, visit: Visit) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(attempt, visit);
    }

    /// The client says the peer of offer `attempt` left.
    pub(crate) fn left(&self, attempt: u64) {
        let visit = self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&attempt);
        if visit.is_none() {
            debug!(attempt, "an unknown browser peer left");
        }
    }
}

/// How many offers each address made in its current window.
#[derive(Default)]
pub(crate) struct OfferRate {
    windows: Mutex<HashMap<u64, (Instant, u32)>>,
}

impl OfferRate {
    /// Counts an offer from `asker`; false when it is over the limit.
    fn allow(&self, asker: u64) -> bool {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if windows.len() >= MAX_OFFERERS {
            windows.retain(|_, (since, _)| now.duration_since(*since) < OFFER_WINDOW);
        }
        if windows.len() >= MAX_OFFERERS && !windows.contains_key(&asker) {
            return false;
        }
        let (since, count) = windows.entry(asker).or_insert((now, 0));
        if now.duration_since(*since) >= OFFER_WINDOW {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        *count <= OFFERS_PER_WINDOW
    }
}

/// Whether a request target is one of the server's own paths.
pub(crate) fn is_well_known(target: &str) -> bool {
    target.starts_with(WELL_KNOWN)
}

/// Answers a request for one of the server's own paths; `read` holds what followed the head.
pub(crate) async fn serve(
    shared: Arc<ServerShared>,
    mut visitor: Stream,
    peer: SocketAddr,
    head: &Head,
    read: BytesMut,
) {
    let path = head.target.split('?').next().unwrap_or_default();
    let (status, kind, body) = match (head.method.as_str(), path.strip_prefix(WELL_KNOWN).unwrap_or_default())
    {
        ("GET", "p2p.js") => (200, "text/javascript; charset=utf-8", P2P_JS.to_owned()),
        ("POST", "offer") => match offer(&shared, &mut visitor, peer, head, read).await {
            Ok(answer) => (200, "application/json", answer),
            Err((status, why)) => (status, "text/plain; charset=utf-8", why),
        },
        _ => (404, "text/plain; charset=utf-8", format!("ferry serves no {} {path}", head.method)),
    };
    let reason = match status {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Bad Request",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         Access-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = visitor.write_all(response.as_bytes()).await;
    let _ = visitor.shutdown().await;
}

type Refused = (u16, String);

/// Passes the offer in the request's body to the client serving the request's host;
/// its answer, or the status and words to refuse with.
async fn offer(
    shared: &Arc<ServerShared>,
    visitor: &mut Stream,
    peer: SocketAddr,
    head: &Head,
    mut read: BytesMut,
) -> Result<String, Refused> {
    if !shared.browser_offers.allow(asker_of(peer.ip())) {
        return Err((429, format!("at most {OFFERS_PER_WINDOW} offers a minute from one address")));
    }
    let BodyLength::Fixed(length) = head.body else {
        return Err((400, "send the offer with a Content-Length".into()));
    };
    if length > MAX_OFFER {
        return Err((413, format!("an offer may have at most {MAX_OFFER} bytes")));
    }
    let limit = shared.config.http_header_timeout;
    let want = length as usize;
    let filled = tokio::time::timeout(limit, async {
        while read.len() < want {
            if visitor.read_buf(&mut read).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok::<(), std::io::Error>(())
    });
    if !matches!(filled.await, Ok(Ok(()))) {
        return Err((400, "the offer did not arrive whole in time".into()));
    }
    let offer =
        String::from_utf8(read[..want].to_vec()).map_err(|_| (400, "the offer is not UTF-8".to_owned()))?;
    // Routed and checked by the same head: the host the browser asked for.
    let (member, _) = find_route(shared, head).map_err(|(status, _, why)| (status, why))?;
    if !member.tunnel.control().webrtc {
        return Err((
            403,
            format!("the service at '{}' does not take browser peers (webrtc)", head.route_host),
        ));
    }
    if !member.session.browser_peers.has_room() {
        return Err((429, "the client serving this host has too many browser peers".into()));
    }
    // Admitted as a visitor is: allow-ip/deny-ip, the program's hook, the limits.
    let admitted = admit_first(shared, || Ok::<_, NotServed<()>>(member.clone()), false, peer);
    let visit = match admitted {
        Ok((_, visit)) => visit,
        Err(NotServed::Denied) => return Err((403, "this address may not reach the service".into())),
        Err(NotServed::Refused(refusal @ Refusal::Closed)) => {
            return Err((502, format!("the service refused: {refusal}")))
        }
        Err(NotServed::Refused(refusal)) => return Err((503, format!("the service refused: {refusal}"))),
        Err(_) => return Err((502, "the service is gone".into())),
    };
    let (waiter, answer) = oneshot::channel();
    let Some(attempt) = shared.browser_signals.insert(asker_of(peer.ip()), member.session.id, waiter) else {
        return Err((429, "too many offers from this address are waiting; try again shortly".into()));
    };
    let message =
        ServerMessage::BrowserOffer { attempt, service: member.tunnel.service, visitor: peer, offer };
    if member.session.outbox.try_send(message).is_err() {
        shared.browser_signals.forget(attempt);
        return Err((502, "the client serving this host is too busy to answer".into()));
    }
    info!(%peer, host = %head.route_host, "browser offer passed to the client");
    match tokio::time::timeout(ANSWER_WAIT, answer).await {
        Ok(Ok(Ok(answer))) => {
            member.session.browser_peers.joined(attempt, visit);
            Ok(answer)
        }
        Ok(Ok(Err(why))) => Err((502, format!("the client refused: {why}"))),
        Ok(Err(_)) => Err((502, "the client left before it answered".into())),
        Err(_) => {
            shared.browser_signals.forget(attempt);
            Err((504, "the client did not answer in time".into()))
        }
    }
}

/// A client answered a browser's offer.
pub(crate) fn answered(
    shared: &ServerShared,
    session: &SessionShared,
    attempt: u64,
    answer: Result<String, String>,
) {
    match shared.browser_signals.take(attempt, session.id) {
        Some(waiter) => {
            let _ = waiter.send(answer);
        }
        None => debug!(attempt, "answer to an unknown or late browser offer"),
    }
}

/// Who is asking, for the per-asker cap: an IPv4 address, or an IPv6 /64.
fn asker_of(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64 | 1 << 63,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_share_of_offers() {
        let rate = OfferRate::default();
        let one = asker_of("192.0.2.1".parse().unwrap());
        assert!((0..OFFERS_PER_WINDOW).all(|_| rate.allow(one)));
        assert!(!rate.allow(one), "over the limit");
        assert!(rate.allow(asker_of("192.0.2.2".parse().unwrap())), "another address");
        let a = asker_of("2001:db8::1".parse().unwrap());
        assert_eq!(a, asker_of("2001:db8::2".parse().unwrap()), "one /64 is one asker");
    }
}
