//! Soak test (ignored by default; see tests/SOAK.md for the command and what it proves).
//!
//! The real `ws2http` binary runs in a child process (so its RSS can be read from
//! `/proc/<pid>/status` and its stderr searched for panics) in front of an API mock in this
//! process that can be killed and brought back on the same port. 5,000 clients each send one
//! message a second and wait for its echo, a pusher sends pushes to random clients, and in the
//! middle the API is down for 5 s. At the end every failure must have been visible: to the client
//! as a close code, to the API as a DELETE (or counted in `disconnects_failed`), the counters must
//! add up, the gateway's memory must come back near its baseline, and nothing may panic.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_websockets::{ClientBuilder, CloseCode, Message};

/// Knobs, overridable from the environment for a quicker local run (`SOAK_CLIENTS=500`).
struct Plan {
    clients: usize,
    /// Steady load before the outage.
    hold_before: Duration,
    /// How long the API is gone.
    outage: Duration,
    /// Steady load after the API is back (clients reconnect in it).
    hold_after: Duration,
    /// Pushes per second to random clients.
    pushes_per_second: u64,
}

impl Plan {
    fn from_env() -> Plan {
        let var = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Plan {
            clients: var("SOAK_CLIENTS", 5000) as usize,
            hold_before: Duration::from_secs(var("SOAK_HOLD_BEFORE_SECS", 40)),
            outage: Duration::from_secs(var("SOAK_OUTAGE_SECS", 5)),
            hold_after: Duration::from_secs(var("SOAK_HOLD_AFTER_SECS", 40)),
            pushes_per_second: var("SOAK_PUSHES_PER_SECOND", 100),
        }
    }
}

/// How long a client waits for the echo of its message before calling it lost.
const REPLY_DEADLINE: Duration = Duration::from_secs(10);
/// An outage up to this long is covered by the gateway's DELETE retries (6 from 250 ms, doubling:
/// about 16 s), so every DELETE must reach the API once it is back.
const DELETE_RETRY_COVERS: Duration = Duration::from_secs(10);
/// The gateway's `--upstream-timeout` in the soak.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// RSS is judged this long after the clients left (time for the API pool's idle connections to
/// go, 30 s, and for jemalloc's decay to hand pages back) ...
const RSS_MIN_SETTLE: Duration = Duration::from_secs(30);
/// ... or, if it is still above the margin then, at most this long after.
const RSS_SETTLE: Duration = Duration::from_secs(60);
/// RSS after the clients left may exceed the baseline by this much, plus
/// `RSS_MARGIN_FRACTION` of what the connections added at the peak. Measured: baseline 7 MiB,
/// peak 121 MiB, 12.8 MiB 30 s after the clients left (with jemalloc's background purging;
/// without it the gateway sat at 89 MiB for a minute, which this margin fails).
const RSS_MARGIN_BYTES: u64 = 16 << 20;
const RSS_MARGIN_FRACTION: f64 = 0.10;

// ---- the API ----

#[derive(Default)]
struct ApiStats {
    gets: AtomicU64,
    posts: AtomicU64,
    /// DELETEs by X-Connection-Id.
    deletes_by_connection: Mutex<HashMap<String, u32>>,
    /// DELETEs by X-Close-Code (`none` when absent).
    deletes_by_code: Mutex<HashMap<String, u64>>,
}

/// An echo API that can be killed (listener closed, every open connection dropped) and brought
/// back on the same port.
struct SoakApi {
    addr: SocketAddr,
    stats: Arc<ApiStats>,
    stop: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl SoakApi {
    async fn start() -> SoakApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut api = SoakApi {
            addr: listener.local_addr().unwrap(),
            stats: Arc::new(ApiStats::default()),
            stop: None,
        };
        api.serve(listener);
        api
    }

