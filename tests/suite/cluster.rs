//! Several servers sharing one routing table in a real etcd: a port or host name has one
//! owner cluster-wide, and visitors at any node reach the tunnel on another.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::cli::ferry;
use crate::common::etcd::EtcdProcess;
use crate::common::http::{get, http_service};
use crate::common::services::{hash_through, hashing_service};
use crate::common::*;
use crate::websocket_tls::local_tls_echo;
use ferry::transport::client_tls_config;
use ferry::{
    Client, ClientConfig, ClientError, ClusterConfig, RegisterError, Registration, RemoteAddr, RemoteTrust,
    ServerHandle, ServiceConfig,
};

/// A node of the cluster at `etcd`, on its own loopback address `127.0.0.<n>` (its public
/// ports are bound there), with users id1 and id2.
async fn node(etcd: &EtcdProcess, n: u8) -> ServerHandle {
    start_server(node_config(etcd, n)).await
}

/// The configuration of [`node`].
fn node_config(etcd: &EtcdProcess, n: u8) -> ferry::ServerConfig {
    let mut config = server_config().with_user("id2", "secret2");
    config.addr = Some(format!("127.0.0.{n}:0").parse().unwrap());
    config.api_addr = Some(format!("127.0.0.{n}:0").parse().unwrap());
    config.sni_addr = Some(format!("127.0.0.{n}:0").parse().unwrap());
    config.cluster = Some(ClusterConfig {
        etcd: etcd.url.clone(),
        node_id: format!("n{n}"),
        node_addr: format!("127.0.0.{n}:0").parse().unwrap(),
        lease_ttl: Duration::from_secs(10),
        tls: None,
    });
    config
}

/// `GET path` on a node's API, as JSON.
async fn api(node: &ServerHandle, path: &str) -> Value {
    let response = get(node.api_local_addr().unwrap(), path, "localhost").await;
    assert_eq!(response.status, 200, "{path}: {}", response.text());
    serde_json::from_slice(&response.body).unwrap()
}

/// A hashing service behind `client` on a public port of its own: the port, and the tunnel.
async fn hashing_tunnel(client: &Client) -> (u16, Registration) {
    let port = free_port().await;
    let tcp = ServiceConfig::tcp(&hashing_service().await.to_string()).with_remote_port(port);
    let tunnel = client.add_service(tcp).await.unwrap();
    assert_eq!(tunnel.remote_port(), port);
    (port, tunnel)
}

/// Public port `port` at node `n` (each node binds its ports on `127.0.0.<n>`).
fn at_node(n: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], port))
}

