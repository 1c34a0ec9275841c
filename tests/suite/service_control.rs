//! proxylite's service control: visitors at once, visitors in total, lifetime.

use std::time::{Duration, Instant};

use crate::common::http::{get, http_service};
use crate::common::*;
use ferry::{CloseReason, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects and proves the visitor reaches the echo service; the connection stays open.
async fn connected_visitor(addr: &str) -> TcpStream {
    let mut visitor = TcpStream::connect(addr).await.unwrap();
    visitor.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    visitor.read_exact(&mut back).await.unwrap();
    visitor
}

/// True when the peer closed the connection without sending anything.
async fn closed_at_once(mut visitor: TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(tokio::time::timeout(Duration::from_secs(5), visitor.read(&mut buf)).await, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn max_serve_conn_refuses_the_next_visitor_at_once() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let service = ServiceConfig::tcp(&echo.to_string()).with_limits(Some(2), None, None);
        let tunnel = client.add_service(service).await.unwrap();
        let first = connected_visitor(tunnel.public_addr()).await;
        let _second = connected_visitor(tunnel.public_addr()).await;
        let third = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        assert!(closed_at_once(third).await, "a third visitor was let in");
        drop(first);
        // The freed slot is taken again (the close reaches the server asynchronously).
        let mut admitted = false;
        for _ in 0..100 {
            let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
            if visitor.write_all(b"hi").await.is_ok() {
                let mut back = [0u8; 2];
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(200), visitor.read_exact(&mut back)).await
                {
                    admitted = true;
                    break;
                }
            }
        }
        assert!(admitted, "the slot of the visitor that left was never given back");
    })
    .await
}

#[tokio::test]
async fn max_serve_count_closes_the_tunnel_after_its_visitors() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let service = ServiceConfig::tcp(&echo.to_string()).with_limits(None, Some(3), None);
        let mut tunnel = client.add_service(service).await.unwrap();
        let public = tunnel.public_addr().parse().unwrap();
        for i in 0..3u8 {
            assert_eq!(echo_through(public, &[i; 10]).await.unwrap(), [i; 10]);
        }
        assert_eq!(tunnel.closed().await, CloseReason::MaxServeCount { count: 3 });
        // The listener closes on the server's side of the message; give it a moment.
        let mut closed = false;
        for _ in 0..200 {
            if TcpStream::connect(public).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the port stayed open");
    })
    .await
}

#[tokio::test]
async fn max_serve_time_closes_the_tunnel_and_its_visitors() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let service =
            ServiceConfig::tcp(&echo.to_string()).with_limits(None, None, Some(Duration::from_millis(600)));
        let started = Instant::now();
        let mut tunnel = client.add_service(service).await.unwrap();
        let visitor = connected_visitor(tunnel.public_addr()).await;
        assert_eq!(tunnel.closed().await, CloseReason::MaxServeTime { millis: 600 });
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert!(closed_at_once(visitor).await, "the open visitor outlived its tunnel");
    })
    .await
}

#[tokio::test]
async fn http_services_answer_503_at_capacity() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let service = ServiceConfig::http(&a.to_string()).with_limits(Some(1), None, None);
        let _ = client.add_service(service).await.unwrap();
        // One visitor holds the only slot: it was served once and keeps its connection alive.
        let mut holder = TcpStream::connect(server.local_addr()).await.unwrap();
        let served = crate::common::http::request(&mut holder, "GET", "/", "id1.example.com", "", b"").await;
        assert_eq!(served.status, 200);
        let refused = get(server.local_addr(), "/", "id1.example.com").await;
        assert_eq!(refused.status, 503);
        assert!(refused.text().contains("all the visitors it takes"), "{}", refused.text());
    })
    .await
}

/// Restarts the server on the same address and waits until `client` is connected again.
async fn restart(server: ferry::ServerHandle, client: &ferry::Client) -> ferry::ServerHandle {
    let addr = server.local_addr();
    let mut state = client.state();
    server.shutdown().await;
    state.wait_for(|s| !matches!(s, ferry::ClientState::Connected { .. })).await.unwrap();
    let mut config = server_config();
    config.addr = Some(addr);
    let restarted = start_server(config).await;
    state.wait_for(|s| matches!(s, ferry::ClientState::Connected { .. })).await.unwrap();
    restarted
}

/// One echo visit, retried while the public port is not open yet (refused visits reach no
/// tunnel, so they do not count).
async fn one_visit(public: std::net::SocketAddr) {
    for _ in 0..500 {
        if let Ok(got) = echo_through(public, b"ping").await {
            assert_eq!(got, b"ping");
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the tunnel never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_serve_count_and_time_hold_across_a_reconnect() {
    within(60, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let counted = ServiceConfig::tcp(&echo.to_string()).with_limits(None, Some(3), None);
        let mut counted = client.add_service(counted).await.unwrap();
        let opened = Instant::now();
        let timed =
            ServiceConfig::tcp(&echo.to_string()).with_limits(None, None, Some(Duration::from_secs(4)));
        let mut timed = client.add_service(timed).await.unwrap();
        let public = counted.public_addr().parse().unwrap();
        one_visit(public).await;
        one_visit(public).await;
        tokio::time::sleep(Duration::from_millis(1500)).await; // part of the timed tunnel's life
        let server = restart(server, &client).await;
        // One visitor left of three, and about 2.5 s of four.
        one_visit(public).await;
        let reason = tokio::time::timeout(Duration::from_secs(10), counted.closed()).await.unwrap();
        assert_eq!(reason, CloseReason::MaxServeCount { count: 3 });
        let reason = timed.closed().await;
        let lived = opened.elapsed();
        assert_eq!(reason, CloseReason::MaxServeTime { millis: 4000 });
        // Starting over at the reconnect would have given at least 1.5 s + 4 s.
        assert!(lived < Duration::from_millis(5200), "the lifetime restarted at the reconnect: {lived:?}");
        server.shutdown().await;
    })
    .await
}
