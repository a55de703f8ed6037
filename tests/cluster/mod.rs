//! Shared harness for `tests/haproxy_cluster.rs` and `tests/nginx_cluster.rs`: three
//! real `ws2http` gateway processes behind a real HAProxy or nginx process started from
//! the shipped configuration (`haproxy/haproxy.cfg`, `nginx/nginx.conf`) on free ports,
//! an in-process mock API that records which node saw which ClientId, websocket clients
//! that reconnect by themselves, and the scenario both proxies must pass
//! ([`run_failover_scenario`]).
//!
//! Each gateway node gets its own `--api` base URL (`http://127.0.0.1:<port>/gw<n>/`),
//! so the path of every call the mock API receives names the node that made it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::task::JoinHandle;
use tokio_websockets::{ClientBuilder, Message};

/// Number of websocket clients in the scenario.
pub const CLIENTS: usize = 300;
/// Number of gateway nodes behind the proxy.
pub const NODES: usize = 3;

/// Which proxy sits in front of the gateways.
// Each test crate that includes this module constructs only its own variant.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    /// `haproxy/haproxy.cfg`, run unchanged with addresses from environment variables.
    Haproxy,
    /// `nginx/nginx.conf`, with its addresses rewritten to free ports.
    Nginx,
}

/// How the node with the most clients fails in [`run_failover_scenario`].
// Each test crate that includes this module uses only some variants.
#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// SIGKILL: the process and its sockets are gone at once.
    Crash,
    /// SIGSTOP: the process keeps its sockets open but answers nothing, like a hung
    /// node; only a proxy with active health checks notices.
    Hang,
}

/// Root of the repository (where `haproxy/` and `nginx/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of a system tool such as `haproxy` or `nginx`: from `PATH`, else from the sbin
/// directories Debian installs them to (often not on a normal user's `PATH`). A missing
/// tool gives its bare name, so starting it fails with a clear message.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

