//! Log output: tracing to standard error (in colour only on a terminal, and never with
//! `NO_COLOR` set), or to a file rotated by size (never in colour).

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::ConfigError;
use crate::error_reporting::{self, SentrySettings};

/// Where and how much to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A level (`info`) or any tracing filter directive (`ferry=debug`).
    pub level: String,
    /// Log file; `None` logs to standard error.
    pub file: Option<PathBuf>,
    /// Rotate the file before it would pass this many bytes.
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
pub fn init(settings: &LogSettings, sentry: Option<&SentrySettings>) -> Result<(), ConfigError> {
    let filter = EnvFilter::try_new(&settings.level)
        .map_err(|e| ConfigError::new("log-level", format!("'{}': {e}", settings.level)))?;
    let sentry = sentry.map(error_reporting::init).transpose()?;
    let (writer, ansi) = match &settings.file {
        None => (BoxMakeWriter::new(std::io::stderr), colour_on_stderr()),
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ConfigError::new("log-file", format!("cannot create {}: {e}", dir.display()))
                })?;
            }
            let file = CappedFile::open(path, settings.max_size, settings.max_count);
            (BoxMakeWriter::new(Mutex::new(file)), false)
        }
    };
    let output = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer);
    tracing_subscriber::registry()
        .with(output.with_filter(filter))
        .with(sentry)
        .try_init()
        .map_err(|e| ConfigError::new("log-level", format!("cannot install the logger: {e}")))
}

/// Whether log lines on standard error get colours: only when it is a terminal, and not
/// when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
fn colour_on_stderr() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// A log file that rotates before a write would take it past `max_size` bytes, so no
/// file grows past the limit. Log lines arrive one write each and stay whole; only a
/// line longer than `max_size` is cut across files.
struct CappedFile {
    file: FileRotate<AppendCount>,
    max_size: usize,
    /// Bytes in the current file.
    written: usize,
}

impl CappedFile {
    /// Opens (or creates) `path`, keeping `max_count` rotated files beside it.
    fn open(path: &Path, max_size: u64, max_count: usize) -> Self {
        let written = std::fs::metadata(path).map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX));
        let file = FileRotate::new(
            path,
            AppendCount::new(max_count.max(1)),
            ContentLimit::None,
            Compression::None,
            None,
        );
        let max_size = usize::try_from(max_size.max(1)).unwrap_or(usize::MAX);
        CappedFile { file, max_size, written }
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written > 0 && self.written.saturating_add(buf.len()) > self.max_size {
            self.file.rotate()?;
            self.written = 0;
        }
        let room = self.max_size.saturating_sub(self.written);
        let written = self.file.write(&buf[..buf.len().min(room)])?;
        self.written += written;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_log_file_grows_past_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.log");
        let mut file = CappedFile::open(&path, 100, 3);
        for i in 0..20 {
            file.write_all(format!("line {i:02} {}\n", "x".repeat(30)).as_bytes()).unwrap();
        }
        file.write_all(&[b'y'; 250]).unwrap();
        file.flush().unwrap();
        let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        assert_eq!(names.len(), 4, "the file and three rotated ones: {names:?}");
        for name in &names {
            let text = std::fs::read_to_string(name).unwrap();
            assert!(text.len() <= 100, "{}: {} bytes", name.display(), text.len());
            if !text.contains('y') {
                assert!(text.ends_with('\n') && text.lines().all(|l| l.len() == 38), "cut lines: {text:?}");
            }
        }
    }
}
