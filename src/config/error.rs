//! The error of every configuration check: which key, and why.

/// A configuration value that cannot be used; shown as `key: reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// The config key (or flag without its dashes), with its path: `services[0].local`,
    /// `users.id1.secret`, or the file that could not be read.
    pub key: String,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    /// An error for `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { key: key.into(), reason: reason.into() }
    }

    /// The same error with `prefix` put before the key, e.g. `services[2].`.
    pub fn within(mut self, prefix: &str) -> Self {
        self.key.insert_str(0, prefix);
        self
    }
}
