//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): not an API.
//!
//! One function per target. Each hands arbitrary bytes to the real code (never a copy of
//! it), with no sockets: async code runs on one current-thread runtime over in-memory
//! pipes. Each checks invariants, not only that nothing panics, and panics when one breaks,
//! which libFuzzer reports as a crash. `fuzz/README.md` lists what each one asserts.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;

use crate::config::options::{parse_config, ClientOptions, ServerOptions};
use crate::proto::{
    encode_frame, parse_front, preamble, read_frame, read_frame_buffered, read_preamble_buffered, ChunkFront,
    ClientMessage, ControlChannel, DataHello, ForwardAnswer, ForwardHello, OpenStream, ProtocolError,
    ProxyProtocol, ServerMessage, StreamStatus, MAX_CHUNK, MAX_FRAME_LEN, PREAMBLE_LEN,
};
use crate::relay::{relay_chunked, RelayError, Status};
use crate::server::http_head::{
    head_end, parse_head, rewrite_head, BodyLength, Forwarding, Head, MAX_HEADERS,
};
use crate::server::http_requests::{strip_path_prefix, Pinning, RequestStream};
use crate::server::ServerShared;
use crate::transport::Stream;
use crate::ServerConfig;

/// Longest any one input may keep the runtime busy before the target calls it a hang.
const HANG: Duration = Duration::from_secs(5);

/// Runs `future` to its end on the one runtime of this process.
fn block_on<F: Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
    });
    runtime.block_on(async { tokio::time::timeout(HANG, future).await.expect("an input hung the target") })
}

/// A pipe whose `far` end has written `bytes` and closed its writing half, in pieces of
/// at most `piece` bytes (so readers see partial reads). The far end stays open for reading.
async fn pipe_with(bytes: &[u8], piece: usize) -> (DuplexStream, DuplexStream) {
    // Room for all of `bytes` and for what the near end answers: nobody waits for a reader.
    let (near, mut far) = tokio::io::duplex(bytes.len() + 64 * 1024);
    for part in bytes.chunks(piece.max(1)) {
        far.write_all(part).await.expect("the pipe has room");
    }
    far.shutdown().await.expect("a pipe closes");
    (near, far)
}

// ---------------------------------------------------------------- control connection

/// The preamble and length-prefixed JSON frames of a control or data connection, decoded
/// as every message type. Asserts: a preamble parses only as the bytes `preamble` writes;
/// a frame over [`MAX_FRAME_LEN`] is refused before its body; the buffered and unbuffered
/// readers agree; a decoded message re-encodes to a frame that decodes to the same encoding.
pub fn control_frames(data: &[u8]) {
    block_on(async {
        let mut reader = data;
        let mut buf = BytesMut::new();
        if let Ok(kind) = read_preamble_buffered(&mut reader, &mut buf).await {
            assert_eq!(&preamble(kind)[..], &data[..PREAMBLE_LEN], "a preamble parses as what was written");
        }
        let mut rest = data;
        while let Some(header) = rest.get(..4) {
            let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
            check_frame::<ClientMessage>(rest, len).await;
            check_frame::<ServerMessage>(rest, len).await;
            check_frame::<DataHello>(rest, len).await;
            check_frame::<OpenStream>(rest, len).await;
            check_frame::<ForwardHello>(rest, len).await;
            check_frame::<ForwardAnswer>(rest, len).await;
            match rest.get(4 + len..) {
                Some(next) if len <= MAX_FRAME_LEN => rest = next,
                _ => break,
            }
        }
    })
}

