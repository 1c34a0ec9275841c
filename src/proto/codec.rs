//! Framing: a 4-byte big-endian length, then a JSON body, never longer than [`MAX_FRAME_LEN`].

use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Framed, FramedParts, LengthDelimitedCodec, LengthDelimitedCodecError};

use crate::seal::{FrameCipher, TAG_LEN};

/// Largest frame either side accepts; a longer length prefix is an error before any allocation.
pub const MAX_FRAME_LEN: usize = 64 * 1024;

/// What can go wrong while speaking the protocol.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed. The text shows the cause, which is not also a `source()`: an error
    /// chain printed whole (`{:#}`) would say it twice.
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// The peer did not answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The first bytes were not a ferry preamble.
    #[error("not a ferry peer (bad magic bytes)")]
    NotFerry,
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: peer speaks {peer}, this build speaks {ours}; run the same ferry version on both sides")]
    VersionMismatch {
        /// The peer's version.
        peer: u16,
        /// Ours.
        ours: u16,
    },
    /// A frame announced (or would take) more bytes than allowed.
    #[error("a frame over the limit of {MAX_FRAME_LEN} bytes")]
    FrameTooLarge,
    /// A frame did not decode as the expected message. The decoder's words may quote what
    /// the peer sent, so the text escapes line breaks and quotes: it goes to logs.
    #[error("malformed message: {}", .0.escape_debug())]
    Malformed(String),
}

impl From<std::io::Error> for ProtocolError {
    fn from(err: std::io::Error) -> Self {
        ProtocolError::Io(err)
    }
}

impl ProtocolError {
    fn from_codec(err: std::io::Error) -> Self {
        // LengthDelimitedCodec reports oversized frames as InvalidData, with its own error inside.
        if err.get_ref().is_some_and(|inner| inner.is::<LengthDelimitedCodecError>()) {
            ProtocolError::FrameTooLarge
        } else if err.kind() == std::io::ErrorKind::InvalidData {
            ProtocolError::Malformed(err.to_string())
        } else {
            ProtocolError::Io(err)
        }
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_FRAME_LEN).new_codec()
}

/// A control connection: typed messages in both directions over any byte stream.
pub struct ControlChannel<S> {
    framed: Framed<S, LengthDelimitedCodec>,
    /// Seals and opens every frame once the login agreed on a key.
    cipher: Option<FrameCipher>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ControlChannel<S> {
    /// Wraps a stream whose preamble has already been exchanged.
    pub fn new(stream: S) -> Self {
        Self { framed: Framed::new(stream, codec()), cipher: None }
    }

    /// Wraps a stream of which `read` bytes were already read (they are parsed first).
    pub fn with_buffer(stream: S, read: BytesMut) -> Self {
        let mut parts = FramedParts::new::<bytes::Bytes>(stream, codec());
        parts.read_buf = read;
        Self { framed: Framed::from_parts(parts), cipher: None }
    }

    /// Seals every later frame and expects every later frame sealed (after the login).
    pub fn encrypt(&mut self, cipher: FrameCipher) {
        self.cipher = Some(cipher);
    }

    /// Encodes and sends one message.
    pub async fn send<M: Serialize>(&mut self, message: &M) -> Result<(), ProtocolError> {
        let mut body = serde_json::to_vec(message).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        if let Some(cipher) = self.cipher.as_mut() {
            if body.len() + TAG_LEN > MAX_FRAME_LEN {
                return Err(ProtocolError::FrameTooLarge);
            }
            cipher.seal(&mut body);
        }
        self.framed.send(bytes::Bytes::from(body)).await.map_err(ProtocolError::from_codec)
    }

    /// Receives one message; a clean close is [`ProtocolError::Closed`].
    pub async fn recv<M: DeserializeOwned>(&mut self) -> Result<M, ProtocolError> {
        match self.framed.next().await {
            Some(Ok(mut frame)) => match self.cipher.as_mut() {
                Some(cipher) => match cipher.open(&mut frame) {
                    Some(plain) => decode(plain),
                    None => Err(ProtocolError::Malformed("a control frame failed authentication".into())),
                },
                None => decode(&frame),
            },
            Some(Err(err)) => Err(ProtocolError::from_codec(err)),
            None => Err(ProtocolError::Closed),
        }
    }

    /// Like [`recv`](Self::recv), but gives up after `limit`.
    pub async fn recv_timeout<M: DeserializeOwned>(&mut self, limit: Duration) -> Result<M, ProtocolError> {
        tokio::time::timeout(limit, self.recv()).await.map_err(|_| ProtocolError::Timeout(limit))?
    }
}

fn decode<M: DeserializeOwned>(frame: &[u8]) -> Result<M, ProtocolError> {
    serde_json::from_slice(frame).map_err(|e| ProtocolError::Malformed(e.to_string()))
}

/// Writes one frame straight to a stream (used on data connections, which turn raw afterwards).
pub async fn write_frame<W: AsyncWrite + Unpin, M: Serialize>(
    writer: &mut W,
    message: &M,
) -> Result<(), ProtocolError> {
    let mut bytes = Vec::with_capacity(128);
    encode_frame(message, &mut bytes)?;
    writer.write_all(&bytes).await?;
    Ok(())
}

/// Appends one encoded frame (length prefix and JSON body) to `out`.
pub fn encode_frame<M: Serialize>(message: &M, out: &mut Vec<u8>) -> Result<(), ProtocolError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *out, message).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let len = out.len() - start - 4;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge);
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Reads until `buf` holds at least `len` bytes; a close before that is [`ProtocolError::Closed`].
pub(crate) async fn fill_to<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    len: usize,
) -> Result<(), ProtocolError> {
    while buf.len() < len {
        buf.reserve(len - buf.len());
        if reader.read_buf(buf).await? == 0 {
            return Err(ProtocolError::Closed);
        }
    }
    Ok(())
}

