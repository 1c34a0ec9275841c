//! The wire protocol: a fixed preamble, then length-prefixed JSON frames.
//!
//! This module knows bytes and messages, not sockets: everything here works on
//! any [`AsyncRead`](tokio::io::AsyncRead)/[`AsyncWrite`](tokio::io::AsyncWrite)
//! stream, so TCP, TLS and future QUIC streams share it. `docs/protocol.md`
//! describes the exchange in prose.

mod chunk;
mod codec;
mod datagram;
mod message;
mod peer;
mod preamble;
mod stun;
mod text;

pub use chunk::{
    chunk_header, encode_chunk, parse_front, ChunkFront, ChunkTooLarge, CHUNK_HEADER, MAX_CHUNK,
};
pub(crate) use codec::fill_to;
pub use codec::{
    encode_frame, read_frame, read_frame_buffered, write_frame, ControlChannel, ProtocolError, MAX_FRAME_LEN,
};
pub use datagram::{
    encode_datagram, read_datagram, tag_datagram, take_datagram, untag_datagram, DatagramTooLarge,
    DATAGRAM_HEADER, FLOW_TAG, MAX_DATAGRAM,
};
pub use message::{
    Answer, Challenge, ClientMessage, CloseReason, Compression, DataHello, DatagramCounts, LoginRefusal,
    OpenStream, PeerCounts, PeerReady, PortProtocol, Proof, ProxyProtocol, Query, RegisterError,
    ServerMessage, ServiceControl, ServiceInfo, ServiceSpec, StreamStatus,
};
pub use peer::{
    ForwardAnswer, ForwardHello, PeerOffer, PeerPath, PeerPolicy, PeerRefusal, MAX_CANDIDATES,
    PEER_STREAM_HEADER,
};
pub use preamble::{
    preamble, preamble_with, read_preamble, read_preamble_buffered, write_preamble, LinkKind, MAGIC,
    PREAMBLE_LEN, PROTOCOL_VERSION,
};
pub use stun::{
    binding_request, binding_success, parse_binding_request, parse_binding_success, TransactionId,
    MAGIC_COOKIE, MAX_STUN_MESSAGE, STUN_HEADER,
};
pub use text::{
    check_service, is_service_message, is_service_name, is_valid_id, ID_RULE, MAX_ID_LEN,
    MAX_SERVICE_MESSAGE_LEN, MAX_SERVICE_NAME_LEN, SERVICE_MESSAGE_RULE, SERVICE_NAME_RULE,
};
