//! HTTP/2 to the API (`--upstream-http2`) when the API's connection goes away: the requests it
//! had taken fail with 1011, and one it handed back unsent goes out once more on a fresh
//! connection and is answered.

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
use tokio_websockets::Message;
use ws2http::Config;

/// An h2c API that takes one stream at a time per connection. On its first connection it
/// answers the handshakes' GETs, holds every POST unanswered, and drops the connection when
/// told to; on later connections it echoes POSTs.
struct OneStreamApi {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    posts: Arc<Mutex<Vec<String>>>,
    cut_first: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
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
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let reply = if method == Method::POST {
                                let text = String::from_utf8_lossy(&body).into_owned();
                                seen.lock().unwrap().push(text.clone());
                                if first {
                                    std::future::pending::<()>().await;
                                }
                                Bytes::from(format!("echo:{text}"))
                            } else {
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
            task,
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

impl Drop for OneStreamApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn h2c_request_handed_back_unsent_by_a_dropped_connection_is_sent_again() {
    let api = OneStreamApi::start().await;
    let gateway = TestGateway::start(Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        control_listen: "127.0.0.1:0".parse().unwrap(),
        api: format!("http://{}/", api.addr).parse().unwrap(),
        upstream_http2: true,
        upstream_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    })
    .await;
    let mut on_the_wire = gateway.connect("/on-the-wire").await;
    let mut waiting_for_a_stream = gateway.connect("/waiting-for-a-stream").await;
    let mut not_yet_taken = gateway.connect("/not-yet-taken").await;

    // The API takes one stream at a time: the first message is sent and held, the second
    // waits inside the HTTP/2 connection for the stream to free up, and the third is not
    // taken from the request queue while the second waits.
    on_the_wire.send(Message::text("first")).await.unwrap();
    api.wait_for_posts(1).await;
    waiting_for_a_stream
        .send(Message::text("second"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    not_yet_taken.send(Message::text("third")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        api.posts(),
        ["first"],
        "only the first message is on the wire"
    );

    api.cut_first.notify_one();

    assert_eq!(next_text(&mut not_yet_taken).await, "echo:third");
    assert_eq!(api.connections.load(Ordering::SeqCst), 2);
    // The two the connection had taken cannot be known unprocessed: no second try.
    assert_eq!(
        close_frame(&mut on_the_wire).await,
        (1011, "upstream error".to_owned())
    );
    assert_eq!(
        close_frame(&mut waiting_for_a_stream).await,
        (1011, "upstream error".to_owned())
    );
    assert_eq!(api.posts(), ["first", "third"]);
}
