//! Parsing the addresses users type: listen addresses and the server's remote URL.

use std::fmt;
use std::net::SocketAddr;

/// An address that does not parse; the text says what is wrong and quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AddrError(String);

/// How the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
}

/// The server as the client names it: `tcp://host:port`, `tls://host:port` or `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteAddr {
    /// Transport.
    pub scheme: Scheme,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl RemoteAddr {
    /// Parses a remote URL; the port defaults to 7000 for tcp and 443 for tls.
    pub fn parse(text: &str) -> Result<Self, AddrError> {
        let (scheme, rest) = match text.split_once("://") {
            Some(("tcp", rest)) => (Scheme::Tcp, rest),
            Some(("tls", rest)) => (Scheme::Tls, rest),
            Some((other, _)) => {
                return Err(AddrError(format!("unknown scheme '{other}' in '{text}' (use tcp:// or tls://)")))
            }
            None => (Scheme::Tcp, text),
        };
        let rest = rest.trim_end_matches('/');
        let default_port = if scheme == Scheme::Tls { 443 } else { 7000 };
        let (host, port) =
            split_host_port(rest, default_port).map_err(|e| AddrError(format!("{e} in '{text}'")))?;
        if host.is_empty() {
            return Err(AddrError(format!("no host in '{text}'")));
        }
        Ok(RemoteAddr { scheme, host, port })
    }
}

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.scheme == Scheme::Tls { "tls" } else { "tcp" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

fn split_host_port(text: &str, default_port: u16) -> Result<(String, u16), String> {
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
