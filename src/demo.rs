//! `ferry demo`: a server, a client and a tiny web service in one process, on loopback:
//! through a TCP tunnel, and to a browser over WebRTC (`/p2p.html` on the HTTP port).

use std::error::Error;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{ClientConfig, ServerConfig, ServiceConfig};
use crate::transport::RemoteAddr;
use crate::{Client, Server};

/// Runs the demo until `shutdown` completes; prints what to try.
pub async fn run(
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Box<dyn Error + Send + Sync>> {
    let web = TcpListener::bind("127.0.0.1:0").await?;
    let web_addr = web.local_addr()?;
    tokio::spawn(serve_hello(web));

    let secret = format!("{:032x}", rand::random::<u128>());
    let mut server_config = ServerConfig::default().with_user("demo", &secret);
    server_config.addr = Some("127.0.0.1:0".parse()?);
    server_config.tcp_ranges = vec!["20000-60000".parse()?];
    server_config.http_addr = Some("127.0.0.1:0".parse()?);
    server_config.stun_addr = Some("127.0.0.1:0".parse()?);
    let server = Server::bind(server_config).await?.spawn();

    let remote = RemoteAddr::parse(&server.local_addr().to_string())?;
    let mut client_config = ClientConfig::new(remote, "demo", &secret);
    client_config.p2p.remote_stun = server.stun_local_addr().map(|addr| addr.to_string());
    let client = Client::connect(client_config).await?;
    let tunnel = client.add_service(ServiceConfig::tcp(&web_addr.to_string()).with_random_fallback()).await?;
    let browsers =
        ServiceConfig { webrtc: true, ..ServiceConfig::http(&web_addr.to_string()).with_host_prefix("app") };
    let _browsers = client.add_service(browsers).await?;
    let http_port = server.http_local_addr().map(|addr| addr.port()).unwrap_or_default();

    println!();
    println!("  ferry demo is running");
    println!("    server (clients connect here): {}", server.local_addr());
    println!("    local web service:             http://{web_addr}/");
    println!("    public address of the tunnel:  http://{}/", tunnel.public_addr());
    println!();
    println!("  try:  curl http://{}/", tunnel.public_addr());
    println!("  and open http://app.localhost:{http_port}/p2p.html in a browser: the page");
    println!("        talks to the local service over WebRTC, the server only introduces them");
    println!("  stop: Ctrl-C");
    println!();

    shutdown.await;
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

/// A minimal HTTP responder: answers every request with a greeting and closes.
async fn serve_hello(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(answer(stream));
    }
}

async fn answer(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (kind, body) = if head.starts_with(b"GET /p2p.html ") {
        ("text/html; charset=utf-8", P2P_PAGE)
    } else {
        ("text/plain", "hello from a local service, through a ferry tunnel\n")
    };
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The demo's page for browser peers: fetches `/` from the local service over WebRTC.
const P2P_PAGE: &str = r#"<!doctype html>
<meta charset="utf-8"><title>ferry: a browser peer</title>
<pre id="out">connecting over WebRTC...</pre>
<script type="module">
import * as ferry from "/.well-known/ferry/p2p.js";
const out = document.getElementById("out");
try {
  const peer = await ferry.connect();
  const res = await peer.fetch("/");
  out.textContent = `mode: ${peer.mode} (direct: over a data channel; relay: through the server)\n` +
    `${res.status} ${await res.text()}`;
} catch (e) {
  out.textContent = String(e);
}
console.log(out.textContent);
</script>
"#;
