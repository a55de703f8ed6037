//! Shutdown: the drain that SIGTERM/SIGINT start (`TestGateway::shutdown` takes the same path
//! in-process). New websockets are refused at once, in-flight POSTs finish and their replies
//! are delivered (up to the shutdown timeout), every websocket gets `1001 going away`, and the
//! API gets exactly one DELETE per connection, sent a few at a time.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::binary::Binary;
use common::tls::TestCert;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_websockets::{ClientBuilder, Message};
use ws2http::Config;

/// Reads until the server's close frame, however long the shutdown takes to reach this
/// client (60 s at most), then finishes the closing handshake; returns code and reason.
async fn await_close(ws: Ws) -> (u16, String) {
    data_then_close(ws).await.1
}

/// Like [`await_close`], and returns the data messages that came before the close frame too.
async fn data_then_close(mut ws: Ws) -> (Vec<Message>, (u16, String)) {
    let read = async {
        let mut data = Vec::new();
        while let Some(item) = ws.next().await {
            let message = item.expect("no websocket error before the close frame");
            if let Some((code, reason)) = message.as_close() {
                return (data, (u16::from(code), reason.to_owned()));
            }
            if message.is_text() || message.is_binary() {
                data.push(message);
            }
        }
        panic!("the connection ended without a close frame");
    };
    let close = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("a close frame within 60s");
    // Lets the library send its close reply, so the gateway need not wait for it.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while ws.next().await.is_some() {}
    })
    .await;
    close
}

/// Accounting from the API's side, for when the control listener is gone: every connection
/// the API accepted (one GET each here) got exactly one DELETE, with its own connection id.
fn assert_one_delete_per_connection(api: &MockApi) {
    let ids = |method: &str| -> Vec<String> {
        api.seen_with(method)
            .iter()
            .map(|s| s.header("x-connection-id").unwrap().to_owned())
            .collect()
    };
    let gets = ids("GET");
    let deletes = ids("DELETE");
    let unique: BTreeSet<_> = deletes.iter().cloned().collect();
    assert_eq!(unique.len(), deletes.len(), "a connection got two DELETEs");
    assert_eq!(
        unique,
        gets.into_iter().collect::<BTreeSet<_>>(),
        "every accepted connection, and only those, got a DELETE"
    );
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_post_finish_and_delivers_its_reply_before_the_1001() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        // Long enough for the idle socket's close and a /metrics request to come first on a
        // loaded machine, within --shutdown-timeout (5 s).
        "POST" => Reply::ok(format!("done:{}", String::from_utf8_lossy(&s.body)))
            .after(Duration::from_secs(3)),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut gateway = TestGateway::start(test_config(&api)).await;
    let mut busy = gateway.connect("/busy").await;
    let idle = gateway.connect("/idle").await;
    busy.send(Message::text("work")).await.unwrap();
    let post = api.wait_for("POST", 1).await[0].clone();
    let busy_client = tokio::spawn(async move {
        let reply = next_text(&mut busy).await;
        (reply, await_close(busy).await)
    });
    let idle_client = tokio::spawn(await_close(idle));

    let control = gateway.control;
    let shutdown = tokio::spawn(async move { gateway.shutdown().await });
    // The idle socket closes at once; the busy one waits for its POST, and meanwhile the
    // control listener still answers.
    assert_eq!(idle_client.await.unwrap(), (1001, "going away".to_owned()));
    let metrics = parse_metrics(&raw_http(control, "GET", "/metrics", &[], b"").await.text());
    assert_eq!(
        metrics["connections_closed_by_reason{reason=\"shutdown\"}"],
        1.0
    );
    assert_eq!(
        metrics["connections_active"], 1.0,
        "the busy one is still open"
    );
    let report = shutdown.await.unwrap();
    assert_eq!(report.sessions_at_shutdown, 2);
    assert!(report.completed);
    let (reply, close) = busy_client.await.unwrap();
    assert_eq!(reply, "done:work", "the reply arrives before the close");
    assert_eq!(close, (1001, "going away".to_owned()));

    let deletes = api.seen_with("DELETE");
    assert_eq!(deletes.len(), 2);
    for delete in &deletes {
        assert_eq!(delete.body, Bytes::from_static(b"going away"));
        assert_eq!(delete.header("x-close-code"), Some("1001"));
    }
    let busy_delete = deletes.iter().find(|d| d.uri == "/busy").unwrap();
    assert!(busy_delete.at >= post.at + Duration::from_secs(3));
    assert_one_delete_per_connection(&api);
}

