//! UDP tunnels: a public UDP port whose visitors are flows, one per visitor address.
//!
//! The port's task reads every datagram and hands it to its flow; a datagram from a new
//! address starts a flow, which is admitted like a TCP visitor (allow-ip/deny-ip, the
//! program's hook, the tunnel's and the user's limits: a flow counts as one visitor while
//! it lives), then gets a data link of its member's session (a pooled data connection, or
//! a new stream over QUIC) and the open message. On a data connection the datagrams travel
//! framed both ways (`proto::datagram`); over QUIC they travel as QUIC datagrams tagged
//! with the flow's number, unreliable end to end, and only the datagrams that came before
//! the client answered ride on the stream. A flow ends after `udp-timeout` without a
//! datagram either way, when its link ends, or with its tunnel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::dispatch::{admit_first, NotServed};
use super::endpoints::{Endpoint, Member};
use super::ports::{run_port, Bound};
use super::session::SessionShared;
use super::tcp::open_port;
use super::tunnel::Tunnel;
use super::visit::take_data;
use super::ServerShared;
use crate::proto::{
    encode_datagram, encode_frame, read_datagram, untag_datagram, OpenStream, PortProtocol, RegisterError,
    StreamStatus,
};
use crate::relay::flow::send_datagram;
use crate::relay::throttle::Bucket;
use crate::transport::Stream;

/// Most flows one UDP port keeps at once. Past it, datagrams from new addresses are
/// dropped (and counted) until a flow ends; the flows already there go on unharmed.
pub(crate) const MAX_FLOWS_PER_PORT: usize = 4096;

/// Datagrams a flow holds while its link opens; more are dropped (and counted).
const FLOW_QUEUE: usize = 64;

/// How long datagrams from a refused visitor are dropped without asking again, so that a
/// stream of them costs one admission, not one per datagram.
const REFUSED_FLOW_TTL: Duration = Duration::from_secs(5);

/// Room for any UDP datagram: one is never truncated.
const RECV_BUFFER: usize = 65_536;

/// Opens a UDP tunnel: it joins a port of clients sharing a tag with it, or gets a port
/// of its own. Returns the port.
pub(crate) async fn open_udp(
    shared: &Arc<ServerShared>,
    member: Member,
    asked: Option<u16>,
    random: bool,
) -> Result<u16, RegisterError> {
    let (port, bound) = open_port(shared, &member, PortProtocol::Udp, (asked, random)).await?;
    let Some((Bound::Udp(socket), closed)) = bound else { return Ok(port) };
    let serving = shared.clone();
    let serve = async move {
        let flows = TaskTracker::new();
        serve_port(&serving, port, Arc::new(socket), (&closed, &flows)).await;
        // Flows hold the socket: the port is given back once the last one has ended.
        flows.close();
        flows.wait().await;
    };
    run_port(shared, Endpoint::UdpPort(port), tracing::info_span!("udp port", port), serve);
    Ok(port)
}

/// A flow as the port's task sees it: where its datagrams go, and its tunnel once admitted.
struct FlowEntry {
    queue: mpsc::Sender<Bytes>,
    tunnel: Arc<OnceLock<Arc<Tunnel>>>,
}

/// Reads the port's datagrams and hands each to its visitor's flow until the port closes.
async fn serve_port(
    shared: &Arc<ServerShared>,
    port: u16,
    socket: Arc<UdpSocket>,
    (closed, flows_running): (&CancellationToken, &TaskTracker),
) {
    let mut flows: HashMap<SocketAddr, FlowEntry> = HashMap::new();
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut last_warning: Option<Instant> = None;
    loop {
        let received = tokio::select! {
            _ = closed.cancelled() => return,
            received = socket.recv_from(&mut buf) => received,
        };
        let (len, visitor) = match received {
            Ok(received) => received,
            Err(err) => {
                debug!(%err, "udp receive failed");
                continue;
            }
        };
        let mut datagram = Bytes::copy_from_slice(&buf[..len]);
        if let Some(flow) = flows.get(&visitor) {
            match flow.queue.try_send(datagram) {
                Ok(()) => continue,
                Err(TrySendError::Full(_)) => {
                    dropped(shared, flow.tunnel.get().map(|t| &**t));
                    continue;
                }
                // The flow ended: this datagram starts a new one.
                Err(TrySendError::Closed(again)) => {
                    flows.remove(&visitor);
                    datagram = again;
                }
            }
        }
        if flows.len() >= MAX_FLOWS_PER_PORT {
            flows.retain(|_, flow| !flow.queue.is_closed());
        }
        if flows.len() >= MAX_FLOWS_PER_PORT {
            dropped(shared, None);
            if last_warning.map_or(true, |at| at.elapsed() > Duration::from_secs(5)) {
                last_warning = Some(Instant::now());
                warn!(%visitor, limit = MAX_FLOWS_PER_PORT, "udp port has its most flows; dropping datagrams from new visitors");
            }
            continue;
        }
        let (queue, waiting) = mpsc::channel(FLOW_QUEUE);
        let _ = queue.try_send(datagram);
        let tunnel = Arc::new(OnceLock::new());
        flows.insert(visitor, FlowEntry { queue, tunnel: tunnel.clone() });
        let flow =
            serve_flow(shared.clone(), (port, closed.clone()), socket.clone(), visitor, (waiting, tunnel));
        flows_running.spawn(flow.instrument(tracing::debug_span!("flow", %visitor)));
    }
}

