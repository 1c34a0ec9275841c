//! Fuzz target `proxy_header`: ferry only writes PROXY headers, so this builds one from
//! arbitrary addresses and version and parses it back with a strict parser of its own.
//! Asserts: the header parses, says the addresses ferry means (both in one family: IPv4
//! when both are or map to IPv4, else IPv6) and its lengths are right (v1 at most 107
//! bytes; v2's length field is what follows the 16-byte preamble).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header (with TCP6 addresses), by the specification.
const V1_MAX: usize = 107;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut bytes = [0u8; 1 + 2 * 18];
    let used = data.len().min(bytes.len());
    bytes[..used].copy_from_slice(&data[..used]);
    let selector = bytes[0];
    let visitor = address(selector & 2 != 0, &bytes[1..19]);
    let public = address(selector & 4 != 0, &bytes[19..37]);
    let binary = selector & 1 != 0;
    let header = ferry::fuzzing::proxy_header(binary, visitor, public);
    let (source, destination) = expected(visitor, public);
    let parsed = if binary { parse_v2(&header) } else { parse_v1(&header) };
    assert_eq!(parsed, Some((source, destination)), "{header:?}");
});

/// An address from 18 bytes: an IPv4 one (the first 4) or IPv6 (16, maybe v4-mapped), and a port.
fn address(v4: bool, bytes: &[u8]) -> SocketAddr {
    let port = u16::from_be_bytes([bytes[16], bytes[17]]);
    let ip = match v4 {
        true => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        false => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[..16]).expect("16 bytes"))),
    };
    SocketAddr::new(ip, port)
}

/// The addresses the header must carry: both IPv4 when both are (or map to) IPv4, else both IPv6.
fn expected(visitor: SocketAddr, public: SocketAddr) -> (SocketAddr, SocketAddr) {
    let (a, b) = (visitor.ip().to_canonical(), public.ip().to_canonical());
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
        v6 => v6,
    };
    let (a, b) = if a.is_ipv4() == b.is_ipv4() { (a, b) } else { (v6(a), v6(b)) };
    (SocketAddr::new(a, visitor.port()), SocketAddr::new(b, public.port()))
}

/// `PROXY TCP4|TCP6 src dst sport dport\r\n`, nothing else, in canonical spelling.
fn parse_v1(header: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    if header.len() > V1_MAX {
        return None;
    }
    let text = std::str::from_utf8(header).ok()?.strip_suffix("\r\n")?;
    let parts: Vec<&str> = text.split(' ').collect();
    let ["PROXY", family, source, destination, source_port, destination_port] = parts[..] else {
        return None;
    };
    let ip = |text: &str| -> Option<IpAddr> {
        let ip: IpAddr = match family {
            "TCP4" => IpAddr::V4(text.parse().ok()?),
            "TCP6" => IpAddr::V6(text.parse().ok()?),
            _ => return None,
        };
        (ip.to_string() == text).then_some(ip)
    };
    let port = |text: &str| -> Option<u16> {
        let port: u16 = text.parse().ok()?;
        (port.to_string() == text).then_some(port)
    };
    Some((
        SocketAddr::new(ip(source)?, port(source_port)?),
        SocketAddr::new(ip(destination)?, port(destination_port)?),
    ))
}

/// The binary header: signature, version 2 PROXY, TCP over IPv4 or IPv6, a length that
/// covers exactly the addresses and ports.
fn parse_v2(header: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let rest = header.strip_prefix(V2_SIGNATURE)?;
    let [0x21, family, high, low, body @ ..] = rest else { return None };
    if usize::from(u16::from_be_bytes([*high, *low])) != body.len() {
        return None;
    }
    let (ips, ports) = match (family, body.len()) {
        (0x11, 12) => {
            let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
            ((ip(&body[..4]), ip(&body[4..8])), &body[8..])
        }
        (0x21, 36) => {
            let ip = |b: &[u8]| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).expect("16 bytes")));
            ((ip(&body[..16]), ip(&body[16..32])), &body[32..])
        }
        _ => return None,
    };
    let source_port = u16::from_be_bytes([ports[0], ports[1]]);
    let destination_port = u16::from_be_bytes([ports[2], ports[3]]);
    Some((SocketAddr::new(ips.0, source_port), SocketAddr::new(ips.1, destination_port)))
}
