//! Traffic accounting and speed limits: a token bucket shared by many connections,
//! and a stream wrapper that counts reads and writes and makes them wait for it.
//!
//! A read or write is never cut short; its bytes are charged afterwards and may put
//! the bucket in debt, which the next read or write waits out. Overshoot is thus at
//! most one buffer (64 KiB) per connection, and the long-run rate is exact.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Largest burst, whatever the rate.
const MAX_BURST: f64 = 256.0 * 1024.0;
/// Smallest burst, so tiny rates still move whole packets.
const MIN_BURST: f64 = 4.0 * 1024.0;

/// A token bucket: `rate` bytes per second with a burst of a quarter second (4 KiB to 256 KiB).
#[derive(Debug)]
pub struct Bucket {
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    /// Bytes per second; 0 is no limit.
    rate: u64,
    burst: f64,
    /// Bytes that may pass now; negative after a large read or write (debt).
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// A bucket for `rate` bytes per second; `None` or 0 lets everything through.
    pub fn new(rate: Option<u64>) -> Self {
        let bucket = Bucket {
            state: Mutex::new(BucketState { rate: 0, burst: 0.0, tokens: 0.0, refilled: Instant::now() }),
        };
        bucket.set_rate(rate);
        {
            let mut state = bucket.lock();
            state.tokens = state.burst; // start with a full burst
        }
        bucket
    }

    /// Changes the rate; bytes already owed stay owed.
    pub fn set_rate(&self, rate: Option<u64>) {
        let mut state = self.lock();
        state.refill();
        state.rate = rate.unwrap_or(0);
        state.burst = (state.rate as f64 / 4.0).clamp(MIN_BURST, MAX_BURST);
        state.tokens = state.tokens.min(state.burst);
    }

    /// Whether the bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.lock().rate > 0
    }

    /// How long to wait before the next bytes may pass; `None` when they may pass now.
    pub fn delay(&self) -> Option<Duration> {
        let mut state = self.lock();
        if state.rate == 0 {
            return None;
        }
        state.refill();
        (state.tokens < 0.0).then(|| Duration::from_secs_f64(-state.tokens / state.rate as f64))
    }

    /// Takes `bytes` that have passed.
    pub fn charge(&self, bytes: usize) {
        let mut state = self.lock();
        if state.rate > 0 {
            state.refill();
            state.tokens -= bytes as f64;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BucketState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BucketState {
    fn refill(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst);
    }
}

/// Bytes moved each way, counted as they pass.
#[derive(Debug, Default)]
pub struct Traffic {
    /// From visitors to the service.
    pub up: AtomicU64,
    /// From the service to visitors.
    pub down: AtomicU64,
}

impl Traffic {
    /// The two counts now: (up, down).
    pub fn get(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }
}

/// Where one direction of a [`Metered`] stream is counted and, optionally, shaped.
#[derive(Clone, Copy)]
pub struct Meter<'a> {
    /// The bucket that shapes this direction, if any.
    pub bucket: Option<&'a Bucket>,
    /// Counters that each get every byte (e.g. the tunnel's and the user's).
    pub counters: [&'a AtomicU64; 2],
}

impl Meter<'_> {
    /// Counts (and charges) bytes that passed outside the wrapper, e.g. read ahead.
    pub fn record(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        for counter in self.counters {
            counter.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        if let Some(bucket) = self.bucket {
            bucket.charge(bytes);
        }
    }
}

/// A stream whose reads and writes are counted, and shaped where a bucket is given.
pub struct Metered<'a, S: ?Sized> {
    inner: &'a mut S,
    reads: Meter<'a>,
    writes: Meter<'a>,
    read_wait: Option<Pin<Box<Sleep>>>,
    write_wait: Option<Pin<Box<Sleep>>>,
}

impl<'a, S: ?Sized> Metered<'a, S> {
    /// Wraps `inner`: bytes read go to `reads`, bytes written to `writes`.
    pub fn new(inner: &'a mut S, reads: Meter<'a>, writes: Meter<'a>) -> Self {
        Metered { inner, reads, writes, read_wait: None, write_wait: None }
    }
}

/// Waits until `bucket` is out of debt; Ready once bytes may pass.
fn poll_bucket(
    bucket: Option<&Bucket>,
    wait: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let Some(bucket) = bucket else {
        return Poll::Ready(());
    };
    loop {
        if let Some(sleep) = wait {
            ready!(sleep.as_mut().poll(cx));
            *wait = None;
        }
        match bucket.delay() {
            None => return Poll::Ready(()),
            Some(delay) => *wait = Some(Box::pin(tokio::time::sleep(delay))),
        }
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Metered<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(poll_bucket(this.reads.bucket, &mut this.read_wait, cx));
        let before = buf.filled().len();
        ready!(Pin::new(&mut *this.inner).poll_read(cx, buf))?;
        this.reads.record(buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Metered<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(poll_bucket(this.writes.bucket, &mut this.write_wait, cx));
        let written = ready!(Pin::new(&mut *this.inner).poll_write(cx, data))?;
        this.writes.record(written);
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn debt_is_waited_out_at_the_rate() {
        let bucket = Bucket::new(Some(1000));
        assert_eq!(bucket.delay(), None, "starts with a full burst");
        bucket.charge(4096 + 2000);
        let delay = bucket.delay().expect("in debt");
        assert!((1.9..=2.1).contains(&delay.as_secs_f64()), "{delay:?}");
        tokio::time::advance(delay).await;
        assert_eq!(bucket.delay(), None);
        let open = Bucket::new(None);
        open.charge(1 << 30);
        assert_eq!(open.delay(), None, "no limit, no debt");
        bucket.set_rate(None);
        bucket.charge(1 << 30);
        assert_eq!(bucket.delay(), None, "limit lifted");
    }
}
