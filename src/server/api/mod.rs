//! The management API (`--api-addr`): status, clients, services, free ports, pings,
//! closing services and kicking clients, Prometheus metrics, an OpenAPI document and
//! a dashboard page. Served over HTTP/1.1, or HTTPS with `--api-cert-file`.
//!
//! Every route but the dashboard page and the OpenAPI document needs
//! `Authorization: Bearer <api-token>` when a token is configured (it must be off
//! loopback). A wrong or missing token is a failed login for the ban rules.

mod metrics;
pub(crate) mod views;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, info, warn};

pub(crate) use metrics::Metrics;

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
struct Peer(SocketAddr);

/// Serves the API on `listener` until `shutdown`.
pub(crate) async fn serve(
    shared: Arc<ServerShared>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let app = router(shared.clone());
    let connections = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(%err, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
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

fn router(shared: Arc<ServerShared>) -> Router {
    let guarded = Router::new()
        .route("/status", get(status))
        .route("/health", get(health))
        .route("/clients", get(clients))
        .route("/clients/{cid}", delete(kick_client))
        .route("/services", get(services))
        .route("/services/{id}", delete(close_service))
        .route("/ports/free", get(free_ports))
        .route("/ping", get(ping))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(shared.clone(), require_token));
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .merge(guarded)
        .with_state(shared)
}

/// Checks the bearer token (when one is configured) in constant time; failures count toward bans.
async fn require_token(
    State(shared): State<Arc<ServerShared>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &shared.config.api_token else {
        return next.run(request).await;
    };
    let peer = request.extensions().get::<Peer>().map(|p| p.0);
    let offender = peer.map(|p| Offender::source(p.ip()));
    if let Some(left) = offender.as_ref().and_then(|o| shared.bans.banned(o)) {
        let message = format!("banned for {} more second(s)", left.as_secs().max(1));
        return error(StatusCode::FORBIDDEN, &message);
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(given.as_bytes().ct_eq(token.expose().as_bytes())) {
        if let Some(offender) = &offender {
            shared.bans.succeeded(offender);
        }
        return next.run(request).await;
    }
    shared.metrics.auth_failed();
    if let Some(offender) = offender {
        if shared.bans.failed(offender) {
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

#[derive(Debug, Deserialize)]
struct FreePortsQuery {
    limit: Option<usize>,
}

async fn free_ports(
    State(shared): State<Arc<ServerShared>>,
    Query(query): Query<FreePortsQuery>,
) -> Response {
    Json(views::free_ports(&shared, query.limit.unwrap_or(10).min(1000)).await).into_response()
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
        let tunnel = session.tunnels().get(&id).cloned();
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
