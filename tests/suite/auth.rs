//! Logins: wrong secrets, unknown ids, allow-any-client.

use crate::common::*;
use ferry::proto::ServerMessage;
use ferry::{Client, ClientError, LoginRefusal};

#[tokio::test]
async fn wrong_secret_gives_a_clear_error() {
    within(30, async {
        let server = start_server(server_config()).await;
        let err =
            Client::connect(client_config(server.local_addr(), "id1", "wrong")).await.expect_err("refused");
        assert!(
            matches!(err, ClientError::LoginRefused(LoginRefusal::AuthFailed { ref id }) if id == "id1"),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "authentication failed for id 'id1'");
        assert!(err.is_fatal());
        // The right secret still works afterwards.
        connect(server.local_addr()).await.shutdown().await;
    })
    .await
}

#[tokio::test]
async fn unknown_id_is_refused_without_allow_any_client() {
    within(30, async {
        let server = start_server(server_config()).await;
        let err =
            Client::connect(client_config(server.local_addr(), "stranger", "x")).await.expect_err("refused");
        assert_eq!(
            err.to_string(),
            "the server has no user 'stranger' (never added, or removed); ask its operator"
        );
        assert!(err.is_fatal(), "retrying will not help");
    })
    .await
}

async fn allow_any_client_server() -> ferry::ServerHandle {
    let mut config = server_config();
    config.allow_any_client = true;
    start_server(config).await
}

#[tokio::test]
async fn allow_any_client_keeps_the_first_secret() {
    within(30, async {
        let server = allow_any_client_server().await;
        let addr = server.local_addr();
        let first =
            Client::connect(client_config(addr, "newcomer", "first")).await.expect("first secret accepted");
        let err = Client::connect(client_config(addr, "newcomer", "second"))
            .await
            .expect_err("second secret refused");
        assert_eq!(err.to_string(), "authentication failed for id 'newcomer'");
        // The first secret keeps working, also after its client left.
        first.shutdown().await;
        Client::connect(client_config(addr, "newcomer", "first"))
            .await
            .expect("first secret again")
            .shutdown()
            .await;
        // Configured users keep their own secrets.
        assert!(Client::connect(client_config(addr, "id1", "other")).await.is_err());
    })
    .await
}

/// Ids are 1 to 64 letters, digits, `-`, `_`, `.` or `@`; anything else is refused in
/// answer to the hello, even under allow-any-client, and cannot be configured.
#[tokio::test]
async fn malformed_ids_are_refused_before_the_challenge() {
    within(30, async {
        let server = allow_any_client_server().await;
        let addr = server.local_addr();
        let long = "x".repeat(65);
        // From an address each: malformed ids count towards the address's ban.
        for (n, id) in ["", "forged\nINFO line", "a b", long.as_str()].into_iter().enumerate() {
            let stream = raw::connect_from(&format!("127.0.0.{}", 81 + n), addr).await;
            let (_, answer) = raw::hello(stream, id, "t").await;
            assert!(
                matches!(answer, ServerMessage::LoginRefused { refusal: LoginRefusal::InvalidId }),
                "{id:?}: {answer:?}"
            );
        }
        let err = Client::connect(client_config(addr, &long, "x")).await.expect_err("refused");
        assert!(err.to_string().contains("id is not valid") && err.is_fatal(), "{err}");
        // The longest and the widest well-formed ids log in.
        for id in ["x".repeat(64), "alice.b-c_d@example.com".into()] {
            Client::connect(client_config(addr, &id, "s")).await.expect("a valid id").shutdown().await;
        }
        // A server does not start with an id no client could log in with.
        let err = ferry::Server::bind(server_config().with_user("a b", "s")).await.err().expect("refused");
        assert!(err.to_string().contains("not a valid id"), "{err}");
    })
    .await
}
