//! Picking public TCP and UDP ports: the user's ranges and limits, an exact port or a
//! random one, and binding it. A port is recorded in the endpoint table before it is
//! bound, so two registrations never race for it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tracing::{info, Instrument};

use super::endpoints::{Endpoint, Member, Pool, RELEASE_WAIT};
use super::users::{whose, Rules};
use super::{nodes, ServerShared};
use crate::cluster::{ClaimKind, ClaimRecord};
use crate::config::{PortRange, TcpAllowance};
use crate::proto::{PortProtocol, RegisterError};

/// A public port, bound.
pub(crate) enum Bound {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A UDP socket.
    Udp(UdpSocket),
}

/// Runs a public port's task: `serve` until the port closes (its future owns the port's
/// socket, so the socket is closed when it ends), then gives the port back, so that a
/// re-registration can bind it.
pub(crate) fn run_port(
    shared: &Arc<ServerShared>,
    endpoint: Endpoint,
    span: tracing::Span,
    serve: impl Future<Output = ()> + Send + 'static,
) {
    let shared = shared.clone();
    let task = async move {
        serve.await;
        if let Some(user) = shared.endpoints.remove(&endpoint) {
            if let Some(claim) = claim_of(&endpoint) {
                nodes::release(&shared, claim, user);
            }
        }
        info!(?endpoint, "port closed");
    };
    tokio::spawn(task.instrument(span));
}

/// The user's ranges of `protocol`, their limit in all, and whether they are the user's own.
fn allowances_of(rules: &Rules, protocol: PortProtocol) -> (&[TcpAllowance], Option<u32>, bool) {
    match protocol {
        PortProtocol::Tcp => (&rules.tcp, rules.tcp_number, rules.own.tcp),
        PortProtocol::Udp => (&rules.udp, rules.udp_number, rules.own.udp),
    }
}

