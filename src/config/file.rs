//! What the library reads from files: config and users files (YAML, or TOML when the
//! name ends in `.toml`), one user's settings, and flags laid over a file's values.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::validate::check_host_regex;
use super::{ConfigError, PortRange, TcpAllowance, UserConfig};
use crate::auth::Secret;

/// One user's settings in the config file's `users:` map, the users file, or an auth API answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct UserOptions {
    /// The user's secret (not needed in an auth API answer).
    pub secret: Option<Secret>,
    /// TCP ports: a list of `{number, range}`; an empty list allows none.
    pub tcp: Option<Vec<TcpOptions>>,
    /// UDP ports, in the same shape as `tcp`.
    pub udp: Option<Vec<TcpOptions>>,
    /// Host names: `{number, regex, with-id}`.
    pub host: Option<HostOptions>,
    /// Bytes per second, each direction, across the user's visitors.
    pub speed: Option<u64>,
    /// Visitor connections at once.
    pub connections: Option<u32>,
    /// Client sessions at once.
    pub sessions: Option<u32>,
}

/// One entry of a user's `tcp:` (or `udp:`) list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TcpOptions {
    /// Ports, e.g. `1024-65535`.
    pub range: PortRange,
    /// How many of them at a time. [default: no limit]
    #[serde(default)]
    pub number: Option<u32>,
}

/// A user's `host:` settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct HostOptions {
    /// Host names at a time.
    pub number: Option<u32>,
    /// Patterns a host prefix must match (one or a list).
    #[serde(deserialize_with = "one_or_many_opt")]
    pub regex: Option<Vec<String>>,
    /// Route ID-PREFIX.domain.
    pub with_id: Option<bool>,
}

/// A `tcp:` or `udp:` list as the configuration holds it.
fn allowances(list: Vec<TcpOptions>) -> Vec<TcpAllowance> {
    list.into_iter().map(|t| TcpAllowance { range: t.range, number: t.number }).collect()
}

impl UserOptions {
    /// Checks the values; `needs_secret` is false for auth API answers.
    pub fn into_config(self, needs_secret: bool) -> Result<UserConfig, ConfigError> {
        let secret = match (self.secret, needs_secret) {
            (Some(secret), _) => secret,
            (None, false) => Secret::default(),
            (None, true) => return Err(ConfigError::new("secret", "missing")),
        };
        let host = self.host.unwrap_or_default();
        check_host_regex("host.regex", host.regex.iter().flatten())?;
        Ok(UserConfig {
            secret,
            tcp: self.tcp.map(allowances),
            udp: self.udp.map(allowances),
            host_number: host.number,
            host_regex: host.regex,
            host_with_id: host.with_id,
            speed: self.speed,
            connections: self.connections,
            sessions: self.sessions,
        })
    }
}

/// Reads a users file: a map of id to settings (YAML, or TOML when the name ends in `.toml`).
pub fn load_users_file(path: &Path) -> Result<BTreeMap<String, UserConfig>, ConfigError> {
    let file = format!("users file {}", path.display());
    parse_users(&read_text(path, &file)?, is_toml(path), &file)
}

/// Parses the text of a users file named `file` (TOML when `toml`, else YAML).
pub(crate) fn parse_users(
    text: &str,
    toml: bool,
    file: &str,
) -> Result<BTreeMap<String, UserConfig>, ConfigError> {
    let users: BTreeMap<String, UserOptions> = parse_text(text, toml, file)?;
    users
        .into_iter()
        .map(|(id, user)| {
            let user = user.into_config(true).map_err(|e| e.within(&format!("{file}: {id}.")))?;
            Ok((id, user))
        })
        .collect()
}

/// Like `one_or_many`, for optional lists.
pub(crate) fn one_or_many_opt<'de, D, T>(deserializer: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    one_or_many(deserializer).map(Some)
}

/// Accepts a single value or a list, so `cert-file: a.pem` and `cert-file: [a.pem, b.pem]` both work.
pub(crate) fn one_or_many<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// Reads a config file: YAML, or TOML when the name ends in `.toml`. Errors name the key and line.
pub fn load_file<T: DeserializeOwned + Default>(path: &Path) -> Result<T, ConfigError> {
    let file = format!("config file {}", path.display());
    parse_text(&read_text(path, &file)?, is_toml(path), &file)
}

/// The text of `file` (a config or users file) at `path`.
pub(crate) fn read_text(path: &Path, file: &str) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::new(file, format!("cannot read: {e}")))
}

/// Whether the file at `path` is TOML (its name ends in `.toml`) rather than YAML.
pub(crate) fn is_toml(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml")
}

/// Parses the text of `file` (a config or users file): TOML when `toml`, else YAML; an
/// empty text is the default.
pub(crate) fn parse_text<T: DeserializeOwned + Default>(
    text: &str,
    toml: bool,
    file: &str,
) -> Result<T, ConfigError> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    let parsed = if toml {
        toml::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_norway::from_str(text).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| ConfigError::new(file, e))
}

/// Lays `flags` over `file`: every flag that was given replaces the file's value.
pub fn overlay<T: Serialize + DeserializeOwned>(file: T, flags: T) -> Result<T, ConfigError> {
    let flag_error = |e: serde_json::Error| ConfigError::new("flags", e.to_string());
    let mut merged = serde_json::to_value(file).map_err(flag_error)?;
    let flags = serde_json::to_value(flags).map_err(flag_error)?;
    if let (Value::Object(merged), Value::Object(flags)) = (&mut merged, flags) {
        for (key, value) in flags {
            let unset = value.is_null()
                || value.as_array().is_some_and(Vec::is_empty)
                || value.as_object().is_some_and(|o| o.is_empty());
            if unset {
                continue;
            }
            let joined = match merged.remove(&key) {
                Some(file) if JOINED_KEYS.contains(&key.as_str()) => join(file, value),
                _ => value,
            };
            merged.insert(key, joined);
        }
    }
    serde_json::from_value(merged).map_err(flag_error)
}

/// Keys whose flag joins the maps of the config file's value instead of replacing it:
/// `--users FILE` adds a users file to the `users:` map of the config file (see
/// `users_key.rs`); a users file named in the config file is replaced.
const JOINED_KEYS: &[&str] = &["users"];

/// The maps of `file` (itself one, or a list holding some), then `flag`, as one list.
fn join(file: Value, flag: Value) -> Value {
    let maps = match file {
        Value::Array(items) => items.into_iter().filter(Value::is_object).collect(),
        map @ Value::Object(_) => vec![map],
        _ => Vec::new(),
    };
    Value::Array(maps.into_iter().chain([flag]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_parse_as_yaml_or_toml_and_errors_name_the_file() {
        let yaml = "alice:\n  secret: a\n  speed: 10\n";
        let toml = "[alice]\nsecret = \"a\"\nspeed = 10\n";
        for (text, is_toml) in [(yaml, false), (toml, true)] {
            let users = parse_users(text, is_toml, "users file u").unwrap();
            assert_eq!(users["alice"].speed, Some(10));
        }
        assert!(parse_users("  \n", false, "users file u").unwrap().is_empty(), "empty is no users");
        let err = parse_users("bob:\n  speed: 1\n", false, "users file u").unwrap_err();
        assert_eq!(err, ConfigError::new("users file u: bob.secret", "missing"));
        assert!(parse_text::<Value>("a = [", true, "config file c")
            .unwrap_err()
            .to_string()
            .contains("config file c"));
    }
}
