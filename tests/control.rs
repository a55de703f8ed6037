//! The control listener as the API uses it: push, disconnect with a code and reason, look a
//! client up, metrics and health.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_websockets::Message;

async fn setup() -> (MockApi, TestGateway) {
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    (api, gateway)
}

#[tokio::test]
async fn a_push_to_an_unknown_client_gets_404() {
    let (_api, gateway) = setup().await;
    let response = gateway.control("POST", "/nobody", b"hello").await;
    assert_eq!(response.status, 404);
    assert_eq!(gateway.metrics().await["pushes_refused"], 1.0);
}

#[tokio::test]
async fn a_text_push_that_is_not_utf8_gets_400() {
    let (_api, gateway) = setup().await;
    let _ws = gateway.connect("/alice").await;
    let response = gateway.control("POST", "/alice", &[0xff, 0xfe]).await;
    assert_eq!(response.status, 400);
}

#[tokio::test]
async fn delete_closes_the_socket_with_the_given_code_and_reason_and_tells_the_api() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    let response = gateway
        .control("DELETE", "/alice?code=4001&reason=kicked%20out", b"")
        .await;
    assert_eq!(response.status, 200);
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "kicked out"));
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.body, Bytes::from_static(b"kicked out"));
    assert_eq!(delete.header("x-close-code"), Some("4001"));
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["connections_closed_by_reason{reason=\"control\"}"],
        1.0
    );
    // Gone now: another push or close finds nobody.
    assert_eq!(gateway.control("POST", "/alice", b"late").await.status, 404);
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_second_delete_while_the_socket_closes_gets_404_and_changes_nothing() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    let first = gateway
        .control("DELETE", "/alice?code=4001&reason=first", b"")
        .await;
    assert_eq!(first.status, 200);
    let second = gateway
        .control("DELETE", "/alice?code=4002&reason=second", b"")
        .await;
    // 404 either way: closing (`client is disconnecting`), or already gone.
    assert_eq!(second.status, 404, "{}", second.text());
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "first"));
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.header("x-close-code"), Some("4001"));
}

#[tokio::test]
async fn replies_waiting_for_a_backed_up_socket_go_out_before_a_control_close() {
    const BIG: usize = 16 << 20;
    let api = MockApi::with_script(|seen| match (seen.method.as_str(), &seen.body[..]) {
        // Late, so that the second message is read (and answered) before the socket backs up.
        ("POST", b"big") => Reply::ok(vec![b'x'; BIG]).after(Duration::from_millis(300)),
        _ => echo_script(seen),
    })
    .await;
    let mut config = test_config(&api);
    config.max_message_size = 2 * BIG;
    config.pipeline = 2;
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/slow-reader").await;
    // The first reply fills the socket's buffers (the client reads nothing yet), so the
    // second waits in the gateway when the close comes.
    ws.send(Message::text("big")).await.unwrap();
    ws.send(Message::text("small")).await.unwrap();
    api.wait_for("POST", 2).await;
    // Both answers are in the gateway (the big one read whole), not at the API.
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n == 0.0,
            Duration::from_secs(10),
        )
        .await;
    let response = gateway
        .control("DELETE", "/slow-reader?code=4001&reason=bye", b"")
        .await;
    assert_eq!(response.status, 200);

    match next_data(&mut ws).await {
        big if big.as_payload().len() == BIG => {}
        other => panic!(
            "expected the big reply first, got {} bytes",
            other.as_payload().len()
        ),
    }
    assert_eq!(next_text(&mut ws).await, "echo:small");
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (4001, "bye"));
}

#[tokio::test]
async fn a_request_still_at_the_api_when_its_socket_closes_frees_its_slot_when_answered() {
    let api = MockApi::with_slow_posts("late", Duration::from_millis(300)).await;
    let gateway = TestGateway::start(test_config(&api)).await;
    // A client that reads nothing from here on: it never answers the close, so the close
    // handshake waits its full 2 s.
    let mut ws = gateway.connect("/closing").await;
    ws.send(Message::text("m")).await.unwrap();
    api.wait_for("POST", 1).await;
    let response = gateway.control("DELETE", "/closing", b"").await;
    assert_eq!(response.status, 200);
    // Answered after 300 ms: its API slot is free before the close handshake ends (2 s).
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n == 0.0,
            Duration::from_millis(1800),
        )
        .await;
    // The DELETE still comes after that answer.
    let delete = api.wait_for("DELETE", 1).await.remove(0);
    let post = api.seen_with("POST").remove(0);
    assert!(delete.at >= post.at + Duration::from_millis(300));
    drop(ws);
}

