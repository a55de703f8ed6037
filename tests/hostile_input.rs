//! Hostile input, byte for byte over raw TCP: malformed or hostile upgrade requests get their exact
//! status and never reach the API; after an upgrade done by hand, each protocol violation gets its
//! exact close code, the API gets exactly one DELETE carrying that code, and the gateway keeps
//! serving. A panic hook counts panics in any gateway task: none may happen.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---- panics ----

/// Counts panics on any thread of this test process (gateway tasks included), then lets the
/// default hook print them as usual.
fn panic_count() -> &'static AtomicUsize {
    static COUNT: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    COUNT.get_or_init(|| {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&count);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            seen.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
        count
    })
}

// ---- frames ----

/// Mask key used for every client frame we write (any key will do; this one is from RFC 6455).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CONTINUATION: u8 = 0x0;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;

/// One websocket frame as raw bytes: FIN bit, RSV bits (0–7), opcode, masked or not.
fn frame(fin: bool, rsv: u8, opcode: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0xF)];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A well-formed client frame: FIN set, no RSV bits, masked.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, 0, opcode, true, payload)
}

/// A raw socket after a websocket upgrade done by hand.
struct RawWs {
    stream: TcpStream,
    /// Bytes read past the end of the 101 response.
    buffer: Vec<u8>,
}