    fn serve(&mut self, listener: TcpListener) {
        let token = CancellationToken::new();
        let stats = Arc::clone(&self.stats);
        let stop = token.clone();
        let task = tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else {
                    sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let stats = Arc::clone(&stats);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| answer(request, Arc::clone(&stats)));
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    // Cancelling drops the connection, socket and all: the gateway sees a reset.
                    tokio::select! {
                        _ = connection => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
            // The listener is dropped here: new connections are refused.
        });
        self.stop = Some((token, task));
    }

    /// Kills the API: stops listening and drops every open connection.
    async fn kill(&mut self) {
        if let Some((token, task)) = self.stop.take() {
            token.cancel();
            let _ = task.await;
        }
    }

    /// Brings the API back on the same port.
    async fn restart(&mut self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).expect("rebind the API port");
        self.serve(socket.listen(1024).unwrap());
    }
}

async fn answer(
    request: Request<Incoming>,
    stats: Arc<ApiStats>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let reply = match parts.method.as_str() {
        "GET" => {
            stats.gets.fetch_add(1, Ordering::Relaxed);
            Bytes::from_static(b"ok")
        }
        "POST" => {
            stats.posts.fetch_add(1, Ordering::Relaxed);
            let mut echo = b"echo:".to_vec();
            echo.extend_from_slice(&body);
            Bytes::from(echo)
        }
        "DELETE" => {
            let header = |name: &str| {
                parts
                    .headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let id = header("x-connection-id").unwrap_or_default();
            let code = header("x-close-code").unwrap_or_else(|| "none".to_owned());
            *stats
                .deletes_by_connection
                .lock()
                .unwrap()
                .entry(id)
                .or_default() += 1;
            *stats
                .deletes_by_code
                .lock()
                .unwrap()
                .entry(code)
                .or_default() += 1;
            Bytes::from_static(b"ok")
        }
        _ => Bytes::new(),
    };
    Ok(Response::new(Full::new(reply)))
}

// ---- the gateway child ----

#[path = "ports/mod.rs"]
mod ports;
use ports::free_port;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Established TCP connections to `port` on loopback (the gateway's API connections), from
/// /proc/net/tcp.
fn api_connections(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == "01"
        })
        .count()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

async fn metrics(control: SocketAddr) -> HashMap<String, f64> {
    let stream = TcpStream::connect(control).await.expect("control connects");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/metrics")
        .header("host", "gateway")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.expect("/metrics");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn metric(m: &HashMap<String, f64>, name: &str) -> u64 {
    m.get(name).copied().unwrap_or(0.0) as u64
}

// ---- clients ----

/// How one websocket session of a client ended.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// We closed with 1000 at the end and the gateway answered with this code.
    OwnClose(Option<u16>),
    /// The gateway closed with this code.
    ServerClose(u16, String),
    /// The connection just ended, without a close frame: a silent failure.
    Eof,
    /// A read or write error: a silent failure.
    Error(String),
    /// No echo within [`REPLY_DEADLINE`] and no close either: a silent loss.
    ReplyTimeout,
    /// An echo that does not match the message it answers.
    WrongEcho(String),
}

struct Session {
    start: Instant,
    end: Instant,
    how: End,
}

#[derive(Default)]
struct ClientReport {
    sessions: Vec<Session>,
    /// Handshake statuses other than 101, with when they happened.
    refused: Vec<(u16, Instant)>,
    /// Handshakes that failed without any HTTP status.
    handshake_errors: Vec<String>,
    pushes: Vec<u64>,
    sent: u64,
    echoed: u64,
}

/// 0 = run, 1 = quiet (send nothing more, keep reading), 2 = close and leave.
type Phase = watch::Receiver<u8>;

struct Shared {
    gateway: SocketAddr,
    connected: AtomicUsize,
}

fn jitter(i: usize, n: u64, range_ms: u64) -> Duration {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xBF58_476D);
    x ^= x >> 29;
    Duration::from_millis(x % range_ms.max(1))
}

async fn open_socket(shared: &Shared, i: usize) -> std::io::Result<TcpStream> {
    // Spread clients over several source addresses so one address's ephemeral ports never run out.
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 8) as u8));
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(shared.gateway).await
}