#[tokio::test]
async fn delete_without_a_code_closes_with_1000() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    assert_eq!(gateway.control("DELETE", "/alice", b"").await.status, 200);
    let (code, _) = close_frame(&mut ws).await;
    assert_eq!(code, 1000);
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.header("x-close-code"), Some("1000"));
}

#[tokio::test]
async fn delete_with_an_empty_code_closes_with_1000_and_the_reason() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    let response = gateway
        .control("DELETE", "/alice?code=&reason=bye", b"")
        .await;
    assert_eq!(response.status, 200);
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!((code, reason.as_str()), (1000, "bye"));
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.header("x-close-code"), Some("1000"));
}

#[tokio::test]
async fn delete_of_an_unknown_client_gets_404_and_a_bad_code_400() {
    let (_api, gateway) = setup().await;
    let _ws = gateway.connect("/alice").await;
    assert_eq!(gateway.control("DELETE", "/nobody", b"").await.status, 404);
    for query in ["code=1005", "code=999", "code=5000", "code=abc"] {
        let response = gateway
            .control("DELETE", &format!("/alice?{query}"), b"")
            .await;
        assert_eq!(response.status, 400, "{query}");
    }
    let long = format!("/alice?reason={}", "x".repeat(124));
    assert_eq!(gateway.control("DELETE", &long, b"").await.status, 400);
    // None of the refused closes touched the socket.
    assert_eq!(
        gateway
            .control("POST", "/alice", b"still here")
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn get_describes_the_connection_as_json() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    round_trip(&mut ws, "one").await;
    round_trip(&mut ws, "two").await;
    assert_eq!(gateway.control("POST", "/alice", b"push").await.status, 200);
    assert_eq!(next_text(&mut ws).await, "push");
    let response = gateway.control("GET", "/alice", b"").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("application/json"));
    let json = response.text();
    let connection_id = api.seen_with("GET")[0]
        .header("x-connection-id")
        .unwrap()
        .to_owned();
    assert!(json.contains("\"client_id\":\"alice\""), "{json}");
    assert!(
        json.contains(&format!("\"connection_id\":\"{connection_id}\"")),
        "{json}"
    );
    assert!(json.contains("\"remote_addr\":\"127.0.0.1:"), "{json}");
    assert!(json.contains("\"connected_at\":\"20"), "{json}");
    assert!(json.contains("\"messages_in\":2"), "{json}");
    assert!(json.contains("\"messages_out\":3"), "{json}");
    assert!(json.contains("\"queued\":0"), "{json}");
    assert_eq!(gateway.control("GET", "/nobody", b"").await.status, 404);
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_healthz_answers() {
    let (_api, gateway) = setup().await;
    let _ws = gateway.connect("/alice").await;
    let response = gateway.control("GET", "/metrics", b"").await;
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .is_some_and(|ct| ct.starts_with("text/plain; version=0.0.4")));
    let text = response.text();
    for name in [
        "connections_opened",
        "connections_closed",
        "connections_active",
        "requests_started",
        "requests_failed",
        "requests_succeeded",
        "messages_received",
        "messages_sent",
        "pushes_accepted",
        "pushes_refused",
        "upstream_latency_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
    }
    assert_eq!(gateway.metrics().await["connections_active"], 1.0);
    let health = gateway.control("GET", "/healthz", b"").await;
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn reserved_names_get_400_and_the_fixed_endpoints_take_only_their_methods() {
    let (api, gateway) = setup().await;
    // A reserved name is no ClientId, spelled plainly or percent-encoded, as on the public
    // listener.
    for (method, path) in [
        ("POST", "/debug"),
        ("POST", "/%64ebug"),
        ("DELETE", "/%6Detrics"),
        ("GET", "/health%7A"),
    ] {
        let response = gateway.control(method, path, b"x").await;
        assert_eq!(response.status, 400, "{method} {path}: {}", response.text());
        assert_eq!(response.text(), "this ClientId is reserved\n");
    }
    for (method, path, allow) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("POST", "/debug/pprof/heap", "GET"),
        ("POST", "/metrics", "GET, HEAD"),
    ] {
        let response = gateway.control(method, path, b"").await;
        assert_eq!(response.status, 405, "{method} {path}");
        assert_eq!(response.header("allow"), Some(allow), "{method} {path}");
    }
    assert_eq!(gateway.control("HEAD", "/healthz", b"").await.status, 200);
    assert!(api.seen().is_empty(), "{:?}", api.seen());
}

