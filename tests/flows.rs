//! The ws2api flows, as the API and the client see them: connect, message, close, identity,
//! the same ClientId twice, and ws2api's own seven test scenarios.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_websockets::{CloseCode, Message};

async fn setup() -> (MockApi, TestGateway) {
    let api = MockApi::start().await;
    let gateway = TestGateway::start(test_config(&api)).await;
    (api, gateway)
}

// ---- ws2api's seven scenarios ----

#[tokio::test]
async fn api_ok_accepts_the_connection_with_101() {
    let (api, gateway) = setup().await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 101);
    assert_eq!(
        response.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let gets = api.wait_for("GET", 1).await;
    assert_eq!(gets[0].uri, "/alice");
}

/// Strict clients (OkHttp, Java's `java.net.http`) need the 101's `Connection` to be `Upgrade`
/// alone; every other answer of the public listener ends its connection and says so.
#[tokio::test]
async fn the_101_says_connection_upgrade_alone_and_every_other_answer_closes_the_connection() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "GET" if s.uri == "/refused" => Reply::ok("ko"),
        _ => Reply::ok("ok"),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let accepted = raw_exchange(gateway.public, &upgrade_request("/strict-client", &[])).await;
    assert_eq!(accepted.status, 101);
    assert_eq!(accepted.header("connection"), Some("Upgrade"));

    let not_an_upgrade = b"GET /strict-client HTTP/1.1\r\nHost: gateway\r\n\r\n".to_vec();
    for (request, status, connection) in [
        (upgrade_request("/refused", &[]), 403, "close"),
        (not_an_upgrade, 426, "Upgrade, close"),
    ] {
        let mut stream = tokio::net::TcpStream::connect(gateway.public)
            .await
            .expect("connect");
        stream.write_all(&request).await.expect("write");
        // No `Connection: close` in the requests: the gateway ends the connection itself.
        let mut data = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut data));
        assert!(
            read.await.is_ok(),
            "the connection stayed open after a {status}"
        );
        let response = parse_response(&data).expect("a response");
        assert_eq!(response.status, status);
        assert_eq!(response.header("connection"), Some(connection), "{status}");
    }
}

#[tokio::test]
async fn api_ko_refuses_the_handshake_with_403_and_its_body() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "GET" if s.uri == "/marker" => Reply::ok("ok"),
        "GET" => Reply::ok("ko"),
        _ => Reply::ok("ok"),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 403);
    assert_eq!(response.text(), "ko");
    let deletes = deletes_before_a_later_one(&gateway, &api, "/marker").await;
    assert!(deletes.is_empty(), "a refused client gets no DELETE");
}

#[tokio::test]
async fn the_api_s_connect_and_delete_answers_are_not_held_to_max_message_size() {
    let api = MockApi::with_script(|s| match (s.method.as_str(), s.uri.as_str()) {
        ("GET", "/login-page") => Reply::status(401, vec![b'p'; 4000]),
        ("GET", "/huge-page") => Reply::status(401, vec![b'p'; 65 * 1024]),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    // Smaller than `ok` itself.
    config.max_message_size = 1;
    let gateway = TestGateway::start(config).await;
    let ws = gateway.connect("/alice").await;
    drop(ws);
    api.wait_for("DELETE", 1).await;
    // A refusal page larger than any message keeps the API's status and body.
    let refused = raw_exchange(gateway.public, &upgrade_request("/login-page", &[])).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.body.len(), 4000);
    // One over 64 KiB is not read: the client is told why.
    let huge = raw_exchange(gateway.public, &upgrade_request("/huge-page", &[])).await;
    assert_eq!(
        (huge.status, huge.text()),
        (502, "the API's answer was too large\n".to_owned())
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["disconnects_failed"], 0.0,
        "the DELETE's `ok` was read"
    );
    assert_eq!(
        metrics["requests_failed"], 2.0,
        "the two refusals, nothing else"
    );
    assert_eq!(metrics["handshakes_refused{reason=\"api\"}"], 1.0);
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0);
}

#[tokio::test]
async fn a_delete_answered_with_a_large_body_counts_as_told() {
    // An API (or a framework's error page) that answers the DELETE with far more than any
    // message: its status is all the gateway needs.
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "DELETE" => Reply::ok(vec![b'd'; 2 * 1024 * 1024]),
        _ => echo_script(s),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    for (n, path) in ["/first", "/second"].into_iter().enumerate() {
        let mut ws = gateway.connect(path).await;
        assert_eq!(round_trip(&mut ws, "hi").await, "echo:hi");
        drop(ws);
        gateway
            .wait_for_metric(
                "disconnects_notified",
                |told| told == (n + 1) as f64,
                Duration::from_secs(10),
            )
            .await;
        // The rest of that body is left unread: its API connection (the one the GET and the
        // POST took before it) is closed, not kept for another request.
        gateway
            .wait_for_metric(
                "upstream_connections_open",
                |open| open == 0.0,
                Duration::from_secs(5),
            )
            .await;
    }
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["disconnects_failed"], 0.0, "{metrics:?}");
    assert_eq!(metrics["requests_failed"], 0.0, "{metrics:?}");
    assert_eq!(api.seen_with("DELETE").len(), 2, "each sent once");
}

#[tokio::test]
async fn api_503_on_connect_gives_the_client_502() {
    let api = MockApi::with_script(|_| Reply::status(503, "down")).await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 502);
}

#[tokio::test]
async fn a_connect_answered_5xx_gets_502_and_its_connection_a_delete() {
    // A proxy in front of PHP-FPM answers 502 when the worker died after recording the
    // connection; the application itself may fail with 500 after doing so, with a debug page
    // larger than any answer the gateway reads. Either way the API may hold a connection
    // nobody opened: it hears it is gone.
    let api = MockApi::with_script(|seen| match (seen.method.as_str(), seen.uri.as_str()) {
        ("GET", "/worker-died") => Reply::status(502, "Bad Gateway"),
        ("GET", "/app-failed") => Reply::status(500, "oops"),
        ("GET", "/debug-page") => Reply::status(500, vec![b'x'; 200 * 1024]),
        ("GET", "/maintenance") => Reply::status(503, "down for maintenance"),
        ("GET", "/refused") => Reply::status(403, "no"),
        ("GET", "/marker") => Reply::ok("ok"),
        _ => Reply::ok(""),
    })
    .await;
    let mut config = test_config(&api);
    // Answers to a connect are read up to 64 KiB at this size.
    config.max_message_size = 64 * 1024;
    let gateway = TestGateway::start(config).await;
    for (n, path) in ["/worker-died", "/app-failed", "/debug-page"]
        .into_iter()
        .enumerate()
    {
        let response = raw_exchange(gateway.public, &upgrade_request(path, &[])).await;
        assert_eq!(response.status, 502, "{path}: {}", response.text());
        let get = api.wait_for("GET", n + 1).await.remove(n);
        let delete = api.wait_for("DELETE", n + 1).await.remove(n);
        assert_undoes(&delete, &get, path, "upstream error");
    }
    // A 503 says the request was not processed (RFC 9110): 502 for the client, no DELETE.
    let unavailable = raw_exchange(gateway.public, &upgrade_request("/maintenance", &[])).await;
    assert_eq!(unavailable.status, 502);
    // A 4xx stays a refusal: the API said no, and knows it.
    let refused = raw_exchange(gateway.public, &upgrade_request("/refused", &[])).await;
    assert_eq!(refused.status, 403);
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["connections_opened"], 0.0);
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 4.0);
    assert_eq!(metrics["handshakes_refused{reason=\"api\"}"], 1.0);
    assert_eq!(metrics["requests_failed"], 5.0, "the five GETs");
    assert_eq!(
        deletes_before_a_later_one(&gateway, &api, "/marker")
            .await
            .len(),
        3,
        "one DELETE per 5xx but the 503"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["disconnects_notified"], 4.0, "the marker's too");
}

#[tokio::test]
async fn a_connect_failed_with_a_5xx_after_the_timeout_is_undone_with_a_delete() {
    // A proxy that gave up on a slow worker (504) after the handshake stopped waiting: the
    // worker may go on and record the connection.
    let (slow, _gateway) =
        connect_answered_after_the_timeout(504, "Gateway Timeout", "/late-5xx").await;
    let get = slow.wait_for("GET", 1).await.remove(0);
    let delete = slow.wait_for("DELETE", 1).await.remove(0);
    assert_undoes(&delete, &get, "/late-5xx", "upstream timeout");
    assert!(
        delete.at >= get.at + Duration::from_millis(1300),
        "after the answer"
    );
}

