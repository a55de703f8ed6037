//! `load`: a websocket load generator for ws2http.
//!
//! The process given on the command line is the *parent*: it splits the connections over
//! `--processes` worker children (itself, re-run with `--worker-first`), steps them through the
//! phases connect → go → stop → close over their stdin, reads their progress and final reports
//! as JSON lines on their stdout, samples the gateway's RSS and CPU time from `/proc` at each
//! phase boundary and every 250 ms, and prints one JSON line (stdout) and a table (stderr).
//!
//! Each connection is one task. Replies are checked against the request they answer (see
//! `ws2http_bench::proto`): a reply naming another connection is cross-talk, one that skips the
//! oldest request in flight is out of order, one that answers it with other bytes than the API
//! sends back (`--reply-bytes` as given to `mock-api`) is corrupted. Pushed messages
//! (`push:<ns>:<index>`) are timed on arrival; one for another client id is misdelivered, one
//! not newer than the newest its connection had is a duplicate or out of order
//! (`proto::LastPush`), and one in a binary frame is of the wrong type (`push` sends text:
//! `proto::PUSH_BINARY`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argh::FromArgs;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio_websockets::{ClientBuilder, Message, WebSocketStream};
use ws2http_bench::proto::{self, InFlight, Reply, Verdict};
use ws2http_bench::{net, procstat, stats, usage_error};

/// Open files one worker may use; connections per worker are kept below it.
const FD_BUDGET_PER_PROCESS: u64 = 19_000;

#[derive(FromArgs, Clone)]
/// Websocket load generator: N connections in idle, rate or flood mode against ws2http.
struct Args {
    /// gateway websocket base URL; the client id is appended (default ws://127.0.0.1:7001/)
    #[argh(option, default = "String::from(\"ws://127.0.0.1:7001/\")")]
    url: String,
    /// number of connections (default 100)
    #[argh(option, default = "100")]
    conns: u64,
    /// connections opened per second over all processes; 0 = as fast as possible (default 0)
    #[argh(option, default = "0.0")]
    ramp: f64,
    /// handshakes in flight at once per process (default 256)
    #[argh(option, default = "256")]
    connect_concurrency: usize,
    /// idle | rate | flood (default idle)
    #[argh(option, default = "String::from(\"idle\")")]
    mode: String,
    /// rate mode: milliseconds between two messages of one connection (default 1000)
    #[argh(option, default = "1000")]
    interval_ms: u64,
    /// flood mode: messages in flight per connection (default 1)
    #[argh(option, default = "1")]
    in_flight: usize,
    /// message size in bytes (default 64)
    #[argh(option, default = "64")]
    payload: usize,
    /// the API echoes only the first N bytes of each message, as `mock-api --reply-bytes N`:
    /// replies are checked against that; 0 = the whole message (default 0)
    #[argh(option, default = "0")]
    reply_bytes: usize,
    /// send binary messages instead of text (their replies still come as text: the mock API
    /// answers the ASCII payload without a Content-Type, and the gateway sends such an answer
    /// back as text)
    #[argh(switch)]
    binary: bool,
    /// spread client sockets over 127.0.0.1..=N as source addresses; 0 = kernel's choice (default 16)
    #[argh(option, default = "16")]
    source_ips: u32,
    /// worker processes to split the connections over (default 1)
    #[argh(option, default = "1")]
    processes: u64,
    /// reconnect dropped or failed connections with exponential backoff
    #[argh(switch)]
    reconnect: bool,
    /// seconds of the message phase (idle: how long to hold) (default 10)
    #[argh(option, default = "10.0")]
    duration: f64,
    /// give up waiting for the connect phase after this many seconds (default 120)
    #[argh(option, default = "120.0")]
    connect_timeout: f64,
    /// per-connection handshake timeout in milliseconds (default 10000)
    #[argh(option, default = "10000")]
    handshake_timeout_ms: u64,
    /// after the message phase, wait at most this long for replies still in flight (default 5000)
    #[argh(option, default = "5000")]
    drain_ms: u64,
    /// seconds, after the message phase and --drain-ms, that the parent waits for the workers'
    /// reports; then it stops them and reports what it has, `worker_timeout` (default 30)
    #[argh(option, default = "30.0")]
    report_grace: f64,
    /// client id prefix; connection i uses <prefix><i> (default b)
    #[argh(option, default = "String::from(\"b\")")]
    id_prefix: String,
    /// index of the first connection (default 0)
    #[argh(option, default = "0")]
    first: u64,
    /// pid of the gateway, to report its RSS and CPU time per connection and per message
    #[argh(option)]
    gateway_pid: Option<u32>,
    /// file written (with the JSON of the connect phase) once all connections are up
    #[argh(option)]
    ready_file: Option<PathBuf>,
    /// do not print the table on stderr
    #[argh(switch)]
    quiet: bool,
    /// internal: run as a worker owning connections from this index
    #[argh(option)]
    worker_first: Option<u64>,
    /// internal: number of connections of this worker
    #[argh(option)]
    worker_count: Option<u64>,
}

/// Message-sending behaviour of the connections.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Idle,
    Rate,
    Flood,
}

/// Phases, as the parent announces them to workers.
const CONNECT: u8 = 0;
const GO: u8 = 1;
const STOP: u8 = 2;
const CLOSE: u8 = 3;
/// Names of the phases, indexed by phase.
const PHASE_NAMES: [&str; 4] = ["connect", "go", "stop", "close"];

fn main() {
    let args: Args = argh::from_env();
    let mode = match args.mode.as_str() {
        "idle" => Mode::Idle,
        "rate" => Mode::Rate,
        "flood" => Mode::Flood,
        m => usage_error("load", &format!("unknown --mode {m} (idle | rate | flood)")),
    };
    if let (Some(first), Some(count)) = (args.worker_first, args.worker_count) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(worker(args, mode, first, count));
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Checked here too, so a bad URL is one line and exit 2 rather than a report of lost workers.
    if let Err(message) = rt.block_on(resolve(&args.url)) {
        usage_error("load", &message);
    }
    let code = rt.block_on(parent(args, mode));
    std::process::exit(code);
}

// ---------------------------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------------------------

/// State shared by the connection tasks of one worker.
struct Shared {
    args: Args,
    mode: Mode,
    /// What each reply must be, byte for byte.
    echo: proto::EchoShape,
    dst: SocketAddr,
    base_url: String,
    phase: watch::Receiver<u8>,
    open: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    reconnects: AtomicU64,
    sent: AtomicU64,
    replies: AtomicU64,
    pushes: AtomicU64,
    errors_total: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    latency: Mutex<Histogram<u64>>,
    /// Rate mode: how late each message went out, from its scheduled tick to its send.
    send_lag: Mutex<Histogram<u64>>,
    connect_latency: Mutex<Histogram<u64>>,
    push_latency: Mutex<Histogram<u64>>,
    settled: AtomicU64,
    drained: AtomicU64,
    progress: Notify,
}

