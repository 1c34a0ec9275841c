//! The accept loop's one step, shared by every listener: accept, or stop when told, and
//! back off after an error instead of spinning.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Pause after a failed accept (usually out of file descriptors), so the loop does not spin.
const BACKOFF: Duration = Duration::from_millis(100);

/// At most one warning per listener in this time: out of file descriptors, every accept
/// fails, and a line per failure (ten a second) would flood the log.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// One listener's failed accepts: when the last warning went out, and how many failures
/// were not logged since.
#[derive(Debug, Default)]
pub(crate) struct AcceptErrors {
    last_warned: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    fn record(&mut self, err: &std::io::Error) {
        let now = Instant::now();
        if self.last_warned.is_some_and(|at| now.duration_since(at) < WARN_EVERY) {
            self.unlogged += 1;
            return;
        }
        warn!(%err, since_last_warning = self.unlogged, "accept failed; backing off");
        self.last_warned = Some(now);
        self.unlogged = 0;
    }
}

/// The next connection on `listener`; `None` once `stop` is cancelled. Accept errors are
/// logged (at most once per [`WARN_EVERY`], counted in `errors`) and retried after
/// [`BACKOFF`]: one bad moment never ends a listener.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    errors: &mut AcceptErrors,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(err) => {
                errors.record(&err);
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(BACKOFF) => {}
                }
            }
        }
    }
}