/// Takes one frame off the front of `buf`, reading more when it is incomplete.
///
/// Bytes after the frame stay in `buf`: a caller that turns the stream raw must
/// pass them on. Reading in whole chunks saves a system call per frame.
pub async fn read_frame_buffered<R: AsyncRead + Unpin, M: DeserializeOwned>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<M, ProtocolError> {
    fill_to(reader, buf, 4).await?;
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge);
    }
    fill_to(reader, buf, 4 + len).await?;
    buf.advance(4);
    let body = buf.split_to(len);
    decode(&body)
}

/// Reads exactly one frame and nothing after it, so raw bytes that follow stay in the stream.
pub async fn read_frame<R: AsyncRead + Unpin, M: DeserializeOwned>(
    reader: &mut R,
) -> Result<M, ProtocolError> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await.map_err(eof_as_closed)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge);
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(eof_as_closed)?;
    decode(&body)
}

fn eof_as_closed(err: std::io::Error) -> ProtocolError {
    if err.kind() == std::io::ErrorKind::UnexpectedEof {
        ProtocolError::Closed
    } else {
        ProtocolError::Io(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ClientMessage, OpenStream};

    #[test]
    fn malformed_text_cannot_forge_log_lines() {
        let err = ProtocolError::Malformed("unknown variant `x\nforged line`".into());
        assert_eq!(err.to_string(), "malformed message: unknown variant `x\\nforged line`");
    }

    #[tokio::test]
    async fn frames_survive_tiny_buffers() {
        let (a, b) = tokio::io::duplex(3);
        let mut left = ControlChannel::new(a);
        let mut right = ControlChannel::new(b);
        let sender = tokio::spawn(async move {
            for seq in 0..20 {
                left.send(&ClientMessage::Ping { seq }).await.unwrap();
            }
        });
        for expected in 0..20 {
            match right.recv::<ClientMessage>().await.unwrap() {
                ClientMessage::Ping { seq } => assert_eq!(seq, expected),
                other => panic!("unexpected {other:?}"),
            }
        }
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocation() {
        let mut bytes = (u32::MAX).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"xx");
        let err = read_frame::<_, OpenStream>(&mut bytes.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge));

        let (a, mut b) = tokio::io::duplex(64);
        let mut chan = ControlChannel::new(a);
        b.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let err = chan.recv::<ClientMessage>().await.unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge), "{err:?}");
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_errors() {
        let mut truncated = 10u32.to_be_bytes().to_vec();
        truncated.extend_from_slice(b"{\"a\"");
        let err = read_frame::<_, OpenStream>(&mut truncated.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Closed));

        let mut garbage = 4u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"\xff\x00\x01\x02");
        let err = read_frame::<_, OpenStream>(&mut garbage.as_slice()).await.unwrap_err();
        assert!(matches!(err, ProtocolError::Malformed(_)));
    }

    #[tokio::test]
    async fn read_frame_leaves_following_bytes() {
        let open = OpenStream { service: 7, visitor: "127.0.0.1:9".parse().unwrap(), seal: None, flow: None };
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &open).await.unwrap();
        bytes.extend_from_slice(b"raw");
        let mut reader = bytes.as_slice();
        let got: OpenStream = read_frame(&mut reader).await.unwrap();
        assert_eq!(got.service, 7);
        assert_eq!(reader, b"raw");
    }
}
