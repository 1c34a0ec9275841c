//! Idle data connections of one session, waiting for visitors.
//!
//! Connections come from the client ahead of time and come back after each
//! visitor. The most recently used one is handed out first, so surplus
//! connections age at the bottom and are closed by [`DataPool::trim`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::transport::Stream;

/// Most idle data connections kept per session; more are closed on arrival.
pub(crate) const MAX_IDLE: usize = 1024;

/// Idle connections older than this are closed when the pool is trimmed.
pub(crate) const IDLE_TTL: Duration = Duration::from_secs(60);

/// A session's idle data connections.
#[derive(Default)]
pub(crate) struct DataPool {
    idle: Mutex<VecDeque<(Stream, Instant)>>,
    arrived: Notify,
}

impl DataPool {
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<(Stream, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection; false (and the connection is dropped) when the pool is full.
    pub(crate) fn push(&self, stream: Stream) -> bool {
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

    fn pop(&self) -> Option<Stream> {
        self.idle().pop_back().map(|(stream, _)| stream)
    }

    /// Takes a connection, waiting up to `wait`; `on_empty` runs whenever none is ready.
    pub(crate) async fn take(&self, wait: Duration, mut on_empty: impl FnMut()) -> Option<Stream> {
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

    /// Closes every idle connection.
    pub(crate) fn clear(&self) {
        self.idle().clear();
    }
}
