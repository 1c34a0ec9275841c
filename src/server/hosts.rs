//! HTTP virtual hosts: which service a host name (or path) routes to.
//!
//! Host names are one namespace for HTTP, HTTPS and TLS passthrough: a name has one owner
//! (a user) whichever kind of service holds it, and stays reserved to that owner for a
//! grace period after its last service goes offline, so a reconnecting client gets it back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::session::SessionShared;
use super::sni::sni_key;
use super::tunnel::Tunnel;
use super::users::{whose, Rules};
use crate::proto::RegisterError;

/// How long a registration waits for a closing session to give its host back.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Most host names remembered as offline (for 502 rather than 404 answers), and most
/// names held for their offline owners.
const MAX_OFFLINE: usize = 100_000;

/// How long a name stays reserved to its owner after its last service went offline:
/// three heartbeat timeouts. The client notices a dead link within one (the default
/// heartbeat timeout is the same on both sides), and its reconnect backoff
/// (1 s doubling to 60 s) fits in the other two at the default 30 s.
pub(crate) fn name_grace(heartbeat_timeout: Duration) -> Duration {
    heartbeat_timeout.saturating_mul(3)
}

/// Where a host name leads.
#[derive(Clone)]
pub(crate) struct HostRoute {
    pub(crate) session: Arc<SessionShared>,
    /// The tunnel: its token closes it, its limits admit visitors.
    pub(crate) tunnel: Arc<Tunnel>,
    /// Replaces the Host header when set (`use-local-as-http-host`).
    pub(crate) local_host: Option<String>,
    /// The prefix asked for, if any (for path routing).
    pub(crate) prefix: Option<String>,
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// A live service.
    Online(HostRoute),
    /// A host that had a service, or a known user's id, whose client is not connected.
    Offline,
    /// Nothing by that name.
    Unknown,
}

/// The services behind one host name: one, or several clients of one user sharing a tag
/// that serve a service of the same name, taken in turn.
struct HostPool {
    members: Vec<HostRoute>,
    next: usize,
}

impl HostPool {
    /// The next member, round-robin, preferring members whose session is not closing.
    fn pick(&mut self, only: impl Fn(&HostRoute) -> bool) -> Option<HostRoute> {
        let count = self.members.len();
        let start = self.next;
        self.next = self.next.wrapping_add(1);
        let candidates = (0..count).map(|i| &self.members[(start + i) % count]).filter(|r| only(r));
        let mut fallback = None;
        for route in candidates {
            if !route.session.closing.is_cancelled() {
                return Some(route.clone());
            }
            fallback.get_or_insert(route);
        }
        fallback.cloned()
    }

    fn owned_by(&self, user: &str) -> bool {
        self.members.iter().any(|r| r.session.user == user)
    }

    /// Whether `route` may join: same user and service name, and a tag shared with a live member.
    fn welcomes(&self, route: &HostRoute) -> bool {
        let session = &route.session;
        !session.tags.is_empty()
            && self.members.iter().any(|m| {
                !m.session.closing.is_cancelled()
                    && m.session.user == session.user
                    && m.tunnel.name == route.tunnel.name
                    && m.session.tags.iter().any(|t| session.tags.contains(t))
            })
    }
}

/// A name whose owner is offline, kept for the owner until `until`.
struct Held {
    user: String,
    until: Instant,
}

#[derive(Default)]
struct Table {
    /// Routes by key: the name for HTTP and HTTPS, `tls:name` for TLS passthrough.
    routes: HashMap<String, HostPool>,
    offline: HashSet<String>,
    /// Names in their grace period, by name.
    held: HashMap<String, Held>,
}

impl Table {
    /// Whether a user other than `user` holds `name`, as HTTP or TLS passthrough, or has
    /// it reserved while offline.
    fn owned_by_other(&self, name: &str, user: &str) -> bool {
        let live = [name.to_owned(), sni_key(name)]
            .iter()
            .filter_map(|key| self.routes.get(key))
            .any(|pool| pool.members.iter().any(|m| m.session.user != user));
        live || self.held.get(name).is_some_and(|h| h.user != user && h.until > Instant::now())
    }

