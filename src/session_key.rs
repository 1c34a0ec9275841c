//! The key client and server share for one session, and the sub-keys derived from it.
//! It lives apart from `auth` (which agrees on it) so that `seal` and `proto` can use
//! it without depending on the login.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// The key client and server share for one session. Sub-keys for every use are derived
/// from it with HMAC-SHA256 and a label.
#[derive(Clone)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    pub(crate) fn derive(kind: &[u8], shared: &[u8], hello: &[u8; 32]) -> Self {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(shared).expect("hmac takes any key length");
        mac.update(b"ferry v3 session key\0");
        mac.update(kind);
        mac.update(hello);
        SessionKey(mac.finalize().into_bytes().into())
    }

    /// A 32-byte sub-key for `label` and `context`.
    pub(crate) fn subkey(&self, label: &[u8], context: &[u8]) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0).expect("hmac takes any key length");
        mac.update(&(label.len() as u64).to_be_bytes());
        mac.update(label);
        mac.update(context);
        mac.finalize().into_bytes().into()
    }

    pub(crate) fn client_confirm(&self) -> [u8; 32] {
        self.subkey(b"client confirm", &[])
    }

    /// The server's proof, in its welcome, that it derived the same key (and so knows the
    /// user's verifier), binding the session number and heartbeat it announces.
    pub fn welcome_confirm(&self, session: u64, heartbeat_interval_ms: u64) -> [u8; 32] {
        let mut context = session.to_be_bytes().to_vec();
        context.extend_from_slice(&heartbeat_interval_ms.to_be_bytes());
        self.subkey(b"server confirm", &context)
    }

    /// Checks the welcome's proof in constant time.
    pub fn check_welcome(&self, session: u64, heartbeat_interval_ms: u64, confirm: &[u8; 32]) -> bool {
        self.welcome_confirm(session, heartbeat_interval_ms).ct_eq(confirm).into()
    }

    /// MAC that proves a data connection belongs to `session`, numbered `seq`.
    pub fn data_mac(&self, session: u64, seq: u64) -> [u8; 32] {
        let mut context = session.to_be_bytes().to_vec();
        context.extend_from_slice(&seq.to_be_bytes());
        self.subkey(b"data connection", &context)
    }

    /// Checks a data connection's MAC in constant time.
    pub fn verify_data_mac(&self, session: u64, seq: u64, mac: &[u8; 32]) -> bool {
        self.data_mac(session, seq).ct_eq(mac).into()
    }
}
