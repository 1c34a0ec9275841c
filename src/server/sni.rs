//! TLS passthrough: route a visitor by the server name in its ClientHello and
//! relay the encrypted bytes untouched to a client's HTTPS service. The server
//! never sees the key or the plaintext.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::{debug, Instrument};

use super::dispatch::{dispatch, Candidate, Entrance, NotServed};
use super::handshakes::Handshake;
use super::hosts::{Hosts, Lookup};
use super::http::MAX_ATTEMPTS;
use super::ServerShared;
use crate::transport::reset_on_drop;

/// A TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;
/// Largest TLS record: the ClientHello must fit in one.
const MAX_RECORD: usize = 16 * 1024 + 256;

/// Serves one visitor of `sni-addr`.
pub(crate) async fn serve_visitor(
    shared: Arc<ServerShared>,
    mut visitor: TcpStream,
    peer: SocketAddr,
    handshake: Handshake,
) {
    let _ = visitor.set_nodelay(true);
    let limit = shared.config.http_header_timeout;
    let mut hello = BytesMut::with_capacity(1024);
    let name = match tokio::time::timeout(limit, read_client_hello(&mut visitor, &mut hello)).await {
        Ok(Some(name)) => name,
        Ok(None) => return debug!(%peer, "no server name in the TLS ClientHello; closing"),
        Err(_) => return debug!(%peer, "TLS ClientHello not complete in time; closing"),
    };
    drop(handshake);
    let label = name.split('.').next().unwrap_or_default().to_ascii_lowercase();
    let mut entrance = NameEntrance { label, hello: hello.freeze(), attempts: 0 };
    let span = tracing::debug_span!("tls visitor", %peer, ?name);
    dispatch(&shared, &mut entrance, &mut visitor, peer).instrument(span).await;
}

/// A TLS visitor, routed by the first label of its server name; each attempt looks the
/// route up again, so a client that left is replaced by the next one serving the name.
struct NameEntrance {
    label: String,
    /// The ClientHello as it came, passed through untouched.
    hello: Bytes,
    attempts: usize,
}

impl Entrance for NameEntrance {
    type Visitor = TcpStream;
    /// No tunnel serves the name.
    type Unrouted = ();
    const PASSES_ON_REFUSAL: bool = false;

    fn next_candidate(&mut self, shared: &ServerShared) -> Result<Candidate, NotServed<()>> {
        self.attempts += 1;
        if self.attempts > MAX_ATTEMPTS {
            return Err(NotServed::Exhausted);
        }
        let route = match Hosts::split_client(&self.label) {
            Some((cid, rest)) => shared.hosts.lookup_client(&sni_key(rest), cid),
            None => match shared.hosts.lookup(&sni_key(&self.label), false) {
                Lookup::Online(route) => Some(route),
                _ => None,
            },
        };
        let route = route.ok_or(NotServed::Unrouted(()))?;
        Ok(Candidate { session: route.session, tunnel: route.tunnel })
    }

    fn first_bytes(&mut self, _: &mut TcpStream) -> (Cow<'_, [u8]>, usize) {
        (Cow::Borrowed(&self.hello), self.hello.len())
    }

    async fn answer(&mut self, visitor: &mut TcpStream, why: NotServed<()>) {
        // TLS has no page to show: the visitor is closed (reset when cut off).
        if let NotServed::Cut = why {
            reset_on_drop(visitor);
        }
    }
}

/// The routing key of a passthrough host; kept apart from HTTP hosts of the same name.
pub(crate) fn sni_key(label: &str) -> String {
    format!("tls:{label}")
}

/// Reads the first TLS record into `buf` and returns the server name it asks for.
async fn read_client_hello(visitor: &mut TcpStream, buf: &mut BytesMut) -> Option<String> {
    while buf.len() < RECORD_HEADER {
        if visitor.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
    if buf[0] != 0x16 {
        return None; // not a handshake record
    }
    let len = RECORD_HEADER + usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if len > MAX_RECORD {
        return None;
    }
    while buf.len() < len {
        buf.reserve(len - buf.len());
        if visitor.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
    server_name(&buf[RECORD_HEADER..len])
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The host_name of the server_name extension of a ClientHello handshake message.
fn server_name(handshake: &[u8]) -> Option<String> {
    let mut r = Reader(handshake);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let body_len = r.take(3).map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))?;
    let mut hello = Reader(r.take(body_len)?);
    hello.take(2 + 32)?; // version, random
    hello.vec8()?; // session id
    hello.vec16()?; // cipher suites
    hello.vec8()?; // compression methods
    let mut extensions = Reader(hello.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind != 0 {
            continue;
        }
        let mut names = Reader(Reader(data).vec16()?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vec16()?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_owned);
            }
        }
    }
    None
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

    #[test]
    fn finds_the_name_in_a_real_hello_and_survives_garbage() {
        let hello = real_client_hello("web.example.test");
        assert_eq!(server_name(&hello[RECORD_HEADER..]).as_deref(), Some("web.example.test"));
        for cut in 0..hello.len() - RECORD_HEADER {
            // Truncated at any point: no panic, no name.
            let _ = server_name(&hello[RECORD_HEADER..RECORD_HEADER + cut]);
        }
        assert_eq!(server_name(&[1, 0xff, 0xff, 0xff, 3, 3]), None);
        assert_eq!(server_name(&[]), None);
    }
}
