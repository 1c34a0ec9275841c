//! Transports under a real network's conditions (a benchmark, not a pass/fail test; run by
//! `bench/transports.sh`): 50 ms round trip and 1% loss each way between client and
//! server, through the real binaries.
//!
//! - Bulk: one visitor in the server's namespace sends [`BULK`] bytes through a TCP tunnel
//!   to a sink in the client's namespace (the server is the sender on the impaired link)
//!   over tcp://, tls://, ws:// and quic:// (cubic and bbr), and directly without ferry.
//! - UDP: a visitor sends a datagram every 10 ms to a UDP echo through a UDP tunnel, over
//!   quic:// (QUIC datagrams) and over tcp:// (framed on a data connection); the round trips
//!   of the datagrams that come back, and how many do.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use super::*;
use crate::common::link::CLIENT_IP;
use crate::common::services::serve_hashing;
use crate::common::within;
use crate::tls::make_certs;

/// Bytes each bulk transfer moves.
const BULK: usize = 4 * 1024 * 1024;
/// The sink for tunnelled transfers, in the client's namespace.
const SINK: &str = "127.0.0.1:9100";
/// The sink reached directly, for the baseline.
const DIRECT_SINK_PORT: u16 = 9101;
/// The UDP echo, in the client's namespace.
const UDP_ECHO: &str = "127.0.0.1:9200";
/// The public UDP port.
const UDP_PORT: u16 = 20001;
/// Datagrams sent per UDP run, one every 10 ms.
const DATAGRAMS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/transports.sh runs it"]
async fn transports_under_delay_and_loss() {
    let Some(mut link) = topology("transports_under_delay_and_loss") else { return };
    within(900, async {
        let certs = make_certs();
        serve_hashing(link.client.listen(SINK));
        serve_hashing(link.client.listen(&format!("{CLIENT_IP}:{DIRECT_SINK_PORT}")));
        serve_udp_echo(&link);
        link.set(Duration::from_millis(25), 1);
        let cert = certs.cert.to_string_lossy().into_owned();
        let key = certs.key.to_string_lossy().into_owned();
        let tls = ["--tls-addr", "10.2.0.2:7443", "--quic-addr", "10.2.0.2:7443", "--ws-path", "/ferry"];
        let files = ["--cert-file", &cert, "--key-file", &key, "--udp-range", "20000-20010"];
        let server_flags: Vec<&str> = tls.iter().chain(&files).copied().collect();
        for (jitter, order) in [(0.2, "reordering (±20% jitter)"), (0.0, "in order")] {
            link.set_jitter(jitter);
            bulk_table(&link, &server_flags, order).await;
            udp_table(&link, &server_flags, order).await;
        }
    })
    .await
}

/// One visitor's bulk transfer over each transport, and directly.
async fn bulk_table(link: &Link, server_flags: &[&str], order: &str) {
    eprintln!("\n| bulk, {} MiB, 50 ms RTT, 1% loss, {order} | seconds | KiB/s |", BULK >> 20);
    eprintln!("| --- | ---: | ---: |");
    let direct =
        bulk_to_sink(&link.server, SocketAddr::new(CLIENT_IP.parse().unwrap(), DIRECT_SINK_PORT), BULK).await;
    report("direct TCP (no tunnel)", direct);
    let remotes = [
        ("tcp://", "tcp://10.2.0.2:7000", "bbr"),
        ("tls://", "tls://10.2.0.2:7443", "bbr"),
        ("ws://", "ws://10.2.0.2:7000/ferry", "bbr"),
        ("quic:// cubic", "quic://10.2.0.2:7443", "cubic"),
        ("quic:// bbr", "quic://10.2.0.2:7443", "bbr"),
    ];
    for (name, remote, congestion) in remotes {
        let flags: Vec<&str> =
            server_flags.iter().copied().chain(["--quic-congestion", congestion]).collect();
        let _server = start_server(link, &flags).await;
        let _client =
            client_to(link, remote, congestion, &["--local", SINK, "--remote-tcp-port", "20000"]).await;
        report(name, bulk_to_sink(&link.server, Link::server_addr(20000), BULK).await);
    }
}

