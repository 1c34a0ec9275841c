//! Opening a control connection: preamble and hello, challenge, signed login, welcome.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tracing::warn;

use crate::auth::{client_login, SessionKey};
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::proto::{preamble_with, ClientMessage, ControlChannel, LinkKind, ProtocolError, ServerMessage};
use crate::transport::{Connector, RemoteTrust, Scheme, Stream};

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
    let hello = ClientMessage::Hello {
        id: config.id.clone(),
        instance: instance.to_owned(),
        software: env!("CARGO_PKG_VERSION").to_owned(),
        tags: config.tags.clone(),
    };
    // The hello leaves with the preamble: naming the id first costs no round trip.
    stream.write_all(&preamble_with(LinkKind::Control, &hello)?).await.map_err(ProtocolError::from)?;
    let mut chan = ControlChannel::new(stream);
    let limit = config.remote_timeout;
    let (nonce, server_ephemeral, wants_secret) = match chan.recv_timeout::<ServerMessage>(limit).await? {
        ServerMessage::Challenge { nonce, ephemeral_key, wants_secret } => {
            (nonce, ephemeral_key, wants_secret)
        }
        other => return Err(unexpected(other)),
    };
    let reveal = wants_secret && may_reveal_secret(config);
    if wants_secret && !reveal {
        warn!(
            "the server asks for the secret (auth API) over a connection that does not protect it; not sent"
        );
    }
    let (login, key) = client_login(&config.id, &config.secret, &nonce, &server_ephemeral, reveal);
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

/// The secret leaves this process only inside TLS with a verified certificate, or to a
/// server on this host: otherwise a man in the middle could open the seal.
fn may_reveal_secret(config: &ClientConfig) -> bool {
    let verified_tls = config.remote.scheme == Scheme::Tls && config.remote_trust != RemoteTrust::Insecure;
    let host = config.remote.host.as_str();
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    verified_tls || loopback
}

fn unexpected(message: ServerMessage) -> ClientError {
    match message {
        ServerMessage::LoginRefused { refusal } => ClientError::LoginRefused(refusal),
        other => ClientError::Protocol(crate::proto::ProtocolError::Malformed(format!(
            "unexpected message during login: {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::RemoteAddr;

    fn config(remote: &str, trust: RemoteTrust) -> ClientConfig {
        let mut config = ClientConfig::new(RemoteAddr::parse(remote).unwrap(), "id", "secret");
        config.remote_trust = trust;
        config
    }

    #[test]
    fn the_secret_goes_only_where_no_one_can_read_it() {
        assert!(may_reveal_secret(&config("tls://example.com", RemoteTrust::System)));
        assert!(may_reveal_secret(&config("tcp://127.0.0.1:7000", RemoteTrust::System)));
        assert!(may_reveal_secret(&config("tcp://localhost:7000", RemoteTrust::System)));
        assert!(!may_reveal_secret(&config("tcp://example.com:7000", RemoteTrust::System)));
        assert!(!may_reveal_secret(&config("tls://example.com", RemoteTrust::Insecure)));
    }
}