/// Decodes the frame at the front of `bytes` (announcing `len`) as an `M`, both ways.
async fn check_frame<M: Serialize + DeserializeOwned>(bytes: &[u8], len: usize) {
    let (mut buffered, mut direct) = (bytes, bytes);
    let mut buf = BytesMut::new();
    let first: Result<M, _> = read_frame_buffered(&mut buffered, &mut buf).await;
    let second: Result<M, _> = read_frame(&mut direct).await;
    match (&first, &second) {
        (Ok(message), Ok(_)) => {
            assert!(len <= MAX_FRAME_LEN && bytes.len() >= 4 + len);
            assert_eq!(buf.len() + buffered.len(), bytes.len() - 4 - len, "bytes after the frame are kept");
            assert_eq!(direct.len(), bytes.len() - 4 - len, "read_frame reads one frame only");
            round_trip(message).await;
        }
        (Err(ProtocolError::FrameTooLarge), Err(ProtocolError::FrameTooLarge)) => {
            assert!(len > MAX_FRAME_LEN)
        }
        (Err(ProtocolError::Closed), Err(ProtocolError::Closed)) => assert!(bytes.len() < 4 + len),
        (Err(ProtocolError::Malformed(_)), Err(ProtocolError::Malformed(_))) => assert!(len <= MAX_FRAME_LEN),
        _ => panic!("the two frame readers disagree: {:?} / {:?}", first.err(), second.err()),
    }
}

/// Encodes `message`, decodes it, encodes it again: both encodings are the same bytes.
async fn round_trip<M: Serialize + DeserializeOwned>(message: &M) {
    let mut encoded = Vec::new();
    if let Err(err) = encode_frame(message, &mut encoded) {
        // Defaults spelled out may make a frame near the limit longer than it came.
        assert!(matches!(err, ProtocolError::FrameTooLarge), "{err:?}");
        return;
    }
    let decoded: M = read_frame(&mut encoded.as_slice()).await.expect("an encoded frame decodes");
    let mut again = Vec::new();
    encode_frame(&decoded, &mut again).expect("it encoded before");
    assert_eq!(encoded, again, "encode(decode(encode(m))) == encode(m)");
}

// ---------------------------------------------------------------- data path