    /// Keeps `name` for `user` until `until`, within `MAX_OFFLINE` names.
    fn hold(&mut self, name: &str, user: String, until: Instant) {
        if self.held.len() >= MAX_OFFLINE {
            let now = Instant::now();
            self.held.retain(|_, h| h.until > now);
        }
        if self.held.len() >= MAX_OFFLINE {
            return warn!(host = ?name, "too many offline host names held; this one is free at once");
        }
        self.held.insert(name.to_owned(), Held { user, until });
    }

    fn insert(&mut self, name: &str, key: &str, route: HostRoute) {
        self.held.remove(name);
        self.offline.remove(key);
        self.routes.insert(key.to_owned(), HostPool { members: vec![route], next: 0 });
    }
}

/// The routing key of a name: passthrough names route on their own port.
fn route_key(name: &str, tls_passthrough: bool) -> String {
    if tls_passthrough {
        sni_key(name)
    } else {
        name.to_owned()
    }
}

/// Host names of every HTTP, HTTPS and TLS passthrough service.
pub(crate) struct Hosts {
    table: Mutex<Table>,
    /// How long an offline owner's name stays reserved to it.
    grace: Duration,
}

impl Hosts {
    /// An empty table whose names stay reserved `grace` after their owner went offline.
    pub(crate) fn new(grace: Duration) -> Self {
        Hosts { table: Mutex::default(), grace }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The host name for a user's prefix, checked against the user's rules and against
    /// other users' ids: `is_user` says whether some user has an id (ignoring case).
    pub(crate) fn key_for(
        &self,
        rules: &Rules,
        user: &str,
        prefix: Option<&str>,
        is_user: impl Fn(&str) -> bool,
    ) -> Result<String, RegisterError> {
        // Ids may hold '_', '.' and '@', which a host name label may not.
        let not_a_label = |key: &str| RegisterError::Other {
            message: format!(
                "host '{key}' made from the id is not a DNS label (at most 63 letters, digits and '-'); \
                 ask for another host prefix"
            ),
        };
        let Some(prefix) = prefix else {
            let key = user.to_ascii_lowercase();
            return if is_label(&key) && !key.contains("--") { Ok(key) } else { Err(not_a_label(&key)) };
        };
        let refuse =
            |why: &str| RegisterError::HostNotAllowed { prefix: prefix.to_owned(), why: why.to_owned() };
        if !is_label(prefix) {
            return Err(refuse(": use letters, digits and '-', at most 63"));
        }
        let patterns = &rules.host_patterns;
        if !patterns.is_empty() && !patterns.iter().any(|p| p.is_match(prefix)) {
            let of = if rules.own.host_regex { format!("user {user}") } else { "the server".into() };
            return Err(refuse(&format!(": it matches no host-regex of {of}")));
        }
        if prefix.contains("--") {
            return Err(refuse(": '--' is kept for CID--name, which reaches one client"));
        }
        let lower = prefix.to_ascii_lowercase();
        let key = if rules.host_with_id { format!("{}-{lower}", user.to_ascii_lowercase()) } else { lower };
        if !is_label(&key) {
            return Err(not_a_label(&key));
        }
        match other_users_id(&key, user, is_user) {
            Some(id) => Err(refuse(&format!(": '{id}' is another user's id, and names under it are theirs"))),
            None => Ok(key),
        }
    }

    /// Records `name` for a service of `session` (a TLS passthrough one when
    /// `tls_passthrough`), within the user's host-number. A name another user holds, as
    /// any kind of service or reserved while offline, is taken.
    pub(crate) async fn reserve(
        &self,
        rules: &Rules,
        (name, tls_passthrough): (&str, bool),
        route: HostRoute,
    ) -> Result<(), RegisterError> {
        let user = route.session.user.clone();
        let key = &route_key(name, tls_passthrough);
        let taken = || RegisterError::HostTaken { host: name.to_owned() };
        let pending_release = {
            let mut table = self.lock();
            if table.owned_by_other(name, &user) {
                return Err(taken());
            }
            if let Some(pool) = table.routes.get_mut(key) {
                if pool.welcomes(&route) {
                    pool.members.push(route);
                    return Ok(());
                }
            }
            if let Some(limit) = rules.host_number {
                let held = table.routes.values().filter(|p| p.owned_by(&user)).count();
                if held >= limit as usize {
                    return Err(RegisterError::HostLimit {
                        limit,
                        whose: whose(rules.own.host_number, &user),
                    });
                }
            }
            match table.routes.get(key) {
                // A closing session of the same user may still hold the name for a moment.
                Some(pool)
                    if pool
                        .members
                        .iter()
                        .all(|r| r.session.closing.is_cancelled() && r.session.user == user) =>
                {
                    pool.members.first().map(|r| r.session.released.clone())
                }
                Some(_) => return Err(taken()),
                None => {
                    table.insert(name, key, route);
                    return Ok(());
                }
            }
        };
        if let Some(released) = pending_release {
            let _ = tokio::time::timeout(RELEASE_WAIT, released.cancelled()).await;
        }
        let mut table = self.lock();
        if table.routes.contains_key(key) || table.owned_by_other(name, &user) {
            return Err(taken());
        }
        table.insert(name, key, route);
        Ok(())
    }

    /// Forgets a closed service's host; later visitors get "offline" instead of "unknown".
    /// When no service of any kind holds the name any more, it stays reserved to its
    /// owner for the grace period.
    pub(crate) fn release(&self, (name, tls_passthrough): (&str, bool), service: u32) {
        let key = route_key(name, tls_passthrough);
        let mut table = self.lock();
        let Some(pool) = table.routes.get_mut(&key) else { return };
        let owner = pool.members.iter().find(|r| r.tunnel.service == service).map(|r| r.session.user.clone());
        pool.members.retain(|r| r.tunnel.service != service);
        if !pool.members.is_empty() {
            return;
        }
        table.routes.remove(&key);
        if table.offline.len() < MAX_OFFLINE {
            table.offline.insert(key);
        }
        let still_served = table.routes.contains_key(&route_key(name, !tls_passthrough));
        if let (Some(owner), false) = (owner, still_served) {
            table.hold(name, owner, Instant::now() + self.grace);
        }
    }

    /// Finds the service for a routing key (the next one, when several serve it).
    pub(crate) fn lookup(&self, key: &str, known_user: bool) -> Lookup {
        let mut table = self.lock();
        if let Some(route) = table.routes.get_mut(key).and_then(|pool| pool.pick(|_| true)) {
            return Lookup::Online(route);
        }
        if known_user || table.offline.contains(key) {
            Lookup::Offline
        } else {
            Lookup::Unknown
        }
    }

    /// Splits `CID--label` (the client with that id among those serving `label`).
    pub(crate) fn split_client(label: &str) -> Option<(u64, &str)> {
        let (cid, rest) = label.split_once("--")?;
        Some((cid.parse().ok().filter(|_| cid.bytes().all(|b| b.is_ascii_digit()))?, rest))
    }

    /// The service for a routing key served by one client (`CID--label`), if that client serves it.
    pub(crate) fn lookup_client(&self, key: &str, cid: u64) -> Option<HostRoute> {
        let mut table = self.lock();
        table.routes.get_mut(key)?.pick(|r| r.session.id == cid)
    }

    /// Finds the service for `/ID/PREFIX/...` or `/ID/...`; returns the route and how many
    /// path segments it used.
    pub(crate) fn lookup_path(&self, id: &str, prefix: Option<&str>) -> Option<(HostRoute, usize)> {
        let mut table = self.lock();
        let mut owned_by = |key: &str| {
            table.routes.get_mut(key).and_then(|pool| pool.pick(|r| r.session.user.eq_ignore_ascii_case(id)))
        };
        if let Some(prefix) = prefix.filter(|p| is_label(p)) {
            let prefix = prefix.to_ascii_lowercase();
            // With or without host-with-id (a per-user rule), the route must be the user's own.
            let with_id = format!("{}-{prefix}", id.to_ascii_lowercase());
            for key in [with_id.as_str(), prefix.as_str()] {
                if let Some(route) = owned_by(key)
                    .filter(|r| r.prefix.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(&prefix)))
                {
                    return Some((route, 2));
                }
            }
        }
        owned_by(&id.to_ascii_lowercase()).filter(|r| r.prefix.is_none()).map(|route| (route, 1))
    }
}