impl Shared {
    fn error(&self, kind: &str) {
        self.errors_total.fetch_add(1, Relaxed);
        *self
            .errors
            .lock()
            .unwrap()
            .entry(kind.to_string())
            .or_default() += 1;
    }

    fn phase(&self) -> u8 {
        *self.phase.borrow()
    }
}

/// Marks a task's connect-phase outcome and message-phase drain exactly once each.
struct Marks<'a> {
    sh: &'a Shared,
    settled: bool,
    drained: bool,
}

impl Marks<'_> {
    fn settle(&mut self) {
        if !self.settled {
            self.settled = true;
            self.sh.settled.fetch_add(1, Relaxed);
            self.sh.progress.notify_waiters();
        }
    }
    fn drain(&mut self) {
        if !self.drained {
            self.drained = true;
            self.sh.drained.fetch_add(1, Relaxed);
            self.sh.progress.notify_waiters();
        }
    }
}

impl Drop for Marks<'_> {
    fn drop(&mut self) {
        self.settle();
        self.drain();
    }
}

fn ws_error_kind(e: &tokio_websockets::Error) -> String {
    use tokio_websockets::Error as E;
    match e {
        E::Io(io) => format!("io_{:?}", io.kind()),
        E::Upgrade(tokio_websockets::upgrade::Error::DidNotSwitchProtocols(code)) => {
            format!("handshake_status_{code}")
        }
        E::Upgrade(_) => "handshake_invalid".into(),
        E::Protocol(_) => "ws_protocol".into(),
        E::PayloadTooLong { .. } => "ws_payload_too_long".into(),
        E::AlreadyClosed => "ws_already_closed".into(),
        _ => "ws_other".into(),
    }
}

type Ws = WebSocketStream<TcpStream>;

async fn connect_one(sh: &Shared, idx: u64) -> Result<Ws, String> {
    let started = Instant::now();
    let src = net::source_addr(idx, sh.args.source_ips);
    let uri = format!("{}{}{}", sh.base_url, sh.args.id_prefix, idx);
    let fut = async {
        let tcp = net::connect_from(src, sh.dst)
            .await
            .map_err(|e| format!("connect_{:?}", e.kind()))?;
        let builder = ClientBuilder::new()
            .uri(&uri)
            .map_err(|_| "bad_uri".to_string())?;
        builder
            .connect_on(tcp)
            .await
            .map(|(ws, _)| ws)
            .map_err(|e| ws_error_kind(&e))
    };
    match tokio::time::timeout(Duration::from_millis(sh.args.handshake_timeout_ms), fut).await {
        Ok(Ok(ws)) => {
            stats::record(&mut sh.connect_latency.lock().unwrap(), started.elapsed());
            Ok(ws)
        }
        Ok(Err(k)) => Err(k),
        Err(_) => Err("handshake_timeout".into()),
    }
}

/// How a connection's session ended.
enum End {
    /// We closed it at the end of the run.
    Finished,
    /// It was lost (server close, I/O error); the kind was recorded.
    Lost,
}

fn make_msg(sh: &Shared, idx: u64, seq: u64) -> Message {
    let p = proto::request_payload(idx, seq, sh.args.payload);
    if sh.args.binary {
        Message::binary(p)
    } else {
        // The payload is ASCII.
        Message::text(String::from_utf8(p).expect("ascii payload"))
    }
}

/// Sends the connection's next request, its latency to be timed from `timed_from`: in rate mode
/// the instant its tick was scheduled, less the timer's own lateness ([`rate_timed_from`]: a
/// message the load generator sends late, short of CPU, counts its wait too, rather than the
/// wait being left out: coordinated omission), in flood mode the send itself (a closed loop has
/// no schedule).
async fn send_next(
    sh: &Shared,
    ws: &mut Ws,
    idx: u64,
    flight: &mut InFlight,
    timed_from: Instant,
) -> bool {
    let seq = flight.next_seq();
    let msg = make_msg(sh, idx, seq);
    flight.sent(timed_from);
    sh.sent.fetch_add(1, Relaxed);
    match ws.send(msg).await {
        Ok(()) => true,
        Err(e) => {
            sh.error(&format!("send_{}", ws_error_kind(&e)));
            false
        }
    }
}

/// The timer of a rate-mode connection: first tick at `first`, then one per `interval`. Ticks
/// missed while the load generator was busy come at once (`Burst`), each returning the instant
/// it was scheduled for, so the schedule never shifts: the load asked is the load sent, and
/// latency is timed from the schedule ([`rate_timed_from`]).
fn rate_ticker(first: tokio::time::Instant, interval: Duration) -> tokio::time::Interval {
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    ticker
}

/// The part of a rate-mode message's lateness that is the timer's own and not charged to the
/// gateway: tokio counts time in whole milliseconds and rounds a deadline up to the next one,
/// so a tick due at 10.2 ms comes at 11 ms at the earliest. (A runtime that had parked can
/// add up to another millisecond, as it sleeps whole milliseconds from a clock read rounded
/// down; that part is still charged. The send lag, `send_lag` in the report, shows it all.)
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The instant a rate-mode message's latency is timed from: its tick's `scheduled` instant,
/// moved later by as much of its lateness (`sent_at`, when the load generator went to send it,
/// minus `scheduled`) as the timer itself accounts for, [`TIMER_RESOLUTION`] at most. A message
/// sent within that of its schedule is timed from its send, so the timer's rounding is not
/// charged to the gateway; one sent later (a load generator stalled, or a connection whose
/// previous send the gateway did not take) counts every bit of its wait beyond it.
fn rate_timed_from(scheduled: Instant, sent_at: Instant) -> Instant {
    sent_at.clamp(scheduled, scheduled + TIMER_RESOLUTION)
}