#[tokio::test]
async fn pushes_keep_their_order_on_the_socket() {
    let (_api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    for i in 0..50 {
        let response = gateway
            .control("POST", "/alice", i.to_string().as_bytes())
            .await;
        assert_eq!(response.status, 200);
    }
    for i in 0..50 {
        assert_eq!(next_text(&mut ws).await, i.to_string());
    }
    assert_eq!(gateway.metrics().await["pushes_accepted"], 50.0);
}

async fn post_http2(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<Bytes>>,
    control: std::net::SocketAddr,
    path: &str,
    body: String,
) -> u16 {
    let request = hyper::Request::post(format!("http://{control}{path}"))
        .body(http_body_util::Full::new(Bytes::from(body)))
        .unwrap();
    sender.ready().await.unwrap();
    sender
        .send_request(request)
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn head_over_h2c_answers_the_get_head_without_a_body() {
    // A body after a HEAD is a protocol error to an HTTP/2 client (hyper leaves it out only
    // over HTTP/1.1).
    let (_api, gateway) = setup().await;
    let mut sender = control_h2c::<http_body_util::Empty<Bytes>>(gateway.control)
        .await
        .0;
    for path in ["/healthz", "/metrics", "/nobody"] {
        let request = hyper::Request::head(format!("http://{}{path}", gateway.control))
            .body(http_body_util::Empty::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let length = response
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap_or_else(|e| panic!("{path}: the HEAD's answer broke the stream: {e}"))
            .to_bytes();
        assert!(body.is_empty(), "{path}: {body:?}");
        if path == "/nobody" {
            // HEAD is no method for a ClientId: 405, bodiless all the same.
            assert_eq!(status, 405);
            continue;
        }
        let get = gateway.control("GET", path, b"").await;
        assert_eq!(status, get.status, "{path}");
        if path != "/metrics" {
            // The metrics change between the two requests; the others do not.
            assert_eq!(length, Some(get.body.len()), "{path}");
        } else {
            assert!(length.is_some_and(|n| n > 0), "{path}");
        }
    }
}

#[tokio::test]
async fn pushes_over_one_http2_connection_reach_each_socket_in_order() {
    let (_api, gateway) = setup().await;
    let clients = ["/alice", "/bob", "/carol"];
    let mut sockets = Vec::new();
    for path in clients {
        sockets.push(gateway.connect(path).await);
    }
    let sender = control_h2c(gateway.control).await.0;
    // Three pushers share the one connection, so their streams interleave on it.
    let mut pushers = Vec::new();
    for path in clients {
        let mut sender = sender.clone();
        let control = gateway.control;
        pushers.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..20 {
                let body = format!("{path}:{i}");
                statuses.push(post_http2(&mut sender, control, path, body).await);
            }
            statuses
        }));
    }
    for pusher in pushers {
        assert_eq!(pusher.await.unwrap(), vec![200; 20]);
    }
    for (path, ws) in clients.iter().zip(sockets.iter_mut()) {
        for i in 0..20 {
            assert_eq!(next_text(ws).await, format!("{path}:{i}"));
        }
    }
    let mut sender = sender;
    assert_eq!(
        post_http2(&mut sender, gateway.control, "/nobody", "x".into()).await,
        404
    );
    assert_eq!(gateway.metrics().await["pushes_accepted"], 60.0);
}

