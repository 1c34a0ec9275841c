//! WebSocket through host routing, HTTPS terminated at the server, PROXY protocol headers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::common::http::{http_service, request};
use crate::common::*;
use ferry::proto::ProxyProtocol;
use ferry::transport::{client_tls_config, RemoteTrust};
use ferry::{ServerHandle, ServiceConfig};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket service that echoes every message.
async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_close() || socket.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn websocket_round_trips<S: AsyncRead + AsyncWrite + Unpin>(stream: S, url: &str) {
    let (mut socket, response) = tokio_tungstenite::client_async(url, stream).await.expect("upgrade");
    assert_eq!(response.status(), 101);
    for i in 0..20 {
        let text = format!("message {i} {}", "x".repeat(i * 500));
        socket.send(Message::text(text.clone())).await.unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let blob = random_bytes(300_000);
    socket.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap().into_data().as_ref(), &blob[..]);
    socket.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_through_host_routing() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let ws = websocket_echo().await;
        let _ =
            client.add_service(ServiceConfig::http(&ws.to_string()).with_host_prefix("chat")).await.unwrap();
        let stream = TcpStream::connect(server.local_addr()).await.unwrap();
        websocket_round_trips(stream, "ws://chat.example.com/socket").await;
    })
    .await
}

struct Certs {
    _dir: tempfile::TempDir,
    cert: PathBuf,
}

/// A TLS server for `*.example.test` with a certificate made here.
async fn tls_server() -> (ServerHandle, Certs) {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["*.example.test".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let mut config = server_config();
    config.tls_addr = Some("127.0.0.1:0".parse().unwrap());
    config.cert_file = vec![cert.clone()];
    config.key_file = vec![key];
    (start_server(config).await, Certs { _dir: dir, cert })
}

async fn https_visitor(
    server: &ServerHandle,
    certs: &Certs,
    host: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = client_tls_config(&RemoteTrust::CaFile(certs.cert.clone())).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&config));
    let tcp = TcpStream::connect(server.tls_local_addr().unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
    connector.connect(name, tcp).await.expect("tls handshake with the server's certificate")
}

#[tokio::test]
async fn https_terminated_at_the_server() {
    within(30, async {
        let (server, certs) = tls_server().await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let _ =
            client.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        let mut visitor = https_visitor(&server, &certs, "web.example.test").await;
        for i in 0..3 {
            let response = request(&mut visitor, "GET", &format!("/s{i}"), "web.example.test", "", b"").await;
            assert_eq!(response.status, 200);
            let text = response.text();
            assert!(text.starts_with(&format!("service=a path=/s{i}")), "{text}");
            if i == 0 {
                assert!(text.contains("proto=https"), "{text}");
            }
        }
        let upload = random_bytes(5 << 20);
        let response = request(&mut visitor, "PUT", "/upload", "web.example.test", "", &upload).await;
        assert_eq!(
            response.text(),
            crate::common::http::hex(&<sha2::Sha256 as sha2::Digest>::digest(&upload))
        );
    })
    .await
}

#[tokio::test]
async fn websocket_through_tls_termination() {
    within(30, async {
        let (server, certs) = tls_server().await;
        let client = connect(server.local_addr()).await;
        let ws = websocket_echo().await;
        let _ =
            client.add_service(ServiceConfig::http(&ws.to_string()).with_host_prefix("chat")).await.unwrap();
        let stream = https_visitor(&server, &certs, "chat.example.test").await;
        websocket_round_trips(stream, "wss://chat.example.test/socket").await;
    })
    .await
}

/// A TCP service that parses a PROXY header, answers with the source it announced, then echoes.
async fn proxy_aware_service(version: ProxyProtocol) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let source = match version {
                    ProxyProtocol::V1 => read_v1(&mut stream).await,
                    ProxyProtocol::V2 => read_v2(&mut stream).await,
                };
                stream.write_all(format!("{source}\n").as_bytes()).await.unwrap();
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn read_v1(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    while !line.ends_with(b"\r\n") {
        line.push(stream.read_u8().await.unwrap());
    }
    let line = String::from_utf8(line).unwrap();
    let parts: Vec<&str> = line.trim_end().split(' ').collect();
    assert_eq!((parts[0], parts[1]), ("PROXY", "TCP4"), "{line}");
    format!("{}:{}", parts[2], parts[4])
}

