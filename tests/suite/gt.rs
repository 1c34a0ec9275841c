//! GT's command lines and config files (tests/fixtures/gt/, from GT's README) run
//! unchanged: single-dash camelCase flags, camelCase keys, `options:` and `version:`.

use std::path::Path;
use std::process::Stdio;

use crate::cli::ferry;
use crate::common::*;
use ferry::cli::{parse_from, Command};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The fixture's command lines, each with the error text it must be refused with, if any.
fn command_lines() -> Vec<(String, Option<String>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gt/commands.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
    lines
        .map(|line| match line.split_once(" => ") {
            Some((command, refusal)) => (command.to_owned(), Some(refusal.to_owned())),
            None => (line.to_owned(), None),
        })
        .collect()
}

/// Splits a command line as a shell would, for the forms the fixtures use (`""`, `'...'`).
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let (mut word, mut quote, mut started) = (String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => (quote, started) = (Some(c), true),
            (None, ' ') if started || !word.is_empty() => {
                words.push(std::mem::take(&mut word));
                started = false;
            }
            (None, ' ') => {}
            (None, c) => word.push(c),
        }
    }
    if started || !word.is_empty() {
        words.push(word);
    }
    words
}

/// Parses one command line as `ferry` would and builds its configuration.
fn check(line: &str) -> Result<(), String> {
    let args = std::iter::once("ferry".to_owned()).chain(words(line));
    let cli = parse_from(args).map_err(|e| e.to_string())?;
    let result = match cli.command {
        Command::Server(flags) => {
            let config = flags.config.clone();
            ferry::config::options::resolve(flags, config.as_deref()).and_then(|o| o.into_config()).map(drop)
        }
        Command::Client(flags) => {
            let config = flags.config.clone();
            ferry::config::options::resolve(flags, config.as_deref()).and_then(|o| o.into_config()).map(drop)
        }
        Command::Demo(_) => Ok(()),
    };
    result.map_err(|e| e.to_string())
}

#[test]
fn every_gt_command_line_and_config_file_parses() {
    let lines = command_lines();
    assert!(lines.len() >= 20, "fixtures missing");
    for (line, refusal) in lines {
        match (check(&line), refusal) {
            (Ok(()), None) => {}
            (Err(err), Some(expected)) => assert!(err.contains(&expected), "{line}\n  said: {err}"),
            (Err(err), None) => panic!("{line}\n  refused: {err}"),
            (Ok(()), Some(expected)) => panic!("{line}\n  accepted, but should say: {expected}"),
        }
    }
}

#[test]
fn gt_config_files_mean_what_gt_says() {
    let load = |name: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gt").join(name);
        ferry::config::options::load_file::<ferry::config::options::ClientOptions>(&path).unwrap()
    };
    let client = load("client.yaml");
    assert_eq!(
        (client.remote.as_slice(), client.id.as_deref()),
        (&["tcp://127.0.0.1:8080".to_string()][..], Some("id1"))
    );
    let (_, services) = client.into_config().unwrap();
    assert_eq!(services.len(), 4);
    assert!(services[0].use_local_as_http_host && services[1].use_local_as_http_host);
    assert_eq!(services[1].host_prefix.as_deref(), Some("2"));
    assert_eq!(services[3].remote_tcp_port, Some(2223));
    let (_, services) = load("client-options.yaml").into_config().unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].local, "127.0.0.1:80");

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gt/server-tcp.yaml");
    let server = ferry::config::options::load_file::<ferry::config::options::ServerOptions>(&path).unwrap();
    let config = server.into_config().unwrap();
    assert_eq!((config.tcp_ranges.len(), config.tcp_number), (1, Some(1)));
    assert_eq!(config.tls_min_version, ferry::transport::TlsVersion::Tls13);
    assert_eq!(config.timeout, Some(std::time::Duration::from_millis(1234 * 60_000 + 1234)));
    // The users file (options.users) wins over the config file's users.
    assert!(config.users["id1"].tcp.is_some());
    assert_eq!(config.users.len(), 2);
}

/// Starts the fixture's server line and client line (first of each containing `server_part`
/// and `client_part`) with `replace` applied to both; returns the client's first printed
/// line (where its service is reachable) and the two processes.
async fn start_pair(
    server_part: &str,
    client_part: &str,
    replace: &[(String, String)],
) -> (String, [tokio::process::Child; 2]) {
    let lines = command_lines();
    let find = |start: &str, part: &str| {
        let found = lines.iter().find(|(l, _)| l.starts_with(start) && l.contains(part));
        let mut line = found.expect("a fixture line").0.clone();
        for (from, to) in replace {
            line = line.replace(from, to);
        }
        line
    };
    let server = ferry().args(words(&find("server", server_part))).stderr(Stdio::null()).spawn().unwrap();
    let mut client =
        ferry().args(words(&find("client", client_part))).stdout(Stdio::piped()).spawn().unwrap();
    // The client retries until the server listens, then prints where the service is.
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().expect("the client printed its address");
    (line, [server, client])
}

/// GT's TCP example, through the real binary, with its ports replaced by free ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gt_tcp_pair_forwards_bytes() {
    within(60, async {
        let (server_port, public_port, echo) = (free_port().await, free_port().await, echo_server().await);
        let replace = [
            ("-addr 8080".to_owned(), format!("-addr 127.0.0.1:{server_port}")),
            ("127.0.0.1:8080".to_owned(), format!("127.0.0.1:{server_port}")),
            ("tcp://127.0.0.1:22".to_owned(), format!("tcp://{echo}")),
            ("2222".to_owned(), public_port.to_string()),
        ];
        let (line, _processes) =
            start_pair("-tcpNumber 1 -tcpRange 1024-65535", "-remoteTCPPort 2222 -remoteTCPRandom", &replace)
                .await;
        let public = line.rsplit(' ').next().unwrap().to_owned();
        assert_eq!(public, format!("127.0.0.1:{public_port}"));
        let payload = random_bytes(256 * 1024);
        assert_eq!(echo_through(public.parse().unwrap(), &payload).await.unwrap(), payload);
    })
    .await
}

