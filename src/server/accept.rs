//! The accept loop's one step, shared by every listener: accept, or stop when told, and
//! back off after an error instead of spinning.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Pause after a failed accept (usually out of file descriptors), so the loop does not spin.
const BACKOFF: Duration = Duration::from_millis(100);

/// The next connection on `listener`; `None` once `stop` is cancelled. Accept errors are
/// logged and retried after [`BACKOFF`]: one bad moment never ends a listener.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(accepted) => return Some(accepted),
            Err(err) => {
                warn!(%err, "accept failed; backing off");
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(BACKOFF) => {}
                }
            }
        }
    }
}
