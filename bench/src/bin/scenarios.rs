//! `scenarios`: runs the standard benchmark set S1–S5 against a freshly built release gateway,
//! with S3c, a flood with several messages in flight per connection, that checks the replies'
//! order (ours, not in issue 4's table).
//!
//! For every scenario it starts a new `mock-api` and a new `ws2http` on free loopback ports,
//! runs `load` (and `push` for S5) with the gateway's pid, stops both servers with SIGTERM, and
//! collects the reports. At the end it writes `bench/results/<date>[-quick].json`, a Markdown
//! table (`.md`) and two SVG plots (`-timeline.svg`: open connections, replies or pushes per
//! second and gateway RSS over time; `-latency.svg`: latency percentiles per scenario).
//!
//! `cargo run --release -p ws2http-bench --bin scenarios -- [--quick] [--only S1,S3]`
//!
//! With `--tally FILES...` it runs nothing and counts, over earlier results, how many runs met
//! each target and each of its criteria.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use argh::FromArgs;
use serde_json::{json, Value};
use ws2http_bench::{gauges, loopback, procstat, usage_error};

#[derive(FromArgs)]
/// Run the standard ws2http benchmark scenarios S1–S5 (and S3c) and write results and plots.
struct Args {
    /// small numbers (hundreds of connections, seconds) for a smoke check
    #[argh(switch)]
    quick: bool,
    /// comma-separated subset of scenarios to run, e.g. S1,S3 (default all)
    #[argh(option)]
    only: Option<String>,
    /// output directory (default <workspace>/bench/results)
    #[argh(option)]
    out: Option<PathBuf>,
    /// gateway binary to test (default: built with `cargo build --release -p ws2http`); `--tally`
    /// leaves such runs out
    #[argh(option)]
    gateway_bin: Option<PathBuf>,
    /// extra argument passed to the gateway (repeatable), e.g. `--gateway-arg --upstream-http2`
    /// (with a space: argh reads no `--option=value`)
    #[argh(option)]
    gateway_arg: Vec<String>,
    /// the gateway reaches the mock API (`--api-unix-socket`), and `push` the gateway's control
    /// API (`--control-unix-socket`), over Unix sockets instead of loopback TCP: an API on the
    /// gateway's machine
    #[argh(switch)]
    unix_sockets: bool,
    /// do not run `cargo build --release -p ws2http` first
    #[argh(switch)]
    no_build: bool,
    /// worker threads of the mock API (default 1)
    #[argh(option, default = "DEFAULT_MOCK_THREADS")]
    mock_threads: usize,
    /// label stored with the results (e.g. the allocator or a flag under test); `--tally` leaves
    /// labelled runs out
    #[argh(option, default = "String::new()")]
    label: String,
    /// run nothing: count, over the result files given, how many runs met each scenario's
    /// target and each criterion of it, with the least, median and most value measured
    #[argh(switch)]
    tally: bool,
    /// result files (`bench/results/*.json`) for --tally
    #[argh(positional)]
    files: Vec<PathBuf>,
}

/// One scenario of the standard set.
struct Scenario {
    id: &'static str,
    title: String,
    /// Arguments for `load` (without --url / --gateway-pid).
    load_args: Vec<String>,
    /// S5: number of client ids to push to.
    push_count: Option<u64>,
    /// S5: how `push` talks to the control API (beyond --control and --count).
    push_args: &'static [&'static str],
    /// Gateway flags for this scenario alone, after the runner's `--gateway-arg`s.
    gateway_args: &'static [&'static str],
    /// What the issue asks of the gateway here.
    target: &'static str,
    /// ws2api's figure on a machine like ours (from shared/ANCHORS.md).
    ws2api: &'static str,
}

/// How long `push` may run before the runner stops it (15,000 pushes take a second or two).
const PUSH_LIMIT: Duration = Duration::from_secs(120);
/// How long `load`, sent SIGTERM past its limit, has to report before it is killed: its drain
/// and its wait for its workers (`--report-grace`), with room to spare.
const LOAD_STOP_GRACE: Duration = Duration::from_secs(45);
/// Seconds `load` may take beyond its `--duration`: its connect phase (at most its default
/// `--connect-timeout`, 120 s), the drain (its default `--drain-ms`, 5 s), its own wait for its
/// workers' reports (`--report-grace`, 30 s), and a minute to spare.
const LOAD_LIMIT_BEYOND_DURATION_S: f64 = 120.0 + 5.0 + 30.0 + 60.0;
/// Worker threads of the mock API unless `--mock-threads` says otherwise: the standard set-up,
/// the only one `--tally` counts.
const DEFAULT_MOCK_THREADS: usize = 1;
/// Handshakes in flight per `load` process: two processes stay under the gateway's default
/// cap of 512 pending handshakes, above which it answers 503 by design.
const CONNECT_CONCURRENCY: usize = 224;
/// Seconds after the clients left at which S1's "RSS after leave" is sampled (full set).
const AFTER_LEAVE_SECS: u64 = 15;
/// Seconds S1 waits after its warm-up clients left before taking its baseline: past the API
/// pool's idle timeout (10 s), so that their API connection is closed again.
const WARM_UP_IDLE_SECS: u64 = 12;
/// Clients of S1's warm-up; each sends five messages over one second, then leaves.
const WARM_UP_CLIENTS: u64 = 4;
/// How often the gateway's API-pool gauges are read during a scenario.
const GAUGE_PERIOD: Duration = Duration::from_millis(250);
/// Round trips of the loopback measurement made before the scenarios (about 1.5 s).
const LOOPBACK_ROUND_TRIPS: u32 = 50_000;
/// S3a's floor of replies/s: 2.5× the top of ws2api's range with 100 connections (20.4k,
/// shared/ANCHORS.md). The top, not the bottom: "2.5× ws2api" must hold against ws2api's
/// best runs, not only its worst.
const S3A_REPLIES_FLOOR: f64 = 2.5 * 20_400.0;
/// S3b's floor of replies/s: 2.5× the top of ws2api's range with 1,000 connections (19.9k).
const S3B_REPLIES_FLOOR: f64 = 2.5 * 19_900.0;
/// Messages each S3c connection keeps in flight: more than one, so that replies can come back
/// out of order, and `load` checks they do not.
const S3C_IN_FLIGHT: u64 = 8;
/// Seconds of S3c's flood (the same with `--quick`).
const S3C_SECONDS: u64 = 5;

/// A scenario's own gateway flags (flag, value pairs), less those the runner's `--gateway-arg`s
/// already give: the gateway refuses a flag given twice, and the runner's choice stands.
fn scenario_flags<'a>(own: &[&'a str], given: &[String]) -> Vec<&'a str> {
    own.chunks(2)
        .filter(|pair| !given.iter().any(|g| g == pair[0]))
        .flatten()
        .copied()
        .collect()
}

fn a(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let (s1, s2, s3a, s3b, s3d, s3c, s4, s4d, s5) = if quick {
        (500, 500, 20, 100, 5, 20, 500, 5, 500)
    } else {
        (15_000, 10_000, 100, 1_000, 20, 100, 15_000, 60, 15_000)
    };
    let n = |x: u64| x.to_string();
    // `load` holding idle connections, split over two processes.
    let idle = |conns: u64, seconds: &str| {
        a(&[
            "--mode",
            "idle",
            "--processes",
            "2",
            "--duration",
            seconds,
            "--conns",
            &n(conns),
        ])
    };
    // S5 and S5b: the idle connections that `push` pushes to.
    let push_hold = idle(s5, "120");
    vec![
        Scenario {
            id: "S1",
            title: format!("idle: hold {s1} connections"),
            load_args: idle(s1, if quick { "3" } else { "10" }),
            push_count: None,
            push_args: &[],
            gateway_args: &[],
            target: "≤ 4 KiB RSS/conn; RSS back within 10% of baseline after they leave",
            ws2api: "25.1–26.3 KiB/conn",
        },
        Scenario {
            id: "S2",
            title: format!("connect storm: {s2} as fast as possible"),
            load_args: idle(s2, "1"),
            push_count: None,
            push_args: &[],
            gateway_args: &[],
            target: "≤ 40 µs gateway CPU/conn",
            ws2api: "7.6k–8.1k conn/s; 172–180 µs CPU/conn; handshake p99 78–86 ms",
        },
        Scenario {
            id: "S3a",
            title: format!("flood: {s3a} connections, closed loop, {s3d} s"),
            load_args: [
                a(&[
                    "--mode",
                    "flood",
                    "--in-flight",
                    "1",
                    "--processes",
                    "1",
                    "--conns",
                ]),
                vec![n(s3a), "--duration".into(), n(s3d)],
            ]
            .concat(),
            push_count: None,
            push_args: &[],
            gateway_args: &[],
            target: "≤ 12 µs CPU/msg; ≥ 2.5× the top of ws2api's replies/s (≥ 51k/s)",
            ws2api: "18.9k–20.4k replies/s; p99 12.5–17.7 ms; 71–74 µs CPU/msg",
        },
        Scenario {
            id: "S3b",
            title: format!("flood: {s3b} connections, closed loop, {s3d} s"),
            load_args: [
                a(&[
                    "--mode",
                    "flood",
                    "--in-flight",
                    "1",
                    "--processes",
                    "1",
                    "--conns",
                ]),
                vec![n(s3b), "--duration".into(), n(s3d)],
            ]
            .concat(),
            push_count: None,
            push_args: &[],
            gateway_args: &[],
            target: "≤ 12 µs CPU/msg; ≥ 2.5× the top of ws2api's replies/s (≥ 49.75k/s)",
            ws2api: "16.8k–19.9k replies/s; p99 120–141 ms; 74–88 µs CPU/msg",
        },
        // Ours, not in issue 4's table: with one message in flight (S3a, S3b) or one a second
        // (S4) a connection never has two replies to put in order, so `load`'s order check
        // cannot fire there. Here each connection keeps [`S3C_IN_FLIGHT`] outstanding.
        Scenario {
            id: "S3c",
            title: format!(
                "flood: {s3c} connections, {S3C_IN_FLIGHT} messages in flight each, gateway \
                 --pipeline 8, {S3C_SECONDS} s"
            ),
            load_args: [
                a(&["--mode", "flood", "--processes", "1", "--in-flight"]),
                vec![
                    n(S3C_IN_FLIGHT),
                    "--conns".into(),
                    n(s3c),
                    "--duration".into(),
                    n(S3C_SECONDS),
                ],
            ]
            .concat(),
            push_count: None,
            push_args: &[],
            // The gateway's own order keeping under test too: up to eight of a connection's
            // POSTs at the API at once, their answers put back in order (with the default of
            // one, the next message is read only once the reply before it is out).
            gateway_args: &["--pipeline", "8"],
            target: "0 errors, 0 replies out of order (ours, not issue 4's: replies/s and CPU/msg \
                     reported, not judged)",
            ws2api: "—",
        },
        Scenario {
            id: "S4",
            title: format!("{s4} connections × 1 msg/s, {s4d} s"),
            load_args: [
                a(&[
                    "--mode",
                    "rate",
                    "--interval-ms",
                    "1000",
                    "--processes",
                    "2",
                    "--conns",
                ]),
                vec![n(s4), "--duration".into(), n(s4d)],
            ]
            .concat(),
            push_count: None,
            push_args: &[],
            gateway_args: &[],
            target: "0 errors, p99 ≤ 10 ms",
            ws2api: "fails at 15k (fds run out); at 10k: p99 223–295 ms",
        },
        Scenario {
            id: "S5",
            title: format!("push: one POST per connection to {s5} connections"),
            load_args: push_hold.clone(),
            push_count: Some(s5),
            push_args: &["--concurrency", "64"],
            gateway_args: &[],
            target: "≥ 50k pushes/s, p99 delivery ≤ 20 ms",
            ws2api: "—",
        },
        Scenario {
            id: "S5b",
            title: format!(
                "push over h2c (2 connections): one POST per connection to {s5} connections"
            ),
            load_args: push_hold.clone(),
            push_count: Some(s5),
            push_args: &["--http2", "--connections", "2", "--concurrency", "128"],
            gateway_args: &[],
            target: "≥ 50k pushes/s, p99 delivery ≤ 20 ms",
            ws2api: "—",
        },
    ]
}

/// The 1-, 5- and 15-minute load averages: how busy the shared machine was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Spawns `command` with its stderr piped, waits (at most 15 s) for the line in which it says
/// where it listens (the first line containing `marker`), and returns the child with the port
/// after each of `keys` in that line; a child that says no such line, or one without those
/// ports, is stopped and the error says why. The child's stderr, that line included, is copied
/// to ours as it comes. Each process binds port 0 and reports its own ports, so no other process
/// can take a port between its choice and its bind (as with a port picked here and handed on).
fn spawn_listening<const N: usize>(
    command: &mut Command,
    marker: &'static str,
    keys: [&str; N],
) -> Result<(Child, [u16; N]), String> {
    let mut child = command
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let Some(stderr) = child.stderr.take() else {
        let _ = child.kill();
        return Err("no stderr".to_owned());
    };
    let (found, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            eprintln!("{line}");
            if line.contains(marker) {
                if let Some(found) = found.take() {
                    let _ = found.send(line);
                }
            }
        }
    });
    let Ok(line) = seen.recv_timeout(Duration::from_secs(15)) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("no \"{marker}\" line within 15 s"));
    };
    let mut ports = [0; N];
    for (port, key) in ports.iter_mut().zip(keys) {
        let Some(found) = port_after(&line, key) else {
            stop(child, Duration::from_secs(2));
            return Err(format!("no port after \"{key}\" in: {line}"));
        };
        *port = found;
    }
    Ok((child, ports))
}

/// The port of the first `127.0.0.1:PORT` after `key` in `line`.
fn port_after(line: &str, key: &str) -> Option<u16> {
    let rest = &line[line.find(key)? + key.len()..];
    let address = rest.split(|c: char| c.is_whitespace() || c == '"').next()?;
    address.rsplit_once(':')?.1.parse().ok()
}

/// GET `path` on 127.0.0.1:`port`; returns the status code.
fn http_get(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1)?.parse().ok()
}

fn wait_healthy(port: u16, path: &str, child: &mut Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("{what} exited early: {st}"));
        }
        if http_get(port, path).is_some_and(|s| s < 500) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("{what} not answering on port {port}"))
}

fn sigterm(child: &Child) {
    // SAFETY: sending a signal to our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// SIGTERM, then wait up to `grace`; kill if still alive. Returns (exit code, stdout).
fn stop(mut child: Child, grace: Duration) -> (Option<i32>, String) {
    sigterm(&child);
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                break;
            }
        }
    }
    match child.wait_with_output() {
        Ok(o) => (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        ),
        Err(_) => (None, String::new()),
    }
}

/// What a child run by [`output_within`] printed on stdout, and whether it had to be stopped.
#[derive(Debug)]
struct Finished {
    /// Everything the child wrote on stdout.
    stdout: String,
    /// Whether it ran past its limit and was stopped.
    timed_out: bool,
}

/// Runs `command` with its stdout piped (read as it comes, so a long report cannot block it)
/// for at most `limit`; past it, SIGTERM (on which `load` stops and reports), and SIGKILL
/// `grace` later. A child that does not end by itself must not hold the whole run.
fn output_within(
    command: &mut Command,
    limit: Duration,
    grace: Duration,
) -> std::io::Result<Finished> {
    let mut child = command.stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take();
    let (read, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut stdout) = stdout {
            let _ = stdout.read_to_end(&mut bytes);
        }
        let _ = read.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    let deadline = Instant::now() + limit;
    let mut timed_out = false;
    while child.try_wait()?.is_none() {
        if Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        timed_out = true;
        sigterm(&child);
        let killed_at = Instant::now() + grace;
        while child.try_wait()?.is_none() && Instant::now() < killed_at {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait()?;
        break;
    }
    // End of file once the child and whatever inherited its stdout are gone.
    let stdout = done
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    Ok(Finished { stdout, timed_out })
}

/// How long the runner lets `load` with `load_args` run: its `--duration` (10 s when not given,
/// as in `load`) and [`LOAD_LIMIT_BEYOND_DURATION_S`].
fn load_limit(load_args: &[String]) -> Duration {
    let duration = load_args
        .iter()
        .position(|arg| arg == "--duration")
        .and_then(|at| load_args.get(at + 1))
        .and_then(|seconds| seconds.parse::<f64>().ok())
        .unwrap_or(10.0);
    Duration::from_secs_f64(duration.max(0.0) + LOAD_LIMIT_BEYOND_DURATION_S)
}

fn last_json(s: &str) -> Value {
    s.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null)
}

