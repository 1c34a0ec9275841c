//! PROXY protocol headers (v1 text, v2 binary) that tell a TCP service who the visitor is.

use std::net::{IpAddr, SocketAddr};

use crate::proto::ProxyProtocol;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header announcing a connection from `visitor` to `public` (the tunnel's port).
pub(crate) fn proxy_header(version: ProxyProtocol, visitor: SocketAddr, public: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(visitor.ip(), public.ip());
    match version {
        ProxyProtocol::V1 => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!("PROXY {family} {source} {destination} {} {}\r\n", visitor.port(), public.port())
                .into_bytes()
        }
        ProxyProtocol::V2 => {
            let mut header = V2_SIGNATURE.to_vec();
            header.push(0x21); // version 2, PROXY command
            match (source, destination) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    header.extend_from_slice(&[0x11, 0, 12]);
                    header.extend_from_slice(&s.octets());
                    header.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    header.extend_from_slice(&[0x21, 0, 36]);
                    header.extend_from_slice(&to_v6(s));
                    header.extend_from_slice(&to_v6(d));
                }
            }
            header.extend_from_slice(&visitor.port().to_be_bytes());
            header.extend_from_slice(&public.port().to_be_bytes());
            header
        }
    }
}

/// Both addresses in one family: IPv4 when both are (or map to) IPv4, else IPv6.
fn same_family(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    let a = a.to_canonical();
    let b = b.to_canonical();
    if a.is_ipv4() == b.is_ipv4() {
        (a, b)
    } else {
        (IpAddr::V6(ipv6(a)), IpAddr::V6(ipv6(b)))
    }
}

fn ipv6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn to_v6(ip: IpAddr) -> [u8; 16] {
    ipv6(ip).octets()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_layouts() {
        let visitor: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let public: SocketAddr = "198.51.100.2:2222".parse().unwrap();
        assert_eq!(
            proxy_header(ProxyProtocol::V1, visitor, public),
            b"PROXY TCP4 192.0.2.1 198.51.100.2 5000 2222\r\n"
        );
        let v2 = proxy_header(ProxyProtocol::V2, visitor, public);
        assert_eq!(&v2[..12], &V2_SIGNATURE);
        assert_eq!(&v2[12..16], &[0x21, 0x11, 0, 12]);
        assert_eq!(&v2[16..20], &[192, 0, 2, 1]);
        assert_eq!(&v2[24..28], &[0x13, 0x88, 0x08, 0xae]);
        let v6 = proxy_header(ProxyProtocol::V2, "[::1]:1".parse().unwrap(), public);
        assert_eq!(v6[13], 0x21);
        assert_eq!(v6.len(), 16 + 36);
    }
}
