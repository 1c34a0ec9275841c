//! Browser peers in a real headless Chromium: a page served through the tunnel imports
//! the server's `p2p.js`, connects to the client over WebRTC and fetches 32 MiB straight
//! from the client's local HTTP service; the server carries none of it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::http::hex;
use crate::common::*;
use ferry::{Client, ServerHandle, ServiceConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

const PAGE: &str = r#"<!doctype html><html><body><script type="module">
import * as ferry from "/.well-known/ferry/p2p.js";
const report = (o) => fetch("/report", { method: "POST", body: JSON.stringify(o) });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
try {
  const started = performance.now();
  const peer = await ferry.connect();
  const res = await peer.fetch("/big");
  const buf = await res.arrayBuffer();
  const took = performance.now() - started;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
  const hash = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
  let refused = "";
  try { await ferry.connect(location.host.replace("app.", "plain.")); } catch (e) { refused = String(e.message); }
  // Two channels at once, to two services of the client.
  const other = await ferry.connect(location.host.replace("app.", "app2."));
  const [again, small] = await Promise.all([peer.fetch("/big"), other.fetch("/small")]);
  const both = [(await again.arrayBuffer()).byteLength, await small.text(), other.mode];
  // A reader that stops for 3 s: the service may write only what the channel's credit and
  // the buffers on the way hold. Then it reads on, and at last gives the transfer up: the
  // client lets go of the local connection.
  const endless = (await peer.fetch("/endless")).body.getReader();
  let got = 0;
  while (got < (1 << 20)) got += (await endless.read()).value.byteLength;
  await sleep(3000);
  const paused = Number(await (await fetch("/written")).text());
  while (got < (8 << 20)) got += (await endless.read()).value.byteLength;
  await endless.cancel();
  // A service that reads nothing: the page's writes wait for credit.
  const sink = await peer.openStream();
  const writer = sink.writable.getWriter();
  await writer.write(new TextEncoder().encode("POST /sink HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n"));
  let accepted = 0;
  const until = performance.now() + 3000;
  const piece = new Uint8Array(64 << 10);
  for (;;) {
    const wrote = writer.write(piece).then(() => true, () => false);
    if (!(await Promise.race([wrote, sleep(until - performance.now()).then(() => false)]))) break;
    accepted += piece.length;
  }
  sink.close();
  // max-serve-conn 1: a second browser peer is refused until the first has left.
  const one = location.host.replace("app.", "one.");
  const first = await ferry.connect(one);
  let second = "";
  try { await ferry.connect(one); } catch (e) { second = e.message; }
  first.close();
  let third = "";
  for (let i = 0; i < 50 && third !== "direct"; i++) {
    try { third = (await ferry.connect(one)).mode; } catch (e) { third = e.message; await sleep(200); }
  }
  await report({
    mode: peer.mode, status: res.status, len: buf.byteLength, hash, refused, took, both, endless: got,
    paused, accepted, second, third,
  });
} catch (e) { await report({ error: String(e) }); }
</script></body></html>"#;

const FALLBACK_PAGE: &str = r#"<!doctype html><html><body><script type="module">
import * as ferry from "/.well-known/ferry/p2p.js";
const report = (o) => fetch("/report", { method: "POST", body: JSON.stringify(o) });
try {
  const peer = await ferry.connect(location.host, { timeout: 3000 });
  const started = performance.now();
  const res = await peer.fetch("/big");
  const buf = await res.arrayBuffer();
  const took = performance.now() - started;
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
  const hash = [...digest].map((b) => b.toString(16).padStart(2, "0")).join("");
  await report({ mode: peer.mode, len: buf.byteLength, hash, took });
} catch (e) { await report({ error: String(e) }); }
</script></body></html>"#;

/// A local HTTP service: the page, `/big` (`body`), `/small`, `/endless` (until the reader
/// goes), `/written` (bytes of endless responses written so far), `POST /sink` (never read)
/// and `POST /report`, whose bodies go to the receiver (and "endless ended" when an endless
/// response's reader went). One request per connection.
async fn site(body: Vec<u8>) -> (SocketAddr, mpsc::Receiver<String>) {
    site_with_page(body, PAGE).await
}

/// [`site`] with `page` as its `/index.html`.
async fn site_with_page(body: Vec<u8>, page: &'static str) -> (SocketAddr, mpsc::Receiver<String>) {
    // Small kernel buffers (its connections inherit them), so what a stalled transfer
    // holds is mostly what ferry holds.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(128 * 1024).unwrap();
    socket.set_send_buffer_size(128 * 1024).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(64).unwrap();
    let addr = listener.local_addr().unwrap();
    let (reports, received) = mpsc::channel(4);
    let body = Arc::new(body);
    let written = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, reports, written) = (body.clone(), reports.clone(), written.clone());
            tokio::spawn(async move { serve_one(stream, (page, &body), reports, &written).await });
        }
    });
    (addr, received)
}

