//! The visitor side of an HTTP connection after its first head: every later request head
//! is parsed and rewritten as the first was, bodies are passed on by their framing
//! (`Content-Length` or chunked, never buffered whole), and an upgrade the local service
//! accepts (`101`) turns the rest of the connection into raw bytes.
//!
//! [`RequestStream`] wraps the visitor: the relay reads rewritten requests from it and
//! writes responses through it. A later head that does not route to the same service, or
//! that is malformed, too large or too slow, ends the visitor's direction there: the local
//! service answers what came before, the connection closes, and the visitor's next
//! attempt on a new connection is routed on its own.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tracing::debug;

use super::http_head::{head_end, parse_head, rewrite_head, BodyLength, Forwarding, Head, MAX_HEAD};

/// Longest chunk-size or trailer line of a chunked body.
const MAX_LINE: usize = 4096;

/// How much is read from the visitor at a time while a head or chunk line is buffered.
const READ_SIZE: usize = 4096;

/// `HTTP/1.1 101`: enough of a response to tell whether an upgrade was accepted.
const STATUS_PREFIX: usize = 12;

/// How later heads must look to stay on this connection, and what they get.
pub(crate) struct Pinning {
    /// The routing host of the first head: later heads must name the same.
    pub(crate) route_host: String,
    /// The header routed by (`http-mux-header`).
    pub(crate) mux_header: String,
    /// With path routing, the path prefix the first head was routed by: later targets must
    /// start with it, and lose it.
    pub(crate) path_prefix: Option<String>,
    /// Host pinning and forwarding headers.
    pub(crate) forwarding: Forwarding,
    /// How long a started head may take to arrive whole.
    pub(crate) head_timeout: Duration,
}

/// Where the visitor's byte stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests: the next bytes are a head.
    Head,
    /// Inside a body with this many bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(ChunkState),
    /// An upgrade request went out: nothing more until the response says whether it took.
    AwaitUpgrade,
    /// Upgraded: bytes pass as they are.
    Raw,
    /// The visitor's direction is over.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// A visitor stream whose requests are rewritten one by one (see the module docs).
pub(crate) struct RequestStream<S> {
    inner: S,
    pinning: Pinning,
    state: State,
    /// What the state after the current body is (a head, or waiting for an upgrade).
    after_body: State,
    /// Visitor bytes read but not yet parsed.
    input: BytesMut,
    /// Rewritten bytes ready for the relay.
    output: BytesMut,
    /// How far `input` was searched for the end of a head.
    searched: usize,
    head_deadline: Option<Pin<Box<Sleep>>>,
    /// The start of the response to an upgrade request.
    answer: Vec<u8>,
    reader: Option<Waker>,
}

impl<S> RequestStream<S> {
    /// Wraps `inner` after a first head that was already sent on; `rest` holds the visitor
    /// bytes read past that head.
    pub(crate) fn after_first(inner: S, first: &Head, rest: BytesMut, pinning: Pinning) -> Self {
        let mut stream = RequestStream {
            inner,
            pinning,
            state: State::Head,
            after_body: State::Head,
            input: rest,
            output: BytesMut::new(),
            searched: 0,
            head_deadline: None,
            answer: Vec::new(),
            reader: None,
        };
        stream.start_body(first);
        stream
    }

    /// The wrapped stream.
    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped stream, to answer on it.
    pub(crate) fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Sets what the chosen route pins: its local host and, with path routing, the prefix
    /// (a retry may pick another client of a balanced host, which may pin another host).
    pub(crate) fn pin(&mut self, local_host: Option<String>, path_prefix: Option<String>) {
        self.pinning.forwarding.local_host = local_host;
        self.pinning.path_prefix = path_prefix;
    }

    /// What every head on this connection gets.
    pub(crate) fn forwarding(&self) -> &Forwarding {
        &self.pinning.forwarding
    }

    fn start_body(&mut self, head: &Head) {
        self.after_body = if head.upgrade { State::AwaitUpgrade } else { State::Head };
        self.state = match head.body {
            BodyLength::Fixed(0) => self.after_body,
            BodyLength::Fixed(len) => State::Body(len),
            BodyLength::Chunked => State::Chunked(ChunkState::Size),
        };
        if self.state == State::AwaitUpgrade {
            self.answer.clear();
        }
    }

    fn end(&mut self, why: &str) {
        debug!(why, "visitor's requests end here");
        self.state = State::Ended;
        self.input.clear();
    }