/// Waits until `addr` accepts connections (a node listens on a port another holds once
/// its watch has seen the claim).
async fn wait_listening(addr: SocketAddr) {
    let listening = poll_until(|| async { tokio::net::TcpStream::connect(addr).await.is_ok() }).await;
    assert!(listening, "{addr} listens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn visitors_at_any_node_reach_a_tunnel_on_another() {
    within(60, async {
        let etcd = EtcdProcess::start().await;
        let nodes = [node(&etcd, 1).await, node(&etcd, 2).await, node(&etcd, 3).await];
        let client = connect(nodes[0].local_addr()).await;
        let (port, _tcp) = hashing_tunnel(&client).await;
        let web = ServiceConfig::http(&http_service("on node 1").await.to_string()).with_host_prefix("web");
        let _web = client.add_service(web).await.unwrap();

        let payload = random_bytes(64 << 20);
        for n in [2u8, 3] {
            let public = at_node(n, port);
            wait_listening(public).await;
            assert_eq!(
                hash_through(public, &payload).await,
                sha256(&payload),
                "64 MiB intact through node {n}"
            );
            let node = &nodes[usize::from(n) - 1];
            let page = get(node.local_addr(), "/", "web.example.com").await;
            assert_eq!(page.status, 200, "node {n}: {}", page.text());
            assert!(page.text().contains("on node 1"), "{}", page.text());
        }
        // TLS passed through by server name, relayed to node 1 still encrypted: the visitor
        // trusts only the local service's certificate.
        let dir = tempfile::tempdir().unwrap();
        let (local, local_cert) = local_tls_echo(dir.path()).await;
        let _secure = client
            .add_service(ServiceConfig::https(&local.to_string()).with_host_prefix("secure"))
            .await
            .unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(client_tls_config(&RemoteTrust::CaFile(local_cert)).unwrap());
        for node in &nodes[1..] {
            let sni = node.sni_local_addr().unwrap();
            let reached = poll_until(|| async {
                let Ok(tcp) = tokio::net::TcpStream::connect(sni).await else { return false };
                let name = rustls_pki_types::ServerName::try_from("secure.example.test").unwrap();
                let Ok(mut tls) = connector.connect(name, tcp).await else { return false };
                let payload = random_bytes(64 << 10);
                let (mut read, mut write) = tokio::io::split(&mut tls);
                let mut back = vec![0u8; payload.len()];
                let (sent, got) = tokio::join!(write.write_all(&payload), read.read_exact(&mut back));
                sent.is_ok() && got.is_ok() && back == payload
            });
            assert!(reached.await, "TLS passed through at {sni}");
        }
        let metrics = get(nodes[1].api_local_addr().unwrap(), "/metrics", "localhost").await.text();
        assert!(metrics.contains("ferry_node_relays_total{direction=\"out\"}"), "{metrics}");

        // Gone from node 1, gone everywhere: node 2 stops listening.
        drop(client);
        let public = at_node(2, port);
        let closed = poll_until(|| async { tokio::net::TcpStream::connect(public).await.is_err() }).await;
        assert!(closed, "node 2 stops relaying the port once its tunnel is gone");
        let page = get(nodes[1].local_addr(), "/", "web.example.com").await;
        assert_eq!(page.status, 404, "{}", page.text());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_asked_on_two_nodes_by_two_users_has_one_owner() {
    within(60, async {
        let etcd = EtcdProcess::start().await;
        let (one, two) = (node(&etcd, 1).await, node(&etcd, 2).await);
        let first = connect(one.local_addr()).await;
        let second = Client::connect(client_config(two.local_addr(), "id2", "secret2")).await.unwrap();
        for round in 0..5 {
            let port = free_port().await;
            let service = ServiceConfig::tcp("127.0.0.1:1").with_remote_port(port);
            let service = ServiceConfig { name: format!("r{round}"), ..service };
            let (a, b) =
                tokio::join!(first.add_service(service.clone()), second.add_service(service.clone()));
            assert!(a.is_ok() != b.is_ok(), "round {round}: exactly one wins: {a:?} {b:?}");
            let lost = match (a, b) {
                (Ok(_), Err(lost)) | (Err(lost), Ok(_)) => lost,
                _ => unreachable!("exactly one won"),
            };
            assert!(
                matches!(lost, ClientError::Register(RegisterError::PortTaken { port: p }) if p == port),
                "{lost:?}"
            );
        }
        // A host name too, and the words say where it is held.
        let _shop =
            first.add_service(ServiceConfig::http("127.0.0.1:1").with_host_prefix("shop")).await.unwrap();
        let err = second.add_service(ServiceConfig::http("127.0.0.1:1").with_host_prefix("shop")).await;
        let err = err.unwrap_err().to_string();
        assert!(err.contains("another user holds it on cluster node n1"), "{err}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nodes_api_lists_the_nodes_and_where_each_tunnel_lives() {
    within(60, async {
        let etcd = EtcdProcess::start().await;
        let nodes = [node(&etcd, 1).await, node(&etcd, 2).await, node(&etcd, 3).await];
        let client = connect(nodes[2].local_addr()).await;
        let port = free_port().await;
        let _tcp =
            client.add_service(ServiceConfig::tcp("127.0.0.1:1").with_remote_port(port)).await.unwrap();
        let _web =
            client.add_service(ServiceConfig::http("127.0.0.1:1").with_host_prefix("web")).await.unwrap();
        for (n, node) in nodes.iter().enumerate() {
            let listed = poll_until(|| async {
                api(node, "/cluster").await["tunnels"].as_array().unwrap().len() == 2
            });
            assert!(listed.await, "node {} sees both tunnels", n + 1);
            let cluster = api(node, "/cluster").await;
            assert_eq!(cluster["node"], format!("n{}", n + 1));
            assert_eq!(cluster["etcd_reachable"], true);
            let ids: Vec<&str> =
                cluster["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
            assert_eq!(ids, ["n1", "n2", "n3"]);
            let tunnels = cluster["tunnels"].as_array().unwrap();
            let tcp = tunnels.iter().find(|t| t["kind"] == "tcp").unwrap();
            assert_eq!(
                (tcp["name"].as_str(), tcp["node"].as_str()),
                (Some(port.to_string().as_str()), Some("n3"))
            );
            let web = tunnels.iter().find(|t| t["kind"] == "name").unwrap();
            assert_eq!(
                (web["name"].as_str(), web["route"].as_str(), web["user"].as_str()),
                (Some("web"), Some("http"), Some("id1"))
            );
        }
        // A second node with a live node's id is refused.
        let mut config = server_config();
        config.cluster = Some(ClusterConfig {
            etcd: etcd.url.clone(),
            node_id: "n1".into(),
            node_addr: "127.0.0.1:0".parse().unwrap(),
            lease_ttl: Duration::from_secs(10),
            tls: None,
        });
        let err = ferry::Server::bind(config).await.err().expect("refused").to_string();
        assert!(err.contains("node id n1 is in use"), "{err}");
    })
    .await
}

/// A node as its own `ferry server` process (to be killed with SIGKILL), on
/// `127.0.0.<n>`; returns it with its client and HTTP address.
async fn node_process(etcd: &EtcdProcess, n: u8) -> (tokio::process::Child, SocketAddr) {
    let addr = tokio::net::TcpListener::bind(format!("127.0.0.{n}:0")).await.unwrap().local_addr().unwrap();
    let (listen, node_addr, id) = (addr.to_string(), format!("127.0.0.{n}:0"), format!("n{n}"));
    let args = [
        "server",
        "--addr",
        &listen,
        "--id",
        "id1",
        "--secret",
        "secret1",
        "--tcp-range",
        "1024-65535",
        "--cluster-etcd",
        &etcd.url,
        "--node-id",
        &id,
        "--node-addr",
        &node_addr,
        "--log-level",
        "info",
    ];
    let mut child = ferry().args(args).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let listening = format!("listening addr={listen} listener=\"addr\"");
    loop {
        let line = lines.next_line().await.unwrap().expect("the node exited before it listened");
        if line.contains(&listening) {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}

/// Three nodes as processes, and their client addresses.
async fn three_node_processes(
    etcd: &EtcdProcess,
) -> (Vec<(tokio::process::Child, SocketAddr)>, Vec<SocketAddr>) {
    let mut nodes = Vec::new();
    for n in 1..=3 {
        nodes.push(node_process(etcd, n).await);
    }
    let remotes = nodes.iter().map(|(_, addr)| *addr).collect();
    (nodes, remotes)
}

/// Sends `payload` through `addr` and returns the hash answered; `None` on any failure
/// (refused, reset, nothing answered within 5 s).
async fn try_hash_through(addr: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut read, mut write) = stream.split();
        let send = async {
            write.write_all(payload).await?;
            write.shutdown().await
        };
        let mut answer = Vec::new();
        let (sent, got) = tokio::join!(send, read.read_to_end(&mut answer));
        (sent.is_ok() && got.is_ok() && !answer.is_empty()).then_some(answer)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok().flatten()
}

/// An HTTP GET for `host` at `addr`: its status, or `None` on any failure.
async fn try_get(addr: SocketAddr, host: &str) -> Option<u16> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let head = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.ok()?;
        // The status line is enough (the service may keep the connection open).
        let mut answer = Vec::new();
        while !answer.windows(2).any(|w| w == b"\r\n") {
            let mut piece = [0u8; 512];
            let read = stream.read(&mut piece).await.ok()?;
            if read == 0 {
                return None;
            }
            answer.extend_from_slice(&piece[..read]);
        }
        String::from_utf8_lossy(&answer).split(' ').nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.ok().flatten()
}

/// A client of `remotes` in that order, with fast reconnects.
fn cluster_client(remotes: &[SocketAddr], ha_connections: u32) -> ClientConfig {
    let mut config = client_config(remotes[0], "id1", "secret1");
    config.fallback_remotes =
        remotes[1..].iter().map(|r| RemoteAddr::parse(&r.to_string()).unwrap()).collect();
    config.ha_connections = ha_connections;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_node_dies_moves_to_another_with_its_port_and_host() {
    within(60, async {
        let etcd = EtcdProcess::start().await;
        let (mut nodes, remotes) = three_node_processes(&etcd).await;
        let client = Client::connect(cluster_client(&remotes, 1)).await.unwrap();
        let (port, tcp) = hashing_tunnel(&client).await;
        let web = ServiceConfig::http(&http_service("the service").await.to_string()).with_host_prefix("web");
        let _web = client.add_service(web).await.unwrap();
        let payload = random_bytes(1 << 20);
        let at = |n| at_node(n, port);
        wait_listening(at(2)).await;
        assert_eq!(try_hash_through(at(2), &payload).await, Some(sha256(&payload).to_vec()));

        nodes[0].0.kill().await.unwrap(); // SIGKILL: no goodbye, its lease just stops
        let killed = tokio::time::Instant::now();
        let served_again = async {
            loop {
                let tcp_ok = futures_util::future::join(
                    try_hash_through(at(2), &payload),
                    try_hash_through(at(3), &payload),
                )
                .await;
                let http_ok =
                    futures_util::future::join(try_get(remotes[1], "web"), try_get(remotes[2], "web")).await;
                let hash = Some(sha256(&payload).to_vec());
                if tcp_ok == (hash.clone(), hash) && http_ok == (Some(200), Some(200)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(15), served_again).await.expect("served again within 15 s");
        println!(
            "cluster failover: visitors at the surviving nodes served again {:?} after the kill",
            killed.elapsed()
        );
        assert_eq!(tcp.remote_port(), port);
        let public = tcp.watch_public_addr().borrow().clone();
        assert_eq!(public.as_deref(), Some(format!("127.0.0.2:{port}").as_str()), "on node 2 now");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_sessions_a_node_lost_costs_new_visitors_nothing() {
    within(60, async {
        let etcd = EtcdProcess::start().await;
        let (mut nodes, remotes) = three_node_processes(&etcd).await;
        let client = Client::connect(cluster_client(&remotes, 2)).await.unwrap();
        let (port, _tcp) = hashing_tunnel(&client).await;
        let at = |n| at_node(n, port);
        let payload = random_bytes(1024);
        let hash = Some(sha256(&payload).to_vec());
        let both = poll_until(|| async {
            let (a, b) = futures_util::future::join(try_hash_through(at(2), &payload), try_hash_through(at(3), &payload)).await;
            a == hash && b == hash
        });
        assert!(both.await, "served at nodes 2 and 3");

        // New visitors every 20 ms at nodes 2 and 3, from before the kill to 3 s after.
        let mut failures = [0u32; 2];
        let mut slowest = [Duration::ZERO; 2];
        let mut visitors = 0;
        let started = tokio::time::Instant::now();
        let mut killed = false;
        while started.elapsed() < Duration::from_secs(4) {
            if !killed && started.elapsed() > Duration::from_secs(1) {
                nodes[0].0.kill().await.unwrap();
                killed = true;
            }
            for (i, n) in [2u8, 3].into_iter().enumerate() {
                let asked = tokio::time::Instant::now();
                if try_hash_through(at(n), &payload).await != hash {
                    failures[i] += 1;
                }
                slowest[i] = slowest[i].max(asked.elapsed());
            }
            visitors += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("ha-connections 2, node 1 killed: {visitors} visitors per node; failed at node 2: {}, at node 3: {}; slowest at node 2 {:?}, at node 3 {:?}", failures[0], failures[1], slowest[0], slowest[1]);
        assert_eq!(failures, [0, 0], "no visitor lost at the surviving nodes");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_keep_working_while_etcd_is_away_and_registrations_resume_after() {
    within(90, async {
        let mut etcd = EtcdProcess::start().await;
        let nodes = [node(&etcd, 1).await, node(&etcd, 2).await];
        let client = connect(nodes[0].local_addr()).await;
        let (port, _tcp) = hashing_tunnel(&client).await;
        let web = ServiceConfig::http(&http_service("the service").await.to_string()).with_host_prefix("web");
        let _web = client.add_service(web).await.unwrap();
        let relayed = at_node(2, port);
        wait_listening(relayed).await;
        let host_known = poll_until(|| async { try_get(nodes[1].local_addr(), "web").await == Some(200) });
        assert!(host_known.await, "node 2 relays the host");
        let payload = random_bytes(64 << 10);
        let hash = Some(sha256(&payload).to_vec());

        etcd.stop();
        let stopped = tokio::time::Instant::now();
        let mut refused = None;
        let mut visits = 0;
        while stopped.elapsed() < Duration::from_secs(20) {
            assert_eq!(
                try_hash_through(relayed, &payload).await,
                hash,
                "relayed at node 2 while etcd is away"
            );
            assert_eq!(try_get(nodes[1].local_addr(), "web").await, Some(200), "host relayed at node 2");
            visits += 1;
            if refused.is_none() {
                refused = Some(
                    client.add_service(ServiceConfig::http("127.0.0.1:1").with_host_prefix("other")).await,
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let refused = refused.unwrap().unwrap_err().to_string();
        assert!(refused.contains("the cluster store (etcd) is unreachable"), "{refused}");
        let cluster = api(&nodes[1], "/cluster").await;
        assert_eq!(cluster["etcd_reachable"], false);

        etcd.restart().await;
        let registered = poll_until(|| async {
            client.add_service(ServiceConfig::http("127.0.0.1:1").with_host_prefix("later")).await.is_ok()
        });
        assert!(registered.await, "registrations work again once etcd is back");
        assert_eq!(try_hash_through(relayed, &payload).await, hash);
        println!("etcd away for 20 s: {visits} rounds of visitors served throughout");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_limit_counts_across_nodes() {
    within(60, async {
        let etcd = EtcdProcess::start().await;
        let limited = |mut config: ferry::ServerConfig| {
            config.sessions = Some(1);
            config
        };
        let one = start_server(limited(node_config(&etcd, 1))).await;
        let two = start_server(limited(node_config(&etcd, 2))).await;
        let first = connect(one.local_addr()).await;
        let refused = Client::connect(client_config(two.local_addr(), "id1", "secret1")).await.err().unwrap();
        assert!(
            matches!(
                &refused,
                ClientError::LoginRefused(ferry::LoginRefusal::TooManySessions { limit: 1, .. })
            ),
            "{refused:?}"
        );
        // Another user is not counted with this one.
        let _other = Client::connect(client_config(two.local_addr(), "id2", "secret2")).await.unwrap();
        first.shutdown().await;
        let admitted = poll_until(|| async {
            Client::connect(client_config(two.local_addr(), "id1", "secret1")).await.is_ok()
        });
        assert!(admitted.await, "the place is free once the first session ended");
    })
    .await
}

/// A CA, and certificates it issues naming node ids, as PEM files in a temporary directory.
struct ClusterCa {
    dir: tempfile::TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca: std::path::PathBuf,
}

impl ClusterCa {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.path().join(format!("ca-{}.pem", rand::random::<u32>()));
        std::fs::write(&ca, cert.pem()).unwrap();
        ClusterCa { dir, issuer: rcgen::Issuer::new(params, key), ca }
    }

    /// The certificate and key of node `id`, issued by this CA.
    fn node(&self, id: &str) -> ferry::ClusterTls {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![id.to_owned()])
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let (cert_path, key_path) =
            (self.dir.path().join(format!("{id}.pem")), self.dir.path().join(format!("{id}.key")));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        ferry::ClusterTls { cert: cert_path, key: key_path, ca: self.ca.clone() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cluster_ca_only_nodes_it_issued_relay() {
    within(60, async {
        let etcd = EtcdProcess::start().await;
        let (ca, rogue_ca) = (ClusterCa::new(), ClusterCa::new());
        let with_tls = |n: u8, tls: ferry::ClusterTls| {
            let mut config = node_config(&etcd, n);
            config.cluster.as_mut().unwrap().tls = Some(tls);
            config
        };
        let one = start_server(with_tls(1, ca.node("n1"))).await;
        let _two = start_server(with_tls(2, ca.node("n2"))).await;
        // Node 3's certificate names it, but another CA issued it (its own CA file says so).
        let mut rogue = rogue_ca.node("n3");
        rogue.ca = ca.ca.clone();
        let _three = start_server(with_tls(3, rogue)).await;

        let client = connect(one.local_addr()).await;
        let (port, _tcp) = hashing_tunnel(&client).await;
        let payload = random_bytes(1 << 20);
        let at = |n| at_node(n, port);
        wait_listening(at(2)).await;
        assert_eq!(try_hash_through(at(2), &payload).await, Some(sha256(&payload).to_vec()), "n2 relays");
        wait_listening(at(3)).await;
        assert_eq!(
            try_hash_through(at(3), &payload).await,
            None,
            "node 1 refuses the link of a node the CA did not issue"
        );
    })
    .await
}
