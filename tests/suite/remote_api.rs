//! GT's client flags: `--remote-api` (the server to use, asked at every login) and
//! `--remote-connections` (most visitors per tunnel at once).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::cli::{ferry, public_addr_of};
use crate::common::*;
use ferry::{Client, ClientState, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A remote API on loopback: answers every request with the current `answer` (status and
/// body), and records the request lines it got.
struct RemoteApi {
    url: String,
    answer: Arc<Mutex<(u16, String)>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl RemoteApi {
    fn answer_with(&self, status: u16, body: &str) {
        *self.answer.lock().unwrap() = (status, body.to_owned());
    }

    fn point_at(&self, server: SocketAddr) {
        self.answer_with(200, &format!(r#"{{"remote": ["tcp://127.0.0.1:1", "tcp://{server}"]}}"#));
    }

    fn asked(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

async fn remote_api() -> RemoteApi {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ferry/remote", listener.local_addr().unwrap());
    let answer = Arc::new(Mutex::new((503, String::new())));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (give, record) = (answer.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (give, record) = (give.clone(), record.clone());
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                record.lock().unwrap().push(head.lines().next().unwrap_or_default().to_owned());
                let (status, body) = give.lock().unwrap().clone();
                let response = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    RemoteApi { url, answer, requests }
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_api_is_asked_at_every_login_and_moves_the_client() {
    within(60, async {
        let (first, second) = (start_server(server_config()).await, start_server(server_config()).await);
        let api = remote_api().await;
        api.point_at(first.local_addr());
        // The configured remote is dead: only the API's answer can reach a server.
        let mut config = client_config("127.0.0.1:1".parse().unwrap(), "id1", "secret1");
        config.remote_api = Some(api.url.clone());
        let client = Client::connect(config).await.expect("logs in where the api says");
        assert_eq!(api.requests.lock().unwrap()[0], "GET /ferry/remote?id=id1 HTTP/1.1");
        let echo = echo_server().await;
        let port = free_port().await;
        let service = ServiceConfig::tcp(&echo.to_string()).with_remote_port(port);
        let _tunnel = client.add_service(service).await.unwrap();
        let public: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(echo_through(public, b"on the first").await.unwrap(), b"on the first");

        // The operator moves the client: the next login goes to the second server.
        api.point_at(second.local_addr());
        let asked = api.asked();
        first.shutdown().await;
        let mut state = client.state();
        state.wait_for(|s| matches!(s, ClientState::Connecting)).await.unwrap();
        state.wait_for(|s| matches!(s, ClientState::Connected { .. })).await.unwrap();
        assert!(api.asked() > asked, "asked again at the new login");
        wait_until_echo(public).await;
        let payload = random_bytes(256 * 1024);
        assert_eq!(sha256(&echo_through(public, &payload).await.unwrap()), sha256(&payload));
    })
    .await
}

#[tokio::test]
async fn an_api_that_cannot_answer_leaves_the_configured_remote() {
    within(30, async {
        let server = start_server(server_config()).await;
        let api = remote_api().await;
        for (status, body) in [(503, ""), (200, "<html>"), (200, r#"{"remote": []}"#)] {
            api.answer_with(status, body);
            let mut config = client_config(server.local_addr(), "id1", "secret1");
            config.remote_api = Some(api.url.clone());
            let client = Client::connect(config).await.expect("falls back to --remote");
            assert_tcp_tunnel_carries(&client, 4096).await;
            client.shutdown().await;
        }
        // A remote API on another host must be https://.
        let mut config = client_config(server.local_addr(), "id1", "secret1");
        config.remote_api = Some("http://example.com/remote".into());
        let err = Client::connect(config).await.expect_err("refused");
        assert!(err.to_string().contains("https://"), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_binary_with_only_a_remote_api_finds_its_server() {
    within(60, async {
        let server = start_server(server_config()).await;
        let api = remote_api().await;
        api.point_at(server.local_addr());
        let echo = echo_server().await;
        let mut client = ferry()
            .args(["client", "--remote-api", &api.url, "--id", "id1", "--secret", "secret1"])
            .args(["--reconnect-delay", "50ms", "--local", &format!("tcp://{echo}")])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let public: SocketAddr = public_addr_of(&mut client).await.parse().unwrap();
        assert_eq!(echo_through(public, b"found").await.unwrap(), b"found");
        client.kill().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn remote_connections_caps_the_visitors_of_each_tunnel() {
    within(30, async {
        let server = start_server(server_config()).await;
        let mut config = client_config(server.local_addr(), "id1", "secret1");
        config.remote_connections = Some(2);
        let client = Client::connect(config).await.unwrap();
        let echo = echo_server().await.to_string();
        let capped = client.add_service(ServiceConfig::tcp(&echo)).await.unwrap();
        let own =
            client.add_service(ServiceConfig::tcp(&echo).with_limits(Some(1), None, None)).await.unwrap();
        let capacities: Vec<_> = client.discover().await.unwrap().iter().map(|s| s.capacity).collect();
        assert_eq!(capacities, vec![Some(2), Some(1)], "the lower of the two limits");
        let public: SocketAddr = format!("127.0.0.1:{}", capped.remote_port()).parse().unwrap();
        let (mut a, mut b) =
            (TcpStream::connect(public).await.unwrap(), TcpStream::connect(public).await.unwrap());
        for visitor in [&mut a, &mut b] {
            assert_eq!(echo_over_open(visitor, b"in").await, b"in");
        }
        let mut third = TcpStream::connect(public).await.unwrap();
        let mut buf = [0u8; 8];
        let _ = third.write_all(b"out").await;
        assert!(matches!(third.read(&mut buf).await, Ok(0) | Err(_)), "a third visitor at once is refused");
        drop(own);
    })
    .await
}

/// Writes `payload` on an open visitor connection and reads as many bytes back.
async fn echo_over_open(stream: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    stream.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.unwrap();
    back
}
