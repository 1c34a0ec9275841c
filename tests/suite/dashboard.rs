//! The dashboard page in a real headless browser (Debian's chromium, which `.ci/run` installs):
//! it lists live services, picks up services added after it loaded, and uses `#token=`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use ferry::{ServerConfig, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::watch;

const TOKEN: &str = "dashboard-token-0123456789";

/// Where a Chromium binary is; the test says how to get one when there is none.
fn chromium() -> String {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            std::process::Command::new(name).arg("--version").output().is_ok_and(|o| o.status.success())
        })
        .expect("no chromium found: install it (apt-get install chromium), as .ci/run does")
        .to_owned()
}

/// Loads `url` in headless Chromium, runs its scripts for `virtual_ms` of virtual time and
/// returns the DOM it ends with (and Chromium's diagnostics, for failure messages).
async fn dump_dom(url: &str, virtual_ms: u32) -> (String, String) {
    let profile = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        Command::new(chromium())
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--virtual-time-budget={virtual_ms}"))
            .args(["--dump-dom", url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish")
    .unwrap();
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn dashboard_config(token: Option<&str>) -> ServerConfig {
    let mut config = server_config();
    config.api_addr = Some("127.0.0.1:0".parse().unwrap());
    config.api_token = token.map(Into::into);
    config
}

fn named(local: SocketAddr, name: &str) -> ServiceConfig {
    let mut service = ServiceConfig::tcp(&local.to_string());
    service.name = name.to_owned();
    service
}

fn row(name: &str) -> String {
    format!(r#"<tr data-name="{name}">"#)
}

/// A forwarder in front of the API that counts the page's `GET /services` requests (in
/// `seen`) and holds every one after the first until `release` turns true.
async fn watching_proxy(api: SocketAddr) -> (SocketAddr, watch::Receiver<usize>, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (seen_tx, seen) = watch::channel(0usize);
    let (release, released) = watch::channel(false);
    tokio::spawn(async move {
        while let Ok((browser, _)) = listener.accept().await {
            let Ok(upstream) = TcpStream::connect(api).await else { continue };
            let (seen_tx, mut released) = (seen_tx.clone(), released.clone());
            tokio::spawn(async move {
                let (mut from_browser, mut to_browser) = browser.into_split();
                let (mut from_api, mut to_api) = upstream.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut from_api, &mut to_browser).await });
                let mut chunk = vec![0u8; 16 * 1024];
                while let Ok(n @ 1..) = from_browser.read(&mut chunk).await {
                    let asks = chunk[..n].windows(14).filter(|w| w == b"GET /services ").count();
                    for _ in 0..asks {
                        let earlier = *seen_tx.borrow();
                        seen_tx.send_replace(earlier + 1);
                        if earlier > 0 && released.wait_for(|r| *r).await.is_err() {
                            return;
                        }
                    }
                    if to_api.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_a_live_service_in_a_browser() {
    within(120, async {
        let server = start_server(dashboard_config(None)).await;
        let client = connect(server.local_addr()).await;
        let _tunnel = client.add_service(named(echo_server().await, "dashboard-probe-7")).await.unwrap();

        let url = format!("http://{}/", server.api_local_addr().unwrap());
        let (dom, stderr) = dump_dom(&url, 10_000).await;
        assert!(
            dom.contains(&row("dashboard-probe-7")),
            "the service is not in the rendered page:\n{dom}\n{stderr}"
        );
        assert!(dom.contains("1 client(s), 1 service(s)"), "{dom}");
        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_refreshes_by_itself_and_shows_a_service_added_after_it_loaded() {
    within(120, async {
        let server = start_server(dashboard_config(None)).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let _early = client.add_service(named(echo, "early-service")).await.unwrap();
        let (proxy, mut seen, release) = watching_proxy(server.api_local_addr().unwrap()).await;

        let url = format!("http://{proxy}/");
        let browser = tokio::spawn(async move { dump_dom(&url, 10_000).await });
        // The page has asked for the services once: only now does the late one open.
        tokio::time::timeout(Duration::from_secs(60), seen.wait_for(|n| *n >= 1))
            .await
            .expect("the page never asked for /services")
            .unwrap();
        let _late = client.add_service(named(echo, "late-service")).await.unwrap();
        release.send_replace(true);

        let (dom, stderr) = browser.await.unwrap();
        assert!(*seen.borrow() >= 2, "the page asked for /services only once: no refresh");
        assert!(dom.contains(&row("early-service")), "{dom}\n{stderr}");
        assert!(
            dom.contains(&row("late-service")),
            "the refresh did not show the new service:\n{dom}\n{stderr}"
        );
        assert!(dom.contains("1 client(s), 2 service(s)"), "{dom}");
        server.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_takes_the_token_from_the_address() {
    within(120, async {
        let server = start_server(dashboard_config(Some(TOKEN))).await;
        let client = connect(server.local_addr()).await;
        let _tunnel = client.add_service(named(echo_server().await, "guarded-service")).await.unwrap();
        let api = server.api_local_addr().unwrap();

        let (dom, stderr) = dump_dom(&format!("http://{api}/#token={TOKEN}"), 5_000).await;
        assert!(dom.contains(&row("guarded-service")), "not listed with the token:\n{dom}\n{stderr}");
        assert!(dom.contains("1 client(s), 1 service(s)"), "{dom}");

        // Without it the page lists nothing, asks for one, and stops polling: one bad
        // token in 5 s, not one every 2 s until the address is banned.
        let (dom, stderr) = dump_dom(&format!("http://{api}/"), 5_000).await;
        assert!(!dom.contains(&row("guarded-service")), "listed without the token:\n{dom}");
        assert!(dom.contains("this API needs a token"), "{dom}\n{stderr}");
        assert!(!dom.contains(r#"<form id="token-form" hidden"#), "the token form is hidden:\n{dom}");
        let metrics = crate::common::http::request(
            &mut TcpStream::connect(api).await.unwrap(),
            "GET",
            "/metrics",
            "ferry-api",
            &format!("Authorization: Bearer {TOKEN}\r\n"),
            b"",
        )
        .await
        .text();
        assert!(metrics.contains("\nferry_auth_failures_total 1\n"), "{metrics}");
        server.shutdown().await;
    })
    .await
}
