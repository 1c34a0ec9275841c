//! ferry as an eavesdropper and a man in the middle see it (issue 9.8): on `tcp://`
//! nothing of the secret or the control messages crosses in clear, injected frames are
//! refused, an impostor server is found out, an old peer is told to upgrade, and the data
//! of an `encrypt` service is sealed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::common::*;
use ferry::auth::{hello_digest, Secret, ServerPake, Verifier};
use ferry::proto::{
    encode_frame, read_frame, read_preamble, Challenge, ClientMessage, ControlChannel, LinkKind,
    LoginRefusal, Proof, ServerMessage, ServiceSpec, MAGIC,
};
use ferry::{Client, ClientError, ClientState, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// A relay between clients and the server that records every byte the clients send, and
/// can write bytes of its own into the first connection it relays (the control connection).
struct Tap {
    addr: SocketAddr,
    upstream: Arc<Mutex<Vec<u8>>>,
    downstream: Arc<Mutex<Vec<u8>>>,
    inject: mpsc::UnboundedSender<Vec<u8>>,
}

async fn tap(server: SocketAddr) -> Tap {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = Arc::new(Mutex::new(Vec::new()));
    let downstream = Arc::new(Mutex::new(Vec::new()));
    let (inject, injected) = mpsc::unbounded_channel::<Vec<u8>>();
    let (up, down) = (upstream.clone(), downstream.clone());
    tokio::spawn(async move {
        let mut injected = Some(injected);
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(server).await else { return };
            tokio::spawn(relay(client, server, up.clone(), down.clone(), injected.take()));
        }
    });
    Tap { addr, upstream, downstream, inject }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    up: Arc<Mutex<Vec<u8>>>,
    down: Arc<Mutex<Vec<u8>>>,
    mut injected: Option<mpsc::UnboundedReceiver<Vec<u8>>>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let inject = async {
                match injected.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = client_read.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        up.lock().unwrap().extend_from_slice(&buf[..n]);
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                },
                Some(bytes) = inject => {
                    if server_write.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let downward = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    down.lock().unwrap().extend_from_slice(&buf[..n]);
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    tokio::join!(upward, downward);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Everything a client sends and receives on tcp://, login included, shows neither its
/// secret nor anything derived from it that a guess could be checked against, and no
/// control message after the welcome is readable.
#[tokio::test]
async fn an_eavesdropper_sees_no_secret_and_no_control_message() {
    within(30, async {
        let secret = "correct-horse-battery-staple";
        let server = start_server(server_config().with_user("alice", secret)).await;
        let tap = tap(server.local_addr()).await;
        let client = Client::connect(client_config(tap.addr, "alice", secret)).await.unwrap();
        let echo = echo_server().await;
        let mut service = ServiceConfig::tcp(&echo.to_string());
        service.name = "visible-service-name".into();
        let tunnel = client.add_service(service).await.unwrap();
        assert_eq!(echo_through(tunnel.public_addr().parse().unwrap(), b"ping").await.unwrap(), b"ping");
        assert!(!client.discover().await.unwrap().is_empty());
        client.shutdown().await;

        let (up, down) = (tap.upstream.lock().unwrap().clone(), tap.downstream.lock().unwrap().clone());
        assert!(contains(&up, b"\"hello\"") && contains(&up, b"alice"), "the hello is in clear, by design");
        for seen in [&up, &down] {
            assert!(!contains(seen, secret.as_bytes()), "the secret crossed the wire");
            for word in [&b"visible-service-name"[..], b"\"register\"", b"\"registered\"", b"\"query\""] {
                assert!(!contains(seen, word), "{} crossed in clear", String::from_utf8_lossy(word));
            }
        }
        server.shutdown().await;
    })
    .await
}

/// A frame written into the control connection by someone in the middle does not
/// authenticate: the server drops the connection instead of acting on it.
#[tokio::test]
async fn a_man_in_the_middle_cannot_inject_control_messages() {
    within(30, async {
        let server = start_server(server_config()).await;
        let tap = tap(server.local_addr()).await;
        let client = Client::connect(client_config(tap.addr, "id1", "secret1")).await.unwrap();
        let mut state = client.state();
        let port = free_port().await;
        let spec = ServiceSpec::Tcp {
            name: "forged".into(),
            port: Some(port),
            random: false,
            proxy_protocol: None,
            prefix: None,
        };
        let mut forged = Vec::new();
        encode_frame(
            &ClientMessage::Register { request: 99, spec, control: Default::default() },
            &mut forged,
        )
        .unwrap();
        tap.inject.send(forged).unwrap();
        let dropped = state.wait_for(|s| matches!(s, ClientState::Disconnected { .. })).await.is_ok();
        assert!(dropped, "the server kept a control connection that carried a forged frame");
        assert!(
            TcpListener::bind(("127.0.0.1", port)).await.is_ok(),
            "the forged register opened port {port}"
        );
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
}

/// A server that does not hold the user's verifier cannot finish the exchange: the client
/// refuses its welcome, and says so as a final error.
#[tokio::test]
async fn an_impostor_server_is_found_out() {
    within(30, async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let impostor = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            assert_eq!(read_preamble(&mut stream).await.unwrap(), LinkKind::Control);
            let mut chan = ControlChannel::new(stream);
            let ClientMessage::Hello { id, instance, software, tags } = chan.recv().await.unwrap() else {
                panic!("expected a hello")
            };
            let guess = Verifier::plain(&id, &Secret::new("a guess"));
            let pake = ServerPake::start(&id, &guess, hello_digest(&id, &instance, &software, &tags));
            let challenge = Challenge::Pake { message: pake.message().to_vec(), stretched: false };
            chan.send(&ServerMessage::Challenge { challenge }).await.unwrap();
            let ClientMessage::Login { proof: Proof::Pake { message, confirm } } = chan.recv().await.unwrap()
            else {
                panic!("expected a PAKE login")
            };
            assert!(pake.finish(&message, &confirm).is_none(), "a guess cannot check the client's proof");
            let welcome =
                ServerMessage::Welcome { session: 1, heartbeat_interval_ms: 1000, confirm: [7; 32] };
            chan.send(&welcome).await.unwrap();
            // Keep the connection until the client has judged the welcome.
            let _ = chan.recv::<ClientMessage>().await;
        });
        let Err(err) = Client::connect(client_config(addr, "id1", "secret1")).await else {
            panic!("the client trusted an impostor")
        };
        assert!(matches!(err, ClientError::ServerNotVerified), "{err:?}");
        assert!(err.is_fatal(), "{err}");
        impostor.await.unwrap();
    })
    .await
}

/// A client of protocol 2 (the signed login) is refused with a sentence that says which
/// side to upgrade.
#[tokio::test]
async fn an_old_client_is_told_to_upgrade() {
    within(30, async {
        let server = start_server(server_config()).await;
        let mut stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut preamble = MAGIC.to_vec();
        preamble.extend_from_slice(&2u16.to_be_bytes());
        preamble.push(b'C');
        stream.write_all(&preamble).await.unwrap();
        let answer: ServerMessage = read_frame(&mut stream).await.unwrap();
        let ServerMessage::LoginRefused { refusal } = answer else { panic!("{answer:?}") };
        assert_eq!(refusal, LoginRefusal::VersionMismatch { server: 3, client: 2 });
        assert!(refusal.to_string().contains("upgrade the client"), "{refusal}");
    })
    .await
}

/// Bytes that stand out on the wire: a pattern no random key stream produces by chance.
fn marked_payload(len: usize) -> Vec<u8> {
    b"PLAINTEXT-MARK-".iter().copied().cycle().take(len).collect()
}

/// An `encrypt` service's data is sealed on the wire, both ways and for visitor after
/// visitor on the same data connections; a service without it is not (which shows the
/// tap would see the mark).
#[tokio::test]
async fn an_encrypt_service_seals_its_data_on_the_wire() {
    within(60, async {
        let server = start_server(server_config()).await;
        let tap = tap(server.local_addr()).await;
        let mut config = client_config(tap.addr, "id1", "secret1");
        config.remote_idle_connections = 1;
        let client = Client::connect(config).await.unwrap();
        let echo = echo_server().await;
        let mut sealed = ServiceConfig::tcp(&echo.to_string());
        sealed.encrypt = true;
        let tunnel = client.add_service(sealed).await.unwrap();
        let public: SocketAddr = tunnel.public_addr().parse().unwrap();
        let payload = marked_payload(256 * 1024);
        for _ in 0..5 {
            let echoed = echo_through(public, &payload).await.unwrap();
            assert_eq!(sha256(&echoed), sha256(&payload), "sealed bytes came back changed");
        }
        let mark = b"PLAINTEXT-MARK-PLAINTEXT";
        assert!(!contains(&tap.upstream.lock().unwrap(), mark), "the client sent the data in clear");
        assert!(!contains(&tap.downstream.lock().unwrap(), mark), "the server sent the data in clear");

        let plain = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let echoed = echo_through(plain.public_addr().parse().unwrap(), &payload).await.unwrap();
        assert_eq!(sha256(&echoed), sha256(&payload));
        assert!(contains(&tap.downstream.lock().unwrap(), mark), "a service without encrypt travels as is");
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
}

/// What a rewriting relay replaces in the first frame the server sends on a connection.
type Rewrite = Arc<Mutex<Option<(String, String)>>>;

/// A relay that applies `rewrite` (once set) to the first frame the server sends on each
/// connection: on a data connection, that is the first visitor's open message.
async fn rewriting_tap(server: SocketAddr, rewrite: Rewrite) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(server).await else { return };
            let rewrite = rewrite.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upward = async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                };
                let downward = async move {
                    let mut first = Vec::new();
                    let mut buf = vec![0u8; 16 * 1024];
                    while first.len() < 4 || first.len() < 4 + frame_len(&first) {
                        match server_read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => first.extend_from_slice(&buf[..n]),
                        }
                    }
                    let end = 4 + frame_len(&first);
                    if let Some((from, to)) = rewrite.lock().unwrap().clone() {
                        let frame = String::from_utf8_lossy(&first[4..end]).replacen(&from, &to, 1);
                        assert_eq!(frame.len(), end - 4, "the rewrite keeps the frame's length");
                        first.splice(4..end, frame.into_bytes());
                    }
                    if client_write.write_all(&first).await.is_ok() {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    }
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(upward, downward);
            });
        }
    });
    addr
}

