//! Browser peers: WebRTC data channels (str0m, sans-IO) on the client's P2P socket. One
//! task drives every browser's peer connection: datagrams in, timers, and the bytes of each
//! data channel, which carries one connection to the local service. A channel named
//! [`CONTROL_LABEL`] only opens the association and carries nothing.
//!
//! Flow control, both ways, so memory stays bounded however fast either end writes: each
//! side of a channel may send [`CHANNEL_CREDIT`] bytes (binary messages) before the other
//! grants more with a text message holding a decimal count of bytes, which it does as its
//! reader consumes them (the local service here, the page's stream in `p2p.js`). A browser
//! that sends past its credit loses the channel. The local service is read only while its
//! channel has less than [`CHANNEL_WINDOW`] bytes queued here, and a queued chunk enters
//! SCTP only when SCTP has room and the browser has granted credit for it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer};
use str0m::channel::ChannelId;
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, Input, Output, Rtc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::endpoint::PeerEndpoint;
use super::socket::Datagrams;

/// The label of the channel a page opens first, to set the association up.
pub(crate) const CONTROL_LABEL: &str = "ferry-control";

/// Bytes of one channel read from the local service and not yet in SCTP, at most.
const CHANNEL_WINDOW: usize = 1 << 20;

/// One read from the local service.
const CHUNK: usize = 64 * 1024;

/// Bytes either side of a channel may send before the other grants more.
const CHANNEL_CREDIT: usize = 1 << 20;

/// Consumed bytes are granted back once at least this many add up.
const GRANT_STEP: usize = CHANNEL_CREDIT / 4;

/// Most credit a browser may hold at once; more is a broken peer.
const MAX_CREDIT: usize = 64 << 20;

/// Data channels one browser peer may have open at once (each is a local connection).
const MAX_CHANNELS: usize = 64;

/// Longest a peer connection may stay without a data channel before it is dropped.
const IDLE_PEER: Duration = Duration::from_secs(60);

/// A browser's offer for the local service `local`, with the candidates to answer with.
pub(crate) struct BrowserOffer {
    /// The server's number for the offer, given back to `gone` when the peer leaves.
    pub(crate) attempt: u64,
    pub(crate) offer: String,
    pub(crate) local: String,
    pub(crate) candidates: Vec<SocketAddr>,
    pub(crate) reply: oneshot::Sender<Result<String, String>>,
}

/// The handle of the engine.
#[derive(Clone)]
pub(crate) struct Browsers {
    offers: mpsc::UnboundedSender<BrowserOffer>,
}

impl Browsers {
    /// Starts the engine on `endpoint`'s socket; `None` when it runs already. `gone` hears
    /// the attempt number of each browser peer that leaves.
    pub(crate) fn start(
        endpoint: Arc<PeerEndpoint>,
        local_timeout: Duration,
        token: CancellationToken,
        gone: impl Fn(u64) + Send + 'static,
    ) -> Option<Self> {
        let inbox = endpoint.take_browser_inbox()?;
        let (offers, incoming) = mpsc::unbounded_channel();
        let (locals, from_locals) = mpsc::channel(256);
        let engine = Engine {
            endpoint,
            peers: HashMap::new(),
            by_source: HashMap::new(),
            locals,
            local_timeout,
            next_peer: 0,
            gone: Box::new(gone),
        };
        tokio::spawn(token.run_until_cancelled_owned(engine.run(incoming, inbox, from_locals)));
        Some(Browsers { offers })
    }

    /// Answers a browser's SDP offer (JSON) for the local service `local`.
    pub(crate) async fn answer(
        &self,
        attempt: u64,
        offer: String,
        local: String,
        candidates: Vec<SocketAddr>,
    ) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.offers
            .send(BrowserOffer { attempt, offer, local, candidates, reply })
            .map_err(|_| "the WebRTC engine stopped")?;
        answer.await.map_err(|_| "the WebRTC engine stopped".to_owned())?
    }
}

/// What the local side of a channel did.
enum LocalEvent {
    /// Bytes read, holding their share of the channel's window.
    Data { peer: u64, channel: ChannelId, bytes: Vec<u8>, permit: OwnedSemaphorePermit },
    /// The local service ended its side (or could not be reached).
    Ended { peer: u64, channel: ChannelId },
    /// This many bytes from the browser reached the local service: grant them back.
    Consumed { peer: u64, channel: ChannelId, bytes: usize },
}

