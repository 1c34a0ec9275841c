//! Bans after repeated failed logins, per source address and per (address, id).

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
        // Wrong secrets for two different ids: only the address reaches the limit.
        assert!(login_from("127.0.0.21", addr, "id1", "x").await.is_err());
        assert!(login_from("127.0.0.21", addr, "id2", "x").await.is_err());
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

/// Failures naming an id from other addresses never lock its real client out: only the
/// addresses that failed are banned (issue 9.2).
#[tokio::test]
async fn other_addresses_failures_never_refuse_a_correct_proof() {
    within(30, async {
        let server = start_server(banning(2, Duration::from_secs(30))).await;
        let addr = server.local_addr();
        for source in ["127.0.0.31", "127.0.0.32", "127.0.0.33"] {
            for guess in ["guess-1", "guess-2"] {
                assert!(login_from(source, addr, "id1", guess).await.is_err());
            }
            let refusal = login_from(source, addr, "id1", "secret1").await.unwrap_err();
            assert!(matches!(refusal, LoginRefusal::Banned { seconds } if seconds > 20), "{refusal:?}");
        }
        // The right secret from any other address gets in, and so does the real client.
        login_from("127.0.0.34", addr, "id1", "secret1").await.expect("not locked out by others");
        let client = Client::connect(client_config(addr, "id1", "secret1")).await.expect("the real client");
        client.shutdown().await;
    })
    .await
}

/// An address that logs in as its own user between guesses at another's secret resets its
/// own count, but not the count of (address, guessed id): that pair is banned.
#[tokio::test]
async fn guesses_at_one_id_are_counted_per_address_and_id() {
    within(30, async {
        let server = start_server(banning(2, Duration::from_secs(30))).await;
        let addr = server.local_addr();
        let source = "127.0.0.35";
        for _ in 0..2 {
            assert!(matches!(
                login_from(source, addr, "id1", "guess").await,
                Err(LoginRefusal::AuthFailed { .. })
            ));
            login_from(source, addr, "id2", "secret2").await.expect("its own login resets the address");
        }
        let refusal = login_from(source, addr, "id1", "secret1").await.unwrap_err();
        assert!(matches!(refusal, LoginRefusal::Banned { .. }), "{refusal:?}");
        login_from(source, addr, "id2", "secret2").await.expect("the address itself is not banned");
        // A banned client is told so and is not told to give up (it retries with backoff).
        let err = ClientError::LoginRefused(refusal);
        assert!(!err.is_fatal(), "{err:?}");
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

        // The address: two failures under two ids.
        assert!(login_from("127.0.0.62", addr, "id1", "x").await.is_err());
        assert!(login_from("127.0.0.62", addr, "id2", "x").await.is_err());
        let answer = answer_to_hello("127.0.0.62", addr, "id2").await;
        assert!(is_banned(&answer), "a banned address was sent {answer:?}");

        // The (address, id) pair: two failures for id1, each followed by a login as id2.
        for _ in 0..2 {
            assert!(login_from("127.0.0.63", addr, "id1", "guess").await.is_err());
            login_from("127.0.0.63", addr, "id2", "secret2").await.unwrap();
        }
        let answer = answer_to_hello("127.0.0.63", addr, "id1").await;
        assert!(is_banned(&answer), "a banned pair was sent {answer:?}");
        // The same address asking for another id, and another address for id1, get challenges.
        let other = answer_to_hello("127.0.0.63", addr, "id2").await;
        assert!(matches!(other, ServerMessage::Challenge { .. }), "{other:?}");
        let other = answer_to_hello("127.0.0.64", addr, "id1").await;
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
