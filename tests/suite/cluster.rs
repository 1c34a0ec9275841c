//! Several servers sharing one routing table in a real etcd: a port or host name has one
//! owner cluster-wide, and visitors at any node reach the tunnel on another.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

use crate::common::etcd::EtcdProcess;
use crate::common::http::{get, http_service};
use crate::common::services::{hash_through, hashing_service};
use crate::common::*;
use ferry::{Client, ClientError, ClusterConfig, RegisterError, ServerHandle, ServiceConfig};

/// A node of the cluster at `etcd`, on its own loopback address `127.0.0.<n>` (its public
/// ports are bound there), with users id1 and id2.
async fn node(etcd: &EtcdProcess, n: u8) -> ServerHandle {
    let mut config = server_config().with_user("id2", "secret2");
    config.addr = Some(format!("127.0.0.{n}:0").parse().unwrap());
    config.api_addr = Some(format!("127.0.0.{n}:0").parse().unwrap());
    config.cluster = Some(ClusterConfig {
        etcd: etcd.url.clone(),
        node_id: format!("n{n}"),
        node_addr: format!("127.0.0.{n}:0").parse().unwrap(),
        lease_ttl: Duration::from_secs(10),
    });
    start_server(config).await
}

/// `GET path` on a node's API, as JSON.
async fn api(node: &ServerHandle, path: &str) -> Value {
    let response = get(node.api_local_addr().unwrap(), path, "localhost").await;
    assert_eq!(response.status, 200, "{path}: {}", response.text());
    serde_json::from_slice(&response.body).unwrap()
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
        let port = free_port().await;
        let tcp = ServiceConfig::tcp(&hashing_service().await.to_string()).with_remote_port(port);
        assert_eq!(client.add_service(tcp).await.unwrap().remote_port(), port);
        let web = ServiceConfig::http(&http_service("on node 1").await.to_string()).with_host_prefix("web");
        let _web = client.add_service(web).await.unwrap();

        let payload = random_bytes(64 << 20);
        for n in [2u8, 3] {
            let public: SocketAddr = format!("127.0.0.{n}:{port}").parse().unwrap();
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
        let metrics = get(nodes[1].api_local_addr().unwrap(), "/metrics", "localhost").await.text();
        assert!(metrics.contains("ferry_node_relays_total{direction=\"out\"}"), "{metrics}");

        // Gone from node 1, gone everywhere: node 2 stops listening.
        drop(client);
        let public: SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
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
        });
        let err = ferry::Server::bind(config).await.err().expect("refused").to_string();
        assert!(err.contains("node id n1 is in use"), "{err}");
    })
    .await
}