/// Writes an endless response until the reader goes, counting into `written`; then says so.
async fn serve_endless(mut stream: TcpStream, reports: mpsc::Sender<String>, written: &AtomicU64) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n";
    let chunk = vec![7u8; 64 * 1024];
    if stream.write_all(head.as_bytes()).await.is_ok() {
        while stream.write_all(&chunk).await.is_ok() {
            written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    }
    let _ = reports.send("endless ended".into()).await;
}

async fn serve_one(
    mut stream: TcpStream,
    (page, big): (&str, &[u8]),
    reports: mpsc::Sender<String>,
    written: &AtomicU64,
) {
    let mut read = Vec::new();
    let Some(head) = crate::common::http::read_head(&mut stream, &mut read).await else { return };
    if head.first_line.starts_with("POST /sink ") {
        // Reads nothing more; holds the connection until the test is long over.
        tokio::time::sleep(Duration::from_secs(60)).await;
        return drop(stream);
    }
    let length = head.content_length();
    while read.len() < length {
        let mut more = [0u8; 4096];
        match stream.read(&mut more).await {
            Ok(0) | Err(_) => return,
            Ok(n) => read.extend_from_slice(&more[..n]),
        }
    }
    let target = head.first_line.split(' ').nth(1).unwrap_or_default().to_owned();
    let (kind, answer): (&str, &[u8]) = match target.as_str() {
        "/index.html" => ("text/html", page.as_bytes()),
        "/fallback.html" => ("text/html", FALLBACK_PAGE.as_bytes()),
        "/big" => ("application/octet-stream", big),
        "/small" => ("text/plain", b"small and sound"),
        "/endless" => return serve_endless(stream, reports, written).await,
        "/written" => {
            let text = written.load(Ordering::Relaxed).to_string();
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", text.len());
            let _ = stream.write_all(format!("{head}{text}").as_bytes()).await;
            return;
        }
        "/report" => {
            let _ = reports.send(String::from_utf8_lossy(&read[..length]).into_owned()).await;
            ("text/plain", b"ok")
        }
        _ => ("text/plain", b"not here"),
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        answer.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(answer).await;
    let _ = stream.shutdown().await;
}

/// A server with an HTTP port and a STUN server.
async fn server_with_stun() -> ServerHandle {
    let mut config = server_config();
    config.http_addr = Some("127.0.0.1:0".parse().unwrap());
    config.stun_addr = Some("127.0.0.1:0".parse().unwrap());
    start_server(config).await
}

/// A client of `server` that learns its reflexive address from the server's STUN.
fn p2p_client_config(server: &ServerHandle) -> ferry::ClientConfig {
    let mut config = client_config(server.local_addr(), "id1", "secret1");
    config.p2p.remote_stun = server.stun_local_addr().map(|a| a.to_string());
    config
}

/// An HTTP service `name` at host prefix `name` that takes browser peers.
fn webrtc_service(name: &str, local: SocketAddr) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        webrtc: true,
        ..ServiceConfig::http(&local.to_string()).with_host_prefix(name)
    }
}

