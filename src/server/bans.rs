//! Bans after repeated failed logins, per source and per (source, id) (GT's reconnect-times /
//! reconnect-duration). A banned peer is refused before any cryptographic work.
//!
//! A source is one IPv4 address (an IPv4-mapped IPv6 address counts as IPv4) or one IPv6
//! /64: a single host usually holds a whole /64 and could otherwise step through it.
//! There is no ban of an id alone: anyone could then lock a user out by naming its id
//! from a few addresses. A correct proof is never refused for other addresses' failures.
//!
//! Memory is bounded: sources and (source, id) pairs are tracked in two tables of at most
//! [`MAX_TRACKED`] entries each (so a flood of made-up ids cannot push the addresses out).
//! A full table first forgets ended bans, then the oldest eighth of the counts that have
//! not led to a ban. A table full of live bans tracks no one new until some end: an
//! attacker who owns that many sources or ids is refused on all of them meanwhile, and
//! cannot grow the table.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

/// Most sources, and most ids, tracked.
const MAX_TRACKED: usize = 100_000;

/// Who failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Offender {
    /// A source: an IPv4 address or an IPv6 /64 (its first address); see [`Offender::source`].
    Addr(IpAddr),
    /// A user id named from one source (as [`Offender::source`] gives it).
    SourceId(IpAddr, String),
}

impl Offender {
    /// The source a connection from `ip` counts against: IPv4 per address, IPv6 per /64.
    pub(crate) fn source(ip: IpAddr) -> Self {
        Offender::Addr(source_of(ip))
    }

    /// The pair of a source and the id it named.
    pub(crate) fn source_id(ip: IpAddr, id: &str) -> Self {
        Offender::SourceId(source_of(ip), id.to_owned())
    }
}

/// IPv4 per address, IPv6 per /64 (its first address).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

struct Record {
    failures: u32,
    banned_until: Option<Instant>,
    /// The latest failure, for choosing which counts to forget when the table is full.
    last: Instant,
}

/// One bounded table of records.
#[derive(Default)]
struct Table {
    records: HashMap<Offender, Record>,
    /// Whether "full of bans" was logged since the table last had room.
    warned_full: bool,
}

impl Table {
    /// Makes room for one more record if it can; false when every record is a live ban.
    fn make_room(&mut self, capacity: usize, now: Instant) -> bool {
        if self.records.len() < capacity {
            self.warned_full = false;
            return true;
        }
        self.records.retain(|_, r| !r.banned_until.is_some_and(|until| until <= now));
        if self.records.len() >= capacity {
            let mut counts: Vec<Instant> =
                self.records.values().filter(|r| r.banned_until.is_none()).map(|r| r.last).collect();
            if !counts.is_empty() {
                let drop = (capacity / 8).clamp(1, counts.len());
                let (_, cutoff, _) = counts.select_nth_unstable(drop - 1);
                let cutoff = *cutoff;
                self.records.retain(|_, r| r.banned_until.is_some() || r.last > cutoff);
            }
        }
        let room = self.records.len() < capacity;
        if !room && !self.warned_full {
            warn!(
                capacity,
                "the ban table is full of live bans; new offenders are not tracked until some end"
            );
        }
        self.warned_full = !room;
        room
    }
}

/// Failure counts and bans.
pub(crate) struct Bans {
    times: u32,
    duration: Duration,
    capacity: usize,
    sources: Mutex<Table>,
    /// (source, id) pairs.
    ids: Mutex<Table>,
}

impl Bans {
    /// Bans for `duration` after `times` failures in a row; `times == 0` turns bans off.
    pub(crate) fn new(times: u32, duration: Duration) -> Self {
        Bans { times, duration, capacity: MAX_TRACKED, sources: Mutex::default(), ids: Mutex::default() }
    }

