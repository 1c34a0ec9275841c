//! The WebSocket transport: clients reach the server at `ws-path` over ws:// and wss://,
//! directly and through a real nginx reverse proxy.

use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use crate::reconnect::assert_reconnects_after_a_server_restart;
use crate::tls::{make_certs, Certs};
use ferry::{Client, ClientError, LoginRefusal, RemoteAddr, RemoteTrust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ws_server_config() -> ferry::ServerConfig {
    let mut config = server_config();
    config.ws_path = Some("/ferry".into());
    config
}

fn ws_client_config(url: &str) -> ferry::ClientConfig {
    let mut config = client_config("127.0.0.1:1".parse().unwrap(), "id1", "secret1");
    config.remote = RemoteAddr::parse(url).unwrap();
    config
}

async fn assert_tunnel_carries(client: &Client) {
    assert_tcp_tunnel_carries(client, 8 << 20).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_over_ws_carries_bytes_and_plain_clients_still_work() {
    within(60, async {
        let server = start_server(ws_server_config()).await;
        let url = format!("ws://127.0.0.1:{}/ferry", server.local_addr().port());
        let client = Client::connect(ws_client_config(&url)).await.expect("client connects over ws");
        assert_tunnel_carries(&client).await;
        // The same listener still takes plain clients.
        let plain = connect(server.local_addr()).await;
        assert_tunnel_carries(&plain).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_over_wss_with_a_pinned_certificate() {
    within(60, async {
        let certs = make_certs();
        let server = start_server(wss_server_config(&certs)).await;
        let port = server.tls_local_addr().unwrap().port();
        let mut config = ws_client_config(&format!("wss://localhost:{port}/ferry"));
        config.remote_trust = RemoteTrust::CaFile(certs.cert.clone());
        let client = Client::connect(config).await.expect("client connects over wss");
        assert_tunnel_carries(&client).await;
    })
    .await
}

fn wss_server_config(certs: &Certs) -> ferry::ServerConfig {
    let mut config = ws_server_config();
    config.tls_addr = Some("127.0.0.1:0".parse().unwrap());
    config.cert_file = vec![certs.cert.clone()];
    config.key_file = vec![certs.key.clone()];
    config
}

#[tokio::test]
async fn wss_with_an_untrusted_certificate_is_refused() {
    within(30, async {
        let (certs, other) = (make_certs(), make_certs());
        let server = start_server(wss_server_config(&certs)).await;
        let port = server.tls_local_addr().unwrap().port();
        let mut config = ws_client_config(&format!("wss://localhost:{port}/ferry"));
        config.remote_trust = RemoteTrust::CaFile(other.cert.clone());
        let err = Client::connect(config).await.expect_err("refused");
        assert!(err.to_string().contains("certificate"), "{err}");
    })
    .await
}

#[tokio::test]
async fn a_path_that_does_not_match_is_a_clear_404() {
    within(30, async {
        let server = start_server(ws_server_config()).await;
        let url = format!("ws://127.0.0.1:{}/other", server.local_addr().port());
        let err = Client::connect(ws_client_config(&url)).await.expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, ClientError::Connect(_)), "{text}");
        assert!(text.contains("404") && text.contains("/other") && text.contains("ws-path"), "{text}");
        // Without ws-path the server treats the upgrade as any HTTP visitor: 404 too.
        let plain = start_server(server_config()).await;
        let url = format!("ws://127.0.0.1:{}/ferry", plain.local_addr().port());
        let err = Client::connect(ws_client_config(&url)).await.expect_err("refused");
        assert!(err.to_string().contains("404"), "{err}");
    })
    .await
}

#[tokio::test]
async fn a_wrong_secret_over_ws_is_refused() {
    within(30, async {
        let server = start_server(ws_server_config()).await;
        let url = format!("ws://127.0.0.1:{}/ferry", server.local_addr().port());
        let mut config = ws_client_config(&url);
        config.secret = "wrong".into();
        let err = Client::connect(config).await.expect_err("refused");
        assert!(matches!(err, ClientError::LoginRefused(LoginRefusal::AuthFailed { .. })), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_client_reconnects_after_a_server_restart() {
    let client_for = |addr| ws_client_config(&format!("ws://{addr}/ferry"));
    assert_reconnects_after_a_server_restart(ws_server_config(), client_for).await
}

#[tokio::test]
async fn a_text_message_or_a_huge_frame_ends_the_link() {
    within(30, async {
        // A handshake timeout longer than the wait below: only the refusal closes the link in time.
        let mut config = ws_server_config();
        config.handshake_timeout = Duration::from_secs(60);
        let server = start_server(config).await;
        let addr = server.local_addr();
        for frame in [&b"\x81\x05hello"[..], &b"\x82\x7f\x00\x00\x00\x00\xff\xff\xff\xff"[..]] {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let request = "GET /ferry HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                           Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                tcp.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
            // Unmasked, as a client must not send: refused as well as the text and the 4 GiB frame.
            tcp.write_all(frame).await.unwrap();
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "the server kept the link open");
        }
        // And the server still serves.
        let client = Client::connect(ws_client_config(&format!("ws://{addr}/ferry"))).await.unwrap();
        assert_tunnel_carries(&client).await;
    })
    .await
}

/// nginx from Debian (which `.ci/run` installs), proxying `/ferry` with the upgrade headers.
struct Nginx {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    async fn start(upstream: std::net::SocketAddr) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port().await;
        let root = dir.path().display();
        let conf = format!(
            "daemon off; master_process off; pid {root}/nginx.pid; error_log {root}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{ access_log off; client_body_temp_path {root}; proxy_temp_path {root};\n\
               fastcgi_temp_path {root}; uwsgi_temp_path {root}; scgi_temp_path {root};\n\
               server {{ listen 127.0.0.1:{port};\n\
                 location /ferry {{ proxy_pass http://{upstream}; proxy_http_version 1.1;\n\
                   proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\";\n\
                   proxy_set_header Host $host; proxy_read_timeout 1h; }} }} }}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = tokio::process::Command::new(nginx_binary())
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        let nginx = Nginx { child, port, _dir: dir };
        let up = poll_until(|| async { TcpStream::connect(("127.0.0.1", nginx.port)).await.is_ok() }).await;
        assert!(up, "nginx never listened");
        nginx
    }
}

fn nginx_binary() -> &'static str {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("no nginx found: install it (apt-get install nginx-light), as .ci/run does")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_through_a_real_nginx_reverse_proxy() {
    within(60, async {
        let server = start_server(ws_server_config()).await;
        let mut nginx = Nginx::start(server.local_addr()).await;
        let url = format!("ws://127.0.0.1:{}/ferry", nginx.port);
        let client = Client::connect(ws_client_config(&url)).await.expect("client connects through nginx");
        assert_tunnel_carries(&client).await;
        // Visitors opened many data links through nginx; all of them worked.
        assert!(nginx.child.try_wait().unwrap().is_none(), "nginx died");
    })
    .await
}
