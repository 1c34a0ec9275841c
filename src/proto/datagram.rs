//! How a UDP flow's datagrams travel, on byte slices and buffers.
//!
//! On a data connection (or a QUIC stream) each datagram is framed: a 2-byte big-endian
//! length and that many bytes, both ways; a UDP payload never needs more. Over QUIC,
//! datagrams travel as QUIC datagrams (RFC 9221) instead, each tagged with its flow's
//! number: 4 bytes big-endian, then the payload.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The header of a framed datagram: its big-endian length.
pub const DATAGRAM_HEADER: usize = 2;

/// Largest datagram a flow carries: whatever a UDP socket can deliver.
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// How much room each read of a link asks for.
const READ_SIZE: usize = 16 * 1024;

/// The tag in front of a QUIC datagram: the flow's number.
pub const FLOW_TAG: usize = 4;

/// A datagram longer than [`MAX_DATAGRAM`] cannot be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a datagram of {0} bytes is larger than any UDP datagram")]
pub struct DatagramTooLarge(pub usize);

/// Appends one framed datagram to `out`.
pub fn encode_datagram(payload: &[u8], out: &mut Vec<u8>) -> Result<(), DatagramTooLarge> {
    let len = u16::try_from(payload.len()).map_err(|_| DatagramTooLarge(payload.len()))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// Takes one whole framed datagram off the front of `buf`, if there is one.
pub fn take_datagram(buf: &mut BytesMut) -> Option<Bytes> {
    let header: [u8; DATAGRAM_HEADER] = buf.get(..DATAGRAM_HEADER)?.try_into().ok()?;
    let len = usize::from(u16::from_be_bytes(header));
    if buf.len() < DATAGRAM_HEADER + len {
        return None;
    }
    buf.advance(DATAGRAM_HEADER);
    Some(buf.split_to(len).freeze())
}

/// Reads the next framed datagram from `link`, keeping what it read past it in `buf`;
/// `None` at a clean end between datagrams. Cancel-safe: a datagram read in part stays in
/// `buf` for the next call.
pub async fn read_datagram<R>(link: &mut R, buf: &mut BytesMut) -> std::io::Result<Option<Bytes>>
where
    R: AsyncRead + Unpin + ?Sized,
{
    loop {
        if let Some(datagram) = take_datagram(buf) {
            return Ok(Some(datagram));
        }
        buf.reserve(READ_SIZE);
        if link.read_buf(buf).await? == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(std::io::ErrorKind::UnexpectedEof.into()),
            };
        }
    }
}

/// A QUIC datagram of flow `flow`.
pub fn tag_datagram(flow: u32, payload: &[u8]) -> Bytes {
    let mut tagged = Vec::with_capacity(FLOW_TAG + payload.len());
    tagged.extend_from_slice(&flow.to_be_bytes());
    tagged.extend_from_slice(payload);
    tagged.into()
}

/// The flow and payload of a QUIC datagram; `None` if it is too short to carry a tag.
pub fn untag_datagram(mut datagram: Bytes) -> Option<(u32, Bytes)> {
    let tag: [u8; FLOW_TAG] = datagram.get(..FLOW_TAG)?.try_into().ok()?;
    datagram.advance(FLOW_TAG);
    Some((u32::from_be_bytes(tag), datagram))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framed_datagrams_come_apart_whole_and_in_order() {
        let mut wire = Vec::new();
        for payload in [&b"first"[..], b"", &[7u8; 1500]] {
            encode_datagram(payload, &mut wire).unwrap();
        }
        let mut buf = BytesMut::from(&wire[..3]);
        assert_eq!(take_datagram(&mut buf), None, "a header and one byte are not a datagram");
        buf.extend_from_slice(&wire[3..]);
        assert_eq!(take_datagram(&mut buf).as_deref(), Some(&b"first"[..]));
        assert_eq!(take_datagram(&mut buf).as_deref(), Some(&b""[..]));
        assert_eq!(take_datagram(&mut buf).map(|d| d.len()), Some(1500));
        assert!(buf.is_empty());
        assert_eq!(encode_datagram(&vec![0; MAX_DATAGRAM + 1], &mut wire), Err(DatagramTooLarge(65_536)));
    }

    #[test]
    fn tags_name_the_flow() {
        assert_eq!(untag_datagram(tag_datagram(0x0102_0304, b"hi")), Some((0x0102_0304, Bytes::from("hi"))));
        assert_eq!(untag_datagram(Bytes::from_static(b"abc")), None);
    }

    #[tokio::test]
    async fn a_link_that_ends_inside_a_datagram_is_an_error() {
        let mut wire = Vec::new();
        encode_datagram(b"whole", &mut wire).unwrap();
        let (mut buf, mut link) = (BytesMut::new(), &wire[..]);
        assert_eq!(read_datagram(&mut link, &mut buf).await.unwrap().as_deref(), Some(&b"whole"[..]));
        assert_eq!(read_datagram(&mut link, &mut buf).await.unwrap(), None);
        let (mut buf, mut cut) = (BytesMut::new(), &wire[..4]);
        assert!(read_datagram(&mut cut, &mut buf).await.is_err());
    }
}
