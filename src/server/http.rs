//! HTTP virtual hosts: a visitor is routed by its first request head (GT's principle) and
//! stays with that service. Every request head on the connection is parsed and rewritten
//! (`http_requests.rs`): forwarding headers are the server's, the host is pinned, and a
//! later request for another host ends the connection instead of reaching that service.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, Instrument};

use super::dispatch::{dispatch, Attempts, Entrance, NotServed};
use super::endpoints::{Endpoint, Member};
use super::handshakes::Handshake;
use super::hosts::{split_client, Lookup, NameKind};
use super::http_head::{head_end, parse_head, rewrite_head, Forwarding, Head, MAX_HEAD};
use super::http_requests::{strip_path_prefix, Pinning, RequestStream};
use super::nodes::Arrived;
use super::session::SessionShared;
use super::tunnel::{Refusal, Tunnel};
use super::{link, nodes, webrtc, ServerShared};
use crate::proto::RegisterError;
use crate::transport::{reset_on_drop, websocket_upgrade_key, Stream};

/// Registers an HTTP service under its host name; the name is released when the service closes.
pub(crate) async fn open_host(
    shared: &Arc<ServerShared>,
    session: &Arc<SessionShared>,
    tunnel: Arc<Tunnel>,
    prefix: Option<String>,
    local_host: Option<String>,
    tls_passthrough: bool,
) -> Result<(u16, Option<String>), RegisterError> {
    if tls_passthrough && shared.config.sni_addr.is_none() {
        return Err(RegisterError::Other {
            message: "the server has no sni-addr for https:// services".into(),
        });
    }
    let rules = session.account.rules();
    let is_user = |id: &str| shared.is_user_id(id);
    let host_key = shared.endpoints.key_for(&rules, &session.user, prefix.as_deref(), is_user)?;
    let (service, watched) = (tunnel.service, tunnel.clone());
    let member = Member { local_host, prefix, ..Member::new(session.clone(), tunnel) };
    let kind = if tls_passthrough { NameKind::Sni } else { NameKind::Http };
    shared.endpoints.reserve_host(&rules, (&host_key, kind), member.clone()).await?;
    nodes::claim_name(shared, (&host_key, kind), &member).await?;
    let (owner, sessions, name) = (shared.clone(), session.clone(), host_key.clone());
    session.tasks.spawn(async move {
        watched.token.cancelled().await;
        owner.endpoints.release_host((&name, kind), service);
        nodes::release_name(&owner, (&name, kind), &sessions.user);
        sessions.forget_tunnel(service);
        watched.gone.cancel();
        info!(host = %name, "http host closed");
    });
    let host = match &shared.config.domain {
        Some(domain) => format!("{host_key}.{domain}"),
        None => host_key,
    };
    Ok((0, Some(host)))
}

/// Serves one HTTP visitor whose first bytes (if any) are in `read`.
pub(crate) async fn serve_visitor(
    shared: Arc<ServerShared>,
    mut visitor: Stream,
    (peer, arrived): (SocketAddr, Arrived),
    mut read: BytesMut,
    scheme: &'static str,
    handshake: Handshake,
) {
    let limit = shared.config.http_header_timeout;
    let head_len = match tokio::time::timeout(limit, read_head(&mut visitor, &mut read)).await {
        Err(_) => return debug!(%peer, "request head not complete in time; closing"),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::TooLarge)) => {
            return respond(&mut visitor, 400, "Bad Request", "The request head is larger than 64 KiB.").await
        }
        Ok(Ok(len)) => len,
    };
    let head = match parse_head(&read[..head_len], &shared.config.http_mux_header) {
        Ok(head) => head,
        Err(why) => return respond(&mut visitor, 400, "Bad Request", &why).await,
    };
    if let Some(key) = websocket_link_key(&shared, &head) {
        let read_ahead = read.split_off(head_len);
        let over_tls = scheme == "https";
        return link::serve_websocket_link(shared, visitor, peer, (&key, read_ahead), over_tls, handshake)
            .await;
    }
    drop(handshake);
    if webrtc::is_well_known(&head.target) {
        return webrtc::serve(shared, visitor, peer, &head, read.split_off(head_len)).await;
    }
    if let Some(label) = nodes::http_held_elsewhere(&shared, &head).filter(|_| arrived == Arrived::Here) {
        let public = visitor.tcp().and_then(|tcp| tcp.local_addr().ok());
        let entrance = nodes::NodeEntrance::Http { tls: scheme == "https" };
        return nodes::relay_name(&shared, (&label, entrance), (visitor, &read), (peer, public)).await;
    }
    let pinning = Pinning {
        route_host: head.route_host.clone(),
        mux_header: shared.config.http_mux_header.clone(),
        path_prefix: None,
        forwarding: Forwarding { local_host: None, peer: peer.ip(), scheme },
        head_timeout: limit,
    };
    let rest = read.split_off(head_len);
    let mut visitor = RequestStream::after_first(visitor, &head, rest, pinning);
    let mut entrance =
        HostEntrance { head: &head, attempts: Attempts::default(), by_path: None, local_host: None };
    let span = tracing::debug_span!("http visitor", %peer, host = %head.route_host);
    dispatch(&shared, &mut entrance, &mut visitor, peer).instrument(span).await;
}

