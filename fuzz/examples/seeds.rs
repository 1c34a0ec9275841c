//! Writes the seed corpus of every fuzz target into `fuzz/seeds/<target>/`: valid
//! examples of what each target parses (frames of every message type, chunks, logins,
//! request heads, a real ClientHello, config files from the repository, API requests).
//! Run from the repository: `cargo run --manifest-path fuzz/Cargo.toml --example seeds`.
//! Each seed starts with the selector byte its target reads first (see `ferry::fuzzing`).

use std::fs;
use std::path::{Path, PathBuf};

use ferry::proto::{
    encode_chunk, encode_frame, preamble, Answer, Challenge, ClientMessage, CloseReason, DataHello, LinkKind,
    Compression, DatagramCounts, LoginRefusal, OpenStream, PortProtocol, Proof, ProxyProtocol, Query, RegisterError,
    ServerMessage, ServiceControl, ServiceInfo, ServiceSpec, ForwardAnswer, ForwardHello, PeerOffer, PeerPath,
    PeerReady, PeerRefusal,
};
use serde::Serialize;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seeds = root.join("seeds");
    control_frames(&seeds.join("control_frames"));
    data_chunks(&seeds.join("data_chunks"));
    login(&seeds.join("login"));
    http_head(&seeds.join("http_head"));
    http_requests(&seeds.join("http_requests"));
    client_hello(&seeds.join("client_hello"));
    proxy_header(&seeds.join("proxy_header"));
    config_file(&seeds.join("config_file"), &root.join(".."));
    api(&seeds.join("api"));
}

/// Writes one seed: `selector`, then `body`.
fn write(dir: &Path, name: &str, selector: u8, body: &[u8]) {
    fs::create_dir_all(dir).expect("a seed directory");
    let mut bytes = vec![selector];
    bytes.extend_from_slice(body);
    fs::write(dir.join(name), bytes).expect("a seed file");
}

fn frame<M: Serialize>(message: &M) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(message, &mut out).expect("a seed frame encodes");
    out
}

fn hello(id: &str) -> ClientMessage {
    ClientMessage::Hello {
        id: id.into(),
        instance: "fuzz-1".into(),
        software: "ferry 0.1.0".into(),
        tags: vec!["eu".into()],
    }
}

