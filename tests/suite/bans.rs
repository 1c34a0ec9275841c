//! Bans after repeated failed logins, per source address and per id.

use std::time::{Duration, Instant};

use crate::common::*;
use ferry::{Client, ClientError, LoginRefusal, ServerConfig};

fn banning(times: u32, duration: Duration) -> ServerConfig {
    let mut config = server_config().with_user("id2", "secret2");
    config.reconnect_times = times;
    config.reconnect_duration = duration;
    config
}

#[tokio::test]
async fn an_address_is_banned_after_repeated_failures_then_let_back() {
    within(30, async {
        let server = start_server(banning(2, Duration::from_secs(1))).await;
        let addr = server.local_addr();
        // Two different unknown ids: only the address reaches the limit.
        assert!(login_from("127.0.0.21", addr, "nobody-a", "x").await.is_err());
        assert!(login_from("127.0.0.21", addr, "nobody-b", "x").await.is_err());
        let banned_at = Instant::now();
        let refusal = login_from("127.0.0.21", addr, "id1", "secret1").await.unwrap_err();
        assert!(matches!(refusal, LoginRefusal::Banned { .. }), "{refusal:?}");
        assert!(refusal.to_string().starts_with("too many failed logins"), "{refusal}");
        // Other addresses are not affected.
        login_from("127.0.0.22", addr, "id1", "secret1").await.unwrap();
        // The ban ends after its duration.
        let mut back = false;
        for _ in 0..100 {
            if login_from("127.0.0.21", addr, "id1", "secret1").await.is_ok() {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(back, "the ban never ended");
        assert!(banned_at.elapsed() >= Duration::from_millis(800), "ended after {:?}", banned_at.elapsed());
    })
    .await
}

#[tokio::test]
async fn an_id_is_banned_whatever_the_address() {
    within(30, async {
        let server = start_server(banning(2, Duration::from_secs(30))).await;
        let addr = server.local_addr();
        assert!(login_from("127.0.0.31", addr, "id1", "guess-1").await.is_err());
        assert!(login_from("127.0.0.32", addr, "id1", "guess-2").await.is_err());
        // The right secret from a fresh address is refused while the id is banned...
        let refusal = login_from("127.0.0.33", addr, "id1", "secret1").await.unwrap_err();
        assert!(matches!(refusal, LoginRefusal::Banned { seconds } if seconds > 20), "{refusal:?}");
        // ...and other ids are not.
        login_from("127.0.0.33", addr, "id2", "secret2").await.unwrap();
        // The library client reports the ban as a clear, fatal error.
        let err = Client::connect(client_config(addr, "id1", "secret1")).await.expect_err("banned");
        assert!(
            matches!(err, ClientError::LoginRefused(LoginRefusal::Banned { .. })) && err.is_fatal(),
            "{err:?}"
        );
    })
    .await
}

#[tokio::test]
async fn a_successful_login_clears_the_count() {
    within(30, async {
        let server = start_server(banning(2, Duration::from_secs(30))).await;
        let addr = server.local_addr();
        for _ in 0..5 {
            assert!(login_from("127.0.0.41", addr, "id1", "wrong").await.is_err());
            login_from("127.0.0.42", addr, "id2", "secret2").await.unwrap();
            // One failure, then a success from the same address: never two in a row.
            login_from("127.0.0.41", addr, "id2", "secret2").await.unwrap();
        }
    })
    .await
}
