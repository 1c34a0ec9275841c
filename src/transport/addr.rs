//! Parsing the addresses users type: listen addresses and the server's remote URL.

use std::fmt;
use std::net::SocketAddr;

/// An address that does not parse; the text says what is wrong and quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(String);

impl AddrError {
    pub(crate) fn new(message: String) -> Self {
        AddrError(message)
    }
}

/// How the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// WebSocket over TCP (`ws://`), through HTTP reverse proxies.
    Ws,
    /// WebSocket over TLS (`wss://`).
    Wss,
    /// QUIC (`quic://`): TLS 1.3 over UDP, one stream per visitor.
    Quic,
}

impl Scheme {
    /// The scheme as written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Tls => "tls",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Quic => "quic",
        }
    }

    /// Whether the link runs inside TLS to the server (`tls://`, `wss://`, `quic://`).
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Tls | Scheme::Wss | Scheme::Quic)
    }

    /// Whether the link is a WebSocket (`ws://`, `wss://`).
    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }

    fn default_port(self) -> u16 {
        match self {
            Scheme::Tcp => 7000,
            Scheme::Tls | Scheme::Wss | Scheme::Quic => 443,
            Scheme::Ws => 80,
        }
    }
}

/// The server as the client names it: `tcp://host:port`, `tls://host:port`,
/// `ws://host:port/path`, `wss://host:port/path` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteAddr {
    /// Transport.
    pub scheme: Scheme,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// The WebSocket path (`/ferry`), empty for tcp:// and tls://.
    pub path: String,
}

impl RemoteAddr {
    /// Parses a remote URL; the port defaults to 7000 for tcp, 443 for tls, wss and quic,
    /// 80 for ws; a WebSocket path defaults to `/`.
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        let (scheme, rest) = match text.split_once("://") {
            Some(("tcp", rest)) => (Scheme::Tcp, rest),
            Some(("tls", rest)) => (Scheme::Tls, rest),
            Some(("ws", rest)) => (Scheme::Ws, rest),
            Some(("wss", rest)) => (Scheme::Wss, rest),
            Some(("quic", rest)) => (Scheme::Quic, rest),
            Some((other, _)) => {
                return Err(AddrError(format!(
                    "unknown scheme '{other}' in '{text}' (use tcp://, tls://, ws://, wss:// or quic://)"
                )))
            }
            None => (Scheme::Tcp, text),
        };
        let (authority, path) = match (scheme.is_websocket(), rest.find('/')) {
            (true, Some(at)) => (&rest[..at], rest[at..].to_owned()),
            (true, None) => (rest, "/".to_owned()),
            (false, _) => (rest.trim_end_matches('/'), String::new()),
        };
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AddrError(format!("the path of '{text}' has spaces or control characters")));
        }
        let (host, port) = split_host_port(authority, scheme.default_port())
            .map_err(|e| AddrError(format!("{e} in '{text}'")))?;
        if host.is_empty() {
            return Err(AddrError(format!("no host in '{text}'")));
        }
        Ok(RemoteAddr { scheme, host, port, path })
    }

    /// The URL of the WebSocket upgrade request (`ws://host:port/path`; TLS, if any, is
    /// already below it).
    pub fn websocket_url(&self) -> String {
        format!("ws://{}{}", self.authority(), self.path)
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme.as_str(), self.authority(), self.path)
    }
}

pub(crate) fn split_host_port(text: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = split_unchecked(text, default_port)?;
    if !host.is_empty() && !is_host(&host) {
        return Err(format!("'{host}' is not a host name or IP address"));
    }
    Ok((host, port))
}

fn split_unchecked(text: &str, default_port: u16) -> Result<(String, u16), String> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed '['")?;
        let port = match after.strip_prefix(':') {
            Some(port) => parse_port(port)?,
            None if after.is_empty() => default_port,
            None => return Err("junk after ']'".into()),
        };
        return Ok((host.to_owned(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Ok((host.to_owned(), parse_port(port)?)),
        _ => Ok((text.to_owned(), default_port)),
    }
}

/// An IP address, or a DNS name of letters, digits, `-`, `_` and dots (at most 253).
fn is_host(host: &str) -> bool {
    let name = host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    name || host.parse::<std::net::IpAddr>().is_ok()
}

fn parse_port(text: &str) -> Result<u16, String> {
    text.parse().map_err(|_| format!("bad port '{text}'"))
}

/// Parses a listen address as GT does: `0.0.0.0:7000`, `[::]:7000`, `:7000` or a bare `7000`.
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, AddrError> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let port = text.strip_prefix(':').unwrap_or(text);
    port.parse::<u16>()
        .map(|port| SocketAddr::from(([0, 0, 0, 0], port)))
        .map_err(|_| AddrError(format!("'{text}' is not an address (try 0.0.0.0:7000, :7000 or 7000)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_forms() {
        let r = RemoteAddr::parse("tls://example.com").unwrap();
        assert_eq!((r.scheme, r.host.as_str(), r.port), (Scheme::Tls, "example.com", 443));
        let r = RemoteAddr::parse("127.0.0.1:9000").unwrap();
        assert_eq!((r.scheme, r.host.as_str(), r.port), (Scheme::Tcp, "127.0.0.1", 9000));
        let r = RemoteAddr::parse("tcp://[::1]:7001").unwrap();
        assert_eq!((r.host.as_str(), r.port), ("::1", 7001));
        assert_eq!(r.to_string(), "tcp://[::1]:7001");
        assert!(RemoteAddr::parse("udp://x:1").is_err());
        let r = RemoteAddr::parse("wss://example.com/ferry").unwrap();
        assert_eq!((r.scheme, r.port, r.path.as_str()), (Scheme::Wss, 443, "/ferry"));
        assert_eq!(r.websocket_url(), "ws://example.com:443/ferry");
        let r = RemoteAddr::parse("ws://[::1]:8080").unwrap();
        assert_eq!((r.host.as_str(), r.port, r.path.as_str()), ("::1", 8080, "/"));
        assert_eq!(r.to_string(), "ws://[::1]:8080/");
        assert!(RemoteAddr::parse("ws://h/a b").is_err());
        // Found by the transports fuzz target: no scheme, and a host that is no host.
        assert!(RemoteAddr::parse("wss:\u{8b}//[::1]:8443/ferry").is_err());
        assert!(RemoteAddr::parse("tcp://exa mple.com").is_err());
        assert_eq!(RemoteAddr::parse("::1").unwrap().host, "::1");
        assert!(RemoteAddr::parse("tcp://x:notaport").is_err());
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen_addr("7000").unwrap(), "0.0.0.0:7000".parse().unwrap());
        assert_eq!(parse_listen_addr(":7000").unwrap(), "0.0.0.0:7000".parse().unwrap());
        assert_eq!(parse_listen_addr("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(parse_listen_addr("nope").is_err());
    }
}
