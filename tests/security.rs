//! Security: the control listener's bearer token (flag, environment, start-up warning), the
//! Origin allow-list against cross-site websocket hijacking, `wss://` on the public listener,
//! an `https://` API trusted through `--api-ca`, and an API (over TLS or not) that stops
//! reading, which must not make the gateway hold more sockets than its pool allows.
//! Certificates are made at test time.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::binary::Binary;
use common::tls::TestCert;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_websockets::{ClientBuilder, Message, WebSocketStream};

// ---- control token ----

const TOKEN: &str = "s3cret-t0ken";

/// A control request with `Authorization: Bearer TOKEN`.
async fn with_token(control: SocketAddr, method: &str, path: &str, body: &[u8]) -> RawResponse {
    let auth = format!("Bearer {TOKEN}");
    raw_http(control, method, path, &[("Authorization", &auth)], body).await
}

/// Accounting (`assert_accounting`) through a token-protected control listener.
async fn assert_accounting_with_token(gateway: &TestGateway, api: &MockApi, open: usize) {
    let metrics = || async {
        let response = with_token(gateway.control, "GET", "/metrics", b"").await;
        assert_eq!(response.status, 200);
        parse_metrics(&response.text())
    };
    assert_accounting_from(metrics, api, open).await;
}

#[tokio::test]
async fn every_control_request_but_healthz_needs_the_bearer_token() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.control_token = Some(TOKEN.into());
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/alice").await;
    let wrong = format!("Bearer {TOKEN}x");
    let short = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let bare = TOKEN.to_owned();
    let requests: [(&str, &str, &[u8]); 6] = [
        ("POST", "/alice", b"forged push"),
        ("DELETE", "/alice?code=4001&reason=forged", b""),
        ("GET", "/alice", b""),
        ("GET", "/metrics", b""),
        ("POST", "/nobody", b"x"),
        ("GET", "/debug/pprof/heap", b""),
    ];
    for (method, path, body) in requests {
        let headers: [&[(&str, &str)]; 4] = [
            &[],
            &[("Authorization", &wrong)],
            &[("Authorization", &short)],
            &[("Authorization", &bare)],
        ];
        for headers in headers {
            let response = raw_http(gateway.control, method, path, headers, body).await;
            assert_eq!(response.status, 401, "{method} {path} with {headers:?}");
            assert_eq!(response.header("www-authenticate"), Some("Bearer"));
        }
    }
    let health = raw_http(gateway.control, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200, "/healthz needs no token");

    // Nothing the refused requests asked for happened: the socket is open and got no push.
    assert_eq!(round_trip(&mut ws, "still open").await, "echo:still open");
    let pushed = with_token(gateway.control, "POST", "/alice", b"real push").await;
    assert_eq!(pushed.status, 200);
    assert_eq!(next_text(&mut ws).await, "real push");
    let info = with_token(gateway.control, "GET", "/alice", b"").await;
    assert_eq!(info.status, 200);
    assert!(info.text().contains("\"client_id\":\"alice\""));
    assert_accounting_with_token(&gateway, &api, 1).await;
}

#[tokio::test]
async fn the_bearer_scheme_is_matched_without_regard_to_case() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.control_token = Some(TOKEN.into());
    let gateway = TestGateway::start(config).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} {TOKEN}");
        let response = raw_http(
            gateway.control,
            "GET",
            "/metrics",
            &[("Authorization", &auth)],
            b"",
        )
        .await;
        assert_eq!(response.status, 200, "{auth}");
    }
    // The token itself is case-sensitive.
    let auth = format!("Bearer {}", TOKEN.to_uppercase());
    let response = raw_http(
        gateway.control,
        "GET",
        "/metrics",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(response.status, 401);
}

async fn metrics_status(control: SocketAddr, auth: Option<&str>) -> u16 {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    raw_http(control, "GET", "/metrics", &headers, b"")
        .await
        .status
}