/// The chunks of a data connection through the relay's real decoder. The first byte picks
/// whether a status byte comes first and how small the pipe's writes are. Asserts: the
/// plain side gets exactly the payloads a walk with [`parse_front`] finds, the relay ends
/// cleanly exactly when the input holds a whole direction, and what follows its end
/// marker is handed back as leftover.
pub fn data_chunks(data: &[u8]) {
    let Some((&selector, link_bytes)) = data.split_first() else { return };
    let expect_status = selector & 1 == 1;
    let walked = walk_chunks(link_bytes, expect_status);
    block_on(async {
        let (mut link, _link_far) = pipe_with(link_bytes, usize::from(selector >> 1) + 1).await;
        let (mut plain, mut plain_far) = tokio::io::duplex(walked.payload.len() + 1024);
        plain_far.shutdown().await.expect("a pipe closes");
        let status = if expect_status { Status::Expect } else { Status::Send };
        let relayed = relay_chunked(&mut plain, &mut link, status, BytesMut::new(), None).await;
        drop(plain);
        let mut delivered = Vec::new();
        plain_far.read_to_end(&mut delivered).await.expect("a pipe reads");
        match (relayed, walked.end) {
            (Ok(relayed), WalkEnd::Complete(at)) => {
                assert_eq!(delivered, walked.payload, "the payloads, nothing else");
                assert_eq!(relayed.r#in, walked.payload.len() as u64);
                let mut after = relayed.leftover.to_vec();
                link.read_to_end(&mut after).await.expect("a pipe reads");
                assert_eq!(after, &link_bytes[at..], "what follows the end marker: leftover, then unread");
            }
            (Err(RelayError::LocalUnavailable), WalkEnd::Refused) => assert!(delivered.is_empty()),
            (Err(RelayError::Link { .. }), WalkEnd::TooLarge | WalkEnd::Truncated) => {
                assert!(walked.payload.starts_with(&delivered), "a prefix of the payloads");
            }
            (relayed, end) => panic!("relay {relayed:?} for an input that is {end:?}"),
        }
    });
    datagram_frames(link_bytes);
}

/// The same bytes as a UDP flow's framed datagrams: whole datagrams in order, each the
/// bytes after its header, then a clean end exactly at the last one, or an error for a
/// cut one.
fn datagram_frames(link_bytes: &[u8]) {
    block_on(async {
        let (mut rest, mut buf, mut seen) = (link_bytes, BytesMut::new(), 0usize);
        loop {
            match crate::proto::read_datagram(&mut rest, &mut buf).await {
                Ok(Some(datagram)) => {
                    let start = seen + crate::proto::DATAGRAM_HEADER;
                    assert_eq!(link_bytes.get(start..start + datagram.len()), Some(&datagram[..]));
                    seen = start + datagram.len();
                }
                Ok(None) => return assert_eq!(seen, link_bytes.len(), "a clean end only after the last"),
                Err(_) => return assert!(seen < link_bytes.len(), "an error only for a cut datagram"),
            }
        }
    })
}

/// How a walk over chunks ended.
#[derive(Debug)]
enum WalkEnd {
    /// At an end marker; the direction is over at this offset.
    Complete(usize),
    /// At a status byte that refuses.
    Refused,
    /// At a header over [`MAX_CHUNK`].
    TooLarge,
    /// The bytes ran out first.
    Truncated,
}

/// What a walk over chunks found.
struct Walk {
    payload: Vec<u8>,
    end: WalkEnd,
}

/// Walks `bytes` with [`parse_front`] alone, the oracle for the relay.
fn walk_chunks(bytes: &[u8], mut expect_status: bool) -> Walk {
    let (mut at, mut payload) = (0, Vec::new());
    let end = loop {
        let front = match parse_front(&bytes[at..], expect_status) {
            Err(too_large) => {
                assert!(too_large.0 > MAX_CHUNK);
                break WalkEnd::TooLarge;
            }
            Ok(None) => break WalkEnd::Truncated,
            Ok(Some((front, used))) => {
                at += used;
                front
            }
        };
        match front {
            ChunkFront::Status(StreamStatus::Ready) => expect_status = false,
            ChunkFront::Status(StreamStatus::LocalUnavailable) => break WalkEnd::Refused,
            ChunkFront::End => break WalkEnd::Complete(at),
            ChunkFront::Chunk(len) => {
                assert!(len > 0 && len <= MAX_CHUNK as usize, "a parsed length within the cap");
                let end = (at + len).min(bytes.len());
                payload.extend_from_slice(&bytes[at..end]);
                if end < at + len {
                    break WalkEnd::Truncated;
                }
                at = end;
            }
        }
    };
    assert!(at <= bytes.len());
    Walk { payload, end }
}

// ---------------------------------------------------------------- login

/// A server's shared state built from `config`, as `Server::bind` builds it, but with no
/// listener bound. Called outside [`block_on`] only.
fn bind_without_listeners(config: ServerConfig) -> Arc<ServerShared> {
    let config = ServerConfig { addr: Some(SocketAddr::from(([127, 0, 0, 1], 0))), ..config };
    config.validate().expect("a valid config");
    block_on(async { ServerShared::new(config).expect("a server's state") })
}

/// Servers to log in to: one with user `id1` (secret `secret1`), one with allow-any-client.
fn login_servers() -> &'static [Arc<ServerShared>; 2] {
    static SERVERS: OnceLock<[Arc<ServerShared>; 2]> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let mut config = ServerConfig::default().with_user("id1", "secret1");
        // No bans: every input starts from the same state.
        config.reconnect_times = 0;
        config.handshake_timeout = Duration::from_millis(500);
        let open = ServerConfig { allow_any_client: true, users: Default::default(), ..config.clone() };
        [bind_without_listeners(config), bind_without_listeners(open)]
    })
}