#[tokio::test]
async fn pushes_queued_before_a_control_delete_reach_the_client_before_its_close_frame() {
    let (api, gateway) = setup().await;
    let kick = gateway.control("DELETE", "/kicked?code=4001&reason=kicked", b"");
    let (kicked, (close, delete)) =
        pushes_queued_before_a_close(&gateway, &api, "/kicked", kick).await;
    assert_eq!(kicked.status, 200);
    assert_eq!(close, (4001, "kicked".to_owned()));
    assert_eq!(delete.header("x-close-code"), Some("4001"));
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn pushes_queued_before_a_newer_connection_replaces_the_socket_reach_it_before_its_close_frame(
) {
    let (api, gateway) = setup().await;
    let connect = gateway.connect("/replaced");
    let (mut newer, (close, delete)) =
        pushes_queued_before_a_close(&gateway, &api, "/replaced", connect).await;
    assert_eq!(close, (4000, "replaced".to_owned()));
    assert_eq!(delete.header("x-close-code"), Some("4000"));
    // Later pushes go to the newer connection.
    assert_eq!(
        gateway.control("POST", "/replaced", b"new").await.status,
        200
    );
    assert_eq!(next_text(&mut newer).await, "new");
    assert_accounting(&gateway, &api, 1).await;
}

/// A client at `path` that reads nothing yet, with a small receive buffer: pushes pile up in
/// its mailbox, and `close` (which closes the socket) comes while they wait there. Checks that
/// every accepted push reaches the client, in order, before the close frame, and that each
/// counts as sent once the session has ended (its DELETE sent); returns what `close` gave,
/// the close frame's code and reason, and the DELETE.
async fn pushes_queued_before_a_close<T>(
    gateway: &TestGateway,
    api: &MockApi,
    path: &str,
    close: impl std::future::Future<Output = T>,
) -> (T, ((u16, String), Seen)) {
    let mut raw =
        common::raw_ws::RawWs::connect_with_recv_buffer(gateway.public, path, Some(4096)).await;
    let large = push_until_stalled(gateway, path).await;
    assert_eq!(gateway.control("POST", path, b"bye").await.status, 200);
    let closed = close.await;

    let (messages, close) = raw.messages_until_close(Duration::from_secs(5)).await;
    assert_eq!(messages.len(), large + 1, "every accepted push arrives");
    assert!(messages[..large].iter().all(|m| m.len() == 128 * 1024));
    assert!(messages[large] == b"bye", "in the order pushed");
    let close = close.expect("then the close frame");
    let delete = api.wait_for("DELETE", 1).await.remove(0);
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["pushes_undelivered"], 0.0);
    assert_eq!(metrics["messages_sent"], (large + 1) as f64);
    let close = (
        close.close_code().expect("a close code"),
        close.close_reason().to_owned(),
    );
    (closed, (close, delete))
}

#[tokio::test]
async fn pushes_a_client_never_reads_before_a_control_delete_are_counted_undelivered() {
    let (api, gateway) = setup().await;
    let _raw =
        common::raw_ws::RawWs::connect_with_recv_buffer(gateway.public, "/gone-quiet", Some(4096))
            .await;
    push_until_stalled(&gateway, "/gone-quiet").await;
    assert_eq!(
        gateway.control("POST", "/gone-quiet", b"bye").await.status,
        200
    );
    let info = gateway.control("GET", "/gone-quiet", b"").await.text();
    let queued = json_number(&info, "queued");
    assert!(queued >= 2, "{info}");
    assert_eq!(
        gateway.control("DELETE", "/gone-quiet", b"").await.status,
        200
    );
    // The client never reads: the close gives up after its 2 s, and says what it dropped:
    // the queued pushes, and the one cut off in the write that stalled.
    api.wait_for("DELETE", 1).await;
    let metrics = gateway.metrics().await;
    let undelivered = metrics["pushes_undelivered"];
    assert_eq!(undelivered, queued as f64 + 1.0, "{metrics:?}");
    assert_eq!(
        metrics["messages_sent"] + undelivered,
        metrics["pushes_accepted"],
        "every push sent or counted undelivered: {metrics:?}"
    );
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn a_push_whose_body_stops_halfway_gets_408_within_the_handshake_timeout() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    let timeout = Duration::from_millis(500);
    config.handshake_timeout = timeout;
    let gateway = TestGateway::start(config).await;
    let _ws = gateway.connect("/alice").await;
    let started = tokio::time::Instant::now();
    // 100 bytes announced, 9 sent, then nothing: the connection is not held for good.
    let response = raw_exchange(
        gateway.control,
        b"POST /alice HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly part",
    )
    .await;
    assert_eq!(response.status, 408, "{}", response.text());
    // Not before the body's time (--handshake-timeout) is up; then soon.
    let took = started.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(20) && took < Duration::from_secs(3),
        "answered after {took:?}, with a --handshake-timeout of {timeout:?}"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["pushes_refused"], 1.0);
    assert_eq!(metrics["pushes_accepted"], 0.0);
}

/// A request body that sends `part` bytes and then never ends.
type StalledBody = http_body_util::StreamBody<
    futures_util::stream::BoxStream<
        'static,
        Result<hyper::body::Frame<Bytes>, std::convert::Infallible>,
    >,
>;

fn stalled_body(part: usize) -> StalledBody {
    use futures_util::StreamExt;
    let first = futures_util::stream::once(async move {
        Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; part])))
    });
    http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()).boxed())
}

/// A gateway whose messages are at most 1,024 bytes and whose control connections wait 5 s
/// for a body, with a client `/alice` connected.
async fn gateway_for_push_bodies() -> (MockApi, TestGateway, Ws) {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.max_message_size = 1024;
    config.handshake_timeout = Duration::from_secs(5);
    let gateway = TestGateway::start(config).await;
    let ws = gateway.connect("/alice").await;
    (api, gateway, ws)
}

