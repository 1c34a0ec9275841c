//! Tags and load balancing (AeRO): clients of one user that share a tag and expose a
//! service of the same name share its public address; visitors go round-robin.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use crate::common::http::{get, http_service};
use crate::common::*;
use ferry::{Client, ClientError, ClientState, RegisterError, ServiceConfig};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A service that greets each visitor with its own name and closes.
async fn greeter(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(name.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

async fn tagged(server: SocketAddr, tag: &str) -> Client {
    let mut config = client_config(server, "id1", "secret1");
    config.tags = vec![tag.to_owned()];
    Client::connect(config).await.unwrap()
}

fn named(local: SocketAddr, name: &str) -> ServiceConfig {
    let mut service = ServiceConfig::tcp(&local.to_string());
    service.name = name.to_owned();
    service
}

/// One visit: who answered (empty when the visitor got nothing).
async fn visit(public: &str) -> String {
    let Ok(mut visitor) = TcpStream::connect(public).await else { return String::new() };
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), visitor.read_to_string(&mut answer)).await;
    if matches!(read, Ok(Ok(_))) {
        answer
    } else {
        String::new()
    }
}

fn session_of(client: &Client) -> u64 {
    match *client.state().borrow() {
        ClientState::Connected { session } => session,
        ref other => panic!("not connected: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tagged_clients_share_a_port_and_one_killed_fails_no_visitor() {
    within(90, async {
        let server = start_server(server_config()).await;
        let a = tagged(server.local_addr(), "pool").await;
        let b = tagged(server.local_addr(), "pool").await;
        let first = a.add_service(named(greeter("A").await, "svc")).await.unwrap();
        let second = b.add_service(named(greeter("B").await, "svc")).await.unwrap();
        assert_eq!(second.remote_port(), first.remote_port(), "same tag and name: same port");
        let public = first.public_addr().to_owned();

        // The third is a separate process, to be killed without a goodbye.
        let c_local = greeter("C").await;
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["client", "--remote", &format!("tcp://{}", server.local_addr())])
            .args(["--id", "id1", "--secret", "secret1", "--tag", "pool", "--log-level", "warn"])
            .args(["--local", &format!("tcp://{c_local}"), "--name", "svc"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(c.stdout.take().unwrap()).lines();
        let line = lines.next_line().await.unwrap().expect("the client printed its address");
        assert!(line.ends_with(&format!(":{}", first.remote_port())), "{line}");

        let mut seen: HashMap<String, usize> = HashMap::new();
        for _ in 0..30 {
            *seen.entry(visit(&public).await).or_default() += 1;
        }
        assert_eq!(seen.get(""), None, "a visitor failed: {seen:?}");
        for name in ["A", "B", "C"] {
            assert_eq!(seen.get(name), Some(&10), "round-robin over three: {seen:?}");
        }

        c.kill().await.unwrap();
        let mut after: HashMap<String, usize> = HashMap::new();
        for _ in 0..30 {
            *after.entry(visit(&public).await).or_default() += 1;
        }
        assert_eq!(after.get(""), None, "a visitor failed after the kill: {after:?}");
        assert!(
            after.get("A").is_some_and(|&n| n >= 10) && after.get("B").is_some_and(|&n| n >= 10),
            "{after:?}"
        );
        assert!(after.get("C").is_none_or(|&n| n <= 1), "the killed client kept getting visitors: {after:?}");

        // Another tag does not join: it gets a port of its own.
        let other = tagged(server.local_addr(), "elsewhere").await;
        let separate = other.add_service(named(greeter("D").await, "svc")).await.unwrap();
        assert_ne!(separate.remote_port(), first.remote_port());
        // When the last member leaves, the port closes.
        first.cancel();
        second.cancel();
        let mut closed = false;
        for _ in 0..200 {
            if TcpStream::connect(&public).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the shared port stayed open with no member");
        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_http_services_share_a_host_and_one_is_reachable_by_client_id() {
    within(60, async {
        let mut config = server_config();
        config.domain = Some("example.com".into());
        let server = start_server(config).await;
        let (one, two) = (tagged(server.local_addr(), "web").await, tagged(server.local_addr(), "web").await);
        let site = |local: SocketAddr| {
            let mut service = ServiceConfig::http(&local.to_string()).with_host_prefix("site");
            service.name = "site".into();
            service
        };
        let first = one.add_service(site(http_service("one").await)).await.unwrap();
        let second = two.add_service(site(http_service("two").await)).await.unwrap();
        assert_eq!(first.host(), second.host());

        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(get(server.local_addr(), "/", "site.example.com").await.text());
        }
        let ones = answers.iter().filter(|a| a.starts_with("service=one")).count();
        let twos = answers.iter().filter(|a| a.starts_with("service=two")).count();
        assert_eq!((ones, twos), (3, 3), "{answers:?}");

        let cid = session_of(&two);
        for _ in 0..3 {
            let pinned = get(server.local_addr(), "/", &format!("{cid}--site.example.com")).await;
            assert!(pinned.text().starts_with("service=two"), "{}", pinned.text());
        }
        assert_eq!(get(server.local_addr(), "/", "999999--site.example.com").await.status, 404);

        // Without the tag, the same host is taken.
        let stranger = Client::connect(client_config(server.local_addr(), "id1", "secret1")).await.unwrap();
        let refused = stranger.add_service(site(http_service("three").await)).await;
        assert!(
            matches!(refused, Err(ClientError::Register(RegisterError::HostTaken { .. }))),
            "{refused:?}"
        );

        // A member that leaves is dropped: every visitor now reaches the other.
        one.shutdown().await;
        for _ in 0..4 {
            let response = get(server.local_addr(), "/", "site.example.com").await;
            assert!(response.text().starts_with("service=two"), "{} {}", response.status, response.text());
        }
        server.shutdown().await;
    })
    .await
}
