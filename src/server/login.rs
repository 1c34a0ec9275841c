//! The login on a control connection: hello, challenge, proof.
//!
//! The client names its id in a hello that arrives with the preamble. A banned source, a
//! malformed id or a banned (source, id) pair is refused then, before the server makes any
//! key or sends a challenge: banned and bogus peers cost it no cryptographic work. So is
//! an id the server does not know, which is not counted as a failed guess (see
//! [`Method`]). Otherwise the challenge says how the client proves its secret: a PAKE,
//! or, where the server does not hold a verifier, a sealed reveal (auth API) or
//! enrollment (allow-any-client).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::bans::Offender;
use super::users::{Grant, Method, Rules};
use super::ServerShared;
use crate::auth::{hello_digest, open_secret, open_verifier, Ephemeral, ServerPake, SessionKey, Verifier};
use crate::proto::{
    is_valid_id, Challenge, ClientMessage, ControlChannel, LoginRefusal, Proof, ProtocolError, ServerMessage,
};
use crate::transport::Stream;

/// Most tags a client may carry.
const MAX_TAGS: usize = 16;

/// A login the server accepted.
pub(crate) struct Accepted {
    pub(super) id: String,
    /// What the client proved it holds; a reload keeps the session only if it still matches.
    pub(super) credential: Verifier,
    pub(super) session_key: SessionKey,
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
    /// Digest of the hello as sent, bound into the session key.
    digest: [u8; 32],
}

/// Why a login did not go through.
enum Failed {
    /// Refused, with a reason the client is told.
    Refused(LoginRefusal),
    /// The client broke the protocol, went silent or left.
    Broken(ProtocolError),
}

impl From<ProtocolError> for Failed {
    fn from(err: ProtocolError) -> Self {
        Failed::Broken(err)
    }
}

/// What a successful proof yields.
struct Proved {
    key: SessionKey,
    credential: Verifier,
    rules: Arc<Rules>,
    grant: Grant,
}

/// Runs the login; on failure tells the client why and returns `None`.
pub(crate) async fn login(
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
    let pair = Offender::source_id(peer.ip(), &hello.id);
    if let Some(left) = shared.bans.banned(&pair) {
        debug!(%peer, id = %hello.id, "refusing an id banned from this address");
        return refuse_banned(chan, left).await;
    }
    let started = Instant::now();
    let proved = prove(shared, chan, deadline, &hello, peer, tls).await;
    match proved {
        Ok(Proved { key, credential, rules, grant }) => {
            shared.metrics.handshake(started.elapsed());
            shared.bans.succeeded(&addr);
            shared.bans.succeeded(&pair);
            let (id, instance, tags) = (hello.id, hello.instance, hello.tags);
            Some(Accepted { id, credential, session_key: key, instance, tags, rules, grant })
        }
        Err(Failed::Broken(err)) => refuse_malformed(shared, chan, peer, err).await,
        Err(Failed::Refused(refusal @ LoginRefusal::AuthFailed { .. })) => {
            shared.metrics.auth_failed();
            warn!(%peer, %refusal, "login refused");
            count_failure(shared, peer, addr);
            count_failure(shared, peer, pair);
            let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
            None
        }
        Err(Failed::Refused(refusal)) => {
            // Not a guess (unknown id, no secret given) or not the client's fault (API down,
            // server full): no ban.
            info!(%peer, %refusal, "login refused");
            let _ = chan.send(&ServerMessage::LoginRefused { refusal }).await;
            None
        }
    }
}

/// Challenges the client in the way the hello's id calls for, and checks its proof.
async fn prove(
    shared: &ServerShared,
    chan: &mut ControlChannel<Stream>,
    deadline: Instant,
    hello: &Hello,
    peer: SocketAddr,
    tls: bool,
) -> Result<Proved, Failed> {
    // A secret or verifier is asked for only where it travels inside TLS or stays on this host.
    let protected = tls || peer.ip().to_canonical().is_loopback();
    match shared.users.method(&hello.id, shared.hooks()) {
        Method::Refuse(refusal) => Err(Failed::Refused(refusal)),
        Method::Pake { verifier, stretched, grant, rules } => {
            let key = pake(chan, deadline, hello, &verifier, stretched).await?;
            Ok(Proved { key, credential: verifier, rules, grant })
        }
        Method::Reveal if !protected => Err(Failed::Refused(LoginRefusal::SecretNeeded)),
        Method::Reveal => reveal(shared, chan, deadline, hello, peer).await,
        Method::Enroll => enroll(shared, chan, deadline, hello).await,
    }
}