#[path = "../ports/mod.rs"]
mod ports;
pub use ports::free_port;

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A fresh scratch directory under Cargo's per-target temp dir, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Creates `<CARGO_TARGET_TMPDIR>/<name>-<pid>-<nanos>`.
    pub fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{name}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).expect("create scratch dir");
        ScratchDir(dir)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process that is stopped when dropped: SIGTERM first (nginx's master must
/// take its workers down with it), SIGKILL if it is still there after 5 s.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Self {
        let out = fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {name} ({cmd:?}): {e}; is it installed? `make test` installs it"
                )
            });
        Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// Panics with the log's tail if the process has already exited.
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited early with {status}; log {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
        }
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGTERM`, ...) to the process.
    pub fn signal(&self, signal: libc::c_int) {
        if let Some(child) = self.child.as_ref() {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            let rc = send_signal(pid, signal);
            assert_eq!(
                rc,
                0,
                "kill({pid}, {signal}) of {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
    }

    /// SIGKILL, the way a crashed or OOM-killed node goes away, and reap it.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            // SIGTERM through libc (a dev-dependency): std's Child::kill only sends SIGKILL,
            // and nginx's master needs SIGTERM to take its workers down with it.
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                send_signal(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// kill(2): `0` if `signal` was sent to `pid`, `-1` (reason in `errno`) if not.
fn send_signal(pid: libc::pid_t, signal: libc::c_int) -> libc::c_int {
    // SAFETY: kill(2) takes two integers and touches no memory of ours; `pid` is a child
    // this process spawned and has not reaped yet, so the pid cannot have been reused.
    unsafe { libc::kill(pid, signal) }
}

/// The last 40 lines of a log file, for failure messages.
pub fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Waits until a TCP connect to `addr` succeeds.
pub fn wait_for_port(addr: SocketAddr, proc_: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        proc_.assert_running();
        assert!(
            Instant::now() < deadline,
            "{} does not listen on {addr}; log {}:\n{}",
            proc_.name,
            proc_.log.display(),
            log_tail(&proc_.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// Mock API
// ---------------------------------------------------------------------------

/// Everything the mock API saw, by node (0-based) and ClientId.
#[derive(Default, Debug)]
pub struct ApiLog {
    /// Connect calls (`GET /gw<n>/<id>?<query>`): (node, id, query).
    pub connects: Vec<(usize, String, String)>,
    /// Message calls (`POST /gw<n>/<id>`): (node, id).
    pub messages: Vec<(usize, String)>,
    /// Disconnect calls (`DELETE /gw<n>/<id>`): (node, id).
    pub disconnects: Vec<(usize, String)>,
}

/// The mock API: GET → `ok`, POST → echo of the body (after 4 s for a body that starts
/// with `slow`), DELETE → `ok`, all recorded.
pub struct MockApi {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub log: Arc<Mutex<ApiLog>>,
    task: JoinHandle<()>,
}

impl Drop for MockApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockApi {
    /// Starts the server on a free loopback port.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind mock API");
        let addr = listener.local_addr().expect("mock API address");
        let log = Arc::new(Mutex::new(ApiLog::default()));
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = task_log.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle_api(req, log.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        MockApi { addr, log, task }
    }

    /// The `--api` base URL for node `node` (0-based).
    pub fn base_url(&self, node: usize) -> String {
        format!("http://{}/gw{}/", self.addr, node + 1)
    }
}

async fn handle_api(
    req: Request<Incoming>,
    log: Arc<Mutex<ApiLog>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let parsed = path.strip_prefix("/gw").and_then(|rest| {
        let (n, id) = rest.split_once('/')?;
        Some((n.parse::<usize>().ok()?.checked_sub(1)?, id.to_string()))
    });
    let Some((node, id)) = parsed else {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"no such path"),
        ));
    };
    let method = req.method().clone();
    let body = req.into_body().collect().await?.to_bytes();
    if method == Method::POST {
        // Recorded as it arrives, before a slow answer's wait.
        log.lock()
            .unwrap_or_else(|e| e.into_inner())
            .messages
            .push((node, id));
        if body.starts_with(b"slow") {
            tokio::time::sleep(SLOW_ANSWER).await;
        }
        return Ok(reply(StatusCode::OK, body));
    }
    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
    Ok(match method {
        Method::GET => {
            log.connects.push((node, id, query));
            reply(StatusCode::OK, Bytes::from_static(b"ok"))
        }
        Method::DELETE => {
            log.disconnects.push((node, id));
            reply(StatusCode::OK, Bytes::from_static(b"ok"))
        }
        _ => reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::new()),
    })
}

/// How long the mock API takes to answer a message that starts with `slow`.
const SLOW_ANSWER: Duration = Duration::from_secs(4);

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res
}

// ---------------------------------------------------------------------------
// Gateways and proxies
// ---------------------------------------------------------------------------

/// One `ws2http` process.
pub struct GatewayNode {
    /// Its `--listen` address.
    pub public: SocketAddr,
    /// Its `--control-listen` address.
    pub control: SocketAddr,
    /// The process.
    pub proc_: Proc,
}

impl GatewayNode {
    /// Starts node `node` (0-based) with explicit free ports, calling `api_base`, with
    /// `extra` flags.
    pub fn start_with(node: usize, api_base: &str, dir: &Path, extra: &[&str]) -> Self {
        let public = loopback(free_port());
        let control = loopback(free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ws2http"));
        cmd.arg("--listen")
            .arg(public.to_string())
            .arg("--control-listen")
            .arg(control.to_string())
            .arg("--api")
            .arg(api_base)
            .args(extra);
        let name = format!("gateway gw{}", node + 1);
        let mut proc_ = Proc::spawn(&name, cmd, &dir.join(format!("gw{}.log", node + 1)));
        wait_for_port(public, &mut proc_);
        wait_for_port(control, &mut proc_);
        GatewayNode {
            public,
            control,
            proc_,
        }
    }
}

/// A running HAProxy or nginx.
pub struct ProxyProcess {
    /// The public (websocket) entry point.
    pub public: SocketAddr,
    /// The internal (push) entry point.
    pub push: SocketAddr,
    /// HAProxy's stats page (HAProxy only).
    pub stats: Option<SocketAddr>,
    /// The process.
    pub proc_: Proc,
}

/// HAProxy's connection limits, the environment variables `haproxy/haproxy.cfg` reads for
/// them.
#[derive(Clone, Copy, Debug)]
pub struct HaproxyLimits {
    /// `WS2HTTP_MAXCONN`: connections at once, all listeners together.
    pub total: u32,
    /// `WS2HTTP_PUBLIC_MAXCONN`: the public (websocket) entry's share.
    pub public: u32,
    /// `WS2HTTP_PUSH_MAXCONN`: the push entry's share.
    pub push: u32,
}

impl HaproxyLimits {
    /// What the tests need: [`CLIENTS`] websockets with 100 to spare, 50 pushes at once
    /// with 50 to spare, 10 for the stats page. HAProxy asks for descriptors by these:
    /// 1042, where the shipped 9000 asks for 18022 and HAProxy refuses to start under a
    /// lower hard open-files limit.
    pub const TESTS: HaproxyLimits = HaproxyLimits {
        total: CLIENTS as u32 + 100 + 100 + 10,
        public: CLIENTS as u32 + 100,
        push: 100,
    };
}

/// Starts the shipped `haproxy/haproxy.cfg` unchanged; addresses, the (short) health check
/// interval and the connection `limits` come from the environment variables the file reads.
pub fn start_haproxy(nodes: &[GatewayNode], dir: &Path, limits: HaproxyLimits) -> ProxyProcess {
    let public = loopback(free_port());
    let push = loopback(free_port());
    let stats = loopback(free_port());
    let cfg = repo_root().join("haproxy/haproxy.cfg");
    let mut cmd = Command::new(tool("haproxy"));
    cmd.arg("-db").arg("-f").arg(&cfg);
    cmd.env("WS2HTTP_PUBLIC_BIND", public.to_string())
        .env("WS2HTTP_PUSH_BIND", push.to_string())
        .env("WS2HTTP_STATS_BIND", stats.to_string())
        .env("WS2HTTP_CHECK_INTER", "200ms")
        // Two failed checks, not one: a single slow answer on a loaded CI machine must
        // not take a live node (and, through shutdown-sessions, its sockets) out.
        .env("WS2HTTP_CHECK_FALL", "2");
    cmd.env("WS2HTTP_MAXCONN", limits.total.to_string())
        .env("WS2HTTP_PUBLIC_MAXCONN", limits.public.to_string())
        .env("WS2HTTP_PUSH_MAXCONN", limits.push.to_string());
    for (i, node) in nodes.iter().enumerate() {
        cmd.env(
            format!("WS2HTTP_GW{}_PUBLIC", i + 1),
            node.public.to_string(),
        )
        .env(
            format!("WS2HTTP_GW{}_CONTROL", i + 1),
            node.control.to_string(),
        );
    }
    let mut proc_ = Proc::spawn("haproxy", cmd, &dir.join("haproxy.log"));
    wait_for_port(public, &mut proc_);
    wait_for_port(push, &mut proc_);
    wait_for_port(stats, &mut proc_);
    ProxyProcess {
        public,
        push,
        stats: Some(stats),
        proc_,
    }
}

/// Rewrites the addresses of the shipped `nginx/nginx.conf` (every other line, the
/// hashing and failure directives included, stays as shipped) into `dir` and starts
/// nginx with `dir` as its prefix.
pub fn start_nginx(nodes: &[GatewayNode], dir: &Path) -> ProxyProcess {
    let public = loopback(free_port());
    let push = loopback(free_port());
    let shipped =
        fs::read_to_string(repo_root().join("nginx/nginx.conf")).expect("read nginx.conf");
    let mut replacements: Vec<(String, String)> = vec![
        ("listen 8080;".into(), format!("listen {public};")),
        ("listen 127.0.0.1:8081;".into(), format!("listen {push};")),
    ];
    for (i, node) in nodes.iter().enumerate() {
        let n = i + 1;
        let forwarder = loopback(free_port());
        replacements.push((format!("127.0.0.1:7{n}01;"), format!("{};", node.public)));
        replacements.push((format!("127.0.0.1:7{n}02;"), format!("{};", node.control)));
        replacements.push((format!("127.0.0.1:719{n} "), format!("{forwarder} ")));
        replacements.push((format!("127.0.0.1:719{n};"), format!("{forwarder};")));
    }
    let conf = rewrite(&shipped, &replacements);
    // Private to its owner, as a checkout under /root is: started as root, nginx's workers
    // run as `nobody` and cannot reach anything in it (a request body spooled to
    // client_body_temp would fail).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).expect("chmod scratch dir");
    }
    let prefix = dir.join("nginx");
    fs::create_dir_all(&prefix).expect("create nginx prefix");
    fs::write(prefix.join("nginx.conf"), conf).expect("write nginx.conf");
    let mut cmd = Command::new(tool("nginx"));
    cmd.arg("-p")
        .arg(format!("{}/", prefix.display()))
        .arg("-c")
        .arg("nginx.conf")
        .arg("-e")
        .arg("stderr")
        .arg("-g")
        .arg("daemon off;");
    let mut proc_ = Proc::spawn("nginx", cmd, &dir.join("nginx.log"));
    wait_for_port(public, &mut proc_);
    wait_for_port(push, &mut proc_);
    ProxyProcess {
        public,
        push,
        stats: None,
        proc_,
    }
}

/// Replaces every `(from, to)` pair in one pass (through placeholders, so a new port can
/// never be hit by a later pattern); panics if a pattern does not occur, so a changed
/// shipped file breaks the test instead of silently keeping its fixed ports.
pub fn rewrite(text: &str, replacements: &[(String, String)]) -> String {
    let mut out = text.to_string();
    for (i, (from, _)) in replacements.iter().enumerate() {
        assert!(
            out.contains(from.as_str()),
            "shipped config no longer contains {from:?}; update tests/cluster/mod.rs"
        );
        out = out.replace(from.as_str(), &format!("\u{0}{i}\u{0}"));
    }
    for (i, (_, to)) in replacements.iter().enumerate() {
        out = out.replace(&format!("\u{0}{i}\u{0}"), to);
    }
    out
}

// ---------------------------------------------------------------------------
// HTTP and websocket clients
// ---------------------------------------------------------------------------

/// Plain HTTP/1.1 client with connection reuse.
pub type Http = Client<HttpConnector, Full<Bytes>>;

/// A new HTTP client.
pub fn http_client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request and returns status and body.
pub async fn http_call(http: &Http, method: Method, url: &str, body: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    send(http, req).await
}

/// Sends `POST <url>` with `Connection: close` (as the PHP example pushes: a connection of
/// its own, closed after the answer) and returns status and body.
pub async fn push_closing(http: &Http, url: &str, body: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(http::header::CONNECTION, "close")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    send(http, req).await
}

/// Sends `req` (an answer within 10 s, or a panic) and returns status and body.
async fn send(http: &Http, req: Request<Full<Bytes>>) -> (StatusCode, String) {
    let url = req.uri().to_string();
    let res = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .unwrap_or_else(|_| panic!("{url}: no answer in 10 s"))
        .unwrap_or_else(|e| panic!("{url}: {e:?}"));
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    (status, body)
}

/// HAProxy's view of its servers from the stats CSV: (backend, server) → status.
pub async fn haproxy_status(http: &Http, stats: SocketAddr) -> HashMap<(String, String), String> {
    haproxy_stats(http, stats, "status").await
}

/// One column (`status`, `scur`, `slim`, ...) of HAProxy's stats CSV: (proxy, server) → value;
/// a frontend's own line is the server `FRONTEND`, a backend's `BACKEND`.
pub async fn haproxy_stats(
    http: &Http,
    stats: SocketAddr,
    column: &str,
) -> HashMap<(String, String), String> {
    let (status, csv) = http_call(http, Method::GET, &format!("http://{stats}/;csv"), "").await;
    assert_eq!(status, StatusCode::OK, "stats page: {csv}");
    let header = csv
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .unwrap_or_else(|| panic!("stats CSV without a header: {csv}"));
    let at = header
        .split(',')
        .position(|name| name == column)
        .unwrap_or_else(|| panic!("no column {column:?} in the stats CSV: {header}"));
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.len() > at).then(|| ((f[0].to_string(), f[1].to_string()), f[at].to_string()))
        })
        .collect()
}

/// What one simulated browser has seen so far.
#[derive(Default, Debug, Clone)]
pub struct ClientState {
    /// Successful websocket handshakes.
    pub connects: u32,
    /// Connections that ended (closed or dropped) after a successful handshake.
    pub disconnects: u32,
    /// Handshakes that failed (proxy refused, 5xx, ...).
    pub failed_attempts: u32,
    /// Whether a connection is open now.
    pub open: bool,
    /// Pushes received (`push:<round>:<id>`), in order, over all connections.
    pub pushes: Vec<String>,
    /// Echoes received for the message each connection sends after its handshake.
    pub echoes: Vec<String>,
    /// Anything else received.
    pub other: Vec<String>,
}

/// A websocket client task that connects to `/<id>?token=...` through the proxy and
/// reconnects (with a different query string) whenever its connection ends.
pub struct SimClient {
    /// Its ClientId.
    pub id: String,
    /// Its observations.
    pub state: Arc<Mutex<ClientState>>,
    task: JoinHandle<()>,
}

impl Drop for SimClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SimClient {
    /// Spawns the client task.
    pub fn spawn(id: String, public: SocketAddr, stop: Arc<AtomicBool>) -> Self {
        let state = Arc::new(Mutex::new(ClientState::default()));
        let task_state = state.clone();
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let mut attempt = 0u32;
            while !stop.load(Ordering::SeqCst) {
                attempt += 1;
                let url =
                    format!("ws://{public}/{task_id}?token=secret-{task_id}&attempt={attempt}");
                let uri: http::Uri = url.parse().expect("ws url");
                let connected = tokio::time::timeout(
                    Duration::from_secs(10),
                    ClientBuilder::from_uri(uri).connect(),
                )
                .await;
                let mut ws = match connected {
                    Ok(Ok((ws, _))) => ws,
                    _ => {
                        task_state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .failed_attempts += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let n = {
                    let mut s = task_state.lock().unwrap_or_else(|e| e.into_inner());
                    s.connects += 1;
                    s.open = true;
                    s.connects
                };
                let hello = format!("echo:{task_id}:{n}");
                if ws.send(Message::text(hello)).await.is_ok() {
                    while let Some(Ok(msg)) = ws.next().await {
                        if let Some(text) = msg.as_text() {
                            let mut s = task_state.lock().unwrap_or_else(|e| e.into_inner());
                            if text.starts_with("push:") {
                                s.pushes.push(text.to_string());
                            } else if text.starts_with("echo:") {
                                s.echoes.push(text.to_string());
                            } else {
                                s.other.push(text.to_string());
                            }
                        }
                    }
                }
                let mut s = task_state.lock().unwrap_or_else(|e| e.into_inner());
                s.open = false;
                s.disconnects += 1;
            }
        });
        SimClient { id, state, task }
    }

    /// A copy of its observations.
    pub fn snapshot(&self) -> ClientState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pushes `push:<round>:<id>` to every client through the proxy's internal entry point
/// (50 at a time) and returns the ids whose push did not get `200 ok`, with the answer.
pub async fn push_round(
    http: &Http,
    push: SocketAddr,
    ids: &[String],
    round: u32,
) -> Vec<(String, StatusCode, String)> {
    futures_util::stream::iter(ids.iter().cloned())
        .map(|id| async move {
            let url = format!("http://{push}/{id}");
            let (status, body) =
                http_call(http, Method::POST, &url, &format!("push:{round}:{id}")).await;
            (id, status, body)
        })
        .buffer_unordered(50)
        .filter(|(_, status, _)| std::future::ready(*status != StatusCode::OK))
        .collect()
        .await
}

// ---------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------

/// Node (0-based) of each ClientId's connects, in order, from the API log.
fn connect_nodes(log: &ApiLog) -> BTreeMap<String, Vec<usize>> {
    let mut map: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (node, id, _) in &log.connects {
        map.entry(id.clone()).or_default().push(*node);
    }
    map
}

/// Waits (5 s at most) until HAProxy's stats show every node UP in both backends.
pub async fn wait_all_up(http: &Http, stats: SocketAddr) -> bool {
    for _ in 0..100 {
        if all_up_now(http, stats).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether HAProxy's stats show every node UP in both backends now.
pub async fn all_up_now(http: &Http, stats: SocketAddr) -> bool {
    let st = haproxy_status(http, stats).await;
    (1..=NODES).all(|n| {
        ["ws2http_public", "ws2http_push"].iter().all(|px| {
            st.get(&(px.to_string(), format!("gw{n}")))
                .map(String::as_str)
                == Some("UP")
        })
    })
}

/// ClientIds with characters that a client and an API may write differently in a path
/// (raw here, percent-encoded there: JavaScript's `encodeURIComponent` leaves `!'()*` as
/// they are, PHP's `rawurlencode` encodes them), each paired with its encoded spelling.
const SPELLINGS: [(&str, &str); 8] = [
    ("a!1", "a%211"),
    ("b(2)", "b%282%29"),
    ("c*3", "c%2A3"),
    ("d'4", "d%274"),
    ("e@5", "e%405"),
    ("f:6", "f%3A6"),
    ("g=7", "g%3D7"),
    ("h,8", "h%2C8"),
];

