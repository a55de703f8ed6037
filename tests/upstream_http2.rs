//! HTTP/2 to the API (`--upstream-http2`) when the API's connection goes away or turns a stream
//! away: a request the API did not process (still waiting for one of the streams the API
//! allows, above a GOAWAY's last stream id, reset with REFUSED_STREAM) goes out again, as
//! often as its time allows, and is answered; the requests it may have processed fail with
//! 1011.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;
use tokio_websockets::Message;
use ws2http::Config;

/// An h2c API that takes one stream at a time per connection. On its first connection it
/// answers the handshakes' GETs (but holds one for `/held-connect` unanswered), holds every
/// POST unanswered, and drops the connection when told to; on later connections it echoes
/// POSTs.
struct OneStreamApi {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    posts: Arc<Mutex<Vec<String>>>,
    cut_first: Arc<Notify>,
    /// Its accept loop, stopped when the API is dropped.
    _task: AbortOnDropHandle<()>,
}

impl OneStreamApi {
    async fn start() -> OneStreamApi {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let posts = Arc::new(Mutex::new(Vec::new()));
        let cut_first = Arc::new(Notify::new());
        let (counted, seen, cut) = (connections.clone(), posts.clone(), cut_first.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let first = counted.fetch_add(1, Ordering::SeqCst) == 0;
                let (seen, cut) = (seen.clone(), cut.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let method = request.method().clone();
                            let path = request.uri().path().to_owned();
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let reply = if method == Method::POST {
                                let text = String::from_utf8_lossy(&body).into_owned();
                                seen.lock().unwrap().push(text.clone());
                                if first {
                                    std::future::pending::<()>().await;
                                }
                                Bytes::from(format!("echo:{text}"))
                            } else {
                                if first && path == "/held-connect" {
                                    std::future::pending::<()>().await;
                                }
                                Bytes::from_static(b"ok")
                            };
                            Ok::<_, Infallible>(Response::new(Full::new(reply)))
                        }
                    });
                    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(1)
                        .serve_connection(TokioIo::new(stream), service);
                    if first {
                        // Dropping the connection closes its socket, with no GOAWAY.
                        tokio::select! {
                            _ = connection => {}
                            _ = cut.notified() => {}
                        }
                    } else {
                        let _ = connection.await;
                    }
                });
            }
        });
        OneStreamApi {
            addr,
            connections,
            posts,
            cut_first,
            _task: AbortOnDropHandle::new(task),
        }
    }

    fn posts(&self) -> Vec<String> {
        self.posts.lock().unwrap().clone()
    }

    /// Waits until the API has seen `count` POSTs.
    async fn wait_for_posts(&self, count: usize) {
        for _ in 0..500 {
            if self.posts().len() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("waited 5s for {count} POSTs; saw {:?}", self.posts());
    }
}

#[tokio::test]
async fn h2c_requests_waiting_for_a_stream_when_the_connection_drops_are_sent_again() {
    let api = OneStreamApi::start().await;
    let gateway = h2c_gateway(api.addr).await;
    let mut on_the_wire = gateway.connect("/on-the-wire").await;
    let mut waiting_for_a_stream = gateway.connect("/waiting-for-a-stream").await;
    let mut not_yet_taken = gateway.connect("/not-yet-taken").await;

    // The API takes one stream at a time: the first message is sent and held, and the second
    // and the third wait in the gateway for the stream to free up.
    on_the_wire.send(Message::text("first")).await.unwrap();
    api.wait_for_posts(1).await;
    waiting_for_a_stream
        .send(Message::text("second"))
        .await
        .unwrap();
    // The second has its API slot (then time to reach the connection, were it to go there)
    // before the third is sent. (Nothing tells when a request has reached the connection: a
    // fixed wait.)
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n >= 2.0,
            Duration::from_secs(10),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    not_yet_taken.send(Message::text("third")).await.unwrap();
    // The third has its API slot too when the connection goes.
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n >= 3.0,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(
        api.posts(),
        ["first"],
        "only the first message is on the wire"
    );

    api.cut_first.notify_one();

    // Both go out on a new connection, where the API (one stream at a time, its SETTINGS
    // not yet read by the gateway) may refuse one of them with REFUSED_STREAM: their first
    // try, since the dropped connection never had them.
    assert_eq!(next_text(&mut not_yet_taken).await, "echo:third");
    assert_eq!(next_text(&mut waiting_for_a_stream).await, "echo:second");
    assert_eq!(api.connections.load(Ordering::SeqCst), 2);
    // The first was sent and lost with the socket: it cannot be known unprocessed, no
    // second try.
    assert_eq!(
        close_frame(&mut on_the_wire).await,
        (1011, "upstream error".to_owned())
    );
    let mut posts = api.posts();
    posts.sort();
    assert_eq!(posts, ["first", "second", "third"]);
}

#[tokio::test]
async fn h2c_request_without_a_body_waiting_for_a_stream_when_the_connection_drops_is_sent_again() {
    // A request without a body is whole with its head: had it waited for a stream inside
    // hyper, which fails it without saying whether h2 had just sent it, it could not be known
    // unsent. It waits in the gateway instead, and goes out on the next connection.
    let api = OneStreamApi::start().await;
    let gateway = h2c_gateway(api.addr).await;
    let mut on_the_wire = gateway.connect("/on-the-wire").await;
    let mut waiting_for_a_stream = gateway.connect("/waiting-for-a-stream").await;

    on_the_wire.send(Message::text("first")).await.unwrap();
    api.wait_for_posts(1).await;
    waiting_for_a_stream.send(Message::text("")).await.unwrap();
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n >= 2.0,
            Duration::from_secs(10),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.posts(), ["first"], "one stream at a time");

    api.cut_first.notify_one();

    assert_eq!(next_text(&mut waiting_for_a_stream).await, "echo:");
    assert_eq!(api.connections.load(Ordering::SeqCst), 2);
    assert_eq!(
        close_frame(&mut on_the_wire).await,
        (1011, "upstream error".to_owned())
    );
    assert_eq!(api.posts(), ["first", ""]);
}

