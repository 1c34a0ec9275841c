//! Which servers a client dials at each login: its configured `remote` and fallbacks, or
//! what its `remote-api` (GT's `remoteAPI`) answers, asked again at every login so an
//! operator can move clients between servers.
//!
//! The API is asked with `GET URL?id=ID` and answers `{"remote": "tls://host:port"}` or
//! `{"remote": ["quic://host:7443", "tls://host:443"]}` (tried in order). When it cannot
//! be asked, or answers anything else, the login uses the configured remotes and the log
//! says why.

use std::sync::Mutex;
use std::time::Duration;

use rand::seq::SliceRandom;
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::{ClientConfig, RemoteStrategy};
use crate::error::ClientError;
use crate::transport::{Connector, JsonApi, RemoteAddr};

/// Most remotes one API answer may list.
pub(crate) const MAX_API_REMOTES: usize = 16;

/// Largest API answer read, in bytes.
const MAX_ANSWER: usize = 16 * 1024;

/// The answer of a remote API.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    remote: OneOrMany,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A client's remote API.
pub(crate) struct RemoteApi {
    api: JsonApi,
    url: String,
}

impl std::fmt::Debug for RemoteApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteApi").field("url", &self.url).finish_non_exhaustive()
    }
}

impl RemoteApi {
    /// The API at `url` (`https://`, or `http://` on loopback), asked for user `id`.
    pub(crate) fn new(url: &str, id: &str, timeout: Duration) -> Result<Self, String> {
        let separator = if url.contains('?') { '&' } else { '?' };
        let asked = format!("{url}{separator}id={id}");
        Ok(RemoteApi { api: JsonApi::new(&asked, timeout)?, url: url.to_owned() })
    }

    /// Asks for the remotes to dial, in order.
    pub(crate) async fn ask(&self) -> Result<Vec<RemoteAddr>, String> {
        let (status, body) = self.api.call(None, MAX_ANSWER).await?;
        if status != 200 {
            return Err(format!("answered HTTP {status}"));
        }
        parse_answer(&body)
    }
}

/// The remotes of an API answer; the error says what is wrong with it.
fn parse_answer(body: &[u8]) -> Result<Vec<RemoteAddr>, String> {
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|e| format!("the answer is not {{\"remote\": \"scheme://host:port\" or a list}}: {e}"))?;
    let remotes = match answer.remote {
        OneOrMany::One(remote) => vec![remote],
        OneOrMany::Many(remotes) => remotes,
    };
    if remotes.is_empty() || remotes.len() > MAX_API_REMOTES {
        return Err(format!("the answer lists {} remotes; give 1 to {MAX_API_REMOTES}", remotes.len()));
    }
    remotes.iter().map(|r| RemoteAddr::parse(r).map_err(|e| format!("remote '{r}': {e}"))).collect()
}

/// Asks the remote API at `url` for user `id` until it answers, with the backoff of
/// reconnects (a client given no `--remote` and started before its API waits for it, as
/// it waits for its server); the remotes it gave.
#[cfg(feature = "cli")]
pub(crate) async fn ask_remote_api_until_answered(url: &str, id: &str) -> Vec<RemoteAddr> {
    let mut backoff = super::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
    loop {
        let answer = match RemoteApi::new(url, id, Duration::from_secs(10)) {
            Ok(api) => api.ask().await,
            Err(err) => Err(err),
        };
        match answer {
            Ok(remotes) => return remotes,
            Err(err) => {
                let delay = backoff.next_delay();
                warn!(api = %url, %err, ?delay, "remote api gave no remote; asking again");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The servers a client dials, and how.
#[derive(Debug)]
pub(crate) struct Remotes {
    config: ClientConfig,
    /// `remote` then `fallback_remotes`.
    configured: Vec<Connector>,
    api: Option<RemoteApi>,
    /// The connectors of the latest login, for [`Client::rebind`](super::Client::rebind).
    current: Mutex<Vec<Connector>>,
}

impl Remotes {
    /// The remotes of `config`; fails on a remote or remote API that cannot be used.
    pub(crate) fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        let remotes = std::iter::once(&config.remote).chain(&config.fallback_remotes);
        let configured = remotes.map(|remote| connector(config, remote)).collect::<Result<Vec<_>, _>>()?;
        let api = config
            .remote_api
            .as_deref()
            .map(|url| RemoteApi::new(url, &config.id, config.remote_timeout))
            .transpose()
            .map_err(|e| ClientError::Config(format!("remote-api: {e}")))?;
        let current = Mutex::new(configured.clone());
        Ok(Remotes { config: config.clone(), configured, api, current })
    }

    /// The connectors to try at this login, in order: the API's answer when there is an
    /// API that answers, else the configured ones; shuffled with `remote-strategy random`.
    pub(crate) async fn for_login(&self) -> Vec<Connector> {
        let chosen = match &self.api {
            None => self.configured.clone(),
            Some(api) => match api.ask().await {
                Ok(remotes) => {
                    let listed: Vec<String> = remotes.iter().map(ToString::to_string).collect();
                    info!(api = %api.url, remotes = ?listed, "remote api answered");
                    self.connectors_for(&remotes)
                }
                Err(err) => {
                    warn!(api = %api.url, %err, "remote api gave no remote; using the configured ones");
                    self.configured.clone()
                }
            },
        };
        let mut chosen = chosen;
        if self.config.remote_strategy == RemoteStrategy::Random {
            chosen.shuffle(&mut rand::thread_rng());
        }
        *self.current() = chosen.clone();
        chosen
    }

    /// The connectors of the latest login.
    pub(crate) fn latest(&self) -> Vec<Connector> {
        self.current().clone()
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Vec<Connector>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connectors for `remotes`, keeping those already made for the same address (a QUIC
    /// connector keeps its endpoint); a remote that cannot be dialed is left out.
    fn connectors_for(&self, remotes: &[RemoteAddr]) -> Vec<Connector> {
        let known: Vec<Connector> = self.current().iter().chain(&self.configured).cloned().collect();
        let mut chosen = Vec::new();
        for remote in remotes {
            match known.iter().find(|c| c.remote() == remote) {
                Some(existing) => chosen.push(existing.clone()),
                None => match connector(&self.config, remote) {
                    Ok(made) => chosen.push(made),
                    Err(err) => warn!(%remote, %err, "remote from the api cannot be used"),
                },
            }
        }
        if chosen.is_empty() {
            return self.configured.clone();
        }
        chosen
    }
}

/// How `config` dials `remote`: its transport, through `proxy` if any.
fn connector(config: &ClientConfig, remote: &RemoteAddr) -> Result<Connector, ClientError> {
    let connector = Connector::new(remote.clone(), &config.remote_trust, config.remote_timeout)?;
    let connector = connector.with_proxy(config.proxy.clone());
    Ok(connector.with_quic(config.quic_congestion, config.heartbeat_timeout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_name_one_remote_or_a_list() {
        let one = parse_answer(br#"{"remote": "tls://a.example:443"}"#).unwrap();
        assert_eq!(one[0].to_string(), "tls://a.example:443");
        let two = parse_answer(br#"{"remote": ["quic://a.example:7443", "tcp://b.example:7000"]}"#).unwrap();
        assert_eq!(two.len(), 2);
        for bad in
            [&br#"{"remote": []}"#[..], br#"{"remote": "ftp://x"}"#, br#"{"server": "tcp://a:1"}"#, b"<html>"]
        {
            assert!(parse_answer(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
