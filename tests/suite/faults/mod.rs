//! Faults between real processes: the server and the client run in two network namespaces
//! joined through a router namespace that can cut, delay, reorder and drop their packets
//! (see `common::link`). Visitors connect from inside the server's namespace, local
//! services listen inside the client's.

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::link::{Link, SERVER_IP};
pub(crate) use crate::common::netns::NsProcess;

mod conditions;
mod descriptors;
mod harness;
mod impaired;
mod p2p;
mod partition;
mod restarts;
mod transports;

/// The server's port for clients, in its namespace.
const CONTROL_PORT: u16 = 7000;
/// The public port the client's TCP service asks for.
const PUBLIC_PORT: u16 = 20000;
/// Where the client's echo service listens, in its namespace.
const ECHO: &str = "127.0.0.1:9000";

/// A new topology, or `None` when namespace tests are skipped (`FERRY_SKIP_NETNS=1`).
fn topology(test: &str) -> Option<Link> {
    crate::common::netns::available(test).then(Link::new)
}

/// The `ferry` binary to run: `FERRY_BIN` (a release build, for benchmarks) or the one
/// cargo built for the tests.
fn ferry_bin() -> String {
    std::env::var("FERRY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferry").to_owned())
}

/// Starts `ferry server` in the server namespace and waits until it listens for clients.
async fn start_server(link: &Link, extra: &[&str]) -> NsProcess {
    start_server_under(link, &[], extra).await
}

/// [`start_server`] through a wrapper program that execs it, e.g. `prlimit --nofile=256 --`.
async fn start_server_under(link: &Link, wrapper: &[&str], extra: &[&str]) -> NsProcess {
    let addr = format!("{SERVER_IP}:{CONTROL_PORT}");
    let ferry = ferry_bin();
    let mut command = link.server.command(wrapper.first().unwrap_or(&ferry.as_str()));
    if !wrapper.is_empty() {
        command.args(&wrapper[1..]).arg(ferry);
    }
    command.args(["server", "--addr", &addr, "--id", "id1", "--secret", "secret1", "--log-level", "info"]);
    command.args(["--tcp-range", "1024-65535"]).args(extra);
    let mut server = NsProcess::spawn(command);
    server.line("listener=\"addr\"", 0, Duration::from_secs(10)).await;
    server
}

/// Starts `ferry client` in the client namespace with a TCP service on [`PUBLIC_PORT`]
/// (to the echo service at [`ECHO`]) and waits until that service is reachable.
async fn start_client(link: &Link, extra: &[&str]) -> NsProcess {
    start_client_on(link, PUBLIC_PORT, extra).await
}

/// `ferry client` in `ns`, logging in to `remote` as `id` ("idN", whose secret is
/// "secretN") and logging at info.
fn client_command(ns: &crate::common::netns::Netns, remote: &str, id: &str) -> tokio::process::Command {
    let secret = format!("secret{}", id.trim_start_matches("id"));
    let mut command = ns.command(&ferry_bin());
    command.args(["client", "--remote", remote, "--id", id, "--secret", &secret, "--log-level", "info"]);
    command
}

/// [`start_client`] with the TCP service on `port`.
async fn start_client_on(link: &Link, port: u16, extra: &[&str]) -> NsProcess {
    let remote = format!("tcp://{SERVER_IP}:{CONTROL_PORT}");
    let mut command = client_command(&link.client, &remote, "id1");
    command.args(extra).args(["--local", ECHO, "--remote-tcp-port", &port.to_string()]);
    let mut client = NsProcess::spawn(command);
    client.line("is reachable at", 0, Duration::from_secs(10)).await;
    client
}

/// The echo service in the client namespace.
fn start_echo(link: &Link) -> Arc<AtomicUsize> {
    crate::common::serve_echo(link.client.listen(ECHO))
}

/// One echo round trip through the public port from the server namespace.
async fn echo_once(link: &Link, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let visitor = link.server.connect(Link::server_addr(PUBLIC_PORT)).await?;
    crate::common::echo_over(visitor, payload).await
}

/// Polls `probe` until it is true; returns how long that took. Panics after `limit`.
async fn until<F: Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> Duration {
    let start = Instant::now();
    while !probe().await {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Sends `len` random bytes from `ns` to the hashing sink at `to`; how long until the
/// sink's SHA-256 of them came back (and matched).
async fn bulk_to_sink(ns: &crate::common::netns::Netns, to: std::net::SocketAddr, len: usize) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let payload = crate::common::random_bytes(len);
    let started = Instant::now();
    let mut visitor = ns.connect(to).await.expect("visitor connects");
    visitor.write_all(&payload).await.unwrap();
    visitor.shutdown().await.unwrap();
    let mut digest = [0u8; 32];
    visitor.read_exact(&mut digest).await.expect("the sink answers");
    assert_eq!(digest, crate::common::sha256(&payload), "every byte arrived");
    started.elapsed()
}

/// Whether a visitor is refused at once: nothing listens on the public port.
async fn refused(link: &Link) -> bool {
    let connect = link.server.connect(Link::server_addr(PUBLIC_PORT));
    matches!(tokio::time::timeout(Duration::from_secs(1), connect).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}