#[tokio::test]
async fn h2c_request_still_waiting_for_a_stream_at_its_timeout_closes_1013_unsent() {
    // The API's one stream is taken by a connect GET it never answers (a connect GET goes on
    // past its client's 504, up to twice --upstream-timeout); a message sent meanwhile waits
    // for the stream in the gateway until its own time runs out: never sent, so overload
    // (1013, a DELETE that may be sent again), not a timeout of a request the API may have.
    let api = OneStreamApi::start().await;
    let gateway = TestGateway::start(Config {
        upstream_timeout: Duration::from_secs(1),
        ..h2c_config(api.addr)
    })
    .await;
    let mut waiting_for_a_stream = gateway.connect("/waiting-for-a-stream").await;
    let held = tokio::spawn({
        let url = gateway.url("/held-connect");
        async move { try_connect_url(&url, &[]).await.map(|_| ()) }
    });
    gateway
        .wait_for_metric(
            "upstream_requests_in_flight",
            |n| n >= 1.0,
            Duration::from_secs(10),
        )
        .await;

    waiting_for_a_stream
        .send(Message::text("never sent"))
        .await
        .unwrap();
    assert_eq!(
        close_frame(&mut waiting_for_a_stream).await,
        (1013, "upstream overloaded".to_owned())
    );
    assert!(api.posts().is_empty(), "the API saw {:?}", api.posts());
    assert!(
        held.await.unwrap().is_err(),
        "the held connect is refused (504)"
    );
}

/// How the hand-written API below turns away a POST.
#[derive(Clone, Copy, PartialEq)]
enum TurnAway {
    /// A GOAWAY whose last stream id is below the POST's stream: the connection takes no more.
    GoAway,
    /// RST_STREAM with REFUSED_STREAM: the connection stays open for more streams.
    RefusedStream,
    /// RST_STREAM with INTERNAL_ERROR: the API may have processed the request.
    InternalError,
    /// With one stream at a time allowed on each connection: the POST is held until
    /// [`FrameApi::release`] is notified, and then answered after a GOAWAY whose last stream
    /// id is the POST's own, which turns away the request waiting for its stream.
    HoldThenGoAway,
}

/// An h2c API written frame by frame, because no HTTP/2 server library refuses a chosen stream
/// on cue. It answers every stream `200` with the body `ok`, except the POSTs whose numbers
/// (counting from 1 over all connections) are in `refused`, which it turns away.
struct FrameApi {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    posts: Arc<AtomicUsize>,
    release: Arc<Notify>,
    /// Its accept loop, stopped when the API is dropped.
    _task: AbortOnDropHandle<()>,
}

