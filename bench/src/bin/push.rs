//! `push`: drives ws2http's control API, `POST /<ClientId>` to many client ids.
//!
//! Each body is `push:<ns since the epoch>`; a `load --mode idle` holding the same client ids
//! times each message on arrival (its `push_latency`), so delivery latency is measured end to
//! end across processes with the shared wall clock. This tool reports pushes/s, the HTTP
//! status counts and the control API's own response latency.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argh::FromArgs;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;
use ws2http_bench::{proto, stats};

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
        .unwrap_or_else(|| panic!("--control must be an http:// URL (got {base})"))
        .to_string();
    let path_base = format!(
        "/{}",
        base.strip_prefix("http://").unwrap_or("")[authority.len()..].trim_start_matches('/')
    );
    let dst = tokio::net::lookup_host(&authority)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve {authority}"));
    let total = args.count * args.rounds;
    let next = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(stats::new_hist()));
    let statuses: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (next, hist, statuses) = (next.clone(), hist.clone(), statuses.clone());
        let (authority, path_base) = (authority.clone(), path_base.clone());
        let (prefix, token) = (args.id_prefix.clone(), args.token.clone());
        let (first, count, timeout) = (args.first, args.count.max(1), args.timeout_ms);
        tasks.spawn(async move {
            // One keep-alive connection per task, reopened after an error.
            let mut sender: Option<SendRequest<Full<Bytes>>> = None;
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= total {
                    break;
                }
                let id = first + i % count;
                let started = Instant::now();
                let outcome = tokio::time::timeout(Duration::from_millis(timeout), async {
                    if sender.as_ref().is_none_or(|s| s.is_closed()) {
                        let tcp = TcpStream::connect(dst).await.map_err(|_| "connect_error")?;
                        let _ = tcp.set_nodelay(true);
                        let (s, conn) = http1::handshake(TokioIo::new(tcp))
                            .await
                            .map_err(|_| "http_error")?;
                        tokio::spawn(conn);
                        sender = Some(s);
                    }
                    let s = sender.as_mut().expect("connected");
                    s.ready().await.map_err(|_| "http_error")?;
                    let mut req = Request::post(format!("{path_base}{prefix}{id}"))
                        .header("host", authority.as_str());
                    if let Some(t) = &token {
                        req = req.header("authorization", format!("Bearer {t}"));
                    }
                    let req = req
                        .body(Full::new(Bytes::from(proto::push_payload())))
                        .expect("valid request");
                    let resp = s.send_request(req).await.map_err(|_| "http_error")?;
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    Ok::<u16, &'static str>(status)
                })
                .await;
                let key = match outcome {
                    Ok(Ok(status)) => {
                        stats::record(&mut hist.lock().unwrap(), started.elapsed());
                        status.to_string()
                    }
                    Ok(Err(kind)) => {
                        sender = None;
                        kind.to_string()
                    }
                    Err(_) => {
                        sender = None;
                        "timeout".to_string()
                    }
                };
                *statuses.lock().unwrap().entry(key).or_default() += 1;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = t0.elapsed().as_secs_f64();
    let statuses = statuses.lock().unwrap().clone();
    let ok = statuses.get("200").copied().unwrap_or(0);
    let report = json!({
        "tool": "push",
        "count": total,
        "concurrency": args.concurrency,
        "ok": ok,
        "statuses": statuses,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "pushes_per_s": if elapsed > 0.0 { (total as f64 / elapsed).round() } else { 0.0 },
        "http_latency": stats::summary(&hist.lock().unwrap()),
    });
    println!("{report}");
    if !args.quiet {
        let l = &report["http_latency"];
        eprintln!(
            "  pushes {total} ({ok} ok) in {:.3} s = {} pushes/s\n  statuses {}\n  control API latency p50 {} p90 {} p99 {} p99.9 {} max {} ms",
            elapsed, report["pushes_per_s"], report["statuses"], l["p50_ms"], l["p90_ms"], l["p99_ms"], l["p999_ms"], l["max_ms"]
        );
    }
}
