//! The data path of TCP tunnels: integrity, concurrency, half-close, refusals.

use std::time::Duration;

use crate::common::*;
use ferry::{CloseReason, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn echo_round_trip() {
    within(30, async {
        let tunnel = echo_tunnel().await;
        let got = echo_through(tunnel.public, b"hello ferry").await.unwrap();
        assert_eq!(got, b"hello ferry");
    })
    .await
}

/// 64 MiB of random bytes each way at once, checked by SHA-256 on both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way() {
    within(120, async {
        const LEN: usize = 64 * 1024 * 1024;
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;

        // The local service sends its own 64 MiB while hashing what it receives.
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_addr = local.local_addr().unwrap();
        let to_visitor = random_bytes(LEN);
        let to_visitor_hash = sha256(&to_visitor);
        let local_task = tokio::spawn(async move {
            let (stream, _) = local.accept().await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let send = tokio::spawn(async move {
                writer.write_all(&to_visitor).await.unwrap();
                writer.shutdown().await.unwrap();
            });
            let mut got = Vec::with_capacity(LEN);
            reader.read_to_end(&mut got).await.unwrap();
            send.await.unwrap();
            sha256(&got)
        });

        let tunnel = client.add_service(ServiceConfig::tcp(&local_addr.to_string())).await.unwrap();
        let to_local = random_bytes(LEN);
        let received = echo_like_exchange(tunnel.public_addr(), to_local.clone()).await;
        assert_eq!(received.len(), LEN);
        assert_eq!(sha256(&received), to_visitor_hash, "local -> visitor corrupted");
        assert_eq!(local_task.await.unwrap(), sha256(&to_local), "visitor -> local corrupted");
    })
    .await
}

async fn echo_like_exchange(addr: &str, payload: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let send = tokio::spawn(async move {
        writer.write_all(&payload).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    reader.read_to_end(&mut got).await.unwrap();
    send.await.unwrap();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_visitors() {
    within(60, async {
        let tunnel = echo_tunnel().await;
        let mut visitors = Vec::new();
        for i in 0..200usize {
            let addr = tunnel.public;
            visitors.push(tokio::spawn(async move {
                let payload = random_bytes(16 * 1024 + i * 37);
                let got = echo_through(addr, &payload).await.expect("visitor io");
                assert_eq!(sha256(&got), sha256(&payload), "visitor {i} got other bytes");
            }));
        }
        for visitor in visitors {
            visitor.await.unwrap();
        }
    })
    .await
}

/// A visitor that shuts its write side still receives the whole reply.
#[tokio::test]
async fn half_close_keeps_the_reply_flowing() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        // The local service reads the whole request, then answers after EOF.
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_addr = local.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = local.accept().await.unwrap();
            let mut request = Vec::new();
            stream.read_to_end(&mut request).await.unwrap();
            let reply = format!("got {} bytes", request.len()).repeat(1000);
            stream.write_all(reply.as_bytes()).await.unwrap();
        });
        let tunnel = client.add_service(ServiceConfig::tcp(&local_addr.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        visitor.write_all(&[7u8; 5000]).await.unwrap();
        visitor.shutdown().await.unwrap();
        let mut reply = String::new();
        visitor.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "got 5000 bytes".repeat(1000));
    })
    .await
}

/// When the local service refuses, the visitor is closed at once.
#[tokio::test]
async fn refused_local_service_closes_the_visitor() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let dead = free_port().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&format!("127.0.0.1:{dead}"))).await.unwrap();
        let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), visitor.read(&mut buf)).await;
        match read.expect("visitor was left hanging") {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("visitor got {n} bytes from a dead service"),
        }
    })
    .await
}