/// The server's side of a login (hello, then proof), fed arbitrary bytes after the
/// preamble. The first byte picks the server, TLS or not, and the client's address.
/// Asserts: the login ends, never accepts (the bytes cannot know a secret or the
/// server's fresh keys), and everything the server sent is a well-formed plain frame:
/// challenges, then at most one refusal.
pub fn login(data: &[u8]) {
    let Some((&selector, client_bytes)) = data.split_first() else { return };
    let shared = &login_servers()[usize::from(selector & 1)];
    let tls = selector & 2 != 0;
    let ip = if selector & 4 != 0 { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::from([203, 0, 113, 7]) };
    block_on(async {
        let (near, mut far) = pipe_with(client_bytes, usize::from(selector >> 3) + 1).await;
        let mut chan = ControlChannel::new(Box::new(near) as Stream);
        let accepted = crate::server::login::login(shared, &mut chan, SocketAddr::new(ip, 40000), tls).await;
        assert!(accepted.is_none(), "a login was accepted without the secret");
        drop(chan);
        let mut sent = Vec::new();
        far.read_to_end(&mut sent).await.expect("a pipe reads");
        let mut reader = sent.as_slice();
        let mut refused = false;
        while !reader.is_empty() {
            assert!(!refused, "nothing after a refusal");
            match read_frame::<_, ServerMessage>(&mut reader).await.expect("the server sends whole frames") {
                ServerMessage::Challenge { .. } => {}
                ServerMessage::LoginRefused { .. } => refused = true,
                other => panic!("the server sent {other:?} during a login"),
            }
        }
    })
}

// ---------------------------------------------------------------- HTTP

/// The HTTP request head: where it ends, how it parses, how it is rewritten. The first
/// byte picks the routing header (`Host` or `X-Tunnel`), where an earlier search for the
/// end stopped, and the visitor's address. Asserts: searching on from an earlier partial
/// search finds the same end; the routing key is the lowercased routing header without
/// port; the rewritten head is one whole head that parses again to the same routing key
/// (the later-heads check compares it), target, method, version, body framing and upgrade;
/// with `use-local-as-http-host` its only `Host` is the local one, and with path routing
/// its target is the stripped one.
pub fn http_head(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    let mux = if selector & 1 == 0 { "Host" } else { "X-Tunnel" };
    let end = head_end(bytes, 0);
    let searched = usize::from(selector >> 1).min(bytes.len());
    if head_end(&bytes[..searched], 0).is_none() {
        assert_eq!(head_end(bytes, searched), end, "an incremental search finds the same end");
    }
    let Some(end) = end else { return };
    assert!(end <= bytes.len());
    let Ok(head) = parse_head(&bytes[..end], mux) else { return };
    assert!(!head.route_host.bytes().any(|b| b.is_ascii_uppercase()), "the routing key is lowercased");
    let peer = if selector & 0x80 == 0 {
        IpAddr::from([192, 0, 2, 1])
    } else {
        IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])
    };
    if head.headers.len() > MAX_HEADERS - ADDED_HEADERS {
        // The headers ferry adds may take the rewrite past the limit of its own parser;
        // the local service judges such a head (by design, see fuzz/README.md).
        return;
    }
    let forwarding = Forwarding { local_host: None, peer, scheme: "http" };
    let again = reparse(&rewrite_head(&head, None, &forwarding), mux);
    assert_same_request(&head, &again, &head.target);
    assert_eq!(again.route_host, head.route_host, "routing and the later-heads check read the same key");

    let pinned = Forwarding { local_host: Some("local.test:8080".into()), ..forwarding.clone() };
    let again = reparse(&rewrite_head(&head, None, &pinned), mux);
    let hosts: Vec<_> = again.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case("host")).collect();
    assert_eq!(hosts.len(), 1, "one Host header");
    assert_eq!(hosts[0].1, b"local.test:8080", "the pinned Host");

    // Path routing strips `/ID` (and `/ID/PREFIX`) off the target, as the router does.
    let path = head.target.split('?').next().unwrap_or_default();
    for segments in 1..=2 {
        let used: Vec<&str> = path.trim_start_matches('/').split('/').take(segments).collect();
        let prefix = format!("/{}", used.join("/"));
        if let Some(stripped) = strip_path_prefix(&head.target, &prefix) {
            assert!(stripped.starts_with('/'), "a stripped target is still in origin form");
            let again = reparse(&rewrite_head(&head, Some(&stripped), &forwarding), mux);
            assert_same_request(&head, &again, &stripped);
        }
    }
}

