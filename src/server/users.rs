//! Who may log in and what each user may do.
//!
//! The [`Directory`] is built from the configuration and swapped whole on reload.
//! Each connected user has an [`Account`]: the user's current [`Rules`], live
//! counters (visitors, sessions) and the speed buckets shared by every session and
//! tunnel of that user.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use regex::Regex;
use tokio::time::Instant;
use tracing::{debug, error, warn};

use super::auth_api::{ApiAnswer, AuthApi};
use super::hooks::ServerHooks;
use crate::auth::{Secret, Verifier};
use crate::config::{ConfigError, PortRange, ServerConfig, TcpAllowance, UserConfig};
use crate::proto::LoginRefusal;
use crate::relay::throttle::{Bucket, Traffic};

/// What one user may do: the user's own settings over the server-wide ones.
#[derive(Debug)]
pub(crate) struct Rules {
    /// Port ranges, each with how many of its ports the user may hold.
    pub(crate) tcp: Vec<TcpAllowance>,
    /// TCP ports in all, across the ranges.
    pub(crate) tcp_number: Option<u32>,
    /// UDP port ranges, each with how many of its ports the user may hold.
    pub(crate) udp: Vec<TcpAllowance>,
    /// UDP ports in all, across the ranges.
    pub(crate) udp_number: Option<u32>,
    pub(crate) host_number: Option<u32>,
    /// A host prefix must match one of these, if there are any.
    pub(crate) host_patterns: Vec<Regex>,
    pub(crate) host_with_id: bool,
    /// Bytes per second, each direction.
    pub(crate) speed: Option<u64>,
    /// Visitor connections at once.
    pub(crate) connections: Option<u32>,
    /// Client sessions at once.
    pub(crate) sessions: Option<u32>,
    /// Which of these the user's own settings gave (the others are the server's).
    pub(crate) own: OwnRules,
}

/// Which rules came from a user's own settings, so refusals can say whose limit it is.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OwnRules {
    /// The port ranges and their numbers (`tcp`).
    pub(crate) tcp: bool,
    /// The UDP port ranges and their numbers (`udp`).
    pub(crate) udp: bool,
    pub(crate) host_number: bool,
    pub(crate) host_regex: bool,
}

/// Whose setting a refusal quotes: "user ID's" for the user's own, else "the server's".
pub(crate) fn whose(own: bool, user: &str) -> String {
    if own {
        format!("user {user}'s")
    } else {
        "the server's".into()
    }
}

impl Rules {
    /// Resolves `user`'s settings over the server's; 0 means no limit for speed and counts.
    pub(crate) fn resolve(config: &ServerConfig, user: Option<&UserConfig>) -> Result<Rules, String> {
        let allowances = |own: Option<&Vec<TcpAllowance>>, ranges: &[PortRange], number| match own {
            Some(list) => (list.clone(), None),
            None => (ranges.iter().map(|&range| TcpAllowance { range, number: None }).collect(), number),
        };
        let (tcp, tcp_number) =
            allowances(user.and_then(|u| u.tcp.as_ref()), &config.tcp_ranges, config.tcp_number);
        let (udp, udp_number) =
            allowances(user.and_then(|u| u.udp.as_ref()), &config.udp_ranges, config.udp_number);
        let patterns = user.and_then(|u| u.host_regex.as_ref()).unwrap_or(&config.host_regex);
        let host_patterns = patterns
            .iter()
            .map(|p| Regex::new(p).map_err(|e| format!("host-regex '{p}': {e}")))
            .collect::<Result<_, _>>()?;
        let nonzero32 = |n: Option<u32>| n.filter(|&n| n > 0);
        Ok(Rules {
            tcp,
            tcp_number,
            udp,
            udp_number,
            host_number: user.and_then(|u| u.host_number).or(config.host_number),
            host_patterns,
            host_with_id: user.and_then(|u| u.host_with_id).unwrap_or(config.host_with_id),
            speed: user.and_then(|u| u.speed).or(config.speed).filter(|&n| n > 0),
            connections: nonzero32(user.and_then(|u| u.connections).or(config.connections)),
            sessions: nonzero32(user.and_then(|u| u.sessions).or(config.sessions)),
            own: OwnRules {
                tcp: user.is_some_and(|u| u.tcp.is_some()),
                udp: user.is_some_and(|u| u.udp.is_some()),
                host_number: user.is_some_and(|u| u.host_number.is_some()),
                host_regex: user.is_some_and(|u| u.host_regex.is_some()),
            },
        })
    }
}

