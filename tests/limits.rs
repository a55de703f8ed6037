//! Limits and slow peers: the message size limit (whole and fragmented messages, pushes), the
//! bounded outbound queue and the slow-consumer close, the connection cap and the budget the
//! binary logs, the handshake deadline, the cap on concurrent API requests, and the cap on
//! control connections.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::binary::Binary;
use common::raw_ws::{encode_client_frame, RawWs, CONTINUATION, PING, TEXT};
use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_websockets::Message;

/// An API that accepts every connection and answers each message with its length.
async fn length_api() -> MockApi {
    MockApi::with_script(|s| match s.method.as_str() {
        "POST" => Reply::ok(format!("got {}", s.body.len())),
        _ => Reply::ok("ok"),
    })
    .await
}

fn closed_by(metrics: &std::collections::HashMap<String, f64>, reason: &str) -> f64 {
    metrics[&format!("connections_closed_by_reason{{reason=\"{reason}\"}}")]
}

fn refused_by(metrics: &std::collections::HashMap<String, f64>, reason: &str) -> f64 {
    metrics[&format!("handshakes_refused{{reason=\"{reason}\"}}")]
}

// ---- --max-message-size ----

#[tokio::test]
async fn a_message_over_max_message_size_closes_the_socket_with_1009() {
    let api = length_api().await;
    let mut config = test_config(&api);
    config.max_message_size = 1000;
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/big").await;
    assert_eq!(round_trip(&mut ws, &"a".repeat(1000)).await, "got 1000");
    ws.send(Message::text("b".repeat(1001))).await.unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1009, "max length: 1000"));
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.header("x-close-code"), Some("1009"));
    assert_eq!(
        delete.body,
        Bytes::from(reason),
        "the API hears what the client saw"
    );
    assert_eq!(
        api.seen_with("POST").len(),
        1,
        "the oversized message never reaches the API"
    );
    assert_eq!(closed_by(&gateway.metrics().await, "too_big"), 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_fragmented_message_over_max_message_size_closes_the_socket_with_1009() {
    let api = length_api().await;
    let mut config = test_config(&api);
    config.max_message_size = 1000;
    let gateway = TestGateway::start(config).await;
    let mut raw = RawWs::connect(gateway.public, "/frag").await;

    // Fragments that add up to exactly the limit are reassembled into one POST.
    raw.send_frame(false, TEXT, &[b'a'; 400]).await;
    raw.send_frame(false, CONTINUATION, &[b'b'; 400]).await;
    raw.send_frame(true, CONTINUATION, &[b'c'; 200]).await;
    let reply = raw.read_frame(Duration::from_secs(5)).await.expect("reply");
    assert_eq!(
        (reply.opcode, reply.payload.as_slice()),
        (TEXT, &b"got 1000"[..])
    );
    let post = api.wait_for("POST", 1).await[0].clone();
    let mut want = vec![b'a'; 400];
    want.extend_from_slice(&[b'b'; 400]);
    want.extend_from_slice(&[b'c'; 200]);
    assert_eq!(post.body.to_vec(), want);

    // Two fragments, each under the limit, that add up over it.
    raw.send_frame(false, TEXT, &[b'x'; 600]).await;
    raw.send_frame(true, CONTINUATION, &[b'y'; 600]).await;
    let close = raw
        .until_close(Duration::from_secs(5))
        .await
        .expect("a close frame");
    assert_eq!(close.close_code(), Some(1009), "{:?}", close.close_reason());
    assert_eq!(close.close_reason(), "max length: 1000");
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.header("x-close-code"), Some("1009"));
    assert_eq!(delete.body, Bytes::from(close.close_reason()));
    assert_eq!(api.seen_with("POST").len(), 1);
    assert_eq!(closed_by(&gateway.metrics().await, "too_big"), 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_push_over_max_message_size_gets_413_and_one_at_the_limit_is_delivered() {
    let api = length_api().await;
    let mut config = test_config(&api);
    config.max_message_size = 1000;
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/p").await;
    let too_big = gateway.control("POST", "/p", &[b'x'; 1001]).await;
    assert_eq!(too_big.status, 413);
    let fits = gateway.control("POST", "/p", &[b'y'; 1000]).await;
    assert_eq!(fits.status, 200);
    assert_eq!(next_text(&mut ws).await, "y".repeat(1000));
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["pushes_refused"], 1.0);
    assert_eq!(metrics["pushes_accepted"], 1.0);
    assert_accounting(&gateway, &api, 1).await;
}

#[tokio::test]
async fn an_api_reply_over_max_message_size_closes_the_socket_with_1011() {
    let api = MockApi::with_script(|s| match (s.method.as_str(), &s.body[..]) {
        ("POST", b"fits") => Reply::ok(vec![b'r'; 1000]),
        ("POST", _) => Reply::ok(vec![b'r'; 1001]),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.max_message_size = 1000;
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/reply").await;
    assert_eq!(round_trip(&mut ws, "fits").await, "r".repeat(1000));
    ws.send(Message::text("too much")).await.unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1011, "upstream reply too large"));
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.header("x-close-code"), Some("1011"));
    assert_eq!(delete.body, Bytes::from_static(b"upstream reply too large"));
    let metrics = gateway.metrics().await;
    assert_eq!(closed_by(&metrics, "upstream_failure"), 1.0);
    assert_eq!(metrics["requests_failed"], 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

// ---- bounded outbound queue, slow consumers ----

#[tokio::test]
async fn a_client_that_does_not_read_gets_pushes_refused_with_503_then_is_closed_as_slow_consumer()
{
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.max_queued_messages = 4;
    config.max_queued_bytes = 256 * 1024;
    config.write_timeout = Duration::from_millis(1500);
    let gateway = TestGateway::start(config).await;
    // A 4 KiB receive buffer that we never read: the gateway's writes stall quickly.
    let mut raw = RawWs::connect_with_recv_buffer(gateway.public, "/slow", Some(4096)).await;

    let chunk = vec![b'x'; 128 * 1024];
    let mut accepted = 0;
    let refused = loop {
        let response = gateway.control("POST", "/slow", &chunk).await;
        match response.status {
            200 => accepted += 1,
            503 => break response,
            other => panic!("push {accepted}: unexpected {other} {}", response.text()),
        }
        assert!(
            accepted < 400,
            "50 MiB accepted for a client that never reads"
        );
    };
    let refused_at = Instant::now();
    assert_eq!(refused.header("retry-after"), Some("1"));
    // The mailbox holds at most its bounds while the socket is stalled.
    let info = gateway.control("GET", "/slow", b"").await.text();
    let queued: usize = json_number(&info, "queued");
    let queued_bytes: usize = json_number(&info, "queued_bytes");
    assert!(queued <= 4, "{info}");
    assert!(queued_bytes <= 256 * 1024, "{info}");

    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert!(
        refused_at.elapsed() < Duration::from_millis(1500) + Duration::from_secs(2),
        "closed {:?} after the first 503",
        refused_at.elapsed()
    );
    assert_eq!(delete.body, Bytes::from_static(b"slow consumer"));
    assert_eq!(delete.header("x-close-code"), Some("1008"));
    let after = gateway.control("POST", "/slow", b"late").await;
    assert_eq!(after.status, 404, "pushes to a closed client are refused");

    // Once the client reads again it finds its data and then the end: a close frame if one
    // still fit into the buffers (then it says 1008), else just the end of the stream.
    let (received, close) = raw.messages_until_close(Duration::from_secs(10)).await;
    if let Some(close) = close {
        assert_eq!(close.close_code(), Some(1008));
        assert_eq!(close.close_reason(), "slow consumer");
    }
    let metrics = gateway.metrics().await;
    assert_eq!(closed_by(&metrics, "slow_consumer"), 1.0);
    assert!(metrics["pushes_refused"] >= 1.0);
    assert_eq!(metrics["pushes_accepted"], accepted as f64);
    // No push is lost uncounted: each accepted one reached the client or counts undelivered,
    // the one cut off halfway in the stalled write among them; and those counted sent are
    // those the client read.
    let undelivered = metrics["pushes_undelivered"] as usize;
    assert_eq!(
        received.len() + undelivered,
        accepted,
        "{} received + {undelivered} undelivered of {accepted}",
        received.len()
    );
    assert_eq!(metrics["messages_sent"] as usize, received.len());
    assert!(undelivered >= 1, "the stalled push is undelivered");
    assert!(
        received.iter().all(|m| m.len() == chunk.len()),
        "whole pushes only"
    );
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_client_that_reads_again_as_it_is_closed_as_a_slow_consumer_gets_the_1008_close_frame() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.write_timeout = Duration::from_secs(1);
    let gateway = TestGateway::start(config).await;
    // A 4 KiB receive buffer that it does not read: the gateway's writes stall.
    let mut raw = RawWs::connect_with_recv_buffer(gateway.public, "/slow", Some(4096)).await;
    push_until_stalled(&gateway, "/slow").await;
    // At the write timeout the gateway gives up on it: the connection leaves the registry (a
    // look at it finds it gone), and then has a moment to finish the frame cut off halfway and
    // send its close frame. The client reads again as soon as it is gone: the close now fits.
    let deadline = Instant::now() + Duration::from_secs(10);
    while gateway.control("GET", "/slow", b"").await.status != 404 {
        assert!(Instant::now() < deadline, "still connected after 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (_received, close) = raw.messages_until_close(Duration::from_secs(5)).await;
    let close = close.expect("a close frame, read as it was sent");
    assert_eq!(close.close_code(), Some(1008));
    assert_eq!(close.close_reason(), "slow consumer");
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.body, Bytes::from_static(b"slow consumer"));
    assert_eq!(closed_by(&gateway.metrics().await, "slow_consumer"), 1.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_client_that_reads_slowly_but_steadily_is_not_closed_as_slow_consumer() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    // Messages much larger than the kernel's send buffer, so one message keeps the gateway's
    // writes pending across many partial writes, for longer than the write timeout.
    config.max_message_size = 16 << 20;
    config.max_queued_bytes = 16 << 20;
    config.write_timeout = Duration::from_millis(1500);
    let gateway = TestGateway::start(config).await;
    let mut raw =
        RawWs::connect_with_recv_buffer(gateway.public, "/trickle", Some(64 * 1024)).await;
    // Keep one message queued behind the one being written, for the whole test.
    let control = gateway.control;
    let pusher = tokio::spawn(async move {
        let chunk = vec![b'x'; 16 << 20];
        loop {
            let info = raw_http(control, "GET", "/trickle", &[], b"").await;
            if info.status == 404 {
                break;
            }
            if json_number(&info.text(), "queued") == 0 {
                raw_http(control, "POST", "/trickle", &[], &chunk).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // Read at most 64 KiB per 10 ms (about 6 MB/s) for 3.5 s: slower than the gateway could
    // write, so one message takes longer than the write timeout to go out, but never
    // stopping. (The kernel wakes a writer once a third of its send buffer has drained; this
    // rate does that within the write timeout for send buffers up to about 27 MB.)
    let mut read = 0usize;
    let until = Instant::now() + Duration::from_millis(3500);
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < until {
        let n = raw.stream.read(&mut buf).await.expect("still connected");
        assert!(n > 0, "the gateway closed a client that was reading");
        read += n;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(read > 4 << 20, "read only {read} bytes");
    assert!(
        api.seen_with("DELETE").is_empty(),
        "closed while making progress: {:?}",
        api.seen_with("DELETE")[0].body
    );
    // When it stops reading altogether, it is closed.
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.body, Bytes::from_static(b"slow consumer"));
    pusher.await.unwrap();
    assert_accounting(&gateway, &api, 0).await;
}

/// A client (receive buffer 4 KiB) whose message is at an API that answers `reply` after
/// `answer_in`, and whose socket the gateway's pushes have backed up meanwhile: the API, the
/// gateway, the client, the pushes of 128 KiB sent (the last one still queued), and when the
/// message reached the API.
async fn backed_up_while_the_api_answers(
    path: &str,
    answer_in: Duration,
) -> (MockApi, TestGateway, RawWs, usize, Instant) {
    let api = MockApi::with_slow_posts("reply", answer_in).await;
    let mut config = test_config(&api);
    config.upstream_timeout = Duration::from_secs(3);
    config.write_timeout = Duration::from_secs(20);
    let gateway = TestGateway::start(config).await;
    let mut raw = RawWs::connect_with_recv_buffer(gateway.public, path, Some(4096)).await;
    raw.send_frame(true, TEXT, b"m1").await;
    api.wait_for("POST", 1).await;
    let posted = Instant::now();
    // While the API takes its time, pushes back the socket up; the client reads nothing.
    let pushed = push_until_stalled(&gateway, path).await;
    assert!(
        posted.elapsed() + Duration::from_millis(200) < answer_in,
        "backed up only after {:?}, too late to test anything",
        posted.elapsed()
    );
    (api, gateway, raw, pushed, posted)
}

#[tokio::test]
async fn an_api_failure_while_the_socket_is_backed_up_closes_it_at_once_as_an_upstream_failure() {
    // The API takes longer than --upstream-timeout (3 s) while pushes back the socket up:
    // the failure ends the connection then, not --write-timeout (20 s) later as a slow
    // consumer.
    let (api, gateway, _raw, _pushed, posted) =
        backed_up_while_the_api_answers("/failed-while-backed-up", Duration::from_secs(10)).await;
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    let took = posted.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "the DELETE came {took:?} after the message"
    );
    assert_eq!(delete.body, Bytes::from_static(b"upstream timeout"));
    assert_eq!(delete.header("x-close-code"), Some("1011"));
    let metrics = gateway.metrics().await;
    assert_eq!(closed_by(&metrics, "upstream_failure"), 1.0);
    assert_eq!(closed_by(&metrics, "slow_consumer"), 0.0);
}

#[tokio::test]
async fn an_api_answer_that_comes_while_the_socket_is_backed_up_frees_its_api_slot_and_arrives_later(
) {
    let (api, gateway, mut raw, pushed, _posted) =
        backed_up_while_the_api_answers("/backed-up", Duration::from_secs(2)).await;
    // The answer (at 2 s) is taken and its API slot given back while the socket is still
    // backed up: as an answer, not as the request's --upstream-timeout (3 s) running out.
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n == 0.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(gateway.metrics().await["requests_failed"], 0.0);

    // The client reads again: every push, then the reply, and no close.
    raw.send_frame(true, common::raw_ws::CLOSE, &1000u16.to_be_bytes())
        .await;
    let (messages, close) = raw.messages_until_close(Duration::from_secs(5)).await;
    assert_eq!(messages.len(), pushed + 1, "{} messages", messages.len());
    assert!(
        messages[..pushed].iter().all(|m| m.len() == 128 * 1024),
        "the pushes first"
    );
    assert!(messages[pushed] == b"reply", "then the reply");
    assert_eq!(
        close.and_then(|c| c.close_code()),
        Some(1000),
        "the client's own close"
    );
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.header("x-close-code"), Some("1000"));
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_push_that_comes_after_a_reply_waiting_on_a_backed_up_socket_goes_out_after_it() {
    reply_and_pushes_in_turn(false).await;
}

#[tokio::test]
async fn a_control_delete_sends_a_waiting_reply_and_the_pushes_in_the_order_they_came() {
    reply_and_pushes_in_turn(true).await;
}

/// The API answers a message while the client's socket is backed up with pushes, then
/// pushes twice more; the client reads again after closing itself (or, `api_closes`, after
/// the API's DELETE closed it): the pushes from before the reply, the reply, the two later
/// pushes.
async fn reply_and_pushes_in_turn(api_closes: bool) {
    let (api, gateway, mut raw, pushed, _posted) =
        backed_up_while_the_api_answers("/in-turn", Duration::from_millis(1500)).await;
    // The reply is in (and waits on the socket) before these pushes come.
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n == 0.0,
            Duration::from_secs(5),
        )
        .await;
    for late in ["late 1", "late 2"] {
        let response = gateway.control("POST", "/in-turn", late.as_bytes()).await;
        assert_eq!(response.status, 200, "{}", response.text());
    }

    let expected_close = if api_closes {
        let response = gateway.control("DELETE", "/in-turn?code=4001", b"").await;
        assert_eq!(response.status, 200, "{}", response.text());
        4001
    } else {
        raw.send_frame(true, common::raw_ws::CLOSE, &1000u16.to_be_bytes())
            .await;
        1000
    };
    let (messages, close) = raw.messages_until_close(Duration::from_secs(5)).await;
    assert_eq!(close.and_then(|c| c.close_code()), Some(expected_close));
    let tail: Vec<String> = messages[pushed..]
        .iter()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .collect();
    assert_eq!(
        tail,
        ["reply", "late 1", "late 2"],
        "after the {pushed} pushes queued before the reply"
    );
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_client_that_floods_pings_without_reading_is_not_read_further() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.ping_interval = None;
    config.write_timeout = Duration::from_secs(2);
    let gateway = TestGateway::start(config).await;
    let mut raw = RawWs::connect_with_recv_buffer(gateway.public, "/flood", Some(4096)).await;
    // Every ping asks for a pong the client never reads: if the gateway kept reading, the
    // pongs would pile up in its memory until the write timeout.
    // Pings are written until the gateway gives up on the client (a partial write goes on
    // where it stopped, so the frames stay whole), noting when a write last got bytes through.
    let batch = encode_client_frame(true, PING, &[b'p'; 125]).repeat(1000);
    let mut offset = 0;
    let mut last_progress = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && api.seen_with("DELETE").is_empty() {
        let write = raw.stream.write(&batch[offset..]);
        match tokio::time::timeout(Duration::from_millis(50), write).await {
            Ok(Ok(n)) if n > 0 => {
                offset = (offset + n) % batch.len();
                last_progress = Instant::now();
            }
            Ok(_) => break,
            Err(_) => {}
        }
    }
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    // Once its pongs stalled, the gateway read nothing more: the client's writes stalled too,
    // long before it was closed (its --write-timeout, 2 s, after its own writes stalled).
    // Had it kept reading, they would have gone through until the close.
    let stalled = delete.at.saturating_duration_since(last_progress);
    assert!(
        stalled >= Duration::from_millis(500),
        "the client's writes went through until {stalled:?} before the DELETE"
    );
    assert_eq!(delete.body, Bytes::from_static(b"slow consumer"));
    assert_eq!(delete.header("x-close-code"), Some("1008"));
    assert_eq!(closed_by(&gateway.metrics().await, "slow_consumer"), 1.0);
    assert!(api.seen_with("POST").is_empty());
    assert_accounting(&gateway, &api, 0).await;
}

/// Clients that send one-byte pings, each in a TCP segment of its own, and never read: the
/// gateway's memory does not grow with the pings it reads once its writes to them stall. Before,
/// each ping read queued a pong until 8 KiB of them waited (about 2,700 three-byte pongs), and
/// each pong pinned the 1 KiB read buffer its ping came in: these 32 clients took the test
/// process from 18.3 to 113.4 MiB resident (+95 MiB in each of four runs, one of them on a loaded
/// machine); after the change (one pong kept, in a buffer of its own), +0.1 to +0.3 MiB.
#[tokio::test]
async fn clients_pinging_one_byte_at_a_time_without_reading_do_not_grow_the_gateways_memory() {
    const CLIENTS: usize = 32;
    const PINGS: usize = 6_000;
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    // No pings of its own, and no slow-consumer close while the test looks.
    config.ping_interval = None;
    config.write_timeout = Duration::from_secs(60);
    let gateway = TestGateway::start(config).await;
    let mut streams = Vec::new();
    for i in 0..CLIENTS {
        let raw =
            RawWs::connect_with_recv_buffer(gateway.public, &format!("/pinger{i}"), Some(4096))
                .await;
        raw.stream.set_nodelay(true).expect("TCP_NODELAY");
        shrink_gateway_send_buffer(gateway.public, &raw.stream);
        streams.push(raw.stream);
    }
    let before = resident_bytes();
    let ping = encode_client_frame(true, PING, b"p");
    let writers: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            let ping = ping.clone();
            tokio::spawn(async move {
                let mut sent = 0;
                let mut left = &ping[..];
                while sent < PINGS {
                    // Not writable for a second: the gateway has stopped reading this client.
                    let writable = tokio::time::timeout(Duration::from_secs(1), stream.writable());
                    if !matches!(writable.await, Ok(Ok(()))) {
                        break;
                    }
                    match stream.try_write(left) {
                        Ok(n) => left = &left[n..],
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => panic!("write: {e}"),
                    }
                    if left.is_empty() {
                        sent += 1;
                        left = &ping[..];
                        // The other clients write before this one's next ping: the gateway
                        // reads each ping on its own.
                        tokio::task::yield_now().await;
                    }
                }
                (stream, sent)
            })
        })
        .collect();
    let mut streams = Vec::new();
    let mut sent = 0;
    for writer in writers {
        let (stream, n) = writer.await.unwrap();
        streams.push(stream);
        sent += n;
    }
    // The gateway is done with what it read once its memory stops changing.
    let mut after = resident_bytes();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = resident_bytes();
        let settled = now.abs_diff(after) < 256 * 1024;
        after = now;
        if settled || Instant::now() >= deadline {
            break;
        }
    }
    let growth = after.saturating_sub(before);
    eprintln!(
        "{sent} pings from {CLIENTS} clients: {:.1} -> {:.1} MiB resident",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    // The clients are all still there, stalled, not closed (which would free their memory).
    assert_eq!(
        gateway.metrics().await["connections_active"],
        CLIENTS as f64
    );
    assert!(api.seen_with("DELETE").is_empty());
    // A tenth of what the pongs held before.
    assert!(
        growth < 10 << 20,
        "{sent} pings from {CLIENTS} clients took the process from {before} to {after} bytes \
         resident"
    );
    drop(streams);
}

/// This process's resident memory (`VmRSS`), in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"));
    kib * 1024
}

/// Gives the gateway's end of `client`'s connection (a socket of this process: the gateway
/// runs in the test) a send buffer of 8 KiB, as over a slow link: its writes then stall after a
/// few KiB of pongs, where loopback's autotuned buffer takes MiBs of them.
fn shrink_gateway_send_buffer(gateway: std::net::SocketAddr, client: &TcpStream) {
    let client = client.local_addr().unwrap();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap() {
        let Some(fd) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        else {
            continue;
        };
        if socket_address(fd, libc::getsockname) == Some(gateway)
            && socket_address(fd, libc::getpeername) == Some(client)
        {
            // Doubled by the kernel, and no longer autotuned.
            let bytes: libc::c_int = 4096;
            // SAFETY: setsockopt(2) on a descriptor of this process, with a pointer to a c_int
            // and its size.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&raw const bytes).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_SNDBUF: {}", std::io::Error::last_os_error());
            return;
        }
    }
    panic!("no gateway socket connected to {client}");
}

/// The IPv4 address `call` (`getsockname` or `getpeername`) gives for descriptor `fd`, if it is
/// an IPv4 socket.
fn socket_address(
    fd: libc::c_int,
    call: unsafe extern "C" fn(
        libc::c_int,
        *mut libc::sockaddr,
        *mut libc::socklen_t,
    ) -> libc::c_int,
) -> Option<std::net::SocketAddr> {
    // SAFETY: an all-zero sockaddr_in is valid; the call writes at most `len` bytes into it.
    let mut address: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the address and its length point to this function's own variables; a
    // descriptor that is no socket (or no longer open) only makes the call fail.
    let rc = unsafe { call(fd, (&raw mut address).cast(), &mut len) };
    if rc != 0 || i32::from(address.sin_family) != libc::AF_INET {
        return None;
    }
    let ip = std::net::Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr));
    Some((ip, u16::from_be(address.sin_port)).into())
}

#[tokio::test]
async fn a_request_beyond_the_waiter_bound_closes_the_socket_with_1013() {
    let api = MockApi::with_slow_posts("late", Duration::from_secs(5)).await;
    let mut config = test_config(&api);
    // One API slot and 64 waiting places: one client's 64 pipelined messages take the slot
    // and 63 places, one more message takes the last place.
    config.upstream_max_connections = Some(1);
    config.upstream_max_waiting = Some(64);
    config.pipeline = 64;
    config.upstream_timeout = Duration::from_secs(4);
    let gateway = TestGateway::start(config).await;
    let mut filler = gateway.connect("/filler").await;
    let mut last_place = gateway.connect("/last-place").await;
    let mut refused = gateway.connect("/refused").await;
    let gets = 3.0;
    for m in 0..64 {
        filler.send(Message::text(m.to_string())).await.unwrap();
    }
    wait_for_requests(&gateway, gets + 64.0).await;
    last_place.send(Message::text("last")).await.unwrap();
    wait_for_requests(&gateway, gets + 65.0).await;
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["requests_failed"], 0.0);
    // The gauges show the pool full: one request on the one connection, 64 waiting.
    assert_eq!(metrics["upstream_connections_open"], 1.0);
    assert_eq!(metrics["upstream_requests_in_flight"], 1.0);
    assert_eq!(metrics["upstream_requests_waiting"], 64.0);

    refused.send(Message::text("one too many")).await.unwrap();
    let (code, reason) = close_frame(&mut refused).await;
    assert_eq!((code, reason.as_str()), (1013, "upstream overloaded"));
    // Its DELETE finds no free place either; it is sent again until the waiters are gone
    // (they time out), so the API still hears of the disconnect, once.
    let deletes = api.wait_for("DELETE", 1).await;
    let refused_delete = deletes
        .iter()
        .find(|d| d.uri == "/refused")
        .unwrap_or_else(|| panic!("no DELETE for /refused: {deletes:?}"));
    assert_eq!(refused_delete.header("x-close-code"), Some("1013"));
    assert_eq!(
        refused_delete.body,
        Bytes::from_static(b"upstream overloaded")
    );
    drop((filler, last_place));
    api.wait_for("DELETE", 3).await;
    let metrics = gateway.metrics().await;
    assert!(closed_by(&metrics, "upstream_failure") >= 1.0);
    assert!(metrics["requests_failed"] >= 1.0, "the refused message");
    assert_eq!(gateway.metrics().await["disconnects_failed"], 0.0);
    assert_accounting(&gateway, &api, 0).await;
    assert!(
        api.seen_with("POST").iter().all(|p| p.uri != "/refused"),
        "the refused message never reached the API"
    );
}

