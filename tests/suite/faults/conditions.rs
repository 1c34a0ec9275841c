//! Tunnels under the conditions users have (a benchmark, not a pass/fail test; run by
//! `bench/conditions.sh`, which `bench/run.sh` calls when it runs as root): ferry, rathole
//! and bore, and a direct connection, between a visitor in the server's namespace and
//! services in the client's, with 20 ms and 100 ms round trip and 0% and 1% loss each way
//! on the link between server and client (the userspace delay line of `common::link`,
//! packets in order).
//!
//! For each: the time from a new visitor's connect to the first byte of its answer
//! ([`NEW_VISITORS`] in turn), the round trips of requests on one kept-alive connection
//! ([`ROUND_TRIPS`]), and one bulk transfer of [`BULK`] bytes from the visitor to a sink
//! that answers with their SHA-256 (checked).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::*;
use crate::common::link::CLIENT_IP;
use crate::common::netns::Netns;
use crate::common::services::serve_hashing;
use crate::common::within;

/// New visitors measured per tunnel and condition.
const NEW_VISITORS: usize = 20;
/// Requests on one kept-alive connection per tunnel and condition.
const ROUND_TRIPS: usize = 50;
/// Bytes of the bulk transfer.
const BULK: usize = 4 * 1024 * 1024;
/// The request/answer service and the sink, in the client's namespace (the tunnels' end).
const ANSWER: &str = "127.0.0.1:9300";
const SINK: &str = "127.0.0.1:9301";
/// The same two services on the client's address, for the direct baseline.
const DIRECT_ANSWER_PORT: u16 = 9310;
const DIRECT_SINK_PORT: u16 = 9311;
/// The public ports of the answer service and the sink, on every tunnel.
const ANSWER_PORT: u16 = 20000;
const SINK_PORT: u16 = 20001;
/// How long a tunnel may take to serve its first visitor once started.
const READY_WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/conditions.sh runs it"]
async fn tunnels_under_delay_and_loss() {
    let Some(mut link) = topology("tunnels_under_delay_and_loss") else { return };
    within(1800, async {
        serve_answers(link.client.listen(ANSWER));
        serve_answers(link.client.listen(&format!("{CLIENT_IP}:{DIRECT_ANSWER_PORT}")));
        serve_hashing(link.client.listen(SINK));
        serve_hashing(link.client.listen(&format!("{CLIENT_IP}:{DIRECT_SINK_PORT}")));
        link.set_jitter(0.0);
        let work = tempfile::tempdir().unwrap();
        for (rtt_ms, loss) in [(20, 0), (20, 1), (100, 0), (100, 1)] {
            link.set(Duration::from_millis(rtt_ms / 2), loss);
            eprintln!("\n| {rtt_ms} ms RTT, {loss}% loss | new visitor, first byte p50 / p90 ms | keep-alive round trip p50 / p99 ms | bulk {} MiB, s (MiB/s) |", BULK >> 20);
            eprintln!("| --- | ---: | ---: | ---: |");
            let direct = |port| SocketAddr::new(CLIENT_IP.parse().unwrap(), port);
            measure(&link, "direct (no tunnel)", direct(DIRECT_ANSWER_PORT), direct(DIRECT_SINK_PORT)).await;
            for tunnel in [Tunnel::Ferry, Tunnel::Rathole, Tunnel::Bore] {
                let Some(processes) = tunnel.start(&link, work.path()).await else {
                    eprintln!("| {} | not installed | | |", tunnel.name());
                    continue;
                };
                let (answer, sink) = (Link::server_addr(ANSWER_PORT), Link::server_addr(SINK_PORT));
                measure(&link, tunnel.name(), answer, sink).await;
                // The next tunnel binds the same public ports.
                drop(processes);
                until(READY_WITHIN, "the public ports given back", || async {
                    closed(&link, ANSWER_PORT).await && closed(&link, SINK_PORT).await
                })
                .await;
            }
        }
    })
    .await
}

