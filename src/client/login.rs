//! Opening a control connection: preamble, challenge, signed login, welcome.

use std::time::Duration;

use crate::auth::{client_login, SessionKey};
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::proto::{write_preamble, ControlChannel, LinkKind, ServerMessage};
use crate::transport::{Connector, Stream};

/// A logged-in control connection.
pub(crate) struct LoggedIn {
    pub(crate) chan: ControlChannel<Stream>,
    pub(crate) session: u64,
    pub(crate) key: SessionKey,
    pub(crate) heartbeat_interval: Duration,
}

/// Connects and logs in; the secret itself never leaves this process.
pub(crate) async fn login(
    connector: &Connector,
    config: &ClientConfig,
    instance: &str,
) -> Result<LoggedIn, ClientError> {
    let mut stream = connector.connect().await.map_err(ClientError::Connect)?;
    write_preamble(&mut stream, LinkKind::Control).await?;
    let mut chan = ControlChannel::new(stream);
    let limit = config.remote_timeout;
    let (nonce, server_ephemeral) = match chan.recv_timeout::<ServerMessage>(limit).await? {
        ServerMessage::Challenge { nonce, ephemeral_key } => (nonce, ephemeral_key),
        other => return Err(unexpected(other)),
    };
    let (login, key) = client_login(&config.id, &config.secret, &nonce, &server_ephemeral, instance);
    chan.send(&login).await?;
    match chan.recv_timeout::<ServerMessage>(limit).await? {
        ServerMessage::Welcome { session, heartbeat_interval_ms } => Ok(LoggedIn {
            chan,
            session,
            key,
            heartbeat_interval: Duration::from_millis(heartbeat_interval_ms.max(10)),
        }),
        other => Err(unexpected(other)),
    }
}

fn unexpected(message: ServerMessage) -> ClientError {
    match message {
        ServerMessage::LoginRefused { refusal } => ClientError::LoginRefused(refusal),
        other => ClientError::Protocol(crate::proto::ProtocolError::Malformed(format!(
            "unexpected message during login: {other:?}"
        ))),
    }
}
