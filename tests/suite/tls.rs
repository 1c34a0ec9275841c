//! TLS between client and server, with a certificate made in the test.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use ferry::{Client, LoginRefusal, RemoteAddr, RemoteTrust, ServiceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) struct Certs {
    _dir: tempfile::TempDir,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

pub(crate) fn make_certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    Certs { _dir: dir, cert, key }
}

pub(crate) async fn tls_server(certs: &Certs) -> ferry::ServerHandle {
    let mut config = server_config();
    config.tls_addr = Some("127.0.0.1:0".parse().unwrap());
    config.cert_file = vec![certs.cert.clone()];
    config.key_file = vec![certs.key.clone()];
    start_server(config).await
}

pub(crate) fn tls_client_config(server: &ferry::ServerHandle, trust: RemoteTrust) -> ferry::ClientConfig {
    let port = server.tls_local_addr().unwrap().port();
    let mut config = client_config(server.local_addr(), "id1", "secret1");
    config.remote = RemoteAddr::parse(&format!("tls://localhost:{port}")).unwrap();
    config.remote_trust = trust;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_over_tls_with_a_pinned_ca() {
    within(60, async {
        let certs = make_certs();
        let server = tls_server(&certs).await;
        let client = Client::connect(tls_client_config(&server, RemoteTrust::CaFile(certs.cert.clone())))
            .await
            .unwrap();
        assert_tcp_tunnel_carries(&client, 8 << 20).await;
    })
    .await
}

#[tokio::test]
async fn insecure_mode_accepts_any_certificate() {
    within(30, async {
        let certs = make_certs();
        let server = tls_server(&certs).await;
        let client = Client::connect(tls_client_config(&server, RemoteTrust::Insecure)).await.unwrap();
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public = format!("127.0.0.1:{}", tunnel.remote_port()).parse().unwrap();
        assert_eq!(echo_through(public, b"tls").await.unwrap(), b"tls");
    })
    .await
}

#[tokio::test]
async fn untrusted_certificate_is_refused() {
    within(30, async {
        let certs = make_certs();
        let other = make_certs();
        let server = tls_server(&certs).await;
        let err = Client::connect(tls_client_config(&server, RemoteTrust::CaFile(other.cert.clone())))
            .await
            .expect_err("a certificate from another CA must be refused");
        assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
        // Nor does the system's trust (rustls-platform-verifier) take a private CA's
        // certificate, and the error is final.
        let err = Client::connect(tls_client_config(&server, RemoteTrust::System))
            .await
            .expect_err("the system's roots do not hold the test CA");
        assert!(err.to_string().to_lowercase().contains("certificate") && err.is_fatal(), "{err}");
    })
    .await
}

#[tokio::test]
async fn plain_client_on_the_tls_port_fails_cleanly() {
    within(30, async {
        let certs = make_certs();
        let server = tls_server(&certs).await;
        let mut config = client_config(server.tls_local_addr().unwrap(), "id1", "secret1");
        config.remote_timeout = Duration::from_secs(3);
        assert!(Client::connect(config).await.is_err());
        // The server still serves TLS clients.
        Client::connect(tls_client_config(&server, RemoteTrust::Insecure)).await.unwrap().shutdown().await;
    })
    .await
}

/// A real ClientHello for `localhost`.
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = "localhost".try_into().unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// What the server sends back to a ClientHello from `source`, until it closes or 64 bytes.
async fn answer_to_client_hello(source: &str, server: std::net::SocketAddr) -> Vec<u8> {
    let mut stream = raw::connect_from(source, server).await;
    stream.write_all(&client_hello()).await.unwrap();
    let mut got = vec![0u8; 64];
    let mut len = 0;
    while len < got.len() {
        match stream.read(&mut got[len..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    got.truncate(len);
    got
}

/// On the TLS port a banned address is closed before the TLS handshake: not one byte of
/// a ServerHello comes back.
#[tokio::test]
async fn a_banned_address_gets_no_tls_handshake() {
    within(30, async {
        let certs = make_certs();
        let mut config = server_config();
        config.tls_addr = Some("127.0.0.1:0".parse().unwrap());
        config.cert_file = vec![certs.cert.clone()];
        config.key_file = vec![certs.key.clone()];
        config.reconnect_times = 1;
        config.reconnect_duration = Duration::from_secs(60);
        // A server that held the banned connection open would time the test out, not pass it.
        config.handshake_timeout = Duration::from_secs(60);
        let server = start_server(config).await;
        let tls = server.tls_local_addr().unwrap();
        assert!(!answer_to_client_hello("127.0.0.71", tls).await.is_empty(), "no ServerHello before the ban");

        let stream = raw::connect_from("127.0.0.71", server.local_addr()).await;
        let refusal = raw::login_by_hand(stream, "id1", "wrong", "t").await.err();
        assert!(matches!(refusal, Some(LoginRefusal::AuthFailed { .. })), "{refusal:?}");
        let answer = answer_to_client_hello("127.0.0.71", tls).await;
        assert!(answer.is_empty(), "a banned address got {} bytes of TLS handshake", answer.len());
        // Other addresses still get theirs.
        assert!(!answer_to_client_hello("127.0.0.72", tls).await.is_empty());
    })
    .await
}

/// Writes `cert` and `key` as PEM files in a fresh directory.
fn write_pair(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> Certs {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Certs { _dir: dir, cert: cert_path, key: key_path }
}

/// A certificate as `openssl req -x509 -newkey ec -nodes -subj /CN=localhost` makes it:
/// self-signed, a common name and no other name, and `basicConstraints CA:TRUE`.
fn openssl_style_self_signed() -> Certs {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    write_pair(&cert, &key)
}

/// `--remote-cert` with a plain self-signed certificate (marked as a CA, as openssl does)
/// pins exactly that certificate: the tunnel works, another such certificate is refused
/// with a sentence, and a file holding a CA still verifies a chain signed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_cert_pins_a_self_signed_certificate_and_still_checks_ca_chains() {
    within(60, async {
        let certs = openssl_style_self_signed();
        let server = tls_server(&certs).await;
        let client = Client::connect(tls_client_config(&server, RemoteTrust::CaFile(certs.cert.clone())))
            .await
            .expect("the pinned self-signed certificate is accepted");
        let echo = echo_server().await;
        let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let public = format!("127.0.0.1:{}", tunnel.remote_port()).parse().unwrap();
        assert_eq!(echo_through(public, b"pinned").await.unwrap(), b"pinned");
        client.shutdown().await;

        let stranger = openssl_style_self_signed();
        let err = Client::connect(tls_client_config(&server, RemoteTrust::CaFile(stranger.cert.clone())))
            .await
            .expect_err("another self-signed certificate");
        let message = err.to_string();
        assert!(message.contains("the server's certificate is a CA certificate"), "{message}");
        assert!(!message.contains("Other(") && !message.contains("Error("), "a debug dump: {message}");

        // A CA in the file, and a server certificate signed by it: the chain is checked.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let ca_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(ca_file.path(), ca.pem()).unwrap();
        let leaf_for = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            write_pair(&params.signed_by(&key, &ca).unwrap(), &key)
        };
        let chained = tls_server(&leaf_for("localhost")).await;
        let trust = RemoteTrust::CaFile(ca_file.path().to_owned());
        Client::connect(tls_client_config(&chained, trust.clone()))
            .await
            .expect("a chain to the CA")
            .shutdown()
            .await;
        let misnamed = tls_server(&leaf_for("elsewhere.example")).await;
        let err = Client::connect(tls_client_config(&misnamed, trust)).await.expect_err("the wrong name");
        assert!(err.to_string().contains("not valid for the name 'localhost'"), "{err}");
    })
    .await
}

/// A `tls://` client dialling a port that does not speak TLS is told so in words.
#[tokio::test]
async fn tls_to_a_plain_port_says_so() {
    within(30, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
            }
        });
        let mut config = client_config(([127, 0, 0, 1], port).into(), "id1", "secret1");
        config.remote = RemoteAddr::parse(&format!("tls://localhost:{port}")).unwrap();
        config.remote_trust = RemoteTrust::Insecure;
        config.remote_timeout = Duration::from_secs(5);
        let err = Client::connect(config).await.expect_err("no TLS there");
        assert!(err.to_string().contains("did not answer in TLS"), "{err}");
    })
    .await
}
