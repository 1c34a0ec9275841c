//! Several servers sharing one routing table in etcd.
//!
//! A node holds a lease and writes its record under it (`keys.rs`); each port or name a
//! client registers is claimed in etcd under that lease, in a transaction that fails when
//! another user claims it anywhere. Every node keeps the table in memory from a watch
//! (`table.rs`) and relays visitors for names other nodes hold over node links
//! (`link.rs`). A node that dies takes its claims with its lease.

pub(crate) mod etcd;
mod keys;
mod link;
mod table;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ClusterConfig;
use crate::transport::{PinnedIdentity, Stream};
use etcd::Etcd;
use keys::SessionRecord;
use keys::{node_key, ClaimKey, ROOT};
pub(crate) use keys::{ClaimKind, ClaimRecord, NodeRecord};
use link::NodeLink;
pub(crate) use link::{Arrival, NodeEntrance, NodeVisit};
pub(crate) use table::Holder;
use table::Table;

/// How long one etcd call may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

/// How long to wait before watching again after the watch broke.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// Why a claim was not written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClaimRefused {
    /// Another user claims it, on `node`.
    Taken { node: String },
    /// etcd could not be asked; the words say why.
    Unavailable(String),
}

impl std::fmt::Display for ClaimRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimRefused::Taken { node } => write!(f, "another user holds it on cluster node {node}"),
            ClaimRefused::Unavailable(why) => {
                write!(f, "the cluster store (etcd) is unreachable, so nothing new can be registered: {why}")
            }
        }
    }
}

/// This node's membership in the cluster.
pub(crate) struct Cluster {
    /// This node's id.
    pub(crate) node: String,
    etcd: Etcd,
    ttl: Duration,
    lease: AtomicI64,
    record: Vec<u8>,
    table: Arc<Mutex<Table>>,
    /// What this node wrote under its lease (claims and session slots): rewritten under a
    /// new lease if the old one expired.
    mine: Mutex<HashMap<String, Vec<u8>>>,
    changed: broadcast::Sender<(ClaimKind, String)>,
    link: Arc<NodeLink>,
    /// etcd answered the last call.
    reachable: AtomicBool,
    stop: CancellationToken,
}

impl Cluster {
    /// Joins the cluster: binds the node link, takes a lease, writes this node's record
    /// (refused while a live node has the same id) and reads the table. Relayed visitors
    /// arrive on the receiver. Leaves when `stop` is cancelled.
    pub(crate) async fn join(
        config: &ClusterConfig,
        stop: CancellationToken,
    ) -> Result<(Arc<Self>, mpsc::Receiver<Arrival>), String> {
        let etcd = Etcd::new(&config.etcd, ETCD_TIMEOUT)?;
        let table = Arc::new(Mutex::new(Table::default()));
        let known = table.clone();
        let known_node = Arc::new(move |print: &[u8; 32]| {
            let print = BASE64.encode(print);
            lock(&known).nodes.values().any(|node| node.fingerprint == print)
        });
        let identity = match &config.tls {
            Some(tls) => {
                PinnedIdentity::from_files(&tls.cert, &tls.key, &tls.ca).map_err(|e| e.to_string())?
            }
            None => {
                PinnedIdentity::generate(link::NODE_NAME).map_err(|e| format!("node certificate: {e}"))?
            }
        };
        let (link, arrivals) = NodeLink::bind((config.node_addr, identity), known_node, stop.clone())
            .map_err(|e| format!("node link on {}: {e}", config.node_addr))?;
        let addr = link.local_addr().map_err(|e| e.to_string())?;
        let record = NodeRecord { addr, fingerprint: BASE64.encode(link.fingerprint()) };
        let record = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        let lease = etcd.grant(config.lease_ttl).await?;
        if !etcd.create(&node_key(&config.node_id), &record, lease).await? {
            let _ = etcd.revoke(lease).await;
            return Err(format!("node id {} is in use by a live node of the cluster", config.node_id));
        }
        let cluster = Arc::new(Cluster {
            node: config.node_id.clone(),
            etcd,
            ttl: config.lease_ttl,
            lease: AtomicI64::new(lease),
            record,
            table,
            mine: Mutex::default(),
            changed: broadcast::channel(4096).0,
            link,
            reachable: AtomicBool::new(true),
            stop,
        });
        let revision = cluster.reload().await?;
        tokio::spawn(cluster.clone().keep_lease());
        tokio::spawn(cluster.clone().follow(revision));
        info!(node = %cluster.node, %addr, "joined the cluster");
        Ok((cluster, arrivals))
    }

    /// Reads the whole table again; returns the revision it was read at.
    async fn reload(&self) -> Result<i64, String> {
        let (revision, entries) = self.etcd.prefix(ROOT).await?;
        let fresh = Table::from_entries(entries);
        let touched: Vec<(ClaimKind, String)> = {
            let mut table = lock(&self.table);
            let old = std::mem::replace(&mut *table, fresh);
            old.claims().chain(table.claims()).map(|(name, _)| name.clone()).collect()
        };
        for name in touched {
            let _ = self.changed.send(name);
        }
        Ok(revision)
    }

