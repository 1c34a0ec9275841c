//! The server's TCP port policy: ranges, taken ports, random fallback, per-user numbers.

use crate::common::*;
use ferry::{ClientError, RegisterError, ServiceConfig};

#[tokio::test]
async fn port_outside_the_range_gives_a_clear_error() {
    within(30, async {
        let mut config = server_config();
        config.tcp_ranges = vec!["30000-30010".parse().unwrap()];
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let err = client
            .add_service(ServiceConfig::tcp(&echo.to_string()).with_remote_port(2222))
            .await
            .expect_err("refused");
        assert!(
            matches!(err, ClientError::Register(RegisterError::PortNotAllowed { port: 2222, .. })),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "the server refused the tunnel: port 2222 is not allowed; the server's tcp-range is 30000-30010"
        );
        // With random fallback the same request gets a port inside the range.
        let tunnel = client
            .add_service(ServiceConfig::tcp(&echo.to_string()).with_remote_port(2222).with_random_fallback())
            .await
            .unwrap();
        assert!((30000..=30010).contains(&tunnel.remote_port()), "{}", tunnel.remote_port());
    })
    .await
}

#[tokio::test]
async fn taken_port_is_refused_or_replaced() {
    within(30, async {
        let server = start_server(server_config()).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let blocker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taken = blocker.local_addr().unwrap().port();
        let err = client
            .add_service(ServiceConfig::tcp(&echo.to_string()).with_remote_port(taken))
            .await
            .expect_err("refused");
        assert_eq!(err.to_string(), format!("the server refused the tunnel: port {taken} is already in use"));
        let tunnel = client
            .add_service(ServiceConfig::tcp(&echo.to_string()).with_remote_port(taken).with_random_fallback())
            .await
            .unwrap();
        assert_ne!(tunnel.remote_port(), taken);
        assert_eq!(echo_through(tunnel.public_addr().parse().unwrap(), b"ok").await.unwrap(), b"ok");

        // A port held by another tunnel is taken too.
        let held = tunnel.remote_port();
        let err =
            client.add_service(ServiceConfig::tcp(&echo.to_string()).with_remote_port(held)).await.err();
        assert!(
            matches!(err, Some(ClientError::Register(RegisterError::PortTaken { port })) if port == held)
        );
    })
    .await
}

#[tokio::test]
async fn tcp_number_caps_ports_per_user() {
    within(30, async {
        let mut config = server_config();
        config.tcp_number = Some(1);
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let echo = echo_server().await;
        let first = client.add_service(ServiceConfig::tcp(&echo.to_string())).await.unwrap();
        let err =
            client.add_service(ServiceConfig::tcp(&echo.to_string())).await.expect_err("second refused");
        assert!(matches!(err, ClientError::Register(RegisterError::PortLimit { limit: 1, .. })), "{err:?}");
        // Another client of the same user counts against the same limit.
        let second_client = connect(server.local_addr()).await;
        assert!(second_client.add_service(ServiceConfig::tcp(&echo.to_string())).await.is_err());
        // Cancelling frees the slot: `closed()` answers once the server has given it back.
        let mut first = first;
        first.cancel();
        first.closed().await;
        let again = second_client.add_service(ServiceConfig::tcp(&echo.to_string())).await;
        assert!(again.is_ok(), "{:?}", again.err());
    })
    .await
}

#[tokio::test]
async fn no_tcp_policy_means_no_tcp_tunnels() {
    within(30, async {
        let mut config = server_config();
        config.tcp_ranges.clear();
        let server = start_server(config).await;
        let client = connect(server.local_addr()).await;
        let err = client.add_service(ServiceConfig::tcp("127.0.0.1:1")).await.expect_err("refused");
        assert!(matches!(err, ClientError::Register(RegisterError::TcpDisabled { .. })), "{err:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_port_is_free_once_closed_answers() {
    within(20, async {
        let server = start_server(server_config()).await;
        let owner = connect(server.local_addr()).await;
        let echo = echo_server().await;
        for _ in 0..20 {
            let mut first = owner.add_service(ServiceConfig::tcp(&echo.to_string())).await.expect("opens");
            let port = first.remote_port();
            first.cancel();
            assert_eq!(first.closed().await, ferry::CloseReason::Cancelled);
            // No retry: the server confirmed the port is bindable again before closed() answered.
            // The same control connection: the server reads this right after the unregister.
            let again = owner.add_service(ServiceConfig::tcp(&echo.to_string()).with_remote_port(port)).await;
            let again = again.unwrap_or_else(|err| panic!("port {port} not free after closed(): {err}"));
            assert_eq!(
                echo_through(again.public_addr().parse().unwrap(), b"same port").await.unwrap(),
                b"same port"
            );
            again.cancel();
        }
    })
    .await;
}
