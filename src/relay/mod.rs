//! The relay: moves one visitor's bytes between a plain stream (the visitor on the server,
//! the local service on the client) and a data connection, as chunks
//! ([`crate::proto::encode_chunk`]), so one data connection can carry one visitor after
//! another. Its parts: the pump (here), the idle watch ([`idle`]) and traffic
//! accounting with speed limits ([`throttle`]).
//!
//! When both directions have ended cleanly the data connection goes back to the pool
//! instead of being closed, which saves a TCP handshake, an accept and a login proof per
//! visitor. Any error, or a connection that closes mid-stream, aborts: the connection is
//! dropped and the peer closes its side.
//!
//! Both directions are driven from one future over `&mut` streams (as tokio's
//! `copy_bidirectional` does), so no stream is split and no lock is taken.

pub mod compress;
pub(crate) mod flow;
pub mod idle;
pub mod throttle;

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

pub use idle::IdleLimit;
use idle::IdleWatch;

use crate::proto::{chunk_header, parse_front, ChunkFront, StreamStatus, CHUNK_HEADER};

/// First size of each relay buffer; a whole chunk (header included) fits in it.
///
/// Small, because an idle visitor keeps its buffers: 2 KiB each way instead of 8 KiB
/// took 1000 idle visitors from 27.5 to 15.7 MiB on the server, at the same request
/// rates (docs/internals.md).
pub const CHUNK_BUF: usize = 2 * 1024;

/// Largest size a relay buffer grows to while a stream moves bulk data.
///
/// Buffers start small so that thousands of mostly idle visitors stay cheap, and
/// double each time a read fills them, so bulk transfers need fewer system calls.
pub const MAX_BUF: usize = 64 * 1024;

/// How one side treats the status byte that opens the client's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Client side: send the ready byte in front of the first chunk.
    Send,
    /// Server side: the first byte from the link must be the ready byte.
    Expect,
}

/// What a finished relay leaves behind.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes read from the plain side and sent as chunks.
    pub out: u64,
    /// Bytes received as chunks and written to the plain side.
    pub r#in: u64,
    /// Bytes read from the link after its end marker (the start of the next visitor).
    pub leftover: BytesMut,
}

/// Why a relay stopped before both directions ended cleanly, by the side that failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The plain side failed: the visitor (on the server) or the local service (on the client).
    #[error("{0}")]
    Plain(io::Error),
    /// The data connection failed, closed mid-stream, or sent what is not a chunk.
    #[error("{error}")]
    Link {
        /// What went wrong.
        error: io::Error,
        /// Nothing came back yet (no status byte) and nothing was sent after the open
        /// message: the visitor may be offered to another client with the same first bytes.
        unanswered: bool,
        /// The link's direction had ended cleanly: the plain side got all of it and its end.
        delivered: bool,
    },
    /// The client answered that it could not reach its local service (status byte `1`).
    #[error("the client could not reach its local service")]
    LocalUnavailable,
    /// No traffic for the idle timeout (`timeout`), or one way only for it.
    #[error("{0}")]
    Idle(io::Error),
    /// The tunnel closed while the visitor was being served.
    #[error("the tunnel closed")]
    Cancelled {
        /// As for [`RelayError::Link`].
        unanswered: bool,
        /// As for [`RelayError::Link`].
        delivered: bool,
    },
}

impl RelayError {
    /// Whether the visitor may go to another client: see [`RelayError::Link`].
    pub fn unanswered(&self) -> bool {
        matches!(
            self,
            RelayError::Link { unanswered: true, .. } | RelayError::Cancelled { unanswered: true, .. }
        )
    }

    /// The plain side's transfer was cut off: the link failed before all of it arrived.
    /// Its peer should then see a reset, not a normal end. Once everything was delivered,
    /// a reset would only risk discarding bytes the peer has not read yet.
    pub fn cut_off(&self) -> bool {
        matches!(
            self,
            RelayError::Link { delivered: false, .. } | RelayError::Cancelled { delivered: false, .. }
        )
    }
}

/// Which part of the pump an error came from.
enum Failure {
    Plain(io::Error),
    Link(io::Error),
    LocalUnavailable,
    Idle(io::Error),
}

