//! Idle data connections a client opened in advance, waiting for visitors.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use crate::transport::Stream;

/// Most idle data connections kept per session; more are closed on arrival.
pub(crate) const MAX_IDLE: usize = 1024;

/// A session's idle data connections.
#[derive(Default)]
pub(crate) struct DataPool {
    idle: Mutex<VecDeque<Stream>>,
    arrived: Notify,
}

impl DataPool {
    /// Adds a connection; false (and the connection is dropped) when the pool is full.
    pub(crate) fn push(&self, stream: Stream) -> bool {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() >= MAX_IDLE {
                return false;
            }
            idle.push_back(stream);
        }
        self.arrived.notify_one();
        true
    }

    fn pop(&self) -> Option<Stream> {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    /// Takes a connection, waiting up to `wait`; `on_empty` runs whenever none is ready.
    pub(crate) async fn take(&self, wait: Duration, mut on_empty: impl FnMut()) -> Option<Stream> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(stream) = self.pop() {
                return Some(stream);
            }
            on_empty();
            if tokio::time::timeout_at(deadline, self.arrived.notified())
                .await
                .is_err()
            {
                return self.pop();
            }
        }
    }

    /// Closes every idle connection.
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
