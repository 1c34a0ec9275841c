//! The relay: moves one visitor's bytes between a plain stream (the visitor on the server,
//! the local service on the client) and a data connection, as chunks
//! ([`crate::proto::encode_chunk`]), so one data connection can carry one visitor after
//! another. Its parts: the pump (here), bulk transfers kernel to kernel ([`splice`]),
//! the idle watch ([`idle`]) and traffic accounting with speed limits ([`throttle`]).
//!
//! Reads go into one scratch buffer per thread and are written on in the same poll;
//! a visitor keeps only what the other side did not take at once, so idle visitors
//! hold no buffers.
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
pub mod splice;
pub mod throttle;

use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use idle::IdleLimit;
use idle::IdleWatch;
pub use splice::Spliceable;
use splice::{Pipe, PIPE_SIZE};

use crate::proto::{chunk_header, parse_front, ChunkFront, StreamStatus, CHUNK_HEADER};

/// Most bytes one read from either side takes.
pub const MAX_READ: usize = 64 * 1024;

/// A direction between two plain TCP sockets moves its payloads with `splice(2)` once a
/// read brings this many bytes at once, and goes back to copying below it.
const SPLICE_FROM: usize = 32 * 1024;

/// Room for a status byte, a chunk header and one read.
const SCRATCH_LEN: usize = 1 + CHUNK_HEADER + MAX_READ;

thread_local! {
    /// One scratch buffer per thread, for every relay the thread polls: bytes are read
    /// into it and written on in the same poll, and only what the other side does not
    /// take at once is kept per visitor. An idle visitor holds no buffer at all.
    static SCRATCH: Cell<Box<[u8]>> = Cell::default();
}

/// Runs `f` with this thread's scratch buffer (taken out while `f` runs, so a nested
/// use gets a fresh one).
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    let mut scratch = SCRATCH.try_with(Cell::take).unwrap_or_default();
    if scratch.len() < SCRATCH_LEN {
        scratch = vec![0; SCRATCH_LEN].into_boxed_slice();
    }
    let result = f(&mut scratch);
    let _ = SCRATCH.try_with(|cell| cell.set(scratch));
    result
}

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
pub fn relay_chunked<'a, P, L>(
    plain: &'a mut P,
    link: &'a mut L,
    status: Status,
    early: BytesMut,
    idle: Option<IdleLimit>,
) -> impl Future<Output = Result<Relayed, RelayError>> + 'a
where
    P: AsyncRead + AsyncWrite + Spliceable + Unpin + ?Sized,
    L: AsyncRead + AsyncWrite + Spliceable + Unpin + ?Sized,
{
    // Not an `async fn` of its own: a visitor's task would carry this layer's arguments too.
    relay(plain, link, status, early, idle, None)
}