impl FrameApi {
    async fn start(turn_away: TurnAway, refused: std::ops::Range<usize>) -> FrameApi {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let posts = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let (counted, seen, released) = (connections.clone(), posts.clone(), release.clone());
        let settings = if turn_away == TurnAway::HoldThenGoAway {
            // SETTINGS_MAX_CONCURRENT_STREAMS = 1.
            vec![0, 0x3, 0, 0, 0, 1]
        } else {
            Vec::new()
        };
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let (seen, refused, released) = (seen.clone(), refused.clone(), released.clone());
                let (mut reader, writer) = socket.into_split();
                let writer = Arc::new(tokio::sync::Mutex::new(writer));
                let settings = settings.clone();
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    reader.read_exact(&mut preface).await?;
                    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                    let opening = frame(0x4, 0, 0, &settings);
                    writer.lock().await.write_all(&opening).await?;
                    loop {
                        let mut head = [0u8; 9];
                        reader.read_exact(&mut head).await?;
                        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let (kind, flags) = (head[3], head[4]);
                        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                        let mut payload = vec![0u8; length];
                        reader.read_exact(&mut payload).await?;
                        let reply = match kind {
                            // SETTINGS (not an ACK): acknowledge.
                            0x4 if flags & 0x1 == 0 => frame(0x4, 0x1, 0, &[]),
                            // PING: answer.
                            0x6 if flags & 0x1 == 0 => frame(0x6, 0x1, 0, &payload),
                            // HEADERS without END_STREAM: a POST, whose DATA follows.
                            0x1 if flags & 0x1 == 0
                                && refused.contains(&(seen.fetch_add(1, Ordering::SeqCst) + 1)) =>
                            {
                                if turn_away != TurnAway::HoldThenGoAway {
                                    refusal(turn_away, stream)
                                } else {
                                    let (writer, released) = (writer.clone(), released.clone());
                                    tokio::spawn(async move {
                                        released.notified().await;
                                        let mut last = refusal(turn_away, stream);
                                        last.extend(answer_ok(stream));
                                        writer.lock().await.write_all(&last).await
                                    });
                                    continue;
                                }
                            }
                            0x1 => answer_ok(stream),
                            _ => continue,
                        };
                        writer.lock().await.write_all(&reply).await?;
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                });
            }
        });
        FrameApi {
            addr,
            connections,
            posts,
            release,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

/// The answer to `stream`: `:status: 200` (HPACK static index 8), then the body `ok`.
fn answer_ok(stream: u32) -> Vec<u8> {
    let mut answer = frame(0x1, 0x4, stream, &[0x88]);
    answer.extend(frame(0x0, 0x1, stream, b"ok"));
    answer
}

/// One HTTP/2 frame: type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// The frame that turns `stream` away.
fn refusal(turn_away: TurnAway, stream: u32) -> Vec<u8> {
    match turn_away {
        // GOAWAY: last stream id (the one before), NO_ERROR.
        TurnAway::GoAway => go_away(stream - 2),
        // GOAWAY: last stream id this one, NO_ERROR.
        TurnAway::HoldThenGoAway => go_away(stream),
        TurnAway::RefusedStream => frame(0x3, 0, stream, &0x7u32.to_be_bytes()),
        TurnAway::InternalError => frame(0x3, 0, stream, &0x2u32.to_be_bytes()),
    }
}

/// A GOAWAY frame with `last_stream` and NO_ERROR.
fn go_away(last_stream: u32) -> Vec<u8> {
    let mut payload = last_stream.to_be_bytes().to_vec();
    payload.extend(0u32.to_be_bytes());
    frame(0x7, 0, 0, &payload)
}

/// A gateway speaking h2c to the API at `api`.
async fn h2c_gateway(api: SocketAddr) -> TestGateway {
    TestGateway::start(h2c_config(api)).await
}

/// A gateway's configuration for speaking h2c to `api`, on free loopback ports.
fn h2c_config(api: SocketAddr) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        api: format!("http://{api}/").parse().unwrap(),
        upstream_http2: true,
        upstream_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A gateway speaking h2c to `api`, and one client of it.
async fn gateway_and_client(api: &FrameApi) -> (TestGateway, Ws) {
    let gateway = h2c_gateway(api.addr).await;
    let client = gateway.connect("/turned-away").await;
    (gateway, client)
}

/// Checks that the first message's POST, turned away once by `turn_away`, is answered on its
/// second try, after the API had seen `connections` connections in all.
async fn assert_answered_on_the_second_try(turn_away: TurnAway, connections: usize) {
    let api = FrameApi::start(turn_away, 1..2).await;
    let (_gateway, mut client) = gateway_and_client(&api).await;

    assert_eq!(round_trip(&mut client, "first").await, "ok");
    assert_eq!(api.posts.load(Ordering::SeqCst), 2);
    assert_eq!(api.connections.load(Ordering::SeqCst), connections);
}

/// Checks that the first message, its POSTs turned away by `turn_away` while their numbers are
/// in `refused`, closes its client with 1011 and `reason` after the API saw `posts` POSTs.
async fn assert_failed_after(
    turn_away: TurnAway,
    refused: std::ops::Range<usize>,
    posts: usize,
    reason: &str,
) {
    let api = FrameApi::start(turn_away, refused).await;
    let (_gateway, mut client) = gateway_and_client(&api).await;

    client.send(Message::text("first")).await.unwrap();
    assert_eq!(close_frame(&mut client).await, (1011, reason.to_owned()));
    assert_eq!(api.posts.load(Ordering::SeqCst), posts);
}

#[tokio::test]
async fn h2c_request_above_the_apis_goaway_is_sent_again_on_a_new_connection() {
    assert_answered_on_the_second_try(TurnAway::GoAway, 2).await;
}

#[tokio::test]
async fn h2c_request_reset_with_refused_stream_is_sent_again_on_the_same_connection() {
    assert_answered_on_the_second_try(TurnAway::RefusedStream, 1).await;
}

#[tokio::test]
async fn h2c_request_refused_three_times_is_answered_on_its_fourth_try_on_the_same_connection() {
    // Unprocessed each time: however often the API turns it away, it may go out again.
    let api = FrameApi::start(TurnAway::RefusedStream, 1..4).await;
    let (_gateway, mut client) = gateway_and_client(&api).await;

    assert_eq!(round_trip(&mut client, "first").await, "ok");
    assert_eq!(api.posts.load(Ordering::SeqCst), 4);
    assert_eq!(api.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn h2c_request_always_refused_goes_out_again_after_growing_pauses_until_its_timeout_then_closes_1013(
) {
    // An API that refuses every stream processed none of them: the message goes out again for
    // as long as its --upstream-timeout (2 s) allows, and no longer; the second time at once,
    // then after 10, 20, 40 ... ms, so at most 9 times in 2 s (a loop without pauses would send
    // it thousands of times, and one every 10 ms some 200). It never reached the API: 1013, as
    // one that waited out its time for a stream. (The client's DELETE, refused too, goes out
    // as the close does, twice at once and then after the same pauses: up to five more POSTs
    // if the count below is read within 150 ms.)
    let api = FrameApi::start(TurnAway::RefusedStream, 1..usize::MAX).await;
    let gateway = TestGateway::start(Config {
        upstream_timeout: Duration::from_secs(2),
        ..h2c_config(api.addr)
    })
    .await;
    let mut client = gateway.connect("/turned-away").await;

    let sent = std::time::Instant::now();
    client.send(Message::text("first")).await.unwrap();
    assert_eq!(
        close_frame(&mut client).await,
        (1013, "upstream overloaded".to_owned())
    );
    let (posts, took) = (api.posts.load(Ordering::SeqCst), sent.elapsed());
    assert!(
        took >= Duration::from_millis(1900),
        "given up after {took:?}"
    );
    assert!((5..=14).contains(&posts), "{posts} POSTs in {took:?}");
}

#[tokio::test]
async fn h2c_api_that_drops_every_connection_without_a_byte_gets_the_handshake_refused_502_at_once()
{
    // Something at the API's address takes each connection and closes it unanswered (no
    // SETTINGS, no GOAWAY): the connect GET, handed back unsent each time, gives up after
    // three such connections and the client gets 502 (unreachable) at once, not 504 after its
    // --upstream-timeout. It never reached the API, so no DELETE follows.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let dropping = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let gateway = TestGateway::start(Config {
        upstream_timeout: Duration::from_secs(8),
        ..h2c_config(api)
    })
    .await;

    let asked = std::time::Instant::now();
    let refused = raw_exchange(gateway.public, &upgrade_request("/dropped", &[])).await;
    let took = asked.elapsed();
    assert_eq!(refused.status, 502, "{}", refused.text());
    // At once: not when the 8 s --upstream-timeout runs out, nor the 4 s of a connection
    // attempt (half of it).
    assert!(
        took < Duration::from_secs(2),
        "answered {took:?} after the request"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 3);
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["handshakes_refused{reason=\"api_failure\"}"], 1.0);
    dropping.abort();
}

