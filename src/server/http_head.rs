//! One HTTP/1 request head: where it ends, what it asks for, how its body is framed, and
//! the head the local service gets instead. Routing, authorisation and rewriting all use
//! the same parsed [`Head`], so no two of them can read a request differently.

use std::net::IpAddr;

/// Largest request head accepted; a longer one gets 400.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Most headers in a request head.
pub(crate) const MAX_HEADERS: usize = 128;

/// How the body after a head is delimited (RFC 9112, section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    /// This many bytes (no `Content-Length` and no `Transfer-Encoding` is 0).
    Fixed(u64),
    /// Chunked transfer coding.
    Chunked,
}

/// The parts of a request head that routing and rewriting need.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) method: String,
    /// The target in origin form (`/path?query`, or `*`); an absolute-form target is
    /// converted.
    pub(crate) target: String,
    pub(crate) minor_version: u8,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    /// The value of the routing header (`http-mux-header`), without port, lowercased.
    pub(crate) route_host: String,
    pub(crate) body: BodyLength,
    /// The request asks to switch protocols (`Connection: upgrade` with `Upgrade`).
    pub(crate) upgrade: bool,
}

/// The length of the head at the start of `bytes`, up to and including its empty line,
/// once it is all there. A bare LF ends a line as CRLF does (RFC 9112, section 2.2 lets
/// a recipient accept it); the head passed on is rebuilt with CRLF. `from` is how far an
/// earlier call already looked.
pub(crate) fn head_end(bytes: &[u8], from: usize) -> Option<usize> {
    // Empty lines before the request line are skipped (RFC 9112, section 2.2).
    let start = from.saturating_sub(2).max(leading_empty_lines(bytes));
    let mut at = start;
    while let Some(found) = bytes[at..].iter().position(|&b| b == b'\n') {
        let nl = at + found;
        match &bytes[nl + 1..] {
            [b'\n', ..] => return Some(nl + 2),
            [b'\r', b'\n', ..] => return Some(nl + 3),
            _ => at = nl + 1,
        }
    }
    None
}

fn leading_empty_lines(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|&&b| b == b'\r' || b == b'\n').count()
}

/// Parses one complete head; the error is a sentence for a 400 page.
pub(crate) fn parse_head(bytes: &[u8], mux_header: &str) -> Result<Head, String> {
    let bytes = &bytes[leading_empty_lines(bytes)..];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("The request head is incomplete.".into()),
        Err(err) => return Err(format!("The request head is malformed: {err}.")),
    }
    let (Some(method), Some(target), Some(minor_version)) = (request.method, request.path, request.version)
    else {
        return Err("The request line is incomplete.".into());
    };
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err("CONNECT requests are not served.".into());
    }
    let headers: Vec<(String, Vec<u8>)> =
        request.headers.iter().map(|h| (h.name.to_owned(), h.value.to_vec())).collect();
    let host = single_host(&headers, "Host")?;
    let target = origin_form(target, host.as_deref())?;
    Ok(Head {
        method: method.to_owned(),
        target,
        minor_version,
        route_host: single_host(&headers, mux_header)?
            .ok_or_else(|| format!("The request needs exactly one {mux_header} header."))?,
        body: body_length(&headers)?,
        upgrade: asks_upgrade(&headers),
        headers,
    })
}

/// The one value of header `name` as a lowercased host without port; `None` when absent,
/// an error when repeated or not text.
fn single_host(headers: &[(String, Vec<u8>)], name: &str) -> Result<Option<String>, String> {
    let mut values = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
    let Some((_, value)) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(format!("The request needs exactly one {name} header."));
    }
    let value = std::str::from_utf8(value).map_err(|_| format!("The {name} header is not text."))?;
    Ok(Some(strip_port(value.trim()).to_ascii_lowercase()))
}

/// `target` in origin form. An absolute-form target (`http://host/path`) must name the
/// host of the `Host` header, so that the host a request is routed by is the one the local
/// service would act on.
fn origin_form(target: &str, host: Option<&str>) -> Result<String, String> {
    if target.starts_with('/') || target == "*" {
        return Ok(target.to_owned());
    }
    let not_understood = || "The request target is not understood.".to_owned();
    let (scheme, rest) = target.split_once("://").ok_or_else(not_understood)?;
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Err(not_understood());
    }
    let split = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') || Some(strip_port(authority).to_ascii_lowercase().as_str()) != host {
        return Err("The request target names another host than the Host header.".into());
    }
    Ok(match path.chars().next() {
        Some('/') => path.to_owned(),
        _ => format!("/{path}"),
    })
}

