//! What `--compress zstd` costs and saves: 64 MiB of text-like bytes and 64 MiB of random
//! bytes, each sent by a visitor through a TCP tunnel to a sink and hashed, with and
//! without compression. The client reaches the server through a counting forwarder on
//! loopback, so the bytes on the client-server link are measured.
//!
//! Run: `cargo run --release --example compress_bench` (`MIB=16` for a shorter run).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use ferry::proto::Compression;
use ferry::{Client, ClientConfig, RemoteAddr, Server, ServerConfig, ServiceConfig};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// The test suite's services; this example uses two of them.
#[path = "../tests/suite/common/services.rs"]
#[allow(dead_code)]
mod services;

use services::{counting_forwarder, serve_hashing};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::var("MIB").ok().and_then(|m| m.parse().ok()).unwrap_or(64);
    let mut config = ServerConfig::default().with_user("bench", "bench-secret");
    config.addr = Some("127.0.0.1:0".parse()?);
    config.tcp_ranges = vec!["1024-65535".parse()?];
    let server = Server::bind(config).await?.spawn();
    let (forwarder, carried) = counting_forwarder(server.local_addr()).await?;
    let remote = RemoteAddr::parse(&forwarder.to_string())?;
    let client = Client::connect(ClientConfig::new(remote, "bench", "bench-secret")).await?;
    let sink = sink().await?;

    println!("| payload | compress | seconds | MB/s | bytes on the link | link / payload |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    for (kind, payload) in [("text", text(mib << 20)), ("random", random(mib << 20))] {
        for compress in [None, Some(Compression::Zstd)] {
            let service = ServiceConfig { compress, ..ServiceConfig::tcp(&sink.to_string()) };
            let tunnel = client.add_service(service).await?;
            let public: SocketAddr = format!("127.0.0.1:{}", tunnel.remote_port()).parse()?;
            let before = carried.load(Ordering::Relaxed);
            let started = Instant::now();
            let mut visitor = TcpStream::connect(public).await?;
            visitor.write_all(&payload).await?;
            visitor.shutdown().await?;
            let mut digest = [0u8; 32];
            visitor.read_exact(&mut digest).await?;
            let seconds = started.elapsed().as_secs_f64();
            assert_eq!(digest, sha256(&payload), "the sink got every byte");
            let link = carried.load(Ordering::Relaxed) - before;
            let name = if compress.is_some() { "zstd" } else { "off" };
            let rate = payload.len() as f64 / seconds / 1e6;
            let ratio = link as f64 / payload.len() as f64;
            println!("| {kind} {mib} MiB | {name} | {seconds:.2} | {rate:.0} | {link} | {ratio:.3} |");
            tunnel.cancel();
        }
    }
    client.shutdown().await;
    server.shutdown().await;
    Ok(())
}

/// A local service that reads everything and answers with its SHA-256.
async fn sink() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    serve_hashing(listener);
    Ok(addr)
}

/// Log-like lines: timestamps, levels and a small vocabulary, as a service's text output.
fn text(len: usize) -> Vec<u8> {
    let words =
        ["GET", "POST", "/api/v1/items", "200", "404", "user", "session", "ok", "latency_ms", "cache"];
    let mut out = Vec::with_capacity(len + 128);
    let mut n: u64 = 0;
    while out.len() < len {
        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let line = format!(
            "2026-12-03T11:{:02}:{:02}.{:06}Z INFO {} {} {}={}\n",
            (n >> 8) % 60,
            (n >> 16) % 60,
            (n >> 24) % 1_000_000,
            words[(n >> 40) as usize % words.len()],
            words[(n >> 44) as usize % words.len()],
            words[(n >> 48) as usize % words.len()],
            (n >> 52) % 1000
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(len);
    out
}

fn random(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut out);
    out
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}
