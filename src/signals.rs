//! The process signals a long-running `ferry server` or `ferry client` obeys: SIGHUP
//! reloads, SIGTERM and Ctrl-C stop gracefully.
//!
//! Handlers are installed by [`Signals::install`], before the pid file is written, so a
//! `-s reload` sent as soon as the pid file appears is queued instead of killing the
//! process (the default action of SIGHUP).

#[cfg(unix)]
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Installed signal handlers.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    hangup: Option<Signal>,
    #[cfg(unix)]
    terminate: Option<Signal>,
    #[cfg(unix)]
    interrupt: Option<Signal>,
}

impl Signals {
    /// Installs the handlers now; signals that arrive before they are awaited are kept.
    /// Must be called inside a Tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            let hangup = signal(SignalKind::hangup()).ok();
            if hangup.is_none() {
                tracing::warn!("cannot listen for SIGHUP; reload is unavailable");
            }
            Signals {
                hangup,
                terminate: signal(SignalKind::terminate()).ok(),
                interrupt: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Splits off the reload stream, so reloads and shutdown can be awaited by different tasks.
    pub fn split(self) -> (Hangups, Shutdown) {
        #[cfg(unix)]
        {
            (
                Hangups { signal: self.hangup },
                Shutdown { terminate: self.terminate, interrupt: self.interrupt },
            )
        }
        #[cfg(not(unix))]
        (Hangups {}, Shutdown {})
    }
}

/// SIGHUP, as a stream of wake-ups (never, on systems without it).
#[derive(Debug)]
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<Signal>,
}

impl Hangups {
    /// Completes at the next SIGHUP.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = self.signal.as_mut() {
            if signal.recv().await.is_some() {
                return;
            }
        }
        std::future::pending::<()>().await
    }
}

/// SIGTERM or Ctrl-C.
#[derive(Debug)]
pub struct Shutdown {
    #[cfg(unix)]
    terminate: Option<Signal>,
    #[cfg(unix)]
    interrupt: Option<Signal>,
}

impl Shutdown {
    /// Completes at the first SIGTERM or Ctrl-C.
    pub async fn wait(mut self) {
        #[cfg(unix)]
        {
            let term = next_or_never(self.terminate.as_mut());
            let int = next_or_never(self.interrupt.as_mut());
            tokio::select! {
                _ = term => {},
                _ = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(unix)]
async fn next_or_never(signal: Option<&mut Signal>) {
    if let Some(signal) = signal {
        if signal.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}