#[tokio::test]
async fn h2c_request_reset_with_another_error_is_not_sent_again() {
    assert_failed_after(TurnAway::InternalError, 1..2, 1, "upstream error").await;
}

#[tokio::test]
async fn h2c_delete_refused_until_its_timeout_is_sent_again_later_and_reaches_the_api() {
    // The DELETE of a client that dropped carries its reason (`EOF`) as a body, so the API
    // counts it among its POSTs (the requests with a body) and refuses the first eight: all
    // the tries its first attempt can make within its --upstream-timeout of 1 s (at 0, 0, 10,
    // 30, 70, 150, 310 and 630 ms). The API processed none of them, so it must still hear of
    // it: that attempt fails unsent, and a later one is taken.
    let api = FrameApi::start(TurnAway::RefusedStream, 1..9).await;
    let gateway = TestGateway::start(Config {
        upstream_timeout: Duration::from_secs(1),
        ..h2c_config(api.addr)
    })
    .await;
    drop(gateway.connect("/turned-away").await);

    gateway.wait_for_the_first_delete_told().await;
    assert_eq!(
        api.posts.load(Ordering::SeqCst),
        9,
        "refused eight times, then taken"
    );
    let metrics = gateway.metrics().await;
    assert_eq!(metrics["disconnects_failed"], 0.0);
    assert_eq!(
        metrics["requests_failed"], 1.0,
        "the first attempt, run out of time unsent"
    );
}