/// [`relay_chunked`] that also stops ([`RelayError::Cancelled`]) when `stop` is cancelled.
pub fn relay_chunked_until<'a, P, L>(
    plain: &'a mut P,
    link: &'a mut L,
    status: Status,
    early: BytesMut,
    idle: Option<IdleLimit>,
    stop: &'a CancellationToken,
) -> impl Future<Output = Result<Relayed, RelayError>> + 'a
where
    P: AsyncRead + AsyncWrite + Spliceable + Unpin + ?Sized,
    L: AsyncRead + AsyncWrite + Spliceable + Unpin + ?Sized,
{
    relay(plain, link, status, early, idle, Some(stop))
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
    P: AsyncRead + AsyncWrite + Spliceable + Unpin + ?Sized,
    L: AsyncRead + AsyncWrite + Spliceable + Unpin + ?Sized,
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

/// Writes some of `bytes` to `stream`: how many (never 0).
fn write_some<S: AsyncWrite + Unpin + ?Sized>(
    cx: &mut Context<'_>,
    stream: &mut S,
    bytes: &[u8],
) -> Poll<io::Result<usize>> {
    match ready!(Pin::new(stream).poll_write(cx, bytes)) {
        Ok(0) => Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
        done => Poll::Ready(done),
    }
}

/// The sockets under `a` and `b` when bytes may move between them by splice.
fn splice_pair<'s, A, B>(a: &'s A, b: &'s B) -> Option<(&'s TcpStream, &'s TcpStream)>
where
    A: Spliceable + ?Sized,
    B: Spliceable + ?Sized,
{
    if a.shaped() || b.shaped() {
        return None;
    }
    a.socket().zip(b.socket())
}

/// Plain bytes → chunks, ending with the end marker.
struct Outbound {
    /// Bytes for the link that a write did not take, sent from `sent`; empty (and
    /// unallocated) while the link keeps up.
    pending: Vec<u8>,
    sent: usize,
    send_status: bool,
    /// The end marker is queued or sent.
    ending: bool,
    done: bool,
    total: u64,
    /// Bytes were written to the link since it was last flushed.
    unflushed: bool,
    /// Bulk: payloads go from the plain socket through this pipe to the link's.
    pipe: Option<Pipe>,
    /// Bulk: the status byte and header of the payload in the pipe, sent from `head.0`.
    head: (usize, usize, [u8; 1 + CHUNK_HEADER]),
    /// Bulk: the last read was big enough to stay on the pipe.
    bulk: bool,
}

impl Outbound {
    fn new(send_status: bool) -> Self {
        Outbound {
            pending: Vec::new(),
            sent: 0,
            send_status,
            ending: false,
            done: false,
            total: 0,
            unflushed: false,
            pipe: None,
            head: (0, 0, [0; 1 + CHUNK_HEADER]),
            bulk: false,
        }
    }

    /// Nothing was read from the plain side yet (not even its end).
    fn untouched(&self) -> bool {
        self.total == 0 && !self.ending
    }

    fn poll<P, L>(&mut self, cx: &mut Context<'_>, plain: &mut P, link: &mut L) -> Poll<Result<(), Failure>>
    where
        P: AsyncRead + Spliceable + Unpin + ?Sized,
        L: AsyncWrite + Spliceable + Unpin + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.sent < self.pending.len() {
                let n = ready!(write_some(cx, link, &self.pending[self.sent..])).map_err(Failure::Link)?;
                self.sent += n;
                self.unflushed = true;
                if self.sent == self.pending.len() {
                    self.pending = Vec::new();
                    self.sent = 0;
                }
                continue;
            }
            if self.pipe.is_some() {
                if ready!(self.poll_bulk(cx, plain, link))? {
                    continue;
                }
                self.pipe = None;
            }
            if self.ending {
                ready!(Pin::new(&mut *link).poll_flush(cx)).map_err(Failure::Link)?;
                self.done = true;
                continue;
            }
            if with_scratch(|scratch| self.read_and_send(cx, plain, link, scratch))?.is_pending() {
                // Nothing more to send for now: what a link buffers (a compressor) goes out.
                if self.unflushed {
                    ready!(Pin::new(&mut *link).poll_flush(cx)).map_err(Failure::Link)?;
                    self.unflushed = false;
                }
                return Poll::Pending;
            }
        }
    }

    /// Reads from the plain side into `scratch` and sends it as one chunk; what the link
    /// does not take at once is kept. Pending only while the plain side has nothing.
    fn read_and_send<P, L>(
        &mut self,
        cx: &mut Context<'_>,
        plain: &mut P,
        link: &mut L,
        scratch: &mut [u8],
    ) -> Result<Poll<()>, Failure>
    where
        P: AsyncRead + Spliceable + Unpin + ?Sized,
        L: AsyncWrite + Spliceable + Unpin + ?Sized,
    {
        let mut read = ReadBuf::new(&mut scratch[1 + CHUNK_HEADER..]);
        if Pin::new(&mut *plain).poll_read(cx, &mut read).map_err(Failure::Plain)?.is_pending() {
            return Ok(Poll::Pending);
        }
        let n = read.filled().len();
        scratch[1..1 + CHUNK_HEADER].copy_from_slice(&chunk_header(n));
        let start = if std::mem::take(&mut self.send_status) {
            scratch[0] = StreamStatus::Ready as u8;
            0
        } else {
            1
        };
        self.ending = n == 0;
        self.total += n as u64;
        let frame = &scratch[start..1 + CHUNK_HEADER + n];
        let taken = match write_some(cx, link, frame) {
            Poll::Ready(written) => written.map_err(Failure::Link)?,
            Poll::Pending => 0,
        };
        self.unflushed |= taken > 0;
        if taken < frame.len() {
            self.pending = frame[taken..].to_vec();
        }
        // A read this big is bulk: between two plain sockets the next ones are spliced.
        if n >= SPLICE_FROM && splice_pair(&*plain, &*link).is_some() {
            self.pipe = Pipe::open();
            self.bulk = true;
        }
        Ok(Poll::Ready(()))
    }

    /// One step of a bulk transfer: the header goes out, then the pipe's payload, then
    /// the next read into the pipe. False once the transfer is no longer bulk (the pipe
    /// is empty then).
    fn poll_bulk<P, L>(
        &mut self,
        cx: &mut Context<'_>,
        plain: &mut P,
        link: &mut L,
    ) -> Poll<Result<bool, Failure>>
    where
        P: Spliceable + ?Sized,
        L: Spliceable + ?Sized,
    {
        let Some(pipe) = self.pipe.as_mut() else {
            return Poll::Ready(Ok(false));
        };
        let Some(to) = link.socket() else {
            return Poll::Ready(Err(Failure::Link(io::Error::other("the link lost its socket"))));
        };
        let (pos, end, head) = &mut self.head;
        if *pos < *end {
            let more = pipe.held > 0;
            *pos += ready!(splice::send_raw(cx, to, &head[*pos..*end], more)).map_err(Failure::Link)?;
            return Poll::Ready(Ok(true));
        }
        if pipe.held > 0 {
            ready!(pipe.drain(cx, to)).map_err(Failure::Link)?;
            return Poll::Ready(Ok(true));
        }
        let from = match splice_pair(&*plain, &*link) {
            Some((from, _)) if self.bulk && !self.ending => from,
            _ => return Poll::Ready(Ok(false)),
        };
        let n = ready!(pipe.fill(cx, from, PIPE_SIZE)).map_err(Failure::Plain)?;
        plain.count_spliced(n, 0);
        head[1..].copy_from_slice(&chunk_header(n));
        *pos = if std::mem::take(&mut self.send_status) {
            head[0] = StreamStatus::Ready as u8;
            0
        } else {
            1
        };
        *end = head.len();
        self.ending = n == 0;
        self.bulk = n >= SPLICE_FROM;
        self.total += n as u64;
        Poll::Ready(Ok(true))
    }
}

