//! HTTP virtual hosts: which service a host name (or path) routes to.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::session::SessionShared;
use super::tunnel::Tunnel;
use super::users::Rules;
use crate::proto::RegisterError;

/// How long a registration waits for a closing session to give its host back.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Most host names remembered as offline (for 502 rather than 404 answers).
const MAX_OFFLINE: usize = 100_000;

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

#[derive(Default)]
struct Table {
    routes: HashMap<String, HostPool>,
    offline: HashSet<String>,
}

/// Host names of every HTTP service.
#[derive(Default)]
pub(crate) struct Hosts {
    table: Mutex<Table>,
}

impl Hosts {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The routing key for a user's prefix, checked against the user's rules.
    pub(crate) fn key_for(
        &self,
        rules: &Rules,
        user: &str,
        prefix: Option<&str>,
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
            return if is_label(&key) { Ok(key) } else { Err(not_a_label(&key)) };
        };
        let refuse =
            |why: &str| RegisterError::HostNotAllowed { prefix: prefix.to_owned(), why: why.to_owned() };
        if !is_label(prefix) {
            return Err(refuse(": use letters, digits and '-', at most 63"));
        }
        let patterns = &rules.host_patterns;
        if !patterns.is_empty() && !patterns.iter().any(|p| p.is_match(prefix)) {
            return Err(refuse(": it matches no host-regex of the server"));
        }
        let prefix = prefix.to_ascii_lowercase();
        if !rules.host_with_id {
            return Ok(prefix);
        }
        let key = format!("{}-{prefix}", user.to_ascii_lowercase());
        if is_label(&key) {
            Ok(key)
        } else {
            Err(not_a_label(&key))
        }
    }

    /// Records `key` for a service of `session`, within the user's host-number.
    pub(crate) async fn reserve(
        &self,
        host_number: Option<u32>,
        key: &str,
        route: HostRoute,
    ) -> Result<(), RegisterError> {
        let user = route.session.user.clone();
        let pending_release = {
            let mut table = self.lock();
            if let Some(pool) = table.routes.get_mut(key) {
                if pool.welcomes(&route) {
                    pool.members.push(route);
                    return Ok(());
                }
            }
            if let Some(limit) = host_number {
                let held = table.routes.values().filter(|p| p.owned_by(&user)).count();
                if held >= limit as usize {
                    return Err(RegisterError::HostLimit { limit });
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
                Some(_) => return Err(RegisterError::HostTaken { host: key.to_owned() }),
                None => {
                    table.offline.remove(key);
                    table.routes.insert(key.to_owned(), HostPool { members: vec![route], next: 0 });
                    return Ok(());
                }
            }
        };
        if let Some(released) = pending_release {
            let _ = tokio::time::timeout(RELEASE_WAIT, released.cancelled()).await;
        }
        let mut table = self.lock();
        if table.routes.contains_key(key) {
            return Err(RegisterError::HostTaken { host: key.to_owned() });
        }
        table.offline.remove(key);
        table.routes.insert(key.to_owned(), HostPool { members: vec![route], next: 0 });
        Ok(())
    }

    /// Forgets a closed service's host; later visitors get "offline" instead of "unknown".
    pub(crate) fn release(&self, key: &str, service: u32) {
        let mut table = self.lock();
        let Some(pool) = table.routes.get_mut(key) else { return };
        pool.members.retain(|r| r.tunnel.service != service);
        if pool.members.is_empty() {
            table.routes.remove(key);
            if table.offline.len() < MAX_OFFLINE {
                table.offline.insert(key.to_owned());
            }
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
        let hosts = Hosts::default();
        assert_eq!(hosts.key_for(&rules, "Id1", None).unwrap(), "id1");
        assert_eq!(
            hosts.key_for(&rules, "id1", Some("Web")).err().map(|e| e.to_string()),
            Some("host prefix 'Web' is not allowed: it matches no host-regex of the server".into())
        );
        assert_eq!(hosts.key_for(&rules, "id1", Some("web")).unwrap(), "web");
        config.host_with_id = true;
        let rules = Rules::resolve(&config, None).unwrap();
        assert_eq!(hosts.key_for(&rules, "id1", Some("web")).unwrap(), "id1-web");
        assert!(hosts.key_for(&rules, "id1", Some("a.b")).is_err());
        assert!(hosts.key_for(&rules, "a@b.c", Some("web")).is_err(), "ids may hold what labels may not");
        assert!(hosts.key_for(&rules, &"x".repeat(60), Some("web")).is_err(), "too long with the id");
        config.host_with_id = false;
        let rules = Rules::resolve(&config, None).unwrap();
        assert!(hosts.key_for(&rules, "a_b", None).is_err());
        assert_eq!(hosts.key_for(&rules, "a_b", Some("web")).unwrap(), "web");
    }
}
