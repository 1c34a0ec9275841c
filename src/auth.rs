//! Authentication: keys derived from secrets, the login signature, and session keys
//! for data connections.
//!
//! The secret never crosses the wire. Both sides derive an Ed25519 key pair from
//! `(id, secret)`; the client signs a transcript holding fresh nonces of both
//! sides, and the server checks the signature against the public key it derived
//! itself (or, with allow-any-client, the first key it saw for that id). An
//! X25519 exchange inside the same transcript yields a session key that data
//! connections use to prove they belong to the session.
//!
//! One exception: a server that checks users with an auth API must hand the
//! secret to that API. It asks for it in the challenge, and the client then
//! sends it sealed (ChaCha20-Poly1305) under a key derived from the session key,
//! and only over a verified TLS connection or to a loopback server.

use std::collections::HashSet;
use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hmac::{Hmac, Mac};
use ring::aead;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::proto::{ClientMessage, LoginRefusal};

type HmacSha256 = Hmac<Sha256>;

/// Longest secret a server accepts in a login.
const MAX_SECRET_LEN: usize = 1024;

/// Longest user id, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// What a user id may be made of, for error messages.
pub const ID_RULE: &str = "1 to 64 ASCII letters, digits, '-', '_', '.' or '@'";

/// Whether `id` is a well-formed user id ([`ID_RULE`]). Servers refuse other ids at login,
/// before any cryptographic work, so ids in logs, hosts and the API are always plain.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

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

/// Derives the user's signing key from id and secret; both sides compute the same key.
pub fn user_signing_key(id: &str, secret: &Secret) -> SigningKey {
    let mut hasher = Sha256::new();
    hasher.update(b"ferry v1 user key\0");
    hasher.update((id.len() as u64).to_be_bytes());
    hasher.update(id.as_bytes());
    hasher.update(secret.expose().as_bytes());
    SigningKey::from_bytes(&hasher.finalize().into())
}

/// The nonces and keys of one login, in the order both sides sign and check them.
pub struct Transcript<'a> {
    /// User id.
    pub id: &'a str,
    /// Server nonce from the challenge.
    pub server_nonce: &'a [u8; 32],
    /// Client nonce from the login.
    pub client_nonce: &'a [u8; 32],
    /// Server ephemeral X25519 key.
    pub server_ephemeral: &'a [u8; 32],
    /// Client ephemeral X25519 key.
    pub client_ephemeral: &'a [u8; 32],
    /// Client's Ed25519 public key.
    pub public_key: &'a [u8; 32],
}

impl Transcript<'_> {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200 + self.id.len());
        out.extend_from_slice(b"ferry v1 login\0");
        out.extend_from_slice(&(self.id.len() as u64).to_be_bytes());
        out.extend_from_slice(self.id.as_bytes());
        for part in [
            self.server_nonce,
            self.client_nonce,
            self.server_ephemeral,
            self.client_ephemeral,
            self.public_key,
        ] {
            out.extend_from_slice(part);
        }
        out
    }

    fn session_key(&self, shared: &[u8; 32]) -> SessionKey {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(shared).expect("hmac takes any key length");
        mac.update(b"ferry v1 session key\0");
        mac.update(self.server_nonce);
        mac.update(self.client_nonce);
        SessionKey(mac.finalize().into_bytes().into())
    }
}

/// An ephemeral X25519 key pair for one login.
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

    fn shared(&self, peer: &[u8; 32]) -> [u8; 32] {
        self.secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer)).to_bytes()
    }
}

/// Builds the client's login answer to a challenge for `id` (the id its hello named), and
/// the session key it yields.
pub fn client_login(
    id: &str,
    secret: &Secret,
    server_nonce: &[u8; 32],
    server_ephemeral: &[u8; 32],
    reveal_secret: bool,
) -> (ClientMessage, SessionKey) {
    let signing = user_signing_key(id, secret);
    let public_key = signing.verifying_key().to_bytes();
    let client_nonce = rand::random::<[u8; 32]>();
    let ephemeral = Ephemeral::generate();
    let transcript = Transcript {
        id,
        server_nonce,
        client_nonce: &client_nonce,
        server_ephemeral,
        client_ephemeral: &ephemeral.public,
        public_key: &public_key,
    };
    let signature = signing.sign(&transcript.bytes()).to_bytes().to_vec();
    let key = transcript.session_key(&ephemeral.shared(server_ephemeral));
    let sealed_secret = reveal_secret.then(|| key.seal_secret(secret));
    let login = ClientMessage::Login {
        client_nonce,
        public_key,
        ephemeral_key: ephemeral.public,
        signature,
        sealed_secret,
    };
    (login, key)
}