/// The machine's busy CPU time per push over the push window (every process, all cores), and
/// the share of the cores left idle: what `push` and `load` cost beside the gateway.
fn machine_push_cpu(before: (u64, u64), after: (u64, u64), pushes: u64) -> Value {
    let busy = after.0.saturating_sub(before.0);
    let idle = after.1.saturating_sub(before.1);
    if pushes == 0 || busy + idle == 0 {
        return Value::Null;
    }
    json!({
        "busy_us_per_push": (busy as f64 / pushes as f64 * 100.0).round() / 100.0,
        "idle_share": (idle as f64 / (busy + idle) as f64 * 1000.0).round() / 1000.0,
    })
}

/// The gateway's CPU time per push between two samples taken around the push run, and the
/// kernel's part of it, in µs.
fn per_push_cpu(before: &procstat::Sample, after: &procstat::Sample, pushes: u64) -> Value {
    if pushes == 0 {
        return Value::Null;
    }
    let per = |total: f64| (total / pushes as f64 * 100.0).round() / 100.0;
    json!({
        // The total from the gateway's CPU-time clock when both samples read it, else ticks;
        // the kernel's share from ticks.
        "cpu_us_per_push": per(after.cpu_us_since(before)),
        "sys_us_per_push": per(after.sys_us.saturating_sub(before.sys_us) as f64),
        "cpu_from_clock": after.cpu_clock_since(before),
    })
}

/// The CPU the pushes cost, per push done: the gateway's ([`per_push_cpu`], from its samples
/// before and after `push` ran) and the whole machine's ([`machine_push_cpu`]), each null when
/// a sample is missing. A push done is one the gateway answered `200` (`push`'s `ok`): a POST
/// refused or timed out delivered nothing, and what it cost is charged to the pushes done, as
/// pushes/s counts only those.
fn push_window_cpu(
    gateway: [Option<procstat::Sample>; 2],
    machine: [Option<(u64, u64)>; 2],
    push_report: &Value,
) -> (Value, Value) {
    let done = push_report["ok"].as_u64().unwrap_or(0);
    let gateway = match gateway {
        [Some(before), Some(after)] => per_push_cpu(&before, &after, done),
        _ => Value::Null,
    };
    let machine = match machine {
        [Some(before), Some(after)] => machine_push_cpu(before, after, done),
        _ => Value::Null,
    };
    (gateway, machine)
}

/// Whether scenario `id` is in `--only` (comma-separated prefixes, any case: `S3` picks S3a and
/// S3b, `s3a` only S3a); every scenario is when `--only` is not given.
fn selected(id: &str, only: Option<&str>) -> bool {
    let id = id.to_uppercase();
    only.is_none_or(|only| {
        only.split(',')
            .map(|prefix| prefix.trim().to_uppercase())
            .any(|prefix| !prefix.is_empty() && id.starts_with(&prefix))
    })
}

/// `base`, or `base-2`, `base-3`, … : the first whose `.json` is not in `dir` yet, so that two
/// runs started in the same minute both keep their results.
fn free_stem(dir: &Path, base: &str) -> String {
    let mut stem = base.to_owned();
    let mut n = 1;
    while dir.join(format!("{stem}.json")).exists() {
        n += 1;
        stem = format!("{base}-{n}");
    }
    stem
}

/// UTC date-time as `YYYY-MM-DDTHHMMZ`.
fn utc_stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// A few clients connect to the gateway on `port`, exchange messages and leave; then the
/// gateway is left alone for `idle_secs`. Returns what `load` reported of them (connections,
/// replies, errors; `{"error": ...}` if it could not run), kept in the scenario's JSON so that a
/// baseline taken after a failed warm-up can be told apart.
fn warm_up(bins: &Bins, port: u16, idle_secs: u64) -> Value {
    eprintln!("--- warm-up: {WARM_UP_CLIENTS} clients, then {idle_secs} s idle");
    let load_args = a(&["--mode", "rate", "--interval-ms", "200", "--duration", "1"]);
    let out = output_within(
        Command::new(&bins.load)
            .args(["--url", &format!("ws://127.0.0.1:{port}/")])
            .args(["--conns", &WARM_UP_CLIENTS.to_string()])
            .args(&load_args)
            .args(["--id-prefix", "warm", "--quiet"])
            .stderr(Stdio::inherit()),
        load_limit(&load_args),
        LOAD_STOP_GRACE,
    );
    let summary = match out {
        Ok(Finished {
            timed_out: true, ..
        }) => json!({"error": "load: did not finish in time, stopped"}),
        Ok(Finished { stdout, .. }) => {
            let report = last_json(&stdout);
            json!({
                "clients": WARM_UP_CLIENTS,
                "established": report["established"],
                // The API saw these besides the scenario's own (`warm_up_traffic`).
                "sent": report["sent"],
                "replies": report["replies"],
                "errors_total": report["errors_total"],
                "idle_secs": idle_secs,
            })
        }
        Err(e) => json!({"error": format!("load: {e}")}),
    };
    if summary["errors_total"].as_u64() != Some(0) {
        eprintln!("warm-up did not go cleanly: {summary}");
    }
    std::thread::sleep(Duration::from_secs(idle_secs));
    summary
}

struct Bins {
    gateway: PathBuf,
    mock: PathBuf,
    load: PathBuf,
    push: PathBuf,
}

fn run_scenario(sc: &Scenario, bins: &Bins, args: &Args) -> Value {
    eprintln!("\n=== {} — {}", sc.id, sc.title);
    let loadavg_before = loadavg();
    let socket_path = |what: &str| {
        std::env::temp_dir().join(format!("ws2http-bench-{what}-{}.sock", std::process::id()))
    };
    let api_socket = args.unix_sockets.then(|| socket_path("api"));
    let control_socket = args.unix_sockets.then(|| socket_path("control"));
    let mut mock_cmd = Command::new(&bins.mock);
    mock_cmd
        .args(["--listen", "127.0.0.1:0"])
        .args(["--threads", &args.mock_threads.to_string()])
        .stdout(Stdio::piped());
    if let Some(path) = &api_socket {
        mock_cmd.arg("--listen-unix").arg(path);
    }
    let started = spawn_listening(&mut mock_cmd, "mock-api: listening on", ["listening on "]);
    let (mut mock, [mport]) = match started {
        Ok(started) => started,
        Err(e) => return json!({"id": sc.id, "error": format!("mock-api: {e}")}),
    };
    if let Err(e) = wait_healthy(mport, "/__mock/stats", &mut mock, "mock-api") {
        stop(mock, Duration::from_secs(2));
        return json!({"id": sc.id, "error": e});
    }
    let mut gateway_cmd = Command::new(&bins.gateway);
    gateway_cmd
        .args(["--listen", "127.0.0.1:0"])
        .args(["--control-listen", "127.0.0.1:0"])
        .args(["--api", &format!("http://127.0.0.1:{mport}/")])
        .args(&args.gateway_arg)
        .args(scenario_flags(sc.gateway_args, &args.gateway_arg))
        .stdout(Stdio::null());
    if let (Some(api), Some(control)) = (&api_socket, &control_socket) {
        gateway_cmd.arg("--api-unix-socket").arg(api);
        gateway_cmd.arg("--control-unix-socket").arg(control);
    }
    let started = spawn_listening(
        &mut gateway_cmd,
        "ws2http listening:",
        ["public=", "control="],
    );
    let (mut gw, [gport, cport]) = match started {
        Ok(started) => started,
        Err(e) => {
            stop(mock, Duration::from_secs(2));
            return json!({"id": sc.id, "error": format!("gateway: {e}")});
        }
    };
    if let Err(e) = wait_healthy(cport, "/healthz", &mut gw, "gateway") {
        stop(gw, Duration::from_secs(2));
        stop(mock, Duration::from_secs(2));
        return json!({"id": sc.id, "error": e});
    }
    let gpid = gw.id();
    std::thread::sleep(Duration::from_millis(500));
    let cold_baseline = procstat::sample(gpid);
    // S1 judges what the crowd leaves behind, so its baseline is the gateway once it has served
    // a few clients and they have gone (with its warm API connection): the code and the stack
    // depth any first connection brings in are then part of it. The start-up figure stays in the
    // JSON and the table beside it.
    let (baseline, warm_up_report) = if sc.id == "S1" {
        let report = warm_up(bins, gport, if args.quick { 2 } else { WARM_UP_IDLE_SECS });
        (procstat::sample(gpid), report)
    } else {
        (cold_baseline, Value::Null)
    };

    let gauges = gauges::Poller::start(cport, GAUGE_PERIOD);
    let mut load_cmd = Command::new(&bins.load);
    load_cmd
        .args(&sc.load_args)
        .args(["--url", &format!("ws://127.0.0.1:{gport}/")])
        .args(["--gateway-pid", &gpid.to_string()])
        .args(["--connect-concurrency", &CONNECT_CONCURRENCY.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut push_report = Value::Null;
    // The children that did not finish in time and were stopped.
    let mut stopped: Vec<String> = Vec::new();
    let mut push_cpu = Value::Null;
    let mut machine_cpu = Value::Null;
    let load_out = if let Some(count) = sc.push_count {
        let ready =
            std::env::temp_dir().join(format!("ws2http-bench-ready-{}", std::process::id()));
        let _ = std::fs::remove_file(&ready);
        load_cmd.arg("--ready-file").arg(&ready);
        match load_cmd.spawn() {
            Ok(load) => {
                let deadline = Instant::now() + Duration::from_secs(150);
                while !ready.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(100));
                }
                std::thread::sleep(Duration::from_millis(500));
                eprintln!("--- push to {count} client ids");
                let before_push = procstat::sample(gpid);
                let machine_before = procstat::machine_cpu();
                let mut push_cmd = Command::new(&bins.push);
                push_cmd
                    .args(["--control", &format!("http://127.0.0.1:{cport}/")])
                    .args(["--count", &count.to_string()])
                    .args(sc.push_args)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::inherit());
                if let Some(path) = &control_socket {
                    push_cmd.arg("--unix-socket").arg(path);
                }
                match output_within(&mut push_cmd, PUSH_LIMIT, Duration::from_secs(5)) {
                    Ok(Finished { stdout, timed_out }) => {
                        push_report = last_json(&stdout);
                        if timed_out {
                            stopped.push(format!("push (after {} s)", PUSH_LIMIT.as_secs()));
                        }
                    }
                    Err(e) => eprintln!("push: {e}"),
                }
                // The whole machine's CPU while the pushes ran (the gateway, `push` and `load`
                // share its cores), read before the gateway's own sample, whose listing of
                // 15,000 descriptors would otherwise count as the machine's.
                let machine_after = procstat::machine_cpu();
                // The gateway's CPU while the pushes ran: taking each POST and writing its frame.
                let after_push = procstat::sample(gpid);
                (push_cpu, machine_cpu) = push_window_cpu(
                    [before_push, after_push],
                    [machine_before, machine_after],
                    &push_report,
                );
                // Let the last deliveries land, then end the hold.
                std::thread::sleep(Duration::from_secs(1));
                let _ = std::fs::remove_file(&ready);
                stop(load, Duration::from_secs(60)).1
            }
            Err(e) => format!("{{\"error\":\"load: {e}\"}}"),
        }
    } else {
        let limit = load_limit(&sc.load_args);
        match output_within(&mut load_cmd, limit, LOAD_STOP_GRACE) {
            Ok(Finished { stdout, timed_out }) => {
                if timed_out {
                    stopped.push(format!("load (after {} s)", limit.as_secs()));
                }
                stdout
            }
            Err(e) => format!("{{\"error\":\"load: {e}\"}}"),
        }
    };
    let load_report = last_json(&load_out);
    let gateway_gauges = gauges.finish();

    // After the clients have left: give the allocator a moment, then sample. S1's figure is
    // taken again after the API pool's warm connections' idle timeout (10 s), when nothing
    // the connections caused is left; its first sample stays in the JSON.
    std::thread::sleep(Duration::from_secs(if args.quick { 2 } else { 5 }));
    let mut after_leave = procstat::sample(gpid);
    let mut soon_after_leave = None;
    if !args.quick && sc.id == "S1" {
        std::thread::sleep(Duration::from_secs(AFTER_LEAVE_SECS - 5));
        soon_after_leave = std::mem::replace(&mut after_leave, procstat::sample(gpid));
    }
    let (gw_exit, _) = stop(gw, Duration::from_secs(20));
    let (_, mock_out) = stop(mock, Duration::from_secs(5));
    let mut load_slim = load_report.clone();
    let timeline = load_slim
        .as_object_mut()
        .and_then(|o| o.remove("timeline"))
        .unwrap_or(Value::Null);
    let mut result = json!({
        "id": sc.id,
        "title": sc.title,
        "target": sc.target,
        "ws2api": sc.ws2api,
        "load_args": sc.load_args,
        "scenario_gateway_args": sc.gateway_args,
        "gateway_cold_baseline": cold_baseline.map(procstat::Sample::to_json),
        "warm_up": warm_up_report,
        "gateway_gauges": gateway_gauges,
        "gateway_baseline": baseline.map(procstat::Sample::to_json),
        "gateway_push_cpu": push_cpu,
        "machine_push_cpu": machine_cpu,
        "gateway_5s_after_leave": soon_after_leave.map(procstat::Sample::to_json),
        "gateway_after_leave": after_leave.map(procstat::Sample::to_json),
        "gateway_exit_code": gw_exit,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg(),
        "mock_counters": last_json(&mock_out),
        "load": load_slim,
        "push": push_report,
        "timeline": timeline,
    });
    if sc.id == "S2" {
        result["gateway_whole_life_cpu_us_per_conn"] = json!(whole_life_cpu_us_per_conn(&result));
    }
    if !stopped.is_empty() {
        // Its figures stay in the JSON, but a run cut short is not judged ([`criteria`]).
        result["error"] = json!(format!(
            "did not finish in time, stopped: {}",
            stopped.join(", ")
        ));
    }
    result
}

/// S2's gateway CPU per connection over the connections' whole life, µs: from `load`'s sample
/// before they connected to the one after they left (`gateway_after_leave`), so the upgrade and
/// its GET, the DELETE and the close, over the connections established. Informational: the
/// target is about the connect phase (`cpu_us_per_conn`). From the CPU-time clock when both
/// samples read it (`cpu_ns`), else from the clock ticks (`cpu_us`); `None` when a figure is
/// missing.
fn whole_life_cpu_us_per_conn(r: &Value) -> Option<f64> {
    let before = &r["load"]["gateway"]["before"];
    let after = &r["gateway_after_leave"];
    let conns = r["load"]["established"].as_f64().filter(|&n| n > 0.0)?;
    let used_us = match (after["cpu_ns"].as_f64(), before["cpu_ns"].as_f64()) {
        (Some(after), Some(before)) => (after - before) / 1000.0,
        _ => after["cpu_us"].as_f64()? - before["cpu_us"].as_f64()?,
    };
    Some((used_us / conns * 100.0).round() / 100.0)
}

/// A share (0.25) as a whole percentage (`25%`), `—` when missing.
fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "—".into(), |x| format!("{:.0}%", x * 100.0))
}

fn f(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            if x.fract() == 0.0 {
                format!("{}", x as i64)
            } else {
                format!("{x:.2}")
            }
        }
        Value::String(s) => s.clone(),
        x => x.to_string(),
    }
}

