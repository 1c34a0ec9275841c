//! The idle watch of a relay: closes a visitor that moved no bytes for the timeout
//! (`timeout`, GT's `timeout-on-unidirectional-traffic`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// When a visitor that moves no bytes is closed (`timeout`, GT's
/// `timeout-on-unidirectional-traffic`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleLimit {
    /// Close after this long without a byte in either direction.
    pub timeout: Duration,
    /// Also close when one direction alone has been silent this long.
    pub unidirectional: bool,
}

/// Watches the byte counts. The time of the last progress is read whenever a poll finds the
/// counts moved (one clock read per wake-up with traffic); the timer is re-armed only when it
/// fires, so a busy relay does not touch the timer wheel per byte, yet an idle one closes at
/// its last traffic plus the timeout.
pub(crate) struct IdleWatch {
    limit: IdleLimit,
    timer: Pin<Box<Sleep>>,
    seen: (u64, u64),
    last: (Instant, Instant),
}

impl IdleWatch {
    pub(crate) fn new(limit: IdleLimit) -> Self {
        let now = Instant::now();
        IdleWatch {
            limit,
            timer: Box::pin(tokio::time::sleep(limit.timeout)),
            seen: (0, 0),
            last: (now, now),
        }
    }

    /// Notes the byte counts; an error when the visitor has been idle for the timeout.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, out: u64, r#in: u64) -> io::Result<()> {
        if (out, r#in) != self.seen {
            let now = Instant::now();
            if out != self.seen.0 {
                self.last.0 = now;
            }
            if r#in != self.seen.1 {
                self.last.1 = now;
            }
            self.seen = (out, r#in);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        let now = Instant::now();
        let silent = |since: Instant| now.saturating_duration_since(since) >= self.limit.timeout;
        let (out_silent, in_silent) = (silent(self.last.0), silent(self.last.1));
        if out_silent && in_silent {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no traffic for the idle timeout"));
        }
        if self.limit.unidirectional && (out_silent || in_silent) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "traffic went one way only for the timeout"));
        }
        let oldest = if self.limit.unidirectional {
            self.last.0.min(self.last.1)
        } else {
            self.last.0.max(self.last.1)
        };
        self.timer.as_mut().reset(oldest + self.limit.timeout);
        // Poll once more so the reset timer is registered with this task.
        if self.timer.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        Ok(())
    }
}