/// Two clients of a gateway in front of an API that allows one stream at a time: the first
/// one's message is held at the API, the second one's (`second`) waits for a stream inside
/// the gateway's HTTP/2 connection, and then the API answers the first after a GOAWAY that
/// ends the connection. Returns the API and the two clients.
async fn message_waiting_for_a_stream_when_the_api_goes_away(
    second: &str,
) -> (FrameApi, TestGateway, Ws, Ws) {
    let api = FrameApi::start(TurnAway::HoldThenGoAway, 1..2).await;
    let gateway = h2c_gateway(api.addr).await;
    let mut on_the_wire = gateway.connect("/on-the-wire").await;
    let mut waiting = gateway.connect("/waiting-for-a-stream").await;

    on_the_wire.send(Message::text("first")).await.unwrap();
    waiting
        .send(Message::text(second.to_owned()))
        .await
        .unwrap();
    // Both requests have their API slot, and the second has had time to reach hyper.
    let mut both_in_flight = false;
    for _ in 0..500 {
        let in_flight = gateway.metrics().await["upstream_requests_in_flight"];
        if in_flight == 2.0 && api.posts.load(Ordering::SeqCst) == 1 {
            both_in_flight = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        both_in_flight,
        "not both requests in flight with one POST at the API: {:?}, {} POSTs",
        gateway.metrics().await,
        api.posts.load(Ordering::SeqCst)
    );
    // Nothing tells when the second request has reached hyper's connection: a fixed wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(api.posts.load(Ordering::SeqCst), 1, "one stream at a time");
    api.release.notify_one();
    assert_eq!(next_text(&mut on_the_wire).await, "ok");
    (api, gateway, on_the_wire, waiting)
}

#[tokio::test]
async fn h2c_request_waiting_for_a_stream_when_the_api_goes_away_is_sent_on_a_new_connection() {
    let (api, _gateway, _first, mut waiting) =
        message_waiting_for_a_stream_when_the_api_goes_away("second").await;

    assert_eq!(next_text(&mut waiting).await, "ok");
    assert_eq!(api.connections.load(Ordering::SeqCst), 2);
    assert_eq!(api.posts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn h2c_request_without_a_body_waiting_for_a_stream_when_the_api_goes_away_is_sent_again() {
    // Its head alone is a whole request: it waited for its stream in the gateway, not inside
    // hyper, which could not have told whether h2 sent it just before the end.
    let (api, _gateway, _first, mut waiting) =
        message_waiting_for_a_stream_when_the_api_goes_away("").await;

    assert_eq!(next_text(&mut waiting).await, "ok");
    assert_eq!(api.connections.load(Ordering::SeqCst), 2);
}

/// An h2c API sized to its workers behind nginx, written frame by frame (hyper's server sends a
/// graceful GOAWAY in two steps, after which an h2 client opens no stream above it, and h2's
/// one-step GOAWAY ends the streams in flight): it allows `streams` streams at once on a
/// connection (SETTINGS_MAX_CONCURRENT_STREAMS, sent first on each) and resets any stream over
/// them with REFUSED_STREAM, also one that came before the client read its SETTINGS; after
/// `requests_per_connection` requests on a connection it sends a GOAWAY whose last stream id
/// is that request's, ignores the streams above it, and closes the connection once it has
/// answered the others, as nginx does after `http2_max_requests`. It answers a GET `ok` and a
/// POST with `echo:` and its body, each after `work`.
struct RecyclingApi {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Streams reset with REFUSED_STREAM.
    refused: Arc<AtomicUsize>,
    /// The bodies of the POSTs (and DELETEs) it answered, in the order answered.
    answered: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Its accept loop, stopped when the API is dropped.
    _task: AbortOnDropHandle<()>,
}

/// What [`RecyclingApi`] knows of one of its connections.
#[derive(Default)]
struct RecycledConnection {
    /// Streams taken and not yet answered.
    active: usize,
    /// Requests taken so far.
    requests: usize,
    /// The stream of the last request it takes, once it came: its GOAWAY's last stream id.
    last: Option<u32>,
    /// The bodies of the POSTs taken, as far as they came.
    bodies: std::collections::HashMap<u32, Vec<u8>>,
}

impl RecyclingApi {
    async fn start(streams: u32, requests_per_connection: usize, work: Duration) -> RecyclingApi {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let (counted, refusals, bodies) = (connections.clone(), refused.clone(), answered.clone());
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                socket.set_nodelay(true).unwrap();
                let (refusals, bodies) = (refusals.clone(), bodies.clone());
                let (mut reader, writer) = socket.into_split();
                let writer = Arc::new(tokio::sync::Mutex::new(Some(writer)));
                let state = Arc::new(Mutex::new(RecycledConnection::default()));
                // Writes `bytes` unless the connection was closed.
                let write = |writer: Arc<tokio::sync::Mutex<Option<_>>>, bytes: Vec<u8>| async move {
                    let mut writer = writer.lock().await;
                    if let Some(half) = writer.as_mut() {
                        let half: &mut tokio::net::tcp::OwnedWriteHalf = half;
                        if half.write_all(&bytes).await.is_err() {
                            *writer = None;
                        }
                    }
                };
                tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    reader.read_exact(&mut preface).await?;
                    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                    // SETTINGS_MAX_CONCURRENT_STREAMS.
                    let mut settings = vec![0, 0x3];
                    settings.extend(streams.to_be_bytes());
                    write(writer.clone(), frame(0x4, 0, 0, &settings)).await;
                    loop {
                        let mut head = [0u8; 9];
                        reader.read_exact(&mut head).await?;
                        let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let (kind, flags) = (head[3], head[4]);
                        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                        let mut payload = vec![0u8; length];
                        reader.read_exact(&mut payload).await?;
                        let end_stream = flags & 0x1 != 0;
                        let (reply, answer) = match kind {
                            // SETTINGS (not an ACK): acknowledge.
                            0x4 if flags & 0x1 == 0 => (frame(0x4, 0x1, 0, &[]), None),
                            // PING: answer.
                            0x6 if flags & 0x1 == 0 => (frame(0x6, 0x1, 0, &payload), None),
                            // HEADERS: a new request (its header block in one frame).
                            0x1 => {
                                assert_ne!(flags & 0x4, 0, "a header block in one frame");
                                let mut connection = state.lock().unwrap();
                                if connection.last.is_some() {
                                    // Above the GOAWAY's last stream id: ignored.
                                    continue;
                                }
                                if connection.active >= streams as usize {
                                    refusals.fetch_add(1, Ordering::SeqCst);
                                    // RST_STREAM, REFUSED_STREAM.
                                    (frame(0x3, 0, stream, &0x7u32.to_be_bytes()), None)
                                } else {
                                    connection.active += 1;
                                    connection.requests += 1;
                                    let mut goaway = Vec::new();
                                    if connection.requests == requests_per_connection {
                                        connection.last = Some(stream);
                                        goaway = go_away(stream);
                                    }
                                    if end_stream {
                                        (goaway, Some(b"ok".to_vec()))
                                    } else {
                                        connection.bodies.insert(stream, Vec::new());
                                        (goaway, None)
                                    }
                                }
                            }
                            // DATA of a POST taken.
                            0x0 => {
                                let mut connection = state.lock().unwrap();
                                let Some(body) = connection.bodies.get_mut(&stream) else {
                                    continue;
                                };
                                body.extend_from_slice(&payload);
                                let answer = end_stream.then(|| {
                                    let body = connection.bodies.remove(&stream).unwrap();
                                    let mut echo = b"echo:".to_vec();
                                    echo.extend(&body);
                                    bodies.lock().unwrap().push(body);
                                    echo
                                });
                                // The connection's flow-control window, given back.
                                let update = if length > 0 {
                                    frame(0x8, 0, 0, &(length as u32).to_be_bytes())
                                } else {
                                    Vec::new()
                                };
                                (update, answer)
                            }
                            _ => continue,
                        };
                        if !reply.is_empty() {
                            write(writer.clone(), reply).await;
                        }
                        if let Some(body) = answer {
                            let (writer, state) = (writer.clone(), state.clone());
                            tokio::spawn(async move {
                                if !work.is_zero() {
                                    tokio::time::sleep(work).await;
                                }
                                let mut answer = frame(0x1, 0x4, stream, &[0x88]);
                                answer.extend(frame(0x0, 0x1, stream, &body));
                                write(writer.clone(), answer).await;
                                let done = {
                                    let mut connection = state.lock().unwrap();
                                    connection.active -= 1;
                                    connection.last.is_some() && connection.active == 0
                                };
                                if done {
                                    // Answered all it took after its GOAWAY: closed.
                                    if let Some(mut half) = writer.lock().await.take() {
                                        let _ = half.shutdown().await;
                                    }
                                }
                            });
                        }
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                });
            }
        });
        RecyclingApi {
            addr,
            connections,
            refused,
            answered,
            _task: AbortOnDropHandle::new(task),
        }
    }
}