/// The figures that matter for a scenario, as one Markdown cell.
fn measured(r: &Value) -> String {
    let l = &r["load"];
    let g = &l["gateway"];
    let lat = |h: &Value| {
        format!(
            "p50 {} / p99 {} / p99.9 {} / max {} ms",
            f(&h["p50_ms"]),
            f(&h["p99_ms"]),
            f(&h["p999_ms"]),
            f(&h["max_ms"])
        )
    };
    let m = &r["mock_counters"];
    let errs = format!(
        "errors {}; API saw GET/POST/DELETE {}/{}/{}",
        f(&l["errors_total"]),
        f(&m["get"]),
        f(&m["post"]),
        f(&m["delete"])
    );
    match r["id"].as_str().unwrap_or("") {
        "S1" => {
            let base = r["gateway_baseline"]["rss_kib"].as_f64().unwrap_or(0.0);
            let cold = r["gateway_cold_baseline"]["rss_kib"].as_f64().unwrap_or(0.0);
            let after = r["gateway_after_leave"]["rss_kib"].as_f64().unwrap_or(0.0);
            format!(
                "{} conns; **{} KiB/conn** after the hold ({} right after connecting); RSS {} → {} → {} MiB (baseline after a warm-up → held → after leave, {:+.0}%; {:+.0}% over the {} MiB at start; of the growth, anonymous {:+.1} MiB, file-backed {:+.1} MiB); {}",
                f(&l["established"]),
                f(&g["kib_per_conn_end"]),
                f(&g["kib_per_conn"]),
                mib(&r["gateway_baseline"]["rss_kib"]),
                mib(&g["end"]["rss_kib"]),
                mib(&r["gateway_after_leave"]["rss_kib"]),
                percent_over(after, base),
                percent_over(after, cold),
                mib(&r["gateway_cold_baseline"]["rss_kib"]),
                growth_mib(r, "rss_anon_kib"),
                growth_mib(r, "rss_file_kib"),
                errs
            )
        }
        "S2" => format!(
            "{} conns at **{} conn/s**; **{} µs CPU/conn** (kernel {}; whole life, with the DELETE and the close, {} µs/conn); handshake {}; listen-queue overflows {}, SYN retransmits {} (machine-wide); {}",
            f(&l["established"]),
            f(&l["connects_per_s"]),
            f(&g["cpu_us_per_conn"]),
            f(&g["sys_us_per_conn"]),
            f(&json!(whole_life_cpu_us_per_conn(r))),
            lat(&l["connect_latency"]),
            f(&l["tcp_connect_phase"]["ListenOverflows"]),
            f(&l["tcp_connect_phase"]["TCPSynRetrans"]),
            errs
        ),
        "S3a" | "S3b" | "S3c" | "S4" => format!(
            "**{} replies/s**{}; {}; **{} µs CPU/msg** (kernel {}; {}% CPU); API connections up to {}, API concurrency limit up to {}, requests waiting for one up to {}; {}",
            f(&l["replies_per_s"]),
            offered_rate(r["id"].as_str().unwrap_or(""), l),
            lat(&l["latency"]),
            f(&g["cpu_us_per_msg"]),
            f(&g["sys_us_per_msg"]),
            f(&g["cpu_pct_message_phase"]),
            f(&r["gateway_gauges"]["max"]["upstream_connections_open"]),
            f(&r["gateway_gauges"]["max"]["upstream_concurrency_limit"]),
            f(&r["gateway_gauges"]["max"]["upstream_requests_waiting"]),
            errs
        ),
        "S5" | "S5b" => format!(
            "**{} pushes/s** ({} of {} delivered); delivery {}; {} µs CPU/push (kernel {}); `push` {} µs/push, the machine {} µs/push busy, {} idle; {} KiB/conn; {}",
            f(&r["push"]["pushes_per_s"]),
            f(&l["pushes"]),
            f(&r["push"]["count"]),
            lat(&l["push_latency"]),
            f(&r["gateway_push_cpu"]["cpu_us_per_push"]),
            f(&r["gateway_push_cpu"]["sys_us_per_push"]),
            f(&r["push"]["push_cpu_us_per_push"]),
            f(&r["machine_push_cpu"]["busy_us_per_push"]),
            percent(&r["machine_push_cpu"]["idle_share"]),
            f(&g["kib_per_conn"]),
            errs
        ),
        _ => String::new(),
    }
}

/// For a fixed-rate scenario (S4), what the clients managed to send against what was asked: a
/// load generator short of CPU sends late (its ticks slip), which lowers the load the gateway saw.
fn offered_rate(name: &str, load: &Value) -> String {
    match sent_and_asked(load) {
        Some((sent, asked)) if name == "S4" => format!(
            " (clients sent {:.0} msgs/s of the {:.0} asked, {:.1}%)",
            sent,
            asked,
            sent / asked * 100.0
        ),
        _ => String::new(),
    }
}

/// Messages per second a fixed-rate load sent over its send window (`send_window_s`: from go to
/// the stop, while its clients were sending), and the rate it was asked for. A result from
/// before `load` reported the window is taken over its message phase, as it was judged then
/// (`message_phase_s`: the stop, the wait for the replies in flight and the end sample
/// included, which made a run that sent every message look 0.05-0.08% short).
fn sent_and_asked(load: &Value) -> Option<(f64, f64)> {
    let seconds = load["send_window_s"]
        .as_f64()
        .or_else(|| load["message_phase_s"].as_f64())?;
    let interval_ms = load["interval_ms"].as_f64()?;
    if seconds <= 0.0 || interval_ms <= 0.0 {
        return None;
    }
    let asked = load["conns"].as_f64()? * 1000.0 / interval_ms;
    Some((load["sent"].as_f64()? / seconds, asked))
}

/// How far `value` is above `base`, in percent (0 without a base).
fn percent_over(value: f64, base: f64) -> f64 {
    if base > 0.0 {
        (value - base) / base * 100.0
    } else {
        0.0
    }
}

/// S1: how much `field` (`rss_anon_kib`, `rss_file_kib`) grew from the baseline to after the
/// clients left, in MiB.
fn growth_mib(r: &Value, field: &str) -> f64 {
    let at = |sample: &str| r[sample][field].as_f64().unwrap_or(0.0);
    (at("gateway_after_leave") - at("gateway_baseline")) / 1024.0
}

fn mib(v: &Value) -> String {
    v.as_f64()
        .map(|k| format!("{:.1}", k / 1024.0))
        .unwrap_or_else(|| "—".into())
}

/// One criterion of a target: a measured value against a limit.
struct Check {
    what: &'static str,
    value: f64,
    limit: f64,
    /// True when the value must be at most the limit, false when at least.
    at_most: bool,
    /// What a missed criterion's figures are made of, said after it (empty: nothing to add).
    detail: String,
    /// How far the true figure may lie from `value`, either way: 0 for a figure measured
    /// exactly, the rounding of clock ticks for a CPU figure taken from them
    /// ([`tick_rounding`]).
    margin: f64,
}

/// How a criterion, or a whole target, stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Met,
    Missed,
    /// The value is within its [`Check::margin`] of the limit: the figure cannot tell.
    Undecided,
}

impl Check {
    /// Met when the value meets the limit however far off it is (the margin taken against it,
    /// to the limit included), missed when it is beyond the limit however far off (the margin
    /// taken for it: a margin is a bound the error stays under, so a value a whole margin past
    /// the limit is past it), undecided in between. With no margin, met or missed.
    fn standing(&self) -> Standing {
        let (best, worst) = if self.at_most {
            (self.value - self.margin, self.value + self.margin)
        } else {
            (self.value + self.margin, self.value - self.margin)
        };
        let meets = |x: f64| {
            if self.at_most {
                x <= self.limit
            } else {
                x >= self.limit
            }
        };
        let beyond = |x: f64| {
            if self.at_most {
                x >= self.limit
            } else {
                x <= self.limit
            }
        };
        if meets(worst) {
            Standing::Met
        } else if beyond(best) {
            Standing::Missed
        } else {
            Standing::Undecided
        }
    }

    /// The value against the limit, e.g. `µs CPU/conn 40 vs ≤ 40 (from 10-ms clock ticks,
    /// ± 2)`: what an undecided criterion is said as.
    fn against(&self) -> String {
        let detail = if self.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.detail)
        };
        format!(
            "{} {} vs {} {}{detail}",
            self.what,
            trim(self.value),
            if self.at_most { "≤" } else { "≥" },
            trim(self.limit)
        )
    }

    /// How far off a missed criterion is, e.g. `30.4 KiB/conn vs ≤ 4 (7.6×)`, and its
    /// [`Check::detail`] if it has one.
    fn shortfall(&self) -> String {
        let ratio = if self.at_most {
            self.value / self.limit.max(f64::MIN_POSITIVE)
        } else {
            self.limit / self.value.max(f64::MIN_POSITIVE)
        };
        let ratio = if ratio.is_finite() && self.limit > 0.0 {
            format!(" ({ratio:.1}× off)")
        } else {
            String::new()
        };
        let detail = if self.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.detail)
        };
        format!(
            "{} {} vs {} {}{ratio}{detail}",
            self.what,
            trim(self.value),
            if self.at_most { "≤" } else { "≥" },
            trim(self.limit)
        )
    }
}