/// A client that connects with one spelling of its ClientId gets the pushes sent to the
/// other: the proxy hashes the ClientId as the gateway reads it (percent-decoded), not the
/// bytes of the path.
pub async fn run_spelling_scenario(kind: ProxyKind) {
    let name = match kind {
        ProxyKind::Haproxy => "haproxy-spelling",
        ProxyKind::Nginx => "nginx-spelling",
    };
    // (A variable first: fields a pattern leaves behind in a temporary would be dropped at
    // once, the API and the scratch directory with them.)
    let cluster = start_cluster(kind, name, &[], HaproxyLimits::TESTS).await;
    let Cluster {
        proxy,
        nodes,
        http,
        logs,
        ..
    } = cluster;
    for (raw, encoded) in SPELLINGS {
        let url: http::Uri = format!("ws://{}/{raw}", proxy.public).parse().unwrap();
        let (mut ws, _) = ClientBuilder::from_uri(url)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{raw} connects: {e}; {logs}"));
        let push = format!("http://{}/{encoded}", proxy.push);
        let (status, body) = http_call(&http, Method::POST, &push, "push:hello").await;
        assert_eq!(
            status,
            StatusCode::OK,
            "push to {encoded} for {raw}: {body}; {logs}"
        );
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{raw} got no push; {logs}"));
        let got = got.expect("open").expect("no error");
        assert_eq!(got.as_text(), Some("push:hello"), "{raw}; {logs}");
        // A push far larger than a proxy's default body buffer (8 or 16 KiB).
        let large = "L".repeat(256 * 1024);
        let (status, body) = http_call(&http, Method::POST, &push, &large).await;
        assert_eq!(status, StatusCode::OK, "a 256-KiB push: {body}; {logs}");
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap_or_else(|_| panic!("{raw} got no large push; {logs}"));
        let got = got.expect("open").expect("no error");
        assert_eq!(
            got.as_text().map(str::len),
            Some(large.len()),
            "{raw}; {logs}"
        );
    }
    drop(proxy);
    drop(nodes);
}

