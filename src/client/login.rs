//! Opening a control connection: preamble and hello, challenge, proof, welcome.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::auth::{
    client_pake, hello_digest, seal_secret, seal_verifier, Ephemeral, Secret, SessionKey, Verifier,
};
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::proto::{
    preamble_with, Challenge, ClientMessage, ControlChannel, LinkKind, LoginRefusal, Proof, ProtocolError,
    ServerMessage,
};
use crate::seal::{FrameCipher, Side};
use crate::transport::{Connector, QuicLink, RemoteTrust, Stream};
use tracing::{info, warn};

/// A logged-in control connection.
pub(crate) struct LoggedIn {
    pub(crate) chan: ControlChannel<Stream>,
    pub(crate) session: u64,
    pub(crate) key: SessionKey,
    pub(crate) heartbeat_interval: Duration,
    /// The QUIC connection of a `quic://` login: the server opens visitors' streams on it.
    pub(crate) quic: Option<QuicLink>,
    /// The connector that reached the server: data connections go the same way.
    pub(crate) connector: Connector,
}

/// Logs in over the first of `connectors` that reaches its server: a server that cannot
/// be reached passes the turn to the next one; any other failure ends the attempt.
pub(crate) async fn login_first_reachable(
    connectors: &[Connector],
    config: &ClientConfig,
    instance: &str,
) -> Result<LoggedIn, ClientError> {
    let mut last = None;
    for (i, connector) in connectors.iter().enumerate() {
        match login(connector, config, instance).await {
            Ok(logged) => {
                let transport = connector.remote().scheme.as_str();
                info!(remote = %connector.remote(), transport, "logged in");
                return Ok(logged);
            }
            Err(ClientError::Connect(err)) if i + 1 < connectors.len() => {
                warn!(remote = %connector.remote(), %err, "cannot reach this remote; trying the next");
                last = Some(ClientError::Connect(err));
            }
            Err(err) => return Err(err),
        }
    }
    Err(last.unwrap_or(ClientError::NotConnected))
}

/// Connects and logs in; the secret itself never leaves this process, except sealed for a
/// server with an auth API over a connection that protects it.
pub(crate) async fn login(
    connector: &Connector,
    config: &ClientConfig,
    instance: &str,
) -> Result<LoggedIn, ClientError> {
    let (mut stream, quic) = connector.connect_control().await.map_err(ClientError::Connect)?;
    let software = env!("CARGO_PKG_VERSION").to_owned();
    let hello_sum = hello_digest(&config.id, instance, &software, &config.tags);
    let hello = ClientMessage::Hello {
        id: config.id.clone(),
        instance: instance.to_owned(),
        software,
        tags: config.tags.clone(),
    };
    // The hello leaves with the preamble: naming the id first costs no round trip.
    stream.write_all(&preamble_with(LinkKind::Control, &hello)?).await.map_err(ProtocolError::from)?;
    let mut chan = ControlChannel::new(stream);
    let limit = config.remote_timeout;
    let challenge = match chan.recv_timeout::<ServerMessage>(limit).await? {
        ServerMessage::Challenge { challenge } => challenge,
        other => return Err(unexpected(other)),
    };
    let (proof, key) = prove(config, challenge, hello_sum).await?;
    chan.send(&ClientMessage::Login { proof }).await?;
    match chan.recv_timeout::<ServerMessage>(limit).await? {
        ServerMessage::Welcome { session, heartbeat_interval_ms, confirm } => {
            if !key.check_welcome(session, heartbeat_interval_ms, &confirm) {
                return Err(ClientError::ServerNotVerified);
            }
            chan.encrypt(FrameCipher::new(&key, Side::Client));
            remember_login(config);
            let heartbeat_interval = Duration::from_millis(heartbeat_interval_ms.max(10));
            Ok(LoggedIn { chan, session, key, heartbeat_interval, quic, connector: connector.clone() })
        }
        other => Err(unexpected(other)),
    }
}

/// Answers the challenge in the way it asks for.
async fn prove(
    config: &ClientConfig,
    challenge: Challenge,
    hello: [u8; 32],
) -> Result<(Proof, SessionKey), ClientError> {
    match challenge {
        Challenge::Pake { message, stretched } => {
            let verifier = match stretched {
                true => stretched_verifier(&config.id, &config.secret).await,
                false => Verifier::plain(&config.id, &config.secret),
            };
            let answer = client_pake(&config.id, &verifier, &message, hello)
                .ok_or_else(|| ProtocolError::Malformed("the server's PAKE message is not one".into()))?;
            Ok((Proof::Pake { message: answer.message, confirm: answer.confirm }, answer.key))
        }
        Challenge::Reveal { ephemeral_key } => {
            if !may_reveal_secret(config) {
                return Err(ClientError::LoginRefused(LoginRefusal::SecretNeeded));
            }
            let (ephemeral, key) = agree(&ephemeral_key, &hello)?;
            let sealed = seal_secret(&key, &config.secret);
            Ok((Proof::Reveal { ephemeral_key: ephemeral.public, sealed }, key))
        }
        Challenge::Enroll { ephemeral_key } => {
            if !may_reveal_secret(config) {
                if !config.remote_enroll_insecure {
                    return Err(ClientError::EnrollUnprotected { id: config.id.clone() });
                }
                // Allowed once: a server this process logged in to does not forget the id
                // unless it restarted, and a man in the middle would like to look as if it had.
                if logged_in_before(config) {
                    return Err(ClientError::EnrollAgain { id: config.id.clone() });
                }
            }
            let verifier = stretched_verifier(&config.id, &config.secret).await;
            let (ephemeral, key) = agree(&ephemeral_key, &hello)?;
            let sealed = seal_verifier(&key, &verifier);
            Ok((Proof::Enroll { ephemeral_key: ephemeral.public, sealed }, key))
        }
    }
}

