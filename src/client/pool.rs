//! Data connections opened ahead of visitors: each waits for the server's
//! `OpenStream`, dials the local service, then relays.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::udp;
use crate::auth::{ReplayGuard, SessionKey};
use crate::proto::{
    preamble_with, read_frame_buffered, DataHello, ForwardHello, LinkKind, OpenStream, ProtocolError,
    StreamStatus,
};
use crate::relay::compress::{compressed, Compression};
use crate::relay::{relay_chunked, Status};
use crate::seal::{visitor_keys, SealedStream, Side};
use crate::transport::{accept_stream, open_stream, reset_on_drop, Connector, Stream};

/// Buffer for the open message and any visitor bytes that come with it.
const EARLY_READ: usize = 4096;

/// Pause before reopening a data connection that failed.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Upper bound of idle data connections, however many the server asks for.
const MAX_IDLE: usize = 512;

/// Local addresses by the server's service number, for the current session.
pub(crate) type Routes = Arc<RwLock<HashMap<u32, Route>>>;

/// Where the visitors of one of the server's service numbers go.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    /// The local service's address.
    pub(crate) local: String,
    /// Visitors sent to it so far, across reconnects.
    pub(crate) served: Arc<AtomicU64>,
    /// Its data connections are sealed (`encrypt`).
    pub(crate) encrypt: bool,
    /// A UDP service: each visitor is a flow of datagrams (`udp.rs`).
    pub(crate) udp: bool,
    /// Its data links are compressed, as the server agreed.
    pub(crate) compress: Option<Compression>,
    /// Browsers may reach it over WebRTC (`webrtc`).
    pub(crate) webrtc: bool,
}

/// Keeps a number of idle data connections open for one session.
///
/// Each idle connection is served by its own task; when a visitor claims it,
/// that task spawns its replacement at once, on the same worker thread.
pub(crate) struct DataPool {
    connector: Connector,
    session: u64,
    key: SessionKey,
    seq: AtomicU64,
    /// Visitor numbers of sealed visitors seen in this session: none is accepted twice.
    visits: Mutex<ReplayGuard>,
    routes: Routes,
    local_timeout: Duration,
    /// How many connections are kept idle; grows when the server asks.
    target: AtomicUsize,
    /// How many connections wait for a visitor right now.
    idle: AtomicUsize,
    /// The configured number of idle connections; the target never goes below it.
    base: usize,
    token: CancellationToken,
    /// Every worker, so that the session's end waits for them.
    tasks: TaskTracker,
    /// The session's QUIC connection, for UDP flows' datagrams.
    quic: Option<quinn::Connection>,
    /// UDP flows over that connection, by number.
    flows: Arc<udp::Flows>,
}

impl DataPool {
    /// Starts keeping `idle` data connections open until `token` is cancelled; for a
    /// session over QUIC, serves the streams the server opens on `quic` instead.
    pub(crate) fn start(
        (connector, quic): (Connector, Option<quinn::Connection>),
        session: u64,
        key: SessionKey,
        routes: Routes,
        idle: usize,
        local_timeout: Duration,
        token: CancellationToken,
    ) -> Arc<DataPool> {
        let idle = idle.clamp(1, MAX_IDLE);
        let pool = Arc::new(DataPool {
            connector,
            session,
            key,
            seq: AtomicU64::new(0),
            visits: Mutex::default(),
            routes,
            local_timeout,
            target: AtomicUsize::new(idle),
            idle: AtomicUsize::new(0),
            base: idle,
            token,
            tasks: TaskTracker::new(),
            quic: quic.clone(),
            flows: Arc::default(),
        });
        match quic {
            Some(connection) => {
                let (flows, datagrams) = (pool.flows.clone(), connection.clone());
                let token = pool.token.clone();
                pool.tasks.spawn(async move {
                    token.run_until_cancelled(udp::deliver_datagrams(flows, datagrams)).await;
                });
                let serving = pool.clone();
                pool.tasks.spawn(async move {
                    let token = serving.token.clone();
                    token.run_until_cancelled(serving.serve_streams(connection)).await;
                });
            }
            None => (0..idle).for_each(|_| pool.spawn_worker()),
        }
        pool
    }

    /// Serves each stream the server opens on the session's QUIC connection (one per
    /// visitor) until the connection ends.
    async fn serve_streams(self: Arc<Self>, connection: quinn::Connection) {
        while let Some(link) = accept_stream(&connection).await {
            let pool = self.clone();
            self.tasks.spawn(async move {
                let token = pool.token.clone();
                token.run_until_cancelled(pool.serve_stream(link)).await;
            });
        }
        debug!("QUIC connection closed");
    }