async fn client(i: usize, shared: Arc<Shared>, mut phase: Phase) -> ClientReport {
    let mut report = ClientReport::default();
    let uri = format!("ws://{}/c{i}", shared.gateway);
    let builder = ClientBuilder::new().uri(&uri).unwrap();
    let mut attempt = 0u64;
    let mut next_message = 0u64;
    while *phase.borrow() < 2 {
        attempt += 1;
        let stream = match open_socket(&shared, i).await {
            Ok(stream) => stream,
            Err(error) => {
                report.handshake_errors.push(format!("connect: {error}"));
                sleep(Duration::from_secs(1) + jitter(i, attempt, 2000)).await;
                continue;
            }
        };
        let mut ws = match builder.connect_on(stream).await {
            Ok((ws, _)) => ws,
            Err(tokio_websockets::Error::Upgrade(
                tokio_websockets::upgrade::Error::DidNotSwitchProtocols(status),
            )) => {
                report.refused.push((status, Instant::now()));
                sleep(Duration::from_secs(1) + jitter(i, attempt, 2000)).await;
                continue;
            }
            Err(error) => {
                report.handshake_errors.push(error.to_string());
                sleep(Duration::from_secs(1) + jitter(i, attempt, 2000)).await;
                continue;
            }
        };
        shared.connected.fetch_add(1, Ordering::SeqCst);
        let start = Instant::now();
        let mut next_send = start + jitter(i, attempt, 1000);
        let mut awaiting: Option<(String, Instant)> = None;
        let how = loop {
            let quiet = *phase.borrow() >= 1;
            let reply_deadline = awaiting
                .as_ref()
                .map_or(start + Duration::from_secs(86400), |(_, at)| {
                    *at + REPLY_DEADLINE
                });
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() >= 2 {
                        let _ = ws
                            .send(Message::close(Some(CloseCode::NORMAL_CLOSURE), "bye"))
                            .await;
                        let code = tokio::time::timeout(Duration::from_secs(5), async {
                            loop {
                                match ws.next().await {
                                    Some(Ok(m)) if m.is_close() => {
                                        break m.as_close().map(|(c, _)| u16::from(c));
                                    }
                                    Some(Ok(_)) => continue,
                                    _ => break None,
                                }
                            }
                        })
                        .await
                        .unwrap_or(None);
                        break End::OwnClose(code);
                    }
                }
                item = ws.next() => match item {
                    Some(Ok(m)) if m.is_close() => {
                        let (code, reason) = m
                            .as_close()
                            .map(|(c, r)| (u16::from(c), r.to_owned()))
                            .unwrap_or((1005, String::new()));
                        break End::ServerClose(code, reason);
                    }
                    Some(Ok(m)) if m.is_text() => {
                        let text = m.as_text().unwrap_or_default();
                        if let Some(seq) = text.strip_prefix("push:") {
                            report.pushes.push(seq.parse().unwrap_or(u64::MAX));
                        } else if let Some(echo) = text.strip_prefix("echo:") {
                            match awaiting.take() {
                                Some((sent, _)) if sent == echo => report.echoed += 1,
                                other => break End::WrongEcho(format!("{echo} for {other:?}")),
                            }
                        } else {
                            break End::WrongEcho(text.to_owned());
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => break End::Error(error.to_string()),
                    None => break End::Eof,
                },
                _ = sleep_until(next_send), if awaiting.is_none() && !quiet => {
                    let text = format!("m:{i}:{next_message}");
                    next_message += 1;
                    next_send += Duration::from_secs(1);
                    if next_send < Instant::now() {
                        next_send = Instant::now() + Duration::from_secs(1);
                    }
                    if let Err(error) = ws.send(Message::text(text.clone())).await {
                        break End::Error(error.to_string());
                    }
                    report.sent += 1;
                    awaiting = Some((text, Instant::now()));
                }
                _ = sleep_until(reply_deadline), if awaiting.is_some() => break End::ReplyTimeout,
            }
        };
        shared.connected.fetch_sub(1, Ordering::SeqCst);
        let server_closed = matches!(how, End::ServerClose(..));
        report.sessions.push(Session {
            start,
            end: Instant::now(),
            how,
        });
        if !server_closed {
            // Anything but a close from the gateway is a failure already recorded; do not
            // pile more on top of it.
            break;
        }
        sleep(Duration::from_secs(1) + jitter(i, attempt, 2000)).await;
    }
    report
}

