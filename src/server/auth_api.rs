//! `--auth-api`: asking an external HTTP service whether an id and secret may log in.
//!
//! Request: `POST <url>` with `Content-Type: application/json` and the body
//! `{"id": "...", "secret": "...", "address": "ip:port"}` (the client's address).
//! Answer: `200` with `{"allow": true}` or `{"allow": false}`; an allowed answer may
//! carry the user's settings as in the users file, e.g.
//! `{"allow": true, "user": {"speed": 1048576, "connections": 10}}`. `401`, `403` and
//! `404` mean "no". Anything else, a malformed body, no answer within the timeout or
//! no connection at all is "unavailable": the login is refused and the error logged.
//! Allowed answers are remembered for the cache time, keyed by id and a hash of the secret.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tracing::debug;

use crate::auth::Secret;
use crate::config::{AuthApiConfig, ConfigError, UserConfig, UserOptions};
use crate::transport::JsonApi;

/// Largest answer body read.
const MAX_ANSWER: usize = 64 * 1024;
/// Most cached answers; past it, the cache is emptied.
const MAX_CACHED: usize = 10_000;

/// What the API said.
#[derive(Debug)]
pub(crate) enum ApiAnswer {
    /// Allowed, with the user's settings (secret left empty).
    Allowed(UserConfig),
    /// Refused.
    Denied,
}

#[derive(Serialize)]
struct Question<'a> {
    id: &'a str,
    secret: &'a str,
    address: String,
}

#[derive(Deserialize)]
struct Answer {
    allow: bool,
    #[serde(default)]
    user: Option<UserOptions>,
}

/// An id and the SHA-256 of its secret.
type CacheKey = (String, [u8; 32]);

/// A configured auth API with its cache.
pub(crate) struct AuthApi {
    config: AuthApiConfig,
    api: JsonApi,
    cache: Mutex<HashMap<CacheKey, (Instant, UserConfig)>>,
}

impl AuthApi {
    pub(crate) fn new(config: &AuthApiConfig) -> Result<Self, ConfigError> {
        let api = JsonApi::new(&config.url, config.timeout).map_err(|e| ConfigError::new("auth-api", e))?;
        Ok(AuthApi { config: config.clone(), api, cache: Mutex::default() })
    }

    /// Asks (or remembers) whether `id` with `secret` may log in; `Err` when the API cannot answer.
    pub(crate) async fn check(
        &self,
        id: &str,
        secret: &Secret,
        peer: SocketAddr,
    ) -> Result<ApiAnswer, String> {
        let key = (id.to_owned(), Sha256::digest(secret.expose().as_bytes()).into());
        if let Some(user) = self.cached(&key) {
            debug!(id, "auth API answer from cache");
            return Ok(ApiAnswer::Allowed(user));
        }
        let question = Question { id, secret: secret.expose(), address: peer.to_string() };
        let answer = self.ask(&question).await?;
        if let ApiAnswer::Allowed(user) = &answer {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            cache.retain(|_, (expires, _)| *expires > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(key, (now + self.config.cache, user.clone()));
        }
        Ok(answer)
    }

    fn cached(&self, key: &CacheKey) -> Option<UserConfig> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(key).filter(|(expires, _)| *expires > Instant::now()).map(|(_, user)| user.clone())
    }

    async fn ask(&self, question: &Question<'_>) -> Result<ApiAnswer, String> {
        let body = serde_json::to_vec(question).map_err(|e| e.to_string())?;
        let (status, body) = self.api.call(Some(body), MAX_ANSWER).await?;
        if matches!(status, 401 | 403 | 404) {
            return Ok(ApiAnswer::Denied);
        }
        if status != 200 {
            return Err(format!("status {status}"));
        }
        read_answer(&body)
    }
}

/// What the body of a `200` answer says.
pub(crate) fn read_answer(body: &[u8]) -> Result<ApiAnswer, String> {
    let answer: Answer = serde_json::from_slice(body).map_err(|e| format!("malformed answer: {e}"))?;
    if !answer.allow {
        return Ok(ApiAnswer::Denied);
    }
    let user = answer.user.unwrap_or_default().into_config(false).map_err(|e| format!("user.{e}"))?;
    Ok(ApiAnswer::Allowed(user))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_from_their_body() {
        let allowed = read_answer(br#"{"allow": true, "user": {"speed": 1024, "connections": 3}}"#);
        match allowed {
            Ok(ApiAnswer::Allowed(user)) => assert_eq!((user.speed, user.connections), (Some(1024), Some(3))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read_answer(br#"{"allow": false, "user": {"speed": 1}}"#), Ok(ApiAnswer::Denied)));
        assert!(read_answer(b"{\"allow\": 1}").unwrap_err().starts_with("malformed answer"));
        let bad_regex = read_answer(br#"{"allow": true, "user": {"host": {"regex": "("}}}"#);
        assert!(bad_regex.unwrap_err().starts_with("user.host.regex"));
    }
}
