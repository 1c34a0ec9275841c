//! One open tunnel on the server: the token that closes it, and proxylite's
//! service control (at most N visitors at once, M in total, open for D).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::users::{Account, Counted, Slot};
use crate::config::ServiceKind;
use crate::proto::{CloseReason, DatagramCounts, ServiceControl};
use crate::relay::throttle::Traffic;

/// A tunnel's limits and live counters.
pub(crate) struct Tunnel {
    pub(crate) service: u32,
    /// The client's name for the service.
    pub(crate) name: String,
    /// What kind of endpoint it has.
    pub(crate) kind: ServiceKind,
    pub(crate) born: SystemTime,
    /// The public port (TCP) or host (HTTP, HTTPS), once open.
    pub(crate) endpoint: OnceLock<(u16, Option<String>)>,
    /// Where visitors reach it, once open.
    pub(crate) address: OnceLock<String>,
    /// Bytes through its visitors.
    pub(crate) traffic: Traffic,
    /// Datagrams through it (UDP tunnels).
    pub(crate) datagrams: Datagrams,
    /// The name peers reach it by (P2P services), once reserved.
    pub(crate) peer_name: OnceLock<String>,
    /// Its peers, direct and relayed (P2P services).
    pub(crate) peers: Peers,
    /// Cancelled when the tunnel closes; its visitors go with it.
    pub(crate) token: CancellationToken,
    /// Cancelled once the closed tunnel has left its endpoint, and the endpoint, when it
    /// was the last member there, can be taken again.
    pub(crate) gone: CancellationToken,
    control: ServiceControl,
    active: AtomicU32,
    served: AtomicU64,
    /// Why the server closed it, when the server did.
    closed_because: OnceLock<CloseReason>,
    /// The owner's account, for per-user visitor limits.
    account: Arc<Account>,
}

/// Datagram counters of a UDP tunnel.
#[derive(Default)]
pub(crate) struct Datagrams {
    /// From visitors to the service.
    pub(crate) up: AtomicU64,
    /// From the service to visitors.
    pub(crate) down: AtomicU64,
    /// Dropped, for any reason (see [`DatagramCounts`]).
    pub(crate) dropped: AtomicU64,
}

impl Datagrams {
    /// The counts now.
    pub(crate) fn get(&self) -> DatagramCounts {
        DatagramCounts {
            r#in: self.up.load(Ordering::Relaxed),
            out: self.down.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// Counts one dropped datagram.
    pub(crate) fn drop_one(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Peers of a P2P tunnel connected now.
#[derive(Default)]
pub(crate) struct Peers {
    direct: AtomicU32,
    relayed: AtomicU32,
}

impl Peers {
    /// One more (or one fewer) peer client with a direct path up.
    pub(crate) fn set_direct(&self, up: bool) {
        if up {
            self.direct.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self.direct.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Forward links through the server: `change` more (or fewer).
    pub(crate) fn relayed(&self, change: i32) {
        let _ =
            self.relayed.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add_signed(change));
    }

    /// Peer clients connected directly, and connections relayed, now.
    pub(crate) fn get(&self) -> (u32, u32) {
        (self.direct.load(Ordering::Relaxed), self.relayed.load(Ordering::Relaxed))
    }
}

/// Why a visitor was turned away.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `max-serve-conn` visitors are already connected.
    AtCapacity,
    /// The tunnel is closed or has served `max-serve-count` visitors.
    Closed,
    /// The owner has `connections` visitors already, across all their tunnels.
    UserLimit {
        /// The user's limit.
        limit: u32,
    },
}

impl std::fmt::Display for Refusal {
    /// Why, in words that follow "the service refused:".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::AtCapacity => f.write_str("it has max-serve-conn visitors connected"),
            Refusal::Closed => f.write_str("it is closed"),
            Refusal::UserLimit { limit } => write!(f, "its user has {limit} connections, the most allowed"),
        }
    }
}

impl Tunnel {
    pub(crate) fn new(
        (service, name, kind): (u32, String, ServiceKind),
        token: CancellationToken,
        control: ServiceControl,
        account: Arc<Account>,
    ) -> Arc<Self> {
        Arc::new(Tunnel {
            service,
            name,
            kind,
            born: SystemTime::now(),
            endpoint: OnceLock::new(),
            address: OnceLock::new(),
            traffic: Traffic::default(),
            datagrams: Datagrams::default(),
            peer_name: OnceLock::new(),
            peers: Peers::default(),
            token,
            gone: CancellationToken::new(),
            control,
            account,
            active: AtomicU32::new(0),
            served: AtomicU64::new(0),
            closed_because: OnceLock::new(),
        })
    }

    /// Its kind as the API names it: `tcp`, `http` or `https`.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self.kind {
            ServiceKind::Tcp => "tcp",
            ServiceKind::Http => "http",
            ServiceKind::Https => "https",
            ServiceKind::Udp => "udp",
        }
    }

