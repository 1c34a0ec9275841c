//! The cluster's routing table in memory: live nodes and who claims what, as etcd's
//! watch tells it. Visitors are routed from here; etcd is never asked on their path.

use std::collections::{BTreeMap, HashMap};

use super::etcd::{Change, Entry};
use super::keys::{
    parse_node_key, parse_session_key, ClaimKey, ClaimKind, ClaimRecord, NodeRecord, SessionRecord,
};

/// A claim as the table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) user: String,
    pub(crate) node: String,
    /// How visitors reach a name (`http`, `sni`, `peer`); empty for ports.
    pub(crate) route: String,
    pub(crate) record: ClaimRecord,
}

impl Holder {
    fn is(&self, claim: &ClaimKey) -> bool {
        self.user == claim.user && self.node == claim.node && self.route == claim.route
    }
}

/// Live nodes and claims.
#[derive(Default)]
pub(crate) struct Table {
    pub(crate) nodes: BTreeMap<String, NodeRecord>,
    claims: BTreeMap<(ClaimKind, String), Vec<Holder>>,
    /// Session slots by key, with their user.
    pub(crate) sessions: BTreeMap<String, (String, SessionRecord)>,
}

impl Table {
    /// A table of the entries read at one revision.
    pub(crate) fn from_entries(entries: Vec<Entry>) -> Self {
        let mut table = Table::default();
        for entry in entries {
            table.apply(Change::Put(entry));
        }
        table
    }

    /// Applies one change; returns the claim it touched, if it was one.
    pub(crate) fn apply(&mut self, change: Change) -> Option<(ClaimKind, String)> {
        match change {
            Change::Put(Entry { key, value, .. }) => {
                if let Some(node) = parse_node_key(&key) {
                    match serde_json::from_slice::<NodeRecord>(&value) {
                        Ok(record) => drop(self.nodes.insert(node, record)),
                        Err(err) => tracing::warn!(node, %err, "a node record in etcd is unreadable"),
                    }
                    return None;
                }
                if let Some(user) = parse_session_key(&key) {
                    if let Ok(record) = serde_json::from_slice::<SessionRecord>(&value) {
                        self.sessions.insert(key, (user, record));
                    }
                    return None;
                }
                let claim = ClaimKey::parse(&key)?;
                let record = serde_json::from_slice::<ClaimRecord>(&value)
                    .inspect_err(|err| tracing::warn!(key, %err, "a claim in etcd is unreadable"))
                    .ok()?;
                let holders = self.claims.entry((claim.kind, claim.name.clone())).or_default();
                holders.retain(|h| !h.is(&claim));
                let ClaimKey { kind, name, user, node, route } = claim;
                holders.push(Holder { user, node, route, record });
                Some((kind, name))
            }
            Change::Delete(key) => {
                if let Some(node) = parse_node_key(&key) {
                    self.nodes.remove(&node);
                    return None;
                }
                if self.sessions.remove(&key).is_some() {
                    return None;
                }
                let claim = ClaimKey::parse(&key)?;
                let name = (claim.kind, claim.name.clone());
                if let Some(holders) = self.claims.get_mut(&name) {
                    holders.retain(|h| !h.is(&claim));
                    if holders.is_empty() {
                        self.claims.remove(&name);
                    }
                }
                Some(name)
            }
        }
    }

    /// Who claims `name` of `kind`.
    pub(crate) fn holders(&self, kind: ClaimKind, name: &str) -> &[Holder] {
        self.claims.get(&(kind, name.to_owned())).map(Vec::as_slice).unwrap_or_default()
    }

    /// Every claim, by kind and name.
    pub(crate) fn claims(&self) -> impl Iterator<Item = (&(ClaimKind, String), &Vec<Holder>)> {
        self.claims.iter()
    }

    /// The names of `kind` claimed now, with their holders.
    pub(crate) fn names_of(&self, kind: ClaimKind) -> HashMap<String, Vec<Holder>> {
        let of_kind = self.claims.iter().filter(|((k, _), _)| *k == kind);
        of_kind.map(|((_, name), holders)| (name.clone(), holders.clone())).collect()
    }
}