/// Most headers `rewrite_head` adds: `Host` (when pinned), `X-Forwarded-For`, `-Proto`,
/// `-Host` and `Forwarded`.
const ADDED_HEADERS: usize = 5;

/// Parses a head ferry wrote, which must be one whole head.
fn reparse(rewritten: &[u8], mux: &str) -> Head {
    assert_eq!(head_end(rewritten, 0), Some(rewritten.len()), "a rewritten head is one whole head");
    match parse_head(rewritten, mux) {
        Ok(head) => head,
        Err(why) => panic!("a rewritten head does not parse: {why}\n{}", String::from_utf8_lossy(rewritten)),
    }
}

fn assert_same_request(head: &Head, again: &Head, target: &str) {
    assert_eq!((again.method.as_str(), again.target.as_str()), (head.method.as_str(), target));
    assert_eq!(again.minor_version, head.minor_version);
    assert_eq!(again.body, head.body, "the body is framed the same way");
    assert_eq!(again.upgrade, head.upgrade);
}

/// The requests after the first on one HTTP visitor connection (`RequestStream`): later
/// heads, fixed and chunked bodies, upgrades. The first byte picks path routing and
/// whether an upgrade is accepted. Asserts: what reaches the local service, framed the way
/// a server reads it, is heads that parse and name the pinned host (never another one),
/// each with the body its head frames; nothing waits except for an upgrade's answer.
pub fn http_requests(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    let first = parse_head(b"GET /id1/ HTTP/1.1\r\nHost: app\r\n\r\n", "Host").expect("a valid head");
    let forwarding = Forwarding { local_host: None, peer: IpAddr::from([192, 0, 2, 1]), scheme: "http" };
    let path_prefix = (selector & 1 == 1).then(|| "/id1".to_owned());
    let head_timeout = Duration::from_secs(1);
    let pinning = Pinning {
        route_host: "app".into(),
        mux_header: "Host".into(),
        path_prefix,
        forwarding,
        head_timeout,
    };
    let refuse_upgrades = selector & 2 != 0;
    let answer: &[u8] = if !refuse_upgrades {
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    } else {
        b"HTTP/1.1 400 No\r\n\r\n"
    };
    // Unconstrained: a spent cooperative budget would read as pending too.
    let out = block_on(tokio::task::unconstrained(async {
        let (near, _far) = pipe_with(bytes, usize::from(selector >> 2) * 4 + 1).await;
        let mut stream = RequestStream::after_first(near, &first, BytesMut::new(), pinning);
        let (mut out, mut buf, mut answered) = (Vec::new(), [0u8; 4096], false);
        loop {
            match stream.read(&mut buf).now_or_never() {
                Some(Ok(0)) | Some(Err(_)) => break out,
                Some(Ok(n)) => {
                    out.extend_from_slice(&buf[..n]);
                    answered = false;
                }
                None => {
                    // Each upgrade request waits for its answer, once.
                    assert!(!answered, "the requests wait with nothing to wait for");
                    stream.write_all(answer).await.expect("the pipe has room");
                    answered = true;
                }
            }
        }
    }));
    check_passed_on(&out, refuse_upgrades);
}

/// Reads what `RequestStream` passed on as a server would: each head, then its body; after
/// an upgrade request, more heads only when upgrades were refused.
fn check_passed_on(mut out: &[u8], refuse_upgrades: bool) {
    while !out.is_empty() {
        let end = head_end(out, 0).expect("what is passed on starts with a whole head");
        let head = match parse_head(&out[..end], "Host") {
            Ok(head) => head,
            // The headers ferry adds may take a head past its own limit (see `http_head`).
            Err(why) if why.contains("too many headers") => return,
            Err(why) => panic!("a passed-on head does not parse: {why}"),
        };
        assert_eq!(head.route_host, "app", "a later head names the pinned host");
        out = &out[end..];
        if head.upgrade && !refuse_upgrades {
            return; // Switched: raw bytes follow.
        }
        out = match head.body {
            BodyLength::Fixed(len) => {
                out.get(usize::try_from(len).unwrap_or(usize::MAX)..).unwrap_or_default()
            }
            BodyLength::Chunked => skip_chunked(out),
        };
    }
}

