//! Hostile or broken input on the client port never disturbs existing tunnels.

use std::time::Duration;

use crate::common::*;
use ferry::proto::{write_frame, write_preamble, ControlChannel, DataHello, LinkKind, ServerMessage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_frames_leave_tunnels_serving() {
    within(60, async {
        let tunnel = echo_tunnel().await;
        let server_addr = tunnel.server.local_addr();
        wait_until_echo(tunnel.public).await;

        // 1 MiB of random bytes.
        let mut garbage = TcpStream::connect(server_addr).await.unwrap();
        let _ = garbage.write_all(&random_bytes(1 << 20)).await;

        // A valid preamble, then a frame that announces 1000 bytes and stops after 10.
        let mut truncated = TcpStream::connect(server_addr).await.unwrap();
        write_preamble(&mut truncated, LinkKind::Control).await.unwrap();
        truncated.write_all(&1000u32.to_be_bytes()).await.unwrap();
        truncated.write_all(b"{\"type\":\"l").await.unwrap();
        truncated.shutdown().await.unwrap();

        // A frame that announces 4 GiB.
        let mut huge = TcpStream::connect(server_addr).await.unwrap();
        write_preamble(&mut huge, LinkKind::Data).await.unwrap();
        huge.write_all(&u32::MAX.to_be_bytes()).await.unwrap();

        // A login that is not JSON.
        let mut bad_login = TcpStream::connect(server_addr).await.unwrap();
        write_preamble(&mut bad_login, LinkKind::Control).await.unwrap();
        bad_login.write_all(&5u32.to_be_bytes()).await.unwrap();
        bad_login.write_all(b"\x00\x01\x02\x03\x04").await.unwrap();

        // Each bad peer is dropped by the server...
        for (name, mut stream) in
            [("garbage", garbage), ("truncated", truncated), ("huge", huge), ("bad login", bad_login)]
        {
            let mut sink = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
            assert!(closed.is_ok(), "server kept the {name} connection open");
        }
        // ...and the existing tunnel serves on, intact.
        let payload = random_bytes(4 << 20);
        let got = echo_through(tunnel.public, &payload).await.unwrap();
        assert_eq!(sha256(&got), sha256(&payload));
        // New clients still log in.
        connect(server_addr).await.shutdown().await;
    })
    .await
}

/// A data connection with a forged proof never receives a visitor.
#[tokio::test]
async fn forged_data_connection_is_refused() {
    within(30, async {
        let tunnel = echo_tunnel().await;
        let mut forged = TcpStream::connect(tunnel.server.local_addr()).await.unwrap();
        write_preamble(&mut forged, LinkKind::Data).await.unwrap();
        write_frame(&mut forged, &DataHello { session: 1, seq: 999, mac: [0u8; 32] }).await.unwrap();
        for _ in 0..20 {
            assert_eq!(echo_through(tunnel.public, b"mine").await.unwrap(), b"mine");
        }
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), forged.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "forged data connection left open");
        assert!(got.is_empty(), "forged data connection received {} bytes", got.len());
    })
    .await
}

/// A peer of another protocol version is told so in words.
#[tokio::test]
async fn version_mismatch_is_reported() {
    within(30, async {
        let tunnel = echo_tunnel().await;
        let mut stream = TcpStream::connect(tunnel.server.local_addr()).await.unwrap();
        stream.write_all(b"FERRY\x00\x09C").await.unwrap();
        let mut chan = ControlChannel::new(stream);
        match chan.recv::<ServerMessage>().await {
            Ok(ServerMessage::LoginRefused { refusal }) => {
                assert!(refusal.to_string().contains("version"), "{refusal}");
            }
            other => panic!("expected a refusal naming the version, got {other:?}"),
        }
    })
    .await
}
