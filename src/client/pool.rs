//! Data connections opened ahead of visitors: each waits for the server's
//! `OpenStream`, dials the local service, then relays.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::auth::SessionKey;
use crate::proto::{
    encode_frame, preamble, read_frame_buffered, DataHello, LinkKind, OpenStream, StreamStatus,
};
use crate::relay::relay;
use crate::transport::{Connector, Stream};

/// Buffer for the open message and any visitor bytes that come with it.
const EARLY_READ: usize = 4096;

/// Upper bound of idle data connections, however many the server asks for.
const MAX_IDLE: usize = 512;

/// Local addresses by the server's service number, for the current session.
pub(crate) type Routes = Arc<RwLock<HashMap<u32, String>>>;

/// Keeps a number of idle data connections open for one session.
pub(crate) struct DataPool {
    connector: Connector,
    session: u64,
    key: SessionKey,
    seq: AtomicU64,
    routes: Routes,
    local_timeout: Duration,
    idle_slots: Arc<Semaphore>,
    slots: AtomicU64,
    token: CancellationToken,
}

impl DataPool {
    /// Starts keeping `idle` data connections open until `token` is cancelled.
    pub(crate) fn start(
        connector: Connector,
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
            routes,
            local_timeout,
            idle_slots: Arc::new(Semaphore::new(idle)),
            slots: AtomicU64::new(idle as u64),
            token,
        });
        tokio::spawn(pool.clone().keep_filled());
        pool
    }

    /// The server saw visitors wait: keep more connections idle from now on.
    pub(crate) fn grow(&self, count: u32) {
        let slots = self.slots.load(Ordering::Relaxed) as usize;
        let extra = (count as usize).min(MAX_IDLE.saturating_sub(slots));
        if extra > 0 {
            self.slots.fetch_add(extra as u64, Ordering::Relaxed);
            self.idle_slots.add_permits(extra);
        }
    }

    /// Opens a data connection for every free slot; a used connection frees its slot.
    async fn keep_filled(self: Arc<Self>) {
        loop {
            let permit = tokio::select! {
                _ = self.token.cancelled() => return,
                permit = self.idle_slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let worker = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = worker.token.cancelled() => {},
                    _ = worker.serve_one(permit) => {},
                }
            });
        }
    }

    async fn serve_one(&self, permit: OwnedSemaphorePermit) {
        let mut link = match self.open().await {
            Ok(link) => link,
            Err(err) => {
                debug!(%err, "data connection failed; retrying shortly");
                // Holding the permit during the pause keeps a dead server from being hammered.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return;
            }
        };
        // Visitor bytes may follow the open message in the same read: they are kept.
        let mut early = BytesMut::with_capacity(EARLY_READ);
        let open = match read_frame_buffered::<_, OpenStream>(&mut link, &mut early).await {
            Ok(open) => open,
            Err(err) => return debug!(%err, "idle data connection closed"),
        };
        drop(permit);
        let span = tracing::info_span!("visitor", service = open.service, visitor = %open.visitor);
        self.serve_visitor(link, open.service, early)
            .instrument(span)
            .await;
    }

    async fn open(&self) -> Result<Stream, crate::proto::ProtocolError> {
        let mut link = self.connector.connect().await?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let hello = DataHello {
            session: self.session,
            seq,
            mac: self.key.data_mac(self.session, seq),
        };
        // Preamble and hello leave in one write.
        let mut first = preamble(LinkKind::Data).to_vec();
        encode_frame(&hello, &mut first)?;
        link.write_all(&first).await?;
        Ok(link)
    }

    async fn serve_visitor(&self, mut link: Stream, service: u32, early: BytesMut) {
        let local_addr = self
            .routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&service)
            .cloned();
        let Some(local_addr) = local_addr else {
            warn!("visitor for an unknown service; closing");
            let _ = link
                .write_all(&[StreamStatus::LocalUnavailable as u8])
                .await;
            return;
        };
        let dialed =
            tokio::time::timeout(self.local_timeout, TcpStream::connect(&local_addr)).await;
        let mut local = match dialed {
            Ok(Ok(local)) => local,
            Ok(Err(err)) => return refuse(link, &local_addr, &err.to_string()).await,
            Err(_) => return refuse(link, &local_addr, "timed out").await,
        };
        let _ = local.set_nodelay(true);
        if link.write_all(&[StreamStatus::Ready as u8]).await.is_err() {
            return;
        }
        if !early.is_empty() && local.write_all(&early).await.is_err() {
            return;
        }
        match relay(&mut link, &mut local).await {
            Ok((down, up)) => debug!(to_local = down, from_local = up, "visitor done"),
            Err(err) => debug!(%err, "visitor closed"),
        }
    }
}

async fn refuse(mut link: Stream, local_addr: &str, why: &str) {
    warn!(local = %local_addr, error = %why, "local service unavailable; closing visitor");
    let _ = link
        .write_all(&[StreamStatus::LocalUnavailable as u8])
        .await;
    let _ = link.shutdown().await;
}
