//! Error reporting to Sentry (`--sentry-dsn` and GT's other sentry options).
//!
//! Error log events become Sentry events (warnings too with `sentry-level warn`);
//! lower levels ride along as breadcrumbs. Secrets never reach the log, so they never
//! reach Sentry either.

use std::time::Duration;

use tracing::Level;
use tracing_subscriber::Layer;

use crate::config::ConfigError;
#[cfg(feature = "sentry")]
pub use with_sentry::{flush, init};
#[cfg(not(feature = "sentry"))]
pub use without_sentry::{flush, init};

/// Where and what to report.
#[derive(Debug, Clone, PartialEq)]
pub struct SentrySettings {
    /// The project's DSN, e.g. `https://key@o0.ingest.sentry.io/0`.
    pub dsn: String,
    /// The least severe level sent as an event: `error` or `warn`.
    pub level: Level,
    /// Share of events sent, 0.0 to 1.0.
    pub sample_rate: f32,
    /// Environment name, e.g. `production`.
    pub environment: Option<String>,
    /// Release name; defaults to `ferry@VERSION`.
    pub release: Option<String>,
    /// Server name; defaults to the host name.
    pub server_name: Option<String>,
    /// Print the Sentry client's own diagnostics.
    pub debug: bool,
}

/// Parses `sentry-level`.
pub fn parse_level(text: &str) -> Result<Level, ConfigError> {
    match text.to_ascii_lowercase().as_str() {
        "error" | "fatal" | "panic" => Ok(Level::ERROR),
        "warn" | "warning" => Ok(Level::WARN),
        other => Err(ConfigError::new("sentry-level", format!("'{other}' is not error or warn"))),
    }
}

#[cfg(feature = "sentry")]
mod with_sentry {
    use std::sync::OnceLock;

    use sentry::integrations::tracing::{BreadcrumbLayer, ErrorLayer};
    use tracing_subscriber::filter::LevelFilter;

    use super::*;

    /// Keeps the Sentry client alive for the whole process.
    static GUARD: OnceLock<sentry::ClientInitGuard> = OnceLock::new();

    /// Starts the Sentry client; returns the tracing layer that feeds it.
    pub fn init<S>(settings: &SentrySettings) -> Result<impl Layer<S>, ConfigError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        // The HTTP transport uses rustls with the process's crypto provider: ring, as everywhere in ferry.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dsn: sentry::types::Dsn = settings
            .dsn
            .parse()
            .map_err(|e: sentry::types::ParseDsnError| ConfigError::new("sentry-dsn", e.to_string()))?;
        if !(0.0..=1.0).contains(&settings.sample_rate) {
            return Err(ConfigError::new("sentry-sample-rate", "must lie between 0.0 and 1.0"));
        }
        let release =
            settings.release.clone().unwrap_or_else(|| concat!("ferry@", env!("CARGO_PKG_VERSION")).into());
        // `dsn` was checked above: the builder's own `dsn()` would panic on a bad one.
        let mut options = sentry::ClientOptions::new()
            .sample_rate(settings.sample_rate)
            .release(release)
            .debug(settings.debug);
        options.dsn = Some(dsn);
        if let Some(environment) = &settings.environment {
            options = options.environment(environment.clone());
        }
        if let Some(server_name) = &settings.server_name {
            options = options.server_name(server_name.clone());
        }
        let guard = sentry::init(options);
        if GUARD.set(guard).is_err() {
            return Err(ConfigError::new("sentry-dsn", "sentry is started already"));
        }
        let events = ErrorLayer::new().with_filter(LevelFilter::from_level(settings.level));
        Ok(events.and_then(BreadcrumbLayer::new().with_filter(LevelFilter::INFO)))
    }

    /// Sends what is queued, waiting at most `timeout`; call before the process exits.
    pub fn flush(timeout: Duration) {
        if let Some(client) = sentry::Hub::current().client() {
            client.flush(Some(timeout));
        }
    }
}

/// Without the `sentry` feature, `--sentry-dsn` is refused.
#[cfg(not(feature = "sentry"))]
mod without_sentry {
    use super::*;

    /// Refuses: this build cannot report to Sentry.
    pub fn init<S: tracing::Subscriber>(_settings: &SentrySettings) -> Result<impl Layer<S>, ConfigError> {
        Err::<tracing_subscriber::layer::Identity, _>(ConfigError::new(
            "sentry-dsn",
            "this ferry was built without the `sentry` feature",
        ))
    }

    /// Nothing to send.
    pub fn flush(_timeout: Duration) {}
}
