//! `--compress zstd`: a service's data links compressed between client and server.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::common::services::counting_forwarder;
use crate::common::*;
use crate::quic_transport::{quic_client_config, quic_server_config};
use crate::tls::make_certs;
use ferry::proto::Compression;
use ferry::{Client, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Text-like bytes that compress well, and differ from run to run.
fn compressible(len: usize) -> Vec<u8> {
    let words: Vec<String> = (0..64).map(|i| format!("{:x}", rand::random::<u32>() ^ i)).collect();
    let mut text = Vec::with_capacity(len + 16);
    while text.len() < len {
        text.extend_from_slice(words[rand::random::<usize>() % words.len()].as_bytes());
        text.push(b' ');
    }
    text.truncate(len);
    text
}

/// Echoes `payload` through a new service of `client` and returns the bytes `carried`
/// gained meanwhile.
async fn wire_bytes_for(client: &Client, service: ServiceConfig, payload: &[u8], carried: &AtomicU64) -> u64 {
    let tunnel = client.add_service(service).await.unwrap();
    let public: SocketAddr = format!("127.0.0.1:{}", tunnel.remote_port()).parse().unwrap();
    let before = carried.load(Ordering::Relaxed);
    assert_eq!(sha256(&echo_through(public, payload).await.unwrap()), sha256(payload));
    carried.load(Ordering::Relaxed) - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_services_shrink_text_on_the_wire_and_leave_random_bytes_be() {
    within(60, async {
        let server = start_server(server_config()).await;
        let (forwarder, carried) = counting_forwarder(server.local_addr()).await.unwrap();
        let client = connect(forwarder).await;
        let echo = echo_server().await.to_string();
        let zstd = || ServiceConfig { compress: Some(Compression::Zstd), ..ServiceConfig::tcp(&echo) };

        let text = compressible(4 << 20);
        let plain = wire_bytes_for(&client, ServiceConfig::tcp(&echo), &text, &carried).await;
        let squeezed = wire_bytes_for(&client, zstd(), &text, &carried).await;
        assert!(plain >= 2 * text.len() as u64, "both ways in clear: {plain}");
        assert!(squeezed * 3 < plain, "compressed {squeezed} bytes against {plain}");

        let noise = random_bytes(2 << 20);
        let squeezed = wire_bytes_for(&client, zstd(), &noise, &carried).await;
        assert!(squeezed < 2 * noise.len() as u64 * 101 / 100, "random bytes grow by under 1%: {squeezed}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_goes_with_encrypt_over_quic_and_interactive_traffic() {
    within(60, async {
        let certs = make_certs();
        let server = start_server(quic_server_config(&certs)).await;
        let port = server.quic_local_addr().unwrap().port();
        let client = Client::connect(quic_client_config(port, &certs)).await.unwrap();
        let echo = echo_server().await.to_string();
        let service =
            ServiceConfig { compress: Some(Compression::Zstd), encrypt: true, ..ServiceConfig::tcp(&echo) };
        let tunnel = client.add_service(service).await.unwrap();
        let public: SocketAddr = format!("127.0.0.1:{}", tunnel.remote_port()).parse().unwrap();
        // A short exchange comes back at once: the compressor holds nothing back.
        let mut visitor = TcpStream::connect(public).await.unwrap();
        for line in [&b"ping\n"[..], b"pong\n", b"a third line\n"] {
            visitor.write_all(line).await.unwrap();
            let mut back = vec![0u8; line.len()];
            visitor.read_exact(&mut back).await.unwrap();
            assert_eq!(back, line);
        }
        drop(visitor);
        let payload = compressible(1 << 20);
        assert_eq!(sha256(&echo_through(public, &payload).await.unwrap()), sha256(&payload));
        let services = client.discover().await.unwrap();
        assert_eq!(services[0].bytes_in, (1 << 20) + 23, "counted as the visitor sent them");
    })
    .await
}