#[tokio::test]
async fn the_binary_takes_the_control_token_from_the_environment_or_the_flag() {
    let api = MockApi::start().await;
    let from_env =
        Binary::start_ready(&api.base(), &[], &[("WS2HTTP_CONTROL_TOKEN", "env-token")]).await;
    assert_eq!(metrics_status(from_env.control, None).await, 401);
    assert_eq!(
        metrics_status(from_env.control, Some("Bearer wrong")).await,
        401
    );
    assert_eq!(
        metrics_status(from_env.control, Some("Bearer env-token")).await,
        200
    );

    let from_flag = Binary::start_ready(&api.base(), &["--control-token", "flag-token"], &[]).await;
    assert_eq!(metrics_status(from_flag.control, None).await, 401);
    assert_eq!(
        metrics_status(from_flag.control, Some("Bearer flag-token")).await,
        200
    );

    let open = Binary::start_ready(&api.base(), &[], &[]).await;
    assert_eq!(metrics_status(open.control, None).await, 200);
}

#[tokio::test]
async fn the_api_token_goes_with_every_api_request_and_a_client_cannot_set_it() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.api_token = Some("gateway-secret".into());
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway
        .try_connect("/alice", &[("x-ws2http-token", "forged")])
        .await
        .unwrap();
    assert_eq!(round_trip(&mut ws, "hi").await, "echo:hi");
    ws.close().await.unwrap();
    api.wait_for("DELETE", 1).await;
    let seen = api.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for request in &seen {
        let tokens: Vec<_> = request
            .headers
            .iter()
            .filter(|(k, _)| *k == "x-ws2http-token")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            tokens,
            ["gateway-secret"],
            "{} {}",
            request.method,
            request.uri
        );
    }
}

#[tokio::test]
async fn the_binary_takes_the_api_token_from_the_environment_or_the_flag() {
    for (args, envs) in [
        (&["--api-token", "flag-secret"][..], &[][..]),
        (&[][..], &[("WS2HTTP_API_TOKEN", "flag-secret")][..]),
    ] {
        let api = MockApi::start().await;
        let binary = Binary::start_ready(&api.base(), args, envs).await;
        let mut ws = binary.connect("/bob").await;
        ws.send(Message::text("x")).await.unwrap();
        let post = api.wait_for("POST", 1).await.remove(0);
        assert_eq!(
            post.header("x-ws2http-token"),
            Some("flag-secret"),
            "{args:?} {envs:?}"
        );
    }
    let api = MockApi::start().await;
    let log = Binary::refused_at_start(&api.base(), &["--api-token", "two words"], &[]).await;
    assert!(log.contains("--api-token"), "{log}");
}

const EXPOSED_WARNING: &str = "not on loopback and has no --control-token";

/// Runs the binary with `args` until it is up, stops it, and returns everything it logged.
async fn startup_log(args: &[&str]) -> String {
    let api = MockApi::start().await;
    let mut binary = Binary::start_ready(&api.base(), args, &[]).await;
    binary.wait_for_log("ws2http listening").await;
    binary.signal(libc::SIGTERM);
    let status = binary.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    binary.stderr()
}

#[tokio::test]
async fn the_binary_warns_when_the_control_listener_is_exposed_without_a_token() {
    let log = startup_log(&["--control-listen", "0.0.0.0:{port}"]).await;
    assert!(log.contains(EXPOSED_WARNING), "{log}");
    assert!(log.contains(" WARN "), "logged as a warning: {log}");

    let log = startup_log(&["--control-listen", "0.0.0.0:{port}", "--control-token", "t"]).await;
    assert!(!log.contains(EXPOSED_WARNING), "{log}");

    let log = startup_log(&[]).await;
    assert!(
        !log.contains(EXPOSED_WARNING),
        "loopback needs no token: {log}"
    );
}

// ---- allowed origins ----

