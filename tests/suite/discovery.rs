//! Discovery and free ports from the library (proxylite's DiscoverServices and AskFreePort).

use std::time::Duration;

use crate::common::*;
use ferry::ServiceConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_discover_their_users_services_and_free_ports() {
    within(30, async {
        let low = free_port().await;
        let mut config = server_config().with_user("other", "s");
        config.tcp_ranges = vec![format!("{low}-{}", low.saturating_add(200)).parse().unwrap()];
        let server = start_server(config).await;
        let echo = echo_server().await;
        let serving = connect(server.local_addr()).await;
        let mut tcp = ServiceConfig::tcp(&echo.to_string()).with_limits(
            Some(3),
            Some(50),
            Some(Duration::from_secs(60)),
        );
        tcp.name = "db".into();
        let tunnel = serving.add_service(tcp).await.unwrap();
        let mut web = ServiceConfig::http(&echo.to_string()).with_host_prefix("www");
        web.name = "web".into();
        let _ = serving.add_service(web).await.unwrap();
        let payload = random_bytes(4096);
        assert_eq!(echo_through(tunnel.public_addr().parse().unwrap(), &payload).await.unwrap(), payload);

        // Another client of the same user sees both, with live figures.
        let looking = connect(server.local_addr()).await;
        let services = looking.discover().await.unwrap();
        assert_eq!(services.len(), 2, "{services:?}");
        let db = services.iter().find(|s| s.name == "db").unwrap();
        assert_eq!((db.kind.as_str(), db.port), ("tcp", tunnel.remote_port()));
        assert_eq!((db.capacity, db.total_allowed, db.served), (Some(3), Some(50), 1));
        assert_eq!((db.bytes_in, db.bytes_out), (4096, 4096));
        assert_eq!(db.deadline.unwrap() - db.birth, 60);
        let www = services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!((www.kind.as_str(), www.host.as_deref()), ("http", Some("www")));
        // The one-shot function does the same; another user sees none of them.
        assert_eq!(
            ferry::discover(client_config(server.local_addr(), "id1", "secret1")).await.unwrap().len(),
            2
        );
        assert!(ferry::discover(client_config(server.local_addr(), "other", "s")).await.unwrap().is_empty());

        // Free ports lie in the user's range, exclude taken ones, and can be asked for.
        let ports = looking.free_ports(5).await.unwrap();
        assert_eq!(ports.len(), 5);
        assert!(ports.iter().all(|&p| p >= low && p <= low + 200 && p != tunnel.remote_port()), "{ports:?}");
        let asked = ports[0];
        let opened =
            looking.add_service(ServiceConfig::tcp(&echo.to_string()).with_remote_port(asked)).await.unwrap();
        assert_eq!(opened.remote_port(), asked);
        assert!(!looking.free_ports(1000).await.unwrap().contains(&asked));
        let once = ferry::free_ports(client_config(server.local_addr(), "id1", "secret1"), 1).await.unwrap();
        assert_eq!(once.len(), 1);
        server.shutdown().await;
    })
    .await
}
