//! `push`: drives ws2http's control API, `POST /<ClientId>` to many client ids.
//!
//! Each body is `push:<ns since the epoch>:<index of the client id>`; a `load --mode idle` holding the same client ids
//! times each message on arrival (its `push_latency`), so delivery latency is measured end to
//! end across processes with the shared wall clock, and each connection checks that its pushes
//! come newer each time (none twice, none out of order: see `Rounds` for why they must). This
//! tool reports pushes/s, the HTTP
//! status counts and the control API's own response latency. It speaks HTTP/1.1 or h2c, over
//! TCP or the gateway's `--control-unix-socket`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argh::FromArgs;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::OnceCell;
use ws2http_bench::{proto, stats, usage_error};

/// jemalloc: hyper's HTTP/2 client allocates several times per request, and on the bench's
/// shared two cores every µs `push` spends is one the gateway does not get. Counted with
/// callgrind over 30,000 pushes in S5b's setting, it takes 8.7% fewer instructions per push
/// than glibc's malloc (34,600 against 37,800).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A request sender on one connection: HTTP/1.1 (one request at a time) or HTTP/2 (shared).
enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

/// Where the control API listens: a TCP address, or a Unix socket (`--unix-socket`).
#[derive(Clone)]
enum Destination {
    Network(std::net::SocketAddr),
    UnixSocket(Arc<std::path::PathBuf>),
}

async fn tcp_connect(dst: std::net::SocketAddr) -> Result<TokioIo<TcpStream>, &'static str> {
    let tcp = TcpStream::connect(dst).await.map_err(|_| "connect_error")?;
    let _ = tcp.set_nodelay(true);
    Ok(TokioIo::new(tcp))
}

async fn unix_connect(path: &std::path::Path) -> Result<TokioIo<UnixStream>, &'static str> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|_| "connect_error")?;
    Ok(TokioIo::new(stream))
}

async fn handshake_http1<T>(io: T) -> Result<http1::SendRequest<Full<Bytes>>, &'static str>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (s, conn) = http1::handshake(io).await.map_err(|_| "http_error")?;
    tokio::spawn(conn);
    Ok(s)
}

async fn handshake_http2<T>(io: T) -> Result<http2::SendRequest<Full<Bytes>>, &'static str>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (s, conn) = http2::handshake(TokioExecutor::new(), io)
        .await
        .map_err(|_| "http_error")?;
    tokio::spawn(conn);
    Ok(s)
}

async fn connect_http2(dst: &Destination) -> Result<http2::SendRequest<Full<Bytes>>, &'static str> {
    match dst {
        Destination::Network(addr) => handshake_http2(tcp_connect(*addr).await?).await,
        Destination::UnixSocket(path) => handshake_http2(unix_connect(path).await?).await,
    }
}

impl Sender {
    async fn connect(dst: &Destination, http2: bool) -> Result<Sender, &'static str> {
        if http2 {
            return Ok(Sender::Http2(connect_http2(dst).await?));
        }
        Ok(Sender::Http1(match dst {
            Destination::Network(addr) => handshake_http1(tcp_connect(*addr).await?).await?,
            Destination::UnixSocket(path) => handshake_http1(unix_connect(path).await?).await?,
        }))
    }

    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<u16, &'static str> {
        let response = match self {
            Sender::Http1(s) => {
                s.ready().await.map_err(|_| "http_error")?;
                s.send_request(request).await
            }
            Sender::Http2(s) => {
                s.ready().await.map_err(|_| "http_error")?;
                s.send_request(request).await
            }
        }
        .map_err(|_| "http_error")?;
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        Ok(status)
    }
}

/// Hands out the indices of the pushes to the tasks, round by round: round `r` is the indices
/// `r * count .. (r + 1) * count`, one push per client id, and a task asking past it waits
/// until every task has finished round `r`.
///
/// So the pushes for one client id go out one after another, round `r + 1` once the POST of
/// round `r` was answered (or given up on), and reach the gateway, and the client's socket, in
/// the order of the send times they carry: `load` relies on it to catch a push delivered twice
/// (`proto::LastPush`). With one round, as the scenarios run, nothing waits.
struct Rounds {
    next: AtomicU64,
    count: u64,
    rounds: u64,
    /// Every task, at the end of each round but the last.
    barrier: tokio::sync::Barrier,
}

impl Rounds {
    /// Rounds of `count` pushes each, shared by `tasks` tasks.
    fn new(count: u64, rounds: u64, tasks: usize) -> Self {
        Rounds {
            next: AtomicU64::new(0),
            count,
            rounds,
            barrier: tokio::sync::Barrier::new(tasks),
        }
    }

    /// The next push for a task that is in round `*round` (0 at its start): its index, or
    /// `None` when all are taken. Every task must call it until `None`, or the others wait.
    async fn take(&self, round: &mut u64) -> Option<u64> {
        while *round < self.rounds {
            let end = (*round + 1) * self.count;
            if let Ok(i) = self
                .next
                .fetch_update(Relaxed, Relaxed, |n| (n < end).then_some(n + 1))
            {
                return Some(i);
            }
            *round += 1;
            if *round < self.rounds {
                self.barrier.wait().await;
            }
        }
        None
    }
}

