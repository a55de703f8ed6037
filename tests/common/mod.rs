//! Test support for the behaviour tests: a scriptable mock API (hyper) that records every
//! request, an in-process gateway on port 0, websocket clients, and a raw HTTP client for
//! handshakes and the control listener.
#![allow(dead_code)]

pub mod binary;
pub mod raw_ws;
pub mod tls;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};
use ws2http::{Config, DescriptorBudget, DrainReport, Gateway};

/// A websocket client connection.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One request as the mock API saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
    /// When the request arrived.
    pub at: tokio::time::Instant,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What the mock API answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            body: body.into(),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn status(status: u16, body: impl Into<Bytes>) -> Reply {
        Reply {
            status,
            ..Reply::ok(body)
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A scriptable API on 127.0.0.1:0 that records every request.
pub struct MockApi {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
    task: JoinHandle<()>,
}

/// The default script: GET → `ok`, POST → `echo:<body>`, DELETE → `ok`.
pub fn echo_script(seen: &Seen) -> Reply {
    match seen.method.as_str() {
        "GET" => Reply::ok("ok"),
        "POST" => {
            let mut body = b"echo:".to_vec();
            body.extend_from_slice(&seen.body);
            let reply = Reply::ok(body);
            match seen.header("content-type") {
                Some(ct) if ct.starts_with("application/octet-stream") => {
                    reply.header("content-type", "application/octet-stream")
                }
                _ => reply,
            }
        }
        _ => Reply::ok("ok"),
    }
}

impl MockApi {
    pub async fn start() -> MockApi {
        MockApi::with_script(echo_script).await
    }

    pub async fn with_script(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> MockApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        MockApi::on_listener(listener, Arc::new(script)).await
    }

    /// The same on a port below the kernel's ephemeral range (`binary::free_port`): for a
    /// test that stops the API and must not find another test's server on its port after.
    pub async fn with_script_on_a_kept_port(
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> MockApi {
        // A port free a moment ago can be taken by another test's server before this binds it.
        let mut attempts = 0;
        let listener = loop {
            attempts += 1;
            match TcpListener::bind(("127.0.0.1", binary::free_port())).await {
                Ok(listener) => break listener,
                Err(e) if attempts >= 5 => panic!("no port for the mock API: {e}"),
                Err(_) => continue,
            }
        };
        MockApi::on_listener(listener, Arc::new(script)).await
    }

    /// An API that answers every POST with `reply` after `delay`, and everything else `ok` at
    /// once: a slow API for the tests of waiting, timeouts and draining.
    pub async fn with_slow_posts(reply: &'static str, delay: Duration) -> MockApi {
        MockApi::with_script(move |s| match s.method.as_str() {
            "POST" => Reply::ok(reply).after(delay),
            _ => Reply::ok("ok"),
        })
        .await
    }

    /// The same API listening on a Unix socket at `path` instead (its `addr` is unspecified);
    /// the gateway reaches it with `api_unix_socket`.
    pub async fn on_unix_socket(path: &std::path::Path) -> MockApi {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        MockApi::on_listener(ApiListener::Unix(listener), Arc::new(echo_script)).await
    }

    async fn on_listener(listener: impl Into<ApiListener>, script: Script) -> MockApi {
        let listener = listener.into();
        let addr = match &listener {
            ApiListener::Tcp(listener) => listener.local_addr().unwrap(),
            ApiListener::Unix(_) => SocketAddr::from(([127, 0, 0, 1], 9)),
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script));
        let (seen2, script2) = (seen.clone(), script.clone());
        let task = tokio::spawn(async move {
            loop {
                let (seen, script) = (seen2.clone(), script2.clone());
                match &listener {
                    ApiListener::Tcp(listener) => {
                        if let Ok((stream, _)) = listener.accept().await {
                            tokio::spawn(serve_api_connection(TokioIo::new(stream), seen, script));
                        }
                    }
                    ApiListener::Unix(listener) => {
                        if let Ok((stream, _)) = listener.accept().await {
                            tokio::spawn(serve_api_connection(TokioIo::new(stream), seen, script));
                        }
                    }
                }
            }
        });
        MockApi {
            addr,
            seen,
            script,
            task,
        }
    }

    /// Replaces the script.
    pub fn set_script(&self, script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(script);
    }

    pub fn base(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn seen_with(&self, method: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|s| s.method == method)
            .collect()
    }

    /// Waits until `count` requests of `method` were seen; returns them.
    pub async fn wait_for(&self, method: &str, count: usize) -> Vec<Seen> {
        let limit = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let found = self.seen_with(method);
            if found.len() >= count {
                return found;
            }
            if tokio::time::Instant::now() > limit {
                panic!(
                    "waited 15s for {count} {method} requests; saw {}: {:?}",
                    found.len(),
                    found.iter().map(|s| &s.uri).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops accepting and drops open connections.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for MockApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the mock API listens.
enum ApiListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for ApiListener {
    fn from(listener: TcpListener) -> ApiListener {
        ApiListener::Tcp(listener)
    }
}

/// Serves one API connection: records each request and answers it as the script says.
async fn serve_api_connection<T>(io: T, seen: Arc<Mutex<Vec<Seen>>>, script: Arc<Mutex<Script>>)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let (seen, script) = (seen.clone(), script.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let headers = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let record = Seen {
                at: tokio::time::Instant::now(),
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                headers,
                body,
            };
            let reply = {
                let script = script.lock().unwrap().clone();
                script(&record)
            };
            seen.lock().unwrap().push(record);
            if !reply.delay.is_zero() {
                tokio::time::sleep(reply.delay).await;
            }
            let mut response = Response::new(Full::new(reply.body));
            *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
            for (k, v) in reply.headers {
                response.headers_mut().append(
                    hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            Ok::<_, Infallible>(response)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(io, service)
        .await;
}

/// A gateway running in this process.
pub struct TestGateway {
    pub public: SocketAddr,
    pub control: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<DrainReport>>,
}

/// A config for tests: loopback, port 0, short timeouts, the given API.
pub fn test_config(api: &MockApi) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        api: api.base().parse().unwrap(),
        upstream_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

impl TestGateway {
    /// Waits until the gateway has no DELETE queued or unfinished
    /// (`upstream_disconnects_waiting` and `upstream_disconnects_in_flight` both 0); fails the
    /// test at `deadline`.
    pub async fn wait_until_no_delete_is_queued_or_unfinished(
        &self,
        deadline: tokio::time::Instant,
    ) {
        loop {
            let metrics = self.metrics().await;
            if metrics["upstream_disconnects_waiting"] == 0.0
                && metrics["upstream_disconnects_in_flight"] == 0.0
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "DELETEs still queued or unfinished at the deadline: {metrics:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn start(config: Config) -> TestGateway {
        TestGateway::serve(Gateway::bind(config).await.expect("gateway binds"))
    }

    /// Like [`TestGateway::start`], with an explicit descriptor budget.
    pub async fn start_with_budget(config: Config, budget: DescriptorBudget) -> TestGateway {
        TestGateway::serve(
            Gateway::bind_with_budget(config, budget)
                .await
                .expect("gateway binds"),
        )
    }

    fn serve(gateway: Gateway) -> TestGateway {
        let (public, control) = (gateway.public_addr(), gateway.control_addr());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gateway.serve(async {
            let _ = stopped.await;
        }));
        TestGateway {
            public,
            control,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts the graceful shutdown and waits for it.
    pub async fn shutdown(&mut self) -> DrainReport {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task
            .take()
            .expect("running")
            .await
            .expect("serve task")
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.public, path)
    }

    /// Connects a websocket client to `path` (e.g. `/alice?x=1`).
    pub async fn connect(&self, path: &str) -> Ws {
        self.try_connect(path, &[])
            .await
            .expect("websocket connects")
    }

    pub async fn try_connect(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Ws, tokio_websockets::Error> {
        try_connect_url(&self.url(path), headers).await
    }

    /// A control request.
    pub async fn control(&self, method: &str, path: &str, body: &[u8]) -> RawResponse {
        raw_http(self.control, method, path, &[], body).await
    }

    /// Reads `/metrics` into name → value (labels kept in the name).
    pub async fn metrics(&self) -> HashMap<String, f64> {
        let response = self.control("GET", "/metrics", b"").await;
        assert_eq!(response.status, 200);
        parse_metrics(&response.text())
    }

    /// Reads `/metrics` every 20 ms until `name`'s value satisfies `done`; panics with all the
    /// metrics if it does not within `within`.
    pub async fn wait_for_metric(&self, name: &str, done: impl Fn(f64) -> bool, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let metrics = self.metrics().await;
            if metrics.get(name).copied().is_some_and(&done) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name} not there after {within:?}: {metrics:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (10 s at most) until the gateway has counted its first DELETE as taken by the
    /// API (`disconnects_notified` 1): it counts it on the API's answer, so after that
    /// request's own counts, which the mock API records before it answers.
    pub async fn wait_for_the_first_delete_told(&self) {
        self.wait_for_metric(
            "disconnects_notified",
            |n| n == 1.0,
            Duration::from_secs(10),
        )
        .await;
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Connects a websocket client to `url` with extra header lines; for a task that cannot
/// borrow the gateway ([`TestGateway::url`] gives the URL).
pub async fn try_connect_url(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Ws, tokio_websockets::Error> {
    let mut builder = ClientBuilder::new().uri(url).unwrap();
    for (k, v) in headers {
        builder = builder
            .add_header(
                hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            )
            .unwrap();
    }
    builder.connect().await.map(|(ws, _)| ws)
}

/// An HTTP response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole response.
pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> RawResponse {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    raw_exchange(addr, &bytes).await
}

/// Writes raw bytes and parses the response (read to EOF, 10 s at most).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut data = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
            }
            // A 101 keeps the socket open: its head is the whole answer.
            if let Some(response) = parse_response(&data) {
                if response.status == 101 {
                    break;
                }
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    parse_response(&data)
        .unwrap_or_else(|| panic!("no HTTP response in {:?}", String::from_utf8_lossy(&data)))
}

pub fn parse_response(data: &[u8]) -> Option<RawResponse> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&data[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = data[end + 4..].to_vec();
    if let Some(len) = headers
        .get("content-length")
        .and_then(|l| l.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

/// A websocket upgrade request for `path`, as raw bytes, with extra header lines.
pub fn upgrade_request(path: &str, extra: &[&str]) -> Vec<u8> {
    let mut text = format!(
        "GET {path} HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for line in extra {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("\r\n");
    text.into_bytes()
}

/// Sends a text message and returns the next data message's text (5 s at most).
pub async fn round_trip(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text.to_owned())).await.expect("send");
    next_text(ws).await
}

/// The next text message (5 s at most).
pub async fn next_text(ws: &mut Ws) -> String {
    let message = next_data(ws).await;
    message.as_text().expect("a text message").to_owned()
}

/// The next text or binary message (5 s at most).
pub async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5s")
            .expect("the socket is open")
            .expect("no websocket error");
        if item.is_text() || item.is_binary() {
            return item;
        }
    }
}

/// Reads until the server's close frame; returns its code and reason (5 s at most).
pub async fn close_frame(ws: &mut Ws) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let item = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a close frame within 5s");
        match item {
            Some(Ok(message)) if message.is_close() => {
                let (code, reason) = message
                    .as_close()
                    .map(|(c, r)| (u16::from(c), r.to_owned()))
                    .unwrap_or((1005, String::new()));
                return (code, reason);
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Boxed future helper for scripts that need async.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Checks the accounting at a test's end: `connections_active` is `open`, the number of
/// websockets the test still holds open (0 once it closed or dropped them all), and so is
/// `connections_opened - connections_closed` (the gauge is that difference, floored at 0, so a
/// close counted twice could hide behind it); closes still being counted are waited for, 5 s
/// at most. Then: one DELETE per closed connection, no two with one `X-Connection-Id`, each
/// for a connection the API was asked about.
pub async fn assert_accounting(gateway: &TestGateway, api: &MockApi, open: usize) {
    assert_accounting_from(|| gateway.metrics(), api, open).await;
}

/// [`assert_accounting`] with the metrics read by `metrics` (a control listener that wants a
/// token).
pub async fn assert_accounting_from<F, M>(metrics: M, api: &MockApi, open: usize)
where
    M: Fn() -> F,
    F: Future<Output = HashMap<String, f64>>,
{
    let want = open as f64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = metrics().await;
        let settled = metrics["connections_active"] == want
            && metrics["connections_opened"] - metrics["connections_closed"] == want;
        if settled || tokio::time::Instant::now() >= deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let opened = metrics["connections_opened"];
    let closed = metrics["connections_closed"];
    assert_eq!(
        metrics["connections_active"], want,
        "connections_active is the {open} websockets the test holds open: {metrics:?}"
    );
    assert_eq!(
        opened - closed,
        want,
        "opened - closed is the {open} websockets the test holds open: {metrics:?}"
    );
    let deletes = api.wait_for("DELETE", closed as usize).await;
    let mut ids: Vec<_> = deletes
        .iter()
        .map(|d| d.header("x-connection-id").unwrap().to_owned())
        .collect();
    ids.sort();
    let total = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), total, "one DELETE per connection id");
    // Each DELETE is of a connection the API was asked about, not a made-up one.
    let asked: std::collections::HashSet<String> = api
        .seen_with("GET")
        .iter()
        .filter_map(|g| g.header("x-connection-id").map(str::to_owned))
        .collect();
    let unasked: Vec<_> = ids.iter().filter(|id| !asked.contains(*id)).collect();
    assert!(
        unasked.is_empty(),
        "DELETEs of connections the API never got a GET for: {unasked:?}"
    );
}

/// The requests the API saw for anything but `marker`, once a websocket has connected at
/// `marker` (it opens only after the API answered its GET). The gateway sent whatever it sent
/// for requests answered before this call ahead of that GET, so a test that checks that
/// something never reached the API looks here instead of sleeping a fixed time first. The
/// API must accept `marker`; its socket is dropped on return.
pub async fn seen_before_a_later_connect(
    gateway: &TestGateway,
    api: &MockApi,
    marker: &str,
) -> Vec<Seen> {
    let _ws = gateway.connect(marker).await;
    api.seen().into_iter().filter(|s| s.uri != marker).collect()
}

/// The DELETEs the API got for anything but `marker`, once it has the DELETE of a websocket
/// opened and dropped at `marker` now, and the gateway has no DELETE queued or unfinished
/// (`upstream_disconnects_waiting` and `upstream_disconnects_in_flight` both 0). The gateway
/// queues each DELETE as it decides on it and takes them from the queue in that order, so one
/// decided before this call had left the queue before the marker's, and was then done (told,
/// or given up after its retries): a test that checks that something got no DELETE looks here
/// instead of sleeping a fixed time first. The API must accept `marker`.
pub async fn deletes_before_a_later_one(
    gateway: &TestGateway,
    api: &MockApi,
    marker: &str,
) -> Vec<Seen> {
    drop(gateway.connect(marker).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while api.seen_with("DELETE").iter().all(|d| d.uri != marker) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no DELETE for {marker} within 15 s: {:?}",
            api.seen()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gateway
        .wait_until_no_delete_is_queued_or_unfinished(deadline)
        .await;
    api.seen_with("DELETE")
        .into_iter()
        .filter(|d| d.uri != marker)
        .collect()
}

/// Reads `"name":<number>` out of a flat JSON object.
pub fn json_number(json: &str, name: &str) -> usize {
    let key = format!("\"{name}\":");
    let start = json
        .find(&key)
        .unwrap_or_else(|| panic!("{name} in {json}"))
        + key.len();
    json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

/// Pushes 128-KiB messages to `path` until its socket stops taking them (its client reads
/// nothing and has a small receive buffer) and one waits in the mailbox; returns how many
/// were pushed.
pub async fn push_until_stalled(gateway: &TestGateway, path: &str) -> usize {
    let chunk = vec![b'x'; 128 * 1024];
    for pushed in 1..=60 {
        let response = gateway.control("POST", path, &chunk).await;
        assert_eq!(response.status, 200, "push {pushed}: {}", response.text());
        tokio::time::sleep(Duration::from_millis(30)).await;
        let info = gateway.control("GET", path, b"").await.text();
        if json_number(&info, "queued") > 0 {
            return pushed;
        }
    }
    panic!("the socket still took writes after 60 pushes of 128 KiB");
}

/// An h2c (prior knowledge) connection to the control listener at `control`: its sender, and
/// the task that drives it, which ends when the gateway closes the connection (or once every
/// sender and request on it is gone).
pub async fn control_h2c<B>(
    control: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<B>, JoinHandle<()>)
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(control).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .expect("the control listener speaks h2c");
    let driving = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, driving)
}

/// The TCP sockets this process holds open (by a descriptor) whose peer is 127.0.0.1:`port`:
/// an in-process gateway's connections to an API on that port (the API's own sockets have it
/// as their local port). Counted by inode: a read of `/proc/net/tcp` while sockets come and go
/// can show one twice.
pub fn sockets_to(port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let peer = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 9 && fields[2] == peer && inodes.contains(fields[9]))
                .then(|| fields[9].to_owned())
        })
        .collect::<std::collections::HashSet<_>>()
        .len()
}
