//! The login on a control connection: hello, challenge, signed login.
//!
//! The client names its id in a hello that arrives with the preamble. A banned source, a
//! malformed id or a banned id is refused then, before the server makes an ephemeral key
//! or sends a challenge: banned and bogus peers cost it no cryptographic work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, warn};

use super::bans::Offender;
use super::users::{Grant, Rules};
use super::ServerShared;
use crate::auth::{is_valid_id, verify_login, Ephemeral, VerifiedLogin};
use crate::proto::{ClientMessage, ControlChannel, LoginRefusal, ProtocolError, ServerMessage};
use crate::transport::Stream;

/// Most tags a client may carry.
const MAX_TAGS: usize = 16;

/// A login the server accepted.
pub(super) struct Accepted {
    pub(super) verified: VerifiedLogin,
    pub(super) instance: String,
    pub(super) tags: Vec<String>,
    pub(super) rules: Arc<Rules>,
    pub(super) grant: Grant,
}

/// What a client's hello said, checked.
struct Hello {
    id: String,
    instance: String,
    tags: Vec<String>,
}

/// Runs the login; on failure tells the client why and returns `None`.
pub(super) async fn login(
    shared: &ServerShared,
    chan: &mut ControlChannel<Stream>,
    peer: SocketAddr,
    tls: bool,
) -> Option<Accepted> {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    // Read before any answer, so that closing after a refusal leaves nothing unread (which
    // would turn the close into a reset that could lose the refusal).
    let received = recv_before(chan, deadline).await;
    let addr = Offender::source(peer.ip());
    if let Some(left) = shared.bans.banned(&addr) {
        debug!(%peer, "refusing a banned address");
        return refuse_banned(chan, left).await;
    }
    let hello = check_hello(shared, chan, peer, received).await?;
    let id = Offender::Id(hello.id.clone());
    if let Some(left) = shared.bans.banned(&id) {
        debug!(%peer, id = %hello.id, "refusing a banned id");
        return refuse_banned(chan, left).await;
    }
    let started = Instant::now();
    let nonce = rand::random::<[u8; 32]>();
    let ephemeral = Ephemeral::generate();
    // The secret is asked for (for the auth API) only where it travels inside TLS or stays on this host.
    let wants_secret =
        shared.users.directory().wants_secret() && (tls || peer.ip().to_canonical().is_loopback());
    let challenge = ServerMessage::Challenge { nonce, ephemeral_key: ephemeral.public, wants_secret };
    chan.send(&challenge).await.ok()?;
    let login = match recv_before(chan, deadline).await {
        Ok(login) => login,
        Err(err) => return refuse_malformed(shared, chan, peer, err).await,
    };
    let outcome = match verify_login(&hello.id, &login, &nonce, &ephemeral) {
        Ok(verified) => match shared.users.authorize(&verified, peer, shared.hooks()).await {
            Ok((rules, grant)) => Ok((verified, rules, grant)),
            Err(refusal) => Err(refusal),
        },
        Err(refusal) => Err(refusal),
    };
    match outcome {
        Ok((verified, rules, grant)) => {
            shared.metrics.handshake(started.elapsed());
            shared.bans.succeeded(&addr);
            shared.bans.succeeded(&id);
            Some(Accepted { verified, instance: hello.instance, tags: hello.tags, rules, grant })
        }
        Err(refusal) if !matches!(refusal, LoginRefusal::AuthFailed { .. }) => {
            // Not the client's fault (API down, server full) or not a guess (no secret given): no ban.
            warn!(%peer, %refusal, "login refused");
            let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
            None
        }
        Err(refusal) => {
            shared.metrics.auth_failed();
            warn!(%peer, %refusal, "login refused");
            count_failure(shared, peer, addr);
            count_failure(shared, peer, id);
            let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
            None
        }
    }
}

/// Checks the hello. Nothing the client sent is logged before it is checked, except with
/// `Debug` formatting (no line breaks or control characters get through).
async fn check_hello(
    shared: &ServerShared,
    chan: &mut ControlChannel<Stream>,
    peer: SocketAddr,
    received: Result<ClientMessage, ProtocolError>,
) -> Option<Hello> {
    let (id, instance, tags) = match received {
        Ok(ClientMessage::Hello { id, instance, tags, .. }) => (id, instance, tags),
        Ok(_) => {
            let err = ProtocolError::Malformed("expected a hello".into());
            return refuse_malformed(shared, chan, peer, err).await;
        }
        Err(err) => return refuse_malformed(shared, chan, peer, err).await,
    };
    if !is_valid_id(&id) {
        debug!(%peer, ?id, "login refused: not a valid id");
        count_failure(shared, peer, Offender::source(peer.ip()));
        let _ = chan.send(&ServerMessage::LoginRefused { refusal: LoginRefusal::InvalidId }).await;
        return None;
    }
    if !is_token(&instance) {
        let err = ProtocolError::Malformed("instance: use 1 to 64 letters, digits, '-', '_' or '.'".into());
        return refuse_malformed(shared, chan, peer, err).await;
    }
    let tags = tags.into_iter().filter(|t| is_token(t)).take(MAX_TAGS).collect();
    Some(Hello { id, instance, tags })
}

/// Receives a message before the handshake's deadline.
async fn recv_before(
    chan: &mut ControlChannel<Stream>,
    deadline: Instant,
) -> Result<ClientMessage, ProtocolError> {
    chan.recv_timeout(deadline.saturating_duration_since(Instant::now())).await
}

/// 1 to 64 letters, digits, `-`, `_` or `.`: what tags and instances may be.
fn is_token(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Counts a failure of `who`, logging a ban it starts.
fn count_failure(shared: &ServerShared, peer: SocketAddr, who: Offender) {
    if shared.bans.failed(who.clone()) {
        shared.metrics.banned();
        warn!(%peer, ?who, "banned after repeated failed logins");
    }
}

/// Answers a hello or login that was not one; a malformed message counts against the source.
async fn refuse_malformed<T>(
    shared: &ServerShared,
    chan: &mut ControlChannel<Stream>,
    peer: SocketAddr,
    err: ProtocolError,
) -> Option<T> {
    debug!(%peer, ?err, "no valid login");
    if matches!(err, ProtocolError::Malformed(_)) {
        count_failure(shared, peer, Offender::source(peer.ip()));
    }
    let refusal = LoginRefusal::Malformed { message: err.to_string() };
    let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
    None
}

async fn refuse_banned<T>(chan: &mut ControlChannel<Stream>, left: Duration) -> Option<T> {
    let refusal = LoginRefusal::Banned { seconds: left.as_secs().max(1) };
    let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_short_and_plain() {
        assert!(is_token("web-1.a_b") && is_token(&"a".repeat(64)));
        assert!(!is_token("") && !is_token("a b") && !is_token("a\n") && !is_token(&"a".repeat(65)));
    }
}