#[tokio::test]
async fn an_origin_not_listed_gets_403_before_any_upstream_call() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.allowed_origins = Some(vec![
        "https://app.example".to_owned(),
        "https://admin.example".to_owned(),
    ]);
    let gateway = TestGateway::start(config).await;
    for origin in [
        "https://evil.example",
        "https://app.example.evil.example",
        "http://app.example",
        "null",
    ] {
        let line = format!("Origin: {origin}");
        let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[&line])).await;
        assert_eq!(response.status, 403, "{origin}");
    }
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"origin\"}"], 4.0);

    for origin in ["https://app.example", "https://admin.example"] {
        let line = format!("Origin: {origin}");
        let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[&line])).await;
        assert_eq!(response.status, 101, "{origin}");
    }
    // Only these reached the API: a GET for a refused one would have gone out before them.
    let origins: Vec<_> = api
        .seen_with("GET")
        .iter()
        .map(|g| g.header("origin").map(str::to_owned))
        .collect();
    assert_eq!(
        origins,
        [
            Some("https://app.example".to_owned()),
            Some("https://admin.example".to_owned())
        ]
    );
    // Clients that send no Origin at all (not browsers, so not a hijacking risk) pass.
    let response = raw_exchange(gateway.public, &upgrade_request("/bot", &[])).await;
    assert_eq!(response.status, 101);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn without_an_origin_list_any_origin_is_forwarded_for_the_api_to_judge() {
    let api = MockApi::with_script(|s| match (s.method.as_str(), s.header("origin")) {
        ("GET", Some("https://trusted.example")) => Reply::ok("ok"),
        ("GET", _) => Reply::status(403, "bad origin"),
        _ => Reply::ok("ok"),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let refused = raw_exchange(
        gateway.public,
        &upgrade_request("/a", &["Origin: https://evil.example"]),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.text(), "bad origin");
    let accepted = raw_exchange(
        gateway.public,
        &upgrade_request("/a", &["Origin: https://trusted.example"]),
    )
    .await;
    assert_eq!(accepted.status, 101);
    let gets = api.wait_for("GET", 2).await;
    assert_eq!(gets[0].header("origin"), Some("https://evil.example"));
    assert_accounting(&gateway, &api, 0).await;
}

// ---- TLS ----

type TlsWs = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn connect_wss(cert: &TestCert, addr: SocketAddr, path: &str) -> TlsWs {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = cert
        .connector()
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the gateway");
    let (ws, _) = ClientBuilder::new()
        .uri(&format!("wss://{addr}{path}"))
        .unwrap()
        .connect_on(tls)
        .await
        .expect("websocket upgrade over TLS");
    ws
}

#[tokio::test]
async fn a_wss_client_connects_over_tls_and_round_trips() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.tls = Some(cert.files());
    let gateway = TestGateway::start(config).await;
    let mut ws = connect_wss(&cert, gateway.public, "/secure").await;
    ws.send(Message::text("over tls")).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.as_text(), Some("echo:over tls"));
    let push = gateway.control("POST", "/secure", b"pushed").await;
    assert_eq!(push.status, 200);
    let pushed = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pushed.as_text(), Some("pushed"));
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.header("x-forwarded-proto"), Some("https"));
    ws.close().await.unwrap();
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.header("x-close-code"), Some("1000"));
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn the_tls_listener_speaks_no_plain_http_and_drops_a_silent_tls_client() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.tls = Some(cert.files());
    config.handshake_timeout = Duration::from_millis(300);
    let gateway = TestGateway::start(config).await;

    // A plain upgrade request is not answered as HTTP.
    let answer = plain_upgrade_to_tls(&gateway).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // A client that never starts its TLS handshake is dropped at the handshake timeout.
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(gateway.public).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open: {read:?}"
    );
    // Held until the 300 ms timeout (`started` is taken before the connect), not dropped at
    // once.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(180) && took < Duration::from_millis(1500),
        "dropped after {took:?}"
    );
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"bad_request\"}"], 1.0);
    assert_eq!(metrics["handshakes_refused{reason=\"timeout\"}"], 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

/// Opens a TCP connection to `addr` and closes it before sending a byte: with a FIN, or with
/// a reset when `reset` (`SO_LINGER` 0), as a load balancer's TCP check or a port scanner does.
async fn connect_and_close(addr: SocketAddr, reset: bool) {
    let stream = TcpStream::connect(addr).await.unwrap();
    if reset {
        stream.set_zero_linger().unwrap();
    }
    drop(stream);
}

#[tokio::test]
async fn a_tls_listener_counts_no_refusal_for_connections_closed_before_their_first_byte() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.tls = Some(cert.files());
    // Short: the marker below waits it out.
    config.handshake_timeout = Duration::from_millis(500);
    let gateway = TestGateway::start(config).await;
    for _ in 0..5 {
        connect_and_close(gateway.public, false).await;
    }
    for _ in 0..2 {
        connect_and_close(gateway.public, true).await;
    }
    // A real TLS failure after them still counts: plain HTTP, answered with a TLS alert
    // (record type 21), then the close.
    let answer = plain_upgrade_to_tls(&gateway).await;
    assert_eq!(answer.first(), Some(&21), "a TLS alert: {answer:?}");
    gateway
        .wait_for_metric(
            "handshakes_refused{reason=\"bad_request\"}",
            |n| n >= 1.0,
            Duration::from_secs(5),
        )
        .await;
    // A marker: a client that stays and sends nothing, accepted after them (the listener
    // takes connections in the order they came), is refused as a timeout once its handshake
    // timeout has passed; by then theirs, begun before, had passed too, and one of them still
    // held, not seen closed, would have been refused as a timeout as well.
    let silent = TcpStream::connect(gateway.public).await.unwrap();
    gateway
        .wait_for_metric(
            "handshakes_refused{reason=\"timeout\"}",
            |n| n >= 1.0,
            Duration::from_secs(5),
        )
        .await;
    drop(silent);
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["handshakes_refused{reason=\"bad_request\"}"], 1.0,
        "{metrics:?}"
    );
    assert_eq!(
        metrics["handshakes_refused{reason=\"timeout\"}"], 1.0,
        "only the silent marker timed out: {metrics:?}"
    );
    assert!(api.seen().is_empty(), "{:?}", api.seen());
}

