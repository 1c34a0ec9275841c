//! UDP tunnels: flows per visitor address, over data connections and over QUIC datagrams.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cli::{client_process, public_addr_of, spawn_server_process};
use crate::common::*;
use crate::quic_transport::{quic_client_config, quic_server_config};
use crate::tls::{make_certs, Certs};
use ferry::{Client, ClientError, DatagramCounts, PortProtocol, RegisterError, ServerConfig, ServiceConfig};
use tokio::net::UdpSocket;

/// A DNS-style local service: each request gets one reply, `re:` and the SHA-256 of the
/// request; it records every source address it saw (one per flow on the client).
pub(crate) struct Responder {
    pub(crate) addr: SocketAddr,
    sources: Arc<Mutex<HashSet<SocketAddr>>>,
}

pub(crate) async fn responder() -> Responder {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let sources = Arc::new(Mutex::new(HashSet::new()));
    let seen = sources.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            seen.lock().unwrap().insert(from);
            let _ = socket.send_to(&answer_to(&buf[..len]), from).await;
        }
    });
    Responder { addr, sources }
}

pub(crate) fn answer_to(request: &[u8]) -> Vec<u8> {
    [&b"re:"[..], &sha256(request)].concat()
}

pub(crate) fn udp_server_config() -> ServerConfig {
    let mut config = server_config();
    config.udp_ranges = vec!["1024-65535".parse().unwrap()];
    config
}

/// Sends `request` from `visitor` to `public` and waits (at most 5 s) for one reply.
pub(crate) async fn ask(visitor: &UdpSocket, public: SocketAddr, request: &[u8]) -> Vec<u8> {
    visitor.send_to(request, public).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let (len, from) = tokio::time::timeout(Duration::from_secs(5), visitor.recv_from(&mut buf))
        .await
        .expect("a reply within 5 s")
        .unwrap();
    assert_eq!(from, public, "the reply comes from the public port");
    buf.truncate(len);
    buf
}

/// Whether `visitor` gets nothing within `wait` (a bounded wait for an absence).
async fn stays_silent(visitor: &UdpSocket, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(wait, visitor.recv_from(&mut buf)).await.is_err()
}

pub(crate) async fn visitor_on(ip: &str) -> UdpSocket {
    UdpSocket::bind(format!("{ip}:0")).await.unwrap()
}

fn public_of(registration: &ferry::Registration) -> SocketAddr {
    format!("127.0.0.1:{}", registration.remote_port()).parse().unwrap()
}

/// The datagram counts discovery shows for the client's only UDP service.
async fn counts(client: &Client) -> DatagramCounts {
    let services = client.discover().await.unwrap();
    let udp = services.iter().find(|s| s.kind == "udp").expect("a udp service");
    udp.datagrams.expect("udp services show datagram counts")
}

