//! Reaching the server through a corporate proxy: HTTP CONNECT or SOCKS5, with optional
//! user and password, named by `--proxy` or by the usual environment variables.

use std::fmt;
use std::io;
use std::net::IpAddr;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::addr::{split_host_port, AddrError};
use crate::auth::Secret;

/// Longest answer head accepted from an HTTP proxy.
const MAX_ANSWER: usize = 8 * 1024;

/// How the proxy is asked for a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// `http://`: an HTTP `CONNECT` request.
    HttpConnect,
    /// `socks5://` (or `socks5h://`): SOCKS5, the server's name resolved by the proxy.
    Socks5,
}

/// A proxy between the client and the server: `http://[user:pass@]host:port` or
/// `socks5://[user:pass@]host:port`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyAddr {
    /// The protocol spoken to the proxy.
    pub kind: ProxyKind,
    /// The proxy's host name or IP address (IPv6 without brackets).
    pub host: String,
    /// The proxy's port.
    pub port: u16,
    /// User and password for the proxy, if it wants them.
    pub credentials: Option<(String, Secret)>,
}

impl fmt::Debug for ProxyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// The proxy's URL without its password.
impl fmt::Display for ProxyAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.kind == ProxyKind::Socks5 { "socks5" } else { "http" };
        let user = self.credentials.as_ref().map(|(user, _)| format!("{user}:***@")).unwrap_or_default();
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        write!(f, "{scheme}://{user}{host}:{}", self.port)
    }
}

impl ProxyAddr {
    /// Parses a proxy URL; the port defaults to 8080 for http and 1080 for socks5.
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        let bad = |why: &str| AddrError::new(format!("{why} in proxy '{}'", redact(text)));
        let (kind, rest) = match text.split_once("://") {
            Some(("http", rest)) => (ProxyKind::HttpConnect, rest),
            Some(("socks5" | "socks5h", rest)) => (ProxyKind::Socks5, rest),
            Some(_) => return Err(bad("unknown scheme (use http:// or socks5://)")),
            None => (ProxyKind::HttpConnect, text),
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((userinfo, authority)) => (Some(userinfo), authority),
            None => (None, rest),
        };
        let credentials = match userinfo {
            Some(userinfo) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                Some((
                    percent_decode(user).ok_or_else(|| bad("bad user"))?,
                    Secret::new(&percent_decode(pass).ok_or_else(|| bad("bad password"))?),
                ))
            }
            None => None,
        };
        let default_port = if kind == ProxyKind::Socks5 { 1080 } else { 8080 };
        let (host, port) = split_host_port(authority, default_port).map_err(|e| bad(&e))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(ProxyAddr { kind, host, port, credentials })
    }

    /// The proxy the environment names for a connection to `host`: `HTTPS_PROXY`, else
    /// `ALL_PROXY` (or their lower-case forms), unless `NO_PROXY` covers `host`.
    pub fn from_env(host: &str) -> Option<Result<Self, AddrError>> {
        let var = |name: &str| {
            std::env::var(name)
                .or_else(|_| std::env::var(name.to_ascii_lowercase()))
                .ok()
                .filter(|value| !value.trim().is_empty())
        };
        let url = var("HTTPS_PROXY").or_else(|| var("ALL_PROXY"))?;
        if var("NO_PROXY").is_some_and(|list| no_proxy_covers(&list, host)) {
            return None;
        }
        Some(Self::parse(url.trim()))
    }

    /// Opens a TCP connection to `host:port` through the proxy.
    pub(crate) async fn connect(&self, host: &str, port: u16) -> io::Result<TcpStream> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("proxy {self}: {e}")))?;
        tcp.set_nodelay(true)?;
        let tunnel = match self.kind {
            ProxyKind::HttpConnect => self.http_connect(tcp, host, port).await,
            ProxyKind::Socks5 => self.socks5_connect(tcp, host, port).await,
        };
        tunnel.map_err(|e| {
            io::Error::new(e.kind(), format!("proxy {self} refused a tunnel to {host}:{port}: {e}"))
        })
    }

    async fn http_connect(&self, mut tcp: TcpStream, host: &str, port: u16) -> io::Result<TcpStream> {
        let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((user, pass)) = &self.credentials {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", pass.expose()));
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut answer = Vec::with_capacity(256);
        let head_len = loop {
            let mut chunk = [0u8; 512];
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering"));
            }
            answer.extend_from_slice(&chunk[..n]);
            if let Some(read) = read_connect_answer(&answer, self.credentials.is_some()) {
                break read?;
            }
        };
        // The server speaks only after the client: nothing may follow the answer yet.
        if answer.len() > head_len {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bytes after the CONNECT answer"));
        }
        Ok(tcp)
    }

    async fn socks5_connect(&self, tcp: TcpStream, host: &str, port: u16) -> io::Result<TcpStream> {
        let stream = match &self.credentials {
            Some((user, pass)) => {
                tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(
                    tcp,
                    (host, port),
                    user,
                    pass.expose(),
                )
                .await
            }
            None => tokio_socks::tcp::Socks5Stream::connect_with_socket(tcp, (host, port)).await,
        };
        stream.map(|s| s.into_inner()).map_err(|e| match e {
            tokio_socks::Error::Io(err) => err,
            other => io::Error::new(io::ErrorKind::ConnectionRefused, other.to_string()),
        })
    }
}

