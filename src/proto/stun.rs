//! STUN Binding (RFC 8489), on byte slices: what the server's `--stun-addr` answers and
//! what a client asks to learn its address as the internet sees it (server-reflexive).
//!
//! Only what a Binding needs: the 20-byte header (type, length, magic cookie, transaction
//! id) and the XOR-MAPPED-ADDRESS attribute. A request's other attributes are skipped;
//! anything that is not a well-formed Binding request gets no answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed value every STUN message carries after its length.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;

/// A STUN message header's length.
pub const STUN_HEADER: usize = 20;

/// Longest STUN message read; more is not a Binding request anyone sends.
pub const MAX_STUN_MESSAGE: usize = 1024;

const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A transaction id: matches an answer to its request.
pub type TransactionId = [u8; 12];

/// The transaction id of `message` if it is a well-formed Binding request.
pub fn parse_binding_request(message: &[u8]) -> Option<TransactionId> {
    let (kind, transaction, attributes) = parse_header(message)?;
    (kind == BINDING_REQUEST && attributes_well_formed(attributes)).then_some(transaction)
}

/// A Binding request with `transaction`.
pub fn binding_request(transaction: TransactionId) -> Vec<u8> {
    header(BINDING_REQUEST, 0, transaction)
}

/// The success answer to the Binding request `transaction`, telling the asker it came from
/// `seen`.
pub fn binding_success(transaction: TransactionId, seen: SocketAddr) -> Vec<u8> {
    let value = xor_address(seen, transaction);
    let mut message = header(BINDING_SUCCESS, 4 + value.len(), transaction);
    message.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    message.extend_from_slice(&(value.len() as u16).to_be_bytes());
    message.extend_from_slice(&value);
    message
}

/// The address in a Binding success answer to `transaction`; `None` for anything else.
pub fn parse_binding_success(message: &[u8], transaction: TransactionId) -> Option<SocketAddr> {
    let (kind, answered, mut attributes) = parse_header(message)?;
    if kind != BINDING_SUCCESS || answered != transaction {
        return None;
    }
    while let Some((kind, value, rest)) = next_attribute(attributes) {
        if kind == XOR_MAPPED_ADDRESS {
            return unxor_address(value, transaction);
        }
        attributes = rest;
    }
    None
}

/// Type, transaction id and attribute bytes of a well-framed STUN message.
fn parse_header(message: &[u8]) -> Option<(u16, TransactionId, &[u8])> {
    let header = message.get(..STUN_HEADER)?;
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let cookie = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    // The top two bits of a STUN message are zero, and lengths are multiples of 4.
    if kind & 0xC000 != 0
        || cookie != MAGIC_COOKIE
        || length % 4 != 0
        || message.len() != STUN_HEADER + length
    {
        return None;
    }
    let transaction: TransactionId = header[8..20].try_into().ok()?;
    Some((kind, transaction, &message[STUN_HEADER..]))
}

/// Whether `attributes` is a sequence of whole attributes.
fn attributes_well_formed(mut attributes: &[u8]) -> bool {
    while !attributes.is_empty() {
        match next_attribute(attributes) {
            Some((_, _, rest)) => attributes = rest,
            None => return false,
        }
    }
    true
}

/// The first attribute (type, value) and what follows it (values are padded to 4 bytes).
fn next_attribute(attributes: &[u8]) -> Option<(u16, &[u8], &[u8])> {
    let kind = u16::from_be_bytes([*attributes.first()?, *attributes.get(1)?]);
    let len = usize::from(u16::from_be_bytes([*attributes.get(2)?, *attributes.get(3)?]));
    let padded = len.checked_add(3)? / 4 * 4;
    let value = attributes.get(4..4 + len)?;
    let rest = attributes.get(4 + padded..)?;
    Some((kind, value, rest))
}

fn header(kind: u16, length: usize, transaction: TransactionId) -> Vec<u8> {
    let mut message = Vec::with_capacity(STUN_HEADER + length);
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&(length as u16).to_be_bytes());
    message.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    message.extend_from_slice(&transaction);
    message
}

/// The bytes an address is XORed with: the cookie, then (IPv6) the transaction id.
fn xor_key(transaction: TransactionId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    key[4..].copy_from_slice(&transaction);
    key
}

fn xor_address(addr: SocketAddr, transaction: TransactionId) -> Vec<u8> {
    let key = xor_key(transaction);
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let (family, ip): (u8, Vec<u8>) = match addr.ip().to_canonical() {
        IpAddr::V4(ip) => (1, ip.octets().to_vec()),
        IpAddr::V6(ip) => (2, ip.octets().to_vec()),
    };
    let mut value = vec![0, family];
    value.extend_from_slice(&port.to_be_bytes());
    value.extend(ip.iter().zip(key).map(|(byte, k)| byte ^ k));
    value
}

fn unxor_address(value: &[u8], transaction: TransactionId) -> Option<SocketAddr> {
    let key = xor_key(transaction);
    let port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]) ^ (MAGIC_COOKIE >> 16) as u16;
    let ip = value.get(4..)?;
    let ip: Vec<u8> = ip.iter().zip(key).map(|(byte, k)| byte ^ k).collect();
    let ip = match (value.get(1)?, ip.len()) {
        (1, 4) => IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])),
        (2, 16) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(ip.as_slice()).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_request_gets_the_address_it_came_from() {
        let transaction = *b"0123456789ab";
        let request = binding_request(transaction);
        assert_eq!(parse_binding_request(&request), Some(transaction));
        for seen in ["203.0.113.7:40000", "[2001:db8::1]:53", "[::ffff:192.0.2.1]:7"] {
            let seen: SocketAddr = seen.parse().unwrap();
            let answer = binding_success(transaction, seen);
            let expected = SocketAddr::new(seen.ip().to_canonical(), seen.port());
            assert_eq!(parse_binding_success(&answer, transaction), Some(expected));
            assert_eq!(parse_binding_success(&answer, *b"another-one!"), None, "another transaction");
            assert_eq!(parse_binding_request(&answer), None, "an answer is no request");
        }
    }

    #[test]
    fn the_rfc_5769_ipv4_answer_reads_right() {
        // RFC 5769 2.2's sample response (its SOFTWARE, MESSAGE-INTEGRITY and FINGERPRINT
        // attributes are skipped): 192.0.2.1:32853.
        let transaction = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];
        let mut answer = header(BINDING_SUCCESS, 12, transaction);
        answer.extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
        assert_eq!(parse_binding_success(&answer, transaction), Some("192.0.2.1:32853".parse().unwrap()));
    }

    #[test]
    fn anything_else_gets_no_answer() {
        let request = binding_request(*b"0123456789ab");
        let mut wrong_cookie = request.clone();
        wrong_cookie[4] ^= 1;
        let mut wrong_length = request.clone();
        wrong_length[3] = 4;
        let mut cut_attribute = request.clone();
        cut_attribute[3] = 4;
        cut_attribute.extend_from_slice(&[0x80, 0x22, 0x00, 0x08]);
        let mut with_software = request.clone();
        with_software[3] = 8;
        with_software.extend_from_slice(&[0x80, 0x22, 0x00, 0x03, b'a', b'b', b'c', 0]);
        assert_eq!(parse_binding_request(&with_software), Some(*b"0123456789ab"), "attributes are skipped");
        for bad in [&request[..19], &wrong_cookie, &wrong_length, &cut_attribute, b"GET / HTTP/1.1\r\n\r\n"] {
            assert_eq!(parse_binding_request(bad), None);
        }
    }
}