/// Opens `url` in headless Chromium, which runs until dropped.
fn chromium(url: &str, profile: &std::path::Path) -> tokio::process::Child {
    let binary = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            std::process::Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success())
        })
        .expect("no chromium found: install it (apt-get install chromium), as .ci/run does");
    tokio::process::Command::new(binary)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromium starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_fetches_32_mib_from_the_client_over_webrtc_and_the_server_carries_none_of_it() {
    within(120, async {
        let server = server_with_stun().await;
        let big = random_bytes(32 << 20);
        let (local, mut reports) = site(big.clone()).await;
        let client = Client::connect(p2p_client_config(&server)).await.unwrap();
        let app = webrtc_service("app", local);
        let _app = client.add_service(app).await.unwrap();
        let plain = ServiceConfig {
            name: "plain".into(),
            ..ServiceConfig::http(&local.to_string()).with_host_prefix("plain")
        };
        let _plain = client.add_service(plain).await.unwrap();
        let app2 = webrtc_service("app2", local);
        let _app2 = client.add_service(app2).await.unwrap();
        let one = ServiceConfig { max_serve_conn: Some(1), ..webrtc_service("one", local) };
        let _one = client.add_service(one).await.unwrap();

        let port = server.http_local_addr().unwrap().port();
        let profile = tempfile::tempdir().unwrap();
        let _browser = chromium(&format!("http://app.localhost:{port}/index.html"), profile.path());
        let mut endless_ended = false;
        let report = loop {
            let report = tokio::time::timeout(Duration::from_secs(90), reports.recv()).await;
            match report.expect("the page reports").unwrap() {
                ended if ended == "endless ended" => endless_ended = true,
                report => break report,
            }
        };
        let report: Value = serde_json::from_str(&report).unwrap();
        assert_eq!(report["error"], Value::Null, "{report}");
        assert_eq!(report["mode"], "direct", "{report}");
        assert_eq!(report["status"], 200, "{report}");
        assert_eq!(report["len"], 32 << 20, "{report}");
        assert_eq!(report["hash"], hex(&sha256(&big)), "32 MiB intact");
        let refused = report["refused"].as_str().unwrap_or_default();
        assert!(refused.contains("does not take browser peers"), "{report}");
        eprintln!("32 MiB over WebRTC in {} ms", report["took"]);
        assert_eq!(report["both"], serde_json::json!([32 << 20, "small and sound", "direct"]), "two at once");
        assert!(report["endless"].as_u64().unwrap() >= 8 << 20, "read on after the pause: {report}");
        // Flow control: 1 MiB read, 1 MiB of credit, 1 MiB queued on the client, and the
        // kernel buffers of the client's local socket (the site's are 128 KiB); without it
        // the page takes everything the service writes in those 3 s (46 MB in a debug
        // build), and a service that reads nothing takes 16 MB.
        let paused = report["paused"].as_u64().unwrap();
        assert!((1 << 20..16 << 20).contains(&paused), "written while the page read nothing: {report}");
        let accepted = report["accepted"].as_u64().unwrap();
        assert!(
            (1 << 20..8 << 20).contains(&accepted),
            "taken from the page by a service that reads nothing: {report}"
        );
        let second = report["second"].as_str().unwrap_or_default();
        assert!(second.contains("max-serve-conn"), "{report}");
        assert_eq!(report["third"], "direct", "the first peer's place is free once it left: {report}");
        eprintln!("paused reader: {paused} bytes written; silent service: {accepted} bytes taken");
        // The page gave the endless response up: the local service sees its connection go.
        if !endless_ended {
            let ended = tokio::time::timeout(Duration::from_secs(10), reports.recv()).await;
            assert_eq!(
                ended.ok().flatten().as_deref(),
                Some("endless ended"),
                "the local connection was let go"
            );
        }

        let services = client.discover().await.unwrap();
        let app = services.iter().find(|s| s.name == "app").unwrap();
        assert!(app.bytes_out < 1 << 20, "the server carried none of the body: {} bytes out", app.bytes_out);
    })
    .await
}

/// Drops UDP to one port of this host while alive: an nftables table of its own in the
/// test's namespace, deleted on drop (also when the test fails).
struct UdpDropped(String);

impl UdpDropped {
    fn to_port(port: u16) -> Self {
        let table = format!("ferry_test_{}_{port}", std::process::id());
        let script = format!(
            "table inet {table} {{\n chain input {{\n type filter hook input priority 0; udp dport {port} drop;\n }}\n}}\n"
        );
        let mut nft = std::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft runs");
        std::io::Write::write_all(&mut nft.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft took the rule");
        UdpDropped(table)
    }
}

impl Drop for UdpDropped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", &self.0]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_clients_udp_dropped_the_page_fetches_through_the_server() {
    if !crate::common::netns::available("browser fallback") {
        return;
    }
    within(120, async {
        let server = server_with_stun().await;
        let big = random_bytes(4 << 20);
        let (local, mut reports) = site(big.clone()).await;
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let _dropped = UdpDropped::to_port(port);
        let mut client_config = p2p_client_config(&server);
        client_config.p2p.ports = Some((port, port));
        let client = Client::connect(client_config).await.unwrap();
        let app = webrtc_service("app", local);
        let _app = client.add_service(app).await.unwrap();

        let http = server.http_local_addr().unwrap().port();
        let profile = tempfile::tempdir().unwrap();
        let _browser = chromium(&format!("http://app.localhost:{http}/fallback.html"), profile.path());
        let report =
            tokio::time::timeout(Duration::from_secs(90), reports.recv()).await.expect("the page reports");
        let report: Value = serde_json::from_str(&report.unwrap()).unwrap();
        assert_eq!(report["error"], Value::Null, "{report}");
        assert_eq!(report["mode"], "relay", "{report}");
        assert_eq!(report["len"], 4 << 20, "{report}");
        assert_eq!(report["hash"], hex(&sha256(&big)), "intact through the server");
        eprintln!("4 MiB through the server in {} ms", report["took"]);
        let services = client.discover().await.unwrap();
        let app = services.iter().find(|s| s.name == "app").unwrap();
        assert!(app.bytes_out >= 4 << 20, "the server carried it: {}", app.bytes_out);
    })
    .await
}