fn trim(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Microseconds in a clock tick of `/proc/PID/stat` on the machine of the stored runs (`CLK_TCK`
/// 100), from which the gateway's CPU figures came before the runner read its CPU-time clock.
const CLOCK_TICK_US: f64 = 10_000.0;

/// `criterion`, a gateway CPU figure per connection or per message of scenario `r`, with the
/// rounding of its clock ticks as its margin when it came from them: unless `load` says it read
/// the CPU-time clock (`cpu_from_clock`; the runs before 2026-12-01 20:28 did not), the total
/// is a difference of two samples of `utime + stime`, each of the two cut down to whole ticks
/// (so each sample is short by less than 2 ticks), off by less than 2 ticks either way, spread
/// over the `count` it is divided by (connections established, messages answered). 2 ticks
/// over 10,000 connections is 2 µs: S2's "40 µs" from ticks was 38-42, neither met nor missed.
/// With no count to divide by, no bound: never met or missed.
fn tick_rounding(
    r: &Value,
    count: Option<f64>,
    criterion: Result<Check, Unrecorded>,
) -> Result<Check, Unrecorded> {
    if r["load"]["gateway"]["cpu_from_clock"].as_bool() == Some(true) {
        return criterion;
    }
    criterion.map(|check| {
        let margin = match count {
            Some(count) if count > 0.0 => 2.0 * CLOCK_TICK_US / count,
            _ => f64::INFINITY,
        };
        Check {
            detail: format!("from 10-ms clock ticks, ± {}", trim(margin)),
            margin,
            ..check
        }
    })
}

/// The criteria of a scenario's target with the measured values, to judge it by: all of them;
/// or, when a figure is missing, those recorded if one of them is missed (a figure missing
/// cannot make up for a miss: a run whose clients never connected has no figure per
/// connection, and is missed all the same); else `None`, the scenario cannot be judged.
fn checks(r: &Value, quick: bool) -> Option<Vec<Check>> {
    let all = criteria(r, quick)?;
    let complete = all.iter().all(Result::is_ok);
    let recorded: Vec<Check> = all.into_iter().filter_map(Result::ok).collect();
    (complete || recorded.iter().any(|c| c.standing() == Standing::Missed)).then_some(recorded)
}

/// A criterion of a target whose figure a run did not record (an older bench wrote fewer).
struct Unrecorded {
    what: &'static str,
    limit: Option<f64>,
    at_most: bool,
}

/// Each criterion of a scenario's target, measured or unrecorded; `None` for a scenario
/// without a target.
fn criteria(r: &Value, quick: bool) -> Option<Vec<Result<Check, Unrecorded>>> {
    let l = &r["load"];
    let g = &l["gateway"];
    let num = |v: &Value| v.as_f64();
    let c = |what, value: Option<f64>, limit: Option<f64>, at_most| match (value, limit) {
        (Some(value), Some(limit)) => Ok(Check {
            what,
            value,
            limit,
            at_most,
            detail: String::new(),
            margin: 0.0,
        }),
        (_, limit) => Err(Unrecorded {
            what,
            limit,
            at_most,
        }),
    };
    let difference = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
    // A figure from a run that lost clients or replies is not the figure the target is about:
    // every scenario's clients must all connect and see no error (S4 lists both itself, its
    // errors first, as its target names them).
    let established = || {
        c(
            "connections established",
            num(&l["established"]),
            num(&l["conns"]),
            false,
        )
    };
    let clean = || {
        [
            c("errors", num(&l["errors_total"]), Some(0.0), true),
            established(),
        ]
    };
    let mut v = match r["id"].as_str()? {
        "S1" => {
            let base = num(&r["gateway_baseline"]["rss_kib"]);
            let after = num(&r["gateway_after_leave"]["rss_kib"]);
            vec![
                c("KiB/conn", num(&g["kib_per_conn_end"]), Some(4.0), true),
                c(
                    "RSS after leave, MiB",
                    after.map(|after| after / 1024.0),
                    base.map(|base| base * 1.10 / 1024.0),
                    true,
                ),
            ]
        }
        "S2" => vec![tick_rounding(
            r,
            num(&l["established"]),
            c("µs CPU/conn", num(&g["cpu_us_per_conn"]), Some(40.0), true),
        )],
        "S3a" | "S3b" => {
            let messages =
                num(&l["replies"]).map(|replies| replies + num(&l["pushes"]).unwrap_or(0.0));
            let mut v = vec![tick_rounding(
                r,
                messages,
                c("µs CPU/msg", num(&g["cpu_us_per_msg"]), Some(12.0), true),
            )];
            if !quick {
                let floor = if r["id"] == "S3a" {
                    S3A_REPLIES_FLOOR
                } else {
                    S3B_REPLIES_FLOOR
                };
                v.push(c("replies/s", num(&l["replies_per_s"]), Some(floor), false));
            }
            v
        }
        // Ours: every reply in the order of its requests, with several in flight on each
        // connection. `load` counts one that answers a later request first as an error, so
        // "errors" below holds it already; this criterion names it. Replies/s and CPU per
        // message are in the table, not judged.
        "S3c" => vec![c(
            "replies out of order",
            l["errors"].as_object().map(|kinds| {
                kinds
                    .get("reply_out_of_order")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
            }),
            Some(0.0),
            true,
        )],
        "S4" => {
            // A load generator short of CPU sends late; `load` times each message from its
            // scheduled tick and catches up on missed ones, but what it could not catch up on
            // before the stop spares the gateway the load the target is about: the run counts
            // only if the clients sent 99.9% of it over the time they were sending.
            let sent = sent_and_asked(l).map(|(sent, asked)| sent / asked * 100.0);
            vec![
                c("errors", num(&l["errors_total"]), Some(0.0), true),
                // A client that never connected sends nothing: unless it was refused (an
                // error), only 0.1% of the 15,000 would show in the rate sent.
                established(),
                c("p99 ms", num(&l["latency"]["p99_ms"]), Some(10.0), true),
                c("% of the rate asked sent", sent, Some(99.9), false),
            ]
        }
        "S5" | "S5b" => {
            let count = num(&r["push"]["count"]);
            vec![
                c(
                    "pushes/s",
                    num(&r["push"]["pushes_per_s"]),
                    Some(50_000.0),
                    false,
                ),
                // Every push answered 200 and delivered: failures must not pass for speed.
                c(
                    "pushes not answered 200",
                    difference(count, num(&r["push"]["ok"])),
                    Some(0.0),
                    true,
                ),
                c(
                    "pushes not delivered",
                    difference(count, num(&l["pushes"])),
                    Some(0.0),
                    true,
                ),
                c(
                    "p99 delivery ms",
                    num(&l["push_latency"]["p99_ms"]),
                    Some(20.0),
                    true,
                ),
            ]
        }
        _ => return None,
    };
    if r["id"] != "S4" {
        v.extend(clean());
    }
    v.extend(api_traffic(r));
    if !r["error"].is_null() {
        // A scenario that failed or was cut short (a child stopped at its time limit) may
        // have figures, but not the ones its target is about: none counts.
        v = v
            .into_iter()
            .map(|criterion| {
                criterion.and_then(|check| {
                    Err(Unrecorded {
                        what: check.what,
                        limit: Some(check.limit),
                        at_most: check.at_most,
                    })
                })
            })
            .collect();
    }
    Some(v)
}

/// What the API saw besides the scenario's own `load`: S1's warm-up clients, as
/// (connections, messages sent); none for the other scenarios. `None` when a warm-up ran but
/// its figures are not known: it failed, or its run is from before the runner kept them (the
/// S1 runs of 2026-11-30 14:05–14:11 have a start-up baseline, the sign of a warm-up, and no
/// `warm_up`). A record from before `sent` was kept gives its replies, which are the messages
/// it sent when it had no error.
fn warm_up_traffic(r: &Value) -> Option<(f64, f64)> {
    let w = &r["warm_up"];
    if w.is_object() {
        let sent = w["sent"].as_f64().or_else(|| {
            w["errors_total"]
                .as_f64()
                .filter(|&errors| errors == 0.0)
                .and(w["replies"].as_f64())
        });
        return Some((w["established"].as_f64()?, sent?));
    }
    if r["id"] == "S1" && !r["gateway_cold_baseline"].is_null() {
        return None;
    }
    Some((0.0, 0.0))
}

/// Clean-run criteria of every scenario: every reply went through the API. `mock-api` echoes the
/// body, so `load`'s byte check cannot tell its echo from the gateway sending the client's own
/// frame back; the mock's counters can. Each must equal what the clients did: a GET and a
/// DELETE for each connection `load` established (the gateway asks the API before it accepts
/// one and tells it when it closes; the runner stops the gateway at least 2 s after the clients
/// left), a POST for each message `load` sent, and S1's warm-up besides
/// ([`warm_up_traffic`]). Exactly, not as a bound: after the stop `load` waits for the reply to
/// every message still in flight, so a message in flight at the stop is among its `sent` and
/// among the POSTs alike, and one that gets no reply is `reply_missing`, an error already. Each
/// criterion's value is how far the two counts are apart, and a missed one names both.
fn api_traffic(r: &Value) -> Vec<Result<Check, Unrecorded>> {
    let (l, m) = (&r["load"], &r["mock_counters"]);
    let warm_up = warm_up_traffic(r);
    let criterion = |what: &'static str,
                     method: &str,
                     seen: Option<f64>,
                     ours: Option<f64>,
                     warm_up: Option<f64>,
                     unit: &str| match (seen, ours, warm_up) {
        (Some(seen), Some(ours), Some(warm_up)) => {
            let and_warm_up = if warm_up > 0.0 {
                format!(" and {} of the warm-up", trim(warm_up))
            } else {
                String::new()
            };
            Ok(Check {
                what,
                value: (seen - ours - warm_up).abs(),
                limit: 0.0,
                at_most: true,
                detail: format!(
                    "the API saw {} {method}s for {} {unit}{and_warm_up}",
                    trim(seen),
                    trim(ours)
                ),
                margin: 0.0,
            })
        }
        _ => Err(Unrecorded {
            what,
            limit: Some(0.0),
            at_most: true,
        }),
    };
    let established = l["established"].as_f64();
    let warm_up_conns = warm_up.map(|(conns, _)| conns);
    vec![
        criterion(
            "API GETs other than one per connection",
            "GET",
            m["get"].as_f64(),
            established,
            warm_up_conns,
            "connections",
        ),
        criterion(
            "API DELETEs other than one per connection",
            "DELETE",
            m["delete"].as_f64(),
            established,
            warm_up_conns,
            "connections",
        ),
        criterion(
            "API POSTs other than one per message sent",
            "POST",
            m["post"].as_f64(),
            l["sent"].as_f64(),
            warm_up.map(|(_, sent)| sent),
            "messages sent",
        ),
    ]
}

/// Figures `--tally` counts against a limit beside the target's criteria, without a say in the
/// verdict: S1's RSS after the clients left against the start-up figure (the target judges it
/// against the baseline taken after a warm-up, a documented choice; the reader sees both).
fn informational(r: &Value) -> Vec<Result<Check, Unrecorded>> {
    match r["id"].as_str() {
        Some("S1") => {
            let cold = r["gateway_cold_baseline"]["rss_kib"].as_f64();
            let after = r["gateway_after_leave"]["rss_kib"].as_f64();
            let what = "% RSS after leave over the start-up figure";
            vec![match (cold, after) {
                (Some(cold), Some(after)) if cold > 0.0 => Ok(Check {
                    what,
                    value: percent_over(after, cold),
                    limit: 10.0,
                    at_most: true,
                    detail: String::new(),
                    margin: 0.0,
                }),
                _ => Err(Unrecorded {
                    what,
                    limit: Some(10.0),
                    at_most: true,
                }),
            }]
        }
        _ => Vec::new(),
    }
}

/// What `--tally` gathers for one criterion of a target over many runs.
struct CriterionTally {
    what: &'static str,
    /// Counted for the reader only ([`informational`]), not part of the target.
    informational: bool,
    /// Runs whose value met the criterion.
    met: usize,
    /// Runs whose value could not tell ([`Standing::Undecided`]): neither met nor missed.
    undecided: usize,
    /// The value of every run that recorded it.
    values: Vec<f64>,
    /// The limit, unless it differs from run to run (S1's RSS, against each run's baseline).
    limit: Option<f64>,
    at_most: bool,
}

/// What `--tally` gathers for one scenario over many runs.
struct ScenarioTally {
    /// The name it is counted under ([`tally_group`]).
    id: String,
    /// The scenario's own id: S4's groups have the same.
    scenario: String,
    runs: usize,
    /// Runs that recorded every figure of the target.
    judged: usize,
    met: usize,
    /// Runs judged whose figures could not tell ([`Standing::Undecided`]), among `judged`.
    undecided: usize,
    criteria: Vec<CriterionTally>,
}

impl ScenarioTally {
    fn criterion(&mut self, what: &'static str, informational: bool) -> &mut CriterionTally {
        let at = match self.criteria.iter().position(|c| c.what == what) {
            Some(at) => at,
            None => {
                self.criteria.push(CriterionTally {
                    what,
                    informational,
                    met: 0,
                    undecided: 0,
                    values: Vec::new(),
                    limit: None,
                    at_most: true,
                });
                self.criteria.len() - 1
            }
        };
        &mut self.criteria[at]
    }
}

/// `n` and `noun`, with an `s` unless `n` is 1.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `, undecided in N` for N runs whose figure could not tell; nothing for none.
fn undecided(n: usize) -> String {
    if n > 0 {
        format!(", undecided in {n}")
    } else {
        String::new()
    }
}

/// The middle of `sorted` (the mean of the two middle values for an even count).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The scenarios of the set while runs recorded `only` but not yet `scenarios_not_run` (from
/// `e26dcaa` until the runner recorded the latter): what [`subset`] judges such a run's `only`
/// against. Frozen, so that a scenario added later cannot make such a run, whose `only` named
/// every scenario of its day, look like a subset.
const SET_BEFORE_SCENARIOS_NOT_RUN: &[&str] = &["S1", "S2", "S3a", "S3b", "S3c", "S4", "S5", "S5b"];

/// Whether `--only` left out a scenario of the set `run` was made with: a run of a subset is no
/// full-set run, though each scenario in it ran as in the full set. Judged by what the run
/// recorded, never by today's set, which grows: by its `scenarios_not_run` (the scenarios of
/// its set that `--only` did not select; empty for the whole set); for a run from before that
/// was recorded, by whether its `only` selects every scenario of the set of its day
/// ([`SET_BEFORE_SCENARIOS_NOT_RUN`]); a run that recorded neither (every run before `only` was
/// recorded ran the whole set), or `only` null, is not a subset.
fn subset(run: &Value) -> bool {
    if let Some(not_run) = run["scenarios_not_run"].as_array() {
        return !not_run.is_empty();
    }
    run["only"].as_str().is_some_and(|only| {
        !SET_BEFORE_SCENARIOS_NOT_RUN
            .iter()
            .all(|id| selected(id, Some(only)))
    })
}

/// Why `--tally` leaves a run out (`None`: it counts): the quick set, whose sizes are not the
/// targets', a subset of the scenarios (`--only`, [`subset`]), and runs of anything but the
/// standard set-up: gateway flags under test, a `--label` or a gateway binary given
/// (`--gateway-bin`: the A/B experiments, one build against another), Unix sockets, or a mock
/// API with other than [`DEFAULT_MOCK_THREADS`] threads (a run that did not record its thread
/// count had the default).
fn left_out(run: &Value) -> Option<&'static str> {
    let gateway_args = &run["gateway_args"];
    if run["quick"].as_bool() == Some(true) {
        Some("quick (their sizes are not the targets')")
    } else if subset(run) {
        Some("with --only (a subset of the scenarios, not a full set)")
    } else if !gateway_args.is_null() && gateway_args.as_array().is_none_or(|a| !a.is_empty()) {
        Some("with --gateway-arg (not the default gateway)")
    } else if run["label"].as_str().is_some_and(|label| !label.is_empty()) {
        Some("with --label (an A/B experiment)")
    } else if gateway_bin_given(run) {
        Some("with --gateway-bin (not the gateway the runner built)")
    } else if run["unix_sockets"].as_bool() == Some(true) {
        Some("with --unix-sockets (the API over a Unix socket)")
    } else if run["mock_threads"]
        .as_u64()
        .is_some_and(|n| n != DEFAULT_MOCK_THREADS as u64)
    {
        Some("with --mock-threads other than 1")
    } else {
        None
    }
}

/// When the set of 2026-12-01 20:28 began (`started_utc`): before it, `load` timed each
/// rate-mode message from when it was sent, which leaves out the time a message waited for its
/// turn (coordinated omission); from it on, from the instant its tick was scheduled
/// (`bc55c7c`). Its reports did not say which until `latency_from`.
const LATENCY_FROM_SCHEDULE_SINCE: &str = "2026-12-01T2028Z";

/// What S4's latency in scenario result `r` of `run` was timed from: `load`'s own word
/// (`latency_from`), else the date of the run ([`LATENCY_FROM_SCHEDULE_SINCE`]; stamps of that
/// shape sort as they read); `None` when neither is recorded.
fn s4_latency_from(run: &Value, r: &Value) -> Option<&'static str> {
    match r["load"]["latency_from"].as_str() {
        Some("send") => Some("send"),
        Some("schedule") => Some("schedule"),
        _ => run["started_utc"].as_str().map(|started| {
            if started < LATENCY_FROM_SCHEDULE_SINCE {
                "send"
            } else {
                "schedule"
            }
        }),
    }
}

/// The name `--tally` counts scenario result `r` of `run` under: its id, but S4's runs apart by
/// what their latency was timed from ([`s4_latency_from`]): its p99 criterion is not the same
/// measure in each, and counted together the count would say none of them. Timed from the
/// schedule, it is two: from `a9089ef` (the set of 2026-12-02 03:31 on) `load` moves each
/// message's start later by as much of its lateness as the timer's own rounding accounts for,
/// 1 ms at most, and reports that lateness (`send_lag`); before it (the sets of 2026-12-01 20:28
/// to 2026-12-02 01:26) it charged all of it and recorded none. `send_lag` tells them apart.
fn tally_group(run: &Value, r: &Value) -> String {
    let id = r["id"].as_str().unwrap_or("?");
    if id != "S4" {
        return id.to_owned();
    }
    match s4_latency_from(run, r) {
        Some("send") => "S4, latency timed from the send (before 2026-12-01 20:28)".to_owned(),
        Some(_) if r["load"]["send_lag"].is_null() => {
            "S4, latency timed from the schedule, the timer's own lateness included (no send_lag \
             recorded)"
                .to_owned()
        }
        Some(_) => "S4, latency timed from the schedule less up to 1 ms of the timer's own \
                    lateness (send_lag recorded)"
            .to_owned(),
        None => "S4, latency timed from what the run did not record".to_owned(),
    }
}

/// Whether `run` tested a gateway binary given with `--gateway-bin` rather than the one the
/// runner builds: its own word (`gateway_bin_given`), else, for a run from before it said, its
/// `gateway_bin` path: the default was the `ws2http` beside the runner, in `target/release`
/// (every A/B run in `results/` named another, `/tmp/ws2http-head` and the like). A run that
/// recorded neither had the default.
fn gateway_bin_given(run: &Value) -> bool {
    if let Some(given) = run["gateway_bin_given"].as_bool() {
        return given;
    }
    run["gateway_bin"]
        .as_str()
        .is_some_and(|bin| !Path::new(bin).ends_with("target/release/ws2http"))
}

/// `--tally`: over the standard full-set runs (the JSON `scenarios` writes; see [`left_out`] for
/// the runs it does not count, which it says), how many met each scenario's target and each
/// criterion of it. A run that did not record a figure counts as not meeting it.
fn tally(runs: &[Value]) -> String {
    let mut scenarios: Vec<ScenarioTally> = Vec::new();
    let mut reasons: Vec<(&'static str, usize)> = Vec::new();
    let mut full: Vec<&Value> = Vec::new();
    for run in runs {
        match left_out(run) {
            None => full.push(run),
            Some(why) => match reasons.iter_mut().find(|(reason, _)| *reason == why) {
                Some((_, n)) => *n += 1,
                None => reasons.push((why, 1)),
            },
        }
    }
    for (run, r) in full.iter().flat_map(|run| {
        run["scenarios"]
            .as_array()
            .into_iter()
            .flatten()
            .map(move |r| (*run, r))
    }) {
        let Some(criteria) = criteria(r, false) else {
            continue;
        };
        let id = tally_group(run, r);
        let at = match scenarios.iter().position(|s| s.id == id) {
            Some(at) => at,
            None => {
                // Beside the scenario's other groups, if it has any, else last.
                let scenario = r["id"].as_str().unwrap_or("?").to_owned();
                let at = scenarios
                    .iter()
                    .rposition(|s| s.scenario == scenario)
                    .map_or(scenarios.len(), |last| last + 1);
                scenarios.insert(
                    at,
                    ScenarioTally {
                        id,
                        scenario,
                        runs: 0,
                        judged: 0,
                        met: 0,
                        undecided: 0,
                        criteria: Vec::new(),
                    },
                );
                at
            }
        };
        let scenario = &mut scenarios[at];
        scenario.runs += 1;
        if let Some(standing) = standing(r, false) {
            scenario.judged += 1;
            scenario.met += usize::from(standing == Standing::Met);
            scenario.undecided += usize::from(standing == Standing::Undecided);
        }
        let side = informational(r);
        for (criterion, informational) in criteria
            .into_iter()
            .map(|c| (c, false))
            .chain(side.into_iter().map(|c| (c, true)))
        {
            match criterion {
                Ok(check) => {
                    let tally = scenario.criterion(check.what, informational);
                    tally.met += usize::from(check.standing() == Standing::Met);
                    tally.undecided += usize::from(check.standing() == Standing::Undecided);
                    tally.limit = match (tally.values.is_empty(), tally.limit) {
                        (true, _) => Some(check.limit),
                        (false, Some(limit)) if limit == check.limit => Some(limit),
                        _ => None,
                    };
                    tally.at_most = check.at_most;
                    tally.values.push(check.value);
                }
                Err(unrecorded) => {
                    let tally = scenario.criterion(unrecorded.what, informational);
                    if tally.values.is_empty() {
                        tally.limit = unrecorded.limit;
                        tally.at_most = unrecorded.at_most;
                    }
                }
            }
        }
    }
    let left = if reasons.is_empty() {
        "none left out".to_owned()
    } else {
        let why: Vec<String> = reasons
            .iter()
            .map(|(why, n)| format!("{n} {why}"))
            .collect();
        format!("{} left out: {}", runs.len() - full.len(), why.join(", "))
    };
    let mut out = format!("{} counted ({left})\n", plural(full.len(), "full-set run"));
    for s in &scenarios {
        let unjudged = s.runs - s.judged;
        let unjudged = if unjudged > 0 {
            format!("; {unjudged} did not record every figure")
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{}: target met in {} of {}{}{unjudged}",
            s.id,
            s.met,
            plural(s.runs, "run"),
            undecided(s.undecided),
        );
        for c in &s.criteria {
            let sign = if c.at_most { "≤" } else { "≥" };
            let limit = c.limit.map_or_else(|| "each run's limit".to_owned(), trim);
            let mut values = c.values.clone();
            values.sort_by(f64::total_cmp);
            let spread = match (values.first(), values.last()) {
                (Some(least), Some(most)) => format!(
                    " (least {}, median {}, most {})",
                    trim(*least),
                    trim(median(&values)),
                    trim(*most)
                ),
                _ => String::new(),
            };
            let unrecorded = s.runs - values.len();
            let unrecorded = if unrecorded > 0 {
                format!("; {unrecorded} did not record it")
            } else {
                String::new()
            };
            let aside = if c.informational {
                " (informational, not part of the target)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {} {sign} {limit}{aside}: met in {} of {}{}{spread}{unrecorded}",
                c.what,
                c.met,
                s.runs,
                undecided(c.undecided)
            );
        }
    }
    out
}

/// `--tally FILES`: reads the result files and prints the tally, or says which file failed.
fn tally_files(files: &[PathBuf]) -> Result<String, String> {
    let runs = files
        .iter()
        .map(|file| {
            let text =
                std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))
        })
        .collect::<Result<Vec<Value>, String>>()?;
    Ok(tally(&runs))
}