#[tokio::test]
async fn a_message_that_waits_past_the_max_wait_closes_its_socket_with_1013() {
    let api = MockApi::with_slow_posts("late", Duration::from_secs(2)).await;
    let mut config = test_config(&api);
    // One API slot, taken for 2 s by the first message; the second may wait 300 ms for it.
    config.upstream_max_connections = Some(1);
    config.upstream_max_wait = Duration::from_millis(300);
    let gateway = TestGateway::start(config).await;
    let mut holder = gateway.connect("/holder").await;
    let mut waiter = gateway.connect("/waiter").await;
    holder.send(Message::text("first")).await.unwrap();
    wait_for_requests(&gateway, 3.0).await;
    let sent = Instant::now();
    waiter.send(Message::text("second")).await.unwrap();
    let (code, reason) = close_frame(&mut waiter).await;
    assert_eq!((code, reason.as_str()), (1013, "upstream overloaded"));
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1900),
        "closed after {waited:?}: after the max wait, before the slot came free"
    );
    // The message that held the slot is answered as usual.
    assert_eq!(next_text(&mut holder).await, "late");
    // The refused client's DELETE goes out once the slot is free.
    let deletes = api.wait_for("DELETE", 1).await;
    assert_eq!(deletes[0].uri, "/waiter");
    assert_eq!(deletes[0].header("x-close-code"), Some("1013"));
    assert_eq!(deletes[0].body, Bytes::from_static(b"upstream overloaded"));
    assert!(
        api.seen_with("POST").iter().all(|p| p.uri != "/waiter"),
        "the refused message never reached the API"
    );
    assert_eq!(closed_by(&gateway.metrics().await, "upstream_failure"), 1.0);
}