/// One data channel and its local connection.
struct Bridge {
    to_local: mpsc::UnboundedSender<Vec<u8>>,
    /// Read from the local service, waiting for room in SCTP.
    queued: VecDeque<(Vec<u8>, OwnedSemaphorePermit)>,
    /// The local side ended: close the channel once `queued` is empty.
    ended: bool,
    /// Bytes the browser lets this side send before it grants more.
    credit_out: usize,
    /// Bytes the browser may still send before this side grants more.
    credit_in: usize,
    /// Consumed bytes not yet granted back (a grant waits for room in SCTP).
    grant: usize,
    /// Stops the local reader when the channel closes first.
    stop: CancellationToken,
}

struct Peer {
    id: u64,
    attempt: u64,
    rtc: Rtc,
    local: String,
    channels: HashMap<ChannelId, Bridge>,
    since_channel: Instant,
}

struct Engine {
    endpoint: Arc<PeerEndpoint>,
    peers: HashMap<u64, Peer>,
    /// Which peer each remote address last spoke for, so a datagram finds its peer at once.
    by_source: HashMap<SocketAddr, u64>,
    locals: mpsc::Sender<LocalEvent>,
    local_timeout: Duration,
    next_peer: u64,
    gone: Box<dyn Fn(u64) + Send>,
}

impl Engine {
    async fn run(
        mut self,
        mut offers: mpsc::UnboundedReceiver<BrowserOffer>,
        mut datagrams: Datagrams,
        mut from_locals: mpsc::Receiver<LocalEvent>,
    ) {
        let local_addr = match self.endpoint.local_addr() {
            Ok(addr) => addr,
            Err(err) => return warn!(%err, "WebRTC engine without a socket"),
        };
        loop {
            let wake = self.flush().await;
            tokio::select! {
                offer = offers.recv() => match offer {
                    Some(offer) => self.accept(offer),
                    None => return,
                },
                Some(datagram) = datagrams.recv() => {
                    // The socket may be bound to every address: the packet's own is the one.
                    let ip = datagram.to.unwrap_or(local_addr.ip()).to_canonical();
                    self.receive(datagram.from, SocketAddr::new(ip, local_addr.port()), &datagram.bytes);
                }
                Some(event) = from_locals.recv() => self.local(event),
                _ = tokio::time::sleep_until(wake.into()) => {
                    let now = Instant::now();
                    for peer in self.peers.values_mut() {
                        let _ = peer.rtc.handle_input(Input::Timeout(now));
                    }
                }
            }
        }
    }

    /// Answers an offer and adds its peer connection.
    fn accept(&mut self, offer: BrowserOffer) {
        let answer = self.answer(&offer);
        let _ = offer.reply.send(answer.map_err(|e| format!("cannot answer the offer: {e}")));
    }

    fn answer(&mut self, offer: &BrowserOffer) -> Result<String, String> {
        let sdp: SdpOffer = serde_json::from_str(&offer.offer).map_err(|e| e.to_string())?;
        let mut rtc = Rtc::new(Instant::now());
        for candidate in &offer.candidates {
            let candidate = Candidate::host(*candidate, "udp").map_err(|e| e.to_string())?;
            let _ = rtc.add_local_candidate(candidate);
        }
        let answer: SdpAnswer = rtc.sdp_api().accept_offer(sdp).map_err(|e| e.to_string())?;
        self.next_peer += 1;
        let peer = Peer {
            id: self.next_peer,
            attempt: offer.attempt,
            rtc,
            local: offer.local.clone(),
            channels: HashMap::new(),
            since_channel: Instant::now(),
        };
        info!(peer = peer.id, local = %peer.local, "browser peer answered");
        self.peers.insert(peer.id, peer);
        serde_json::to_string(&answer).map_err(|e| e.to_string())
    }