#[tokio::test]
async fn the_health_check_answers_404_while_the_gateway_drains() {
    let api = MockApi::with_slow_posts("done", Duration::from_secs(3)).await;
    let mut config = test_config(&api);
    // Far longer than the POST takes, which the drain waits for.
    config.shutdown_timeout = Duration::from_secs(10);
    let mut gateway = TestGateway::start(config).await;
    let before = gateway.control("GET", "/healthz", b"").await;
    assert_eq!((before.status, before.text()), (200, "ok\n".to_owned()));
    let mut busy = gateway.connect("/busy").await;
    busy.send(Message::text("work")).await.unwrap();
    api.wait_for("POST", 1).await;
    let control = gateway.control;
    let shutdown = tokio::spawn(async move { gateway.shutdown().await });
    // While the drain waits for the POST (3 s), a balancer's check sees the node going away.
    let during = until_draining(control).await;
    assert_eq!(during.text(), "draining: the gateway is shutting down\n");
    for method in ["GET", "HEAD"] {
        let during = raw_http(control, method, "/healthz", &[], b"").await;
        assert_eq!(during.status, 404, "{method}: {}", during.text());
    }
    assert!(shutdown.await.unwrap().completed);
    assert_eq!(next_text(&mut busy).await, "done");
}

#[tokio::test]
async fn shutdown_refuses_new_websockets_at_once() {
    let api = MockApi::with_slow_posts("done", Duration::from_secs(2)).await;
    let mut gateway = TestGateway::start(test_config(&api)).await;
    let mut busy = gateway.connect("/busy").await;
    busy.send(Message::text("work")).await.unwrap();
    api.wait_for("POST", 1).await;
    let url = gateway.url("/latecomer");
    let control = gateway.control;
    let latecomer = tokio::spawn(async move {
        // While the drain waits for the POST (2 s), a new client is turned away.
        until_draining(control).await;
        try_connect_url(&url, &[]).await.map(|_| ())
    });
    let client = tokio::spawn(async move {
        let reply = next_text(&mut busy).await;
        (reply, await_close(busy).await)
    });
    gateway.shutdown().await;
    assert!(
        latecomer.await.unwrap().is_err(),
        "a websocket opened while draining"
    );
    let (reply, close) = client.await.unwrap();
    assert_eq!(reply, "done");
    assert_eq!(close.0, 1001);
    assert!(
        api.seen().iter().all(|s| s.uri != "/latecomer"),
        "the latecomer never reached the API"
    );
    assert_one_delete_per_connection(&api);
}

#[tokio::test]
async fn a_silent_control_connection_does_not_hold_up_the_shutdown() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.handshake_timeout = Duration::from_secs(8);
    let mut gateway = TestGateway::start(config).await;
    // Connected but silent: the control listener is still waiting for its first bytes.
    let _silent = tokio::net::TcpStream::connect(gateway.control)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    gateway.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the shutdown took {:?}: it waited for the silent connection's first bytes",
        started.elapsed()
    );
}

#[tokio::test]
async fn public_connections_whose_request_has_not_arrived_are_closed_when_the_shutdown_begins() {
    let api = MockApi::start().await;
    // One connected and silent, one that sent part of its request head and stalled.
    shut_down_beside_a_silent_and_a_stalled_socket(
        test_config(&api),
        b"GET /partial HTTP/1.1\r\nHost: x\r\n",
        "partial head",
    )
    .await;
    assert!(api.seen().is_empty(), "{:?}", api.seen());
}

#[tokio::test]
async fn tls_connections_still_in_their_tls_handshake_are_closed_when_the_shutdown_begins() {
    let cert = TestCert::new();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.tls = Some(cert.files());
    // One connected and silent, one that sent the start of a ClientHello (a record header
    // announcing 512 bytes, and 4 of them) and stalled: the TLS handshake has begun.
    shut_down_beside_a_silent_and_a_stalled_socket(
        config,
        &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
        "mid TLS handshake",
    )
    .await;
}

