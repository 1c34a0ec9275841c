//! Peer-to-peer through real NATs (`common::nat`), with the real binaries: a forwarding
//! client behind one NAT reaches a P2P service of a client behind another, directly when
//! the NATs allow it and through the server when they do not; it goes direct later when
//! the path opens; a serving client that dies and comes back; a user who is not allowed.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::{client_command, ferry_bin, NsProcess};
use crate::common::http::request;
use crate::common::nat::{public_ip, NatKind, NatLab};
use crate::common::netns::Netns;
use crate::common::services::serve_hashing;
use crate::common::{random_bytes, sha256, within};

/// Where the serving client's sink listens, in its namespace.
const SINK: &str = "127.0.0.1:9000";
/// Where the forwarding client listens, in its namespace.
const FORWARD: &str = "127.0.0.1:2222";
/// The server's API, in the public namespace.
const API: &str = "127.0.0.1:7500";

/// The lab and its server, or `None` when namespace tests are skipped.
async fn lab(test: &str, kinds: [NatKind; 2]) -> Option<(NatLab, NsProcess)> {
    lab_with(test, kinds, &[]).await
}

/// [`lab`] with `extra` flags for the server.
async fn lab_with(test: &str, kinds: [NatKind; 2], extra: &[&str]) -> Option<(NatLab, NsProcess)> {
    if !crate::common::netns::available(test) {
        return None;
    }
    let lab = NatLab::new(kinds);
    let mut command = lab.public.command(&ferry_bin());
    command.args(["server", "--addr", "0.0.0.0:7000", "--tcp-range", "1024-65535", "--log-level", "info"]);
    command.args(["--id", "id1", "--secret", "secret1", "--id", "id2", "--secret", "secret2"]);
    command.args(["--stun-addr", "0.0.0.0:3478", "--api-addr", API]).args(extra);
    let mut server = NsProcess::spawn(command);
    server.line("listener=\"addr\"", 0, Duration::from_secs(10)).await;
    Some((lab, server))
}

/// The client behind NAT `side` serving the sink as the P2P service `sink` (its STUN
/// server is the default: the server's host, port 3478).
async fn serving_client(lab: &NatLab, side: usize) -> NsProcess {
    let remote = format!("tcp://{}:7000", public_ip(side));
    let mut command = client_command(&lab.private[side], &remote, "id1");
    command.args(["--local", SINK, "--host-prefix", "sink", "--p2p", "--name", "sink"]);
    let mut client = NsProcess::spawn(command);
    client.line("tunnel open", 0, Duration::from_secs(10)).await;
    client
}

/// A client behind NAT `side`, logged in as `id`, forwarding [`FORWARD`] to `sink`.
async fn forwarding_client(lab: &NatLab, side: usize, id: &str) -> NsProcess {
    let remote = format!("tcp://{}:7000", public_ip(side));
    let mut command = client_command(&lab.private[side], &remote, id);
    command.args(["--tcp-forward-addr", FORWARD, "--tcp-forward-host-prefix", "sink"]);
    let mut client = NsProcess::spawn(command);
    client.line("forwarding to the P2P service", 0, Duration::from_secs(10)).await;
    client
}

/// Sends `payload` through the forward in `ns` and returns the hash the sink answered
/// (empty when the connection was closed without one).
async fn hash_via(ns: &Netns, payload: &[u8]) -> Vec<u8> {
    let mut stream = ns.connect(FORWARD.parse().unwrap()).await.expect("the forward listens");
    let (mut read, mut write) = stream.split();
    let send = async {
        let _ = write.write_all(payload).await;
        let _ = write.shutdown().await;
    };
    let mut answer = Vec::new();
    let (_, _) = tokio::join!(send, read.read_to_end(&mut answer));
    answer
}

/// `GET path` from the server's API.
async fn api_get(lab: &NatLab, path: &str) -> Vec<u8> {
    let mut stream = lab.public.connect(API.parse().unwrap()).await.expect("the API listens");
    request(&mut stream, "GET", path, API, "", b"").await.body
}

/// The value of the metric line that starts with `series`, if any.
async fn metric(lab: &NatLab, series: &str) -> Option<u64> {
    let text = String::from_utf8(api_get(lab, "/metrics").await).unwrap();
    let line = text.lines().find(|l| l.starts_with(series))?;
    line.rsplit(' ').next()?.parse().ok()
}

