//! Names chosen by peers. Host names between users: one owner per name across HTTP,
//! HTTPS and TLS passthrough, ids belong to their users, and an offline owner keeps its
//! names for a grace period. Service names cannot forge lines in the server's log.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::http::{get, http_service};
use crate::common::*;
use ferry::{Client, ClientError, RegisterError, ServerConfig, ServiceConfig};

/// Users alice and bob, a passthrough port, and a 1 s heartbeat timeout (a 3 s grace).
fn alice_and_bob() -> ServerConfig {
    let mut config = ServerConfig::default().with_user("alice", "secret-a").with_user("bob", "secret-b");
    config.addr = Some("127.0.0.1:0".parse().unwrap());
    config.sni_addr = Some("127.0.0.1:0".parse().unwrap());
    config.heartbeat_timeout = Duration::from_secs(1);
    config
}

async fn alice(server: SocketAddr) -> Client {
    Client::connect(client_config(server, "alice", "secret-a")).await.expect("alice connects")
}

async fn bob(server: SocketAddr) -> Client {
    Client::connect(client_config(server, "bob", "secret-b")).await.expect("bob connects")
}

fn http(local: SocketAddr, prefix: &str) -> ServiceConfig {
    ServiceConfig::http(&local.to_string()).with_host_prefix(prefix)
}

fn https(local: SocketAddr, prefix: &str) -> ServiceConfig {
    ServiceConfig::https(&local.to_string()).with_host_prefix(prefix)
}

#[tokio::test]
async fn another_users_id_and_names_under_it_are_refused() {
    within(30, async {
        let server = start_server(alice_and_bob()).await;
        let bob = bob(server.local_addr()).await;
        let local = http_service("bob").await;
        // Alice is offline: her id is still hers, in any case, as HTTP and as passthrough.
        for service in [http(local, "alice"), http(local, "ALICE"), http(local, "alice-shop"), https(local, "alice")] {
            let refused = bob.add_service(service.clone()).await;
            assert!(
                matches!(&refused, Err(ClientError::Register(RegisterError::HostNotAllowed { why, .. })) if why.contains("another user's id")),
                "{service:?}: {refused:?}"
            );
        }
        let alice = alice(server.local_addr()).await;
        let own = alice.add_service(http(http_service("alice").await, "alice-shop")).await.unwrap();
        assert_eq!(own.host(), Some("alice-shop"));
        assert!(get(server.local_addr(), "/", "alice-shop.example.com").await.text().starts_with("service=alice"));
    })
    .await
}

#[tokio::test]
async fn a_name_has_one_owner_across_http_and_passthrough() {
    within(30, async {
        let server = start_server(alice_and_bob()).await;
        let (alice, bob) = (alice(server.local_addr()).await, bob(server.local_addr()).await);
        let local = http_service("alice").await;
        let _ = alice.add_service(http(local, "shop")).await.unwrap();
        for service in [https(local, "shop"), http(local, "shop")] {
            let refused = bob.add_service(service.clone()).await;
            assert!(
                matches!(&refused, Err(ClientError::Register(RegisterError::HostTaken { host })) if host == "shop"),
                "{service:?}: {refused:?}"
            );
        }
        // The owner may serve the name both ways.
        let _ = alice.add_service(https(local, "shop")).await.unwrap();
        let _ = bob.add_service(https(local, "books")).await.unwrap();
        let refused = alice.add_service(http(local, "books")).await;
        assert!(matches!(refused, Err(ClientError::Register(RegisterError::HostTaken { .. }))), "{refused:?}");
    })
    .await
}

#[tokio::test]
async fn an_offline_owner_keeps_its_names_for_the_grace_period() {
    within(60, async {
        let server = start_server(alice_and_bob()).await;
        let addr = server.local_addr();
        let local = http_service("alice").await;
        let first = alice(addr).await;
        let _ = first.add_service(http(local, "shop")).await.unwrap();
        first.shutdown().await;
        assert!(poll_until(|| async { get(addr, "/", "shop.example.com").await.status == 502 }).await);

        // While alice reconnects, bob cannot take her name.
        let bob = bob(addr).await;
        let refused = bob.add_service(http(local, "shop")).await;
        assert!(
            matches!(refused, Err(ClientError::Register(RegisterError::HostTaken { .. }))),
            "{refused:?}"
        );
        let back = alice(addr).await;
        let _ = back.add_service(http(local, "shop")).await.expect("alice gets her name back");
        assert!(get(addr, "/", "shop.example.com").await.text().starts_with("service=alice"));

        // Gone for longer than the grace period (three heartbeat timeouts), the name is free.
        back.shutdown().await;
        let left = tokio::time::Instant::now();
        let bob_local = http_service("bob").await;
        assert!(poll_until(|| async { bob.add_service(http(bob_local, "shop")).await.is_ok() }).await);
        assert!(left.elapsed() >= Duration::from_millis(2500), "freed after {:?}", left.elapsed());
        assert!(get(addr, "/", "shop.example.com").await.text().starts_with("service=bob"));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_name_cannot_forge_server_log_lines() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    within(30, async {
        let port = free_port().await;
        let addr = format!("127.0.0.1:{port}");
        let args =
            ["server", "--addr", &addr, "--id", "id1", "--secret", "secret1", "--tcp-range", "1024-65535"];
        let mut server = crate::cli::ferry()
            .args(args)
            .args(["--log-level", "info"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut log = BufReader::new(server.stderr.take().unwrap()).lines();
        while !log.next_line().await.unwrap().expect("server log ended").contains("listening") {}
        let client = Client::connect(client_config(addr.parse().unwrap(), "id1", "secret1")).await.unwrap();
        let mut evil = ServiceConfig::tcp(&echo_server().await.to_string());
        evil.name = "evil\"} 999\nferry_clients 12345\n# x".into();
        assert!(client.add_service(evil).await.is_err(), "the name was taken");
        let mut lines = Vec::new();
        loop {
            let line = log.next_line().await.unwrap().expect("server log ended");
            let done = line.contains("tunnel refused");
            lines.push(line);
            if done {
                break;
            }
        }
        assert!(!lines.iter().any(|l| l.starts_with("ferry_clients") || l.starts_with("# x")), "{lines:#?}");
        assert!(lines.last().unwrap().contains("evil\\\"} 999\\nferry_clients"), "{lines:#?}");
        server.kill().await.unwrap();
    })
    .await
}