    /// Gives a datagram to the peer connection it belongs to.
    fn receive(&mut self, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        let Ok(contents) = datagram.try_into() else { return };
        let input =
            Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination, contents });
        let known = self.by_source.get(&source).and_then(|id| self.peers.get(id));
        let id = match known.filter(|peer| peer.rtc.accepts(&input)) {
            Some(peer) => peer.id,
            None => match self.peers.values().find(|peer| peer.rtc.accepts(&input)) {
                Some(peer) => {
                    self.by_source.insert(source, peer.id);
                    peer.id
                }
                None => return,
            },
        };
        if let Some(peer) = self.peers.get_mut(&id) {
            if let Err(err) = peer.rtc.handle_input(input) {
                debug!(peer = peer.id, %err, "browser datagram refused");
            }
        }
    }

    /// Bytes read from a local service, or its end.
    fn local(&mut self, event: LocalEvent) {
        let (peer, channel) = match &event {
            LocalEvent::Data { peer, channel, .. }
            | LocalEvent::Ended { peer, channel }
            | LocalEvent::Consumed { peer, channel, .. } => (*peer, *channel),
        };
        let Some(bridge) = self.peers.get_mut(&peer).and_then(|p| p.channels.get_mut(&channel)) else {
            return;
        };
        match event {
            LocalEvent::Data { bytes, permit, .. } => bridge.queued.push_back((bytes, permit)),
            LocalEvent::Ended { .. } => bridge.ended = true,
            LocalEvent::Consumed { bytes, .. } => {
                bridge.credit_in += bytes;
                bridge.grant += bytes;
            }
        }
    }

    /// Moves queued bytes into SCTP, sends what every peer connection has to send, handles
    /// their events, and drops dead ones; when to wake next.
    async fn flush(&mut self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(1);
        let mut sends = Vec::new();
        let mut opened = Vec::new();
        for peer in self.peers.values_mut() {
            feed_channels(peer);
            loop {
                match peer.rtc.poll_output() {
                    Ok(Output::Transmit(transmit)) => {
                        sends.push((transmit.destination, transmit.contents.to_vec()))
                    }
                    Ok(Output::Timeout(at)) => {
                        wake = wake.min(at);
                        break;
                    }
                    Ok(Output::Event(event)) => {
                        if let Some(open) = on_event(peer, event) {
                            opened.push(open);
                        }
                    }
                    Err(err) => {
                        debug!(peer = peer.id, %err, "browser peer failed");
                        peer.rtc.disconnect();
                        break;
                    }
                }
            }
        }
        for (destination, contents) in sends {
            let _ = self.endpoint.send_to(destination, &contents).await;
        }
        for (peer, channel, local) in opened {
            self.bridge(peer, channel, local);
        }
        let before = self.peers.len();
        self.peers.retain(|_, p| {
            let idle = p.channels.is_empty() && p.since_channel.elapsed() > IDLE_PEER;
            let alive = p.rtc.is_alive() && !idle;
            if !alive {
                info!(peer = p.id, "browser peer gone");
                // Its local connections go with it.
                p.channels.values().for_each(|bridge| bridge.stop.cancel());
                (self.gone)(p.attempt);
            }
            alive
        });
        if self.peers.len() < before {
            let peers = &self.peers;
            self.by_source.retain(|_, id| peers.contains_key(id));
        }
        wake
    }

    /// Connects channel `channel` of `peer` to its local service.
    fn bridge(&mut self, peer_id: u64, channel: ChannelId, local: String) {
        let Some(peer) = self.peers.get_mut(&peer_id) else { return };
        if peer.channels.len() >= MAX_CHANNELS {
            debug!(peer = peer_id, "browser peer at its channel limit; channel closed");
            peer.rtc.direct_api().close_data_channel(channel);
            return;
        }
        // Unbounded, but the browser's credit bounds what it holds.
        let (to_local, mut from_channel) = mpsc::unbounded_channel::<Vec<u8>>();
        let stop = CancellationToken::new();
        let bridge = Bridge {
            to_local,
            queued: VecDeque::new(),
            ended: false,
            credit_out: CHANNEL_CREDIT,
            credit_in: CHANNEL_CREDIT,
            grant: 0,
            stop: stop.clone(),
        };
        peer.channels.insert(channel, bridge);
        let (locals, timeout) = (self.locals.clone(), self.local_timeout);
        let window = Arc::new(Semaphore::new(CHANNEL_WINDOW));
        tokio::spawn(async move {
            let ended = LocalEvent::Ended { peer: peer_id, channel };
            let stream = match tokio::time::timeout(timeout, TcpStream::connect(&local)).await {
                Ok(Ok(stream)) => stream,
                _ => {
                    warn!(%local, "local service unavailable for a browser's channel");
                    let _ = locals.send(ended).await;
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let (mut read, mut write) = stream.into_split();
            let consumed = locals.clone();
            let writer = async move {
                let mut written = 0;
                while let Some(bytes) = from_channel.recv().await {
                    if write.write_all(&bytes).await.is_err() {
                        break;
                    }
                    written += bytes.len();
                    if written >= GRANT_STEP {
                        let event = LocalEvent::Consumed { peer: peer_id, channel, bytes: written };
                        if consumed.send(event).await.is_err() {
                            break;
                        }
                        written = 0;
                    }
                }
                let _ = write.shutdown().await;
            };
            tokio::spawn(stop.clone().run_until_cancelled_owned(writer));
            let reader = async {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let Ok(permit) = window.clone().acquire_many_owned(CHUNK as u32).await else { break };
                    match read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let bytes = buf[..n].to_vec();
                            let event = LocalEvent::Data { peer: peer_id, channel, bytes, permit };
                            if locals.send(event).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            };
            stop.run_until_cancelled(reader).await;
            let _ = locals.send(ended).await;
        });
    }
}

/// Sends each channel's grant, then moves its queued bytes into SCTP while SCTP has room
/// and the browser has granted credit; closes channels whose local side ended once their
/// bytes are in.
fn feed_channels(peer: &mut Peer) {
    let mut closing = Vec::new();
    for (id, bridge) in &mut peer.channels {
        if bridge.grant > 0 {
            let Some(mut channel) = peer.rtc.channel(*id) else { continue };
            if let Ok(true) = channel.write(false, bridge.grant.to_string().as_bytes()) {
                bridge.grant = 0;
            }
        }
        while let Some((bytes, _)) = bridge.queued.front() {
            if bytes.len() > bridge.credit_out {
                break;
            }
            let Some(mut channel) = peer.rtc.channel(*id) else { break };
            match channel.write(true, bytes) {
                Ok(true) => {
                    bridge.credit_out -= bytes.len();
                    bridge.queued.pop_front();
                }
                Ok(false) => break,
                Err(err) => {
                    debug!(%err, "channel write failed");
                    bridge.queued.clear();
                    bridge.ended = true;
                }
            }
        }
        if bridge.ended && bridge.queued.is_empty() {
            closing.push(*id);
        }
    }
    for id in closing {
        if let Some(bridge) = peer.channels.remove(&id) {
            bridge.stop.cancel();
        }
        peer.rtc.direct_api().close_data_channel(id);
    }
}

/// A grant's count of bytes: ASCII digits, at most [`MAX_CREDIT`].
fn granted(text: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(text).ok()?;
    if text.is_empty() || text.len() > 9 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Closes a channel whose browser broke the flow control, and its local connection.
fn overran(peer: &mut Peer, id: ChannelId, how: &str) {
    debug!(peer = peer.id, how, "browser broke a channel's flow control; channel closed");
    if let Some(bridge) = peer.channels.remove(&id) {
        bridge.stop.cancel();
    }
    peer.rtc.direct_api().close_data_channel(id);
}

/// Handles one event of `peer`; a channel to connect to the local service, if one opened.
fn on_event(peer: &mut Peer, event: Event) -> Option<(u64, ChannelId, String)> {
    match event {
        Event::ChannelOpen(id, label) if label != CONTROL_LABEL => {
            peer.since_channel = Instant::now();
            return Some((peer.id, id, peer.local.clone()));
        }
        Event::ChannelData(data) => {
            let bridge = peer.channels.get_mut(&data.id)?;
            if !data.binary {
                match granted(&data.data).and_then(|more| more.checked_add(bridge.credit_out)) {
                    Some(credit) if credit <= MAX_CREDIT => bridge.credit_out = credit,
                    _ => overran(peer, data.id, "sent a broken grant"),
                }
            } else if data.data.len() > bridge.credit_in {
                overran(peer, data.id, "sent past its credit");
            } else {
                bridge.credit_in -= data.data.len();
                let _ = bridge.to_local.send(data.data);
            }
        }
        Event::ChannelClose(id) => {
            if let Some(bridge) = peer.channels.remove(&id) {
                // The browser closed: the local connection ends too.
                bridge.stop.cancel();
            }
            peer.since_channel = Instant::now();
        }
        _ => {}
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_plain_decimal_counts_within_bounds() {
        assert_eq!(granted(b"262144"), Some(262_144));
        assert_eq!(granted(b"999999999"), Some(999_999_999));
        for broken in [&b""[..], b"-1", b"1e6", b" 5", b"12345678901", b"\xff"] {
            assert_eq!(granted(broken), None, "{broken:?}");
        }
    }
}