/// (server, id) pairs this process has logged in as: an unprotected enrollment is
/// answered only before the first of them.
static LOGGED_IN: Mutex<Option<HashSet<(String, String)>>> = Mutex::new(None);

/// Most pairs remembered; one process rarely logs in to more than a few.
const MAX_LOGGED_IN: usize = 1024;

fn login_key(config: &ClientConfig) -> (String, String) {
    (config.remote.to_string(), config.id.clone())
}

fn remember_login(config: &ClientConfig) {
    let mut seen = LOGGED_IN.lock().unwrap_or_else(|e| e.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() < MAX_LOGGED_IN {
        seen.insert(login_key(config));
    }
}

fn logged_in_before(config: &ClientConfig) -> bool {
    let seen = LOGGED_IN.lock().unwrap_or_else(|e| e.into_inner());
    seen.as_ref().is_some_and(|seen| seen.contains(&login_key(config)))
}

fn agree(server_key: &[u8; 32], hello: &[u8; 32]) -> Result<(Ephemeral, SessionKey), ClientError> {
    let ephemeral = Ephemeral::generate();
    let key = ephemeral
        .agree(server_key, hello)
        .ok_or_else(|| ProtocolError::Malformed("the server's ephemeral key is weak".into()))?;
    Ok((ephemeral, key))
}

/// Stretched verifiers already computed in this process, by plain verifier: Argon2id costs
/// tens of milliseconds and 19 MiB, once per id and secret rather than per login.
static STRETCHED: Mutex<Option<HashMap<[u8; 32], Verifier>>> = Mutex::new(None);

/// Most stretched verifiers kept (one per id and secret this process logs in with).
const MAX_STRETCHED: usize = 64;

async fn stretched_verifier(id: &str, secret: &Secret) -> Verifier {
    let plain = Verifier::plain(id, secret);
    let cached = STRETCHED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .and_then(|cache| cache.get(&plain.to_bytes()).cloned());
    if let Some(found) = cached {
        return found;
    }
    let (owned_id, owned_secret) = (id.to_owned(), secret.clone());
    let stretched =
        match tokio::task::spawn_blocking(move || Verifier::stretched(&owned_id, &owned_secret)).await {
            Ok(stretched) => stretched,
            Err(_) => Verifier::stretched(id, secret),
        };
    let mut cache = STRETCHED.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if cache.len() >= MAX_STRETCHED {
        cache.clear();
    }
    cache.insert(plain.to_bytes(), stretched.clone());
    stretched
}

/// The secret leaves this process only inside TLS with a verified certificate, or to a
/// server on this host: otherwise a man in the middle could open the seal.
fn may_reveal_secret(config: &ClientConfig) -> bool {
    let verified_tls = config.remote.scheme.is_tls() && config.remote_trust != RemoteTrust::Insecure;
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

    #[tokio::test]
    async fn a_verifier_is_enrolled_only_where_it_is_protected_or_allowed() {
        let enroll = || Challenge::Enroll { ephemeral_key: Ephemeral::generate().public };
        let far = config("tcp://example.com:7000", RemoteTrust::System);
        let refused = prove(&far, enroll(), [0; 32]).await.err();
        assert!(matches!(refused, Some(ClientError::EnrollUnprotected { .. })), "{refused:?}");
        let near = config("tcp://127.0.0.1:7000", RemoteTrust::System);
        assert!(matches!(prove(&near, enroll(), [0; 32]).await, Ok((Proof::Enroll { .. }, _))));
        let mut allowed = far.clone();
        allowed.remote_enroll_insecure = true;
        assert!(matches!(prove(&allowed, enroll(), [0; 32]).await, Ok((Proof::Enroll { .. }, _))));
        // Only before this process first logged in there: later, an enrollment asked for
        // over an unprotected link is someone in the middle wanting the verifier (or a
        // server that restarted and forgot the id), and the client stops.
        remember_login(&allowed);
        let refused = prove(&allowed, enroll(), [0; 32]).await.err();
        assert!(matches!(refused, Some(ClientError::EnrollAgain { .. })), "{refused:?}");
        assert!(matches!(prove(&near, enroll(), [0; 32]).await, Ok((Proof::Enroll { .. }, _))), "protected");
        // The secret itself is never revealed there, whatever the user allowed for enrollment.
        let reveal = Challenge::Reveal { ephemeral_key: Ephemeral::generate().public };
        let refused = prove(&allowed, reveal, [0; 32]).await.err();
        assert!(
            matches!(refused, Some(ClientError::LoginRefused(LoginRefusal::SecretNeeded))),
            "{refused:?}"
        );
    }
}