/// Round trips of datagrams through a UDP tunnel over QUIC and over TCP.
async fn udp_table(link: &Link, server_flags: &[&str], order: &str) {
    eprintln!("\n| UDP echo, a datagram per 10 ms, 50 ms RTT, 1% loss, {order} | came back | p50 ms | p99 ms | max ms |");
    eprintln!("| --- | ---: | ---: | ---: | ---: |");
    for (name, remote) in
        [("quic:// (QUIC datagrams)", "quic://10.2.0.2:7443"), ("tcp:// (framed)", "tcp://10.2.0.2:7000")]
    {
        let _server = start_server(link, server_flags).await;
        let service = ["--local", &format!("udp://{UDP_ECHO}"), "--remote-udp-port", &UDP_PORT.to_string()];
        let _client = client_to(link, remote, "bbr", &service).await;
        let (back, mut rtts) = udp_round_trips(link).await;
        rtts.sort();
        let at = |q: f64| rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1)));
        let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        let (p50, p99, max) = (ms(at(0.5)), ms(at(0.99)), ms(rtts.last()));
        eprintln!("| {name} | {back}/{DATAGRAMS} | {p50:.0} | {p99:.0} | {max:.0} |");
    }
}

fn report(name: &str, took: Duration) {
    let rate = BULK as f64 / 1024.0 / took.as_secs_f64();
    eprintln!("| {name} | {:.1} | {rate:.0} |", took.as_secs_f64());
}

/// Starts `ferry client` in the client namespace to `remote` and waits for its service.
async fn client_to(link: &Link, remote: &str, congestion: &str, service: &[&str]) -> NsProcess {
    let mut command = client_command(&link.client, remote, "id1");
    command.args(["--remote-cert-insecure", "--quic-congestion", congestion]).args(service);
    let mut client = NsProcess::spawn(command);
    client.line("is reachable at", 0, Duration::from_secs(20)).await;
    client
}

/// A UDP socket bound to `addr` inside `ns`.
fn udp_in(ns: &crate::common::netns::Netns, addr: &str) -> UdpSocket {
    let addr = addr.to_owned();
    let socket = ns.enter(move || std::net::UdpSocket::bind(addr).expect("udp bind in namespace"));
    socket.set_nonblocking(true).unwrap();
    UdpSocket::from_std(socket).unwrap()
}

fn serve_udp_echo(link: &Link) {
    let socket = udp_in(&link.client, UDP_ECHO);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
}

/// Sends [`DATAGRAMS`] numbered datagrams, one per 10 ms, and collects the round trip of
/// each that comes back within 2 s of the last; the first 20 (the flow starting) are left
/// out of the round trips.
async fn udp_round_trips(link: &Link) -> (usize, Vec<Duration>) {
    let visitor = std::sync::Arc::new(udp_in(&link.server, "0.0.0.0:0"));
    let public = Link::server_addr(UDP_PORT);
    let started = Instant::now();
    let receiver = {
        let visitor = visitor.clone();
        tokio::spawn(async move {
            let mut rtts = Vec::new();
            let mut back = 0;
            let mut buf = [0u8; 64];
            let deadline = tokio::time::Instant::now() + Duration::from_millis(DATAGRAMS as u64 * 10 + 2000);
            while let Ok(Ok((n, _))) = tokio::time::timeout_at(deadline, visitor.recv_from(&mut buf)).await {
                let (Some(seq), Some(sent)) = (buf.get(..8), buf.get(8..16)) else { continue };
                let seq = u64::from_be_bytes(seq.try_into().unwrap());
                let sent = Duration::from_micros(u64::from_be_bytes(sent.try_into().unwrap()));
                back += 1;
                if seq >= 20 && n == 64 {
                    rtts.push(started.elapsed().saturating_sub(sent));
                }
            }
            (back, rtts)
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for seq in 0..DATAGRAMS as u64 {
        tick.tick().await;
        let mut datagram = [0u8; 64];
        datagram[..8].copy_from_slice(&seq.to_be_bytes());
        datagram[8..16].copy_from_slice(&(started.elapsed().as_micros() as u64).to_be_bytes());
        let _ = visitor.send_to(&datagram, public).await;
    }
    receiver.await.unwrap()
}
