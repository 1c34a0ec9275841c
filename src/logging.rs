//! Log output: tracing to standard error, or to a file rotated by size.

use std::path::PathBuf;
use std::sync::Mutex;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::error_reporting::{self, SentrySettings};

/// Where and how much to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A level (`info`) or any tracing filter directive (`ferry=debug`).
    pub level: String,
    /// Log file; `None` logs to standard error.
    pub file: Option<PathBuf>,
    /// Rotate the file when it reaches this many bytes.
    pub max_size: u64,
    /// Keep this many rotated files.
    pub max_count: usize,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { level: "info".into(), file: None, max_size: 512 * 1024 * 1024, max_count: 7 }
    }
}

/// Installs the global tracing subscriber, with Sentry reporting when `sentry` is given;
/// call once, from the binary.
pub fn init(settings: &LogSettings, sentry: Option<&SentrySettings>) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(&settings.level).map_err(|e| format!("log-level: '{}': {e}", settings.level))?;
    let sentry = sentry.map(error_reporting::init).transpose()?;
    let (writer, ansi) = match &settings.file {
        None => (BoxMakeWriter::new(std::io::stderr), true),
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("log-file: cannot create {}: {e}", dir.display()))?;
            }
            let max_size = usize::try_from(settings.max_size.max(1)).unwrap_or(usize::MAX);
            let file = FileRotate::new(
                path,
                AppendCount::new(settings.max_count.max(1)),
                ContentLimit::BytesSurpassed(max_size),
                Compression::None,
                None,
            );
            (BoxMakeWriter::new(Mutex::new(file)), false)
        }
    };
    let output = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer);
    tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(sentry)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}