/// The bytes after a chunked body in ferry's normal form (`size\r\n data \r\n`, then
/// `0\r\n\r\n`); empty when the body is cut short.
fn skip_chunked(mut out: &[u8]) -> &[u8] {
    loop {
        let Some(at) = out.windows(2).position(|w| w == b"\r\n") else { return &[] };
        let size = std::str::from_utf8(&out[..at]).ok().and_then(|s| u64::from_str_radix(s, 16).ok());
        let size = usize::try_from(size.expect("a chunk size in hex")).unwrap_or(usize::MAX);
        out = &out[at + 2..];
        if size == 0 {
            return match out.strip_prefix(b"\r\n") {
                Some(rest) => rest,
                None => {
                    assert!(b"\r\n".starts_with(out), "the end of a chunked body");
                    &[]
                }
            };
        }
        let Some(rest) = out.get(size.saturating_add(2)..) else { return &[] };
        assert_eq!(&out[size..size + 2], b"\r\n", "chunk data ends with CRLF");
        out = rest;
    }
}

// ---------------------------------------------------------------- TLS and PROXY

/// The ClientHello reader of `sni-addr`. The first byte sets the size of the pieces the
/// bytes arrive in. Asserts: the bytes kept for passthrough are exactly the bytes read,
/// never more than the cap (plus one read), and a name found is a plain DNS name.
pub fn client_hello(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    block_on(async {
        let (mut near, _far) = pipe_with(bytes, usize::from(selector) * 8 + 1).await;
        let mut raw = BytesMut::new();
        let name = crate::server::sni::read_client_hello(&mut near, &mut raw).await;
        assert!(bytes.starts_with(&raw), "the kept bytes are the bytes read, untouched");
        assert!(raw.len() <= crate::server::sni::MAX_HELLO + 4096 + 1024);
        if let Some(name) = name {
            assert!((1..=253).contains(&name.len()), "{name:?}");
            let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
            assert!(name.bytes().all(plain), "{name:?} is not a plain DNS name");
        }
    })
}

/// The PROXY protocol header announcing `visitor` to a service behind `public` (v2 when
/// `binary`). The fuzz target parses it back strictly.
pub fn proxy_header(binary: bool, visitor: SocketAddr, public: SocketAddr) -> Vec<u8> {
    let version = if binary { ProxyProtocol::V2 } else { ProxyProtocol::V1 };
    crate::server::proxy_header::proxy_header(version, visitor, public)
}

// ---------------------------------------------------------------- config files

/// A config or users file. The first byte picks the kind (server, client, users) and the
/// syntax (YAML or TOML). Asserts: options that parse survive a round trip through their
/// serialised form (what overlaying flags does) unchanged, and turning them into
/// configurations returns (an error or a config) without panicking.
pub fn config_file(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let toml = selector & 1 == 1;
    match (selector >> 1) % 3 {
        0 => {
            let Ok(options) = parse_config::<ServerOptions>(text, toml, "fuzz") else { return };
            let mut options = round_trip_options(options);
            // A users file named here would be read from disk: not this target's business.
            if let Some(users) = options.users.as_mut() {
                users.file = None;
            }
            let _ = options.into_config();
        }
        1 => {
            let Ok(options) = parse_config::<ClientOptions>(text, toml, "fuzz") else { return };
            let _ = round_trip_options(options).into_config();
        }
        _ => {
            let _ = crate::config::file::parse_users(text, toml, "fuzz");
        }
    }
}

/// `options` through JSON and back: the same JSON both times.
fn round_trip_options<T: Serialize + DeserializeOwned>(options: T) -> T {
    let json = serde_json::to_value(&options).expect("options serialise");
    let back: T = serde_json::from_value(json.clone()).expect("serialised options parse back");
    assert_eq!(serde_json::to_value(&back).expect("options serialise"), json, "options survive a round trip");
    back
}

// ---------------------------------------------------------------- APIs

/// The API's secret for [`api_request`].
const API_TOKEN: &str = "fuzzing-token-0123456789";

