//! zstd on a data link (`--compress zstd`): after the open message, each direction of the
//! link is one zstd stream. The relay flushes the link after every write, and each flush
//! ends a zstd block, so interactive traffic is never held back by the compressor.
//!
//! A compressed link is not reused for the next visitor: its streams have no clean end
//! short of closing the link.

use std::io::Cursor;

use async_compression::tokio::bufread::ZstdDecoder;
use async_compression::tokio::write::ZstdEncoder;
use async_compression::Level;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader, Join, ReadHalf, WriteHalf};

pub use crate::proto::Compression;

/// The reading side: `early` bytes already read from the link, then the link, decompressed.
type Inflating<'a, L> = ZstdDecoder<BufReader<tokio::io::Chain<Cursor<BytesMut>, ReadHalf<&'a mut L>>>>;

/// A link with both directions compressed.
pub type Compressed<'a, L> = Join<Inflating<'a, L>, ZstdEncoder<WriteHalf<&'a mut L>>>;

/// Wraps `link` so that what is written is compressed and what is read is decompressed;
/// `early` holds bytes read from the link already (they are decompressed first).
pub fn compressed<L>(link: &mut L, early: BytesMut) -> Compressed<'_, L>
where
    L: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (read, write) = tokio::io::split(link);
    let reader = BufReader::new(Cursor::new(early).chain(read));
    tokio::io::join(ZstdDecoder::new(reader), ZstdEncoder::with_quality(write, Level::Fastest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn each_flush_delivers_what_was_written_and_repetition_shrinks() {
        let (mut near, mut far) = tokio::io::duplex(1 << 20);
        let mut sender = compressed(&mut near, BytesMut::new());
        let text = b"the same line again and again\n".repeat(1000);
        sender.write_all(&text).await.unwrap();
        sender.flush().await.unwrap();
        drop(sender);
        drop(near);
        let mut wire = Vec::new();
        far.read_to_end(&mut wire).await.unwrap();
        assert!(wire.len() * 20 < text.len(), "{} bytes on the wire for {}", wire.len(), text.len());
        // The first bytes arrive with the open message, the rest on the link.
        let (head, tail) = wire.split_at(7);
        let mut link = tokio_test_pipe(tail);
        let mut receiver = compressed(&mut link, BytesMut::from(head));
        let mut got = vec![0u8; text.len()];
        receiver.read_exact(&mut got).await.unwrap();
        assert_eq!(got, text);
    }

    /// A stream that yields `bytes`, then waits for nothing more.
    fn tokio_test_pipe(bytes: &[u8]) -> tokio::io::DuplexStream {
        let (mut near, far) = tokio::io::duplex(bytes.len() + 1);
        let bytes = bytes.to_vec();
        tokio::spawn(async move {
            near.write_all(&bytes).await.unwrap();
            std::future::pending::<()>().await;
        });
        far
    }
}