/// A configured user: the verifier derived from id and secret, and the rules.
struct Known {
    verifier: Verifier,
    rules: Arc<Rules>,
}

/// The users of one configuration; replaced whole on reload.
pub(crate) struct Directory {
    known: HashMap<String, Known>,
    /// Lower-cased ids, for telling "offline" from "unknown" host names.
    lower_ids: HashSet<String>,
    /// Rules of users that are not configured (allow-any-client, auth API).
    defaults: Arc<Rules>,
    /// The configuration the rules came from, for auth API answers.
    config: ServerConfig,
    allow_any_client: bool,
    api: Option<Arc<AuthApi>>,
}

impl Directory {
    /// Derives every user's key and resolves every user's rules.
    /// The configuration is checked ([`ServerConfig::validate`]) before.
    pub(crate) fn new(config: &ServerConfig) -> Result<Directory, ConfigError> {
        let mut known = HashMap::new();
        for (id, user) in &config.users {
            let rules =
                Rules::resolve(config, Some(user)).map_err(|e| ConfigError::new(format!("users.{id}"), e))?;
            let verifier = Verifier::plain(id, &user.secret);
            known.insert(id.clone(), Known { verifier, rules: Arc::new(rules) });
        }
        let api = config.auth_api.as_ref().map(AuthApi::new).transpose()?.map(Arc::new);
        Ok(Directory {
            lower_ids: known.keys().map(|id| id.to_ascii_lowercase()).collect(),
            known,
            defaults: Arc::new(Rules::resolve(config, None).map_err(|e| ConfigError::new("host-regex", e))?),
            config: config.clone(),
            allow_any_client: config.allow_any_client,
            api,
        })
    }

    /// Whether some configured user has this id, ignoring case.
    pub(crate) fn has_id_ignoring_case(&self, id: &str) -> bool {
        self.lower_ids.contains(&id.to_ascii_lowercase())
    }

    /// Whether nobody at all can log in.
    pub(crate) fn is_closed(&self) -> bool {
        self.known.is_empty() && !self.allow_any_client && self.api.is_none()
    }
}

/// How a client must prove its secret, decided from its hello's id before any key is made.
pub(crate) enum Method {
    /// The server holds the id's verifier: a PAKE.
    Pake {
        verifier: Verifier,
        /// The verifier is the Argon2id one (learned by allow-any-client).
        stretched: bool,
        grant: Grant,
        rules: Arc<Rules>,
    },
    /// The auth API decides: the client must reveal its secret.
    Reveal,
    /// allow-any-client meets a new id: the client enrolls its verifier.
    Enroll,
    /// No way in: the id is unknown, or no new ids are learned.
    Refuse(LoginRefusal),
}

/// How a login was accepted; decides whether a reload keeps the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// A configured user with this key.
    Known,
    /// An unknown id under allow-any-client (first key wins).
    Learned,
    /// The auth API said yes.
    Api,
    /// The embedding program's hooks knew the secret.
    Hook,
}

/// The server's users: the current directory and the accounts of connected users.
pub(crate) struct Users {
    directory: RwLock<Arc<Directory>>,
    /// Verifiers learned under allow-any-client; kept across reloads, never more than `max_learned`.
    learned: Mutex<Learned>,
    max_learned: usize,
    accounts: Mutex<HashMap<String, Weak<Account>>>,
    /// Bytes per user, kept while the server runs.
    traffic: Mutex<HashMap<String, Arc<Traffic>>>,
}

/// Most users with their own traffic counters (allow-any-client could mint ids without end).
const MAX_TRAFFIC_ENTRIES: usize = 100_000;

/// Most ids allow-any-client remembers (with ids of at most 64 bytes, some 20 MB). Past it,
/// new ids are refused rather than old ones forgotten: a forgotten id could be taken over
/// by whoever logs in with it next, under another secret.
const MAX_LEARNED_IDS: usize = 100_000;

/// How often a full table of learned ids is logged as a warning.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The first verifier enrolled for each id under allow-any-client.
#[derive(Default)]
struct Learned {
    keys: HashMap<String, Verifier>,
    /// When "no room for new ids" was last logged as a warning, and refusals since.
    warned: Option<Instant>,
    refused: u64,
}