/// Relays between a plain stream (visitor or local service) and a data connection
/// until both directions have ended cleanly.
///
/// `early` holds link bytes already read (they are parsed first).
pub async fn relay_chunked<P, L>(
    plain: &mut P,
    link: &mut L,
    status: Status,
    early: BytesMut,
    idle: Option<IdleLimit>,
) -> Result<Relayed, RelayError>
where
    P: AsyncRead + AsyncWrite + Unpin + ?Sized,
    L: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    relay(plain, link, status, early, idle, None).await
}

/// [`relay_chunked`] that also stops ([`RelayError::Cancelled`]) when `stop` is cancelled.
pub async fn relay_chunked_until<P, L>(
    plain: &mut P,
    link: &mut L,
    status: Status,
    early: BytesMut,
    idle: Option<IdleLimit>,
    stop: &CancellationToken,
) -> Result<Relayed, RelayError>
where
    P: AsyncRead + AsyncWrite + Unpin + ?Sized,
    L: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    relay(plain, link, status, early, idle, Some(stop)).await
}

async fn relay<P, L>(
    plain: &mut P,
    link: &mut L,
    status: Status,
    early: BytesMut,
    idle: Option<IdleLimit>,
    stop: Option<&CancellationToken>,
) -> Result<Relayed, RelayError>
where
    P: AsyncRead + AsyncWrite + Unpin + ?Sized,
    L: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut out = Outbound::new(status == Status::Send);
    let mut inbound = Inbound::new(status == Status::Expect, early);
    let mut watch = idle.map(IdleWatch::new);
    let both_ways = poll_fn(|cx| {
        let out_done = out.poll(cx, &mut *plain, &mut *link)?.is_ready();
        let in_done = inbound.poll(cx, &mut *link, &mut *plain)?.is_ready();
        if out_done && in_done {
            return Poll::Ready(Ok::<(), Failure>(()));
        }
        if let Some(watch) = watch.as_mut() {
            watch.poll(cx, out.total, inbound.total).map_err(Failure::Idle)?;
        }
        Poll::Pending
    });
    let relayed = match stop {
        Some(token) => token.run_until_cancelled(both_ways).await,
        None => Some(both_ways.await),
    };
    let unanswered = inbound.expect_status && out.untouched();
    let delivered = inbound.done;
    match relayed {
        Some(Ok(())) => Ok(Relayed { out: out.total, r#in: inbound.total, leftover: inbound.leftover() }),
        None => Err(RelayError::Cancelled { unanswered, delivered }),
        Some(Err(Failure::Link(error))) => Err(RelayError::Link { error, unanswered, delivered }),
        Some(Err(Failure::Plain(error))) => Err(RelayError::Plain(error)),
        Some(Err(Failure::LocalUnavailable)) => Err(RelayError::LocalUnavailable),
        Some(Err(Failure::Idle(error))) => Err(RelayError::Idle(error)),
    }
}

/// Plain bytes → chunks, ending with the end marker.
struct Outbound {
    /// `[status][length][payload]`; a write goes out from `pos` to `end`.
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    send_status: bool,
    /// The end marker is queued or sent.
    ending: bool,
    done: bool,
    total: u64,
    /// Bytes were written to the link since it was last flushed.
    unflushed: bool,
}

impl Outbound {
    fn new(send_status: bool) -> Self {
        Outbound {
            buf: vec![0u8; 1 + CHUNK_BUF].into_boxed_slice(),
            pos: 0,
            end: 0,
            send_status,
            ending: false,
            done: false,
            total: 0,
            unflushed: false,
        }
    }

    /// Nothing was read from the plain side yet (not even its end).
    fn untouched(&self) -> bool {
        self.total == 0 && !self.ending
    }

    /// Doubles the buffer, keeping the chunk that is about to be written.
    fn grow(&mut self) {
        let mut bigger = vec![0u8; ((self.buf.len() - 1) * 2).min(MAX_BUF) + 1].into_boxed_slice();
        bigger[..self.buf.len()].copy_from_slice(&self.buf);
        self.buf = bigger;
    }

    fn poll<P, L>(&mut self, cx: &mut Context<'_>, plain: &mut P, link: &mut L) -> Poll<Result<(), Failure>>
    where
        P: AsyncRead + Unpin + ?Sized,
        L: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.pos < self.end {
                let written = ready!(Pin::new(&mut *link).poll_write(cx, &self.buf[self.pos..self.end]));
                let n = match written {
                    Ok(n) if n > 0 => n,
                    Ok(_) => return Poll::Ready(Err(Failure::Link(io::ErrorKind::WriteZero.into()))),
                    Err(err) => return Poll::Ready(Err(Failure::Link(err))),
                };
                self.pos += n;
                self.unflushed = true;
                continue;
            }
            if self.ending {
                ready!(Pin::new(&mut *link).poll_flush(cx)).map_err(Failure::Link)?;
                self.done = true;
                continue;
            }
            let mut read = ReadBuf::new(&mut self.buf[5..]);
            if Pin::new(&mut *plain).poll_read(cx, &mut read).map_err(Failure::Plain)?.is_pending() {
                // Nothing more to send for now: what a link buffers (a compressor) goes out.
                if self.unflushed {
                    ready!(Pin::new(&mut *link).poll_flush(cx)).map_err(Failure::Link)?;
                    self.unflushed = false;
                }
                return Poll::Pending;
            }
            let n = read.filled().len();
            if 5 + n == self.buf.len() && self.buf.len() < 1 + MAX_BUF {
                self.grow();
            }
            self.buf[1..5].copy_from_slice(&chunk_header(n));
            self.pos = if self.send_status { 0 } else { 1 };
            if self.send_status {
                self.buf[0] = StreamStatus::Ready as u8;
                self.send_status = false;
            }
            self.end = 5 + n;
            self.ending = n == 0;
            self.total += n as u64;
        }
    }
}

