//! Authentication: the login's password-authenticated key exchange, the keys it yields,
//! and the proofs of data connections.
//!
//! The secret never crosses the wire, and nothing that does lets anyone test guesses of it
//! offline. The login is SPAKE2 (RustCrypto's `spake2`, Ed25519 group) over a
//! [`Verifier`], a password-equivalent derived from id and secret: an eavesdropper sees two
//! random-looking group elements, and a man in the middle (or a fake server) gets one
//! online guess per login, which bans limit. Both sides confirm the key they agreed on
//! (the client in its login, the server in its welcome), so a client also knows it talks
//! to a server that holds its secret. The agreed key then encrypts and authenticates the
//! control connection ([`crate::seal::FrameCipher`]) and proves data connections.
//!
//! Two cases cannot run the PAKE, because the server does not hold the verifier yet:
//! - an auth API must see the secret itself (the client *reveals* it);
//! - allow-any-client keeps a verifier of the first secret it sees for an id (the client
//!   *enrolls*; the verifier is stretched with Argon2id, since the server keeps it).
//!
//! Both send the secret or verifier sealed under an X25519 exchange, and the client sends
//! it only inside TLS with a verified certificate, or to a server on its own host (an
//! enrollment also where the user allows it), since that exchange alone cannot tell the
//! server from a man in the middle.

use std::collections::HashSet;
use std::fmt;

use ring::aead;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use subtle::ConstantTimeEq;

pub use crate::session_key::SessionKey;

/// Longest secret a server accepts in a revealed login.
const MAX_SECRET_LEN: usize = 1024;

/// The server's side of the PAKE names itself with this identity.
const SERVER_IDENTITY: &[u8] = b"ferry server";

/// Argon2id memory cost in KiB (19 MiB, OWASP's first recommended setting).
const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
/// Argon2id passes over that memory.
const ARGON2_PASSES: u32 = 2;

/// A secret whose `Debug` and `Display` print a mask, so it never lands in logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for deriving keys.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// The PAKE's password: derived from id and secret, and all a server needs to check a login.
///
/// It is a password-equivalent, so the server keeps it only where it must (allow-any-client),
/// and then stretched with Argon2id.
#[derive(Clone)]
pub struct Verifier([u8; 32]);

impl Verifier {
    /// For a user whose secret the server holds anyway (flags, config, users file, hooks):
    /// SHA-256 of id and secret, cheap to derive per login.
    pub fn plain(id: &str, secret: &Secret) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"ferry v3 verifier\0");
        hasher.update((id.len() as u64).to_be_bytes());
        hasher.update(id.as_bytes());
        hasher.update(secret.expose().as_bytes());
        Verifier(hasher.finalize().into())
    }

    /// For what a server keeps (allow-any-client): Argon2id of the secret, salted with the id.
    /// Takes tens of milliseconds and 19 MiB: call it off the async threads.
    pub fn stretched(id: &str, secret: &Secret) -> Self {
        let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, 1, Some(32))
            .expect("constant Argon2 parameters are valid");
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt: [u8; 32] =
            Sha256::new_with_prefix(b"ferry v3 salt\0").chain_update(id.as_bytes()).finalize().into();
        let mut out = [0u8; 32];
        argon
            .hash_password_into(secret.expose().as_bytes(), &salt, &mut out)
            .expect("a 32-byte salt and output are within Argon2's limits");
        Verifier(out)
    }

    /// Whether two verifiers are the same, in constant time.
    pub fn matches(&self, other: &Verifier) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// The verifier's bytes, as a key of an in-process cache.
    pub(crate) fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Verifier)
    }
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Verifier(********)")
    }
}