/// GT's first example, HTTP: visitors of the server's port with the host `id1.example.com`
/// reach the client's local web service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gt_http_pair_forwards_requests() {
    within(60, async {
        let (server_port, web) = (free_port().await, http::http_service("gt-web").await);
        let replace = [
            ("-addr 8080".to_owned(), format!("-addr 127.0.0.1:{server_port}")),
            ("127.0.0.1:8080".to_owned(), format!("127.0.0.1:{server_port}")),
            ("http://127.0.0.1:80 ".to_owned(), format!("http://{web} ")),
        ];
        let (_, _processes) = start_pair(
            "-addr 8080 -id id1 -secret secret1",
            "-local http://127.0.0.1:80 -remote tcp",
            &replace,
        )
        .await;
        let server = format!("127.0.0.1:{server_port}").parse().unwrap();
        let response = http::get(server, "/hello", "id1.example.com:8080").await;
        assert_eq!(response.status, 200);
        assert!(response.text().starts_with("service=gt-web path=/hello"), "{}", response.text());
    })
    .await
}

/// A self-signed certificate for `id1.example.test` and its key, written to `dir`.
fn id1_certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["id1.example.test".to_string()]).unwrap();
    let (cert, key) = (dir.join("id1.crt"), dir.join("id1.key"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// An HTTPS request for `id1.example.test` to 127.0.0.1:`port`, trusting only `cert`.
async fn https_get(port: u16, cert: &Path, path: &str) -> http::Response {
    let trust = ferry::transport::client_tls_config(&ferry::RemoteTrust::CaFile(cert.to_owned())).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("id1.example.test").unwrap();
    let mut visitor = tokio_rustls::TlsConnector::from(trust).connect(name, tcp).await.unwrap();
    http::request(&mut visitor, "GET", path, "id1.example.test", "", b"").await
}

/// GT's HTTPS example: `-addr ""` turns the plain listener off, the server ends TLS on
/// `-tlsAddr`, and the client reaches it there with `-remoteCertInsecure`; an HTTPS visitor
/// for `id1.example.test` gets the client's local web service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gt_https_pair_with_no_plain_listener() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = id1_certificate(dir.path());
        let (tls_port, web) = (free_port().await, http::http_service("gt-secure").await);
        let replace = [
            ("-tlsAddr 443".to_owned(), format!("-tlsAddr 127.0.0.1:{tls_port}")),
            ("tests/fixtures/gt/tls.crt".to_owned(), cert.display().to_string()),
            ("tests/fixtures/gt/tls.key".to_owned(), key.display().to_string()),
            ("tls://127.0.0.1 ".to_owned(), format!("tls://127.0.0.1:{tls_port} ")),
            ("http://127.0.0.1 ".to_owned(), format!("http://{web} ")),
        ];
        let (_, _processes) =
            start_pair("-addr \"\" -tlsAddr 443", "-local http://127.0.0.1 -remote tls", &replace).await;
        let response = https_get(tls_port, &cert, "/secure").await;
        assert_eq!(response.status, 200);
        assert!(response.text().starts_with("service=gt-secure path=/secure"), "{}", response.text());
    })
    .await
}

/// GT's SNI example: `-addr "" -sniAddr 443`, and the client reaches the server on that same
/// port (`-remote tcp://...:443`); a TLS visitor for `id1.example.test` there is passed
/// through, untouched, to the client's local HTTPS service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gt_sni_pair_shares_the_port_with_its_client() {
    within(60, async {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = id1_certificate(dir.path());
        let acceptor =
            ferry::transport::server_tls_acceptor(&[(cert.clone(), key)], Default::default()).unwrap();
        let local = tls_service(acceptor, |mut tls| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut request = [0u8; 1024];
            let _ = tls.read(&mut request).await;
            let body = "end to end through the SNI port";
            let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
            let _ = tls.write_all(reply.as_bytes()).await;
            let _ = tls.shutdown().await;
        })
        .await;
        let sni_port = free_port().await;
        let replace = [
            ("-sniAddr 443".to_owned(), format!("-sniAddr 127.0.0.1:{sni_port}")),
            ("tcp://127.0.0.1:443".to_owned(), format!("tcp://127.0.0.1:{sni_port}")),
            ("https://127.0.0.1 ".to_owned(), format!("https://{local} ")),
        ];
        let (_, _processes) =
            start_pair("-addr \"\" -sniAddr 443", "-local https://127.0.0.1 -remote", &replace).await;
        let response = https_get(sni_port, &cert, "/").await;
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), "end to end through the SNI port");
    })
    .await
}

/// GT's `-apiTLSVersion` sets the oldest TLS version of the API.
#[test]
fn gt_api_tls_version_sets_the_apis_oldest_tls() {
    let line = "server -addr 8080 -id id1 -secret secret1 -apiAddr 127.0.0.1:8081 -apiTLSVersion tls1.3";
    let cli = parse_from(std::iter::once("ferry".to_owned()).chain(words(line))).unwrap();
    let Command::Server(flags) = cli.command else { panic!("a server line") };
    let config = ferry::config::options::resolve(flags, None).and_then(|o| o.into_config()).unwrap();
    assert_eq!(config.api_tls_min_version, ferry::transport::TlsVersion::Tls13);
}
