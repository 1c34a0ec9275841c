//! Host names in the endpoint table: which service a host name (or path) routes to.
//!
//! Host names are one namespace for HTTP, HTTPS and TLS passthrough: a name has one owner
//! (a user) whichever kind of service holds it, and stays reserved to that owner for a
//! grace period after its last service goes offline, so a reconnecting client gets it back.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::endpoints::{Endpoint, Endpoints, Member, Pool, Table, RELEASE_WAIT};
use super::users::{whose, Rules};
use crate::proto::RegisterError;

/// Most host names remembered as offline (for 502 rather than 404 answers), and most
/// names held for their offline owners.
const MAX_OFFLINE: usize = 100_000;

/// How long a name stays reserved to its owner after its last service went offline:
/// three heartbeat timeouts. The client notices a dead link within one (the default
/// heartbeat timeout is the same on both sides), and its reconnect backoff
/// (1 s doubling to 10 s) fits in the other two at the default 30 s.
pub(crate) fn name_grace(heartbeat_timeout: Duration) -> Duration {
    heartbeat_timeout.saturating_mul(3)
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// A live service.
    Online(Member),
    /// A host that had a service, or a known user's id, whose client is not connected.
    Offline,
    /// Nothing by that name.
    Unknown,
}

/// A name whose owner is offline, kept for the owner until `until`.
pub(crate) struct Held {
    user: String,
    until: Instant,
}

/// Which kind of service holds a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameKind {
    /// An HTTP virtual host, plain or over `tls-addr`.
    Http,
    /// A TLS server name passed through on `sni-addr`.
    Sni,
    /// A P2P service, reached by other clients.
    Peer,
}

impl NameKind {
    const ALL: [NameKind; 3] = [NameKind::Http, NameKind::Sni, NameKind::Peer];
}

/// The endpoint of a name: each kind routes on its own.
pub(crate) fn host_endpoint(name: &str, kind: NameKind) -> Endpoint {
    match kind {
        NameKind::Http => Endpoint::Host(name.to_owned()),
        NameKind::Sni => Endpoint::Sni(name.to_owned()),
        NameKind::Peer => Endpoint::Peer(name.to_owned()),
    }
}

/// Splits `CID--label` (the client with that id among those serving `label`).
pub(crate) fn split_client(label: &str) -> Option<(u64, &str)> {
    let (cid, rest) = label.split_once("--")?;
    Some((cid.parse().ok().filter(|_| cid.bytes().all(|b| b.is_ascii_digit()))?, rest))
}

impl Table {
    /// Whether a user other than `user` holds `name`, as any kind of service, or has it
    /// reserved while offline.
    fn owned_by_other(&self, name: &str, user: &str) -> bool {
        let live = NameKind::ALL
            .map(|kind| host_endpoint(name, kind))
            .iter()
            .filter_map(|endpoint| self.pools.get(endpoint))
            .any(|pool| pool.members().iter().any(|m| m.session.user != user));
        live || self.held.get(name).is_some_and(|h| h.user != user && h.until > Instant::now())
    }

    /// How many host names `user` holds.
    fn hosts_of(&self, user: &str) -> usize {
        let hosts = self
            .pools
            .iter()
            .filter(|(e, _)| matches!(e, Endpoint::Host(_) | Endpoint::Sni(_) | Endpoint::Peer(_)));
        hosts.filter(|(_, pool)| pool.members().iter().any(|m| m.session.user == user)).count()
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

    fn insert(&mut self, name: &str, endpoint: Endpoint, member: Member) {
        self.held.remove(name);
        self.offline.remove(&endpoint);
        self.pools.insert(endpoint, Pool::new(member, CancellationToken::new()));
    }
}

/// Host names: one owner per name across HTTP, HTTPS and TLS passthrough.
impl Endpoints {
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