#[tokio::test]
async fn a_message_round_trips_through_the_api() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    assert_eq!(round_trip(&mut ws, "hello").await, "echo:hello");
    let posts = api.wait_for("POST", 1).await;
    assert_eq!(posts[0].uri, "/alice");
    assert_eq!(posts[0].body, Bytes::from_static(b"hello"));
    assert_eq!(
        posts[0].header("content-type"),
        Some("text/plain; charset=utf-8")
    );
}

#[tokio::test]
async fn a_push_from_the_api_reaches_the_client() {
    let (_api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    let response = gateway.control("POST", "/alice", b"news").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.text(), "ok");
    assert_eq!(next_text(&mut ws).await, "news");
}

#[tokio::test]
async fn a_client_close_reason_reaches_the_api_in_the_delete() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    ws.send(Message::close(Some(CloseCode::NORMAL_CLOSURE), "bye now"))
        .await
        .unwrap();
    let deletes = api.wait_for("DELETE", 1).await;
    assert_eq!(deletes[0].uri, "/alice");
    assert_eq!(deletes[0].body, Bytes::from_static(b"bye now"));
    assert_eq!(deletes[0].header("x-close-code"), Some("1000"));
}

#[tokio::test]
async fn a_close_frame_without_a_code_gives_a_delete_without_x_close_code() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    ws.send(Message::close(None, "")).await.unwrap();
    let deletes = api.wait_for("DELETE", 1).await;
    assert_eq!(deletes[0].body, Bytes::new());
    assert_eq!(deletes[0].header("x-close-code"), None);
}

#[tokio::test]
async fn an_unexpected_disconnect_is_reported_as_eof() {
    let (api, gateway) = setup().await;
    let ws = gateway.connect("/alice").await;
    drop(ws);
    let deletes = api.wait_for("DELETE", 1).await;
    assert_eq!(deletes[0].body, Bytes::from_static(b"EOF"));
    assert_eq!(deletes[0].header("x-close-code"), None);
}

// ---- connect ----

#[tokio::test]
async fn connect_forwards_query_and_client_headers() {
    let (api, gateway) = setup().await;
    let response = raw_exchange(
        gateway.public,
        &upgrade_request(
            "/alice?token=abc&x=1",
            &[
                "Cookie: session=s1",
                "Authorization: Bearer t0k",
                "Origin: https://app.example",
                "User-Agent: test-agent/1",
                "Sec-WebSocket-Protocol: chat",
                "X-Forwarded-For: 203.0.113.9",
                "X-Secret-Internal: not forwarded",
            ],
        ),
    )
    .await;
    assert_eq!(response.status, 101);
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.uri, "/alice?token=abc&x=1");
    assert_eq!(get.header("cookie"), Some("session=s1"));
    assert_eq!(get.header("authorization"), Some("Bearer t0k"));
    assert_eq!(get.header("origin"), Some("https://app.example"));
    assert_eq!(get.header("user-agent"), Some("test-agent/1"));
    assert_eq!(get.header("sec-websocket-protocol"), Some("chat"));
    assert_eq!(
        get.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(get.header("x-forwarded-proto"), Some("http"));
    assert_eq!(get.header("x-secret-internal"), None);
    assert_eq!(get.header("x-connection-id").map(str::len), Some(16));
}

#[tokio::test]
async fn every_x_forwarded_for_line_is_kept_in_order_before_the_peer_address() {
    // A proxy in front adds its own line after the one the client sent (HAProxy's
    // `option forwardfor`): the API sees the whole chain, the real client's address in it.
    let (api, gateway) = setup().await;
    let response = raw_exchange(
        gateway.public,
        &upgrade_request(
            "/bob",
            &[
                "X-Forwarded-For: 198.51.100.7",
                "X-Forwarded-For: 203.0.113.9, 192.0.2.1",
            ],
        ),
    )
    .await;
    assert_eq!(response.status, 101);
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(
        get.header("x-forwarded-for"),
        Some("198.51.100.7, 203.0.113.9, 192.0.2.1, 127.0.0.1")
    );
}

#[tokio::test]
async fn the_api_chosen_subprotocol_is_echoed_to_the_client() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "GET" => Reply::ok("ok").header("sec-websocket-protocol", "chat.v2"),
        _ => Reply::ok(""),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let response = raw_exchange(
        gateway.public,
        &upgrade_request("/a", &["Sec-WebSocket-Protocol: chat.v1, chat.v2"]),
    )
    .await;
    assert_eq!(response.status, 101);
    assert_eq!(response.header("sec-websocket-protocol"), Some("chat.v2"));
}

#[tokio::test]
async fn an_ipv4_client_of_a_dual_stack_listener_is_forwarded_as_ipv4() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.listen = "[::]:0".parse().unwrap();
    let gateway = TestGateway::start(config).await;
    let ipv4 = std::net::SocketAddr::from(([127, 0, 0, 1], gateway.public.port()));
    let response = raw_exchange(ipv4, &upgrade_request("/dual", &[])).await;
    assert_eq!(response.status, 101);
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.header("x-forwarded-for"), Some("127.0.0.1"));
}

#[tokio::test]
async fn a_subprotocol_the_client_did_not_offer_gets_502_and_its_approval_a_delete() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "GET" => Reply::ok("ok").header("sec-websocket-protocol", "chat.v2"),
        _ => Reply::ok(""),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    for (path, offer) in [
        ("/offers-another", &["Sec-WebSocket-Protocol: chat.v1"][..]),
        ("/offers-none", &[][..]),
    ] {
        let response = raw_exchange(gateway.public, &upgrade_request(path, offer)).await;
        assert_eq!(response.status, 502, "{path}: {}", response.text());
    }
    let deletes = api.wait_for("DELETE", 2).await;
    for delete in &deletes {
        assert_eq!(delete.body, Bytes::from_static(b"subprotocol not offered"));
    }
    assert_eq!(gateway.metrics().await["connections_opened"], 0.0);
}

#[tokio::test]
async fn two_origin_lines_get_400_and_no_api_call() {
    let (api, gateway) = setup().await;
    let response = raw_exchange(
        gateway.public,
        &upgrade_request(
            "/twice",
            &[
                "Origin: https://allowed.example",
                "Origin: https://other.example",
            ],
        ),
    )
    .await;
    assert_eq!(response.status, 400);
    assert_eq!(response.text(), "more than one Origin header\n");
    let seen = seen_before_a_later_connect(&gateway, &api, "/marker").await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn api_4xx_is_relayed_with_retry_after() {
    let api =
        MockApi::with_script(|_| Reply::status(429, "slow down").header("retry-after", "7")).await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 429);
    assert_eq!(response.header("retry-after"), Some("7"));
    assert_eq!(response.text(), "slow down");
}

#[tokio::test]
async fn api_200_with_another_body_is_403_and_401_stays_401() {
    let api = MockApi::with_script(|s| {
        if s.uri.starts_with("/nope") {
            Reply::status(401, "who are you")
        } else {
            Reply::ok("okay")
        }
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let almost = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(almost.status, 403);
    let unauthorized = raw_exchange(gateway.public, &upgrade_request("/nope", &[])).await;
    assert_eq!(unauthorized.status, 401);
}

#[tokio::test]
async fn an_unreachable_api_gives_502_and_a_slow_one_504() {
    // Bound and not listening, to the end of the test: connecting is refused, and no other
    // test's server can take the port meanwhile (without SO_REUSEADDR, no other socket may
    // share it, listening or not).
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let unreachable = reserved.local_addr().unwrap();
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.api = format!("http://{unreachable}/").parse().unwrap();
    let gateway = TestGateway::start(config).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 502);
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0);
    assert_eq!(metrics["requests_failed"], 1.0);

    let slow = MockApi::with_script(|s| match s.method.as_str() {
        "GET" => Reply::ok("ok").after(Duration::from_secs(3)),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&slow);
    config.upstream_timeout = Duration::from_millis(300);
    let gateway = TestGateway::start(config).await;
    // The GET's time (2 x --upstream-timeout, 600 ms) starts in the gateway after this, and
    // before the API records the GET, by however long the GET takes to get there.
    let sent = tokio::time::Instant::now();
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 504);
    assert_eq!(
        gateway.metrics().await["handshakes_refused{reason=\"api_failure\"}"],
        1.0
    );
    // The GET goes on for another --upstream-timeout; unanswered then, it counts as failed
    // and the connection the API may still approve is undone, ahead of the API's answer
    // (3 s after the GET).
    let get = slow.wait_for("GET", 1).await.remove(0);
    let delete = slow.wait_for("DELETE", 1).await.remove(0);
    assert_undoes(&delete, &get, "/alice", "upstream timeout");
    assert!(
        delete.at >= sent + Duration::from_millis(550)
            && delete.at < get.at + Duration::from_secs(3),
        "the DELETE came {:?} after the request, {:?} after the GET",
        delete.at - sent,
        delete.at - get.at
    );
    assert_eq!(gateway.metrics().await["requests_failed"], 1.0);
}

