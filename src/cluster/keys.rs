//! Where the cluster keeps what in etcd, and the records it writes there.
//!
//! - `/ferry/nodes/<node>`: a live node, under its lease: where other nodes reach it and
//!   the certificate it shows them.
//! - `/ferry/claims/<kind>/<name>/<user>/<node>[/<route>]`: `node` serves `name` (a port
//!   number, or a host name routed as `http`, `sni` or `peer`) for `user`, under the
//!   node's lease. Claims of one name by one user on
//!   several nodes live side by side (a client that moved, or one logged in to two
//!   nodes); a claim by another user is refused in the same transaction that writes it.
//!
//! - `/ferry/sessions/<user>/<slot>`: one of a user's sessions, for `sessions` counted
//!   cluster-wide (slots `0..limit`, each taken create-if-absent under the node's lease;
//!   a client that moved takes its own slot over).
//!
//! User ids and names are escaped (`%` and `/`), so each stays one path segment.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The root of every key the cluster writes.
pub(crate) const ROOT: &str = "/ferry/";
const NODES: &str = "/ferry/nodes/";
const CLAIMS: &str = "/ferry/claims/";
const SESSIONS: &str = "/ferry/sessions/";

/// What kind of name a claim holds; names of one kind are one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ClaimKind {
    /// A public TCP port.
    Tcp,
    /// A public UDP port.
    Udp,
    /// A host name (HTTP, TLS passthrough or P2P: one namespace, as on one server).
    Name,
}

impl ClaimKind {
    fn segment(self) -> &'static str {
        match self {
            ClaimKind::Tcp => "tcp",
            ClaimKind::Udp => "udp",
            ClaimKind::Name => "name",
        }
    }

    fn from_segment(segment: &str) -> Option<Self> {
        [ClaimKind::Tcp, ClaimKind::Udp, ClaimKind::Name].into_iter().find(|k| k.segment() == segment)
    }
}

impl fmt::Display for ClaimKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.segment())
    }
}

/// A node's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NodeRecord {
    /// Where other nodes reach it (`--node-addr`).
    pub(crate) addr: SocketAddr,
    /// SHA-256 of the certificate it shows other nodes, in base64.
    pub(crate) fingerprint: String,
}

/// Who holds a session slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SessionRecord {
    pub(crate) node: String,
    pub(crate) session: u64,
    /// The client's instance (one per running client; the same after a reconnect).
    pub(crate) instance: String,
}

/// What a claim says besides its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClaimRecord {
    /// The session that holds it on its node.
    pub(crate) session: u64,
    /// The service's name.
    pub(crate) service: String,
}

/// One node's claim on one name, as read back from a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimKey {
    pub(crate) kind: ClaimKind,
    pub(crate) name: String,
    pub(crate) user: String,
    pub(crate) node: String,
    /// How visitors reach a name: `http`, `sni` or `peer`; empty for ports.
    pub(crate) route: String,
}

/// The key of node `node`.
pub(crate) fn node_key(node: &str) -> String {
    format!("{NODES}{}", escape(node))
}

/// The node a key names, if it is a node key.
pub(crate) fn parse_node_key(key: &str) -> Option<String> {
    key.strip_prefix(NODES).and_then(unescape)
}

/// Every claim on `name`, by anyone: `{claims}/kind/name/`.
fn claims_of(kind: ClaimKind, name: &str) -> String {
    format!("{CLAIMS}{}/{}/", kind.segment(), escape(name))
}

impl ClaimKey {
    /// The key this claim is written at.
    pub(crate) fn key(&self) -> String {
        let key =
            format!("{}{}/{}", claims_of(self.kind, &self.name), escape(&self.user), escape(&self.node));
        if self.route.is_empty() {
            key
        } else {
            format!("{key}/{}", escape(&self.route))
        }
    }

    /// The ranges that hold other users' claims on the same name: the claim may be
    /// written only while both are empty.
    pub(crate) fn others(&self) -> [(String, Vec<u8>); 2] {
        let all = claims_of(self.kind, &self.name);
        let mine = format!("{all}{}/", escape(&self.user));
        let mine_end = super::etcd::prefix_end(&mine);
        let before = (all.clone(), mine.clone().into_bytes());
        let after = (String::from_utf8_lossy(&mine_end).into_owned(), super::etcd::prefix_end(&all));
        [before, after]
    }

    /// The claim a key names, if it is a claim key.
    pub(crate) fn parse(key: &str) -> Option<Self> {
        let mut parts = key.strip_prefix(CLAIMS)?.split('/');
        let kind = ClaimKind::from_segment(parts.next()?)?;
        let name = unescape(parts.next()?)?;
        let user = unescape(parts.next()?)?;
        let node = unescape(parts.next()?)?;
        let route = match parts.next() {
            Some(route) => unescape(route)?,
            None => String::new(),
        };
        parts.next().is_none().then_some(ClaimKey { kind, name, user, node, route })
    }
}

/// The key of slot `slot` of `user`'s sessions.
pub(crate) fn session_key(user: &str, slot: u32) -> String {
    format!("{SESSIONS}{}/{slot}", escape(user))
}

/// The user a session slot key belongs to, if it is one.
pub(crate) fn parse_session_key(key: &str) -> Option<String> {
    let mut parts = key.strip_prefix(SESSIONS)?.split('/');
    let user = unescape(parts.next()?)?;
    parts.next()?.parse::<u32>().ok()?;
    parts.next().is_none().then_some(user)
}

/// `%` and `/` written as `%25` and `%2F`, so any id is one path segment.
fn escape(text: &str) -> String {
    text.replace('%', "%25").replace('/', "%2F")
}

fn unescape(segment: &str) -> Option<String> {
    if segment.is_empty() {
        return None;
    }
    Some(segment.replace("%2F", "/").replace("%25", "%"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(user: &str) -> ClaimKey {
        let route = "http".into();
        ClaimKey { kind: ClaimKind::Name, name: "web".into(), user: user.into(), node: "n/1".into(), route }
    }

    #[test]
    fn keys_read_back_and_other_users_fall_in_the_ranges() {
        let mine = claim("bob");
        assert_eq!(mine.key(), "/ferry/claims/name/web/bob/n%2F1/http");
        let port = ClaimKey { kind: ClaimKind::Tcp, name: "80".into(), route: String::new(), ..mine.clone() };
        assert_eq!(ClaimKey::parse(&port.key()), Some(port));
        assert_eq!(ClaimKey::parse(&mine.key()), Some(mine.clone()));
        assert_eq!(ClaimKey::parse(&claim("a/%b").key()), Some(claim("a/%b")));
        assert_eq!(ClaimKey::parse("/ferry/claims/tcp/1/u"), None);
        assert_eq!(parse_node_key(&node_key("n1")), Some("n1".into()));
        let in_ranges = |key: &str| {
            mine.others().iter().any(|(start, end)| key >= start.as_str() && key.as_bytes() < end.as_slice())
        };
        for other in ["bo", "bob-x", "bob0", "alice", "zed", "bob%2F"] {
            assert!(in_ranges(&claim(other).key()), "{other}'s claim is another user's");
        }
        assert!(!in_ranges(&mine.key()));
        assert!(!in_ranges(&ClaimKey { node: "n2".into(), ..mine.clone() }.key()));
        let other_name = ClaimKey { name: "web2".into(), ..claim("alice") };
        assert!(!in_ranges(&other_name.key()), "another name is not in the way");
    }
}