/// Whether nothing listens on the public `port` any more.
async fn closed(link: &Link, port: u16) -> bool {
    let connect = tokio::time::timeout(Duration::from_secs(1), link.server.connect(Link::server_addr(port)));
    matches!(connect.await, Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// The three figures through `answer` and `sink`, as one table row.
async fn measure(link: &Link, name: &str, answer: SocketAddr, sink: SocketAddr) {
    let mut firsts = Vec::new();
    for _ in 0..NEW_VISITORS {
        firsts.push(first_byte(&link.server, answer).await.expect("a new visitor gets its answer"));
    }
    let mut trips = kept_alive(&link.server, answer).await;
    let bulk = bulk_to_sink(&link.server, sink, BULK).await;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (first50, first90) = (ms(quantile(&mut firsts, 0.5)), ms(quantile(&mut firsts, 0.9)));
    let (trip50, trip99) = (ms(quantile(&mut trips, 0.5)), ms(quantile(&mut trips, 0.99)));
    let rate = BULK as f64 / f64::from(1 << 20) / bulk.as_secs_f64();
    eprintln!(
        "| {name} | {first50:.1} / {first90:.1} | {trip50:.1} / {trip99:.1} | {:.1} ({rate:.2}) |",
        bulk.as_secs_f64()
    );
}

fn quantile(values: &mut [Duration], q: f64) -> Duration {
    values.sort();
    let at = ((values.len() as f64 * q) as usize).min(values.len().saturating_sub(1));
    values.get(at).copied().unwrap_or_default()
}

/// Answers every line a connection sends with one line, until it closes.
fn serve_answers(listener: TcpListener) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(_)) = lines.next_line().await {
                    if write.write_all(b"answer\n").await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A new connection from `ns` to `to` and one request on it: from the connect to the
/// first byte of the answer (the socket is made beforehand).
async fn first_byte(ns: &Netns, to: SocketAddr) -> std::io::Result<Duration> {
    let socket = ns.sockets(1).pop().expect("a socket");
    let started = Instant::now();
    let mut stream = socket.connect(to).await?;
    stream.set_nodelay(true)?;
    stream.write_all(b"request\n").await?;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await?;
    Ok(started.elapsed())
}

/// The round trip of each of [`ROUND_TRIPS`] requests on one connection.
async fn kept_alive(ns: &Netns, to: SocketAddr) -> Vec<Duration> {
    let stream = ns.connect(to).await.expect("the visitor connects");
    stream.set_nodelay(true).unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut trips = Vec::new();
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        write.write_all(b"request\n").await.unwrap();
        lines.next_line().await.unwrap().expect("an answer");
        trips.push(started.elapsed());
    }
    trips
}

/// The tunnels compared.
#[derive(Clone, Copy)]
enum Tunnel {
    Ferry,
    Rathole,
    Bore,
}

impl Tunnel {
    fn name(self) -> &'static str {
        match self {
            Tunnel::Ferry => "ferry",
            Tunnel::Rathole => "rathole 0.5",
            Tunnel::Bore => "bore 0.6",
        }
    }

    /// Starts the tunnel's server and client(s) with the answer service on
    /// [`ANSWER_PORT`] and the sink on [`SINK_PORT`], and waits until a visitor gets an
    /// answer; `None` when its program is not installed.
    async fn start(self, link: &Link, work: &std::path::Path) -> Option<Vec<NsProcess>> {
        let program = match self {
            Tunnel::Ferry => ferry_bin(),
            Tunnel::Rathole => "rathole".to_owned(),
            Tunnel::Bore => "bore".to_owned(),
        };
        if !installed(&program) {
            return None;
        }
        let processes = match self {
            Tunnel::Ferry => {
                let server = start_server(link, &[]).await;
                let remote = format!("tcp://{SERVER_IP}:{CONTROL_PORT}");
                let mut client = client_command(&link.client, &remote, "id1");
                client.args(["--local", ANSWER, "--remote-tcp-port", &ANSWER_PORT.to_string()]);
                client.args(["--local", SINK, "--remote-tcp-port", &SINK_PORT.to_string()]);
                vec![server, NsProcess::spawn(client)]
            }
            Tunnel::Rathole => {
                let (server, client) = rathole_configs(work);
                let server = NsProcess::spawn(rathole_command(&link.server, "--server", &server));
                let client = NsProcess::spawn(rathole_command(&link.client, "--client", &client));
                vec![server, client]
            }
            Tunnel::Bore => {
                let mut server = link.server.command("bore");
                server.args([
                    "server",
                    "--min-port",
                    "20000",
                    "--max-port",
                    "20010",
                    "--secret",
                    "bench-secret",
                ]);
                let mut processes = vec![NsProcess::spawn(server)];
                for (local, public) in [(ANSWER, ANSWER_PORT), (SINK, SINK_PORT)] {
                    let port = local.rsplit(':').next().unwrap_or_default();
                    let mut client = link.client.command("bore");
                    client.args(["local", port, "--local-host", "127.0.0.1", "--to", SERVER_IP]);
                    client.args(["--port", &public.to_string(), "--secret", "bench-secret"]);
                    processes.push(NsProcess::spawn(client));
                }
                processes
            }
        };
        let answer = Link::server_addr(ANSWER_PORT);
        until(READY_WITHIN, self.name(), || async {
            let attempt = tokio::time::timeout(Duration::from_secs(2), first_byte(&link.server, answer));
            matches!(attempt.await, Ok(Ok(_)))
        })
        .await;
        // The sink's port too (bore's second client may come up later than the first).
        until(READY_WITHIN, self.name(), || async {
            let connect = tokio::time::timeout(
                Duration::from_secs(2),
                link.server.connect(Link::server_addr(SINK_PORT)),
            );
            matches!(connect.await, Ok(Ok(_)))
        })
        .await;
        Some(processes)
    }
}

/// Whether `program` runs here (`--version`).
fn installed(program: &str) -> bool {
    std::process::Command::new(program).arg("--version").output().is_ok_and(|out| out.status.success())
}

/// `rathole MODE CONFIG` in `ns`, logging warnings only.
fn rathole_command(ns: &Netns, mode: &str, config: &std::path::Path) -> tokio::process::Command {
    let mut command = ns.command("env");
    command.args(["RUST_LOG=warn", "rathole", mode]).arg(config);
    command
}

/// rathole's server and client configurations for the two services, written in `work`.
fn rathole_configs(work: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let services = [("answer", ANSWER_PORT, ANSWER), ("sink", SINK_PORT, SINK)];
    let mut server = format!("[server]\nbind_addr = \"{SERVER_IP}:2333\"\n");
    let mut client = format!("[client]\nremote_addr = \"{SERVER_IP}:2333\"\n");
    for (name, port, local) in services {
        server +=
            &format!("[server.services.{name}]\ntoken = \"bench-token\"\nbind_addr = \"0.0.0.0:{port}\"\n");
        client += &format!("[client.services.{name}]\ntoken = \"bench-token\"\nlocal_addr = \"{local}\"\n");
    }
    let (server_path, client_path) = (work.join("rathole-server.toml"), work.join("rathole-client.toml"));
    std::fs::write(&server_path, server).unwrap();
    std::fs::write(&client_path, client).unwrap();
    (server_path, client_path)
}
