//! One datagram of a UDP flow onto its link, on either side: over QUIC a QUIC datagram
//! tagged with the flow's number, otherwise framed on the flow's data link.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::proto::{encode_datagram, tag_datagram, FLOW_TAG};

/// Sends `datagram` over `quic` (the connection and the flow's number) or framed on
/// `link`. `Ok(false)`: dropped, as too large for the QUIC path (never truncated); an
/// error: the link failed.
pub(crate) async fn send_datagram<L>(
    link: &mut L,
    quic: Option<(&quinn::Connection, u32)>,
    datagram: &[u8],
) -> io::Result<bool>
where
    L: AsyncWrite + Unpin + ?Sized,
{
    match quic {
        Some((connection, flow)) => {
            let fits = connection.max_datagram_size().is_some_and(|max| datagram.len() + FLOW_TAG <= max);
            Ok(fits && connection.send_datagram(tag_datagram(flow, datagram)).is_ok())
        }
        None => {
            let mut framed = Vec::with_capacity(datagram.len() + 2);
            if encode_datagram(datagram, &mut framed).is_err() {
                return Ok(false);
            }
            link.write_all(&framed).await.map(|()| true)
        }
    }
}