#[tokio::test]
async fn an_api_named_by_a_host_name_is_looked_up_and_serves_the_websocket() {
    // `localhost` goes through the gateway's resolver (getaddrinfo, /etc/hosts) like any host
    // name: the connector takes only an IP address as it is.
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    let port = api.addr.port();
    config.api = format!("http://localhost:{port}/").parse().unwrap();
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/named").await;
    assert_eq!(round_trip(&mut ws, "hello").await, "echo:hello");
    let post = api.wait_for("POST", 1).await.remove(0);
    assert_eq!(post.uri, "/named");
    let host = format!("localhost:{port}");
    assert_eq!(post.header("host"), Some(host.as_str()));
}

/// An address whose connection attempts hang, as with an API host that is down behind a
/// firewall: a listener whose accept queue is full drops further SYNs. The attempts hang while
/// the returned listener and queued connections are kept.
async fn black_holed_address() -> (
    std::net::SocketAddr,
    tokio::net::TcpListener,
    Vec<tokio::net::TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    for _ in 0..4 {
        let connect = tokio::net::TcpStream::connect(addr);
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), connect).await {
            queued.push(stream);
        }
    }
    (addr, listener, queued)
}

#[tokio::test]
async fn an_api_that_never_answers_the_connection_attempt_gives_502_not_504() {
    // Nothing was sent, so this is "unreachable".
    let (addr, _listener, _queued) = black_holed_address().await;
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.api = format!("http://{addr}/").parse().unwrap();
    config.upstream_timeout = Duration::from_millis(500);
    let gateway = TestGateway::start(config).await;
    let started = tokio::time::Instant::now();
    let response = raw_exchange(gateway.public, &upgrade_request("/alice", &[])).await;
    assert_eq!(response.status, 502, "{}", response.text());
    assert!(
        response.text().contains("could not be reached"),
        "{}",
        response.text()
    );
    // The attempt may take half of --upstream-timeout.
    assert!(
        started.elapsed() >= Duration::from_millis(240),
        "told after {:?}",
        started.elapsed()
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0);
    assert_eq!(metrics["requests_failed"], 1.0);
}

/// Connects `clients` clients at once to a gateway in front of an API host that never
/// answers a connection attempt (over HTTP/2 if `http2`), and checks that each is told `502`
/// (unreachable) when the attempt it waited for fails, at half of `--upstream-timeout`, not
/// `503` (overloaded) when its own time runs out while it tries once more.
async fn clients_waiting_for_a_failing_connection_attempt_get_502(clients: usize, http2: bool) {
    let (addr, _listener, _queued) = black_holed_address().await;
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.api = format!("http://{addr}/").parse().unwrap();
    config.upstream_http2 = http2;
    config.upstream_timeout = Duration::from_secs(2);
    let gateway = TestGateway::start(config).await;
    let started = tokio::time::Instant::now();
    let handshakes: Vec<_> = (0..clients)
        .map(|n| {
            let public = gateway.public;
            tokio::spawn(async move {
                let response = raw_exchange(public, &upgrade_request(&format!("/c{n}"), &[])).await;
                (response.status, response.text(), started.elapsed())
            })
        })
        .collect();
    let mut told = Vec::new();
    for handshake in handshakes {
        told.push(handshake.await.unwrap());
    }
    let not_unreachable: Vec<_> = told
        .iter()
        .filter(|(status, text, _)| *status != 502 || !text.contains("could not be reached"))
        .collect();
    assert!(
        not_unreachable.is_empty(),
        "{} of {clients} not told 502 unreachable: {not_unreachable:?}",
        not_unreachable.len()
    );
    let slowest = told.iter().map(|(_, _, after)| *after).max().unwrap();
    assert!(
        slowest < Duration::from_millis(1800),
        "the last was told after {slowest:?}, the attempts failed at 1 s"
    );
    let soonest = told.iter().map(|(_, _, after)| *after).min().unwrap();
    assert!(
        soonest >= Duration::from_millis(950),
        "the first was told after {soonest:?}, before the attempts failed at 1 s"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["handshakes_refused{reason=\"api_failure\"}"],
        clients as f64
    );
}

#[tokio::test]
async fn clients_waiting_for_the_h2_connection_attempt_that_fails_get_its_502() {
    // One attempt at a time opens the shared HTTP/2 connection: the others wait for it.
    clients_waiting_for_a_failing_connection_attempt_get_502(20, true).await;
}

#[tokio::test]
async fn clients_waiting_for_http1_connection_attempts_that_fail_get_their_502() {
    // At most 32 HTTP/1 connections are opened at once: the others wait for them.
    clients_waiting_for_a_failing_connection_attempt_get_502(40, false).await;
}

#[tokio::test]
async fn a_message_to_an_api_that_is_gone_closes_the_socket_1011_upstream_unreachable() {
    // Connection: close on every answer, so that each request opens a connection of its own:
    // once the API stops listening, the message's request cannot be sent at all.
    let api =
        MockApi::with_script_on_a_kept_port(|s| echo_script(s).header("connection", "close")).await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut ws = gateway.connect("/gone-api").await;
    assert_eq!(round_trip(&mut ws, "before").await, "echo:before");
    api.stop();
    // The listener is gone once its task is; connecting is then refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(api.addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the API still listens"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(
        close_frame(&mut ws).await,
        (1011, "upstream unreachable".to_owned())
    );
    // Counted once the session has ended (its close handshake done or given up).
    gateway
        .wait_for_metric(
            "connections_closed_by_reason{reason=\"upstream_failure\"}",
            |n| n == 1.0,
            Duration::from_secs(10),
        )
        .await;
}

#[tokio::test]
async fn plain_gets_get_426_and_healthz_200_without_asking_the_api() {
    let (api, gateway) = setup().await;
    let plain = raw_http(gateway.public, "GET", "/alice", &[], b"").await;
    assert_eq!(plain.status, 426);
    let health = raw_http(gateway.public, "GET", "/healthz", &[], b"").await;
    assert_eq!(health.status, 200);
    let seen = seen_before_a_later_connect(&gateway, &api, "/marker").await;
    assert!(seen.is_empty(), "nothing reaches the API: {seen:?}");
}

#[tokio::test]
async fn the_public_listener_refuses_pushes_with_405() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/alice").await;
    let response = raw_http(gateway.public, "POST", "/alice", &[], b"spoofed").await;
    assert_eq!(response.status, 405);
    // A POST for the spoofed push would have gone out before the one for this message.
    assert_eq!(round_trip(&mut ws, "real").await, "echo:real");
    let posts: Vec<_> = api.seen_with("POST").into_iter().map(|p| p.body).collect();
    assert_eq!(posts, [Bytes::from_static(b"real")]);
}

// ---- ClientId ----

#[tokio::test]
async fn malformed_client_ids_get_400_without_an_upstream_call() {
    let (api, gateway) = setup().await;
    let long = format!("/{}", "x".repeat(257));
    let huge = format!("/{}", "%41".repeat(3000));
    for path in [
        "/",
        "/a/b",
        "/%2F",
        "/a%2",
        "/%FF%FE",
        "/%0D%0AX-Injected:%201",
        "/..",
        "/%2e",
        long.as_str(),
        huge.as_str(),
    ] {
        let response = raw_exchange(gateway.public, &upgrade_request(path, &[])).await;
        assert!(
            response.status == 400 || response.status == 431,
            "{path}: {}",
            response.status
        );
    }
    let seen = seen_before_a_later_connect(&gateway, &api, "/marker").await;
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn client_ids_are_percent_encoded_again_upstream() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/%C3%A9t%C3%A9%20x").await;
    round_trip(&mut ws, "hi").await;
    let get = &api.wait_for("GET", 1).await[0];
    assert_eq!(get.uri, "/%C3%A9t%C3%A9%20x");
    let post = &api.wait_for("POST", 1).await[0];
    assert_eq!(post.uri, "/%C3%A9t%C3%A9%20x");
    let pushed = gateway.control("POST", "/%C3%A9t%C3%A9%20x", b"p").await;
    assert_eq!(pushed.status, 200);
}

// ---- messages ----

