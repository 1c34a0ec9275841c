//! `--auth-api`: a real HTTP service in the test decides who may log in.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use ferry::{AuthApiConfig, Client, ClientError, ClientState, LoginRefusal, ServerConfig, ServiceConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the API saw: every question, in order.
#[derive(Clone, Default)]
struct Seen {
    questions: Arc<Mutex<Vec<Value>>>,
    calls: Arc<AtomicUsize>,
}

/// good/good is allowed with one connection at a time; good/other is refused; "slow" answers
/// after 5 s; anybody else gets 403.
async fn check(State(seen): State<Seen>, Json(question): Json<Value>) -> (StatusCode, Json<Value>) {
    seen.calls.fetch_add(1, Ordering::SeqCst);
    seen.questions.lock().unwrap().push(question.clone());
    match (question["id"].as_str(), question["secret"].as_str()) {
        (Some("good"), Some("good")) => {
            (StatusCode::OK, Json(json!({"allow": true, "user": {"connections": 1}})))
        }
        (Some("good"), _) => (StatusCode::OK, Json(json!({"allow": false}))),
        (Some("slow"), _) => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            (StatusCode::OK, Json(json!({"allow": true})))
        }
        _ => (StatusCode::FORBIDDEN, Json(json!({}))),
    }
}

async fn auth_api() -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let app = Router::new().route("/check", post(check)).with_state(seen.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

fn with_api(api: SocketAddr) -> ServerConfig {
    let mut config = server_config();
    config.auth_api = Some(AuthApiConfig {
        url: format!("http://{api}/check"),
        timeout: Duration::from_millis(500),
        cache: Duration::from_secs(30),
    });
    config
}

async fn login(server: SocketAddr, id: &str, secret: &str) -> Result<Client, ClientError> {
    Client::connect(client_config(server, id, secret)).await
}

fn refusal(result: Result<Client, ClientError>) -> Option<LoginRefusal> {
    match result {
        Err(ClientError::LoginRefused(refusal)) => Some(refusal),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_allows_with_its_settings_denies_and_is_cached() {
    within(30, async {
        let (api, seen) = auth_api().await;
        let server = start_server(with_api(api)).await;
        let client = login(server.local_addr(), "good", "good").await.expect("the API allows good/good");
        {
            let questions = seen.questions.lock().unwrap();
            assert_eq!(questions[0]["id"], "good");
            let address: SocketAddr = questions[0]["address"].as_str().unwrap().parse().unwrap();
            assert!(address.ip().is_loopback());
        }
        // The settings from the answer apply: one visitor at a time.
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let mut first = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        first.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 2];
        first.read_exact(&mut back).await.unwrap();
        let mut second = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        let _ = second.write_all(b"hi").await;
        let closed = tokio::time::timeout(Duration::from_secs(5), second.read(&mut back)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "the API's connections limit was not applied");

        // A second login within the cache time does not ask again.
        let calls = seen.calls.load(Ordering::SeqCst);
        let again = login(server.local_addr(), "good", "good").await;
        assert!(again.is_ok());
        assert_eq!(seen.calls.load(Ordering::SeqCst), calls, "the allowed answer was not cached");

        assert_eq!(
            refusal(login(server.local_addr(), "good", "other").await),
            Some(LoginRefusal::AuthFailed { id: "good".into() })
        );
        assert_eq!(
            refusal(login(server.local_addr(), "stranger", "x").await),
            Some(LoginRefusal::AuthFailed { id: "stranger".into() })
        );
        // Users configured on the server are not sent to the API.
        let calls = seen.calls.load(Ordering::SeqCst);
        assert!(login(server.local_addr(), "id1", "secret1").await.is_ok());
        assert_eq!(seen.calls.load(Ordering::SeqCst), calls);
        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_dead_api_refuses_and_bans_nobody() {
    within(30, async {
        let (api, _seen) = auth_api().await;
        let server = start_server(with_api(api)).await;
        let started = Instant::now();
        let slow = refusal(login(server.local_addr(), "slow", "x").await);
        assert_eq!(slow, Some(LoginRefusal::AuthUnavailable));
        assert!(started.elapsed() < Duration::from_secs(3), "the API timeout was not applied");
        server.shutdown().await;

        // Nothing listens at the API address any more.
        let dead = free_port().await;
        let mut config = with_api(format!("127.0.0.1:{dead}").parse().unwrap());
        config.reconnect_times = 2;
        let server = start_server(config).await;
        for _ in 0..4 {
            let result = refusal(login(server.local_addr(), "good", "good").await);
            assert_eq!(result, Some(LoginRefusal::AuthUnavailable));
        }
        // Not the client's fault: its address is not banned.
        assert!(login(server.local_addr(), "id1", "secret1").await.is_ok());
        server.shutdown().await;
    })
    .await
}

#[test]
fn the_api_must_be_https_or_on_loopback() {
    let options = ferry::config::options::ServerOptions {
        auth_api: Some("http://auth.example.com/check".into()),
        ..Default::default()
    };
    let error = options.into_config().unwrap_err().to_string();
    assert!(error.contains("auth-api") && error.contains("loopback"), "{error}");
}

/// A user removed from the configured users is disconnected on reload even though an auth
/// API could let the id in; logging in again is up to the API (which refuses "leaving").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_disconnects_removed_users_despite_the_api() {
    within(30, async {
        let (api, _seen) = auth_api().await;
        let config = with_api(api).with_user("leaving", "s");
        let server = start_server(config.clone()).await;
        let leaving = login(server.local_addr(), "leaving", "s").await.expect("a configured user");
        let staying = login(server.local_addr(), "good", "good").await.expect("an API user");
        let mut leaving_state = leaving.state();

        let mut reloaded = config.clone();
        reloaded.users.remove("leaving");
        assert_eq!(server.reload(&reloaded).unwrap(), 1, "the removed user's session was not closed");
        let dropped = leaving_state.wait_for(|s| !matches!(s, ClientState::Connected { .. })).await.is_ok();
        assert!(dropped, "the removed user's client stayed connected");
        assert_eq!(
            refusal(login(server.local_addr(), "leaving", "s").await),
            Some(LoginRefusal::AuthFailed { id: "leaving".into() }),
            "the API decides now"
        );
        assert!(matches!(staying.state().borrow().clone(), ClientState::Connected { .. }), "API users stay");
        server.shutdown().await;
    })
    .await
}