/// Servers whose management API is fuzzed: one with a token, one without.
fn api_servers() -> &'static [Arc<ServerShared>; 2] {
    static SERVERS: OnceLock<[Arc<ServerShared>; 2]> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let mut open = ServerConfig::default().with_user("id1", "secret1");
        open.reconnect_times = 0;
        let guarded = ServerConfig { api_token: Some(API_TOKEN.into()), ..open.clone() };
        [bind_without_listeners(open), bind_without_listeners(guarded)]
    })
}

/// A request to the management API (its router, without a socket), or the JSON body of an
/// auth API answer. The first byte picks which, and for the API the server (token or
/// not) and the caller's address; the rest is lines: `METHOD TARGET`, `Host`, then
/// `Authorization`. Asserts: no request makes the API fail (500); no guarded route
/// answers 2xx without the token (with one) or for a non-loopback `Host` (without);
/// an auth API answer that allows gives settings the server can turn into rules.
pub fn api(data: &[u8]) {
    let Some((&selector, bytes)) = data.split_first() else { return };
    if selector & 1 == 1 {
        return auth_answer(bytes);
    }
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let mut lines = text.split('\n');
    let (request_line, host, authorization) = (lines.next(), lines.next(), lines.next());
    let Some((method, target)) = request_line.and_then(|l| l.split_once(' ')) else { return };
    let guarded = selector & 2 != 0;
    let shared = api_servers()[usize::from(guarded)].clone();
    let mut request = axum::http::Request::builder().method(method).uri(target);
    if let Some(host) = host {
        request = request.header(axum::http::header::HOST, host);
    }
    if let Some(authorization) = authorization {
        request = request.header(axum::http::header::AUTHORIZATION, authorization);
    }
    let Ok(mut request) = request.body(axum::body::Body::empty()) else { return };
    let ip = if selector & 4 != 0 { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::from([203, 0, 113, 7]) };
    request.extensions_mut().insert(crate::server::api::Peer(SocketAddr::new(ip, 40000)));
    let path = request.uri().path().to_owned();
    let response = block_on(tower_service::Service::call(&mut crate::server::api::router(shared), request))
        .expect("a router does not fail");
    let status = response.status();
    assert_ne!(status.as_u16(), 500, "{method} {target}");
    let open_route = path == "/" || path == "/openapi.json";
    if status.is_success() && !open_route {
        match guarded {
            true => assert_eq!(authorization, Some(format!("Bearer {API_TOKEN}").as_str()), "{path}"),
            false => assert!(host.is_some_and(crate::server::api::host::is_loopback_host), "{path}"),
        }
    }
}

/// The body of an auth API answer.
fn auth_answer(body: &[u8]) {
    use crate::server::auth_api::{read_answer, ApiAnswer};
    if let Ok(ApiAnswer::Allowed(user)) = read_answer(body) {
        let config = &api_servers()[0].config;
        let _ = crate::server::users::Rules::resolve(config, Some(&user));
    }
}

// ---------------------------------------------------------------- transports

