//! Listeners: binding them with a deep enough queue, and the accept loop's one step shared
//! by every listener: accept, or stop when told, and back off after an error instead of
//! spinning.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ServerShared;

/// Connections the kernel completes and queues for a listener before the server accepts
/// them (capped by `net.core.somaxconn`). tokio's `TcpListener::bind` asks for 128: a burst
/// of visitors beyond that, or a server briefly unable to accept (out of descriptors), had
/// the rest's handshakes dropped and retried by their kernels seconds later.
const BACKLOG: u32 = 1024;

/// Binds a listener on `addr` (with `SO_REUSEADDR`, as tokio does) and a [`BACKLOG`] queue.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Pause after a failed accept (usually out of file descriptors), so the loop does not spin.
const BACKOFF: Duration = Duration::from_millis(100);

/// At most one warning per listener in this time: out of file descriptors, every accept
/// fails, and a line per failure (ten a second) would flood the log.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// One listener's failed accepts: when the last warning went out, and how many failures
/// were not logged since. Out of descriptors, it also closes the sessions' idle data
/// connections: a burst of visitors leaves the clients' answers to it idle in the pools,
/// holding the descriptors the server needs to accept anything again.
pub(crate) struct AcceptErrors {
    shared: Arc<ServerShared>,
    last_warned: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// No errors yet, for a listener of the server `shared`.
    pub(crate) fn new(shared: &Arc<ServerShared>) -> Self {
        AcceptErrors { shared: shared.clone(), last_warned: None, unlogged: 0 }
    }

    fn record(&mut self, err: &std::io::Error) {
        if is_out_of_descriptors(err) {
            let closed: usize = self.shared.registry.sessions().iter().map(|s| s.pool.clear()).sum();
            if closed > 0 {
                debug!(closed, "out of file descriptors: closed idle data connections");
            }
        }
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

/// EMFILE (this process) or ENFILE (the whole system); the same numbers on Linux and macOS.
fn is_out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(23 | 24))
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