/// The id of a user other than `user` that `name` is, or is under (`ID-...`), ignoring case.
fn other_users_id<'a>(name: &'a str, user: &str, is_user: impl Fn(&str) -> bool) -> Option<&'a str> {
    let dashes = name.match_indices('-').map(|(at, _)| at);
    dashes
        .chain([name.len()])
        .map(|end| &name[..end])
        .find(|candidate| !candidate.eq_ignore_ascii_case(user) && is_user(candidate))
}

/// A DNS label: 1 to 63 letters, digits or '-', not starting or ending with '-'.
fn is_label(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(is_label("web-1"));
        assert!(!is_label("-web") && !is_label("a.b") && !is_label("") && !is_label(&"a".repeat(64)));
    }

    #[test]
    fn keys_follow_the_rules() {
        let mut config =
            crate::ServerConfig { host_regex: vec!["^[a-z]+$".into()], ..crate::ServerConfig::default() };
        let rules = Rules::resolve(&config, None).unwrap();
        let hosts = Hosts::new(Duration::ZERO);
        assert_eq!(hosts.key_for(&rules, "Id1", None, |_| false).unwrap(), "id1");
        assert_eq!(
            hosts.key_for(&rules, "id1", Some("Web"), |_| false).err().map(|e| e.to_string()),
            Some("host prefix 'Web' is not allowed: it matches no host-regex of the server".into())
        );
        assert_eq!(hosts.key_for(&rules, "id1", Some("web"), |_| false).unwrap(), "web");
        config.host_with_id = true;
        let rules = Rules::resolve(&config, None).unwrap();
        assert_eq!(hosts.key_for(&rules, "id1", Some("web"), |_| false).unwrap(), "id1-web");
        assert!(hosts.key_for(&rules, "id1", Some("a.b"), |_| false).is_err());
        assert!(
            hosts.key_for(&rules, "a@b.c", Some("web"), |_| false).is_err(),
            "ids may hold what labels may not"
        );
        assert!(
            hosts.key_for(&rules, &"x".repeat(60), Some("web"), |_| false).is_err(),
            "too long with the id"
        );
        config.host_with_id = false;
        let rules = Rules::resolve(&config, None).unwrap();
        assert!(hosts.key_for(&rules, "a_b", None, |_| false).is_err());
        assert_eq!(hosts.key_for(&rules, "a_b", Some("web"), |_| false).unwrap(), "web");
    }

    #[test]
    fn other_users_ids_and_names_under_them_are_refused() {
        let rules = Rules::resolve(&crate::ServerConfig::default(), None).unwrap();
        let hosts = Hosts::new(Duration::ZERO);
        let is_user = |id: &str| ["alice", "Bob"].iter().any(|u| u.eq_ignore_ascii_case(id));
        for prefix in ["alice", "ALICE", "alice-shop", "bob", "bob-x-y"] {
            let refused = hosts.key_for(&rules, "bob2", Some(prefix), is_user);
            assert!(matches!(refused, Err(RegisterError::HostNotAllowed { .. })), "{prefix}: {refused:?}");
        }
        assert_eq!(hosts.key_for(&rules, "alice", Some("alice-shop"), is_user).unwrap(), "alice-shop");
        assert_eq!(hosts.key_for(&rules, "bob", Some("Bob"), is_user).unwrap(), "bob");
        assert_eq!(hosts.key_for(&rules, "carl", Some("alicia"), is_user).unwrap(), "alicia");
        assert!(hosts.key_for(&rules, "carl", Some("1--alice2"), is_user).is_err(), "CID--name is routing");
    }
}
