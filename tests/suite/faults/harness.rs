//! The harness itself: the delay line really delays, a partition really cuts.

use std::time::{Duration, Instant};

use super::topology;
use crate::common::link::Link;
use crate::common::within;

/// The median time of five TCP handshakes from the client namespace to the server's (one
/// round trip each).
async fn handshake_rtt(link: &Link, port: u16) -> Duration {
    let mut times = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        link.client.connect(Link::server_addr(port)).await.expect("handshake through the link");
        times.push(start.elapsed());
    }
    times.sort();
    times[2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_delays_and_cuts_as_told() {
    let Some(mut link) = topology("the_link_delays_and_cuts_as_told") else { return };
    within(60, async {
        let listener = link.server.listen("0.0.0.0:5000");
        tokio::spawn(async move { while listener.accept().await.is_ok() {} });

        let clear = handshake_rtt(&link, 5000).await;
        assert!(clear < Duration::from_millis(40), "a clear link took {clear:?}");
        link.set(Duration::from_millis(50), 0);
        let delayed = handshake_rtt(&link, 5000).await;
        eprintln!("handshake: {clear:?} clear, {delayed:?} with 50 ms each way");
        assert!(delayed >= Duration::from_millis(80), "50 ms each way gave {delayed:?}");
        assert!(delayed < Duration::from_millis(200), "50 ms each way gave {delayed:?}");

        link.partition();
        let cut =
            tokio::time::timeout(Duration::from_secs(1), link.client.connect(Link::server_addr(5000))).await;
        assert!(cut.is_err(), "a handshake crossed a partition: {cut:?}");
        link.heal();
        link.set(Duration::ZERO, 0);
        let healed = handshake_rtt(&link, 5000).await;
        assert!(healed < Duration::from_millis(40), "after healing: {healed:?}");
    })
    .await
}