    async fn serve_stream(self: Arc<Self>, link: Stream) {
        let (link, open, early) = match wait_for_visitor(link, BytesMut::with_capacity(EARLY_READ)).await {
            Ok(claimed) => claimed,
            Err(err) => return debug!(%err, "QUIC stream without an open message"),
        };
        let span = tracing::info_span!("visitor", service = open.service, visitor = %open.visitor);
        // A stream serves one visitor: whatever the relay leaves is dropped with it.
        let _ = self.serve_visitor(link, &open, early).instrument(span).await;
    }

    /// Stops every worker (and the visitors they serve) and waits until they are gone.
    pub(crate) async fn stop(&self) {
        self.token.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The server saw visitors wait: keep more connections idle from now on (not over
    /// QUIC, where the server opens streams itself).
    pub(crate) fn grow(self: &Arc<Self>, count: u32) {
        if self.connector.is_quic() {
            return;
        }
        let target = self.target.load(Ordering::Relaxed);
        let extra = (count as usize).min(MAX_IDLE.saturating_sub(target));
        self.target.fetch_add(extra, Ordering::Relaxed);
        for _ in 0..extra {
            self.spawn_worker();
        }
    }

    fn spawn_worker(self: &Arc<Self>) {
        let pool = self.clone();
        self.tasks.spawn(async move {
            let token = pool.token.clone();
            token.run_until_cancelled(pool.serve_one()).await;
        });
    }

    /// Holds one idle data connection until a visitor claims it, serves that
    /// visitor, and goes back to waiting on the same connection when it ended cleanly.
    async fn serve_one(self: Arc<Self>) {
        let mut reusable: Option<(Stream, BytesMut)> = None;
        loop {
            let (link, read) = match reusable.take() {
                Some(link) => link,
                None => match self.open().await {
                    Ok(link) => (link, BytesMut::with_capacity(EARLY_READ)),
                    Err(err) => {
                        debug!(%err, "data connection failed; retrying shortly");
                        // Pausing keeps a dead or overloaded server from being hammered.
                        tokio::time::sleep(RETRY_DELAY).await;
                        continue;
                    }
                },
            };
            self.idle.fetch_add(1, Ordering::Relaxed);
            let claimed = wait_for_visitor(link, read).await;
            let idle = self.idle.fetch_sub(1, Ordering::Relaxed) - 1;
            let below_target = idle < self.target.load(Ordering::Relaxed);
            let (link, open, early) = match claimed {
                Ok(claimed) => claimed,
                // The server closed an idle connection (trimmed, or the session is ending).
                Err(err) if idle < self.base => {
                    debug!(%err, "idle data connection closed; opening another");
                    tokio::time::sleep(RETRY_DELAY).await;
                    continue;
                }
                // Above the configured size the server trims what a burst left over: shrink back.
                Err(_) => {
                    let base = self.base;
                    let _ = self
                        .target
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| (t > base).then(|| t - 1));
                    return;
                }
            };
            if below_target {
                self.spawn_worker();
            }
            let span = tracing::info_span!("visitor", service = open.service, visitor = %open.visitor);
            reusable = self.serve_visitor(link, &open, early).instrument(span).await;
            if reusable.is_none() {
                return;
            }
        }
    }

    /// Opens a forward link: a connection to the P2P service `name` through the server
    /// (a new stream over QUIC, a new connection otherwise).
    pub(crate) async fn open_forward(&self, name: &str) -> Result<Stream, ProtocolError> {
        let mut link = match &self.quic {
            Some(connection) => open_stream(connection).await?,
            None => self.connector.connect().await?,
        };
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let mac = self.key.data_mac(self.session, seq);
        let hello = ForwardHello { session: self.session, seq, mac, name: name.to_owned() };
        link.write_all(&preamble_with(LinkKind::Forward, &hello)?).await?;
        Ok(link)
    }

    async fn open(&self) -> Result<Stream, ProtocolError> {
        let mut link = self.connector.connect().await?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let hello = DataHello { session: self.session, seq, mac: self.key.data_mac(self.session, seq) };
        // Preamble and hello leave in one write.
        link.write_all(&preamble_with(LinkKind::Data, &hello)?).await?;
        Ok(link)
    }

    /// The route of `service` for a new visitor, which is counted toward its
    /// `max-serve-count`.
    fn route_visitor(&self, service: u32) -> Option<Route> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let route = routes.get(&service)?;
        route.served.fetch_add(1, Ordering::Relaxed);
        Some(route.clone())
    }

