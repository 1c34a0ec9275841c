//! Bans after repeated failed logins, per source address and per id.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use ferry::proto::ServerMessage;
use ferry::{Client, ClientError, LoginRefusal, ServerConfig};

fn banning(times: u32, duration: Duration) -> ServerConfig {
    let mut config = server_config().with_user("id2", "secret2");
    config.reconnect_times = times;
    config.reconnect_duration = duration;
    config
}

/// The server's first answer to a hello from `source` naming `id`.
async fn answer_to_hello(source: &str, server: SocketAddr, id: &str) -> ServerMessage {
    raw::hello(raw::connect_from(source, server).await, id, "test").await.1
}

fn is_banned(answer: &ServerMessage) -> bool {
    matches!(answer, ServerMessage::LoginRefused { refusal: LoginRefusal::Banned { .. } })
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
        // The library client reports the ban clearly; a ban ends, so it is not final, and
        // a retrying client waits at least what is left of it.
        let err = Client::connect(client_config(addr, "id1", "secret1")).await.expect_err("banned");
        assert!(
            matches!(err, ClientError::LoginRefused(LoginRefusal::Banned { .. })) && !err.is_fatal(),
            "{err:?}"
        );
        assert!(err.retry_after() > Some(Duration::from_secs(20)), "{err:?}");
    })
    .await
}

/// A banned address or id gets its refusal in answer to the hello: the server makes no
/// key and sends no challenge for it.
#[tokio::test]
async fn banned_peers_are_refused_before_any_challenge() {
    within(30, async {
        let server = start_server(banning(2, Duration::from_secs(30))).await;
        let addr = server.local_addr();
        let fresh = answer_to_hello("127.0.0.61", addr, "id1").await;
        assert!(matches!(fresh, ServerMessage::Challenge { .. }), "{fresh:?}");

        // The address: two failures under unknown ids.
        assert!(login_from("127.0.0.62", addr, "nobody-a", "x").await.is_err());
        assert!(login_from("127.0.0.62", addr, "nobody-b", "x").await.is_err());
        let answer = answer_to_hello("127.0.0.62", addr, "id2").await;
        assert!(is_banned(&answer), "a banned address was sent {answer:?}");

        // The id: two failures from two addresses; a third address asks for it.
        assert!(login_from("127.0.0.63", addr, "id1", "guess-1").await.is_err());
        assert!(login_from("127.0.0.64", addr, "id1", "guess-2").await.is_err());
        let answer = answer_to_hello("127.0.0.65", addr, "id1").await;
        assert!(is_banned(&answer), "a banned id was sent {answer:?}");
        // The same address asking for another id gets its challenge.
        let other = answer_to_hello("127.0.0.65", addr, "id2").await;
        assert!(matches!(other, ServerMessage::Challenge { .. }), "{other:?}");
    })
    .await
}

/// With three failures allowed: fail, fail, succeed, fail, fail is not banned (the success
/// reset the count), and the next failure is the third in a row, which bans.
#[tokio::test]
async fn a_successful_login_clears_the_count() {
    within(30, async {
        let server = start_server(banning(3, Duration::from_secs(30))).await;
        let addr = server.local_addr();
        let source = "127.0.0.41";
        let wrong = || login_from(source, addr, "id1", "wrong");
        for _ in 0..2 {
            assert!(matches!(wrong().await, Err(LoginRefusal::AuthFailed { .. })));
        }
        login_from(source, addr, "id1", "secret1").await.expect("two failures do not ban");
        for _ in 0..2 {
            assert!(matches!(wrong().await, Err(LoginRefusal::AuthFailed { .. })));
        }
        // Without the reset this would be the fifth failure, long banned.
        let third = wrong().await;
        assert!(matches!(third, Err(LoginRefusal::AuthFailed { .. })), "banned too early: {third:?}");
        let after = login_from(source, addr, "id1", "secret1").await;
        assert!(matches!(after, Err(LoginRefusal::Banned { .. })), "three failures in a row: {after:?}");
    })
    .await
}