#[tokio::test]
async fn h2c_flood_against_an_api_with_few_streams_that_recycles_its_connections_loses_no_message()
{
    // Four streams at once, as an API sized to its workers allows, and a GOAWAY every ten
    // requests (nginx's `http2_max_requests`, set low so that each of the 120 or so GOAWAYs
    // of the flood catches requests above its last stream id). Those go on the next
    // connection at once, with the requests that were waiting for a stream, before its
    // SETTINGS say four: the API refuses all but four of them (REFUSED_STREAM), and may turn
    // them away again with that connection's own GOAWAY. None of them was processed, so each
    // goes out again until it is answered. (Sent once more only, a fifth to three quarters of
    // the clients lost a message to `1011 upstream unreachable` within the first second.)
    const CLIENTS: usize = 20;
    const MESSAGES: usize = 60;
    let api = RecyclingApi::start(4, 10, Duration::from_millis(1)).await;
    let gateway = h2c_gateway(api.addr).await;
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        clients.push(gateway.connect(&format!("/flood-{client}")).await);
    }
    let floods: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(client, mut ws)| {
            tokio::spawn(async move {
                for n in 0..MESSAGES {
                    let text = format!("{client}-{n}");
                    ws.send(Message::text(text.clone())).await.unwrap();
                    match next_reply(&mut ws).await {
                        Ok(reply) if reply == format!("echo:{text}") => {}
                        other => return Err(format!("client {client}, message {n}: {other:?}")),
                    }
                }
                Ok(ws)
            })
        })
        .collect();
    let done = every_client_got_every_reply(floods).await;
    // Each message was processed once: none that the API took was sent again.
    let mut answered = api.answered.lock().unwrap().clone();
    answered.sort();
    answered.dedup();
    assert_eq!(answered.len(), CLIENTS * MESSAGES);
    assert_eq!(api.answered.lock().unwrap().len(), CLIENTS * MESSAGES);
    assert!(
        api.connections.load(Ordering::SeqCst) > CLIENTS * MESSAGES / 10,
        "the API closed each connection after ten requests"
    );
    assert!(
        api.refused.load(Ordering::SeqCst) > 0,
        "requests went out before the API's SETTINGS"
    );
    drop(done);
}

/// When [`GoAwayEachStreamApi`] answers a request with a body.
#[derive(Clone, Copy, PartialEq)]
enum BodyAnswer {
    /// Once its whole body came and [`GoAwayEachStreamApi::release`] let one more answer go.
    WhenReleased,
    /// At once, on its HEADERS, before its body; and it grants no flow-control window for the
    /// rest of a body larger than the 64 KiB HTTP/2 starts with, nor resets the stream to say
    /// that it wants no more: the client's half of the stream stays open, its body unsent.
    BeforeTheBody,
}

/// An h2c API written frame by frame that recycles its connections after every request: on
/// each connection it takes the first stream, sends a GOAWAY whose last stream id is that one
/// (as a server with `http2_max_requests 1` does, or one restarting in a loop), ignores the
/// streams above it, and never closes the connection itself (the client closes it once nothing
/// of its own is left on it). It answers `200` with the body `ok`: a request without a body at
/// once, one with a body as its [`BodyAnswer`] says. It answers pings.
struct GoAwayEachStreamApi {
    addr: SocketAddr,
    /// Connections it holds open now: accepted, and not yet ended by the client.
    open: Arc<AtomicUsize>,
    /// Requests with a body it took (their HEADERS came).
    posts: Arc<AtomicUsize>,
    /// Answers to requests with a body that may go ([`BodyAnswer::WhenReleased`]).
    released: Arc<tokio::sync::Semaphore>,
    /// Its accept loop, stopped when the API is dropped.
    _task: AbortOnDropHandle<()>,
}

