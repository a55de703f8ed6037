//! Unix sockets for an API on the gateway's machine. `--api-unix-socket`: the same flows as over
//! TCP, HTTP/1.1 and h2c, with `--api`'s host as the `Host` header, and clear failures when
//! nothing listens or the flags contradict each other. `--control-unix-socket`: pushes over
//! HTTP/1.1 and h2c, the bearer token, the socket's mode, and its file's life.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::binary::Binary;
use common::*;
use futures_util::SinkExt;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_websockets::{CloseCode, Message};

/// A socket path of this test's own, removed when dropped.
struct SocketPath(PathBuf);

impl SocketPath {
    fn new() -> SocketPath {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        SocketPath(
            std::env::temp_dir().join(format!("ws2http-api-{}-{n}.sock", std::process::id())),
        )
    }
}

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A gateway whose `--api` names `http://api.internal/` and whose connections go to `path`.
async fn gateway_for(api: &MockApi, path: &SocketPath, http2: bool) -> TestGateway {
    let mut config = test_config(api);
    config.api = "http://api.internal/".parse().unwrap();
    config.api_unix_socket = Some(path.0.clone());
    config.upstream_http2 = http2;
    TestGateway::start(config).await
}

#[tokio::test]
async fn connect_message_and_close_reach_an_api_on_a_unix_socket() {
    let path = SocketPath::new();
    let api = MockApi::on_unix_socket(&path.0).await;
    let gateway = gateway_for(&api, &path, false).await;

    let mut ws = gateway.connect("/alice").await;
    assert_eq!(round_trip(&mut ws, "hello").await, "echo:hello");
    ws.send(Message::close(Some(CloseCode::NORMAL_CLOSURE), "bye"))
        .await
        .unwrap();

    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.uri, "/alice");
    assert_eq!(get.header("host"), Some("api.internal"));
    let post = &api.wait_for("POST", 1).await[0];
    assert_eq!(post.uri, "/alice");
    assert_eq!(post.body, Bytes::from_static(b"hello"));
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.uri, "/alice");
    assert_eq!(delete.body, Bytes::from_static(b"bye"));
}

#[tokio::test]
async fn h2c_to_an_api_on_a_unix_socket_carries_every_message() {
    let path = SocketPath::new();
    let api = MockApi::on_unix_socket(&path.0).await;
    let gateway = gateway_for(&api, &path, true).await;

    let mut ws = gateway.connect("/bob").await;
    for n in 0..20 {
        let text = format!("m{n}");
        assert_eq!(round_trip(&mut ws, &text).await, format!("echo:{text}"));
    }
    let posts = api.wait_for("POST", 20).await;
    assert!(
        posts.iter().all(|p| p.uri.ends_with("/bob")),
        "every POST names the client: {:?}",
        posts.iter().map(|p| &p.uri).collect::<Vec<_>>()
    );
    // HTTP/2 carries the API's host as the request's authority.
    assert!(
        posts[0].uri.starts_with("http://api.internal/"),
        "{}",
        posts[0].uri
    );
}

#[tokio::test]
async fn nobody_on_the_api_unix_socket_gives_the_client_502() {
    let path = SocketPath::new();
    let api = MockApi::start().await;
    let gateway = gateway_for(&api, &path, false).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 502);

    // The API starts listening: the next client gets in without restarting the gateway.
    let api = MockApi::on_unix_socket(&path.0).await;
    let mut ws = gateway.connect("/alice").await;
    assert_eq!(round_trip(&mut ws, "late").await, "echo:late");
    api.wait_for("POST", 1).await;
}

#[tokio::test]
async fn an_https_api_with_a_unix_socket_stops_the_binary_naming_the_flag() {
    let log = Binary::refused_at_start(
        "https://api.internal/",
        &["--api-unix-socket", "/tmp/ws2http-no-such.sock"],
        &[],
    )
    .await;
    assert!(log.contains("--api-unix-socket"), "{log}");
}

/// A gateway that also serves its control API on `control` (the API over loopback TCP).
async fn gateway_with_control_socket(api: &MockApi, control: &SocketPath) -> TestGateway {
    let mut config = test_config(api);
    config.control_unix_socket = Some(control.0.clone());
    TestGateway::start(config).await
}

/// One HTTP/1.1 request over the Unix socket at `path`; the answer's status and body.
async fn unix_request(path: &SocketPath, request: &str) -> (u16, String) {
    let mut stream = UnixStream::connect(&path.0).await.expect("connect");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut data = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut data)).await;
    let response = parse_response(&data)
        .unwrap_or_else(|| panic!("no answer in {:?}", String::from_utf8_lossy(&data)));
    (response.status, response.text())
}

