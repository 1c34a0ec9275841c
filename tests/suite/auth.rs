//! Logins: wrong secrets, unknown ids, allow-any-client.

use crate::common::*;
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
        assert_eq!(err.to_string(), "authentication failed for id 'stranger'");
    })
    .await
}

#[tokio::test]
async fn allow_any_client_keeps_the_first_secret() {
    within(30, async {
        let mut config = server_config();
        config.allow_any_client = true;
        let server = start_server(config).await;
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