/// Runs one established connection through the phases until close or loss. `last_push` is the
/// connection's memory of the pushes it had, kept over reconnects.
async fn session(
    sh: &Shared,
    idx: u64,
    mut ws: Ws,
    marks: &mut Marks<'_>,
    last_push: &mut proto::LastPush,
) -> End {
    let mut phase_rx = sh.phase.clone();
    let mut flight = InFlight::new(idx);
    let interval = Duration::from_millis(sh.args.interval_ms.max(1));
    // Spread the first tick of each connection evenly over one interval.
    let offset =
        interval.mul_f64((idx % sh.args.conns.max(1)) as f64 / sh.args.conns.max(1) as f64);
    let mut ticker = rate_ticker(tokio::time::Instant::now() + offset, interval);
    let mut started = false;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    loop {
        let phase = *phase_rx.borrow_and_update();
        if phase == GO && !started {
            started = true;
            ticker.reset_after(offset);
            if sh.mode == Mode::Flood {
                for _ in 0..sh.args.in_flight.max(1) {
                    if !send_next(sh, &mut ws, idx, &mut flight, Instant::now()).await {
                        return End::Lost;
                    }
                }
            }
        }
        if phase >= STOP && drain_deadline.is_none() && !marks.drained {
            if flight.is_empty() {
                marks.drain();
            } else {
                drain_deadline =
                    Some(tokio::time::Instant::now() + Duration::from_millis(sh.args.drain_ms));
            }
        }
        if phase >= CLOSE {
            for _ in 0..flight.give_up() {
                sh.error("reply_missing");
            }
            marks.drain();
            let _ = SinkExt::close(&mut ws).await;
            // Wait briefly for the server's close frame so the close is clean on both sides.
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            return End::Finished;
        }
        let ticking = phase == GO && sh.mode == Mode::Rate;
        tokio::select! {
            r = phase_rx.changed() => {
                if r.is_err() {
                    // The worker is going away.
                    return End::Finished;
                }
            }
            scheduled = ticker.tick(), if ticking => {
                let (scheduled, sent_at) = (scheduled.into_std(), Instant::now());
                stats::record(
                    &mut sh.send_lag.lock().unwrap(),
                    sent_at.saturating_duration_since(scheduled),
                );
                if !send_next(sh, &mut ws, idx, &mut flight, rate_timed_from(scheduled, sent_at)).await {
                    return End::Lost;
                }
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or(far)), if drain_deadline.is_some() && !marks.drained => {
                // Counted missing once; a reply that still comes is late, not a reply.
                for _ in 0..flight.give_up() {
                    sh.error("reply_missing");
                }
                marks.drain();
            }
            m = ws.next() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        sh.error(&format!("recv_{}", ws_error_kind(&e)));
                        return End::Lost;
                    }
                    None => {
                        sh.error("closed_eof");
                        return End::Lost;
                    }
                };
                if let Some((code, _)) = m.as_close() {
                    sh.error(&format!("closed_by_server_{}", u16::from(code)));
                    return End::Lost;
                }
                if !(m.is_text() || m.is_binary()) {
                    continue;
                }
                let now = Instant::now();
                match proto::parse_reply(m.as_payload()) {
                    Reply::Push { target: Some(target), .. } if target != idx => {
                        // Pushed to another client id: the gateway delivered it to the wrong socket.
                        sh.error("push_misdelivered");
                    }
                    Reply::Push { sent_ns, .. } => match last_push.check_frame(sent_ns, m.is_binary(), proto::PUSH_BINARY).error_kind() {
                        // Delivered twice, after a newer push, or in the other frame type than
                        // the gateway promises for `push`'s text pushes: an error, not a delivery.
                        Some(kind) => sh.error(kind),
                        None => {
                            let lat_ns = proto::now_ns().saturating_sub(sent_ns);
                            stats::record_us(&mut sh.push_latency.lock().unwrap(), (lat_ns / 1000) as u64);
                            sh.pushes.fetch_add(1, Relaxed);
                        }
                    },
                    Reply::Echo { conn, seq } => {
                        let verdict = flight.check_echo(m.as_payload(), m.is_binary(), conn, seq, &sh.echo, now);
                        match verdict {
                            Verdict::Ok(rtt) => {
                                stats::record(&mut sh.latency.lock().unwrap(), rtt);
                                sh.replies.fetch_add(1, Relaxed);
                            }
                            Verdict::Late => {}
                            v => sh.error(v.error_kind().unwrap_or("reply_unexpected")),
                        }
                        // A corrupted, wrong-type or out-of-order reply is an error, not a reply, but it did
                        // answer a request: the closed loop goes on rather than losing a slot.
                        if verdict.answered() {
                            if sh.mode == Mode::Flood && phase == GO && !send_next(sh, &mut ws, idx, &mut flight, Instant::now()).await {
                                return End::Lost;
                            }
                            if phase >= STOP && flight.is_empty() {
                                marks.drain();
                            }
                        }
                    }
                    Reply::Unknown => {
                        if m.as_payload().is_empty() {
                            sh.error("reply_empty");
                        } else {
                            sh.error("reply_unknown");
                        }
                    }
                }
            }
        }
    }
}

