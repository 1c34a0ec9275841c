//! Handshake floods: thousands of connections from one host that send the preamble and
//! stop fill that host's share of the handshake budget, and no one else's.

use std::time::Duration;

use crate::common::*;
use ferry::proto::{preamble, LinkKind};
use ferry::Client;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// More connections than the whole first-stage budget (4096), as in the field report.
const FLOOD: usize = 4300;

/// Raises this process's open-file limit to at least `wanted` (up to the hard limit).
pub(crate) fn raise_open_files(wanted: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < wanted {
        setrlimit(Resource::RLIMIT_NOFILE, wanted.min(hard), hard).unwrap();
    }
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(soft >= wanted, "this test needs {wanted} open files; the hard limit is {hard}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_one_address_starves_no_one_else() {
    within(60, async {
        // The flood's sockets, the server's ends of them, and room for the other tests.
        raise_open_files(2 * FLOOD as u64 + 2048);
        let mut config = server_config();
        config.handshake_timeout = Duration::from_secs(30); // the flood holds on for the whole test
        let server = start_server(config).await;
        let addr = server.local_addr();
        let mut flood = Vec::with_capacity(FLOOD);
        for _ in 0..FLOOD {
            let mut stream = raw::connect_from("127.0.0.2", addr).await;
            // Refused ones may already be closed by the server: that is the point.
            let _ = stream.write_all(&preamble(LinkKind::Control)).await;
            flood.push(stream);
        }
        // Accepts are in order, so the server has seen the whole flood before these.
        let started = Instant::now();
        let login = tokio::time::timeout(
            Duration::from_secs(2),
            Client::connect(client_config(addr, "id1", "secret1")),
        );
        let client = login.await.expect("no login within 2 s during the flood").expect("the login");
        let visitor = tokio::time::timeout(Duration::from_secs(2), http::get(addr, "/", "nobody.example"));
        let response = visitor.await.expect("no answer to an HTTP visitor within 2 s during the flood");
        assert_eq!(response.status, 404, "an unknown host");
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        client.shutdown().await;
        drop(flood);
        server.shutdown().await;
    })
    .await
}
