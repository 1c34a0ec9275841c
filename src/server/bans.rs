//! Bans after repeated failed logins, per source address and per id (GT's
//! reconnect-times / reconnect-duration). A banned peer is refused before any
//! cryptographic work.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Most addresses and ids tracked; past this, expired entries are dropped first.
const MAX_TRACKED: usize = 100_000;

/// Who failed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Offender {
    /// A source address.
    Addr(IpAddr),
    /// A user id.
    Id(String),
}

#[derive(Default)]
struct Record {
    failures: u32,
    banned_until: Option<Instant>,
}

/// Failure counts and bans.
pub(crate) struct Bans {
    times: u32,
    duration: Duration,
    records: Mutex<HashMap<Offender, Record>>,
}

impl Bans {
    /// Bans for `duration` after `times` failures in a row; `times == 0` turns bans off.
    pub(crate) fn new(times: u32, duration: Duration) -> Self {
        Bans { times, duration, records: Mutex::default() }
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<Offender, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long `who` stays banned, if it is.
    pub(crate) fn banned(&self, who: &Offender) -> Option<Duration> {
        let until = self.records().get(who)?.banned_until?;
        let left = until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Counts one failed login; returns true when this failure starts a ban.
    pub(crate) fn failed(&self, who: Offender) -> bool {
        if self.times == 0 {
            return false;
        }
        let mut records = self.records();
        if records.len() >= MAX_TRACKED {
            let now = Instant::now();
            records.retain(|_, r| r.banned_until.is_some_and(|until| until > now));
        }
        let record = records.entry(who).or_default();
        if record.banned_until.is_some_and(|until| until <= Instant::now()) {
            *record = Record::default();
        }
        record.failures += 1;
        if record.failures >= self.times && record.banned_until.is_none() {
            record.banned_until = Some(Instant::now() + self.duration);
            return true;
        }
        false
    }

    /// A successful login clears the record.
    pub(crate) fn succeeded(&self, who: &Offender) {
        self.records().remove(who);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bans_start_after_n_failures_and_end_after_the_duration() {
        let bans = Bans::new(3, Duration::from_secs(60));
        let who = Offender::Id("id1".into());
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
}
