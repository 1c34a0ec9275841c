//! Encryption with a session's key: the frames of a control connection, and the bytes of
//! a data connection for services with `encrypt`.
//!
//! Both use ChaCha20-Poly1305 with one key per direction (derived from the session key)
//! and a counter as the nonce, so no nonce repeats under a key, and a frame or record
//! that was dropped, reordered, replayed or changed fails to open.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

use crate::auth::SessionKey;

/// Bytes the tag adds to each sealed frame or record.
pub const TAG_LEN: usize = 16;

/// Which end of a connection this is; each direction has its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client end.
    Client,
    /// The server end.
    Server,
}

/// A ChaCha20-Poly1305 key from 32 bytes.
pub(crate) fn aead_key(bytes: &[u8; 32]) -> LessSafeKey {
    let unbound = UnboundKey::new(&aead::CHACHA20_POLY1305, bytes).expect("a 32-byte ChaCha20 key");
    LessSafeKey::new(unbound)
}

fn counter_nonce(counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(nonce)
}

/// One direction's key and the number of the next message.
pub(crate) struct Sealer {
    key: LessSafeKey,
    counter: u64,
}

impl Sealer {
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        Sealer { key: aead_key(key), counter: 0 }
    }

    /// Encrypts `buf` in place and appends the tag.
    pub(crate) fn seal(&mut self, buf: &mut Vec<u8>) {
        let nonce = counter_nonce(self.counter);
        self.counter += 1;
        // Fails only past 256 GiB in one message; callers cap messages far below that.
        if self.key.seal_in_place_append_tag(nonce, Aad::empty(), buf).is_err() {
            buf.clear();
        }
    }

    /// Decrypts `buf` in place; the plain length, or `None` if it does not open.
    pub(crate) fn open(&mut self, buf: &mut [u8]) -> Option<usize> {
        let nonce = counter_nonce(self.counter);
        let plain = self.key.open_in_place(nonce, Aad::empty(), buf).ok()?.len();
        self.counter += 1;
        Some(plain)
    }
}

/// The two directional keys of one connection, from one side's view.
pub(crate) fn directional(key: &SessionKey, label: &[u8], context: &[u8], side: Side) -> (Sealer, Sealer) {
    let mut c2s_label = label.to_vec();
    c2s_label.extend_from_slice(b" c2s");
    let mut s2c_label = label.to_vec();
    s2c_label.extend_from_slice(b" s2c");
    let c2s = Sealer::new(&key.subkey(&c2s_label, context));
    let s2c = Sealer::new(&key.subkey(&s2c_label, context));
    match side {
        Side::Client => (c2s, s2c),
        Side::Server => (s2c, c2s),
    }
}

/// Encrypts and authenticates the frames of a control connection after the login.
pub struct FrameCipher {
    outgoing: Sealer,
    incoming: Sealer,
}

impl FrameCipher {
    /// The cipher of `side` for the session with `key`.
    pub fn new(key: &SessionKey, side: Side) -> Self {
        let (outgoing, incoming) = directional(key, b"control", &[], side);
        FrameCipher { outgoing, incoming }
    }

    /// Seals one frame body in place.
    pub(crate) fn seal(&mut self, body: &mut Vec<u8>) {
        self.outgoing.seal(body);
    }

    /// Opens one frame body; `None` when it was not sealed by the peer, in this order.
    pub(crate) fn open<'a>(&mut self, body: &'a mut [u8]) -> Option<&'a [u8]> {
        let plain = self.incoming.open(body)?;
        Some(&body[..plain])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{client_pake, ServerPake, Verifier};

    fn keys() -> (SessionKey, SessionKey) {
        let verifier = Verifier::plain("id", &crate::auth::Secret::new("s"));
        let server = ServerPake::start("id", &verifier, [0; 32]);
        let client = client_pake("id", &verifier, server.message(), [0; 32]).unwrap();
        (client.key.clone(), server.finish(&client.message, &client.confirm).unwrap())
    }

    #[test]
    fn frames_open_once_in_order_and_only_unchanged() {
        let (client_key, server_key) = keys();
        let mut client = FrameCipher::new(&client_key, Side::Client);
        let mut server = FrameCipher::new(&server_key, Side::Server);
        let mut first = b"hello".to_vec();
        client.seal(&mut first);
        let mut second = b"world".to_vec();
        client.seal(&mut second);
        assert_eq!(first.len(), 5 + TAG_LEN);
        assert!(!first.windows(5).any(|w| w == b"hello"));
        assert!(server.open(&mut second.clone()).is_none(), "out of order");
        assert_eq!(server.open(&mut first.clone()).unwrap(), b"hello");
        let mut changed = second.clone();
        changed[0] ^= 1;
        assert!(server.open(&mut changed).is_none(), "changed");
        assert_eq!(server.open(&mut second).unwrap(), b"world");
        assert!(server.open(&mut first).is_none(), "replayed");
        // The other direction has its own key: a frame cannot be reflected back.
        let mut reflected = b"ping".to_vec();
        server.seal(&mut reflected);
        assert!(FrameCipher::new(&server_key, Side::Server).open(&mut reflected.clone()).is_none());
        assert_eq!(client.open(&mut reflected).unwrap(), b"ping");
    }
}
