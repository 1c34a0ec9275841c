//! Clients behind a corporate proxy: real tinyproxy (HTTP CONNECT, with Basic auth) and
//! real Dante (SOCKS5), both from Debian and installed by `.ci/run`, started by the tests.

use std::path::Path;
use std::process::Stdio;

use crate::cli::{client_process, spawn_server_process};
use crate::common::*;
use crate::tls::{make_certs, tls_client_config, tls_server};
use ferry::{Client, ClientError, ProxyAddr, RemoteTrust};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

/// A proxy process, stopped when dropped.
struct ProxyProcess {
    _child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// tinyproxy with user alice/s3cret; `only_port`, if given, is the one port it tunnels to.
    async fn tinyproxy(only_port: Option<u16>) -> ProxyProcess {
        let port = free_port().await;
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 200\nLogLevel Error\n\
             Allow 127.0.0.1\nBasicAuth alice s3cret\n"
        );
        if let Some(only) = only_port {
            conf.push_str(&format!("ConnectPort {only}\n"));
        }
        Self::start("tinyproxy", port, &conf, |path| {
            vec!["-d".into(), "-c".into(), path.display().to_string()]
        })
        .await
    }

    /// Dante without authentication; it tunnels only to loopback ports outside `blocked`.
    async fn dante(blocked: Option<u16>) -> ProxyProcess {
        let port = free_port().await;
        let block = blocked
            .map(|p| format!("socks block {{ from: 0.0.0.0/0 to: 127.0.0.1/32 port = {p} }}\n"))
            .unwrap_or_default();
        let conf = format!(
            "logoutput: stderr\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
             clientmethod: none\nsocksmethod: none\nuser.unprivileged: nobody\n\
             client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n{block}\
             socks pass {{ from: 127.0.0.0/8 to: 127.0.0.0/8 }}\n"
        );
        Self::start("danted", port, &conf, |path| vec!["-f".into(), path.display().to_string()]).await
    }

    async fn start(
        program: &str,
        port: u16,
        conf: &str,
        args: impl Fn(&Path) -> Vec<String>,
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.conf");
        std::fs::write(&path, conf).unwrap();
        let binary = ["/usr/bin/", "/usr/sbin/"]
            .iter()
            .map(|d| format!("{d}{program}"))
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| panic!("no {program}: install it (tinyproxy, dante-server) as .ci/run does"));
        let child = tokio::process::Command::new(binary)
            .args(args(&path))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("proxy starts");
        let up = poll_until(|| async { TcpStream::connect(("127.0.0.1", port)).await.is_ok() }).await;
        assert!(up, "{program} never listened on {port}");
        ProxyProcess { _child: child, port, _dir: dir }
    }

    fn url(&self, scheme: &str, credentials: &str) -> ProxyAddr {
        ProxyAddr::parse(&format!("{scheme}://{credentials}127.0.0.1:{}", self.port)).unwrap()
    }
}

