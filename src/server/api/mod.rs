//! The management API (`--api-addr`): status, clients, services, free ports, pings,
//! closing services and kicking clients, Prometheus metrics, an OpenAPI document and
//! a dashboard page. Served over HTTP/1.1, or HTTPS with `--api-cert-file`.
//!
//! Every route but the dashboard page and the OpenAPI document needs
//! `Authorization: Bearer <api-token>` when a token is configured (it must be off
//! loopback; without one there, every request is refused). A wrong or missing token is
//! a failed attempt for the API's own ban table (apart from client logins, so bad tokens
//! never lock clients out); CORS preflights (`OPTIONS`) are never counted. Without a
//! token, every request must name loopback as its `Host` (see `host.rs`).

pub(crate) mod host;
mod metrics;
mod token;
pub(crate) mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{on, MethodFilter, MethodRouter};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, info, warn};

pub(crate) use metrics::Metrics;
use token::Access;

use super::accept::{accept_until, AcceptErrors};
use super::bans::Offender;
use super::ServerShared;
use crate::proto::CloseReason;
use crate::transport::Stream;

/// The OpenAPI 3 description of every route.
const OPENAPI: &str = include_str!("openapi.json");
/// The dashboard: one page, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");
/// Most time a request head may take.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a client's answer to `/ping`.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The address the request came from, set per connection.
#[derive(Clone, Copy)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// Serves the API on `listener` until `shutdown`.
pub(crate) async fn serve(
    shared: Arc<ServerShared>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let app = router(shared.clone());
    let connections = TaskTracker::new();
    let mut errors = AcceptErrors::new(&shared);
    while let Some((tcp, peer)) = accept_until(&listener, &shutdown, &mut errors).await {
        let (app, tls, shutdown) = (app.clone(), tls.clone(), shutdown.clone());
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(Peer(peer));
                app.clone().call(request)
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
            let stream: Stream = match tls {
                Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => Box::new(stream),
                    _ => return debug!(%peer, "api TLS handshake failed"),
                },
                None => Box::new(tcp),
            };
            let connection = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = shutdown.cancelled() => {
                    // Let the request in flight finish, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = served {
                debug!(%peer, %err, "api connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
}

/// One route: its path, its method (kept for the OpenAPI check) and its handler.
type Route = (&'static str, Method, MethodRouter<Arc<ServerShared>>);

/// A route answering `method` on `path` with `handler`.
fn route<H, T>(path: &'static str, method: Method, handler: H) -> Route
where
    H: Handler<T, Arc<ServerShared>>,
    T: 'static,
{
    // Every method used below is a standard one, which always has a filter.
    let filter = MethodFilter::try_from(method.clone()).expect("a standard HTTP method");
    (path, method, on(filter, handler))
}

/// Routes anyone may load: the dashboard page and the OpenAPI document.
fn open_routes() -> Vec<Route> {
    vec![route("/", Method::GET, dashboard), route("/openapi.json", Method::GET, openapi)]
}

/// Routes behind the token (`require_token`).
fn guarded_routes() -> Vec<Route> {
    vec![
        route("/status", Method::GET, status),
        route("/health", Method::GET, health),
        route("/cluster", Method::GET, cluster),
        route("/clients", Method::GET, clients),
        route("/clients/{cid}", Method::DELETE, kick_client),
        route("/services", Method::GET, services),
        route("/services/{id}", Method::DELETE, close_service),
        route("/ports/free", Method::GET, free_ports),
        route("/ping", Method::GET, ping),
        route("/metrics", Method::GET, metrics),
    ]
}

pub(crate) fn router(shared: Arc<ServerShared>) -> Router {
    let add = |router: Router<_>, (path, _, handler): Route| router.route(path, handler);
    let guarded = guarded_routes()
        .into_iter()
        .fold(Router::new(), add)
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_token));
    open_routes()
        .into_iter()
        .fold(Router::new(), add)
        .merge(guarded)
        .layer(middleware::from_fn_with_state(shared.clone(), require_loopback_host))
        .with_state(shared)
}

/// Without a token, refuses requests whose `Host` is not a loopback name (DNS rebinding).
async fn require_loopback_host(
    State(shared): State<Arc<ServerShared>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if shared.config.api_token.is_some() {
        return next.run(request).await;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !host::is_loopback_host(host) {
        debug!(host, "api: refusing a request for another host name (no api-token is set)");
        let message = "without an api-token, the API answers only requests for localhost, 127.0.0.1 or [::1]";
        return error(StatusCode::FORBIDDEN, message);
    }
    next.run(request).await
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

/// The OpenAPI document as this server applies it: without a token, where the API is
/// open (loopback), no route needs the bearer token, so the document asks for none.
async fn openapi(State(shared): State<Arc<ServerShared>>) -> Response {
    if token::check(&shared.config, None) != Access::Open {
        return ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response();
    }
    match serde_json::from_str::<serde_json::Value>(OPENAPI) {
        Ok(mut document) => {
            document["security"] = json!([]);
            Json(document).into_response()
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the OpenAPI document does not parse"),
    }
}

/// Checks the bearer token (see `token::check`); failures count toward the API's bans.
async fn require_token(
    State(shared): State<Arc<ServerShared>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let access = token::check(&shared.config, given);
    // A CORS preflight never carries the token; no route answers it, and it is no guess.
    if access == Access::Open || request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let bans = &shared.api_bans;
    let peer = request.extensions().get::<Peer>().map(|p| p.0);
    let offender = peer.map(|p| Offender::source(p.ip()));
    if let Some(left) = offender.as_ref().and_then(|o| bans.banned(o)) {
        let message = format!("banned for {} more second(s)", left.as_secs().max(1));
        return error(StatusCode::FORBIDDEN, &message);
    }
    if access == Access::Granted {
        if let Some(offender) = &offender {
            bans.succeeded(offender);
        }
        return next.run(request).await;
    }
    shared.metrics.auth_failed();
    if let Some(offender) = offender {
        if bans.failed(offender) {
            shared.metrics.banned();
            warn!(?peer, "api: address banned after repeated bad tokens");
        }
    }
    let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    response
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn status() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "version": concat!("ferry ", env!("CARGO_PKG_VERSION")) }))
}

async fn health(State(shared): State<Arc<ServerShared>>) -> Json<serde_json::Value> {
    let sessions = shared.registry.sessions();
    let services: usize = sessions.iter().map(|s| s.tunnels().len()).sum();
    Json(json!({ "status": "ok", "clients": sessions.len(), "services": services }))
}

/// The cluster's nodes and where each tunnel lives (`enabled: false` outside a cluster).
async fn cluster(State(shared): State<Arc<ServerShared>>) -> Json<serde_json::Value> {
    let Some(cluster) = shared.cluster() else { return Json(json!({ "enabled": false })) };
    let nodes: Vec<_> = cluster
        .nodes()
        .into_iter()
        .map(|(id, record)| json!({ "id": id, "addr": record.addr.to_string(), "self": id == cluster.node }))
        .collect();
    let tunnels: Vec<_> = cluster
        .claims()
        .into_iter()
        .flat_map(|(kind, name, holders)| {
            holders.into_iter().map(move |h| {
                json!({ "kind": kind.to_string(), "name": name, "route": h.route, "user": h.user,
                        "node": h.node, "session": h.record.session, "service": h.record.service })
            })
        })
        .collect();
    Json(json!({ "enabled": true, "node": cluster.node, "etcd_reachable": cluster.is_reachable(),
                 "nodes": nodes, "tunnels": tunnels }))
}

/// Filters shared by the listing routes.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Filter {
    /// Comma-separated tags; a client matches with any of them.
    tags: Option<String>,
    /// A user id.
    id: Option<String>,
    /// A client id.
    cid: Option<u64>,
}

async fn clients(State(shared): State<Arc<ServerShared>>, Query(filter): Query<Filter>) -> Response {
    Json(views::clients(&shared, &filter)).into_response()
}

async fn services(State(shared): State<Arc<ServerShared>>, Query(filter): Query<Filter>) -> Response {
    Json(views::services(&shared, &filter)).into_response()
}

/// `/ports/free?limit=N`: how many ports to list (clamped to `views::MAX_FREE_PORTS`).
/// Any `u64` is accepted, as the OpenAPI document says, so a large limit is clamped
/// rather than refused on a 32-bit target.
#[derive(Debug, Deserialize)]
struct FreePortsQuery {
    limit: Option<u64>,
}

async fn free_ports(
    State(shared): State<Arc<ServerShared>>,
    Query(query): Query<FreePortsQuery>,
) -> Response {
    let limit = query.limit.map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    Json(views::free_ports(&shared, limit).await).into_response()
}

#[derive(Debug, Deserialize)]
struct PingQuery {
    cid: Option<u64>,
}

async fn ping(State(shared): State<Arc<ServerShared>>, Query(query): Query<PingQuery>) -> Response {
    let Some(cid) = query.cid else {
        return error(StatusCode::BAD_REQUEST, "give the client id: /ping?cid=N");
    };
    let Some(session) = shared.registry.session(cid).filter(|s| !s.closing.is_cancelled()) else {
        return error(StatusCode::NOT_FOUND, "no such client");
    };
    match session.ping(PING_TIMEOUT).await {
        Some(rtt) => Json(json!({ "cid": cid, "rtt_ms": rtt.as_secs_f64() * 1000.0 })).into_response(),
        None => error(StatusCode::GATEWAY_TIMEOUT, "the client did not answer"),
    }
}

async fn kick_client(State(shared): State<Arc<ServerShared>>, Path(cid): Path<u64>) -> Response {
    match shared.registry.session(cid).filter(|s| !s.closing.is_cancelled()) {
        Some(session) => {
            info!(cid, user = %session.user, "api: disconnecting client");
            session.closing.cancel();
            Json(json!({ "closed": cid })).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "no such client"),
    }
}

async fn close_service(State(shared): State<Arc<ServerShared>>, Path(id): Path<u32>) -> Response {
    for session in shared.registry.sessions() {
        // A tunnel already closing is gone for the API, even before its session forgets it.
        let tunnel = session.tunnels().get(&id).filter(|t| !t.token.is_cancelled()).cloned();
        if let Some(tunnel) = tunnel {
            info!(service = id, user = %session.user, "api: closing service");
            tunnel.close(CloseReason::ByServer { message: "closed through the management API".into() });
            return Json(json!({ "closed": id })).into_response();
        }
    }
    error(StatusCode::NOT_FOUND, "no such service")
}

async fn metrics(State(shared): State<Arc<ServerShared>>) -> Response {
    match shared.metrics.render(&shared) {
        Ok(text) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be encoded"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every route the router serves is in the OpenAPI document with the statuses its kind
    /// can return (any: 403 for a foreign Host; a guarded one: 401; a path or query
    /// parameter: 400), and the document names no route the router does not serve.
    #[test]
    fn the_openapi_document_matches_the_router() {
        let document: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let mut served = BTreeSet::new();
        for (guarded, routes) in [(false, open_routes()), (true, guarded_routes())] {
            for (path, method, _) in routes {
                let method = method.as_str().to_ascii_lowercase();
                let operation = &document["paths"][path][&method];
                let responses = &operation["responses"];
                assert!(responses["200"].is_object(), "{method} {path}: no 200");
                assert!(responses["403"].is_object(), "{method} {path}: no 403");
                assert_eq!(responses["401"].is_object(), guarded, "{method} {path}: 401");
                assert_eq!(operation["security"] == json!([]), !guarded, "{method} {path}: security");
                if path.contains('{') || operation["parameters"].is_array() {
                    assert!(responses["400"].is_object(), "{method} {path}: parameters but no 400");
                }
                served.insert(format!("{method} {path}"));
            }
        }
        let paths = document["paths"].as_object().expect("paths");
        let documented: BTreeSet<String> = paths
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object().into_iter().flatten().map(move |(m, _)| format!("{m} {path}"))
            })
            .collect();
        assert_eq!(documented, served);
    }
}
