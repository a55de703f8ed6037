//! The API client: one pooled HTTP client for every connection's GET, POSTs and DELETE, with a
//! limit on concurrent requests that follows the API's pace, a deadline per request, the
//! headers the API relies on, and the error classes the rest of the gateway maps to status and
//! close codes.

use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, COOKIE};
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::config::Config;

mod limit;
mod pool;
mod resolve;
use limit::{ConcurrencyLimit, RequestKind, Slot};
use pool::{ApiAddress, BodyEnd, BodyLimit, Dialer, FailedAttempts, Pool};
use resolve::BoundedResolver;

/// The connector to an API over TCP (with TLS for `https://`), whose host name lookups run at
/// most [`crate::config::LOOKUPS_AT_ONCE`] at once.
type ApiConnector = HttpsConnector<HttpConnector<BoundedResolver>>;

/// How long an unused API connection is kept open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
use crate::identity::{ClientId, ConnectionId};
use crate::metrics::{Metrics, UpstreamLoad};

/// Header carrying the gateway's id of the websocket connection.
pub static X_CONNECTION_ID: HeaderName = HeaderName::from_static("x-connection-id");
/// Header carrying the websocket close code on a DELETE.
pub static X_CLOSE_CODE: HeaderName = HeaderName::from_static("x-close-code");
/// Header carrying `--api-token` on every API request.
pub static X_WS2HTTP_TOKEN: HeaderName = HeaderName::from_static("x-ws2http-token");
/// Body bytes read of the API's answer to a connect GET, whatever `--max-message-size` is:
/// it is not a message (a refusal page goes to the client as its body), and `ok` must fit
/// under any setting.
pub const CONNECT_ANSWER_LIMIT: usize = 64 * 1024;
/// Body bytes read of the API's answer to a DELETE: only its status counts, so a larger body
/// is left unread (its connection closed instead of reused) and the answer stands.
pub const DISCONNECT_ANSWER_LIMIT: usize = 4 * 1024;

/// How long a request may take, and how much of its answer's body is read.
#[derive(Clone, Copy)]
struct Limits {
    time: Duration,
    body: BodyLimit,
}

const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const OCTET_STREAM: HeaderValue = HeaderValue::from_static("application/octet-stream");

/// Why an API request did not produce an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// No complete answer within `--upstream-timeout`.
    Timeout(Duration),
    /// No connection to the API could be made.
    Unreachable(String),
    /// The connection broke or the API spoke bad HTTP.
    Broken(String),
    /// Never sent: no API connection (or HTTP/2 stream) came free in time: too many requests
    /// were already waiting for one, or this one waited past `--upstream-max-wait` or its
    /// `--upstream-timeout`.
    Overloaded,
    /// The answer's body was larger than the bytes given (`--max-message-size` for a reply).
    ResponseTooLarge(usize),
}

impl UpstreamError {
    /// Whether the API may have acted on the request without our learning its answer, if it
    /// was sent: its time ran out, or its connection broke (a reset, a cut-off answer).
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, UpstreamError::Timeout(_) | UpstreamError::Broken(_))
    }

    /// A short text fit for a websocket close reason (at most 123 bytes).
    pub fn close_reason(&self) -> &'static str {
        match self {
            UpstreamError::Timeout(_) => "upstream timeout",
            UpstreamError::Unreachable(_) => "upstream unreachable",
            UpstreamError::Broken(_) => "upstream error",
            UpstreamError::Overloaded => "upstream overloaded",
            UpstreamError::ResponseTooLarge(_) => "upstream reply too large",
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Timeout(d) => write!(f, "API did not answer within {d:?}"),
            UpstreamError::Unreachable(e) => write!(f, "API unreachable: {e}"),
            UpstreamError::Broken(e) => write!(f, "API request failed: {e}"),
            UpstreamError::Overloaded => f.write_str(
                "never sent: no API connection or stream came free in time (too many requests \
                 waiting, or waited past --upstream-max-wait or --upstream-timeout)",
            ),
            UpstreamError::ResponseTooLarge(max) => {
                write!(f, "API answer larger than {max} bytes")
            }
        }
    }
}

impl StdError for UpstreamError {}

/// The request-independent facts of one websocket connection that its API requests carry.
pub struct ConnectionContext {
    /// The gateway's id of this websocket.
    pub connection_id: ConnectionId,
    /// The client's chosen id.
    pub client_id: ClientId,
    uri: Uri,
    connection_id_header: HeaderValue,
    cookie: Option<HeaderValue>,
    authorization: Option<HeaderValue>,
}

/// The API's answer to a message or connect request.
#[derive(Debug)]
pub struct ApiAnswer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its body, read in full; of an answer judged by its status alone (to a DELETE, or a 5xx
    /// to a connect GET), at most its first [`DISCONNECT_ANSWER_LIMIT`] bytes (the connect
    /// limit for a connect GET), and only what came within a second of its head.
    pub body: Bytes,
}

impl ApiAnswer {
    /// Whether the body is meant as binary: `Content-Type: application/octet-stream`.
    pub fn is_binary(&self) -> bool {
        is_octet_stream(&self.headers)
    }
}

/// Whether `headers` say `Content-Type: application/octet-stream` (parameters ignored): the
/// mark of a binary message, from the API's answers and in pushes alike.
pub fn is_octet_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/octet-stream"))
        })
}