/// 48 visitors at once, 5 requests each: every reply matches its own request, and the
/// local service sees one source per visitor.
async fn assert_many_flows_get_their_replies(client: &Client) {
    let local = responder().await;
    let registration = client.add_service(ServiceConfig::udp(&local.addr.to_string())).await.unwrap();
    let public = public_of(&registration);
    let visitors = (0..48).map(|v| async move {
        let visitor = visitor_on("127.0.0.1").await;
        for r in 0..5 {
            let request = format!("visitor {v} request {r}: {}", "x".repeat(v * 20));
            assert_eq!(ask(&visitor, public, request.as_bytes()).await, answer_to(request.as_bytes()));
        }
    });
    futures_util::future::join_all(visitors).await;
    assert_eq!(local.sources.lock().unwrap().len(), 48, "one local socket per flow");
    let counts = counts(client).await;
    assert_eq!((counts.r#in, counts.out, counts.dropped), (240, 240, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_flows_get_their_own_replies_over_data_connections() {
    within(60, async {
        let server = start_server(udp_server_config()).await;
        let client = connect(server.local_addr()).await;
        assert_many_flows_get_their_replies(&client).await;
    })
    .await
}

/// A server that takes QUIC and offers UDP ports, and a client of it over QUIC.
async fn quic_server_and_client(certs: &Certs) -> (ferry::ServerHandle, Client) {
    let config =
        ServerConfig { udp_ranges: vec!["1024-65535".parse().unwrap()], ..quic_server_config(certs) };
    let server = start_server(config).await;
    let port = server.quic_local_addr().expect("quic listener").port();
    let client = Client::connect(quic_client_config(port, certs)).await.expect("connects over quic");
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_flows_get_their_own_replies_over_quic_datagrams() {
    within(60, async {
        let (_server, client) = quic_server_and_client(&make_certs()).await;
        assert_many_flows_get_their_replies(&client).await;
    })
    .await
}

#[tokio::test]
async fn a_datagram_too_large_for_quic_is_dropped_and_counted_but_passes_a_data_connection() {
    within(60, async {
        let (server, over_quic) = quic_server_and_client(&make_certs()).await;
        let local = responder().await;
        let registration = over_quic.add_service(ServiceConfig::udp(&local.addr.to_string())).await.unwrap();
        let (public, visitor) = (public_of(&registration), visitor_on("127.0.0.1").await);
        let small = random_bytes(100);
        assert_eq!(ask(&visitor, public, &small).await, answer_to(&small), "the flow is open");
        let large = random_bytes(8000);
        visitor.send_to(&large, public).await.unwrap();
        assert!(poll_until(|| async { counts(&over_quic).await.dropped == 1 }).await, "counted as dropped");
        assert!(stays_silent(&visitor, Duration::from_millis(300)).await, "and never delivered");
        assert_eq!(ask(&visitor, public, &small).await, answer_to(&small), "the flow goes on");
        over_quic.shutdown().await;

        // Framed on a data connection, the same datagram arrives whole.
        let over_tcp = connect(server.local_addr()).await;
        let registration = over_tcp.add_service(ServiceConfig::udp(&local.addr.to_string())).await.unwrap();
        assert_eq!(ask(&visitor, public_of(&registration), &large).await, answer_to(&large));
    })
    .await
}

#[tokio::test]
async fn an_idle_flow_ends_on_both_sides_and_a_new_datagram_starts_another() {
    within(30, async {
        let mut config = udp_server_config();
        config.udp_timeout = Duration::from_millis(300);
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let local = responder().await;
        let registration = client.add_service(ServiceConfig::udp(&local.addr.to_string())).await.unwrap();
        let (public, visitor) = (public_of(&registration), visitor_on("127.0.0.1").await);
        assert_eq!(ask(&visitor, public, b"one").await, answer_to(b"one"));
        let flows = || async { client.discover().await.unwrap()[0].online };
        assert_eq!(flows().await, 1, "the flow is counted as a visitor while it lives");
        assert!(poll_until(|| async { flows().await == 0 }).await, "the idle flow ended");
        assert_eq!(ask(&visitor, public, b"two").await, answer_to(b"two"));
        assert_eq!(local.sources.lock().unwrap().len(), 2, "the client closed the old flow's socket");
        assert_eq!(client.discover().await.unwrap()[0].served, 2);
    })
    .await
}

#[tokio::test]
async fn flow_limits_and_deny_ip_apply_to_udp_visitors() {
    within(30, async {
        let server = start_server(udp_server_config()).await;
        let client = connect(server.local_addr()).await;
        let local = responder().await;
        let mut service = ServiceConfig::udp(&local.addr.to_string()).with_limits(Some(2), None, None);
        service.deny_ip = vec!["127.0.0.9/32".parse().unwrap()];
        let public = public_of(&client.add_service(service).await.unwrap());
        let (a, b) = (visitor_on("127.0.0.1").await, visitor_on("127.0.0.1").await);
        assert_eq!(ask(&a, public, b"a").await, answer_to(b"a"));
        assert_eq!(ask(&b, public, b"b").await, answer_to(b"b"));
        let third = visitor_on("127.0.0.1").await;
        third.send_to(b"c", public).await.unwrap();
        assert!(
            stays_silent(&third, Duration::from_millis(300)).await,
            "a third flow is past max-serve-conn"
        );
        let denied = visitor_on("127.0.0.9").await;
        denied.send_to(b"d", public).await.unwrap();
        assert!(stays_silent(&denied, Duration::from_millis(300)).await, "deny-ip holds for udp");
        assert_eq!(local.sources.lock().unwrap().len(), 2, "refused visitors never reach the service");
        assert_eq!(ask(&a, public, b"a again").await, answer_to(b"a again"), "admitted flows go on");
    })
    .await
}

#[tokio::test]
async fn udp_ports_follow_the_ranges_and_numbers() {
    within(30, async {
        // No udp-range: no UDP tunnels.
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let err = client.add_service(ServiceConfig::udp("127.0.0.1:53")).await.unwrap_err();
        assert!(matches!(err, ClientError::Register(RegisterError::UdpDisabled { .. })), "{err:?}");
        assert!(err.to_string().contains("udp-range is empty"), "{err}");

        let base = port_free_for_tcp_and_udp().await;
        let mut config = server_config();
        config.udp_ranges = vec![format!("{base}-{base}").parse().unwrap()];
        config.udp_number = Some(1);
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let outside = ServiceConfig::udp("127.0.0.1:53").with_remote_port(base + 1);
        let err = client.add_service(outside).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Register(RegisterError::PortNotAllowed { protocol: PortProtocol::Udp, .. })
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("udp-range"), "{err}");
        let first = client.add_service(ServiceConfig::udp("127.0.0.1:53")).await.unwrap();
        assert_eq!(first.remote_port(), base);
        let err = client.add_service(ServiceConfig::udp("127.0.0.1:54")).await.unwrap_err();
        assert!(
            matches!(
                err,
                ClientError::Register(RegisterError::PortLimit { limit: 1, protocol: PortProtocol::Udp, .. })
            ),
            "{err:?}"
        );
        // The TCP port of the same number is another endpoint.
        let tcp = ServiceConfig::tcp("127.0.0.1:1").with_remote_port(first.remote_port());
        assert_eq!(client.add_service(tcp).await.unwrap().remote_port(), first.remote_port());
    })
    .await
}

/// A port below the ephemeral range (so no outgoing connection of a parallel test takes it)
/// that is free for both TCP and UDP now.
async fn port_free_for_tcp_and_udp() -> u16 {
    use rand::Rng;
    for _ in 0..100 {
        let port = rand::thread_rng().gen_range(20_000..32_000);
        let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port)).await;
        let udp = UdpSocket::bind(("127.0.0.1", port)).await;
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP in 20000-32000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_tunnel_udp() {
    within(60, async {
        let (mut server, server_port) = spawn_server_process(&["--udp-range", "1024-65535"]).await;
        let local = responder().await;
        let public_port = free_port().await;
        let service =
            ["--local", &format!("udp://{}", local.addr), "--remote-udp-port", &public_port.to_string()];
        let mut client = client_process(server_port, "secret1", &service).spawn().unwrap();
        let public: SocketAddr = public_addr_of(&mut client).await.parse().unwrap();
        assert_eq!(public.port(), public_port);
        let visitor = visitor_on("127.0.0.1").await;
        let request = random_bytes(1000);
        assert_eq!(ask(&visitor, public, &request).await, answer_to(&request));
        client.kill().await.unwrap();
        server.kill().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn a_users_speed_limit_polices_udp_datagrams() {
    within(30, async {
        let mut config = udp_server_config();
        config.speed = Some(10_000);
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let local = responder().await;
        let public =
            public_of(&client.add_service(ServiceConfig::udp(&local.addr.to_string())).await.unwrap());
        let visitor = visitor_on("127.0.0.1").await;
        assert_eq!(ask(&visitor, public, b"hello").await, answer_to(b"hello"));
        // 40 KB at once against 10 KB/s with a 4 KiB burst: most are dropped, none queued.
        for _ in 0..40 {
            visitor.send_to(&[7u8; 1000], public).await.unwrap();
        }
        assert!(
            poll_until(|| async { counts(&client).await.dropped >= 30 }).await,
            "{:?}",
            counts(&client).await
        );
        let mut replies = 0;
        while !stays_silent(&visitor, Duration::from_millis(300)).await {
            replies += 1;
        }
        assert!((1..=10).contains(&replies), "{replies} replies got through");
    })
    .await
}

#[tokio::test]
async fn a_closed_udp_port_can_be_taken_again_at_once_even_with_refused_flows() {
    within(30, async {
        let server = start_server(udp_server_config()).await;
        let client = connect(server.local_addr()).await;
        let local = responder().await;
        let port = free_port().await;
        let mut denied = ServiceConfig::udp(&local.addr.to_string()).with_remote_port(port);
        denied.deny_ip = vec!["127.0.0.0/8".parse().unwrap()];
        let mut first = client.add_service(denied).await.unwrap();
        // A refused visitor's flow lingers (its datagrams dropped for a while).
        let visitor = visitor_on("127.0.0.1").await;
        visitor.send_to(b"refused", public_of(&first)).await.unwrap();
        assert!(stays_silent(&visitor, Duration::from_millis(100)).await);
        first.cancel();
        first.closed().await;
        let again = ServiceConfig::udp(&local.addr.to_string()).with_remote_port(port);
        let second = client.add_service(again).await.expect("the port was given back");
        assert_eq!(ask(&visitor, public_of(&second), b"open").await, answer_to(b"open"));
    })
    .await
}