impl Learned {
    /// Whether `key` is the verifier of `id`, learning it if `id` is new and there is room;
    /// `None` when `id` is new and the table is full.
    fn matches(&mut self, id: &str, key: &Verifier, max: usize) -> Option<bool> {
        if let Some(first) = self.keys.get(id) {
            return Some(first.matches(key));
        }
        if !self.has_room(max) {
            return None;
        }
        self.keys.insert(id.to_owned(), key.clone());
        Some(true)
    }

    /// Whether a new id could be learned; logs (at most once a minute) when not.
    fn has_room(&mut self, max: usize) -> bool {
        if self.keys.len() >= max {
            self.refused += 1;
            if !self.warned.is_some_and(|at| at.elapsed() < FULL_WARNING_EVERY) {
                warn!(
                    ids = self.keys.len(),
                    refused = self.refused,
                    "allow-any-client remembers the most ids it keeps; refusing new ids until a restart"
                );
                (self.warned, self.refused) = (Some(Instant::now()), 0);
            } else {
                debug!("new id refused: no room for more ids");
            }
            return false;
        }
        true
    }
}

impl Users {
    pub(crate) fn new(directory: Directory) -> Self {
        Users {
            directory: RwLock::new(Arc::new(directory)),
            learned: Mutex::default(),
            max_learned: MAX_LEARNED_IDS,
            accounts: Mutex::default(),
            traffic: Mutex::default(),
        }
    }

