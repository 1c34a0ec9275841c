//! A server killed mid-transfer and a client frozen past its heartbeat timeout: visitors
//! are closed or refused, never left hanging, and the client comes back on its port.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::common::within;

const HEARTBEAT: [&str; 2] = ["--heartbeat-timeout", "3s"];

/// A visitor that streams into the echo tunnel without end; resolves once `at_least` bytes
/// came back, returning the stream to watch.
async fn streaming_visitor(link: &Link, at_least: usize) -> tokio::net::tcp::OwnedReadHalf {
    let visitor = link.server.connect(Link::server_addr(PUBLIC_PORT)).await.unwrap();
    let (mut reader, mut writer) = visitor.into_split();
    tokio::spawn(async move {
        let chunk = vec![7u8; 64 * 1024];
        while writer.write_all(&chunk).await.is_ok() {}
    });
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < at_least {
        let n = reader.read(&mut buf).await.unwrap();
        assert!(n > 0, "the echo ended early");
        got += n;
    }
    reader
}

/// Reads until the stream ends (EOF or an error); panics if it is still open after `limit`.
async fn ends_within(mut stream: impl AsyncReadExt + Unpin, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let drained = async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(limit, drained).await.expect("the visitor was left hanging");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_transfer_closes_visitors_and_gets_its_client_back() {
    let Some(link) = topology("a_server_killed_mid_transfer_closes_visitors_and_gets_its_client_back") else {
        return;
    };
    within(60, async {
        let echoing = start_echo(&link);
        let mut server = start_server(&link, &HEARTBEAT).await;
        let mut client = start_client(&link, &HEARTBEAT).await;
        let mut visitors = Vec::new();
        for _ in 0..4 {
            visitors.push(streaming_visitor(&link, 1024 * 1024).await);
        }
        server.signal(Signal::SIGKILL);
        server.child.wait().await.unwrap();
        for visitor in visitors {
            ends_within(visitor, Duration::from_secs(2)).await;
        }
        // The client closed their local connections too.
        let local_closed = until(Duration::from_secs(5), "the local connections close", || async {
            echoing.load(std::sync::atomic::Ordering::Relaxed) == 0
        })
        .await;
        let (noticed, line) = client.line("disconnected from the server", 0, Duration::from_secs(10)).await;
        let restarted = Instant::now();
        let _server = start_server(&link, &HEARTBEAT).await;
        let (back, again) = client.line("is reachable at", 1, Duration::from_secs(10)).await;
        assert!(again.ends_with(&format!(":{PUBLIC_PORT}")), "another port: {again}");
        assert_eq!(echo_once(&link, b"after").await.unwrap(), b"after");
        eprintln!(
            "server killed: local connections closed within {local_closed:?}, client noticed ({line}) {:?} \
             before the restart, back {:?} after it",
            restarted - noticed,
            back - restarted
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_client_is_dropped_refused_meanwhile_and_comes_back() {
    let Some(link) = topology("a_frozen_client_is_dropped_refused_meanwhile_and_comes_back") else { return };
    within(60, async {
        start_echo(&link);
        let mut server = start_server(&link, &HEARTBEAT).await;
        let mut client = start_client(&link, &HEARTBEAT).await;
        assert_eq!(echo_once(&link, b"before").await.unwrap(), b"before");

        client.signal(Signal::SIGSTOP);
        let frozen = Instant::now();
        // Arrives while the server still holds the tunnel: it has no client to answer it.
        let early: TcpStream = link.server.connect(Link::server_addr(PUBLIC_PORT)).await.unwrap();
        let (dropped, _) = server.line("client disconnected", 0, Duration::from_secs(10)).await;
        let closed = ends_within(early, Duration::from_secs(15)).await;
        until(Duration::from_secs(2), "the public port is freed", || refused(&link)).await;
        // Visitors that arrive now are refused at once.
        for _ in 0..3 {
            assert!(refused(&link).await, "a visitor was not refused while the client was away");
        }
        tokio::time::sleep(Duration::from_secs(6).saturating_sub(frozen.elapsed())).await;

        client.signal(Signal::SIGCONT);
        let thawed = Instant::now();
        let (noticed, _) = client.line("disconnected from the server", 0, Duration::from_secs(10)).await;
        let (back, again) = client.line("is reachable at", 1, Duration::from_secs(10)).await;
        assert!(again.ends_with(&format!(":{PUBLIC_PORT}")), "another port: {again}");
        assert_eq!(echo_once(&link, b"after").await.unwrap(), b"after");
        eprintln!(
            "frozen client: dropped after {:?}, the early visitor closed {closed:?} after that, \
             noticed {:?} after SIGCONT, back after {:?}",
            dropped - frozen,
            noticed.saturating_duration_since(thawed),
            back - thawed
        );
    })
    .await
}
