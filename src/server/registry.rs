//! Who is connected: sessions by number, and the numbers given to sessions and services.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::session::SessionShared;

#[derive(Default)]
struct Tables {
    next_session: u64,
    next_service: u32,
    sessions: HashMap<u64, Arc<SessionShared>>,
}

/// Sessions by number.
#[derive(Default)]
pub(crate) struct Registry {
    tables: Mutex<Tables>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh session number.
    pub(crate) fn next_session_id(&self) -> u64 {
        let mut t = self.lock();
        t.next_session += 1;
        t.next_session
    }

    /// A fresh service number.
    pub(crate) fn next_service_id(&self) -> u32 {
        let mut t = self.lock();
        t.next_service = t.next_service.wrapping_add(1).max(1);
        t.next_service
    }

    /// Adds a session; returns a live session of the same user and instance, which is stale.
    pub(crate) fn insert_session(&self, session: Arc<SessionShared>) -> Option<Arc<SessionShared>> {
        let mut t = self.lock();
        let stale = t
            .sessions
            .values()
            .find(|s| s.user == session.user && s.instance == session.instance && !s.closing.is_cancelled())
            .cloned();
        t.sessions.insert(session.id, session);
        stale
    }

    /// Whether a live session's user has this id, ignoring case.
    pub(crate) fn has_user_ignoring_case(&self, id: &str) -> bool {
        self.lock().sessions.values().any(|s| s.user.eq_ignore_ascii_case(id) && !s.closing.is_cancelled())
    }

    /// Removes a session that has finished closing.
    pub(crate) fn remove_session(&self, id: u64) {
        self.lock().sessions.remove(&id);
    }

    /// Every session, for reloads.
    pub(crate) fn sessions(&self) -> Vec<Arc<SessionShared>> {
        self.lock().sessions.values().cloned().collect()
    }

    /// Finds a session for a data connection.
    pub(crate) fn session(&self, id: u64) -> Option<Arc<SessionShared>> {
        self.lock().sessions.get(&id).cloned()
    }
}