    /// The current directory.
    pub(crate) fn directory(&self) -> Arc<Directory> {
        self.directory.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs a new directory; connected users of it get its rules for new connections,
    /// and its speed at once (their buckets are shared by running transfers too).
    pub(crate) fn replace(&self, directory: Directory) {
        let directory = Arc::new(directory);
        *self.directory.write().unwrap_or_else(|e| e.into_inner()) = directory.clone();
        let accounts: Vec<Arc<Account>> = self.accounts().values().filter_map(Weak::upgrade).collect();
        for account in accounts {
            match directory.known.get(&account.id) {
                Some(known) => account.set_rules(known.rules.clone()),
                None if !matches!(account.grant(), Grant::Api) => {
                    account.set_rules(directory.defaults.clone())
                }
                None => {}
            }
        }
    }

    /// How a client naming `id` must prove its secret. Configured users come first, then
    /// the program's hooks, the auth API and allow-any-client.
    pub(crate) fn method(&self, id: &str, hooks: &dyn ServerHooks) -> Method {
        let directory = self.directory();
        if let Some(known) = directory.known.get(id) {
            let (verifier, rules) = (known.verifier.clone(), known.rules.clone());
            return Method::Pake { verifier, stretched: false, grant: Grant::Known, rules };
        }
        if let Some(secret) = hooks.secret_for(id) {
            let verifier = Verifier::plain(id, &secret);
            return Method::Pake {
                verifier,
                stretched: false,
                grant: Grant::Hook,
                rules: directory.defaults.clone(),
            };
        }
        if directory.api.is_some() {
            return Method::Reveal;
        }
        if directory.allow_any_client {
            let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(verifier) = learned.keys.get(id) {
                let (verifier, rules) = (verifier.clone(), directory.defaults.clone());
                return Method::Pake { verifier, stretched: true, grant: Grant::Learned, rules };
            }
            return match learned.has_room(self.max_learned) {
                true => Method::Enroll,
                false => Method::Refuse(LoginRefusal::TooManyIds),
            };
        }
        Method::Refuse(LoginRefusal::UnknownId { id: id.to_owned() })
    }

    /// Asks the auth API about a revealed secret.
    pub(crate) async fn check_revealed(
        &self,
        id: &str,
        secret: &Secret,
        peer: SocketAddr,
    ) -> Result<Arc<Rules>, LoginRefusal> {
        let directory = self.directory();
        let refused = || LoginRefusal::AuthFailed { id: id.to_owned() };
        let Some(api) = &directory.api else { return Err(refused()) };
        match api.check(id, secret, peer).await {
            Ok(ApiAnswer::Allowed(user)) => {
                let rules = Rules::resolve(&directory.config, Some(&user)).map_err(|e| {
                    warn!(id, error = %e, "auth API answered with invalid settings");
                    refused()
                })?;
                Ok(Arc::new(rules))
            }
            Ok(ApiAnswer::Denied) => Err(refused()),
            Err(err) => {
                error!(id, %err, "auth API unavailable; refusing the login");
                Err(LoginRefusal::AuthUnavailable)
            }
        }
    }

    /// Learns an enrolled verifier for a new id (allow-any-client); an id enrolled meanwhile
    /// by another login keeps its first verifier.
    pub(crate) fn enroll(&self, id: &str, verifier: &Verifier) -> Result<Arc<Rules>, LoginRefusal> {
        let directory = self.directory();
        if !directory.allow_any_client {
            return Err(LoginRefusal::UnknownId { id: id.to_owned() });
        }
        let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        match learned.matches(id, verifier, self.max_learned) {
            Some(true) => Ok(directory.defaults.clone()),
            Some(false) => Err(LoginRefusal::AuthFailed { id: id.to_owned() }),
            None => Err(LoginRefusal::TooManyIds),
        }
    }

    /// Whether a session that logged in as `id` with `credential` may stay after a reload.
    /// A user configured before and not now leaves, even where allow-any-client or the
    /// auth API could let the id in: the operator removed the user, so the client must
    /// log in again and be judged by what the server now says.
    pub(crate) fn still_allowed(&self, id: &str, credential: &Verifier, grant: Grant) -> bool {
        let directory = self.directory();
        match directory.known.get(id) {
            Some(known) => known.verifier.matches(credential),
            None => match grant {
                Grant::Known => false,
                Grant::Learned => directory.allow_any_client,
                Grant::Api => directory.api.is_some(),
                Grant::Hook => true,
            },
        }
    }

    /// The live account of `id`, created on first use; `rules` become its rules.
    pub(crate) fn account(&self, id: &str, rules: Arc<Rules>, grant: Grant) -> Arc<Account> {
        let mut accounts = self.accounts();
        if let Some(account) = accounts.get(id).and_then(Weak::upgrade) {
            account.set_grant(grant);
            account.set_rules(rules);
            return account;
        }
        accounts.retain(|_, account| account.strong_count() > 0);
        let traffic = self.traffic_of(id);
        let account = Arc::new(Account::new(id, rules, grant, traffic));
        accounts.insert(id.to_owned(), Arc::downgrade(&account));
        account
    }

    /// The lasting traffic counters of `id`; past `MAX_TRAFFIC_ENTRIES` users, new ids share one.
    fn traffic_of(&self, id: &str) -> Arc<Traffic> {
        let mut traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(known) = traffic.get(id) {
            return known.clone();
        }
        let key = if traffic.len() < MAX_TRAFFIC_ENTRIES { id } else { "(others)" };
        traffic.entry(key.to_owned()).or_default().clone()
    }

    /// Bytes moved per user since the server started: (user, up, down).
    pub(crate) fn traffic(&self) -> Vec<(String, u64, u64)> {
        let traffic = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
        traffic
            .iter()
            .map(|(id, t)| (id.clone(), t.up.load(Ordering::Relaxed), t.down.load(Ordering::Relaxed)))
            .collect()
    }

    fn accounts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<Account>>> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connected user: rules, counters and speed buckets shared by all the user's sessions.
pub(crate) struct Account {
    pub(crate) id: String,
    rules: RwLock<Arc<Rules>>,
    grant: Mutex<Grant>,
    visitors: AtomicU32,
    sessions: AtomicU32,
    /// Bytes from visitors to the user's services.
    pub(crate) upload: Bucket,
    /// Bytes from the user's services to visitors.
    pub(crate) download: Bucket,
    /// Bytes moved for the user, kept across the user's sessions.
    pub(crate) traffic: Arc<Traffic>,
}

/// What an account's counter limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    Visitors,
    Sessions,
}

/// One counted visitor or session; dropping it frees the place.
pub(crate) struct Slot {
    account: Arc<Account>,
    counted: Counted,
}

impl Account {
    fn new(id: &str, rules: Arc<Rules>, grant: Grant, traffic: Arc<Traffic>) -> Self {
        Account {
            id: id.to_owned(),
            traffic,
            upload: Bucket::new(rules.speed),
            download: Bucket::new(rules.speed),
            rules: RwLock::new(rules),
            grant: Mutex::new(grant),
            visitors: AtomicU32::new(0),
            sessions: AtomicU32::new(0),
        }
    }