/// A TCP relay to the mock API that can be cut (listener closed, open relays dropped) and
/// brought back on the same port: the API "down" from the gateway's side.
struct Relay {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// A cut relay's port, kept bound but not listening (connecting to it is refused) so that no
/// other test's server can take it before the relay comes back on it.
struct CutRelay {
    socket: tokio::net::TcpSocket,
}

/// A socket that can share `port` with the relay's other sockets (SO_REUSEPORT, all of them
/// this process's), and with no one else's: without SO_REUSEADDR, not even with a socket that
/// does not listen.
fn relay_socket(port: u16) -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .unwrap();
    socket
}

impl Relay {
    async fn start(port: u16, backend: std::net::SocketAddr) -> Relay {
        Relay::serve(relay_socket(port), backend)
    }

    fn serve(socket: tokio::net::TcpSocket, backend: std::net::SocketAddr) -> Relay {
        let listener = socket.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                relays.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Relay { addr, task }
    }

    /// Closes the listener and every relayed connection, the port kept (bound first, while
    /// the listener still holds it); returns once a connection is refused (the aborted task,
    /// holding them, is dropped by the runtime soon after).
    async fn cut(self) -> CutRelay {
        let kept = CutRelay {
            socket: relay_socket(self.addr.port()),
        };
        self.task.abort();
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(self.addr).await.is_ok() {
            assert!(Instant::now() < deadline, "the relay still listens");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kept
    }
}

impl CutRelay {
    /// The relay back on its port.
    fn restore(self, backend: std::net::SocketAddr) -> Relay {
        Relay::serve(self.socket, backend)
    }
}

#[tokio::test]
async fn a_delete_that_finds_the_api_unreachable_is_sent_once_it_is_back() {
    let api = MockApi::start().await;
    // Its port is kept while it is cut, and it comes back on it.
    let relay = Relay::start(0, api.addr).await;
    let mut config = test_config(&api);
    config.api = format!("http://{}/", relay.addr).parse().unwrap();
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/flaky").await;
    assert_eq!(round_trip(&mut ws, "before").await, "echo:before");

    let cut = relay.cut().await;
    // The gateway has seen its pooled API connection end, so the DELETE opens a new one.
    gateway
        .wait_for_metric(
            "upstream_connections_open",
            |n| n == 0.0,
            Duration::from_secs(5),
        )
        .await;
    ws.close().await.unwrap();
    // The DELETE's first try finds the API unreachable (counted as a failed request).
    gateway
        .wait_for_metric("requests_failed", |n| n >= 1.0, Duration::from_secs(5))
        .await;
    assert!(api.seen_with("DELETE").is_empty(), "the API is down");
    let _relay = cut.restore(api.addr);
    // Counted once the API has taken it, and then not sent again.
    gateway.wait_for_the_first_delete_told().await;
    // Sent again, it would be at its next try (250 ms or more later), ahead of a DELETE
    // decided now: once that one is through, with none queued or unfinished, it is there.
    let deletes = deletes_before_a_later_one(&gateway, &api, "/marker").await;
    assert_eq!(deletes.len(), 1, "sent once: {deletes:?}");
    assert_eq!(deletes[0].uri, "/flaky");
    assert_eq!(deletes[0].header("x-close-code"), Some("1000"));
    assert_eq!(gateway.metrics().await["disconnects_failed"], 0.0);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_delete_answered_502_or_503_is_sent_again_until_the_api_takes_it() {
    // A proxy in front of a restarting API answers 502 (no worker), then 503, then the API is
    // back.
    let deletes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = deletes.clone();
    let api = MockApi::with_script(move |seen| match seen.method.as_str() {
        "DELETE" => match counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => Reply::status(502, "no worker"),
            1 => Reply::status(503, "restarting"),
            _ => echo_script(seen),
        },
        _ => echo_script(seen),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut ws = gateway.connect("/restart").await;
    ws.close().await.unwrap();
    // Counted once the API has taken it (the third try), and then not sent again.
    gateway.wait_for_the_first_delete_told().await;
    // A further one would be at a next try, ahead of a DELETE decided now.
    let deletes = deletes_before_a_later_one(&gateway, &api, "/marker").await;
    assert_eq!(
        deletes.len(),
        3,
        "no further DELETE once taken: {deletes:?}"
    );
    assert_eq!(gateway.metrics().await["disconnects_failed"], 0.0);
}

#[tokio::test]
async fn deletes_still_unsent_when_the_shutdown_grace_period_ends_are_given_up_and_counted() {
    let api = MockApi::start().await;
    let relay = Relay::start(0, api.addr).await;
    // The drain's grace period: shutdown + 2 x upstream timeout + 5 s, 5.5 s here.
    let mut binary = Binary::start_ready(
        &format!("http://{}/", relay.addr),
        &["--shutdown-timeout", "100ms", "--upstream-timeout", "200ms"],
        &[],
    )
    .await;
    let mut ws = binary.connect("/stranded").await;
    relay.cut().await;
    // The gateway has seen its pooled API connection end, so the DELETE opens a new one.
    wait_for_binary_metric(&binary, "upstream_connections_open", |n| n == 0.0).await;
    ws.close().await.unwrap();
    // The DELETE finds the API unreachable and waits to try again, past the grace period.
    wait_for_binary_metric(&binary, "requests_failed", |n| n >= 1.0).await;
    binary.signal(libc::SIGTERM);
    let status = binary.wait_exit(Duration::from_secs(15)).await;
    let log = binary.stderr();
    assert_eq!(status.code(), Some(0), "{log}");
    let stopped = log
        .lines()
        .find(|l| l.contains("ws2http stopped"))
        .unwrap_or_else(|| panic!("no stop line:\n{log}"));
    assert!(
        stopped.contains("completed=false") && stopped.contains("disconnects_untold=1"),
        "{stopped}"
    );
    let given_up: Vec<_> = log
        .lines()
        .filter(|l| l.contains("DELETE given up"))
        .collect();
    assert_eq!(given_up.len(), 1, "{log}");
    assert!(
        given_up[0].contains(" WARN ") && given_up[0].contains("client_id=stranded"),
        "{}",
        given_up[0]
    );
    assert!(api.seen_with("DELETE").is_empty());
}

/// Waits until the binary's metric `name` satisfies `done` (5 s at most).
async fn wait_for_binary_metric(binary: &Binary, name: &str, done: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = parse_metrics(
            &raw_http(binary.control, "GET", "/metrics", &[], b"")
                .await
                .text(),
        );
        if metrics.get(name).copied().is_some_and(&done) {
            return;
        }
        assert!(Instant::now() < deadline, "{name}: {metrics:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the gateway has started `n` API requests (5 s at most).
async fn wait_for_requests(gateway: &TestGateway, n: f64) {
    gateway
        .wait_for_metric(
            "requests_started",
            |started| started >= n,
            Duration::from_secs(5),
        )
        .await;
}

// ---- --max-connections ----

#[tokio::test]
async fn over_max_connections_the_handshake_gets_503_without_asking_the_api() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.max_connections = Some(2);
    let gateway = TestGateway::start(config).await;
    let a = gateway.connect("/a").await;
    let _b = gateway.connect("/b").await;
    let refused = raw_exchange(gateway.public, &upgrade_request("/c", &[])).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    let metrics = gateway.metrics().await;
    assert_eq!(
        refused_by(&metrics, "overloaded"),
        1.0,
        "counted as refused: overloaded"
    );
    assert_eq!(metrics["requests_started"], 2.0, "the two GETs only");

    // A freed slot is usable again.
    drop(a);
    api.wait_for("DELETE", 1).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = raw_exchange(gateway.public, &upgrade_request("/c", &[])).await;
        if response.status == 101 {
            break;
        }
        assert_eq!(response.status, 503);
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The refused attempts never reached the API: a GET for one would have gone out before
    // this last one's.
    let for_c = api
        .seen_with("GET")
        .iter()
        .filter(|g| g.uri == "/c")
        .count();
    assert_eq!(for_c, 1, "only the attempt that got its 101");
    // `_b` is still open.
    assert_accounting(&gateway, &api, 1).await;
}

#[tokio::test]
async fn over_the_pending_handshake_cap_a_socket_gets_503_after_a_short_grace() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.max_pending_handshakes = 2;
    config.handshake_timeout = Duration::from_secs(3);
    let gateway = TestGateway::start(config).await;
    // Two sockets that never finish their request hold both handshake slots.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(gateway.public).await.unwrap();
        stream.write_all(b"GET /holder HTTP/1.1\r\n").await.unwrap();
        holders.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let refused = raw_exchange(gateway.public, &upgrade_request("/third", &[])).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    // It waited 250 ms for a slot to come free, no longer.
    let waited = started.elapsed();
    assert!(
        // (Not until the 3-s handshake timeout: the bound leaves a loaded machine room.)
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "answered after {waited:?}"
    );
    assert_eq!(refused_by(&gateway.metrics().await, "overloaded"), 1.0);
    // Once the holders leave, handshakes are served again.
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let response = raw_exchange(gateway.public, &upgrade_request("/third", &[])).await;
        if response.status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "slots never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gets = api.wait_for("GET", 1).await;
    assert!(gets.iter().all(|g| g.uri == "/third"), "{gets:?}");
    assert_accounting(&gateway, &api, 0).await;
}

/// A gateway started with `config` but one pending-handshake slot, and the socket that holds
/// that slot: its upgrade request begun and never finished.
async fn gateway_with_its_one_handshake_slot_held(
    mut config: ws2http::Config,
) -> (TestGateway, TcpStream) {
    config.max_pending_handshakes = 1;
    let gateway = TestGateway::start(config).await;
    let mut holder = TcpStream::connect(gateway.public).await.unwrap();
    holder.write_all(b"GET /holder HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    (gateway, holder)
}

#[tokio::test]
async fn over_the_pending_handshake_cap_a_slot_freed_within_the_grace_serves_the_socket() {
    let api = MockApi::start().await;
    // A socket that never finishes its request holds the only handshake slot...
    let (gateway, holder) = gateway_with_its_one_handshake_slot_held(test_config(&api)).await;
    // ...while the next client sends its request and is kept waiting for the slot, 50 ms...
    let connected = Instant::now();
    let mut next = TcpStream::connect(gateway.public).await.unwrap();
    next.write_all(&upgrade_request("/next", &[]))
        .await
        .unwrap();
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let early = tokio::time::timeout(Duration::from_millis(50), next.read(&mut chunk)).await;
    assert!(early.is_err(), "answered while over the cap: {early:?}");
    // ...then leaves, well within the next one's 250-ms grace: that one is served at once.
    drop(holder);
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match next.read(&mut chunk).await {
                Ok(0) | Err(_) => break None,
                Ok(n) => data.extend_from_slice(&chunk[..n]),
            }
            if let Some(response) = parse_response(&data) {
                break Some(response);
            }
        }
    })
    .await
    .expect("an answer within 5 s")
    .unwrap_or_else(|| panic!("closed unanswered: {:?}", String::from_utf8_lossy(&data)));
    let took = connected.elapsed();
    assert_eq!(served.status, 101, "{}", served.text());
    // Woken by the slot coming free (a few ms after the holder left, 50 ms in), not at the end
    // of its grace: that began at its accept, after `connected`, so it cannot end sooner than
    // 250 ms after it; the bound sits just below that and leaves the right time room to run
    // late.
    assert!(
        took < Duration::from_millis(240),
        "served {took:?} after it connected"
    );
    assert_eq!(refused_by(&gateway.metrics().await, "overloaded"), 0.0);
}

#[tokio::test]
async fn over_the_pending_handshake_cap_a_socket_closed_before_its_first_byte_counts_nothing() {
    let api = MockApi::start().await;
    let (gateway, holder) = gateway_with_its_one_handshake_slot_held(test_config(&api)).await;
    // A TCP check that connects and closes at once, over the cap; then a real client, taken
    // after it (the listener takes connections in the order they came): its 503 comes at the
    // end of its own grace, so after the check's was over and decided.
    drop(TcpStream::connect(gateway.public).await.unwrap());
    let refused = raw_exchange(gateway.public, &upgrade_request("/over", &[])).await;
    assert_eq!(refused.status, 503);
    assert_eq!(
        refused_by(&gateway.metrics().await, "overloaded"),
        1.0,
        "only the client that sent a request is refused"
    );
    drop(holder);
}

#[tokio::test]
async fn over_the_pending_handshake_cap_sockets_wait_side_by_side_not_one_after_another() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.handshake_timeout = Duration::from_secs(10);
    let (gateway, holder) = gateway_with_its_one_handshake_slot_held(config).await;
    // Twenty sockets over the cap at once: each waits its 250 ms beside the others, so all
    // are answered in about that long (one after another it would take 5 s).
    let started = Instant::now();
    let mut over = Vec::new();
    for i in 0..20 {
        let public = gateway.public;
        over.push(tokio::spawn(async move {
            raw_exchange(public, &upgrade_request(&format!("/over{i}"), &[])).await
        }));
    }
    for answer in over {
        let answer = answer.await.unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.header("retry-after"), Some("1"));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(3500),
        "all answered after {took:?}"
    );
    assert_eq!(refused_by(&gateway.metrics().await, "overloaded"), 20.0);
    drop(holder);
}