// ---- pushes ----

struct PushRecord {
    client: usize,
    seq: u64,
    sent: Instant,
    answered: Instant,
    status: u16,
}

async fn pusher(
    control: SocketAddr,
    clients: usize,
    per_second: u64,
    stop: CancellationToken,
) -> Vec<PushRecord> {
    let mut records = Vec::new();
    let mut sender = None;
    let mut seq = 0u64;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_second.max(1)));
    while !stop.is_cancelled() {
        tick.tick().await;
        if sender.is_none() {
            let Ok(stream) = TcpStream::connect(control).await else {
                continue;
            };
            let Ok((s, connection)) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
            else {
                continue;
            };
            tokio::spawn(connection);
            sender = Some(s);
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let client = (rng % clients as u64) as usize;
        seq += 1;
        let request = Request::post(format!("/c{client}"))
            .header("host", "gateway")
            .body(Full::new(Bytes::from(format!("push:{seq}"))))
            .unwrap();
        let sent = Instant::now();
        let s = sender.as_mut().unwrap();
        match s.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().collect().await;
                records.push(PushRecord {
                    client,
                    seq,
                    sent,
                    answered: Instant::now(),
                    status,
                });
            }
            Err(_) => sender = None,
        }
    }
    records
}

// ---- the test ----

struct Gateway {
    child: Child,
    stderr_path: std::path::PathBuf,
    public: SocketAddr,
    control: SocketAddr,
}

fn start_gateway(api: SocketAddr, max_connections: usize) -> Gateway {
    let public: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let control: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let stderr_path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("soak-gateway-{}.log", std::process::id()));
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ws2http"))
        .args(["--listen", &public.to_string()])
        .args(["--control-listen", &control.to_string()])
        .args(["--api", &format!("http://{api}/")])
        .args(["--upstream-timeout", "5s"])
        .args(["--max-connections", &max_connections.to_string()])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "warn")
        // For experiments: jemalloc options for the gateway (e.g. `background_thread:true`).
        .envs(std::env::var("SOAK_GATEWAY_MALLOC_CONF").map(|conf| ("_RJEM_MALLOC_CONF", conf)))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start the ws2http binary");
    Gateway {
        child,
        stderr_path,
        public,
        control,
    }
}

