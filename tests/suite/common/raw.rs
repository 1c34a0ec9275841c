//! The control protocol spoken by hand, for tests that watch each step of a login.

use std::net::SocketAddr;

use ferry::auth::{client_login, Secret};
use ferry::proto::{preamble_with, ClientMessage, ControlChannel, LinkKind, ServerMessage};
use ferry::LoginRefusal;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `server` from `source`, any address of 127.0.0.0/8 (each its own ban).
pub async fn connect_from(source: &str, server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(server).await.unwrap()
}

/// Sends the preamble and a hello naming `id`, in one write as the client does; returns
/// the channel and the server's first answer.
pub async fn hello(
    mut stream: TcpStream,
    id: &str,
    instance: &str,
) -> (ControlChannel<TcpStream>, ServerMessage) {
    let hello = ClientMessage::Hello {
        id: id.into(),
        instance: instance.into(),
        software: "test".into(),
        tags: Vec::new(),
    };
    stream.write_all(&preamble_with(LinkKind::Control, &hello).unwrap()).await.unwrap();
    let mut chan = ControlChannel::new(stream);
    let first = chan.recv::<ServerMessage>().await.expect("an answer to the hello");
    (chan, first)
}

/// Logs in by hand as `id`; the channel on welcome, the refusal otherwise.
pub async fn login_by_hand(
    stream: TcpStream,
    id: &str,
    secret: &str,
    instance: &str,
) -> Result<ControlChannel<TcpStream>, LoginRefusal> {
    let (mut chan, first) = hello(stream, id, instance).await;
    let (nonce, ephemeral_key) = match first {
        ServerMessage::Challenge { nonce, ephemeral_key, .. } => (nonce, ephemeral_key),
        ServerMessage::LoginRefused { refusal } => return Err(refusal),
        other => panic!("unexpected {other:?}"),
    };
    let (login, _) = client_login(id, &Secret::new(secret), &nonce, &ephemeral_key, false);
    chan.send(&login).await.unwrap();
    match chan.recv::<ServerMessage>().await.unwrap() {
        ServerMessage::Welcome { .. } => Ok(chan),
        ServerMessage::LoginRefused { refusal } => Err(refusal),
        other => panic!("unexpected {other:?}"),
    }
}
