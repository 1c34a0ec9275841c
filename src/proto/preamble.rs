//! The eight bytes that open every link from a client to the server.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use bytes::{Buf, BytesMut};

use serde::Serialize;

use super::codec::{encode_frame, fill_to};
use super::ProtocolError;

/// Magic bytes that start every ferry link; they tell ferry apart from HTTP or TLS.
pub const MAGIC: &[u8; 5] = b"FERRY";
/// Version of the wire protocol spoken by this build (3: the login is a password-authenticated
/// key exchange, and control frames are sealed after it; 2 named the id in a hello first).
pub const PROTOCOL_VERSION: u16 = 3;
/// Length of the preamble in bytes.
pub const PREAMBLE_LEN: usize = 8;

/// What a new link from a client is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// The control connection: login, service registration, heartbeats.
    Control,
    /// A data connection: waits in the pool, then carries one visitor's bytes.
    Data,
    /// A forward link: a peer's connection to a P2P service, carried through the server.
    Forward,
}

impl LinkKind {
    fn to_byte(self) -> u8 {
        match self {
            LinkKind::Control => b'C',
            LinkKind::Data => b'D',
            LinkKind::Forward => b'F',
        }
    }

    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'C' => Some(LinkKind::Control),
            b'D' => Some(LinkKind::Data),
            b'F' => Some(LinkKind::Forward),
            _ => None,
        }
    }
}

/// The preamble bytes: `FERRY`, the protocol version (big-endian u16) and the link kind.
pub fn preamble(kind: LinkKind) -> [u8; PREAMBLE_LEN] {
    let mut bytes = [0u8; PREAMBLE_LEN];
    bytes[..5].copy_from_slice(MAGIC);
    bytes[5..7].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    bytes[7] = kind.to_byte();
    bytes
}

/// The preamble followed by the link's first frame, to leave in one write (so the server
/// gets both in one round trip).
pub fn preamble_with<M: Serialize>(kind: LinkKind, first: &M) -> Result<Vec<u8>, ProtocolError> {
    let mut bytes = preamble(kind).to_vec();
    encode_frame(first, &mut bytes)?;
    Ok(bytes)
}

/// Writes the preamble of a link.
pub async fn write_preamble<W: AsyncWrite + Unpin>(
    writer: &mut W,
    kind: LinkKind,
) -> Result<(), ProtocolError> {
    writer.write_all(&preamble(kind)).await?;
    Ok(())
}

/// Reads the preamble into `buf` (with whatever follows it in the same read) and takes it off.
pub async fn read_preamble_buffered<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<LinkKind, ProtocolError> {
    fill_to(reader, buf, PREAMBLE_LEN).await?;
    let mut bytes = [0u8; PREAMBLE_LEN];
    bytes.copy_from_slice(&buf[..PREAMBLE_LEN]);
    let kind = parse_preamble(&bytes)?;
    buf.advance(PREAMBLE_LEN);
    Ok(kind)
}

/// Reads and checks a preamble; a foreign version is reported, not guessed at.
pub async fn read_preamble<R: AsyncRead + Unpin>(reader: &mut R) -> Result<LinkKind, ProtocolError> {
    let mut bytes = [0u8; PREAMBLE_LEN];
    reader.read_exact(&mut bytes).await?;
    parse_preamble(&bytes)
}

fn parse_preamble(bytes: &[u8; PREAMBLE_LEN]) -> Result<LinkKind, ProtocolError> {
    if &bytes[..5] != MAGIC {
        return Err(ProtocolError::NotFerry);
    }
    let version = u16::from_be_bytes([bytes[5], bytes[6]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::VersionMismatch { peer: version, ours: PROTOCOL_VERSION });
    }
    LinkKind::from_byte(bytes[7]).ok_or(ProtocolError::Malformed("unknown link kind".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_rejections() {
        let mut buf = Vec::new();
        write_preamble(&mut buf, LinkKind::Data).await.unwrap();
        assert_eq!(read_preamble(&mut buf.as_slice()).await.unwrap(), LinkKind::Data);

        let http = *b"GET / HT";
        assert!(matches!(parse_preamble(&http), Err(ProtocolError::NotFerry)));

        let mut future = buf.clone();
        future[6] = 9;
        let err = read_preamble(&mut future.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::VersionMismatch { peer: 9, ours: PROTOCOL_VERSION }));

        let mut bad_kind = buf.clone();
        bad_kind[7] = b'?';
        assert!(read_preamble(&mut bad_kind.as_slice()).await.is_err());
    }
}