/// The client-side request facts forwarded on the connect GET.
#[derive(Default)]
pub struct ConnectHeaders {
    /// Headers copied from the upgrade request (Cookie, Authorization, Origin, ...).
    pub forwarded: HeaderMap,
    /// The raw query string, without `?`.
    pub query: Option<String>,
}

/// The pooled API client shared by all connections.
pub struct Upstream {
    pool: Arc<Pool>,
    base: String,
    /// The slots of requests at once, at most `max_connections`.
    slots: ConcurrencyLimit,
    waiting: AtomicUsize,
    max_waiting: usize,
    /// Longest a request waits for a slot (`--upstream-max-wait`).
    max_wait: Duration,
    timeout: Duration,
    /// Body bytes read of a reply (`--max-message-size`).
    max_body: usize,
    /// Body bytes read of the answer to a connect GET ([`CONNECT_ANSWER_LIMIT`] or
    /// `--max-message-size`, whichever is more).
    connect_max_body: usize,
    /// `--api-token`, sent with every request.
    api_token: Option<HeaderValue>,
    metrics: Arc<Metrics>,
}

/// Why the API client could not be built.
#[derive(Debug)]
pub struct UpstreamSetupError(pub String);

impl fmt::Display for UpstreamSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl StdError for UpstreamSetupError {}

impl Upstream {
    /// Builds the client for `config`, allowing `--upstream-min-concurrency` up to
    /// `max_connections` requests at once (see `upstream/limit.rs`) and `max_waiting` more
    /// to wait for one of them, each for at most `--upstream-max-wait`.
    pub fn new(
        config: &Config,
        max_connections: usize,
        max_waiting: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Upstream, UpstreamSetupError> {
        let address = match &config.api_unix_socket {
            Some(path) => {
                if config.api.is_https() {
                    return Err(UpstreamSetupError(format!(
                        "--api-unix-socket {}: the API is reached in plain HTTP over a Unix \
                         socket; give --api an http:// URL (its host names the Host header)",
                        path.display()
                    )));
                }
                ApiAddress::UnixSocket(Arc::new(path.clone()))
            }
            None => ApiAddress::Network(network_connector(config)?),
        };
        let dialer = Dialer {
            address,
            timeout: connect_timeout(config),
        };
        let origin: Uri = config
            .api
            .as_str()
            .parse()
            .map_err(|e| UpstreamSetupError(format!("--api {}: {e}", config.api.as_str())))?;
        let pool = Pool::new(
            dialer,
            &origin,
            config.upstream_http2,
            max_connections,
            POOL_IDLE_TIMEOUT,
        )
        .map_err(|e| UpstreamSetupError(format!("--api {}: {e}", config.api.as_str())))?;
        Ok(Upstream {
            pool,
            base: config.api.as_str().to_owned(),
            slots: ConcurrencyLimit::new(config.upstream_min_concurrency, max_connections),
            waiting: AtomicUsize::new(0),
            max_waiting,
            max_wait: config.upstream_max_wait,
            timeout: config.upstream_timeout,
            max_body: config.max_message_size,
            connect_max_body: config.max_message_size.max(CONNECT_ANSWER_LIMIT),
            api_token: api_token_header(config)?,
            metrics,
        })
    }

    /// Prepares the per-connection facts; fails only if the ClientId makes no valid URL.
    pub fn context(
        &self,
        connection_id: ConnectionId,
        client_id: ClientId,
        upgrade_headers: &HeaderMap,
    ) -> Result<ConnectionContext, UpstreamError> {
        let uri = self.uri(&client_id, None)?;
        let connection_id_header = HeaderValue::from_bytes(&connection_id.hex())
            .map_err(|e| UpstreamError::Broken(e.to_string()))?;
        Ok(ConnectionContext {
            connection_id,
            client_id,
            uri,
            connection_id_header,
            cookie: joined_cookies(upgrade_headers),
            authorization: upgrade_headers.get(AUTHORIZATION).cloned(),
        })
    }

    fn uri(&self, client_id: &ClientId, query: Option<&str>) -> Result<Uri, UpstreamError> {
        let mut url = String::with_capacity(self.base.len() + client_id.as_str().len() + 8);
        url.push_str(&self.base);
        url.push_str(&client_id.encoded());
        if let Some(q) = query {
            url.push('?');
            push_query(&mut url, q);
        }
        url.parse()
            .map_err(|e: http::uri::InvalidUri| UpstreamError::Broken(e.to_string()))
    }

    /// `GET {api}<ClientId>?<query>`: may this client connect? `sent` tells, all along,
    /// whether the request has gone out to the API (true) or not yet, or came back unsent.
    pub async fn connect(
        &self,
        context: &ConnectionContext,
        headers: ConnectHeaders,
        sent: &AtomicBool,
    ) -> Result<ApiAnswer, UpstreamError> {
        let uri = self.uri(&context.client_id, headers.query.as_deref())?;
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.method_mut() = Method::GET;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers.forwarded;
        self.add_connection_headers(context, request.headers_mut());
        // The handshake waits --upstream-timeout for the answer; one that comes later is
        // still wanted (see handshake.rs, `PendingApproval`), for as long again.
        let limits = Limits {
            time: self.timeout.saturating_mul(2),
            body: BodyLimit::WholeUnlessServerError(self.connect_max_body),
        };
        self.send_within(request, limits, Some(sent)).await
    }

    /// `POST {api}<ClientId>` with one message as the body.
    pub async fn message(
        &self,
        context: &ConnectionContext,
        payload: Bytes,
        binary: bool,
    ) -> Result<ApiAnswer, UpstreamError> {
        let mut request = self.request(context, Method::POST, payload);
        request
            .headers_mut()
            .insert(CONTENT_TYPE, if binary { OCTET_STREAM } else { TEXT_PLAIN });
        self.send(request).await
    }

    /// `DELETE {api}<ClientId>` with the close reason as the body. The answer's status is what
    /// counts: of its body at most [`DISCONNECT_ANSWER_LIMIT`] bytes are read, and a larger
    /// one does not fail the request.
    pub async fn disconnect(
        &self,
        context: &ConnectionContext,
        reason: Bytes,
        code: Option<u16>,
    ) -> Result<ApiAnswer, UpstreamError> {
        let mut request = self.request(context, Method::DELETE, reason);
        request.headers_mut().insert(CONTENT_TYPE, TEXT_PLAIN);
        if let Some(code) = code {
            request
                .headers_mut()
                .insert(X_CLOSE_CODE.clone(), HeaderValue::from(code));
        }
        let limits = Limits {
            time: self.timeout,
            body: BodyLimit::Head(DISCONNECT_ANSWER_LIMIT),
        };
        self.send_within(request, limits, None).await
    }

    fn request(
        &self,
        context: &ConnectionContext,
        method: Method,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = context.uri.clone();
        self.add_connection_headers(context, request.headers_mut());
        request
    }

    /// What every request about `context`'s connection carries, the connect GET included:
    /// `X-Connection-Id`, the upgrade's cookies as one line (PHP, for one, reads two lines as
    /// one cookie), its `Authorization`, and `--api-token`.
    fn add_connection_headers(&self, context: &ConnectionContext, headers: &mut HeaderMap) {
        headers.insert(
            X_CONNECTION_ID.clone(),
            context.connection_id_header.clone(),
        );
        if let Some(cookie) = &context.cookie {
            headers.insert(COOKIE, cookie.clone());
        }
        if let Some(authorization) = &context.authorization {
            headers.insert(AUTHORIZATION, authorization.clone());
        }
        if let Some(token) = &self.api_token {
            headers.insert(X_WS2HTTP_TOKEN.clone(), token.clone());
        }
    }

    /// Sends a message's `request` and reads its answer (a reply, at most
    /// `--max-message-size`) within `--upstream-timeout`. (Not an `async fn`: a layer of its
    /// own would add to every request's future.)
    fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<ApiAnswer, UpstreamError>> + Send + '_ {
        let limits = Limits {
            time: self.timeout,
            body: BodyLimit::Whole(self.max_body),
        };
        self.send_within(request, limits, None)
    }

