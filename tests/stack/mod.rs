//! Shared helpers for the tests that run the real stack: the `ws2http` binary, PHP's
//! built-in server with `php-api-example/`, and small blocking HTTP and websocket
//! helpers. Every process started here is killed (with its whole process group) when
//! its guard is dropped, so a failing test leaves nothing behind.
//!
//! Missing programs (php, node, chromium) make the tests fail with a message that says
//! how to install them (`make test` or `scripts/install-deps.sh test`); they are never
//! skipped.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream as TokioTcpStream;
use tokio_websockets::{ClientBuilder, MaybeTlsStream, Message, WebSocketStream};

/// A websocket client connection as the tests use it.
pub type Ws = WebSocketStream<MaybeTlsStream<TokioTcpStream>>;

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[path = "../ports/mod.rs"]
mod ports;
pub use ports::free_port;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<tmp>/ws2http-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ws2http-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process in its own process group; the group is killed on drop.
pub struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    /// Spawns `cmd` in a new process group. Panics with an install hint when the
    /// program is missing.
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        cmd.process_group(0).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {name} ({:?}): {e}; install the test dependencies with \
                 `make test` or `scripts/install-deps.sh test`",
                cmd.get_program()
            )
        });
        Proc {
            child,
            name: name.to_string(),
        }
    }

    /// The process id (also its process group id).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Panics if the process has already exited (it should be serving).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}", self.name);
        }
    }

    /// Kills the whole process group now and reaps the child.
    pub fn kill(&mut self) {
        // SAFETY: kill(2) with a negative pid signals the process group we created;
        // it has no memory-safety preconditions.
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `addr` accepts TCP connections, checking that `proc` is still alive.
pub fn wait_for_port(addr: SocketAddr, proc: &mut Proc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        proc.assert_running();
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not listen on {addr} within {timeout:?}",
            proc.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The secret the PHP example requires on the gateway's calls (`WS2HTTP_API_TOKEN`); its
/// gateway runs with `--api-token` set to it.
pub const API_TOKEN: &str = "php-example-api-token";

/// A login's answer: the ClientId the example chose, and the token for it.
pub struct Login {
    /// The ClientId to open the websocket on.
    pub client_id: String,
    /// The signed token for `?token=` or the cookie.
    pub token: String,
}

/// The PHP example API served by `php -S` with its router script.
pub struct PhpExample {
    /// Where it listens (127.0.0.1:port).
    pub addr: SocketAddr,
    proc: Proc,
    dir: TempDir,
}

impl PhpExample {
    /// Starts `php -S` on a free port with its own SQLite file; pushes go to
    /// `push_url` (a gateway's control listener or a proxy's internal frontend).
    pub fn start(push_url: &str) -> Self {
        let dir = TempDir::new("php");
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let example = repo_root().join("php-api-example");
        let mut cmd = Command::new("php");
        cmd.arg("-S")
            .arg(addr.to_string())
            .arg("router.php")
            .current_dir(&example)
            .env("WS2HTTP_PUSH_URL", push_url)
            .env("WS2HTTP_DB", dir.path().join("chat.sqlite"))
            .env("WS2HTTP_API_TOKEN", API_TOKEN)
            .env("PHP_CLI_SERVER_WORKERS", "4");
        let mut proc = Proc::spawn("php -S (php-cli)", cmd);
        wait_for_port(addr, &mut proc, Duration::from_secs(15));
        PhpExample { addr, proc, dir }
    }

    /// Its SQLite file (`WS2HTTP_DB`): members and the token secret.
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("chat.sqlite")
    }

    /// `http://127.0.0.1:port/`, the API base the gateway appends ClientIds to.
    pub fn base_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The origin the example binds to tokens issued by [`PhpExample::login`].
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Logs `name` in through `POST /auth/login`.
    pub fn login(&self, name: &str) -> Login {
        let body = format!(r#"{{"name":"{name}"}}"#);
        let res = http_request(
            self.addr,
            "POST",
            "/auth/login",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(res.status, 200, "login failed: {}", res.text());
        Login {
            client_id: json_str(&res.text(), "clientId").expect("clientId in login reply"),
            token: json_str(&res.text(), "token").expect("token in login reply"),
        }
    }
}

/// One gateway process (`target/…/ws2http`) with explicit ports.
pub struct Gateway {
    /// Public websocket listener.
    pub public: SocketAddr,
    /// Control listener (push API).
    pub control: SocketAddr,
    proc: Proc,
}

impl Gateway {
    /// Starts the gateway binary in front of `api` with `extra` arguments and waits
    /// for `GET /healthz` on its public listener.
    pub fn start(binary: &str, api: &str, extra: &[&str]) -> Self {
        Self::start_with_ports(binary, api, free_port(), free_port(), extra)
    }

    /// Like [`Gateway::start`] on the given public and control ports (127.0.0.1).
    pub fn start_with_ports(
        binary: &str,
        api: &str,
        public_port: u16,
        control_port: u16,
        extra: &[&str],
    ) -> Self {
        let public: SocketAddr = ([127, 0, 0, 1], public_port).into();
        let control: SocketAddr = ([127, 0, 0, 1], control_port).into();
        let mut cmd = Command::new(binary);
        cmd.arg("--listen")
            .arg(public.to_string())
            .arg("--control-listen")
            .arg(control.to_string())
            .arg("--api")
            .arg(api)
            .args(extra);
        let mut proc = Proc::spawn("ws2http", cmd);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            proc.assert_running();
            if let Ok(res) = try_http_request(public, "GET", "/healthz", &[], b"") {
                if res.status == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "gateway not healthy on {public}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Gateway {
            public,
            control,
            proc,
        }
    }

    /// `http://<control>/`, the push base URL for the API.
    pub fn push_url(&self) -> String {
        format!("http://{}/", self.control)
    }

    /// `ws://<public>/`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/", self.public)
    }

    /// Kills the gateway now.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header lines as (lower-cased name, value).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A blocking HTTP/1.1 request with `Connection: close`; panics on I/O errors.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    try_http_request(addr, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// A blocking HTTP/1.1 request with `Connection: close`.
pub fn try_http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad HTTP response"))
}

fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// Reads a string field from a flat JSON object as PHP's `json_encode` writes it
/// (no spaces). Handles the common escapes; enough for the example's events.
pub fn json_str(json: &str, key: &str) -> Option<String> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let mut out = String::new();
    let mut chars = json[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Reads an integer field from a flat JSON object.
pub fn json_int(json: &str, key: &str) -> Option<i64> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = json[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    digits.parse().ok()
}

/// Opens a websocket to `url` with extra request headers. On a refused upgrade the
/// error is `Err(Some(status))`; other failures are `Err(None)`.
pub async fn ws_connect(url: &str, headers: &[(&str, &str)]) -> Result<Ws, Option<u16>> {
    let mut builder = ClientBuilder::new().uri(url).expect("valid ws url");
    for (name, value) in headers {
        builder = builder
            .add_header(
                http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                http::HeaderValue::from_str(value).expect("header value"),
            )
            .expect("add header");
    }
    match tokio::time::timeout(Duration::from_secs(15), builder.connect()).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_websockets::Error::Upgrade(
            tokio_websockets::upgrade::Error::DidNotSwitchProtocols(status),
        ))) => Err(Some(status)),
        Ok(Err(e)) => {
            eprintln!("websocket connect to {url} failed: {e}");
            Err(None)
        }
        Err(_) => {
            eprintln!("websocket connect to {url} timed out");
            Err(None)
        }
    }
}

/// The next text message, skipping pings/pongs; panics on close, error or timeout.
pub async fn next_text(ws: &mut Ws, timeout: Duration) -> String {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no message within {timeout:?}"))
            .expect("websocket ended")
            .expect("websocket error");
        if let Some(text) = msg.as_text() {
            return text.to_string();
        }
        if msg.is_close() {
            panic!("websocket closed: {:?}", msg.as_close());
        }
    }
}

/// Sends a text message.
pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_string()))
        .await
        .expect("send text");
}
