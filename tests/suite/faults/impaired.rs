//! Bulk transfers over a bad link (100 ms round trip, 2% loss each way, reordering): every
//! byte arrives, through a TCP tunnel and through an HTTP tunnel.
//!
//! One TCP flow at 100 ms and 2% loss moves roughly 100-200 KiB/s, so 64 MiB on one flow
//! would take minutes; the 64 MiB of each tunnel is spread over [`VISITORS`] visitors
//! (each its own data connection), running at once.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::*;
use crate::common::http::{hex, request, serve_http};
use crate::common::{random_bytes, sha256, within};

const TOTAL: usize = 64 * 1024 * 1024;
const VISITORS: usize = 16;
const HTTP_SERVICE: &str = "127.0.0.1:9001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfers_survive_delay_loss_and_reordering() {
    let Some(mut link) = topology("bulk_transfers_survive_delay_loss_and_reordering") else { return };
    within(170, async {
        start_echo(&link);
        serve_http(link.client.listen(HTTP_SERVICE), "bulk");
        let _server = start_server(&link, &["--domain", "example.test"]).await;
        let http = format!("http://{HTTP_SERVICE}");
        let mut client = start_client(&link, &["--local", &http, "--host-prefix", "bulk"]).await;
        let (_, line) = client.line("is reachable at http://", 0, Duration::from_secs(10)).await;
        let host = line.rsplit("http://").next().unwrap().trim_end_matches('/').to_owned();
        link.set(Duration::from_millis(50), 2);

        let start = Instant::now();
        let tcp = async {
            tcp_echoes(&link).await;
            start.elapsed()
        };
        let http = async {
            http_downloads(&link, &host).await;
            start.elapsed()
        };
        let (tcp, http) = tokio::join!(tcp, http);
        let reordered = link.reordered();
        eprintln!(
            "impaired link: 64 MiB echoed through TCP in {tcp:?}, 64 MiB downloaded over HTTP in {http:?} \
             ({VISITORS} visitors each); {reordered} packets overtaken"
        );
        assert!(reordered > 0, "no packet was reordered");
    })
    .await
}

/// [`VISITORS`] visitors echo [`TOTAL`] bytes between them through the TCP tunnel.
async fn tcp_echoes(link: &Link) {
    let visitors = link.server.sockets(VISITORS).into_iter().map(|socket| async move {
        let payload = random_bytes(TOTAL / VISITORS);
        let visitor = socket.connect(Link::server_addr(PUBLIC_PORT)).await.expect("visitor connects");
        let got = crate::common::echo_over(visitor, &payload).await.expect("echo completes");
        assert_eq!(got.len(), payload.len(), "echo length");
        assert_eq!(sha256(&got), sha256(&payload), "echo content");
    });
    futures_util::future::join_all(visitors).await;
}

/// [`VISITORS`] visitors download [`TOTAL`] bytes between them through the HTTP tunnel.
async fn http_downloads(link: &Link, host: &str) {
    let path = format!("/download?n={}", TOTAL / VISITORS);
    let visitors = link.server.sockets(VISITORS).into_iter().map(|socket| {
        let path = path.clone();
        async move {
            let mut visitor =
                socket.connect(Link::server_addr(CONTROL_PORT)).await.expect("visitor connects");
            let response = request(&mut visitor, "GET", &path, host, "", b"").await;
            assert_eq!(response.status, 200);
            assert_eq!(response.body.len(), TOTAL / VISITORS, "download length");
            let sent = response.head.header("x-sha256").expect("the service's hash").to_owned();
            assert_eq!(hex(&Sha256::digest(&response.body)), sent, "download content");
        }
    });
    futures_util::future::join_all(visitors).await;
}
