//! GT's spellings of ferry's options, so GT's command lines and config files run unchanged.
//!
//! Every option is defined once, in `options.rs`, under its kebab-case name; GT's names
//! are derived from it: `remoteTCPPort` is `remote-tcp-port` ([`kebab_case`]), on the
//! command line with one dash (`-remoteTCPPort 2222`, rewritten to `--remote-tcp-port`
//! before clap sees it) and as a config key. GT's config files put the options under
//! `options:` beside a `version:`, name one service with `local:` among the options, and
//! write the server's global `tcp:` and `host:` as blocks; `adopt_file` turns such a
//! file into ferry's shape. Options of GT that ferry lacks are refused by name.

use std::ffi::OsString;

use serde_json::{Map, Value};

use super::ConfigError;

/// GT options that ferry does not have yet, by their kebab-case name, with what they are.
const UNSUPPORTED: &[(&str, &str)] = &[("webrtc-log-level", "a log level of its own for WebRTC")];

/// GT's name for an option that ferry names differently: (GT's, ferry's), both kebab-case.
const RENAMED: &[(&str, &str)] = &[
    ("tls-version", "tls-min-version"),
    ("api-tls-version", "api-tls-min-version"),
    ("webrtc-min-port", "p2p-min-port"),
    ("webrtc-max-port", "p2p-max-port"),
    ("webrtc-connection-idle-timeout", "p2p-idle-timeout"),
];

/// `remoteTCPPort` → `remote-tcp-port`, `useLocalAsHTTPHost` → `use-local-as-http-host`,
/// `hostWithID` → `host-with-id`; a name in kebab-case already is left as it is.
pub fn kebab_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            let after_lower = chars[i - 1].is_ascii_lowercase() || chars[i - 1].is_ascii_digit();
            // The last capital of a run starts a word when a lower-case letter follows: `TCPPort`.
            let ends_run =
                chars[i - 1].is_ascii_uppercase() && chars.get(i + 1).is_some_and(char::is_ascii_lowercase);
            if after_lower || ends_run {
                out.push('-');
            }
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Ferry's name for a kebab-case name of GT's.
fn renamed(kebab: String) -> String {
    match RENAMED.iter().find(|(gt, _)| *gt == kebab) {
        Some((_, ours)) => (*ours).to_owned(),
        None => kebab,
    }
}

/// Refuses a GT option that ferry lacks, saying what it is.
pub(crate) fn check_supported(kebab: &str) -> Result<(), ConfigError> {
    match UNSUPPORTED.iter().find(|(name, _)| *name == kebab) {
        Some((name, what)) => Err(ConfigError::new(*name, format!("{what} is not supported yet"))),
        None => Ok(()),
    }
}

/// Rewrites GT's single-dash long flags (`-remoteTCPPort`, `-id=a`) to ferry's
/// (`--remote-tcp-port`, `--id=a`) when `is_long` knows the name; other arguments,
/// short flags (`-s`) and values are left alone.
pub(crate) fn normalise_args(
    args: Vec<OsString>,
    is_long: impl Fn(&str) -> bool,
) -> Result<Vec<OsString>, ConfigError> {
    let mut out = Vec::with_capacity(args.len());
    let mut rest_are_values = false;
    for arg in args {
        let text = arg.to_string_lossy();
        rest_are_values |= text == "--";
        let single =
            text.strip_prefix('-').filter(|t| !rest_are_values && t.len() > 1 && !t.starts_with('-'));
        let Some(flag) = single else {
            out.push(arg);
            continue;
        };
        let (name, value) = match flag.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (flag, None),
        };
        let kebab = renamed(kebab_case(name));
        check_supported(&kebab).map_err(|e| e.within("-"))?;
        if !is_long(&kebab) {
            out.push(arg);
            continue;
        }
        let long = match value {
            Some(value) => format!("--{kebab}={value}"),
            None => format!("--{kebab}"),
        };
        out.push(long.into());
    }
    Ok(out)
}

/// Turns a config file in GT's shape into ferry's: the keys of `options:` join the top
/// level, `version:` goes, camelCase keys (top level and services) become kebab-case, a
/// `local:` among the options becomes a service made of `service_keys`, and the server's
/// `tcp:` and `host:` blocks become `tcp-range`/`tcp-number` and `host-*`. Returns whether
/// anything changed.
pub(crate) fn adopt_file(file: &mut Value, service_keys: &[String]) -> Result<bool, ConfigError> {
    let Value::Object(top) = file else { return Ok(false) };
    let before = top.clone();
    top.remove("version");
    if let Some(Value::Object(options)) = top.remove("options") {
        for (key, value) in options {
            let joined = match top.remove(&key) {
                // GT: `users:` in the file holds users, `options.users` names a users file.
                Some(existing) if key == "users" => Value::Array(vec![value, existing]),
                Some(_) => return Err(ConfigError::new(key, "given both at the top and under options:")),
                None => value,
            };
            top.insert(key, joined);
        }
    }
    kebab_keys(top)?;
    if let Some(Value::Array(services)) = top.get_mut("services") {
        for service in services.iter_mut().filter_map(Value::as_object_mut) {
            kebab_keys(service)?;
        }
    }
    fold_local(top, service_keys);
    adopt_tcp_block(top)?;
    adopt_host_block(top)?;
    Ok(*top != before)
}

