//! Browser peers: WebRTC data channels (str0m, sans-IO) on the client's P2P socket. One
//! task drives every browser's peer connection: datagrams in, timers, and the bytes of each
//! data channel, which carries one connection to the local service. A channel named
//! [`CONTROL_LABEL`] only opens the association and carries nothing.
//!
//! Backpressure toward the browser: the local service is read only while its channel has
//! less than [`CHANNEL_WINDOW`] bytes queued here, and a queued chunk enters SCTP only when
//! SCTP has room for it; so memory stays bounded however fast the service writes.

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
const CHUNK: usize = 16 * 1024;

/// Longest a peer connection may stay without a data channel before it is dropped.
const IDLE_PEER: Duration = Duration::from_secs(60);

/// A browser's offer for the local service `local`, with the candidates to answer with.
pub(crate) struct BrowserOffer {
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
    /// Starts the engine on `endpoint`'s socket; `None` when it runs already.
    pub(crate) fn start(
        endpoint: Arc<PeerEndpoint>,
        local_timeout: Duration,
        token: CancellationToken,
    ) -> Option<Self> {
        let inbox = endpoint.take_browser_inbox()?;
        let (offers, incoming) = mpsc::unbounded_channel();
        let (locals, from_locals) = mpsc::channel(256);
        let engine = Engine { endpoint, peers: Vec::new(), locals, local_timeout, next_peer: 0 };
        tokio::spawn(token.run_until_cancelled_owned(engine.run(incoming, inbox, from_locals)));
        Some(Browsers { offers })
    }

    /// Answers a browser's SDP offer (JSON) for the local service `local`.
    pub(crate) async fn answer(
        &self,
        offer: String,
        local: String,
        candidates: Vec<SocketAddr>,
    ) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.offers
            .send(BrowserOffer { offer, local, candidates, reply })
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
}

/// One data channel and its local connection.
struct Bridge {
    to_local: mpsc::UnboundedSender<Vec<u8>>,
    /// Read from the local service, waiting for room in SCTP.
    queued: VecDeque<(Vec<u8>, OwnedSemaphorePermit)>,
    /// The local side ended: close the channel once `queued` is empty.
    ended: bool,
    /// Stops the local reader when the channel closes first.
    stop: CancellationToken,
}

struct Peer {
    id: u64,
    rtc: Rtc,
    local: String,
    channels: HashMap<ChannelId, Bridge>,
    since_channel: Instant,
}

struct Engine {
    endpoint: Arc<PeerEndpoint>,
    peers: Vec<Peer>,
    locals: mpsc::Sender<LocalEvent>,
    local_timeout: Duration,
    next_peer: u64,
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
                    for peer in &mut self.peers {
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
            rtc,
            local: offer.local.clone(),
            channels: HashMap::new(),
            since_channel: Instant::now(),
        };
        info!(peer = peer.id, local = %peer.local, "browser peer answered");
        self.peers.push(peer);
        serde_json::to_string(&answer).map_err(|e| e.to_string())
    }

    /// Gives a datagram to the peer connection it belongs to.
    fn receive(&mut self, source: SocketAddr, destination: SocketAddr, datagram: &[u8]) {
        let Ok(contents) = datagram.try_into() else { return };
        let input =
            Input::Receive(Instant::now(), Receive { proto: Protocol::Udp, source, destination, contents });
        if let Some(peer) = self.peers.iter_mut().find(|p| p.rtc.accepts(&input)) {
            if let Err(err) = peer.rtc.handle_input(input) {
                debug!(peer = peer.id, %err, "browser datagram refused");
            }
        }
    }

    /// Bytes read from a local service, or its end.
    fn local(&mut self, event: LocalEvent) {
        let (peer, channel) = match &event {
            LocalEvent::Data { peer, channel, .. } | LocalEvent::Ended { peer, channel } => (*peer, *channel),
        };
        let Some(bridge) =
            self.peers.iter_mut().find(|p| p.id == peer).and_then(|p| p.channels.get_mut(&channel))
        else {
            return;
        };
        match event {
            LocalEvent::Data { bytes, permit, .. } => bridge.queued.push_back((bytes, permit)),
            LocalEvent::Ended { .. } => bridge.ended = true,
        }
    }

    /// Moves queued bytes into SCTP, sends what every peer connection has to send, handles
    /// their events, and drops dead ones; when to wake next.
    async fn flush(&mut self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(1);
        let mut sends = Vec::new();
        let mut opened = Vec::new();
        for peer in &mut self.peers {
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
        self.peers.retain(|p| {
            let idle = p.channels.is_empty() && p.since_channel.elapsed() > IDLE_PEER;
            let alive = p.rtc.is_alive() && !idle;
            if !alive {
                info!(peer = p.id, "browser peer gone");
                // Its local connections go with it.
                p.channels.values().for_each(|bridge| bridge.stop.cancel());
            }
            alive
        });
        wake
    }

    /// Connects channel `channel` of `peer` to its local service.
    fn bridge(&mut self, peer_id: u64, channel: ChannelId, local: String) {
        let Some(peer) = self.peers.iter_mut().find(|p| p.id == peer_id) else { return };
        let (to_local, mut from_channel) = mpsc::unbounded_channel::<Vec<u8>>();
        let stop = CancellationToken::new();
        peer.channels
            .insert(channel, Bridge { to_local, queued: VecDeque::new(), ended: false, stop: stop.clone() });
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
            let writer = async move {
                while let Some(bytes) = from_channel.recv().await {
                    if write.write_all(&bytes).await.is_err() {
                        break;
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

/// Moves each channel's queued bytes into SCTP while it has room; closes channels whose
/// local side ended once their bytes are in.
fn feed_channels(peer: &mut Peer) {
    let mut closing = Vec::new();
    for (id, bridge) in &mut peer.channels {
        while let Some((bytes, _)) = bridge.queued.front() {
            let Some(mut channel) = peer.rtc.channel(*id) else { break };
            match channel.write(true, bytes) {
                Ok(true) => {
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

/// Handles one event of `peer`; a channel to connect to the local service, if one opened.
fn on_event(peer: &mut Peer, event: Event) -> Option<(u64, ChannelId, String)> {
    match event {
        Event::ChannelOpen(id, label) if label != CONTROL_LABEL => {
            peer.since_channel = Instant::now();
            return Some((peer.id, id, peer.local.clone()));
        }
        Event::ChannelData(data) => {
            if let Some(bridge) = peer.channels.get(&data.id) {
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
