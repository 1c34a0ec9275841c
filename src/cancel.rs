//! Running a long future until a cancellation token fires, cheaply.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::Poll;

use tokio_util::sync::CancellationToken;

/// Runs `work` until it completes (`Some`) or `token` is cancelled (`None`).
///
/// Unlike `select!` on `token.cancelled()`, which re-registers with the token on
/// every wake-up, this registers the task's waker once and afterwards only reads
/// the token's flag. Reading the flag takes the token's lock (tokio-util 0.7): a
/// child token per task would avoid contention on a shared one, but measured no
/// faster on the keep-alive benchmark (2 cores), so tasks share their tunnel's.
pub async fn until_cancelled<F: Future>(token: &CancellationToken, work: F) -> Option<F::Output> {
    let mut cancelled = pin!(token.cancelled());
    let mut work = pin!(work);
    let mut registered = false;
    poll_fn(|cx| {
        if !registered {
            if cancelled.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            // The waker of a spawned task stays the same, so one registration is enough.
            registered = true;
        } else if token.is_cancelled() {
            return Poll::Ready(None);
        }
        work.as_mut().poll(cx).map(Some)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn finishes_or_stops() {
        let token = CancellationToken::new();
        assert_eq!(until_cancelled(&token, async { 7 }).await, Some(7));
        let stopper = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stopper.cancel();
        });
        let never = std::future::pending::<()>();
        let stopped = tokio::time::timeout(Duration::from_secs(5), until_cancelled(&token, never)).await;
        assert_eq!(stopped.expect("cancellation was not noticed"), None);
    }
}
