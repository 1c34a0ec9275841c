//! The server out of file descriptors (`prlimit --nofile=256`, 400 visitors): its client's
//! control connection keeps its heartbeats, failed accepts are logged once per interval,
//! and everything works again once the visitors leave.

use std::time::{Duration, Instant};

use super::*;
use crate::common::within;

const VISITORS: usize = 400;
/// Longer than the heartbeat timeout (3 s) and than one warning interval (5 s).
const EXHAUSTED_FOR: Duration = Duration::from_secs(7);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_of_descriptors_keeps_its_clients_and_recovers() {
    let Some(link) = topology("a_server_out_of_descriptors_keeps_its_clients_and_recovers") else { return };
    within(150, async {
        crate::flood::raise_open_files(VISITORS as u64 + 2048);
        start_echo(&link);
        let heartbeat = ["--heartbeat-timeout", "3s"];
        let mut server = start_server_under(&link, &["prlimit", "--nofile=256:256", "--"], &heartbeat).await;
        let client = start_client(&link, &heartbeat).await;
        let idle_fds = server.open_fds();

        let sockets = link.server.sockets(VISITORS);
        let connects = sockets.into_iter().map(|socket| async move {
            let connect = socket.connect(Link::server_addr(PUBLIC_PORT));
            tokio::time::timeout(Duration::from_secs(5), connect).await.ok().and_then(Result::ok)
        });
        // The kernel completes every handshake and queues what the server cannot accept.
        let visitors: Vec<_> = futures_util::future::join_all(connects).await.into_iter().flatten().collect();
        assert_eq!(visitors.len(), VISITORS, "visitors connected");
        let (first_warning, _) = server.line("accept failed", 0, Duration::from_secs(10)).await;
        let exhausted = Instant::now();
        eprintln!("descriptors: {idle_fds} open when idle, {} with {VISITORS} visitors", server.open_fds());
        tokio::time::sleep(EXHAUSTED_FOR).await;
        let warnings = server.count("accept failed");
        assert_eq!(client.count("disconnected from the server"), 0, "{}", client.output());
        assert_eq!(server.count("client disconnected"), 0, "{}", server.output());

        drop(visitors);
        let recovered =
            until(Duration::from_secs(10), "a visitor is served again", || async {
                matches!(tokio::time::timeout(Duration::from_secs(2), echo_once(&link, b"again")).await,
                    Ok(Ok(got)) if got == b"again")
            })
            .await;
        let second = start_client_on(&link, PUBLIC_PORT + 1, &[]).await;
        eprintln!(
            "descriptors: {warnings} accept warnings in {:?} of exhaustion, served again {recovered:?} after the \
             visitors left, a new client logged in after that; {} descriptors open then",
            exhausted - first_warning + EXHAUSTED_FOR,
            server.open_fds()
        );
        // Two listeners (the public port, the clients' port) fail their accepts; each warns
        // at most once per 5 s. Before, each warned every 100 ms: about 140 lines here.
        assert!(warnings <= 6, "{warnings} warnings:\n{}", server.output());
        drop(second);
        // The clients' answers to the burst that arrived after it idle in the pool until
        // the pool's 60 s limit for idle connections closes them.
        let settled = until(Duration::from_secs(80), "descriptors back to their idle count", || async {
            server.open_fds() <= idle_fds + 4
        })
        .await;
        eprintln!("descriptors: back to {} open {settled:?} after that", server.open_fds());
    })
    .await
}
