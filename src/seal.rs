//! Encryption with a session's key: the frames of a control connection, and the bytes of
//! a data connection for services with `encrypt` (frp's `use_encryption`).
//!
//! Both use ChaCha20-Poly1305 with one key per direction (derived from the session key)
//! and a counter as the nonce, so no nonce repeats under a key, and a frame or record
//! that was dropped, reordered, replayed or changed fails to open.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::session_key::SessionKey;

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
pub struct Sealer {
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

/// Largest plain payload of one sealed record on a data connection.
pub const MAX_RECORD: usize = 16 * 1024;

/// Record header: the big-endian length of the sealed payload (tag included).
const RECORD_HEADER: usize = 4;

/// The keys of one visitor of the `encrypt` service `service`, numbered `visit` by the
/// server (see `OpenStream::seal`; the client refuses a number it has seen, so no key is
/// used twice). The service is bound in: an open message whose service number was changed
/// on its way leads to keys under which the visitor's records do not open.
pub fn visitor_keys(
    key: &SessionKey,
    session: u64,
    service: u32,
    visit: u64,
    side: Side,
) -> (Sealer, Sealer) {
    let mut context = session.to_be_bytes().to_vec();
    context.extend_from_slice(&service.to_be_bytes());
    context.extend_from_slice(&visit.to_be_bytes());
    directional(key, b"data", &context, side)
}

/// A data connection's bytes for one visitor, sealed in records: a 4-byte length and that
/// many bytes of ChaCha20-Poly1305 output, at most [`MAX_RECORD`] plain bytes each.
///
/// Each `poll_write` seals at most one record and reports its bytes written only once the
/// whole record is out, so nothing waits in here for a flush; callers retry a pending write
/// with the same bytes, as `write_all` and the chunked relay do. Reads open whole records.
/// Raw bytes read past the last record are kept: after a visitor they begin the next open
/// message ([`SealedStream::into_parts`]).
pub struct SealedStream<S> {
    inner: S,
    outgoing: Sealer,
    incoming: Sealer,
    /// A sealed record being written, and how many plain bytes it carries.
    pending: Option<(Vec<u8>, usize)>,
    written: usize,
    /// Raw bytes read and not yet opened.
    raw: bytes::BytesMut,
    /// Opened bytes not yet read: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Where raw bytes are read to.
    scratch: Box<[u8]>,
}

impl<S> SealedStream<S> {
    /// Wraps `inner`; `raw` holds bytes already read from it (the start of the first record).
    pub fn new(inner: S, (outgoing, incoming): (Sealer, Sealer), raw: bytes::BytesMut) -> Self {
        let scratch = vec![0u8; 8 * 1024].into_boxed_slice();
        let (pending, written, plain, plain_pos) = (None, 0, Vec::new(), 0);
        SealedStream { inner, outgoing, incoming, pending, written, raw, plain, plain_pos, scratch }
    }

    /// Seals `plain` as records and appends them to `out` (for bytes that leave in the
    /// same write as an unsealed message).
    pub fn seal_into(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        for part in plain.chunks(MAX_RECORD) {
            let mut record = part.to_vec();
            self.outgoing.seal(&mut record);
            out.extend_from_slice(&(record.len() as u32).to_be_bytes());
            out.extend_from_slice(&record);
        }
    }

    /// The inner stream, for bytes that go out unsealed.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner stream, and raw bytes read past the last record; `None` when opened bytes
    /// were left unread (the peer sent past its end).
    pub fn into_parts(self) -> Option<(S, bytes::BytesMut)> {
        (self.plain_pos == self.plain.len() && self.pending.is_none()).then_some((self.inner, self.raw))
    }

    /// Opens the record at the front of `raw`, if it is all there.
    fn open_buffered(&mut self) -> io::Result<bool> {
        let Some(header) = self.raw.get(..RECORD_HEADER) else { return Ok(false) };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if !(TAG_LEN..=MAX_RECORD + TAG_LEN).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a sealed record of {len} bytes"),
            ));
        }
        if self.raw.len() < RECORD_HEADER + len {
            self.raw.reserve(RECORD_HEADER + len - self.raw.len());
            return Ok(false);
        }
        let mut record = self.raw.split_to(RECORD_HEADER + len);
        let body = &mut record[RECORD_HEADER..];
        let plain = self.incoming.open(body).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "a sealed record failed authentication")
        })?;
        self.plain.clear();
        self.plain.extend_from_slice(&body[..plain]);
        self.plain_pos = 0;
        Ok(true)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SealedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.plain_pos < this.plain.len() {
                let n = (this.plain.len() - this.plain_pos).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                return Poll::Ready(Ok(()));
            }
            if this.open_buffered()? {
                continue;
            }
            let mut scratch = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut scratch))?;
            this.raw.extend_from_slice(scratch.filled());
            if scratch.filled().is_empty() {
                return match this.raw.is_empty() {
                    true => Poll::Ready(Ok(())),
                    false => Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                };
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SealedStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let take = buf.len().min(MAX_RECORD);
            let mut record = Vec::with_capacity(RECORD_HEADER + take + TAG_LEN);
            record.extend_from_slice(&[0; RECORD_HEADER]);
            record.extend_from_slice(&buf[..take]);
            let mut body = record.split_off(RECORD_HEADER);
            this.outgoing.seal(&mut body);
            record[..RECORD_HEADER].copy_from_slice(&(body.len() as u32).to_be_bytes());
            record.extend_from_slice(&body);
            this.pending = Some((record, take));
            this.written = 0;
        }
        let Some((record, carried)) = this.pending.as_ref() else { return Poll::Ready(Ok(0)) };
        while this.written < record.len() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &record[this.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.written += n;
        }
        let carried = *carried;
        this.pending = None;
        Poll::Ready(Ok(carried))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