async fn conn_task(
    sh: Arc<Shared>,
    idx: u64,
    mut permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut marks = Marks {
        sh: &sh,
        settled: false,
        drained: false,
    };
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    let mut attempt = 0u64;
    let mut last_push = proto::LastPush::default();
    loop {
        if sh.phase() >= STOP {
            return;
        }
        if !first {
            sh.reconnects.fetch_add(1, Relaxed);
        }
        first = false;
        let res = connect_one(&sh, idx).await;
        drop(permit.take());
        match res {
            Ok(ws) => {
                sh.connects.fetch_add(1, Relaxed);
                sh.open.fetch_add(1, Relaxed);
                marks.settle();
                backoff = Duration::from_millis(100);
                let end = session(&sh, idx, ws, &mut marks, &mut last_push).await;
                sh.open.fetch_sub(1, Relaxed);
                if matches!(end, End::Finished) || !sh.args.reconnect {
                    return;
                }
            }
            Err(kind) => {
                sh.connect_failures.fetch_add(1, Relaxed);
                sh.error(&kind);
                marks.settle();
                if !sh.args.reconnect {
                    return;
                }
            }
        }
        // Backoff with jitter before the next attempt; give up when the run stops.
        // Up to +50% jitter, varied by connection and attempt, so reconnects do not stampede.
        attempt += 1;
        let spread = (idx ^ attempt).wrapping_mul(2_654_435_761) % 1000;
        let wait = backoff + backoff.mul_f64(spread as f64 / 2000.0);
        let mut rx = sh.phase.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = rx.wait_for(|p| *p >= STOP) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn emit(v: Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// The gateway's address and the base URL (ending in `/`) that client ids are appended to.
async fn resolve(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("--url must start with ws:// (got {url})"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let dst = tokio::net::lookup_host(hostport)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("--url: cannot resolve {hostport}"))?;
    let base = if url.ends_with('/') {
        url.to_string()
    } else {
        format!("{url}/")
    };
    Ok((dst, base))
}

async fn worker(args: Args, mode: Mode, first: u64, count: u64) {
    net::raise_nofile_limit();
    // Ctrl-C in a terminal reaches the whole process group: the parent decides, workers ignore it.
    tokio::spawn(async { while tokio::signal::ctrl_c().await.is_ok() {} });
    let (dst, base_url) = resolve(&args.url)
        .await
        .unwrap_or_else(|message| usage_error("load", &message));
    let (phase_tx, phase_rx) = watch::channel(CONNECT);
    let sh = Arc::new(Shared {
        args: args.clone(),
        mode,
        echo: proto::EchoShape {
            payload: args.payload,
            reply_bytes: args.reply_bytes,
        },
        dst,
        base_url,
        phase: phase_rx,
        open: AtomicU64::new(0),
        connects: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        replies: AtomicU64::new(0),
        pushes: AtomicU64::new(0),
        errors_total: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        latency: Mutex::new(stats::new_hist()),
        send_lag: Mutex::new(stats::new_hist()),
        connect_latency: Mutex::new(stats::new_hist()),
        push_latency: Mutex::new(stats::new_hist()),
        settled: AtomicU64::new(0),
        drained: AtomicU64::new(0),
        progress: Notify::new(),
    });

    // Commands from the parent: go, stop, close (EOF means close).
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            let cmd = lines.next_line().await.ok().flatten();
            let p = match cmd.as_deref() {
                Some("go") => GO,
                Some("stop") => STOP,
                Some("close") | None => CLOSE,
                Some(_) => continue,
            };
            phase_tx.send_modify(|cur| *cur = (*cur).max(p));
            if p == CLOSE {
                // Keep the sender alive so tasks see CLOSE rather than a dropped channel.
                std::future::pending::<()>().await;
            }
        }
    });

    // Progress ticks, every 100 ms.
    let tick_sh = sh.clone();
    tokio::spawn(async move {
        let mut iv = tokio::time::interval(Duration::from_millis(100));
        loop {
            iv.tick().await;
            emit(json!({
                "ev": "tick",
                "open": tick_sh.open.load(Relaxed),
                "connects": tick_sh.connects.load(Relaxed),
                "sent": tick_sh.sent.load(Relaxed),
                "replies": tick_sh.replies.load(Relaxed),
                "pushes": tick_sh.pushes.load(Relaxed),
                "errors": tick_sh.errors_total.load(Relaxed),
            }));
        }
    });

    // Connect phase: paced spawning, a bounded number of handshakes at once.
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let per_proc_rate = if args.ramp > 0.0 {
        args.ramp / args.processes.max(1) as f64
    } else {
        0.0
    };
    let mut tasks = tokio::task::JoinSet::new();
    let spawner_sh = sh.clone();
    let spawner = tokio::spawn(async move {
        for i in 0..count {
            if spawner_sh.phase() >= STOP {
                break;
            }
            if per_proc_rate > 0.0 {
                let at = t0 + Duration::from_secs_f64(i as f64 / per_proc_rate);
                tokio::time::sleep_until(at.into()).await;
            }
            let permit = sem.clone().acquire_owned().await.ok();
            tasks.spawn(conn_task(spawner_sh.clone(), first + i, permit));
        }
        tasks
    });
    wait_until(&sh, |s| {
        s.settled.load(Relaxed) >= count || s.phase() >= STOP
    })
    .await;
    let connect_elapsed = t0.elapsed().as_secs_f64();
    emit(json!({
        "ev": "connected",
        "connect_elapsed_s": connect_elapsed,
        "established": sh.connects.load(Relaxed),
        "open": sh.open.load(Relaxed),
    }));

    // Message phase until the parent says stop; then drain.
    let mut rx = sh.phase.clone();
    let _ = rx.wait_for(|p| *p >= STOP).await;
    let mut tasks = spawner.await.unwrap_or_default();
    let spawned = tasks.len() as u64;
    wait_until(&sh, |s| s.drained.load(Relaxed) >= spawned).await;
    emit(json!({"ev": "drained"}));
    let _ = rx.wait_for(|p| *p >= CLOSE).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let errors = sh.errors.lock().unwrap().clone();
    emit(json!({
        "ev": "report",
        "connect_elapsed_s": connect_elapsed,
        "connects": sh.connects.load(Relaxed),
        "connect_failures": sh.connect_failures.load(Relaxed),
        "reconnects": sh.reconnects.load(Relaxed),
        "sent": sh.sent.load(Relaxed),
        "replies": sh.replies.load(Relaxed),
        "pushes": sh.pushes.load(Relaxed),
        "errors": errors,
        "latency": stats::to_pairs(&sh.latency.lock().unwrap()),
        "send_lag": stats::to_pairs(&sh.send_lag.lock().unwrap()),
        "connect_latency": stats::to_pairs(&sh.connect_latency.lock().unwrap()),
        "push_latency": stats::to_pairs(&sh.push_latency.lock().unwrap()),
    }));
    std::process::exit(0);
}