#[tokio::test]
async fn over_the_pending_handshake_cap_a_tls_socket_is_closed_without_plain_text() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.tls = Some(cert.files());
    config.max_pending_handshakes = 1;
    let gateway = TestGateway::start(config).await;
    // A socket that never starts its TLS handshake holds the only slot.
    let _holder = TcpStream::connect(gateway.public).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = TcpStream::connect(gateway.public).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), over.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "closed within 3 s: {read:?}");
    assert!(
        answer.is_empty(),
        "no bytes a TLS client cannot read: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"overloaded\"}"], 1.0);
}

#[tokio::test]
async fn a_slow_tls_handshake_leaves_the_request_head_only_what_remains_of_the_handshake_timeout() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.tls = Some(cert.files());
    // Seconds, not fractions: a loaded machine's TLS handshake (debug builds, one thread for
    // both sides) must fit in what is left after the wait.
    let timeout = Duration::from_secs(3);
    config.handshake_timeout = timeout;
    let gateway = TestGateway::start(config).await;
    // The client waits 2 s before its TLS handshake, then sends no request at all.
    let started = tokio::time::Instant::now();
    let tcp = TcpStream::connect(gateway.public).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = cert
        .connector()
        .connect(name, tcp)
        .await
        .expect("TLS handshake within the deadline");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "still open: {read:?}"
    );
    let took = started.elapsed();
    // One --handshake-timeout for both, not one each (which would be 5 s here).
    assert!(
        took >= timeout - Duration::from_millis(50) && took < Duration::from_millis(4500),
        "dropped after {took:?}"
    );
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"timeout\"}"], 1.0);
}

