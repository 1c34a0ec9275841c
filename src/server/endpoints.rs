//! The table of public endpoints: every TCP port, HTTP host and TLS server name the
//! server serves, each with the pool of tunnels behind it.
//!
//! An endpoint is served by a [`Pool`]: usually one tunnel, but clients of one user that
//! share a tag and expose a service of the same name join the pool of the first one
//! (AeRO's tags), and visitors are spread over them round-robin. A member that leaves is
//! dropped from its pool; the endpoint closes with the last one. Host names keep more
//! (names held for an offline owner, `hosts.rs`); port picking is in `ports.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::hosts::Held;
use super::session::SessionShared;
use super::tunnel::Tunnel;
use crate::proto::{PortProtocol, ProxyProtocol};

/// How long a registration waits for a closing session to give its endpoint back.
pub(crate) const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// A public endpoint. A new transport adds its own kind here and gets pools, tag sharing
/// and round-robin as they are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Endpoint {
    /// A TCP port of its own.
    Port(u16),
    /// A UDP port of its own.
    UdpPort(u16),
    /// An HTTP virtual host (first label of the host name), plain or over `tls-addr`.
    Host(String),
    /// A TLS server name on `sni-addr`, passed through (first label).
    Sni(String),
    /// The name other clients reach a P2P service by (`p2p`).
    Peer(String),
}

impl Endpoint {
    /// The endpoint of a public port.
    pub(crate) fn port(protocol: PortProtocol, port: u16) -> Self {
        match protocol {
            PortProtocol::Tcp => Endpoint::Port(port),
            PortProtocol::Udp => Endpoint::UdpPort(port),
        }
    }

    /// The port, when the endpoint is one of `protocol`.
    pub(crate) fn port_of(&self, protocol: PortProtocol) -> Option<u16> {
        match (self, protocol) {
            (Endpoint::Port(p), PortProtocol::Tcp) | (Endpoint::UdpPort(p), PortProtocol::Udp) => Some(*p),
            _ => None,
        }
    }
}

/// One tunnel serving an endpoint, and how its visitors are handed over.
#[derive(Clone)]
pub(crate) struct Member {
    pub(crate) session: Arc<SessionShared>,
    /// The tunnel: its token closes it, its limits admit visitors.
    pub(crate) tunnel: Arc<Tunnel>,
    /// A PROXY header goes first (TCP ports).
    pub(crate) proxy_protocol: Option<ProxyProtocol>,
    /// Replaces the Host header when set (`use-local-as-http-host`).
    pub(crate) local_host: Option<String>,
    /// The host prefix asked for, if any (for path routing).
    pub(crate) prefix: Option<String>,
}

impl Member {
    /// A member with nothing but its tunnel.
    pub(crate) fn new(session: Arc<SessionShared>, tunnel: Arc<Tunnel>) -> Self {
        Member { session, tunnel, proxy_protocol: None, local_host: None, prefix: None }
    }

    fn shares_tag(&self, other: &Member) -> bool {
        self.session.tags.iter().any(|tag| other.session.tags.contains(tag))
    }
}

/// The tunnels behind one endpoint, taken in turn.
pub(crate) struct Pool {
    /// The user who holds the endpoint.
    pub(crate) user: String,
    members: Vec<Member>,
    next: usize,
    /// Cancelled when the last member has left (or the server shuts down, for a port).
    pub(crate) closed: CancellationToken,
    /// Cancelled once the endpoint is out of the table and may be taken again.
    pub(crate) released: CancellationToken,
}

impl Pool {
    /// A pool with `first` as its only member; `closed` ends it early when cancelled.
    pub(crate) fn new(first: Member, closed: CancellationToken) -> Self {
        let user = first.session.user.clone();
        Pool { user, members: vec![first], next: 0, closed, released: CancellationToken::new() }
    }

    /// The members `only` keeps, round-robin from the next one; members whose session is
    /// closing come last.
    pub(crate) fn rotation(&mut self, only: impl Fn(&Member) -> bool) -> Vec<Member> {
        let count = self.members.len();
        let start = self.next;
        self.next = self.next.wrapping_add(1);
        let turn = (0..count).map(|i| &self.members[(start + i) % count]).filter(|m| only(m));
        let (mut live, closing): (Vec<&Member>, Vec<&Member>) =
            turn.partition(|m| !m.session.closing.is_cancelled());
        live.extend(closing);
        live.into_iter().cloned().collect()
    }

