//! Liveness: restarts on either side, heartbeats, shutdown.

use std::time::{Duration, Instant};

use crate::common::*;
use ferry::proto::{read_preamble, ClientMessage, ControlChannel, LinkKind, ServerMessage, ServiceSpec};
use ferry::{Client, ClientState, Server, ServiceConfig};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_started_again_gets_the_same_port() {
    within(30, async {
        let server = start_server(server_config()).await;
        let echo = echo_server().await;
        let port = free_port().await;
        let service = ServiceConfig::tcp(&echo.to_string()).with_remote_port(port);

        let first = connect(server.local_addr()).await;
        let tunnel = first.add_service(service.clone()).await.unwrap();
        assert_eq!(tunnel.remote_port(), port);
        wait_until_echo(tunnel.public_addr().parse().unwrap()).await;
        drop(first); // no goodbye: the handle is simply gone
                     // Readiness, not a sleep: the server has noticed once the public port stops answering.
        let public = tunnel.public_addr().to_owned();
        assert!(
            poll_until(|| async { TcpStream::connect(&public).await.is_err() }).await,
            "old tunnel never closed"
        );

        let second = connect(server.local_addr()).await;
        let again = second.add_service(service).await.expect("same port again");
        assert_eq!(again.remote_port(), port);
        let payload = random_bytes(100_000);
        let got = echo_through(again.public_addr().parse().unwrap(), &payload).await.unwrap();
        assert_eq!(sha256(&got), sha256(&payload));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_a_server_restart() {
    assert_reconnects_after_a_server_restart(server_config(), |addr| client_config(addr, "id1", "secret1"))
        .await
}

/// A server of `config` is stopped and started again on the same address: the client
/// (of `client_for` that address) notices, reconnects by itself and serves the same
/// public port again.
pub(crate) async fn assert_reconnects_after_a_server_restart(
    config: ferry::ServerConfig,
    client_for: impl Fn(std::net::SocketAddr) -> ferry::ClientConfig,
) {
    within(60, async {
        let server = start_server(config.clone()).await;
        let server_addr = server.local_addr();
        let client = Client::connect(client_for(server_addr)).await.unwrap();
        let mut state = client.state();
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public = format!("127.0.0.1:{}", tunnel.remote_port()).parse().unwrap();
        wait_until_echo(public).await;

        server.shutdown().await;
        state.wait_for(|s| matches!(s, ClientState::Disconnected { .. })).await.unwrap();

        let restarted = start_server(ferry::ServerConfig { addr: Some(server_addr), ..config }).await;
        state.wait_for(|s| matches!(s, ClientState::Connected { .. })).await.unwrap();
        // Same public port, served again, without anyone touching the client.
        wait_until_echo(public).await;
        let payload = random_bytes(1 << 20);
        assert_eq!(sha256(&echo_through(public, &payload).await.unwrap()), sha256(&payload));
        restarted.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn server_drops_a_silent_client_after_the_heartbeat_timeout() {
    within(30, async {
        let mut config = server_config();
        config.heartbeat_timeout = Duration::from_millis(600);
        let server = start_server(config).await;
        let port = free_port().await;
        let started = Instant::now();
        let _silent = tokio::spawn(silent_client_kept(server.local_addr(), port));
        // Wait until the port is held, then until it is given back.
        let held = poll_until(|| async { TcpListener::bind(("127.0.0.1", port)).await.is_err() }).await;
        assert!(held, "the silent client never got its port");
        let released = poll_until(|| async { TcpListener::bind(("127.0.0.1", port)).await.is_ok() }).await;
        assert!(released, "the silent client's port was never released");
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(500), "released too early: {elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "released too late: {elapsed:?}");
    })
    .await
}

async fn silent_client_kept(server: std::net::SocketAddr, port: u16) {
    let stream = TcpStream::connect(server).await.unwrap();
    let mut chan = raw::login_by_hand(stream, "id1", "secret1", "silent").await.expect("welcome");
    let spec = ServiceSpec::Tcp {
        name: "silent".into(),
        port: Some(port),
        random: false,
        proxy_protocol: None,
        prefix: None,
    };
    chan.send(&ClientMessage::Register { request: 1, spec, control: Default::default() }).await.unwrap();
    // Never answer pings: keep the socket open until the server gives up on us.
    loop {
        match chan.recv::<ServerMessage>().await {
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// A fake server that welcomes the client and then never speaks again.
#[tokio::test]
async fn client_notices_a_silent_server() {
    within(30, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                if read_preamble(&mut stream).await.unwrap() != LinkKind::Control {
                    held.push(ControlChannel::new(stream));
                    continue;
                }
                let mut chan = ControlChannel::new(stream);
                raw::welcome_by_hand(&mut chan, "secret1", 1, 100).await;
                held.push(chan);
            }
        });
        let mut config = client_config(addr, "id1", "secret1");
        config.heartbeat_timeout = Duration::from_millis(500);
        let started = Instant::now();
        let client = Client::connect(config).await.unwrap();
        let mut state = client.state();
        let state = state.wait_for(|s| matches!(s, ClientState::Disconnected { .. })).await.unwrap().clone();
        let elapsed = started.elapsed();
        assert!(
            matches!(&state, ClientState::Disconnected { reason } if reason.contains("no heartbeat")),
            "{state:?}"
        );
        assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    })
    .await
}

#[tokio::test]
async fn server_shutdown_closes_tunnels_and_returns() {
    within(30, async {
        let server = Server::bind(server_config()).await.unwrap();
        let addr = server.local_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(server.run(async move {
            let _ = stop_rx.await;
        }));
        let client = connect(addr).await;
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public: std::net::SocketAddr = tunnel.public_addr().parse().unwrap();
        wait_until_echo(public).await;
        let mut visitor = TcpStream::connect(public).await.unwrap();
        stop_tx.send(()).unwrap();
        running.await.unwrap();
        // The open visitor was closed and the public port no longer accepts.
        let mut buf = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(&mut visitor, &mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)));
        assert!(TcpStream::connect(public).await.is_err());
        assert!(TcpStream::connect(addr).await.is_err());
    })
    .await
}
