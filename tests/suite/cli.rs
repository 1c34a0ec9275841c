//! The `ferry` binary itself: processes, flags, config files.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::*;
use ferry::config::options::{load_file, resolve, ClientOptions, ServerOptions};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The `ferry` binary, with no proxy from the environment of whoever runs the tests.
pub(crate) fn ferry() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferry"));
    command.kill_on_drop(true).stdin(Stdio::null());
    for var in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"] {
        command.env_remove(var);
    }
    command
}

pub(crate) async fn start_server_process(port: u16, extra: &[&str]) -> Child {
    let addr = format!("127.0.0.1:{port}");
    let mut args =
        vec!["server", "--addr", &addr, "--id", "id1", "--secret", "secret1", "--log-level", "warn"];
    args.extend_from_slice(extra);
    let child = ferry().args(&args).stderr(Stdio::null()).spawn().unwrap();
    // Readiness: the listener accepts.
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("ferry server never listened on {addr}");
}

/// Starts `ferry server` on a port the server picks itself (`--addr 127.0.0.1:0`), so no
/// test races another for a "free" port; returns the process and the port, read from the
/// server's "listening" log line. The rest of its log is drained in the background.
pub(crate) async fn spawn_server_process(extra: &[&str]) -> (Child, u16) {
    let mut args =
        vec!["server", "--addr", "127.0.0.1:0", "--id", "id1", "--secret", "secret1", "--log-level", "info"];
    args.extend_from_slice(extra);
    let mut child = ferry().args(&args).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines.next_line().await.unwrap().expect("the server exited before it listened");
        let bound =
            line.split("listening addr=127.0.0.1:").nth(1).filter(|rest| rest.contains("listener=\"addr\""));
        if let Some(port) = bound.and_then(|rest| rest.split(' ').next()).and_then(|p| p.parse().ok()) {
            break port;
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

pub(crate) fn client_process(server_port: u16, secret: &str, service: &[&str]) -> Command {
    client_process_to(&format!("tcp://127.0.0.1:{server_port}"), secret, service)
}

/// `ferry client` for `remote` (any transport), with `service` flags.
pub(crate) fn client_process_to(remote: &str, secret: &str, service: &[&str]) -> Command {
    let mut command = ferry();
    command
        .args(["client", "--remote", remote, "--id", "id1", "--secret", secret, "--log-level", "warn"])
        .args(["--reconnect-delay", "50ms"])
        .args(service)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Waits for the client's "... is reachable at HOST:PORT" line.
pub(crate) async fn public_addr_of(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next_line().await.unwrap().expect("client printed nothing");
    line.rsplit(' ').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_client_processes_tunnel_and_survive_a_client_kill() {
    within(60, async {
        let (mut server, server_port) = spawn_server_process(&["--tcp-range", "1024-65535"]).await;
        let echo = echo_server().await;
        let public_port = free_port().await;
        let local = format!("tcp://{echo}");
        let port_text = public_port.to_string();
        let service = ["--local", local.as_str(), "--remote-tcp-port", port_text.as_str()];

        let mut client = client_process(server_port, "secret1", &service).spawn().unwrap();
        let public = public_addr_of(&mut client).await;
        assert_eq!(public, format!("127.0.0.1:{public_port}"));
        let payload = random_bytes(1 << 20);
        assert_eq!(sha256(&echo_through(public.parse().unwrap(), &payload).await.unwrap()), sha256(&payload));

        client.kill().await.unwrap(); // SIGKILL: no goodbye
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(&public).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut client = client_process(server_port, "secret1", &service).spawn().unwrap();
        assert_eq!(public_addr_of(&mut client).await, public, "restarted client got another port");
        assert_eq!(sha256(&echo_through(public.parse().unwrap(), &payload).await.unwrap()), sha256(&payload));
        client.kill().await.unwrap();
        server.kill().await.unwrap();
    })
    .await
}

async fn failing_client(server_port: u16, secret: &str, service: &[&str]) -> String {
    let output = client_process(server_port, secret, service).output().await.unwrap();
    assert!(!output.status.success(), "client should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn refused_clients_exit_with_the_cause() {
    within(60, async {
        let (_server, server_port) = spawn_server_process(&["--tcp-range", "20000-20010"]).await;
        let stderr = failing_client(server_port, "wrong", &["--local", "tcp://127.0.0.1:1"]).await;
        assert!(stderr.contains("authentication failed for id 'id1'"), "{stderr}");

        let stderr = failing_client(
            server_port,
            "secret1",
            &["--local", "tcp://127.0.0.1:1", "--remote-tcp-port", "80"],
        )
        .await;
        assert!(stderr.contains("port 80 is not allowed; the server's tcp-range is 20000-20010"), "{stderr}");
        // A server that is not up yet is waited for: see `client_process::…before_its_server`.
    })
    .await
}

/// Runs the binary, expects it to fail, and returns what it printed on stderr.
async fn stderr_of_failing(args: &[&std::ffi::OsStr]) -> String {
    let output = ferry().args(args).output().await.unwrap();
    assert!(!output.status.success(), "{args:?} should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn bad_config_files_name_the_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("server.yaml");
    std::fs::write(&yaml, "addr: 127.0.0.1:0\nbogus-key: 1\n").unwrap();
    let stderr = stderr_of_failing(&["server".as_ref(), "--config".as_ref(), yaml.as_os_str()]).await;
    assert!(stderr.contains("bogus-key") && stderr.contains("line 2"), "{stderr}");

    let toml = dir.path().join("client.toml");
    std::fs::write(&toml, "remote = \"tcp://h:1\"\nreconnect-delay = \"soon\"\n").unwrap();
    let stderr = stderr_of_failing(&["client".as_ref(), "--config".as_ref(), toml.as_os_str()]).await;
    assert!(stderr.contains("reconnect-delay") && stderr.contains("line 2"), "{stderr}");

    let stderr = stderr_of_failing(&["server".as_ref(), "--addr".as_ref(), "nowhere".as_ref()]).await;
    assert!(stderr.contains("addr: 'nowhere' is not an address"), "{stderr}");
}

#[test]
fn flags_override_the_file_and_the_file_overrides_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.yaml");
    std::fs::write(
        &path,
        "addr: 127.0.0.1:7100\ntcp-number: 3\nheartbeat-timeout: 5s\nusers:\n  a:\n    secret: from-file\n",
    )
    .unwrap();
    let flags = ServerOptions {
        tcp_number: Some(9),
        id: vec!["a".into()],
        secret: vec!["from-flag".parse().unwrap()],
        ..Default::default()
    };
    let config = resolve(flags, Some(&path)).unwrap().into_config().unwrap();
    assert_eq!(config.tcp_number, Some(9), "flag wins over file");
    assert_eq!(
        config.addr.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:7100"),
        "file wins over default"
    );
    assert_eq!(config.heartbeat_timeout, Duration::from_secs(5));
    assert_eq!(config.handshake_timeout, Duration::from_secs(10), "default stays");
    assert_eq!(config.users["a"].secret.expose(), "from-flag", "flag pair wins over the users map");
}

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("server") {
            load_file::<ServerOptions>(&path)
                .unwrap()
                .into_config()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name.starts_with("client") {
            let (_, services) = load_file::<ClientOptions>(&path)
                .unwrap()
                .into_config()
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!services.is_empty(), "{name} has no services");
        } else if name.starts_with("users") {
            let users =
                ferry::config::options::load_users_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(users.values().all(|u| !u.secret.expose().is_empty()), "{name}: a user without secret");
        } else {
            continue;
        }
        seen += 1;
    }
    assert!(seen >= 4, "only {seen} example configs found");
}

#[tokio::test]
async fn help_explains_every_flag() {
    let output = ferry().args(["client", "--help"]).output().await.unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--remote ",
        "--id ",
        "--secret ",
        "--remote-cert ",
        "--remote-cert-insecure",
        "--reconnect-delay",
        "--heartbeat-timeout",
        "--local ",
        "--remote-tcp-port",
        "--remote-tcp-random",
        "--log-file-max-size",
        "--config",
    ] {
        assert!(help.contains(flag), "client --help lacks {flag}");
    }
    let output = ferry().args(["server", "--help"]).output().await.unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--addr ",
        "--tls-addr",
        "--cert-file",
        "--key-file",
        "--allow-any-client",
        "--tcp-range",
        "--tcp-number",
        "--heartbeat-timeout",
        "--log-file-max-count",
    ] {
        assert!(help.contains(flag), "server --help lacks {flag}");
    }
}

#[tokio::test]
async fn log_file_rotates_by_size_and_never_holds_secrets() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs").join("server.log");
        let log_text = log.to_string_lossy().into_owned();
        let server_port = free_port().await;
        let addr = format!("127.0.0.1:{server_port}");
        let args = ["server", "--addr", &addr, "--id", "id1", "--secret", "secret1", "--log-level", "debug"];
        let rotation = ["--log-file", &log_text, "--log-file-max-size", "600", "--log-file-max-count", "2"];
        // Banned clients wait the ban out instead of exiting: keep these eight failures unbanned.
        let no_ban = ["--reconnect-times", "100"];
        let mut server = ferry().args(args).args(rotation).args(no_ban).spawn().unwrap();
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..8 {
            failing_client(server_port, "wrong-secret-xyz", &["--local", "tcp://127.0.0.1:1"]).await;
        }
        server.kill().await.unwrap();
        let mut files: Vec<_> =
            std::fs::read_dir(log.parent().unwrap()).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(files.len() >= 2, "no rotation happened: {files:?}");
        assert!(files.len() <= 3, "more files than --log-file-max-count keeps: {files:?}");
        let mut all = String::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            assert!(
                text.len() <= 600,
                "{} holds {} bytes, past --log-file-max-size",
                file.display(),
                text.len()
            );
            assert!(!text.contains('\x1b'), "colour codes in a log file");
            all.push_str(&text);
        }
        assert!(all.contains("login refused"), "{all}");
        assert!(!all.contains("wrong-secret-xyz") && !all.contains("secret1"), "a secret reached the log");
    })
    .await
}