fn client_messages() -> Vec<(&'static str, ClientMessage)> {
    let tcp = ServiceSpec::Tcp {
        name: "ssh".into(),
        port: Some(2222),
        random: true,
        proxy_protocol: Some(ProxyProtocol::V2),
        prefix: Some("ssh".into()),
    };
    let http = ServiceSpec::Http {
        name: "web".into(),
        prefix: Some("app".into()),
        local_host: Some("localhost".into()),
    };
    let control = ServiceControl {
        max_serve_conn: Some(3),
        allow_ip: vec!["10.0.0.0/8".parse().expect("a net")],
        message: Some("hi".into()),
        encrypt: true,
        ..ServiceControl::default()
    };
    vec![
        ("hello", hello("id1")),
        (
            "login_pake",
            ClientMessage::Login { proof: Proof::Pake { message: vec![7; 33], confirm: [1; 32] } },
        ),
        (
            "login_enroll",
            ClientMessage::Login { proof: Proof::Enroll { ephemeral_key: [9; 32], sealed: vec![3; 60] } },
        ),
        ("register_tcp", ClientMessage::Register { request: 1, spec: tcp, control }),
        (
            "register_http",
            ClientMessage::Register { request: 2, spec: http, control: ServiceControl::default() },
        ),
        (
            "register_https",
            ClientMessage::Register {
                request: 3,
                spec: ServiceSpec::Https { name: "tls".into(), prefix: None },
                control: ServiceControl::default(),
            },
        ),
        (
            "register_udp",
            ClientMessage::Register {
                request: 4,
                spec: ServiceSpec::Udp { name: "dns".into(), port: Some(5353), random: true },
                control: ServiceControl::default(),
            },
        ),
        ("unregister", ClientMessage::Unregister { service: 4 }),
        ("query", ClientMessage::Query { request: 5, query: Query::FreePorts { limit: 10 } }),
        ("ping", ClientMessage::Ping { seq: 6 }),
        ("pong", ClientMessage::Pong { seq: 7 }),
        ("peer_connect", ClientMessage::PeerConnect { request: 8, name: "ssh".into(), offer: offer() }),
        ("peer_answer", ClientMessage::PeerAnswer { attempt: 9, answer: Ok(offer()) }),
        ("peer_report", ClientMessage::PeerReport { service: 2, path: PeerPath::Upgraded }),
        (
            "browser_answer",
            ClientMessage::BrowserAnswer { attempt: 3, answer: Ok(r#"{"type":"answer","sdp":"v=0"}"#.into()) },
        ),
        ("browser_closed", ClientMessage::BrowserClosed { attempt: 3 }),
    ]
}

fn offer() -> PeerOffer {
    let candidates = vec!["10.1.0.2:40001".parse().expect("an address"), "[2001:db8::2]:40001".parse().expect("an address")];
    PeerOffer { candidates, fingerprint: [6; 32] }
}

fn server_messages() -> Vec<(&'static str, ServerMessage)> {
    let info = ServiceInfo {
        id: 1,
        cid: 2,
        user: "id1".into(),
        tags: vec!["eu".into()],
        name: "web".into(),
        message: None,
        kind: "http".into(),
        address: "app.example".into(),
        port: 0,
        host: Some("app".into()),
        birth: 1,
        online: 0,
        capacity: Some(3),
        served: 4,
        total_allowed: None,
        deadline: None,
        bytes_in: 5,
        bytes_out: 6,
        datagrams: Some(DatagramCounts { r#in: 7, out: 8, dropped: 9 }),
        p2p: None,
    };
    let refused = RegisterError::PortNotAllowed {
        port: 80,
        ranges: "10000-20000".into(),
        whose: "the server's".into(),
        protocol: PortProtocol::Udp,
    };
    vec![
        (
            "challenge",
            ServerMessage::Challenge { challenge: Challenge::Pake { message: vec![5; 33], stretched: true } },
        ),
        (
            "challenge_enroll",
            ServerMessage::Challenge { challenge: Challenge::Enroll { ephemeral_key: [2; 32] } },
        ),
        ("welcome", ServerMessage::Welcome { session: 1, heartbeat_interval_ms: 10_000, confirm: [4; 32] }),
        (
            "refused",
            ServerMessage::LoginRefused {
                refusal: LoginRefusal::TooManySessions { id: "id1".into(), limit: 2 },
            },
        ),
        (
            "registered",
            ServerMessage::Registered { request: 1, service: 2, port: 0, host: Some("app".into()), compress: Some(Compression::Zstd) },
        ),
        ("register_failed", ServerMessage::RegisterFailed { request: 1, error: refused.clone() }),
        ("closed", ServerMessage::ServiceClosed { service: 2, reason: CloseReason::Refused(refused) }),
        ("answer", ServerMessage::Answer { request: 5, answer: Answer::Services { services: vec![info] } }),
        ("need_data", ServerMessage::NeedData { count: 2 }),
        ("ping", ServerMessage::Ping { seq: 8 }),
        ("peer_offer", ServerMessage::PeerOffer { attempt: 9, service: 2, from: "id2".into(), offer: offer() }),
        (
            "peer_answer",
            ServerMessage::PeerAnswer { request: 8, answer: Ok(PeerReady { service: 2, offer: Err("no UDP".into()) }) },
        ),
        (
            "browser_offer",
            ServerMessage::BrowserOffer {
                attempt: 3,
                service: 2,
                visitor: "192.0.2.7:50000".parse().expect("an address"),
                offer: r#"{"type":"offer","sdp":"v=0"}"#.into(),
            },
        ),
        (
            "peer_refused",
            ServerMessage::PeerAnswer { request: 8, answer: Err(PeerRefusal::NotAllowed { name: "ssh".into() }) },
        ),
    ]
}

fn control_frames(dir: &Path) {
    let mut first = preamble(LinkKind::Control).to_vec();
    first.extend(frame(&hello("id1")));
    write(dir, "preamble_hello", 0, &first);
    for (name, message) in client_messages() {
        write(dir, &format!("client_{name}"), 0, &frame(&message));
    }
    for (name, message) in server_messages() {
        write(dir, &format!("server_{name}"), 0, &frame(&message));
    }
    let mut data = preamble(LinkKind::Data).to_vec();
    data.extend(frame(&DataHello { session: 1, seq: 2, mac: [3; 32] }));
    write(dir, "data_hello", 0, &data);
    let open =
        OpenStream { service: 2, visitor: "[2001:db8::1]:5000".parse().expect("an address"), seal: Some(1), flow: None };
    write(dir, "open_stream", 0, &frame(&open));
    let flow = OpenStream { service: 3, visitor: "192.0.2.1:53".parse().expect("an address"), seal: None, flow: Some(7) };
    write(dir, "open_flow", 0, &frame(&flow));
    let mut forward = preamble(LinkKind::Forward).to_vec();
    forward.extend(frame(&ForwardHello { session: 1, seq: 3, mac: [3; 32], name: "ssh".into() }));
    write(dir, "forward_hello", 0, &forward);
    write(dir, "forward_accepted", 0, &frame(&ForwardAnswer::Accepted { service: 2 }));
}

fn data_chunks(dir: &Path) {
    let mut stream = Vec::new();
    encode_chunk(b"hello", &mut stream);
    encode_chunk(&[0xab; 300], &mut stream);
    encode_chunk(b"", &mut stream);
    write(dir, "chunks", 6, &stream);
    let mut with_status = vec![0];
    with_status.extend_from_slice(&stream);
    with_status.extend_from_slice(b"next visitor");
    write(dir, "status_chunks_leftover", 1, &with_status);
    write(dir, "refused", 1, &[1]);
}

fn login(dir: &Path) {
    let pake = ClientMessage::Login { proof: Proof::Pake { message: vec![7; 33], confirm: [1; 32] } };
    write(dir, "pake", 0, &[frame(&hello("id1")), frame(&pake)].concat());
    write(dir, "unknown_id", 6, &frame(&hello("nobody")));
    write(dir, "invalid_id", 0, &frame(&hello("no spaces")));
    let enroll =
        ClientMessage::Login { proof: Proof::Enroll { ephemeral_key: [9; 32], sealed: vec![3; 60] } };
    write(dir, "enroll", 1, &[frame(&hello("newcomer")), frame(&enroll)].concat());
    write(dir, "not_a_hello", 4, &frame(&ClientMessage::Ping { seq: 1 }));
}

fn http_head(dir: &Path) {
    let heads: [(&str, u8, &[u8]); 7] = [
        ("get", 0, b"GET /a HTTP/1.1\r\nHost: Web.Example.com:8080\r\n\r\n"),
        ("absolute", 0, b"GET http://App.example:80?q=1 HTTP/1.1\r\nHost: app.example\r\n\r\n"),
        ("mux_header", 1, b"GET / HTTP/1.1\r\nX-Tunnel: t1\r\n\r\n"),
        ("bare_lf", 4, b"\r\nGET / HTTP/1.1\nHost: a\n\n"),
        (
            "forwarded_chunked",
            0x80,
            b"POST /id1/app/x?y=1 HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 127.0.0.1\r\n\
              Forwarded: for=127.0.0.1\r\nX-Real-IP: 10.0.0.1\r\nTransfer-Encoding: gzip, chunked\r\n\
              Content-Length: 5\r\n\r\n",
        ),
        ("content_length", 0, b"PUT /up HTTP/1.0\r\nHost: [::1]:80\r\nContent-Length: 12, 12\r\n\r\n"),
        (
            "upgrade",
            0,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
        ),
    ];
    for (name, selector, head) in heads {
        write(dir, name, selector, head);
    }
}

fn http_requests(dir: &Path) {
    let fixed = "GET /id1/a HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\n\r\nabc";
    let chunked = "POST /id1/b HTTP/1.1\r\nHost: APP:80\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
    let upgrade = "GET /id1/ws HTTP/1.1\r\nHost: app\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nraw";
    let other_host = "GET /id1/ HTTP/1.1\r\nHost: admin\r\n\r\n";
    write(dir, "fixed_chunked_upgrade", 0, format!("{fixed}{chunked}{upgrade}").as_bytes());
    write(
        dir,
        "path_refused_upgrade",
        3,
        format!("{fixed}{upgrade}GET /id2/ HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes(),
    );
    write(dir, "other_host", 1, format!("{chunked}{other_host}").as_bytes());
}

fn client_hello(dir: &Path) {
    let config =
        ferry::transport::client_tls_config(&ferry::transport::RemoteTrust::Insecure).expect("a config");
    for (name, server_name) in [("web", "web.example.test"), ("client_id", "12--app.example.test")] {
        let server_name = rustls::pki_types::ServerName::try_from(server_name.to_owned()).expect("a name");
        let mut connection =
            rustls::ClientConnection::new(config.clone(), server_name).expect("a connection");
        let mut hello = Vec::new();
        connection.write_tls(&mut hello).expect("a ClientHello");
        write(dir, name, 255, &hello);
    }
}

fn proxy_header(dir: &Path) {
    let v4 = [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x13, 0x88];
    let mut mapped = [0u8; 18];
    mapped[10..16].copy_from_slice(&[0xff, 0xff, 198, 51, 100, 2]);
    mapped[16..].copy_from_slice(&2222u16.to_be_bytes());
    let mut v6 = [0u8; 18];
    v6[..2].copy_from_slice(&[0x20, 0x01]);
    v6[15] = 1;
    for (name, selector, a, b) in
        [("v1_v4", 6, v4, v4), ("v2_mapped", 3, v4, mapped), ("v2_v6", 1, v6, mapped)]
    {
        write(dir, name, selector, &[&a[..], &b[..]].concat());
    }
}

fn config_file(dir: &Path, repo: &Path) {
    // Selector: kind (0 server, 1 client, 2 users) times two, plus one for TOML.
    let files = [
        ("examples/server.yaml", 0),
        ("examples/client.yaml", 2),
        ("examples/client.toml", 3),
        ("examples/users.yaml", 4),
        ("tests/fixtures/gt/server-tcp.yaml", 0),
        ("tests/fixtures/gt/server-users.yaml", 0),
        ("tests/fixtures/gt/server-host-scalar.yaml", 0),
        ("tests/fixtures/gt/client.yaml", 2),
        ("tests/fixtures/gt/client-options.yaml", 2),
        ("tests/fixtures/gt/users.yaml", 4),
        ("tests/fixtures/gt/users-tcp.yaml", 4),
    ];
    for (path, selector) in files {
        let text = fs::read(repo.join(path)).expect("a config file of the repository");
        write(dir, &path.replace('/', "_"), selector, &text);
    }
    let users = "[alice]\nsecret = \"a\"\nspeed = 10\n[alice.host]\nregex = \"^a-\"\n[[alice.tcp]]\nrange = \"10000-10099\"\nnumber = 2\n";
    write(dir, "users.toml", 5, users.as_bytes());
    let server = "addr = \"127.0.0.1:7000\"\ntcp-range = [\"10000-20000\"]\n[users.id1]\nsecret = \"s\"\n";
    write(dir, "server.toml", 1, server.as_bytes());
}

fn api(dir: &Path) {
    let token = "Bearer fuzzing-token-0123456789";
    let requests: [(&str, u8, String); 6] = [
        ("clients_open", 4, "GET /clients?tags=eu,us&id=id1&cid=3\nlocalhost:7500".into()),
        ("services_token", 2, format!("GET /services?id=id1\napi.example\n{token}")),
        ("free_ports", 6, format!("GET /ports/free?limit=5\n127.0.0.1\n{token}")),
        ("ping", 4, "GET /ping?cid=1\n[::1]:7500".into()),
        ("kick", 2, format!("DELETE /clients/12\napi.example\n{token}")),
        ("wrong_token", 0, "GET /metrics\napi.example\nBearer nope".into()),
    ];
    for (name, selector, request) in requests {
        write(dir, name, selector, request.as_bytes());
    }
    let answers = [
        (
            "answer_allow",
            r#"{"allow": true, "user": {"speed": 1048576, "connections": 10, "tcp": [{"range": "10000-10010", "number": 2}], "host": {"regex": "^a-", "number": 1}}}"#,
        ),
        ("answer_deny", r#"{"allow": false}"#),
    ];
    for (name, body) in answers {
        write(dir, name, 1, body.as_bytes());
    }
}