    /// Serves the visitor of `open`; returns the data connection (and any bytes read past
    /// the visitor's end) when it can serve another visitor.
    async fn serve_visitor(
        &self,
        mut link: Stream,
        open: &OpenStream,
        early: BytesMut,
    ) -> Option<(Stream, BytesMut)> {
        let Some(route) = self.route_visitor(open.service) else {
            warn!("visitor for an unknown service; closing");
            let _ = link.write_all(&[StreamStatus::LocalUnavailable as u8]).await;
            return None;
        };
        if route.udp {
            let quic = self.quic.as_ref().map(|connection| (connection, &*self.flows));
            udp::serve_flow(link, open, early, (&route.local, self.local_timeout), quic).await;
            return None;
        }
        match (route.encrypt, open.seal) {
            (false, None) if route.compress.is_some() => {
                // A compressed link serves one visitor: its streams end only with it.
                let mut squeezed = compressed(&mut link, early);
                self.dial_and_relay(&mut squeezed, &route.local, BytesMut::new()).await;
                None
            }
            (false, None) => {
                let leftover = self.dial_and_relay(&mut link, &route.local, early).await?;
                Some((link, leftover))
            }
            (true, Some(visit)) if self.first_use(visit) => {
                let keys = visitor_keys(&self.key, self.session, open.service, visit, Side::Client);
                // Boxed, so that plain visitors' tasks do not carry a sealed stream's size.
                let mut sealed = Box::new(SealedStream::new(&mut link, keys, early));
                if route.compress.is_some() {
                    let mut squeezed = compressed(&mut *sealed, BytesMut::new());
                    self.dial_and_relay(&mut squeezed, &route.local, BytesMut::new()).await;
                    return None;
                }
                let leftover = self.dial_and_relay(&mut sealed, &route.local, BytesMut::new()).await?;
                let (_, raw) = sealed.into_parts().filter(|_| leftover.is_empty())?;
                Some((link, raw))
            }
            (encrypt, seal) => {
                // A server of another mind, or someone in the middle replaying an open message.
                warn!(encrypt, sealed = seal.is_some(), "open message does not fit the service's encrypt setting, or reuses a visitor number; closing");
                None
            }
        }
    }

    /// Whether the sealed visitor number `visit` is new in this session.
    fn first_use(&self, visit: u64) -> bool {
        self.visits.lock().unwrap_or_else(|e| e.into_inner()).accept(visit)
    }

    /// Dials the local service and relays over `link`; the bytes read past the visitor's
    /// end when the link can serve another visitor.
    async fn dial_and_relay<L>(&self, link: &mut L, local_addr: &str, early: BytesMut) -> Option<BytesMut>
    where
        L: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        let dialed = tokio::time::timeout(self.local_timeout, TcpStream::connect(local_addr)).await;
        let mut local = match dialed {
            Ok(Ok(local)) => local,
            Ok(Err(err)) => return refuse(link, local_addr, &err.to_string()).await,
            Err(_) => return refuse(link, local_addr, "timed out").await,
        };
        let _ = local.set_nodelay(true);
        // The ready byte leaves with the local service's first reply (or its end).
        match relay_chunked(&mut local, link, Status::Send, early, None).await {
            Ok(relayed) => {
                debug!(from_local = relayed.out, to_local = relayed.r#in, "visitor done");
                // Bytes read past the end marker belong to the next open message.
                Some(relayed.leftover)
            }
            Err(err) => {
                debug!(%err, "visitor closed");
                if err.cut_off() {
                    // The visitor's transfer was cut off: the local service sees a reset too.
                    reset_on_drop(&local);
                }
                None
            }
        }
    }
}

/// Waits for the server's open message on an idle data connection.
async fn wait_for_visitor(
    mut link: Stream,
    mut read: BytesMut,
) -> Result<(Stream, OpenStream, BytesMut), ProtocolError> {
    // Visitor bytes may follow the open message in the same read: they are kept.
    let open = read_frame_buffered::<_, OpenStream>(&mut link, &mut read).await?;
    Ok((link, open, read))
}

async fn refuse<L: AsyncWrite + Unpin + ?Sized, T>(link: &mut L, local_addr: &str, why: &str) -> Option<T> {
    warn!(local = %local_addr, error = %why, "local service unavailable; closing visitor");
    let _ = link.write_all(&[StreamStatus::LocalUnavailable as u8]).await;
    let _ = link.shutdown().await;
    None
}
