//! A tiny HTTP/1.1 service and client for tests, speaking just enough of the protocol.

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A parsed message head: first line and headers (names lowercased).
pub struct Head {
    pub first_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> usize {
        self.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// Reads one head; `None` at a clean end of stream.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, buffered: &mut Vec<u8>) -> Option<Head> {
    loop {
        if let Some(end) = buffered.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&buffered[..end]).into_owned();
            buffered.drain(..end + 4);
            let mut lines = text.split("\r\n");
            let first_line = lines.next().unwrap_or_default().to_owned();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Some(Head { first_line, headers });
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffered.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Reads a body of `len` bytes, feeding each piece to `sink`.
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffered: &mut Vec<u8>,
    len: usize,
    mut sink: impl FnMut(&[u8]),
) {
    let mut left = len;
    let first = buffered.len().min(left);
    sink(&buffered[..first]);
    buffered.drain(..first);
    left -= first;
    let mut chunk = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = stream.read(&mut chunk[..left.min(64 * 1024)]).await.expect("body");
        assert!(n > 0, "body ended early");
        sink(&chunk[..n]);
        left -= n;
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A service named `name`: `PUT /upload` answers the SHA-256 of the body, `GET /download?n=N`
/// sends N bytes with their SHA-256 in `x-sha256`, anything else describes the request.
pub async fn http_service(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    serve_http(listener, name);
    addr
}

/// Serves [`http_service`] on `listener`, in the background.
pub fn serve_http(listener: TcpListener, name: &'static str) {
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream, name));
        }
    });
}

async fn serve(mut stream: TcpStream, name: &'static str) {
    let mut buffered = Vec::new();
    while let Some(head) = read_head(&mut stream, &mut buffered).await {
        let path = head.first_line.split(' ').nth(1).unwrap_or("/").to_owned();
        let mut hasher = Sha256::new();
        read_body(&mut stream, &mut buffered, head.content_length(), |piece| hasher.update(piece)).await;
        let (body, extra) = if path == "/upload" {
            (hex(&hasher.finalize()).into_bytes(), String::new())
        } else if let Some(n) = path.strip_prefix("/download?n=") {
            let body = super::random_bytes(n.parse().unwrap());
            let extra = format!("x-sha256: {}\r\n", hex(&Sha256::digest(&body)));
            (body, extra)
        } else {
            let get = |h: &str| head.header(h).unwrap_or("-").to_owned();
            let text = format!(
                "service={name} path={path} host={} xff={} proto={} xhost={}\n",
                get("host"),
                get("x-forwarded-for"),
                get("x-forwarded-proto"),
                get("x-forwarded-host")
            );
            (text.into_bytes(), String::new())
        };
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{extra}\r\n", body.len());
        if stream.write_all(head.as_bytes()).await.is_err() || stream.write_all(&body).await.is_err() {
            return;
        }
    }
}

/// A response as the visitor saw it.
pub struct Response {
    pub status: u16,
    pub head: Head,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on `stream` (which may be kept alive) and reads the response.
pub async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    method: &str,
    path: &str,
    host: &str,
    extra_headers: &str,
    body: &[u8],
) -> Response {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\ncontent-length: {}\r\n{extra_headers}\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    read_response(stream, &mut Vec::new()).await.expect("a response head")
}

/// Reads one response (body by `content-length`); `None` when the stream ends first.
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S, buffered: &mut Vec<u8>) -> Option<Response> {
    let head = read_head(stream, buffered).await?;
    let status = head.first_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = Vec::new();
    read_body(stream, buffered, head.content_length(), |piece| body.extend_from_slice(piece)).await;
    Some(Response { status, head, body })
}

/// One request on a fresh connection to `server`.
pub async fn get(server: SocketAddr, path: &str, host: &str) -> Response {
    let mut stream = TcpStream::connect(server).await.unwrap();
    request(&mut stream, "GET", path, host, "", b"").await
}
