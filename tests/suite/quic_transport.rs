//! The QUIC transport: one QUIC connection per client, a stream per visitor.

use std::time::Duration;

use crate::cli::{client_process_to, public_addr_of, spawn_server_process};
use crate::common::*;
use crate::reconnect::assert_reconnects_after_a_server_restart;
use crate::tls::{make_certs, Certs};
use ferry::{Client, ClientError, LoginRefusal, RemoteAddr, RemoteTrust};

pub(crate) fn quic_server_config(certs: &Certs) -> ferry::ServerConfig {
    let mut config = server_config();
    config.quic_addr = Some("127.0.0.1:0".parse().unwrap());
    config.cert_file = vec![certs.cert.clone()];
    config.key_file = vec![certs.key.clone()];
    config
}

pub(crate) fn quic_client_config(port: u16, certs: &Certs) -> ferry::ClientConfig {
    let mut config = client_config("127.0.0.1:1".parse().unwrap(), "id1", "secret1");
    config.remote = RemoteAddr::parse(&format!("quic://localhost:{port}")).unwrap();
    config.remote_trust = RemoteTrust::CaFile(certs.cert.clone());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_over_quic_carries_many_visitors_at_once() {
    within(60, async {
        let certs = make_certs();
        let server = start_server(quic_server_config(&certs)).await;
        let port = server.quic_local_addr().expect("quic listener").port();
        let client = Client::connect(quic_client_config(port, &certs)).await.expect("connects over quic");
        assert_tcp_tunnel_carries(&client, 8 << 20).await;
        // 32 visitors at once, each on its own stream.
        let echo = echo_server().await;
        let tunnel = client.add_service(ferry::ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public: std::net::SocketAddr = format!("127.0.0.1:{}", tunnel.remote_port()).parse().unwrap();
        let visitors = (0..32).map(|i| async move {
            let payload = random_bytes(64 * 1024 + i * 1000);
            let got = echo_through(public, &payload).await.unwrap();
            assert_eq!(sha256(&got), sha256(&payload));
        });
        futures_util::future::join_all(visitors).await;
    })
    .await
}

#[tokio::test]
async fn quic_with_an_untrusted_certificate_is_refused() {
    within(30, async {
        let (certs, other) = (make_certs(), make_certs());
        let server = start_server(quic_server_config(&certs)).await;
        let port = server.quic_local_addr().unwrap().port();
        let err = Client::connect(quic_client_config(port, &other)).await.expect_err("refused");
        assert!(err.to_string().contains("certificate"), "{err}");
    })
    .await
}

#[tokio::test]
async fn a_wrong_secret_over_quic_is_refused() {
    within(30, async {
        let certs = make_certs();
        let server = start_server(quic_server_config(&certs)).await;
        let port = server.quic_local_addr().unwrap().port();
        let mut config = quic_client_config(port, &certs);
        config.secret = "wrong".into();
        let err = Client::connect(config).await.expect_err("refused");
        assert!(matches!(err, ClientError::LoginRefused(LoginRefusal::AuthFailed { .. })), "{err}");
    })
    .await
}

#[tokio::test]
async fn no_quic_answer_says_udp_may_be_blocked() {
    within(30, async {
        let certs = make_certs();
        // A UDP port nobody answers on.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut config = quic_client_config(port, &certs);
        config.remote_timeout = Duration::from_secs(1);
        let err = Client::connect(config).await.expect_err("no server");
        assert!(err.to_string().contains("UDP to the server may be blocked"), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_client_reconnects_after_a_server_restart() {
    let certs = make_certs();
    let mut config = quic_server_config(&certs);
    // The restart takes the same UDP port again.
    let port = free_udp_port();
    config.quic_addr = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let client_for = |_| quic_client_config(port, &certs);
    assert_reconnects_after_a_server_restart(config, client_for).await
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The client's UDP socket changes mid-transfer (as behind a NAT that rebinds): the QUIC
/// connection migrates and the transfer, the tunnel and the session carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_client_socket_keeps_the_tunnel_and_the_transfer() {
    within(60, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certs = make_certs();
        let config = quic_server_config(&certs);
        let server =
            start_server(ferry::ServerConfig { api_addr: Some("127.0.0.1:0".parse().unwrap()), ..config })
                .await;
        let port = server.quic_local_addr().unwrap().port();
        let client = Client::connect(quic_client_config(port, &certs)).await.unwrap();
        let mut state = client.state();
        let session = match &*state.borrow_and_update() {
            ferry::ClientState::Connected { session } => *session,
            other => panic!("not connected: {other:?}"),
        };
        let echo = echo_server().await;
        let tunnel = client.add_service(ferry::ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public = format!("127.0.0.1:{}", tunnel.remote_port());

        let payload = random_bytes(16 << 20);
        let visitor = tokio::net::TcpStream::connect(&public).await.unwrap();
        let (mut read, mut write) = visitor.into_split();
        let half = payload.len() / 2;
        let (tx_half, rx_half) = tokio::sync::oneshot::channel::<()>();
        let sending = {
            let payload = payload.clone();
            tokio::spawn(async move {
                write.write_all(&payload[..half]).await.unwrap();
                rx_half.await.unwrap();
                write.write_all(&payload[half..]).await.unwrap();
                write.shutdown().await.unwrap();
            })
        };
        let mut got = vec![0u8; half];
        read.read_exact(&mut got).await.unwrap();
        // Half way through: a new socket, a new source port.
        let moved = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let new_address = moved.local_addr().unwrap().to_string();
        client.rebind(moved).expect("rebinds");
        tx_half.send(()).unwrap();
        read.read_to_end(&mut got).await.unwrap();
        sending.await.unwrap();
        assert_eq!(sha256(&got), sha256(&payload), "the transfer survived the move");
        // The same session, and the tunnel serves new visitors.
        assert!(matches!(&*state.borrow(), ferry::ClientState::Connected { session: s } if *s == session));
        assert_eq!(echo_through(public.parse().unwrap(), b"after").await.unwrap(), b"after");
        // The API shows where the client is now, not where it logged in from.
        let api = server.api_local_addr().unwrap();
        assert!(poll_until(|| async { client_address(api).await == new_address }).await);
    })
    .await
}

/// The address `GET /clients` shows for the only client.
async fn client_address(api: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(api).await.unwrap();
    let response = crate::common::http::request(&mut stream, "GET", "/clients", "localhost", "", b"").await;
    let clients: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    clients[0]["address"].as_str().unwrap_or_default().to_owned()
}

/// The `ferry` binaries: one server with --quic-addr and --ws-path, a client over each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_tunnel_over_quic_and_websocket() {
    within(60, async {
        let certs = make_certs();
        let (cert, key) = (certs.cert.display().to_string(), certs.key.display().to_string());
        let quic_port = free_udp_port();
        let quic_addr = format!("127.0.0.1:{quic_port}");
        let (_server, port) = spawn_server_process(&[
            "--tcp-range",
            "1024-65535",
            "--quic-addr",
            &quic_addr,
            "--cert-file",
            &cert,
            "--key-file",
            &key,
            "--ws-path",
            "/ferry",
        ])
        .await;
        let echo = echo_server().await;
        let local = format!("tcp://{echo}");
        for remote in [format!("quic://localhost:{quic_port}"), format!("ws://127.0.0.1:{port}/ferry")] {
            let service = ["--remote-cert", &cert, "--local", &local];
            let mut client = client_process_to(&remote, "secret1", &service).spawn().unwrap();
            let public = public_addr_of(&mut client).await;
            let public_port = public.rsplit(':').next().unwrap();
            let payload = random_bytes(1 << 20);
            let got =
                echo_through(format!("127.0.0.1:{public_port}").parse().unwrap(), &payload).await.unwrap();
            assert_eq!(sha256(&got), sha256(&payload), "through {remote}");
            client.kill().await.unwrap();
        }
    })
    .await
}

/// UDP blocked (nothing answers on the QUIC port): the client falls back to the next
/// remote, TLS, and its tunnels work there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_that_gets_no_answer_falls_back_to_the_next_remote() {
    within(60, async {
        let certs = make_certs();
        let mut config = quic_server_config(&certs);
        config.tls_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = start_server(config).await;
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut config = quic_client_config(silent.local_addr().unwrap().port(), &certs);
        config.remote_timeout = Duration::from_secs(1);
        let tls_port = server.tls_local_addr().unwrap().port();
        config.fallback_remotes = vec![RemoteAddr::parse(&format!("tls://localhost:{tls_port}")).unwrap()];
        let client = Client::connect(config).await.expect("falls back to tls://");
        assert!(client.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).is_err(), "not on QUIC");
        assert_tcp_tunnel_carries(&client, 1 << 20).await;
        // The QUIC port itself answers once it is the first remote that works.
        let port = server.quic_local_addr().unwrap().port();
        let mut config = quic_client_config(port, &certs);
        config.fallback_remotes = vec![RemoteAddr::parse("tls://localhost:1").unwrap()];
        let client = Client::connect(config).await.expect("quic first");
        assert!(client.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).is_ok(), "on QUIC");
        assert_tcp_tunnel_carries(&client, 1 << 20).await;
    })
    .await
}
