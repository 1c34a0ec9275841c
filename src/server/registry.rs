//! Who is connected and which public ports they hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::session::SessionShared;
use super::users::whose;
use crate::config::{PortRange, ServerConfig};
use crate::proto::RegisterError;

/// How long a registration waits for a closing session to give its port back.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

struct PortOwner {
    user: String,
    /// Cancelled when the owning session starts closing.
    closing: CancellationToken,
    /// Cancelled when the owning session has released everything.
    released: CancellationToken,
}

#[derive(Default)]
struct Tables {
    next_session: u64,
    next_service: u32,
    sessions: HashMap<u64, Arc<SessionShared>>,
    ports: HashMap<u16, PortOwner>,
}

/// Sessions by number and TCP ports by owner.
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

    /// Ports held by tunnels now.
    pub(crate) fn held_ports(&self) -> std::collections::HashSet<u16> {
        self.lock().ports.keys().copied().collect()
    }

    /// Every session, for reloads.
    pub(crate) fn sessions(&self) -> Vec<Arc<SessionShared>> {
        self.lock().sessions.values().cloned().collect()
    }

    /// Finds a session for a data connection.
    pub(crate) fn session(&self, id: u64) -> Option<Arc<SessionShared>> {
        self.lock().sessions.get(&id).cloned()
    }

    /// Gives a port back; call after its listener is dropped.
    pub(crate) fn release_port(&self, port: u16) {
        self.lock().ports.remove(&port);
    }

    /// Picks, binds and records a public TCP port for `session` as the user's rules allow.
    pub(crate) async fn reserve_tcp_port(
        &self,
        config: &ServerConfig,
        session: &SessionShared,
        asked: Option<u16>,
        random: bool,
    ) -> Result<(u16, TcpListener), RegisterError> {
        let rules = session.account.rules();
        let allowances = &rules.tcp;
        let whose_tcp = || whose(rules.own.tcp, &session.user);
        if allowances.is_empty() {
            return Err(RegisterError::TcpDisabled { whose: whose_tcp() });
        }
        let held: Vec<u16> =
            self.lock().ports.iter().filter(|(_, o)| o.user == session.user).map(|(&p, _)| p).collect();
        if let Some(limit) = rules.tcp_number {
            if held.len() >= limit as usize {
                return Err(RegisterError::PortLimit { limit, whose: whose(false, &session.user) });
            }
        }
        // Ranges where the user may take one more port.
        let open: Vec<PortRange> = allowances
            .iter()
            .filter(|a| {
                a.number.map_or(true, |n| held.iter().filter(|&&p| a.range.contains(p)).count() < n as usize)
            })
            .map(|a| a.range)
            .collect();
        let Some(port) = asked else {
            return self.reserve_random(config, session, &open).await;
        };
        let refusal = if open.iter().any(|r| r.contains(port)) {
            match self.reserve_exact(config, session, port).await {
                Ok(listener) => return Ok((port, listener)),
                Err(refusal) => refusal,
            }
        } else if let Some(full) = allowances.iter().find(|a| a.range.contains(port)) {
            RegisterError::PortLimit { limit: full.number.unwrap_or_default(), whose: whose_tcp() }
        } else {
            let ranges: Vec<PortRange> = allowances.iter().map(|a| a.range).collect();
            RegisterError::PortNotAllowed { port, ranges: describe(&ranges), whose: whose_tcp() }
        };
        if random {
            self.reserve_random(config, session, &open).await
        } else {
            Err(refusal)
        }
    }

    async fn reserve_exact(
        &self,
        config: &ServerConfig,
        session: &SessionShared,
        port: u16,
    ) -> Result<TcpListener, RegisterError> {
        // A closing session of the same user may still hold the port for a moment.
        let pending_release = {
            let t = self.lock();
            match t.ports.get(&port) {
                Some(owner) if owner.closing.is_cancelled() && owner.user == session.user => {
                    Some(owner.released.clone())
                }
                Some(_) => return Err(RegisterError::PortTaken { port }),
                None => None,
            }
        };
        if let Some(released) = pending_release {
            let _ = tokio::time::timeout(RELEASE_WAIT, released.cancelled()).await;
        }
        self.try_bind(config, session, port).await.ok_or(RegisterError::PortTaken { port })
    }

    async fn reserve_random(
        &self,
        config: &ServerConfig,
        session: &SessionShared,
        ranges: &[PortRange],
    ) -> Result<(u16, TcpListener), RegisterError> {
        let total: u32 = ranges.iter().map(PortRange::len).sum();
        if total == 0 {
            let rules = session.account.rules();
            let limit = rules.tcp.iter().filter_map(|a| a.number).sum();
            return Err(RegisterError::PortLimit { limit, whose: whose(rules.own.tcp, &session.user) });
        }
        let start = rand::random::<u32>() % total;
        for i in 0..total {
            let port = nth_port(ranges, (start + i) % total);
            if let Some(listener) = self.try_bind(config, session, port).await {
                return Ok((port, listener));
            }
        }
        Err(RegisterError::NoFreePort { ranges: describe(ranges) })
    }

    /// Records `port` for `session` if free in the table, then binds it; undoes the record on failure.
    async fn try_bind(
        &self,
        config: &ServerConfig,
        session: &SessionShared,
        port: u16,
    ) -> Option<TcpListener> {
        {
            let mut t = self.lock();
            if t.ports.contains_key(&port) {
                return None;
            }
            t.ports.insert(
                port,
                PortOwner {
                    user: session.user.clone(),
                    closing: session.closing.clone(),
                    released: session.released.clone(),
                },
            );
        }
        match TcpListener::bind((config.addr.ip(), port)).await {
            Ok(listener) => Some(listener),
            Err(_) => {
                self.release_port(port);
                None
            }
        }
    }
}

fn nth_port(ranges: &[PortRange], mut i: u32) -> u16 {
    for range in ranges {
        if i < range.len() {
            return range.nth(i);
        }
        i -= range.len();
    }
    ranges.first().map(|r| r.start).unwrap_or(0)
}

fn describe(ranges: &[PortRange]) -> String {
    ranges.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")
}