/// Target `transports`: what a client reads about its way to the server. The first byte
/// picks: 0, a `--remote` URL; 1, a `--proxy` URL; 2, a `NO_PROXY` list and a host (split
/// at the first newline); 3, a WebSocket upgrade request's headers (`name: value` lines);
/// 255, a STUN message (what `--stun-addr` reads, and what a client reads back);
/// anything else, an HTTP proxy's answer to `CONNECT`, as it arrives.
///
/// Asserts: a remote or proxy that parses prints as text that parses to the same thing,
/// and a proxy's printed form and errors never show its password; `*` in `NO_PROXY`
/// covers every host; an upgrade key is one of the request's header values; a proxy
/// answer is judged only once its head is whole (or too long), and a 2xx head length
/// ends with the blank line; a STUN Binding request gets an answer that reads back as
/// the address it was sent to.
pub fn transports(data: &[u8]) {
    use crate::transport::{ProxyAddr, RemoteAddr};
    let Some((&selector, rest)) = data.split_first() else { return };
    let text = String::from_utf8_lossy(rest);
    match selector {
        0 => {
            if let Ok(remote) = RemoteAddr::parse(&text) {
                let again = RemoteAddr::parse(&remote.to_string()).expect("a printed remote parses");
                assert_eq!(again, remote, "{text:?} printed as {remote}");
            }
        }
        1 => match ProxyAddr::parse(&text) {
            Ok(proxy) => {
                let scheme =
                    if proxy.kind == crate::transport::ProxyKind::Socks5 { "socks5" } else { "http" };
                let host =
                    if proxy.host.contains(':') { format!("[{}]", proxy.host) } else { proxy.host.clone() };
                let user =
                    proxy.credentials.as_ref().map(|(user, _)| format!("{user}:***@")).unwrap_or_default();
                // The password is never printed: the printed form is exactly this.
                assert_eq!(proxy.to_string(), format!("{scheme}://{user}{host}:{}", proxy.port));
                if proxy.credentials.is_none() {
                    let again = ProxyAddr::parse(&proxy.to_string()).expect("a printed proxy parses");
                    assert_eq!((again.kind, &again.host, again.port), (proxy.kind, &proxy.host, proxy.port));
                }
            }
            Err(err) => {
                // The error must not depend on the password: the same input with another
                // password of the same length (no escapes, which could fail on their own) fails alike.
                let rest_at = text.find("://").map_or(0, |at| at + 3);
                let userinfo_end = text.rfind('@').filter(|at| *at >= rest_at);
                let password = userinfo_end.and_then(|end| {
                    let colon = text[rest_at..end].find(':')? + rest_at;
                    Some((colon + 1, end))
                });
                if let Some((start, end)) = password.filter(|(s, e)| !text[*s..*e].contains('%')) {
                    let other = format!("{}{}{}", &text[..start], "x".repeat(end - start), &text[end..]);
                    if let Err(other_err) = ProxyAddr::parse(&other) {
                        assert_eq!(err.to_string(), other_err.to_string(), "the error shows the password");
                    }
                }
            }
        },
        2 => {
            let (list, host) = text.split_once('\n').unwrap_or((&text, "example.com"));
            let covered = crate::transport::no_proxy_covers(list, host);
            if list.split(',').any(|entry| entry.trim() == "*") {
                assert!(covered, "'*' covers {host:?}");
            }
        }
        255 => {
            use crate::proto::{binding_success, parse_binding_request, parse_binding_success};
            if let Some(transaction) = parse_binding_request(rest) {
                for seen in ["198.51.100.9:3478", "[2001:db8::9]:1"] {
                    let seen: std::net::SocketAddr = seen.parse().expect("an address");
                    let answer = binding_success(transaction, seen);
                    assert_eq!(parse_binding_success(&answer, transaction), Some(seen));
                }
            }
            let transaction: [u8; 12] = rest.get(8..20).and_then(|t| t.try_into().ok()).unwrap_or_default();
            let _ = parse_binding_success(rest, transaction);
        }
        3 => {
            let headers: Vec<(String, Vec<u8>)> = text
                .lines()
                .filter_map(|line| line.split_once(':'))
                .map(|(name, value)| (name.to_owned(), value.as_bytes().to_vec()))
                .collect();
            if let Some(key) = crate::transport::websocket_upgrade_key(&headers) {
                assert!(!key.is_empty() && headers.iter().any(|(_, v)| v.trim_ascii() == key));
            }
        }
        _ => {
            let mut seen = 0;
            for end in (1..=rest.len()).step_by(37).chain([rest.len()]) {
                match crate::transport::read_connect_answer(&rest[..end], selector & 1 != 0) {
                    None => assert!(end <= 8 * 1024, "an answer past the cap is still awaited"),
                    Some(Ok(head)) => {
                        assert!(head <= end && rest[..head].ends_with(b"\r\n\r\n"));
                        seen += 1;
                    }
                    Some(Err(_)) => seen += 1,
                }
                if seen > 0 {
                    break;
                }
            }
        }
    }
}