/// How the scenario stands against its target (`None` when it could not be judged: a figure
/// missing, and no criterion recorded missed; [`checks`]): missed if any criterion is, else
/// undecided if any is, else met.
fn standing(r: &Value, quick: bool) -> Option<Standing> {
    checks(r, quick).map(|cs| overall(&cs))
}

/// How criteria stand together: missed if any is, else undecided if any is, else met.
fn overall(checks: &[Check]) -> Standing {
    let standings = || checks.iter().map(Check::standing);
    if standings().any(|s| s == Standing::Missed) {
        Standing::Missed
    } else if standings().any(|s| s == Standing::Undecided) {
        Standing::Undecided
    } else {
        Standing::Met
    }
}

/// Whether the scenario met its target (`None` when it could not be judged, or a figure
/// cannot tell: [`Standing::Undecided`]).
fn verdict(r: &Value, quick: bool) -> Option<bool> {
    match standing(r, quick)? {
        Standing::Met => Some(true),
        Standing::Missed => Some(false),
        Standing::Undecided => None,
    }
}

/// One sentence on what a loopback exchange cost the machine at the start of the run.
fn machine_line(machine: &Value) -> String {
    match (
        machine["echo_cpu_us"].as_f64(),
        machine["echo_kernel_us"].as_f64(),
    ) {
        (Some(cpu), Some(kernel)) => format!(
            "Machine: one 64-byte read+write over loopback TCP cost {cpu:.1} µs of CPU \
             ({kernel:.1} in the kernel) at the start of this run (`loopback`); the gateway \
             makes two such exchanges per message.\n"
        ),
        _ => format!(
            "Machine: the loopback measurement failed: {}\n",
            f(&machine["error"])
        ),
    }
}

