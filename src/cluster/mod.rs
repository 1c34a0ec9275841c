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

/// A watch without a change this long is read again from scratch.
const WATCH_IDLE: Duration = Duration::from_secs(30);

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
    /// What this node wrote under its lease (claims and session slots), with the revision
    /// of the write: rewritten under a new lease if the old one expired, and deleted only
    /// while still as written (a later write, here or by another node, stays).
    mine: Mutex<HashMap<String, (Vec<u8>, i64)>>,
    /// A rewrite under a new lease did not finish; it is tried again.
    rewrite_pending: AtomicBool,
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
        let created = etcd.create(&node_key(&config.node_id), &record, lease).await;
        if !matches!(created, Ok(Some(_))) {
            let _ = etcd.revoke(lease).await;
            stop.cancel();
            return Err(match created {
                Err(err) => err,
                _ => format!("node id {} is in use by a live node of the cluster", config.node_id),
            });
        }
        let cluster = Arc::new(Cluster {
            node: config.node_id.clone(),
            etcd,
            ttl: config.lease_ttl,
            lease: AtomicI64::new(lease),
            record,
            table,
            mine: Mutex::default(),
            rewrite_pending: AtomicBool::new(false),
            changed: broadcast::channel(4096).0,
            link,
            reachable: AtomicBool::new(true),
            stop,
        });
        let revision = match cluster.reload().await {
            Ok(revision) => revision,
            Err(err) => {
                let _ = cluster.etcd.revoke(lease).await;
                cluster.stop.cancel();
                return Err(err);
            }
        };
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
                Ok(true) => {
                    self.set_reachable(true);
                    if self.rewrite_pending.load(Ordering::Relaxed) {
                        self.rewrite(lease).await;
                    }
                }
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
        if self.etcd.create(&node_key(&self.node), &self.record, lease).await?.is_none() {
            let _ = self.etcd.revoke(lease).await;
            return Err(format!("node id {} was taken by another node meanwhile", self.node));
        }
        self.lease.store(lease, Ordering::Relaxed);
        self.set_reachable(true);
        self.rewrite(lease).await;
        Ok(())
    }

    /// Writes everything this node holds again under `lease`; what could not be written
    /// for want of etcd is tried again at the next renewal.
    async fn rewrite(&self, lease: i64) {
        self.rewrite_pending.store(false, Ordering::Relaxed);
        let mine: Vec<(String, Vec<u8>)> =
            lock(&self.mine).iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
        for (key, value) in mine {
            let written = match ClaimKey::parse(&key) {
                Some(claim) => self.etcd.put_if_empty((&key, &value), lease, &claim.others()).await,
                None => self.etcd.create(&key, &value, lease).await,
            };
            match written {
                // Given back meanwhile: not put back in `mine` (its delete follows).
                Ok(Some(revision)) => {
                    if let Some(entry) = lock(&self.mine).get_mut(&key) {
                        entry.1 = revision;
                    }
                }
                Ok(None) => warn!(
                    key,
                    "taken by another while this node was away; its tunnel keeps serving here only"
                ),
                Err(err) => {
                    warn!(%err, key, "could not write a claim again; retrying");
                    self.rewrite_pending.store(true, Ordering::Relaxed);
                }
            }
        }
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
        let mut watch = self.etcd.watch(ROOT, revision.saturating_add(1)).await?;
        // A connection cut without a reset would leave the watch silent for good: after
        // WATCH_IDLE without a change, everything is read again and watched from there.
        while let Ok(next) = tokio::time::timeout(WATCH_IDLE, watch.next()).await {
            let Some((_, changes)) = next? else { break };
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
            Ok(Some(revision)) => {
                self.set_reachable(true);
                lock(&self.mine).insert(key, (value, revision));
                Ok(())
            }
            Ok(None) => {
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
        self.forget(claim.key()).await;
    }

    /// Deletes what this node wrote at `key`, if still as written.
    async fn forget(&self, key: String) {
        let Some((_, revision)) = lock(&self.mine).remove(&key) else { return };
        if let Err(err) = self.etcd.delete_if(&key, revision).await {
            // It goes with the lease if the node dies; while it lives it is stale.
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
            if let Some(revision) =
                self.etcd.replace(&key, (&old, &value), lease).await.map_err(unavailable)?
            {
                lock(&self.mine).insert(key.clone(), (value, revision));
                return Ok(key);
            }
        }
        // Free slots first, as the table knows them; then the others, in case it is behind.
        let (mut free, taken): (Vec<String>, Vec<String>) =
            (0..limit).map(|slot| keys::session_key(user, slot)).partition(|key| !held.contains(key));
        free.extend(taken);
        for key in free {
            if let Some(revision) = self.etcd.create(&key, &value, lease).await.map_err(unavailable)? {
                lock(&self.mine).insert(key.clone(), (value, revision));
                return Ok(key);
            }
        }
        Err(ClaimRefused::Taken { node: "the cluster".into() })
    }

    /// Gives a session slot back.
    pub(crate) async fn release_session_slot(&self, key: &str) {
        self.forget(key.to_owned()).await;
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
        let mut seen = std::collections::HashSet::new();
        let mut others: Vec<&Holder> =
            holders.iter().filter(|h| h.node != self.node && seen.insert(h.node.as_str())).collect();
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