/// Starts a gateway from `config` with an 8 s handshake timeout, opens one silent socket to
/// its public listener and one that sends `start` and stalls (called `stalled` in messages),
/// shuts the gateway down, and fails unless the shutdown completed well within the handshake
/// timeout and closed both sockets.
async fn shut_down_beside_a_silent_and_a_stalled_socket(
    mut config: Config,
    start: &[u8],
    stalled: &str,
) {
    config.handshake_timeout = Duration::from_secs(8);
    let mut gateway = TestGateway::start(config).await;
    let silent = TcpStream::connect(gateway.public).await.unwrap();
    let mut stalled_socket = TcpStream::connect(gateway.public).await.unwrap();
    stalled_socket.write_all(start).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let report = gateway.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the shutdown took {:?}: it waited for the sockets still in their handshake",
        started.elapsed()
    );
    assert!(report.completed);
    for (name, socket) in [("silent", silent), (stalled, stalled_socket)] {
        assert_closed(name, socket).await;
    }
}

#[tokio::test]
async fn a_connection_closed_at_the_shutdown_before_its_request_counts_as_overloaded() {
    // A POST at the API for 2 s holds the drain open, so that /metrics still answers.
    let api = MockApi::with_slow_posts("done", Duration::from_secs(2)).await;
    let mut config = test_config(&api);
    config.handshake_timeout = Duration::from_secs(8);
    let mut gateway = TestGateway::start(config).await;
    let mut busy = gateway.connect("/busy").await;
    busy.send(Message::text("work")).await.unwrap();
    api.wait_for("POST", 1).await;
    let silent = TcpStream::connect(gateway.public).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let control = gateway.control;
    let shutdown = tokio::spawn(async move { gateway.shutdown().await });
    let started = Instant::now();
    assert_closed("silent", silent).await;
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "closed {:?} after the shutdown began: not at once, while the POST kept the drain open",
        started.elapsed()
    );
    let metrics = parse_metrics(&raw_http(control, "GET", "/metrics", &[], b"").await.text());
    assert_eq!(
        metrics["handshakes_refused{reason=\"overloaded\"}"], 1.0,
        "{metrics:?}"
    );
    assert_eq!(metrics["handshakes_refused{reason=\"timeout\"}"], 0.0);
    assert!(shutdown.await.unwrap().completed);
    assert_eq!(next_text(&mut busy).await, "done");
}

#[tokio::test]
async fn a_socket_waiting_for_a_handshake_place_at_the_shutdown_counts_as_overloaded() {
    // A POST at the API for 2 s holds the drain open, so that /metrics still answers.
    let api = MockApi::with_slow_posts("done", Duration::from_secs(2)).await;
    let mut config = test_config(&api);
    config.handshake_timeout = Duration::from_secs(8);
    // One handshake slot, and one place for a socket over it.
    let budget = ws2http::DescriptorBudget {
        pending_handshakes: 1,
        handshake_waiters: 1,
        ..ws2http::DescriptorBudget::plan(&config, 20_000).unwrap()
    };
    let mut gateway = TestGateway::start_with_budget(config, budget).await;
    let mut busy = gateway.connect("/busy").await;
    busy.send(Message::text("work")).await.unwrap();
    api.wait_for("POST", 1).await;
    // A socket that began its request holds the slot; a silent one over the cap holds the
    // place (250 ms waiting for a slot, then a 503 drained until it closes it: 1.25 s); a
    // third, its request sent, is accepted and waits for a place, and the accept loop with
    // it. The shutdown begins 200 ms after it connected, well within the 1.25 s.
    let mut holder = TcpStream::connect(gateway.public).await.unwrap();
    holder.write_all(b"GET /holder HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let over_the_cap = TcpStream::connect(gateway.public).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut third = TcpStream::connect(gateway.public).await.unwrap();
    third
        .write_all(&upgrade_request("/third", &[]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let control = gateway.control;
    let shutdown = tokio::spawn(async move { gateway.shutdown().await });
    // Closed unanswered, as the holder is (not served in the slot that closing the holder
    // frees, only to be refused), and counted.
    assert_closed("third", third).await;
    let metrics = parse_metrics(&raw_http(control, "GET", "/metrics", &[], b"").await.text());
    assert_eq!(
        metrics["handshakes_refused{reason=\"overloaded\"}"], 3.0,
        "the one holding the slot, the one holding the place, and the one waiting for a \
         place: {metrics:?}"
    );
    assert!(shutdown.await.unwrap().completed);
    assert_eq!(next_text(&mut busy).await, "done");
    assert!(api.seen_with("GET").iter().all(|g| g.uri == "/busy"));
    drop((holder, over_the_cap));
}

/// Fails unless the gateway has closed `socket` (named `name` in the message): a read ends (or
/// fails: a reset) within 2 s, without a byte.
async fn assert_closed(name: &str, mut socket: TcpStream) {
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the {name} socket was not closed: {read:?}"
    );
}

#[tokio::test]
async fn a_handshake_the_api_is_still_judging_at_shutdown_ends_with_1001_and_its_delete() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "GET" => Reply::ok("ok").after(Duration::from_millis(500)),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut gateway = TestGateway::start(test_config(&api)).await;
    let url = gateway.url("/midway");
    let client = tokio::spawn(async move {
        let (ws, _) = ClientBuilder::new()
            .uri(&url)
            .unwrap()
            .connect()
            .await
            .expect("the API accepted it, so the upgrade completes");
        await_close(ws).await
    });
    api.wait_for("GET", 1).await;
    let report = gateway.shutdown().await;
    assert!(report.completed);
    assert_eq!(client.await.unwrap(), (1001, "going away".to_owned()));
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.header("x-close-code"), Some("1001"));
    assert_one_delete_per_connection(&api);
}