#[tokio::test]
async fn binary_messages_travel_both_ways() {
    let (api, gateway) = setup().await;
    let mut ws = gateway.connect("/bin").await;
    let payload: Vec<u8> = vec![0, 159, 146, 150, 255];
    ws.send(Message::binary(Bytes::from(payload.clone())))
        .await
        .unwrap();
    let reply = next_data(&mut ws).await;
    assert!(reply.is_binary());
    let mut want = b"echo:".to_vec();
    want.extend_from_slice(&payload);
    assert_eq!(reply.into_payload().to_vec(), want);
    let post = &api.wait_for("POST", 1).await[0];
    assert_eq!(
        post.header("content-type"),
        Some("application/octet-stream")
    );

    let response = raw_http(
        gateway.control,
        "POST",
        "/bin",
        &[("Content-Type", "application/octet-stream")],
        &[1, 2, 3, 255],
    )
    .await;
    assert_eq!(response.status, 200);
    let pushed = next_data(&mut ws).await;
    assert!(pushed.is_binary());
    assert_eq!(pushed.into_payload().to_vec(), vec![1, 2, 3, 255]);
}

#[tokio::test]
async fn a_reply_that_is_not_utf8_is_sent_as_binary() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "POST" => Reply::ok(vec![0xff, 0xfe]).header("content-type", "text/plain"),
        _ => Reply::ok("ok"),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut ws = gateway.connect("/a").await;
    ws.send(Message::text("x")).await.unwrap();
    let reply = next_data(&mut ws).await;
    assert!(reply.is_binary());
}

#[tokio::test]
async fn empty_and_204_answers_send_nothing_back() {
    let api = MockApi::with_script(|s| match (s.method.as_str(), &s.body[..]) {
        ("POST", b"empty") => Reply::ok(""),
        ("POST", b"nocontent") => Reply::status(204, ""),
        ("POST", _) => Reply::ok("last"),
        _ => Reply::ok("ok"),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut ws = gateway.connect("/a").await;
    ws.send(Message::text("empty")).await.unwrap();
    ws.send(Message::text("nocontent")).await.unwrap();
    ws.send(Message::text("final")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "last");
}

#[tokio::test]
async fn a_non_2xx_answer_is_relayed_and_counted_as_failed() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "POST" => Reply::status(422, "bad input"),
        _ => Reply::ok("ok"),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut ws = gateway.connect("/a").await;
    assert_eq!(round_trip(&mut ws, "x").await, "bad input");
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["requests_failed"], 1.0);
    assert_eq!(metrics["requests_succeeded"], 1.0, "the GET succeeded");
}

#[tokio::test]
async fn a_message_past_the_upstream_timeout_closes_1011() {
    let api = MockApi::with_slow_posts("late", Duration::from_secs(30)).await;
    let mut config = test_config(&api);
    config.upstream_timeout = Duration::from_millis(300);
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/b").await;
    ws.send(Message::text("x")).await.unwrap();
    let (code, reason) = close_frame(&mut ws).await;
    assert_eq!(code, 1011);
    assert_eq!(reason, "upstream timeout");
    let delete = &api.wait_for("DELETE", 1).await[0];
    assert_eq!(delete.uri, "/b");
    assert_eq!(delete.header("x-close-code"), Some("1011"));
    assert_eq!(delete.body, Bytes::from_static(b"upstream timeout"));
}

#[tokio::test]
async fn cookie_and_authorization_are_sent_again_with_every_message() {
    let (api, gateway) = setup().await;
    let mut ws = gateway
        .try_connect(
            "/a",
            &[("cookie", "sid=42"), ("authorization", "Bearer abc")],
        )
        .await
        .unwrap();
    round_trip(&mut ws, "one").await;
    round_trip(&mut ws, "two").await;
    for post in api.wait_for("POST", 2).await {
        assert_eq!(post.header("cookie"), Some("sid=42"));
        assert_eq!(post.header("authorization"), Some("Bearer abc"));
    }
}

#[tokio::test]
async fn cookie_lines_of_the_upgrade_are_joined_for_the_get_and_every_message() {
    let (api, gateway) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(gateway.public)
        .await
        .unwrap();
    let request = upgrade_request("/a", &["Cookie: theme=dark", "Cookie: sid=42"]);
    stream.write_all(&request).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "the 101 arrives");
        head.push(byte[0]);
    }
    assert_eq!(parse_response(&head).unwrap().status, 101);
    let frame = common::raw_ws::encode_client_frame(true, common::raw_ws::TEXT, b"one");
    stream.write_all(&frame).await.unwrap();
    let post = api.wait_for("POST", 1).await.remove(0);
    assert_eq!(post.header("cookie"), Some("theme=dark; sid=42"));
    let get = api.seen_with("GET").remove(0);
    let cookies: Vec<_> = get.headers.iter().filter(|(k, _)| *k == "cookie").collect();
    assert_eq!(
        cookies.len(),
        1,
        "one Cookie line on the GET too: {cookies:?}"
    );
    assert_eq!(get.header("cookie"), Some("theme=dark; sid=42"));
}

#[tokio::test]
async fn an_upgrade_with_two_authorization_headers_gets_400() {
    let (api, gateway) = setup().await;
    let request = upgrade_request(
        "/a",
        &["Authorization: Bearer one", "Authorization: Bearer two"],
    );
    let response = raw_exchange(gateway.public, &request).await;
    assert_eq!(response.status, 400);
    assert!(
        response.text().contains("Authorization"),
        "{}",
        response.text()
    );
    assert!(api.seen().is_empty(), "{:?}", api.seen());
}

