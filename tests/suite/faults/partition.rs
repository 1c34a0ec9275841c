//! A partition longer than every timeout: both sides notice, the server frees the public
//! port, and once the link heals the client is back on the same port.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::*;
use crate::common::within;

const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
const PARTITION: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_partition_is_noticed_and_healed_on_the_same_port() {
    let Some(link) = topology("a_long_partition_is_noticed_and_healed_on_the_same_port") else { return };
    within(120, async {
        start_echo(&link);
        let mut server = start_server(&link, &["--heartbeat-timeout", "3s"]).await;
        let mut client = start_client(&link, &["--heartbeat-timeout", "3s"]).await;
        assert_eq!(echo_once(&link, b"before").await.unwrap(), b"before");
        let threads = (server.threads(), client.threads());

        link.partition();
        let cut = Instant::now();
        let (noticed, line) = client.line("disconnected from the server", 0, PARTITION).await;
        let notice = noticed - cut;
        assert!(line.contains("no heartbeat"), "{line}");
        let (dropped, _) = server.line("client disconnected", 0, PARTITION).await;
        let freed = until(PARTITION, "the public port is freed", || refused(&link)).await;
        eprintln!(
            "partition: client noticed after {notice:?}, server dropped it after {:?}, port refused after {freed:?}",
            dropped - cut
        );
        // Silence counts from the last message, which came before the cut.
        let limit = HEARTBEAT_TIMEOUT + Duration::from_millis(500);
        assert!(notice <= limit && dropped - cut <= limit, "noticed late:\n{}", client.output());

        tokio::time::sleep(PARTITION.saturating_sub(cut.elapsed())).await;
        link.heal();
        let healed = Instant::now();
        let (back, line) = client.line("is reachable at", 1, Duration::from_secs(10)).await;
        assert!(line.ends_with(&format!(":{PUBLIC_PORT}")), "another port: {line}");
        let back = back - healed;
        assert_eq!(echo_once(&link, b"after").await.unwrap(), b"after");
        eprintln!("partition: back on port {PUBLIC_PORT} {back:?} after the link healed");

        for (process, before) in [(&server, threads.0), (&client, threads.1)] {
            // Idle blocking-pool threads (name lookups) exit after 10 s.
            until(Duration::from_secs(20), "threads back to their count", || async { process.threads() <= before }).await;
        }
        stop_cleanly(&mut client).await;
        stop_cleanly(&mut server).await;
    })
    .await
}

/// SIGTERM ends the process with success within 5 s: nothing was stuck.
async fn stop_cleanly(process: &mut NsProcess) {
    process.signal(Signal::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(5), process.child.wait()).await;
    assert!(status.expect("stopped within 5 s").unwrap().success(), "{}", process.output());
}
