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
/// The greeting a visitor got; [`CUT_OFF`] when it was reset; empty when it got nothing.
async fn visit(public: &str) -> String {
    let Ok(mut visitor) = TcpStream::connect(public).await else { return String::new() };
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), visitor.read_to_string(&mut answer)).await;
    match read {
        Ok(Ok(_)) => answer,
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => CUT_OFF.into(),
        _ => String::new(),
    }
}

/// What [`visit`] answers for a visitor whose transfer was cut off and told so by a reset.
const CUT_OFF: &str = "(reset)";

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

/// Whether `bytes` hold a whole response head and its `content-length` body.
fn whole_response(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else { return false };
    let length = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok());
    length.is_some_and(|length| body.len() >= length)
}

/// Starts a client process (killed later without a goodbye) exposing `local` as `service`
/// under `tag`, with the given extra service flags; returns it once it printed its address.
async fn client_process(server: SocketAddr, tag: &str, local: &str, flags: &[&str]) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["client", "--remote", &format!("tcp://{server}")])
        .args(["--id", "id1", "--secret", "secret1", "--tag", tag, "--log-level", "warn"])
        .args(["--local", local])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    lines.next_line().await.unwrap().expect("the client printed its address");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Runs `visit` from `tasks` tasks at once; kills `victim` once `before` visits are done and
/// stops after `total`. Returns every answer (empty: the visitor got nothing).
async fn visit_through_a_kill<F, Fut>(
    tasks: usize,
    (before, total): (usize, usize),
    victim: &mut tokio::process::Child,
    visit: F,
) -> Vec<String>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = String> + Send,
{
    let answers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..tasks {
        let (answers, done, visit) = (answers.clone(), done.clone(), visit.clone());
        workers.push(tokio::spawn(async move {
            while done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                let answer = visit().await;
                answers.lock().unwrap().push(answer);
            }
        }));
    }
    while answers.lock().unwrap().len() < before {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    victim.kill().await.unwrap();
    for worker in workers {
        worker.await.unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_while_visitors_stream_in_fails_none_of_them() {
    within(120, async {
        let server = start_server(server_config()).await;
        let a = tagged(server.local_addr(), "pool").await;
        let first = a.add_service(named(greeter("A").await, "svc")).await.unwrap();
        let public = first.public_addr().to_owned();
        let c_local = format!("tcp://{}", greeter("C").await);
        let mut c = client_process(server.local_addr(), "pool", &c_local, &["--name", "svc"]).await;

        let visit = move || {
            let public = public.clone();
            async move { visit(&public).await }
        };
        let answers = visit_through_a_kill(8, (100, 600), &mut c, visit).await;
        let failed = answers.iter().filter(|a| a.is_empty()).count();
        assert_eq!(failed, 0, "{failed} of {} visitors got nothing", answers.len());
        // A greeting cut off by the kill (answered, but its end never came) is not retried:
        // its visitor is told by a reset. At most the 8 visitors in flight at the kill.
        let cut_off = answers.iter().filter(|a| *a == CUT_OFF).count();
        assert!(cut_off <= 8, "{cut_off} visitors were cut off");
        assert!(answers.iter().any(|a| a == "C"), "the killed client served no one before the kill");
        assert!(answers.iter().rev().take(50).all(|a| a == "A"), "visitors still went to the killed client");
        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_client_killed_mid_run_fails_no_request() {
    within(120, async {
        let mut config = server_config();
        config.domain = Some("example.com".into());
        let server = start_server(config).await;
        let one = tagged(server.local_addr(), "web").await;
        let mut service =
            ServiceConfig::http(&http_service("one").await.to_string()).with_host_prefix("site");
        service.name = "site".into();
        let _first = one.add_service(service).await.unwrap();
        let local = format!("http://{}", http_service("two").await);
        let flags = ["--host-prefix", "site", "--name", "site"];
        let mut two = client_process(server.local_addr(), "web", &local, &flags).await;

        // A response cut short because its client died while sending it was answered; what
        // must not happen is a visitor left with nothing or with an error page.
        let addr = server.local_addr();
        let visit = move || async move {
            let Ok(mut visitor) = TcpStream::connect(addr).await else { return String::new() };
            let request = "GET / HTTP/1.1\r\nHost: site.example.com\r\nConnection: close\r\n\r\n";
            let mut response = Vec::new();
            let read = async {
                visitor.write_all(request.as_bytes()).await?;
                let mut chunk = [0u8; 4096];
                while !whole_response(&response) {
                    match visitor.read(&mut chunk).await? {
                        0 => break,
                        n => response.extend_from_slice(&chunk[..n]),
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
            let response = String::from_utf8_lossy(&response).into_owned();
            if response.starts_with("HTTP/1.1 200") {
                response
            } else {
                String::new()
            }
        };
        let answers = visit_through_a_kill(8, (100, 600), &mut two, visit).await;
        let failed = answers.iter().filter(|a| a.is_empty()).count();
        assert_eq!(failed, 0, "{failed} of {} requests failed", answers.len());
        assert!(answers.iter().any(|a| a.contains("service=two")), "the killed client served no one");
        server.shutdown().await;
    })
    .await
}

/// A local TLS service (self-signed) that greets each visitor with `name` and closes.
async fn tls_greeter(name: &'static str) -> SocketAddr {
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, _) = self_signed_acceptor(dir.path());
    tls_service(acceptor, move |mut tls| async move {
        let _ = tls.write_all(name.as_bytes()).await;
        let _ = tls.shutdown().await;
    })
    .await
}

/// A TLS visit to the passthrough port with `server_name`: what the service said.
async fn tls_visit(sni: SocketAddr, server_name: &str) -> String {
    let config = ferry::transport::client_tls_config(&ferry::transport::RemoteTrust::Insecure).unwrap();
    let tcp = TcpStream::connect(sni).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned()).unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await else {
        return String::new();
    };
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer).await;
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_tls_passthrough_services_share_a_name_and_one_is_reachable_by_client_id() {
    within(60, async {
        let mut config = server_config();
        config.sni_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = start_server(config).await;
        let sni = server.sni_local_addr().unwrap();
        let (one, two) = (tagged(server.local_addr(), "tls").await, tagged(server.local_addr(), "tls").await);
        let secure = |local: SocketAddr| {
            let mut service = ServiceConfig::https(&local.to_string()).with_host_prefix("secure");
            service.name = "secure".into();
            service
        };
        let _first = one.add_service(secure(tls_greeter("one").await)).await.unwrap();
        let _second = two.add_service(secure(tls_greeter("two").await)).await.unwrap();

        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(tls_visit(sni, "secure.example.test").await);
        }
        answers.sort();
        assert_eq!(answers, ["one", "one", "two", "two"], "round-robin over both");
        for (client, name) in [(&one, "one"), (&two, "two")] {
            let pinned = format!("{}--secure.example.test", session_of(client));
            for _ in 0..3 {
                assert_eq!(tls_visit(sni, &pinned).await, name);
            }
        }
        assert_eq!(tls_visit(sni, "999999--secure.example.test").await, "", "unknown client id");
        server.shutdown().await;
    })
    .await
}