#[tokio::test]
async fn the_binary_serves_wss_with_tls_cert_and_key() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let cert_path = cert.cert_pem.to_string_lossy().into_owned();
    let key_path = cert.key_pem.to_string_lossy().into_owned();
    let binary = Binary::start_ready(
        &api.base(),
        &["--tls-cert", &cert_path, "--tls-key", &key_path],
        &[],
    )
    .await;
    assert!(binary.stderr().contains("tls=true"), "{}", binary.stderr());
    let mut ws = connect_wss(&cert, binary.public, "/bin-tls").await;
    ws.send(Message::text("hello")).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(reply.as_text(), Some("echo:hello"));
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn bad_tls_settings_stop_the_binary_at_start_naming_the_flag() {
    let api = MockApi::start().await;
    let cert = TestCert::new();
    let cert_path = cert.cert_pem.to_string_lossy().into_owned();
    let missing = cert
        .cert_pem
        .with_file_name("missing.pem")
        .to_string_lossy()
        .into_owned();
    let key_path = cert.key_pem.to_string_lossy().into_owned();
    let cases: [(&[&str], &str); 4] = [
        (&["--tls-cert", &cert_path], "--tls-cert and --tls-key"),
        (
            &["--tls-cert", &cert_path, "--tls-key", &missing],
            "--tls-key",
        ),
        // A certificate is not a key, nor a key a certificate.
        (
            &["--tls-cert", &cert_path, "--tls-key", &cert_path],
            "no PEM private key in the file",
        ),
        (
            &["--tls-cert", &key_path, "--tls-key", &key_path],
            "no PEM certificate in the file",
        ),
    ];
    for (args, flag) in cases {
        let log = Binary::refused_at_start(&api.base(), args, &[]).await;
        assert!(log.contains(flag), "{args:?}: no `{flag}` in {log}");
    }
    // --api-ca is read for an https:// API only.
    let cases = [
        (&missing, "--api-ca"),
        (&key_path, "--api-ca"),
        (&key_path, "no PEM certificate in the file"),
    ];
    for (file, says) in cases {
        let args = ["--api-ca", file.as_str()];
        let log = Binary::refused_at_start("https://127.0.0.1:9/", &args, &[]).await;
        assert!(
            log.contains(says) && !log.contains("plain HTTP"),
            "{args:?}: no `{says}` in {log}"
        );
    }
}

#[tokio::test]
async fn bad_settings_stop_the_binary_at_start_naming_the_setting() {
    let api = MockApi::start().await;
    let missing_dir = std::env::temp_dir().join("ws2http-no-such-dir/cpu.pb");
    let missing_dir = missing_dir.to_string_lossy().into_owned();
    let profile = std::env::temp_dir().join(format!("ws2http-{}-both.pb", std::process::id()));
    let profile = profile.to_string_lossy().into_owned();
    // The same file spelled another way: through its directory's `.` entry.
    let same_profile = std::env::temp_dir()
        .join(".")
        .join(format!("ws2http-{}-both.pb", std::process::id()));
    let same_profile = same_profile.to_string_lossy().into_owned();
    let a_directory = std::env::temp_dir().to_string_lossy().into_owned();
    // Flags, environment, and what the one line on stderr says.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 14] = [
        // An empty list would allow every origin.
        (
            &["--allowed-origins", ""],
            &[],
            "--allowed-origins names no origin",
        ),
        (
            &["--allowed-origins", " , "],
            &[],
            "--allowed-origins names no origin",
        ),
        // Never equal to what a browser sends: every browser would get 403.
        (
            &["--allowed-origins", "https://app.example.com/"],
            &[],
            "--allowed-origins: `https://app.example.com/`",
        ),
        (&["--allowed-origins", "*"], &[], "--allowed-origins: `*`"),
        (
            &["--allowed-origins", "https://app.example.com:443"],
            &[],
            "leave the default port out",
        ),
        // A token no client can send in a header.
        (
            &["--control-token", "\u{1}abc"],
            &[],
            "--control-token must be",
        ),
        (
            &[],
            &[("WS2HTTP_CONTROL_TOKEN", "two words")],
            "WS2HTTP_CONTROL_TOKEN must be",
        ),
        (
            &["--api-ca", "/etc/hostname"],
            &[],
            "--api-ca is for an https:// API",
        ),
        (
            &["--worker-threads", "100000"],
            &[],
            "--worker-threads 100000 is over",
        ),
        (
            &["--cpuprofile", &missing_dir],
            &[],
            "--cpuprofile: cannot write profile",
        ),
        (
            &["--cpuprofile", &profile, "--memprofile", &profile],
            &[],
            "name the same file",
        ),
        (
            &["--cpuprofile", &profile, "--memprofile", &same_profile],
            &[],
            "name the same file",
        ),
        (
            &["--memprofile", &a_directory],
            &[],
            "--memprofile: cannot write profile",
        ),
        (
            &["--shutdown-delete-concurrency", "0"],
            &[],
            "must be at least 1",
        ),
    ];
    for (args, envs, message) in cases {
        let log = Binary::refused_at_start(&api.base(), args, envs).await;
        assert!(
            log.contains(message),
            "{args:?} {envs:?}: no `{message}` in {log}"
        );
    }
}