    /// The user's current rules.
    pub(crate) fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_rules(&self, rules: Arc<Rules>) {
        self.upload.set_rate(rules.speed);
        self.download.set_rate(rules.speed);
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    fn grant(&self) -> Grant {
        *self.grant.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_grant(&self, grant: Grant) {
        *self.grant.lock().unwrap_or_else(|e| e.into_inner()) = grant;
    }

    /// Counts one more visitor or session within the user's limit; `Err(limit)` when full.
    pub(crate) fn admit(self: &Arc<Self>, counted: Counted) -> Result<Slot, u32> {
        let rules = self.rules();
        let (counter, limit) = match counted {
            Counted::Visitors => (&self.visitors, rules.connections),
            Counted::Sessions => (&self.sessions, rules.sessions),
        };
        let max = limit.unwrap_or(u32::MAX);
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| max)?;
        Ok(Slot { account: self.clone(), counted })
    }

    /// Whether the user's traffic is shaped.
    pub(crate) fn is_throttled(&self) -> bool {
        self.upload.is_limited()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = match self.counted {
            Counted::Visitors => &self.account.visitors,
            Counted::Sessions => &self.account.sessions,
        };
        counter.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::hooks::NoHooks;

    #[test]
    fn allow_any_client_learns_a_bounded_number_of_ids_and_forgets_none() {
        let config = ServerConfig { allow_any_client: true, ..ServerConfig::default() };
        let mut users = Users::new(Directory::new(&config).unwrap());
        users.max_learned = 2;
        let verifier = |id: &str, secret: &str| Verifier::plain(id, &Secret::new(secret));
        for id in ["a", "b"] {
            assert!(matches!(users.method(id, &NoHooks), Method::Enroll), "{id}");
            assert!(users.enroll(id, &verifier(id, "s")).is_ok());
        }
        for id in ["c", "d"] {
            assert!(matches!(users.method(id, &NoHooks), Method::Refuse(LoginRefusal::TooManyIds)), "{id}");
            assert_eq!(users.enroll(id, &verifier(id, "s")).err(), Some(LoginRefusal::TooManyIds), "{id}");
        }
        // Learned ids keep their first verifier: a PAKE against it, and a second enrollment
        // (a race) with another secret is refused.
        let Method::Pake { verifier: kept, stretched: true, grant: Grant::Learned, .. } =
            users.method("a", &NoHooks)
        else {
            panic!("a learned id logs in with a PAKE")
        };
        assert!(kept.matches(&verifier("a", "s")));
        let refused = users.enroll("b", &verifier("b", "t")).err();
        assert_eq!(refused, Some(LoginRefusal::AuthFailed { id: "b".into() }));
        assert_eq!(users.learned.lock().unwrap().keys.len(), 2);
    }

    #[test]
    fn unknown_ids_are_refused_as_unknown_not_as_failed() {
        let users = Users::new(Directory::new(&ServerConfig::default().with_user("a", "s")).unwrap());
        assert!(matches!(users.method("a", &NoHooks), Method::Pake { grant: Grant::Known, .. }));
        let refusal = LoginRefusal::UnknownId { id: "carl".into() };
        assert!(matches!(users.method("carl", &NoHooks), Method::Refuse(r) if r == refusal));
    }

    #[test]
    fn user_settings_override_the_server_ones() {
        let mut config = ServerConfig::default().with_user("a", "s").with_user("b", "s");
        config.speed = Some(100);
        config.tcp_ranges = vec!["1000-2000".parse().unwrap()];
        config.tcp_number = Some(3);
        let b = config.users.get_mut("b").unwrap();
        b.speed = Some(5);
        b.tcp = Some(vec![]);
        b.connections = Some(0);
        let a = Rules::resolve(&config, config.users.get("a")).unwrap();
        let b = Rules::resolve(&config, config.users.get("b")).unwrap();
        assert_eq!((a.speed, a.tcp.len(), a.tcp_number), (Some(100), 1, Some(3)));
        assert_eq!((b.speed, b.tcp.len(), b.tcp_number, b.connections), (Some(5), 0, None, None));
    }

    #[test]
    fn counters_stop_at_the_limit_and_free_on_drop() {
        let config = ServerConfig { connections: Some(2), ..ServerConfig::default() };
        let rules = Arc::new(Rules::resolve(&config, None).unwrap());
        let account = Arc::new(Account::new("a", rules, Grant::Known, Arc::default()));
        let one = account.admit(Counted::Visitors).unwrap();
        let _two = account.admit(Counted::Visitors).unwrap();
        assert_eq!(account.admit(Counted::Visitors).err(), Some(2));
        drop(one);
        assert!(account.admit(Counted::Visitors).is_ok());
        assert!(account.admit(Counted::Sessions).is_ok(), "sessions are not limited");
    }
}
