//! Shared helpers: real servers, clients and local services on loopback.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use ferry::{Client, ClientConfig, RemoteAddr, Server, ServerConfig, ServerHandle, ServiceConfig};
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Fails the test instead of hanging it.
pub async fn within<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut).await.expect("test timed out")
}

/// Checks `check` every 10 ms until it holds, for at most 4 s; whether it did.
pub async fn poll_until<F, Fut>(mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..400 {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A server config on 127.0.0.1:0 with user id1/secret1 and TCP ports 1024-65535.
pub fn server_config() -> ServerConfig {
    let mut config = ServerConfig::default().with_user("id1", "secret1");
    config.addr = Some("127.0.0.1:0".parse().unwrap());
    config.tcp_ranges = vec!["1024-65535".parse().unwrap()];
    config
}

pub async fn start_server(config: ServerConfig) -> ServerHandle {
    Server::bind(config).await.expect("server binds").spawn()
}

/// A client config with fast reconnects, for tests.
pub fn client_config(server: SocketAddr, id: &str, secret: &str) -> ClientConfig {
    let mut config = ClientConfig::new(RemoteAddr::parse(&server.to_string()).unwrap(), id, secret);
    config.reconnect_delay = Duration::from_millis(50);
    config.max_reconnect_delay = Duration::from_millis(400);
    config.remote_idle_connections = 4;
    config
}

pub async fn connect(server: SocketAddr) -> Client {
    Client::connect(client_config(server, "id1", "secret1")).await.expect("client connects")
}

/// A server, a client and an echo service tunnelled through them.
pub struct Tunnel {
    pub server: ServerHandle,
    pub client: Client,
    pub registration: ferry::Registration,
    pub public: SocketAddr,
}

/// `len` random bytes through a new TCP tunnel of `client` to an echo service, checked by hash.
pub async fn assert_tcp_tunnel_carries(client: &Client, len: usize) {
    let echo = echo_server().await;
    let tunnel = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
    let public = format!("127.0.0.1:{}", tunnel.remote_port()).parse().unwrap();
    let payload = random_bytes(len);
    assert_eq!(sha256(&echo_through(public, &payload).await.unwrap()), sha256(&payload));
}

pub async fn echo_tunnel() -> Tunnel {
    let server = start_server(server_config()).await;
    let client = connect(server.local_addr()).await;
    let echo = echo_server().await;
    let registration = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.expect("tunnel opens");
    let public = registration.public_addr().parse().unwrap();
    Tunnel { server, client, registration, public }
}

/// An echo service: copies what it reads back, then shuts its write side at EOF.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _ = serve_echo(listener);
    addr
}

/// Serves echo (as [`echo_server`]) on `listener`, in the background; returns how many of
/// its connections are open at any moment.
pub fn serve_echo(listener: TcpListener) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::Ordering::Relaxed;
    let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            counter.fetch_add(1, Relaxed);
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.into_split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
                counter.fetch_sub(1, Relaxed);
            });
        }
    });
    open
}

/// A local service that reads what arrives, sends `first` and 64 KiB more, then dies
/// with a reset (as a crashed process with unread data does).
pub async fn dying_service(first: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let _ = stream.write_all(first).await;
                let _ = stream.write_all(&random_bytes(64 * 1024)).await;
                let _ = stream.set_zero_linger();
            });
        }
    });
    addr
}

/// Connects, sends `request` and reads until the end; the error if it did not end cleanly.
pub async fn send_and_read_to_end(
    addr: impl tokio::net::ToSocketAddrs,
    request: &[u8],
) -> std::io::Result<Vec<u8>> {
    let mut visitor = TcpStream::connect(addr).await?;
    visitor.write_all(request).await?;
    let mut got = Vec::new();
    visitor.read_to_end(&mut got).await?;
    Ok(got)
}

/// Sends `payload`, half-closes, reads everything back; returns what came back.
pub async fn echo_through(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    echo_over(TcpStream::connect(addr).await?, payload).await
}

/// [`echo_through`] on a connected stream.
pub async fn echo_over(stream: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let (mut reader, mut writer) = stream.into_split();
    let payload = payload.to_vec();
    let send = tokio::spawn(async move {
        writer.write_all(&payload).await?;
        writer.shutdown().await
    });
    let mut received = Vec::new();
    reader.read_to_end(&mut received).await?;
    send.await.expect("sender task")?;
    Ok(received)
}

/// Retries an echo round trip until it works (readiness after reconnects), bounded.
pub async fn wait_until_echo(addr: SocketAddr) {
    let probe = b"ping".to_vec();
    for _ in 0..200 {
        if let Ok(Ok(got)) = tokio::time::timeout(Duration::from_secs(2), echo_through(addr, &probe)).await {
            if got == probe {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("tunnel at {addr} never echoed");
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A port that was free a moment ago.
pub async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port()
}

/// Logs in by hand from `source` (any 127.0.0.0/8 address); `Ok` on welcome.
pub async fn login_from(
    source: &str,
    server: SocketAddr,
    id: &str,
    secret: &str,
) -> Result<(), ferry::LoginRefusal> {
    let stream = raw::connect_from(source, server).await;
    raw::login_by_hand(stream, id, secret, "test").await.map(drop)
}

pub mod http;

/// A TLS acceptor with a fresh self-signed certificate for `secure.example.test`, written
/// to `dir`; returns it and the certificate's path (for visitors that trust only it).
pub fn self_signed_acceptor(dir: &std::path::Path) -> (tokio_rustls::TlsAcceptor, std::path::PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["secure.example.test".to_string()]).unwrap();
    let cert = dir.join("local-cert.pem");
    let key = dir.join("local-key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let acceptor = ferry::transport::server_tls_acceptor(&[(cert.clone(), key)], Default::default()).unwrap();
    (acceptor, cert)
}

/// A local TLS service on 127.0.0.1 that runs `serve` on each visitor after the handshake.
pub async fn tls_service<F, Fut>(acceptor: tokio_rustls::TlsAcceptor, serve: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

pub mod etcd;
pub mod raw;
pub mod services;

pub mod link;
pub mod nat;
pub mod netns;
