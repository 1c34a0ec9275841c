//! HTTP virtual hosts: visitors are routed by the first request head alone
//! (GT's principle); after it, bytes are relayed as they are, so keep-alive
//! requests on that connection stay with the same service and bodies are never
//! parsed. Only the first head gets `X-Forwarded-*` headers.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn, Instrument};

use super::hosts::{HostRoute, Hosts, Lookup};
use super::session::SessionShared;
use super::sni::sni_key;
use super::tunnel::{Refusal, Tunnel, Visit};
use super::visit::{relay_visitor, take_data, visitor_allowed, Relay};
use super::ServerShared;
use crate::proto::{OpenStream, RegisterError};
use crate::transport::{reset_on_drop, Stream};

/// Largest request head accepted; a longer one gets 400.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Most headers in a request head.
const MAX_HEADERS: usize = 128;

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
    let host_key = shared.hosts.key_for(&rules, &session.user, prefix.as_deref())?;
    let key = if tls_passthrough { sni_key(&host_key) } else { host_key.clone() };
    let (service, token) = (tunnel.service, tunnel.token.clone());
    let route = HostRoute { session: session.clone(), tunnel, local_host, prefix };
    shared.hosts.reserve(rules.host_number, &key, route).await?;
    let (owner, sessions, name) = (shared.clone(), session.clone(), key.clone());
    session.tasks.spawn(async move {
        token.cancelled().await;
        owner.hosts.release(&name, service);
        sessions.forget_tunnel(service);
        info!(host = %name, "http host closed");
    });
    let host = match &shared.config.domain {
        Some(domain) => format!("{host_key}.{domain}"),
        None => host_key,
    };
    Ok((0, Some(host)))
}

/// The parts of the first request head that routing and rewriting need.
struct Head {
    method: String,
    path: String,
    minor_version: u8,
    headers: Vec<(String, Vec<u8>)>,
    /// The value of the routing header (`http-mux-header`), without port, lowercased.
    route_host: String,
}

/// Serves one HTTP visitor whose first bytes (if any) are in `read`.
pub(crate) async fn serve_visitor(
    shared: Arc<ServerShared>,
    mut visitor: Stream,
    peer: SocketAddr,
    mut read: BytesMut,
    scheme: &'static str,
    handshake: OwnedSemaphorePermit,
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
    drop(handshake);
    // When the chosen client turns out to be gone, the next one serving the host gets the visitor.
    let span = tracing::debug_span!("http visitor", %peer, host = %head.route_host);
    let mut read_ahead = read.len();
    for attempt in 1..=MAX_ATTEMPTS {
        let (route, path) = match find_route(&shared, &head) {
            Ok(found) => found,
            Err((status, reason, message)) => return respond(&mut visitor, status, reason, &message).await,
        };
        if !visitor_allowed(&shared, &route.session, &route.tunnel, peer) {
            let message =
                format!("The service for '{}' does not take visitors from your address.", head.route_host);
            return respond(&mut visitor, 403, "Forbidden", &message).await;
        }
        let _admitted = match admit(&route, &head, peer) {
            Ok(admitted) => admitted,
            Err((status, reason, message)) => return respond(&mut visitor, status, reason, &message).await,
        };
        if attempt == 1 {
            shared.metrics.visitor();
        }
        let Some(data) = take_data(&route.session, shared.config.data_wait_timeout).await else {
            if route.session.closing.is_cancelled() {
                continue;
            }
            break;
        };
        let mut early = rewrite_head(&head, &route, path.as_deref(), peer, scheme);
        early.extend_from_slice(&read[head_len..]);
        let open = OpenStream { service: route.tunnel.service, visitor: peer };
        let idle = shared.config.idle_limit();
        let first = (early.as_slice(), read_ahead);
        let relay = relay_visitor(&route.session, &route.tunnel, data, &mut visitor, &open, first, idle);
        match relay.instrument(span.clone()).await {
            Relay::Finished => return,
            Relay::Unanswered => {}
            Relay::LocalUnavailable => {
                let message =
                    format!("The service for '{}' is not reachable from its client.", head.route_host);
                return respond(&mut visitor, 502, "Bad Gateway", &message).await;
            }
            Relay::Cut => {
                if let Some(tcp) = visitor.tcp() {
                    reset_on_drop(tcp);
                }
                return;
            }
        }
        read_ahead = 0;
    }
    let message = format!("The client serving '{}' has no free connection.", head.route_host);
    respond(&mut visitor, 502, "Bad Gateway", &message).await
}