/// The bytes the server carried for the service `sink` (in + out), from its API.
async fn relayed_bytes(lab: &NatLab) -> u64 {
    let services: Value = serde_json::from_slice(&api_get(lab, "/services").await).expect("JSON");
    let list = services
        .as_array()
        .or_else(|| services["services"].as_array())
        .unwrap_or_else(|| panic!("a list: {services}"))
        .clone();
    let sink = list.iter().find(|s| s["name"] == "sink").expect("the sink is listed");
    sink["bytes_in"].as_u64().unwrap() + sink["bytes_out"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_two_cone_nats_the_path_is_direct_and_the_server_carries_nothing() {
    within(120, async {
        let Some((lab, _server)) = lab("p2p cone", [NatKind::Cone, NatKind::Cone]).await else { return };
        serve_hashing(lab.private[1].listen(SINK));
        let _serving = serving_client(&lab, 1).await;
        let mut forwarding = forwarding_client(&lab, 0, "id1").await;
        let payload = random_bytes(64 << 20);
        let started = std::time::Instant::now();
        assert_eq!(hash_via(&lab.private[0], &payload).await, sha256(&payload), "64 MiB intact");
        let (up, _) = forwarding.line("direct path up", 0, Duration::from_secs(1)).await;
        eprintln!("direct path up {:?} after the first connection", up.saturating_duration_since(started));
        forwarding.line("path=\"direct\"", 0, Duration::from_secs(1)).await;
        assert_eq!(forwarding.count("path=\"relayed\""), 0, "{}", forwarding.output());
        assert_eq!(relayed_bytes(&lab).await, 0, "the server carried none of it");
        assert_eq!(metric(&lab, "ferry_p2p_events_total{event=\"attempt\"}").await, Some(1));
        assert_eq!(metric(&lab, "ferry_p2p_events_total{event=\"direct\"}").await, Some(1));
        let services: Value = serde_json::from_slice(&api_get(&lab, "/services").await).unwrap();
        let sink = services.as_array().unwrap().iter().find(|s| s["name"] == "sink").unwrap().clone();
        assert_eq!(sink["p2p"]["direct"], 1, "the API shows the direct peer: {sink}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_symmetric_nat_connections_go_through_the_server_within_the_deadline() {
    within(120, async {
        let Some((lab, _server)) = lab("p2p symmetric", [NatKind::Symmetric, NatKind::Cone]).await else {
            return;
        };
        serve_hashing(lab.private[1].listen(SINK));
        let _serving = serving_client(&lab, 1).await;
        let mut forwarding = forwarding_client(&lab, 0, "id1").await;
        let payload = random_bytes(64 << 20);
        let started = Instant::now();
        let mut stream = lab.private[0].connect(FORWARD.parse().unwrap()).await.unwrap();
        stream.write_all(&payload[..1024]).await.unwrap();
        let (line_at, _) = forwarding.line("path=\"relayed\"", 0, Duration::from_secs(10)).await;
        let waited = line_at.saturating_duration_since(started.into_std());
        assert!(waited < Duration::from_secs(4), "relayed after {waited:?}, past the 3 s deadline");
        stream.write_all(&payload[1024..]).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, sha256(&payload), "64 MiB intact");
        assert!(relayed_bytes(&lab).await >= 64 << 20, "the server carried it");
        assert_eq!(forwarding.count("path=\"direct\""), 0);
        assert_eq!(metric(&lab, "ferry_p2p_events_total{event=\"fallback\"}").await, Some(1));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_udp_passes_again_new_connections_go_direct() {
    within(120, async {
        let Some((lab, _server)) = lab("p2p switch-back", [NatKind::Cone, NatKind::Cone]).await else {
            return;
        };
        serve_hashing(lab.private[1].listen(SINK));
        lab.block_udp();
        let _serving = serving_client(&lab, 1).await;
        let mut forwarding = forwarding_client(&lab, 0, "id1").await;
        let payload = random_bytes(1 << 20);
        assert_eq!(hash_via(&lab.private[0], &payload).await, sha256(&payload));
        forwarding.line("path=\"relayed\"", 0, Duration::from_secs(1)).await;
        lab.unblock_udp();
        let unblocked = Instant::now();
        forwarding.line("direct path up", 0, Duration::from_secs(30)).await;
        let upgraded = unblocked.elapsed();
        assert_eq!(hash_via(&lab.private[0], &payload).await, sha256(&payload));
        forwarding.line("path=\"direct\"", 0, Duration::from_secs(1)).await;
        eprintln!("direct again {upgraded:?} after UDP passed");
        assert_eq!(metric(&lab, "ferry_p2p_events_total{event=\"upgrade\"}").await, Some(1));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serving_client_that_dies_closes_the_forwarded_connections_and_forwarding_resumes_when_it_returns()
{
    within(120, async {
        let Some((lab, _server)) = lab("p2p peer death", [NatKind::Cone, NatKind::Cone]).await else {
            return;
        };
        serve_hashing(lab.private[1].listen(SINK));
        let mut serving = serving_client(&lab, 1).await;
        let mut forwarding = forwarding_client(&lab, 0, "id1").await;
        assert_eq!(hash_via(&lab.private[0], b"warm up").await, sha256(b"warm up"));
        // A connection in progress when the serving client dies ends, it does not hang.
        let mut open = lab.private[0].connect(FORWARD.parse().unwrap()).await.unwrap();
        open.write_all(b"half a request").await.unwrap();
        serving.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = serving.child.wait().await;
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(20), open.read_to_end(&mut rest)).await;
        assert!(ended.is_ok(), "the forwarded connection ended");
        assert!(hash_via(&lab.private[0], b"anyone?").await.is_empty(), "nothing serves it now");
        forwarding.line("peer offline", 0, Duration::from_secs(10)).await;

        let _back = serving_client(&lab, 1).await;
        let payload = random_bytes(1 << 20);
        let mut served = false;
        for _ in 0..50 {
            if hash_via(&lab.private[0], &payload).await == sha256(&payload) {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(served, "forwarding works again:\n{}", forwarding.output());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_user_is_refused_with_a_clear_message() {
    within(60, async {
        let Some((lab, _server)) = lab("p2p other user", [NatKind::Cone, NatKind::Cone]).await else {
            return;
        };
        serve_hashing(lab.private[1].listen(SINK));
        let _serving = serving_client(&lab, 1).await;
        let mut stranger = forwarding_client(&lab, 0, "id2").await;
        assert!(hash_via(&lab.private[0], b"let me in").await.is_empty(), "refused");
        stranger.line("does not list this id in its p2p-allow-id", 0, Duration::from_secs(5)).await;
        assert_eq!(relayed_bytes(&lab).await, 0);
    })
    .await
}

/// Where the serving client's echo service listens, for the benchmark's round trips.
const ECHO_SINK: &str = "127.0.0.1:9001";

/// One forwarded stream, direct and relayed (over each transport to the server), between
/// two clients behind cone NATs: throughput of 256 MiB to the sink and the time from a new
/// connection to its first echoed byte. `bench/p2p.sh` runs it with release binaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/p2p.sh runs it"]
async fn p2p_direct_against_relayed() {
    within(900, async {
        let certs = crate::tls::make_certs();
        let (cert, key) =
            (certs.cert.to_string_lossy().into_owned(), certs.key.to_string_lossy().into_owned());
        let server_flags = [
            "--tls-addr",
            "0.0.0.0:7443",
            "--quic-addr",
            "0.0.0.0:7443",
            "--cert-file",
            &cert,
            "--key-file",
            &key,
        ];
        let mut rows = Vec::new();
        let cases = [
            ("direct (quic:// to the server)", "quic", 7443, false),
            ("relayed, tcp://", "tcp", 7000, true),
            ("relayed, tls://", "tls", 7443, true),
            ("relayed, quic://", "quic", 7443, true),
        ];
        for (name, scheme, port, relayed) in cases {
            let Some((lab, _server)) =
                lab_with("p2p bench", [NatKind::Cone, NatKind::Cone], &server_flags).await
            else {
                return;
            };
            serve_hashing(lab.private[1].listen(SINK));
            crate::common::serve_echo(lab.private[1].listen(ECHO_SINK));
            if relayed {
                lab.block_udp();
            }
            let insecure = "--remote-cert-insecure";
            let mut command = lab.private[1].command(&ferry_bin());
            let remote = format!("{scheme}://203.0.113.1:{port}");
            command.args(["client", "--remote", &remote, "--id", "id1", "--secret", "secret1", insecure]);
            command.args(["--local", SINK, "--host-prefix", "sink", "--p2p-only", "--name", "sink"]);
            command.args(["--local", ECHO_SINK, "--host-prefix", "echo", "--p2p-only", "--name", "echo"]);
            let mut serving = NsProcess::spawn(command);
            serving.line("tunnel open", 1, Duration::from_secs(10)).await;
            let mut command = lab.private[0].command(&ferry_bin());
            let remote = format!("{scheme}://198.51.100.1:{port}");
            command.args(["client", "--remote", &remote, "--id", "id1", "--secret", "secret1", insecure]);
            command.args(["--tcp-forward-addr", FORWARD, "--tcp-forward-host-prefix", "sink"]);
            command.args(["--tcp-forward-addr", "127.0.0.1:2223", "--tcp-forward-host-prefix", "echo"]);
            let mut forwarding = NsProcess::spawn(command);
            forwarding.line("forwarding to the P2P service", 1, Duration::from_secs(10)).await;
            // The first connections settle the path (punching, or its deadline).
            assert_eq!(hash_via(&lab.private[0], b"warm up").await, sha256(b"warm up"));
            let payload = random_bytes(256 << 20);
            let started = Instant::now();
            assert_eq!(hash_via(&lab.private[0], &payload).await, sha256(&payload));
            let mbps = payload.len() as f64 / started.elapsed().as_secs_f64() / 1e6;
            let echo: std::net::SocketAddr = "127.0.0.1:2223".parse().unwrap();
            let mut round_trips = Vec::new();
            for _ in 0..101 {
                let started = Instant::now();
                let mut stream = lab.private[0].connect(echo).await.unwrap();
                stream.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                stream.read_exact(&mut one).await.unwrap();
                round_trips.push(started.elapsed());
            }
            round_trips.sort();
            let path = if relayed { "relayed" } else { "direct" };
            assert_eq!(forwarding.count(&format!("path=\"{path}\"")), 103, "{}", forwarding.output());
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            rows.push(format!(
                "| {name} | {mbps:.0} | {:.2} | {:.2} |",
                ms(round_trips[50]),
                ms(round_trips[90])
            ));
        }
        println!("| path | MB/s, one stream of 256 MiB | new connection to first byte, p50 ms | p90 ms |");
        println!("|---|---|---|---|");
        for row in rows {
            println!("{row}");
        }
    })
    .await
}
