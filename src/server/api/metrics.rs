//! Prometheus metrics: counters kept as events happen, and gauges and per-service and
//! per-user byte counts read from the live state at each scrape.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::config::ServiceKind;
use crate::server::peers::PeerEvent;
use crate::server::ServerShared;

/// Label pairs of one time series.
type Labels = Vec<(&'static str, String)>;

/// Counters of server events.
#[derive(Debug)]
pub(crate) struct Metrics {
    auth_failures: Counter,
    bans: Counter,
    visitors: Counter,
    udp_dropped: Counter,
    stun_answers: Counter,
    peer_events: Family<Labels, Counter>,
    node_relays: Family<Labels, Counter>,
    handshakes: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            auth_failures: Counter::default(),
            bans: Counter::default(),
            visitors: Counter::default(),
            udp_dropped: Counter::default(),
            stun_answers: Counter::default(),
            peer_events: Family::default(),
            node_relays: Family::default(),
            // 0.5 ms to about 4 s.
            handshakes: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        }
    }
}

impl Metrics {
    /// A login or API token check failed.
    pub(crate) fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    /// An address or id was banned.
    pub(crate) fn banned(&self) {
        self.bans.inc();
    }

    /// A visitor was admitted to a tunnel.
    pub(crate) fn visitor(&self) {
        self.visitors.inc();
    }

    /// A datagram of a UDP tunnel was dropped.
    pub(crate) fn udp_dropped(&self) {
        self.udp_dropped.inc();
    }

    /// The STUN server answered a Binding request.
    pub(crate) fn stun_answered(&self) {
        self.stun_answers.inc();
    }

    /// A visitor was relayed between cluster nodes (`out` to another, `in` from one).
    pub(crate) fn node_relay(&self, direction: &'static str) {
        self.node_relays.get_or_create(&vec![("direction", direction.to_owned())]).inc();
    }

    /// Something happened to a peer connection (`peers.rs`).
    pub(crate) fn peer_event(&self, event: PeerEvent) {
        let name = match event {
            PeerEvent::Attempt => "attempt",
            PeerEvent::Direct => "direct",
            PeerEvent::Fallback => "fallback",
            PeerEvent::Upgrade => "upgrade",
        };
        self.peer_events.get_or_create(&vec![("event", name.to_owned())]).inc();
    }

    /// A client logged in; `took` from the challenge to the verified login.
    pub(crate) fn handshake(&self, took: Duration) {
        self.handshakes.observe(took.as_secs_f64());
    }

    /// The text exposition of every metric.
    pub(crate) fn render(&self, shared: &ServerShared) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::with_prefix("ferry");
        registry.register("auth_failures", "Failed logins and API token checks", self.auth_failures.clone());
        registry.register("bans", "Addresses or ids banned after repeated failures", self.bans.clone());
        registry.register(
            "visitors",
            "Visitors admitted to tunnels (a UDP flow counts as one)",
            self.visitors.clone(),
        );
        registry.register(
            "udp_dropped_datagrams",
            "Datagrams of UDP tunnels dropped (too large for the link, past a flow cap, refused visitors, full queues)",
            self.udp_dropped.clone(),
        );
        registry.register(
            "stun_answers",
            "Binding requests the STUN server answered",
            self.stun_answers.clone(),
        );
        registry.register(
            "p2p_events",
            "Peer connections: offers passed to serving clients (attempt), direct paths up (direct), punching given up (fallback), direct paths found after a fallback (upgrade)",
            self.peer_events.clone(),
        );
        registry.register(
            "node_relays",
            "Visitors relayed between cluster nodes: to a node holding their tunnel (out), from another node (in)",
            self.node_relays.clone(),
        );
        registry.register(
            "handshake_seconds",
            "Time from challenge to verified login",
            self.handshakes.clone(),
        );

        let sessions: Vec<_> =
            shared.registry.sessions().into_iter().filter(|s| !s.closing.is_cancelled()).collect();
        let (clients, services, active) =
            (Gauge::<i64>::default(), Gauge::<i64>::default(), Gauge::<i64>::default());
        let service_bytes = Family::<Labels, Counter>::default();
        let service_datagrams = Family::<Labels, Counter>::default();
        clients.set(sessions.len() as i64);
        for session in &sessions {
            let tunnels: Vec<_> = session.tunnels().values().cloned().collect();
            for tunnel in tunnels.iter().filter(|t| !t.token.is_cancelled()) {
                services.inc();
                active.inc_by(i64::from(tunnel.visitors().0));
                let (up, down) = tunnel.traffic.get();
                let labels = |direction: &'static str| {
                    vec![
                        ("service", tunnel.service.to_string()),
                        ("name", label_value(&tunnel.name)),
                        ("user", label_value(&session.user)),
                        ("direction", direction.to_owned()),
                    ]
                };
                service_bytes.get_or_create(&labels("in")).inc_by(up);
                service_bytes.get_or_create(&labels("out")).inc_by(down);
                if tunnel.kind == ServiceKind::Udp {
                    let counts = tunnel.datagrams.get();
                    service_datagrams.get_or_create(&labels("in")).inc_by(counts.r#in);
                    service_datagrams.get_or_create(&labels("out")).inc_by(counts.out);
                    service_datagrams.get_or_create(&labels("dropped")).inc_by(counts.dropped);
                }
            }
        }
        let user_bytes = Family::<Labels, Counter>::default();
        for (user, up, down) in shared.users.traffic() {
            let user = label_value(&user);
            user_bytes.get_or_create(&vec![("user", user.clone()), ("direction", "in".into())]).inc_by(up);
            user_bytes.get_or_create(&vec![("user", user), ("direction", "out".into())]).inc_by(down);
        }
        registry.register("clients", "Connected clients", clients);
        registry.register("services", "Open tunnels", services);
        registry.register("visitors_active", "Visitors connected now", active);
        registry.register(
            "service_bytes",
            "Bytes through each open tunnel (in: from visitors)",
            service_bytes,
        );
        registry.register(
            "service_datagrams",
            "Datagrams through each open UDP tunnel (in: from visitors; dropped: not delivered)",
            service_datagrams,
        );
        registry.register("user_bytes", "Bytes through each user's tunnels since start", user_bytes);
        let tasks = Gauge::<i64>::default();
        tasks.set(alive_tasks());
        registry.register("tasks", "Tokio tasks alive in the server's runtime (for leak checks)", tasks);
        let mut text = String::new();
        encode(&mut text, &registry)?;
        Ok(text)
    }
}

/// Tasks alive in the runtime this runs on (0 outside one).
fn alive_tasks() -> i64 {
    tokio::runtime::Handle::try_current()
        .map_or(0, |handle| i64::try_from(handle.metrics().num_alive_tasks()).unwrap_or(i64::MAX))
}

/// A label value as the text format wants it: `\\`, `"` and line feeds escaped (the
/// encoder writes values as they are). Names and ids are checked at registration and
/// login already; this keeps `/metrics` well-formed whatever a peer managed to send.
fn label_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::label_value("a\"} 1\n\\"), "a\\\"} 1\\n\\\\");
    }
}