    /// Records `name` of `kind` for `member`, within the user's host-number. A name
    /// another user holds, as any kind of service or reserved while offline, is taken.
    pub(crate) async fn reserve_host(
        &self,
        rules: &Rules,
        (name, kind): (&str, NameKind),
        member: Member,
    ) -> Result<(), RegisterError> {
        let user = member.session.user.clone();
        let endpoint = host_endpoint(name, kind);
        let taken = || RegisterError::HostTaken { host: name.to_owned() };
        let pending_release = {
            let mut table = self.lock();
            if table.owned_by_other(name, &user) {
                return Err(taken());
            }
            if let Some(pool) = table.pools.get_mut(&endpoint).filter(|pool| pool.welcomes(&member)) {
                pool.add(member);
                return Ok(());
            }
            if let Some(limit) = rules.host_number {
                if table.hosts_of(&user) >= limit as usize {
                    return Err(RegisterError::HostLimit {
                        limit,
                        whose: whose(rules.own.host_number, &user),
                    });
                }
            }
            match table.pools.get(&endpoint) {
                // A closing session of the same user may still hold the name for a moment.
                Some(pool) if pool.closing_for(&user) => pool.released.clone(),
                Some(_) => return Err(taken()),
                None => {
                    table.insert(name, endpoint, member);
                    return Ok(());
                }
            }
        };
        let _ = tokio::time::timeout(RELEASE_WAIT, pending_release.cancelled()).await;
        let mut table = self.lock();
        if table.pools.contains_key(&endpoint) || table.owned_by_other(name, &user) {
            return Err(taken());
        }
        table.insert(name, endpoint, member);
        Ok(())
    }

    /// Forgets a closed service's host; later visitors get "offline" instead of "unknown".
    /// When no service of any kind holds the name any more, it stays reserved to its
    /// owner for the grace period.
    pub(crate) fn release_host(&self, (name, kind): (&str, NameKind), service: u32) {
        let endpoint = host_endpoint(name, kind);
        let mut table = self.lock();
        let Some(pool) = table.pools.get_mut(&endpoint) else { return };
        let owner = pool.remove_service(service);
        if !pool.members().is_empty() {
            return;
        }
        if let Some(pool) = table.pools.remove(&endpoint) {
            pool.released.cancel();
        }
        if table.offline.len() < MAX_OFFLINE {
            table.offline.insert(endpoint);
        }
        let still_served =
            NameKind::ALL.iter().any(|&other| table.pools.contains_key(&host_endpoint(name, other)));
        if let (Some(owner), false) = (owner, still_served) {
            table.hold(name, owner, Instant::now() + self.grace);
        }
    }

    /// Finds the service for a host endpoint (the next one, when several serve it).
    pub(crate) fn lookup(&self, endpoint: &Endpoint, known_user: bool) -> Lookup {
        let mut table = self.lock();
        if let Some(member) = table.pools.get_mut(endpoint).and_then(|pool| pool.pick(|_| true)) {
            return Lookup::Online(member);
        }
        if known_user || table.offline.contains(endpoint) {
            Lookup::Offline
        } else {
            Lookup::Unknown
        }
    }

    /// The service for a host endpoint served by one client (`CID--label`), if that client serves it.
    pub(crate) fn lookup_client(&self, endpoint: &Endpoint, cid: u64) -> Option<Member> {
        let mut table = self.lock();
        table.pools.get_mut(endpoint)?.pick(|m| m.session.id == cid)
    }

    /// Finds the service for `/ID/PREFIX/...` or `/ID/...`; returns the member and how many
    /// path segments it used.
    pub(crate) fn lookup_path(&self, id: &str, prefix: Option<&str>) -> Option<(Member, usize)> {
        let mut table = self.lock();
        let mut owned_by = |name: &str| {
            let pool = table.pools.get_mut(&host_endpoint(name, NameKind::Http));
            pool.and_then(|pool| pool.pick(|m| m.session.user.eq_ignore_ascii_case(id)))
        };
        if let Some(prefix) = prefix.filter(|p| is_label(p)) {
            let prefix = prefix.to_ascii_lowercase();
            // With or without host-with-id (a per-user rule), the route must be the user's own.
            let with_id = format!("{}-{prefix}", id.to_ascii_lowercase());
            for name in [with_id.as_str(), prefix.as_str()] {
                if let Some(member) = owned_by(name)
                    .filter(|m| m.prefix.as_deref().is_some_and(|p| p.eq_ignore_ascii_case(&prefix)))
                {
                    return Some((member, 2));
                }
            }
        }
        owned_by(&id.to_ascii_lowercase()).filter(|m| m.prefix.is_none()).map(|member| (member, 1))
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
        let hosts = Endpoints::new(Duration::ZERO);
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
        let hosts = Endpoints::new(Duration::ZERO);
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