#[test]
fn service_schemes_and_their_options() {
    use ferry::config::ServiceKind;
    let cli = ferry::cli::parse_from([
        "ferry",
        "client",
        "--local",
        "http://127.0.0.1",
        "--host-prefix",
        "web",
        "--use-local-as-http-host",
        "--local",
        "https://127.0.0.1:8443",
        "--local",
        "tcp://127.0.0.1:22",
        "--proxy-protocol",
        "v1",
    ])
    .unwrap();
    let ferry::cli::Command::Client(options) = cli.command else { panic!("not a client") };
    let services: Vec<_> = options.services.into_iter().map(|s| s.into_config().unwrap()).collect();
    assert_eq!((services[0].kind, services[0].local.as_str()), (ServiceKind::Http, "127.0.0.1:80"));
    assert_eq!(services[0].host_prefix.as_deref(), Some("web"));
    assert!(services[0].use_local_as_http_host);
    assert_eq!(services[1].kind, ServiceKind::Https);
    assert_eq!(services[2].proxy_protocol, Some(ferry::proto::ProxyProtocol::V1));
    // Options that do not fit the scheme are errors.
    let cli = ferry::cli::parse_from(["ferry", "client", "--local", "http://a:1", "--remote-tcp-port", "80"])
        .unwrap();
    let ferry::cli::Command::Client(options) = cli.command else { panic!("not a client") };
    assert!(options.services[0].clone().into_config().is_err());
    let udp = [
        "ferry",
        "client",
        "--local",
        "udp://127.0.0.1:53",
        "--remote-udp-port",
        "5353",
        "--remote-udp-random",
    ];
    let ferry::cli::Command::Client(options) = ferry::cli::parse_from(udp).unwrap().command else { panic!() };
    let service = options.services[0].clone().into_config().unwrap();
    assert_eq!((service.kind, service.local.as_str()), (ServiceKind::Udp, "127.0.0.1:53"));
    assert_eq!((service.remote_udp_port, service.remote_udp_random), (Some(5353), true));
    let zstd = ["ferry", "client", "--local", "tcp://a:1", "--compress", "zstd"];
    let ferry::cli::Command::Client(options) = ferry::cli::parse_from(zstd).unwrap().command else {
        panic!()
    };
    let service = options.services[0].clone().into_config().unwrap();
    assert_eq!(service.compress, Some(ferry::proto::Compression::Zstd));
    assert!(
        ferry::cli::parse_from(["ferry", "client", "--local", "tcp://a:1", "--compress", "gzip"]).is_err()
    );
    for wrong in [
        ["--local", "tcp://a:1", "--remote-udp-port", "1"],
        ["--local", "udp://a:1", "--encrypt", "--name=dns"],
        ["--local", "udp://a:1", "--compress", "zstd"],
    ] {
        let cli = ferry::cli::parse_from(["ferry", "client"].into_iter().chain(wrong)).unwrap();
        let ferry::cli::Command::Client(options) = cli.command else { panic!("not a client") };
        let err = options.services[0].clone().into_config().unwrap_err().to_string();
        assert!(err.contains("udp"), "{err}");
    }
}

