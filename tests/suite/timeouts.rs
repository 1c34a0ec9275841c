//! Visitor timeouts: idle both ways, and traffic that goes one way only.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use ferry::{ServerConfig, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn with_timeout(unidirectional: bool) -> ServerConfig {
    let mut config = server_config();
    config.timeout = Some(Duration::from_millis(400));
    config.timeout_on_unidirectional_traffic = unidirectional;
    config
}

/// A service that reads everything and never answers.
async fn black_hole() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = vec![0u8; 4096];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Writes a byte every 50 ms for `lasting`; returns whether the tunnel closed meanwhile.
async fn trickle(visitor: &mut TcpStream, lasting: Duration) -> bool {
    let started = Instant::now();
    let mut buf = [0u8; 16];
    while started.elapsed() < lasting {
        if visitor.write_all(b".").await.is_err() {
            return true;
        }
        if let Ok(read) = tokio::time::timeout(Duration::from_millis(50), visitor.read(&mut buf)).await {
            if matches!(read, Ok(0) | Err(_)) {
                return true;
            }
        }
    }
    false
}

#[tokio::test]
async fn idle_visitors_are_closed_and_busy_ones_are_not() {
    within(30, async {
        let server = start_server(with_timeout(false)).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        // A visitor that keeps talking outlives the timeout several times over.
        let mut busy = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        let mut idle = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        idle.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        idle.read_exact(&mut one).await.unwrap();
        let started = Instant::now();
        let idle_closed = async {
            let mut rest = Vec::new();
            let _ = idle.read_to_end(&mut rest).await;
            started.elapsed()
        };
        let (closed_after, busy_closed) =
            tokio::join!(idle_closed, trickle(&mut busy, Duration::from_millis(1500)));
        assert!(
            closed_after >= Duration::from_millis(300) && closed_after < Duration::from_secs(3),
            "{closed_after:?}"
        );
        assert!(!busy_closed, "a busy visitor was closed");
    })
    .await
}

#[tokio::test]
async fn one_way_traffic_is_closed_only_when_asked() {
    within(30, async {
        let hole = black_hole().await;
        for unidirectional in [false, true] {
            let server = start_server(with_timeout(unidirectional)).await;
            let client = connect(server.local_addr()).await;
            let tunnel = client.add_service(ServiceConfig::tcp(&hole.to_string())).await.unwrap();
            let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
            let closed = trickle(&mut visitor, Duration::from_millis(1500)).await;
            assert_eq!(closed, unidirectional, "unidirectional={unidirectional}");
        }
    })
    .await
}

/// The idle close comes at the last traffic plus the timeout, not up to twice the timeout:
/// traffic just after the relay started must not push the close to the second timer tick.
#[tokio::test]
async fn idle_visitors_close_soon_after_the_timeout() {
    within(30, async {
        let mut config = server_config();
        config.timeout = Some(Duration::from_secs(2));
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        let mut one = [0u8; 1];
        for _ in 0..3 {
            visitor.write_all(b"x").await.unwrap();
            visitor.read_exact(&mut one).await.unwrap();
        }
        let last_traffic = Instant::now();
        let mut rest = Vec::new();
        let _ = visitor.read_to_end(&mut rest).await;
        let closed_after = last_traffic.elapsed();
        assert!(
            closed_after >= Duration::from_millis(1900) && closed_after < Duration::from_millis(3000),
            "closed {closed_after:?} after the last traffic, for a 2 s timeout"
        );
    })
    .await
}