/// Renames camelCase keys to kebab-case (and GT's renamed ones to ferry's names).
fn kebab_keys(map: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let kebab = renamed(kebab_case(&key));
        check_supported(&kebab)?;
        if kebab != key {
            let value = map.remove(&key).unwrap_or(Value::Null);
            map.insert(kebab, value);
        }
    }
    Ok(())
}

/// GT's client takes one service's keys among the options (`local: ...`): they become a
/// service, after those of `services:`.
fn fold_local(top: &mut Map<String, Value>, service_keys: &[String]) {
    if !top.contains_key("local") {
        return;
    }
    let service: Map<String, Value> =
        service_keys.iter().filter_map(|key| top.remove(key).map(|value| (key.clone(), value))).collect();
    match top.entry("services").or_insert_with(|| Value::Array(Vec::new())) {
        Value::Array(services) => services.push(Value::Object(service)),
        _ => {
            top.insert("services".into(), Value::Array(vec![Value::Object(service)]));
        }
    }
}

/// GT's server-wide `tcp: [{number, range}]`: ferry has one `tcp-number` for all of
/// `tcp-range`, so the entries must agree on the number.
fn adopt_tcp_block(top: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let Some(tcp) = top.remove("tcp") else { return Ok(()) };
    let entries = tcp.as_array().cloned().unwrap_or_else(|| vec![tcp.clone()]);
    let mut ranges = Vec::new();
    let mut numbers = Vec::new();
    for entry in &entries {
        let range = entry.get("range").ok_or_else(|| ConfigError::new("tcp", "each entry needs a range"))?;
        ranges.push(range.clone());
        numbers.push(entry.get("number").cloned().unwrap_or(Value::Null));
    }
    numbers.dedup();
    if numbers.len() > 1 {
        return Err(ConfigError::new("tcp", "a different number for each range is not supported yet"));
    }
    top.insert("tcp-range".into(), Value::Array(ranges));
    if let Some(number) = numbers.pop().filter(|n| !n.is_null()) {
        top.insert("tcp-number".into(), number);
    }
    Ok(())
}

/// GT's server-wide `host: {number, regex, withID}`. GT's README also shows `host: 1.2.3.4`
/// among the options, a value GT's own server does not use: such a scalar is ignored.
fn adopt_host_block(top: &mut Map<String, Value>) -> Result<(), ConfigError> {
    let Some(host) = top.remove("host") else { return Ok(()) };
    let host = match host {
        Value::Object(host) => host,
        Value::String(_) | Value::Number(_) | Value::Null => {
            tracing::warn!("host: a single value (as in GT's README) means nothing to ferry; ignored");
            return Ok(());
        }
        _ => return Err(ConfigError::new("host", "expected a block: {number, regex, withID}")),
    };
    for (key, value) in host {
        let ours = match kebab_case(&key).as_str() {
            "number" => "host-number",
            "regex" => "host-regex",
            "with-id" => "host-with-id",
            _ => return Err(ConfigError::new(format!("host.{key}"), "unknown key")),
        };
        top.insert(ours.into(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gt_names_become_ferry_names() {
        for (gt, ours) in [
            ("remoteTCPPort", "remote-tcp-port"),
            ("useLocalAsHTTPHost", "use-local-as-http-host"),
            ("hostWithID", "host-with-id"),
            ("httpMUXHeader", "http-mux-header"),
            ("sentryDSN", "sentry-dsn"),
            ("authAPI", "auth-api"),
            ("logFileMaxCount", "log-file-max-count"),
            ("id", "id"),
            ("remote-tcp-port", "remote-tcp-port"),
        ] {
            assert_eq!(kebab_case(gt), ours, "{gt}");
        }
    }

    #[test]
    fn single_dash_long_flags_get_two() {
        let args = ["ferry", "x", "-id", "a", "-remoteTCPPort=2", "-tlsVersion", "-s", "stop", "--", "-id"];
        let args = args.map(OsString::from).to_vec();
        let known = |name: &str| ["id", "remote-tcp-port", "tls-min-version"].contains(&name);
        let out = normalise_args(args, known).unwrap();
        let out: Vec<_> = out.iter().map(|a| a.to_str().unwrap()).collect();
        let expected = [
            "ferry",
            "x",
            "--id",
            "a",
            "--remote-tcp-port=2",
            "--tls-min-version",
            "-s",
            "stop",
            "--",
            "-id",
        ];
        assert_eq!(out, expected);
        let err = normalise_args(vec!["-webrtcLogLevel".into()], known).unwrap_err();
        assert!(err.to_string().contains("not supported yet"), "{err}");
    }

    #[test]
    fn a_gt_file_takes_ferry_shape() {
        let mut file = serde_json::json!({
            "version": 1.0,
            "users": {"id1": {"secret": "s"}},
            "tcp": [{"number": 1, "range": "1024-65535"}],
            "options": {"tlsVersion": "tls1.3", "users": "users.yaml", "local": "http://127.0.0.1:80", "hostPrefix": 1},
        });
        assert!(adopt_file(&mut file, &["local".into(), "host-prefix".into()]).unwrap());
        let expected = serde_json::json!({
            "users": ["users.yaml", {"id1": {"secret": "s"}}],
            "tcp-range": ["1024-65535"],
            "tcp-number": 1,
            "tls-min-version": "tls1.3",
            "services": [{"local": "http://127.0.0.1:80", "host-prefix": 1}],
        });
        assert_eq!(file, expected);
    }
}
