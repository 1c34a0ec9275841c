//! Moving bytes between a visitor and a data connection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proto::StreamStatus;

/// Copies both ways until both sides are done, honouring half-close.
///
/// Returns the bytes moved `a → b` and `b → a`. Each direction owns one fixed
/// buffer, and a full peer stops the copy, so memory stays bounded per stream.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional(a, b).await
}

/// A data connection seen from the server: the first byte read from it is the
/// client's [`StreamStatus`], which is checked and swallowed.
///
/// Visitor bytes can flow to the client at once; the reply direction fails
/// with an error if the client could not reach its local service, so the
/// visitor is closed straight away.
pub struct StatusGate<S> {
    inner: S,
    awaiting_status: bool,
}

impl<S> StatusGate<S> {
    /// Wraps a data connection on which the open message was just sent.
    pub fn new(inner: S) -> Self {
        StatusGate {
            inner,
            awaiting_status: true,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StatusGate<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.awaiting_status {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        // Read straight into the caller's buffer (one system call), then take the status byte off.
        let start = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let Some(&status) = buf.filled().get(start) else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client closed the data connection before answering",
            )));
        };
        if StreamStatus::from_byte(status) != StreamStatus::Ready {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "client could not reach its local service",
            )));
        }
        self.awaiting_status = false;
        let end = buf.filled().len();
        buf.filled_mut().copy_within(start + 1..end, start);
        buf.set_filled(end - 1);
        if end - 1 == start {
            // Only the status byte came: read again so an empty read never looks like EOF.
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StatusGate<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The local service seen from the client: the [`StreamStatus::Ready`] byte is
/// put in front of the first bytes read from it, so status and first reply
/// leave in one write (and, on loopback or a LAN, one segment).
pub struct ReadyPrefix<S> {
    inner: S,
    prefix_pending: bool,
}

impl<S> ReadyPrefix<S> {
    /// Wraps a local service connection that has just been dialed.
    pub fn new(inner: S) -> Self {
        ReadyPrefix {
            inner,
            prefix_pending: true,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadyPrefix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix_pending || buf.remaining() < 2 {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let start = buf.filled().len();
        buf.put_slice(&[StreamStatus::Ready as u8]);
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Pending => {
                // Nothing to send with it yet: take the byte back and wait.
                buf.set_filled(start);
                Poll::Pending
            }
            Poll::Ready(Err(err)) => {
                buf.set_filled(start);
                Poll::Ready(Err(err))
            }
            // Data, or end of stream: either way the status goes out now.
            Poll::Ready(Ok(())) => {
                self.prefix_pending = false;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadyPrefix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn gate_passes_after_ready_and_fails_on_refusal() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut gate = StatusGate::new(server);
        let mut buf = [0u8; 5];
        client
            .write_all(&[StreamStatus::Ready as u8])
            .await
            .unwrap();
        // The status alone must not surface as an empty (end-of-stream) read.
        let early = std::time::Duration::from_millis(50);
        let pending = tokio::time::timeout(early, gate.read(&mut buf)).await;
        assert!(
            pending.is_err(),
            "gate returned before any payload: {pending:?}"
        );
        client.write_all(b"hello").await.unwrap();
        gate.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        let (mut client, server) = tokio::io::duplex(64);
        let mut gate = StatusGate::new(server);
        let refusal = [StreamStatus::LocalUnavailable as u8];
        client.write_all(&refusal).await.unwrap();
        let err = gate.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn gate_strips_status_sent_together_with_data() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut gate = StatusGate::new(server);
        client.write_all(b"\0abc").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        gate.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"abc");
    }

    #[tokio::test]
    async fn prefix_rides_on_the_first_read_or_end_of_stream() {
        let (mut service, local) = tokio::io::duplex(64);
        let mut prefixed = ReadyPrefix::new(local);
        let mut buf = [0u8; 8];
        let early = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(early, prefixed.read(&mut buf))
            .await
            .is_err());
        service.write_all(b"hi").await.unwrap();
        let n = prefixed.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"\0hi");

        let (service, local) = tokio::io::duplex(64);
        drop(service);
        let mut all = Vec::new();
        ReadyPrefix::new(local).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"\0");
    }

    #[tokio::test]
    async fn prefix_and_gate_round_trip() {
        let (mut service, local) = tokio::io::duplex(64);
        let mut prefixed = ReadyPrefix::new(local);
        let (link_client, link_server) = tokio::io::duplex(64);
        let mut gate = StatusGate::new(link_server);
        let mut link_client = link_client;
        tokio::spawn(async move {
            let _ = relay(&mut link_client, &mut prefixed).await;
        });
        service.write_all(b"reply").await.unwrap();
        drop(service);
        let mut got = Vec::new();
        gate.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
    }
}
