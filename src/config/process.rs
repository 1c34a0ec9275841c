//! What the process around a server or client needs, whichever it runs: log output,
//! error reporting, a pid file, or a signal to send instead of running. The flags are
//! written once here and added to each command's options by [`command_options!`].

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ConfigError;
use crate::error_reporting::{parse_level, SentrySettings};
use crate::logging::LogSettings;

/// A signal for a running process (`-s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProcessSignal {
    /// Re-read the configuration (SIGHUP).
    Reload,
    /// Stop gracefully (SIGTERM).
    Stop,
}

/// The process settings of a command, with defaults applied (`-s` is [`CommandOptions::signal`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessOptions {
    /// Where and how much to log.
    pub log: LogSettings,
    /// Where to report errors, when `sentry-dsn` is given.
    pub sentry: Option<SentrySettings>,
    /// Where to write the process id.
    pub pid_file: Option<PathBuf>,
}

/// A command's options (`ferry server`, `ferry client`): flags and config-file keys in one.
pub trait CommandOptions: Clone + Default + Serialize + DeserializeOwned {
    /// The command's name, for messages.
    const NAME: &'static str;
    /// The config file given with `--config` (a flag only).
    fn config_file(&self) -> Option<&Path>;
    /// The signal given with `-s` (a flag only).
    fn signal(&self) -> Option<ProcessSignal>;
    /// Its process settings; errors name the key.
    fn process(&self) -> Result<ProcessOptions, ConfigError>;
}

/// The `sentry-*` values of a command.
pub(crate) struct SentryOptions<'a> {
    pub(crate) dsn: &'a Option<String>,
    pub(crate) level: &'a Option<String>,
    pub(crate) sample_rate: Option<f32>,
    pub(crate) environment: &'a Option<String>,
    pub(crate) release: &'a Option<String>,
    pub(crate) server_name: &'a Option<String>,
    pub(crate) debug: Option<bool>,
}

impl SentryOptions<'_> {
    /// The settings, when a DSN is given.
    pub(crate) fn settings(self) -> Result<Option<SentrySettings>, ConfigError> {
        let Some(dsn) = self.dsn else {
            return Ok(None);
        };
        let level = self.level.as_deref().map(parse_level).transpose()?.unwrap_or(tracing::Level::ERROR);
        Ok(Some(SentrySettings {
            dsn: dsn.clone(),
            level,
            sample_rate: self.sample_rate.unwrap_or(1.0),
            environment: self.environment.clone(),
            release: self.release.clone(),
            server_name: self.server_name.clone(),
            debug: self.debug.unwrap_or(false),
        }))
    }
}

/// Log settings from a command's `log-*` values, with defaults applied.
pub(crate) fn log_settings(
    level: &Option<String>,
    file: &Option<PathBuf>,
    size: Option<u64>,
    count: Option<usize>,
) -> LogSettings {
    let default = LogSettings::default();
    LogSettings {
        level: level.clone().unwrap_or(default.level),
        file: file.clone(),
        max_size: size.unwrap_or(default.max_size),
        max_count: count.unwrap_or(default.max_count),
    }
}

/// Defines a command's options struct (`$name`, shown in messages as `$what`) with its own
/// fields followed by the process flags every command shares, and implements
/// [`CommandOptions`] for it. The struct needs a `config: Option<PathBuf>` field.
macro_rules! command_options {
    ($what:literal, $(#[$attr:meta])* pub struct $name:ident { $($body:tt)* }) => {
        $(#[$attr])*
        // These docs are also the `--help` text, written for a terminal: bare URLs, `[default: ...]`.
        #[allow(rustdoc::bare_urls, rustdoc::broken_intra_doc_links)]
        pub struct $name {
            $($body)*
            /// Log filter: error, warn, info, debug, trace, or a tracing directive. [default: info]
            #[arg(long)]
            pub log_level: Option<String>,
            /// Write logs to this file instead of standard error.
            #[arg(long)]
            pub log_file: Option<::std::path::PathBuf>,
            /// Rotate the log file before a line would take it past this many bytes. [default: 536870912]
            #[arg(long)]
            pub log_file_max_size: Option<u64>,
            /// How many rotated log files to keep. [default: 7]
            #[arg(long)]
            pub log_file_max_count: Option<usize>,
            /// Report errors to Sentry at this DSN (e.g. https://KEY@o0.ingest.sentry.io/0).
            #[arg(long)]
            pub sentry_dsn: Option<String>,
            /// The least severe level sent to Sentry as an event: error or warn. [default: error]
            #[arg(long)]
            pub sentry_level: Option<String>,
            /// Share of events sent to Sentry, 0.0 to 1.0. [default: 1.0]
            #[arg(long)]
            pub sentry_sample_rate: Option<f32>,
            /// Sentry environment, e.g. production.
            #[arg(long)]
            pub sentry_environment: Option<String>,
            /// Sentry release. [default: ferry@VERSION]
            #[arg(long)]
            pub sentry_release: Option<String>,
            /// Sentry server name. [default: the host name]
            #[arg(long)]
            pub sentry_server_name: Option<String>,
            /// Print the Sentry client's own diagnostics.
            #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
            pub sentry_debug: Option<bool>,
            /// Write the process id here, so `-s reload` and `-s stop` can find the process.
            #[arg(long)]
            pub pid_file: Option<::std::path::PathBuf>,
            /// Instead of running, signal the running process found through --pid-file:
            /// reload (read the config again) or stop.
            #[arg(short = 's', long = "signal", value_name = "SIGNAL")]
            #[serde(skip)]
            pub signal: Option<$crate::config::options::ProcessSignal>,
        }

        impl $crate::config::options::CommandOptions for $name {
            const NAME: &'static str = $what;

            fn config_file(&self) -> Option<&::std::path::Path> {
                self.config.as_deref()
            }

            fn signal(&self) -> Option<$crate::config::options::ProcessSignal> {
                self.signal
            }

            fn process(
                &self,
            ) -> Result<$crate::config::options::ProcessOptions, $crate::config::ConfigError> {
                let sentry = $crate::config::process::SentryOptions {
                    dsn: &self.sentry_dsn,
                    level: &self.sentry_level,
                    sample_rate: self.sentry_sample_rate,
                    environment: &self.sentry_environment,
                    release: &self.sentry_release,
                    server_name: &self.sentry_server_name,
                    debug: self.sentry_debug,
                };
                Ok($crate::config::options::ProcessOptions {
                    log: $crate::config::process::log_settings(
                        &self.log_level,
                        &self.log_file,
                        self.log_file_max_size,
                        self.log_file_max_count,
                    ),
                    sentry: sentry.settings()?,
                    pid_file: self.pid_file.clone(),
                })
            }
        }
    };
}
pub(crate) use command_options;
