//! Data connections carry one visitor after another; no visitor may disturb the next.

use std::net::SocketAddr;

use crate::common::*;
use ferry::{Client, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sockets on this machine connected to `port` as their remote end, in any state
/// (established, or lingering in TIME_WAIT after a close), from /proc/net/tcp.
fn sockets_towards(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter(|remote| {
            remote.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_visitors_reuse_data_connections() {
    within(60, async {
        let server = start_server(server_config()).await;
        let server_port = server.local_addr().port();
        let client = connect(server.local_addr()).await; // 4 idle data connections
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public: SocketAddr = tunnel.public_addr().parse().unwrap();
        for i in 0..150usize {
            let payload = random_bytes(1000 + i * 100);
            let got = echo_through(public, &payload).await.unwrap();
            assert_eq!(sha256(&got), sha256(&payload), "visitor {i}");
        }
        // One control connection and some data connections (more when the machine is slow and
        // the pool grows), far fewer than one per visitor.
        let opened = sockets_towards(server_port);
        assert!(opened <= 60, "{opened} connections to the server for 150 visitors");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_visitors_do_not_disturb_the_next_ones() {
    within(60, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        // A service that streams a lot, so an aborting visitor leaves data in flight.
        let talker = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let talker_addr = talker.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = talker.accept().await {
                tokio::spawn(async move {
                    let chunk = vec![9u8; 64 * 1024];
                    for _ in 0..64 {
                        if stream.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let noisy = client.add_service(ServiceConfig::tcp(&talker_addr.to_string())).await.unwrap();
        let echo = echo_server().await;
        let quiet = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let quiet: SocketAddr = quiet.public_addr().parse().unwrap();
        for round in 0..10 {
            // Read a little, then reset the connection.
            let mut visitor = TcpStream::connect(noisy.public_addr()).await.unwrap();
            let mut some = [0u8; 1000];
            visitor.read_exact(&mut some).await.unwrap();
            visitor.set_zero_linger().unwrap();
            drop(visitor);
            // Visitors after it, possibly on reused connections, get exactly their own bytes.
            for i in 0..5 {
                let payload = random_bytes(5000 + round * 10 + i);
                let got = echo_through(quiet, &payload).await.unwrap();
                assert_eq!(sha256(&got), sha256(&payload), "round {round} visitor {i}");
            }
        }
    })
    .await
}

#[tokio::test]
async fn services_that_speak_first_and_leave() {
    within(60, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        // A greeter: sends a banner and closes without reading (like an SMTP refusal).
        let greeter = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let greeter_addr = greeter.local_addr().unwrap();
        tokio::spawn(async move {
            let mut n = 0u32;
            while let Ok((mut stream, _)) = greeter.accept().await {
                n += 1;
                let _ = stream.write_all(format!("220 hello {n}\r\n").as_bytes()).await;
            }
        });
        let tunnel = client.add_service(ServiceConfig::tcp(&greeter_addr.to_string())).await.unwrap();
        for n in 1..=30u32 {
            let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
            let mut banner = String::new();
            visitor.read_to_string(&mut banner).await.unwrap();
            assert_eq!(banner, format!("220 hello {n}\r\n"));
        }
    })
    .await
}

#[tokio::test]
async fn idle_pool_refills_after_the_client_reconnects() {
    within(60, async {
        let server = start_server(server_config()).await;
        let echo = echo_server().await;
        let client: Client = connect(server.local_addr()).await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public: SocketAddr = tunnel.public_addr().parse().unwrap();
        // Many visitors at once: the pool grows beyond its idle target, then serves them all.
        let mut visitors = Vec::new();
        for i in 0..50usize {
            visitors.push(tokio::spawn(async move {
                let payload = random_bytes(20_000 + i);
                assert_eq!(sha256(&echo_through(public, &payload).await.unwrap()), sha256(&payload));
            }));
        }
        for visitor in visitors {
            visitor.await.unwrap();
        }
        assert_eq!(echo_through(public, b"after").await.unwrap(), b"after");
    })
    .await
}