#[tokio::test]
async fn a_profile_file_that_is_there_and_not_a_regular_file_stops_the_binary_naming_the_flag() {
    // The profile is renamed over FILE at shutdown: as root that would replace /dev/null.
    let api = MockApi::start().await;
    let dir = std::env::temp_dir().join(format!("ws2http-{}-not-regular", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let c_fifo = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_fifo.as_ptr(), 0o600) }, 0);
    let to_fifo = dir.join("to-fifo");
    std::os::unix::fs::symlink(&fifo, &to_fifo).unwrap();
    let (fifo, to_fifo) = (fifo.to_str().unwrap(), to_fifo.to_str().unwrap());
    // The binary's stdout is /dev/null here.
    // What the one line says after "cannot write profile FILE: it is".
    let cases: [(&str, &str, &str); 4] = [
        (
            "--cpuprofile",
            "/dev/null",
            "a character device, not a regular file",
        ),
        // A link (to /proc/self/fd/1): replaced itself, whatever stdout is.
        (
            "--memprofile",
            "/dev/stdout",
            "a symbolic link (to /proc/self/fd/1)",
        ),
        ("--cpuprofile", fifo, "a FIFO, not a regular file"),
        ("--memprofile", to_fifo, "a symbolic link"),
    ];
    for (flag, path, kind) in cases {
        let log = Binary::refused_at_start(&api.base(), &[flag, path], &[]).await;
        assert!(
            log.starts_with(&format!(
                "ws2http: {flag}: cannot write profile {path}: it is {kind}"
            )),
            "{flag} {path}: {log}"
        );
        assert_eq!(log.lines().count(), 1, "{log}");
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_profile_file_of_another_user_in_a_sticky_directory_stops_the_binary_naming_the_flag() {
    // Only root can arrange it: a file of one user in a sticky directory, and the gateway run
    // as another (src/profile.rs's unit tests hold the rule itself for everyone).
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run the gateway as another user");
        return;
    }
    let api = MockApi::start().await;
    let dir = std::env::temp_dir().join(format!("ws2http-{}-sticky", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    let path = dir.join("cpu.pb");
    std::fs::write(&path, b"daemon's profile").unwrap();
    std::os::unix::fs::chown(&path, Some(1), Some(1)).unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ws2http"));
    command
        .args(["--listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"])
        .args(["--api", &api.base(), "--cpuprofile", path.to_str().unwrap()])
        .env_remove("WS2HTTP_CONTROL_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: only setgroups(2), setgid(2) and setuid(2), between fork and exec: the gateway
    // runs as nobody.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            const NOBODY: u32 = 65534;
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn ws2http");
    let pid = child.id();
    let output = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await;
    let Ok(output) = output else {
        // SAFETY: kill(2) on the child this test spawned.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        std::fs::remove_dir_all(&dir).unwrap();
        panic!("the gateway started: at shutdown its profile could not have replaced the file");
    };
    let output = output.unwrap().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("ws2http: --cpuprofile: cannot write profile")
            && stderr.contains("another user (uid 1) in a sticky directory"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(std::fs::read(&path).unwrap(), b"daemon's profile");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_api_url_with_a_bad_port_or_a_password_stops_the_binary_naming_the_flag() {
    for api in [
        "http://127.0.0.1:99999/",
        "http://127.0.0.1:0/",
        "http://user:secret@127.0.0.1:8000/",
    ] {
        let log = Binary::refused_at_start(api, &[], &[]).await;
        assert!(log.contains("--api"), "{api}: {log}");
        assert!(!log.contains("started"), "{api}: {log}");
    }
}

#[tokio::test]
async fn an_argument_that_is_not_utf8_stops_the_binary_naming_its_flag() {
    use std::os::unix::ffi::OsStrExt;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ws2http"))
        .arg("--tls-cert")
        .arg(std::ffi::OsStr::from_bytes(b"/srv/\xff.pem"))
        .env_remove("WS2HTTP_CONTROL_TOKEN")
        .output()
        .expect("run ws2http");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("ws2http: --tls-cert: ") && stderr.contains("not valid UTF-8"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// A TLS front for the mock API: terminates TLS with `cert` and relays bytes to the API.
async fn tls_front(api: &MockApi, cert: &TestCert) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = cert.acceptor();
    let backend = api.addr;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_https_api_with_its_private_ca_given_round_trips() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let front = tls_front(&api, &cert).await;
    let mut config = test_config(&api);
    config.api = format!("https://{front}/").parse().unwrap();
    config.api_ca = Some(cert.cert_pem.clone());
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/over-https").await;
    assert_eq!(round_trip(&mut ws, "hello").await, "echo:hello");
    ws.close().await.unwrap();
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.uri, "/over-https");
    let post = &api.wait_for("POST", 1).await[0];
    assert_eq!(post.body, Bytes::from_static(b"hello"));
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn an_https_api_with_an_untrusted_certificate_gives_502() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let front = tls_front(&api, &cert).await;
    let mut config = test_config(&api);
    config.api = format!("https://{front}/").parse().unwrap();
    let gateway = TestGateway::start(config).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 502);
    assert!(
        api.seen().is_empty(),
        "nothing got through the TLS front: {:?}",
        api.seen()
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0);
    assert_eq!(metrics["requests_failed"], 1.0);

    // A different CA does not help either.
    let other = TestCert::new();
    let mut config = test_config(&api);
    config.api = format!("https://{front}/").parse().unwrap();
    config.api_ca = Some(other.cert_pem.clone());
    let gateway = TestGateway::start(config).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 502);
    assert!(api.seen().is_empty());
    assert_accounting(&gateway, &api, 0).await;
}

/// Sends a plain-HTTP upgrade request to `gateway`'s TLS listener and reads until it closes
/// the connection (3 s at most): what came back.
async fn plain_upgrade_to_tls(gateway: &TestGateway) -> Vec<u8> {
    let mut plain = TcpStream::connect(gateway.public).await.unwrap();
    plain
        .write_all(&upgrade_request("/alice", &[]))
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "still open after 3 s");
    answer
}

// ---- an API that stops reading ----

/// An API on a loopback port (over TLS with `cert`, else plain TCP) that answers every request
/// `ok` but a POST, whose body it stops reading after what came with its head and which it
/// never answers, while its kernel keeps the connection open: a hung API worker.
async fn api_that_stops_reading_posts(cert: Option<&TestCert>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = cert.map(TestCert::acceptor);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            serve_until_a_post(hyper_util::rt::TokioIo::new(tls)).await;
                        }
                    }
                    None => serve_until_a_post(hyper_util::rt::TokioIo::new(tcp)).await,
                }
            });
        }
    });
    addr
}

