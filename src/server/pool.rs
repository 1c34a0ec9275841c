//! Idle data connections of one session, waiting for visitors.
//!
//! Connections come from the client ahead of time and come back after each
//! visitor. The most recently used one is handed out first, so surplus
//! connections age at the bottom and are closed by [`DataPool::trim`]. A session over
//! QUIC keeps none: each visitor gets a new stream of the session's connection.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::transport::{open_stream, Stream};

/// Most idle data connections kept per session; more are closed on arrival.
pub(crate) const MAX_IDLE: usize = 1024;

/// A session's idle data connections.
#[derive(Default)]
pub(crate) struct DataPool {
    idle: Mutex<VecDeque<(Stream, Instant)>>,
    arrived: Notify,
    /// The session's QUIC connection, if it came over QUIC.
    quic: Option<quinn::Connection>,
}

impl DataPool {
    /// The data links of a session over QUIC: a new stream of `connection` per visitor.
    pub(crate) fn over_quic(connection: quinn::Connection) -> Self {
        DataPool { quic: Some(connection), ..DataPool::default() }
    }

    /// The session's QUIC connection, if it came over QUIC.
    pub(crate) fn quic(&self) -> Option<&quinn::Connection> {
        self.quic.as_ref()
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<(Stream, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection; false (and the connection is dropped) when the pool is full, or
    /// when the session is over QUIC (a visitor's stream serves no other).
    pub(crate) fn push(&self, stream: Stream) -> bool {
        if self.quic.is_some() {
            return false;
        }
        {
            let mut idle = self.idle();
            if idle.len() >= MAX_IDLE {
                return false;
            }
            idle.push_back((stream, Instant::now()));
        }
        self.arrived.notify_one();
        true
    }

    /// The most recent idle connection that the client has not closed meanwhile.
    fn pop(&self) -> Option<Stream> {
        let mut idle = self.idle();
        while let Some((mut stream, _)) = idle.pop_back() {
            if still_open(&mut stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Takes a connection, waiting up to `wait`; `on_empty` runs whenever none is ready.
    /// Over QUIC: opens a stream within `wait`.
    pub(crate) async fn take(&self, wait: Duration, mut on_empty: impl FnMut()) -> Option<Stream> {
        if let Some(connection) = &self.quic {
            return tokio::time::timeout(wait, open_stream(connection)).await.ok()?.ok();
        }
        let deadline = Instant::now() + wait;
        loop {
            if let Some(stream) = self.pop() {
                return Some(stream);
            }
            on_empty();
            if tokio::time::timeout_at(deadline, self.arrived.notified()).await.is_err() {
                return self.pop();
            }
        }
    }

    /// Closes connections idle for longer than `ttl`; the client opens new ones as it needs.
    pub(crate) fn trim(&self, ttl: Duration) {
        let mut idle = self.idle();
        while idle.front().is_some_and(|(_, since)| since.elapsed() > ttl) {
            idle.pop_front();
        }
    }

    /// How many connections are idle now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.idle().len()
    }

    /// Closes every idle connection; returns how many there were.
    pub(crate) fn clear(&self) -> usize {
        let mut idle = self.idle();
        let closed = idle.len();
        idle.clear();
        closed
    }
}

/// Whether an idle connection is still open: it must have nothing to read. A closed
/// one reads end-of-file (or an error) at once. This costs no system call when the
/// runtime has not seen the socket become readable.
fn still_open(stream: &mut Stream) -> bool {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    #[tokio::test]
    async fn connections_closed_while_idle_are_skipped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = DataPool::default();
        let (open_client, closed_client) =
            (TcpStream::connect(addr).await.unwrap(), TcpStream::connect(addr).await.unwrap());
        let (open_server, _) = listener.accept().await.unwrap();
        let (closed_server, _) = listener.accept().await.unwrap();
        pool.push(Box::new(open_server));
        pool.push(Box::new(closed_server));
        drop(closed_client);
        // Let the runtime see the close.
        for _ in 0..100 {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            let mut probe = pool.idle();
            let (last, _) = probe.back_mut().unwrap();
            if !still_open(last) {
                break;
            }
        }
        assert!(pool.take(Duration::from_millis(10), || {}).await.is_some(), "the open one");
        assert_eq!(pool.len(), 0, "the closed one was dropped, not handed out");
        drop(open_client);
    }
}