/// Reads what the gateway sends on `stream` until it closes (within 3 s).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "still open after 3 s");
    answer
}

/// Whether `stream` stays silent and open for `period`: no answer, not closed.
async fn stays_unanswered(stream: &mut TcpStream, period: Duration) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(period, stream.read(&mut byte))
        .await
        .is_err()
}

#[tokio::test]
async fn over_the_pending_handshake_cap_with_every_waiting_place_taken_a_socket_waits_for_one() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.handshake_timeout = Duration::from_secs(10);
    let budget = ws2http::DescriptorBudget {
        pending_handshakes: 1,
        handshake_waiters: 2,
        ..ws2http::DescriptorBudget::plan(&config, 20_000).unwrap()
    };
    let gateway = TestGateway::start_with_budget(config, budget).await;
    let mut holder = TcpStream::connect(gateway.public).await.unwrap();
    holder.write_all(b"GET /holder HTTP/1.1\r\n").await.unwrap();
    // Two silent sockets over the cap take both places: 250 ms waiting for a slot, then a
    // 503 whose socket is drained until they close it.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waiting.push(TcpStream::connect(gateway.public).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A third is neither answered nor closed while they hold the places: it waits. (Nothing
    // tells that a socket waits for a place, so this watches it for a fixed time: 600 ms, past
    // the 250 ms in which one given a place at once would be answered, and well within the
    // 1.25 s the two places are held.)
    let mut third = TcpStream::connect(gateway.public).await.unwrap();
    third
        .write_all(&upgrade_request("/third", &[]))
        .await
        .unwrap();
    assert!(
        stays_unanswered(&mut third, Duration::from_millis(600)).await,
        "answered or closed while every place was taken"
    );
    // One of them reads its 503 and leaves: the third takes its place, and after its own
    // 250 ms (the holder still holds the slot) it is answered 503 too.
    let mut first = waiting.remove(0);
    let answer = read_until_closed(&mut first).await;
    assert_eq!(parse_response(&answer).expect("an HTTP answer").status, 503);
    drop(first);
    let answer = read_until_closed(&mut third).await;
    let answer = parse_response(&answer).expect("an HTTP answer");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));
    drop(waiting);
    assert_eq!(refused_by(&gateway.metrics().await, "overloaded"), 3.0);
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    drop(holder);
}

