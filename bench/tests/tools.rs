//! End-to-end checks of the bench tools against small websocket servers written here:
//! `load` must count clean echoes as replies, and must catch cross-talk, reordering, corrupted
//! replies, replies in the wrong frame type and pushes misdelivered, repeated, out of order or in
//! the wrong frame type; `push` must send one client id's pushes one after another, as text; `mock-api` must answer GET/POST/DELETE as the gateway expects and
//! report counters; `loopback` must report the round trips it made.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_websockets::{Message, ServerBuilder};

/// How the test server answers each message.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Echo the body unchanged, in the frame type the gateway would send it back in: text for
    /// a UTF-8 body without `Content-Type: application/octet-stream` (as `mock-api` answers),
    /// whichever type the request came in.
    Echo,
    /// Echo the frame unchanged, in the request's type: a binary request's UTF-8 echo comes
    /// back binary, which the gateway does not do.
    EchoInTheRequestsType,
    /// Echo with the connection index in the prefix increased by one.
    WrongConnection,
    /// Hold a message and answer the next one first, then the held one.
    SwapPairs,
    /// Echo with the last byte changed.
    CorruptLastByte,
    /// Echo without the last byte.
    CutLastByte,
    /// Echo with one more padding byte.
    AppendPadding,
    /// Echo the first 16 bytes only, as `mock-api --reply-bytes 16`.
    EchoFirst16,
    /// Send one push for the client id of the request's path right after the handshake,
    /// echo nothing.
    PushOnce,
    /// The same, but the push names the next client id: delivered to the wrong socket.
    PushToTheWrongClient,
    /// The same push for the client id as `PushOnce`, but in a binary frame: the gateway
    /// delivers `push`'s pushes, posted without `Content-Type: application/octet-stream`, as
    /// text.
    PushOnceBinary,
    /// Send two pushes for the client id, the older first.
    PushTwoInOrder,
    /// Send one push for the client id twice.
    PushTheSameTwice,
    /// Send two pushes for the client id, the newer first.
    PushTwoNewerFirst,
    /// Close every connection with 1001 right after the handshake.
    CloseAtOnce,
    /// Hold every connection without ever reading from it: the client's sends block once the
    /// socket buffers are full.
    Stall,
}