#[tokio::test]
async fn only_200_with_ok_opens_the_websocket() {
    let api = MockApi::with_script(|seen| match seen.method.as_str() {
        "GET" => Reply::status(202, "ok"),
        _ => Reply::ok(""),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/a", &[])).await;
    assert_eq!(response.status, 403);
}

#[tokio::test]
async fn a_connect_approved_after_the_timeout_is_undone_with_a_delete_after_the_answer() {
    // The API decides too late for the client (504), but it did approve and may have
    // recorded the connection: it hears the connection is gone, after its own answer.
    let (slow, gateway) = connect_answered_after_the_timeout(200, "ok", "/alice").await;
    let get = slow.wait_for("GET", 1).await.remove(0);
    let delete = slow.wait_for("DELETE", 1).await.remove(0);
    assert_undoes(&delete, &get, "/alice", "upstream timeout");
    assert!(
        delete.at >= get.at + Duration::from_millis(1300),
        "the DELETE came {:?} after the GET, before its answer",
        delete.at - get.at
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["connections_opened"], 0.0);
}

#[tokio::test]
async fn a_connect_refused_after_the_timeout_gets_no_delete() {
    let (slow, gateway) = connect_answered_after_the_timeout(403, "no", "/alice").await;
    // The late 403 ends the GET (it counts then), and whether a DELETE follows is decided in
    // the same step.
    gateway
        .wait_for_metric("requests_failed", |n| n == 1.0, Duration::from_secs(5))
        .await;
    let deletes = deletes_before_a_later_one(&gateway, &slow, "/marker").await;
    assert!(deletes.is_empty(), "{deletes:?}");
}

#[tokio::test]
async fn a_client_that_hangs_up_while_the_api_decides_still_gets_its_delete() {
    let api = MockApi::with_script(|seen| match seen.method.as_str() {
        "GET" => Reply::ok("ok").after(Duration::from_millis(300)),
        _ => Reply::ok(""),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let stream = upgrade_request_sent(&gateway, "/leaver").await;
    let get = api.wait_for("GET", 1).await.remove(0);
    drop(stream);
    let delete = api.wait_for("DELETE", 1).await.remove(0);
    assert_undoes(&delete, &get, "/leaver", "EOF");
    assert!(
        delete.at >= get.at + Duration::from_millis(300),
        "after the answer"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["connections_opened"], 0.0, "it never opened");
    assert_accounting(&gateway, &api, 0).await;
}

#[tokio::test]
async fn an_abandoned_connect_approved_late_does_not_replace_the_newer_socket() {
    // A browser reload while the API is slow: the first attempt is given up, the second
    // opens; the first one's late approval must not close the second.
    let api = MockApi::with_script(|seen| match seen.method.as_str() {
        "GET" if seen.uri.contains("attempt=1") => {
            Reply::ok("ok").after(Duration::from_millis(600))
        }
        _ => echo_script(seen),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let first = upgrade_request_sent(&gateway, "/reloader?attempt=1").await;
    let first_get = api.wait_for("GET", 1).await.remove(0);
    drop(first);
    let mut second = gateway.connect("/reloader?attempt=2").await;
    assert_eq!(round_trip(&mut second, "before").await, "echo:before");
    let delete = api.wait_for("DELETE", 1).await.remove(0);
    assert_eq!(
        delete.header("x-connection-id"),
        first_get.header("x-connection-id"),
        "the DELETE is the abandoned attempt's"
    );
    assert_eq!(round_trip(&mut second, "after").await, "echo:after");
    assert_eq!(api.seen_with("DELETE").len(), 1);
}

#[tokio::test]
async fn a_connect_whose_api_connection_breaks_after_sending_gets_502_and_a_delete() {
    // An API that reads the GET and drops the connection without an answer (it crashed, a
    // proxy reset it): it may have recorded the connection first.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let deletes = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = deletes.clone();
    let api = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&chunk[..n]);
                    let Some(head) = parse_head(&data) else {
                        continue;
                    };
                    if data.starts_with(b"GET ") {
                        return; // dropped, unanswered
                    }
                    if data.len() < head.0 + head.1 {
                        continue;
                    }
                    let body = String::from_utf8_lossy(&data[head.0..head.0 + head.1]);
                    let lines = String::from_utf8_lossy(&data[..head.0]).to_ascii_lowercase();
                    let code = lines.lines().find(|l| l.starts_with("x-close-code:"));
                    seen.lock()
                        .unwrap()
                        .push(format!("{body} (code: {code:?})"));
                    data.drain(..head.0 + head.1);
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mock = MockApi::start().await;
    let mut config = test_config(&mock);
    config.api = format!("http://{addr}/").parse().unwrap();
    let gateway = TestGateway::start(config).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/crashed", &[])).await;
    assert_eq!(response.status, 502);
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0);
    assert_eq!(metrics["requests_failed"], 1.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while deletes.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no DELETE");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*deletes.lock().unwrap(), ["upstream error (code: None)"]);
    api.abort();
}

#[tokio::test]
async fn a_connect_still_waiting_for_an_api_slot_at_the_timeout_gets_503_counted_overloaded_and_is_dropped(
) {
    // The slow connect GET holds the slot for twice --upstream-timeout (its handshake gives up
    // after one, the GET goes on), past the next client's --upstream-timeout.
    let (api, gateway, holder, response) = a_connect_behind_one_held_api_slot(|config| {
        config.upstream_timeout = Duration::from_millis(500);
    })
    .await;
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(holder.await.unwrap().status, 504);
    // The gateway's own overload, not the API's failure (which the holder's 504 is).
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["handshakes_refused{reason=\"overloaded\"}"], 1.0,
        "{metrics:?}"
    );
    assert_eq!(
        metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0,
        "{metrics:?}"
    );
    // The holder's GET lets go of the slot at 1 s, and its DELETE follows (it times out too:
    // the API takes 1.5 s over anything of /holder's). The dropped GET counts as a failed
    // request: then nothing is left as started and unfinished.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = gateway.metrics().await;
        let unfinished = metrics["requests_started"]
            - metrics["requests_failed"]
            - metrics["requests_succeeded"];
        let deletes_done = metrics["disconnects_notified"] + metrics["disconnects_failed"];
        if unfinished == 0.0 && deletes_done == 1.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The waiting one was never sent: still waiting, it would have had the free slot before
    // a newer connect.
    let seen = seen_before_a_later_connect(&gateway, &api, "/marker").await;
    let for_waiting: Vec<_> = seen.iter().filter(|s| s.uri == "/waiting").collect();
    assert!(
        for_waiting.is_empty(),
        "the API heard of it: {for_waiting:?}"
    );
}

#[tokio::test]
async fn a_connect_that_waits_past_the_max_wait_gets_503_counted_overloaded() {
    // The slow connect GET holds its slot past the next connect's max wait.
    let (api, gateway, holder, response) = a_connect_behind_one_held_api_slot(|config| {
        config.upstream_max_wait = Duration::from_millis(300);
    })
    .await;
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(response.text(), "the API is overloaded\n");
    let metrics = gateway.metrics().await;
    assert_eq!(
        metrics["handshakes_refused{reason=\"overloaded\"}"], 1.0,
        "{metrics:?}"
    );
    assert_eq!(
        metrics["handshakes_refused{reason=\"api_failure\"}"], 0.0,
        "{metrics:?}"
    );
    assert_eq!(holder.await.unwrap().status, 101);
    assert!(
        api.seen().iter().all(|s| s.uri != "/waiting"),
        "the API heard of it: {:?}",
        api.seen()
    );
}

/// A gateway with one API slot (`tweak` sets the rest of its config), taken by the connect GET
/// of `/holder`, which the API answers after 1.5 s; then the answer to a connect for
/// `/waiting`, sent while the slot is held. Returns the API, the gateway, the holder's
/// exchange still under way and the waiting one's answer.
async fn a_connect_behind_one_held_api_slot(
    tweak: impl FnOnce(&mut ws2http::Config),
) -> (
    MockApi,
    TestGateway,
    tokio::task::JoinHandle<RawResponse>,
    RawResponse,
) {
    let api = MockApi::with_script(|seen| match seen.uri.as_str() {
        "/holder" => Reply::ok("ok").after(Duration::from_millis(1500)),
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.upstream_max_connections = Some(1);
    config.upstream_min_concurrency = 1;
    tweak(&mut config);
    let gateway = TestGateway::start(config).await;
    let public = gateway.public;
    let holder =
        tokio::spawn(async move { raw_exchange(public, &upgrade_request("/holder", &[])).await });
    api.wait_for("GET", 1).await;
    let response = raw_exchange(gateway.public, &upgrade_request("/waiting", &[])).await;
    (api, gateway, holder, response)
}

/// A raw socket to the gateway that has sent the upgrade request for `path` and reads nothing.
async fn upgrade_request_sent(gateway: &TestGateway, path: &str) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(gateway.public)
        .await
        .unwrap();
    stream.write_all(&upgrade_request(path, &[])).await.unwrap();
    stream
}

/// The end of an HTTP/1.1 request head in `data` and its Content-Length, once complete.
fn parse_head(data: &[u8]) -> Option<(usize, usize)> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some((end, length))
}

#[tokio::test]
async fn a_client_that_leaves_before_its_connect_was_sent_costs_the_api_nothing() {
    // One API slot, held by a slow message: the next client's GET waits for it.
    let api = MockApi::with_slow_posts("late", Duration::from_millis(800)).await;
    let mut config = test_config(&api);
    config.upstream_max_connections = Some(1);
    config.upstream_min_concurrency = 1;
    let gateway = TestGateway::start(config).await;
    let mut busy = gateway.connect("/busy").await;
    busy.send(Message::text("slow")).await.unwrap();
    api.wait_for("POST", 1).await;
    let waiting = upgrade_request_sent(&gateway, "/gone").await;
    gateway
        .wait_for_metric(
            "upstream_requests_waiting",
            |n| n == 1.0,
            Duration::from_secs(5),
        )
        .await;
    drop(waiting);
    // Its GET is dropped: no longer waiting for the slot, well before the slot frees.
    gateway
        .wait_for_metric(
            "upstream_requests_waiting",
            |n| n == 0.0,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        gateway.metrics().await["upstream_requests_in_flight"],
        1.0,
        "the slot is still the slow message's"
    );
    assert_eq!(next_text(&mut busy).await, "late");
    // Still waiting, it would have had the slot before a newer connect.
    let seen = seen_before_a_later_connect(&gateway, &api, "/marker").await;
    let for_gone: Vec<_> = seen.iter().filter(|s| s.uri == "/gone").collect();
    assert!(for_gone.is_empty(), "the API heard of it: {for_gone:?}");
}

#[tokio::test]
async fn one_connection_id_marks_the_get_posts_and_delete_of_a_connection() {
    let (api, gateway) = setup().await;
    let mut first = gateway.connect("/a").await;
    let mut second = gateway.connect("/b").await;
    round_trip(&mut first, "1").await;
    round_trip(&mut second, "2").await;
    first.close().await.unwrap();
    second.close().await.unwrap();
    api.wait_for("DELETE", 2).await;
    let ids_for = |path: &str| {
        let mut ids: Vec<String> = api
            .seen()
            .into_iter()
            .filter(|s| s.uri == path)
            .map(|s| s.header("x-connection-id").unwrap().to_owned())
            .collect();
        ids.dedup();
        ids
    };
    let a = ids_for("/a");
    let b = ids_for("/b");
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(b.len(), 1, "{b:?}");
    assert_ne!(a, b);
}

#[tokio::test]
async fn the_delete_comes_after_the_answers_to_earlier_messages() {
    let api = MockApi::with_slow_posts("done", Duration::from_millis(400)).await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut ws = gateway.connect("/a").await;
    ws.send(Message::text("work")).await.unwrap();
    let post = api.wait_for("POST", 1).await[0].clone();
    drop(ws);
    let delete = api.wait_for("DELETE", 1).await[0].clone();
    assert!(
        delete.at >= post.at + Duration::from_millis(400),
        "DELETE arrived {:?} after the POST, before its answer",
        delete.at - post.at
    );
}

#[tokio::test]
async fn pipelined_replies_come_back_in_message_order() {
    let api = MockApi::with_script(|s| match s.method.as_str() {
        "POST" => {
            let n: u64 = std::str::from_utf8(&s.body).unwrap().parse().unwrap();
            // Later messages answer sooner, so only the gateway keeps the order.
            Reply::ok(format!("r{n}")).after(Duration::from_millis(10 * (40 - n % 40)))
        }
        _ => Reply::ok("ok"),
    })
    .await;
    let mut config = test_config(&api);
    config.pipeline = 8;
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/p").await;
    for i in 0..40 {
        ws.send(Message::text(i.to_string())).await.unwrap();
    }
    for i in 0..40 {
        assert_eq!(next_text(&mut ws).await, format!("r{i}"));
    }
    // Measure how many POSTs overlapped: arrivals within one answer's delay of each other.
    let posts = api.wait_for("POST", 40).await;
    let overlap = posts
        .windows(2)
        .filter(|w| w[1].at - w[0].at < Duration::from_millis(10))
        .count();
    assert!(overlap > 0, "pipelining should overlap requests");
}

#[tokio::test]
async fn pipeline_never_has_more_than_n_requests_in_flight_per_connection() {
    let api = MockApi::start().await;
    let mut config = test_config(&api);
    config.pipeline = 3;
    // Each POST waits 100 ms; arrivals are counted against completions by time windows.
    api.set_script(|s| match s.method.as_str() {
        "POST" => Reply::ok(s.body.clone()).after(Duration::from_millis(100)),
        _ => Reply::ok("ok"),
    });
    let gateway = TestGateway::start(config).await;
    let mut ws = gateway.connect("/p").await;
    for i in 0..12 {
        ws.send(Message::text(i.to_string())).await.unwrap();
    }
    for i in 0..12 {
        assert_eq!(next_text(&mut ws).await, i.to_string());
    }
    let posts = api.wait_for("POST", 12).await;
    // With 3 in flight and 100 ms each, no 100 ms window may hold more than 3 arrivals.
    for (i, first) in posts.iter().enumerate() {
        let within = posts[i..]
            .iter()
            .take_while(|p| p.at - first.at < Duration::from_millis(90))
            .count();
        assert!(within <= 3, "{within} POSTs within 90 ms of each other");
    }
}

#[tokio::test]
async fn two_hundred_connections_each_get_their_own_twenty_replies() {
    let (api, gateway) = setup().await;
    let mut tasks = Vec::new();
    for c in 0..200 {
        let url = gateway.url(&format!("/client{c}"));
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_websockets::ClientBuilder::new()
                .uri(&url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            for m in 0..20 {
                let text = format!("c{c}m{m}");
                ws.send(Message::text(text.clone())).await.unwrap();
                let reply = loop {
                    let item = ws.next().await.unwrap().unwrap();
                    if item.is_text() {
                        break item.as_text().unwrap().to_owned();
                    }
                };
                assert_eq!(reply, format!("echo:{text}"));
            }
            ws.close().await.unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    api.wait_for("DELETE", 200).await;
    assert_eq!(api.seen_with("POST").len(), 4000);
    assert_accounting(&gateway, &api, 0).await;
}

// ---- the same ClientId twice ----

#[tokio::test]
async fn a_connection_approved_after_a_newer_one_of_its_client_id_is_closed_as_replaced() {
    // Two tabs of one client: the first one's GET is slow, the second connects meanwhile.
    // The second came later, so it is the newer and it stays, whichever approval came last.
    let api = MockApi::with_script(|seen| match seen.method.as_str() {
        "GET" if seen.uri.contains("tab=1") => Reply::ok("ok").after(Duration::from_millis(600)),
        _ => echo_script(seen),
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let (mut first, mut second) = tokio::join!(gateway.connect("/two-tabs?tab=1"), async {
        api.wait_for("GET", 1).await;
        gateway.connect("/two-tabs?tab=2").await
    });
    let (code, reason) = close_frame(&mut first).await;
    assert_eq!((code, reason.as_str()), (4000, "replaced"));
    let deletes = api.wait_for("DELETE", 1).await;
    assert_eq!(deletes[0].body, Bytes::from_static(b"replaced"));
    assert_eq!(
        deletes[0].header("x-connection-id"),
        api.seen_with("GET")[0].header("x-connection-id"),
        "the DELETE is the first tab's"
    );
    let response = gateway.control("POST", "/two-tabs", b"to the newer").await;
    assert_eq!(response.status, 200);
    assert_eq!(next_text(&mut second).await, "to the newer");
    assert_eq!(
        round_trip(&mut second, "still here").await,
        "echo:still here"
    );
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_replaces_the_first() {
    let (api, gateway) = setup().await;
    let mut older = gateway.connect("/dup").await;
    let mut newer = gateway.connect("/dup").await;
    let (code, reason) = close_frame(&mut older).await;
    assert_eq!((code, reason.as_str()), (4000, "replaced"));
    let deletes = api.wait_for("DELETE", 1).await;
    assert_eq!(deletes[0].body, Bytes::from_static(b"replaced"));
    let gets = api.seen_with("GET");
    assert_eq!(
        deletes[0].header("x-connection-id"),
        gets[0].header("x-connection-id"),
        "the DELETE carries the older connection's id"
    );
    // Pushes reach the newer one, even after the older one is gone.
    let response = gateway.control("POST", "/dup", b"to the newer").await;
    assert_eq!(response.status, 200);
    assert_eq!(next_text(&mut newer).await, "to the newer");
    assert_eq!(
        round_trip(&mut newer, "still here").await,
        "echo:still here"
    );
}

// ---- accounting ----

#[tokio::test]
async fn metrics_keep_ws2api_names_and_balance() {
    let (api, gateway) = setup().await;
    let mut a = gateway.connect("/a").await;
    let _b = gateway.connect("/b").await;
    round_trip(&mut a, "x").await;
    a.close().await.unwrap();
    // Counted once the gateway has the API's answer to the DELETE, and so after that
    // request's own counts (the mock API records it before it answers).
    gateway.wait_for_the_first_delete_told().await;
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["connections_opened"], 2.0);
    assert_eq!(metrics["connections_closed"], 1.0);
    assert_eq!(metrics["connections_active"], 1.0);
    assert_eq!(
        metrics["requests_started"], 4.0,
        "2 GET + 1 POST + 1 DELETE"
    );
    assert_eq!(metrics["requests_succeeded"], 4.0);
    assert_eq!(metrics["messages_received"], 1.0);
    assert_eq!(metrics["messages_sent"], 1.0);
    assert_eq!(metrics["upstream_latency_seconds_count"], 4.0);
    assert_accounting(&gateway, &api, 1).await;
}

#[tokio::test]
async fn an_api_that_closes_every_connection_loses_no_message() {
    let api = MockApi::with_script(|s| {
        let reply = match s.method.as_str() {
            "POST" => Reply::ok(s.body.clone()),
            _ => Reply::ok("ok"),
        };
        reply.header("connection", "close")
    })
    .await;
    let gateway = TestGateway::start(test_config(&api)).await;
    let mut clients = Vec::new();
    for c in 0..5 {
        clients.push(gateway.connect(&format!("/c{c}")).await);
    }
    for round in 0..40 {
        for (c, ws) in clients.iter_mut().enumerate() {
            let text = format!("{c}:{round}");
            assert_eq!(round_trip(ws, &text).await, text);
        }
    }
    assert_eq!(gateway.metrics().await["requests_failed"], 0.0);
}

/// A gateway (`--upstream-timeout` 1 s) in front of an API that answers a connect GET with
/// `status` and `body` only after 1.3 s, once a client at `path` has been told `504`.
async fn connect_answered_after_the_timeout(
    status: u16,
    body: &'static str,
    path: &str,
) -> (MockApi, TestGateway) {
    let slow = MockApi::with_script(move |seen| match seen.method.as_str() {
        // For tests that need a connection opened at once.
        "GET" if seen.uri == "/marker" => Reply::ok("ok"),
        "GET" => Reply::status(status, body).after(Duration::from_millis(1300)),
        _ => Reply::ok(""),
    })
    .await;
    let mut config = test_config(&slow);
    config.upstream_timeout = Duration::from_millis(1000);
    let gateway = TestGateway::start(config).await;
    let response = raw_exchange(gateway.public, &upgrade_request(path, &[])).await;
    assert_eq!(response.status, 504);
    (slow, gateway)
}

/// `delete` undoes the connection `get` asked for: its path and X-Connection-Id, body
/// `reason`, and no X-Close-Code (there never was a websocket).
fn assert_undoes(delete: &Seen, get: &Seen, path: &str, reason: &str) {
    assert_eq!(delete.uri, path);
    assert_eq!(delete.body, Bytes::from(reason.to_owned()));
    assert_eq!(
        delete.header("x-close-code"),
        None,
        "there never was a websocket"
    );
    assert_eq!(
        delete.header("x-connection-id"),
        get.header("x-connection-id")
    );
}

// ---- what hyper's server would not do: answers that stall, connections closed under a request ----

/// What the API of [`raw_api`] does with one request.
enum Fate {
    /// Answers with this status and body and keeps the connection, saying
    /// `Keep-Alive: <value>` if given.
    Answer(u16, String, Option<&'static str>),
    /// Answers with this status and `Content-Length: 100`, sends 10 bytes of that body and then
    /// nothing more, holding the connection open.
    Stall(u16),
    /// As `Stall`, but closes the connection after the 10 bytes: the body breaks off.
    BreakOff(u16),
    /// Reads the request and closes the connection without an answer.
    Cut,
    /// Closes the connection without reading the request (the kernel answers it with a reset).
    Reset,
}

impl Fate {
    fn name(&self) -> &'static str {
        match self {
            Fate::Answer(..) => "answer",
            Fate::Stall(_) => "stall",
            Fate::BreakOff(_) => "break-off",
            Fate::Cut => "cut",
            Fate::Reset => "reset",
        }
    }
}

/// One request as the API of [`raw_api`] saw it, and what it did with it.
#[derive(Clone, Debug)]
struct RawSeen {
    method: String,
    path: String,
    body: String,
    /// How long its connection had been idle since the answer before (`None`: the first
    /// request on its connection).
    idle: Option<Duration>,
    fate: &'static str,
}

/// The log of [`raw_api`]: every request, in the order they came.
type RawLog = std::sync::Arc<std::sync::Mutex<Vec<RawSeen>>>;

/// An HTTP/1.1 API on a loopback port written on raw sockets, that does with each request what
/// `script` says (`fate` is not set yet when it is asked); its URL and its log.
async fn raw_api(script: impl Fn(&RawSeen) -> Fate + Send + Sync + 'static) -> (String, RawLog) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let log = RawLog::default();
    let script = std::sync::Arc::new(script);
    let logged = log.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_raw(stream, script.clone(), logged.clone()));
        }
    });
    (url, log)
}

/// Serves one connection of [`raw_api`].
async fn serve_raw(
    mut stream: tokio::net::TcpStream,
    script: std::sync::Arc<impl Fn(&RawSeen) -> Fate>,
    log: RawLog,
) {
    let mut answered_at: Option<tokio::time::Instant> = None;
    let mut data = vec![0u8; 64 * 1024];
    loop {
        // The whole request, looked at but still unread (so that it can be left unread).
        let (head, length) = loop {
            let n = match stream.peek(&mut data).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if let Some((head, length)) = parse_head(&data[..n]) {
                if n >= head + length {
                    break (head, length);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let text = String::from_utf8_lossy(&data[..head]).into_owned();
        let mut words = text.split(' ');
        let mut seen = RawSeen {
            method: words.next().unwrap_or_default().to_owned(),
            path: words.next().unwrap_or_default().to_owned(),
            body: String::from_utf8_lossy(&data[head..head + length]).into_owned(),
            idle: answered_at.map(|at| at.elapsed()),
            fate: "",
        };
        let fate = script(&seen);
        seen.fate = fate.name();
        log.lock().unwrap().push(seen);
        if let Fate::Reset = fate {
            return;
        }
        if stream.read_exact(&mut data[..head + length]).await.is_err() {
            return;
        }
        match fate {
            Fate::Answer(status, body, keep_alive) => {
                let keep_alive = keep_alive
                    .map(|value| format!("keep-alive: {value}\r\n"))
                    .unwrap_or_default();
                let answer = format!(
                    "HTTP/1.1 {status} Scripted\r\ncontent-length: {}\r\n{keep_alive}\r\n{body}",
                    body.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                answered_at = Some(tokio::time::Instant::now());
            }
            Fate::Stall(status) => {
                let answer =
                    format!("HTTP/1.1 {status} Scripted\r\ncontent-length: 100\r\n\r\n0123456789");
                let _ = stream.write_all(answer.as_bytes()).await;
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
            Fate::BreakOff(status) => {
                let answer =
                    format!("HTTP/1.1 {status} Scripted\r\ncontent-length: 100\r\n\r\n0123456789");
                let _ = stream.write_all(answer.as_bytes()).await;
                return;
            }
            Fate::Cut | Fate::Reset => return,
        }
    }
}

/// What the echo API answers (see `echo_script`), for [`raw_api`], with `Keep-Alive:
/// <keep_alive>` if given.
fn raw_echo(seen: &RawSeen, keep_alive: Option<&'static str>) -> Fate {
    let body = match seen.method.as_str() {
        "POST" => format!("echo:{}", seen.body),
        _ => "ok".to_owned(),
    };
    Fate::Answer(200, body, keep_alive)
}

/// A gateway (`--upstream-timeout` 5 s) in front of the API at `url`.
async fn gateway_for(url: &str) -> TestGateway {
    let placeholder = MockApi::start().await;
    let mut config = test_config(&placeholder);
    config.api = url.parse().unwrap();
    TestGateway::start(config).await
}

/// The requests in `log` of `method` and `fate`, as `path body`.
fn raw_requests(log: &RawLog, method: &str, fate: &str) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|seen| seen.method == method && seen.fate == fate)
        .map(|seen| format!("{} {}", seen.path, seen.body))
        .collect()
}

/// Waits (5 s at most) until `log` has a request of `method` for `path`; returns its body.
async fn raw_wait_for(log: &RawLog, method: &str, path: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let found = log
            .lock()
            .unwrap()
            .iter()
            .find(|seen| seen.method == method && seen.path == path)
            .map(|seen| seen.body.clone());
        if let Some(body) = found {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {method} {path} within 5 s: {:?}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends `text` and says what came back: the reply's text, or `close <code> <reason>` when the
/// socket was closed instead (5 s at most).
async fn reply_or_close(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text.to_owned())).await.expect("send");
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an answer within 5 s");
        match item {
            Some(Ok(message)) if message.is_text() => {
                return message.as_text().unwrap_or_default().to_owned()
            }
            Some(Ok(message)) if message.is_close() => {
                let (code, reason) = message
                    .as_close()
                    .map(|(code, reason)| (u16::from(code), reason.to_owned()))
                    .unwrap_or((1005, String::new()));
                return format!("close {code} {reason}");
            }
            Some(Ok(_)) => continue,
            other => return format!("{other:?}"),
        }
    }
}

/// A client leaves an API that answers its DELETE with `fate` (a `200` whose body does not
/// come whole): the DELETE counts as told on its status, once, and its API connection, the
/// body partly unread, is closed, not kept for another request.
async fn assert_a_delete_answered_so_counts_as_told(fate: fn() -> Fate, name: &str) {
    let (url, log) = raw_api(
        move |seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("DELETE", "/leaving") => fate(),
            _ => raw_echo(seen, None),
        },
    )
    .await;
    let gateway = gateway_for(&url).await;
    let mut ws = gateway.connect("/leaving").await;
    assert_eq!(round_trip(&mut ws, "hi").await, "echo:hi");
    drop(ws);
    // Told at most about a second after its status came (when the body is given up), not
    // failed when its --upstream-timeout (5 s) ran out.
    gateway
        .wait_for_metric(
            "disconnects_notified",
            |told| told == 1.0,
            Duration::from_secs(3),
        )
        .await;
    gateway
        .wait_for_metric(
            "upstream_connections_open",
            |open| open == 0.0,
            Duration::from_secs(2),
        )
        .await;
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["disconnects_failed"], 0.0, "{metrics:?}");
    assert_eq!(metrics["requests_failed"], 0.0, "{metrics:?}");
    assert_eq!(metrics["upstream_requests_in_flight"], 0.0, "{metrics:?}");
    // Told once: a DELETE whose status came is not sent again. A later client's DELETE
    // leaves the queue after it; once that has reached the API and no DELETE waits or is
    // unfinished (one to be tried again counts as unfinished), a second try would be in the
    // log.
    drop(gateway.connect("/marker").await);
    raw_wait_for(&log, "DELETE", "/marker").await;
    gateway
        .wait_until_no_delete_is_queued_or_unfinished(
            tokio::time::Instant::now() + Duration::from_secs(5),
        )
        .await;
    assert_eq!(raw_requests(&log, "DELETE", name), ["/leaving EOF"]);
}

#[tokio::test]
async fn a_delete_answered_whose_body_stalls_counts_as_told_on_its_status() {
    // `200` and `Content-Length: 100`, then 10 bytes and nothing more.
    assert_a_delete_answered_so_counts_as_told(|| Fate::Stall(200), "stall").await;
}

#[tokio::test]
async fn a_delete_answered_whose_body_breaks_off_counts_as_told_on_its_status() {
    // `200` and `Content-Length: 100`, then 10 bytes and the connection closed.
    assert_a_delete_answered_so_counts_as_told(|| Fate::BreakOff(200), "break-off").await;
}

#[tokio::test]
async fn a_connect_answered_5xx_whose_body_stalls_gets_502_and_its_delete_without_waiting() {
    let (url, log) = raw_api(|seen| match (seen.method.as_str(), seen.path.as_str()) {
        ("GET", "/failing") => Fate::Stall(500),
        _ => raw_echo(seen, None),
    })
    .await;
    let gateway = gateway_for(&url).await;
    let started = tokio::time::Instant::now();
    let response = raw_exchange(gateway.public, &upgrade_request("/failing", &[])).await;
    // Judged by its status, as a 5xx's body is: not a timeout when --upstream-timeout (5 s)
    // runs out while the body never comes.
    assert_eq!(response.status, 502, "{}", response.text());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        raw_wait_for(&log, "DELETE", "/failing").await,
        "upstream error"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0);
    assert_eq!(metrics["upstream_requests_in_flight"], 0.0, "{metrics:?}");
}

#[tokio::test]
async fn an_api_connection_is_not_reused_past_the_keep_alive_timeout_the_api_announced() {
    // Node's way (`Keep-Alive: timeout=5`, and the connection closed 5 s after its last
    // answer), here with 1 s: a request that comes on a connection idle that long finds it
    // closing, and the API never reads it.
    let (url, log) = raw_api(|seen| match seen.idle {
        Some(idle) if idle >= Duration::from_secs(1) => Fate::Reset,
        _ => raw_echo(seen, Some("timeout=1")),
    })
    .await;
    let gateway = gateway_for(&url).await;
    let mut ws = gateway.connect("/node").await;
    assert_eq!(reply_or_close(&mut ws, "one").await, "echo:one");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(reply_or_close(&mut ws, "two").await, "echo:two");
    assert_eq!(
        raw_requests(&log, "POST", "reset"),
        Vec::<String>::new(),
        "a request went on a connection idle past the timeout the API announced"
    );
    // The reaper closes it at that time too (half a second here), not after the gateway's own
    // idle timeout (10 s).
    gateway
        .wait_for_metric(
            "upstream_connections_open",
            |open| open == 0.0,
            Duration::from_secs(3),
        )
        .await;
}

#[tokio::test]
async fn a_message_on_an_api_connection_closed_while_idle_is_sent_again_on_a_new_one() {
    // gunicorn's way (2 s; uvicorn's 5 s), without a Keep-Alive header, here at 1 s: a request
    // that comes on a connection idle that long meets its close. The first time the API
    // leaves it unread (the gateway reads a reset), the second time it closes the connection
    // after reading it (the gateway reads the end of the stream); neither is acted on.
    let closes = std::sync::atomic::AtomicUsize::new(0);
    let (url, log) = raw_api(move |seen| match seen.idle {
        Some(idle) if idle >= Duration::from_secs(1) => {
            match closes.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                0 => Fate::Reset,
                _ => Fate::Cut,
            }
        }
        _ => raw_echo(seen, None),
    })
    .await;
    let gateway = gateway_for(&url).await;
    let mut ws = gateway.connect("/gunicorn").await;
    assert_eq!(reply_or_close(&mut ws, "one").await, "echo:one");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(reply_or_close(&mut ws, "two").await, "echo:two");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(reply_or_close(&mut ws, "three").await, "echo:three");
    assert_eq!(
        raw_requests(&log, "POST", "answer"),
        ["/gunicorn one", "/gunicorn two", "/gunicorn three"],
        "each answered once"
    );
    assert_eq!(raw_requests(&log, "POST", "reset"), ["/gunicorn two"]);
    assert_eq!(raw_requests(&log, "POST", "cut"), ["/gunicorn three"]);
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["requests_failed"], 0.0, "{metrics:?}");
    assert_eq!(
        metrics["upstream_connections_open"], 1.0,
        "the closed ones' places given back"
    );
}

#[tokio::test]
async fn a_message_whose_api_connection_breaks_while_in_use_is_not_sent_again() {
    // The API reads the request and drops the connection (a worker that crashed), or drops it
    // unread, on a connection used a moment before: it may have acted, so no second copy.
    let (url, log) = raw_api(|seen| match seen.body.as_str() {
        "crash" => Fate::Cut,
        "crash unread" => Fate::Reset,
        _ => raw_echo(seen, None),
    })
    .await;
    let gateway = gateway_for(&url).await;
    for (path, crash) in [("/busy", "crash"), ("/busier", "crash unread")] {
        let mut ws = gateway.connect(path).await;
        assert_eq!(reply_or_close(&mut ws, "one").await, "echo:one");
        assert_eq!(
            reply_or_close(&mut ws, crash).await,
            "close 1011 upstream error"
        );
        drop(ws);
        // Its DELETE follows the failure (and says what the client was told): a second copy
        // would have come before it.
        assert_eq!(
            raw_wait_for(&log, "DELETE", path).await,
            "upstream error",
            "{path}"
        );
    }
    let crashes: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|seen| seen.body.starts_with("crash"))
        .map(|seen| format!("{} {}", seen.path, seen.body))
        .collect();
    assert_eq!(crashes, ["/busy crash", "/busier crash unread"]);
}