    /// Takes a whole buffered head, if there is one: checks and rewrites it.
    fn take_head(&mut self) -> bool {
        let Some(len) = head_end(&self.input, self.searched) else {
            self.searched = self.input.len();
            if self.input.len() > MAX_HEAD {
                self.end("request head over 64 KiB");
            }
            return self.state == State::Ended;
        };
        self.searched = 0;
        self.head_deadline = None;
        let bytes = self.input.split_to(len);
        if len > MAX_HEAD {
            self.end("request head over 64 KiB");
            return true;
        }
        let head = match parse_head(&bytes, &self.pinning.mux_header) {
            Ok(head) => head,
            Err(why) => {
                self.end(&why);
                return true;
            }
        };
        if head.route_host != self.pinning.route_host {
            self.end("a later request names another host");
            return true;
        }
        if super::webrtc::is_well_known(&head.target) {
            // The server answers those itself, on a connection of their own.
            self.end("a later request is for the server's own paths");
            return true;
        }
        let target = match &self.pinning.path_prefix {
            None => None,
            Some(prefix) => match strip_path_prefix(&head.target, prefix) {
                Some(target) => Some(target),
                None => {
                    self.end("a later request is for another path prefix");
                    return true;
                }
            },
        };
        self.output.extend_from_slice(&rewrite_head(&head, target.as_deref(), &self.pinning.forwarding));
        self.start_body(&head);
        true
    }

    /// Moves up to `left` buffered body bytes to the output; how many.
    fn pass_buffered(&mut self, left: u64) -> u64 {
        let take = self.input.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        self.output.extend_from_slice(&self.input.split_to(take));
        take as u64
    }

    /// One step of a chunked body over the buffered bytes; false when more are needed.
    fn step_chunked(&mut self, chunk: ChunkState) -> bool {
        let next = match chunk {
            ChunkState::Data(0) => ChunkState::DataEnd,
            ChunkState::Data(left) => {
                let moved = self.pass_buffered(left);
                if moved == 0 {
                    return false;
                }
                ChunkState::Data(left - moved)
            }
            ChunkState::Size => {
                let Some(line) = self.take_line() else { return false };
                match chunk_size(&line) {
                    Some(0) => {
                        self.output.extend_from_slice(b"0\r\n");
                        ChunkState::Trailers
                    }
                    Some(size) => {
                        self.output.extend_from_slice(format!("{size:x}\r\n").as_bytes());
                        ChunkState::Data(size)
                    }
                    None => {
                        self.end("bad chunk size");
                        return true;
                    }
                }
            }
            ChunkState::DataEnd => {
                let Some(line) = self.take_line() else { return false };
                if !line.is_empty() {
                    self.end("chunk data longer than its size");
                    return true;
                }
                self.output.extend_from_slice(b"\r\n");
                ChunkState::Size
            }
            ChunkState::Trailers => {
                // Trailer fields are dropped: the local service gets no header it was not
                // checked for.
                let Some(line) = self.take_line() else { return false };
                if line.is_empty() {
                    self.output.extend_from_slice(b"\r\n");
                    self.state = self.after_body;
                    return true;
                }
                ChunkState::Trailers
            }
        };
        if self.state != State::Ended {
            self.state = State::Chunked(next);
        }
        true
    }

