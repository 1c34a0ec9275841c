//! The chunk format of a data connection, on byte slices (no sockets).
//!
//! After the open message, visitor bytes travel as chunks both ways: a 4-byte big-endian
//! length (at most [`MAX_CHUNK`]) and that many bytes. A zero length ends one direction (a
//! half-close). The client's direction starts with one status byte ([`StreamStatus`]).
//! The relay (`crate::relay`) streams payloads through its buffers; this module only says
//! what the front of the unparsed bytes is.

use super::StreamStatus;

/// The chunk header: a big-endian payload length.
pub const CHUNK_HEADER: usize = 4;

/// Largest chunk length accepted from a peer (chunks are streamed, never buffered whole).
pub const MAX_CHUNK: u32 = 1 << 20;

/// Appends one chunk (header and payload) to `out`; an empty payload is the end marker.
pub fn encode_chunk(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&chunk_header(payload.len()));
    out.extend_from_slice(payload);
}

/// The header of a chunk of `len` bytes (callers keep `len` within [`MAX_CHUNK`]).
pub fn chunk_header(len: usize) -> [u8; CHUNK_HEADER] {
    (len as u32).to_be_bytes()
}

/// What the front of a data connection's unparsed bytes holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkFront {
    /// The status byte that opens the client's direction.
    Status(StreamStatus),
    /// A chunk header: this many payload bytes follow.
    Chunk(usize),
    /// The end marker: this direction is over.
    End,
}

/// A chunk header that announces more than [`MAX_CHUNK`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a chunk of {0} bytes exceeds the limit of {MAX_CHUNK}")]
pub struct ChunkTooLarge(pub u32);

/// Parses the status byte (when `expect_status`) or the chunk header at the front of
/// `input`: what it is and how many bytes it took, or `None` when more bytes are needed.
pub fn parse_front(input: &[u8], expect_status: bool) -> Result<Option<(ChunkFront, usize)>, ChunkTooLarge> {
    if expect_status {
        return Ok(input.first().map(|&byte| (ChunkFront::Status(StreamStatus::from_byte(byte)), 1)));
    }
    let Some(header) = input.get(..CHUNK_HEADER) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if len > MAX_CHUNK {
        return Err(ChunkTooLarge(len));
    }
    let front = if len == 0 { ChunkFront::End } else { ChunkFront::Chunk(len as usize) };
    Ok(Some((front, CHUNK_HEADER)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fronts_parse_from_slices() {
        let mut bytes = Vec::new();
        encode_chunk(b"hello", &mut bytes);
        encode_chunk(b"", &mut bytes);
        assert_eq!(parse_front(&bytes, false), Ok(Some((ChunkFront::Chunk(5), 4))));
        assert_eq!(parse_front(&bytes[9..], false), Ok(Some((ChunkFront::End, 4))));
        assert_eq!(parse_front(&bytes[..3], false), Ok(None), "a partial header needs more");
        assert_eq!(parse_front(&[], true), Ok(None));
        assert_eq!(parse_front(&[0, 9], true), Ok(Some((ChunkFront::Status(StreamStatus::Ready), 1))));
        let refused = parse_front(&[1], true);
        assert_eq!(refused, Ok(Some((ChunkFront::Status(StreamStatus::LocalUnavailable), 1))));
        let huge = (MAX_CHUNK + 1).to_be_bytes();
        assert_eq!(parse_front(&huge, false), Err(ChunkTooLarge(MAX_CHUNK + 1)));
        assert_eq!(parse_front(&MAX_CHUNK.to_be_bytes(), false), Ok(Some((ChunkFront::Chunk(1 << 20), 4))));
    }
}
