//! What errors say when printed whole, as the binary prints them (`{:#}`).

use std::time::Duration;

use crate::common::*;
use ferry::Client;

#[tokio::test]
async fn dialling_an_http_only_port_names_the_cause_once() {
    within(30, async {
        let mut config = server_config();
        config.http_addr = Some("127.0.0.1:0".parse().unwrap());
        config.http_header_timeout = Duration::from_millis(300);
        let server = start_server(config).await;
        let http_only = server.http_local_addr().unwrap();
        let err = Client::connect(client_config(http_only, "id1", "secret1")).await.unwrap_err();
        let printed = format!("{:#}", anyhow::Error::new(err));
        assert!(printed.starts_with("protocol error: "), "{printed}");
        let parts: Vec<&str> = printed.split(": ").collect();
        for (i, part) in parts.iter().enumerate() {
            assert!(!parts[i + 1..].contains(part), "'{part}' said twice: {printed}");
        }
    })
    .await
}

/// A taken port is reported once, with its cause once (issue 9.17).
#[test]
fn a_taken_port_names_its_cause_once() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let secret = "a-secret-of-twenty-bytes";
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["server", "--addr", &addr, "--id", "a", "--secret", secret])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(line.contains(&addr), "{line}");
    assert_eq!(line.matches("in use").count(), 1, "{line}");
}