async fn read_v2(stream: &mut TcpStream) -> String {
    let mut fixed = [0u8; 16];
    stream.read_exact(&mut fixed).await.unwrap();
    assert_eq!(&fixed[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!((fixed[12], fixed[13]), (0x21, 0x11));
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut addresses = vec![0u8; len];
    stream.read_exact(&mut addresses).await.unwrap();
    let ip = std::net::Ipv4Addr::new(addresses[0], addresses[1], addresses[2], addresses[3]);
    format!("{ip}:{}", u16::from_be_bytes([addresses[8], addresses[9]]))
}

#[tokio::test]
async fn proxy_protocol_tells_the_visitor_address() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let service = proxy_aware_service(version).await;
            let config = ServiceConfig::tcp(&service.to_string()).with_proxy_protocol(version);
            let tunnel = client.add_service(config).await.unwrap();
            let mut visitor = TcpStream::connect(tunnel.public_addr()).await.unwrap();
            let me = visitor.local_addr().unwrap();
            visitor.write_all(b"after the header").await.unwrap();
            visitor.shutdown().await.unwrap();
            let mut reply = String::new();
            visitor.read_to_string(&mut reply).await.unwrap();
            assert_eq!(reply, format!("{me}\nafter the header"), "{version:?}");
        }
    })
    .await
}

/// A local TLS echo service with its own certificate for `secure.example.test`.
pub(crate) async fn local_tls_echo(dir: &std::path::Path) -> (SocketAddr, PathBuf) {
    let (acceptor, cert) = self_signed_acceptor(dir);
    let addr = tls_service(acceptor, |tls| async move {
        let (mut r, mut w) = tokio::io::split(tls);
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await;
    (addr, cert)
}

/// A server with `sni-addr`, a client, and a local TLS echo service passed through as
/// `secure`; returns them with the local service's certificate.
async fn passthrough_to_local_echo(
    dir: &std::path::Path,
) -> (ServerHandle, ferry::Client, ferry::Registration, PathBuf) {
    let mut config = server_config();
    config.sni_addr = Some("127.0.0.1:0".parse().unwrap());
    let server = start_server(config).await;
    let client = connect(server.local_addr()).await;
    let (local, local_cert) = local_tls_echo(dir).await;
    let https = ServiceConfig::https(&local.to_string()).with_host_prefix("secure");
    let tunnel = client.add_service(https).await.unwrap();
    (server, client, tunnel, local_cert)
}

#[tokio::test]
async fn tls_passed_through_by_server_name() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let (server, _client, tunnel, local_cert) = passthrough_to_local_echo(dir.path()).await;
        assert_eq!(tunnel.public_addr(), "https://secure");

        // The visitor trusts only the local service's certificate: the handshake succeeding
        // proves the server passed the encrypted bytes through without terminating them.
        let trust = client_tls_config(&RemoteTrust::CaFile(local_cert)).unwrap();
        let connector = tokio_rustls::TlsConnector::from(trust);
        let sni = server.sni_local_addr().unwrap();
        let tcp = TcpStream::connect(sni).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("secure.example.test").unwrap();
        let mut tls = connector.connect(name, tcp).await.expect("handshake with the local service");
        let payload = random_bytes(2 << 20);
        let (mut r, mut w) = tokio::io::split(&mut tls);
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.flush().await.unwrap();
        };
        let mut back = vec![0u8; payload.len()];
        let receive = r.read_exact(&mut back);
        let ((), got) = tokio::join!(send, receive);
        got.unwrap();
        assert_eq!(sha256(&back), sha256(&payload));

        // An unknown server name is closed without an answer.
        let tcp = TcpStream::connect(sni).await.unwrap();
        let config = client_tls_config(&RemoteTrust::Insecure).unwrap();
        let name = rustls_pki_types::ServerName::try_from("nobody.example.test").unwrap();
        assert!(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.is_err());
    })
    .await
}