fn header_values<'a>(headers: &'a [(String, Vec<u8>)], name: &'a str) -> impl Iterator<Item = &'a [u8]> {
    headers.iter().filter(move |(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
}

/// The comma-separated tokens of every `name` header, trimmed and lowercased.
fn header_tokens(headers: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    header_values(headers, name)
        .flat_map(|v| v.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The body framing; `Transfer-Encoding` wins over `Content-Length` (which the rewritten
/// head then drops, so the local service cannot frame the body differently).
fn body_length(headers: &[(String, Vec<u8>)]) -> Result<BodyLength, String> {
    let codings = header_tokens(headers, "Transfer-Encoding");
    if header_values(headers, "Transfer-Encoding").next().is_some() {
        return match codings.last().map(String::as_str) {
            Some("chunked") => Ok(BodyLength::Chunked),
            _ => Err("A request body must end with the chunked transfer coding.".into()),
        };
    }
    let lengths = header_tokens(headers, "Content-Length");
    let Some(first) = lengths.first() else {
        return match header_values(headers, "Content-Length").next() {
            Some(_) => Err("The Content-Length header is empty.".into()),
            None => Ok(BodyLength::Fixed(0)),
        };
    };
    let valid = first.bytes().all(|b| b.is_ascii_digit()) && lengths.iter().all(|l| l == first);
    match first.parse::<u64>() {
        Ok(len) if valid => Ok(BodyLength::Fixed(len)),
        _ => Err("The Content-Length header is not valid.".into()),
    }
}

fn asks_upgrade(headers: &[(String, Vec<u8>)]) -> bool {
    header_values(headers, "Upgrade").next().is_some()
        && header_tokens(headers, "Connection").iter().any(|t| t == "upgrade")
}

/// `host:port` → `host`; `[v6]:port` → `v6`.
pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// What every head on one visitor connection gets from the server.
#[derive(Debug, Clone)]
pub(crate) struct Forwarding {
    /// Replaces (or supplies) the `Host` header (`use-local-as-http-host`).
    pub(crate) local_host: Option<String>,
    /// The visitor's address: the only `X-Forwarded-For` and `Forwarded: for=`.
    pub(crate) peer: IpAddr,
    /// `http` or `https`.
    pub(crate) scheme: &'static str,
}

/// Headers a visitor may not set: the server's own values replace them.
fn is_forwarding_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("x-forwarded-") || lower == "forwarded" || lower == "x-real-ip"
}

/// The head sent to the local service: request line in origin form (`target` overrides
/// it, for path routing), `Host` pinned when asked, forwarding headers replaced by ours,
/// `Content-Length` dropped under chunked coding, CRLF line ends.
pub(crate) fn rewrite_head(head: &Head, target: Option<&str>, forwarding: &Forwarding) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let target = target.unwrap_or(&head.target);
    out.extend_from_slice(format!("{} {target} HTTP/1.{}\r\n", head.method, head.minor_version).as_bytes());
    let mut original_host: Option<&[u8]> = None;
    for (name, value) in &head.headers {
        let chunked_length = head.body == BodyLength::Chunked && name.eq_ignore_ascii_case("content-length");
        if is_forwarding_header(name) || chunked_length {
            continue;
        }
        if name.eq_ignore_ascii_case("host") {
            original_host = Some(value);
            if forwarding.local_host.is_some() {
                continue;
            }
        }
        push_header(&mut out, name.as_bytes(), value);
    }
    if let Some(local) = &forwarding.local_host {
        push_header(&mut out, b"Host", local.as_bytes());
    }
    let visitor_host = original_host.unwrap_or(head.route_host.as_bytes());
    let peer = forwarding.peer.to_canonical();
    push_header(&mut out, b"X-Forwarded-For", peer.to_string().as_bytes());
    push_header(&mut out, b"X-Forwarded-Proto", forwarding.scheme.as_bytes());
    push_header(&mut out, b"X-Forwarded-Host", visitor_host);
    let node = if peer.is_ipv6() { format!("\"[{peer}]\"") } else { peer.to_string() };
    let mut forwarded = format!("for={node};proto={}", forwarding.scheme);
    if visitor_host.iter().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(b)) {
        forwarded.push_str(&format!(";host=\"{}\"", String::from_utf8_lossy(visitor_host)));
    }
    push_header(&mut out, b"Forwarded", forwarded.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_and_refuse() {
        let head = parse_head(b"GET /a HTTP/1.1\r\nHost: Web.Example.com:8080\r\n\r\n", "Host").unwrap();
        assert_eq!(head.route_host, "web.example.com");
        assert_eq!((head.method.as_str(), head.target.as_str(), head.minor_version), ("GET", "/a", 1));
        let twice = parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", "Host");
        assert!(twice.is_err());
        assert!(parse_head(b"GET / HTTP/1.1\r\n\r\n", "Host").is_err());
        assert!(parse_head(b"\x00\x01 nonsense\r\n\r\n", "Host").is_err());
        let custom = parse_head(b"GET / HTTP/1.1\r\nX-Tunnel: t1\r\n\r\n", "x-tunnel").unwrap();
        assert_eq!(custom.route_host, "t1");
        assert!(parse_head(b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", "Host").is_err());
    }

    #[test]
    fn absolute_targets_become_origin_form_for_their_own_host_only() {
        let head = parse_head(b"GET http://App.example:80?q=1 HTTP/1.1\r\nHost: app.example\r\n\r\n", "Host");
        assert_eq!(head.unwrap().target, "/?q=1");
        let other = b"GET http://admin.internal/ HTTP/1.1\r\nHost: app.example\r\n\r\n";
        assert!(parse_head(other, "Host").is_err());
        let userinfo = b"GET http://x@app.example/ HTTP/1.1\r\nHost: app.example\r\n\r\n";
        assert!(parse_head(userinfo, "Host").is_err());
        assert!(parse_head(b"GET ftp://app.example/ HTTP/1.1\r\nHost: app.example\r\n\r\n", "Host").is_err());
    }

    #[test]
    fn bodies_are_framed_once() {
        let framing = |extra: &str| {
            let text = format!("POST / HTTP/1.1\r\nHost: a\r\n{extra}\r\n");
            parse_head(text.as_bytes(), "Host").map(|h| h.body)
        };
        assert_eq!(framing(""), Ok(BodyLength::Fixed(0)));
        assert_eq!(framing("Content-Length: 12\r\n"), Ok(BodyLength::Fixed(12)));
        assert_eq!(framing("Content-Length: 12, 12\r\n"), Ok(BodyLength::Fixed(12)));
        assert!(framing("Content-Length: 12\r\nContent-Length: 13\r\n").is_err());
        assert!(framing("Content-Length: -1\r\n").is_err());
        assert!(framing("Content-Length: +1\r\n").is_err());
        assert!(framing("Content-Length: \r\n").is_err());
        let chunked = "Transfer-Encoding: gzip, Chunked\r\nContent-Length: 3\r\n";
        assert_eq!(framing(chunked), Ok(BodyLength::Chunked));
        assert!(framing("Transfer-Encoding: gzip\r\n").is_err());
    }

    #[test]
    fn heads_end_at_an_empty_line_with_or_without_cr() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest", 0), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\nrest", 0), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        let bare = parse_head(b"GET / HTTP/1.1\nHost: a\n\n", "Host").unwrap();
        assert_eq!(bare.route_host, "a");
        // An empty line left over after a body is not a head of its own.
        let after_body = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(after_body, 0), Some(after_body.len()));
        assert_eq!(parse_head(after_body, "Host").unwrap().route_host, "a");
    }

    #[test]
    fn rewriting_pins_the_host_and_replaces_forwarding_headers() {
        let text = b"POST /x HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 127.0.0.1\r\n\
                     Forwarded: for=127.0.0.1\r\nX-Real-IP: 10.0.0.1\r\nTransfer-Encoding: chunked\r\n\
                     Content-Length: 5\r\n\r\n";
        let head = parse_head(text, "Host").unwrap();
        let forwarding = Forwarding {
            local_host: Some("local".into()),
            peer: "203.0.113.9".parse().unwrap(),
            scheme: "http",
        };
        let out = String::from_utf8(rewrite_head(&head, None, &forwarding)).unwrap();
        assert_eq!(
            out,
            "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: local\r\n\
             X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: app.example\r\n\
             Forwarded: for=203.0.113.9;proto=http;host=\"app.example\"\r\n\r\n"
        );
    }

    /// Found by the `http_head` fuzz target: a head with the most headers ferry accepts grows
    /// past that limit by the forwarding headers ferry adds. It is passed on all the same
    /// (the local service judges it); one header more is refused at once.
    #[test]
    fn a_head_at_the_header_limit_is_passed_on_with_forwarding_headers() {
        let mut text = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 1..MAX_HEADERS {
            text.push_str(&format!("X-{i}: v\r\n"));
        }
        let head = parse_head(format!("{text}\r\n").as_bytes(), "Host").unwrap();
        assert_eq!(head.headers.len(), MAX_HEADERS);
        let forwarding = Forwarding { local_host: None, peer: "192.0.2.1".parse().unwrap(), scheme: "http" };
        let out = rewrite_head(&head, None, &forwarding);
        let lines = out.split(|&b| b == b'\n').count();
        assert_eq!(lines, 1 + MAX_HEADERS + 4 + 2, "request line, headers, four forwarding headers, end");
        let over = format!("{text}X-Over: v\r\n\r\n");
        assert!(parse_head(over.as_bytes(), "Host").unwrap_err().contains("too many headers"));
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