    /// Keeps the lease alive; writes everything again under a new one if it expired
    /// (etcd was away longer than the lease).
    async fn keep_lease(self: Arc<Self>) {
        let every = self.ttl / 3;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let lease = self.lease.load(Ordering::Relaxed);
            match self.etcd.keep_alive(lease).await {
                Ok(true) => self.set_reachable(true),
                Ok(false) => {
                    warn!(node = %self.node, "the cluster lease expired; joining again");
                    if let Err(err) = self.renew().await {
                        warn!(%err, "could not join the cluster again; retrying");
                    }
                }
                Err(err) => {
                    if self.reachable.swap(false, Ordering::Relaxed) {
                        warn!(%err, "etcd is unreachable: known routes keep working, new registrations are refused");
                    }
                }
            }
        }
        let _ = self.etcd.revoke(self.lease.load(Ordering::Relaxed)).await;
        self.link.close();
    }

    fn set_reachable(&self, now: bool) {
        if now && !self.reachable.swap(true, Ordering::Relaxed) {
            info!("etcd is reachable again");
        }
    }

    /// A new lease, and this node's record and claims written under it again.
    async fn renew(&self) -> Result<(), String> {
        let lease = self.etcd.grant(self.ttl).await?;
        if !self.etcd.create(&node_key(&self.node), &self.record, lease).await? {
            let _ = self.etcd.revoke(lease).await;
            return Err(format!("node id {} was taken by another node meanwhile", self.node));
        }
        self.lease.store(lease, Ordering::Relaxed);
        self.set_reachable(true);
        let mine: Vec<(String, Vec<u8>)> =
            lock(&self.mine).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (key, value) in mine {
            let written = match ClaimKey::parse(&key) {
                Some(claim) => self.etcd.put_if_empty((&key, &value), lease, &claim.others()).await?,
                None => self.etcd.create(&key, &value, lease).await?,
            };
            if !written {
                warn!(key, "taken by another while this node was away; its tunnel keeps serving here only");
            }
        }
        Ok(())
    }

    /// Follows etcd's changes from `revision` on; reads everything again when the watch
    /// breaks (etcd restarted, or compacted past where the watch was).
    async fn follow(self: Arc<Self>, mut revision: i64) {
        loop {
            let watched = tokio::select! {
                _ = self.stop.cancelled() => return,
                watched = self.watch_from(revision) => watched,
            };
            if let Err(err) = watched {
                tracing::debug!(%err, "the cluster watch ended");
            }
            loop {
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(WATCH_RETRY) => {}
                }
                match self.reload().await {
                    Ok(read_at) => {
                        revision = read_at;
                        break;
                    }
                    Err(err) => tracing::debug!(%err, "cluster table not read yet"),
                }
            }
        }
    }

    async fn watch_from(&self, revision: i64) -> Result<(), String> {
        let mut watch = self.etcd.watch(ROOT, revision + 1).await?;
        while let Some((_, changes)) = watch.next().await? {
            let touched: Vec<_> = {
                let mut table = lock(&self.table);
                changes.into_iter().filter_map(|change| table.apply(change)).collect()
            };
            for name in touched {
                let _ = self.changed.send(name);
            }
        }
        Ok(())
    }

    /// Claims `name` of `kind` for `user` on this node: refused when another user claims
    /// it on any node.
    pub(crate) async fn claim(
        &self,
        (kind, name, route): (ClaimKind, &str, &str),
        user: &str,
        record: &ClaimRecord,
    ) -> Result<(), ClaimRefused> {
        let (name, user, route, node) =
            (name.to_owned(), user.to_owned(), route.to_owned(), self.node.clone());
        let claim = ClaimKey { kind, name: name.clone(), user: user.clone(), node, route };
        let (key, value) = (claim.key(), serde_json::to_vec(record).unwrap_or_default());
        let lease = self.lease.load(Ordering::Relaxed);
        match self.etcd.put_if_empty((&key, &value), lease, &claim.others()).await {
            Ok(true) => {
                self.set_reachable(true);
                lock(&self.mine).insert(key, value);
                Ok(())
            }
            Ok(false) => {
                let holders = self.holders(kind, &name);
                let node = holders.into_iter().find(|h| h.user != user).map(|h| h.node);
                Err(ClaimRefused::Taken { node: node.unwrap_or_else(|| "another node".into()) })
            }
            Err(err) => Err(ClaimRefused::Unavailable(err)),
        }
    }

    /// Gives up this node's claim of `name` for `user`.
    pub(crate) async fn release(&self, (kind, name, route): (ClaimKind, &str, &str), user: &str) {
        let (name, user, route, node) =
            (name.to_owned(), user.to_owned(), route.to_owned(), self.node.clone());
        let claim = ClaimKey { kind, name, user, node, route };
        let key = claim.key();
        lock(&self.mine).remove(&key);
        if let Err(err) = self.etcd.delete(&key).await {
            // It goes with the lease if the node dies; while it lives the claim is stale.
            warn!(%err, key, "could not give a claim back to etcd");
        }
    }

    /// Takes one of `limit` session slots of `user` for `session` of the client `instance`:
    /// the slot the same client holds (it moved here from another node), else a free one.
    /// Returns the slot's key, to give it back; `Taken` when every slot is held.
    pub(crate) async fn take_session_slot(
        &self,
        (user, limit): (&str, u32),
        (session, instance): (u64, &str),
    ) -> Result<String, ClaimRefused> {
        let record = SessionRecord { node: self.node.clone(), session, instance: instance.to_owned() };
        let value = serde_json::to_vec(&record).unwrap_or_default();
        let lease = self.lease.load(Ordering::Relaxed);
        let (own, held): (Vec<(String, SessionRecord)>, Vec<String>) = {
            let table = lock(&self.table);
            let of_user = table.sessions.iter().filter(|(_, (u, _))| u == user);
            let own = of_user.clone().filter(|(_, (_, r))| r.instance == instance);
            (
                own.map(|(k, (_, r))| (k.clone(), r.clone())).collect(),
                of_user.map(|(k, _)| k.clone()).collect(),
            )
        };
        let unavailable = ClaimRefused::Unavailable;
        for (key, old) in own {
            let old = serde_json::to_vec(&old).unwrap_or_default();
            if self.etcd.replace(&key, (&old, &value), lease).await.map_err(unavailable)? {
                lock(&self.mine).insert(key.clone(), value);
                return Ok(key);
            }
        }
        // Free slots first, as the table knows them; then the others, in case it is behind.
        let (mut free, taken): (Vec<String>, Vec<String>) =
            (0..limit).map(|slot| keys::session_key(user, slot)).partition(|key| !held.contains(key));
        free.extend(taken);
        for key in free {
            if self.etcd.create(&key, &value, lease).await.map_err(unavailable)? {
                lock(&self.mine).insert(key.clone(), value);
                return Ok(key);
            }
        }
        Err(ClaimRefused::Taken { node: "the cluster".into() })
    }

    /// Gives a session slot back.
    pub(crate) async fn release_session_slot(&self, key: &str) {
        lock(&self.mine).remove(key);
        if let Err(err) = self.etcd.delete(key).await {
            warn!(%err, key, "could not give a session slot back to etcd");
        }
    }

    /// Whether another user claims `name` (the table's view, for picking free ports).
    pub(crate) fn claimed_by_other(&self, kind: ClaimKind, name: &str, user: &str) -> bool {
        lock(&self.table).holders(kind, name).iter().any(|h| h.user != user)
    }

    /// Who claims `name`, on any node.
    pub(crate) fn holders(&self, kind: ClaimKind, name: &str) -> Vec<Holder> {
        lock(&self.table).holders(kind, name).to_vec()
    }

    /// The names of `kind` claimed now, with their holders.
    pub(crate) fn names_of(&self, kind: ClaimKind) -> HashMap<String, Vec<Holder>> {
        lock(&self.table).names_of(kind)
    }

    /// The live nodes.
    pub(crate) fn nodes(&self) -> Vec<(String, NodeRecord)> {
        lock(&self.table).nodes.iter().map(|(id, record)| (id.clone(), record.clone())).collect()
    }

    /// Every claim: kind, name and holders.
    pub(crate) fn claims(&self) -> Vec<(ClaimKind, String, Vec<Holder>)> {
        let table = lock(&self.table);
        table.claims().map(|((kind, name), holders)| (*kind, name.clone(), holders.clone())).collect()
    }

    /// Names whose claims changed, as they change.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<(ClaimKind, String)> {
        self.changed.subscribe()
    }

    /// Whether etcd answered lately.
    pub(crate) fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// Opens a stream to one of the other nodes in `holders` for `visit`: each in turn
    /// (round-robin over visitors), skipping nodes that did not answer a moment ago.
    pub(crate) async fn relay_to(&self, holders: &[Holder], visit: &NodeVisit) -> Option<(String, Stream)> {
        let mut others: Vec<&Holder> = holders.iter().filter(|h| h.node != self.node).collect();
        others.dedup_by(|a, b| a.node == b.node);
        if others.is_empty() {
            return None;
        }
        let start = rand::random::<usize>() % others.len();
        others.rotate_left(start);
        others.sort_by_key(|h| self.link.is_unreachable(&h.node));
        for holder in others {
            let Some(record) = lock(&self.table).nodes.get(&holder.node).cloned() else { continue };
            let Some(print) =
                BASE64.decode(&record.fingerprint).ok().and_then(|p| <[u8; 32]>::try_from(p).ok())
            else {
                continue;
            };
            match self.link.open((&holder.node, record.addr, print), visit).await {
                Ok(stream) => return Some((holder.node.clone(), stream)),
                Err(err) => warn!(node = %holder.node, %err, "could not relay a visitor to this node"),
            }
        }
        None
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