impl GoAwayEachStreamApi {
    async fn start(body_answer: BodyAnswer) -> GoAwayEachStreamApi {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let posts = Arc::new(AtomicUsize::new(0));
        let released = Arc::new(tokio::sync::Semaphore::new(0));
        let (counted, taken, release) = (open.clone(), posts.clone(), released.clone());
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                socket.set_nodelay(true).unwrap();
                let (counted, taken, release) = (counted.clone(), taken.clone(), release.clone());
                let (mut reader, writer) = socket.into_split();
                let writer = Arc::new(tokio::sync::Mutex::new(writer));
                tokio::spawn(async move {
                    let served = async {
                        let mut preface = [0u8; 24];
                        reader.read_exact(&mut preface).await?;
                        assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
                        writer
                            .lock()
                            .await
                            .write_all(&frame(0x4, 0, 0, &[]))
                            .await?;
                        // The one stream it takes.
                        let mut taken_stream = None;
                        loop {
                            let mut head = [0u8; 9];
                            reader.read_exact(&mut head).await?;
                            let length =
                                u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                            let (kind, flags) = (head[3], head[4]);
                            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
                            let mut payload = vec![0u8; length];
                            reader.read_exact(&mut payload).await?;
                            let end_stream = flags & 0x1 != 0;
                            let reply = match kind {
                                // SETTINGS (not an ACK): acknowledge.
                                0x4 if flags & 0x1 == 0 => frame(0x4, 0x1, 0, &[]),
                                // PING: answer.
                                0x6 if flags & 0x1 == 0 => frame(0x6, 0x1, 0, &payload),
                                // The first request: taken, and the last this connection takes.
                                0x1 if taken_stream.is_none() => {
                                    taken_stream = Some(stream);
                                    let mut reply = go_away(stream);
                                    if end_stream {
                                        reply.extend(answer_ok(stream));
                                    } else {
                                        taken.fetch_add(1, Ordering::SeqCst);
                                        if body_answer == BodyAnswer::BeforeTheBody {
                                            reply.extend(answer_ok(stream));
                                        }
                                    }
                                    reply
                                }
                                // The end of its body: answered once released.
                                0x0 if end_stream
                                    && taken_stream == Some(stream)
                                    && body_answer == BodyAnswer::WhenReleased =>
                                {
                                    let (writer, release) = (writer.clone(), release.clone());
                                    tokio::spawn(async move {
                                        release.acquire().await.unwrap().forget();
                                        let answer = answer_ok(stream);
                                        let _ = writer.lock().await.write_all(&answer).await;
                                    });
                                    continue;
                                }
                                _ => continue,
                            };
                            writer.lock().await.write_all(&reply).await?;
                        }
                        #[allow(unreachable_code)]
                        Ok::<(), std::io::Error>(())
                    };
                    // Ended by the client (an end of stream, a reset).
                    let _ = served.await;
                    counted.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        GoAwayEachStreamApi {
            addr,
            open,
            posts,
            released,
            _task: AbortOnDropHandle::new(task),
        }
    }

    /// Lets `answers` more answers to requests with a body go.
    fn release(&self, answers: usize) {
        self.released.add_permits(answers);
    }

    /// Waits (20 s at most) until the API has taken `count` requests with a body.
    async fn wait_for_posts(&self, count: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.posts.load(Ordering::SeqCst) < count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "waited 20s for {count} POSTs; saw {}",
                self.posts.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The most sockets this process held to a port at once ([`sockets_to`]), looked at every
/// 2 ms by a thread of its own (a look reads two `/proc` tables: on the test's runtime it
/// would hold up the gateway and the API) until dropped.
struct MostSockets {
    most: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl MostSockets {
    fn watch(port: u16) -> MostSockets {
        let most = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (seen, stopped) = (most.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                seen.fetch_max(sockets_to(port), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        MostSockets { most, stop }
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
}

impl Drop for MostSockets {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Waits (20 s at most) until `gateway` holds `sockets` sockets to `api`, the API holds as
/// many open, and `upstream_connections_open` says so; panics with the three counts if not.
async fn assert_sockets_counted(gateway: &TestGateway, api: &GoAwayEachStreamApi, sockets: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let gauge = gateway.metrics().await["upstream_connections_open"] as usize;
        let held = sockets_to(api.addr.port());
        let at_api = api.open.load(Ordering::SeqCst);
        if (gauge, held, at_api) == (sockets, sockets, sockets) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 20s, upstream_connections_open is {gauge}, the gateway holds {held} sockets \
             to the API and the API {at_api} open; {sockets} wanted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn h2c_connections_draining_after_a_goaway_count_as_open_until_their_sockets_close() {
    // Each connection takes one request and then goes away: each message held at the API
    // keeps a connection of its own open, draining, after the gateway has stopped sending on
    // it. Those are sockets the gateway holds: `upstream_connections_open` counts them until
    // they are closed, and no more than --upstream-max-connections are ever open.
    const MAX: usize = 3;
    let api = GoAwayEachStreamApi::start(BodyAnswer::WhenReleased).await;
    let watch = MostSockets::watch(api.addr.port());
    let gateway = TestGateway::start(Config {
        upstream_max_connections: Some(MAX),
        // The messages held at the API wait for the test, however slow the machine.
        upstream_timeout: Duration::from_secs(60),
        ..h2c_config(api.addr)
    })
    .await;
    let mut clients = Vec::new();
    for n in 0..=MAX {
        clients.push(gateway.connect(&format!("/held-{n}")).await);
    }
    // The connects' connections are closed once answered.
    assert_sockets_counted(&gateway, &api, 0).await;

    // Three messages held at the API, each on a connection of its own; the fourth waits for
    // an API slot.
    for (n, client) in clients.iter_mut().enumerate() {
        client.send(Message::text(format!("m{n}"))).await.unwrap();
    }
    api.wait_for_posts(MAX).await;
    assert_sockets_counted(&gateway, &api, MAX).await;
    // One is answered: its connection closes, and the fourth message goes on a new one.
    api.release(1);
    api.wait_for_posts(MAX + 1).await;
    assert_sockets_counted(&gateway, &api, MAX).await;
    // All are answered: every connection closes.
    api.release(MAX);
    for client in &mut clients {
        let reply = next_reply_within(client, Duration::from_secs(30)).await;
        assert_eq!(reply.as_deref(), Ok("ok"));
    }
    assert_sockets_counted(&gateway, &api, 0).await;
    assert!(
        watch.most() <= MAX,
        "{} sockets to the API at once",
        watch.most()
    );
}

#[tokio::test]
async fn h2c_burst_against_an_api_that_goes_away_after_every_request_holds_no_more_sockets_than_the_pool(
) {
    // Twelve clients send fifteen messages each, as fast as they are answered, to an API that
    // takes one request per connection: every request goes on a new connection, while those
    // before it drain. The gateway never holds more sockets to the API than
    // --upstream-max-connections, and once the burst is over it holds none, as
    // `upstream_connections_open` says.
    const MAX: usize = 4;
    const CLIENTS: usize = 12;
    const MESSAGES: usize = 15;
    let api = GoAwayEachStreamApi::start(BodyAnswer::WhenReleased).await;
    api.release(tokio::sync::Semaphore::MAX_PERMITS);
    let watch = MostSockets::watch(api.addr.port());
    let gateway = TestGateway::start(Config {
        upstream_max_connections: Some(MAX),
        // A request that finds each new connection taken by another is turned away again and
        // again, after pauses of up to a second: on a busy machine, a few seconds in all.
        upstream_timeout: Duration::from_secs(60),
        ..h2c_config(api.addr)
    })
    .await;
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        clients.push(gateway.connect(&format!("/burst-{client}")).await);
    }
    let bursts: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(client, mut ws)| {
            tokio::spawn(async move {
                for n in 0..MESSAGES {
                    ws.send(Message::text(format!("{client}-{n}")))
                        .await
                        .unwrap();
                    match next_reply_within(&mut ws, Duration::from_secs(60)).await {
                        Ok(reply) if reply == "ok" => {}
                        other => return Err(format!("client {client}, message {n}: {other:?}")),
                    }
                }
                Ok(ws)
            })
        })
        .collect();
    let done = every_client_got_every_reply(bursts).await;
    assert_sockets_counted(&gateway, &api, 0).await;
    assert!(
        watch.most() <= MAX,
        "{} sockets to the API at once, with --upstream-max-connections {MAX}",
        watch.most()
    );
    drop(done);
}

#[tokio::test]
async fn h2c_connections_an_api_never_finishes_after_its_goaway_are_closed_and_never_pile_up_past_the_pool(
) {
    // The API answers each message of 256 KiB on its HEADERS and goes away, but neither takes
    // the rest of its body (no flow-control window past the first 64 KiB) nor resets its
    // stream: each such connection stays open, its stream half sent, for as long as the API
    // answers its pings. The gateway closes one a second after no request is left on it (once
    // the next request found it gone), and meanwhile counts it: the next messages wait for
    // a place of --upstream-max-connections 2, rather than leave one more such socket open
    // each.
    const MAX: usize = 2;
    let api = GoAwayEachStreamApi::start(BodyAnswer::BeforeTheBody).await;
    let watch = MostSockets::watch(api.addr.port());
    let gateway = TestGateway::start(Config {
        upstream_max_connections: Some(MAX),
        // Each message waits for a place about a second: on a busy machine, a few.
        upstream_timeout: Duration::from_secs(60),
        ..h2c_config(api.addr)
    })
    .await;
    let mut client = gateway.connect("/early-answer").await;

    let within = Duration::from_secs(60);
    for _ in 0..4 {
        client
            .send(Message::text("x".repeat(256 * 1024)))
            .await
            .unwrap();
        assert_eq!(next_reply_within(&mut client, within).await.unwrap(), "ok");
    }
    // A small one's body goes whole: its connection closes once it is answered; so, a second
    // later, does the last of the others.
    client.send(Message::text("small")).await.unwrap();
    assert_eq!(next_reply_within(&mut client, within).await.unwrap(), "ok");
    assert_sockets_counted(&gateway, &api, 0).await;
    assert!(
        watch.most() <= MAX,
        "{} sockets to the API at once, with --upstream-max-connections {MAX}",
        watch.most()
    );
}

/// The websockets of `clients`, each a task that sent its messages and checked their replies;
/// fails the test, naming each, if any client lost a message.
async fn every_client_got_every_reply(
    clients: Vec<tokio::task::JoinHandle<Result<Ws, String>>>,
) -> Vec<Ws> {
    let mut lost = Vec::new();
    let mut done = Vec::new();
    for client in clients {
        match client.await.unwrap() {
            Ok(ws) => done.push(ws),
            Err(why) => lost.push(why),
        }
    }
    assert!(
        lost.is_empty(),
        "{} clients lost a message: {lost:?}",
        lost.len()
    );
    done
}

/// The next text message's text, or what came instead: a close frame (its code and reason),
/// the socket's end, or nothing within 5 s.
async fn next_reply(ws: &mut Ws) -> Result<String, String> {
    next_reply_within(ws, Duration::from_secs(5)).await
}

/// [`next_reply`], waiting up to `within`.
async fn next_reply_within(ws: &mut Ws, within: Duration) -> Result<String, String> {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(within, ws.next()).await {
            Err(_) => return Err(format!("no reply within {within:?}")),
            Ok(None) => return Err("the socket ended".to_owned()),
            Ok(Some(Err(error))) => return Err(format!("websocket error: {error}")),
            Ok(Some(Ok(message))) if message.is_close() => {
                return Err(format!("closed: {:?}", message.as_close()))
            }
            Ok(Some(Ok(message))) => {
                if let Some(text) = message.as_text() {
                    return Ok(text.to_owned());
                }
            }
        }
    }
}