/// `key=value` out of a log line.
fn log_field(log: &str, key: &str) -> usize {
    let needle = format!(" {key}=");
    let start = log
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key}= in the log:\n{log}"))
        + needle.len();
    log[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_crowd_leaving_at_once_gets_every_delete_through_four_api_slots() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "DELETE" => Reply::ok("ok").after(Duration::from_millis(250)),
        "POST" => Reply::ok(s.body.clone()),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    // Four API slots and no place to wait for one: each DELETE waits its turn in the
    // departures queue (sent two at a time, half the slots) rather than being refused and
    // given up after its retries.
    config.upstream_max_connections = Some(4);
    config.upstream_max_waiting = Some(0);
    let gateway = TestGateway::start(config).await;
    let mut crowd = Vec::new();
    for i in 0..30 {
        crowd.push(gateway.connect(&format!("/c{i}")).await);
    }
    drop(crowd);
    // Two at a time, never more: the other two slots stay free for a client that stays.
    api.wait_for("DELETE", 2).await;
    // The API holds each DELETE 250 ms: two started and not done, the rest queued. Once all
    // 30 are decided (queued, in flight or done), the queue holds what is neither: 28 less
    // two per 250 ms at the API, so at least 20 for the first second after the crowd left.
    let deadline = Instant::now() + Duration::from_secs(5);
    let peak = loop {
        let metrics = gateway.metrics().await;
        let (waiting, in_flight) = (
            metrics["upstream_disconnects_waiting"],
            metrics["upstream_disconnects_in_flight"],
        );
        let done = metrics["disconnects_notified"] + metrics["disconnects_failed"];
        if in_flight == 2.0 && waiting + in_flight + done == 30.0 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "not two DELETEs in flight and the rest queued or done: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        peak["upstream_disconnects_waiting"] >= 20.0,
        "the crowd's DELETEs not counted waiting: {peak:?}"
    );
    let mut stays = gateway.connect("/stays").await;
    assert_eq!(round_trip(&mut stays, "still here").await, "still here");
    let deletes = api.wait_for("DELETE", 30).await;
    let mut told: Vec<String> = deletes.iter().map(|d| d.uri.clone()).collect();
    told.sort();
    told.dedup();
    assert_eq!(told.len(), 30, "one DELETE per client: {told:?}");
    // A DELETE holds its slot until answered (250 ms after it arrived), so no window shorter
    // than that holds more arrivals than the two senders.
    let mut arrivals: Vec<_> = deletes.iter().map(|d| d.at).collect();
    arrivals.sort();
    let most = (0..arrivals.len())
        .map(|i| {
            arrivals[i..]
                .iter()
                .take_while(|at| **at - arrivals[i] < Duration::from_millis(240))
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 2, "{most} DELETEs at once through half of 4 slots");
    // Counted once answered; the last ones are answered 250 ms after the API saw them.
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let metrics = gateway.metrics().await;
        if metrics["disconnects_notified"] + metrics["disconnects_failed"] >= 30.0
            || Instant::now() > deadline
        {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(metrics["disconnects_failed"], 0.0);
    assert_eq!(metrics["disconnects_notified"], 30.0);
    assert_eq!(metrics["upstream_disconnects_waiting"], 0.0);
    assert_eq!(metrics["upstream_disconnects_in_flight"], 0.0);
    // `stays` is still open.
    assert_accounting(&gateway, &api, 1).await;
}

#[tokio::test]
async fn the_log_names_the_1013_an_overloaded_client_was_closed_with() {
    let api = MockApi::with_slow_posts("late", Duration::from_secs(3)).await;
    // One API slot and no waiting place: a second message while the first is out is refused.
    let binary = Binary::start_ready(
        &api.base(),
        &[
            "--upstream-max-connections",
            "1",
            "--upstream-max-waiting",
            "0",
        ],
        &[],
    )
    .await;
    let mut first = binary.connect("/first").await;
    let mut refused = binary.connect("/refused").await;
    first.send(Message::text("takes the slot")).await.unwrap();
    api.wait_for("POST", 1).await;
    refused.send(Message::text("finds none")).await.unwrap();
    assert_eq!(close_frame(&mut refused).await.0, 1013);
    let log = binary
        .wait_for_log("closing the websocket with 1013 `upstream overloaded`")
        .await;
    let line = log
        .lines()
        .find(|l| l.contains("closing the websocket with 1013"))
        .unwrap();
    assert!(line.contains("client_id=refused"), "{line}");
    assert!(line.contains(" WARN "), "logged as a warning: {line}");
    assert!(!log.contains("with 1011"), "{log}");
}

#[tokio::test]
async fn the_binary_logs_the_connection_budget_it_derived_from_the_open_file_limit() {
    let api = MockApi::start().await;
    let binary = Binary::start_ready(&api.base(), &[], &[]).await;
    let log = binary.wait_for_log("ws2http started").await;
    let open_files = log_field(&log, "open_file_limit");
    let max_connections = log_field(&log, "max_connections");
    let upstream = log_field(&log, "upstream_max_connections");
    let pending = log_field(&log, "pending_handshakes");
    assert_eq!(upstream, (open_files / 16).clamp(16, 1024));
    assert_eq!(
        max_connections,
        open_files
            - upstream
            - pending
            - log_field(&log, "control_connections")
            - log_field(&log, "handshake_waiters")
            - log_field(&log, "control_refusals")
            - log_field(&log, "lookup_descriptors")
            - ws2http::config::RESERVED_DESCRIPTORS,
        "{log}"
    );
    assert!(max_connections > 0);
    assert_eq!(
        log_field(&log, "control_connections"),
        ws2http::config::CONTROL_CONNECTIONS
    );
    assert_eq!(
        log_field(&log, "handshake_waiters"),
        ws2http::config::HANDSHAKE_WAITERS
    );
    assert_eq!(
        log_field(&log, "control_refusals"),
        ws2http::config::CONTROL_REFUSALS
    );
    assert_eq!(
        log_field(&log, "lookup_descriptors"),
        ws2http::config::LOOKUPS_AT_ONCE * ws2http::config::LOOKUP_DESCRIPTORS
    );
    assert_eq!(
        log_field(&log, "upstream_min_concurrency"),
        upstream.min(64)
    );
    // Every request the clients can have outstanding may wait, for at most 5 s.
    assert_eq!(
        log_field(&log, "upstream_max_waiting"),
        max_connections + pending,
        "{log}"
    );
    assert!(log.contains(" upstream_max_wait=5s"), "{log}");

    // An explicit --max-connections is what the log says; the minimum concurrency is capped
    // by the maximum.
    let api = MockApi::start().await;
    let binary = Binary::start_ready(
        &api.base(),
        &[
            "--max-connections",
            "123",
            "--upstream-max-connections",
            "7",
        ],
        &[],
    )
    .await;
    let log = binary.wait_for_log("ws2http started").await;
    assert_eq!(log_field(&log, "max_connections"), 123);
    assert_eq!(log_field(&log, "upstream_max_connections"), 7);
    assert_eq!(log_field(&log, "upstream_min_concurrency"), 7);
}

#[tokio::test]
async fn a_zero_or_out_of_range_limit_stops_the_binary_naming_the_flag() {
    let api = MockApi::start().await;
    let huge = usize::MAX.to_string();
    for (flag, value, message) in [
        ("--idle-timeout", "0s", "--idle-timeout must be more than 0"),
        (
            "--max-queued-bytes",
            "0",
            "--max-queued-bytes must be at least 1 byte",
        ),
        (
            "--max-connections",
            "0",
            "--max-connections must be at least 1",
        ),
        (
            "--max-pending-handshakes",
            "0",
            "--max-pending-handshakes must be at least 1",
        ),
        (
            "--upstream-max-connections",
            "0",
            "--upstream-max-connections must be at least 1",
        ),
        (
            "--upstream-max-connections",
            huge.as_str(),
            "leaves no room for websockets next to --upstream-max-connections",
        ),
        (
            "--shutdown-delete-concurrency",
            huge.as_str(),
            "--shutdown-delete-concurrency must be at most",
        ),
        (
            "--upstream-min-concurrency",
            "0",
            "--upstream-min-concurrency must be at least 1",
        ),
        (
            "--upstream-max-wait",
            "0s",
            "--upstream-max-wait must be more than 0",
        ),
    ] {
        let log = Binary::refused_at_start(&api.base(), &[flag, value], &[]).await;
        assert!(log.contains(message), "{flag}: {log}");
    }
}

// ---- handshake deadline ----

/// Reads from `stream` until the gateway closes it; returns how long that took after `since`,
/// and what the gateway sent meanwhile.
async fn time_until_dropped(stream: &mut TcpStream, since: Instant) -> (Duration, Vec<u8>) {
    let mut buf = [0u8; 1024];
    let mut sent = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (since.elapsed(), sent),
            Ok(Ok(n)) => sent.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the connection was still open after 10s"),
        }
    }
}

/// The types of the HTTP/2 frames in `bytes` (whole frames, from the start).
fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + length).min(bytes.len())..];
    }
    types
}

/// HTTP/2's GOAWAY frame type.
const GOAWAY: u8 = 0x7;

/// A gateway with `timeout` as its --handshake-timeout and one control connection at a time
/// (and its API): while a connection holds the place, another is answered `503`.
async fn with_one_control_connection(timeout: Duration) -> (MockApi, TestGateway) {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.handshake_timeout = timeout;
    let budget = ws2http::DescriptorBudget {
        control_connections: 1,
        ..ws2http::DescriptorBudget::plan(&config, 20_000).unwrap()
    };
    let gateway = TestGateway::start_with_budget(config, budget).await;
    (api, gateway)
}

/// A gateway with a 300 ms --handshake-timeout, and its API.
async fn with_short_handshake_timeout() -> (MockApi, TestGateway) {
    with_handshake_timeout(Duration::from_millis(300)).await
}

/// A gateway with `timeout` as its --handshake-timeout, and its API.
async fn with_handshake_timeout(timeout: Duration) -> (MockApi, TestGateway) {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.handshake_timeout = timeout;
    let gateway = TestGateway::start(config).await;
    (api, gateway)
}

/// Connects to a control listener with a 2 s --handshake-timeout and one place, sends
/// `opening`, and checks that the gateway hangs up once that timeout has passed since the
/// accept (plus, for an HTTP/2 connection, the 1 s its unanswered closing ping may take), not
/// twice that timeout, and gives the place back. Returns what the gateway sent.
async fn dropped_one_handshake_timeout_after_sending(opening: &[u8]) -> Vec<u8> {
    let (_api, gateway) = with_one_control_connection(Duration::from_secs(2)).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    stream.write_all(opening).await.unwrap();
    let (took, sent) = time_until_dropped(&mut stream, started).await;
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3800),
        "dropped after {took:?}"
    );
    healthz_until(gateway.control, 200).await;
    sent
}

/// Connects to `addr`, sends nothing, and checks that the gateway hangs up after about
/// 300 ms without a word.
async fn assert_silent_connection_dropped(addr: std::net::SocketAddr) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (took, sent) = time_until_dropped(&mut stream, started).await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "dropped after {took:?}"
    );
    assert!(
        sent.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&sent)
    );
}

