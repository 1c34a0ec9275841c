//! TLS passthrough: route a visitor by the server name in its ClientHello and
//! relay the encrypted bytes untouched to a client's HTTPS service. The server
//! never sees the key or the plaintext.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{debug, Instrument};

use super::dispatch::{dispatch, Attempts, Entrance, NotServed};
use super::endpoints::{Endpoint, Member};
use super::handshakes::Handshake;
use super::hosts::{split_client, Lookup, NameKind};
use super::nodes::Arrived;
use super::tcp::PortVisitor;
use super::{nodes, ServerShared};

/// Most bytes a ClientHello may take, over however many TLS records: rustls reads
/// handshake messages of up to 64 KiB.
pub(crate) const MAX_HELLO: usize = 64 * 1024 + 1024;

/// Serves one visitor of `sni-addr` (or one another node relayed from its `sni-addr`).
pub(crate) async fn serve_visitor<V: PortVisitor>(
    shared: Arc<ServerShared>,
    mut visitor: V,
    (peer, arrived): (SocketAddr, Arrived),
    handshake: Handshake,
) {
    let limit = shared.config.http_header_timeout;
    let mut hello = BytesMut::with_capacity(1024);
    let name = match tokio::time::timeout(limit, read_client_hello(&mut visitor, &mut hello)).await {
        Ok(Some(name)) => name,
        Ok(None) => return debug!(%peer, "no server name in the TLS ClientHello; closing"),
        Err(_) => return debug!(%peer, "TLS ClientHello not complete in time; closing"),
    };
    drop(handshake);
    let label = name.split('.').next().unwrap_or_default().to_ascii_lowercase();
    if arrived == Arrived::Here && nodes::held_elsewhere(&shared, &label, NameKind::Sni) {
        let public = visitor.public_addr();
        return nodes::relay_name(
            &shared,
            (&label, nodes::NodeEntrance::Sni),
            (visitor, &hello),
            (peer, public),
        )
        .await;
    }
    let mut entrance =
        NameEntrance { label, hello: hello.freeze(), attempts: Attempts::default(), visitor: PhantomData };
    let span = tracing::debug_span!("tls visitor", %peer, ?name);
    dispatch(&shared, &mut entrance, &mut visitor, peer).instrument(span).await;
}

/// A TLS visitor, routed by the first label of its server name; each attempt looks the
/// route up again, so a client that left is replaced by the next one serving the name.
struct NameEntrance<V> {
    label: String,
    /// The ClientHello as it came, passed through untouched.
    hello: Bytes,
    attempts: Attempts,
    visitor: PhantomData<fn(V)>,
}

impl<V: PortVisitor> Entrance for NameEntrance<V> {
    type Visitor = V;
    /// No tunnel serves the name.
    type Unrouted = ();
    const PASSES_ON_REFUSAL: bool = false;

    fn next_candidate(&mut self, shared: &ServerShared) -> Result<Member, NotServed<()>> {
        self.attempts.another()?;
        let member = match split_client(&self.label) {
            Some((cid, rest)) => shared.endpoints.lookup_client(&Endpoint::Sni(rest.to_owned()), cid),
            None => match shared.endpoints.lookup(&Endpoint::Sni(self.label.clone()), false) {
                Lookup::Online(member) => Some(member),
                _ => None,
            },
        };
        member.ok_or(NotServed::Unrouted(()))
    }

    fn first_bytes(&mut self, _: &mut V) -> (Cow<'_, [u8]>, usize) {
        (Cow::Borrowed(&self.hello), self.hello.len())
    }

    async fn answer(&mut self, visitor: &mut V, why: NotServed<()>) {
        // TLS has no page to show: the visitor is closed (reset when cut off).
        if let NotServed::Cut = why {
            visitor.reset_on_drop();
        }
    }
}

/// Reads the visitor's ClientHello into `raw`, over as many TLS records as it takes, and
/// returns the server name it asks for. `raw` keeps every byte read, untouched, to be
/// passed through.
pub(crate) async fn read_client_hello<R>(visitor: &mut R, raw: &mut BytesMut) -> Option<String>
where
    R: AsyncRead + Unpin,
{
    let mut acceptor = Acceptor::default();
    loop {
        let fed = raw.len();
        raw.reserve(4096);
        if visitor.read_buf(raw).await.ok()? == 0 || raw.len() > MAX_HELLO {
            return None;
        }
        let mut fresh = &raw[fed..];
        while !fresh.is_empty() {
            if acceptor.read_tls(&mut fresh).ok()? == 0 {
                return None;
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return accepted.client_hello().server_name().map(str::to_owned),
            Ok(None) => {}
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls sends it, captured from a real handshake.
    fn real_client_hello(name: &str) -> Vec<u8> {
        let config = crate::transport::client_tls_config(&crate::transport::RemoteTrust::Insecure).unwrap();
        let name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// A TLS record header: type, version, length.
    const RECORD_HEADER: usize = 5;

    /// The handshake message of a one-record `hello` sent over two records, split at `at`.
    fn split_over_two_records(hello: &[u8], at: usize) -> Vec<u8> {
        let (header, message) = hello.split_at(RECORD_HEADER);
        let mut records = Vec::new();
        for part in [&message[..at], &message[at..]] {
            records.extend_from_slice(&header[..3]); // content type and version
            records.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
            records.extend_from_slice(part);
        }
        records
    }

    async fn name_and_raw(mut bytes: &[u8]) -> (Option<String>, Vec<u8>) {
        let mut raw = BytesMut::new();
        let name = read_client_hello(&mut bytes, &mut raw).await;
        (name, raw.to_vec())
    }

    #[tokio::test]
    async fn finds_the_name_in_a_real_hello_and_survives_garbage() {
        let hello = real_client_hello("web.example.test");
        assert_eq!(hello[0], 0x16, "one handshake record");
        let (name, raw) = name_and_raw(&hello).await;
        assert_eq!(name.as_deref(), Some("web.example.test"));
        assert_eq!(raw, hello, "the bytes are kept for passthrough");
        for cut in 0..hello.len() {
            // Cut off at any point: no panic, no name.
            assert_eq!(name_and_raw(&hello[..cut]).await.0, None, "cut at {cut}");
        }
        assert_eq!(name_and_raw(b"GET / HTTP/1.1\r\n\r\n").await.0, None);
        assert_eq!(name_and_raw(&[0x16, 3, 1, 0xff, 0xff, 1, 0xff, 0xff, 0xff]).await.0, None);
    }

    #[tokio::test]
    async fn a_hello_split_over_two_records_is_read_whole() {
        let hello = real_client_hello("split.example.test");
        let message_len = hello.len() - RECORD_HEADER;
        for at in [1, 4, message_len / 2, message_len - 1] {
            let records = split_over_two_records(&hello, at);
            // Through a pipe with a tiny buffer, so the records arrive in pieces too.
            let (mut near, mut far) = tokio::io::duplex(7);
            let sent = records.clone();
            let writer =
                tokio::spawn(async move { tokio::io::AsyncWriteExt::write_all(&mut far, &sent).await });
            let mut raw = BytesMut::new();
            let name = read_client_hello(&mut near, &mut raw).await;
            assert_eq!(name.as_deref(), Some("split.example.test"), "split at {at}");
            assert_eq!(raw.as_ref(), records.as_slice(), "both records kept untouched");
            writer.await.unwrap().unwrap();
        }
    }
}