#[test]
fn service_control_from_flags_and_files() {
    let cli = ferry::cli::parse_from([
        "ferry",
        "client",
        "--local",
        "tcp://127.0.0.1:22",
        "--max-serve-conn",
        "3",
        "--max-serve-count",
        "1000",
        "--max-serve-time",
        "10m",
        "--local",
        "tcp://127.0.0.1:23",
    ])
    .unwrap();
    let ferry::cli::Command::Client(options) = cli.command else { panic!("not a client") };
    let services: Vec<_> = options.services.into_iter().map(|s| s.into_config().unwrap()).collect();
    let limits = |s: &ferry::ServiceConfig| (s.max_serve_conn, s.max_serve_count, s.max_serve_time);
    assert_eq!(limits(&services[0]), (Some(3), Some(1000), Some(Duration::from_secs(600))));
    assert_eq!(limits(&services[1]), (None, None, None), "limits belong to the service they follow");

    let (_, services) = load_file::<ClientOptions>(std::path::Path::new("examples/client.yaml"))
        .unwrap()
        .into_config()
        .unwrap();
    let postgres = services.iter().find(|s| s.name == "postgres").unwrap();
    assert_eq!(limits(postgres), (Some(5), Some(100), Some(Duration::from_secs(24 * 3600))));
    assert_eq!(postgres.allow_ip, vec!["203.0.113.0/24".parse::<ipnet::IpNet>().unwrap()]);
    assert!(postgres.encrypt && !services[0].encrypt, "encrypt is per service");
    let dns = services.iter().find(|s| s.name == "dns").unwrap();
    assert_eq!((dns.kind, dns.remote_udp_port), (ferry::config::ServiceKind::Udp, Some(10053)));
    let bad = ferry::cli::parse_from(["ferry", "client", "--local", "tcp://a:1", "--max-serve-time", "soon"]);
    assert!(bad.is_err(), "a bad duration is refused");
}