async fn wait_until(sh: &Shared, cond: impl Fn(&Shared) -> bool) {
    loop {
        let notified = sh.progress.notified();
        if cond(sh) {
            return;
        }
        // Re-check periodically as well: phase changes do not notify `progress`.
        let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Parent
// ---------------------------------------------------------------------------------------------

/// What the parent knows about one worker.
#[derive(Default)]
struct Child {
    last_tick: Value,
    connected: Option<Value>,
    drained: bool,
    report: Option<Value>,
    gone: bool,
}

fn sum_field(children: &[Child], f: impl Fn(&Child) -> Option<&Value>, key: &str) -> u64 {
    children
        .iter()
        .filter_map(|c| f(c).and_then(|v| v.get(key)).and_then(Value::as_u64))
        .sum()
}

/// CPU time (user + system, µs) of this process's waited-for children: the workers.
fn children_cpu_us() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// The gateway's figures in `load`'s report (`gateway`): its samples before connecting, when
/// connected and at the end of the message phase, its peak RSS (those samples and the
/// timeline's), its RSS per connection when connected and at the end, and its CPU figures
/// ([`gateway_cpu`]). A sample that could not be taken (the gateway gone, or `/proc`
/// unreadable) is null, and so is every figure that needs it: recorded as 0, a "≤ 4 KiB" or
/// "≤ 12 µs" criterion would count as met by a gateway that had died. So is a figure per
/// connection with no connection established: there is nothing to divide by, and 0 would meet
/// "≤ 4 KiB" too.
fn gateway_figures(
    pid: u32,
    [before, connected, end]: [Option<procstat::Sample>; 3],
    timeline: &[Value],
    established: u64,
    msgs: u64,
    message_phase_s: f64,
) -> Value {
    let peak = timeline
        .iter()
        .filter_map(|t| t["gw_rss_kib"].as_u64())
        .chain(
            [before, connected, end]
                .into_iter()
                .flatten()
                .map(|s| s.rss_kib),
        )
        .max();
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let kib_per_conn = |later: Option<procstat::Sample>| match (before, later) {
        (Some(before), Some(later)) if established > 0 => {
            json!(r2(
                later.rss_kib.saturating_sub(before.rss_kib) as f64 / established as f64
            ))
        }
        _ => Value::Null,
    };
    let mut figures = json!({
        "pid": pid,
        "before": before.map(procstat::Sample::to_json),
        "connected": connected.map(procstat::Sample::to_json),
        "end": end.map(procstat::Sample::to_json),
        "rss_peak_kib": peak,
        "kib_per_conn": kib_per_conn(connected),
        "kib_per_conn_end": kib_per_conn(end),
    });
    if let (Some(figures), Value::Object(cpu)) = (
        figures.as_object_mut(),
        gateway_cpu(
            [before.as_ref(), connected.as_ref(), end.as_ref()],
            established,
            msgs,
            message_phase_s,
        ),
    ) {
        figures.extend(cpu);
    }
    figures
}

/// The gateway's CPU figures from its samples before connecting, when connected and at the end
/// of the message phase: µs per connection (connect phase) and per message (message phase), the
/// kernel's share of each, and the share of a core used in the message phase. The totals come
/// from the gateway's CPU-time clock when the samples read it (`cpu_from_clock`), else from
/// clock ticks; the kernel's share always from ticks (`stime`). A phase whose sample at either
/// end is missing has its figures null; `cpu_from_clock` speaks of the phases that have them
/// (null when neither has). A figure per connection with none established, per message with
/// none answered, or a share of a phase that took no time, is null too: no figure, rather than
/// a 0 that would meet "≤ 12 µs".
fn gateway_cpu(
    [before, connected, end]: [Option<&procstat::Sample>; 3],
    established: u64,
    msgs: u64,
    message_phase_s: f64,
) -> Value {
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let per = |total: f64, n: u64| (n > 0).then(|| r2(total / n as f64));
    let ticks = |later: &procstat::Sample, earlier: &procstat::Sample| {
        later.sys_us.saturating_sub(earlier.sys_us) as f64
    };
    let connect_phase = before.zip(connected);
    let message_phase = connected.zip(end);
    let connect = connect_phase.map(|(before, connected)| connected.cpu_us_since(before));
    let message = message_phase.map(|(connected, end)| end.cpu_us_since(connected));
    let from_clock = [connect_phase, message_phase]
        .into_iter()
        .flatten()
        .map(|(earlier, later)| later.cpu_clock_since(earlier))
        .reduce(|a, b| a && b);
    json!({
        "cpu_us_per_conn": connect.and_then(|us| per(us, established)),
        "cpu_us_per_msg": message.and_then(|us| per(us, msgs)),
        // The kernel's share of the two figures above (system time: syscalls, and on
        // loopback the peer's TCP receive path that a send runs).
        "sys_us_per_conn": connect_phase.and_then(|(before, connected)| per(ticks(connected, before), established)),
        "sys_us_per_msg": message_phase.and_then(|(connected, end)| per(ticks(end, connected), msgs)),
        "cpu_pct_message_phase": message.filter(|_| message_phase_s > 0.0).map(|us| r2(us / 1e4 / message_phase_s)),
        "cpu_from_clock": from_clock,
    })
}

/// When the parent stops waiting for the workers' reports: `grace` after the message phase's
/// end (`stop_at`) and the drain that follows it.
fn report_deadline(
    stop_at: tokio::time::Instant,
    drain: Duration,
    grace: Duration,
) -> tokio::time::Instant {
    stop_at + drain + grace
}

/// The end of the message phase on a signal: now, or the end already set if it is earlier (a
/// signal during the drain must not move the report deadline later).
fn stop_now(stop_at: Option<tokio::time::Instant>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    stop_at.map_or(now, |stop_at| stop_at.min(now))
}

/// Seconds from `from` to `to`; 0 when either did not happen (a phase never reached).
fn seconds_between(from: Option<Instant>, to: Option<Instant>) -> f64 {
    match (from, to) {
        (Some(from), Some(to)) => to.saturating_duration_since(from).as_secs_f64(),
        _ => 0.0,
    }
}

fn gw_sample(pid: Option<u32>) -> Option<procstat::Sample> {
    pid.and_then(procstat::sample)
}

async fn parent(args: Args, mode: Mode) -> i32 {
    let p = args.processes.max(1);
    let per = args.conns.div_ceil(p);
    if per + 200 > FD_BUDGET_PER_PROCESS {
        eprintln!(
            "load: {} connections over {p} process(es) is {per} per process; use --processes {} or more",
            args.conns,
            args.conns.div_ceil(FD_BUDGET_PER_PROCESS - 200)
        );
        return 2;
    }
    let exe = std::env::current_exe().expect("current exe");
    let before = gw_sample(args.gateway_pid);
    let tcp_before = procstat::tcp_counters();
    let t_start = Instant::now();

    let (line_tx, mut line_rx) = mpsc::unbounded_channel::<(usize, Option<String>)>();
    let mut stdins = Vec::new();
    let mut procs = Vec::new();
    let mut first = args.first;
    let mut remaining = args.conns;
    for i in 0..p as usize {
        let n = per.min(remaining);
        remaining -= n;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(std::env::args().skip(1))
            .arg("--worker-first")
            .arg(first.to_string())
            .arg("--worker-count")
            .arg(n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        first += n;
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("load: cannot start worker: {e}");
                return 2;
            }
        };
        stdins.push(child.stdin.take());
        let out = child.stdout.take().expect("piped stdout");
        let tx = line_tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send((i, Some(l)));
            }
            let _ = tx.send((i, None));
        });
        procs.push(child);
    }
    drop(line_tx);

    let mut children: Vec<Child> = (0..p).map(|_| Child::default()).collect();
    let mut timeline: Vec<Value> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prev_replies = 0u64;
    let mut prev_pushes = 0u64;
    let mut prev_cpu: Option<procstat::Sample> = before;
    let mut prev_t = 0.0f64;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");

    let mut phase = CONNECT;
    let mut connected_sample = None;
    let mut tcp_connected = Value::Null;
    let mut end_sample = None;
    // The message phase runs from go to every worker drained; the send window, within it, from
    // go to the stop, when the clients stopped sending.
    let mut t_go: Option<Instant> = None;
    let mut t_stop: Option<Instant> = None;
    let mut t_drained: Option<Instant> = None;
    let mut stop_at: Option<tokio::time::Instant> = None;
    let connect_deadline =
        tokio::time::Instant::now() + Duration::from_secs_f64(args.connect_timeout.max(1.0));
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
    let mut interrupted = false;
    let mut timed_out = false;
    let drain = Duration::from_millis(args.drain_ms);
    let grace = Duration::from_secs_f64(args.report_grace.max(0.0));

    async fn tell(stdins: &mut [Option<tokio::process::ChildStdin>], cmd: &str) {
        for s in stdins.iter_mut().flatten() {
            let _ = s.write_all(format!("{cmd}\n").as_bytes()).await;
            let _ = s.flush().await;
        }
    }

    loop {
        // Phase transitions.
        if phase == CONNECT
            && (children.iter().all(|c| c.connected.is_some() || c.gone)
                || tokio::time::Instant::now() >= connect_deadline
                || interrupted)
        {
            connected_sample = gw_sample(args.gateway_pid);
            tcp_connected = procstat::tcp_counters();
            phase = GO;
            t_go = Some(Instant::now());
            let established = sum_field(&children, |c| c.connected.as_ref(), "established");
            if let Some(path) = &args.ready_file {
                let _ = std::fs::write(path, json!({"established": established}).to_string());
            }
            tell(&mut stdins, "go").await;
            stop_at = Some(if interrupted {
                tokio::time::Instant::now()
            } else {
                tokio::time::Instant::now() + Duration::from_secs_f64(args.duration.max(0.0))
            });
        }
        if phase == GO && stop_at.is_some_and(|s| tokio::time::Instant::now() >= s) {
            phase = STOP;
            t_stop = Some(Instant::now());
            tell(&mut stdins, "stop").await;
        }
        if phase == STOP && children.iter().all(|c| c.drained || c.gone) {
            // The end of the phase, then the sample: listing 15,000 descriptors takes some
            // 10-20 ms that are no part of it.
            t_drained = Some(Instant::now());
            end_sample = gw_sample(args.gateway_pid);
            phase = CLOSE;
            tell(&mut stdins, "close").await;
        }
        if phase == CLOSE && children.iter().all(|c| c.report.is_some() || c.gone) {
            break;
        }
        let deadline = stop_at.map(|stop_at| report_deadline(stop_at, drain, grace));
        if phase >= STOP && deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            // A worker that neither drained nor reported in time (a connection stuck in a
            // send, say) must not keep the run, and whoever waits on it, forever.
            timed_out = true;
            if t_drained.is_none() {
                t_drained = Some(Instant::now());
                end_sample = gw_sample(args.gateway_pid);
            }
            break;
        }

        let wake = match phase {
            CONNECT => connect_deadline,
            GO => stop_at.unwrap_or(far),
            _ => deadline.unwrap_or(far),
        };
        tokio::select! {
            msg = line_rx.recv() => {
                let Some((i, line)) = msg else { break };
                let Some(line) = line else {
                    children[i].gone = true;
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&line) else { continue };
                match v.get("ev").and_then(Value::as_str) {
                    Some("tick") => children[i].last_tick = v,
                    Some("connected") => children[i].connected = Some(v),
                    Some("drained") => children[i].drained = true,
                    Some("report") => children[i].report = Some(v),
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let t = t_start.elapsed().as_secs_f64();
                let replies = sum_field(&children, |c| Some(&c.last_tick), "replies");
                let pushes = sum_field(&children, |c| Some(&c.last_tick), "pushes");
                let dt = (t - prev_t).max(1e-3);
                // Not `gw_sample`: listing 15,000 descriptors four times a second would take
                // several percent of a core from the machine under test.
                let gw = args.gateway_pid.and_then(procstat::sample_cpu_and_memory);
                let cpu_pct = match (gw, prev_cpu) {
                    (Some(g), Some(pc)) => Some((g.cpu_us_since(&pc) / 1e4 / dt * 10.0).round() / 10.0),
                    _ => None,
                };
                prev_cpu = gw;
                timeline.push(json!({
                    "t": (t * 10.0).round() / 10.0,
                    "phase": PHASE_NAMES[phase as usize],
                    "open": sum_field(&children, |c| Some(&c.last_tick), "open"),
                    "replies_per_s": ((replies.saturating_sub(prev_replies)) as f64 / dt).round(),
                    "pushes_per_s": ((pushes.saturating_sub(prev_pushes)) as f64 / dt).round(),
                    "errors": sum_field(&children, |c| Some(&c.last_tick), "errors"),
                    "gw_rss_kib": gw.map(|g| g.rss_kib),
                    "gw_cpu_pct": cpu_pct,
                }));
                prev_replies = replies;
                prev_pushes = pushes;
                prev_t = t;
            }
            _ = term.recv() => { interrupted = true; stop_at = Some(stop_now(stop_at)); }
            _ = tokio::signal::ctrl_c() => { interrupted = true; stop_at = Some(stop_now(stop_at)); }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    for mut c in procs {
        // Past the report deadline, no more waiting: the workers are stopped at once.
        let ended = !timed_out
            && tokio::time::timeout(Duration::from_secs(5), c.wait())
                .await
                .is_ok();
        if !ended {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
    let own_cpu_us = children_cpu_us();

    // Aggregate.
    let mut latency = stats::new_hist();
    let mut send_lag = stats::new_hist();
    let mut connect_latency = stats::new_hist();
    let mut push_latency = stats::new_hist();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut connect_elapsed = 0.0f64;
    for c in &children {
        let Some(r) = &c.report else {
            let kind = if timed_out {
                "worker_timeout"
            } else {
                "worker_lost"
            };
            *errors.entry(kind.into()).or_default() += 1;
            continue;
        };
        stats::add_pairs(&mut latency, &r["latency"]);
        stats::add_pairs(&mut send_lag, &r["send_lag"]);
        stats::add_pairs(&mut connect_latency, &r["connect_latency"]);
        stats::add_pairs(&mut push_latency, &r["push_latency"]);
        if let Some(m) = r["errors"].as_object() {
            for (k, v) in m {
                *errors.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
            }
        }
        connect_elapsed = connect_elapsed.max(r["connect_elapsed_s"].as_f64().unwrap_or(0.0));
    }
    // A worker that did not report (lost, or stopped at the report deadline) still counts with
    // the totals of its last progress tick: what the parent has of it.
    let rep = |k: &str| sum_field(&children, |c| c.report.as_ref().or(Some(&c.last_tick)), k);
    let established = sum_field(&children, |c| c.connected.as_ref(), "established");
    let replies = rep("replies");
    let pushes = rep("pushes");
    let message_phase_s = seconds_between(t_go, t_drained);
    let send_window_s = seconds_between(t_go, t_stop);
    let errors_total: u64 = errors.values().sum();
    let per_s = |n: u64, s: f64| if s > 0.0 { (n as f64 / s).round() } else { 0.0 };
    let gateway = args.gateway_pid.map(|pid| {
        gateway_figures(
            pid,
            [before, connected_sample, end_sample],
            &timeline,
            established,
            replies + pushes,
            message_phase_s,
        )
    });
    let report = json!({
        "tool": "load",
        "mode": args.mode,
        // What `latency` is timed from ([`latency_from`]).
        "latency_from": latency_from(mode),
        "conns": args.conns,
        "processes": p,
        "payload": args.payload,
        "reply_bytes": args.reply_bytes,
        "binary": args.binary,
        "in_flight": args.in_flight,
        "interval_ms": args.interval_ms,
        "ramp": args.ramp,
        "duration_s": args.duration,
        "interrupted": interrupted,
        "timed_out": timed_out,
        "established": established,
        "connect_failures": rep("connect_failures"),
        "reconnects": rep("reconnects"),
        "connect_elapsed_s": (connect_elapsed * 1000.0).round() / 1000.0,
        "connects_per_s": per_s(established, connect_elapsed),
        "message_phase_s": (message_phase_s * 1000.0).round() / 1000.0,
        "send_window_s": (send_window_s * 1000.0).round() / 1000.0,
        "sent": rep("sent"),
        "replies": replies,
        "replies_per_s": per_s(replies, message_phase_s),
        "pushes": pushes,
        "latency": stats::summary(&latency),
        "send_lag": stats::summary(&send_lag),
        "connect_latency": stats::summary(&connect_latency),
        "push_latency": stats::summary(&push_latency),
        "errors_total": errors_total,
        "errors": errors,
        "tcp_connect_phase": procstat::counters_delta(&tcp_before, &tcp_connected),
        "tcp_whole_run": procstat::counters_delta(&tcp_before, &procstat::tcp_counters()),
        "gateway": gateway,
        "load_cpu_us": own_cpu_us,
        // Null with no message answered: nothing to divide by.
        "load_cpu_us_per_msg": (replies + pushes > 0).then(|| ((own_cpu_us as f64 / (replies + pushes) as f64) * 100.0).round() / 100.0),
        "timeline": timeline,
    });
    println!("{report}");
    if !args.quiet {
        eprintln!("{}", table(&report));
    }
    if !timed_out && children.iter().all(|c| c.report.is_some()) {
        0
    } else {
        1
    }
}

/// What a reply's latency is timed from in `mode`, as the report says it (`latency_from`): in
/// rate mode the message's scheduled tick, less the timer's own lateness ([`rate_timed_from`]);
/// in flood mode its send, a closed loop having no schedule; in idle mode there are no replies.
/// Until the report said so, rate mode timed from the send too (before the set of 2026-12-01
/// 20:28): `scenarios --tally` tells S4's runs apart by this, or by that date.
fn latency_from(mode: Mode) -> Option<&'static str> {
    match mode {
        Mode::Rate => Some("schedule"),
        Mode::Flood => Some("send"),
        Mode::Idle => None,
    }
}

/// A readable summary of a report.
fn table(r: &Value) -> String {
    let mut s = String::new();
    let mut row = |k: &str, v: String| s.push_str(&format!("  {k:<28} {v}\n"));
    let f = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(x) => x.clone(),
        x => x.to_string(),
    };
    row(
        "run",
        format!(
            "mode={} conns={} processes={} payload={}{}",
            f(&r["mode"]),
            f(&r["conns"]),
            f(&r["processes"]),
            f(&r["payload"]),
            if r["binary"] == true { " binary" } else { "" }
        ),
    );
    row(
        "connected",
        format!(
            "{} in {} s = {} conn/s",
            f(&r["established"]),
            f(&r["connect_elapsed_s"]),
            f(&r["connects_per_s"])
        ),
    );
    let lat = |l: &Value| {
        format!(
            "p50 {} p90 {} p99 {} p99.9 {} max {} ms (n={})",
            f(&l["p50_ms"]),
            f(&l["p90_ms"]),
            f(&l["p99_ms"]),
            f(&l["p999_ms"]),
            f(&l["max_ms"]),
            f(&l["count"])
        )
    };
    row("handshake latency", lat(&r["connect_latency"]));
    row(
        "messages",
        format!(
            "sent {} in {} s (go to stop); replies {} in {} s (go to drained) = {} replies/s",
            f(&r["sent"]),
            f(&r["send_window_s"]),
            f(&r["replies"]),
            f(&r["message_phase_s"]),
            f(&r["replies_per_s"])
        ),
    );
    row("reply latency", lat(&r["latency"]));
    let send_lag = &r["send_lag"];
    row(
        "send lag (rate mode)",
        format!(
            "p50 {} p99 {} max {} ms (n={})",
            f(&send_lag["p50_ms"]),
            f(&send_lag["p99_ms"]),
            f(&send_lag["max_ms"]),
            f(&send_lag["count"])
        ),
    );
    row("pushes received", f(&r["pushes"]));
    row("push delivery latency", lat(&r["push_latency"]));
    row("machine TCP, connect phase", f(&r["tcp_connect_phase"]));
    row(
        "load generator CPU",
        format!(
            "{} µs total, {} µs/msg",
            f(&r["load_cpu_us"]),
            f(&r["load_cpu_us_per_msg"])
        ),
    );
    row(
        "errors",
        format!("{} {}", f(&r["errors_total"]), f(&r["errors"])),
    );
    let g = &r["gateway"];
    if !g.is_null() {
        row(
            "gateway RSS KiB",
            format!(
                "before {} connected {} end {} peak {}",
                f(&g["before"]["rss_kib"]),
                f(&g["connected"]["rss_kib"]),
                f(&g["end"]["rss_kib"]),
                f(&g["rss_peak_kib"])
            ),
        );
        row(
            "gateway KiB/conn",
            format!(
                "{} when connected, {} at end",
                f(&g["kib_per_conn"]),
                f(&g["kib_per_conn_end"])
            ),
        );
        for unit in ["conn", "msg"] {
            row(
                &format!("gateway CPU µs/{unit}"),
                format!(
                    "{} (kernel {})",
                    f(&g[format!("cpu_us_per_{unit}").as_str()]),
                    f(&g[format!("sys_us_per_{unit}").as_str()])
                ),
            );
        }
        row("gateway CPU % (msg phase)", f(&g["cpu_pct_message_phase"]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_deadline_follows_the_stop_and_a_late_signal_does_not_move_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let stop_at = tokio::time::Instant::now();
            let deadline =
                report_deadline(stop_at, Duration::from_secs(5), Duration::from_secs(30));
            assert_eq!(deadline - stop_at, Duration::from_secs(35));
            tokio::time::sleep(Duration::from_millis(20)).await;
            // SIGTERM during the drain: the stop stays when it was.
            assert_eq!(stop_now(Some(stop_at)), stop_at);
            // SIGTERM before the planned stop: it comes now.
            let planned = tokio::time::Instant::now() + Duration::from_secs(60);
            let now = stop_now(Some(planned));
            assert!(now < planned && now >= stop_at);
            assert!(stop_now(None) >= stop_at);
        });
    }

    #[test]
    fn gateway_cpu_totals_come_from_the_clock_and_the_kernel_share_from_ticks() {
        let at = |cpu_us, sys_us, cpu_ns| procstat::Sample {
            cpu_us,
            sys_us,
            cpu_ns,
            ..Default::default()
        };
        // 10,000 connections took 0.523 s by the clock, 0.5 s (50 ticks) by /proc; 20,000
        // messages 1.0013 s by the clock, 1.01 s by /proc, over 2 s.
        let before = at(0, 0, Some(1_000_000));
        let connected = at(500_000, 300_000, Some(524_000_000));
        let end = at(1_510_000, 900_000, Some(1_525_300_000));
        let cpu = gateway_cpu(
            [Some(&before), Some(&connected), Some(&end)],
            10_000,
            20_000,
            2.0,
        );
        assert_eq!(cpu["cpu_us_per_conn"], 52.3, "{cpu}");
        assert_eq!(cpu["cpu_us_per_msg"], 50.07, "{cpu}");
        assert_eq!(cpu["sys_us_per_conn"], 30.0, "{cpu}");
        assert_eq!(cpu["sys_us_per_msg"], 30.0, "{cpu}");
        assert_eq!(cpu["cpu_pct_message_phase"], 50.07, "{cpu}");
        assert_eq!(cpu["cpu_from_clock"], true, "{cpu}");
        // The gateway gone before the last sample's clock read: that phase falls back to ticks.
        let end = at(1_510_000, 900_000, None);
        let cpu = gateway_cpu(
            [Some(&before), Some(&connected), Some(&end)],
            10_000,
            20_000,
            2.0,
        );
        assert_eq!(cpu["cpu_us_per_conn"], 52.3, "{cpu}");
        assert_eq!(cpu["cpu_us_per_msg"], 50.5, "{cpu}");
        assert_eq!(cpu["cpu_from_clock"], false, "{cpu}");
    }

    #[test]
    fn a_window_is_the_time_between_its_ends_and_zero_when_one_never_came() {
        let go = Instant::now();
        let stop = go + Duration::from_millis(60_000);
        assert_eq!(seconds_between(Some(go), Some(stop)), 60.0);
        assert_eq!(seconds_between(Some(go), None), 0.0, "never stopped");
        assert_eq!(seconds_between(None, Some(stop)), 0.0, "never started");
    }

    #[test]
    fn a_rate_mode_message_is_timed_from_its_schedule_less_the_timers_own_lateness() {
        let scheduled = Instant::now();
        let (us, ms) = (Duration::from_micros, Duration::from_millis);
        // Sent on time, or as late as tokio's whole-millisecond timer makes it: from the send.
        assert_eq!(rate_timed_from(scheduled, scheduled), scheduled);
        assert_eq!(
            rate_timed_from(scheduled, scheduled + us(600)),
            scheduled + us(600),
            "the timer's rounding is not the gateway's"
        );
        assert_eq!(
            rate_timed_from(scheduled, scheduled + ms(1)),
            scheduled + ms(1)
        );
        // Later than that: every bit of the wait beyond the timer's resolution counts, as
        // when the load generator stalls for 400 ms.
        assert_eq!(
            rate_timed_from(scheduled, scheduled + us(1_300)),
            scheduled + ms(1)
        );
        assert_eq!(
            rate_timed_from(scheduled, scheduled + ms(400)),
            scheduled + ms(1),
            "399 ms of the stall still counted"
        );
    }

    #[test]
    fn a_gateway_sample_not_taken_leaves_the_figures_that_need_it_null_not_zero() {
        let at = |rss_kib, cpu_us, sys_us| procstat::Sample {
            rss_kib,
            cpu_us,
            sys_us,
            cpu_ns: Some(cpu_us * 1000),
            ..Default::default()
        };
        let before = Some(at(8_000, 0, 0));
        let connected = Some(at(48_000, 500_000, 300_000));
        let end = Some(at(47_000, 1_500_000, 900_000));
        let timeline = [json!({"gw_rss_kib": 50_000}), json!({"gw_rss_kib": null})];
        let all = gateway_figures(
            7,
            [before, connected, end],
            &timeline,
            10_000,
            100_000,
            10.0,
        );
        assert_eq!(all["kib_per_conn"], 4.0, "{all}");
        assert_eq!(all["kib_per_conn_end"], 3.9, "{all}");
        assert_eq!(all["cpu_us_per_msg"], 10.0, "{all}");
        assert_eq!(all["rss_peak_kib"], 50_000, "{all}");
        // The gateway died before the end of the message phase: what needs the end sample is
        // missing, not 0 KiB and 0 µs (which would meet S1's and S3's targets).
        let died = gateway_figures(7, [before, connected, None], &timeline, 10_000, 0, 10.0);
        assert!(died["end"].is_null(), "{died}");
        for missing in [
            "kib_per_conn_end",
            "cpu_us_per_msg",
            "sys_us_per_msg",
            "cpu_pct_message_phase",
        ] {
            assert!(died[missing].is_null(), "{missing}: {died}");
        }
        assert_eq!(died["kib_per_conn"], 4.0, "{died}");
        assert_eq!(died["cpu_us_per_conn"], 50.0, "{died}");
        assert_eq!(died["sys_us_per_conn"], 30.0, "{died}");
        assert_eq!(died["cpu_from_clock"], true, "{died}");
        // Gone before it could be sampled at all.
        let never = gateway_figures(7, [None, None, None], &[], 10_000, 0, 10.0);
        for missing in [
            "before",
            "rss_peak_kib",
            "kib_per_conn",
            "kib_per_conn_end",
            "cpu_us_per_conn",
            "cpu_us_per_msg",
            "cpu_from_clock",
        ] {
            assert!(never[missing].is_null(), "{missing}: {never}");
        }
    }

    #[test]
    fn with_no_connection_or_no_reply_the_figures_per_connection_and_per_message_are_null() {
        let at = |rss_kib, cpu_us| procstat::Sample {
            rss_kib,
            cpu_us,
            sys_us: cpu_us / 2,
            cpu_ns: Some(cpu_us * 1000),
            ..Default::default()
        };
        let samples = [
            Some(at(8_000, 0)),
            Some(at(8_100, 10_000)),
            Some(at(8_200, 20_000)),
        ];
        // Every client refused: no connection to share the RSS or the CPU over, and no
        // message. A 0 here met S1's "≤ 4 KiB" and S3's "≤ 12 µs".
        let none = gateway_figures(7, samples, &[], 0, 0, 10.0);
        for missing in [
            "kib_per_conn",
            "kib_per_conn_end",
            "cpu_us_per_conn",
            "sys_us_per_conn",
            "cpu_us_per_msg",
            "sys_us_per_msg",
        ] {
            assert!(none[missing].is_null(), "{missing}: {none}");
        }
        assert_eq!(none["cpu_pct_message_phase"], 0.1, "{none}");
        // Connected, but not one reply: the figures per connection stand, those per message
        // do not.
        let silent = gateway_figures(7, samples, &[], 100, 0, 10.0);
        assert_eq!(silent["kib_per_conn"], 1.0, "{silent}");
        assert_eq!(silent["cpu_us_per_conn"], 100.0, "{silent}");
        assert!(silent["cpu_us_per_msg"].is_null(), "{silent}");
        assert!(silent["sys_us_per_msg"].is_null(), "{silent}");
        // A message phase that took no time has no share of a core.
        let instant = gateway_figures(7, samples, &[], 100, 10, 0.0);
        assert!(instant["cpu_pct_message_phase"].is_null(), "{instant}");
        assert_eq!(instant["cpu_us_per_msg"], 1000.0, "{instant}");
    }

    #[test]
    fn a_late_rate_ticker_catches_up_on_its_schedule() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let period = Duration::from_millis(30);
            let start = tokio::time::Instant::now();
            let mut ticker = rate_ticker(start, period);
            assert_eq!(ticker.tick().await, start);
            // The load generator stalls for 3.5 periods, as on a machine short of CPU.
            std::thread::sleep(period * 7 / 2);
            // The missed ticks come at once, each saying when it was due, and the schedule
            // goes on from there rather than from the late wake-up.
            for k in 1..=4 {
                assert_eq!(ticker.tick().await, start + period * k, "tick {k}");
            }
        });
    }
}