/// A visitor's stream that sends its first TLS record (the ClientHello) as two records,
/// split in the middle of the handshake message, as some TLS stacks and middleboxes do.
struct SplitFirstRecord {
    inner: TcpStream,
    /// The rewritten first write still to send, and the length reported for it.
    pending: Option<(Vec<u8>, usize)>,
    split: bool,
}

impl SplitFirstRecord {
    fn rewrite(buf: &[u8]) -> Vec<u8> {
        let record_len = 5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
        assert!(buf[0] == 0x16 && buf.len() >= record_len, "the first write is a whole handshake record");
        let message = &buf[5..record_len];
        let mut out = Vec::new();
        for part in [&message[..message.len() / 2], &message[message.len() / 2..]] {
            out.extend_from_slice(&buf[..3]);
            out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&buf[record_len..]);
        out
    }
}

impl AsyncRead for SplitFirstRecord {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SplitFirstRecord {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if !std::mem::replace(&mut self.split, true) {
            self.pending = Some((Self::rewrite(buf), buf.len()));
        }
        let this = &mut *self;
        let Some((pending, reported)) = this.pending.as_mut() else {
            return std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while !pending.is_empty() {
            let written = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_write(cx, pending))?;
            pending.drain(..written);
        }
        let reported = *reported;
        this.pending = None;
        std::task::Poll::Ready(Ok(reported))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_client_hello_split_over_two_records_is_routed_and_passed_through() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let (server, _client, _tunnel, local_cert) = passthrough_to_local_echo(dir.path()).await;

        let connector =
            tokio_rustls::TlsConnector::from(client_tls_config(&RemoteTrust::CaFile(local_cert)).unwrap());
        let tcp = TcpStream::connect(server.sni_local_addr().unwrap()).await.unwrap();
        let split = SplitFirstRecord { inner: tcp, pending: None, split: false };
        let name = rustls_pki_types::ServerName::try_from("secure.example.test").unwrap();
        let mut tls = connector.connect(name, split).await.expect("handshake with the local service");
        tls.write_all(b"split hello").await.unwrap();
        let mut back = [0u8; 11];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"split hello");
    })
    .await
}

fn cert_pair(dir: &std::path::Path, name: &str, san: &str) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec![san.to_string()]).unwrap();
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[tokio::test]
async fn certificates_chosen_by_server_name_and_minimum_version() {
    within(30, async {
        let dir = tempfile::tempdir().unwrap();
        let (alpha_cert, alpha_key) = cert_pair(dir.path(), "alpha", "*.alpha.test");
        let (beta_cert, beta_key) = cert_pair(dir.path(), "beta", "*.beta.test");
        let mut config = server_config();
        config.tls_addr = Some("127.0.0.1:0".parse().unwrap());
        config.cert_file = vec![alpha_cert.clone(), beta_cert.clone()];
        config.key_file = vec![alpha_key, beta_key];
        config.tls_min_version = ferry::transport::TlsVersion::Tls13;
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let a = http_service("a").await;
        let _ =
            client.add_service(ServiceConfig::http(&a.to_string()).with_host_prefix("web")).await.unwrap();
        let tls_addr = server.tls_local_addr().unwrap();
        // Each name gets the certificate made for it: trusting only that one is enough.
        for (host, cert) in [("web.alpha.test", &alpha_cert), ("web.beta.test", &beta_cert)] {
            let trust = client_tls_config(&RemoteTrust::CaFile(cert.clone())).unwrap();
            let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
            let tcp = TcpStream::connect(tls_addr).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(trust).connect(name, tcp).await.expect(host);
            let response = request(&mut tls, "GET", "/", host, "", b"").await;
            assert!(response.text().starts_with("service=a"), "{host}: {}", response.text());
        }
        // A TLS 1.2-only visitor is refused by a tls1.3 minimum.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let old = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                let pem = std::fs::read(&alpha_cert).unwrap();
                for cert in rustls_pemfile_certs(&pem) {
                    roots.add(cert).unwrap();
                }
                roots
            })
            .with_no_client_auth();
        let tcp = TcpStream::connect(tls_addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("web.alpha.test").unwrap();
        assert!(tokio_rustls::TlsConnector::from(Arc::new(old)).connect(name, tcp).await.is_err());
    })
    .await
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem).map(|c| c.unwrap()).collect()
}