/// What consuming link bytes came to.
enum Consumed {
    /// Every byte given was used, or a header is incomplete: read more.
    NeedMore,
    /// The plain side takes nothing more for now.
    Blocked,
    /// The end marker: this direction is over (the bytes after it are the leftover).
    Ended,
}

/// Chunks → plain bytes, half-closing the plain side at the end marker.
struct Inbound {
    /// Link bytes kept between polls: an incomplete header, payload the plain side has
    /// not taken yet, or (after the end marker) the start of what comes next.
    carry: Vec<u8>,
    expect_status: bool,
    /// Payload bytes of the current chunk still to pass on.
    chunk_left: usize,
    shutting_down: bool,
    done: bool,
    total: u64,
    /// Bulk: the payload of big chunks goes from the link's socket through this pipe
    /// to the plain socket, and only headers are read.
    pipe: Option<Pipe>,
}

impl Inbound {
    fn new(expect_status: bool, early: BytesMut) -> Self {
        Inbound {
            carry: early.to_vec(),
            expect_status,
            chunk_left: 0,
            shutting_down: false,
            done: false,
            total: 0,
            pipe: None,
        }
    }

    fn leftover(&self) -> BytesMut {
        BytesMut::from(&self.carry[..])
    }

    fn poll<L, P>(&mut self, cx: &mut Context<'_>, link: &mut L, plain: &mut P) -> Poll<Result<(), Failure>>
    where
        L: AsyncRead + Spliceable + Unpin + ?Sized,
        P: AsyncWrite + Spliceable + Unpin + ?Sized,
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
            if let Some(pipe) = self.pipe.as_mut().filter(|pipe| pipe.held > 0) {
                let Some(to) = plain.socket() else {
                    return Poll::Ready(Err(Failure::Plain(io::Error::other("the stream lost its socket"))));
                };
                let n = ready!(pipe.drain(cx, to)).map_err(Failure::Plain)?;
                plain.count_spliced(0, n);
                self.total += n as u64;
                continue;
            }
            if !self.carry.is_empty() {
                let carry = std::mem::take(&mut self.carry);
                let (used, consumed) = self.consume(cx, &carry, plain);
                self.keep(carry, used);
                match consumed? {
                    Consumed::NeedMore => {}
                    Consumed::Blocked => return Poll::Pending,
                    Consumed::Ended => continue,
                }
            }
            if self.carry.is_empty() && self.chunk_left > 0 {
                if let Some((from, _)) = splice_pair(&*link, &*plain) {
                    if self.pipe.is_none() && self.chunk_left >= SPLICE_FROM {
                        self.pipe = Pipe::open();
                    }
                    if let Some(pipe) = self.pipe.as_mut() {
                        let wanted = self.chunk_left.min(PIPE_SIZE);
                        let n = ready!(pipe.fill(cx, from, wanted)).map_err(Failure::Link)?;
                        if n == 0 {
                            return Poll::Ready(Err(Failure::Link(mid_stream(self.expect_status))));
                        }
                        self.chunk_left -= n;
                        continue;
                    }
                }
            }
            ready!(with_scratch(|scratch| self.read_and_consume(cx, link, plain, scratch)))?;
        }
    }

    /// Reads link bytes (after the incomplete header carried over) into `scratch` and
    /// passes them on; keeps what the plain side does not take. In bulk, reads only the
    /// next header, so the payload behind it can be spliced.
    fn read_and_consume<L, P>(
        &mut self,
        cx: &mut Context<'_>,
        link: &mut L,
        plain: &mut P,
        scratch: &mut [u8],
    ) -> Poll<Result<(), Failure>>
    where
        L: AsyncRead + Unpin + ?Sized,
        P: AsyncWrite + Unpin + ?Sized,
    {
        let kept = self.carry.len();
        scratch[..kept].copy_from_slice(&self.carry);
        let header = if self.expect_status { 1 } else { CHUNK_HEADER };
        let end =
            if self.pipe.is_some() && self.chunk_left == 0 { (kept + 1).max(header) } else { scratch.len() };
        let mut read = ReadBuf::new(&mut scratch[kept..end]);
        ready!(Pin::new(&mut *link).poll_read(cx, &mut read)).map_err(Failure::Link)?;
        let n = read.filled().len();
        if n == 0 {
            return Poll::Ready(Err(Failure::Link(mid_stream(self.expect_status))));
        }
        self.carry.clear();
        let (used, consumed) = self.consume(cx, &scratch[..kept + n], plain);
        self.carry.extend_from_slice(&scratch[used..kept + n]);
        consumed?;
        Poll::Ready(Ok(()))
    }

    /// Keeps the bytes of `carry` past `used`, letting go of a buffer that is no longer needed.
    fn keep(&mut self, mut carry: Vec<u8>, used: usize) {
        carry.drain(..used);
        if carry.is_empty() && carry.capacity() > 64 {
            carry = Vec::new();
        }
        self.carry = carry;
    }

    /// Passes payload in `bytes` to the plain side and parses the status byte and
    /// headers in it, until the bytes run out, the plain side blocks or the end marker
    /// comes: how many bytes were used, and which of those stopped it.
    fn consume<P>(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
        plain: &mut P,
    ) -> (usize, Result<Consumed, Failure>)
    where
        P: AsyncWrite + Unpin + ?Sized,
    {
        let mut at = 0;
        loop {
            if self.shutting_down {
                return (at, Ok(Consumed::Ended));
            }
            if self.chunk_left > 0 {
                if at == bytes.len() {
                    return (at, Ok(Consumed::NeedMore));
                }
                let take = self.chunk_left.min(bytes.len() - at);
                match write_some(cx, plain, &bytes[at..at + take]) {
                    Poll::Pending => return (at, Ok(Consumed::Blocked)),
                    Poll::Ready(Err(err)) => return (at, Err(Failure::Plain(err))),
                    Poll::Ready(Ok(n)) => {
                        at += n;
                        self.chunk_left -= n;
                        self.total += n as u64;
                    }
                }
                continue;
            }
            let parsed = match parse_front(&bytes[at..], self.expect_status) {
                Ok(parsed) => parsed,
                Err(err) => return (at, Err(Failure::Link(io::Error::new(io::ErrorKind::InvalidData, err)))),
            };
            let Some((front, used)) = parsed else {
                return (at, Ok(Consumed::NeedMore));
            };
            at += used;
            match front {
                ChunkFront::Status(StreamStatus::Ready) => self.expect_status = false,
                ChunkFront::Status(StreamStatus::LocalUnavailable) => {
                    return (at, Err(Failure::LocalUnavailable))
                }
                ChunkFront::End => {
                    self.shutting_down = true;
                    self.pipe = None;
                }
                ChunkFront::Chunk(len) => {
                    self.chunk_left = len;
                    if len < SPLICE_FROM {
                        // The peer sends small chunks again: back to copying.
                        self.pipe = None;
                    }
                }
            }
        }
    }
}