async fn wait_healthy(control: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(control).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: minutes long; run with `--run-ignored only` (tests/SOAK.md)"]
async fn soak_5000_connections_survive_an_api_outage_with_every_failure_visible() {
    let plan = Plan::from_env();
    // This process holds every client socket plus the API's side of the gateway's pool.
    let limit = ws2http::open_file_limit();
    assert!(
        limit > plan.clients + 2048,
        "open-file limit {limit} too low for {} clients",
        plan.clients
    );
    let mut api = SoakApi::start().await;
    let mut gateway = start_gateway(api.addr, plan.clients + 1000);
    let pid = gateway.child.id();
    wait_healthy(gateway.control).await;
    sleep(Duration::from_secs(1)).await;
    let rss_baseline = rss_bytes(pid);
    let t0 = Instant::now();
    println!(
        "gateway pid {pid}, RSS baseline {:.1} MiB",
        mib(rss_baseline)
    );

    // Connect every client, staggered over ~10 s.
    let shared = Arc::new(Shared {
        gateway: gateway.public,
        connected: AtomicUsize::new(0),
    });
    let (phase_tx, phase_rx) = watch::channel(0u8);
    let stagger = Duration::from_secs(10).as_micros() as u64 / plan.clients.max(1) as u64;
    let mut clients = Vec::with_capacity(plan.clients);
    for i in 0..plan.clients {
        let (shared, phase) = (Arc::clone(&shared), phase_rx.clone());
        clients.push(tokio::spawn(async move {
            sleep(Duration::from_micros(stagger * i as u64)).await;
            client(i, shared, phase).await
        }));
    }
    let ramp_deadline = Instant::now() + Duration::from_secs(60);
    while shared.connected.load(Ordering::SeqCst) < plan.clients {
        assert!(
            Instant::now() < ramp_deadline,
            "only {} of {} clients connected within 60 s",
            shared.connected.load(Ordering::SeqCst),
            plan.clients
        );
        sleep(Duration::from_millis(200)).await;
    }
    println!(
        "{} clients connected after {:.1} s",
        plan.clients,
        t0.elapsed().as_secs_f64()
    );
    let stop_pushes = CancellationToken::new();
    let pushes = tokio::spawn(pusher(
        gateway.control,
        plan.clients,
        plan.pushes_per_second,
        stop_pushes.clone(),
    ));

    // Steady load, with the peak RSS sampled.
    let rss_peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = Arc::clone(&rss_peak);
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                sleep(Duration::from_millis(250)).await;
            }
        })
    };
    sleep(plan.hold_before).await;
    let before_outage = metrics(gateway.control).await;
    assert_eq!(
        metric(&before_outage, "connections_active"),
        plan.clients as u64,
        "every client held before the outage"
    );

    // The API goes away and comes back on the same port.
    let outage_start = Instant::now();
    api.kill().await;
    println!(
        "API killed at {:.1} s ({} connected)",
        t0.elapsed().as_secs_f64(),
        shared.connected.load(Ordering::SeqCst)
    );
    sleep(plan.outage).await;
    api.restart().await;
    let outage_end = Instant::now();
    println!(
        "API back at {:.1} s ({} connected)",
        t0.elapsed().as_secs_f64(),
        shared.connected.load(Ordering::SeqCst)
    );

    sleep(plan.hold_after).await;
    let reconnected = shared.connected.load(Ordering::SeqCst);
    stop_pushes.cancel();
    let pushes = pushes.await.unwrap();

    // Quiet: no new messages; outstanding echoes land. Then every client closes and leaves.
    phase_tx.send(1).unwrap();
    sleep(Duration::from_secs(3)).await;
    let before_close = metrics(gateway.control).await;
    phase_tx.send(2).unwrap();
    let mut reports = Vec::with_capacity(clients.len());
    for client in clients {
        reports.push(client.await.expect("client task"));
    }
    let leave_done = Instant::now();

    // Counters settle once the last DELETE is out.
    let mut after = metrics(gateway.control).await;
    let settle_deadline = Instant::now() + Duration::from_secs(30);
    while (metric(&after, "connections_active") != 0
        || metric(&after, "disconnects_notified") + metric(&after, "disconnects_failed")
            != metric(&after, "connections_closed"))
        && Instant::now() < settle_deadline
    {
        sleep(Duration::from_millis(200)).await;
        after = metrics(gateway.control).await;
    }
    // Memory: give the gateway time to drop idle API connections (the pool keeps them 30 s) and
    // the allocator time to hand freed pages back, then compare with the baseline.
    sampler.abort();
    let rss_peak = rss_peak.load(Ordering::Relaxed);
    let rss_allowed = rss_baseline
        + RSS_MARGIN_BYTES
        + (rss_peak.saturating_sub(rss_baseline) as f64 * RSS_MARGIN_FRACTION) as u64;
    let rss_deadline = leave_done + RSS_SETTLE;
    let mut rss_after = rss_bytes(pid);
    let mut timeline = Vec::new();
    loop {
        let at = leave_done.elapsed().as_secs();
        if timeline.last().is_none_or(|(t, _, _)| at >= t + 5) {
            timeline.push((at, mib(rss_after), api_connections(api.addr.port())));
        }
        let settled = leave_done.elapsed() >= RSS_MIN_SETTLE;
        if (settled && rss_after <= rss_allowed) || Instant::now() >= rss_deadline {
            break;
        }
        sleep(Duration::from_secs(1)).await;
        rss_after = rss_bytes(pid);
    }
    let rss_settle = leave_done.elapsed();

    // SIGTERM: graceful exit with status 0.
    // SAFETY: kill(2) on our own child's pid with a valid signal number.
    let killed = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(killed, 0);
    let exit = tokio::task::spawn_blocking(move || {
        let status = gateway.child.wait();
        (status, gateway)
    })
    .await
    .unwrap();
    let (status, gateway) = exit;
    let stderr = std::fs::read_to_string(&gateway.stderr_path).unwrap_or_default();

    // ---- figures ----
    let sessions: Vec<&Session> = reports.iter().flat_map(|r| &r.sessions).collect();
    let mut ends: HashMap<String, usize> = HashMap::new();
    for s in &sessions {
        let key = match &s.how {
            End::OwnClose(code) => format!("own close, gateway answered {code:?}"),
            End::ServerClose(code, reason) => format!("gateway closed {code} {reason:?}"),
            End::Eof => "EOF without close frame".to_owned(),
            End::Error(_) => "error".to_owned(),
            End::ReplyTimeout => "no echo within 10 s".to_owned(),
            End::WrongEcho(_) => "wrong echo".to_owned(),
        };
        *ends.entry(key).or_default() += 1;
    }
    let mut refused: HashMap<u16, usize> = HashMap::new();
    for (status, _) in reports.iter().flat_map(|r| &r.refused) {
        *refused.entry(*status).or_default() += 1;
    }
    let handshake_errors: Vec<&String> = reports.iter().flat_map(|r| &r.handshake_errors).collect();
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    let echoed: u64 = reports.iter().map(|r| r.echoed).sum();
    let deletes_by_code = api.stats.deletes_by_code.lock().unwrap().clone();
    let deletes_by_connection = api.stats.deletes_by_connection.lock().unwrap().clone();
    let api_deletes: u64 = deletes_by_code.values().sum();
    let push_status: HashMap<u16, usize> = pushes.iter().fold(HashMap::new(), |mut m, p| {
        *m.entry(p.status).or_default() += 1;
        m
    });
    println!("--- soak figures ---");
    println!(
        "clients {}, sessions {}, messages sent {sent}, echoed {echoed}",
        plan.clients,
        sessions.len()
    );
    println!("session ends: {ends:?}");
    println!(
        "handshakes refused by status: {refused:?}; other handshake errors: {}",
        handshake_errors.len()
    );
    println!(
        "reconnected after the outage: {reconnected} of {}",
        plan.clients
    );
    println!(
        "pushes: {} sent, by status {push_status:?}, received {}",
        pushes.len(),
        reports.iter().map(|r| r.pushes.len()).sum::<usize>()
    );
    println!(
        "API: GETs {}, POSTs {}, DELETEs {api_deletes} by X-Close-Code {deletes_by_code:?}",
        api.stats.gets.load(Ordering::Relaxed),
        api.stats.posts.load(Ordering::Relaxed)
    );
    let interesting = [
        "connections_opened",
        "connections_closed",
        "connections_active",
        "disconnects_notified",
        "disconnects_failed",
        "requests_started",
        "requests_succeeded",
        "requests_failed",
        "messages_received",
        "messages_sent",
        "connections_closed_by_reason{reason=\"client\"}",
        "connections_closed_by_reason{reason=\"upstream_failure\"}",
    ];
    for name in interesting {
        println!(
            "metric {name}: before outage {}, before close {}, end {}",
            metric(&before_outage, name),
            metric(&before_close, name),
            metric(&after, name)
        );
    }
    println!(
        "RSS: baseline {:.1} MiB, peak {:.1} MiB, after clients left {:.1} MiB ({:.1} s after), allowed {:.1} MiB",
        mib(rss_baseline),
        mib(rss_peak),
        mib(rss_after),
        rss_settle.as_secs_f64(),
        mib(rss_allowed)
    );
    println!("RSS after the clients left (s, MiB, gateway-to-API connections): {timeline:?}");
    println!(
        "gateway exit: {status:?}; stderr {} bytes at {}",
        stderr.len(),
        gateway.stderr_path.display()
    );

    // ---- checks ----
    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    // No panic, clean exit.
    check(
        !stderr.contains("panicked"),
        "the gateway panicked (see its stderr)".into(),
    );
    check(
        status.as_ref().is_ok_and(|s| s.success()),
        format!("the gateway did not exit 0 on SIGTERM: {status:?}"),
    );
    // Every client was back after the outage.
    check(
        reconnected == plan.clients,
        format!(
            "{reconnected} of {} clients held after the outage",
            plan.clients
        ),
    );
    // Every session ended visibly: our own close, or a close code from the gateway.
    let silent: Vec<String> = sessions
        .iter()
        .filter(|s| !matches!(s.how, End::OwnClose(_) | End::ServerClose(..)))
        .take(5)
        .map(|s| format!("{:?}", s.how))
        .collect();
    check(
        silent.is_empty(),
        format!("sessions that ended silently, e.g. {silent:?}"),
    );
    // Gateway closes are 1011 for messages the API could not take, only around the outage.
    let window_end = outage_end + UPSTREAM_TIMEOUT + Duration::from_secs(2);
    let server_closes: Vec<&Session> = sessions
        .iter()
        .copied()
        .filter(|s| matches!(s.how, End::ServerClose(..)))
        .collect();
    let bad_closes: Vec<String> = server_closes
        .iter()
        .filter(|s| {
            !matches!(s.how, End::ServerClose(1011, _))
                || s.end < outage_start
                || s.end > window_end
        })
        .take(5)
        .map(|s| format!("{:?} at {:.1} s", s.how, (s.end - t0).as_secs_f64()))
        .collect();
    check(
        bad_closes.is_empty(),
        format!("gateway closes other than 1011 during the outage: {bad_closes:?}"),
    );
    check(
        !server_closes.is_empty(),
        "the outage closed no connection: it did not happen".into(),
    );
    // Our own closes were answered with 1000.
    let own: Vec<&Session> = sessions
        .iter()
        .copied()
        .filter(|s| matches!(s.how, End::OwnClose(_)))
        .collect();
    check(
        own.iter().all(|s| s.how == End::OwnClose(Some(1000))),
        "a client's close was not answered with 1000".into(),
    );
    // Handshakes refused only while the API was away (or the gateway was saturated by the
    // reconnect wave), always with a status.
    let bad_refusals: Vec<String> = reports
        .iter()
        .flat_map(|r| &r.refused)
        .filter(|(status, at)| {
            !(502..=504).contains(status)
                || *at < outage_start
                || *at > window_end + Duration::from_secs(10)
        })
        .take(5)
        .map(|(status, at)| format!("{status} at {:.1} s", (*at - t0).as_secs_f64()))
        .collect();
    check(
        bad_refusals.is_empty(),
        format!("unexpected handshake refusals: {bad_refusals:?}"),
    );
    check(
        handshake_errors.is_empty(),
        format!(
            "handshakes failed without a status: {:?}",
            handshake_errors.iter().take(5).collect::<Vec<_>>()
        ),
    );
    // Counters: opened = closed + active, everything closed at the end.
    let opened = metric(&after, "connections_opened");
    let closed = metric(&after, "connections_closed");
    let active = metric(&after, "connections_active");
    check(
        opened == closed + active,
        format!("opened {opened} != closed {closed} + active {active}"),
    );
    check(
        active == 0,
        format!("{active} connections still active after every client left"),
    );
    check(
        opened == sessions.len() as u64,
        format!(
            "gateway opened {opened}, clients saw {} sessions",
            sessions.len()
        ),
    );
    // One DELETE per connection: told to the API, or counted as failed.
    let notified = metric(&after, "disconnects_notified");
    let failed = metric(&after, "disconnects_failed");
    check(
        notified + failed == closed,
        format!("notified {notified} + failed {failed} != closed {closed}"),
    );
    check(
        notified <= api_deletes,
        format!("gateway counted {notified} DELETEs told, the API saw {api_deletes}"),
    );
    let repeated = deletes_by_connection.values().filter(|n| **n > 1).count();
    check(
        repeated == 0,
        format!("{repeated} connections got more than one DELETE"),
    );
    check(
        api_deletes <= closed,
        format!("the API saw {api_deletes} DELETEs for {closed} closed connections"),
    );
    // The clients' own closes (API up) all reached the API with their code; the 1011 closes
    // reached it or were counted as failed.
    let api_1000 = deletes_by_code.get("1000").copied().unwrap_or(0);
    let api_1011 = deletes_by_code.get("1011").copied().unwrap_or(0);
    check(
        api_1000 == own.len() as u64,
        format!(
            "{} clients closed with 1000; the API saw {api_1000} such DELETEs",
            own.len()
        ),
    );
    check(
        api_1011 + failed >= server_closes.len() as u64 && api_1011 <= server_closes.len() as u64,
        format!(
            "{} sessions closed with 1011; the API saw {api_1011} such DELETEs and {failed} failed",
            server_closes.len()
        ),
    );
    // The gateway retries a DELETE it could not send for about 16 s (src/session.rs), so after an
    // outage shorter than that the API hears of every connection closed during it.
    if plan.outage <= DELETE_RETRY_COVERS {
        check(
            failed == 0 && api_1011 == server_closes.len() as u64,
            format!(
                "after a {:?} outage: {failed} DELETEs failed, the API saw {api_1011} of {} 1011 closes",
                plan.outage,
                server_closes.len()
            ),
        );
    }
    check(
        metric(
            &after,
            "connections_closed_by_reason{reason=\"upstream_failure\"}",
        ) == server_closes.len() as u64,
        "closed_by_reason{upstream_failure} differs from the 1011 closes the clients saw".into(),
    );
    check(
        deletes_by_code.keys().all(|k| k == "1000" || k == "1011"),
        format!("DELETEs with unexpected codes: {deletes_by_code:?}"),
    );
    // Messages: each echo answered its own message; a message never echoed was followed by a
    // close code on that socket (checked per session above: no ReplyTimeout).
    check(
        echoed > 0 && echoed <= sent,
        format!("sent {sent}, echoed {echoed}"),
    );
    // Pushes: each was answered with a status; one accepted while its client's session was open
    // throughout, and that session ended by the client's own close, was delivered exactly once.
    let mut lost = 0usize;
    let received: Vec<HashSet<u64>> = reports
        .iter()
        .map(|r| r.pushes.iter().copied().collect())
        .collect();
    for (i, report) in reports.iter().enumerate() {
        check(
            received[i].len() == report.pushes.len(),
            format!("client {i} got a push twice"),
        );
    }
    for push in pushes.iter().filter(|p| p.status == 200) {
        let report = &reports[push.client];
        let must_arrive = report.sessions.iter().any(|s| {
            s.start <= push.sent && push.answered <= s.end && matches!(s.how, End::OwnClose(_))
        });
        if must_arrive && !received[push.client].contains(&push.seq) {
            lost += 1;
        }
    }
    check(
        lost == 0,
        format!("{lost} accepted pushes to open sessions never arrived"),
    );
    check(
        push_status.keys().all(|s| matches!(s, 200 | 404 | 503)),
        format!("push statuses: {push_status:?}"),
    );
    // Memory back near the baseline.
    check(
        rss_after <= rss_allowed,
        format!(
            "RSS {:.1} MiB after the clients left; baseline {:.1} MiB, allowed {:.1} MiB",
            mib(rss_after),
            mib(rss_baseline),
            mib(rss_allowed)
        ),
    );
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "soak failures:\n{}",
        failures.join("\n")
    );
}