fn frame_len(bytes: &[u8]) -> usize {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize
}

/// A local service that answers each connection with `answer` and reports what it received.
async fn answering_service(answer: &'static [u8]) -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (received, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(answer).await;
                let mut got = Vec::new();
                let _ = stream.read_to_end(&mut got).await;
                let _ = received.send(got);
            });
        }
    });
    (addr, receiver)
}

/// Someone in the middle who changes the service number of a sealed visitor's open message
/// to another `encrypt` service of the same client does not get the visitor served by that
/// other local service: the visitor's keys are bound to the service, so nothing opens.
#[tokio::test]
async fn a_sealed_visitor_cannot_be_rerouted_to_another_service() {
    within(60, async {
        let server = start_server(server_config()).await;
        let rewrite = Rewrite::default();
        let tap = rewriting_tap(server.local_addr(), rewrite.clone()).await;
        let client = Client::connect(client_config(tap, "id1", "secret1")).await.unwrap();
        let (local_a, _) = answering_service(b"from-A").await;
        let (local_b, mut received_b) = answering_service(b"from-B").await;
        let mut tunnels = Vec::new();
        for local in [local_a, local_b] {
            let mut service = ServiceConfig::tcp(&local.to_string());
            service.encrypt = true;
            tunnels.push(client.add_service(service).await.unwrap());
        }
        let services = client.discover().await.unwrap();
        let number = |tunnel: &ferry::Registration| {
            services.iter().find(|s| s.port == tunnel.remote_port()).unwrap().id.to_string()
        };
        let (a, b) = (number(&tunnels[0]), number(&tunnels[1]));
        assert_eq!(a.len(), b.len(), "numbers of one length keep the frame's length");
        *rewrite.lock().unwrap() = Some((format!("\"service\":{a},"), format!("\"service\":{b},")));

        // A visitor of A, whose open message reaches the client as one of B.
        let mut visitor = TcpStream::connect(tunnels[0].public_addr()).await.unwrap();
        visitor.write_all(b"request-for-A").await.unwrap();
        visitor.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let _ = visitor.read_to_end(&mut answer).await;
        assert!(!contains(&answer, b"from-B"), "B's service answered A's visitor");
        // Nor A's: the open message was changed, so the visitor is not served at all.
        assert!(!contains(&answer, b"from-A"), "the relay did not change the open message");
        // Whatever B's service got (the client dials it before the records fail), it is not
        // the visitor's request; B reports before it closes, so the reports are all in.
        while let Ok(got) = received_b.try_recv() {
            assert!(!contains(&got, b"request-for-A"), "A's visitor reached B's service");
        }
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
}

/// An `encrypt` HTTP service: keep-alive requests and their answers, rewritten heads
/// included, cross the client's link sealed.
#[tokio::test]
async fn an_encrypt_http_service_seals_requests_and_answers() {
    within(30, async {
        let server = start_server(server_config()).await;
        let tap = tap(server.local_addr()).await;
        let client = Client::connect(client_config(tap.addr, "id1", "secret1")).await.unwrap();
        let local = crate::common::http::http_service("sealed-web").await;
        let mut service = ServiceConfig::http(&local.to_string());
        service.encrypt = true;
        let _ = client.add_service(service).await.unwrap();
        let mut visitor = TcpStream::connect(server.local_addr()).await.unwrap();
        for n in 0..3 {
            let path = format!("/PLAINTEXT-MARK-{n}");
            let answer =
                crate::common::http::request(&mut visitor, "GET", &path, "id1.example.com", "", b"").await;
            let text = answer.text();
            assert!(text.contains(&format!("path={path} ")) && text.contains("service=sealed-web"), "{text}");
        }
        for seen in [&tap.upstream, &tap.downstream] {
            let seen = seen.lock().unwrap();
            assert!(!contains(&seen, b"PLAINTEXT-MARK"), "a request or answer crossed in clear");
            assert!(!contains(&seen, b"sealed-web"), "an answer crossed in clear");
        }
        client.shutdown().await;
        server.shutdown().await;
    })
    .await
}