/// The error for a link that ended before its end marker.
fn mid_stream(expect_status: bool) -> io::Error {
    let what = if expect_status {
        "client closed the data connection before answering"
    } else {
        "data connection closed mid-stream"
    };
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
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

    /// A socket that counts the bytes the relay moved past it with splice.
    struct Counted {
        stream: TcpStream,
        spliced: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl Counted {
        fn new(stream: TcpStream) -> Self {
            Counted { stream, spliced: Default::default() }
        }

        fn spliced(&self) -> usize {
            self.spliced.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl Spliceable for Counted {
        fn socket(&self) -> Option<&TcpStream> {
            Some(&self.stream)
        }

        fn count_spliced(&self, read: usize, written: usize) {
            self.spliced.fetch_add(read + written, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.stream).poll_write(cx, data)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.stream).poll_shutdown(cx)
        }
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (far, _) = listener.accept().await.unwrap();
        (near, far)
    }

    /// Small messages, bulk and small again, both ways, through two relays over real
    /// sockets: every byte arrives in order, the bulk part is spliced (on Linux), and the
    /// link serves a second visitor after the first.
    #[tokio::test]
    async fn bulk_between_sockets_is_spliced_and_the_link_is_reused() {
        use sha2::{Digest, Sha256};
        let (link_server, link_client) = tcp_pair().await;
        let (mut link_server, mut link_client) = (Counted::new(link_server), Counted::new(link_client));
        let mut leftover = BytesMut::new();
        for round in 0..2u8 {
            let (visitor, visitor_side) = tcp_pair().await;
            let (service, service_side) = tcp_pair().await;
            let (mut visitor_side, mut service_side) =
                (Counted::new(visitor_side), Counted::new(service_side));
            let mut message = Vec::new();
            for i in 0..200u32 {
                message.extend(format!("small message {i} of round {round}\n").bytes());
            }
            let bulk: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 ^ round).collect();
            let sent = [&message[..], &bulk[..], &message[..]].concat();
            let expected = Sha256::digest(&sent);
            let server =
                relay_chunked(&mut visitor_side, &mut link_server, Status::Expect, BytesMut::new(), None);
            let client =
                relay_chunked(&mut service_side, &mut link_client, Status::Send, leftover.split(), None);
            let (mut visitor_read, mut visitor_write) = visitor.into_split();
            let (mut service_read, mut service_write) = service.into_split();
            let ends = async {
                let send = async {
                    // Small writes with pauses, so they travel as small chunks.
                    for line in message.chunks(40) {
                        visitor_write.write_all(line).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    visitor_write.write_all(&bulk).await.unwrap();
                    visitor_write.write_all(&message).await.unwrap();
                    visitor_write.shutdown().await.unwrap();
                };
                let receive = async {
                    let mut back = Vec::new();
                    visitor_read.read_to_end(&mut back).await.unwrap();
                    back
                };
                let echo = async {
                    tokio::io::copy(&mut service_read, &mut service_write).await.unwrap();
                    service_write.shutdown().await.unwrap();
                };
                tokio::join!(send, receive, echo).1
            };
            let (server, client, back) = tokio::join!(server, client, ends);
            let (server, client) = (server.unwrap(), client.unwrap());
            assert_eq!(Sha256::digest(&back), expected, "round {round}: the echo is what was sent");
            assert_eq!((server.out, server.r#in), (sent.len() as u64, sent.len() as u64));
            assert_eq!((client.out, client.r#in), (sent.len() as u64, sent.len() as u64));
            if cfg!(target_os = "linux") {
                let (visitor_spliced, service_spliced) = (visitor_side.spliced(), service_side.spliced());
                assert!(
                    visitor_spliced > 4 << 20,
                    "round {round}: {visitor_spliced} bytes spliced at the server"
                );
                assert!(
                    service_spliced > 4 << 20,
                    "round {round}: {service_spliced} bytes spliced at the client"
                );
            }
            assert!(server.leftover.is_empty());
            leftover = client.leftover;
        }
        assert_eq!(
            link_server.spliced() + link_client.spliced(),
            0,
            "links are counted by their plain sides"
        );
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
