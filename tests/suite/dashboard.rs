//! The dashboard page in a real headless browser (Debian's chromium, which `.ci/run` installs).

use std::time::Duration;

use crate::common::*;
use ferry::ServiceConfig;
use tokio::process::Command;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_a_live_service_in_a_browser() {
    within(120, async {
        let browser = chromium();
        let mut config = server_config();
        config.api_addr = Some("127.0.0.1:0".parse().unwrap());
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let mut service = ServiceConfig::tcp(&echo.to_string());
        service.name = "dashboard-probe-7".into();
        let _tunnel = client.add_service(service).await.unwrap();

        let url = format!("http://{}/", server.api_local_addr().unwrap());
        let profile = tempfile::tempdir().unwrap();
        let output = tokio::time::timeout(
            Duration::from_secs(90),
            Command::new(browser)
                .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .args(["--virtual-time-budget=10000", "--dump-dom", &url])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("chromium did not finish")
        .unwrap();
        let dom = String::from_utf8_lossy(&output.stdout);
        assert!(
            dom.contains(r#"<tr data-name="dashboard-probe-7">"#),
            "the service is not in the rendered page:\n{dom}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(dom.contains("1 client(s), 1 service(s)"), "{dom}");
        server.shutdown().await;
    })
    .await
}
