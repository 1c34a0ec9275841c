//! The control protocol spoken by hand, for tests that watch each step of a login.

use std::net::SocketAddr;

use ferry::auth::{client_pake, hello_digest, Secret, ServerPake, SessionKey, Verifier};
use ferry::proto::{preamble_with, Challenge, ClientMessage, ControlChannel, LinkKind, Proof, ServerMessage};
use ferry::seal::{FrameCipher, Side};
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
    let message = match first {
        ServerMessage::Challenge { challenge: Challenge::Pake { message, stretched: false } } => message,
        ServerMessage::LoginRefused { refusal } => return Err(refusal),
        other => panic!("unexpected {other:?}"),
    };
    let verifier = Verifier::plain(id, &Secret::new(secret));
    let answer = client_pake(id, &verifier, &message, hello_digest(id, instance, "test", &[]))
        .expect("a PAKE message");
    chan.send(&ClientMessage::Login {
        proof: Proof::Pake { message: answer.message, confirm: answer.confirm },
    })
    .await
    .unwrap();
    match chan.recv::<ServerMessage>().await.unwrap() {
        ServerMessage::Welcome { session, heartbeat_interval_ms, confirm } => {
            assert!(
                answer.key.check_welcome(session, heartbeat_interval_ms, &confirm),
                "the server proved its key"
            );
            chan.encrypt(FrameCipher::new(&answer.key, Side::Client));
            Ok(chan)
        }
        ServerMessage::LoginRefused { refusal } => Err(refusal),
        other => panic!("unexpected {other:?}"),
    }
}

/// Plays the server's side of a login on `chan` (whose preamble was read) for a client
/// whose secret is `secret`, up to and including the welcome; returns the session key.
pub async fn welcome_by_hand<S>(
    chan: &mut ControlChannel<S>,
    secret: &str,
    session: u64,
    heartbeat_ms: u64,
) -> SessionKey
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let ClientMessage::Hello { id, instance, software, tags } = chan.recv().await.unwrap() else {
        panic!("expected a hello")
    };
    let verifier = Verifier::plain(&id, &Secret::new(secret));
    let pake = ServerPake::start(&id, &verifier, hello_digest(&id, &instance, &software, &tags));
    let challenge = Challenge::Pake { message: pake.message().to_vec(), stretched: false };
    chan.send(&ServerMessage::Challenge { challenge }).await.unwrap();
    let ClientMessage::Login { proof: Proof::Pake { message, confirm } } = chan.recv().await.unwrap() else {
        panic!("expected a PAKE login")
    };
    let key = pake.finish(&message, &confirm).expect("the client knows the secret");
    let confirm = key.welcome_confirm(session, heartbeat_ms);
    chan.send(&ServerMessage::Welcome { session, heartbeat_interval_ms: heartbeat_ms, confirm })
        .await
        .unwrap();
    chan.encrypt(FrameCipher::new(&key, Side::Server));
    key
}