    /// Sends `request` and reads its answer within `limits`; `watcher`, if given, tells
    /// whether it went out (see [`Progress`]).
    async fn send_within(
        &self,
        request: Request<Full<Bytes>>,
        limits: Limits,
        watcher: Option<&AtomicBool>,
    ) -> Result<ApiAnswer, UpstreamError> {
        let limit = limits.time;
        self.metrics
            .requests_started
            .fetch_add(1, Ordering::Relaxed);
        // Settled when dropped: at the end below, or with this future if it is dropped first
        // (a connect GET whose client left, or whose handshake stopped waiting before it went
        // out). The slot and the stage are kept here rather than in the exchange, so that the
        // slot learns when its request went out (for the API's pace) from the stage, also when
        // the deadline drops the exchange.
        let mut settled = Settlement {
            metrics: &self.metrics,
            started: Instant::now(),
            // Its time ends then (taken before the timeout below takes its own, so never
            // after it).
            progress: Progress::new(watcher, tokio::time::Instant::now().checked_add(limit)),
            slot: None,
            succeeded: false,
        };
        let exchange = self.exchange(
            request,
            limits.body,
            &mut settled.progress,
            &mut settled.slot,
        );
        let result = match tokio::time::timeout(limit, exchange).await {
            Ok(result) => result,
            Err(_) => Err(settled.progress.stage.timed_out(limit)),
        };
        settled.succeeded = matches!(&result, Ok(answer) if answer.status.is_success());
        drop(settled);
        result
    }