fn push_request(client: &str, body: &str, token: Option<&str>) -> String {
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    format!(
        "POST /{client} HTTP/1.1\r\nHost: gateway\r\n{authorization}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_push_over_the_control_unix_socket_reaches_the_client() {
    let control = SocketPath::new();
    let api = MockApi::start().await;
    let gateway = gateway_with_control_socket(&api, &control).await;
    let mut ws = gateway.connect("/alice").await;

    let (status, body) = unix_request(&control, &push_request("alice", "news", None)).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(next_text(&mut ws).await, "news");
    let (status, _) = unix_request(&control, &push_request("nobody", "news", None)).await;
    assert_eq!(status, 404);
    // The TCP control listener still serves.
    assert_eq!(gateway.control("POST", "/alice", b"more").await.status, 200);
    assert_eq!(next_text(&mut ws).await, "more");
}

#[tokio::test]
async fn h2c_pushes_over_the_control_unix_socket_reach_the_client() {
    let control = SocketPath::new();
    let api = MockApi::start().await;
    let gateway = gateway_with_control_socket(&api, &control).await;
    let mut ws = gateway.connect("/carol").await;

    let io = TokioIo::new(UnixStream::connect(&control.0).await.unwrap());
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(connection);
    for n in 0..5 {
        let request = hyper::Request::post("http://gateway/carol")
            .body(Full::new(Bytes::from(format!("p{n}"))))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, Bytes::from_static(b"ok"));
        assert_eq!(next_text(&mut ws).await, format!("p{n}"));
    }
}

#[tokio::test]
async fn the_control_unix_socket_asks_for_the_bearer_token_too() {
    let control = SocketPath::new();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.control_unix_socket = Some(control.0.clone());
    config.control_token = Some("s3cret".into());
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/dave").await;

    let (status, _) = unix_request(&control, &push_request("dave", "x", None)).await;
    assert_eq!(status, 401);
    let (status, _) = unix_request(&control, &push_request("dave", "x", Some("wrong"))).await;
    assert_eq!(status, 401);
    let (status, _) = unix_request(&control, &push_request("dave", "y", Some("s3cret"))).await;
    assert_eq!(status, 200);
    assert_eq!(
        next_text(&mut ws).await,
        "y",
        "only the authorized push arrives"
    );
}

#[tokio::test]
async fn the_control_unix_socket_is_for_owner_and_group_and_goes_at_shutdown() {
    use std::os::unix::fs::PermissionsExt;
    let control = SocketPath::new();
    let api = MockApi::start().await;
    let mut gateway = gateway_with_control_socket(&api, &control).await;
    let mode = std::fs::metadata(&control.0).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "mode {mode:o}");
    gateway.shutdown().await;
    assert!(
        !control.0.exists(),
        "the socket file is removed at shutdown"
    );
}

#[tokio::test]
async fn a_stale_control_socket_is_replaced_but_a_live_one_or_a_plain_file_is_not() {
    let api = MockApi::start().await;
    let control = SocketPath::new();

    // Left behind by a process that did not remove it: nobody answers on it.
    drop(std::os::unix::net::UnixListener::bind(&control.0).unwrap());
    assert!(control.0.exists());
    let gateway = gateway_with_control_socket(&api, &control).await;
    let mut ws = gateway.connect("/erin").await;
    let (status, _) = unix_request(&control, &push_request("erin", "hi", None)).await;
    assert_eq!(status, 200);
    assert_eq!(next_text(&mut ws).await, "hi");

    // The same path while that gateway still listens on it.
    let mut config = test_config(&api);
    config.control_unix_socket = Some(control.0.clone());
    let error = ws2http::Gateway::bind(config.clone())
        .await
        .err()
        .expect("a live socket is not taken over")
        .to_string();
    assert!(error.contains("--control-unix-socket"), "{error}");

    let file = SocketPath::new();
    std::fs::write(&file.0, b"not a socket").unwrap();
    config.control_unix_socket = Some(file.0.clone());
    let error = ws2http::Gateway::bind(config)
        .await
        .err()
        .expect("a plain file is not replaced")
        .to_string();
    assert!(error.contains("--control-unix-socket"), "{error}");
    assert_eq!(std::fs::read(&file.0).unwrap(), b"not a socket");
}
