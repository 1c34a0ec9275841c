//! The management API with a live server and clients: every route, the token, bans,
//! metrics that move with traffic, HTTPS, and the OpenAPI document.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::http::request;
use crate::common::*;
use ferry::config::options::ServerOptions;
use ferry::transport::Connector;
use ferry::{Client, ClientState, CloseReason, RemoteAddr, RemoteTrust, ServerConfig, ServiceConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

mod openapi;

const TOKEN: &str = "api-token-0123456789";

/// Sends one API request; returns the status and the body parsed as JSON (or as a string).
async fn call(api: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    call_from("127.0.0.1", api, method, path, token).await
}

/// Like `call`, from `source` (any 127.0.0.0/8 address), so bans of one address leave the others be.
async fn call_from(
    source: &str,
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    call_as(source, "localhost", api, method, path, token).await
}

/// Like `call_from`, naming `host` in the `Host` header.
async fn call_as(
    source: &str,
    host: &str,
    api: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Value) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(api).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let response = request(&mut stream, method, path, host, &auth, b"").await;
    let body = serde_json::from_slice(&response.body).unwrap_or_else(|_| Value::String(response.text()));
    (response.status, body)
}

async fn get(api: SocketAddr, path: &str) -> Value {
    let (status, body) = call(api, "GET", path, Some(TOKEN)).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

fn api_config() -> ServerConfig {
    let mut config = server_config().with_user("other", "s2");
    config.api_addr = Some("127.0.0.1:0".parse().unwrap());
    config.api_token = Some(TOKEN.into());
    config
}

/// `api_config` without the token: the API is open on loopback.
fn token_less_config() -> ServerConfig {
    ServerConfig { api_token: None, ..api_config() }
}

async fn tagged_client(server: SocketAddr, id: &str, secret: &str, tag: &str) -> Client {
    let mut config = client_config(server, id, secret);
    config.tags = vec![tag.to_owned()];
    Client::connect(config).await.unwrap()
}

/// The value of the first metric line starting with `prefix`.
fn metric(text: &str, prefix: &str) -> f64 {
    let line =
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix} in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// The Prometheus text of `/metrics`.
async fn metrics(api: SocketAddr) -> String {
    let (status, text) = call(api, "GET", "/metrics", Some(TOKEN)).await;
    assert_eq!(status, 200, "{text}");
    text.as_str().expect("metrics are text").to_owned()
}

/// Polls `/metrics` (bounded) until the metric starting with `prefix` is `want`.
async fn until_metric(api: SocketAddr, prefix: &str, want: f64) {
    let mut text = String::new();
    for _ in 0..500 {
        text = metrics(api).await;
        if metric(&text, prefix) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{prefix} never became {want}:\n{text}");
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_from_the_live_server() {
    within(60, async {
        let server = start_server(api_config()).await;
        let api = server.api_local_addr().unwrap();
        let started = unix_now();
        let blue = tagged_client(server.local_addr(), "id1", "secret1", "blue").await;
        let red = tagged_client(server.local_addr(), "other", "s2", "red").await;
        let echo = echo_server().await.to_string();
        let limits = (Some(5), Some(100), Some(Duration::from_secs(3600)));
        let mut described = ServiceConfig::tcp(&echo).with_limits(limits.0, limits.1, limits.2);
        described.message = Some("the echo of blue".into());
        let mut tcp = blue.add_service(described).await.unwrap();
        let web = red.add_service(ServiceConfig::http(&echo)).await.unwrap();

        let status = get(api, "/status").await;
        assert_eq!(status["status"], "ok");
        assert!(status["version"].as_str().unwrap().starts_with("ferry "));
        assert_eq!(call(api, "GET", "/status", None).await.0, 401);
        assert_eq!(call(api, "GET", "/clients", Some("wrong")).await.0, 401);
        let health = get(api, "/health").await;
        assert_eq!((health["clients"].as_u64(), health["services"].as_u64()), (Some(2), Some(2)));

        let clients = get(api, "/clients").await;
        assert_eq!(clients.as_array().unwrap().len(), 2);
        let only_blue = get(api, "/clients?tags=green,blue").await;
        assert_eq!(only_blue.as_array().unwrap().len(), 1);
        assert_eq!(only_blue[0]["user"], "id1");
        assert_eq!(only_blue[0]["tags"][0], "blue");
        assert!(only_blue[0]["address"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert_eq!(only_blue[0]["services"][0]["port"].as_u64(), Some(u64::from(tcp.remote_port())));
        let cid = only_blue[0]["cid"].as_u64().unwrap();
        let since = only_blue[0]["connected_since"].as_u64().unwrap();
        assert!((started..=unix_now()).contains(&since), "connected_since {since}, test began {started}");
        let only_red = get(api, "/clients?id=other").await;
        assert_eq!(only_red.as_array().unwrap().len(), 1);
        assert_eq!(only_red[0]["user"], "other");
        assert_eq!(only_red[0]["services"][0]["kind"], "http");
        assert_eq!(only_red[0]["services"][0]["host"].as_str(), web.host());
        assert!(web.host().is_some_and(|h| !h.is_empty()));
        assert!(only_blue[0]["services"][0]["host"].is_null(), "a tcp service has no host");
        assert!(get(api, "/clients?tags=green").await.as_array().unwrap().is_empty());

        // The same filters on /services: one that matches, one that does not.
        let blue_services = get(api, "/services?tags=blue").await;
        assert_eq!(blue_services.as_array().unwrap().len(), 1);
        assert_eq!(
            (blue_services[0]["user"].as_str(), blue_services[0]["kind"].as_str()),
            (Some("id1"), Some("tcp"))
        );
        assert!(get(api, "/services?tags=green").await.as_array().unwrap().is_empty());
        let red_services = get(api, "/services?id=other").await;
        assert_eq!(red_services.as_array().unwrap().len(), 1);
        assert_eq!(red_services[0]["host"].as_str(), web.host());
        assert!(get(api, "/services?id=nobody").await.as_array().unwrap().is_empty());
        assert_eq!(get(api, "/services").await.as_array().unwrap().len(), 2);

        // Traffic moves the service's figures and the metrics.
        let payload = random_bytes(100 * 1024);
        let echoed = echo_through(tcp.public_addr().parse().unwrap(), &payload).await.unwrap();
        assert_eq!(sha256(&echoed), sha256(&payload));
        let services = get(api, &format!("/services?cid={cid}")).await;
        let service = &services[0];
        assert_eq!((service["name"].as_str(), service["kind"].as_str()), (Some(echo.as_str()), Some("tcp")));
        assert_eq!(service["served"], 1);
        assert_eq!(service["message"], "the echo of blue");
        assert_eq!(service["address"].as_str(), Some(tcp.public_addr()));
        assert_eq!((service["capacity"].as_u64(), service["total_allowed"].as_u64()), (Some(5), Some(100)));
        let (birth, deadline) = (service["birth"].as_u64().unwrap(), service["deadline"].as_u64().unwrap());
        assert_eq!(deadline - birth, 3600);
        assert_eq!(service["bytes_in"].as_u64(), Some(payload.len() as u64));
        assert_eq!(service["bytes_out"].as_u64(), Some(payload.len() as u64));

        let text = metrics(api).await;
        assert_eq!(metric(&text, "ferry_clients "), 2.0);
        assert_eq!(metric(&text, "ferry_services "), 2.0);
        assert_eq!(metric(&text, "ferry_visitors_total "), 1.0, "the one echo");
        assert_eq!(metric(&text, "ferry_auth_failures_total "), 2.0, "the two bad tokens");
        assert_eq!(metric(&text, "ferry_handshake_seconds_count "), 2.0, "the two logins");
        // The test's runtime is the server's: at least its listeners and two sessions.
        assert!(metric(&text, "ferry_tasks ") >= 3.0, "tasks alive are counted");
        let service_in = format!("ferry_service_bytes_total{{service=\"{}\"", service["id"]);
        let line =
            text.lines().find(|l| l.starts_with(&service_in) && l.contains("direction=\"in\"")).unwrap();
        assert!(line.ends_with(&format!(" {}", payload.len())), "{line}");
        assert!(text.contains("ferry_user_bytes_total{user=\"id1\",direction=\"out\"} 102400"), "{text}");

        let free = get(api, "/ports/free?limit=3").await;
        let free: Vec<u64> = free["free"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
        assert_eq!(free.len(), 3);
        assert!(!free.contains(&u64::from(tcp.remote_port())));
        let capped = get(api, "/ports/free?limit=100000").await;
        assert_eq!(capped["free"].as_array().unwrap().len(), 100, "limit is clamped to 100");

        let ping = get(api, &format!("/ping?cid={cid}")).await;
        assert!(ping["rtt_ms"].as_f64().unwrap() >= 0.0);
        assert_eq!(call(api, "GET", "/ping?cid=999999", Some(TOKEN)).await.0, 404);

        // Closing a service tells its client why; kicking a client disconnects it.
        let id = service["id"].as_u64().unwrap();
        assert_eq!(call(api, "DELETE", &format!("/services/{id}"), Some(TOKEN)).await.0, 200);
        let reason = tokio::time::timeout(Duration::from_secs(5), tcp.closed()).await.unwrap();
        assert!(matches!(reason, CloseReason::ByServer { .. }), "{reason:?}");
        assert!(get(api, &format!("/services?cid={cid}")).await.as_array().unwrap().is_empty());
        assert_eq!(call(api, "DELETE", &format!("/services/{id}"), Some(TOKEN)).await.0, 404);
        let mut state = red.state();
        let red_cid = get(api, "/clients?id=other").await[0]["cid"].as_u64().unwrap();
        assert_eq!(call(api, "DELETE", &format!("/clients/{red_cid}"), Some(TOKEN)).await.0, 200);
        let kicked =
            state.wait_for(|s| !matches!(s, ClientState::Connected { session } if *session == red_cid));
        assert!(
            tokio::time::timeout(Duration::from_secs(5), kicked).await.is_ok(),
            "the client was not kicked"
        );

        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_real_traffic() {
    within(60, async {
        let mut config = api_config();
        config.reconnect_times = 2;
        config.reconnect_duration = Duration::from_secs(60);
        let server = start_server(config).await;
        let api = server.api_local_addr().unwrap();
        let start = metrics(api).await;

        // A login: one more handshake observed, one more client.
        let client = connect(server.local_addr()).await;
        let logged_in = metrics(api).await;
        let handshakes = "ferry_handshake_seconds_count ";
        assert_eq!(metric(&logged_in, handshakes), metric(&start, handshakes) + 1.0);
        assert_eq!(metric(&logged_in, "ferry_clients "), metric(&start, "ferry_clients ") + 1.0);

        let echo = echo_server().await.to_string();
        let tunnel = client.add_service(ServiceConfig::tcp(&echo)).await.unwrap();
        let public: SocketAddr = tunnel.public_addr().parse().unwrap();
        let idle = metrics(api).await;
        let (active, total) = ("ferry_visitors_active ", "ferry_visitors_total ");
        let (active_before, total_before) = (metric(&idle, active), metric(&idle, total));
        assert_eq!(active_before, 0.0);

        // A visitor held open is active, and online on /services; closed, it is not.
        let mut held = TcpStream::connect(public).await.unwrap();
        held.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        held.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello", "the visitor is through");
        assert_eq!(metric(&metrics(api).await, active), active_before + 1.0);
        assert_eq!(get(api, "/services").await[0]["online"], 1);
        drop(held);
        until_metric(api, active, active_before).await;
        assert_eq!(get(api, "/services").await[0]["online"], 0);

        // Three more visitors, one after the other: four in all.
        for _ in 0..3 {
            assert_eq!(echo_through(public, b"ping").await.unwrap(), b"ping");
        }
        let visited = metrics(api).await;
        assert_eq!(metric(&visited, total), total_before + 4.0);
        assert_eq!(get(api, "/services").await[0]["served"], 4);

        // Two failed logins from another address: two auth failures, one ban (of the address).
        let (failures, bans) = ("ferry_auth_failures_total ", "ferry_bans_total ");
        let addr = server.local_addr();
        for id in ["id1", "other"] {
            assert!(login_from("127.0.0.51", addr, id, "guess").await.is_err(), "{id} got in");
        }
        let banned = metrics(api).await;
        assert_eq!(metric(&banned, failures), metric(&visited, failures) + 2.0);
        assert_eq!(metric(&banned, bans), metric(&visited, bans) + 1.0);
        let refusal = login_from("127.0.0.51", addr, "id1", "secret1").await.unwrap_err();
        assert!(matches!(refusal, ferry::LoginRefusal::Banned { .. }), "{refusal:?}");
        server.shutdown().await;
    })
    .await
}

/// A service name that would forge metric and log lines if written as it is.
const FORGING_NAME: &str = "evil\"} 999\nferry_clients 12345\n# x";

#[tokio::test]
async fn forging_service_names_and_messages_are_refused_and_metrics_stay_well_formed() {
    within(30, async {
        let server = start_server(api_config()).await;
        let api = server.api_local_addr().unwrap();
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await.to_string();
        let mut evil = ServiceConfig::tcp(&echo);
        evil.name = FORGING_NAME.into();
        let refused = client.add_service(evil).await.unwrap_err().to_string();
        assert!(refused.contains("the service's name is not valid: use 1 to 128 ASCII letters"), "{refused}");
        let mut evil = ServiceConfig::tcp(&echo);
        evil.message = Some(FORGING_NAME.into());
        let refused = client.add_service(evil).await.unwrap_err().to_string();
        assert!(refused.contains("the service's message is not valid"), "{refused}");

        let mut fine = ServiceConfig::tcp(&echo);
        fine.message = Some("Bob's echo (staging)".into());
        let _ = client.add_service(fine).await.unwrap();
        let text = metrics(api).await;
        for line in text.lines() {
            assert!(well_formed_metric_line(line), "malformed line {line:?} in\n{text}");
        }
        let clients: Vec<&str> = text.lines().filter(|l| l.starts_with("ferry_clients ")).collect();
        assert_eq!(clients, ["ferry_clients 1"], "{text}");
        assert!(text.contains(&format!("name=\"{echo}\"")), "{text}");
    })
    .await
}

/// A comment, or `name{key="value",...} number` with escaped label values.
fn well_formed_metric_line(line: &str) -> bool {
    if line.starts_with("# ") {
        return true;
    }
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = line.as_bytes();
    let mut i = bytes.iter().take_while(|&&b| is_word(b)).count();
    if i == 0 {
        return false;
    }
    if bytes.get(i) == Some(&b'{') {
        i += 1;
        while bytes.get(i) != Some(&b'}') {
            let key = bytes[i..].iter().take_while(|&&b| is_word(b)).count();
            if key == 0 || bytes.get(i + key..i + key + 2) != Some(b"=\"".as_slice()) {
                return false;
            }
            i += key + 2;
            loop {
                match bytes.get(i) {
                    Some(b'\\') if matches!(bytes.get(i + 1), Some(b'\\' | b'"' | b'n')) => i += 2,
                    Some(b'"') => break,
                    Some(b'\n' | b'\\') | None => return false,
                    Some(_) => i += 1,
                }
            }
            i += 1;
            if bytes.get(i) == Some(&b',') {
                i += 1;
            }
        }
        i += 1;
    }
    line.get(i..).and_then(|rest| rest.strip_prefix(' ')).is_some_and(|value| value.parse::<f64>().is_ok())
}

#[tokio::test]
async fn bad_tokens_get_the_address_banned_and_off_loopback_a_token_is_required() {
    within(30, async {
        let mut config = api_config();
        config.reconnect_times = 2;
        let server = start_server(config).await;
        let api = server.api_local_addr().unwrap();
        assert_eq!(call(api, "GET", "/health", Some("guess-1")).await.0, 401);
        assert_eq!(call(api, "GET", "/health", Some("guess-2")).await.0, 401);
        let (status, body) = call(api, "GET", "/health", Some(TOKEN)).await;
        assert_eq!(status, 403, "{body}");
        assert!(body["error"].as_str().unwrap().contains("banned"));
        server.shutdown().await;

        let options = ferry::config::options::ServerOptions {
            api_addr: Some("0.0.0.0:0".into()),
            ..Default::default()
        };
        assert!(options.into_config().unwrap_err().to_string().contains("api-token"));
        let mut open = api_config();
        open.api_addr = Some("0.0.0.0:0".parse().unwrap());
        open.api_token = None;
        assert!(ferry::Server::bind(open).await.is_err(), "an API off loopback without a token");
        // A loopback API without a token answers everyone.
        let mut local = api_config();
        local.api_token = None;
        let server = start_server(local).await;
        assert_eq!(call(server.api_local_addr().unwrap(), "GET", "/health", None).await.0, 200);
        server.shutdown().await;
    })
    .await
}

/// Server options with an API on `addr` and `token`.
fn api_options(addr: &str, token: &str) -> ServerOptions {
    ServerOptions { api_addr: Some(addr.into()), api_token: Some(token.into()), ..Default::default() }
}

#[tokio::test]
async fn empty_and_short_tokens_are_refused_at_start() {
    within(30, async {
        for addr in ["0.0.0.0:0", "127.0.0.1:0"] {
            let empty = api_options(addr, "").into_config().unwrap_err().to_string();
            assert!(empty.starts_with("api-token: empty"), "{empty}");
            let short = api_options(addr, "fifteen-bytes!!").into_config().unwrap_err().to_string();
            assert!(short.starts_with("api-token: 15 bytes is too short"), "{short}");
            assert!(api_options(addr, "sixteen-bytes!!!").into_config().is_ok());
        }
        // The library refuses them too, whatever the address.
        for (addr, token) in [("0.0.0.0:0", ""), ("127.0.0.1:0", ""), ("0.0.0.0:0", "short")] {
            let mut config = api_config();
            config.api_addr = Some(addr.parse().unwrap());
            config.api_token = Some(token.into());
            let err = ferry::Server::bind(config).await.err().expect("the token is refused");
            assert!(err.to_string().contains("api-token"), "{err}");
        }
        // The binary: an empty --api-token, and an empty FERRY_API_TOKEN, stop it at once.
        let flag = ["--api-addr", "0.0.0.0:0", "--api-token", ""];
        let env_only = ["--api-addr", "0.0.0.0:0"];
        for (args, env) in [(&flag[..], None), (&env_only[..], Some(""))] {
            let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
            command.args(["server", "--addr", "127.0.0.1:0", "--id", "a", "--secret", "b"]).args(args);
            command.env_remove("FERRY_API_TOKEN").kill_on_drop(true);
            if let Some(value) = env {
                command.env("FERRY_API_TOKEN", value);
            }
            let output = command.output().await.unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "started with an empty token: {stderr}");
            assert!(stderr.contains("api-token: empty"), "{stderr}");
        }
    })
    .await
}

#[tokio::test]
async fn off_loopback_requests_without_the_token_are_refused() {
    within(30, async {
        let mut config = api_config();
        config.api_addr = Some("0.0.0.0:0".parse().unwrap());
        config.reconnect_times = 0; // Bans off: every refusal here is a 401, not a 403.
        let server = start_server(config).await;
        let port = server.api_local_addr().unwrap().port();
        let api: SocketAddr = ([127, 0, 0, 1], port).into();
        for path in ["/status", "/clients", "/services", "/metrics"] {
            assert_eq!(call(api, "GET", path, None).await.0, 401, "{path} with no token");
            assert_eq!(call(api, "GET", path, Some("")).await.0, 401, "{path} with an empty bearer");
        }
        let mut stream = TcpStream::connect(api).await.unwrap();
        let bare =
            request(&mut stream, "GET", "/status", "ferry-api", "Authorization: Bearer\r\n", b"").await;
        assert_eq!(bare.status, 401, "a bare 'Bearer'");
        let prefix = &TOKEN[..TOKEN.len() - 1];
        assert_eq!(call(api, "GET", "/status", Some(prefix)).await.0, 401, "a prefix of the token");
        assert_eq!(call(api, "GET", "/status", Some(TOKEN)).await.0, 200);
        assert_eq!(call(api, "GET", "/", None).await.0, 200, "the page itself is public");
        server.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn the_api_speaks_https_with_its_own_certificate() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let mut config = api_config();
        config.api_tls = Some((cert.clone(), key));
        let server = start_server(config).await;
        let port = server.api_local_addr().unwrap().port();
        let remote = RemoteAddr::parse(&format!("tls://localhost:{port}")).unwrap();
        let connector = Connector::new(remote, &RemoteTrust::CaFile(cert), Duration::from_secs(5)).unwrap();
        let mut stream = connector.connect().await.unwrap();
        let auth = format!("Authorization: Bearer {TOKEN}\r\n");
        let response = request(&mut stream, "GET", "/status", "localhost", &auth, b"").await;
        assert_eq!(response.status, 200);
        assert!(response.text().contains("\"ok\""));
        // Plain HTTP on the HTTPS port gets nothing.
        let plain = tokio::time::timeout(Duration::from_secs(15), async {
            let mut stream = TcpStream::connect(server.api_local_addr().unwrap()).await.unwrap();
            stream.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
            let mut buf = Vec::new();
            let _ = stream.read_to_end(&mut buf).await;
            buf
        })
        .await
        .unwrap();
        assert!(!String::from_utf8_lossy(&plain).contains("\"ok\""));
        server.shutdown().await;
    })
    .await
}

/// Without a token the API trusts loopback, so it answers only requests that name
/// loopback as their host: a page that rebinds its own name to 127.0.0.1 gets 403.
#[tokio::test]
async fn without_a_token_only_loopback_host_names_are_answered() {
    within(30, async {
        let server = start_server(token_less_config()).await;
        let api = server.api_local_addr().unwrap();
        let client = connect(server.local_addr()).await;
        let cid = get_as(api, "localhost", "/clients").await[0]["cid"].as_u64().unwrap();
        let kick = format!("/clients/{cid}");
        for host in
            ["attacker.example", &format!("attacker.example:{}", api.port()), "localhost.attacker.example"]
        {
            let (status, body) = call_as("127.0.0.1", host, api, "DELETE", &kick, None).await;
            assert_eq!(status, 403, "{host}: {body}");
            assert_eq!(call_as("127.0.0.1", host, api, "GET", "/", None).await.0, 403, "{host}: the page");
        }
        assert_eq!(get_as(api, "127.0.0.1", "/clients").await.as_array().unwrap().len(), 1, "still there");
        assert!(matches!(*client.state().borrow(), ClientState::Connected { .. }), "the client was kicked");
        for host in ["127.0.0.1", "[::1]", &format!("localhost:{}", api.port())] {
            get_as(api, host, "/status").await;
        }
        let (status, body) =
            call_as("127.0.0.1", &format!("127.0.0.1:{}", api.port()), api, "DELETE", &kick, None).await;
        assert_eq!(status, 200, "{body}");
        // With a token, the token decides and the host name does not matter.
        server.shutdown().await;
        let server = start_server(api_config()).await;
        let api = server.api_local_addr().unwrap();
        assert_eq!(call_as("127.0.0.1", "ferry.example", api, "GET", "/status", Some(TOKEN)).await.0, 200);
        server.shutdown().await;
    })
    .await
}

/// A token-less GET with `host` as the Host header; asserts 200.
async fn get_as(api: SocketAddr, host: &str, path: &str) -> Value {
    let (status, body) = call_as("127.0.0.1", host, api, "GET", path, None).await;
    assert_eq!(status, 200, "GET {path} as {host}: {body}");
    body
}

/// Wrong API tokens ban the address from the API only: the API has its own ban table, so
/// a client on the same address still logs in. CORS preflights are never counted.
#[tokio::test]
async fn bad_api_tokens_and_preflights_never_ban_client_logins() {
    within(30, async {
        let mut config = api_config();
        config.reconnect_times = 3;
        config.reconnect_duration = Duration::from_secs(60);
        let server = start_server(config).await;
        let api = server.api_local_addr().unwrap();
        for _ in 0..10 {
            let (status, body) = call(api, "OPTIONS", "/clients", None).await;
            assert_ne!(status, 403, "a preflight was counted as a bad token: {body}");
        }
        assert_eq!(call(api, "GET", "/status", Some(TOKEN)).await.0, 200, "preflights banned the address");
        for i in 0..10 {
            call(api, "GET", "/status", Some(&format!("guess-{i}"))).await;
        }
        let (status, body) = call(api, "GET", "/status", Some(TOKEN)).await;
        assert_eq!(status, 403, "the API bans the guesser: {body}");
        let addr = server.local_addr();
        assert!(login_from("127.0.0.1", addr, "id1", "secret1").await.is_ok(), "the login was banned");
        let client = Client::connect(client_config(addr, "id1", "secret1")).await;
        assert!(client.is_ok(), "a client from the same address: {:?}", client.err());
        server.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn udp_tunnels_show_their_flows_and_datagrams() {
    use crate::udp_tunnel::{answer_to, ask, responder, udp_server_config, visitor_on};
    within(30, async {
        let mut config = udp_server_config();
        config.api_addr = Some("127.0.0.1:0".parse().unwrap());
        config.api_token = Some(TOKEN.into());
        let server = start_server(config).await;
        let api = server.api_local_addr().unwrap();
        let client = connect(server.local_addr()).await;
        let local = responder().await;
        let registration = client.add_service(ServiceConfig::udp(&local.addr.to_string())).await.unwrap();
        let public: SocketAddr = format!("127.0.0.1:{}", registration.remote_port()).parse().unwrap();
        let visitor = visitor_on("127.0.0.1").await;
        for request in [&b"one"[..], b"two", b"three"] {
            assert_eq!(ask(&visitor, public, request).await, answer_to(request));
        }
        let services = get(api, "/services").await;
        let udp = &services[0];
        assert_eq!((udp["kind"].as_str(), udp["port"].as_u64()), (Some("udp"), Some(public.port().into())));
        assert_eq!((udp["online"].as_u64(), udp["served"].as_u64()), (Some(1), Some(1)), "one flow");
        let datagrams = &udp["datagrams"];
        assert_eq!((datagrams["in"].as_u64(), datagrams["out"].as_u64()), (Some(3), Some(3)));
        assert_eq!(udp["bytes_in"].as_u64(), Some(11));
        let text = metrics(api).await;
        let series = format!("ferry_service_datagrams_total{{service=\"{}\",", udp["id"]);
        for direction in ["in", "out"] {
            let labelled = format!("direction=\"{direction}\"");
            let line = text.lines().find(|l| l.starts_with(&series) && l.contains(&labelled));
            assert!(line.is_some_and(|l| l.ends_with(" 3")), "{direction}: {text}");
        }
        assert_eq!(metric(&text, "ferry_udp_dropped_datagrams_total"), 0.0);
    })
    .await
}
