//! The UDP socket of direct connections: QUIC runs on it, and STUN shares it, so the
//! address the STUN server reports is the one peers must punch to. STUN messages are told
//! from QUIC packets by their first bits and magic cookie and never reach QUIC.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::proto::{MAGIC_COOKIE, MAX_STUN_MESSAGE, STUN_HEADER};

/// STUN messages waiting for whoever asked; more are dropped.
const STUN_QUEUE: usize = 64;

/// Whether `packet` is a STUN message rather than QUIC: the first two bits clear (QUIC
/// sets the second; greasing it is off on this socket) and the magic cookie in place.
pub(crate) fn is_stun(packet: &[u8]) -> bool {
    packet.len() >= STUN_HEADER && packet[0] & 0xC0 == 0 && packet[4..8] == MAGIC_COOKIE.to_be_bytes()
}

/// Datagrams that arrived on the socket, with their sender: STUN answers, or what
/// WebRTC peers sent.
pub(crate) type StunInbox = mpsc::Receiver<(SocketAddr, Vec<u8>)>;

/// Datagrams WebRTC peers send (DTLS and ICE's STUN) waiting for the engine; more are dropped.
const WEBRTC_QUEUE: usize = 1024;

/// A datagram for the WebRTC engine: who sent it, the local address it arrived at (when
/// the socket tells), and its bytes.
pub(crate) struct Datagram {
    pub(crate) from: SocketAddr,
    pub(crate) to: Option<std::net::IpAddr>,
    pub(crate) bytes: Vec<u8>,
}

/// Datagrams for the WebRTC engine.
pub(crate) type Datagrams = mpsc::Receiver<Datagram>;

/// What a datagram on the shared socket is (RFC 7983's first-byte ranges, and STUN's type).
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// A STUN Binding success: an answer to this side's own request.
    StunAnswer,
    /// Another STUN message (a browser's ICE checks) or DTLS: WebRTC's.
    WebRtc,
    /// QUIC (the fixed bit is set).
    Quic,
}

fn kind_of(packet: &[u8], ours: impl Fn(&[u8]) -> bool) -> Kind {
    if is_stun(packet) {
        // A Binding success to a request of this side's STUN client (WebRTC's ICE
        // answers checks of its own with Binding successes too).
        return if packet[..2] == [0x01, 0x01] && ours(&packet[8..20]) {
            Kind::StunAnswer
        } else {
            Kind::WebRtc
        };
    }
    match packet.first() {
        Some(20..=63) => Kind::WebRtc,
        _ => Kind::Quic,
    }
}

/// A UDP socket shared by QUIC and STUN.
pub(crate) struct DemuxSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    stun: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    webrtc: mpsc::Sender<Datagram>,
    /// Transaction ids of this side's STUN requests waiting for answers.
    asked: std::sync::Mutex<Vec<[u8; 12]>>,
}

impl fmt::Debug for DemuxSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DemuxSocket").field("local", &self.inner.local_addr().ok()).finish()
    }
}

impl DemuxSocket {
    /// Wraps `socket`; STUN answers that arrive on it come out of the first receiver,
    /// WebRTC's datagrams out of the second.
    pub(crate) fn new(socket: std::net::UdpSocket) -> io::Result<(Arc<Self>, StunInbox, Datagrams)> {
        let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
        let inner = runtime.wrap_udp_socket(socket)?;
        let (stun, answers) = mpsc::channel(STUN_QUEUE);
        let (webrtc, browsers) = mpsc::channel(WEBRTC_QUEUE);
        let asked = std::sync::Mutex::default();
        Ok((Arc::new(DemuxSocket { inner, stun, webrtc, asked }), answers, browsers))
    }

    /// Expects (`true`) or stops expecting the answer to STUN transaction `id`.
    pub(crate) fn expect_answer(&self, id: [u8; 12], expected: bool) {
        let mut asked = self.asked.lock().unwrap_or_else(|e| e.into_inner());
        asked.retain(|a| *a != id);
        if expected {
            asked.push(id);
        }
    }

    fn asked(&self, id: &[u8]) -> bool {
        self.asked.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|a| a[..] == *id)
    }

    /// Sends one datagram beside QUIC (a STUN request, a punch), waiting while the
    /// socket is not writable.
    pub(crate) async fn send_to(&self, destination: SocketAddr, contents: &[u8]) -> io::Result<()> {
        let transmit = Transmit { destination, ecn: None, contents, segment_size: None, src_ip: None };
        let mut writable = self.inner.clone().create_io_poller();
        loop {
            match self.inner.try_send(&transmit) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    std::future::poll_fn(|cx| writable.as_mut().poll_writable(cx)).await?;
                }
                sent => return sent,
            }
        }
    }
}

impl AsyncUdpSocket for DemuxSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let received = ready!(self.inner.poll_recv(cx, bufs, meta))?;
            let mut kept = 0;
            for i in 0..received {
                let len = meta[i].len.min(bufs[i].len());
                match kind_of(&bufs[i][..len], |id| self.asked(id)) {
                    Kind::Quic => {}
                    Kind::StunAnswer => {
                        if len <= MAX_STUN_MESSAGE {
                            let _ = self.stun.try_send((meta[i].addr, bufs[i][..len].to_vec()));
                        }
                        continue;
                    }
                    Kind::WebRtc => {
                        // Nobody listening, or a full queue: dropped, as the network might.
                        let datagram = Datagram {
                            from: meta[i].addr,
                            to: meta[i].dst_ip,
                            bytes: bufs[i][..len].to_vec(),
                        };
                        let _ = self.webrtc.try_send(datagram);
                        continue;
                    }
                }
                if kept != i {
                    let (front, back) = bufs.split_at_mut(i);
                    front[kept][..len].copy_from_slice(&back[0][..len]);
                    meta[kept] = meta[i];
                }
                kept += 1;
            }
            if kept > 0 {
                return Poll::Ready(Ok(kept));
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::binding_request;

    #[test]
    fn stun_and_quic_are_told_apart() {
        assert!(is_stun(&binding_request([7; 12])));
        let mut quic_long = binding_request([7; 12]);
        quic_long[0] = 0xC3;
        assert!(!is_stun(&quic_long), "a QUIC long header");
        let mut quic_short = binding_request([7; 12]);
        quic_short[0] = 0x41;
        assert!(!is_stun(&quic_short), "a QUIC short header");
        assert!(!is_stun(&[0u8; 8]), "too short");
        let answer = crate::proto::binding_success([7; 12], "192.0.2.1:5".parse().unwrap());
        let ours = |id: &[u8]| id == [7; 12];
        assert_eq!(kind_of(&answer, ours), Kind::StunAnswer);
        let theirs = crate::proto::binding_success([8; 12], "192.0.2.1:5".parse().unwrap());
        assert_eq!(kind_of(&theirs, ours), Kind::WebRtc, "an answer to WebRTC's own check");
        assert_eq!(kind_of(&binding_request([7; 12]), ours), Kind::WebRtc, "a browser's ICE check");
        assert_eq!(kind_of(&[22, 0xfe, 0xfd, 0, 0], ours), Kind::WebRtc, "a DTLS handshake record");
        assert_eq!(kind_of(&[0xc3, 0, 0, 0, 1], ours), Kind::Quic);
    }
}