#[tokio::test]
async fn a_refusal_the_client_does_not_read_is_counted_once_when_the_handshake_limit_cuts_it() {
    // The API refuses with a page far larger than what the socket buffers hold, to a client
    // that reads none of it: the answer is cut at the handshake's outer time limit
    // (--handshake-timeout + --upstream-timeout + 1 s), and the refusal counted as the API's,
    // not once more as a timeout.
    let page = Bytes::from(vec![b'x'; 4 << 20]);
    let api = MockApi::with_script(move |s| match s.method.as_str() {
        "GET" => Reply::status(403, page.clone()),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.max_message_size = 4 << 20;
    config.handshake_timeout = Duration::from_millis(200);
    config.upstream_timeout = Duration::from_millis(400);
    let gateway = TestGateway::start(config).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gateway.public).await.unwrap();
    stream
        .write_all(&upgrade_request("/unread", &[]))
        .await
        .unwrap();
    api.wait_for("GET", 1).await;
    // Well past the outer limit (1.6 s from the accept) before reading a byte: nothing
    // tells when the cut has happened, and a read begun before it takes the whole page.
    tokio::time::sleep(Duration::from_millis(3600)).await;
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "still open 10 s after the limit");
    assert!(
        received.len() < 4 << 20,
        "the whole page was written ({} bytes): the limit never cut it",
        received.len()
    );
    assert!(
        received.starts_with(b"HTTP/1.1 403"),
        "{:?}",
        &received[..64.min(received.len())]
    );
    let metrics = gateway.metrics().await;
    assert_eq!(refused_by(&metrics, "api"), 1.0, "{metrics:?}");
    assert_eq!(
        refused_by(&metrics, "timeout"),
        0.0,
        "counted twice: {metrics:?}"
    );
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_dropped_after_the_handshake_timeout() {
    let (api, gateway) = with_short_handshake_timeout().await;
    assert_silent_connection_dropped(gateway.public).await;
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["connections_opened"], 0.0);
    assert_eq!(refused_by(&metrics, "timeout"), 1.0, "counted as a timeout");
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_control_connection_that_sends_nothing_is_dropped_after_the_handshake_timeout() {
    let (_api, gateway) = with_one_control_connection(Duration::from_millis(300)).await;
    assert_silent_connection_dropped(gateway.control).await;
    // Its place is free again: the listener serves (HTTP/1.1 and h2c alike tell themselves
    // apart by their first bytes).
    healthz_until(gateway.control, 200).await;
}

/// The --handshake-timeout of [`closed_after_one_byte_at`]'s control listeners: long beside
/// the idle close's 1 s grace, so that a head begun late (and 1.5 s before the timeout, a
/// margin that a loaded machine's late wake-up cannot eat) is closed seconds before its header
/// timer would have run out.
const ONE_BYTE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to a control listener with a [`ONE_BYTE_HANDSHAKE_TIMEOUT`] --handshake-timeout,
/// sends the first byte of an HTTP/1.1 request after `wait`, and nothing more; returns when
/// the gateway hung up, counted from the connect.
async fn closed_after_one_byte_at(wait: Duration) -> Duration {
    let (_api, gateway) = with_one_control_connection(ONE_BYTE_HANDSHAKE_TIMEOUT).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    tokio::time::sleep(wait).await;
    stream.write_all(b"G").await.unwrap();
    let (took, sent) = time_until_dropped(&mut stream, started).await;
    assert!(
        sent.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&sent)
    );
    healthz_until(gateway.control, 200).await;
    took
}

#[tokio::test]
async fn a_control_request_head_begun_in_time_has_the_timeout_from_its_first_byte_but_at_most_1s_more(
) {
    // hyper's header timer starts at the first byte; the idle close, counted from the accept,
    // cuts it short only after its 1 s grace. With a 5 s --handshake-timeout: a head begun at
    // 0.1 s is closed at 5.1 s (by a header timer counted from the accept, at 5.0 s; by the
    // idle close, at 6.0 s), one begun at 3.5 s at 6.0 s (by the header timer alone, at
    // 8.5 s; by an idle close without its grace, at 5.0 s). A timer fires late, never early,
    // and each time is counted from before the connect: a wrong time is a floor, while the
    // right one may run late, so each upper bound sits below the nearest wrong time and well
    // above the right one (0.8 s for the early head, 1.5 s for the late one).
    let (early, late) = tokio::join!(
        closed_after_one_byte_at(Duration::from_millis(100)),
        closed_after_one_byte_at(Duration::from_millis(3500)),
    );
    assert!(
        early >= Duration::from_millis(5100) && early < Duration::from_millis(5900),
        "begun at 0.1 s, closed after {early:?}"
    );
    assert!(
        late >= Duration::from_millis(5900) && late < Duration::from_millis(7500),
        "begun at 3.5 s, closed after {late:?}"
    );
}

#[tokio::test]
async fn a_control_connection_that_stops_inside_the_h2c_preface_is_dropped_after_the_handshake_timeout(
) {
    // The first 3 of the 24 bytes that open h2c: not yet HTTP/1.1, not yet HTTP/2.
    let sent = dropped_one_handshake_timeout_after_sending(b"PRI").await;
    assert!(
        sent.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&sent)
    );
}

#[tokio::test]
async fn a_control_connection_that_opens_h2c_and_sends_no_request_is_dropped_after_the_handshake_timeout(
) {
    // The whole preface and an empty SETTINGS frame: HTTP/2, with no stream ever opened.
    let mut opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    opening.extend([0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    let sent = dropped_one_handshake_timeout_after_sending(&opening).await;
    let types = h2_frame_types(&sent);
    assert!(
        types.contains(&GOAWAY),
        "no GOAWAY before the end: {types:?}"
    );
}

#[tokio::test]
async fn an_idle_http1_control_connection_is_closed_after_the_handshake_timeout() {
    let (_api, gateway) = with_one_control_connection(Duration::from_millis(300)).await;
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    stream.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let (took, _rest_of_the_answer) = time_until_dropped(&mut stream, Instant::now()).await;
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "dropped {took:?} after its answer"
    );
    // Its place is free again.
    healthz_until(gateway.control, 200).await;
}

/// The status of `GET /healthz` over `sender`.
async fn healthz_h2c(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    control: std::net::SocketAddr,
) -> u16 {
    let request = hyper::Request::get(format!("http://{control}/healthz"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    sender.ready().await.unwrap();
    let answer = sender.send_request(request).await.unwrap();
    answer.status().as_u16()
}

#[tokio::test]
async fn an_idle_h2c_control_connection_is_closed_after_the_handshake_timeout() {
    let (_api, gateway) = with_one_control_connection(Duration::from_millis(300)).await;
    let (mut sender, driving) = control_h2c(gateway.control).await;
    // The gateway's idle clock starts between these two instants.
    let asked = Instant::now();
    assert_eq!(healthz_h2c(&mut sender, gateway.control).await, 200);
    let answered = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), driving)
        .await
        .expect("the connection was still open after 10s")
        .unwrap();
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "closed early"
    );
    let took = answered.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "closed {took:?} after its answer"
    );
    assert!(sender.is_closed());
    // Its place is free again.
    healthz_until(gateway.control, 200).await;
}

#[tokio::test]
async fn an_h2c_control_connection_in_use_stays_open_past_the_handshake_timeout() {
    let (_api, gateway) = with_handshake_timeout(Duration::from_secs(1)).await;
    let (mut sender, driving) = control_h2c(gateway.control).await;
    // A request every 100 ms for 2.5 s: never 1 s without one.
    for _ in 0..25 {
        assert_eq!(healthz_h2c(&mut sender, gateway.control).await, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!driving.is_finished());
}

#[tokio::test]
async fn a_control_client_that_never_reads_its_answers_is_dropped_after_the_write_timeout() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.write_timeout = Duration::from_secs(2);
    let gateway = TestGateway::start(config).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(gateway.control).await.unwrap();
    let (_reader, mut writer) = stream.into_split();
    // Requests one after another, their answers never read: once the buffers between are
    // full the gateway's writes stall, and then it stops reading too.
    let requests = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(256);
    let started = Instant::now();
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(3), writer.write_all(&requests)).await {
            Ok(Ok(())) if started.elapsed() < Duration::from_secs(20) => continue,
            Ok(Ok(())) => break "still reading after 20 s",
            Ok(Err(_)) => break "hung up",
            Err(_) => break "stalled for 3 s without hanging up",
        }
    };
    let took = started.elapsed();
    assert_eq!(outcome, "hung up");
    // Dropped once a write has made no progress for the 2 s write timeout: the writes stalled
    // after `started` (here some 0.5 s after), so not sooner than 2 s after it (a drop as
    // soon as they stall would come well before), and well before 20 s.
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(8),
        "hung up {took:?} after the first request"
    );
    // The slot is back: the listener still serves.
    assert_eq!(gateway.control("GET", "/healthz", b"").await.status, 200);
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_dropped_after_the_handshake_timeout() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.handshake_timeout = Duration::from_millis(300);
    let gateway = TestGateway::start(config).await;
    let started = Instant::now();
    let mut stream = TcpStream::connect(gateway.public).await.unwrap();
    // A complete upgrade request but for its final blank line, one byte every 20 ms.
    let request = upgrade_request("/slowloris", &["X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaa"]);
    let request = &request[..request.len() - 2];
    let mut dropped = None;
    for byte in request.iter().cycle().take(500) {
        if stream.write_all(&[*byte]).await.is_err() {
            dropped = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(20), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                dropped = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => panic!(
                "the gateway answered a request it never fully got: {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(_) => {}
        }
    }
    let took = dropped.expect("still connected after 500 bytes over 10 s");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(1500),
        "dropped after {took:?}"
    );
    // Counted when the gateway gave up on the request: no GET can follow that.
    let metrics = gateway.metrics().await;
    assert_eq!(refused_by(&metrics, "timeout"), 1.0, "counted as a timeout");
    assert_eq!(metrics["connections_opened"], 0.0);
    assert_eq!(metrics["requests_started"], 0.0);
    assert!(api.seen().is_empty(), "{:?}", api.seen());
    assert_accounting(&gateway, &api, 0).await;
}

// ---- upstream caps ----

#[tokio::test]
async fn upstream_max_connections_caps_concurrent_api_requests() {
    let delay = Duration::from_millis(300);
    let api = MockApi::with_script(move |s| match s.method.as_str() {
        "POST" => Reply::ok(s.body.clone()).after(delay),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.upstream_max_connections = Some(2);
    let gateway = TestGateway::start(config).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(gateway.connect(&format!("/c{i}")).await);
    }
    let started = Instant::now();
    let tasks = spawn_round_trips(clients);
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    let took = started.elapsed();
    let mut posts = api.wait_for("POST", 6).await;
    posts.sort_by_key(|p| p.at);
    // A request holds its slot until its answer (≥ delay after arrival), so any window
    // shorter than the delay can hold at most the cap's worth of arrivals.
    let most = (0..posts.len())
        .map(|i| {
            posts[i..]
                .iter()
                .take_while(|p| p.at - posts[i].at < delay - Duration::from_millis(20))
                .count()
        })
        .max()
        .unwrap();
    assert!(most <= 2, "{most} API requests at once with a cap of 2");
    assert!(
        took >= delay * 3 - Duration::from_millis(50),
        "6 requests of {delay:?} through 2 slots took only {took:?}"
    );
    drop(clients);
    assert_accounting(&gateway, &api, 0).await;
}

/// Has every socket send one message (`m<index>`) at once, each in a task that checks the
/// reply and hands the socket back.
fn spawn_round_trips(sockets: Vec<Ws>) -> Vec<tokio::task::JoinHandle<Ws>> {
    sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                let text = format!("m{i}");
                assert_eq!(round_trip(&mut ws, &text).await, text);
                ws
            })
        })
        .collect()
}

