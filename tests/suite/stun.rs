//! The server's STUN responder (`--stun-addr`): Binding requests get the address they came
//! from; nothing else gets an answer.

use std::net::SocketAddr;
use std::time::Duration;

use crate::cli::spawn_server_process;
use crate::common::*;
use ferry::proto::{binding_request, parse_binding_success};
use tokio::net::UdpSocket;

/// Sends a Binding request from `socket` to `stun`; the address the answer names.
async fn reflexive(socket: &UdpSocket, stun: SocketAddr) -> Option<SocketAddr> {
    let transaction: [u8; 12] = rand::random();
    socket.send_to(&binding_request(transaction), stun).await.unwrap();
    let mut buf = [0u8; 1500];
    let (len, from) =
        tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await.ok()?.ok()?;
    assert_eq!(from, stun);
    parse_binding_success(&buf[..len], transaction)
}

#[tokio::test]
async fn binding_requests_learn_their_address_and_nothing_else_is_answered() {
    within(30, async {
        let mut config = server_config();
        config.stun_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = start_server(config).await;
        let stun = server.stun_local_addr().expect("stun listener");
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        assert_eq!(reflexive(&socket, stun).await, Some(socket.local_addr().unwrap()));

        let mut huge = binding_request([7; 12]);
        huge.resize(4000, 0);
        huge[2..4].copy_from_slice(&((4000 - 20) as u16).to_be_bytes());
        for junk in [&b"GET / HTTP/1.1\r\n\r\n"[..], &binding_request([1; 12])[..19], &huge] {
            socket.send_to(junk, stun).await.unwrap();
        }
        let mut buf = [0u8; 64];
        let silent = tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buf)).await;
        assert!(silent.is_err(), "junk got an answer");
        let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        assert_eq!(reflexive(&other, stun).await, Some(other.local_addr().unwrap()), "still serving");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_stun_to_coturns_client() {
    within(60, async {
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let stun = format!("127.0.0.1:{port}");
        let (_server, _) = spawn_server_process(&["--stun-addr", &stun]).await;
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let stun: SocketAddr = stun.parse().unwrap();
        assert!(poll_until(|| async { reflexive(&socket, stun).await.is_some() }).await, "ferry answers");
        // A STUN client of another implementation (coturn's, which .ci/run installs).
        let output = output_of("turnutils_stunclient", &["-p", &port.to_string(), "127.0.0.1"]).await;
        assert!(output.contains("UDP reflexive addr: 127.0.0.1:"), "{output}");
    })
    .await
}

/// Runs `program` with `args` and returns what it printed, both streams.
async fn output_of(program: &str, args: &[&str]) -> String {
    let output = tokio::process::Command::new(program).args(args).output().await.expect("program runs");
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}
