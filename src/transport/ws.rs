//! WebSocket as a link transport: the client's control and data connections ride on
//! binary messages, so a client can reach the server through nginx, a CDN or any HTTP
//! reverse proxy. [`WsStream`] turns the message stream back into bytes.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::{AsyncStream, Stream};

/// Largest message either side sends: one write of the relay.
const MAX_SENT_MESSAGE: usize = 64 * 1024;
/// Largest message or frame accepted from the peer; larger ones end the link before
/// anything is allocated for them.
const MAX_RECEIVED_MESSAGE: usize = 1024 * 1024;

/// The limits of every ferry WebSocket: small messages, and writes that go out at once
/// (the layers above flush when they wait, as they do for TLS).
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .write_buffer_size(0)
        .max_message_size(Some(MAX_RECEIVED_MESSAGE))
        .max_frame_size(Some(MAX_RECEIVED_MESSAGE))
}

/// A WebSocket read and written as a byte stream: each write is one binary message, and
/// the payloads of received binary messages are read in order. A close message ends the
/// stream; a text message is a protocol error.
pub struct WsStream<S> {
    socket: WebSocketStream<S>,
    /// What is left of the last message received.
    unread: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    fn new(socket: WebSocketStream<S>) -> Self {
        WsStream { socket, unread: Bytes::new() }
    }
}

fn to_io(err: tungstenite::Error) -> io::Error {
    match err {
        tungstenite::Error::Io(err) => err,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "websocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, format!("websocket: {other}")),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.unread.is_empty() {
            match ready!(Pin::new(&mut self.socket).poll_next(cx)) {
                Some(Ok(Message::Binary(payload))) => self.unread = payload,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "websocket: text message",
                    )))
                }
                // Pings are answered by tungstenite; pongs and raw frames carry nothing.
                Some(Ok(_)) => {}
                Some(Err(err)) => return Poll::Ready(Err(to_io(err))),
            }
        }
        let n = self.unread.len().min(buf.remaining());
        let chunk = self.unread.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let mut socket = Pin::new(&mut self.socket);
        ready!(socket.as_mut().poll_ready(cx)).map_err(to_io)?;
        let n = buf.len().min(MAX_SENT_MESSAGE);
        socket.start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.socket).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.socket).poll_close(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed) => Poll::Ready(Ok(())),
            Err(err) => Poll::Ready(Err(to_io(err))),
        }
    }
}

impl AsyncStream for WsStream<Stream> {
    fn tcp(&self) -> Option<&TcpStream> {
        self.socket.get_ref().tcp()
    }
}

/// Why a WebSocket upgrade by the client failed.
pub(crate) fn explain_upgrade_failure(err: tungstenite::Error, url: &str) -> io::Error {
    match err {
        tungstenite::Error::Http(response) => {
            let status = response.status();
            let hint = if status == 404 { " (is --ws-path set to this path on the server?)" } else { "" };
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("websocket upgrade at {url} answered {status}{hint}"),
            )
        }
        other => {
            let err = to_io(other);
            io::Error::new(err.kind(), format!("websocket upgrade at {url}: {err}"))
        }
    }
}

/// Upgrades a link the client opened to a WebSocket at `url` (ws://host:port/path; the
/// scheme only names the Host and path, TLS is already below `link` for wss://).
pub(crate) async fn connect(link: Stream, url: &str) -> io::Result<Stream> {
    let (socket, _response) = tokio_tungstenite::client_async_with_config(url, link, Some(config()))
        .await
        .map_err(|err| explain_upgrade_failure(err, url))?;
    Ok(Box::new(WsStream::new(socket)))
}

/// Whether a request head asks for a WebSocket upgrade: `Upgrade: websocket` and a
/// `Sec-WebSocket-Key`; returns that key.
pub(crate) fn upgrade_key(headers: &[(String, Vec<u8>)]) -> Option<&[u8]> {
    let header = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| &v[..]);
    let upgrade = header("upgrade")?;
    if !upgrade.split(|b| *b == b',').any(|token| token.trim_ascii().eq_ignore_ascii_case(b"websocket")) {
        return None;
    }
    if header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return None;
    }
    header("sec-websocket-key").map(<[u8]>::trim_ascii).filter(|key| !key.is_empty())
}

/// The server's answer to an upgrade request with `key`.
pub(crate) fn upgrade_response(key: &[u8]) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key)
    )
}

/// The server's side of an upgraded link: `read_ahead` holds bytes the client sent after
/// its request head.
pub(crate) async fn accept(link: Stream, read_ahead: Vec<u8>) -> Stream {
    let socket = WebSocketStream::from_partially_read(link, read_ahead, Role::Server, Some(config())).await;
    Box::new(WsStream::new(socket))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers(list: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        list.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn upgrade_key_needs_websocket_version_13_and_a_key() {
        let good = [("Upgrade", "WebSocket"), ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "abc")];
        assert_eq!(upgrade_key(&headers(&good)), Some(&b"abc"[..]));
        let h2c = [("Upgrade", "h2c"), ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "abc")];
        assert_eq!(upgrade_key(&headers(&h2c)), None);
        let old = [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "8"), ("Sec-WebSocket-Key", "abc")];
        assert_eq!(upgrade_key(&headers(&old)), None);
        assert_eq!(upgrade_key(&headers(&good[..2])), None);
    }

    #[test]
    fn accept_key_is_the_rfc_example() {
        // RFC 6455, section 1.3.
        assert!(upgrade_response(b"dGhlIHNhbXBsZSBub25jZQ==").contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
    }

    #[tokio::test]
    async fn bytes_cross_in_both_directions_and_close_is_end_of_stream() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let client =
            WebSocketStream::from_raw_socket(Box::new(a) as Stream, Role::Client, Some(config())).await;
        let mut client = WsStream::new(client);
        let mut server = accept(Box::new(b), Vec::new()).await;
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (sent, received) = tokio::join!(
            async {
                client.write_all(&payload).await.unwrap();
                client.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                server.read_to_end(&mut got).await.unwrap();
                got
            }
        );
        let () = sent;
        assert_eq!(received, payload);
    }
}