/// Connects `clients` sockets, has each send one message at the same moment and checks its
/// reply, polling the gateway's gauges meanwhile; returns the most API connections open and
/// the highest concurrency limit seen.
async fn burst_of_messages(gateway: &TestGateway, clients: usize) -> (f64, f64) {
    let mut sockets = Vec::new();
    for i in 0..clients {
        sockets.push(gateway.connect(&format!("/burst{i}")).await);
    }
    let tasks = spawn_round_trips(sockets);
    let (mut most_open, mut highest_limit) = (0.0_f64, 0.0_f64);
    while !tasks.iter().all(|t| t.is_finished()) {
        let metrics = gateway.metrics().await;
        most_open = most_open.max(metrics["upstream_connections_open"]);
        highest_limit = highest_limit.max(metrics["upstream_concurrency_limit"]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for task in tasks {
        task.await.expect("every client got its reply");
    }
    let metrics = gateway.metrics().await;
    highest_limit = highest_limit.max(metrics["upstream_concurrency_limit"]);
    (most_open, highest_limit)
}

#[tokio::test]
async fn an_api_that_queues_requests_is_not_sent_many_more_than_the_minimum_concurrency() {
    // One request at a time, 10 ms each: every request sent beyond the first waits inside
    // the API, and its answer takes longer the more were sent.
    let service = Duration::from_millis(10);
    let free_at = std::sync::Mutex::new(Instant::now());
    let api = MockApi::with_script(move |s| match s.method.as_str() {
        "POST" => {
            let now = Instant::now();
            let mut free = free_at.lock().unwrap();
            *free = (*free).max(now) + service;
            Reply::ok(s.body.clone()).after(*free - now)
        }
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.upstream_min_concurrency = 4;
    let gateway = TestGateway::start(config).await;
    let (most_open, highest_limit) = burst_of_messages(&gateway, 60).await;
    // Without the adaptive limit all 60 go at once, on 60 connections.
    assert!(
        most_open <= 20.0 && highest_limit <= 20.0,
        "API connections up to {most_open}, limit up to {highest_limit}"
    );
    assert_eq!(gateway.metrics().await["requests_failed"], 0.0);
}

#[tokio::test]
async fn an_api_that_keeps_its_pace_gets_more_than_the_minimum_concurrency() {
    // Many workers, each taking 100 ms: answers take as long however many are sent.
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "POST" => Reply::ok(s.body.clone()).after(Duration::from_millis(100)),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.upstream_min_concurrency = 4;
    let gateway = TestGateway::start(config).await;
    let (most_open, highest_limit) = burst_of_messages(&gateway, 120).await;
    // Doubling with each round of answers: 4, 8, 16, 32, 64 on a quiet machine. Asked: at
    // least two doublings (a round judged slow on a busy machine, CI's two cores shared with
    // other tests, halves one step; the test below shows 5xx answers leave it at 4).
    assert!(
        highest_limit >= 16.0 && most_open >= 16.0,
        "API connections up to {most_open}, limit up to {highest_limit}"
    );
    assert_eq!(gateway.metrics().await["requests_failed"], 0.0);
}

#[tokio::test]
async fn quick_5xx_answers_do_not_grow_the_concurrency_limit() {
    // A proxy in front of a stopped API answers 502 at its own pace, whatever the API's:
    // those answers say nothing of how much more the API can take.
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "POST" => Reply::status(502, s.body.clone()).after(Duration::from_millis(100)),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.upstream_min_concurrency = 4;
    let gateway = TestGateway::start(config).await;
    // The same burst that takes an API keeping its pace to 32 and more (the test above).
    let (_, highest_limit) = burst_of_messages(&gateway, 120).await;
    assert_eq!(highest_limit, 4.0);
}

#[tokio::test]
async fn requests_waiting_for_an_api_slot_time_out_within_the_upstream_timeout() {
    let api = MockApi::with_slow_posts("late", Duration::from_secs(10)).await;
    let timeout = Duration::from_secs(2);
    let mut config = test_config(&api);
    config.upstream_max_connections = Some(1);
    config.upstream_timeout = timeout;
    let gateway = TestGateway::start(config).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(gateway.connect(&format!("/w{i}")).await);
    }
    let mut closes = Vec::new();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let sent = Instant::now();
                ws.send(Message::text("x")).await.unwrap();
                let close = close_frame(&mut ws).await;
                (close, sent.elapsed())
            })
        })
        .collect();
    for task in tasks {
        let ((code, reason), took) = task.await.unwrap();
        closes.push((code, reason));
        // Waiting for the one slot counts against the deadline: nobody waits for the others
        // (which would be 2 or 3 timeouts).
        assert!(took < timeout * 8 / 5, "closed {took:?} after sending");
    }
    // The first was sent and timed out at the API: 1011. The others waited for the one
    // connection; one whose time ran out before it was sent is told to try again later
    // (1013, as after --upstream-max-wait); one sent in its last moments timed out (1011).
    closes.sort();
    assert_eq!(
        closes[0],
        (1011, "upstream timeout".to_owned()),
        "{closes:?}"
    );
    for close in &closes[1..] {
        assert!(
            [(1011, "upstream timeout"), (1013, "upstream overloaded")]
                .contains(&(close.0, close.1.as_str())),
            "{closes:?}"
        );
    }
    let deletes = api.wait_for("DELETE", 3).await;
    let mut codes: Vec<u16> = deletes
        .iter()
        .filter_map(|d| d.header("x-close-code")?.parse().ok())
        .collect();
    codes.sort();
    let mut expected: Vec<u16> = closes.iter().map(|c| c.0).collect();
    expected.sort();
    assert_eq!(codes, expected);
    let metrics = gateway.metrics().await;
    assert_eq!(closed_by(&metrics, "upstream_failure"), 3.0);
    assert!(metrics["requests_failed"] >= 3.0, "{metrics:?}");
    assert_accounting(&gateway, &api, 0).await;
}

// ---- control connections ----

#[tokio::test]
async fn control_connections_over_the_budget_get_503_on_either_control_listener() {
    let api = MockApi::start().await;
    let socket = std::env::temp_dir().join(format!("ws2http-limits-{}.sock", std::process::id()));
    let mut config = test_config(&api);
    config.control_unix_socket = Some(socket.clone());
    let budget = ws2http::DescriptorBudget {
        control_connections: 2,
        ..ws2http::DescriptorBudget::plan(&config, 20_000).unwrap()
    };
    let gateway = TestGateway::start_with_budget(config, budget).await;

    // Two connections in the middle of a request hold both places.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(gateway.control).await.unwrap();
        stream.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
        held.push(stream);
    }
    // Once the listener has taken them both (a request that finds a place is answered 200
    // and gives it back).
    let refused = healthz_until(gateway.control, 503).await;
    assert_eq!(refused.header("retry-after"), Some("1"));

    // The Unix socket counts against the same places.
    let mut unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    unix.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), unix.read_to_end(&mut answer)).await;
    let answer = parse_response(&answer).expect("an HTTP answer");
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));

    // A place comes back when a held connection goes.
    drop(held.pop());
    healthz_until(gateway.control, 200).await;
    let _ = std::fs::remove_file(&socket);
}