/// The `Sec-WebSocket-Key` of a request that upgrades to a client link: a WebSocket
/// upgrade whose path is the server's `ws-path` (any host; the query is ignored).
fn websocket_link_key(shared: &ServerShared, head: &Head) -> Option<Vec<u8>> {
    let ws_path = shared.config.ws_path.as_deref()?;
    let path = head.target.split('?').next().unwrap_or_default();
    if !head.upgrade || head.method != "GET" || path != ws_path {
        return None;
    }
    websocket_upgrade_key(&head.headers).map(<[u8]>::to_vec)
}

/// An HTTP visitor, routed by its first request head; each attempt looks the route up
/// again, so a client that left is replaced by the next one serving the host.
struct HostEntrance<'a> {
    head: &'a Head,
    attempts: Attempts,
    /// How the route last given was found by path, if it was.
    by_path: Option<PathRoute>,
    /// The Host header of the route last given (`use-local-as-http-host`).
    local_host: Option<String>,
}

impl Entrance for HostEntrance<'_> {
    type Visitor = RequestStream<Stream>;
    type Unrouted = ErrorPage;
    const PASSES_ON_REFUSAL: bool = false;

    fn next_candidate(&mut self, shared: &ServerShared) -> Result<Member, NotServed<ErrorPage>> {
        self.attempts.another()?;
        let (member, by_path) = find_route(shared, self.head).map_err(NotServed::Unrouted)?;
        (self.by_path, self.local_host) = (by_path, member.local_host.clone());
        Ok(member)
    }

    fn first_bytes(&mut self, visitor: &mut RequestStream<Stream>) -> (Cow<'_, [u8]>, usize) {
        let (prefix, target) = self.by_path.take().map_or((None, None), |p| (Some(p.prefix), Some(p.target)));
        visitor.pin(self.local_host.clone(), prefix);
        let early = rewrite_head(self.head, target.as_deref(), visitor.forwarding());
        let read = early.len();
        (Cow::Owned(early), read)
    }

    async fn answer(&mut self, visitor: &mut RequestStream<Stream>, why: NotServed<ErrorPage>) {
        if let NotServed::Cut = why {
            if let Some(tcp) = visitor.get_ref().tcp() {
                reset_on_drop(tcp);
            }
            return;
        }
        let (status, reason, message) = error_page(&self.head.route_host, why);
        respond(visitor.get_mut(), status, reason, &message).await
    }
}

