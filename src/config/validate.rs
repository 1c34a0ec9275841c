//! Checking a configuration before it is used: each rule once, each error naming its key.

use regex::Regex;

use super::{AuthApiConfig, ClientConfig, ConfigError, ServerConfig, MIN_API_TOKEN_LEN};
use crate::proto::{is_valid_id, ID_RULE};
use crate::transport::{api_endpoint, RemoteAddr};

impl ServerConfig {
    /// Checks the values that types cannot: the TLS certificate and key pairs, the
    /// management API's access rules, the auth API's URL, user ids and host patterns.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if [self.addr, self.tls_addr, self.sni_addr, self.http_addr, self.quic_addr]
            .iter()
            .all(Option::is_none)
        {
            return Err(ConfigError::new(
                "addr",
                "no listener at all: give addr, tls-addr, quic-addr, sni-addr or http-addr",
            ));
        }
        if self.stun_addr.is_some() && self.stun_addr == self.quic_addr {
            return Err(ConfigError::new("stun-addr", "cannot share its UDP port with quic-addr"));
        }
        if self.quic_addr.is_some()
            && (self.cert_file.is_empty() || self.cert_file.len() != self.key_file.len())
        {
            return Err(ConfigError::new(
                "quic-addr",
                "needs cert-file and key-file, one key-file for each cert-file",
            ));
        }
        if self.tls_addr.is_some()
            && (self.cert_file.is_empty() || self.cert_file.len() != self.key_file.len())
        {
            return Err(ConfigError::new(
                "tls-addr",
                "needs cert-file and key-file, one key-file for each cert-file",
            ));
        }
        self.check_api_access()?;
        if let Some(api) = &self.auth_api {
            api.endpoint()?;
        }
        check_host_regex("host-regex", &self.host_regex)?;
        if let Some(path) = &self.ws_path {
            let printable = path.bytes().all(|b| b.is_ascii_graphic());
            if !path.starts_with('/') || !printable || path.contains(['?', '#']) {
                return Err(ConfigError::new(
                    "ws-path",
                    format!("{path:?} is not a path: it starts with '/' and has no spaces, '?' or '#'"),
                ));
            }
        }
        for (id, user) in &self.users {
            if !is_valid_id(id) {
                return Err(ConfigError::new(
                    format!("users.{id:?}"),
                    format!("not a valid id; use {ID_RULE}"),
                ));
            }
            check_host_regex("host.regex", user.host_regex.iter().flatten())
                .map_err(|e| e.within(&format!("users.{id}.")))?;
        }
        Ok(())
    }

    /// Checks the management API's access rules: a token, when given, is at least
    /// [`MIN_API_TOKEN_LEN`] bytes, and an API off loopback has one.
    pub fn check_api_access(&self) -> Result<(), ConfigError> {
        match &self.api_token {
            Some(token) if token.expose().is_empty() => {
                return Err(ConfigError::new(
                    "api-token",
                    format!(
                        "empty (from --api-token, FERRY_API_TOKEN or the config file); give at least \
                         {MIN_API_TOKEN_LEN} bytes"
                    ),
                ))
            }
            Some(token) if token.expose().len() < MIN_API_TOKEN_LEN => {
                return Err(ConfigError::new(
                    "api-token",
                    format!(
                    "{} bytes is too short; give at least {MIN_API_TOKEN_LEN} (e.g. `openssl rand -hex 16`)",
                    token.expose().len()
                ),
                ))
            }
            _ => {}
        }
        if self.api_token_required() && self.api_token.is_none() {
            return Err(ConfigError::new("api-addr", "an API reachable from other hosts needs api-token"));
        }
        Ok(())
    }
}

impl ClientConfig {
    /// Checks the values that types cannot: a well-formed id and a secret.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_valid_id(&self.id) {
            return Err(ConfigError::new("id", format!("{:?} is not a valid id; use {ID_RULE}", self.id)));
        }
        if self.secret.expose().is_empty() {
            return Err(ConfigError::new("secret", "empty"));
        }
        let remotes = 1 + self.fallback_remotes.len();
        if self.ha_connections == 0 || self.ha_connections > 8 {
            return Err(ConfigError::new("ha-connections", "1 to 8"));
        }
        if self.ha_connections as usize > remotes && self.remote_api.is_none() {
            let reason = format!(
                "{} sessions need as many remotes (--remote given {remotes} times)",
                self.ha_connections
            );
            return Err(ConfigError::new("ha-connections", reason));
        }
        Ok(())
    }
}

impl AuthApiConfig {
    /// The URL to ask and where to connect: https://, or http:// to a loopback address
    /// (the API receives secrets).
    pub fn endpoint(&self) -> Result<(hyper::Uri, RemoteAddr), ConfigError> {
        api_endpoint(&self.url).map_err(|reason| ConfigError::new("auth-api", reason))
    }
}

/// Checks that every pattern of `key` compiles.
pub(crate) fn check_host_regex<'a>(
    key: &str,
    patterns: impl IntoIterator<Item = &'a String>,
) -> Result<(), ConfigError> {
    for pattern in patterns {
        Regex::new(pattern).map_err(|e| ConfigError::new(key, format!("'{pattern}': {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_ids_must_be_valid() {
        let config = ServerConfig::default().with_user("bad id", "s");
        assert!(config.validate().err().is_some_and(|e| e.to_string().contains("not a valid id")));
    }

    #[test]
    fn a_tls_listener_needs_a_key_for_each_certificate() {
        let mut config = ServerConfig {
            tls_addr: Some("127.0.0.1:0".parse().unwrap()),
            cert_file: vec!["a.pem".into()],
            ..ServerConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert_eq!(err.key, "tls-addr");
        config.key_file = vec!["a.key".into()];
        assert_eq!(config.validate(), Ok(()));
    }

    fn check_url(url: &str) -> Result<(), String> {
        let timeout = std::time::Duration::from_secs(1);
        let api = AuthApiConfig { url: url.into(), timeout, cache: timeout };
        api.endpoint().map(drop).map_err(|e| e.to_string())
    }

    #[test]
    fn urls_must_protect_the_secret() {
        assert!(check_url("https://auth.example.com/check").is_ok());
        assert!(check_url("http://127.0.0.1:8080/check").is_ok());
        assert!(check_url("http://[::1]:8080/").is_ok());
        assert!(check_url("http://localhost/").is_ok());
        assert!(check_url("http://auth.example.com/check").unwrap_err().contains("loopback"));
        assert!(check_url("ftp://x/").is_err());
    }

    #[test]
    fn errors_name_the_key() {
        let timeout = std::time::Duration::from_secs(1);
        let api = AuthApiConfig { url: "http://192.0.2.1/check".into(), timeout, cache: timeout };
        let config = ServerConfig { auth_api: Some(api), ..ServerConfig::default() };
        assert_eq!(config.validate().unwrap_err().key, "auth-api");
        let client = ClientConfig::new(RemoteAddr::parse("127.0.0.1:7000").unwrap(), "a b", "s");
        assert_eq!(client.validate().unwrap_err().key, "id");
    }
}
