//! `ferry demo`: a server, a client and a tiny web service in one process, on loopback.

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
    let server = Server::bind(server_config).await?.spawn();

    let remote = RemoteAddr::parse(&server.local_addr().to_string())?;
    let client = Client::connect(ClientConfig::new(remote, "demo", &secret)).await?;
    let tunnel = client.add_service(ServiceConfig::tcp(&web_addr.to_string()).with_random_fallback()).await?;

    println!();
    println!("  ferry demo is running");
    println!("    server (clients connect here): {}", server.local_addr());
    println!("    local web service:             http://{web_addr}/");
    println!("    public address of the tunnel:  http://{}/", tunnel.public_addr());
    println!();
    println!("  try:  curl http://{}/", tunnel.public_addr());
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
    let body = "hello from a local service, through a ferry tunnel\n";
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