/// Serves one connection of [`api_that_stops_reading_posts`].
async fn serve_until_a_post<T>(io: T)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    use http_body_util::BodyExt;
    let service = hyper::service::service_fn(
        |request: hyper::Request<hyper::body::Incoming>| async move {
            if request.method() == hyper::Method::POST {
                std::future::pending::<()>().await;
            }
            let _ = request.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            )))
        },
    );
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

/// Ten clients, two at a time, each send one 8 MiB message to an API (`tls` or not) that
/// stops reading it: each times out (or, waiting for one of the two API connections, is
/// never sent), and the gateway never holds more API sockets than `--upstream-max-connections`,
/// however long the connections it gave up take to close; `upstream_connections_open` says
/// how many it holds.
async fn assert_stalled_uploads_hold_no_more_sockets_than_the_pool(tls: bool) {
    let cert = TestCert::new();
    let api = api_that_stops_reading_posts(tls.then_some(&cert)).await;
    let scheme = if tls { "https" } else { "http" };
    let config = ws2http::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        api: format!("{scheme}://{api}/").parse().unwrap(),
        api_ca: tls.then(|| cert.cert_pem.clone()),
        upstream_timeout: Duration::from_secs(1),
        upstream_max_connections: Some(2),
        max_message_size: 8 << 20,
        shutdown_timeout: Duration::from_secs(5),
        ..ws2http::Config::default()
    };
    let gateway = TestGateway::start(config).await;
    // The most API sockets seen at once, looked at every 10 ms throughout.
    let most = Arc::new(AtomicUsize::new(0));
    let watching = {
        let most = most.clone();
        tokio::spawn(async move {
            loop {
                most.fetch_max(sockets_to(api.port()), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let message = Bytes::from(vec![b'x'; 8 << 20]);
    for wave in 0..5 {
        let mut clients = Vec::new();
        for i in 0..2 {
            // While the connections given up close, both places of the pool can be taken (for
            // up to a second): a connect may be refused then.
            let path = format!("/w{wave}c{i}");
            let connecting = tokio::time::Instant::now();
            let mut ws = loop {
                match gateway.try_connect(&path, &[]).await {
                    Ok(ws) => break ws,
                    Err(error) => assert!(
                        connecting.elapsed() < Duration::from_secs(10),
                        "{path} could not connect: {error}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let message = message.clone();
            clients.push(tokio::spawn(async move {
                ws.send(Message::binary(message)).await.unwrap();
                close_frame(&mut ws).await
            }));
        }
        for client in clients {
            let (code, reason) = client.await.unwrap();
            assert!(
                [(1011, "upstream timeout"), (1013, "upstream overloaded")]
                    .contains(&(code, reason.as_str())),
                "{code} {reason}"
            );
        }
    }
    // The DELETEs settle; then the gauge and the sockets agree.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = gateway.metrics().await;
        let sockets = sockets_to(api.port());
        let open = metrics["upstream_connections_open"] as usize;
        if metrics["upstream_disconnects_waiting"] == 0.0
            && metrics["upstream_disconnects_in_flight"] == 0.0
            && open == sockets
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway holds {sockets} sockets to the API, and says upstream_connections_open \
             {open} (most at once: {})",
            most.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watching.abort();
    let most = most.load(Ordering::Relaxed);
    // Seen at all: two uploads at a time held the pool's sockets for a second each, so a
    // count that found none would be a reading of `/proc/net/tcp` that matched nothing.
    assert!(
        (1..=2).contains(&most),
        "{most} API sockets at once, with a pool of 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_api_that_stops_reading_large_requests_holds_no_more_sockets_than_the_pool() {
    assert_stalled_uploads_hold_no_more_sockets_than_the_pool(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_api_that_stops_reading_large_requests_holds_no_more_sockets_than_the_pool() {
    assert_stalled_uploads_hold_no_more_sockets_than_the_pool(false).await;
}