    async fn exchange<'a>(
        &'a self,
        request: Request<Full<Bytes>>,
        body_limit: BodyLimit,
        progress: &mut Progress<'_>,
        slot: &mut Option<Slot<'a>>,
    ) -> Result<ApiAnswer, UpstreamError> {
        let (held, waited) = self.permit(RequestKind::of(request.method())).await?;
        let held = slot.insert(held);
        let answer = self
            .pool
            .exchange(request, body_limit, progress, waited)
            .await?;
        // An answer whose body stopped coming stands on its status, but is no answer at the
        // API's pace: its slot was held for the wait. As a request left unanswered, it counts
        // as one slow answer if it held the slot past a slow answer's time (recorded whole,
        // a second's wait would keep the recent answers slow for dozens more).
        if !answer.parts.status.is_server_error() && answer.end != BodyEnd::Stalled {
            held.answered();
        }
        Ok(ApiAnswer {
            status: answer.parts.status,
            headers: answer.parts.headers,
            body: answer.body,
        })
    }

    /// API requests allowed at once now (the adaptive limit's current value).
    pub fn concurrency_limit(&self) -> usize {
        self.slots.current()
    }

    /// API requests always allowed at once: `--upstream-min-concurrency` as the limit applies
    /// it (at most the maximum).
    pub fn min_concurrency(&self) -> usize {
        self.slots.floor()
    }

    /// API connections open now (for tests and metrics).
    pub fn open_connections(&self) -> usize {
        self.pool.open()
    }

    /// Connections, requests in flight and requests waiting now, for the metrics.
    pub fn load(&self) -> UpstreamLoad {
        UpstreamLoad {
            connections_open: self.pool.open(),
            requests_in_flight: self.slots.in_flight(),
            concurrency_limit: self.slots.current(),
            requests_waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// An API slot for a request of `kind`, and, if it had to wait for one, how many attempts
    /// to open a connection had failed when it began to: one that failed while it waited
    /// fails it too (see `pool.rs`).
    async fn permit(
        &self,
        kind: RequestKind,
    ) -> Result<(Slot<'_>, Option<FailedAttempts>), UpstreamError> {
        if let Ok(slot) = self.slots.try_acquire(kind) {
            return Ok((slot, None));
        }
        let waited = self.pool.failed_attempts();
        // Counted until this future ends, also when a timeout drops it while it waits.
        let Some(_waiting) = Waiting::enter(&self.waiting, self.max_waiting) else {
            return Err(UpstreamError::Overloaded);
        };
        match tokio::time::timeout(self.max_wait, self.slots.acquire(kind)).await {
            Ok(Ok(slot)) => Ok((slot, Some(waited))),
            Ok(Err(_)) | Err(_) => Err(UpstreamError::Overloaded),
        }
    }
}

/// Appends the client's `query` to `url` as it came, except for bytes outside ASCII (raw
/// UTF-8, which hyper takes from a client but a strict API or proxy refuses): those are
/// percent-encoded, as a browser would have sent them.
fn push_query(url: &mut String, query: &str) {
    if query.is_ascii() {
        url.push_str(query);
        return;
    }
    for c in query.chars() {
        if c.is_ascii() {
            url.push(c);
        } else {
            let mut utf8 = [0; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                let _ = write!(url, "%{byte:02X}");
            }
        }
    }
}

/// `--api-token` as a header value (kept out of debug output).
fn api_token_header(config: &Config) -> Result<Option<HeaderValue>, UpstreamSetupError> {
    let Some(token) = &config.api_token else {
        return Ok(None);
    };
    let mut value = HeaderValue::from_str(token.expose()).map_err(|_| {
        UpstreamSetupError("--api-token must be visible ASCII (it is sent as a header)".to_owned())
    })?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The upgrade request's cookies as one `Cookie` value: several lines are joined with `; `, as
/// HTTP/2 joins its cookie fields, so that every message carries all of them.
fn joined_cookies(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut lines = headers.get_all(COOKIE).iter();
    let first = lines.next()?;
    let Some(second) = lines.next() else {
        return Some(first.clone());
    };
    let mut joined = Vec::with_capacity(first.len() + second.len() + 2);
    for line in [first, second].into_iter().chain(lines) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(line.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// How far a request got before `--upstream-timeout` ran out, which says what the timeout
/// means: only a request that was sent may have reached the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not sent yet: waiting for an API slot or connection, or opening a connection (which
    /// fails on its own, as unreachable, within half the time: [`connect_timeout`]; so does a
    /// request that waited for another's attempt, or for a slot while an attempt failed, with
    /// it).
    Waiting,
    /// Not sent yet: waiting since this moment for one of the streams the API allows on its
    /// HTTP/2 connection. Unsent, but the API's pace counts from here: a request inside
    /// hyper would wait the same, and an API that keeps its streams busy is a slow one, so
    /// that the concurrency limit shrinks towards what it takes, rather than growing with
    /// quick answers while more and more requests wait for a stream.
    WaitingForStream(Instant),
    /// Written, or being written, to an API connection: the API's pace counts from this
    /// moment (when it began to wait for a stream, if it did).
    Sent(Instant),
}

impl Stage {
    /// The error for a request whose time ran out at this stage: one never sent is refused as
    /// the gateway's overload (the API did not see it, a DELETE may be sent again).
    fn timed_out(self, limit: Duration) -> UpstreamError {
        match self {
            Stage::Waiting | Stage::WaitingForStream(_) => UpstreamError::Overloaded,
            Stage::Sent(_) => UpstreamError::Timeout(limit),
        }
    }

    /// When the API's pace for this request began (`None`: it never reached a connection).
    fn paced_from(self) -> Option<Instant> {
        match self {
            Stage::Waiting => None,
            Stage::WaitingForStream(since) | Stage::Sent(since) => Some(since),
        }
    }
}

/// What is recorded of one API request when it ends, however it ends (answered, failed,
/// timed out, or dropped unfinished): its slot learns when the API's pace for it began (so a
/// wait for an HTTP/2 stream counts in that pace also when the request is dropped in it), its
/// time goes into `upstream_latency_seconds`, and it counts as succeeded or failed, so that
/// started = succeeded + failed, and the histogram's count matches, once nothing is in flight.
struct Settlement<'a> {
    /// Where it is counted.
    metrics: &'a Metrics,
    /// When the request began (waiting for a slot, if it did).
    started: Instant,
    /// How far it got.
    progress: Progress<'a>,
    /// Its API slot, once it has one.
    slot: Option<Slot<'a>>,
    /// Whether it ended with a 2xx answer: not until it ends, so that one dropped unfinished
    /// counts as failed.
    succeeded: bool,
}

impl Drop for Settlement<'_> {
    fn drop(&mut self) {
        if let (Some(slot), Some(paced_from)) =
            (self.slot.as_mut(), self.progress.stage.paced_from())
        {
            slot.sent(paced_from);
        }
        // Given back now, its pace counted.
        self.slot = None;
        self.metrics
            .observe_upstream_latency(self.started.elapsed());
        let counter = if self.succeeded {
            &self.metrics.requests_succeeded
        } else {
            &self.metrics.requests_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Where a request is, as the pool moves it along: its [`Stage`], mirrored to `watcher` (if
/// any) for a caller that must know whether it went out even after it stopped waiting for it;
/// and when its time runs out.
pub(super) struct Progress<'a> {
    stage: Stage,
    watcher: Option<&'a AtomicBool>,
    /// When its `--upstream-timeout` (or a connect's twice that) runs out (`None`: never, for
    /// a time too long to say): a body judged by its status alone is read until then at most,
    /// and the answer stands (see `pool::collect`).
    deadline: Option<tokio::time::Instant>,
}

impl<'a> Progress<'a> {
    fn new(
        watcher: Option<&'a AtomicBool>,
        deadline: Option<tokio::time::Instant>,
    ) -> Progress<'a> {
        Progress {
            stage: Stage::Waiting,
            watcher,
            deadline,
        }
    }

    /// When the request's time runs out, if it does.
    pub(super) fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }

    /// The request waits for one of the streams its HTTP/2 connection allows, from now on (or
    /// from when it began to, on a connection that ended meanwhile).
    pub(super) fn waiting_for_stream(&mut self) {
        if !matches!(self.stage, Stage::WaitingForStream(_)) {
            self.stage = Stage::WaitingForStream(Instant::now());
        }
    }

    /// The request is being written to an API connection, from now on.
    pub(super) fn sent(&mut self) {
        self.stage = Stage::Sent(match self.stage {
            Stage::WaitingForStream(since) => since,
            Stage::Waiting | Stage::Sent(_) => Instant::now(),
        });
        if let Some(watcher) = self.watcher {
            watcher.store(true, Ordering::Release);
        }
    }

    /// The request came back unsent (a closed connection handed it back): waiting again.
    pub(super) fn unsent(&mut self) {
        self.stage = Stage::Waiting;
        if let Some(watcher) = self.watcher {
            watcher.store(false, Ordering::Release);
        }
    }
}

/// How long opening an API connection may take: half of `--upstream-timeout`, so that an API
/// host that never answers shows as unreachable (a handshake's `502`, a DELETE sent again)
/// before the request's own time runs out.
fn connect_timeout(config: &Config) -> Duration {
    config.upstream_timeout / 2
}

/// One request waiting for an API slot; uncounted when dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// Counts one more request waiting in `counter`, unless `max` already are (`None`): one
    /// step, so that of two arrivals for the last place one gets it (counting first and
    /// reading the count after, both could read the other's count too and be refused).
    fn enter(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |waiting| {
                (waiting < max).then_some(waiting + 1)
            })
            .ok()?;
        Some(Waiting(counter))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Joins an error and its sources into one line: `client error (Connect): connection refused`.
pub fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The TCP (and, for an `https://` API, TLS) connector, offering in ALPN only the protocol the
/// pool will speak; a host name is looked up by a [`BoundedResolver`], whose lookups the
/// descriptor budget counts.
fn network_connector(config: &Config) -> Result<ApiConnector, UpstreamSetupError> {
    network_connector_with(config, BoundedResolver::new())
}

/// [`network_connector`] with `resolver` for the host name.
fn network_connector_with(
    config: &Config,
    resolver: BoundedResolver,
) -> Result<ApiConnector, UpstreamSetupError> {
    let tls = client_tls_config(config)?;
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout(config)));
    // One socket per attempt, as the pool counts it: with happy eyeballs (hyper-util's default),
    // a host name with both IPv4 and IPv6 addresses could hold a second socket per attempt,
    // outside the open-file budget. The addresses are tried one after the other instead, each
    // with its share of the connect timeout.
    http.set_happy_eyeballs_timeout(None);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    Ok(if config.upstream_http2 {
        connector.enable_http2().wrap_connector(http)
    } else {
        connector.enable_http1().wrap_connector(http)
    })
}