/// `us` of CPU per push done, that is answered `200` in `statuses` (two decimals): what the
/// POSTs refused or failed cost is charged to the pushes done, as pushes/s counts only those.
/// Null when none was done.
fn per_push_done(us: u64, statuses: &BTreeMap<String, u64>) -> serde_json::Value {
    match statuses.get("200") {
        Some(&done) if done > 0 => json!((us as f64 / done as f64 * 100.0).round() / 100.0),
        _ => serde_json::Value::Null,
    }
}

/// CPU time (user, system; µs) this process has used so far.
fn own_cpu_us() -> (u64, u64) {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

#[derive(FromArgs)]
/// Push messages through ws2http's control API to many client ids and time it.
struct Args {
    /// control API base URL (default http://127.0.0.1:7002/)
    #[argh(option, default = "String::from(\"http://127.0.0.1:7002/\")")]
    control: String,
    /// client id prefix, as given to `load` (default b)
    #[argh(option, default = "String::from(\"b\")")]
    id_prefix: String,
    /// index of the first client id (default 0)
    #[argh(option, default = "0")]
    first: u64,
    /// number of client ids, <prefix><first> .. (default 100)
    #[argh(option, default = "100")]
    count: u64,
    /// pushes per client id (default 1)
    #[argh(option, default = "1")]
    rounds: u64,
    /// requests in flight at once (default 64)
    #[argh(option, default = "64")]
    concurrency: usize,
    /// speak HTTP/2 with prior knowledge (h2c): the requests in flight share --connections
    /// connections instead of one HTTP/1.1 connection each
    #[argh(switch)]
    http2: bool,
    /// HTTP/2 connections the requests in flight share, with --http2 (default 2)
    #[argh(option, default = "2")]
    connections: usize,
    /// connect to the control API's Unix socket at this path (`--control-unix-socket`);
    /// --control then gives only the Host header and the path
    #[argh(option)]
    unix_socket: Option<std::path::PathBuf>,
    /// bearer token for the control API, if it requires one
    #[argh(option)]
    token: Option<String>,
    /// per-request timeout in milliseconds (default 10000)
    #[argh(option, default = "10000")]
    timeout_ms: u64,
    /// do not print the table on stderr
    #[argh(switch)]
    quiet: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Args = argh::from_env();
    ws2http_bench::net::raise_nofile_limit();
    let base = if args.control.ends_with('/') {
        args.control.clone()
    } else {
        format!("{}/", args.control)
    };
    let authority = base
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| {
            usage_error(
                "push",
                &format!("--control must be an http:// URL (got {base})"),
            )
        })
        .to_string();
    let path_base = format!(
        "/{}",
        base.strip_prefix("http://").unwrap_or("")[authority.len()..].trim_start_matches('/')
    );
    let dst = match &args.unix_socket {
        Some(path) => Destination::UnixSocket(Arc::new(path.clone())),
        None => Destination::Network(
            tokio::net::lookup_host(&authority)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .unwrap_or_else(|| {
                    usage_error("push", &format!("--control: cannot resolve {authority}"))
                }),
        ),
    };
    let total = args.count * args.rounds;
    let rounds = Arc::new(Rounds::new(
        args.count,
        args.rounds,
        args.concurrency.max(1),
    ));
    let hist = Arc::new(Mutex::new(stats::new_hist()));
    let statuses: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let t0 = Instant::now();
    let cpu0 = own_cpu_us();
    // With --http2, task k starts on shared connection k % --connections, opened on first use.
    let shared_h2: Arc<Vec<OnceCell<http2::SendRequest<Full<Bytes>>>>> = Arc::new(
        (0..args.connections.max(1))
            .map(|_| OnceCell::new())
            .collect(),
    );
    let http2 = args.http2;
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..args.concurrency.max(1) {
        let (shared_h2, dst) = (shared_h2.clone(), dst.clone());
        let (rounds, hist, statuses) = (rounds.clone(), hist.clone(), statuses.clone());
        let (authority, path_base) = (authority.clone(), path_base.clone());
        let (prefix, token) = (args.id_prefix.clone(), args.token.clone());
        let (first, count, timeout) = (args.first, args.count, args.timeout_ms);
        tasks.spawn(async move {
            // HTTP/1.1: one keep-alive connection per task. HTTP/2: a shared connection. Either
            // way the task opens a connection of its own after an error.
            let mut sender: Option<Sender> = None;
            let mut use_shared = http2;
            let mut round = 0;
            while let Some(i) = rounds.take(&mut round).await {
                let id = first + i % count;
                let started = Instant::now();
                let outcome = tokio::time::timeout(Duration::from_millis(timeout), async {
                    if sender.as_ref().is_none_or(|s| s.is_closed()) {
                        sender = Some(if use_shared {
                            let slot = &shared_h2[k % shared_h2.len()];
                            let shared = slot.get_or_try_init(|| connect_http2(&dst)).await?;
                            Sender::Http2(shared.clone())
                        } else {
                            Sender::connect(&dst, http2).await?
                        });
                    }
                    let s = sender.as_mut().expect("connected");
                    // HTTP/2 carries the authority in the URI (`:authority`), HTTP/1.1 in `Host`.
                    let mut req = if http2 {
                        Request::post(format!("http://{authority}{path_base}{prefix}{id}"))
                    } else {
                        Request::post(format!("{path_base}{prefix}{id}"))
                            .header("host", authority.as_str())
                    };
                    if let Some(t) = &token {
                        req = req.header("authorization", format!("Bearer {t}"));
                    }
                    let req = req
                        .body(Full::new(Bytes::from(proto::push_payload(id))))
                        .expect("valid request");
                    s.send(req).await
                })
                .await;
                let key = match outcome {
                    Ok(Ok(status)) => {
                        stats::record(&mut hist.lock().unwrap(), started.elapsed());
                        status.to_string()
                    }
                    Ok(Err(kind)) => {
                        sender = None;
                        use_shared = false;
                        kind.to_string()
                    }
                    Err(_) => {
                        sender = None;
                        use_shared = false;
                        "timeout".to_string()
                    }
                };
                *statuses.lock().unwrap().entry(key).or_default() += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = own_cpu_us();
    let (user_us, sys_us) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    let statuses = statuses.lock().unwrap().clone();
    let ok = statuses.get("200").copied().unwrap_or(0);
    let report = json!({
        "tool": "push",
        "count": total,
        "concurrency": args.concurrency,
        "protocol": if http2 { "h2c" } else { "http/1.1" },
        "unix_socket": args.unix_socket.is_some(),
        "connections": if http2 { args.connections.max(1) } else { args.concurrency.max(1) },
        "ok": ok,
        "statuses": statuses,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        // Pushes the gateway took (200), not POSTs tried: a refused push is no push.
        "pushes_per_s": if elapsed > 0.0 { (ok as f64 / elapsed).round() } else { 0.0 },
        "http_latency": stats::summary(&hist.lock().unwrap()),
        "push_cpu_us_per_push": per_push_done(user_us + sys_us, &statuses),
        "push_sys_us_per_push": per_push_done(sys_us, &statuses),
    });
    println!("{report}");
    if !args.quiet {
        let l = &report["http_latency"];
        eprintln!(
            "  pushes {total} ({ok} ok) in {:.3} s = {} pushes/s answered 200\n  statuses {}\n  control API latency p50 {} p90 {} p99 {} p99.9 {} max {} ms\n  this tool's CPU {} µs per push (kernel {})",
            elapsed, report["pushes_per_s"], report["statuses"], l["p50_ms"], l["p90_ms"], l["p99_ms"], l["p999_ms"], l["max_ms"],
            report["push_cpu_us_per_push"], report["push_sys_us_per_push"]
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_cpu_is_per_push_answered_200_not_per_post_sent() {
        let statuses = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|&(k, n)| (k.to_owned(), n)).collect()
        };
        // Four POSTs, three answered 200: 400 µs is 133.33 µs per push done, not 100.
        let some_refused = statuses(&[("200", 3), ("timeout", 1)]);
        assert_eq!(per_push_done(400, &some_refused), json!(133.33));
        assert_eq!(per_push_done(400, &statuses(&[("200", 4)])), json!(100.0));
        assert!(per_push_done(400, &statuses(&[("503", 4)])).is_null());
        assert!(per_push_done(400, &statuses(&[])).is_null());
    }

    #[test]
    fn no_push_of_a_round_is_taken_before_every_push_of_the_one_before_is_done() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // 5 client ids, 3 rounds, 4 tasks: without the wait, a fast task would start round
            // 1 while a slow one still has a push of round 0.
            let (count, rounds, tasks) = (5, 3, 4);
            let shared = Arc::new(Rounds::new(count, rounds, tasks));
            // (index, taken at, done at) of every push.
            let log = Arc::new(Mutex::new(Vec::new()));
            let mut set = tokio::task::JoinSet::new();
            for k in 0..tasks as u64 {
                let (shared, log) = (shared.clone(), log.clone());
                set.spawn(async move {
                    let mut round = 0;
                    while let Some(i) = shared.take(&mut round).await {
                        let taken = tokio::time::Instant::now();
                        // Task 0 is slow.
                        let ms = if k == 0 { 30 } else { 2 };
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        log.lock()
                            .unwrap()
                            .push((i, taken, tokio::time::Instant::now()));
                    }
                });
            }
            while set.join_next().await.is_some() {}
            let log = log.lock().unwrap();
            let mut indices: Vec<u64> = log.iter().map(|&(i, _, _)| i).collect();
            indices.sort();
            assert_eq!(
                indices,
                (0..count * rounds).collect::<Vec<_>>(),
                "each once"
            );
            for &(i, taken, _) in log.iter() {
                for &(j, _, done) in log.iter() {
                    if j / count < i / count {
                        assert!(done <= taken, "push {i} taken before push {j} was done");
                    }
                }
            }
        });
    }
}
