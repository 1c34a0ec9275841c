//! Offers passed to a client, waiting for its answer: a client's offer to a peer
//! (`peers.rs`) or a browser's (`webrtc.rs`). Each waits at most [`ANSWER_WAIT`]; only
//! the session it went to may answer it; one asker (a client, a browser's address) holds
//! at most a few at once, and the whole table is bounded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How long an offer waits for its answer.
pub(crate) const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Most offers waiting across the server.
const MAX_PENDING: usize = 4096;

/// Most offers one asker may have waiting: one that asks faster than clients answer
/// cannot take the whole table.
const MAX_PENDING_PER_ASKER: usize = 16;

/// One offer waiting, with `T`: whatever the answer goes to.
struct Entry<T> {
    asker: u64,
    /// The session the offer went to; only it may answer.
    answering: u64,
    since: Instant,
    waiter: T,
}

/// Offers waiting for answers, by attempt number.
pub(crate) struct Signals<T> {
    table: Mutex<(u64, HashMap<u64, Entry<T>>)>,
}

impl<T> Default for Signals<T> {
    fn default() -> Self {
        Signals { table: Mutex::new((0, HashMap::new())) }
    }
}

impl<T> Signals<T> {
    /// Records an offer from `asker` to session `answering`; its attempt number, or `None`
    /// when the asker or the table has too many waiting.
    pub(crate) fn insert(&self, asker: u64, answering: u64, waiter: T) -> Option<u64> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (next, waiting) = &mut *table;
        let full = |waiting: &HashMap<u64, Entry<T>>| {
            waiting.len() >= MAX_PENDING
                || waiting.values().filter(|e| e.asker == asker).count() >= MAX_PENDING_PER_ASKER
        };
        if full(waiting) {
            waiting.retain(|_, e| e.since.elapsed() < ANSWER_WAIT);
        }
        if full(waiting) {
            return None;
        }
        *next += 1;
        waiting.insert(*next, Entry { asker, answering, since: Instant::now(), waiter });
        Some(*next)
    }

    /// Takes offer `attempt` when session `answering` may answer it and it is not late.
    pub(crate) fn take(&self, attempt: u64, answering: u64) -> Option<T> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let waiting = &mut table.1;
        waiting.get(&attempt).filter(|e| e.answering == answering)?;
        let entry = waiting.remove(&attempt)?;
        (entry.since.elapsed() < ANSWER_WAIT).then_some(entry.waiter)
    }

    /// Forgets offer `attempt` (its asker stopped waiting).
    pub(crate) fn forget(&self, attempt: u64) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).1.remove(&attempt);
    }
}
