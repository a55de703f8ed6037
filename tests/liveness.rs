//! Liveness: the gateway pings quiet clients, closes those that answer nothing within the ping
//! timeout and those without data messages within the idle timeout, answers client pings, and
//! never passes control frames to the API.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use common::raw_ws::{encode_client_frame, RawWs, CLOSE, CONTINUATION, PING, PONG, TEXT};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_websockets::{CloseCode, Message};

fn closed_by(metrics: &HashMap<String, f64>, reason: &str) -> f64 {
    metrics[&format!("connections_closed_by_reason{{reason=\"{reason}\"}}")]
}

#[tokio::test]
async fn pings_go_out_at_the_ping_interval_and_a_client_that_answers_stays_connected() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = Some(Duration::from_millis(150));
    config.ping_timeout = Duration::from_millis(600);
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/quiet").await;
    // Read (which also sends the library's automatic pongs) for twice the ping timeout.
    let mut pings = 0;
    let until = Instant::now() + Duration::from_millis(1200);
    while let Ok(item) = tokio::time::timeout_at(until, ws.next()).await {
        let message = item.expect("open").expect("no error");
        assert!(message.is_ping(), "only pings arrive: {message:?}");
        pings += 1;
    }
    // One ping per 150 ms of silence, the pong resetting the clock: about 7 in 1.2 s.
    assert!((3..=9).contains(&pings), "{pings} pings in 1.2 s");
    assert_eq!(round_trip(&mut ws, "still here").await, "echo:still here");
    assert!(api.seen_with("DELETE").is_empty());
    assert_eq!(gateway.metrics().await["connections_active"], 1.0);
    assert_accounting(&gateway, &api, 1).await;
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed_with_ping_timeout() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    // Windows of seconds, not fractions: a loaded 2-core machine must not blur them.
    config.ping_interval = Some(Duration::from_millis(250));
    config.ping_timeout = Duration::from_secs(1);
    let gateway = TestGateway::start(config).await;
    let connected = Instant::now();
    let mut raw = RawWs::connect(gateway.public, "/mute").await;
    let mut pings = 0;
    let close = loop {
        let frame = raw
            .read_frame(Duration::from_secs(5))
            .await
            .expect("a close frame before the end");
        match frame.opcode {
            PING => pings += 1,
            CLOSE => break frame,
            other => panic!("unexpected opcode {other}"),
        }
    };
    let took = connected.elapsed();
    assert!(pings >= 1, "pinged before being given up on");
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(close.close_reason(), "ping timeout");
    assert!(
        took >= Duration::from_millis(980) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.body, Bytes::from_static(b"ping timeout"));
    assert_eq!(delete.header("x-close-code"), Some("1001"));
    assert_eq!(closed_by(&gateway.metrics().await, "ping_timeout"), 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn idle_timeout_closes_a_connection_without_data_messages() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = Some(Duration::from_millis(100));
    config.ping_timeout = Duration::from_secs(5);
    config.idle_timeout = Some(Duration::from_secs(2));
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/idle").await;
    // Data every 500 ms keeps it open well past the idle timeout (2 s: room for a loaded
    // machine's late wake-ups between two messages): messages from the client, then pushes
    // to it (the other way), which alone span more than the idle timeout.
    for i in 0..3 {
        let text = format!("m{i}");
        assert_eq!(round_trip(&mut ws, &text).await, format!("echo:{text}"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut last_push = Instant::now();
    for i in 0..5 {
        let text = format!("p{i}");
        // The push goes out (the last data message) after this instant.
        last_push = Instant::now();
        let pushed = gateway.control("POST", "/idle", text.as_bytes()).await;
        assert_eq!(pushed.status, 200, "push {i}: {}", pushed.text());
        assert_eq!(next_text(&mut ws).await, text);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(api.seen_with("DELETE").is_empty(), "closed while busy");
    // Then only pings and pongs: closed once the idle timeout has passed since the last push,
    // not before (the pings do not count as data, but neither does the quiet close at once).
    let (code, reason) = close_frame(&mut ws).await;
    let took = last_push.elapsed();
    assert_eq!((code, reason.as_str()), (1000, "idle timeout"));
    assert!(
        took >= Duration::from_millis(1200) && took < Duration::from_secs(4),
        "closed {took:?} after the last push, with a 2 s idle timeout"
    );
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.body, Bytes::from_static(b"idle timeout"));
    assert_eq!(delete.header("x-close-code"), Some("1000"));
    assert_eq!(closed_by(&gateway.metrics().await, "idle_timeout"), 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_pings_is_still_closed_at_its_idle_timeout() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = None;
    config.idle_timeout = Some(Duration::from_millis(500));
    let gateway = TestGateway::start(config).await;
    let raw = RawWs::connect(gateway.public, "/pinger").await;
    let (mut reader, mut writer) = raw.stream.into_split();
    // Pings, no data: 64 KiB of them per write, faster than the gateway answers them, so
    // that it always has more to read. Its pongs are read (and dropped) as they come, so its
    // writes never back up (which would stop its reading for a while).
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while matches!(reader.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let pings: Vec<u8> = std::iter::repeat_n(encode_client_frame(true, PING, b"x"), 64 * 1024 / 7)
        .flatten()
        .collect();
    let started = Instant::now();
    while api.seen_with("DELETE").is_empty() && started.elapsed() < Duration::from_secs(10) {
        if writer.write_all(&pings).await.is_err() {
            break; // closed
        }
    }
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(
        delete.body,
        Bytes::from_static(b"idle timeout"),
        "pings are no data"
    );
    assert!(
        delete.at - started < Duration::from_secs(5),
        "closed {:?} after the flood began, idle timeout 500 ms",
        delete.at - started
    );
    drop(writer);
    drain.abort();
    assert_eq!(closed_by(&gateway.metrics().await, "idle_timeout"), 1.0);
}

#[tokio::test]
async fn client_pings_are_answered_with_pongs_and_control_frames_never_reach_the_api() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = None;
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/pinger").await;
    for payload in ["one", "two"] {
        ws.send(Message::ping(payload)).await.unwrap();
        let pong = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a pong within 5s")
            .expect("open")
            .expect("no error");
        assert!(pong.is_pong(), "{pong:?}");
        assert_eq!(&pong.as_payload()[..], payload.as_bytes());
    }
    // An unsolicited pong is allowed and ignored.
    ws.send(Message::pong("unasked")).await.unwrap();
    assert_eq!(round_trip(&mut ws, "data").await, "echo:data");
    ws.close().await.unwrap();
    api.wait_for("DELETE", 1).await;
    let methods: Vec<_> = api.seen().iter().map(|s| s.method.clone()).collect();
    assert_eq!(methods, ["GET", "POST", "DELETE"]);
    assert_eq!(api.seen_with("POST")[0].body, Bytes::from_static(b"data"));
    assert_eq!(gateway.metrics().await["messages_received"], 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_client_waiting_on_a_slow_api_answer_is_not_closed_for_ping_timeout() {
    // The API takes longer than --ping-timeout; with --pipeline 1 the gateway reads nothing
    // from the client meanwhile, so it cannot hear its pongs, and must not count that.
    let api = MockApi::with_slow_posts("late reply", Duration::from_millis(1200)).await;
    let mut config = test_config(&api);
    config.ping_interval = Some(Duration::from_millis(100));
    config.ping_timeout = Duration::from_millis(400);
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/patient").await;
    // A close for ping timeout would end this with a panic ("the socket is open").
    assert_eq!(round_trip(&mut ws, "question").await, "late reply");
    // And again: a second slow answer, the client still there.
    assert_eq!(round_trip(&mut ws, "again").await, "late reply");
    // Closed by the client at once (it reads no pings from here on): its own close, not ours.
    ws.send(Message::close(Some(CloseCode::NORMAL_CLOSURE), "done"))
        .await
        .unwrap();
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.header("x-close-code"), Some("1000"), "{delete:?}");
    assert_eq!(delete.body, Bytes::from_static(b"done"));
    assert_eq!(closed_by(&gateway.metrics().await, "ping_timeout"), 0.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_message_at_a_slow_api_is_no_idleness() {
    // The API takes longer than --idle-timeout: the connection is busy, not idle, and the
    // idle time counts again from the answer (one with a reply, and one without).
    let api = MockApi::with_script(|seen| match (seen.method.as_str(), seen.body.as_ref()) {
        ("POST", b"quiet") => Reply::status(204, "").after(Duration::from_millis(2500)),
        ("POST", _) => Reply::ok("late reply").after(Duration::from_millis(2500)),
        _ => echo_script(seen),
    })
    .await;
    let mut config = test_config(&api);
    config.ping_interval = None;
    config.idle_timeout = Some(Duration::from_secs(1));
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/patient").await;
    assert_eq!(round_trip(&mut ws, "question").await, "late reply");
    ws.send(Message::text("quiet")).await.unwrap();
    api.wait_for("POST", 2).await;
    let asked = Instant::now();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1000, "idle timeout"));
    let took = asked.elapsed();
    // 2.5 s at the API, then 1 s idle; closed at 1 s it would have been idle while busy.
    assert!(
        took >= Duration::from_millis(3300),
        "closed {took:?} after the message"
    );
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.body, Bytes::from_static(b"idle timeout"));
    assert_eq!(closed_by(&gateway.metrics().await, "idle_timeout"), 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_client_sending_one_long_frame_slowly_is_not_closed_for_ping_timeout() {
    // Its bytes keep coming, but no whole frame (so no pong) for longer than --ping-timeout.
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = Some(Duration::from_millis(100));
    config.ping_timeout = Duration::from_millis(500);
    let gateway = TestGateway::start(config).await;
    let mut ws = RawWs::connect(gateway.public, "/slow-sender").await;
    let frame = encode_client_frame(true, TEXT, &[b'x'; 3000]);
    send_slowly(&mut ws, &frame).await;
    assert_eq!(reply_text_len(&mut ws).await, "echo:".len() + 3000);
    assert_eq!(closed_by(&gateway.metrics().await, "ping_timeout"), 0.0);
}

#[tokio::test]
async fn a_message_still_arriving_slowly_between_pongs_is_not_closed_for_idle_timeout() {
    // A large upload over a slow link is no idleness, though no whole message comes for
    // longer than --idle-timeout: here three 1,000-byte fragments, each in 100-byte pieces
    // 60 ms apart (1.8 s in all, against 500 ms), with a pong before each fragment. Without
    // pings of its own the gateway looks only at each idle deadline: a whole frame (a pong)
    // since the last look must not hide the message's bytes that came with it.
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = None;
    config.idle_timeout = Some(Duration::from_millis(500));
    let gateway = TestGateway::start(config).await;
    let mut ws = RawWs::connect(gateway.public, "/slow-uploader").await;
    let started = Instant::now();
    for (fin, opcode) in [(false, TEXT), (false, CONTINUATION), (true, CONTINUATION)] {
        ws.stream
            .write_all(&encode_client_frame(true, PONG, b""))
            .await
            .unwrap();
        send_slowly(&mut ws, &encode_client_frame(fin, opcode, &[b'x'; 1000])).await;
    }
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "slower than the timeout"
    );
    assert_eq!(reply_text_len(&mut ws).await, "echo:".len() + 3000);
    assert_eq!(closed_by(&gateway.metrics().await, "idle_timeout"), 0.0);
}

#[tokio::test]
async fn a_client_that_stops_part_way_through_a_message_is_closed_at_its_idle_timeout() {
    // Bytes of a message hold the idle timeout off only while they keep coming.
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = Some(Duration::from_millis(100));
    config.idle_timeout = Some(Duration::from_millis(500));
    let gateway = TestGateway::start(config).await;
    let mut ws = RawWs::connect(gateway.public, "/stopped-uploader").await;
    let frame = encode_client_frame(true, TEXT, &[b'x'; 3000]);
    send_slowly(&mut ws, &frame[..1000]).await;
    let stopped = Instant::now();
    let close = loop {
        let frame = ws
            .read_frame(Duration::from_secs(5))
            .await
            .expect("closed within 5 s of the last byte");
        if frame.opcode == CLOSE {
            break frame;
        }
    };
    assert_eq!(close.close_reason(), "idle timeout");
    // Within two timeouts (1 s; 2 s with room for a loaded machine's late timers): the idle
    // time counts from the last look that saw its bytes come. Three would be a regression.
    assert!(
        stopped.elapsed() < Duration::from_secs(2),
        "{:?}",
        stopped.elapsed()
    );
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.body, Bytes::from_static(b"idle timeout"));
    assert!(
        api.seen_with("POST").is_empty(),
        "half a message reached the API"
    );
}

/// Writes `bytes` in 100-byte pieces, 60 ms apart.
async fn send_slowly(ws: &mut RawWs, bytes: &[u8]) {
    for chunk in bytes.chunks(100) {
        ws.stream.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

/// Reads frames until a text one, checking that the connection stays open; its length.
async fn reply_text_len(ws: &mut RawWs) -> usize {
    loop {
        let frame = ws
            .read_frame(Duration::from_secs(5))
            .await
            .expect("the connection stays open");
        assert_ne!(frame.opcode, CLOSE, "closed: {}", frame.close_reason());
        if frame.opcode == TEXT {
            break frame.payload.len();
        }
    }
}