/// Three gateways behind one of the shipped proxy configurations, every node UP (as far
/// as HAProxy's checks can tell; nginx has none).
pub struct Cluster {
    /// The proxy (dropped first: fields drop in this order).
    pub proxy: ProxyProcess,
    /// The gateways.
    pub nodes: Vec<GatewayNode>,
    /// The API the nodes call.
    pub api: MockApi,
    /// A client for the entry points and HAProxy's stats page.
    pub http: Http,
    /// Where the logs are, for failure messages.
    pub logs: String,
    /// The scratch directory's path.
    pub dir: PathBuf,
    /// The scratch directory (logs), removed last.
    pub scratch: ScratchDir,
}

/// Starts a [`Cluster`] behind `kind` in a scratch directory `name`, the first node with
/// `first_node_flags`; with HAProxy, started with `limits` (nginx has none of its own), waits
/// until it sees every node UP.
pub async fn start_cluster(
    kind: ProxyKind,
    name: &str,
    first_node_flags: &[&str],
    limits: HaproxyLimits,
) -> Cluster {
    let scratch = ScratchDir::new(name);
    let dir = scratch.0.clone();
    let api = MockApi::start().await;
    let nodes: Vec<GatewayNode> = (0..NODES)
        .map(|i| {
            let extra = if i == 0 { first_node_flags } else { &[] };
            GatewayNode::start_with(i, &api.base_url(i), &dir, extra)
        })
        .collect();
    let proxy = match kind {
        ProxyKind::Haproxy => start_haproxy(&nodes, &dir, limits),
        ProxyKind::Nginx => start_nginx(&nodes, &dir),
    };
    let http = http_client();
    let logs = format!("logs in {}", dir.display());
    if let Some(stats) = proxy.stats {
        assert!(wait_all_up(&http, stats).await, "not all UP; {logs}");
    }
    Cluster {
        proxy,
        nodes,
        api,
        http,
        logs,
        dir,
        scratch,
    }
}