/// What an HTTP proxy's answer to `CONNECT` says so far: `None` while its head is not
/// complete (and within [`MAX_ANSWER`]), the head's length for a 2xx answer, or why not.
/// `with_credentials` says whether the request carried a password, for the hint of a 401/407.
pub(crate) fn read_connect_answer(answer: &[u8], with_credentials: bool) -> Option<io::Result<usize>> {
    let invalid = |why: &str| Some(Err(io::Error::new(io::ErrorKind::InvalidData, why.to_owned())));
    let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (answer.len() > MAX_ANSWER).then(|| invalid("answer head too long")).flatten();
    };
    let head_len = end + 4;
    if head_len > MAX_ANSWER {
        return invalid("answer head too long");
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match (response.parse(&answer[..head_len]), response.code) {
        (Ok(httparse::Status::Complete(_)), Some(200..=299)) => Some(Ok(head_len)),
        (Ok(httparse::Status::Complete(_)), Some(code)) => {
            let reason = response.reason.unwrap_or_default();
            let (kind, hint) = match (code, with_credentials) {
                (401 | 407, false) => {
                    (io::ErrorKind::PermissionDenied, " (give user:password@ in the proxy URL)")
                }
                (401 | 407, true) => (io::ErrorKind::PermissionDenied, " (wrong proxy user or password)"),
                _ => (io::ErrorKind::ConnectionRefused, ""),
            };
            Some(Err(io::Error::new(kind, format!("answered {code} {reason}{hint}"))))
        }
        _ => invalid("not an HTTP answer"),
    }
}

/// Whether a `NO_PROXY` list names `host`: `*`, the host itself, a domain it is under
/// (`example.com` or `.example.com`), or an IP network (`10.0.0.0/8`) holding it.
pub(crate) fn no_proxy_covers(list: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let ip = host.parse::<IpAddr>().ok();
    list.split(',').map(|entry| entry.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).any(|entry| {
        if entry == "*" {
            return true;
        }
        if let (Some(ip), Ok(net)) = (ip, entry.parse::<ipnet::IpNet>()) {
            return net.contains(&ip);
        }
        let domain = entry.trim_start_matches('.').trim_end_matches('.');
        host == domain || host.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.'))
    })
}

/// `%XX` escapes of a URL's user part decoded; `None` if they are not valid UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A proxy URL with any password replaced, for error messages: the user part is found as
/// [`ProxyAddr::parse`] finds it, with or without a scheme.
fn redact(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), text),
    };
    match rest.rsplit_once('@') {
        Some((userinfo, authority)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}{user}:***@{authority}")
        }
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_and_never_show_the_password() {
        let p = ProxyAddr::parse("http://alice:s%40cret@proxy.example:3128").unwrap();
        assert_eq!((p.kind, p.host.as_str(), p.port), (ProxyKind::HttpConnect, "proxy.example", 3128));
        let (user, pass) = p.credentials.as_ref().unwrap();
        assert_eq!((user.as_str(), pass.expose()), ("alice", "s@cret"));
        assert_eq!(p.to_string(), "http://alice:***@proxy.example:3128");
        assert!(!format!("{p:?}").contains("cret"));
        let p = ProxyAddr::parse("socks5://[::1]").unwrap();
        assert_eq!(
            (p.kind, p.host.as_str(), p.port, p.credentials.is_none()),
            (ProxyKind::Socks5, "::1", 1080, true)
        );
        let err = ProxyAddr::parse("ftp://bob:hunter2@x:1").unwrap_err().to_string();
        assert!(err.contains("unknown scheme") && !err.contains("hunter2"), "{err}");
        assert!(ProxyAddr::parse("http://x:notaport").is_err());
        // Without a scheme the password is hidden too.
        let err = ProxyAddr::parse("bob:hunter2@x:notaport").unwrap_err().to_string();
        assert!(err.contains("bob:***@x:notaport") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn connect_answers_are_read_once_their_head_is_whole() {
        assert!(read_connect_answer(b"HTTP/1.1 200 OK\r\n", false).is_none());
        let ok = b"HTTP/1.0 200 Connection established\r\nProxy-agent: x\r\n\r\n";
        assert_eq!(read_connect_answer(ok, false).unwrap().unwrap(), ok.len());
        let denied = read_connect_answer(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\nbody", false);
        assert!(denied.unwrap().unwrap_err().to_string().contains("give user:password@"));
        assert!(read_connect_answer(b"SSH-2.0-x\r\n\r\n", false).unwrap().is_err());
        assert!(read_connect_answer(&vec![b'a'; MAX_ANSWER + 1], false).unwrap().is_err());
    }

    #[test]
    fn no_proxy_matches_hosts_domains_and_networks() {
        let list = "localhost, .corp.example,example.org,10.0.0.0/8, ::1";
        for host in [
            "localhost",
            "a.corp.example",
            "corp.example",
            "example.org",
            "www.example.org",
            "10.1.2.3",
            "::1",
        ] {
            assert!(no_proxy_covers(list, host), "{host}");
        }
        for host in ["notexample.org", "example.com", "11.0.0.1", "corp.example.net"] {
            assert!(!no_proxy_covers(list, host), "{host}");
        }
        assert!(no_proxy_covers("*", "anything"));
    }
}