/// The benchmark's page: connection set-up, time to first byte of a small response, and a
/// download, each over the data channel (`peer.fetch`) and through the server (`fetch`),
/// in alternating rounds.
const BENCH_PAGE: &str = r#"<!doctype html><html><body><script type="module">
import * as ferry from "/.well-known/ferry/p2p.js";
const report = (o) => fetch("/report", { method: "POST", body: JSON.stringify(o) });
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const p90 = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * 0.9)];
try {
  const connects = [];
  let peer;
  for (let i = 0; i < 5; i++) {
    if (peer) peer.close();
    const t = performance.now();
    peer = await ferry.connect();
    connects.push(performance.now() - t);
  }
  const ways = { direct: (p) => peer.fetch(p), relay: (p) => fetch(p) };
  const firstByte = { direct: [], relay: [] };
  for (let i = 0; i < 40; i++) {
    for (const [way, get] of Object.entries(ways)) {
      const t = performance.now();
      const body = (await get("/small")).body.getReader();
      await body.read();
      firstByte[way].push(performance.now() - t);
      while (!(await body.read()).done) {}
    }
  }
  const rates = { direct: [], relay: [] };
  for (let round = 0; round < 3; round++) {
    for (const [way, get] of Object.entries(ways)) {
      const t = performance.now();
      const body = (await get("/big")).body.getReader();
      let got = 0;
      for (;;) { const { value, done } = await body.read(); if (done) break; got += value.byteLength; }
      rates[way].push(got / 1e6 / ((performance.now() - t) / 1000));
    }
  }
  const summary = {};
  for (const way of ["direct", "relay"]) {
    summary[way] = { first_byte_p50: median(firstByte[way]), first_byte_p90: p90(firstByte[way]), mb_s: median(rates[way]), rates: rates[way] };
  }
  await report({ connect_p50: median(connects), summary });
} catch (e) { await report({ error: String(e) }); }
</script></body></html>"#;

/// Browser peers against the server's HTTP tunnel (bench/browsers.sh runs it in release):
/// time to first byte and download rate, and what the client process grows by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: bench/browsers.sh runs it"]
async fn browser_peers_direct_against_relayed() {
    within(600, async {
        let server = server_with_stun().await;
        let (local, mut reports) = site_with_page(random_bytes(100 << 20), BENCH_PAGE).await;
        let client = Client::connect(p2p_client_config(&server)).await.unwrap();
        let app = webrtc_service("app", local);
        let _app = client.add_service(app).await.unwrap();
        let port = server.http_local_addr().unwrap().port();
        let profile = tempfile::tempdir().unwrap();
        let before = memory_kib("VmRSS");
        let peak = Arc::new(AtomicU64::new(before));
        let sampler = {
            let peak = peak.clone();
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(memory_kib("VmRSS"), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        let _browser = chromium(&format!("http://app.localhost:{port}/index.html"), profile.path());
        let report =
            tokio::time::timeout(Duration::from_secs(500), reports.recv()).await.expect("the page reports");
        let report: Value = serde_json::from_str(&report.unwrap()).unwrap();
        assert_eq!(report["error"], Value::Null, "{report}");
        sampler.abort();
        let peak = peak.load(Ordering::Relaxed);
        let (direct, relay) = (&report["summary"]["direct"], &report["summary"]["relay"]);
        let ms = |v: &Value| format!("{:.2} ms", v.as_f64().unwrap_or(f64::NAN));
        println!("| browser peer | data channel (direct) | HTTP tunnel (relay) | direct / relay |");
        println!("|---|---|---|---|");
        println!("| connect (offer, ICE, DTLS, SCTP), p50 of 5 | {} | - | - |", ms(&report["connect_p50"]));
        for (what, key) in [
            ("first byte of a small response, p50 of 40", "first_byte_p50"),
            ("first byte, p90", "first_byte_p90"),
        ] {
            let ratio = direct[key].as_f64().unwrap_or(f64::NAN) / relay[key].as_f64().unwrap_or(f64::NAN);
            println!("| {what} | {} | {} | {ratio:.2} |", ms(&direct[key]), ms(&relay[key]));
        }
        let rate = |v: &Value| v["mb_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| 100 MiB download, MB/s, median of 3 | {:.1} | {:.1} | {:.2} |",
            rate(direct),
            rate(relay),
            rate(direct) / rate(relay)
        );
        println!(
            "| peak RSS growth of the test process (server, client, site) | {} MiB | | |",
            (peak - before) / 1024
        );
        println!();
        println!("rounds: direct {} relay {}", direct["rates"], relay["rates"]);
    })
    .await
}

/// This process's memory figure `field` of /proc/self/status, in KiB.
fn memory_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