/// The PAKE: the server's message in the challenge, the client's with its key confirmation
/// in the login. A wrong secret shows as a confirmation that does not match.
async fn pake(
    chan: &mut ControlChannel<Stream>,
    deadline: Instant,
    hello: &Hello,
    verifier: &Verifier,
    stretched: bool,
) -> Result<SessionKey, Failed> {
    let pake = ServerPake::start(&hello.id, verifier, hello.digest);
    let challenge = Challenge::Pake { message: pake.message().to_vec(), stretched };
    chan.send(&ServerMessage::Challenge { challenge }).await?;
    match recv_before(chan, deadline).await? {
        ClientMessage::Login { proof: Proof::Pake { message, confirm } } => pake
            .finish(&message, &confirm)
            .ok_or_else(|| Failed::Refused(LoginRefusal::AuthFailed { id: hello.id.clone() })),
        _ => Err(ProtocolError::Malformed("expected a PAKE login".into()).into()),
    }
}

/// An X25519 exchange for a sealed reveal or enrollment: the challenge with the server's
/// key, then the client's key and sealed payload.
async fn sealed_exchange(
    chan: &mut ControlChannel<Stream>,
    deadline: Instant,
    hello: &Hello,
    enroll: bool,
) -> Result<(SessionKey, Vec<u8>), Failed> {
    let ephemeral = Ephemeral::generate();
    let challenge = match enroll {
        true => Challenge::Enroll { ephemeral_key: ephemeral.public },
        false => Challenge::Reveal { ephemeral_key: ephemeral.public },
    };
    chan.send(&ServerMessage::Challenge { challenge }).await?;
    let (peer_key, sealed) = match (recv_before(chan, deadline).await?, enroll) {
        (ClientMessage::Login { proof: Proof::Enroll { ephemeral_key, sealed } }, true)
        | (ClientMessage::Login { proof: Proof::Reveal { ephemeral_key, sealed } }, false) => {
            (ephemeral_key, sealed)
        }
        _ => return Err(ProtocolError::Malformed("expected a sealed login".into()).into()),
    };
    let key = ephemeral
        .agree(&peer_key, &hello.digest)
        .ok_or_else(|| Failed::Broken(ProtocolError::Malformed("a weak ephemeral key".into())))?;
    Ok((key, sealed))
}

/// The auth API's way: the client reveals its secret, sealed; the API judges it.
async fn reveal(
    shared: &ServerShared,
    chan: &mut ControlChannel<Stream>,
    deadline: Instant,
    hello: &Hello,
    peer: SocketAddr,
) -> Result<Proved, Failed> {
    let (key, sealed) = sealed_exchange(chan, deadline, hello, false).await?;
    let secret = open_secret(&key, &sealed).ok_or_else(|| {
        Failed::Broken(ProtocolError::Malformed("a sealed secret that does not open".into()))
    })?;
    let rules = shared.users.check_revealed(&hello.id, &secret, peer).await.map_err(Failed::Refused)?;
    Ok(Proved { key, credential: Verifier::plain(&hello.id, &secret), rules, grant: Grant::Api })
}

/// allow-any-client's way for a new id: the client enrolls its stretched verifier.
async fn enroll(
    shared: &ServerShared,
    chan: &mut ControlChannel<Stream>,
    deadline: Instant,
    hello: &Hello,
) -> Result<Proved, Failed> {
    let (key, sealed) = sealed_exchange(chan, deadline, hello, true).await?;
    let verifier = open_verifier(&key, &sealed).ok_or_else(|| {
        Failed::Broken(ProtocolError::Malformed("a sealed verifier that does not open".into()))
    })?;
    let rules = shared.users.enroll(&hello.id, &verifier).map_err(Failed::Refused)?;
    info!(id = %hello.id, "allow-any-client learned a new id");
    Ok(Proved { key, credential: verifier, rules, grant: Grant::Learned })
}

/// Checks the hello. Nothing the client sent is logged before it is checked, except with
/// `Debug` formatting (no line breaks or control characters get through).
async fn check_hello(
    shared: &ServerShared,
    chan: &mut ControlChannel<Stream>,
    peer: SocketAddr,
    received: Result<ClientMessage, ProtocolError>,
) -> Option<Hello> {
    let (id, instance, software, tags) = match received {
        Ok(ClientMessage::Hello { id, instance, software, tags }) => (id, instance, software, tags),
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
    let digest = hello_digest(&id, &instance, &software, &tags);
    let tags = tags.into_iter().filter(|t| is_token(t)).take(MAX_TAGS).collect();
    Some(Hello { id, instance, tags, digest })
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