    /// How long the tunnel may stay open, if limited.
    pub(crate) fn max_serve_time(&self) -> Option<Duration> {
        self.control.max_serve_time_ms.map(Duration::from_millis)
    }

    /// The limits it was opened with.
    pub(crate) fn control(&self) -> &ServiceControl {
        &self.control
    }

    /// Visitors connected now, and admitted in all.
    pub(crate) fn visitors(&self) -> (u32, u64) {
        (self.active.load(Ordering::Acquire), self.served.load(Ordering::Acquire))
    }

    /// Lets one more visitor in; the returned guard counts it until dropped.
    pub(crate) fn admit(self: &Arc<Self>) -> Result<Visit, Refusal> {
        if self.token.is_cancelled() {
            return Err(Refusal::Closed);
        }
        let slot = self.account.admit(Counted::Visitors).map_err(|limit| Refusal::UserLimit { limit })?;
        let max = self.control.max_serve_conn.unwrap_or(u32::MAX);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| Refusal::AtCapacity)?;
        let visit = Visit { tunnel: self.clone(), _slot: slot };
        let served = self.served.fetch_add(1, Ordering::AcqRel) + 1;
        if self.control.max_serve_count.is_some_and(|max| served > max) {
            return Err(Refusal::Closed); // `visit` drops and gives its slot back
        }
        Ok(visit)
    }

    /// Closes the tunnel for `reason`; the first reason given is the one reported.
    pub(crate) fn close(&self, reason: CloseReason) {
        let _ = self.closed_because.set(reason);
        self.token.cancel();
    }

    /// Why the server closed the tunnel, if it did.
    pub(crate) fn reason(&self) -> Option<&CloseReason> {
        self.closed_because.get()
    }
}

/// One admitted visitor; dropping it frees its slot, and closes a tunnel that has
/// served its `max-serve-count` once the last visitor is gone.
pub(crate) struct Visit {
    tunnel: Arc<Tunnel>,
    /// The visitor's place in the user's `connections`.
    _slot: Slot,
}

impl Drop for Visit {
    fn drop(&mut self) {
        let tunnel = &self.tunnel;
        let active = tunnel.active.fetch_sub(1, Ordering::AcqRel) - 1;
        if let Some(count) = tunnel.control.max_serve_count {
            if active == 0 && tunnel.served.load(Ordering::Acquire) >= count {
                tunnel.close(CloseReason::MaxServeCount { count });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::users::{Directory, Grant, Rules, Users};
    use super::*;

    #[test]
    fn limits_admit_refuse_and_close() {
        let control =
            ServiceControl { max_serve_conn: Some(2), max_serve_count: Some(3), ..Default::default() };
        let rules = Arc::new(Rules::resolve(&Default::default(), None).unwrap());
        let account =
            Users::new(Directory::new(&Default::default()).unwrap()).account("a", rules, Grant::Known);
        let tunnel =
            Tunnel::new((1, "t".into(), ServiceKind::Tcp), CancellationToken::new(), control, account);
        let a = tunnel.admit().unwrap();
        let b = tunnel.admit().unwrap();
        assert_eq!(tunnel.admit().err(), Some(Refusal::AtCapacity));
        drop(a);
        let c = tunnel.admit().unwrap();
        drop(b);
        assert_eq!(tunnel.admit().err(), Some(Refusal::Closed), "a fourth visitor in total");
        assert!(!tunnel.token.is_cancelled(), "still serving its last visitor");
        drop(c);
        assert!(tunnel.token.is_cancelled());
        assert_eq!(tunnel.reason(), Some(&CloseReason::MaxServeCount { count: 3 }));
    }
}
