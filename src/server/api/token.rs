//! The API's bearer token check: fails closed, and compares SHA-256 digests in constant
//! time so neither the token's bytes nor its length leak through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ServerConfig, MIN_API_TOKEN_LEN};

/// What the token check decided for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// No token is configured and the API listens on loopback only: open to all.
    Open,
    /// The request carries the configured token.
    Granted,
    /// The token is missing or wrong, or none is configured where one is required.
    Denied,
}

/// Decides one request from its `Authorization` header value.
pub(crate) fn check(config: &ServerConfig, authorization: Option<&str>) -> Access {
    let expected = match &config.api_token {
        None if config.api_token_required() => return Access::Denied,
        None => return Access::Open,
        // `check_api_access` refuses such tokens at start; never let one open the API.
        Some(token) if token.expose().len() < MIN_API_TOKEN_LEN => return Access::Denied,
        Some(token) => token.expose(),
    };
    let given = authorization.and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
    let matched = Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes()));
    if bool::from(matched) {
        Access::Granted
    } else {
        Access::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef";

    fn config(addr: &str, token: Option<&str>) -> ServerConfig {
        ServerConfig {
            api_addr: Some(addr.parse().unwrap()),
            api_token: token.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn the_right_token_is_granted_and_anything_else_denied() {
        let config = config("0.0.0.0:7500", Some(TOKEN));
        assert_eq!(check(&config, Some(&format!("Bearer {TOKEN}"))), Access::Granted);
        for wrong in [None, Some(""), Some("Bearer "), Some("Bearer 0123456789abcde"), Some(TOKEN)] {
            assert_eq!(check(&config, wrong), Access::Denied, "{wrong:?}");
        }
    }

    #[test]
    fn without_a_token_only_loopback_is_open() {
        assert_eq!(check(&config("127.0.0.1:7500", None), None), Access::Open);
        assert_eq!(check(&config("[::1]:7500", None), None), Access::Open);
        assert_eq!(check(&config("0.0.0.0:7500", None), None), Access::Denied);
        assert_eq!(check(&config("0.0.0.0:7500", None), Some("Bearer ")), Access::Denied);
    }

    #[test]
    fn empty_or_short_configured_tokens_open_nothing() {
        for addr in ["127.0.0.1:7500", "0.0.0.0:7500"] {
            assert_eq!(check(&config(addr, Some("")), None), Access::Denied);
            assert_eq!(check(&config(addr, Some("")), Some("Bearer ")), Access::Denied);
            assert_eq!(check(&config(addr, Some("short")), Some("Bearer short")), Access::Denied);
        }
    }
}