/// Picks, binds and records a public port of `protocol` for `member` as its user's rules
/// allow.
pub(crate) async fn reserve_port(
    shared: &ServerShared,
    member: &Member,
    protocol: PortProtocol,
    (asked, random): (Option<u16>, bool),
) -> Result<(u16, Bound), RegisterError> {
    let session = &member.session;
    let rules = session.account.rules();
    let (allowances, number, own) = allowances_of(&rules, protocol);
    let whose_ranges = || whose(own, &session.user);
    if allowances.is_empty() {
        return Err(match protocol {
            PortProtocol::Tcp => RegisterError::TcpDisabled { whose: whose_ranges() },
            PortProtocol::Udp => RegisterError::UdpDisabled { whose: whose_ranges() },
        });
    }
    let held = ports_of(shared, &session.user, protocol);
    if let Some(limit) = number {
        if held.len() >= limit as usize {
            return Err(RegisterError::PortLimit { limit, whose: whose(false, &session.user), protocol });
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
        return reserve_random(shared, member, protocol, &open).await;
    };
    let refusal = if open.iter().any(|r| r.contains(port)) {
        match reserve_exact(shared, member, protocol, port).await {
            Ok(bound) => return Ok((port, bound)),
            Err(refusal) => refusal,
        }
    } else if let Some(full) = allowances.iter().find(|a| a.range.contains(port)) {
        RegisterError::PortLimit { limit: full.number.unwrap_or_default(), whose: whose_ranges(), protocol }
    } else {
        let ranges: Vec<PortRange> = allowances.iter().map(|a| a.range).collect();
        RegisterError::PortNotAllowed { port, ranges: describe(&ranges), whose: whose_ranges(), protocol }
    };
    if random {
        reserve_random(shared, member, protocol, &open).await
    } else {
        Err(refusal)
    }
}

/// The ports of `protocol` that `user` holds now.
fn ports_of(shared: &ServerShared, user: &str, protocol: PortProtocol) -> Vec<u16> {
    let table = shared.endpoints.lock();
    let ports = table.pools.iter().filter(|(_, pool)| pool.user == user);
    ports.filter_map(|(e, _)| e.port_of(protocol)).collect()
}

async fn reserve_exact(
    shared: &ServerShared,
    member: &Member,
    protocol: PortProtocol,
    port: u16,
) -> Result<Bound, RegisterError> {
    // A closing session of the same user may still hold the port for a moment.
    let pending_release = {
        let table = shared.endpoints.lock();
        match table.pools.get(&Endpoint::port(protocol, port)) {
            Some(pool) if pool.closing_for(&member.session.user) => Some(pool.released.clone()),
            Some(_) => return Err(RegisterError::PortTaken { port }),
            None => None,
        }
    };
    if let Some(released) = pending_release {
        let _ = tokio::time::timeout(RELEASE_WAIT, released.cancelled()).await;
    }
    match try_bind(shared, member, protocol, port).await {
        Ok(bound) => Ok(bound),
        Err(Unbound::Taken) => Err(RegisterError::PortTaken { port }),
        Err(Unbound::Refused(refusal)) => Err(refusal),
    }
}

async fn reserve_random(
    shared: &ServerShared,
    member: &Member,
    protocol: PortProtocol,
    ranges: &[PortRange],
) -> Result<(u16, Bound), RegisterError> {
    let total: u32 = ranges.iter().map(PortRange::len).sum();
    if total == 0 {
        let (rules, user) = (member.session.account.rules(), &member.session.user);
        let (allowances, _, own) = allowances_of(&rules, protocol);
        let limit = allowances.iter().filter_map(|a| a.number).sum();
        return Err(RegisterError::PortLimit { limit, whose: whose(own, user), protocol });
    }
    let start = rand::random::<u32>() % total;
    let user = &member.session.user;
    for i in 0..total {
        let port = nth_port(ranges, (start + i) % total);
        if shared
            .cluster()
            .is_some_and(|c| c.claimed_by_other(cluster_kind(protocol), &port.to_string(), user))
        {
            continue;
        }
        match try_bind(shared, member, protocol, port).await {
            Ok(bound) => return Ok((port, bound)),
            Err(Unbound::Taken) => {}
            Err(Unbound::Refused(refusal)) => return Err(refusal),
        }
    }
    Err(RegisterError::NoFreePort { ranges: describe(ranges) })
}

/// Why a port was not bound.
enum Unbound {
    /// Taken here or by another user of the cluster: another port may do.
    Taken,
    /// Refused in a way no other port changes (the cluster store is unreachable).
    Refused(RegisterError),
}

/// The cluster-wide claim kind of ports of `protocol`.
fn cluster_kind(protocol: PortProtocol) -> ClaimKind {
    match protocol {
        PortProtocol::Tcp => ClaimKind::Tcp,
        PortProtocol::Udp => ClaimKind::Udp,
    }
}

/// The cluster-wide claim of a port endpoint (ports have no route).
fn claim_of(endpoint: &Endpoint) -> Option<(ClaimKind, String, &'static str)> {
    match endpoint {
        Endpoint::Port(port) => Some((ClaimKind::Tcp, port.to_string(), "")),
        Endpoint::UdpPort(port) => Some((ClaimKind::Udp, port.to_string(), "")),
        _ => None,
    }
}

/// Records `port` for `member` if free in the table (and, in a cluster, claims it
/// cluster-wide), then binds it; undoes the record on failure. The port's pool closes
/// when its last member leaves or the server shuts down.
async fn try_bind(
    shared: &ServerShared,
    member: &Member,
    protocol: PortProtocol,
    port: u16,
) -> Result<Bound, Unbound> {
    let endpoint = Endpoint::port(protocol, port);
    {
        let mut table = shared.endpoints.lock();
        if table.pools.contains_key(&endpoint) {
            return Err(Unbound::Taken);
        }
        table.pools.insert(endpoint.clone(), Pool::new(member.clone(), shared.shutdown.child_token()));
    }
    if shared.cluster().is_some() {
        let record = ClaimRecord { session: member.session.id, service: member.tunnel.name.clone() };
        let (user, name) = (&member.session.user, port.to_string());
        if let Err(refusal) = nodes::claim(shared, (cluster_kind(protocol), &name, ""), user, record).await {
            shared.endpoints.remove(&endpoint);
            return Err(match refusal {
                RegisterError::PortTaken { .. } => Unbound::Taken,
                refusal => Unbound::Refused(refusal),
            });
        }
        if protocol == PortProtocol::Tcp {
            nodes::take_port_over(shared, port).await;
        }
    }
    let addr = SocketAddr::new(shared.config.public_ip(), port);
    let bound = match protocol {
        PortProtocol::Tcp => super::accept::bind(addr).map(Bound::Tcp),
        PortProtocol::Udp => std::net::UdpSocket::bind(addr)
            .and_then(|socket| {
                socket.set_nonblocking(true)?;
                UdpSocket::from_std(socket)
            })
            .map(Bound::Udp),
    };
    match bound {
        Ok(bound) => Ok(bound),
        Err(_) => {
            if let (Some(user), Some(claim)) = (shared.endpoints.remove(&endpoint), claim_of(&endpoint)) {
                nodes::release(shared, claim, user);
            }
            Err(Unbound::Taken)
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