/// Chunks → plain bytes, half-closing the plain side at the end marker.
struct Inbound {
    buf: Box<[u8]>,
    /// Unparsed bytes are `buf[pos..len]`.
    pos: usize,
    len: usize,
    expect_status: bool,
    /// Payload bytes of the current chunk still to pass on.
    chunk_left: usize,
    shutting_down: bool,
    done: bool,
    total: u64,
}

impl Inbound {
    fn new(expect_status: bool, early: BytesMut) -> Self {
        let mut buf = vec![0u8; CHUNK_BUF.max(early.len())].into_boxed_slice();
        buf[..early.len()].copy_from_slice(&early);
        Inbound {
            buf,
            pos: 0,
            len: early.len(),
            expect_status,
            chunk_left: 0,
            shutting_down: false,
            done: false,
            total: 0,
        }
    }

    fn leftover(&self) -> BytesMut {
        BytesMut::from(&self.buf[self.pos..self.len])
    }

    fn poll<L, P>(&mut self, cx: &mut Context<'_>, link: &mut L, plain: &mut P) -> Poll<Result<(), Failure>>
    where
        L: AsyncRead + Unpin + ?Sized,
        P: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.shutting_down {
                ready!(Pin::new(&mut *plain).poll_shutdown(cx)).map_err(Failure::Plain)?;
                self.done = true;
                continue;
            }
            let available = self.len - self.pos;
            if self.chunk_left > 0 && available > 0 {
                let take = available.min(self.chunk_left);
                let written =
                    ready!(Pin::new(&mut *plain).poll_write(cx, &self.buf[self.pos..self.pos + take]));
                let n = written.map_err(Failure::Plain)?;
                if n == 0 {
                    return Poll::Ready(Err(Failure::Plain(io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.chunk_left -= n;
                self.total += n as u64;
                continue;
            }
            if self.chunk_left == 0 && self.parse_next()? {
                continue;
            }
            ready!(self.poll_fill(cx, link))?;
        }
    }

    /// Consumes the status byte or a chunk header if they are buffered; false if more bytes are needed.
    fn parse_next(&mut self) -> Result<bool, Failure> {
        let parsed = parse_front(&self.buf[self.pos..self.len], self.expect_status);
        let parsed = parsed.map_err(|e| Failure::Link(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        let Some((front, used)) = parsed else {
            return Ok(false);
        };
        self.pos += used;
        match front {
            ChunkFront::Status(StreamStatus::Ready) => self.expect_status = false,
            ChunkFront::Status(StreamStatus::LocalUnavailable) => return Err(Failure::LocalUnavailable),
            ChunkFront::End => self.shutting_down = true,
            ChunkFront::Chunk(len) => {
                // The peer moves bulk data: take whole chunks in one read, up to MAX_BUF.
                let wanted = (len + CHUNK_HEADER).min(MAX_BUF + CHUNK_HEADER);
                if wanted > self.buf.len() {
                    self.resize(wanted.next_power_of_two().min(MAX_BUF + CHUNK_HEADER));
                }
                self.chunk_left = len;
            }
        }
        Ok(true)
    }

    /// Moves unparsed bytes to the front of a buffer of `size` bytes.
    fn resize(&mut self, size: usize) {
        let mut bigger = vec![0u8; size.max(self.len - self.pos)].into_boxed_slice();
        bigger[..self.len - self.pos].copy_from_slice(&self.buf[self.pos..self.len]);
        self.buf = bigger;
        self.len -= self.pos;
        self.pos = 0;
    }

    /// Reads more link bytes; the end of the link before the end marker is an error.
    fn poll_fill<L: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        link: &mut L,
    ) -> Poll<Result<(), Failure>> {
        // Keep what is unparsed at the front, so a whole chunk fits behind its header.
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        let mut read = ReadBuf::new(&mut self.buf[self.len..]);
        ready!(Pin::new(&mut *link).poll_read(cx, &mut read)).map_err(Failure::Link)?;
        let n = read.filled().len();
        if n == 0 {
            let what = if self.expect_status {
                "client closed the data connection before answering"
            } else {
                "data connection closed mid-stream"
            };
            return Poll::Ready(Err(Failure::Link(io::Error::new(io::ErrorKind::UnexpectedEof, what))));
        }
        self.len += n;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// visitor <-> [server relay] <-> link <-> [client relay] <-> service, twice over one link.
    #[tokio::test]
    async fn chunks_round_trip_with_half_close_and_reuse() {
        let (mut link_server, mut link_client) = tokio::io::duplex(1000);
        let mut leftover = BytesMut::new();
        for round in 0..3u8 {
            let (mut visitor, mut visitor_side) = tokio::io::duplex(100);
            let (mut service, mut service_side) = tokio::io::duplex(100);
            let payload: Vec<u8> = (0..50_000u32).map(|i| (i as u8).wrapping_add(round)).collect();
            let expected = payload.clone();
            let server =
                relay_chunked(&mut visitor_side, &mut link_server, Status::Expect, BytesMut::new(), None);
            let client =
                relay_chunked(&mut service_side, &mut link_client, Status::Send, leftover.split(), None);
            let ends = async {
                let send = async {
                    visitor.write_all(&payload).await.unwrap();
                    visitor.shutdown().await.unwrap();
                    let mut back = Vec::new();
                    visitor.read_to_end(&mut back).await.unwrap();
                    back
                };
                let echo = async {
                    let mut got = Vec::new();
                    service.read_to_end(&mut got).await.unwrap();
                    service.write_all(&got).await.unwrap();
                    service.shutdown().await.unwrap();
                };
                tokio::join!(send, echo).0
            };
            let (server, client, back) = tokio::join!(server, client, ends);
            let (server, client) = (server.unwrap(), client.unwrap());
            assert_eq!((server.out, server.r#in), (50_000, 50_000));
            assert_eq!((client.out, client.r#in), (50_000, 50_000));
            assert!(server.leftover.is_empty());
            leftover = client.leftover;
            assert_eq!(back, expected);
        }
    }

    #[tokio::test]
    async fn refusal_truncation_and_oversized_chunks_are_errors() {
        let mut bytes = Vec::new();
        crate::proto::encode_chunk(b"partial", &mut bytes);
        bytes.extend_from_slice(&100u32.to_be_bytes());
        let huge = (crate::proto::MAX_CHUNK + 1).to_be_bytes().to_vec();
        let refusal = vec![StreamStatus::LocalUnavailable as u8];
        let cases = [
            (Status::Expect, refusal, io::ErrorKind::ConnectionRefused),
            (Status::Send, bytes, io::ErrorKind::UnexpectedEof),
            (Status::Send, huge, io::ErrorKind::InvalidData),
        ];
        for (status, link_bytes, expected) in cases {
            // The plain side stays open and silent; the link yields `link_bytes`, then ends.
            let (mut plain, _plain_peer) = tokio::io::duplex(64);
            let (mut link, mut link_peer) = tokio::io::duplex(64);
            link_peer.write_all(&link_bytes).await.unwrap();
            drop(link_peer);
            let relay = relay_chunked(&mut plain, &mut link, status, BytesMut::new(), None);
            let limit = std::time::Duration::from_secs(5);
            let err = tokio::time::timeout(limit, relay).await.unwrap().unwrap_err();
            match (&err, expected) {
                (RelayError::LocalUnavailable, io::ErrorKind::ConnectionRefused) => {}
                (RelayError::Link { error, unanswered: false, delivered: false }, kind) => {
                    assert_eq!(error.kind(), kind)
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