fn markdown(results: &[Value], quick: bool) -> String {
    let mut s = String::from(
        "| scenario | measured (ws2http) | target | ws2api | load avg before |\n| --- | --- | --- | --- | --- |\n",
    );
    for r in results {
        let said = |cs: &[Check], standing: Standing, say: fn(&Check) -> String| {
            cs.iter()
                .filter(|c| c.standing() == standing)
                .map(say)
                .collect::<Vec<_>>()
                .join("; ")
        };
        let v = match checks(r, quick) {
            Some(cs) => match overall(&cs) {
                Standing::Met => "met".to_string(),
                Standing::Missed => format!(
                    "**missed**: {}",
                    said(&cs, Standing::Missed, Check::shortfall)
                ),
                Standing::Undecided => format!(
                    "undecided: {}",
                    said(&cs, Standing::Undecided, Check::against)
                ),
            },
            None => "not judged".to_string(),
        };
        let m = if r["error"].is_null() {
            measured(r)
        } else {
            format!("error: {}", f(&r["error"]))
        };
        let _ = writeln!(
            s,
            "| {} {} | {} | {} ({}) | {} | {} |",
            f(&r["id"]),
            f(&r["title"]),
            m,
            f(&r["target"]),
            v,
            f(&r["ws2api"]),
            f(&r["loadavg_before"])
        );
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One panel per scenario: open connections, messages/s and gateway RSS over time.
fn timeline_svg(results: &[Value]) -> String {
    let (w, ph, ml, mr, mt) = (900.0, 170.0, 70.0, 80.0, 30.0);
    let rows: Vec<&Value> = results
        .iter()
        .filter(|r| r["timeline"].as_array().is_some_and(|t| !t.is_empty()))
        .collect();
    let h = mt + rows.len() as f64 * (ph + 40.0) + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{ml}\" y=\"18\" font-size=\"14\">ws2http bench: open connections (blue), replies+pushes/s (orange), gateway RSS (grey, own scale)</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let tl = r["timeline"].as_array().unwrap();
        let y0 = mt + i as f64 * (ph + 40.0) + 20.0;
        let pw = w - ml - mr;
        let tmax = tl
            .iter()
            .filter_map(|p| p["t"].as_f64())
            .fold(1.0, f64::max);
        let get = |p: &Value, k: &str| p[k].as_f64().unwrap_or(0.0);
        let omax = tl.iter().map(|p| get(p, "open")).fold(1.0, f64::max);
        let rmax = tl
            .iter()
            .map(|p| get(p, "replies_per_s") + get(p, "pushes_per_s"))
            .fold(1.0, f64::max);
        let mmax = tl.iter().map(|p| get(p, "gw_rss_kib")).fold(1.0, f64::max);
        let x = |t: f64| ml + t / tmax * pw;
        let y = |v: f64, max: f64| y0 + ph - v / max * ph;
        let _ = writeln!(
            s,
            "<text x=\"{ml}\" y=\"{}\" font-size=\"12\" font-weight=\"bold\">{} — {}</text>",
            y0 - 5.0,
            esc(&f(&r["id"])),
            esc(&f(&r["title"]))
        );
        let _ = writeln!(
            s,
            "<rect x=\"{ml}\" y=\"{y0}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/>"
        );
        for (frac, _) in [(0.0, ()), (0.5, ()), (1.0, ())] {
            let yy = y0 + ph - frac * ph;
            let _ = writeln!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"end\" fill=\"#1f77b4\">{:.0}</text><text x=\"{}\" y=\"{}\" fill=\"#ff7f0e\">{:.0}/s</text>",
                ml - 4.0, yy + 4.0, omax * frac, ml + pw + 4.0, yy + 4.0, rmax * frac
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0} s</text><text x=\"{}\" y=\"{}\" fill=\"#777\">RSS max {:.1} MiB</text>",
            ml + pw, y0 + ph + 14.0, tmax, ml, y0 + ph + 14.0, mmax / 1024.0
        );
        let line = |key: &dyn Fn(&Value) -> f64, max: f64, color: &str, dash: &str| {
            let pts: Vec<String> = tl
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(get(p, "t")), y(key(p), max)))
                .collect();
            format!(
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" stroke-dasharray=\"{dash}\" points=\"{}\"/>\n",
                pts.join(" ")
            )
        };
        s += &line(&|p| get(p, "gw_rss_kib"), mmax, "#999", "4 3");
        s += &line(&|p| get(p, "open"), omax, "#1f77b4", "none");
        s += &line(
            &|p| get(p, "replies_per_s") + get(p, "pushes_per_s"),
            rmax,
            "#ff7f0e",
            "none",
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The latency histogram that characterises a scenario, with its name.
fn key_latency(r: &Value) -> (&'static str, &Value) {
    let l = &r["load"];
    match r["id"].as_str().unwrap_or("") {
        "S1" | "S2" => ("handshake", &l["connect_latency"]),
        "S5" | "S5b" => ("push delivery", &l["push_latency"]),
        _ => ("reply", &l["latency"]),
    }
}

/// Grouped bars of p50/p90/p99/p99.9/max per scenario on a log scale.
fn latency_svg(results: &[Value]) -> String {
    let keys = [
        ("p50_ms", "#c6dbef"),
        ("p90_ms", "#9ecae1"),
        ("p99_ms", "#6baed6"),
        ("p999_ms", "#3182bd"),
        ("max_ms", "#08519c"),
    ];
    let (ml, mt, row, bh, pw) = (200.0, 40.0, 70.0, 11.0, 620.0);
    let h = mt + results.len() as f64 * row + 40.0;
    let (lo, hi) = (0.01f64.log10(), 10_000f64.log10());
    let x = |ms: f64| ml + (ms.max(0.01).log10() - lo) / (hi - lo) * pw;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"14\">ws2http bench: latency percentiles (ms, log scale): p50, p90, p99, p99.9, max</text>\n",
        ml + pw + 60.0
    );
    for d in [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0] {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{mt}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#ddd\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{d}</text>",
            x(d),
            h - 30.0,
            h - 16.0
        );
    }
    for (i, r) in results.iter().enumerate() {
        let y0 = mt + i as f64 * row;
        let (what, hist) = key_latency(r);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} {} ({})</text>",
            ml - 6.0,
            y0 + 30.0,
            esc(&f(&r["id"])),
            what,
            f(&hist["count"])
        );
        for (j, (k, color)) in keys.iter().enumerate() {
            if let Some(v) = hist[*k].as_f64() {
                let yy = y0 + 4.0 + j as f64 * bh;
                let _ = writeln!(
                    s,
                    "<rect x=\"{ml}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" font-size=\"9\">{}</text>",
                    (x(v) - ml).max(1.0),
                    bh - 1.0,
                    x(v) + 3.0,
                    yy + bh - 2.0,
                    v
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Output of a git command in the workspace, trimmed (`None` if git fails).
fn git(root: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// What the results say of the gateway binary tested: its path, whether it was given
/// (`--gateway-bin`: another build under test, which `--tally` leaves out, rather than the one
/// built here) and its SHA-256 (null when it cannot be read), which names the build whatever
/// the git state of the tree when the results are written.
fn gateway_identity(bin: &Path, given: bool) -> Value {
    json!({
        "gateway_bin": bin.display().to_string(),
        "gateway_bin_given": given,
        "gateway_sha256": sha256_hex(bin),
    })
}

/// The SHA-256 of the file at `path`, in lower-case hex; `None` when it cannot be read.
fn sha256_hex(path: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).ok()?;
    Some(
        hasher
            .finalize()
            .iter()
            .fold(String::with_capacity(64), |mut hex, byte| {
                let _ = write!(hex, "{byte:02x}");
                hex
            }),
    )
}

fn build_gateway(root: &Path) -> Result<(), String> {
    eprintln!("building: cargo build --release -p ws2http -p ws2http-bench");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "ws2http", "-p", "ws2http-bench"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("cargo: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cargo build failed: {st}"))
    }
}

fn main() {
    let args: Args = argh::from_env();
    match (args.tally, args.files.is_empty()) {
        (true, true) => usage_error("scenarios", "--tally needs result files to count"),
        (true, false) => match tally_files(&args.files) {
            Ok(report) => {
                print!("{report}");
                return;
            }
            Err(e) => usage_error("scenarios", &format!("--tally: {e}")),
        },
        (false, false) => usage_error(
            "scenarios",
            "result files are read only with --tally (did you mean --only?)",
        ),
        (false, true) => {}
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    if !args.no_build && args.gateway_bin.is_none() {
        if let Err(e) = build_gateway(&root) {
            eprintln!("scenarios: {e}");
            std::process::exit(2);
        }
    }
    let dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| root.join("target/release"));
    let bins = Bins {
        gateway: args
            .gateway_bin
            .clone()
            .unwrap_or_else(|| dir.join("ws2http")),
        mock: dir.join("mock-api"),
        load: dir.join("load"),
        push: dir.join("push"),
    };
    for b in [&bins.gateway, &bins.mock, &bins.load, &bins.push] {
        if !b.exists() {
            eprintln!("scenarios: missing binary {}", b.display());
            std::process::exit(2);
        }
    }
    // The binary as it is before any scenario runs it: the git state when the results are
    // written (`git_head`) need not be the one it was built from.
    let gateway = gateway_identity(&bins.gateway, args.gateway_bin.is_some());
    let started = utc_stamp();
    let t0 = Instant::now();
    // The machine's own price of a loopback exchange, so that runs from a faster or slower
    // day can be compared (bench/README.md, "The machine").
    let machine = match loopback::measure(LOOPBACK_ROUND_TRIPS) {
        Ok(cost) => cost.to_json(),
        Err(e) => json!({"error": e.to_string()}),
    };
    let (to_run, not_run): (Vec<Scenario>, Vec<Scenario>) = scenarios(args.quick)
        .into_iter()
        .partition(|sc| selected(sc.id, args.only.as_deref()));
    let mut results = Vec::new();
    for sc in &to_run {
        results.push(run_scenario(sc, &bins, &args));
    }
    let ids = |set: &[Scenario]| set.iter().map(|sc| sc.id).collect::<Vec<_>>();
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| root.join("bench/results"));
    let _ = std::fs::create_dir_all(&out_dir);
    let stem = free_stem(
        &out_dir,
        &format!("{started}{}", if args.quick { "-quick" } else { "" }),
    );
    for r in &mut results {
        let met = verdict(r, args.quick);
        if let Some(o) = r.as_object_mut() {
            o.insert("target_met".into(), json!(met));
        }
    }
    let api_line = if args.unix_sockets {
        "The gateway reached the mock API, and `push` the gateway's control API, over Unix \
         sockets (`--unix-sockets`).\n\n"
    } else {
        ""
    };
    let table = format!(
        "{}\n{api_line}{}",
        machine_line(&machine),
        markdown(&results, args.quick)
    );
    let mut doc = json!({
        "started_utc": started,
        "elapsed_s": t0.elapsed().as_secs(),
        "quick": args.quick,
        // The subset of scenarios run, as given (null: all).
        "only": args.only,
        // The scenarios run, and those of the set `--only` left out: `--tally` leaves a run out
        // when the latter is not empty, judging it by its own set, not by a later one.
        "scenarios_run": ids(&to_run),
        "scenarios_not_run": ids(&not_run),
        "label": args.label,
        "git_head": git(&root, &["rev-parse", "--short", "HEAD"]),
        "git_uncommitted_in_src": git(&root, &["status", "--porcelain", "--", "src", "Cargo.toml"])
            .map(|s| s.lines().count()),
        "gateway_args": args.gateway_arg,
        "unix_sockets": args.unix_sockets,
        "mock_threads": args.mock_threads,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loopback": machine,
        "scenarios": results,
    });
    if let (Some(doc), Value::Object(gateway)) = (doc.as_object_mut(), gateway) {
        doc.extend(gateway);
    }
    let write = |ext: &str, body: &str| {
        let p = out_dir.join(format!("{stem}{ext}"));
        match std::fs::write(&p, body) {
            Ok(()) => eprintln!("wrote {}", p.display()),
            Err(e) => eprintln!("cannot write {}: {e}", p.display()),
        }
    };
    write(
        ".json",
        &serde_json::to_string_pretty(&doc).unwrap_or_default(),
    );
    write(".md", &table);
    write("-timeline.svg", &timeline_svg(&results));
    write("-latency.svg", &latency_svg(&results));
    println!("{table}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `r` with the counters of a mock API that saw just what the clients did: a GET and a
    /// DELETE for each connection established, a POST for each message sent, `load`'s and the
    /// warm-up's (and `load`'s count of messages sent, 0 unless `r` gives one).
    fn api_saw_the_clients(mut r: Value) -> Value {
        if r["load"]["sent"].is_null() {
            r["load"]["sent"] = json!(0);
        }
        let count = |v: &Value| v.as_u64().unwrap_or(0);
        let (l, w) = (&r["load"], &r["warm_up"]);
        let conns = count(&l["established"]) + count(&w["established"]);
        let posts = count(&l["sent"]) + count(&w["sent"]);
        r["mock_counters"] = json!({"get": conns, "post": posts, "delete": conns});
        r
    }

    #[test]
    fn the_ports_are_read_from_the_lines_the_children_print() {
        let gateway = "2026-11-30T18:41:24.020561Z  INFO ws2http: ws2http listening: \
                       public=127.0.0.1:32881 control=127.0.0.1:44747";
        assert_eq!(port_after(gateway, "public="), Some(32881));
        assert_eq!(port_after(gateway, "control="), Some(44747));
        assert_eq!(
            port_after("mock-api: listening on 127.0.0.1:45983", "listening on "),
            Some(45983)
        );
        assert_eq!(port_after("ws2http listening: public=?", "public="), None);
        assert_eq!(port_after(gateway, "api="), None);
    }

    #[test]
    fn a_child_that_never_says_where_it_listens_is_an_error() {
        let mut silent = Command::new("sh");
        silent.args(["-c", "echo starting >&2; exit 0"]);
        let started = spawn_listening(&mut silent, "listening on", ["listening on "]);
        assert!(started.is_err());
    }

    #[test]
    fn a_listening_line_without_the_ports_asked_for_is_an_error() {
        let mut talker = Command::new("sh");
        talker.args(["-c", "echo 'ws2http listening: public=?' >&2"]);
        let started = spawn_listening(&mut talker, "ws2http listening:", ["public="]);
        let error = started.err().unwrap_or_default();
        assert!(error.contains("no port after \"public=\""), "{error}");
    }

    #[test]
    fn a_child_that_says_where_it_listens_is_returned_with_its_ports() {
        let mut talker = Command::new("sh");
        talker.args([
            "-c",
            "echo one >&2; echo 'mock-api: listening on 127.0.0.1:4242' >&2",
        ]);
        let (mut child, ports) =
            spawn_listening(&mut talker, "listening on", ["listening on "]).unwrap();
        let _ = child.wait();
        assert_eq!(ports, [4242]);
    }

    #[test]
    fn a_child_that_does_not_end_is_stopped_at_its_limit_with_what_it_printed() {
        let finished = output_within(
            Command::new("sh").args(["-c", "echo done"]),
            Duration::from_secs(10),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(finished.stdout, "done\n");
        assert!(!finished.timed_out);

        let started = Instant::now();
        let finished = output_within(
            Command::new("sh").args(["-c", "echo partial; exec sleep 30"]),
            Duration::from_millis(300),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(finished.stdout, "partial\n");
        assert!(finished.timed_out);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGTERM ends it"
        );

        // One that ignores SIGTERM is killed after the grace.
        let started = Instant::now();
        let finished = output_within(
            Command::new("sh").args([
                "-c",
                "trap '' TERM; echo stubborn; while :; do sleep 0.1; done",
            ]),
            Duration::from_millis(300),
            Duration::from_millis(500),
        )
        .unwrap();
        assert_eq!(finished.stdout, "stubborn\n");
        assert!(finished.timed_out);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn load_may_run_its_duration_and_its_own_deadlines_with_a_minute_to_spare() {
        let s4 = scenarios(false)
            .into_iter()
            .find(|sc| sc.id == "S4")
            .unwrap();
        assert_eq!(load_limit(&s4.load_args), Duration::from_secs(60 + 215));
        assert_eq!(
            load_limit(&a(&["--conns", "4"])),
            Duration::from_secs(10 + 215)
        );
        assert_eq!(
            load_limit(&a(&["--duration", "1.5"])),
            Duration::from_secs_f64(216.5)
        );
    }

    #[test]
    fn a_scenario_cut_short_is_not_judged_whatever_its_figures() {
        let mut r = api_saw_the_clients(
            json!({"id": "S2", "load": {"errors_total": 0, "established": 10,
                           "conns": 10, "gateway": {"cpu_us_per_conn": 30.0, "cpu_from_clock": true}}}),
        );
        assert_eq!(verdict(&r, false), Some(true));
        r["error"] = json!("did not finish in time, stopped: load (after 216 s)");
        assert_eq!(verdict(&r, false), None);
        let report = tally(&[json!({"scenarios": [r.clone()]})]);
        assert!(
            report.contains("S2: target met in 0 of 1 run; 1 did not record every figure"),
            "{report}"
        );
        let md = markdown(&[r], false);
        assert!(
            md.contains("error: did not finish in time") && md.contains("(not judged)"),
            "{md}"
        );
    }

    #[test]
    fn s4_counts_the_rate_sent_over_the_send_window_not_the_whole_message_phase() {
        // 60 s of sending, all but the last few ticks sent, and 40 ms more in the message
        // phase for the stop, the replies still in flight and the end sample.
        let mut s4 = api_saw_the_clients(
            json!({"id": "S4", "load": {"errors_total": 0, "latency": {"p99_ms": 9.0},
               "conns": 15000, "established": 15000, "interval_ms": 1000, "sent": 899_500,
               "send_window_s": 60.0, "message_phase_s": 60.04}}),
        );
        assert_eq!(verdict(&s4, false), Some(true), "99.94% of the rate sent");
        assert!(
            offered_rate("S4", &s4["load"]).contains("sent 14992 msgs/s of the 15000 asked"),
            "{}",
            offered_rate("S4", &s4["load"])
        );
        // Without the window (an older result): over the message phase, as it was judged.
        s4["load"].as_object_mut().unwrap().remove("send_window_s");
        assert_eq!(verdict(&s4, false), Some(false), "99.88% over 60.04 s");
    }

    #[test]
    fn the_s4_line_says_how_much_of_the_asked_rate_the_clients_sent() {
        let load =
            json!({"conns": 15000, "interval_ms": 1000, "sent": 360_000, "message_phase_s": 30.0});
        let said = offered_rate("S4", &load);
        assert!(
            said.contains("sent 12000 msgs/s of the 15000 asked, 80.0%"),
            "{said}"
        );
        assert_eq!(offered_rate("S3a", &load), "");
        assert_eq!(offered_rate("S4", &json!({})), "");
    }

    #[test]
    fn the_machine_line_gives_the_loopback_cost_or_why_it_is_missing() {
        let line = machine_line(&json!({"echo_cpu_us": 16.04, "echo_kernel_us": 15.7}));
        assert!(
            line.contains("16.0 µs of CPU (15.7 in the kernel)"),
            "{line}"
        );
        let line = machine_line(&json!({"error": "no loopback"}));
        assert!(line.contains("failed: no loopback"), "{line}");
    }

    #[test]
    fn utc_stamp_has_the_file_name_shape() {
        let s = utc_stamp();
        assert_eq!(s.len(), "2026-11-23T0858Z".len(), "{s}");
        assert!(
            s.starts_with("20") && s.ends_with('Z') && s.as_bytes()[10] == b'T',
            "{s}"
        );
    }

    #[test]
    fn only_picks_scenarios_by_prefix_in_any_case() {
        assert!(selected("S3a", None));
        assert!(selected("S3a", Some("S3")) && selected("S3b", Some("s3")));
        assert!(selected("S3a", Some("S3a")) && !selected("S3b", Some("S3a")));
        assert!(selected("S5b", Some("S1, s5b")) && !selected("S4", Some("S1,S5")));
        assert!(!selected("S1", Some("")));
    }

    /// A /proc sample with these CPU times (µs, all and in the kernel) and nothing else.
    fn sample(cpu_us: u64, sys_us: u64) -> procstat::Sample {
        procstat::Sample {
            cpu_us,
            sys_us,
            ..Default::default()
        }
    }

    #[test]
    fn push_cpu_is_divided_over_the_pushes() {
        let v = per_push_cpu(&sample(1_000, 400), &sample(31_000, 20_400), 1_000);
        assert_eq!(
            v,
            json!({"cpu_us_per_push": 30.0, "sys_us_per_push": 20.0, "cpu_from_clock": false})
        );
        assert_eq!(per_push_cpu(&sample(0, 0), &sample(5, 5), 0), Value::Null);
        // With the CPU-time clock in both samples, the total comes from it.
        let clocked = |cpu_us, sys_us, cpu_ns| procstat::Sample {
            cpu_ns: Some(cpu_ns),
            ..sample(cpu_us, sys_us)
        };
        let v = per_push_cpu(
            &clocked(1_000, 400, 1_234_000),
            &clocked(31_000, 20_400, 26_734_000),
            1_000,
        );
        assert_eq!(
            v,
            json!({"cpu_us_per_push": 25.5, "sys_us_per_push": 20.0, "cpu_from_clock": true})
        );
    }

    #[test]
    fn push_cpu_is_divided_over_the_pushes_answered_200_not_the_pushes_asked() {
        let gateway = [Some(sample(0, 0)), Some(sample(300_000, 150_000))];
        let machine = [Some((0, 0)), Some((600_000, 200_000))];
        // 15,000 asked, 10,000 answered 200: the cost of the 5,000 refused falls on the rest.
        let push =
            json!({"count": 15_000, "ok": 10_000, "statuses": {"200": 10_000, "503": 5_000}});
        let (gateway_cpu, machine_cpu) = push_window_cpu(gateway, machine, &push);
        assert_eq!(gateway_cpu["cpu_us_per_push"], 30.0, "{gateway_cpu}");
        assert_eq!(gateway_cpu["sys_us_per_push"], 15.0, "{gateway_cpu}");
        assert_eq!(machine_cpu["busy_us_per_push"], 60.0, "{machine_cpu}");
        assert_eq!(machine_cpu["idle_share"], 0.25, "{machine_cpu}");
        // None done, or no sample: no figure rather than one per push asked.
        let refused = json!({"count": 15_000, "ok": 0, "statuses": {"503": 15_000}});
        assert_eq!(
            push_window_cpu(gateway, machine, &refused),
            (Value::Null, Value::Null)
        );
        assert_eq!(
            push_window_cpu([None, gateway[1]], [machine[0], None], &push),
            (Value::Null, Value::Null)
        );
    }

    #[test]
    fn a_second_run_in_the_same_minute_does_not_overwrite_the_first() {
        let dir = std::env::temp_dir().join(format!("ws2http-stem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(free_stem(&dir, "2026-11-30T0745Z"), "2026-11-30T0745Z");
        std::fs::write(dir.join("2026-11-30T0745Z.json"), "{}").unwrap();
        assert_eq!(free_stem(&dir, "2026-11-30T0745Z"), "2026-11-30T0745Z-2");
        std::fs::write(dir.join("2026-11-30T0745Z-2.json"), "{}").unwrap();
        assert_eq!(free_stem(&dir, "2026-11-30T0745Z"), "2026-11-30T0745Z-3");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn s1_reports_the_growth_over_the_warmed_and_the_start_up_baseline() {
        let r = api_saw_the_clients(
            json!({"id": "S1", "load": {"errors_total": 0, "established": 10, "conns": 10, "gateway": {"kib_per_conn_end": 3.7}},
                       "warm_up": {"established": 4, "sent": 20},
                       "gateway_cold_baseline": {"rss_kib": 7000},
                       "gateway_baseline": {"rss_kib": 7500},
                       "gateway_after_leave": {"rss_kib": 7875}}),
        );
        let table = markdown(std::slice::from_ref(&r), false);
        assert!(
            table.contains("+5%; +12% over the 6.8 MiB at start"),
            "{table}"
        );
        // The target is judged against the warmed baseline: 7875 is within 10% of 7500.
        assert_eq!(verdict(&r, false), Some(true));
    }

    #[test]
    fn verdicts_follow_the_issue_targets() {
        let s4_sent = |errors: u64, p99: f64, sent: u64| {
            api_saw_the_clients(
                json!({"id": "S4", "load": {"errors_total": errors, "latency": {"p99_ms": p99},
                   "conns": 15000, "established": 15000, "interval_ms": 1000, "message_phase_s": 60.0, "sent": sent}}),
            )
        };
        let s4 = |errors: u64, p99: f64| s4_sent(errors, p99, 900_000);
        assert_eq!(verdict(&s4(0, 9.5), false), Some(true));
        // Every connection established, as in every other scenario: a client still connecting
        // when `load` gave up waiting is no error, and sends nothing.
        let mut short = s4(0, 9.5);
        short["load"]["established"] = json!(14_990);
        let short = api_saw_the_clients(short);
        assert_eq!(verdict(&short, false), Some(false), "10 clients missing");
        let table = markdown(std::slice::from_ref(&short), false);
        assert!(
            table.contains("**missed**: connections established 14990 vs ≥ 15000"),
            "{table}"
        );
        assert_eq!(
            verdict(&s4(1, 9.5), false),
            Some(false),
            "one error fails S4"
        );
        assert_eq!(verdict(&s4(0, 10.5), false), Some(false));
        assert_eq!(
            verdict(&s4_sent(0, 9.5, 850_000), false),
            Some(false),
            "clients that sent 94% of the rate did not give the gateway S4's load"
        );
        assert_eq!(verdict(&s4_sent(0, 9.5, 899_400), false), Some(true));
        assert_eq!(
            verdict(&s4_sent(0, 9.5, 898_900), false),
            Some(false),
            "99.88% of the rate is short of the 99.9% asked"
        );
        let s5 = |ok: u64, delivered: u64| {
            api_saw_the_clients(
                json!({"id": "S5", "push": {"pushes_per_s": 60_000.0, "count": 15000, "ok": ok},
                   "load": {"errors_total": 0, "established": 10, "conns": 10, "pushes": delivered, "push_latency": {"p99_ms": 5.0}}}),
            )
        };
        assert_eq!(verdict(&s5(15000, 15000), false), Some(true));
        assert_eq!(
            verdict(&s5(14999, 14999), false),
            Some(false),
            "a push refused"
        );
        assert_eq!(
            verdict(&s5(15000, 14999), false),
            Some(false),
            "a push lost"
        );
        let s1 = |kib: f64, base: u64, after: u64| {
            api_saw_the_clients(
                json!({"id": "S1", "load": {"errors_total": 0, "established": 10, "conns": 10, "gateway": {"kib_per_conn_end": kib}},
                   "gateway_baseline": {"rss_kib": base}, "gateway_after_leave": {"rss_kib": after}}),
            )
        };
        assert_eq!(verdict(&s1(3.9, 1000, 1100), false), Some(true));
        let missed = markdown(&[s1(8.0, 1000, 1000)], false);
        assert!(missed.contains("KiB/conn 8 vs ≤ 4 (2.0× off)"), "{missed}");
        assert_eq!(
            verdict(&s1(3.9, 1000, 1101), false),
            Some(false),
            "RSS not given back"
        );
        assert_eq!(verdict(&s1(4.1, 1000, 1000), false), Some(false));
        // Missing figures are not judged rather than passed.
        assert_eq!(verdict(&json!({"id": "S2", "load": {}}), false), None);
    }

    #[test]
    fn every_scenario_but_s4_also_needs_no_error_and_every_connection_up() {
        let good = [
            json!({"id": "S1", "load": {"gateway": {"kib_per_conn_end": 3.0}},
                   "gateway_baseline": {"rss_kib": 1000}, "gateway_after_leave": {"rss_kib": 1000}}),
            json!({"id": "S2", "load": {"gateway": {"cpu_us_per_conn": 30.0, "cpu_from_clock": true}}}),
            json!({"id": "S3a", "load": {"replies_per_s": 60_000.0,
                   "gateway": {"cpu_us_per_msg": 10.0, "cpu_from_clock": true}}}),
            json!({"id": "S3b", "load": {"replies_per_s": 60_000.0,
                   "gateway": {"cpu_us_per_msg": 10.0, "cpu_from_clock": true}}}),
            json!({"id": "S5", "push": {"pushes_per_s": 60_000.0, "count": 10, "ok": 10},
                   "load": {"pushes": 10, "push_latency": {"p99_ms": 5.0}}}),
            json!({"id": "S5b", "push": {"pushes_per_s": 60_000.0, "count": 10, "ok": 10},
                   "load": {"pushes": 10, "push_latency": {"p99_ms": 5.0}}}),
        ];
        let with = |r: &Value, errors: u64, established: u64| {
            let mut r = r.clone();
            r["load"]["errors_total"] = json!(errors);
            r["load"]["established"] = json!(established);
            r["load"]["conns"] = json!(10);
            api_saw_the_clients(r)
        };
        for r in &good {
            let id = &r["id"];
            // Without the figures, the run cannot be judged rather than passing.
            assert_eq!(verdict(r, false), None, "{id}");
            assert_eq!(verdict(&with(r, 0, 10), false), Some(true), "{id}");
            assert_eq!(
                verdict(&with(r, 1, 10), false),
                Some(false),
                "{id}: an error"
            );
            assert_eq!(
                verdict(&with(r, 0, 9), false),
                Some(false),
                "{id}: a client never connected"
            );
        }
        let missed = markdown(&[with(&good[1], 3, 7)], false);
        assert!(
            missed.contains("errors 3 vs ≤ 0")
                && missed.contains("connections established 7 vs ≥ 10"),
            "{missed}"
        );
    }

    #[test]
    fn every_target_needs_the_api_to_have_seen_each_connection_and_each_message() {
        let s3a = api_saw_the_clients(
            json!({"id": "S3a", "load": {"errors_total": 0, "established": 100, "conns": 100,
                   "sent": 1_000_000, "replies_per_s": 60_000.0, "gateway": {"cpu_us_per_msg": 10.0, "cpu_from_clock": true}}}),
        );
        assert_eq!(verdict(&s3a, false), Some(true));
        // The gateway sent one message back without asking the API: its byte check passes,
        // the counters do not.
        let mut bounced = s3a.clone();
        bounced["mock_counters"]["post"] = json!(999_999);
        assert_eq!(verdict(&bounced, false), Some(false));
        let missed = markdown(&[bounced], false);
        assert!(
            missed.contains(
                "API POSTs other than one per message sent 1 vs ≤ 0 (the API saw 999999 POSTs \
                 for 1000000 messages sent)"
            ),
            "{missed}"
        );
        // A connection the API was never asked about, or never told of its close.
        let mut unasked = s3a.clone();
        unasked["mock_counters"]["get"] = json!(99);
        let missed = markdown(&[unasked], false);
        assert!(
            missed.contains(
                "API GETs other than one per connection 1 vs ≤ 0 (the API saw 99 GETs for 100 \
                 connections)"
            ),
            "{missed}"
        );
        let mut untold = s3a.clone();
        untold["mock_counters"]["delete"] = json!(101);
        assert_eq!(verdict(&untold, false), Some(false));
        // S4 has its own errors criterion, and this one too.
        let s4 = api_saw_the_clients(
            json!({"id": "S4", "load": {"errors_total": 0, "latency": {"p99_ms": 9.0},
                   "conns": 15000, "established": 15000, "interval_ms": 1000, "sent": 900_000,
                   "send_window_s": 60.0}}),
        );
        assert_eq!(verdict(&s4, false), Some(true));
        let mut bounced = s4.clone();
        bounced["mock_counters"]["post"] = json!(900_001);
        assert_eq!(verdict(&bounced, false), Some(false), "a POST too many");
        // No counters (the mock API did not report them): not judged rather than passed.
        let mut unknown = s3a;
        unknown["mock_counters"] = Value::Null;
        assert_eq!(verdict(&unknown, false), None);
    }

    #[test]
    fn s1_counts_the_warm_up_clients_among_what_the_api_saw() {
        let s1 = |warm_up: Value, cold_baseline: Value, [get, post, delete]: [u64; 3]| {
            json!({"id": "S1", "load": {"errors_total": 0, "established": 15000, "conns": 15000,
                   "sent": 0, "gateway": {"kib_per_conn_end": 3.0}},
                   "warm_up": warm_up, "gateway_cold_baseline": cold_baseline,
                   "gateway_baseline": {"rss_kib": 8000}, "gateway_after_leave": {"rss_kib": 8200},
                   "mock_counters": {"get": get, "post": post, "delete": delete}})
        };
        let cold = json!({"rss_kib": 7600});
        let warm_up = json!({"clients": 4, "established": 4, "sent": 21, "replies": 21,
                             "errors_total": 0});
        let counts = [15_004, 21, 15_004];
        assert_eq!(
            verdict(&s1(warm_up.clone(), cold.clone(), counts), false),
            Some(true)
        );
        let missed = markdown(&[s1(warm_up, cold.clone(), [15_004, 22, 15_004])], false);
        assert!(
            missed.contains("(the API saw 22 POSTs for 0 messages sent and 21 of the warm-up)"),
            "{missed}"
        );
        // A warm-up record from before `sent` was kept: its replies, when it had no error.
        let replies_only =
            json!({"clients": 4, "established": 4, "replies": 21, "errors_total": 0});
        assert_eq!(
            verdict(&s1(replies_only, cold.clone(), counts), false),
            Some(true)
        );
        let with_errors = json!({"clients": 4, "established": 4, "replies": 20, "errors_total": 1});
        assert_eq!(verdict(&s1(with_errors, cold.clone(), counts), false), None);
        // A warm-up that could not run has no figures to count.
        let failed = json!({"error": "load: did not finish in time, stopped"});
        assert_eq!(verdict(&s1(failed, cold.clone(), counts), false), None);
        // The runs of 2026-11-30 14:05-14:11 had a warm-up (a start-up baseline) and kept no
        // record of it: unknown, not a mismatch. Before the warm-up, neither.
        assert_eq!(verdict(&s1(Value::Null, cold, counts), false), None);
        let before_warm_ups = s1(Value::Null, Value::Null, [15_000, 0, 15_000]);
        assert_eq!(verdict(&before_warm_ups, false), Some(true));
    }

    #[test]
    fn a_gateway_figure_load_could_not_measure_is_unrecorded_not_met() {
        // `load` writes null for a figure whose sample it could not take (the gateway gone).
        let s1 = api_saw_the_clients(
            json!({"id": "S1", "load": {"errors_total": 0, "established": 10, "conns": 10,
                   "gateway": {"kib_per_conn_end": null, "end": null}},
                   "gateway_baseline": {"rss_kib": 1000}, "gateway_after_leave": {"rss_kib": 1000}}),
        );
        assert_eq!(verdict(&s1, false), None);
        assert!(markdown(std::slice::from_ref(&s1), false).contains("(not judged)"));
        // Every client refused: `load` has no connection to divide by and writes null, not 0
        // (which met "≤ 4 KiB"); the run is missed by its other criteria, and the missing
        // figure counts as not met.
        let refused = api_saw_the_clients(
            json!({"id": "S1", "load": {"errors_total": 10, "established": 0, "conns": 10,
                   "gateway": {"kib_per_conn_end": null}},
                   "gateway_baseline": {"rss_kib": 1000}, "gateway_after_leave": {"rss_kib": 1000}}),
        );
        assert_eq!(verdict(&refused, false), Some(false));
        let table = markdown(std::slice::from_ref(&refused), false);
        assert!(
            table.contains("**missed**: errors 10 vs ≤ 0; connections established 0 vs ≥ 10"),
            "{table}"
        );
        let report = tally(&[json!({"scenarios": [refused]})]);
        assert!(
            report.contains("S1: target met in 0 of 1 run\n"),
            "{report}"
        );
        assert!(
            report.contains("KiB/conn ≤ 4: met in 0 of 1; 1 did not record it"),
            "{report}"
        );
        let report = tally(&[json!({"scenarios": [s1]})]);
        assert!(
            report.contains("S1: target met in 0 of 1 run; 1 did not record every figure"),
            "{report}"
        );
        assert!(
            report.contains("KiB/conn ≤ 4: met in 0 of 1; 1 did not record it"),
            "{report}"
        );
    }

    #[test]
    fn s3_floors_are_two_and_a_half_times_the_top_of_ws2api_range() {
        let s3 = |id: &str, replies: f64| {
            api_saw_the_clients(
                json!({"id": id, "load": {"errors_total": 0, "established": 10, "conns": 10, "replies_per_s": replies,
                   "gateway": {"cpu_us_per_msg": 10.0, "cpu_from_clock": true}}}),
            )
        };
        // 2.5 × 20.4k and 2.5 × 19.9k: the top of ws2api's ranges, not the bottom.
        assert_eq!(verdict(&s3("S3a", 51_000.0), false), Some(true));
        assert_eq!(verdict(&s3("S3a", 50_999.0), false), Some(false));
        assert_eq!(verdict(&s3("S3b", 49_750.0), false), Some(true));
        assert_eq!(verdict(&s3("S3b", 49_749.0), false), Some(false));
        let missed = markdown(&[s3("S3a", 48_000.0)], false);
        assert!(missed.contains("replies/s 48000 vs ≥ 51000"), "{missed}");
        // The quick set's sizes are not the target's: no floor there.
        assert_eq!(verdict(&s3("S3b", 100.0), true), Some(true));
    }

    #[test]
    fn tally_counts_runs_that_met_each_criterion_and_leaves_out_runs_not_of_the_standard_set() {
        let clean = json!({"errors_total": 0, "established": 10, "conns": 10});
        let s2 = |us: f64| {
            let mut s2 = json!({"id": "S2", "load": clean.clone()});
            s2["load"]["gateway"] = json!({"cpu_us_per_conn": us, "cpu_from_clock": true});
            api_saw_the_clients(s2)
        };
        let s1 = |base: u64, after: u64| {
            let mut s1 = json!({"id": "S1", "load": clean.clone(),
                   "gateway_baseline": {"rss_kib": base}, "gateway_after_leave": {"rss_kib": after}});
            s1["load"]["gateway"] = json!({"kib_per_conn_end": 3.0});
            api_saw_the_clients(s1)
        };
        // An older run without S5's delivery count: not met, and said so.
        let mut s5_old = json!({"id": "S5", "load": clean.clone(),
                                "push": {"pushes_per_s": 60_000.0, "count": 10, "ok": 10}});
        s5_old["load"]["push_latency"] = json!({"p99_ms": 5.0});
        let s5_old = api_saw_the_clients(s5_old);
        let runs = [
            json!({"scenarios": [s2(39.0), s1(1000, 1100), s5_old]}),
            json!({"mock_threads": 1, "gateway_args": [], "unix_sockets": false,
                   "scenarios": [s2(45.0), s1(2000, 2300)]}),
            json!({"scenarios": [s2(41.0)]}),
            json!({"quick": true, "scenarios": [s2(10.0)]}),
            json!({"gateway_args": ["--upstream-http2"], "scenarios": [s2(11.0)]}),
            json!({"unix_sockets": true, "scenarios": [s2(12.0)]}),
            json!({"mock_threads": 2, "scenarios": [s2(13.0)]}),
            json!({"quick": true, "scenarios": [s2(14.0)]}),
        ];
        let report = tally(&runs);
        assert!(
            report.starts_with(
                "3 full-set runs counted (5 left out: 2 quick (their sizes are not the \
                 targets'), 1 with --gateway-arg (not the default gateway), 1 with \
                 --unix-sockets (the API over a Unix socket), 1 with --mock-threads other than \
                 1)\n"
            ),
            "{report}"
        );
        assert!(
            report.contains("S2: target met in 1 of 3 runs\n"),
            "{report}"
        );
        assert!(
            report.contains("µs CPU/conn ≤ 40: met in 1 of 3 (least 39, median 41, most 45)"),
            "{report}"
        );
        assert!(
            report.contains("RSS after leave, MiB ≤ each run's limit: met in 1 of 2"),
            "{report}"
        );
        assert!(
            report.contains("S5: target met in 0 of 1 run; 1 did not record every figure"),
            "{report}"
        );
        assert!(
            report.contains("pushes not delivered ≤ 0: met in 0 of 1; 1 did not record it"),
            "{report}"
        );
        assert!(
            tally(&runs[..1]).starts_with("1 full-set run counted (none left out)"),
            "{}",
            tally(&runs[..1])
        );
    }

    #[test]
    fn tally_leaves_out_a_run_of_a_subset_and_counts_one_that_recorded_none() {
        let s2 = api_saw_the_clients(
            json!({"id": "S2", "load": {"errors_total": 0, "established": 10, "conns": 10,
                   "gateway": {"cpu_us_per_conn": 30.0, "cpu_from_clock": true}}}),
        );
        let runs = [
            // From before the runner recorded `only`: every such run was of the whole set.
            json!({"scenarios": [s2.clone()]}),
            json!({"only": null, "scenarios": [s2.clone()]}),
            // `--only S2`: its S2 ran as in the full set, but the run is no full set.
            json!({"only": "S2", "scenarios": [s2.clone()]}),
            json!({"only": "S1,S3", "scenarios": [s2.clone()]}),
            // `--only` naming every scenario of the set runs the whole set.
            json!({"only": "s1, S2,S3,S4,S5", "scenarios": [s2.clone()]}),
        ];
        let report = tally(&runs);
        assert!(
            report.starts_with(
                "3 full-set runs counted (2 left out: 2 with --only (a subset of the \
                 scenarios, not a full set))\n"
            ),
            "{report}"
        );
        assert!(
            report.contains("S2: target met in 3 of 3 runs\n"),
            "{report}"
        );
    }

    #[test]
    fn a_run_is_a_subset_by_what_it_recorded_not_by_todays_set() {
        // No `only` (every run before it was recorded ran the whole set), or null: the whole set.
        assert!(!subset(&json!({})));
        assert!(!subset(&json!({"only": null})));
        // Recorded `only` but not yet what it left out: judged against the set of its day,
        // which a scenario added since cannot change.
        assert!(subset(&json!({"only": "S2"})));
        assert!(subset(&json!({"only": "S1,S2,S3a,S3b,S4,S5"})));
        assert!(!subset(&json!({"only": "s1, S2,S3,S4,S5"})));
        // Recorded what `--only` left out of its own set: that alone decides. A run whose set
        // had no S3c yet, and whose `only` named all of it, ran the whole set, though that
        // `only` does not select today's S3c (the old rule called it a subset).
        let all_of_its_day = json!({
            "only": "S1,S2,S3a,S3b,S4,S5",
            "scenarios_run": ["S1", "S2", "S3a", "S3b", "S4", "S5"],
            "scenarios_not_run": [],
        });
        assert!(!subset(&all_of_its_day));
        assert!(subset(&json!({
            "only": "S2",
            "scenarios_run": ["S2"],
            "scenarios_not_run": ["S1", "S3a", "S3b", "S3c", "S4", "S5", "S5b"],
        })));
        // Without `--only`, a run of a smaller set than today's ran the whole of its own.
        assert!(!subset(&json!({
            "only": null,
            "scenarios_run": ["S1", "S2"],
            "scenarios_not_run": [],
        })));
        // `--tally` counts it as a full-set run.
        let s2 = api_saw_the_clients(
            json!({"id": "S2", "load": {"errors_total": 0, "established": 10, "conns": 10,
                   "gateway": {"cpu_us_per_conn": 30.0, "cpu_from_clock": true}}}),
        );
        let mut full = all_of_its_day.clone();
        full["scenarios"] = json!([s2]);
        let report = tally(&[full]);
        assert!(
            report.starts_with("1 full-set run counted (none left out)\n"),
            "{report}"
        );
    }

    #[test]
    fn tally_also_counts_s1_against_the_start_up_figure_without_changing_the_verdict() {
        let s1 = |cold: u64, base: u64, after: u64| {
            api_saw_the_clients(
                json!({"id": "S1", "load": {"errors_total": 0, "established": 10, "conns": 10, "gateway": {"kib_per_conn_end": 3.0}},
                   "warm_up": {"established": 4, "sent": 20},
                   "gateway_cold_baseline": {"rss_kib": cold},
                   "gateway_baseline": {"rss_kib": base},
                   "gateway_after_leave": {"rss_kib": after}}),
            )
        };
        // Within 10% of the warmed baseline in all three; of the start-up figure in one.
        let runs = [
            json!({"scenarios": [s1(1000, 1050, 1050)]}),
            json!({"scenarios": [s1(1000, 1100, 1150)]}),
            json!({"scenarios": [s1(1000, 1150, 1200)]}),
        ];
        assert!(runs
            .iter()
            .all(|run| verdict(&run["scenarios"][0], false) == Some(true)));
        let report = tally(&runs);
        assert!(report.contains("S1: target met in 3 of 3 runs"), "{report}");
        assert!(
            report.contains(
                "% RSS after leave over the start-up figure ≤ 10 (informational, not part of \
                 the target): met in 1 of 3 (least 5, median 15, most 20)"
            ),
            "{report}"
        );
        // A run without the start-up figure says so.
        let old = json!({"scenarios": [{"id": "S1",
            "load": {"errors_total": 0, "established": 10, "conns": 10, "gateway": {"kib_per_conn_end": 3.0}},
            "gateway_baseline": {"rss_kib": 1000}, "gateway_after_leave": {"rss_kib": 1000}}]});
        let report = tally(&[old]);
        assert!(
            report.contains("the target): met in 0 of 1; 1 did not record it"),
            "{report}"
        );
    }

    #[test]
    fn s2_reports_the_cpu_of_the_connections_whole_life_without_judging_it() {
        let s2 = |before: Value, after: Value| {
            api_saw_the_clients(json!({"id": "S2", "gateway_after_leave": after,
                   "load": {"errors_total": 0, "established": 10_000, "conns": 10_000,
                            "gateway": {"cpu_us_per_conn": 39.0, "cpu_from_clock": true, "before": before}}}))
        };
        // From the CPU-time clock: 0.97 s over 10,000 connections.
        let r = s2(
            json!({"cpu_us": 10_000, "cpu_ns": 12_000_000}),
            json!({"cpu_us": 990_000, "cpu_ns": 982_000_000}),
        );
        assert_eq!(whole_life_cpu_us_per_conn(&r), Some(97.0));
        let table = markdown(std::slice::from_ref(&r), false);
        assert!(
            table.contains("whole life, with the DELETE and the close, 97 µs/conn"),
            "{table}"
        );
        // Informational: the connect phase's 39 µs meets the target whatever the whole life cost.
        assert_eq!(verdict(&r, false), Some(true));
        // An older run without the clock's figure: from the ticks.
        let r = s2(json!({"cpu_us": 10_000}), json!({"cpu_us": 990_000}));
        assert_eq!(whole_life_cpu_us_per_conn(&r), Some(98.0));
        let r = s2(json!({"cpu_us": 10_000}), Value::Null);
        assert_eq!(whole_life_cpu_us_per_conn(&r), None);
    }

    #[test]
    fn markdown_has_one_row_per_scenario() {
        let rows = [api_saw_the_clients(
            json!({"id": "S2", "title": "storm", "load": {"errors_total": 0, "established": 10, "conns": 10, "gateway": {"cpu_us_per_conn": 30.0, "cpu_from_clock": true}}}),
        )];
        let md = markdown(&rows, false);
        assert_eq!(md.lines().count(), 3, "{md}");
        assert!(
            md.contains("30 µs CPU/conn") && md.contains("(met)"),
            "{md}"
        );
    }

    #[test]
    fn a_cpu_figure_from_clock_ticks_is_met_or_missed_only_beyond_their_rounding() {
        let s2 = |us: f64, from_clock: Option<bool>| {
            let mut gateway = json!({"cpu_us_per_conn": us});
            if let Some(from_clock) = from_clock {
                gateway["cpu_from_clock"] = json!(from_clock);
            }
            api_saw_the_clients(json!({"id": "S2", "load": {"errors_total": 0,
                   "established": 10_000, "conns": 10_000, "gateway": gateway}}))
        };
        // From the CPU-time clock: to the nanosecond, judged as it stands.
        assert_eq!(verdict(&s2(40.0, Some(true)), false), Some(true));
        assert_eq!(verdict(&s2(40.01, Some(true)), false), Some(false));
        // From 10-ms clock ticks (runs before 2026-12-01 20:28 have no `cpu_from_clock`): off
        // by up to 2 ticks over the 10,000 connections, 2 µs either way.
        assert_eq!(verdict(&s2(38.0, None), false), Some(true), "36-40 µs");
        assert_eq!(verdict(&s2(40.0, None), false), None, "38-42 µs: undecided");
        assert_eq!(
            verdict(&s2(41.99, Some(false)), false),
            None,
            "39.99-43.99 µs"
        );
        // The 2 ticks are a bound the error stays under: 42 from ticks was over 40.
        assert_eq!(verdict(&s2(42.0, None), false), Some(false));
        let table = markdown(&[s2(40.0, None)], false);
        assert!(
            table.contains("(undecided: µs CPU/conn 40 vs ≤ 40 (from 10-ms clock ticks, ± 2))"),
            "{table}"
        );
        let missed = markdown(&[s2(54.0, None)], false);
        assert!(
            missed.contains("µs CPU/conn 54 vs ≤ 40 (1.4× off) (from 10-ms clock ticks, ± 2)"),
            "{missed}"
        );
        // Per message, the same 2 ticks over a million replies: 0.02 µs.
        let s3a = |us: f64| {
            api_saw_the_clients(json!({"id": "S3a", "load": {"errors_total": 0,
                   "established": 100, "conns": 100, "replies": 1_000_000,
                   "replies_per_s": 55_000.0, "gateway": {"cpu_us_per_msg": us}}}))
        };
        assert_eq!(verdict(&s3a(11.98), false), Some(true));
        assert_eq!(verdict(&s3a(12.0), false), None);
        assert_eq!(verdict(&s3a(12.03), false), Some(false));
        // The tally counts the undecided apart, neither met nor missed.
        let run = |r: Value| json!({"scenarios": [r]});
        let report = tally(&[
            run(s2(40.0, None)),
            run(s2(37.1, Some(true))),
            run(s2(45.0, Some(true))),
        ]);
        assert!(
            report.contains("S2: target met in 1 of 3 runs, undecided in 1\n"),
            "{report}"
        );
        assert!(
            report.contains(
                "µs CPU/conn ≤ 40: met in 1 of 3, undecided in 1 (least 37.10, median 40, most 45)"
            ),
            "{report}"
        );
    }

    #[test]
    fn tally_gives_s4_apart_by_what_its_latency_was_timed_from() {
        let s4 = |p99: f64, latency_from: Option<&str>, send_lag: bool| {
            let mut r = api_saw_the_clients(
                json!({"id": "S4", "load": {"errors_total": 0, "latency": {"p99_ms": p99},
                   "conns": 15000, "established": 15000, "interval_ms": 1000, "sent": 900_000,
                   "send_window_s": 60.0}}),
            );
            if let Some(from) = latency_from {
                r["load"]["latency_from"] = json!(from);
            }
            if send_lag {
                r["load"]["send_lag"] =
                    json!({"count": 900_000, "p50_ms": 1.0, "p99_ms": 2.5, "max_ms": 30.0});
            }
            r
        };
        let run = |started: &str, r: Value| json!({"started_utc": started, "scenarios": [r]});
        let s5 = api_saw_the_clients(
            json!({"id": "S5", "push": {"pushes_per_s": 60_000.0, "count": 10, "ok": 10},
                   "load": {"errors_total": 0, "established": 10, "conns": 10, "pushes": 10,
                   "push_latency": {"p99_ms": 5.0}}}),
        );
        let report = tally(&[
            // Before the set of 2026-12-01 20:28, `load` timed each message from its send and
            // did not say so: the date tells.
            json!({"started_utc": "2026-12-01T2001Z", "scenarios": [s4(7.0, None, false), s5]}),
            run("2026-12-01T2001Z", s4(12.0, None, false)),
            // From that set on, from its schedule, all of its lateness charged: no send lag.
            run("2026-12-01T2028Z", s4(9.0, None, false)),
            run("2026-12-02T0126Z", s4(14.0, None, false)),
            // From the set of 2026-12-02 03:31 on, less up to 1 ms of the timer's lateness, and
            // the send lag recorded; from 07:43 on `load` also says it timed from the schedule.
            run("2026-12-02T0331Z", s4(9.5, None, true)),
            json!({"scenarios": [s4(8.0, Some("schedule"), true)]}),
            run("2026-12-02T0750Z", s4(13.5, Some("schedule"), true)),
        ]);
        assert!(
            report.contains(
                "S4, latency timed from the send (before 2026-12-01 20:28): target met in 1 of \
                 2 runs\n  errors ≤ 0: met in 2 of 2"
            ),
            "{report}"
        );
        assert!(
            report.contains(
                "S4, latency timed from the schedule, the timer's own lateness included (no \
                 send_lag recorded): target met in 1 of 2 runs\n  errors ≤ 0: met in 2 of 2 \
                 (least 0, median 0, most 0)\n  connections established ≥ 15000: met in 2 of 2 \
                 (least 15000, median 15000, most 15000)\n  p99 ms ≤ 10: met in 1 of 2 (least \
                 9, median 11.50, most 14)"
            ),
            "{report}"
        );
        assert!(
            report.contains(
                "S4, latency timed from the schedule less up to 1 ms of the timer's own lateness \
                 (send_lag recorded): target met in 2 of 3 runs\n  errors ≤ 0: met in 3 of 3 \
                 (least 0, median 0, most 0)\n  connections established ≥ 15000: met in 3 of 3 \
                 (least 15000, median 15000, most 15000)\n  p99 ms ≤ 10: met in 2 of 3 (least \
                 8, median 9.50, most 13.50)"
            ),
            "{report}"
        );
        assert!(!report.contains("S4: "), "{report}");
        // The groups side by side, before the scenario that came after S4 in the runs.
        let (send, included, less, s5) = (
            report.find("S4, latency timed from the send").unwrap(),
            report
                .find("S4, latency timed from the schedule, ")
                .unwrap(),
            report
                .find("S4, latency timed from the schedule less")
                .unwrap(),
            report.find("S5: ").unwrap(),
        );
        assert!(send < included && included < less && less < s5, "{report}");
    }

    #[test]
    fn tally_leaves_out_a_b_runs_with_a_label_or_a_gateway_binary_given() {
        let s2 = api_saw_the_clients(
            json!({"id": "S2", "load": {"errors_total": 0, "established": 10, "conns": 10,
                   "gateway": {"cpu_us_per_conn": 30.0, "cpu_from_clock": true}}}),
        );
        let run = |extra: Value| {
            let mut run = json!({"scenarios": [s2.clone()]});
            for (k, v) in extra.as_object().unwrap() {
                run[k] = v.clone();
            }
            run
        };
        let runs = [
            run(json!({"label": "", "gateway_bin": "/work/main/target/release/ws2http"})),
            run(json!({"label": "ab-head", "gateway_bin": "/work/main/target/release/ws2http"})),
            // A result from before the runner said whether --gateway-bin was given: the
            // default was the `ws2http` beside the runner, in `target/release`.
            run(json!({"label": "", "gateway_bin": "/tmp/ws2http-head"})),
            run(json!({"gateway_bin": "target/release/ws2http"})),
            // Since it says, its word counts, wherever the target directory is.
            run(
                json!({"label": "", "gateway_bin": "/tmp/target-x/release/ws2http",
                       "gateway_bin_given": false}),
            ),
            run(
                json!({"label": "", "gateway_bin": "/x/target/release/ws2http",
                       "gateway_bin_given": true}),
            ),
        ];
        let report = tally(&runs);
        assert!(
            report.starts_with(
                "3 full-set runs counted (3 left out: 1 with --label (an A/B experiment), 2 \
                 with --gateway-bin (not the gateway the runner built))\n"
            ),
            "{report}"
        );
        assert!(report.contains("S2: target met in 3 of 3 runs"), "{report}");
    }

    #[test]
    fn the_results_name_the_gateway_binary_by_its_sha256() {
        let bin = std::env::temp_dir().join(format!("ws2http-sha-{}", std::process::id()));
        std::fs::write(&bin, "abc").unwrap();
        let identity = gateway_identity(&bin, true);
        let _ = std::fs::remove_file(&bin);
        assert_eq!(
            identity,
            json!({
                "gateway_bin": bin.display().to_string(),
                "gateway_bin_given": true,
                // SHA-256("abc"), FIPS 180-2's first example.
                "gateway_sha256":
                    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            })
        );
        // A binary that cannot be read has no hash rather than a made-up one.
        assert!(gateway_identity(&bin, false)["gateway_sha256"].is_null());
    }

    #[test]
    fn s3c_floods_with_eight_in_flight_and_is_judged_on_errors_and_order() {
        let s3c = scenarios(false)
            .into_iter()
            .find(|sc| sc.id == "S3c")
            .expect("S3c in the standard set");
        let args = s3c.load_args.join(" ");
        for part in [
            "--mode flood",
            "--in-flight 8",
            "--conns 100",
            "--duration 5",
        ] {
            assert!(args.contains(part), "{part}: {args}");
        }
        // The gateway keeps up to eight of a connection's messages at the API: its own
        // reordering is exercised, not only the socket's.
        assert_eq!(s3c.gateway_args, ["--pipeline", "8"]);
        assert_eq!(scenario_flags(s3c.gateway_args, &[]), ["--pipeline", "8"]);
        let given = [
            "--upstream-http2".to_owned(),
            "--pipeline".to_owned(),
            "2".to_owned(),
        ];
        assert!(scenario_flags(s3c.gateway_args, &given).is_empty());
        assert!(scenarios(false)
            .iter()
            .all(|sc| sc.id == "S3c" || sc.gateway_args.is_empty()));
        assert!(selected("S3c", Some("S3")) && !selected("S3c", Some("S3a")));
        let r = |errors: Value| {
            let total: u64 = errors
                .as_object()
                .unwrap()
                .values()
                .filter_map(Value::as_u64)
                .sum();
            api_saw_the_clients(json!({"id": "S3c", "title": "flood",
                   "load": {"errors_total": total, "errors": errors, "established": 100,
                   "conns": 100, "sent": 500_000, "replies": 500_000,
                   "replies_per_s": 98_765.0, "latency": {"p99_ms": 9.0},
                   "gateway": {"cpu_us_per_msg": 21.5, "cpu_from_clock": true}}}))
        };
        // Replies/s and CPU per message are reported, not judged.
        let kept = r(json!({}));
        assert_eq!(verdict(&kept, false), Some(true));
        let table = markdown(std::slice::from_ref(&kept), false);
        assert!(
            table.contains("**98765 replies/s**") && table.contains("**21.50 µs CPU/msg**"),
            "{table}"
        );
        let swapped = r(json!({"reply_out_of_order": 3}));
        assert_eq!(verdict(&swapped, false), Some(false));
        let table = markdown(std::slice::from_ref(&swapped), false);
        assert!(table.contains("replies out of order 3 vs ≤ 0"), "{table}");
        // A report without its error kinds cannot say the order was kept.
        let mut untold = kept.clone();
        untold["load"].as_object_mut().unwrap().remove("errors");
        assert_eq!(verdict(&untold, false), None);
        let report = tally(&[
            json!({"scenarios": [kept]}),
            json!({"scenarios": [swapped]}),
        ]);
        assert!(
            report.contains(
                "S3c: target met in 1 of 2 runs\n  replies out of order ≤ 0: met in 1 of 2"
            ),
            "{report}"
        );
    }
}