/// A tunnel added at run time can be cancelled; its future reports why and the port closes.
#[tokio::test]
async fn cancel_a_tunnel_at_run_time() {
    within(30, async {
        let mut tunnel = echo_tunnel().await;
        wait_until_echo(tunnel.public).await;
        tunnel.registration.cancel();
        assert_eq!(tunnel.registration.closed().await, CloseReason::Cancelled);
        // The server gives the port back: it can be bound again.
        let mut rebound = None;
        for _ in 0..100 {
            if let Ok(listener) = TcpListener::bind(tunnel.public).await {
                rebound = Some(listener);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(rebound.is_some(), "port {} was not released", tunnel.public);
        // Other tunnels of the client keep working.
        let echo = echo_server().await;
        let other = tunnel.client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        assert_eq!(echo_through(other.public_addr().parse().unwrap(), b"x").await.unwrap(), b"x");
    })
    .await
}

#[tokio::test]
async fn ipv6_loopback() {
    within(30, async {
        if TcpListener::bind("[::1]:0").await.is_err() {
            eprintln!("no IPv6 loopback here; skipping");
            return;
        }
        let mut config = server_config();
        config.addr = Some("[::1]:0".parse().unwrap());
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        assert!(tunnel.public_addr().starts_with("[::1]:"), "{}", tunnel.public_addr());
        let got = echo_through(tunnel.public_addr().parse().unwrap(), b"six").await.unwrap();
        assert_eq!(got, b"six");
    })
    .await
}

/// A visitor that does not read makes the local writer stall instead of the tunnel buffering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_visitor_applies_backpressure() {
    within(60, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let local = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local_addr = local.local_addr().unwrap();
        let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            let (mut stream, _) = local.accept().await.unwrap();
            let chunk = vec![1u8; 64 * 1024];
            let mut sent = 0usize;
            while sent < 512 * 1024 * 1024 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
                sent += chunk.len();
                progress_tx.send_replace(sent);
            }
        });
        let tunnel = client.add_service(ServiceConfig::tcp(&local_addr.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        let mut first = [0u8; 1];
        visitor.read_exact(&mut first).await.unwrap();
        // Wait until the writer stops making progress for a while.
        let mut last = 0;
        loop {
            let changed = tokio::time::timeout(Duration::from_millis(500), progress.changed()).await;
            let now = *progress.borrow();
            if changed.is_err() && now == last {
                break;
            }
            last = now;
            assert!(
                now < 256 * 1024 * 1024,
                "the tunnel buffered {now} bytes for a visitor that reads nothing"
            );
        }
        // Only socket buffers and the relays' fixed buffers hold data: far below the 512 MiB offered.
        assert!(last < 64 * 1024 * 1024, "{last} bytes went in before the writer stalled");
        // And the stream is still intact afterwards.
        let mut rest = vec![0u8; 1024 * 1024];
        visitor.read_exact(&mut rest).await.unwrap();
        assert!(rest.iter().all(|b| *b == 1));
    })
    .await
}

/// A local service that dies mid-transfer: the visitor sees a reset, not a clean end it
/// could take for a complete transfer.
#[tokio::test]
async fn a_transfer_cut_off_ends_with_a_reset() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let dying = dying_service(b"start").await;
        let tunnel = client.add_service(ServiceConfig::tcp(&dying.to_string())).await.unwrap();
        let ended = send_and_read_to_end(tunnel.public_addr(), b"hello").await;
        assert_eq!(ended.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    })
    .await
}

/// A visitor that dies mid-transfer (reset): the local service sees a reset as well.
#[tokio::test]
async fn a_visitor_cut_off_is_reset_to_the_local_service() {
    within(30, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        let (got_first, first) = tokio::sync::oneshot::channel();
        let service = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let n = stream.read(&mut buf).await.unwrap();
            let _ = got_first.send(n);
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(err) => return Err(err.kind()),
                }
            }
        });
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let tunnel = client.add_service(ServiceConfig::tcp(&local.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
        visitor.write_all(b"hello").await.unwrap();
        assert!(first.await.unwrap() > 0);
        visitor.set_zero_linger().unwrap();
        drop(visitor);
        assert_eq!(service.await.unwrap(), Err(std::io::ErrorKind::ConnectionReset));
    })
    .await
}

/// Dropping a server's handle stops the server: its port closes (issue 10.6).
#[tokio::test]
async fn dropping_the_server_handle_stops_the_server() {
    within(30, async {
        let server = start_server(server_config()).await;
        let addr = server.local_addr();
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        drop(server);
        let mut closed = false;
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(closed, "the server kept listening after its handle was dropped");
    })
    .await
}

/// A server serves on a listener its caller bound, so no test races for a free port.
#[tokio::test]
async fn a_server_serves_on_a_listener_the_caller_bound() {
    within(30, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = ferry::Server::with_listener(server_config(), listener).await.unwrap().spawn();
        assert_eq!(server.local_addr(), addr);
        let client = connect(addr).await;
        let tunnel =
            client.add_service(ferry::ServiceConfig::tcp(&echo_server().await.to_string())).await.unwrap();
        let public = tunnel.public_addr().parse().unwrap();
        assert_eq!(
            echo_through(public, b"through a caller's listener").await.unwrap(),
            b"through a caller's listener"
        );
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
}