async fn assert_tunnel_carries(client: &Client) {
    assert_tcp_tunnel_carries(client, 4 << 20).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_tls_through_an_http_connect_proxy_with_a_password() {
    within(60, async {
        let proxy = ProxyProcess::tinyproxy(None).await;
        let server = start_server(server_config()).await;
        let mut config = client_config(server.local_addr(), "id1", "secret1");
        config.proxy = Some(proxy.url("http", "alice:s3cret@"));
        let client = Client::connect(config).await.expect("connects through tinyproxy");
        assert_tunnel_carries(&client).await;

        let certs = make_certs();
        let tls = tls_server(&certs).await;
        let mut config = tls_client_config(&tls, RemoteTrust::CaFile(certs.cert.clone()));
        config.proxy = Some(proxy.url("http", "alice:s3cret@"));
        let client = Client::connect(config).await.expect("tls through tinyproxy");
        assert_tunnel_carries(&client).await;
    })
    .await
}

#[tokio::test]
async fn a_wrong_proxy_password_names_the_proxy_and_hides_the_password() {
    within(30, async {
        let proxy = ProxyProcess::tinyproxy(None).await;
        let server = start_server(server_config()).await;
        let mut config = client_config(server.local_addr(), "id1", "secret1");
        config.proxy = Some(proxy.url("http", "alice:wrong-pass@"));
        let err = Client::connect(config).await.expect_err("refused");
        let text = err.to_string();
        assert!(matches!(err, ClientError::Connect(_)), "{text}");
        let named = format!("proxy http://alice:***@127.0.0.1:{}", proxy.port);
        assert!(text.contains(&named) && text.contains("wrong proxy user or password"), "{text}");
        assert!(!text.contains("wrong-pass"), "{text}");
    })
    .await
}

#[tokio::test]
async fn a_proxy_that_refuses_the_destination_is_named_in_the_error() {
    within(30, async {
        let server = start_server(server_config()).await;
        let port = server.local_addr().port();
        // tinyproxy that tunnels only to another port: 403.
        let http = ProxyProcess::tinyproxy(Some(port.wrapping_add(1))).await;
        let mut config = client_config(server.local_addr(), "id1", "secret1");
        config.proxy = Some(http.url("http", "alice:s3cret@"));
        let text = Client::connect(config).await.expect_err("refused").to_string();
        let named =
            format!("proxy http://alice:***@127.0.0.1:{} refused a tunnel to 127.0.0.1:{port}", http.port);
        assert!(text.contains(&named) && text.contains("403"), "{text}");
        // Dante with a rule against the server's port.
        let socks = ProxyProcess::dante(Some(port)).await;
        let mut config = client_config(server.local_addr(), "id1", "secret1");
        config.proxy = Some(socks.url("socks5", ""));
        let text = Client::connect(config).await.expect_err("refused").to_string();
        let named = format!("proxy socks5://127.0.0.1:{} refused a tunnel to 127.0.0.1:{port}", socks.port);
        assert!(text.contains(&named) && text.contains("not allowed"), "{text}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_a_socks5_proxy() {
    within(60, async {
        let proxy = ProxyProcess::dante(None).await;
        let server = start_server(server_config()).await;
        let mut config = client_config(server.local_addr(), "id1", "secret1");
        config.proxy = Some(proxy.url("socks5", ""));
        let client = Client::connect(config).await.expect("connects through dante");
        assert_tunnel_carries(&client).await;
    })
    .await
}

/// The client process reads HTTPS_PROXY, and NO_PROXY overrides it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_process_honours_https_proxy_and_no_proxy() {
    within(60, async {
        let (_server, server_port) = spawn_server_process(&["--tcp-range", "1024-65535"]).await;
        let echo = echo_server().await;
        let local = format!("tcp://{echo}");
        let dead = format!("http://127.0.0.1:{}", free_port().await);

        // A proxy that is not there: the client says so, naming it.
        let mut client = client_process(server_port, "secret1", &["--local", &local]);
        let mut client = client.env("HTTPS_PROXY", &dead).spawn().unwrap();
        let mut err = BufReader::new(client.stderr.take().unwrap()).lines();
        let line = loop {
            let line = err.next_line().await.unwrap().expect("client ended without an error line");
            if line.contains("retrying") {
                break line;
            }
        };
        assert!(line.contains(&format!("proxy {dead}")), "{line}");
        client.kill().await.unwrap();

        // NO_PROXY names the server: straight there.
        let mut client = client_process(server_port, "secret1", &["--local", &local]);
        let mut client =
            client.env("HTTPS_PROXY", &dead).env("NO_PROXY", "localhost,127.0.0.0/8").spawn().unwrap();
        let mut out = BufReader::new(client.stdout.take().unwrap()).lines();
        let line = out.next_line().await.unwrap().expect("client printed nothing");
        let public = line.rsplit(' ').next().unwrap();
        assert_eq!(echo_through(public.parse().unwrap(), b"direct").await.unwrap(), b"direct");
        client.kill().await.unwrap();
    })
    .await
}
