//! `--sentry-dsn`: errors reach a Sentry endpoint (here a local one that records envelopes).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;

type Envelopes = Arc<Mutex<Vec<(String, String)>>>;

/// Records the project and the envelope, with the auth header in front of it.
async fn record(
    State(seen): State<Envelopes>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> &'static str {
    let auth = headers.get("x-sentry-auth").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    seen.lock().unwrap().push((project, format!("{auth}\n{}", String::from_utf8_lossy(&body))));
    "{}"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_reports_its_error_to_sentry() {
    within(60, async {
        let seen = Envelopes::default();
        let app = Router::new().route("/api/{project}/envelope/", post(record)).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sentry = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let server = start_server(server_config()).await;

        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["client", "--remote", &format!("tcp://{}", server.local_addr())])
            .args(["--id", "id1", "--secret", "not-the-secret-xyz"])
            .args(["--sentry-dsn", &format!("http://publickey@{sentry}/42")])
            .args(["--sentry-environment", "test-env", "--log-level", "warn"])
            .args(["--local", "tcp://127.0.0.1:1"])
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), output).await.unwrap().unwrap();
        assert!(!output.status.success());

        let envelopes = seen.lock().unwrap().clone();
        let (project, envelope) = envelopes
            .iter()
            .find(|(_, body)| body.contains("authentication failed for id 'id1'"))
            .unwrap_or_else(|| panic!("no error event reached sentry: {envelopes:?}"));
        assert_eq!(project, "42");
        assert!(envelope.contains("\"type\":\"event\""), "{envelope}");
        assert!(envelope.contains("test-env"), "{envelope}");
        assert!(envelope.starts_with("Sentry ") && envelope.contains("sentry_key=publickey"), "{envelope}");
        assert!(envelopes.iter().all(|(_, body)| !body.contains("not-the-secret-xyz")), "the secret leaked");
        server.shutdown().await;
    })
    .await
}