    fn table(&self, who: &Offender) -> MutexGuard<'_, Table> {
        let table = match who {
            Offender::Addr(_) => &self.sources,
            Offender::SourceId(..) => &self.ids,
        };
        table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `who` stays banned, if it is.
    pub(crate) fn banned(&self, who: &Offender) -> Option<Duration> {
        let until = self.table(who).records.get(who)?.banned_until?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Counts one failed login; returns true when this failure starts a ban.
    pub(crate) fn failed(&self, who: Offender) -> bool {
        if self.times == 0 {
            return false;
        }
        let mut table = self.table(&who);
        let now = Instant::now();
        if !table.records.contains_key(&who) && !table.make_room(self.capacity, now) {
            return false;
        }
        let record =
            table.records.entry(who).or_insert(Record { failures: 0, banned_until: None, last: now });
        if record.banned_until.is_some_and(|until| until <= now) {
            (record.failures, record.banned_until) = (0, None);
        }
        record.failures += 1;
        record.last = now;
        if record.failures >= self.times && record.banned_until.is_none() {
            record.banned_until = Some(now + self.duration);
            return true;
        }
        false
    }

    /// A successful login clears the record.
    pub(crate) fn succeeded(&self, who: &Offender) {
        self.table(who).records.remove(who);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.sources.lock().unwrap().records.len() + self.ids.lock().unwrap().records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(ip: &str) -> Offender {
        Offender::source(ip.parse().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn bans_start_after_n_failures_and_end_after_the_duration() {
        let bans = Bans::new(3, Duration::from_secs(60));
        let who = Offender::source_id("192.0.2.1".parse().unwrap(), "id1");
        assert!(!bans.failed(who.clone()));
        assert!(!bans.failed(who.clone()));
        assert!(bans.banned(&who).is_none());
        assert!(bans.failed(who.clone()));
        assert!(bans.banned(&who).is_some());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(bans.banned(&who).is_none());
        assert!(!bans.failed(who.clone()), "the count starts again after a ban");
        bans.succeeded(&who);
        assert!(Bans::new(0, Duration::from_secs(1)).banned(&who).is_none());
    }

    #[test]
    fn ipv6_is_banned_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source("2001:db8:1:2::1"), source("2001:db8:1:2:ffff:eeee:dddd:cccc"));
        assert_ne!(source("2001:db8:1:2::1"), source("2001:db8:1:3::1"));
        assert_eq!(source("::ffff:192.0.2.7"), source("192.0.2.7"));
        assert_ne!(source("192.0.2.7"), source("192.0.2.8"));
        let bans = Bans::new(1, Duration::from_secs(60));
        assert!(bans.failed(source("2001:db8::1")));
        assert!(bans.banned(&source("2001:db8::abcd")).is_some(), "the whole /64 is banned");
    }

    #[tokio::test(start_paused = true)]
    async fn a_table_full_of_bans_does_not_grow() {
        let bans = Bans { capacity: 4, ..Bans::new(1, Duration::from_secs(60)) };
        for n in 0..4 {
            assert!(bans.failed(Offender::source_id("192.0.2.1".parse().unwrap(), &format!("id{n}"))));
        }
        for n in 4..100 {
            assert!(
                !bans.failed(Offender::source_id("192.0.2.1".parse().unwrap(), &format!("id{n}"))),
                "no room, so not tracked"
            );
        }
        assert_eq!(bans.tracked(), 4);
        assert!(
            bans.banned(&Offender::source_id("192.0.2.1".parse().unwrap(), "id0")).is_some(),
            "live bans are kept"
        );
        // Sources have a table of their own.
        assert!(bans.failed(source("192.0.2.1")));
        // Once bans end, their room is used again.
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(bans.failed(Offender::source_id("192.0.2.1".parse().unwrap(), "id4")));
        assert_eq!(bans.tracked(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_table_forgets_the_oldest_counts_first() {
        let bans = Bans { capacity: 4, ..Bans::new(3, Duration::from_secs(60)) };
        for n in 0..4 {
            bans.failed(Offender::source_id("192.0.2.1".parse().unwrap(), &format!("id{n}")));
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        bans.failed(Offender::source_id("192.0.2.1".parse().unwrap(), "id4"));
        assert_eq!(bans.tracked(), 4);
        let ids = bans.ids.lock().unwrap();
        assert!(
            !ids.records.contains_key(&Offender::source_id("192.0.2.1".parse().unwrap(), "id0")),
            "the oldest count goes"
        );
        assert!(ids.records.contains_key(&Offender::source_id("192.0.2.1".parse().unwrap(), "id4")));
    }
}