/// Counts a dropped datagram, for its tunnel when known.
fn dropped(shared: &ServerShared, tunnel: Option<&Tunnel>) {
    shared.metrics.udp_dropped();
    if let Some(tunnel) = tunnel {
        tunnel.datagrams.drop_one();
    }
}

/// Admits a new flow and relays it until it ends.
async fn serve_flow(
    shared: Arc<ServerShared>,
    (port, closed): (u16, CancellationToken),
    socket: Arc<UdpSocket>,
    visitor: SocketAddr,
    (mut queue, admitted_to): (mpsc::Receiver<Bytes>, Arc<OnceLock<Arc<Tunnel>>>),
) {
    let endpoint = Endpoint::UdpPort(port);
    let mut rotation = shared.endpoints.rotation(&endpoint, |m| !m.tunnel.token.is_cancelled()).into_iter();
    let next = || rotation.next().ok_or(NotServed::Unrouted(()));
    let (member, visit) = match admit_first(&shared, next, true, visitor) {
        Ok(admitted) => admitted,
        Err(why) => {
            debug!(?why, "udp visitor not served; dropping its datagrams for a while");
            let refused = async {
                while queue.recv().await.is_some() {
                    dropped(&shared, None);
                }
            };
            // The port closing ends the wait: it is given back once its flows are gone.
            let _ = closed.run_until_cancelled(tokio::time::timeout(REFUSED_FLOW_TTL, refused)).await;
            return;
        }
    };
    shared.metrics.visitor();
    let _ = admitted_to.set(member.tunnel.clone());
    let session = member.session.clone();
    session.tasks.track_future(relay_flow(&shared, &member, socket, visitor, &mut queue)).await;
    drop(visit);
}

/// Relays one admitted flow over a data link of its member's session.
async fn relay_flow(
    shared: &ServerShared,
    member: &Member,
    socket: Arc<UdpSocket>,
    visitor: SocketAddr,
    queue: &mut mpsc::Receiver<Bytes>,
) {
    let Member { session, tunnel, .. } = member;
    let Some(mut link) = take_data(session, shared.config.data_wait_timeout).await else {
        return warn!("no data connection from the client in time; dropping the udp flow");
    };
    let way_back = Arc::new(WayBack::new(socket, visitor, tunnel.clone(), session));
    // Over QUIC the flow's datagrams are tagged with its number; the way back is known
    // before the client can answer, so no reply is lost.
    let quic = session.pool.quic().cloned();
    let flow = quic.as_ref().map(|_| session.flows.add(way_back.clone()));
    let _forget = flow.map(|number| FlowGuard { session, number });
    let open = OpenStream { service: tunnel.service, visitor, seal: None, flow };
    let mut first = Vec::with_capacity(256);
    if let Err(err) = encode_frame(&open, &mut first) {
        return debug!(%err, "open message not encoded");
    }
    // The datagrams that came while the link was taken go with the open message.
    while let Ok(datagram) = queue.try_recv() {
        if way_back.count_up(&datagram) {
            let _ = encode_datagram(&datagram, &mut first);
        }
    }
    if let Err(err) = link.write_all(&first).await {
        return debug!(%err, "data link failed before use");
    }
    drop(first);
    let ready = tokio::time::timeout(shared.config.data_wait_timeout, link.read_u8()).await;
    if !matches!(ready, Ok(Ok(status)) if status == StreamStatus::Ready as u8) {
        return debug!("the client did not open the udp flow");
    }
    let timeout = shared.config.udp_timeout;
    let mut read = BytesMut::new();
    loop {
        let idle_until = way_back.last_active() + timeout;
        tokio::select! {
            _ = tunnel.token.cancelled() => return debug!("tunnel closed; udp flow ends"),
            _ = tokio::time::sleep_until(idle_until) => {
                if way_back.last_active() + timeout <= Instant::now() {
                    return debug!(?timeout, "udp flow idle; it ends");
                }
            }
            datagram = queue.recv() => {
                let Some(datagram) = datagram else { return };
                if way_back.count_up(&datagram) && !send_up(&mut link, quic.as_ref().zip(flow), &datagram, tunnel, shared).await {
                    return debug!("data link failed; udp flow ends");
                }
            }
            datagram = read_datagram(&mut link, &mut read) => match datagram {
                Ok(Some(datagram)) => way_back.deliver(&datagram),
                Ok(None) => return debug!("the client ended the udp flow"),
                Err(err) => return debug!(%err, "data link failed; udp flow ends"),
            },
        }
    }
}