    /// A buffered line without its line end; `None` when incomplete (too long ends the
    /// requests).
    fn take_line(&mut self) -> Option<Vec<u8>> {
        let Some(at) = self.input.iter().position(|&b| b == b'\n') else {
            if self.input.len() > MAX_LINE {
                self.end("chunk line too long");
            }
            return None;
        };
        let mut line = self.input.split_to(at + 1).to_vec();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    /// Works through buffered input; true when the state moved or output was made.
    fn step(&mut self) -> bool {
        match self.state {
            State::Head if !self.input.is_empty() => self.take_head(),
            State::Body(0) => {
                self.state = self.after_body;
                true
            }
            State::Body(left) if !self.input.is_empty() => {
                let moved = self.pass_buffered(left);
                self.state = State::Body(left - moved);
                true
            }
            State::Chunked(chunk) => self.step_chunked(chunk),
            State::Raw if !self.input.is_empty() => {
                let all = self.input.split();
                self.output.extend_from_slice(&all);
                true
            }
            _ => false,
        }
    }

    /// Decides, from the start of the response to an upgrade request, whether the
    /// connection switched protocols.
    fn watch_answer(&mut self, written: &[u8]) {
        if self.state != State::AwaitUpgrade {
            return;
        }
        let want = STATUS_PREFIX - self.answer.len();
        self.answer.extend_from_slice(&written[..want.min(written.len())]);
        if self.answer.len() < STATUS_PREFIX {
            return;
        }
        let switched = self.answer.starts_with(b"HTTP/1.") && &self.answer[8..] == b" 101";
        self.state = if switched { State::Raw } else { State::Head };
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
    }
}

/// `target` without the path-routing `prefix`, when it starts with it.
pub(crate) fn strip_path_prefix(target: &str, prefix: &str) -> Option<String> {
    let rest = target.strip_prefix(prefix)?;
    match rest.chars().next() {
        None => Some("/".into()),
        Some('/') => Some(rest.to_owned()),
        Some('?') => Some(format!("/{rest}")),
        Some(_) => None,
    }
}

/// The size of a chunk-size line (hexadecimal, extensions ignored).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = std::str::from_utf8(digits).ok()?.trim_end_matches([' ', '\t']);
    if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

impl<S: AsyncRead + Unpin> RequestStream<S> {
    /// Reads more visitor bytes into `input`; `Ok(false)` at the visitor's end, or when a
    /// started head took too long.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.state == State::Head && !self.input.is_empty() {
            let timeout = self.pinning.head_timeout;
            let deadline = self.head_deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if deadline.as_mut().poll(cx).is_ready() {
                self.end("request head not complete in time");
                return Poll::Ready(Ok(false));
            }
        }
        let mut chunk = [0u8; READ_SIZE];
        let mut read = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut read))?;
        self.input.extend_from_slice(read.filled());
        Poll::Ready(Ok(!read.filled().is_empty()))
    }

    /// Reads body bytes straight into `buf` (nothing is buffered), at most `left`.
    fn poll_body(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>, left: u64) -> Poll<io::Result<u64>> {
        let want = buf.remaining().min(usize::try_from(left).unwrap_or(usize::MAX));
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(want));
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
        let n = limited.filled().len();
        buf.advance(n);
        Poll::Ready(Ok(n as u64))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RequestStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.step() {
                continue;
            }
            match this.state {
                State::Ended => return Poll::Ready(Ok(())),
                State::AwaitUpgrade => {
                    this.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                State::Raw => return Pin::new(&mut this.inner).poll_read(cx, buf),
                State::Body(left) | State::Chunked(ChunkState::Data(left)) => {
                    let n = ready!(this.poll_body(cx, buf, left))?;
                    this.state = match (n, this.state) {
                        (0, _) => State::Ended,
                        (_, State::Body(_)) => State::Body(left - n),
                        _ => State::Chunked(ChunkState::Data(left - n)),
                    };
                    return Poll::Ready(Ok(()));
                }
                _ => {
                    if !ready!(this.poll_fill(cx))? {
                        this.state = State::Ended;
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RequestStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.watch_answer(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state == State::AwaitUpgrade {
            // The local service ended without answering the upgrade: nothing more goes to it.
            this.state = State::Ended;
            if let Some(reader) = this.reader.take() {
                reader.wake();
            }
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pinning() -> Pinning {
        let peer = "192.0.2.1".parse().unwrap();
        Pinning {
            route_host: "app".into(),
            mux_header: "Host".into(),
            path_prefix: None,
            forwarding: Forwarding { local_host: Some("local".into()), peer, scheme: "http" },
            head_timeout: Duration::from_secs(5),
        }
    }

    /// The stream after `first`, with the visitor's side of a pipe of `size` bytes (small
    /// ones make partial reads).
    fn stream_after(
        first: &[u8],
        size: usize,
    ) -> (RequestStream<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let head = parse_head(first, "Host").unwrap();
        let (visitor, inner) = tokio::io::duplex(size);
        (RequestStream::after_first(inner, &head, BytesMut::new(), pinning()), visitor)
    }

    /// What the local service gets for the visitor bytes `rest` after `first`.
    async fn rewritten(first: &[u8], rest: &[u8]) -> String {
        let (mut stream, mut visitor) = stream_after(first, 7);
        let rest = rest.to_vec();
        let send = tokio::spawn(async move {
            let _ = visitor.write_all(&rest).await;
            let _ = visitor.shutdown().await;
            visitor
        });
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        // Requests that ended early leave the visitor's bytes unread: its write fails.
        drop(stream);
        drop(send.await);
        String::from_utf8(out).unwrap()
    }

    const NEXT: &str = "GET /next HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
    const NEXT_REWRITTEN: &str = "GET /next HTTP/1.1\r\nHost: local\r\nX-Forwarded-For: 192.0.2.1\r\n";

    #[tokio::test]
    async fn a_fixed_body_passes_and_the_next_head_is_rewritten() {
        let body = "GET /x HTTP/1.1\r\nHost: other\r\n\r\n--------";
        let first = format!("POST / HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n\r\n", body.len());
        let out = rewritten(first.as_bytes(), format!("{body}{NEXT}").as_bytes()).await;
        let (passed, next) = out.split_at(body.len());
        assert_eq!(passed, body);
        assert!(next.starts_with(NEXT_REWRITTEN), "{next}");
    }

    #[tokio::test]
    async fn chunked_bodies_are_framed_and_normalised() {
        let first = b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body = "5;ext=1\r\nGET /\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n";
        let out = rewritten(first, format!("{body}{NEXT}").as_bytes()).await;
        let expected_body = "5\r\nGET /\r\na\r\n0123456789\r\n0\r\n\r\n";
        assert!(out.starts_with(expected_body), "{out}");
        assert!(out[expected_body.len()..].starts_with(NEXT_REWRITTEN), "{out}");
        // Bad framing ends the requests: nothing after it reaches the service.
        for bad in ["zz\r\nab\r\n0\r\n\r\n", "2\r\nabcd\r\n0\r\n\r\n", "-1\r\n\r\n"] {
            let out = rewritten(first, format!("{bad}{NEXT}").as_bytes()).await;
            assert!(!out.contains("/next"), "{bad:?}: {out}");
        }
    }

    #[tokio::test]
    async fn a_later_head_for_another_host_or_malformed_ends_the_requests() {
        let first = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n";
        let huge = format!("GET /a HTTP/1.1\r\nHost: app\r\nX-Pad: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        for later in [
            "GET /a HTTP/1.1\r\nHost: other\r\n\r\n",
            "GET http://other/ HTTP/1.1\r\nHost: app\r\n\r\n",
            "GET /a HTTP/1.1\r\nHost: app\r\nHost: other\r\n\r\n",
            "garbage\r\n\r\n",
            &huge,
        ] {
            let out = rewritten(first, format!("{later}{NEXT}").as_bytes()).await;
            assert_eq!(out, "", "{}", &later[..later.len().min(60)]);
        }
        let bare_lf = rewritten(first, b"GET /next HTTP/1.1\nHost: app\n\n").await;
        assert!(bare_lf.starts_with("GET /next HTTP/1.1\r\nHost: local\r\n"), "{bare_lf}");
    }

    #[tokio::test]
    async fn an_accepted_upgrade_turns_raw_and_a_refused_one_does_not() {
        let first = b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        for (answer, raw) in
            [("HTTP/1.1 101 Switching Protocols\r\n\r\n", true), ("HTTP/1.1 200 OK\r\n", false)]
        {
            let (mut stream, mut visitor) = stream_after(first, 4096);
            let frames = format!("\u{1}not http{NEXT}");
            let sent = frames.clone();
            let send = tokio::spawn(async move {
                let _ = visitor.write_all(sent.as_bytes()).await;
                let _ = visitor.shutdown().await;
                // Keep the visitor's side open until the answer was read.
                let mut answer = Vec::new();
                let _ = visitor.read_to_end(&mut answer).await;
            });
            let mut buf = [0u8; 64];
            let early = tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await;
            assert!(early.is_err(), "nothing passes before the answer");
            stream.write_all(answer.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            stream.read_to_end(&mut out).await.unwrap();
            let out = String::from_utf8(out).unwrap();
            assert_eq!(out == frames, raw, "{out}");
            // Refused: the bytes after are a (malformed) head, and end the requests.
            assert_eq!(out.is_empty(), !raw, "{out}");
            stream.shutdown().await.unwrap();
            send.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_must_arrive_within_the_head_timeout_once_started() {
        let (mut stream, mut visitor) = stream_after(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n", 64);
        let mut buf = [0u8; 64];
        // Waiting for the next request is the idle timeout's business, not this one's.
        let idle = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await;
        assert!(idle.is_err(), "an idle keep-alive connection was ended");
        visitor.write_all(b"GET /slow HTTP/1.1\r\nHo").await.unwrap();
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        assert!(out.is_empty());
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_secs(6), "{waited:?}");
    }

    #[test]
    fn path_prefixes_and_chunk_sizes() {
        assert_eq!(strip_path_prefix("/id1/web/a?x", "/id1/web").as_deref(), Some("/a?x"));
        assert_eq!(strip_path_prefix("/id1/web?x", "/id1/web").as_deref(), Some("/?x"));
        assert_eq!(strip_path_prefix("/id1/web", "/id1/web").as_deref(), Some("/"));
        assert_eq!(strip_path_prefix("/id1/webby", "/id1/web"), None);
        assert_eq!(chunk_size(b"1F;a=b"), Some(31));
        assert_eq!(chunk_size(b""), None);
        assert_eq!(chunk_size(b"fffffffffffffffff"), None);
    }
}
