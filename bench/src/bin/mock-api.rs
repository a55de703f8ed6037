//! `mock-api`: a fast stand-in for the HTTP API behind ws2http.
//!
//! GET → `ok` (accepts every upgrade), POST → the request body echoed (so the reply carries the
//! request's `c<conn>:<seq>;` prefix), DELETE → `ok`. HTTP/1.1 and h2c (prior knowledge) on one
//! port, and on a Unix socket too with `--listen-unix`. `GET /__mock/stats` returns the counters
//! as JSON without counting itself; on SIGTERM or SIGINT the counters are printed to stdout as
//! one JSON line and the process exits 0.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use argh::FromArgs;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;

#[derive(FromArgs)]
/// A fast mock HTTP API: GET → ok, POST → echo of the body, DELETE → ok.
struct Args {
    /// address to listen on (default 127.0.0.1:8000)
    #[argh(option, default = "String::from(\"127.0.0.1:8000\")")]
    listen: String,
    /// also listen on this Unix socket (a stale socket file is replaced)
    #[argh(option)]
    listen_unix: Option<std::path::PathBuf>,
    /// latency added to every request, in milliseconds (default 0)
    #[argh(option, default = "0")]
    latency_ms: u64,
    /// echo at most this many bytes of a POST body (0 = the whole body, the default)
    #[argh(option, default = "0")]
    reply_bytes: usize,
    /// runtime worker threads (default 1)
    #[argh(option, default = "1")]
    threads: usize,
}

/// Request counters, printed at exit.
#[derive(Default)]
struct Counters {
    get: AtomicU64,
    post: AtomicU64,
    delete: AtomicU64,
    other: AtomicU64,
    post_bytes: AtomicU64,
    connections: AtomicU64,
}

impl Counters {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "get": self.get.load(Relaxed),
            "post": self.post.load(Relaxed),
            "delete": self.delete.load(Relaxed),
            "other": self.other.load(Relaxed),
            "post_bytes": self.post_bytes.load(Relaxed),
            "connections": self.connections.load(Relaxed),
        })
    }
}

struct State {
    counters: Counters,
    latency: Option<Duration>,
    reply_bytes: usize,
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

async fn handle(
    req: Request<Incoming>,
    st: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let c = &st.counters;
    if req.method() == Method::GET && req.uri().path() == "/__mock/stats" {
        return Ok(text(StatusCode::OK, c.to_json().to_string()));
    }
    if let Some(d) = st.latency {
        tokio::time::sleep(d).await;
    }
    let method = req.method().clone();
    let resp = match method {
        Method::GET => {
            c.get.fetch_add(1, Relaxed);
            text(StatusCode::OK, "ok")
        }
        Method::POST => {
            c.post.fetch_add(1, Relaxed);
            match req.into_body().collect().await {
                Ok(b) => {
                    let mut body = b.to_bytes();
                    c.post_bytes.fetch_add(body.len() as u64, Relaxed);
                    if st.reply_bytes > 0 && body.len() > st.reply_bytes {
                        body.truncate(st.reply_bytes);
                    }
                    text(StatusCode::OK, body)
                }
                Err(_) => text(StatusCode::BAD_REQUEST, ""),
            }
        }
        Method::DELETE => {
            c.delete.fetch_add(1, Relaxed);
            let _ = req.into_body().collect().await;
            text(StatusCode::OK, "ok")
        }
        _ => {
            c.other.fetch_add(1, Relaxed);
            text(StatusCode::METHOD_NOT_ALLOWED, "")
        }
    };
    Ok(resp)
}

/// A TCP or a Unix listener: the gateway reaches the API either way.
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

async fn serve(listener: Listener, st: Arc<State>) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_connection(TokioIo::new(stream), st.clone()));
            }),
            Listener::Unix(l) => l.accept().await.map(|(stream, _)| {
                tokio::spawn(serve_connection(TokioIo::new(stream), st.clone()));
            }),
        };
        if let Err(e) = accepted {
            // EMFILE and friends: back off instead of spinning.
            eprintln!("mock-api: accept: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve_connection<T>(io: T, st: Arc<State>)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    st.counters.connections.fetch_add(1, Relaxed);
    let svc = service_fn(move |req| handle(req, st.clone()));
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, svc)
        .await;
}

/// Binds with a deep accept queue (4096, as far as `somaxconn` allows): a burst of upstream
/// connections from the gateway must not overflow it and wait a second for a SYN retransmit.
fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(4096)
}

fn main() {
    let args: Args = argh::from_env();
    ws2http_bench::net::raise_nofile_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let listener = listen(&args.listen).unwrap_or_else(|e| {
            eprintln!("mock-api: cannot listen on {}: {e}", args.listen);
            std::process::exit(2)
        });
        let unix_listener = args.listen_unix.as_ref().map(|path| {
            let _ = std::fs::remove_file(path);
            tokio::net::UnixListener::bind(path).unwrap_or_else(|e| {
                eprintln!("mock-api: cannot listen on {}: {e}", path.display());
                std::process::exit(2)
            })
        });
        // Taken over before the line below: whoever reads it may signal at once, and the
        // default action would end the process without its counters.
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
        // The scenario runner reads the TCP address from this line, so the Unix socket is
        // named after it.
        eprintln!(
            "mock-api: listening on {}{}",
            listener.local_addr().unwrap(),
            args.listen_unix
                .as_ref()
                .map(|p| format!(" and unix:{}", p.display()))
                .unwrap_or_default()
        );
        let st = Arc::new(State {
            counters: Counters::default(),
            latency: (args.latency_ms > 0).then(|| Duration::from_millis(args.latency_ms)),
            reply_bytes: args.reply_bytes,
        });
        let server = tokio::spawn(serve(Listener::Tcp(listener), st.clone()));
        let unix_server = unix_listener.map(|l| tokio::spawn(serve(Listener::Unix(l), st.clone())));
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        server.abort();
        if let Some(unix_server) = unix_server {
            unix_server.abort();
        }
        println!("{}", st.counters.to_json());
    });
    // Do not wait for connection tasks still open.
    std::process::exit(0);
}