/// Most clients one visitor is offered to when the chosen ones turn out to be gone.
pub(crate) const MAX_ATTEMPTS: usize = 4;

/// Lets the visitor into the route's tunnel, or says which error page it gets.
fn admit(route: &HostRoute, head: &Head, peer: SocketAddr) -> Result<Visit, ErrorPage> {
    match route.tunnel.admit() {
        Ok(admitted) => Ok(admitted),
        Err(Refusal::AtCapacity) => {
            let message = format!("The service for '{}' has all the visitors it takes.", head.route_host);
            Err((503, "Service Unavailable", message))
        }
        Err(Refusal::UserLimit { limit }) => {
            warn!(%peer, user = %route.session.user, limit, "visitor refused: the user's connections limit is reached");
            let message = format!("The service for '{}' has all the visitors it takes.", head.route_host);
            Err((503, "Service Unavailable", message))
        }
        Err(Refusal::Closed) => {
            let message = format!("The service for '{}' has closed.", head.route_host);
            Err((502, "Bad Gateway", message))
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
        if let Some(at) = read[searched..].windows(4).position(|w| w == b"\r\n\r\n") {
            let len = searched + at + 4;
            return if len > MAX_HEAD { Err(HeadError::TooLarge) } else { Ok(len) };
        }
        if read.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        searched = read.len().saturating_sub(3);
        read.reserve(4096);
        match visitor.read_buf(read).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

fn parse_head(bytes: &[u8], mux_header: &str) -> Result<Head, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("The request head is incomplete.".into()),
        Err(err) => return Err(format!("The request head is malformed: {err}.")),
    }
    let (Some(method), Some(path), Some(minor_version)) = (request.method, request.path, request.version)
    else {
        return Err("The request line is incomplete.".into());
    };
    let headers: Vec<(String, Vec<u8>)> =
        request.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect();
    // Route and authorise from the same parsed value: exactly one routing header.
    let mut values = headers.iter().filter(|(name, _)| name.eq_ignore_ascii_case(mux_header));
    let (Some((_, value)), None) = (values.next(), values.next()) else {
        return Err(format!("The request needs exactly one {mux_header} header."));
    };
    let value = std::str::from_utf8(value).map_err(|_| format!("The {mux_header} header is not text."))?;
    Ok(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        minor_version,
        route_host: strip_port(value.trim()).to_ascii_lowercase(),
        headers,
    })
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

type ErrorPage = (u16, &'static str, String);

/// Finds the service for a request: by the first label of its host, else (when enabled) by
/// path. `CID--label` asks for the client with that id among those serving `label`.
fn find_route(shared: &ServerShared, head: &Head) -> Result<(HostRoute, Option<String>), ErrorPage> {
    let label = head.route_host.split('.').next().unwrap_or_default();
    if let Some((cid, rest)) = Hosts::split_client(label) {
        return match shared.hosts.lookup_client(rest, cid) {
            Some(route) => Ok((route, None)),
            None => Err((404, "Not Found", format!("Client {cid} serves no tunnel for '{rest}'."))),
        };
    }
    let known_user = shared.users.directory().has_id_ignoring_case(label);
    let lookup = shared.hosts.lookup(label, known_user);
    if let Lookup::Online(route) = lookup {
        return Ok((route, None));
    }
    if shared.config.http_path_routing {
        if let Some(found) = route_by_path(shared, &head.path) {
            return Ok(found);
        }
    }
    match lookup {
        Lookup::Offline => {
            Err((502, "Bad Gateway", format!("The client serving '{}' is offline.", head.route_host)))
        }
        _ => Err((404, "Not Found", format!("No tunnel serves the host '{}'.", head.route_host))),
    }
}

/// `/ID/PREFIX/rest` or `/ID/rest` → the route and the path `/rest` (query kept).
fn route_by_path(shared: &ServerShared, path: &str) -> Option<(HostRoute, Option<String>)> {
    let (path_only, query) = path.split_once('?').map_or((path, None), |(p, q)| (p, Some(q)));
    let mut segments = path_only.strip_prefix('/')?.split('/');
    let id = segments.next().filter(|s| !s.is_empty())?;
    let second = segments.next();
    let (route, used) = shared.hosts.lookup_path(id, second)?;
    let rest: Vec<&str> = path_only.trim_start_matches('/').split('/').skip(used).collect();
    let mut new_path = format!("/{}", rest.join("/"));
    if let Some(query) = query {
        new_path.push('?');
        new_path.push_str(query);
    }
    Some((route, Some(new_path)))
}

/// The head sent to the local service: the visitor's, with forwarding headers added.
fn rewrite_head(
    head: &Head,
    route: &HostRoute,
    path: Option<&str>,
    peer: SocketAddr,
    scheme: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let path = path.unwrap_or(&head.path);
    out.extend_from_slice(format!("{} {path} HTTP/1.{}\r\n", head.method, head.minor_version).as_bytes());
    let mut forwarded_for: Vec<u8> = Vec::new();
    let mut original_host: Option<&[u8]> = None;
    for (name, value) in &head.headers {
        if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded_for.extend_from_slice(value);
            forwarded_for.extend_from_slice(b", ");
            continue;
        }
        // Ours replace whatever the visitor claimed.
        if name.eq_ignore_ascii_case("x-forwarded-proto") || name.eq_ignore_ascii_case("x-forwarded-host") {
            continue;
        }
        let value: &[u8] = if name.eq_ignore_ascii_case("host") {
            original_host = Some(value);
            route.local_host.as_deref().map_or(value, str::as_bytes)
        } else {
            value
        };
        push_header(&mut out, name.as_bytes(), value);
    }
    forwarded_for.extend_from_slice(peer.ip().to_canonical().to_string().as_bytes());
    push_header(&mut out, b"X-Forwarded-For", &forwarded_for);
    push_header(&mut out, b"X-Forwarded-Proto", scheme.as_bytes());
    push_header(&mut out, b"X-Forwarded-Host", original_host.unwrap_or(head.route_host.as_bytes()));
    out.extend_from_slice(b"\r\n");
    out
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
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
    fn heads_parse_and_refuse() {
        let head = parse_head(b"GET /a HTTP/1.1\r\nHost: Web.Example.com:8080\r\n\r\n", "Host").unwrap();
        assert_eq!(head.route_host, "web.example.com");
        assert_eq!((head.method.as_str(), head.path.as_str(), head.minor_version), ("GET", "/a", 1));
        let twice = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "Host");
        assert!(twice.is_err());
        assert!(parse_head(b"GET / HTTP/1.1\r\n\r\n", "Host").is_err());
        assert!(parse_head(b"\x00\x01 nonsense\r\n\r\n", "Host").is_err());
        let custom = parse_head(b"GET / HTTP/1.1\r\nX-Tunnel: t1\r\n\r\n", "x-tunnel").unwrap();
        assert_eq!(custom.route_host, "t1");
    }

    #[test]
    fn ports_and_html() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
        assert_eq!(escape_html("<script>&'\""), "&lt;script&gt;&amp;&#39;&quot;");
    }
}