/// Asks `control` for `/healthz` every 20 ms until the answer is `status` (5 s at most).
async fn healthz_until(control: std::net::SocketAddr, status: u16) -> RawResponse {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = raw_http(control, "GET", "/healthz", &[], b"").await;
        if answer.status == status {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after 5 s, not {status}",
            answer.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A gateway with the control budget it plans for 20,000 descriptors (256 connections), every
/// one of them held by a connection in the middle of a request head, and its API: the next
/// control connection is over the cap.
async fn with_every_control_connection_held() -> (MockApi, TestGateway, Vec<TcpStream>) {
    let api = MockApi::start().await;
    let config = test_config(&api);
    let budget = ws2http::DescriptorBudget::plan(&config, 20_000).unwrap();
    assert_eq!(budget.control_connections, 256);
    let gateway = TestGateway::start_with_budget(config, budget).await;
    let mut held = Vec::new();
    for _ in 0..256 {
        let mut stream = TcpStream::connect(gateway.control).await.unwrap();
        stream.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
        held.push(stream);
    }
    // Once the listener has taken them all.
    healthz_until(gateway.control, 503).await;
    (api, gateway, held)
}

/// What an HTTP/1.1 client over a connection cap is sent, byte for byte.
const BUSY_HTTP1: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The 24 bytes that open h2c (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty SETTINGS frame, what an h2c client sends after the preface.
const H2_EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

/// One HTTP/2 frame: type, flags, stream id, payload.
#[derive(Debug)]
struct H2Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// `bytes` as whole HTTP/2 frames (RFC 9113, 4.1), or `None` if they are not.
fn h2_frames(mut bytes: &[u8]) -> Option<Vec<H2Frame>> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let header = bytes.get(..9)?;
        let length =
            usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
        let stream = u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let payload = bytes.get(9..9 + length)?.to_vec();
        frames.push(H2Frame {
            kind: header[3],
            flags: header[4],
            stream,
            payload,
        });
        bytes = &bytes[9 + length..];
    }
    Some(frames)
}

/// Asserts that `answer` is the gateway's h2c refusal: its SETTINGS, then a GOAWAY with last
/// stream id 0 and NO_ERROR, and nothing after.
fn assert_h2_refusal(answer: &[u8]) {
    let frames = h2_frames(answer)
        .unwrap_or_else(|| panic!("not HTTP/2 frames: {:?}", String::from_utf8_lossy(answer)));
    assert_eq!(frames.len(), 2, "{frames:?}");
    let (settings, goaway) = (&frames[0], &frames[1]);
    assert_eq!(
        (settings.kind, settings.flags, settings.stream),
        (0x4, 0, 0),
        "first the server's SETTINGS (no ACK): {frames:?}"
    );
    assert_eq!(settings.payload.len() % 6, 0, "{frames:?}");
    assert_eq!((goaway.kind, goaway.stream), (GOAWAY, 0), "{frames:?}");
    assert!(goaway.payload.len() >= 8, "{frames:?}");
    let last_stream_id = u32::from_be_bytes(goaway.payload[..4].try_into().unwrap()) & 0x7fff_ffff;
    let error_code = u32::from_be_bytes(goaway.payload[4..8].try_into().unwrap());
    assert_eq!(last_stream_id, 0, "no stream was processed");
    assert_eq!(
        error_code, 0,
        "NO_ERROR: with last stream id 0, it may be sent again"
    );
    assert_eq!(
        &goaway.payload[8..],
        b"control connections over capacity",
        "the debug data"
    );
}

#[tokio::test]
async fn control_connections_over_the_budget_in_h2c_get_a_goaway_for_no_stream() {
    let (_api, gateway, _held) = with_every_control_connection_held().await;

    // The preface and an empty SETTINGS frame, read by hand.
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    let sent = Instant::now();
    stream.write_all(H2_PREFACE).await.unwrap();
    stream.write_all(&H2_EMPTY_SETTINGS).await.unwrap();
    let answer = read_until_closed(&mut stream).await;
    let took = sent.elapsed();
    assert_h2_refusal(&answer);
    assert!(
        took < Duration::from_millis(900),
        "answered and closed {took:?} after the preface, not at once"
    );

    // h2's client tells that its request was refused, unprocessed.
    let tcp = TcpStream::connect(gateway.control).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let mut client = client.ready().await.unwrap();
    let request = hyper::Request::post(format!("http://{}/x", gateway.control))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let driving = tokio::spawn(connection);
    let error = tokio::time::timeout(Duration::from_secs(3), response)
        .await
        .expect("an answer within 3 s")
        .expect_err("refused");
    assert!(
        error.is_go_away() && error.is_remote(),
        "not the gateway's GOAWAY: {error:?}"
    );
    assert_eq!(error.reason(), Some(h2::Reason::NO_ERROR), "{error:?}");
    let _ = tokio::time::timeout(Duration::from_secs(3), driving).await;
}

#[tokio::test]
async fn control_connections_over_the_budget_in_http1_still_get_503_with_retry_after() {
    let (_api, gateway, _held) = with_every_control_connection_held().await;
    let answer = raw_http(gateway.control, "GET", "/healthz", &[], b"").await;
    assert_eq!(answer.status, 503);
    assert_eq!(answer.header("retry-after"), Some("1"));

    // Byte for byte, at once, with a request head that has not come whole yet.
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    let sent = Instant::now();
    stream.write_all(b"POST /x HTTP/1.1\r\nHo").await.unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert_eq!(
        String::from_utf8_lossy(&answer),
        String::from_utf8_lossy(BUSY_HTTP1)
    );
    assert!(sent.elapsed() < Duration::from_millis(900), "not at once");
}

#[tokio::test]
async fn control_connections_over_the_budget_that_send_part_of_the_h2c_preface_are_answered_within_a_second(
) {
    let (_api, gateway, _held) = with_every_control_connection_held().await;

    // The preface in two writes, 200 ms apart: HTTP/2 all the same.
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    stream.write_all(&H2_PREFACE[..16]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.write_all(&H2_PREFACE[16..]).await.unwrap();
    stream.write_all(&H2_EMPTY_SETTINGS).await.unwrap();
    assert_h2_refusal(&read_until_closed(&mut stream).await);

    // A first byte that could open h2c is waited on; the next, off the preface, is answered
    // HTTP/1.1 at once.
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    stream.write_all(b"P").await.unwrap();
    assert!(
        stays_unanswered(&mut stream, Duration::from_millis(200)).await,
        "answered before the second byte"
    );
    let sent = Instant::now();
    stream
        .write_all(b"OST /x HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream).await;
    assert_eq!(answer, BUSY_HTTP1);
    assert!(sent.elapsed() < Duration::from_millis(600), "not at once");

    // A start of it and then nothing: no protocol told, answered HTTP/1.1 once the second is up.
    let mut stream = TcpStream::connect(gateway.control).await.unwrap();
    let sent = Instant::now();
    stream.write_all(&H2_PREFACE[..12]).await.unwrap();
    let answer = read_until_closed(&mut stream).await;
    let took = sent.elapsed();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        String::from_utf8_lossy(BUSY_HTTP1)
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2000),
        "answered and closed {took:?} after its 12 bytes"
    );
}

/// A gateway with one control connection, held by a request head that never ends, and one
/// place to refuse from: while a refusal holds that place the listener takes no other
/// connection, so when the next one over the budget is answered tells when the refusal before
/// it ended. Returns the API, the gateway and the held connection.
async fn with_one_place_to_refuse_from() -> (MockApi, TestGateway, TcpStream) {
    let api = MockApi::start().await;
    let config = test_config(&api);
    let budget = ws2http::DescriptorBudget {
        control_connections: 1,
        control_refusals: 1,
        ..ws2http::DescriptorBudget::plan(&config, 20_000).unwrap()
    };
    let gateway = TestGateway::start_with_budget(config, budget).await;
    // Taken first (the listener takes connections in the order they came), it holds the one
    // connection place for the whole test (--handshake-timeout is 10 s).
    let mut held = TcpStream::connect(gateway.control).await.unwrap();
    held.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
    (api, gateway, held)
}

/// Opens a control connection that asks for `/healthz`: over the budget, it waits for the
/// place to refuse from and is answered once it has it.
async fn next_over_the_budget(gateway: &TestGateway) -> TcpStream {
    let mut next = TcpStream::connect(gateway.control).await.unwrap();
    next.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    next
}

#[tokio::test]
async fn control_connections_over_the_budget_have_what_follows_their_answer_read_until_they_close()
{
    let (_api, gateway, _held) = with_one_place_to_refuse_from().await;
    let opened = Instant::now();
    let mut refused = TcpStream::connect(gateway.control).await.unwrap();
    // A head and the start of its body: the answer comes after the first bytes, the rest is
    // read and dropped...
    let mut request =
        b"POST /x HTTP/1.1\r\nHost: gateway\r\nContent-Length: 32768\r\n\r\n".to_vec();
    request.extend_from_slice(&[b'x'; 16 * 1024]);
    refused.write_all(&request).await.unwrap();
    assert_eq!(read_until_closed(&mut refused).await, BUSY_HTTP1);
    // ...and so is what comes after the answer: the socket still takes it (one closed with
    // unread bytes would have been reset).
    refused
        .write_all(&[b'x'; 16 * 1024])
        .await
        .expect("the rest of the body is taken after the answer");
    // The refusal holds its place while the client stays. (Nothing tells that the next one
    // waits for it: watched for a fixed time.)
    let mut next = next_over_the_budget(&gateway).await;
    assert!(
        stays_unanswered(&mut next, Duration::from_millis(150)).await,
        "the place was free again before the refused client closed"
    );
    // The client closes: the place is free at once, not when the refusal's second is up.
    drop(refused);
    assert_eq!(read_until_closed(&mut next).await, BUSY_HTTP1);
    let took = opened.elapsed();
    assert!(
        took < Duration::from_millis(800),
        "the next one answered {took:?} after the refused one connected"
    );
}

#[tokio::test]
async fn control_connections_over_the_budget_that_stay_after_their_answer_are_closed_when_the_second_is_up(
) {
    let (_api, gateway, _held) = with_one_place_to_refuse_from().await;
    let opened = Instant::now();
    let mut refused = next_over_the_budget(&gateway).await;
    assert_eq!(read_until_closed(&mut refused).await, BUSY_HTTP1);
    // It goes on sending, 512 bytes every 100 ms (well under 64 KiB in all), for 5 s if it
    // can, and never closes.
    let trickling = tokio::spawn(async move {
        for _ in 0..50 {
            if refused.write_all(&[b'x'; 512]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    });
    let mut next = next_over_the_budget(&gateway).await;
    assert_eq!(read_until_closed(&mut next).await, BUSY_HTTP1);
    let took = opened.elapsed();
    // The refusal has its second from its accept (after `opened`), no more.
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_secs(3),
        "the next one answered {took:?} after the refused one connected"
    );
    assert!(
        trickling.await.unwrap(),
        "the refused client could still send after 5 s"
    );
}

#[tokio::test]
async fn control_connections_over_the_budget_that_send_more_than_64_kib_after_their_answer_are_closed_then(
) {
    let (_api, gateway, _held) = with_one_place_to_refuse_from().await;
    let opened = Instant::now();
    let mut refused = next_over_the_budget(&gateway).await;
    assert_eq!(read_until_closed(&mut refused).await, BUSY_HTTP1);
    // 1 MiB after the answer, and the socket kept open for 5 s: read and dropped up to 64 KiB,
    // then closed (with a reset, the rest unread).
    let flooding = tokio::spawn(async move {
        let sent = refused.write_all(&vec![b'x'; 1 << 20]).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        sent
    });
    let mut next = next_over_the_budget(&gateway).await;
    assert_eq!(read_until_closed(&mut next).await, BUSY_HTTP1);
    let took = opened.elapsed();
    // Well before the refusal's second is up.
    assert!(
        took < Duration::from_millis(800),
        "the next one answered {took:?} after the refused one connected"
    );
    flooding.abort();
}

#[tokio::test]
async fn control_connections_over_the_budget_answered_at_the_end_of_their_second_have_100_ms_more_to_close(
) {
    let (_api, gateway, _held) = with_one_place_to_refuse_from().await;
    let opened = Instant::now();
    // The start of the h2c preface, then nothing: answered HTTP/1.1 once the second is up...
    let mut refused = TcpStream::connect(gateway.control).await.unwrap();
    refused.write_all(&H2_PREFACE[..12]).await.unwrap();
    let mut next = next_over_the_budget(&gateway).await;
    assert_eq!(read_until_closed(&mut refused).await, BUSY_HTTP1);
    // ...and what follows is still read for 100 ms after that, while it stays open: the place
    // comes free 1.1 s after its accept (after `opened`; timers fire late, never early, so
    // that is a floor), not at the second.
    assert_eq!(read_until_closed(&mut next).await, BUSY_HTTP1);
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(1050) && took < Duration::from_secs(3),
        "the next one answered {took:?} after the refused one connected"
    );
    drop(refused);
}

#[tokio::test]
async fn control_connections_over_the_budget_wait_while_every_place_to_refuse_them_is_taken() {
    let api = MockApi::start().await;
    let config = test_config(&api);
    let budget = ws2http::DescriptorBudget {
        control_connections: 1,
        control_refusals: 1,
        ..ws2http::DescriptorBudget::plan(&config, 20_000).unwrap()
    };
    let gateway = TestGateway::start_with_budget(config, budget).await;
    let mut held = TcpStream::connect(gateway.control).await.unwrap();
    held.write_all(b"POST /x HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // One over the budget is waited on for its first bytes, then answered 503 and closed: it
    // stays silent, so it holds the only place to refuse from for the whole second.
    let mut refused = TcpStream::connect(gateway.control).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut next = TcpStream::connect(gateway.control).await.unwrap();
    next.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        .await
        .unwrap();
    // Nothing tells that a connection waits for a place, so this watches it for a fixed
    // time (one given a place would be answered at once; the place is held for 1 s).
    assert!(
        stays_unanswered(&mut next, Duration::from_millis(300)).await,
        "answered or closed while the place was taken"
    );
    let answer = read_until_closed(&mut refused).await;
    assert_eq!(parse_response(&answer).expect("an HTTP answer").status, 503);
    drop(refused);
    // Its place free again, the waiting one is answered.
    let answer = read_until_closed(&mut next).await;
    assert_eq!(parse_response(&answer).expect("an HTTP answer").status, 503);
    drop(held);
}