impl RawWs {
    /// Sends the upgrade request for `path` and reads the `101`.
    async fn open(gateway: &TestGateway, path: &str) -> RawWs {
        let mut stream = TcpStream::connect(gateway.public).await.expect("connect");
        stream
            .write_all(&upgrade_request(path, &[]))
            .await
            .expect("write upgrade");
        let mut buffer = Vec::new();
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                .await
                .expect("upgrade answered within 5s")
                .expect("read upgrade answer");
            assert!(n > 0, "gateway closed before answering the upgrade");
            buffer.extend_from_slice(&chunk[..n]);
        };
        let response = parse_response(&buffer[..head_end]).expect("an HTTP response");
        assert_eq!(response.status, 101, "upgrade of {path}");
        buffer.drain(..head_end);
        RawWs { stream, buffer }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The gateway may already have closed (e.g. after the frame header): that is fine.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads server frames until a close frame; returns its code (1005 when it has none).
    /// `None` when the connection ends without one. 5 s at most.
    async fn close_code(&mut self) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            while let Some((opcode, payload, used)) = parse_server_frame(&self.buffer) {
                self.buffer.drain(..used);
                if opcode == CLOSE {
                    return Some(if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    });
                }
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .expect("a close frame within 5s");
            match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// Parses one unmasked server frame off the front of `data`: opcode, payload, bytes used.
fn parse_server_frame(data: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if data.len() < 2 {
        return None;
    }
    assert_eq!(data[1] & 0x80, 0, "server frames are never masked");
    let opcode = data[0] & 0xF;
    let (len, offset) = match data[1] & 0x7F {
        126 => (
            u16::from_be_bytes(data.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(data.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = data.get(offset..offset + len)?.to_vec();
    Some((opcode, payload, offset + len))
}

// ---- handshakes ----

/// A request that must be refused with `status`, before anything is sent to the API.
struct Refused {
    name: &'static str,
    request: Vec<u8>,
    status: u16,
    /// A response header that must be present with this value.
    header: Option<(&'static str, &'static str)>,
}

fn refused(name: &'static str, request: impl Into<Vec<u8>>, status: u16) -> Refused {
    Refused {
        name,
        request: request.into(),
        status,
        header: None,
    }
}

fn upgrade_with_key(key: Option<&str>) -> Vec<u8> {
    let mut text = String::from(
        "GET /keyed HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n",
    );
    if let Some(key) = key {
        text.push_str(&format!("Sec-WebSocket-Key: {key}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

fn upgrade_with_version(version: Option<&str>) -> Vec<u8> {
    let mut text = String::from(
        "GET /versioned HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    );
    if let Some(version) = version {
        text.push_str(&format!("Sec-WebSocket-Version: {version}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

fn handshake_cases() -> Vec<Refused> {
    let huge_header = format!("X-Padding: {}", "a".repeat(20 * 1024));
    let many_headers: Vec<String> = (0..200).map(|i| format!("X-H{i}: v")).collect();
    let many_headers: Vec<&str> = many_headers.iter().map(String::as_str).collect();
    let huge_encoded_id = format!("/{}", "%41".repeat(4000));
    let huge_encoded_path = format!("/{}", "%41".repeat(6000));
    vec![
        // Not HTTP at all.
        refused("garbage line", "GARBAGE\r\n\r\n", 400),
        refused(
            "binary junk",
            b"\x00\x01\x02\xff\xfe junk \r\n\r\n".to_vec(),
            400,
        ),
        refused(
            "TLS client hello on the plain port",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(),
            400,
        ),
        refused("HTTP/0.9 request line", "GET /alice\r\n\r\n", 400),
        refused(
            "request line with two spaces",
            "GET  /alice HTTP/1.1\r\nHost: g\r\n\r\n",
            400,
        ),
        refused(
            "header without a colon",
            "GET /alice HTTP/1.1\r\nHost g\r\n\r\n",
            400,
        ),
        refused(
            "NUL byte in a header value",
            b"GET /alice HTTP/1.1\r\nHost: g\x00x\r\n\r\n".to_vec(),
            400,
        ),
        // Raw CR/LF inside the request line: hyper refuses the request line itself.
        refused(
            "raw CR LF in the request target",
            "GET /alice\r\nX-Injected: yes HTTP/1.1\r\nHost: g\r\n\r\n",
            400,
        ),
        refused(
            "raw CR in the request target",
            "GET /al\rice HTTP/1.1\r\nHost: g\r\n\r\n",
            400,
        ),
        // Header injection by line folding, and control bytes in a forwarded header.
        refused(
            "obsolete line folding smuggling a header",
            "GET /folded HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Cookie: a=1\r\n X-Injected: yes\r\n\r\n",
            400,
        ),
        refused(
            "control byte in X-Forwarded-For",
            upgrade_request("/xff", &["X-Forwarded-For: \u{1}10.0.0.1"]),
            400,
        ),
        // HTTP/1.0 cannot upgrade.
        refused(
            "HTTP/1.0 upgrade",
            "GET /alice HTTP/1.0\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
        ),
        // RFC 9112: exactly one Host; RFC 6455: one key, one version; a target that is a path.
        refused(
            "no Host",
            "GET /nohost HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            400,
        ),
        refused(
            "two Host lines",
            upgrade_request("/twohosts", &["Host: other"]),
            400,
        ),
        refused(
            "two Sec-WebSocket-Key lines",
            upgrade_request("/twokeys", &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="]),
            400,
        ),
        refused(
            "two Sec-WebSocket-Version lines",
            upgrade_request("/twoversions", &["Sec-WebSocket-Version: 8"]),
            400,
        ),
        refused("asterisk-form target", upgrade_request("*", &[]), 400),
        // Sec-WebSocket-Key.
        refused("missing Sec-WebSocket-Key", upgrade_with_key(None), 400),
        refused("empty Sec-WebSocket-Key", upgrade_with_key(Some("")), 400),
        refused(
            "short Sec-WebSocket-Key (10 bytes)",
            upgrade_with_key(Some("dGhlIHNhbXBsZQ==")),
            400,
        ),
        refused(
            "long Sec-WebSocket-Key (32 bytes)",
            upgrade_with_key(Some("dGhlIHNhbXBsZSBub25jZXRoZSBzYW1wbGUgbm9uY2U=")),
            400,
        ),
        refused(
            "non-base64 Sec-WebSocket-Key",
            upgrade_with_key(Some("not*base64*at*all*!!!!==")),
            400,
        ),
        // Sec-WebSocket-Version.
        Refused {
            header: Some(("sec-websocket-version", "13")),
            ..refused(
                "Sec-WebSocket-Version 8",
                upgrade_with_version(Some("8")),
                426,
            )
        },
        Refused {
            header: Some(("sec-websocket-version", "13")),
            ..refused(
                "missing Sec-WebSocket-Version",
                upgrade_with_version(None),
                426,
            )
        },
        Refused {
            header: Some(("sec-websocket-version", "13")),
            ..refused(
                "Sec-WebSocket-Version 13 with junk",
                upgrade_with_version(Some("13abc")),
                426,
            )
        },
        // Oversized heads.
        refused(
            "one 20 KiB header",
            upgrade_request("/alice", &[huge_header.as_str()]),
            431,
        ),
        refused("200 headers", upgrade_request("/alice", &many_headers), 431),
        // ClientId: huge or malformed percent-encoding, injection.
        refused(
            "12 KB of percent-encoding in the ClientId",
            upgrade_request(&huge_encoded_id, &[]),
            400,
        ),
        refused(
            "18 KB path, over the head limit",
            upgrade_request(&huge_encoded_path, &[]),
            431,
        ),
        refused("truncated escape %", upgrade_request("/a%", &[]), 400),
        refused("truncated escape %4", upgrade_request("/a%4", &[]), 400),
        refused("non-hex escape %zz", upgrade_request("/a%zz", &[]), 400),
        refused(
            "escape of a lone byte %FF",
            upgrade_request("/%FF", &[]),
            400,
        ),
        refused(
            "overlong UTF-8 slash %C0%AF",
            upgrade_request("/%C0%AF", &[]),
            400,
        ),
        refused("encoded slash", upgrade_request("/a%2Fb", &[]), 400),
        refused("encoded NUL", upgrade_request("/a%00b", &[]), 400),
        refused("encoded dot-dot", upgrade_request("/%2E%2E", &[]), 400),
        refused("two segments", upgrade_request("/a/b", &[]), 400),
        refused("no ClientId", upgrade_request("/", &[]), 400),
        refused(
            "CR LF header injection through the ClientId",
            upgrade_request("/alice%0D%0AX-Injected:%20yes", &[]),
            400,
        ),
        refused(
            "LF alone through the ClientId",
            upgrade_request("/alice%0AX-Injected:%20yes", &[]),
            400,
        ),
        refused("reserved ClientId", upgrade_request("/metrics", &[]), 400),
        refused(
            "POST with upgrade headers",
            b"POST /alice HTTP/1.1\r\nHost: g\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
              Content-Length: 0\r\n\r\n"
                .to_vec(),
            405,
        ),
    ]
}

#[tokio::test]
async fn malformed_upgrade_requests_get_their_exact_status_and_never_reach_the_api() {
    let panics = panic_count();
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut failures = Vec::new();
    let cases = handshake_cases();
    let refusals = cases.len() as f64;
    for case in cases {
        let response = raw_exchange(gateway.public, &case.request).await;
        if response.status != case.status {
            failures.push(format!(
                "{}: status {} (want {}), body {:?}",
                case.name,
                response.status,
                case.status,
                response.text()
            ));
        }
        // One request per connection: every refusal says so, hyper's own 400s and 431s too.
        let connection = response.header("connection").map(str::to_ascii_lowercase);
        if !connection.as_deref().is_some_and(|c| c.contains("close")) {
            failures.push(format!(
                "{}: Connection {connection:?} (want close)",
                case.name
            ));
        }
        if let Some((name, value)) = case.header {
            if response.header(name) != Some(value) {
                failures.push(format!(
                    "{}: header {name} is {:?} (want {value:?})",
                    case.name,
                    response.header(name)
                ));
            }
        }
        if !api.seen().is_empty() {
            failures.push(format!(
                "{}: reached the API: {:?}",
                case.name,
                api.seen().iter().map(|s| &s.uri).collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every one is counted as a bad request, those hyper answers itself (a head it cannot
    // parse, one over 16 KiB) too. (Counted as each connection ends: waited for.)
    gateway
        .wait_for_metric(
            "handshakes_refused{reason=\"bad_request\"}",
            |n| n == refusals,
            Duration::from_secs(5),
        )
        .await;

    // Still healthy: a normal client connects and round-trips.
    let mut ws = gateway.connect("/after-handshakes").await;
    assert_eq!(round_trip(&mut ws, "hi").await, "echo:hi");
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["connections_opened"], 1.0, "{metrics:?}");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a gateway task panicked");
}

#[tokio::test]
async fn an_http2_preface_on_the_public_port_is_closed_unanswered_and_counted() {
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut stream = TcpStream::connect(gateway.public).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "still open 5 s after the preface");
    assert!(
        answer.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    gateway
        .wait_for_metric(
            "handshakes_refused{reason=\"bad_request\"}",
            |n| n == 1.0,
            Duration::from_secs(5),
        )
        .await;
    assert!(api.seen().is_empty(), "{:?}", api.seen());
}

#[tokio::test]
async fn the_control_listener_answers_a_head_over_16_kib_with_431_over_http1_and_h2c() {
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let padding = "a".repeat(20 * 1024);
    let http1 = raw_http(
        gateway.control,
        "GET",
        "/healthz",
        &[("X-Padding", &padding)],
        b"",
    )
    .await;
    assert_eq!(http1.status, 431, "{}", http1.text());
    // Just under the bound, the same request is served.
    let under = "a".repeat(15 * 1024);
    let served = raw_http(
        gateway.control,
        "GET",
        "/healthz",
        &[("X-Padding", &under)],
        b"",
    )
    .await;
    assert_eq!(served.status, 200, "{}", served.text());

    let (mut sender, driving) = control_h2c(gateway.control).await;
    let healthz = |padding: &str| {
        hyper::Request::get(format!("http://{}/healthz", gateway.control))
            .header("x-padding", padding)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    sender.ready().await.unwrap();
    let served = sender.send_request(healthz(&under)).await.unwrap();
    assert_eq!(served.status(), 200);
    sender.ready().await.unwrap();
    let refused = sender.send_request(healthz(&padding)).await;
    assert_eq!(
        refused.as_ref().map(|r| r.status().as_u16()).ok(),
        Some(431),
        "{refused:?}"
    );
    driving.abort();
    assert!(api.seen().is_empty(), "{:?}", api.seen());
}

#[tokio::test]
async fn crlf_in_the_query_reaches_the_api_still_encoded_never_as_a_header() {
    let panics = panic_count();
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let query = "/alice?x=%0D%0AX-Injected:%20yes&y=%0d%0a%0d%0aGET%20/evil%20HTTP/1.1";
    let response = raw_exchange(gateway.public, &upgrade_request(query, &[])).await;
    assert_eq!(response.status, 101);
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.uri, query, "the query is forwarded byte for byte");
    assert_eq!(get.header("x-injected"), None, "headers: {:?}", get.headers);
    assert!(
        get.headers.keys().all(|k| !k.contains("injected")),
        "headers: {:?}",
        get.headers
    );
    // The smuggled request line never became a request of its own: it would have reached
    // the API before the connection's DELETE (the client left after its 101).
    api.wait_for("DELETE", 1).await;
    assert!(api.seen().iter().all(|s| !s.uri.starts_with("/evil")));
    assert_eq!(api.seen_with("GET").len(), 1);
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a gateway task panicked");
}

#[tokio::test]
async fn raw_utf8_in_the_query_reaches_the_api_percent_encoded() {
    // A browser encodes it; a hand-written client may not, and hyper takes the raw bytes. A
    // strict API or proxy would refuse them in a request line: they go out encoded, the
    // rest of the query as it came.
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let response = raw_exchange(
        gateway.public,
        &upgrade_request("/alice?name=Zo\u{eb}&city=%E4%BA%AC&x=\u{4eac}", &[]),
    )
    .await;
    assert_eq!(response.status, 101);
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.uri, "/alice?name=Zo%C3%AB&city=%E4%BA%AC&x=%E4%BA%AC");
}

#[tokio::test]
async fn an_x_forwarded_for_line_that_is_not_visible_ascii_gets_400_naming_it_and_no_get() {
    // The chain cannot be passed on whole: joining the other lines would shorten it silently
    // (`1.2.3.4\xe9` then `5.6.7.8` reached the API as `5.6.7.8, 127.0.0.1`).
    let panics = panic_count();
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut request = upgrade_request("/latin1-xff", &[]);
    request.truncate(request.len() - 2);
    request.extend_from_slice(b"X-Forwarded-For: 1.2.3.4\xe9\r\nX-Forwarded-For: 5.6.7.8\r\n\r\n");
    let response = raw_exchange(gateway.public, &request).await;
    assert_eq!(response.status, 400, "body {:?}", response.text());
    assert_eq!(
        response.text(),
        "an X-Forwarded-For line is not visible ASCII\n"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["handshakes_refused{reason=\"bad_request\"}"], 1.0,
        "{metrics:?}"
    );
    assert!(api.seen().is_empty(), "reached the API: {:?}", api.seen());
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a gateway task panicked");
}

#[tokio::test]
async fn an_upgrade_request_with_a_body_gets_400_and_never_reaches_the_api() {
    // RFC 6455, 4.1: the upgrade is a GET without a body. A chunked one was answered 101 and
    // its body read as websocket frames (`1002 unexpected unmasked frame`, and a DELETE).
    let panics = panic_count();
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let with_body = |path: &str, header: &str, body: &[u8]| {
        let mut request = upgrade_request(path, &[header]);
        request.extend_from_slice(body);
        request
    };
    let cases = [
        (
            "chunked",
            with_body(
                "/chunked",
                "Transfer-Encoding: chunked",
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
        ),
        (
            "Content-Length 5",
            with_body("/sized", "Content-Length: 5", b"hello"),
        ),
    ];
    for (name, request) in &cases {
        let response = raw_exchange(gateway.public, request).await;
        assert_eq!(response.status, 400, "{name}: {:?}", response.text());
        assert_eq!(
            response.text(),
            "an upgrade request has no body\n",
            "{name}"
        );
        assert_eq!(response.header("connection"), Some("close"), "{name}");
        assert!(
            api.seen().is_empty(),
            "{name} reached the API: {:?}",
            api.seen()
        );
    }
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["handshakes_refused{reason=\"bad_request\"}"], 2.0,
        "{metrics:?}"
    );
    // `Content-Length: 0` announces no body: still an upgrade.
    let empty = with_body("/empty-body", "Content-Length: 0", b"");
    assert_eq!(raw_exchange(gateway.public, &empty).await.status, 101);
    assert_eq!(api.wait_for("GET", 1).await[0].uri, "/empty-body");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a gateway task panicked");
}

// ---- after the upgrade ----

/// A protocol violation after the upgrade, the close code it must get, and the DELETE's code.
struct Violation {
    name: &'static str,
    frames: Vec<Vec<u8>>,
    close_code: u16,
}

fn violation(name: &'static str, frames: Vec<Vec<u8>>, close_code: u16) -> Violation {
    Violation {
        name,
        frames,
        close_code,
    }
}

/// `--max-message-size` in the frame tests.
const MAX_MESSAGE: usize = 1024;

fn violations() -> Vec<Violation> {
    let mut close_bad_code = 999u16.to_be_bytes().to_vec();
    close_bad_code.extend_from_slice(b"bye");
    let mut close_bad_reason = 1000u16.to_be_bytes().to_vec();
    close_bad_reason.extend_from_slice(&[0xff, 0xfe]);
    vec![
        violation(
            "invalid UTF-8 in a text frame",
            vec![client_frame(TEXT, &[b'o', b'k', 0xff, 0xfe])],
            1007,
        ),
        violation(
            "invalid UTF-8 across text fragments",
            vec![
                frame(false, 0, TEXT, true, b"abc"),
                frame(true, 0, CONTINUATION, true, &[0xc3]),
            ],
            1007,
        ),
        violation(
            "unmasked client frame",
            vec![frame(true, 0, TEXT, false, b"hello")],
            1002,
        ),
        violation(
            "reserved data opcode 0x3",
            vec![client_frame(0x3, b"x")],
            1002,
        ),
        violation(
            "reserved control opcode 0xB",
            vec![client_frame(0xB, b"x")],
            1002,
        ),
        violation(
            "RSV1 set without an extension",
            vec![frame(true, 4, TEXT, true, b"x")],
            1002,
        ),
        violation(
            "RSV2 and RSV3 set",
            vec![frame(true, 3, BINARY, true, b"x")],
            1002,
        ),
        violation(
            "fragmented ping",
            vec![frame(false, 0, PING, true, b"x")],
            1002,
        ),
        violation(
            "ping with a 126-byte payload",
            vec![client_frame(PING, &[b'p'; 126])],
            1002,
        ),
        violation(
            "continuation without a start",
            vec![frame(true, 0, CONTINUATION, true, b"orphan")],
            1002,
        ),
        violation(
            "new text frame inside a fragmented message",
            vec![
                frame(false, 0, TEXT, true, b"part one"),
                frame(true, 0, TEXT, true, b"not a continuation"),
            ],
            1002,
        ),
        violation(
            "close frame with a 1-byte payload",
            vec![client_frame(CLOSE, &[3])],
            1002,
        ),
        violation(
            "close frame with an invalid code",
            vec![client_frame(CLOSE, &close_bad_code)],
            1002,
        ),
        violation(
            "close frame with an invalid UTF-8 reason",
            vec![client_frame(CLOSE, &close_bad_reason)],
            1007,
        ),
        violation(
            "message over --max-message-size in one frame",
            vec![client_frame(BINARY, &vec![b'x'; MAX_MESSAGE + 1])],
            1009,
        ),
        violation(
            "message over --max-message-size in fragments",
            vec![
                frame(false, 0, BINARY, true, &vec![b'x'; MAX_MESSAGE / 2 + 1]),
                frame(
                    true,
                    0,
                    CONTINUATION,
                    true,
                    &vec![b'y'; MAX_MESSAGE / 2 + 1],
                ),
            ],
            1009,
        ),
        violation(
            "64-bit length with the top bit set",
            vec![{
                let mut f = vec![0x82, 0x80 | 127];
                f.extend_from_slice(&u64::MAX.to_be_bytes());
                f.extend_from_slice(&MASK);
                f
            }],
            1009,
        ),
    ]
}

#[tokio::test]
async fn protocol_violations_after_the_upgrade_get_their_close_code_and_one_delete() {
    let panics = panic_count();
    let api = MockApi::start().await;
    let config = ws2http::Config {
        max_message_size: MAX_MESSAGE,
        ..test_config(&api)
    };
    let gateway = TestGateway::start(config).await;
    let mut failures = Vec::new();
    for (i, case) in violations().into_iter().enumerate() {
        let path = format!("/violation-{i}");
        let mut ws = RawWs::open(&gateway, &path).await;
        for bytes in &case.frames {
            ws.send(bytes).await;
        }
        let code = ws.close_code().await;
        drop(ws);
        if code != Some(case.close_code) {
            failures.push(format!(
                "{}: close code {code:?} (want {})",
                case.name, case.close_code
            ));
        }
        // Exactly one DELETE for this connection, with the same code.
        let get = api
            .seen_with("GET")
            .into_iter()
            .find(|s| s.uri == path)
            .expect("the connect GET");
        let connection_id = get.header("x-connection-id").unwrap().to_owned();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while api.seen_with("DELETE").iter().all(|s| s.uri != path)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A second DELETE for it would have been sent before that of a later connection.
        let deletes: Vec<Seen> =
            deletes_before_a_later_one(&gateway, &api, &format!("/marker-{i}"))
                .await
                .into_iter()
                .filter(|s| s.uri == path)
                .collect();
        let want_code = case.close_code.to_string();
        match deletes.as_slice() {
            [delete] => {
                if delete.header("x-close-code") != Some(want_code.as_str()) {
                    failures.push(format!(
                        "{}: DELETE X-Close-Code {:?} (want {want_code}), body {:?}",
                        case.name,
                        delete.header("x-close-code"),
                        delete.body
                    ));
                }
                if delete.header("x-connection-id") != Some(connection_id.as_str()) {
                    failures.push(format!("{}: DELETE of another connection", case.name));
                }
            }
            other => failures.push(format!(
                "{}: {} DELETEs (want exactly 1)",
                case.name,
                other.len()
            )),
        }
        let posts: Vec<Seen> = api
            .seen_with("POST")
            .into_iter()
            .filter(|s| s.uri == path)
            .collect();
        if !posts.is_empty() {
            failures.push(format!(
                "{}: {} POSTs reached the API: {:?}",
                case.name,
                posts.len(),
                posts.iter().map(|p| &p.body).collect::<Vec<_>>()
            ));
        }
        // The gateway still serves a well-behaved client.
        let mut healthy = gateway.connect(&format!("/healthy-{i}")).await;
        assert_eq!(
            round_trip(&mut healthy, "still there?").await,
            "echo:still there?",
            "after {}",
            case.name
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_accounting(&gateway, &api, 0).await;
    assert_eq!(panics.load(Ordering::SeqCst), 0, "a gateway task panicked");
}

#[tokio::test]
async fn a_valid_fragmented_message_with_a_ping_between_fragments_is_one_post() {
    // The control case for the table above: the hand-made frames are right when they are legal.
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut ws = RawWs::open(&gateway, "/fragments").await;
    ws.send(&frame(
        false,
        0,
        TEXT,
        true,
        "h\u{e9}".as_bytes()[..2].as_ref(),
    ))
    .await;
    ws.send(&client_frame(PING, b"between")).await;
    ws.send(&frame(
        true,
        0,
        CONTINUATION,
        true,
        &"h\u{e9}llo".as_bytes()[2..],
    ))
    .await;
    let posts = api.wait_for("POST", 1).await;
    assert_eq!(posts[0].body.as_ref(), "h\u{e9}llo".as_bytes());
    ws.send(&client_frame(CLOSE, &1000u16.to_be_bytes())).await;
    assert_eq!(ws.close_code().await, Some(1000));
    let deletes = api.wait_for("DELETE", 1).await;
    assert_eq!(deletes[0].header("x-close-code"), Some("1000"));
}