/// The page a visitor gets when it is not served.
fn error_page(host: &str, why: NotServed<ErrorPage>) -> ErrorPage {
    match why {
        NotServed::Unrouted(page) => page,
        NotServed::Denied => {
            (403, "Forbidden", format!("The service for '{host}' does not take visitors from your address."))
        }
        NotServed::Refused(Refusal::AtCapacity | Refusal::UserLimit { .. }) => {
            (503, "Service Unavailable", format!("The service for '{host}' has all the visitors it takes."))
        }
        NotServed::Refused(Refusal::Closed) => {
            (502, "Bad Gateway", format!("The service for '{host}' has closed."))
        }
        NotServed::LocalUnavailable => {
            (502, "Bad Gateway", format!("The service for '{host}' is not reachable from its client."))
        }
        NotServed::NoData | NotServed::Exhausted | NotServed::Cut => {
            (502, "Bad Gateway", format!("The client serving '{host}' has no free connection."))
        }
    }
}

enum HeadError {
    Closed,
    TooLarge,
}

/// Reads until the end of the first request head; returns its length.
async fn read_head(visitor: &mut Stream, read: &mut BytesMut) -> Result<usize, HeadError> {
    let mut searched = 0;
    loop {
        if let Some(len) = head_end(read, searched) {
            return if len > MAX_HEAD { Err(HeadError::TooLarge) } else { Ok(len) };
        }
        if read.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        searched = read.len();
        read.reserve(4096);
        match visitor.read_buf(read).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

type ErrorPage = (u16, &'static str, String);

/// A route found by path (`http-path-routing`): the prefix it was found by, and the
/// target without it.
pub(crate) struct PathRoute {
    prefix: String,
    target: String,
}

/// Finds the service for a request: by the first label of its host, else (when enabled) by
/// path. `CID--label` asks for the client with that id among those serving `label`.
pub(crate) fn find_route(
    shared: &ServerShared,
    head: &Head,
) -> Result<(Member, Option<PathRoute>), ErrorPage> {
    let label = head.route_host.split('.').next().unwrap_or_default();
    if let Some((cid, rest)) = split_client(label) {
        return match shared.endpoints.lookup_client(&Endpoint::Host(rest.to_owned()), cid) {
            Some(route) => Ok((route, None)),
            None => Err((404, "Not Found", format!("Client {cid} serves no tunnel for '{rest}'."))),
        };
    }
    let known_user = shared.users.directory().has_id_ignoring_case(label);
    let lookup = shared.endpoints.lookup(&Endpoint::Host(label.to_owned()), known_user);
    if let Lookup::Online(route) = lookup {
        return Ok((route, None));
    }
    if shared.config.http_path_routing {
        if let Some((route, by_path)) = route_by_path(shared, &head.target) {
            return Ok((route, Some(by_path)));
        }
    }
    match lookup {
        Lookup::Offline => {
            Err((502, "Bad Gateway", format!("The client serving '{}' is offline.", head.route_host)))
        }
        _ => Err((404, "Not Found", format!("No tunnel serves the host '{}'.", head.route_host))),
    }
}

/// `/ID/PREFIX/rest` or `/ID/rest` → the route and the target `/rest` (query kept).
fn route_by_path(shared: &ServerShared, target: &str) -> Option<(Member, PathRoute)> {
    let path_only = target.split('?').next().unwrap_or(target);
    let mut segments = path_only.strip_prefix('/')?.split('/');
    let id = segments.next().filter(|s| !s.is_empty())?;
    let second = segments.next();
    let (route, used) = shared.endpoints.lookup_path(id, second)?;
    let used: Vec<&str> = path_only.trim_start_matches('/').split('/').take(used).collect();
    let prefix = format!("/{}", used.join("/"));
    let target = strip_path_prefix(target, &prefix)?;
    Some((route, PathRoute { prefix, target }))
}

/// Answers with a small HTML page and closes.
async fn respond(visitor: &mut Stream, status: u16, reason: &str, message: &str) {
    let body = format!(
        "<!DOCTYPE html>\n<html><head><title>{status} {reason}</title></head>\
         <body><h1>{status} {reason}</h1><p>{}</p><hr><p>ferry</p></body></html>\n",
        escape_html(message)
    );
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = visitor.write_all(response.as_bytes()).await;
    let _ = visitor.shutdown().await;
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(escape_html("<script>&'\""), "&lt;script&gt;&amp;&#39;&quot;");
    }
}