/// A key shared by client and server for one session; authenticates data connections.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// MAC that proves a data connection belongs to `session`, numbered `seq`.
    pub fn data_mac(&self, session: u64, seq: u64) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(b"ferry v1 data\0");
        mac.update(&session.to_be_bytes());
        mac.update(&seq.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Encrypts the secret for the server that shares this key (auth API logins only).
    fn seal_secret(&self, secret: &Secret) -> Vec<u8> {
        let mut sealed = secret.expose().as_bytes().to_vec();
        // One key per login and one message per key: a zero nonce is never reused.
        let nonce = aead::Nonce::assume_unique_for_key([0; 12]);
        // Sealing fails only for messages over 256 GiB; frames are capped at 64 KiB.
        if self.seal_key().seal_in_place_append_tag(nonce, aead::Aad::empty(), &mut sealed).is_err() {
            sealed.clear();
        }
        sealed
    }

    /// Decrypts a sealed secret; `None` if it was not sealed with this key or is too long.
    fn open_secret(&self, sealed: &[u8]) -> Option<Secret> {
        if sealed.len() > MAX_SECRET_LEN + aead::CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let mut buffer = sealed.to_vec();
        let nonce = aead::Nonce::assume_unique_for_key([0; 12]);
        let plain = self.seal_key().open_in_place(nonce, aead::Aad::empty(), &mut buffer).ok()?;
        String::from_utf8(plain.to_vec()).ok().map(Secret)
    }

    fn seal_key(&self) -> aead::LessSafeKey {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(b"ferry v1 sealed secret\0");
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &key).expect("32-byte key");
        aead::LessSafeKey::new(unbound)
    }

    /// Checks a data connection's MAC in constant time.
    pub fn verify_data_mac(&self, session: u64, seq: u64, mac: &[u8; 32]) -> bool {
        self.data_mac(session, seq).ct_eq(mac).into()
    }
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

/// A login whose signature checks out for the public key it presents; whether that key
/// belongs to the id is the server's user directory's call.
pub struct VerifiedLogin {
    /// The id the client claims.
    pub id: String,
    /// The Ed25519 key the client signed with (derived from id and secret).
    pub public_key: [u8; 32],
    /// The session key both sides now share.
    pub session_key: SessionKey,
    /// The secret, when the server asked for it (auth API) and the client gave it.
    pub secret: Option<Secret>,
}

impl VerifiedLogin {
    /// Whether `secret` is the one the client signed with (compared through the derived key).
    pub fn signed_with(&self, secret: &Secret) -> bool {
        let expected = user_signing_key(&self.id, secret).verifying_key().to_bytes();
        expected.ct_eq(&self.public_key).into()
    }
}

/// Checks a login's signature over the transcript of this challenge to `id` (named by the
/// client's hello); on success both sides share a session key. A sealed secret that does
/// not open is a refusal.
pub fn verify_login(
    id: &str,
    login: &ClientMessage,
    server_nonce: &[u8; 32],
    ephemeral: &Ephemeral,
) -> Result<VerifiedLogin, LoginRefusal> {
    let ClientMessage::Login { client_nonce, public_key, ephemeral_key, signature, sealed_secret } = login
    else {
        return Err(LoginRefusal::Malformed { message: "expected a login message".into() });
    };
    let refused = || LoginRefusal::AuthFailed { id: id.to_owned() };
    let transcript = Transcript {
        id,
        server_nonce,
        client_nonce,
        server_ephemeral: &ephemeral.public,
        client_ephemeral: ephemeral_key,
        public_key,
    };
    let signature = Signature::from_slice(signature).map_err(|_| refused())?;
    let verifying = VerifyingKey::from_bytes(public_key).map_err(|_| refused())?;
    verifying.verify(&transcript.bytes(), &signature).map_err(|_| refused())?;
    let session_key = transcript.session_key(&ephemeral.shared(ephemeral_key));
    let secret = match sealed_secret {
        Some(sealed) => Some(session_key.open_secret(sealed).ok_or_else(refused)?),
        None => None,
    };
    Ok(VerifiedLogin { id: id.to_owned(), public_key: *public_key, session_key, secret })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_verify_and_share_a_session_key() {
        let nonce = rand::random::<[u8; 32]>();
        let server_eph = Ephemeral::generate();
        let secret = Secret::new("s1");
        let (login, client_key) = client_login("id1", &secret, &nonce, &server_eph.public, false);
        let verified = verify_login("id1", &login, &nonce, &server_eph).unwrap();
        assert_eq!(verified.session_key.data_mac(1, 2), client_key.data_mac(1, 2));
        assert!(verified.signed_with(&secret));
        assert!(!verified.signed_with(&Secret::new("s2")));
        assert!(verified.secret.is_none(), "not revealed unless asked");
    }

    #[test]
    fn a_revealed_secret_is_sealed_and_opens_only_on_the_server() {
        let nonce = rand::random::<[u8; 32]>();
        let server_eph = Ephemeral::generate();
        let secret = Secret::new("hunter2");
        let (login, _) = client_login("id1", &secret, &nonce, &server_eph.public, true);
        let wire = serde_json::to_string(&login).unwrap();
        assert!(!wire.contains("hunter2"));
        let verified = verify_login("id1", &login, &nonce, &server_eph).unwrap();
        assert_eq!(verified.secret.as_ref().map(Secret::expose), Some("hunter2"));
        assert!(verify_login("id1", &login, &nonce, &Ephemeral::generate()).is_err(), "another server's key");
    }

    #[test]
    fn tampered_transcript_fails() {
        let secret = Secret::new("s1");
        let nonce = [7u8; 32];
        let eph = Ephemeral::generate();
        let (login, _) = client_login("id1", &secret, &nonce, &eph.public, false);
        assert!(verify_login("id1", &login, &[8u8; 32], &eph).is_err());
        assert!(verify_login("id2", &login, &nonce, &eph).is_err(), "signed for another id");
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
    fn ids_are_short_and_plain() {
        for good in ["id1", "a", "alice@example.com", "A_b-c.d", &"x".repeat(MAX_ID_LEN)] {
            assert!(is_valid_id(good), "{good}");
        }
        for bad in ["", "a b", "a\nb", "é", "a/b", "a:b", &"x".repeat(MAX_ID_LEN + 1)] {
            assert!(!is_valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "\"********\"");
    }
}