#[tokio::test]
async fn while_draining_pushes_get_404_later_messages_are_not_read_and_newcomers_are_refused_at_once(
) {
    let api = MockApi::with_script(|s| match (s.method.as_str(), &s.body[..]) {
        // Held through the checks below, within --shutdown-timeout (5 s).
        ("POST", b"work") => Reply::ok("done").after(Duration::from_secs(3)),
        _ => echo_script(s),
    })
    .await;
    let mut config = test_config(&api);
    // Several messages at the API at once: a message sent while one is there is read and
    // sent at once, unless the drain stopped reading.
    config.pipeline = 4;
    let mut gateway = TestGateway::start(config).await;
    let mut busy = gateway.connect("/busy").await;
    busy.send(Message::text("work")).await.unwrap();
    api.wait_for("POST", 1).await;
    busy.send(Message::text("beside")).await.unwrap();
    api.wait_for("POST", 2).await;

    let (control, url) = (gateway.control, gateway.url("/latecomer"));
    let shutdown = tokio::spawn(async move { gateway.shutdown().await });
    // The drain has begun once /healthz says so (the public listener is closed by then, and
    // the session told).
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw_http(control, "GET", "/healthz", &[], b"").await.status != 404 {
        assert!(Instant::now() < deadline, "no drain within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A new client is turned away at once, not once the drain is done.
    let tried = Instant::now();
    let latecomer = try_connect_url(&url, &[]).await;
    let took = tried.elapsed();
    assert!(latecomer.is_err(), "a websocket opened while draining");
    assert!(took < Duration::from_millis(500), "refused after {took:?}");
    // A push to the busy client is refused, and says why.
    let pushed = raw_http(control, "POST", "/busy", &[], b"pushed").await;
    assert_eq!(
        (pushed.status, pushed.text()),
        (404, "client is disconnecting\n".to_owned())
    );
    // A message sent now is not read.
    busy.send(Message::text("after the signal")).await.unwrap();
    // All of that while the busy POST is still unanswered.
    let metrics = parse_metrics(&raw_http(control, "GET", "/metrics", &[], b"").await.text());
    assert_eq!(metrics["upstream_requests_in_flight"], 1.0, "{metrics:?}");

    let (data, close) = data_then_close(busy).await;
    let texts: Vec<_> = data.iter().filter_map(|m| m.as_text()).collect();
    assert_eq!(texts, ["done", "echo:beside"], "the replies, in order");
    assert_eq!(close, (1001, "going away".to_owned()));
    assert!(shutdown.await.unwrap().completed);
    // The session's DELETE went out once it had ended, after any POST of its own: a POST of
    // the message sent during the drain would have come before it.
    let delete = api.wait_for("DELETE", 1).await.remove(0);
    assert_eq!(delete.uri, "/busy");
    let posts: Vec<_> = api.seen_with("POST").into_iter().map(|p| p.body).collect();
    assert_eq!(posts, ["work", "beside"], "nothing read after the signal");
    assert!(
        api.seen().iter().all(|s| s.uri != "/latecomer"),
        "the latecomer never reached the API"
    );
    assert_one_delete_per_connection(&api);
}

#[tokio::test]
async fn shutdown_closes_sockets_at_the_shutdown_timeout_when_a_post_takes_longer() {
    // The POST takes 4 s, the shutdown timeout is 1 s: held until the timeout, closed long
    // before the answer.
    let api = MockApi::with_slow_posts("too late", Duration::from_secs(4)).await;
    let mut config = test_config(&api);
    config.shutdown_timeout = Duration::from_secs(1);
    let mut gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/slow").await;
    ws.send(Message::text("work")).await.unwrap();
    api.wait_for("POST", 1).await;
    let started = Instant::now();
    let client = tokio::spawn(async move {
        let (data, close) = data_then_close(ws).await;
        (data, close, started.elapsed())
    });
    let report = gateway.shutdown().await;
    assert!(report.completed);
    let (data, close, took) = client.await.unwrap();
    assert_eq!(close, (1001, "going away".to_owned()));
    assert!(data.is_empty(), "the late reply is dropped: {data:?}");
    // `started` is taken before the shutdown begins, so the close cannot come sooner than the
    // timeout after it: the lower bound tells a socket held until then from one closed at once.
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(3000),
        "closed {took:?} after shutdown began, not at the 1 s shutdown timeout"
    );
    // The API still hears of the close, after its answer to the message.
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert_eq!(delete.header("x-close-code"), Some("1001"));
    let post = api.seen_with("POST")[0].clone();
    assert!(
        delete.at >= post.at + Duration::from_secs(4),
        "the DELETE came {:?} after the POST, before its answer",
        delete.at - post.at
    );
    assert_one_delete_per_connection(&api);
}

#[tokio::test]
async fn shutdown_with_500_connections_closes_each_with_1001_and_sends_exactly_500_deletes() {
    const CLIENTS: usize = 500;
    const DELETE_CONCURRENCY: usize = 16;
    let delete_delay = Duration::from_millis(20);
    let most = most_deletes_at_once_in_a_drain(CLIENTS, delete_delay, |config| {
        config.shutdown_delete_concurrency = DELETE_CONCURRENCY;
    })
    .await;
    // Sent a few at a time: a DELETE holds its slot until answered (≥ delay after arrival), so
    // no window shorter than the delay holds more arrivals than the concurrency cap.
    assert!(
        most <= DELETE_CONCURRENCY,
        "{most} DELETEs at once with a cap of {DELETE_CONCURRENCY}"
    );
}

#[tokio::test]
async fn a_drain_sends_deletes_up_to_the_shutdown_delete_concurrency_not_half_the_api_slots() {
    const CLIENTS: usize = 100;
    const API_SLOTS: usize = 16;
    let most = most_deletes_at_once_in_a_drain(CLIENTS, Duration::from_millis(300), |config| {
        // A fixed limit of 16 API slots. Outside a drain DELETEs take half of them; in a
        // drain no client stays that needs the other half, so --shutdown-delete-concurrency
        // (16) applies.
        config.upstream_max_connections = Some(API_SLOTS);
        config.upstream_min_concurrency = API_SLOTS;
        config.shutdown_delete_concurrency = API_SLOTS;
    })
    .await;
    assert!(
        most > API_SLOTS / 2 && most <= API_SLOTS,
        "{most} DELETEs at once: more than half of the {API_SLOTS} slots, at most all of them"
    );
}

/// Drains a gateway (configured by `configure`, with a 10-s shutdown timeout) holding
/// `clients` connections, against an API that answers each DELETE after `delete_delay`; checks
/// that every client got `1001 going away` and the API exactly one DELETE each, saying so; and
/// returns the most DELETEs that arrived within a window just shorter than the delay (those
/// the gateway had out at once).
async fn most_deletes_at_once_in_a_drain(
    clients: usize,
    delete_delay: Duration,
    configure: impl FnOnce(&mut ws2http::Config),
) -> usize {
    let api = MockApi::with_script(move |s| match s.method.as_str() {
        "DELETE" => Reply::ok("ok").after(delete_delay),
        _ => echo_script(s),
    })
    .await;
    let mut config = test_config(&api);
    config.shutdown_timeout = Duration::from_secs(10);
    configure(&mut config);
    let mut gateway = TestGateway::start(config).await;
    let connected = connect_clients_awaiting_close(&gateway, clients).await;

    let report = gateway.shutdown().await;
    assert_eq!(report.sessions_at_shutdown, clients);
    assert!(report.completed, "every session finished within the grace");
    for client in connected {
        assert_eq!(client.await.unwrap(), (1001, "going away".to_owned()));
    }
    let mut deletes = api.seen_with("DELETE");
    assert_eq!(deletes.len(), clients, "exactly one DELETE per connection");
    assert!(deletes
        .iter()
        .all(|d| d.body.as_ref() == b"going away" && d.header("x-close-code") == Some("1001")));
    assert_one_delete_per_connection(&api);
    deletes.sort_by_key(|d| d.at);
    most_arrivals_within(&deletes, delete_delay - Duration::from_millis(2))
}

/// Connects `n` clients (`/c0`, `/c1`, ...) to `gateway`, 50 at a time, and checks that all
/// are active; each client's task ends with the close it gets.
async fn connect_clients_awaiting_close(
    gateway: &TestGateway,
    n: usize,
) -> Vec<tokio::task::JoinHandle<(u16, String)>> {
    let mut clients = Vec::with_capacity(n);
    for batch in 0..n.div_ceil(50) {
        let connecting: Vec<_> = (batch * 50..n.min(batch * 50 + 50))
            .map(|i| {
                let url = gateway.url(&format!("/c{i}"));
                tokio::spawn(async move {
                    let (ws, _) = ClientBuilder::new()
                        .uri(&url)
                        .unwrap()
                        .connect()
                        .await
                        .expect("connects");
                    ws
                })
            })
            .collect();
        for task in connecting {
            clients.push(tokio::spawn(await_close(task.await.unwrap())));
        }
    }
    assert_eq!(gateway.metrics().await["connections_active"], n as f64);
    clients
}

/// The most of `requests` (sorted by arrival) that arrived within any `window`.
fn most_arrivals_within(requests: &[Seen], window: Duration) -> usize {
    (0..requests.len())
        .map(|i| {
            requests[i..]
                .iter()
                .take_while(|d| d.at - requests[i].at < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Starts the real binary against `api`, connects `n` clients, and checks one round trip each.
async fn binary_with_clients(api: &MockApi, n: usize) -> (Binary, Vec<Ws>) {
    let binary = Binary::start_ready(&api.base(), &["--shutdown-timeout", "3s"], &[]).await;
    let mut clients = Vec::new();
    for i in 0..n {
        let mut ws = binary.connect(&format!("/b{i}")).await;
        assert_eq!(round_trip(&mut ws, "hi").await, "echo:hi");
        clients.push(ws);
    }
    (binary, clients)
}

#[tokio::test]
async fn sigterm_drains_the_binary_every_client_gets_1001_the_api_every_delete_and_it_exits_0() {
    let api = MockApi::with_script(|s| match (s.method.as_str(), &s.body[..]) {
        ("POST", b"slow") => Reply::ok("slow done").after(Duration::from_millis(500)),
        _ => echo_script(s),
    })
    .await;
    let (mut binary, mut clients) = binary_with_clients(&api, 5).await;
    let mut busy = clients.remove(0);
    busy.send(Message::text("slow")).await.unwrap();
    api.wait_for("POST", 6).await;
    let busy = tokio::spawn(async move {
        let reply = next_text(&mut busy).await;
        (reply, await_close(busy).await)
    });
    let others: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(await_close(ws)))
        .collect();

    binary.signal(libc::SIGTERM);
    let status = binary.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", binary.stderr());
    let (reply, close) = busy.await.unwrap();
    assert_eq!(
        reply, "slow done",
        "the in-flight reply comes before the close"
    );
    assert_eq!(close, (1001, "going away".to_owned()));
    for client in others {
        assert_eq!(client.await.unwrap(), (1001, "going away".to_owned()));
    }
    let deletes = api.seen_with("DELETE");
    assert_eq!(deletes.len(), 5);
    assert!(deletes
        .iter()
        .all(|d| d.header("x-close-code") == Some("1001")));
    assert_one_delete_per_connection(&api);
    assert!(binary.stderr().contains("ws2http stopped"));
}

/// Sends `signal` to the binary with two clients: each gets `1001`, the API one DELETE
/// each, and the binary exits 0 having logged its stop.
async fn a_stop_signal_drains_the_binary(signal: libc::c_int) {
    let api = MockApi::start().await;
    let (mut binary, clients) = binary_with_clients(&api, 2).await;
    let waiting: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(await_close(ws)))
        .collect();
    binary.signal(signal);
    let status = binary.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "stderr:\n{}", binary.stderr());
    for client in waiting {
        assert_eq!(client.await.unwrap().0, 1001);
    }
    assert_eq!(api.seen_with("DELETE").len(), 2);
    assert_one_delete_per_connection(&api);
    assert!(binary.stderr().contains("ws2http stopped"));
}

#[tokio::test]
async fn sigint_drains_the_binary_like_sigterm() {
    a_stop_signal_drains_the_binary(libc::SIGINT).await;
}

#[tokio::test]
async fn sighup_drains_the_binary_like_sigterm() {
    // A gateway started in a terminal gets SIGHUP when that session ends (a dropped SSH
    // connection): by default it would vanish, its clients cut without a close frame and the
    // API never told of them.
    a_stop_signal_drains_the_binary(libc::SIGHUP).await;
}

/// The real binary against an API whose DELETE answers after `delete_delay`, with one client
/// that has made a round trip and waits for its close.
async fn binary_with_a_slow_delete(
    delete_delay: Duration,
) -> (MockApi, Binary, tokio::task::JoinHandle<(u16, String)>) {
    let api = MockApi::with_script(move |s| match s.method.as_str() {
        "DELETE" => Reply::ok("").after(delete_delay),
        _ => echo_script(s),
    })
    .await;
    let (binary, mut clients) = binary_with_clients(&api, 1).await;
    let closed = tokio::spawn(await_close(clients.remove(0)));
    (api, binary, closed)
}

#[tokio::test]
async fn a_sigterm_repeated_right_after_the_first_is_the_same_stop_and_the_binary_drains() {
    // coreutils' `timeout` signals the gateway, then its process group: two SIGTERMs moments
    // apart. The kernel may merge two sent back to back; 20 ms apart they are two.
    for gap in [None, Some(Duration::from_millis(20))] {
        let (api, mut binary, closed) = binary_with_a_slow_delete(Duration::from_millis(500)).await;
        binary.signal(libc::SIGTERM);
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
        binary.signal(libc::SIGTERM);
        let status = binary.wait_exit(Duration::from_secs(20)).await;
        let log = binary.stderr();
        assert_eq!(status.code(), Some(0), "gap {gap:?}: {log}");
        assert!(!log.contains("second signal"), "gap {gap:?}: {log}");
        assert!(log.contains("ws2http stopped"), "gap {gap:?}: {log}");
        assert_eq!(closed.await.unwrap(), (1001, "going away".to_owned()));
        assert_eq!(api.seen_with("DELETE").len(), 1, "gap {gap:?}");
    }
}

#[tokio::test]
async fn a_second_signal_a_while_after_the_first_exits_at_once_with_status_1() {
    let (_api, mut binary, _closed) = binary_with_a_slow_delete(Duration::from_secs(30)).await;
    binary.signal(libc::SIGTERM);
    // Past the 250 ms in which a repeated signal is the same stop, counted from when the
    // binary took the first one: before its drain began.
    until_draining(binary.control).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    binary.signal(libc::SIGINT);
    let status = binary.wait_exit(Duration::from_secs(10)).await;
    assert!(sent.elapsed() < Duration::from_secs(5), "not at once");
    let log = binary.stderr();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("second signal, exiting without draining"),
        "{log}"
    );
    assert!(!log.contains("ws2http stopped"), "{log}");
}

/// Asks the control listener at `control` for `/healthz` until it answers 404, the drain
/// begun (10 s at most); returns that answer.
async fn until_draining(control: std::net::SocketAddr) -> RawResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = raw_http(control, "GET", "/healthz", &[], b"").await;
        if answer.status == 404 {
            return answer;
        }
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(Instant::now() < deadline, "not draining after 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