/// Starts a websocket server with the given behaviour; returns its port.
async fn server(b: Behaviour) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let Ok((req, mut ws)) = ServerBuilder::new().accept(s).await else {
                    return;
                };
                // `load` opens /b<index> (its default --id-prefix).
                let index: u64 = req
                    .uri()
                    .path()
                    .trim_start_matches("/b")
                    .parse()
                    .unwrap_or(0);
                if let Behaviour::Stall = b {
                    // `ws` stays open, and unread, for as long as the test runs.
                    std::future::pending::<()>().await;
                }
                if let Behaviour::CloseAtOnce = b {
                    let _ = ws
                        .send(Message::close(
                            Some(tokio_websockets::CloseCode::GOING_AWAY),
                            "bye",
                        ))
                        .await;
                    while let Some(Ok(_)) = ws.next().await {}
                    return;
                }
                let push_to = match b {
                    Behaviour::PushOnce => Some(index),
                    Behaviour::PushToTheWrongClient => Some(index + 1),
                    _ => None,
                };
                if let Some(target) = push_to {
                    let _ = ws
                        .send(Message::text(ws2http_bench::proto::push_payload(target)))
                        .await;
                }
                if let Behaviour::PushOnceBinary = b {
                    let push = ws2http_bench::proto::push_payload(index);
                    let _ = ws.send(Message::binary(push.into_bytes())).await;
                }
                let sent = ws2http_bench::proto::now_ns();
                let (older, newer) = (
                    format!("push:{sent}:{index}"),
                    format!("push:{}:{index}", sent + 1_000),
                );
                let pushes = match b {
                    Behaviour::PushTwoInOrder => vec![older, newer],
                    Behaviour::PushTheSameTwice => vec![older.clone(), older],
                    Behaviour::PushTwoNewerFirst => vec![newer, older],
                    _ => vec![],
                };
                for p in pushes {
                    let _ = ws.send(Message::text(p)).await;
                }
                let mut held: Option<Message> = None;
                while let Some(Ok(m)) = ws.next().await {
                    if !(m.is_text() || m.is_binary()) {
                        continue;
                    }
                    let reply = match b {
                        Behaviour::Echo => {
                            let body = m.as_payload().to_vec();
                            Some(match String::from_utf8(body) {
                                Ok(text) => Message::text(text),
                                Err(e) => Message::binary(e.into_bytes()),
                            })
                        }
                        Behaviour::EchoInTheRequestsType => Some(m),
                        Behaviour::CorruptLastByte
                        | Behaviour::CutLastByte
                        | Behaviour::AppendPadding
                        | Behaviour::EchoFirst16 => {
                            let mut body = m.as_payload().to_vec();
                            match b {
                                Behaviour::CorruptLastByte => *body.last_mut().unwrap() = b'y',
                                Behaviour::CutLastByte => {
                                    body.pop();
                                }
                                Behaviour::AppendPadding => body.push(b'x'),
                                _ => body.truncate(16),
                            }
                            Some(Message::text(String::from_utf8(body).unwrap()))
                        }
                        Behaviour::PushOnce
                        | Behaviour::PushToTheWrongClient
                        | Behaviour::PushOnceBinary
                        | Behaviour::PushTwoInOrder
                        | Behaviour::PushTheSameTwice
                        | Behaviour::PushTwoNewerFirst
                        | Behaviour::CloseAtOnce
                        | Behaviour::Stall => None,
                        Behaviour::WrongConnection => {
                            let text = String::from_utf8_lossy(m.as_payload()).to_string();
                            let (conn, rest) = text[1..].split_once(':').unwrap();
                            let conn: u64 = conn.parse().unwrap();
                            Some(Message::text(format!("c{}:{rest}", conn + 1)))
                        }
                        Behaviour::SwapPairs => match held.take() {
                            None => {
                                held = Some(m);
                                None
                            }
                            Some(first) => {
                                if ws.send(m).await.is_err() {
                                    return;
                                }
                                Some(first)
                            }
                        },
                    };
                    if let Some(r) = reply {
                        if ws.send(r).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Runs the `load` binary with `extra` arguments against `port`; returns its JSON report.
async fn run_load(port: u16, extra: &[&str]) -> Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_load"))
        .args(["--url", &format!("ws://127.0.0.1:{port}/"), "--quiet"])
        .args(extra)
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("load runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a report line")).expect("JSON report")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_over_two_processes_counts_clean_echoes_as_replies() {
    let port = server(Behaviour::Echo).await;
    let r = run_load(
        port,
        &[
            "--conns",
            "20",
            "--mode",
            "flood",
            "--in-flight",
            "3",
            "--processes",
            "2",
            "--duration",
            "1",
            "--source-ips",
            "4",
            "--payload",
            "100",
        ],
    )
    .await;
    assert_eq!(r["established"], 20, "{r}");
    assert_eq!(r["errors_total"], 0, "{r}");
    let replies = r["replies"].as_u64().unwrap();
    assert!(replies > 100, "{r}");
    assert_eq!(
        r["sent"].as_u64().unwrap(),
        replies,
        "every sent message answered"
    );
    assert_eq!(r["latency"]["count"].as_u64().unwrap(), replies);
    assert!(r["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    // A closed loop has no schedule: its latency is timed from each send, and says so.
    assert_eq!(r["latency_from"], "send", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_mode_sends_about_one_message_per_interval() {
    let port = server(Behaviour::Echo).await;
    let r = run_load(
        port,
        &[
            "--conns",
            "10",
            "--mode",
            "rate",
            "--interval-ms",
            "100",
            "--duration",
            "1",
            "--binary",
        ],
    )
    .await;
    assert_eq!(r["errors_total"], 0, "{r}");
    let replies = r["replies"].as_u64().unwrap();
    // 10 connections × ~10 ticks in one second (first tick within the first interval); a
    // loaded machine's late wake-ups push later ticks back, so the floor is loose: what is
    // checked is "about one per interval", not hundreds.
    assert!((50..=120).contains(&replies), "{replies} replies: {r}");
    // Timed from each message's scheduled tick, and the report says so (`--tally` tells S4's
    // runs timed from the send apart by it).
    assert_eq!(r["latency_from"], "schedule", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_mode_times_a_late_message_from_its_schedule_and_catches_up() {
    use std::os::unix::process::CommandExt;
    let port = server(Behaviour::Echo).await;
    let ready = std::env::temp_dir().join(format!("ws2http-bench-late-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    // `load` and its worker in a process group of their own, so that both can be stopped.
    let mut load = Command::new(env!("CARGO_BIN_EXE_load"));
    load.args(["--url", &format!("ws://127.0.0.1:{port}/"), "--quiet"])
        .args(["--conns", "1", "--mode", "rate", "--interval-ms", "10"])
        .args(["--duration", "2"])
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0);
    let child = load.spawn().expect("load starts");
    let group = child.id() as libc::pid_t;
    let connected = tokio::time::timeout(Duration::from_secs(30), async {
        while !ready.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if connected.is_err() {
        // SAFETY: a signal to the process group of our own child.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        panic!("load did not connect within 30 s");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The load generator gets no CPU for 400 ms, as on a machine short of it: the ticks due
    // meanwhile are sent late.
    // SAFETY: signals to the process group of our own child.
    unsafe { libc::kill(-group, libc::SIGSTOP) };
    tokio::time::sleep(Duration::from_millis(400)).await;
    // SAFETY: as above.
    unsafe { libc::kill(-group, libc::SIGCONT) };
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .unwrap_or_else(|_| {
        // SAFETY: as above.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        panic!("load did not end within 60 s of a 2-s run");
    })
    .unwrap()
    .expect("load ends");
    let _ = std::fs::remove_file(&ready);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.lines().last().expect("a report line")).unwrap();
    assert_eq!(r["errors_total"], 0, "{r}");
    // The wait counts: the first message due in the stall waited about 400 ms for its send.
    let max = r["latency"]["max_ms"].as_f64().unwrap();
    assert!(
        max >= 300.0,
        "latency timed from the send, not the schedule: {r}"
    );
    // The missed ticks were sent once the generator woke: about 2 s / 10 ms of them, not 40
    // fewer (a loaded machine's wake-ups aside).
    let sent = r["sent"].as_u64().unwrap();
    assert!(
        sent >= 185,
        "the late ticks were skipped ({sent} sent): {r}"
    );
    // Every message's lateness is reported, the stall's too; and the send window, go to
    // stop, is the run's 2 s.
    assert_eq!(r["send_lag"]["count"].as_u64(), Some(sent), "{r}");
    let lag_max = r["send_lag"]["max_ms"].as_f64().unwrap();
    assert!(lag_max >= 300.0, "the stall is in the send lag: {r}");
    let window = r["send_window_s"].as_f64().unwrap();
    assert!((1.9..2.5).contains(&window), "send window {window} s: {r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stuck_in_a_send_is_stopped_at_the_report_deadline() {
    let port = server(Behaviour::Stall).await;
    let started = std::time::Instant::now();
    // 64 messages of 1 MB in flight to a server that never reads: far more than the socket
    // buffers hold, so the worker's first sends never finish and it never drains.
    let load = tokio::process::Command::new(env!("CARGO_BIN_EXE_load"))
        .args(["--url", &format!("ws://127.0.0.1:{port}/"), "--quiet"])
        .args(["--conns", "1", "--mode", "flood", "--in-flight", "64"])
        .args([
            "--payload",
            "1000000",
            "--duration",
            "0.5",
            "--drain-ms",
            "200",
        ])
        .args(["--report-grace", "1"])
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), load)
        .await
        .expect("load ended by itself")
        .expect("load runs");
    let elapsed = started.elapsed();
    assert!(!out.status.success(), "a timed-out run exits non-zero");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(stdout.lines().last().expect("a report line")).unwrap();
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["errors"]["worker_timeout"], 1, "{r}");
    assert_eq!(r["established"], 1, "{r}");
    // The duration, the drain and the grace (1.7 s), with room for a slow machine.
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_naming_another_connection_are_reported_as_crosstalk() {
    let port = server(Behaviour::WrongConnection).await;
    let r = run_load(
        port,
        &[
            "--conns",
            "4",
            "--mode",
            "flood",
            "--duration",
            "0.5",
            "--drain-ms",
            "200",
        ],
    )
    .await;
    assert_eq!(r["replies"], 0, "{r}");
    assert!(r["errors"]["reply_crosstalk"].as_u64().unwrap() >= 4, "{r}");
    assert!(r["errors"]["reply_missing"].as_u64().unwrap() >= 4, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_replies_are_reported_as_out_of_order() {
    let port = server(Behaviour::SwapPairs).await;
    let r = run_load(
        port,
        &[
            "--conns",
            "2",
            "--mode",
            "flood",
            "--in-flight",
            "2",
            "--duration",
            "0.5",
        ],
    )
    .await;
    assert!(
        r["errors"]["reply_out_of_order"].as_u64().unwrap() > 0,
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_out_of_order_is_an_error_but_the_flood_keeps_its_requests_in_flight() {
    // Every second reply comes before the one due: an error each time, but it answered a
    // request, so its slot is refilled. Were it not, each connection would be down to one
    // request in flight after two pairs, which the server holds for a partner that never comes.
    let port = server(Behaviour::SwapPairs).await;
    let r = run_load(
        port,
        &[
            "--conns",
            "1",
            "--mode",
            "flood",
            "--in-flight",
            "4",
            "--duration",
            "0.5",
            "--drain-ms",
            "200",
        ],
    )
    .await;
    let replies = r["replies"].as_u64().unwrap();
    let out_of_order = r["errors"]["reply_out_of_order"].as_u64().unwrap_or(0);
    assert!(
        replies >= 10,
        "the flood stopped after {replies} replies: {r}"
    );
    assert!(out_of_order >= 10, "{r}");
    // Each request sent ends once: answered, answered out of order, or missing at the end.
    let missing = r["errors"]["reply_missing"].as_u64().unwrap_or(0);
    assert_eq!(
        r["sent"].as_u64(),
        Some(replies + out_of_order + missing),
        "{r}"
    );
    assert!(missing <= 1, "only a request held at the end: {r}");
}

/// Runs a 0.5-s flood of 4 connections, 2 messages in flight each, 64-byte messages.
async fn short_flood(port: u16, extra: &[&str]) -> Value {
    let mut args = vec![
        "--conns",
        "4",
        "--mode",
        "flood",
        "--in-flight",
        "2",
        "--duration",
        "0.5",
        "--drain-ms",
        "500",
    ];
    args.extend_from_slice(extra);
    run_load(port, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_with_a_changed_missing_or_extra_tail_are_reported_as_corrupted() {
    for b in [
        Behaviour::CorruptLastByte,
        Behaviour::CutLastByte,
        Behaviour::AppendPadding,
    ] {
        let port = server(b).await;
        let r = short_flood(port, &[]).await;
        assert_eq!(r["replies"], 0, "none counted a reply: {r}");
        let corrupted = r["errors"]["reply_corrupted"].as_u64().unwrap_or(0);
        // Each one answered its request, so the flood went on and none is missing.
        assert!(corrupted > 8, "{r}");
        assert_eq!(r["sent"].as_u64(), Some(corrupted), "{r}");
        assert_eq!(r["errors_total"].as_u64(), Some(corrupted), "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_in_another_frame_type_than_the_gateway_promises_is_an_error() {
    // Binary requests, echoed as text as the gateway does (the answer is UTF-8, without an
    // octet-stream Content-Type): clean replies.
    let port = server(Behaviour::Echo).await;
    let r = short_flood(port, &["--binary"]).await;
    assert_eq!(r["errors_total"], 0, "{r}");
    assert!(r["replies"].as_u64().unwrap() > 8, "{r}");
    // The same bytes back in a binary frame: none is a reply, each an error that answered its
    // request, so the flood went on.
    let port = server(Behaviour::EchoInTheRequestsType).await;
    let r = short_flood(port, &["--binary"]).await;
    assert_eq!(r["replies"], 0, "{r}");
    let wrong = r["errors"]["reply_wrong_type"].as_u64().unwrap_or(0);
    assert!(wrong > 8, "{r}");
    assert_eq!(r["sent"].as_u64(), Some(wrong), "{r}");
    assert_eq!(r["errors_total"].as_u64(), Some(wrong), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cut_as_the_api_was_told_pass_only_when_load_is_told_too() {
    let port = server(Behaviour::EchoFirst16).await;
    let told = short_flood(port, &["--reply-bytes", "16"]).await;
    assert_eq!(told["errors_total"], 0, "{told}");
    assert!(told["replies"].as_u64().unwrap() > 8, "{told}");
    let not_told = short_flood(port, &[]).await;
    assert_eq!(not_told["replies"], 0, "{not_told}");
    assert!(
        not_told["errors"]["reply_corrupted"].as_u64().unwrap() > 8,
        "{not_told}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_time_pushed_messages() {
    let port = server(Behaviour::PushOnce).await;
    let r = run_load(
        port,
        &["--conns", "8", "--mode", "idle", "--duration", "0.5"],
    )
    .await;
    assert_eq!(r["pushes"], 8, "{r}");
    assert_eq!(r["push_latency"]["count"], 8, "{r}");
    assert_eq!(r["errors_total"], 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_for_another_client_id_is_reported_as_misdelivered() {
    let port = server(Behaviour::PushToTheWrongClient).await;
    let r = run_load(
        port,
        &["--conns", "8", "--mode", "idle", "--duration", "0.5"],
    )
    .await;
    assert_eq!(r["pushes"], 0, "none counted delivered: {r}");
    assert_eq!(r["errors"]["push_misdelivered"], 8, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_in_another_frame_type_than_the_gateway_promises_is_an_error() {
    // `push`'s pushes are text (no octet-stream Content-Type): one in a binary frame is an
    // error, not a delivery.
    let port = server(Behaviour::PushOnceBinary).await;
    let r = run_load(
        port,
        &["--conns", "8", "--mode", "idle", "--duration", "0.5"],
    )
    .await;
    assert_eq!(r["pushes"], 0, "none counted delivered: {r}");
    assert_eq!(r["push_latency"]["count"], 0, "{r}");
    assert_eq!(r["errors"]["push_wrong_type"], 8, "{r}");
    assert_eq!(r["errors_total"], 8, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_delivered_twice_or_after_a_newer_one_is_an_error_not_a_delivery() {
    let idle = ["--conns", "8", "--mode", "idle", "--duration", "0.5"];
    let port = server(Behaviour::PushTwoInOrder).await;
    let r = run_load(port, &idle).await;
    assert_eq!(r["pushes"], 16, "{r}");
    assert_eq!(r["errors_total"], 0, "{r}");
    let port = server(Behaviour::PushTheSameTwice).await;
    let r = run_load(port, &idle).await;
    assert_eq!(r["pushes"], 8, "the first of each pair: {r}");
    assert_eq!(r["push_latency"]["count"], 8, "{r}");
    assert_eq!(r["errors"]["push_duplicate"], 8, "{r}");
    assert_eq!(r["errors_total"], 8, "{r}");
    let port = server(Behaviour::PushTwoNewerFirst).await;
    let r = run_load(port, &idle).await;
    assert_eq!(r["pushes"], 8, "{r}");
    assert_eq!(r["errors"]["push_out_of_order"], 8, "{r}");
    assert_eq!(r["errors_total"], 8, "{r}");
}

/// A control API for `push`: answers each `POST /b<id>` 200 after 20 ms and records, per
/// client id, the send times in the bodies in the order they came, and whether a POST for an id
/// came while another for it was still unanswered. Returns its port and the record.
async fn control_api() -> (u16, std::sync::Arc<std::sync::Mutex<ControlLog>>) {
    use http_body_util::{BodyExt, Full};
    let log = std::sync::Arc::new(std::sync::Mutex::new(ControlLog::default()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let shared = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let log = shared.clone();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let log = log.clone();
                    async move {
                        let id = req.uri().path().trim_start_matches("/b").to_string();
                        // The gateway's rule: binary when the type (before any `;`) is
                        // application/octet-stream, in any case.
                        let octet_stream = req
                            .headers()
                            .get(hyper::header::CONTENT_TYPE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.split(';').next())
                            .is_some_and(|t| {
                                t.trim().eq_ignore_ascii_case("application/octet-stream")
                            });
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let sent: u128 = String::from_utf8_lossy(&body)
                            .split(':')
                            .nth(1)
                            .and_then(|t| t.parse().ok())
                            .expect("push:<ns>:<i>");
                        {
                            let mut log = log.lock().unwrap();
                            if !log.in_flight.insert(id.clone()) {
                                log.overlaps += 1;
                            }
                            log.sent.entry(id.clone()).or_default().push(sent);
                            log.binary += u64::from(octet_stream);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        log.lock().unwrap().in_flight.remove(&id);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    (port, log)
}

/// What [`control_api`] saw.
#[derive(Default)]
struct ControlLog {
    /// Client ids with a POST unanswered.
    in_flight: std::collections::HashSet<String>,
    /// POSTs that came for a client id while another for it was unanswered.
    overlaps: u64,
    /// Per client id, the send times of its pushes in the order they came.
    sent: std::collections::HashMap<String, Vec<u128>>,
    /// POSTs with `Content-Type: application/octet-stream`: pushes the gateway would deliver
    /// as binary frames.
    binary: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_sends_the_rounds_for_one_client_id_one_after_another() {
    let (port, log) = control_api().await;
    // 3 client ids, 4 rounds, 8 POSTs in flight: room for several rounds at once.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_push"))
        .args(["--control", &format!("http://127.0.0.1:{port}/"), "--quiet"])
        .args(["--count", "3", "--rounds", "4", "--concurrency", "8"])
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("push runs");
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["ok"], 12, "{r}");
    let log = log.lock().unwrap();
    assert_eq!(
        log.overlaps, 0,
        "a client id's next push came before the last was answered"
    );
    assert_eq!(log.sent.len(), 3);
    // What `load` expects of `push`'s pushes (proto::PUSH_BINARY): text frames, so no POST
    // says octet-stream.
    assert_eq!(
        log.binary > 0,
        ws2http_bench::proto::PUSH_BINARY,
        "{} of 12 POSTs said application/octet-stream",
        log.binary
    );
    for (id, sent) in &log.sent {
        assert_eq!(sent.len(), 4, "client id {id}");
        assert!(
            sent.windows(2).all(|w| w[0] < w[1]),
            "client id {id}: send times {sent:?} not increasing in arrival order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_counted_by_kind() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let r = run_load(port, &["--conns", "3", "--duration", "0"]).await;
    assert_eq!(r["established"], 0, "{r}");
    assert_eq!(r["errors"]["connect_ConnectionRefused"], 3, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_are_retried_with_backoff_only_when_asked() {
    let port = server(Behaviour::CloseAtOnce).await;
    let once = run_load(port, &["--conns", "3", "--duration", "1"]).await;
    assert_eq!(once["reconnects"], 0, "{once}");
    assert_eq!(once["errors"]["closed_by_server_1001"], 3, "{once}");
    let again = run_load(port, &["--conns", "3", "--duration", "1", "--reconnect"]).await;
    // Backoff starts at 100 ms and doubles: within about a second each connection retries
    // a few times, not hundreds.
    let r = again["reconnects"].as_u64().unwrap();
    assert!((6..=30).contains(&r), "{r} reconnects: {again}");
    assert!(again["connects_per_s"].as_f64().is_some());
}

fn http(port: u16, req: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn mock_api_answers_like_the_gateway_expects_and_counts() {
    // Port 0 and the address mock-api prints: a port picked here and handed over could be
    // taken by another test's socket before the child binds it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mock-api"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    // Keep reading its stderr so that a later message never meets a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let port: u16 = line
        .trim()
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("mock-api did not say where it listens: {line:?}"));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "mock-api listening on {port}"
    );
    let get = http(
        port,
        "GET /b1?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        get.starts_with("HTTP/1.1 200") && get.ends_with("\r\n\r\nok"),
        "{get}"
    );
    let post = http(
        port,
        "POST /b1 HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\nConnection: close\r\n\r\nc1:2;xxxx",
    );
    assert!(post.ends_with("\r\n\r\nc1:2;xxxx"), "{post}");
    let del = http(
        port,
        "DELETE /b1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nEOF",
    );
    assert!(del.ends_with("\r\n\r\nok"), "{del}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["get"].as_u64(), v["post"].as_u64(), v["delete"].as_u64()),
        (Some(1), Some(1), Some(1)),
        "{v}"
    );
}

#[test]
fn loopback_reports_its_round_trips_and_refuses_zero_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_loopback"))
        .args(["--round-trips", "500"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["round_trips"].as_u64(), Some(500), "{v}");
    let cpu = v["echo_cpu_us"].as_f64().unwrap();
    let kernel = v["echo_kernel_us"].as_f64().unwrap();
    assert!(cpu > 0.0 && kernel <= cpu, "{v}");
    assert!(v["wall_us"].as_f64().unwrap() > 0.0, "{v}");

    let refused = Command::new(env!("CARGO_BIN_EXE_loopback"))
        .args(["--round-trips", "0"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--round-trips"), "{stderr}");
}