/// Sends one visitor datagram to the client (see [`send_datagram`]); one too large for
/// the QUIC path is dropped and counted. False when the link failed.
async fn send_up(
    link: &mut Stream,
    flow: Option<(&quinn::Connection, u32)>,
    datagram: &[u8],
    tunnel: &Tunnel,
    shared: &ServerShared,
) -> bool {
    match send_datagram(link, flow, datagram).await {
        Ok(true) => true,
        Ok(false) => {
            debug!(len = datagram.len(), "datagram too large for the QUIC path; dropped");
            dropped(shared, Some(tunnel));
            true
        }
        Err(_) => false,
    }
}

/// Where a flow's replies go: its visitor, through the public port; and its counters.
pub(crate) struct WayBack {
    socket: Arc<UdpSocket>,
    visitor: SocketAddr,
    tunnel: Arc<Tunnel>,
    account: Arc<super::users::Account>,
    started: Instant,
    /// Milliseconds after `started` of the last datagram either way.
    last: AtomicU64,
}

impl WayBack {
    fn new(
        socket: Arc<UdpSocket>,
        visitor: SocketAddr,
        tunnel: Arc<Tunnel>,
        session: &SessionShared,
    ) -> Self {
        let account = session.account.clone();
        WayBack { socket, visitor, tunnel, account, started: Instant::now(), last: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    fn last_active(&self) -> Instant {
        self.started + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    /// Whether the user's speed limit lets `len` more bytes through `bucket` now. UDP is
    /// policed, not queued: a datagram over the rate is dropped and counted, as a router
    /// would, so a flood cannot build a backlog.
    fn within_speed(&self, bucket: &Bucket, len: usize) -> bool {
        if !self.account.is_throttled() {
            return true;
        }
        if bucket.delay().is_some() {
            self.tunnel.datagrams.drop_one();
            return false;
        }
        bucket.charge(len);
        true
    }

    /// Counts a datagram from the visitor; false (dropped and counted) when it is over the
    /// user's speed limit.
    fn count_up(&self, datagram: &[u8]) -> bool {
        self.touch();
        if !self.within_speed(&self.account.upload, datagram.len()) {
            return false;
        }
        let len = datagram.len() as u64;
        self.tunnel.datagrams.up.fetch_add(1, Ordering::Relaxed);
        self.tunnel.traffic.up.fetch_add(len, Ordering::Relaxed);
        self.account.traffic.up.fetch_add(len, Ordering::Relaxed);
        true
    }

    /// Sends a reply to the visitor and counts it; one the socket cannot take now is
    /// dropped and counted, as the network would.
    pub(crate) fn deliver(&self, datagram: &[u8]) {
        self.touch();
        if !self.within_speed(&self.account.download, datagram.len()) {
            return;
        }
        match self.socket.try_send_to(datagram, self.visitor) {
            Ok(_) => {
                let len = datagram.len() as u64;
                self.tunnel.datagrams.down.fetch_add(1, Ordering::Relaxed);
                self.tunnel.traffic.down.fetch_add(len, Ordering::Relaxed);
                self.account.traffic.down.fetch_add(len, Ordering::Relaxed);
            }
            Err(err) => {
                debug!(%err, "reply not sent to the udp visitor");
                self.tunnel.datagrams.drop_one();
            }
        }
    }
}

/// The UDP flows of a session over QUIC, by number, for the datagrams the client sends.
#[derive(Default)]
pub(crate) struct Flows {
    next: AtomicU32,
    ways: Mutex<HashMap<u32, Arc<WayBack>>>,
}

impl Flows {
    fn ways(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<WayBack>>> {
        self.ways.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers a new flow and records its way back.
    fn add(&self, way_back: Arc<WayBack>) -> u32 {
        let mut ways = self.ways();
        loop {
            let number = self.next.fetch_add(1, Ordering::Relaxed);
            if let std::collections::hash_map::Entry::Vacant(slot) = ways.entry(number) {
                slot.insert(way_back);
                return number;
            }
        }
    }

    fn get(&self, number: u32) -> Option<Arc<WayBack>> {
        self.ways().get(&number).cloned()
    }

    fn remove(&self, number: u32) {
        self.ways().remove(&number);
    }
}

/// Forgets a flow's number when the flow ends.
struct FlowGuard<'a> {
    session: &'a SessionShared,
    number: u32,
}

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.session.flows.remove(self.number);
    }
}

/// Hands each QUIC datagram the client sends to its flow's visitor, until the connection
/// or the session ends. Datagrams of unknown flows (ended ones) are dropped.
pub(crate) async fn deliver_datagrams(session: Arc<SessionShared>, connection: quinn::Connection) {
    loop {
        let datagram = tokio::select! {
            _ = session.closing.cancelled() => return,
            datagram = connection.read_datagram() => match datagram {
                Ok(datagram) => datagram,
                Err(_) => return,
            },
        };
        let Some((flow, payload)) = untag_datagram(datagram) else { continue };
        match session.flows.get(flow) {
            Some(way_back) => way_back.deliver(&payload),
            None => debug!(flow, "datagram of an ended udp flow; dropped"),
        }
    }
}