/// Sockets [`run_busy_node_scenario`] opens to gw1's public port (2 handshake slots and a
/// queue behind them that lasts well past its 8-s window).
const BUSY_NODE_HOLDERS: usize = 600;

/// HAProxy's `timeout check` in `haproxy/haproxy.cfg`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends `GET /healthz` to `addr` the way HAProxy's check does; `Ok` if nothing (no answer,
/// no close) comes back within [`CHECK_TIMEOUT`], else what did.
fn healthz_unanswered(addr: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut probe = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: ws2http\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    probe
        .set_read_timeout(Some(CHECK_TIMEOUT))
        .expect("set read timeout");
    let mut answer = [0u8; 256];
    match probe.read(&mut answer) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(format!("read failed: {e}")),
        Ok(0) => Err("closed without an answer".to_owned()),
        Ok(n) => Err(format!(
            "answered {:?}",
            String::from_utf8_lossy(&answer[..n])
        )),
    }
}

/// A node whose handshake slots are all taken (a connect storm, sockets that send nothing),
/// with more sockets queued behind them, is busy, not dead: it stays UP, so its websockets
/// are not closed by `on-marked-down shutdown-sessions`.
// Only the HAProxy tests use it: nginx has no active health checks.
#[allow(dead_code)]
pub async fn run_busy_node_scenario() {
    let cluster = start_cluster(
        ProxyKind::Haproxy,
        "haproxy-busy-node",
        &["--max-pending-handshakes", "2"],
        HaproxyLimits::TESTS,
    )
    .await;
    let stats = cluster.proxy.stats.expect("HAProxy has a stats page");
    let public = cluster.nodes[0].public;
    // Both of gw1's handshake slots, held by sockets that never send a request (for its
    // --handshake-timeout, 10 s), and a long queue behind them. The gateway gives each
    // socket over its slots 250 ms to find one, then answers it 503 and reads what it sent
    // for up to 1 s more; it does that for 48 sockets at once (HANDSHAKE_WAITERS), so these
    // sockets, which never close, leave its listen backlog at about 38 a second and the
    // queue lasts some 15 s: a socket that joins it in the first 8 s waits longer than
    // `timeout check`. (With the 50 sockets this test once queued, a probe there was
    // answered 503 at once, and the test passed with the check moved to the public port.)
    let holders: Vec<TcpStream> = (0..BUSY_NODE_HOLDERS)
        .map(|_| TcpStream::connect(public).expect("connect to gw1"))
        .collect();
    // The precondition, checked at the start and near the end of the window: GET /healthz on
    // gw1's public port gets no answer within `timeout check`, as a health check there would.
    let probe = move || tokio::task::spawn_blocking(move || healthz_unanswered(public));
    let mut probes = vec![("early", probe())];
    // 40 check intervals (200 ms, fall 2): long enough for two checks that wait behind
    // the queue to time out (timeout check 3s). A fixed window: HAProxy's stats count no
    // checks done, so there is no event that says enough of them have passed.
    for i in 0..80 {
        if i == 50 {
            probes.push(("late", probe()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = haproxy_status(&cluster.http, stats).await;
        let gw1 = st.get(&("ws2http_public".to_owned(), "gw1".to_owned()));
        assert_eq!(
            gw1.map(String::as_str),
            Some("UP"),
            "gw1 while busy; {}",
            cluster.logs
        );
    }
    for (when, probe) in probes {
        if let Err(answer) = probe.await.expect("probe thread") {
            panic!(
                "gw1's public port was not saturated ({when} probe): {answer}; {}",
                cluster.logs
            );
        }
    }
    drop(holders);
    drop(cluster);
}

/// Websockets fill the public entry's share of HAProxy's connections (the limits set low,
/// with as many connections queued at the public entry as HAProxy takes in all), and a push
/// still goes through at once: the push entry has a share of its own that websockets cannot
/// take.
// Only the HAProxy tests use it: the limits are HAProxy's.
#[allow(dead_code)]
pub async fn run_push_room_scenario() {
    let limits = HaproxyLimits {
        total: 60,
        public: 40,
        push: 10,
    };
    // (A variable first, as in run_spelling_scenario.)
    let cluster = start_cluster(ProxyKind::Haproxy, "haproxy-push-room", &[], limits).await;
    let Cluster {
        proxy,
        nodes,
        http,
        logs,
        ..
    } = cluster;
    let stats = proxy.stats.expect("HAProxy has a stats page");
    let url: http::Uri = format!("ws://{}/room-1", proxy.public).parse().unwrap();
    let (mut ws, _) = ClientBuilder::from_uri(url)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("room-1 connects: {e}; {logs}"));
    // Sockets that send nothing (HAProxy closes them after `timeout http-request`, 10 s):
    // with the client above, as many as HAProxy takes in all. The public entry takes its
    // share; the rest wait in its listen backlog, which is as long as that share.
    let holders: Vec<TcpStream> = (1..limits.total)
        .map(|_| {
            TcpStream::connect_timeout(&proxy.public, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("connect to the public entry: {e}; {logs}"))
        })
        .collect();
    // Full: the public entry holds at least its share (with the old fixed limits it took
    // every connection HAProxy had, and the push below waited).
    let public_in = ("ws2http_public_in".to_owned(), "FRONTEND".to_owned());
    let held = || async {
        haproxy_stats(&http, stats, "scur")
            .await
            .get(&public_in)
            .and_then(|n| n.parse::<u32>().ok())
    };
    let mut sessions = None;
    for _ in 0..100 {
        sessions = held().await;
        if sessions >= Some(limits.public) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sessions >= Some(limits.public),
        "the public entry holds {sessions:?} connections; {logs}"
    );
    let push = format!("http://{}/room-1", proxy.push);
    let sent = Instant::now();
    let (status, body) = http_call(&http, Method::POST, &push, "push:room").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "push while the public entry is full: {body}; {logs}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "the push waited {:?}; {logs}",
        sent.elapsed()
    );
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap_or_else(|_| panic!("room-1 got no push; {logs}"));
    assert_eq!(
        got.expect("open").expect("no error").as_text(),
        Some("push:room")
    );
    // And no more than its share.
    assert_eq!(
        held().await,
        Some(limits.public),
        "connections the public entry holds; {logs}"
    );
    drop(holders);
    drop(proxy);
    drop(nodes);
}

/// Two bursts of [`BURST_PUSHES`] pushes through HAProxy to clients on gw1, more at once
/// than HAProxy sends to a node, each push on a connection of its own: every one is answered
/// `200` (HAProxy queues what is over its `maxconn`, and the connections of finished pushes
/// do not hold the gateway's control connections, which would get later pushes its `503`),
/// and every one reaches its client.
// Only the HAProxy tests use it.
#[allow(dead_code)]
pub async fn run_push_burst_scenario() {
    // Room for the bursts at the push entry, and descriptors enough that HAProxy would keep
    // finished connections idle if the configuration let it (it stops past 20% of them,
    // tune.pool-low-fd-ratio): with limits this size the old configuration got 503s.
    let limits = HaproxyLimits {
        total: 1000,
        public: 390,
        push: 600,
    };
    let cluster = start_cluster(ProxyKind::Haproxy, "haproxy-push-burst", &[], limits).await;
    let Cluster {
        api,
        proxy,
        nodes,
        http,
        logs,
        ..
    } = cluster;
    let node_of = |id: &str| {
        let log = api.log.lock().unwrap_or_else(|e| e.into_inner());
        log.connects
            .iter()
            .find(|(_, seen, _)| seen == id)
            .map(|(node, _, _)| *node)
    };
    // Clients whose ClientIds hash to gw1, each read by a task that counts its pushes.
    let mut on_gw1 = Vec::new();
    let mut readers = Vec::new();
    for i in 0..200 {
        if on_gw1.len() == BURST_CLIENTS {
            break;
        }
        let id = format!("burst-{i}");
        let url: http::Uri = format!("ws://{}/{id}", proxy.public).parse().unwrap();
        let (mut ws, _) = ClientBuilder::from_uri(url)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{id} connects: {e}; {logs}"));
        if node_of(&id) != Some(0) {
            continue;
        }
        let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = got.clone();
        readers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if msg.as_text().is_some_and(|t| t.starts_with("push:")) {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
        on_gw1.push((id, got));
    }
    assert_eq!(on_gw1.len(), BURST_CLIENTS, "ClientIds on gw1; {logs}");
    let mut refused = Vec::new();
    for burst in 1..=2 {
        let started = Instant::now();
        let answers: Vec<(StatusCode, String)> = futures_util::stream::iter(0..BURST_PUSHES)
            .map(|n| {
                let (id, _) = &on_gw1[n % BURST_CLIENTS];
                let url = format!("http://{}/{id}", proxy.push);
                let http = &http;
                async move { push_closing(http, &url, &format!("push:{burst}:{n}")).await }
            })
            .buffer_unordered(BURST_AT_ONCE)
            .collect()
            .await;
        let not_ok: Vec<_> = answers
            .iter()
            .filter(|(status, _)| *status != StatusCode::OK)
            .collect();
        eprintln!(
            "burst {burst}: {} pushes in {:.1} s, {} not 200",
            BURST_PUSHES,
            started.elapsed().as_secs_f64(),
            not_ok.len()
        );
        refused.push((burst, not_ok.len(), not_ok.first().cloned().cloned()));
    }
    assert!(
        refused.iter().all(|(_, n, _)| *n == 0),
        "pushes not answered 200 (burst, count, first): {refused:?}; {logs}"
    );
    let delivered = wait_until(Duration::from_secs(10), || {
        on_gw1
            .iter()
            .map(|(_, got)| got.load(Ordering::SeqCst))
            .sum::<usize>()
            == 2 * BURST_PUSHES
    })
    .await;
    assert!(delivered, "not every push reached its client; {logs}");
    for reader in readers {
        reader.abort();
    }
    drop(proxy);
    drop(nodes);
}

/// Clients on gw1 that [`run_push_burst_scenario`] pushes to.
const BURST_CLIENTS: usize = 20;
/// Pushes per burst, all to gw1: more than its 256 control connections.
const BURST_PUSHES: usize = 600;
/// Pushes sent at once: more than the `maxconn` of HAProxy's push servers.
const BURST_AT_ONCE: usize = 300;

/// A node told to stop (SIGTERM) while a message of one of its clients is still at the API
/// drains for a while; its health check answers `404` meanwhile, so HAProxy takes it out of
/// balancing (NOLB) and a client whose ClientId hashed to it opens on another node instead
/// of being refused by a node whose public listener has closed.
// Only the HAProxy tests use it: nginx has no active health checks.
#[allow(dead_code)]
pub async fn run_draining_node_scenario() {
    let cluster = start_cluster(
        ProxyKind::Haproxy,
        "haproxy-draining-node",
        &[],
        HaproxyLimits::TESTS,
    )
    .await;
    let Cluster {
        api,
        nodes,
        proxy,
        http,
        logs,
        ..
    } = cluster;
    let stats = proxy.stats.expect("HAProxy has a stats page");
    let node_of = |id: &str| {
        let log = api.log.lock().unwrap_or_else(|e| e.into_inner());
        log.connects
            .iter()
            .rev()
            .find(|(_, seen, _)| seen == id)
            .map(|(node, _, _)| *node)
    };
    let connect = |id: String| {
        let url: http::Uri = format!("ws://{}/{id}", proxy.public).parse().unwrap();
        async move {
            ClientBuilder::from_uri(url)
                .connect()
                .await
                .map(|(ws, _)| ws)
        }
    };
    // A ClientId that the hash puts on gw1, and one of its clients with a message at the API.
    let mut on_gw1 = None;
    for i in 0..60 {
        let id = format!("probe-{i}");
        let ws = connect(id.clone())
            .await
            .unwrap_or_else(|e| panic!("{id} connects: {e}; {logs}"));
        if node_of(&id) == Some(0) {
            on_gw1 = Some((id, ws));
            break;
        }
    }
    let (id, mut busy) = on_gw1.unwrap_or_else(|| panic!("no ClientId hashed to gw1; {logs}"));
    busy.send(Message::text("slow work")).await.unwrap();
    let at_api = wait_until(Duration::from_secs(5), || {
        let log = api.log.lock().unwrap_or_else(|e| e.into_inner());
        log.messages
            .iter()
            .any(|(node, seen)| *node == 0 && *seen == id)
    })
    .await;
    assert!(at_api, "the slow message never reached the API; {logs}");

    nodes[0].proc_.signal(libc::SIGTERM);
    let mut states = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let st = haproxy_status(&http, stats).await;
        let gw1 = ["ws2http_push", "ws2http_public"]
            .map(|px| st.get(&(px.to_owned(), "gw1".to_owned())).cloned());
        if states.last() != Some(&gw1) {
            states.push(gw1.clone());
        }
        if gw1.iter().all(|state| state.as_deref() == Some("NOLB")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        states
            .last()
            .map(|s| s.clone().map(Option::unwrap_or_default)),
        Some(["NOLB".to_owned(), "NOLB".to_owned()]),
        "gw1 (push, public) while draining, states seen: {states:?}; {logs}"
    );
    // The drain is still on (the slow message has seconds to go), and a new client of the
    // same ClientId opens on another node.
    let mut again = connect(id.clone())
        .await
        .unwrap_or_else(|e| panic!("{id} connects again while gw1 drains: {e}; {logs}"));
    let moved_to = node_of(&id).expect("its connect reached the API");
    assert_ne!(moved_to, 0, "opened on the draining node; {logs}");
    again.send(Message::text("hello")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), again.next())
        .await
        .unwrap_or_else(|_| panic!("no reply on the new node; {logs}"));
    assert_eq!(
        echo.expect("open").expect("no error").as_text(),
        Some("hello")
    );
    // The draining node still answers the message it had, then closes with 1001.
    let reply = tokio::time::timeout(Duration::from_secs(8), busy.next())
        .await
        .unwrap_or_else(|_| panic!("no reply from the draining node; {logs}"));
    assert_eq!(
        reply.expect("open").expect("no error").as_text(),
        Some("slow work")
    );
    drop(proxy);
    drop(nodes);
}

/// The whole test, for either proxy:
///
/// 1. 3 gateways, the proxy, [`CLIENTS`] clients connecting with query strings;
/// 2. each client lands on exactly one node, the spread is roughly even, the query
///    string reached the API, and each client's message went through the node holding
///    its socket;
/// 3. a push to every ClientId through the internal entry point reaches exactly that
///    client;
/// 4. the node with the most clients fails (`failure`: SIGKILL, or SIGSTOP for a hung
///    node): only its clients are disconnected, they reconnect through the proxy onto
///    the other nodes, and nobody else is touched;
/// 5. a second push round reaches every client again, the other nodes' clients on the
///    same sockets as before.
pub async fn run_failover_scenario(kind: ProxyKind, failure: Failure) {
    let name = match kind {
        ProxyKind::Haproxy => "haproxy-cluster",
        ProxyKind::Nginx => "nginx-cluster",
    };
    let Cluster {
        mut proxy,
        mut nodes,
        api,
        http,
        logs,
        dir,
        scratch: _scratch,
    } = start_cluster(kind, name, &[], HaproxyLimits::TESTS).await;

    // Both entry points route to a live gateway before any client starts.
    for entry in [proxy.public, proxy.push] {
        let url = format!("http://{entry}/healthz");
        let (status, body) = http_call(&http, Method::GET, &url, "").await;
        assert_eq!(status, StatusCode::OK, "{url}: {body}; {logs}");
    }

    // 1. Connect every client.
    let stop = Arc::new(AtomicBool::new(false));
    let ids: Vec<String> = (0..CLIENTS)
        .map(|i| format!("client-{i:03}-{}", i * 7919 % 1000))
        .collect();
    let clients: Vec<SimClient> = ids
        .iter()
        .map(|id| SimClient::spawn(id.clone(), proxy.public, stop.clone()))
        .collect();
    let all_connected = wait_until(Duration::from_secs(30), || {
        clients.iter().all(|c| {
            let s = c.snapshot();
            s.open && s.echoes.len() == 1
        })
    })
    .await;
    let not_ready: Vec<_> = clients
        .iter()
        .filter(|c| !c.snapshot().open || c.snapshot().echoes.len() != 1)
        .map(|c| (c.id.clone(), c.snapshot()))
        .take(5)
        .collect();
    assert!(
        all_connected,
        "clients not connected and echoed: {not_ready:?}; {logs}"
    );

    // 2. One connect per client, on one node; spread; query strings; echoes.
    let first_node: BTreeMap<String, usize> = {
        let log = api.log.lock().unwrap_or_else(|e| e.into_inner());
        let by_id = connect_nodes(&log);
        assert_eq!(
            by_id.len(),
            CLIENTS,
            "API saw connects for other ids than the clients'"
        );
        for (id, nodes_seen) in &by_id {
            assert_eq!(
                nodes_seen.len(),
                1,
                "{id} connected more than once: {nodes_seen:?}"
            );
        }
        for (_, id, query) in &log.connects {
            assert!(
                query.contains(&format!("token=secret-{id}")),
                "query string of {id} did not reach the API: {query:?}"
            );
        }
        for (node, id) in &log.messages {
            assert_eq!(
                Some(*node),
                by_id.get(id).map(|v| v[0]),
                "message of {id} came from another node than its socket's"
            );
        }
        assert_eq!(log.messages.len(), CLIENTS);
        by_id.into_iter().map(|(id, v)| (id, v[0])).collect()
    };
    let mut per_node = [0usize; NODES];
    for node in first_node.values() {
        per_node[*node] += 1;
    }
    for (n, count) in per_node.iter().enumerate() {
        let share = *count as f64 / CLIENTS as f64;
        assert!(
            (0.15..=0.55).contains(&share),
            "uneven spread over nodes {per_node:?}: gw{} has {:.0}%",
            n + 1,
            share * 100.0
        );
    }
    eprintln!("{kind:?}: clients per node {per_node:?}");

    // 3. First push round: every push answered 200 and delivered to its own socket only.
    let failed = push_round(&http, proxy.push, &ids, 1).await;
    assert!(
        failed.is_empty(),
        "round 1 pushes not accepted: {:?}; {logs}",
        &failed[..failed.len().min(5)]
    );
    let delivered = wait_until(Duration::from_secs(10), || {
        clients.iter().all(|c| !c.snapshot().pushes.is_empty())
    })
    .await;
    // Let strays arrive, if any: nothing marks when a client has read a push that went to
    // its socket by mistake (all were queued when answered 200), so this waits a fixed time.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for c in &clients {
        let s = c.snapshot();
        assert_eq!(
            s.pushes,
            vec![format!("push:1:{}", c.id)],
            "{}: wrong pushes (delivered to all: {delivered})",
            c.id
        );
        assert!(
            s.other.is_empty(),
            "{}: unexpected messages {:?}",
            c.id,
            s.other
        );
    }

    // 4. Kill the node with the most clients.
    let victim_node = (0..NODES).max_by_key(|n| per_node[*n]).expect("a node");
    let victims: BTreeSet<String> = first_node
        .iter()
        .filter(|(_, n)| **n == victim_node)
        .map(|(id, _)| id.clone())
        .collect();
    let failed_at = Instant::now();
    match failure {
        Failure::Crash => nodes[victim_node].proc_.kill_hard(),
        Failure::Hang => nodes[victim_node].proc_.signal(libc::SIGSTOP),
    }
    eprintln!(
        "{kind:?}: {failure:?} of gw{} holding {} clients",
        victim_node + 1,
        victims.len()
    );

    let reconnected = wait_until(Duration::from_secs(30), || {
        clients.iter().filter(|c| victims.contains(&c.id)).all(|c| {
            let s = c.snapshot();
            s.open && s.connects == 2 && s.echoes.len() == 2
        })
    })
    .await;
    let stragglers: Vec<_> = clients
        .iter()
        .filter(|c| victims.contains(&c.id))
        .map(|c| (c.id.clone(), c.snapshot()))
        .filter(|(_, s)| !(s.open && s.connects == 2 && s.echoes.len() == 2))
        .take(5)
        .collect();
    assert!(
        reconnected,
        "victims did not reconnect: {stragglers:?}; {logs}"
    );
    eprintln!(
        "{kind:?}: all of them reconnected {:.1} s after the {failure:?}",
        failed_at.elapsed().as_secs_f64()
    );
    // The proxy logged the websockets that ended, and no log of its has a token from their
    // query strings: nginx writes the request line, query string and all, into every
    // error-log line about a request, such as each failed attempt on the dead node.
    let (access_log, other_logs) = match kind {
        ProxyKind::Haproxy => (dir.join("haproxy.log"), vec![]),
        ProxyKind::Nginx => (
            dir.join("nginx").join("access.log"),
            vec![dir.join("nginx").join("error.log"), dir.join("nginx.log")],
        ),
    };
    let logged = fs::read_to_string(&access_log).unwrap_or_default();
    let victim = victims.iter().next().expect("a victim");
    assert!(
        logged.contains(&format!("/{victim}")),
        "{victim}'s websocket is not in {}; {logs}",
        access_log.display()
    );
    for log in std::iter::once(&access_log).chain(&other_logs) {
        assert!(log.is_file(), "{} was not written; {logs}", log.display());
        let text = fs::read_to_string(log).unwrap_or_default();
        let leak = text.lines().find(|line| line.contains("token=secret-"));
        assert!(
            leak.is_none(),
            "a client's token is in {}: {leak:?}; {logs}",
            log.display()
        );
    }
    if kind == ProxyKind::Nginx {
        // What the error log no longer says is in the access log: the dead node's forwarder
        // could not reach it, and logged so with the node's address.
        let down = format!("node down: {} node_status=502", nodes[victim_node].public);
        assert!(
            logged.contains(&down),
            "no {down:?} in {}; {logs}",
            access_log.display()
        );
    }

    if let Some(stats) = proxy.stats {
        let st = haproxy_status(&http, stats).await;
        for px in ["ws2http_public", "ws2http_push"] {
            let key = (px.to_string(), format!("gw{}", victim_node + 1));
            assert_eq!(
                st.get(&key).map(String::as_str),
                Some("DOWN"),
                "haproxy health checks did not mark the killed node down in {px}"
            );
        }
    }

    {
        let log = api.log.lock().unwrap_or_else(|e| e.into_inner());
        let by_id = connect_nodes(&log);
        for (id, seen) in &by_id {
            if victims.contains(id) {
                assert_eq!(seen.len(), 2, "{id}: connects {seen:?}");
                assert_ne!(seen[1], victim_node, "{id} reconnected to the dead node");
            } else {
                assert_eq!(
                    seen.len(),
                    1,
                    "{id} (not on the killed node) connected again: {seen:?}"
                );
            }
        }
        let touched: Vec<_> = log
            .disconnects
            .iter()
            .filter(|(_, id)| !victims.contains(id))
            .collect();
        assert!(
            touched.is_empty(),
            "clients of live nodes were disconnected: {touched:?}"
        );
    }

    // 5. Second push round reaches everyone, the survivors on their first socket.
    let failed = push_round(&http, proxy.push, &ids, 2).await;
    assert!(
        failed.is_empty(),
        "round 2 pushes not accepted: {:?}; {logs}",
        &failed[..failed.len().min(5)]
    );
    let delivered = wait_until(Duration::from_secs(10), || {
        clients.iter().all(|c| c.snapshot().pushes.len() >= 2)
    })
    .await;
    // Strays, as in round 1: a fixed wait.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for c in &clients {
        let s = c.snapshot();
        assert_eq!(
            s.pushes,
            vec![format!("push:1:{}", c.id), format!("push:2:{}", c.id)],
            "{}: wrong pushes after failover (delivered to all: {delivered})",
            c.id
        );
        assert!(
            s.other.is_empty(),
            "{}: unexpected messages {:?}",
            c.id,
            s.other
        );
        if victims.contains(&c.id) {
            assert_eq!((s.connects, s.disconnects), (2, 1), "{}: {s:?}", c.id);
        } else {
            assert_eq!(
                (s.connects, s.disconnects, s.open),
                (1, 0, true),
                "{} was touched: {s:?}",
                c.id
            );
        }
    }
    let moved: BTreeMap<usize, usize> = {
        let log = api.log.lock().unwrap_or_else(|e| e.into_inner());
        let mut m = BTreeMap::new();
        for (id, seen) in connect_nodes(&log) {
            if victims.contains(&id) {
                *m.entry(seen[1] + 1).or_insert(0) += 1;
            }
        }
        m
    };
    let refused: u32 = clients
        .iter()
        .filter(|c| victims.contains(&c.id))
        .map(|c| c.snapshot().failed_attempts)
        .sum();
    eprintln!(
        "{kind:?}: the failed node's clients now on gw(n) -> count: {moved:?}; \
         their failed reconnect attempts in total: {refused}"
    );

    stop.store(true, Ordering::SeqCst);
    drop(clients);
    // A stopped process would sit out its SIGTERM; SIGKILL works on it at once.
    nodes[victim_node].proc_.kill_hard();
    for node in nodes.iter_mut() {
        node.proc_.assert_running();
    }
    proxy.proc_.assert_running();
}
