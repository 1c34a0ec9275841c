//! Budgets for connections that have not finished their handshake, so a flood of
//! half-open connections cannot starve anyone else.
//!
//! Three budgets, each a semaphore: connections not yet told apart (the TLS handshake and
//! the first bytes), client links (login or data hello) and visitors (request head or TLS
//! ClientHello). A connection holds one permit at a time and trades its first for one of
//! the other two once its first bytes say what it is, so a login flood leaves visitors
//! their budget and the other way round. On top of that, one source (an IPv4 address or
//! an IPv6 /64, as for bans) holds at most [`PER_SOURCE`] handshakes at once, whatever the
//! stage: a flood from one host fills its own share and no more. Past a limit, a new
//! connection is closed at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::bans::Offender;

/// Connections that may be in their first stage (not yet told apart) at once.
pub(crate) const UNSORTED: usize = 4096;
/// Client links (control or data) that may be in their handshake at once.
pub(crate) const CLIENT_LINKS: usize = 2048;
/// Visitors that may be sending their request head or ClientHello at once.
pub(crate) const VISITORS: usize = 2048;
/// Handshakes one source may have in progress at once. Browsers and clients finish
/// theirs in a round trip or two, so even a busy NAT stays far below this.
pub(crate) const PER_SOURCE: u32 = 256;

/// What a connection turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sorted {
    /// A client's control or data connection.
    ClientLink,
    /// An HTTP or TLS visitor.
    Visitor,
}

/// The handshake budgets of one server.
pub(crate) struct Handshakes {
    unsorted: Arc<Semaphore>,
    client_links: Arc<Semaphore>,
    visitors: Arc<Semaphore>,
    sources: Arc<Mutex<HashMap<Offender, u32>>>,
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes {
            unsorted: Arc::new(Semaphore::new(UNSORTED)),
            client_links: Arc::new(Semaphore::new(CLIENT_LINKS)),
            visitors: Arc::new(Semaphore::new(VISITORS)),
            sources: Arc::default(),
        }
    }
}

impl Handshakes {
    /// Admits a new connection from `ip` into the first stage; `None` when its source
    /// or the first stage is full.
    pub(crate) fn admit(&self, ip: IpAddr) -> Option<Handshake> {
        let source = SourceSlot::take(&self.sources, Offender::source(ip))?;
        let permit = self.unsorted.clone().try_acquire_owned().ok()?;
        Some(Handshake { _permit: permit, _source: source })
    }

    /// Moves `handshake` from the first stage to the budget of what it turned out to be;
    /// `None` (and the connection should close) when that budget is full.
    pub(crate) fn sort(&self, handshake: Handshake, sorted: Sorted) -> Option<Handshake> {
        let budget = match sorted {
            Sorted::ClientLink => &self.client_links,
            Sorted::Visitor => &self.visitors,
        };
        let permit = budget.clone().try_acquire_owned().ok()?;
        Some(Handshake { _permit: permit, _source: handshake._source })
    }
}

/// One connection's place in the handshake budgets; dropping it ends the handshake.
pub(crate) struct Handshake {
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
}

/// One handshake counted against its source; the count drops with it.
struct SourceSlot {
    sources: Arc<Mutex<HashMap<Offender, u32>>>,
    source: Offender,
}

impl SourceSlot {
    /// Counts one more handshake for `source`, unless it has [`PER_SOURCE`] already.
    fn take(sources: &Arc<Mutex<HashMap<Offender, u32>>>, source: Offender) -> Option<SourceSlot> {
        let mut counts = sources.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(source.clone()).or_insert(0);
        if *count >= PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(SourceSlot { sources: sources.clone(), source })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_gets_its_share_and_others_keep_theirs() {
        let handshakes = Handshakes::default();
        let flood: Vec<Handshake> =
            (0..PER_SOURCE).map(|_| handshakes.admit("192.0.2.1".parse().unwrap()).unwrap()).collect();
        assert!(handshakes.admit("192.0.2.1".parse().unwrap()).is_none(), "past its share");
        // The same /64 is the same source; another address is not.
        let v6 = (0..PER_SOURCE)
            .map(|i| handshakes.admit(format!("2001:db8::{i:x}").parse().unwrap()).unwrap())
            .collect::<Vec<_>>();
        assert!(handshakes.admit("2001:db8::ffff".parse().unwrap()).is_none());
        assert!(handshakes.admit("2001:db8:0:1::1".parse().unwrap()).is_some());
        assert!(handshakes.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(flood);
        drop(v6);
        assert!(handshakes.admit("192.0.2.1".parse().unwrap()).is_some(), "freed with the handshakes");
        assert!(handshakes.sources.lock().unwrap().is_empty(), "no entry outlives its handshakes");
    }

    #[test]
    fn client_links_and_visitors_have_separate_budgets() {
        let handshakes = Handshakes::default();
        let logins: Vec<Handshake> = (0..CLIENT_LINKS)
            .map(|i| {
                let ip = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
                let first = handshakes.admit(ip).unwrap();
                handshakes.sort(first, Sorted::ClientLink).unwrap()
            })
            .collect();
        let late_login = handshakes.admit("192.0.2.9".parse().unwrap()).unwrap();
        assert!(handshakes.sort(late_login, Sorted::ClientLink).is_none(), "the client budget is full");
        let visitor = handshakes.admit("192.0.2.9".parse().unwrap()).unwrap();
        assert!(handshakes.sort(visitor, Sorted::Visitor).is_some(), "visitors still get in");
        drop(logins);
    }
}