/// What a push whose body stalls was answered: status, `Retry-After`, body.
type StalledAnswer = (u16, Option<hyper::header::HeaderValue>, String);

/// Opens `connections` h2c connections to the control listener with `streams` pushes to
/// `/alice` on each, every one sending 1,000 bytes of a body that never ends. Returns the
/// pushes still waiting, and the answers given within 3 s.
async fn stalled_pushes(
    gateway: &TestGateway,
    connections: usize,
    streams: usize,
) -> (tokio::task::JoinSet<StalledAnswer>, Vec<StalledAnswer>) {
    let mut answers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let sender = control_h2c::<StalledBody>(gateway.control).await.0;
        for _ in 0..streams {
            let mut sender = sender.clone();
            let control = gateway.control;
            answers.spawn(async move {
                let request = hyper::Request::post(format!("http://{control}/alice"))
                    .body(stalled_body(1000))
                    .unwrap();
                sender.ready().await.unwrap();
                let response = sender.send_request(request).await.unwrap();
                let status = response.status().as_u16();
                let retry_after = response.headers().get("retry-after").cloned();
                let text = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (
                    status,
                    retry_after,
                    String::from_utf8_lossy(&text).into_owned(),
                )
            });
        }
    }
    let mut answered = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(answer)) = tokio::time::timeout_at(deadline, answers.join_next()).await {
        answered.push(answer.unwrap());
    }
    (answers, answered)
}

#[tokio::test]
async fn one_control_connection_reads_at_most_its_share_of_push_bodies_at_once() {
    let (_api, gateway, _ws) = gateway_for_push_bodies().await;
    // One h2c connection, 40 streams of 1,000 bytes of a body that never ends: its share is
    // 32 × 1,024 bytes, so 32 fit and 8 are answered 503 at once, although the gateway's
    // budget (256 × 1,024) has room.
    let (_waiting, refused) = stalled_pushes(&gateway, 1, 40).await;
    assert_eq!(refused.len(), 8, "answered within 3 s: {refused:?}");
    for (status, retry_after, text) in &refused {
        assert_eq!(*status, 503, "{text}");
        assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert!(text.contains("this connection's push bodies"), "{text}");
    }
    // Another connection still gets its pushes through.
    let other = gateway.control("POST", "/alice", &[b'y'; 1000]).await;
    assert_eq!(other.status, 200, "{}", other.text());
}

#[tokio::test]
async fn push_bodies_being_read_over_http2_are_bounded_and_the_excess_gets_503() {
    let (_api, gateway, _ws) = gateway_for_push_bodies().await;
    // The gateway reads at most one body per control connection's worth at once: 256 × 1,024
    // bytes. Ten h2c connections open 30 streams each (within each connection's share of 32
    // bodies), each sending 1,000 bytes of a body that never ends: the first 262 fit, the
    // other 38 are answered 503 at once (not 408 after the 5 s the bodies have).
    let (mut answers, refused) = stalled_pushes(&gateway, 10, 30).await;
    for (status, retry_after, _) in &refused {
        assert_eq!(*status, 503);
        assert_eq!(retry_after.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
    }
    assert_eq!(refused.len(), 38, "answered within 3 s");
    assert_eq!(gateway.metrics().await["pushes_refused"], 38.0);
    // A push over --max-message-size is told so (413), not to come back later, even with
    // the budget spent.
    let oversized = gateway.control("POST", "/alice", &[b'z'; 2000]).await;
    assert_eq!(oversized.status, 413, "{}", oversized.text());
    // So is one whose first part alone would fit the limit but not what is left of the
    // budget: its Content-Length says it can never fit.
    let mut stream = tokio::net::TcpStream::connect(gateway.control)
        .await
        .unwrap();
    stream
        .write_all(b"POST /alice HTTP/1.1\r\nHost: g\r\nContent-Length: 2000\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&[b'z'; 500]).await.unwrap();
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut answer))
        .await
        .expect("answered before the rest of the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // The streams that were let in still wait for the rest of their bodies; when their
    // requests go (and then their connections), their bytes go back, and a push gets
    // through again.
    answers.abort_all();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let response = gateway.control("POST", "/alice", &[b'y'; 1000]).await;
        if response.status == 200 {
            break;
        }
        assert_eq!(response.status, 503, "{}", response.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the budget never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