/// An HTTP/1.1 API on raw sockets that answers a POST whose body is over 64 KiB `200 hi` as
/// soon as its head came, and then neither reads the rest of that connection nor closes it;
/// every other request it reads whole and answers as the echo API does. Its URL.
async fn api_that_answers_large_posts_before_reading_them() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let (head, length) = loop {
                        if let Some(parsed) = parse_head(&data) {
                            break parsed;
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => data.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let post = data.starts_with(b"POST ");
                    if post && length > 64 * 1024 {
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
                        let _ = stream.write_all(answer).await;
                        // Holds the connection, reading nothing more.
                        std::future::pending::<()>().await;
                    }
                    while data.len() < head + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => data.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = if post {
                        format!(
                            "echo:{}",
                            String::from_utf8_lossy(&data[head..head + length])
                        )
                    } else {
                        "ok".to_owned()
                    };
                    data.drain(..head + length);
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn an_api_connection_still_writing_a_request_body_is_not_reused_for_the_next_request() {
    // The API answers a 4 MiB message after its head and leaves the rest unread: hyper has
    // the answer while it still writes the body, and the connection can take no other
    // request until that is done (here never). The next message goes on another one.
    let url = api_that_answers_large_posts_before_reading_them().await;
    let placeholder = MockApi::start().await;
    let mut config = test_config(&placeholder);
    config.api = url.parse().unwrap();
    config.max_message_size = 8 << 20;
    let gateway = TestGateway::start(config).await;
    let mut a = gateway.connect("/a").await;
    let mut b = gateway.connect("/b").await;
    a.send(Message::binary(vec![b'x'; 4 << 20])).await.unwrap();
    assert_eq!(next_text(&mut a).await, "hi");
    // Past the 100 ms the gateway waits for a connection to be ready at check-in: had it put
    // the stuck one back then, b's message would take it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Answered on a new connection in milliseconds; one that waited for the stuck connection
    // would wait out its --upstream-timeout (5 s).
    let answered = tokio::time::timeout(Duration::from_secs(3), reply_or_close(&mut b, "x")).await;
    assert_eq!(
        answered.as_deref(),
        Ok("echo:x"),
        "the next message waited for the connection still writing the body before"
    );
}
