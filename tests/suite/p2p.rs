//! Peer-to-peer services on loopback: a client forwards a local port to another client's
//! P2P service, directly when punching works (on loopback it always can) and through the
//! server when it cannot; who may reach a service; peers-only services.
//! The NAT cases run in network namespaces (`faults/nat.rs`).

use std::time::Duration;

use crate::common::services::{hash_through, hashing_service};
use crate::common::*;
use ferry::{Client, ClientConfig, ForwardConfig, PeerPolicy, ServerHandle, ServiceConfig, ServiceInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server with a STUN port and two users, id1 and id2.
async fn p2p_server() -> ServerHandle {
    let mut config = server_config().with_user("id2", "secret2");
    config.stun_addr = Some("127.0.0.1:0".parse().unwrap());
    start_server(config).await
}

fn peer_config(server: &ServerHandle, id: &str, secret: &str) -> ClientConfig {
    let mut config = client_config(server.local_addr(), id, secret);
    config.p2p.remote_stun = server.stun_local_addr().map(|a| a.to_string());
    config
}

/// The service named `name` as its owner's discovery shows it.
async fn service_named(owner: &Client, name: &str) -> ServiceInfo {
    let services = owner.discover().await.unwrap();
    services.into_iter().find(|s| s.name == name).expect("service listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_reaches_a_p2p_service_directly_and_the_server_carries_none_of_it() {
    within(60, async {
        let server = p2p_server().await;
        let serving = Client::connect(peer_config(&server, "id1", "secret1")).await.unwrap();
        let service = ServiceConfig::tcp(&hashing_service().await.to_string())
            .with_host_prefix("sink")
            .with_p2p(PeerPolicy::default());
        let service = ServiceConfig { name: "sink".into(), ..service };
        let registration = serving.add_service(service).await.unwrap();
        assert_eq!(registration.host(), Some("sink"), "the P2P name");
        assert!(registration.remote_port() > 0, "not peers-only: a public port too");

        let forwarding = Client::connect(peer_config(&server, "id1", "secret1")).await.unwrap();
        let forward =
            forwarding.forward(ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "sink")).await.unwrap();
        let payload = random_bytes(8 << 20);
        assert_eq!(hash_through(forward.local_addr(), &payload).await, sha256(&payload));
        let second = random_bytes(1 << 20);
        assert_eq!(hash_through(forward.local_addr(), &second).await, sha256(&second));
        assert_eq!((forward.counts().direct(), forward.counts().relayed()), (2, 0));

        let info = service_named(&serving, "sink").await;
        assert_eq!((info.bytes_in, info.bytes_out), (0, 0), "the server carried none of it");
        let peers = info.p2p.expect("p2p counts");
        assert_eq!(peers.name, "sink");
        assert!(
            poll_until(|| async { service_named(&serving, "sink").await.p2p.unwrap().direct == 1 }).await,
            "the API shows one direct peer"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_direct_path_connections_go_through_the_server_within_the_deadline() {
    within(60, async {
        let server = p2p_server().await;
        // The serving client's P2P port is taken: it can offer no direct path.
        let taken = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let mut config = peer_config(&server, "id1", "secret1");
        config.p2p.ports = Some((port, port));
        let serving = Client::connect(config).await.unwrap();
        let service = ServiceConfig::tcp(&hashing_service().await.to_string())
            .with_p2p(PeerPolicy { only: true, ..Default::default() });
        let service = ServiceConfig { name: "hidden".into(), ..service };
        let registration = serving.add_service(service).await.unwrap();
        assert_eq!(registration.remote_port(), 0, "peers only: no public port");
        assert_eq!(registration.public_addr(), "p2p://id1", "named by the id without a host prefix");

        let forwarding = Client::connect(peer_config(&server, "id1", "secret1")).await.unwrap();
        let forward =
            forwarding.forward(ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "id1")).await.unwrap();
        let payload = random_bytes(4 << 20);
        let started = tokio::time::Instant::now();
        assert_eq!(hash_through(forward.local_addr(), &payload).await, sha256(&payload));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "relayed within the deadline: {:?}",
            started.elapsed()
        );
        assert_eq!((forward.counts().direct(), forward.counts().relayed()), (0, 1));
        let info = service_named(&serving, "hidden").await;
        assert!(info.bytes_in >= payload.len() as u64, "the server carried it: {}", info.bytes_in);
        drop(taken);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_are_refused_unless_the_service_allows_their_id() {
    within(60, async {
        let server = p2p_server().await;
        let serving = Client::connect(peer_config(&server, "id1", "secret1")).await.unwrap();
        let sink = hashing_service().await.to_string();
        let private = ServiceConfig::tcp(&sink).with_host_prefix("private").with_p2p(PeerPolicy::default());
        let shared = ServiceConfig::tcp(&sink)
            .with_host_prefix("shared")
            .with_p2p(PeerPolicy { only: true, allow_ids: vec!["id2".into()] });
        let _private =
            serving.add_service(ServiceConfig { name: "private".into(), ..private }).await.unwrap();
        let _shared = serving.add_service(ServiceConfig { name: "shared".into(), ..shared }).await.unwrap();

        let other = Client::connect(peer_config(&server, "id2", "secret2")).await.unwrap();
        let refused =
            other.forward(ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "private")).await.unwrap();
        let answer = hash_through(refused.local_addr(), b"let me in").await;
        assert!(answer.is_empty(), "refused: the connection closes with nothing");
        assert_eq!(refused.counts().failed(), 1);
        let unknown =
            other.forward(ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "nobody")).await.unwrap();
        assert!(hash_through(unknown.local_addr(), b"hello").await.is_empty());
        assert_eq!(unknown.counts().failed(), 1);

        let allowed =
            other.forward(ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "shared")).await.unwrap();
        let payload = random_bytes(1 << 20);
        assert_eq!(hash_through(allowed.local_addr(), &payload).await, sha256(&payload));
        assert_eq!(allowed.counts().direct() + allowed.counts().relayed(), 1);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_direct_connection_closes_and_the_next_connection_punches_again() {
    within(60, async {
        let server = p2p_server().await;
        let serving = Client::connect(peer_config(&server, "id1", "secret1")).await.unwrap();
        let service =
            ServiceConfig::tcp(&hashing_service().await.to_string()).with_p2p(PeerPolicy::default());
        let _open = serving.add_service(ServiceConfig { name: "idle".into(), ..service }).await.unwrap();
        let mut config = peer_config(&server, "id1", "secret1");
        config.p2p.idle_timeout = Duration::from_millis(300);
        let forwarding = Client::connect(config).await.unwrap();
        let forward =
            forwarding.forward(ForwardConfig::new("127.0.0.1:0".parse().unwrap(), "id1")).await.unwrap();
        let direct_peers = || async { service_named(&serving, "idle").await.p2p.unwrap().direct };
        assert_eq!(hash_through(forward.local_addr(), b"one").await, sha256(b"one"));
        assert!(poll_until(|| async { direct_peers().await == 1 }).await, "direct while in use");
        assert!(poll_until(|| async { direct_peers().await == 0 }).await, "closed once idle");
        assert_eq!(hash_through(forward.local_addr(), b"two").await, sha256(b"two"));
        assert_eq!((forward.counts().direct(), forward.counts().relayed()), (2, 0), "punched again");
    })
    .await
}

#[tokio::test]
async fn a_client_cannot_pile_up_offers_nor_answer_for_another_or_forward_without_proof() {
    use crate::common::raw::login_by_hand;
    use ferry::proto::{
        preamble_with, ClientMessage, ForwardHello, LinkKind, PeerOffer, PeerPolicy as Policy, ServerMessage,
        ServiceControl, ServiceSpec,
    };
    within(30, async {
        let server = p2p_server().await;
        // A serving client that never answers offers.
        let stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut silent = login_by_hand(stream, "id1", "secret1", "silent").await.unwrap();
        let spec = ServiceSpec::Tcp {
            name: "quiet".into(),
            port: None,
            random: true,
            proxy_protocol: None,
            prefix: Some("quiet".into()),
        };
        let control =
            ServiceControl { p2p: Some(Policy { only: true, ..Default::default() }), ..Default::default() };
        silent.send(&ClientMessage::Register { request: 1, spec, control }).await.unwrap();
        loop {
            match silent.recv::<ServerMessage>().await.unwrap() {
                ServerMessage::Ping { seq } => silent.send(&ClientMessage::Pong { seq }).await.unwrap(),
                registered => {
                    assert!(
                        matches!(registered, ServerMessage::Registered { port: 0, .. }),
                        "{registered:?}"
                    );
                    break;
                }
            }
        }

        let stream = TcpStream::connect(server.local_addr()).await.unwrap();
        let mut asker = login_by_hand(stream, "id1", "secret1", "asker").await.unwrap();
        let offer = PeerOffer { candidates: vec!["127.0.0.1:9".parse().unwrap(); 20], fingerprint: [1; 32] };
        for request in 0..20 {
            let connect = ClientMessage::PeerConnect { request, name: "quiet".into(), offer: offer.clone() };
            asker.send(&connect).await.unwrap();
        }
        let mut refused = Vec::new();
        while refused.len() < 4 {
            match asker.recv::<ServerMessage>().await.unwrap() {
                ServerMessage::PeerAnswer { request, answer: Err(why) } => {
                    refused.push((request, why.to_string()))
                }
                ServerMessage::Ping { seq } => asker.send(&ClientMessage::Pong { seq }).await.unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(refused.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![16, 17, 18, 19], "{refused:?}");
        assert!(refused[0].1.contains("too many peer connections pending"), "{refused:?}");
        let mut attempts = Vec::new();
        while attempts.len() < 16 {
            match silent.recv::<ServerMessage>().await.unwrap() {
                ServerMessage::PeerOffer { attempt, offer, from, .. } => {
                    assert_eq!(
                        (offer.candidates.len(), from.as_str()),
                        (ferry::proto::MAX_CANDIDATES, "id1")
                    );
                    attempts.push(attempt);
                }
                ServerMessage::Ping { seq } => silent.send(&ClientMessage::Pong { seq }).await.unwrap(),
                other => panic!("unexpected {other:?}"),
            }
        }
        // Only the session an offer went to may answer it.
        let forged = ClientMessage::PeerAnswer { attempt: attempts[0], answer: Err("forged".into()) };
        asker.send(&forged).await.unwrap();
        asker.send(&ClientMessage::Ping { seq: 99 }).await.unwrap();
        loop {
            match asker.recv::<ServerMessage>().await.unwrap() {
                ServerMessage::Pong { seq: 99 } => break,
                ServerMessage::Ping { seq } => asker.send(&ClientMessage::Pong { seq }).await.unwrap(),
                other => panic!("a forged answer reached the asker: {other:?}"),
            }
        }

        // A forward link with a wrong proof gets no byte back and is closed.
        let mut link = TcpStream::connect(server.local_addr()).await.unwrap();
        let hello = ForwardHello { session: 1, seq: 7, mac: [0; 32], name: "quiet".into() };
        link.write_all(&preamble_with(LinkKind::Forward, &hello).unwrap()).await.unwrap();
        let mut got = Vec::new();
        link.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "nothing for a link without proof: {got:?}");
    })
    .await
}
