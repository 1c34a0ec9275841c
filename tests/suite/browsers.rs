//! Browser peers in a real headless Chromium: a page served through the tunnel imports
//! the server's `p2p.js`, connects to the client over WebRTC and fetches 32 MiB straight
//! from the client's local HTTP service; the server carries none of it.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::http::hex;
use crate::common::*;
use ferry::{Client, ServiceConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const PAGE: &str = r#"<!doctype html><html><body><script type="module">
import * as ferry from "/.well-known/ferry/p2p.js";
const report = (o) => fetch("/report", { method: "POST", body: JSON.stringify(o) });
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
  // A transfer given up half way: the client lets go of the local connection.
  const endless = (await peer.fetch("/endless")).body.getReader();
  let got = 0;
  while (got < (1 << 20)) got += (await endless.read()).value.byteLength;
  await endless.cancel();
  await report({ mode: peer.mode, status: res.status, len: buf.byteLength, hash, refused, took, both, endless: got });
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
/// goes) and `POST /report`, whose bodies go to the receiver (and "endless ended" when an
/// endless response's reader went). One request per connection.
async fn site(body: Vec<u8>) -> (SocketAddr, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reports, received) = mpsc::channel(4);
    let body = std::sync::Arc::new(body);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (body, reports) = (body.clone(), reports.clone());
            tokio::spawn(async move { serve_one(stream, &body, reports).await });
        }
    });
    (addr, received)
}

/// Writes an endless response until the reader goes; then says so.
async fn serve_endless(mut stream: TcpStream, reports: mpsc::Sender<String>) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n";
    let chunk = vec![7u8; 64 * 1024];
    if stream.write_all(head.as_bytes()).await.is_ok() {
        while stream.write_all(&chunk).await.is_ok() {}
    }
    let _ = reports.send("endless ended".into()).await;
}

async fn serve_one(mut stream: TcpStream, big: &[u8], reports: mpsc::Sender<String>) {
    let mut read = Vec::new();
    let Some(head) = crate::common::http::read_head(&mut stream, &mut read).await else { return };
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
        "/index.html" => ("text/html", PAGE.as_bytes()),
        "/fallback.html" => ("text/html", FALLBACK_PAGE.as_bytes()),
        "/big" => ("application/octet-stream", big),
        "/small" => ("text/plain", b"small and sound"),
        "/endless" => return serve_endless(stream, reports).await,
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
        let mut config = server_config();
        config.http_addr = Some("127.0.0.1:0".parse().unwrap());
        config.stun_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = start_server(config).await;
        let big = random_bytes(32 << 20);
        let (local, mut reports) = site(big.clone()).await;
        let mut client_config = client_config(server.local_addr(), "id1", "secret1");
        client_config.p2p.remote_stun = server.stun_local_addr().map(|a| a.to_string());
        let client = Client::connect(client_config).await.unwrap();
        let app = ServiceConfig {
            name: "app".into(),
            webrtc: true,
            ..ServiceConfig::http(&local.to_string()).with_host_prefix("app")
        };
        let _app = client.add_service(app).await.unwrap();
        let plain = ServiceConfig {
            name: "plain".into(),
            ..ServiceConfig::http(&local.to_string()).with_host_prefix("plain")
        };
        let _plain = client.add_service(plain).await.unwrap();
        let app2 = ServiceConfig {
            name: "app2".into(),
            webrtc: true,
            ..ServiceConfig::http(&local.to_string()).with_host_prefix("app2")
        };
        let _app2 = client.add_service(app2).await.unwrap();

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
        assert!(report["endless"].as_u64().unwrap() >= 1 << 20, "{report}");
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
        let mut config = server_config();
        config.http_addr = Some("127.0.0.1:0".parse().unwrap());
        config.stun_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = start_server(config).await;
        let big = random_bytes(4 << 20);
        let (local, mut reports) = site(big.clone()).await;
        let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let _dropped = UdpDropped::to_port(port);
        let mut client_config = client_config(server.local_addr(), "id1", "secret1");
        client_config.p2p.remote_stun = server.stun_local_addr().map(|a| a.to_string());
        client_config.p2p.ports = Some((port, port));
        let client = Client::connect(client_config).await.unwrap();
        let app = ServiceConfig {
            name: "app".into(),
            webrtc: true,
            ..ServiceConfig::http(&local.to_string()).with_host_prefix("app")
        };
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