#[cfg(test)]
mod stream_tests {
    use super::*;
    use crate::auth::{client_pake, ServerPake, Verifier};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn key() -> SessionKey {
        let verifier = Verifier::plain("id", &crate::auth::Secret::new("s"));
        let server = ServerPake::start("id", &verifier, [0; 32]);
        client_pake("id", &verifier, server.message(), [0; 32]).unwrap().key
    }

    #[tokio::test]
    async fn sealed_bytes_arrive_whole_and_leave_what_follows() {
        let key = key();
        let (a, b) = tokio::io::duplex(1000);
        let mut client = SealedStream::new(a, visitor_keys(&key, 1, 7, 5, Side::Client), Default::default());
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            let (mut raw, _) = client.into_parts().unwrap();
            raw.write_all(b"NEXT").await.unwrap();
        });
        let mut server = SealedStream::new(b, visitor_keys(&key, 1, 7, 5, Side::Server), Default::default());
        let mut got = vec![0u8; data.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, data);
        writer.await.unwrap();
        let (mut raw, leftover) = server.into_parts().unwrap();
        let mut rest = leftover.to_vec();
        while rest.len() < 4 {
            let mut more = [0u8; 4];
            let n = raw.read(&mut more).await.unwrap();
            rest.extend_from_slice(&more[..n]);
        }
        assert_eq!(rest, b"NEXT");
    }

    #[tokio::test]
    async fn compressed_inside_sealed_goes_both_ways() {
        use crate::relay::compress::compressed;
        let key = key();
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let mut client =
            SealedStream::new(&mut a, visitor_keys(&key, 1, 7, 5, Side::Client), Default::default());
        let mut server =
            SealedStream::new(&mut b, visitor_keys(&key, 1, 7, 5, Side::Server), Default::default());
        let mut client = compressed(&mut client, Default::default());
        let mut server = compressed(&mut server, Default::default());
        for line in [&b"ping\n"[..], b"a longer line, and then some\n"] {
            client.write_all(line).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0u8; line.len()];
            tokio::time::timeout(std::time::Duration::from_secs(2), server.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, line);
            server.write_all(line).await.unwrap();
            server.flush().await.unwrap();
            tokio::time::timeout(std::time::Duration::from_secs(2), client.read_exact(&mut got))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(got, line);
        }
    }

    #[tokio::test]
    async fn another_visit_number_service_or_a_changed_byte_does_not_open() {
        let key = key();
        let mut sealed = Vec::new();
        SealedStream::new(Vec::<u8>::new(), visitor_keys(&key, 1, 7, 5, Side::Client), Default::default())
            .seal_into(b"secret request", &mut sealed);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        async fn read_as(key: &SessionKey, bytes: Vec<u8>, service: u32, visit: u64) -> io::Result<Vec<u8>> {
            let keys = visitor_keys(key, 1, service, visit, Side::Server);
            let mut server = SealedStream::new(&bytes[..], keys, Default::default());
            let mut out = Vec::new();
            server.read_to_end(&mut out).await.map(|_| out)
        }
        let read = |bytes: Vec<u8>, visit: u64| read_as(&key, bytes, 7, visit);
        assert_eq!(read(sealed.clone(), 5).await.unwrap(), b"secret request");
        assert!(read(sealed.clone(), 6).await.is_err(), "another visitor's key");
        assert!(read_as(&key, sealed.clone(), 8, 5).await.is_err(), "another service's key");
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(read(changed, 5).await.is_err(), "a changed byte");
        let mut huge = sealed.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(read(huge, 5).await.is_err(), "a length over the cap");
        assert!(read(sealed[..sealed.len() - 1].to_vec(), 5).await.is_err(), "a cut record");
    }
}