/// A digest of the hello's fields. It goes into every key of the session, so nobody can
/// change the hello on its way without the login failing.
pub fn hello_digest(id: &str, instance: &str, software: &str, tags: &[String]) -> [u8; 32] {
    let mut hasher = Sha256::new_with_prefix(b"ferry v3 hello\0");
    for field in [id, instance, software].into_iter().chain(tags.iter().map(String::as_str)) {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hasher.finalize().into()
}

fn spake(id: &str, verifier: &Verifier, server: bool) -> (Spake2<Ed25519Group>, Vec<u8>) {
    let password = Password::new(verifier.0);
    let (client_id, server_id) = (Identity::new(id.as_bytes()), Identity::new(SERVER_IDENTITY));
    if server {
        Spake2::<Ed25519Group>::start_b(&password, &client_id, &server_id)
    } else {
        Spake2::<Ed25519Group>::start_a(&password, &client_id, &server_id)
    }
}

/// The server's half of a PAKE login, from its challenge to the client's answer.
pub struct ServerPake {
    state: Spake2<Ed25519Group>,
    message: Vec<u8>,
    hello: [u8; 32],
}

impl ServerPake {
    /// Starts the exchange for `id` (named by the hello whose digest is `hello`).
    pub fn start(id: &str, verifier: &Verifier, hello: [u8; 32]) -> Self {
        let (state, message) = spake(id, verifier, true);
        ServerPake { state, message, hello }
    }

    /// The server's PAKE message, sent in the challenge.
    pub fn message(&self) -> &[u8] {
        &self.message
    }

    /// Checks the client's answer; `None` for a wrong secret or a malformed message.
    pub fn finish(self, client_message: &[u8], confirm: &[u8; 32]) -> Option<SessionKey> {
        let shared = self.state.finish(client_message).ok()?;
        let key = SessionKey::derive(b"pake", &shared, &self.hello);
        let confirmed: bool = key.client_confirm().ct_eq(confirm).into();
        confirmed.then_some(key)
    }
}

/// The client's answer to a PAKE challenge: its message, its key confirmation, and the
/// session key (to be trusted once the welcome confirms it, see [`SessionKey::check_welcome`]).
pub struct ClientPake {
    /// The client's PAKE message.
    pub message: Vec<u8>,
    /// Proof that the client derived the same key.
    pub confirm: [u8; 32],
    /// The key both sides share if the server knew the verifier.
    pub key: SessionKey,
}

/// Answers the server's PAKE message; `None` if the message is not one.
pub fn client_pake(
    id: &str,
    verifier: &Verifier,
    server_message: &[u8],
    hello: [u8; 32],
) -> Option<ClientPake> {
    let (state, message) = spake(id, verifier, false);
    let shared = state.finish(server_message).ok()?;
    let key = SessionKey::derive(b"pake", &shared, &hello);
    Some(ClientPake { message, confirm: key.client_confirm(), key })
}

/// An ephemeral X25519 key pair, for the logins that reveal a secret or enroll a verifier.
pub struct Ephemeral {
    secret: x25519_dalek::StaticSecret,
    /// The public half, sent to the peer.
    pub public: [u8; 32],
}

impl Ephemeral {
    /// Makes a fresh key pair.
    pub fn generate() -> Self {
        let secret = x25519_dalek::StaticSecret::from(rand::random::<[u8; 32]>());
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Ephemeral { secret, public }
    }

    /// The session key shared with the peer whose public key is `peer`; `None` when the
    /// peer's key is of low order (the result would not depend on our key).
    pub fn agree(&self, peer: &[u8; 32], hello: &[u8; 32]) -> Option<SessionKey> {
        let shared = self.secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
        if !shared.was_contributory() {
            return None;
        }
        let (low, high) = if self.public < *peer { (&self.public, peer) } else { (peer, &self.public) };
        let mut material = shared.as_bytes().to_vec();
        material.extend_from_slice(low);
        material.extend_from_slice(high);
        Some(SessionKey::derive(b"x25519", &material, hello))
    }
}

/// Seals a revealed secret or an enrolled verifier for the server that shares `key`.
fn seal_payload(key: &SessionKey, payload: &[u8]) -> Vec<u8> {
    let mut sealed = payload.to_vec();
    // One key per login and one message per key: a zero nonce is never reused.
    let nonce = aead::Nonce::assume_unique_for_key([0; 12]);
    // Sealing fails only for messages over 256 GiB; frames are capped at 64 KiB.
    if payload_key(key).seal_in_place_append_tag(nonce, aead::Aad::empty(), &mut sealed).is_err() {
        sealed.clear();
    }
    sealed
}

/// Opens a sealed payload; `None` if it was not sealed with `key` or is too long.
fn open_payload(key: &SessionKey, sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() > MAX_SECRET_LEN + aead::CHACHA20_POLY1305.tag_len() {
        return None;
    }
    let mut buffer = sealed.to_vec();
    let nonce = aead::Nonce::assume_unique_for_key([0; 12]);
    let plain = payload_key(key).open_in_place(nonce, aead::Aad::empty(), &mut buffer).ok()?;
    Some(plain.to_vec())
}

fn payload_key(key: &SessionKey) -> aead::LessSafeKey {
    crate::seal::aead_key(&key.subkey(b"sealed payload", &[]))
}

/// Seals the secret itself, for a server whose auth API needs it.
pub fn seal_secret(key: &SessionKey, secret: &Secret) -> Vec<u8> {
    seal_payload(key, secret.expose().as_bytes())
}

/// Opens a revealed secret.
pub fn open_secret(key: &SessionKey, sealed: &[u8]) -> Option<Secret> {
    String::from_utf8(open_payload(key, sealed)?).ok().map(Secret)
}

/// Seals a verifier for enrollment.
pub fn seal_verifier(key: &SessionKey, verifier: &Verifier) -> Vec<u8> {
    seal_payload(key, &verifier.0)
}

/// Opens an enrolled verifier.
pub fn open_verifier(key: &SessionKey, sealed: &[u8]) -> Option<Verifier> {
    Verifier::from_slice(&open_payload(key, sealed)?)
}

/// Remembers which sequence numbers a session's data connections used, so none is used twice.
#[derive(Default)]
pub struct ReplayGuard {
    floor: u64,
    seen: HashSet<u64>,
}

impl ReplayGuard {
    const WINDOW: u64 = 4096;

    /// Records `seq`; false if it was used before or is too old to tell.
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq < self.floor || !self.seen.insert(seq) {
            return false;
        }
        if self.seen.len() as u64 > Self::WINDOW {
            let max = self.seen.iter().copied().max().unwrap_or(0);
            self.floor = max.saturating_sub(Self::WINDOW / 2);
            let floor = self.floor;
            self.seen.retain(|s| *s >= floor);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: [u8; 32] = [9; 32];

    fn pake(id: &str, client: &Verifier, server: &Verifier) -> (Option<SessionKey>, SessionKey) {
        let server = ServerPake::start(id, server, HELLO);
        let answer = client_pake(id, client, server.message(), HELLO).unwrap();
        (server.finish(&answer.message, &answer.confirm), answer.key)
    }

    #[test]
    fn the_pake_agrees_only_on_the_same_verifier() {
        let secret = Secret::new("s1");
        let (server_key, client_key) =
            pake("id1", &Verifier::plain("id1", &secret), &Verifier::plain("id1", &secret));
        let server_key = server_key.expect("same secret");
        assert_eq!(server_key.data_mac(1, 2), client_key.data_mac(1, 2));
        assert!(client_key.check_welcome(7, 100, &server_key.welcome_confirm(7, 100)));
        assert!(
            !client_key.check_welcome(8, 100, &server_key.welcome_confirm(7, 100)),
            "bound to the session"
        );

        let (refused, _) =
            pake("id1", &Verifier::plain("id1", &Secret::new("s2")), &Verifier::plain("id1", &secret));
        assert!(refused.is_none(), "another secret");
        let (refused, _) = pake("id1", &Verifier::plain("id2", &secret), &Verifier::plain("id1", &secret));
        assert!(refused.is_none(), "another id");
    }

    #[test]
    fn a_changed_hello_or_garbage_fails_the_pake() {
        let verifier = Verifier::plain("id1", &Secret::new("s1"));
        let server = ServerPake::start("id1", &verifier, HELLO);
        let answer = client_pake("id1", &verifier, server.message(), [8; 32]).unwrap();
        assert!(server.finish(&answer.message, &answer.confirm).is_none());
        assert!(client_pake("id1", &verifier, b"garbage", HELLO).is_none());
        let server = ServerPake::start("id1", &verifier, HELLO);
        assert!(server.finish(&[0; 33], &[0; 32]).is_none());
    }

    #[test]
    fn stretched_verifiers_are_deterministic_and_salted_by_id() {
        let secret = Secret::new("hunter2");
        let a = Verifier::stretched("a", &secret);
        assert!(a.matches(&Verifier::stretched("a", &secret)));
        assert!(!a.matches(&Verifier::stretched("b", &secret)));
        assert!(!a.matches(&Verifier::plain("a", &secret)));
    }

    #[test]
    fn revealed_secrets_and_enrolled_verifiers_open_only_with_the_key() {
        let (server, client) = (Ephemeral::generate(), Ephemeral::generate());
        let server_key = server.agree(&client.public, &HELLO).unwrap();
        let client_key = client.agree(&server.public, &HELLO).unwrap();
        let sealed = seal_secret(&client_key, &Secret::new("hunter2"));
        assert!(!String::from_utf8_lossy(&sealed).contains("hunter2"));
        assert_eq!(open_secret(&server_key, &sealed).as_ref().map(Secret::expose), Some("hunter2"));
        let other = Ephemeral::generate().agree(&client.public, &HELLO).unwrap();
        assert!(open_secret(&other, &sealed).is_none());
        let verifier = Verifier::plain("id", &Secret::new("s"));
        assert!(open_verifier(&server_key, &seal_verifier(&client_key, &verifier))
            .unwrap()
            .matches(&verifier));
        assert!(server.agree(&[0; 32], &HELLO).is_none(), "a low-order key is refused");
    }

    #[test]
    fn replay_guard_refuses_reuse() {
        let mut guard = ReplayGuard::default();
        assert!(guard.accept(1));
        assert!(guard.accept(3));
        assert!(guard.accept(2));
        assert!(!guard.accept(3));
        for seq in 4..10_000 {
            assert!(guard.accept(seq));
        }
        assert!(!guard.accept(5));
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "\"********\"");
        assert_eq!(format!("{:?}", Verifier::plain("a", &Secret::new("b"))), "Verifier(********)");
    }
}