    /// Whether `member` may join: same user and service name, and a tag shared with a
    /// live member.
    pub(crate) fn welcomes(&self, member: &Member) -> bool {
        !self.closed.is_cancelled()
            && self.members.iter().any(|m| {
                !m.session.closing.is_cancelled()
                    && m.session.user == member.session.user
                    && m.tunnel.name == member.tunnel.name
                    && m.shares_tag(member)
            })
    }

    /// Whether `user` may have the endpoint once it is released: every member belongs to
    /// a closing session of that user (a client reconnecting).
    pub(crate) fn closing_for(&self, user: &str) -> bool {
        self.user == user && self.members.iter().all(|m| m.session.closing.is_cancelled())
    }

    /// The first member of [`rotation`](Pool::rotation).
    pub(crate) fn pick(&mut self, only: impl Fn(&Member) -> bool) -> Option<Member> {
        self.rotation(only).into_iter().next()
    }

    /// The members now.
    pub(crate) fn members(&self) -> &[Member] {
        &self.members
    }

    /// Adds a member (one that [`welcomes`](Pool::welcomes) said may join).
    pub(crate) fn add(&mut self, member: Member) {
        self.members.push(member);
    }

    /// Takes the tunnel `service` out; returns its user if it was a member.
    pub(crate) fn remove_service(&mut self, service: u32) -> Option<String> {
        let user = self.members.iter().find(|m| m.tunnel.service == service).map(|m| m.session.user.clone());
        self.members.retain(|m| m.tunnel.service != service);
        user
    }
}

/// Every endpoint and what host names keep besides.
#[derive(Default)]
pub(crate) struct Table {
    pub(crate) pools: HashMap<Endpoint, Pool>,
    /// Host endpoints that had a service and have none now (502 rather than 404).
    pub(crate) offline: HashSet<Endpoint>,
    /// Names in their grace period, by name.
    pub(crate) held: HashMap<String, Held>,
}

/// The table of public endpoints.
pub(crate) struct Endpoints {
    table: Mutex<Table>,
    /// How long an offline owner's host name stays reserved to it.
    pub(crate) grace: Duration,
}

impl Endpoints {
    /// An empty table whose host names stay reserved `grace` after their owner went offline.
    pub(crate) fn new(grace: Duration) -> Self {
        Endpoints { table: Mutex::default(), grace }
    }

    /// The table, for the rules of one kind of endpoint (`hosts.rs`, `ports.rs`).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The members of `endpoint` that `only` keeps, in the order to try them.
    pub(crate) fn rotation(&self, endpoint: &Endpoint, only: impl Fn(&Member) -> bool) -> Vec<Member> {
        self.lock().pools.get_mut(endpoint).map(|pool| pool.rotation(only)).unwrap_or_default()
    }

    /// Adds `member` to the first pool `wanted` picks that welcomes it; returns its endpoint.
    pub(crate) fn join(&self, wanted: impl Fn(&Endpoint) -> bool, member: &Member) -> Option<Endpoint> {
        if member.session.tags.is_empty() {
            return None;
        }
        let mut table = self.lock();
        let (endpoint, pool) = table.pools.iter_mut().find(|(e, p)| wanted(e) && p.welcomes(member))?;
        pool.add(member.clone());
        Some(endpoint.clone())
    }

    /// Takes the tunnel `service` out of `endpoint`'s pool; returns the pool's `closed` and
    /// `released` tokens when it was the last member.
    pub(crate) fn leave(
        &self,
        endpoint: &Endpoint,
        service: u32,
    ) -> Option<(CancellationToken, CancellationToken)> {
        let mut table = self.lock();
        let pool = table.pools.get_mut(endpoint)?;
        pool.remove_service(service);
        pool.members.is_empty().then(|| (pool.closed.clone(), pool.released.clone()))
    }

    /// Gives `endpoint` back: it leaves the table and its pool's `released` fires. Returns
    /// the user who held it.
    pub(crate) fn remove(&self, endpoint: &Endpoint) -> Option<String> {
        let pool = self.lock().pools.remove(endpoint)?;
        pool.released.cancel();
        Some(pool.user)
    }

    /// Ports of `protocol` held now.
    pub(crate) fn held_ports(&self, protocol: PortProtocol) -> HashSet<u16> {
        self.lock().pools.keys().filter_map(|e| e.port_of(protocol)).collect()
    }
}
