//! HTTP virtual hosts: routing by host and path, forwarding headers, errors.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::http::{get, hex, http_service, read_response, request};
use crate::common::*;
use ferry::{Client, ClientError, RegisterError, ServerConfig, ServerHandle, ServiceConfig};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn two_users() -> ServerConfig {
    server_config().with_user("id2", "secret2")
}

async fn client_for(server: SocketAddr, id: &str, secret: &str) -> Client {
    Client::connect(client_config(server, id, secret)).await.expect("client connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_behind_one_port_by_host() {
    within(30, async {
        let server = start_server(two_users()).await;
        let addr = server.local_addr();
        let one = client_for(addr, "id1", "secret1").await;
        let two = client_for(addr, "id2", "secret2").await;
        let a = http_service("a").await;
        let b = http_service("b").await;
        let c = http_service("c").await;
        let web = one.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        assert_eq!(web.host(), Some("web"));
        assert_eq!(web.public_addr(), "http://web");
        let api = one.add_service(ServiceConfig::http(&c.to_string()).with_host_prefix("api")).await.unwrap();
        assert_eq!(api.host(), Some("api"));
        let by_id = two.add_service(ServiceConfig::http(&b.to_string())).await.unwrap();
        assert_eq!(by_id.host(), Some("id2"));

        // The same port serves clients and visitors.
        assert!(get(addr, "/x", "web.example.com").await.text().starts_with("service=a path=/x"));
        assert!(get(addr, "/", "API.example.com:8080").await.text().starts_with("service=c"));
        assert!(get(addr, "/", "id2.example.com").await.text().starts_with("service=b"));
    })
    .await
}

#[tokio::test]
async fn keep_alive_requests_stay_with_their_service() {
    within(30, async {
        let server = start_server(two_users()).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let _ = client.add_service(ServiceConfig::http(&a.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
        for i in 0..5 {
            let response = request(&mut visitor, "GET", &format!("/r{i}"), "id1.example.com", "", b"").await;
            assert_eq!(response.status, 200);
            let text = response.text();
            assert!(text.starts_with(&format!("service=a path=/r{i} ")), "{text}");
            // Every head is parsed and gets forwarding headers.
            assert!(text.contains("xff=127.0.0.1 "), "{text}");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_mib_up_and_down() {
    within(120, async {
        let server = start_server(two_users()).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let _ = client.add_service(ServiceConfig::http(&a.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
        let upload = random_bytes(50 << 20);
        let response = request(&mut visitor, "PUT", "/upload", "id1.example.com", "", &upload).await;
        assert_eq!(response.text(), hex(&Sha256::digest(&upload)));
        let response =
            request(&mut visitor, "GET", &format!("/download?n={}", 50 << 20), "id1.example.com", "", b"")
                .await;
        assert_eq!(response.body.len(), 50 << 20);
        assert_eq!(response.head.header("x-sha256"), Some(hex(&Sha256::digest(&response.body)).as_str()));
    })
    .await
}

#[tokio::test]
async fn forwarding_headers_reach_the_local_service() {
    within(30, async {
        let server = start_server(two_users()).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let _ = client.add_service(ServiceConfig::http(&a.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
        let spoofed =
            "X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n";
        let text = request(&mut visitor, "GET", "/", "id1.example.com:7000", spoofed, b"").await.text();
        // The visitor's claims are replaced, not kept.
        assert!(text.contains("xff=127.0.0.1 "), "{text}");
        assert!(text.contains("proto=http ") && text.contains("xhost=id1.example.com:7000"), "{text}");
        assert!(text.contains("host=id1.example.com:7000"), "{text}");
    })
    .await
}

#[tokio::test]
async fn local_address_as_host() {
    within(30, async {
        let server = start_server(two_users()).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let mut service = ServiceConfig::http(&a.to_string());
        service.use_local_as_http_host = true;
        let _ = client.add_service(service).await.unwrap();
        let text = get(server.local_addr(), "/", "id1.example.com").await.text();
        assert!(text.contains(&format!("host={a} ")), "{text}");
        assert!(text.contains("xhost=id1.example.com"), "{text}");
    })
    .await
}

#[tokio::test]
async fn path_routing_without_wildcard_dns() {
    within(30, async {
        let mut config = two_users();
        config.http_path_routing = true;
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let b = http_service("b").await;
        let _ =
            client.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        let _ = client.add_service(ServiceConfig::http(&b.to_string())).await.unwrap();
        let host = server.local_addr().to_string();
        let text = get(server.local_addr(), "/id1/web/api/items?x=1", &host).await.text();
        assert!(text.starts_with("service=a path=/api/items?x=1 "), "{text}");
        let text = get(server.local_addr(), "/id1/other", &host).await.text();
        assert!(text.starts_with("service=b path=/other "), "{text}");
        let text = get(server.local_addr(), "/id1/web", &host).await.text();
        assert!(text.starts_with("service=a path=/ "), "{text}");
        assert_eq!(get(server.local_addr(), "/nobody/web", &host).await.status, 404);
    })
    .await
}

#[tokio::test]
async fn separate_http_listener_and_custom_routing_header() {
    within(30, async {
        let mut config = two_users();
        config.http_addr = Some("127.0.0.1:0".parse().unwrap());
        config.http_mux_header = "X-Tunnel".into();
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let _ =
            client.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        let http = server.http_local_addr().unwrap();
        let mut visitor = TcpStream::connect(http).await.unwrap();
        let text =
            request(&mut visitor, "GET", "/", "ignored.example.com", "X-Tunnel: web\r\n", b"").await.text();
        assert!(text.starts_with("service=a"), "{text}");
        // The Host header no longer routes.
        assert_eq!(get(http, "/", "web.example.com").await.status, 400);
    })
    .await
}

#[tokio::test]
async fn host_rules_prefixes_numbers_and_ids() {
    within(30, async {
        let mut config = two_users();
        config.host_number = Some(2);
        config.host_regex = vec!["^[a-z]+$".into()];
        config.host_with_id = true;
        config.domain = Some("example.com".into());
        let server = start_server(config).await;
        let one = client_for(server.local_addr(), "id1", "secret1").await;
        let two = client_for(server.local_addr(), "id2", "secret2").await;
        let a = http_service("a").await;
        let web = one.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        assert_eq!(web.public_addr(), "http://id1-web.example.com");
        let err = one.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web1")).await.err();
        assert!(matches!(err, Some(ClientError::Register(RegisterError::HostNotAllowed { .. }))), "{err:?}");
        let _ = one.add_service(ServiceConfig::http(&a.to_string())).await.unwrap();
        let err = one.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("api")).await.err();
        assert!(
            matches!(err, Some(ClientError::Register(RegisterError::HostLimit { limit: 2, .. }))),
            "{err:?}"
        );
        // Another user's prefix of the same name is its own host.
        let theirs =
            two.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        assert_eq!(theirs.host(), Some("id2-web.example.com"));
        assert!(get(server.local_addr(), "/", "id1-web.example.com").await.text().starts_with("service=a"));
    })
    .await
}

#[tokio::test]
async fn a_host_is_held_by_one_service() {
    within(30, async {
        let server = start_server(two_users()).await;
        let one = client_for(server.local_addr(), "id1", "secret1").await;
        let two = client_for(server.local_addr(), "id2", "secret2").await;
        let a = http_service("a").await;
        let _ = one.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        let err = two.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.err();
        assert!(matches!(err, Some(ClientError::Register(RegisterError::HostTaken { ref host })) if host == "web"), "{err:?}");
    })
    .await
}

#[tokio::test]
async fn clear_errors_for_visitors() {
    within(30, async {
        let mut config = two_users();
        config.http_header_timeout = Duration::from_millis(300);
        let server = start_server(config).await;
        let addr = server.local_addr();
        let client = connect(addr).await;
        let a = http_service("a").await;
        let mut web =
            client.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();

        let unknown = get(addr, "/", "<nobody>.example.com").await;
        assert_eq!(unknown.status, 404);
        assert!(unknown.text().contains("&lt;nobody&gt;.example.com"), "{}", unknown.text());

        // A configured user that is not connected, and a host whose service went away.
        assert_eq!(get(addr, "/", "id2.example.com").await.status, 502);
        web.cancel();
        web.closed().await;
        let gone = get(addr, "/", "web.example.com").await;
        assert_eq!(gone.status, 502);
        assert!(gone.text().contains("offline"), "{}", gone.text());

        // Malformed and oversized heads.
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\nHost id1\r\n\r\n").await.unwrap();
        assert!(read_all(&mut bad).await.starts_with("HTTP/1.1 400"));
        let mut huge = TcpStream::connect(addr).await.unwrap();
        let long = format!("GET / HTTP/1.1\r\nHost: id1\r\nX-Pad: {}\r\n\r\n", "a".repeat(70 * 1024));
        let _ = huge.write_all(long.as_bytes()).await;
        assert!(read_all(&mut huge).await.starts_with("HTTP/1.1 400"));

        // Slowloris: a head that never completes is closed after the header timeout,
        // while other visitors are served meanwhile.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: id1.exa").await.unwrap();
        let other = client.add_service(ServiceConfig::http(&a.to_string())).await.unwrap();
        assert_eq!(other.host(), Some("id1"));
        assert_eq!(get(addr, "/", "id1.example.com").await.status, 200);
        let started = std::time::Instant::now();
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "slow visitor kept open");
        assert!(sink.is_empty());
        assert!(started.elapsed() < Duration::from_secs(3));
    })
    .await
}

async fn read_all(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A service with `use-local-as-http-host` at `id1`, and a visitor connection to it.
async fn pinned_service() -> (ServerHandle, Client, SocketAddr) {
    let server = start_server(two_users()).await;
    let client = connect(server.local_addr()).await;
    let local = http_service("a").await;
    let mut service = ServiceConfig::http(&local.to_string());
    service.use_local_as_http_host = true;
    let _ = client.add_service(service).await.unwrap();
    (server, client, local)
}

#[tokio::test]
async fn every_request_on_a_connection_is_rewritten() {
    within(30, async {
        let (server, _client, local) = pinned_service().await;
        let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
        let first = request(&mut visitor, "GET", "/one", "id1.example.com", "", b"").await.text();
        assert!(first.contains(&format!("host={local} xff=127.0.0.1 ")), "{first}");
        // A second request on the same connection, claiming another address, is rewritten too.
        let forged = "X-Forwarded-For: 10.9.8.7\r\nForwarded: for=10.9.8.7\r\n";
        let second = request(&mut visitor, "GET", "/two", "id1.example.com", forged, b"").await.text();
        assert!(second.contains(&format!("path=/two host={local} xff=127.0.0.1 ")), "{second}");
        // Two requests in one write: the pipelined one is rewritten as well.
        let pipelined = "GET /three HTTP/1.1\r\nHost: id1.example.com\r\n\r\n\
                         GET /four HTTP/1.1\r\nHost: id1.example.com\r\nX-Forwarded-For: 10.9.8.7\r\n\r\n";
        visitor.write_all(pipelined.as_bytes()).await.unwrap();
        let mut buffered = Vec::new();
        for path in ["/three", "/four"] {
            let text = read_response(&mut visitor, &mut buffered).await.expect("a response").text();
            assert!(text.contains(&format!("path={path} host={local} xff=127.0.0.1 ")), "{text}");
        }
        // An absolute-form target in origin form, for its own host only.
        let absolute =
            request(&mut visitor, "GET", "http://id1.example.com/five", "id1.example.com", "", b"");
        let text = absolute.await.text();
        assert!(text.contains(&format!("path=/five host={local} ")), "{text}");
        // A later request for another host, or an absolute target naming one, never reaches
        // the service: the connection ends without an answer.
        for (target, host) in [("/six", "other.example.com"), ("http://admin.internal/", "id1.example.com")] {
            let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
            let ok = request(&mut visitor, "GET", "/ok", "id1.example.com", "", b"").await;
            assert_eq!(ok.status, 200);
            let head = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            visitor.write_all(head.as_bytes()).await.unwrap();
            let rest = read_all(&mut visitor).await;
            assert_eq!(rest, "", "{target} {host}");
        }
    })
    .await
}

#[tokio::test]
async fn an_absolute_target_for_another_host_is_refused() {
    within(30, async {
        let (server, _client, _local) = pinned_service().await;
        let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
        visitor
            .write_all(b"GET http://admin.internal/ HTTP/1.1\r\nHost: id1.example.com\r\n\r\n")
            .await
            .unwrap();
        let answer = read_all(&mut visitor).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    })
    .await
}

#[tokio::test]
async fn a_bare_lf_head_is_served_at_once() {
    within(30, async {
        let mut config = two_users();
        config.http_header_timeout = Duration::from_secs(20);
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let _ = client.add_service(ServiceConfig::http(&a.to_string())).await.unwrap();
        let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
        visitor.write_all(b"GET /lf HTTP/1.1\nHost: id1.example.com\n\n").await.unwrap();
        let mut buffered = Vec::new();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_response(&mut visitor, &mut buffered));
        let response = answer.await.expect("answered before the header timeout").expect("a response");
        assert!(response.text().starts_with("service=a path=/lf "), "{}", response.text());
    })
    .await
}

#[tokio::test]
async fn an_unreachable_local_service_gets_502() {
    within(30, async {
        let server = start_server(two_users()).await;
        let client = connect(server.local_addr()).await;
        let closed = format!("127.0.0.1:{}", free_port().await);
        let _ = client.add_service(ServiceConfig::http(&closed)).await.unwrap();
        let response = get(server.local_addr(), "/", "id1.example.com").await;
        assert_eq!(response.status, 502);
        assert!(response.text().contains("not reachable"), "{}", response.text());
    })
    .await
}

#[tokio::test]
async fn a_response_cut_off_ends_with_a_reset() {
    within(30, async {
        let server = start_server(two_users()).await;
        let client = connect(server.local_addr()).await;
        let header = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
        let dying = dying_service(header).await;
        let _ = client.add_service(ServiceConfig::http(&dying.to_string())).await.unwrap();
        let ended =
            send_and_read_to_end(server.local_addr(), b"GET / HTTP/1.1\r\nHost: id1.example.com\r\n\r\n")
                .await;
        assert_eq!(ended.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    })
    .await
}
