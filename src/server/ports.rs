//! Picking public TCP ports: the user's ranges and limits, an exact port or a random one,
//! and binding it. A port is recorded in the endpoint table before it is bound, so two
//! registrations never race for it.

use tokio::net::TcpListener;

use super::endpoints::{Endpoint, Member, Pool, RELEASE_WAIT};
use super::users::whose;
use super::ServerShared;
use crate::config::PortRange;
use crate::proto::RegisterError;

/// Picks, binds and records a public TCP port for `member` as its user's rules allow.
pub(crate) async fn reserve_port(
    shared: &ServerShared,
    member: &Member,
    asked: Option<u16>,
    random: bool,
) -> Result<(u16, TcpListener), RegisterError> {
    let session = &member.session;
    let rules = session.account.rules();
    let allowances = &rules.tcp;
    let whose_tcp = || whose(rules.own.tcp, &session.user);
    if allowances.is_empty() {
        return Err(RegisterError::TcpDisabled { whose: whose_tcp() });
    }
    let held = ports_of(shared, &session.user);
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
        return reserve_random(shared, member, &open).await;
    };
    let refusal = if open.iter().any(|r| r.contains(port)) {
        match reserve_exact(shared, member, port).await {
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
        reserve_random(shared, member, &open).await
    } else {
        Err(refusal)
    }
}

/// The ports `user` holds now.
fn ports_of(shared: &ServerShared, user: &str) -> Vec<u16> {
    let table = shared.endpoints.lock();
    let ports = table.pools.iter().filter(|(_, pool)| pool.user == user);
    ports.filter_map(|(e, _)| if let Endpoint::Port(p) = e { Some(*p) } else { None }).collect()
}

async fn reserve_exact(
    shared: &ServerShared,
    member: &Member,
    port: u16,
) -> Result<TcpListener, RegisterError> {
    // A closing session of the same user may still hold the port for a moment.
    let pending_release = {
        let table = shared.endpoints.lock();
        match table.pools.get(&Endpoint::Port(port)) {
            Some(pool) if pool.closing_for(&member.session.user) => Some(pool.released.clone()),
            Some(_) => return Err(RegisterError::PortTaken { port }),
            None => None,
        }
    };
    if let Some(released) = pending_release {
        let _ = tokio::time::timeout(RELEASE_WAIT, released.cancelled()).await;
    }
    try_bind(shared, member, port).await.ok_or(RegisterError::PortTaken { port })
}

async fn reserve_random(
    shared: &ServerShared,
    member: &Member,
    ranges: &[PortRange],
) -> Result<(u16, TcpListener), RegisterError> {
    let total: u32 = ranges.iter().map(PortRange::len).sum();
    if total == 0 {
        let (rules, user) = (member.session.account.rules(), &member.session.user);
        let limit = rules.tcp.iter().filter_map(|a| a.number).sum();
        return Err(RegisterError::PortLimit { limit, whose: whose(rules.own.tcp, user) });
    }
    let start = rand::random::<u32>() % total;
    for i in 0..total {
        let port = nth_port(ranges, (start + i) % total);
        if let Some(listener) = try_bind(shared, member, port).await {
            return Ok((port, listener));
        }
    }
    Err(RegisterError::NoFreePort { ranges: describe(ranges) })
}

/// Records `port` for `member` if free in the table, then binds it; undoes the record on
/// failure. The port's pool closes when its last member leaves or the server shuts down.
async fn try_bind(shared: &ServerShared, member: &Member, port: u16) -> Option<TcpListener> {
    let endpoint = Endpoint::Port(port);
    {
        let mut table = shared.endpoints.lock();
        if table.pools.contains_key(&endpoint) {
            return None;
        }
        table.pools.insert(endpoint.clone(), Pool::new(member.clone(), shared.shutdown.child_token()));
    }
    match super::accept::bind(std::net::SocketAddr::new(shared.config.public_ip(), port)) {
        Ok(listener) => Some(listener),
        Err(_) => {
            shared.endpoints.remove(&endpoint);
            None
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