fn client_tls_config(config: &Config) -> Result<rustls::ClientConfig, UpstreamSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    if config.api.is_https() {
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
    }
    if let Some(path) = &config.api_ca {
        let pem = std::fs::read(path)
            .map_err(|e| UpstreamSetupError(format!("--api-ca {}: {e}", path.display())))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert =
                cert.map_err(|e| UpstreamSetupError(format!("--api-ca {}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| UpstreamSetupError(format!("--api-ca {}: {e}", path.display())))?;
            added += 1;
        }
        if added == 0 {
            return Err(UpstreamSetupError(format!(
                "--api-ca {}: no PEM certificate in the file",
                path.display()
            )));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamSetupError(format!("TLS setup: {e}")))?;
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Serves `service` over HTTP/1.1 on a loopback port, each connection with a clone of it,
/// for unit tests that need an API; its base URL (`http://127.0.0.1:PORT/`).
#[cfg(test)]
pub(crate) async fn loopback_api<S, B>(service: S) -> String
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone()),
            );
        }
    });
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer_with(content_type: Option<&'static str>) -> ApiAnswer {
        let mut headers = HeaderMap::new();
        if let Some(ct) = content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        ApiAnswer {
            status: StatusCode::OK,
            headers,
            body: Bytes::new(),
        }
    }

    #[test]
    fn a_request_that_waits_for_a_stream_is_unsent_but_paced_from_that_wait() {
        let limit = Duration::from_secs(3);
        let mut progress = Progress::new(None, None);
        assert_eq!(progress.stage.paced_from(), None, "no connection yet");
        progress.waiting_for_stream();
        let since = progress
            .stage
            .paced_from()
            .expect("the wait for a stream counts in the API's pace");
        // Its time running out there is overload: it never went out. Its slot counts the
        // wait, as a slow answer, through `paced_from`.
        assert_eq!(progress.stage.timed_out(limit), UpstreamError::Overloaded);
        // On a new connection, after the first ended: still paced from the first wait.
        progress.waiting_for_stream();
        assert_eq!(progress.stage.paced_from(), Some(since));
        progress.sent();
        assert_eq!(progress.stage, Stage::Sent(since));
        assert_eq!(
            progress.stage.timed_out(limit),
            UpstreamError::Timeout(limit)
        );
        // Handed back unsent, then sent without waiting for a stream: paced from then.
        progress.unsent();
        assert_eq!(progress.stage.paced_from(), None);
        std::thread::sleep(Duration::from_millis(1));
        progress.sent();
        assert!(progress.stage.paced_from().is_some_and(|at| at > since));
    }

    #[test]
    fn a_request_whose_time_ran_out_unsent_is_overload_and_a_sent_one_a_timeout() {
        let limit = Duration::from_secs(3);
        assert_eq!(Stage::Waiting.timed_out(limit), UpstreamError::Overloaded);
        assert_eq!(
            Stage::Sent(Instant::now()).timed_out(limit),
            UpstreamError::Timeout(limit)
        );
        // Only the unsent kind is a DELETE that departures may send again.
        assert_eq!(
            Stage::Waiting.timed_out(limit).close_reason(),
            "upstream overloaded"
        );
    }

    #[test]
    fn only_octet_stream_answers_are_binary() {
        assert!(answer_with(Some("application/octet-stream")).is_binary());
        assert!(answer_with(Some("Application/Octet-Stream; x=1")).is_binary());
        assert!(!answer_with(Some("text/plain")).is_binary());
        assert!(!answer_with(Some("application/json")).is_binary());
        assert!(!answer_with(None).is_binary());
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_is_no_longer_counted_as_waiting() {
        let config = Config::default();
        let upstream = Upstream::new(&config, 1, 64, Arc::new(Metrics::default())).unwrap();
        let held = upstream.permit(RequestKind::Message).await.unwrap();
        for _ in 0..3 {
            let wait = tokio::time::timeout(
                Duration::from_millis(5),
                upstream.permit(RequestKind::Message),
            )
            .await;
            assert!(wait.is_err(), "the only slot is taken");
        }
        assert_eq!(upstream.waiting.load(Ordering::Relaxed), 0);
        drop(held);
        assert!(upstream.permit(RequestKind::Message).await.is_ok());
    }

    #[tokio::test]
    async fn waiters_beyond_the_bound_are_refused_as_overloaded() {
        use futures_util::FutureExt;
        let config = Config::default();
        let upstream = Upstream::new(&config, 1, 64, Arc::new(Metrics::default())).unwrap();
        let held = upstream.permit(RequestKind::Message).await.unwrap();
        let mut waiters: Vec<_> = (0..upstream.max_waiting)
            .map(|_| Box::pin(upstream.permit(RequestKind::Message)))
            .collect();
        for waiter in &mut waiters {
            assert!(
                waiter.as_mut().now_or_never().is_none(),
                "waits for the slot"
            );
        }
        let refused = upstream.permit(RequestKind::Message).await;
        assert!(matches!(refused, Err(UpstreamError::Overloaded)));
        drop(waiters);
        drop(held);
        assert!(upstream.permit(RequestKind::Message).await.is_ok());
    }

    #[test]
    fn the_last_place_to_wait_goes_to_one_arrival_and_a_refused_one_is_not_counted() {
        let counter = AtomicUsize::new(2);
        let first = Waiting::enter(&counter, 3);
        assert!(first.is_some(), "one place left");
        assert!(Waiting::enter(&counter, 3).is_none(), "none left");
        assert_eq!(
            counter.load(Ordering::Relaxed),
            3,
            "the refused one not counted"
        );
        drop(first);
        assert_eq!(counter.load(Ordering::Relaxed), 2);
        assert!(
            Waiting::enter(&counter, 3).is_some(),
            "its place free again"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_refused_as_overloaded_once_it_waited_past_the_max_wait() {
        let config = Config {
            upstream_max_wait: Duration::from_millis(300),
            ..Config::default()
        };
        let upstream = Upstream::new(&config, 1, 64, Arc::new(Metrics::default())).unwrap();
        let held = upstream.permit(RequestKind::Message).await.unwrap();
        let started = Instant::now();
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            upstream.permit(RequestKind::Message),
        )
        .await
        .expect("refused, not left waiting for the taken slot");
        assert!(matches!(refused, Err(UpstreamError::Overloaded)));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(upstream.waiting.load(Ordering::Relaxed), 0);
        // A slot that comes free within the wait is taken.
        let waiter = upstream.permit(RequestKind::Message);
        let freer = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(held);
        };
        let (taken, ()) = tokio::join!(waiter, freer);
        assert!(taken.is_ok());
    }

    /// An HTTP/1.1 client of the API at `api` (4 connections) whose concurrency limit starts
    /// at one slot.
    fn one_slot_upstream(api: &str) -> Upstream {
        let config = Config {
            api: api.parse().unwrap(),
            upstream_min_concurrency: 1,
            ..Config::default()
        };
        Upstream::new(&config, 4, 64, Arc::new(Metrics::default())).unwrap()
    }

    /// The connection context of a client `a` with no headers, for `upstream`.
    fn client_a(upstream: &Upstream) -> ConnectionContext {
        upstream
            .context(
                ConnectionId::next(),
                ClientId::from_path("/a").unwrap(),
                &HeaderMap::new(),
            )
            .unwrap()
    }

    /// Every message in flight and every closing connection holds one of these futures, so
    /// their size is memory per message and per departing client (it was 8 KiB before the
    /// rare paths, HTTP/2 and opening a connection, were boxed).
    #[tokio::test]
    async fn request_futures_stay_small() {
        let config = Config::default();
        let upstream = Upstream::new(&config, 1, 64, Arc::new(Metrics::default())).unwrap();
        let context = client_a(&upstream);
        let message = upstream.message(&context, Bytes::new(), false);
        assert!(
            std::mem::size_of_val(&message) <= 3072,
            "{}",
            std::mem::size_of_val(&message)
        );
        let disconnect = upstream.disconnect(&context, Bytes::new(), None);
        assert!(std::mem::size_of_val(&disconnect) <= 3072);
    }

    /// An address whose connection attempts hang, as those to an API host down behind a
    /// firewall do: a listener whose accept queue is full drops further SYNs (for as long as
    /// the returned listener and queued connections are kept).
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
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), connect).await
            {
                queued.push(stream);
            }
        }
        (addr, listener, queued)
    }

    /// Sends six messages at once, with two API slots, to an API host that never answers a
    /// connection attempt (over HTTP/2 if `http2`), and checks that each fails as unreachable
    /// when the attempts fail, at half of the 2 s timeout: also the four that waited for a
    /// slot, which would otherwise start an attempt of their own only once the slots came
    /// free, and run out of time in it (overloaded, at the full timeout).
    async fn requests_waiting_for_a_slot_fail_with_the_attempts_that_failed(http2: bool) {
        let (addr, _listener, _queued) = black_holed_address().await;
        let config = Config {
            api: format!("http://{addr}/").parse().unwrap(),
            upstream_http2: http2,
            upstream_timeout: Duration::from_secs(2),
            upstream_min_concurrency: 2,
            ..Config::default()
        };
        let upstream = Upstream::new(&config, 2, 64, Arc::new(Metrics::default())).unwrap();
        let contexts: Vec<_> = (0..6)
            .map(|n| {
                let client_id = ClientId::from_path(&format!("/c{n}")).unwrap();
                upstream
                    .context(ConnectionId::next(), client_id, &HeaderMap::new())
                    .unwrap()
            })
            .collect();
        let started = Instant::now();
        let outcomes = futures_util::future::join_all(contexts.iter().map(|context| async {
            let outcome = upstream.message(context, Bytes::new(), false).await;
            (outcome, started.elapsed())
        }))
        .await;
        for (outcome, after) in &outcomes {
            assert!(
                matches!(outcome, Err(UpstreamError::Unreachable(_)))
                    && *after < Duration::from_millis(1800),
                "{outcome:?} after {after:?}; the attempts failed at 1 s"
            );
        }
    }

    #[tokio::test]
    async fn http1_requests_waiting_for_a_slot_fail_with_the_attempts_that_failed() {
        requests_waiting_for_a_slot_fail_with_the_attempts_that_failed(false).await;
    }

    #[tokio::test]
    async fn h2_requests_waiting_for_a_slot_fail_with_the_attempt_that_failed() {
        requests_waiting_for_a_slot_fail_with_the_attempts_that_failed(true).await;
    }

    /// An API on a loopback port that answers each request with the next of `answers`
    /// (status, and after how long); its URL.
    async fn scripted_api(answers: Vec<(u16, Duration)>) -> String {
        let answers = Arc::new(std::sync::Mutex::new(answers.into_iter()));
        loopback_api(hyper::service::service_fn(move |_| {
            let (status, after) = answers.lock().unwrap().next().unwrap();
            async move {
                tokio::time::sleep(after).await;
                http::Response::builder()
                    .status(status)
                    .body(Full::new(Bytes::new()))
            }
        }))
        .await
    }

    #[tokio::test]
    async fn a_5xx_is_no_answer_and_counts_as_slow_only_when_it_comes_past_the_slow_mark() {
        let api = scripted_api(vec![
            (502, Duration::ZERO),
            (200, Duration::from_millis(50)),
            (504, Duration::from_millis(400)),
        ])
        .await;
        let upstream = one_slot_upstream(&api);
        let context = client_a(&upstream);
        let send = || upstream.message(&context, Bytes::new(), false);
        // A quick 5xx (a proxy in front of a stopped API), while it held the only slot, is no
        // answer: the limit does not grow.
        let _ = send().await;
        assert_eq!(
            upstream.concurrency_limit(),
            1,
            "a quick 5xx grew the limit"
        );
        // An answer at the API's pace (50 ms: slow past 105 ms), while it held the only slot,
        // grows it.
        let _ = send().await;
        assert_eq!(upstream.concurrency_limit(), 2);
        // A 5xx past the slow mark (a proxy's 504 after it gave up waiting): one slow answer.
        let _ = send().await;
        assert_eq!(
            upstream.concurrency_limit(),
            1,
            "a late 5xx is a slow answer"
        );
    }

    #[tokio::test]
    async fn an_answer_whose_body_stalls_stands_on_its_status_but_is_no_answer_at_the_apis_pace() {
        // `200` with a body that sends ten bytes and then nothing more.
        let api = loopback_api(hyper::service::service_fn(|_| async {
            let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
                hyper::body::Frame::data(Bytes::from_static(b"0123456789")),
            )]);
            let stalled = futures_util::StreamExt::chain(first, futures_util::stream::pending());
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::StreamBody::new(
                stalled,
            )))
        }))
        .await;
        let upstream = one_slot_upstream(&api);
        let context = client_a(&upstream);
        let started = Instant::now();
        let answer = upstream.disconnect(&context, Bytes::new(), None).await;
        let answer = answer.expect("the status stands");
        assert_eq!(
            (answer.status, answer.body.as_ref()),
            (StatusCode::OK, &b"0123456789"[..])
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
        // An answer at the API's pace while it held the only slot would have grown the limit.
        assert_eq!(
            upstream.concurrency_limit(),
            1,
            "a second's wait for the body counted as the API's pace"
        );
        assert_eq!(upstream.slots.in_flight(), 0);
        // Its connection, left with the rest of the body unread, is closed: counted until its
        // task ends, a moment later.
        let closing = Instant::now();
        while upstream.open_connections() > 0 {
            assert!(
                closing.elapsed() < Duration::from_secs(1),
                "its connection was not closed"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// An HTTP/2 API on a loopback port that allows one stream at a time, answers `/fast` at
    /// once and anything else never; its URL, and the requests it has seen.
    async fn one_stream_h2_api() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counted = counted.clone();
                let answer = hyper::service::service_fn(move |request: Request<_>| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    let fast = request.uri().path() == "/fast";
                    async move {
                        if !fast {
                            std::future::pending::<()>().await;
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .max_concurrent_streams(1)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), answer),
                );
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn a_request_dropped_while_waiting_for_a_stream_counts_its_wait_and_its_latency() {
        let (api, seen) = one_stream_h2_api().await;
        let config = Config {
            api: api.parse().unwrap(),
            upstream_http2: true,
            upstream_min_concurrency: 1,
            ..Config::default()
        };
        let metrics = Arc::new(Metrics::default());
        let upstream = Arc::new(Upstream::new(&config, 4, 64, metrics.clone()).unwrap());
        let context = |path: &str| {
            let client_id = ClientId::from_path(path).unwrap();
            let context = upstream.context(ConnectionId::next(), client_id, &HeaderMap::new());
            Arc::new(context.unwrap())
        };
        // An answer at the API's pace while it held the only slot: the limit grows to two.
        let fast = context("/fast");
        upstream.message(&fast, Bytes::new(), false).await.unwrap();
        assert_eq!(upstream.concurrency_limit(), 2);
        // One request holds the only stream; another waits 300 ms for it, and is dropped (as
        // a connect GET is whose handshake stopped waiting, or whose client left).
        let holder = {
            let (upstream, context) = (upstream.clone(), context("/hang"));
            tokio::spawn(async move { upstream.message(&context, Bytes::new(), false).await })
        };
        while seen.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let waiter = context("/waiter");
        let dropped = tokio::time::timeout(
            Duration::from_millis(300),
            upstream.message(&waiter, Bytes::new(), false),
        )
        .await;
        assert!(dropped.is_err(), "it waited for the stream");
        assert_eq!(
            upstream.concurrency_limit(),
            1,
            "its wait for a stream, far past the API's pace, was not counted as slow"
        );
        let scrape = metrics.render(upstream.load(), crate::metrics::DisconnectLoad::default());
        assert!(
            scrape.contains("upstream_latency_seconds_count 2\n"),
            "the dropped request's latency was not observed:\n{scrape}"
        );
        holder.abort();
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let all = [
            UpstreamError::Timeout(Duration::from_secs(1)),
            UpstreamError::Unreachable(String::new()),
            UpstreamError::Broken(String::new()),
            UpstreamError::Overloaded,
            UpstreamError::ResponseTooLarge(1),
        ];
        for e in all {
            assert!(e.close_reason().len() <= 123);
        }
    }
}