#[test]
fn certificate_lists_in_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("server.yaml");
    std::fs::write(&path, "tls-addr: 7443\ncert-file: a.pem\nkey-file: [a.key]\ntls-min-version: tls1.3\n")
        .unwrap();
    let config = load_file::<ServerOptions>(&path).unwrap().into_config().unwrap();
    assert_eq!(config.cert_file.len(), 1);
    assert_eq!(config.tls_min_version, ferry::transport::TlsVersion::Tls13);
}

/// Waits for a process to write its pid file; returns the pid in it.
async fn wait_for_pid_file(path: &std::path::Path) -> u32 {
    for _ in 0..5000 {
        if let Some(pid) = std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()) {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("no pid file at {}", path.display());
}

/// Logs in as `id` with a library client; true when the server accepts.
async fn can_log_in(port: u16, id: &str, secret: &str) -> bool {
    let server = format!("127.0.0.1:{port}").parse().unwrap();
    ferry::Client::connect(client_config(server, id, secret)).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_reload_rereads_the_users_file_and_signal_stop_stops() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users.yaml");
        let pid_file = dir.path().join("ferry.pid");
        std::fs::write(&users, "alice: {secret: a}\n").unwrap();
        let port = free_port().await;
        let (users_arg, pid_arg) = (users.to_str().unwrap(), pid_file.to_str().unwrap());
        let log = dir.path().join("server.log");
        let log_arg = log.to_str().unwrap();
        // No bans: the test's own refused logins while it waits for a reload must not count.
        let flags =
            ["--users", users_arg, "--pid-file", pid_arg, "--log-file", log_arg, "--reconnect-times", "0"];
        let mut server = start_server_process(port, &flags).await;
        let pid = wait_for_pid_file(&pid_file).await;
        assert_eq!(Some(pid), server.id());
        assert!(can_log_in(port, "alice", "a").await);
        assert!(!can_log_in(port, "bob", "b").await);
        let server_addr = format!("127.0.0.1:{port}").parse().unwrap();
        let alice = ferry::Client::connect(client_config(server_addr, "alice", "a")).await.unwrap();
        // Reload with a users file that is broken: the running users stay.
        std::fs::write(&users, "bob: [not, a, map]\n").unwrap();
        let signal = |name: &'static str| {
            let pid_arg = pid_arg.to_owned();
            async move {
                let output =
                    ferry().args(["server", "-s", name, "--pid-file", &pid_arg]).output().await.unwrap();
                assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            }
        };
        signal("reload").await;
        let mut refused = false;
        for _ in 0..200 {
            if std::fs::read_to_string(&log).unwrap_or_default().contains("reload failed") {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "the broken users file was not reported");
        assert!(can_log_in(port, "alice", "a").await, "a failed reload changed the users");
        std::fs::write(&users, "bob: {secret: b}\n").unwrap();
        signal("reload").await;
        let mut reloaded = false;
        for _ in 0..200 {
            if can_log_in(port, "bob", "b").await {
                reloaded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(reloaded, "bob was never let in after the reload");
        assert!(!can_log_in(port, "alice", "a").await, "alice was removed from the users file");
        let mut state = alice.state();
        let dropped = state.wait_for(|s| !matches!(s, ferry::ClientState::Connected { .. }));
        tokio::time::timeout(Duration::from_secs(10), dropped)
            .await
            .expect("alice's running session outlived her removal")
            .unwrap();
        alice.shutdown().await;
        signal("stop").await;
        let status = tokio::time::timeout(Duration::from_secs(10), server.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{status:?}");
        assert!(!pid_file.exists(), "the pid file was left behind");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reload_adds_and_removes_services_and_stop_stops() {
    within(60, async {
        let (_server, server_port) = spawn_server_process(&["--tcp-range", "1024-65535"]).await;
        let (first, second) = (echo_server().await, echo_server().await);
        let dir = tempfile::tempdir().unwrap();
        let (config, pid_file) = (dir.path().join("client.yaml"), dir.path().join("client.pid"));
        let write_config = |locals: &[std::net::SocketAddr]| {
            let services: String = locals.iter().map(|l| format!("  - local: tcp://{l}\n")).collect();
            let text = format!(
                "remote: tcp://127.0.0.1:{server_port}\nid: id1\nsecret: secret1\npid-file: {}\nservices:\n{services}",
                pid_file.display()
            );
            std::fs::write(&config, text).unwrap();
        };
        write_config(&[first]);
        let mut client = ferry()
            .args(["client", "--config", config.to_str().unwrap(), "--log-level", "warn"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
        let reachable = |line: String| line.rsplit(' ').next().unwrap().to_owned();
        let first_public = reachable(lines.next_line().await.unwrap().expect("first service"));
        let payload = random_bytes(64 * 1024);
        assert_eq!(echo_through(first_public.parse().unwrap(), &payload).await.unwrap(), payload);
        assert!(pid_file.exists());

        write_config(&[second]);
        let signal = |name: &'static str| {
            let config = config.clone();
            async move {
                let output = ferry().args(["client", "-s", name, "--config", config.to_str().unwrap()]).output();
                let output = output.await.unwrap();
                assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            }
        };
        signal("reload").await;
        let second_public = reachable(lines.next_line().await.unwrap().expect("the added service"));
        assert_eq!(echo_through(second_public.parse().unwrap(), &payload).await.unwrap(), payload);
        let mut removed = false;
        for _ in 0..200 {
            if TcpStream::connect(&first_public).await.is_err() {
                removed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(removed, "the service dropped from the config is still open");

        signal("stop").await;
        let status = tokio::time::timeout(Duration::from_secs(10), client.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{status:?}");
        assert!(!pid_file.exists(), "the pid file was left behind");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_sent_as_soon_as_the_pid_file_appears_does_not_kill_the_client() {
    within(60, async {
        let (_server, server_port) = spawn_server_process(&["--tcp-range", "1024-65535"]).await;
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("client.pid");
        let local = echo_server().await;
        let mut client = ferry()
            .args(["client", "--remote", &format!("tcp://127.0.0.1:{server_port}"), "--id", "id1"])
            .args(["--secret", "secret1", "--pid-file", pid_file.to_str().unwrap(), "--log-level", "warn"])
            .args(["--local", &format!("tcp://{local}"), "--local", &format!("tcp://{local}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = wait_for_pid_file(&pid_file).await;
        let target = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGHUP).unwrap();
        let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
        for _ in 0..2 {
            let line = lines.next_line().await.unwrap();
            assert!(line.is_some_and(|l| l.contains("is reachable at")), "the client died on SIGHUP");
        }
        assert!(client.try_wait().unwrap().is_none(), "the client exited after SIGHUP");
        nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), client.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{status:?}");
    })
    .await
}

/// `users` is one key with GT's two forms: the path of a users file (like `--users FILE`)
/// or the users themselves; `--users FILE` joins a config file's map and replaces its file.
#[test]
fn the_users_key_takes_a_users_file_or_the_users() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let users_file = write("users.yaml", "b: {secret: from-users-file, speed: 7}\n");
    let other_file = write("other.yaml", "c: {secret: from-other-file}\n");
    let file_key = format!("addr: 127.0.0.1:0\nusers: {}\n", users_file.display());
    let yaml = write("file.yaml", &file_key);
    let toml = write("file.toml", &format!("users = '{}'\n", users_file.display()));
    for config_file in [&yaml, &toml] {
        let config = resolve(ServerOptions::default(), Some(config_file)).unwrap().into_config().unwrap();
        assert_eq!(config.users.keys().collect::<Vec<_>>(), ["b"], "{}", config_file.display());
        assert_eq!(config.users["b"].speed, Some(7));
    }
    let flag = |path: &Path| ServerOptions {
        users: Some(ferry::config::options::UsersOption::file(path)),
        ..Default::default()
    };
    // A flag's file replaces the config file's file...
    let config = resolve(flag(&other_file), Some(&yaml)).unwrap().into_config().unwrap();
    assert_eq!(config.users.keys().collect::<Vec<_>>(), ["c"]);
    // ...and joins its map.
    let map = write("map.yaml", "users:\n  a: {secret: from-config}\n  b: {secret: from-config}\n");
    let config = resolve(flag(&users_file), Some(&map)).unwrap().into_config().unwrap();
    assert_eq!(config.users.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(config.users["b"].secret.expose(), "from-users-file", "the users file wins over the map");
    // The old name is gone, and a bad users file says which file.
    let old = write("old.yaml", &format!("users-file: {}\n", users_file.display()));
    let err = resolve(ServerOptions::default(), Some(&old)).unwrap_err().to_string();
    assert!(err.contains("users-file"), "{err}");
    let bad = write("bad.yaml", &format!("users: {}\n", write("broken.yaml", "b: {sekret: x}\n").display()));
    let err = resolve(ServerOptions::default(), Some(&bad)).unwrap().into_config().unwrap_err().to_string();
    assert!(err.contains("broken.yaml") && err.contains("sekret"), "{err}");
}

#[tokio::test]
async fn server_and_client_print_their_version() {
    for command in ["server", "client"] {
        let output = ferry().args([command, "--version"]).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{command} --version: {}", String::from_utf8_lossy(&output.stderr));
        assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{command} --version: {stdout}");
    }
}

/// Runs `ferry server` on a port that is taken, so it logs an error and exits at once;
/// `wrap` runs it (directly, or under a terminal); returns everything it printed.
async fn failing_server_output(wrap: impl FnOnce(&[String]) -> Command) -> String {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let args: Vec<String> =
        ["server", "--addr", &addr, "--id", "a", "--secret", "b"].map(String::from).into();
    let output = wrap(&args).output().await.unwrap();
    let printed =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(printed.contains("ERROR") && printed.contains(&addr), "{printed}");
    printed
}

/// `ferry ARGS` under a pseudo-terminal (util-linux `script`), so its stderr is a terminal.
fn on_a_terminal(args: &[String], no_color: Option<&str>) -> Command {
    let line = std::iter::once(env!("CARGO_BIN_EXE_ferry").to_owned())
        .chain(args.iter().cloned())
        .map(|word| format!("'{word}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut command = Command::new("script");
    command.args(["-q", "-e", "-c", &line, "/dev/null"]).kill_on_drop(true).stdin(Stdio::null());
    command.env_remove("NO_COLOR");
    if let Some(value) = no_color {
        command.env("NO_COLOR", value);
    }
    command
}

/// Colour only on a terminal, and never with NO_COLOR set.
#[tokio::test]
async fn logs_are_coloured_only_on_a_terminal_without_no_color() {
    within(30, async {
        let redirected = failing_server_output(|args| {
            let mut command = ferry();
            command.args(args).env_remove("NO_COLOR");
            command
        })
        .await;
        assert!(!redirected.contains('\x1b'), "colour codes in redirected stderr: {redirected:?}");
        let terminal = failing_server_output(|args| on_a_terminal(args, None)).await;
        assert!(terminal.contains("\x1b["), "no colour on a terminal: {terminal:?}");
        let no_color = failing_server_output(|args| on_a_terminal(args, Some("1"))).await;
        assert!(!no_color.contains('\x1b'), "colour codes with NO_COLOR set: {no_color:?}");
    })
    .await
}

/// Client-wide flags work after a `--local` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_flags_after_a_local_apply_to_the_client() {
    within(60, async {
        let (_server, server_port) = spawn_server_process(&["--tcp-range", "1024-65535"]).await;
        let echo = echo_server().await;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("client.log");
        let local = format!("tcp://{echo}");
        let log_text = log.to_string_lossy().into_owned();
        let remote = format!("tcp://127.0.0.1:{server_port}");
        let head = ["client", "--remote", &remote, "--id", "id1", "--secret", "secret1"];
        let service = ["--local", &local, "--log-level", "debug", "--log-file", &log_text];
        let mut client = ferry().args(head).args(service).stdout(Stdio::piped()).spawn().unwrap();
        let public = public_addr_of(&mut client).await;
        assert_eq!(echo_through(public.parse().unwrap(), b"flags").await.unwrap(), b"flags");
        let mut text = String::new();
        for _ in 0..500 {
            text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("DEBUG") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(text.contains("DEBUG"), "--log-level debug after --local was not applied: {text}");
        client.kill().await.unwrap();
    })
    .await
}
