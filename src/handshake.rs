//! The public listener's HTTP side: checks an upgrade request, asks the API whether this client
//! may connect, answers `101` (or the refusal), and hands the upgraded socket to a session.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, HOST, ORIGIN, RETRY_AFTER,
    SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body as _;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio_websockets::{Config as WsConfig, Limits, ServerBuilder};

use crate::identity::{ClientId, ConnectionId};
use crate::metrics::{Metrics, RefusalReason};
use crate::registry::Insertion;
use crate::server::Io;
use crate::session::{self, Command, SessionHandle};
use crate::upstream::{ApiAnswer, ConnectHeaders, ConnectionContext, UpstreamError};
use crate::Shared;

const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Request headers passed on to the API's connect GET as they are (and `Cookie`, its lines
/// joined into one: see `Upstream::connect`).
const FORWARDED_HEADERS: [HeaderName; 4] = [
    http::header::AUTHORIZATION,
    http::header::ORIGIN,
    http::header::USER_AGENT,
    http::header::SEC_WEBSOCKET_PROTOCOL,
];
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Read buffer of a websocket while it reads: allocated when the socket is read, freed again once
/// everything read was handed on and the socket has nothing more, so an idle socket holds none;
/// a larger message grows it for a while (see vendor/tokio-websockets/PATCH.md).
const WEBSOCKET_READ_BUFFER: usize = 1024;
/// Paths the public and control listeners keep for themselves; never a ClientId.
pub const RESERVED_NAMES: [&str; 3] = ["healthz", "metrics", "debug"];

/// A response with a short text body.
pub(crate) fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `/healthz` on either listener: `200 ok`, or `404 draining` once a graceful shutdown has
/// begun, so that a balancer stops sending new clients while the sockets drain (HAProxy's
/// `http-check disable-on-404` takes a node answering `404` out of balancing; `503` is
/// already the control listener's answer when all its connections are taken: busy, not
/// going away).
pub(crate) fn health(shared: &Shared) -> Response<Full<Bytes>> {
    if shared.is_draining() {
        text_response(
            StatusCode::NOT_FOUND,
            "draining: the gateway is shutting down\n",
        )
    } else {
        text_response(StatusCode::OK, "ok\n")
    }
}

/// The connection facts the public listener hands to each request.
#[derive(Clone)]
pub(crate) struct Peer {
    pub remote: SocketAddr,
    pub tls: bool,
    /// What the listener and the connection's request have seen of it ([`HEAD_ARRIVED`],
    /// [`REFUSAL_COUNTED`]), shared by the two.
    seen: Arc<AtomicU8>,
}

/// [`Peer::seen`]: the request head arrived, and its request is being answered.
const HEAD_ARRIVED: u8 = 1;
/// [`Peer::seen`]: the handshake has been counted as refused (see [`Peer::refused`]).
const REFUSAL_COUNTED: u8 = 2;

impl Peer {
    /// The facts of a connection just accepted from `remote`.
    pub(crate) fn new(remote: SocketAddr, tls: bool) -> Peer {
        Peer {
            remote,
            tls,
            seen: Arc::new(AtomicU8::new(0)),
        }
    }

    /// Counts the connection's handshake in `handshakes_refused` for `reason`, unless it was
    /// counted already: a refusal is counted when it is decided, and the listener's time limit
    /// may still cut the connection while the answer is written (a large API refusal page the
    /// client does not read), which is no second refusal.
    pub(crate) fn refused(&self, metrics: &Metrics, reason: RefusalReason) {
        if self.seen.fetch_or(REFUSAL_COUNTED, Ordering::AcqRel) & REFUSAL_COUNTED == 0 {
            metrics.handshake_refused(reason);
        }
    }

    /// Notes that the connection's request head has arrived (hyper parsed it and hands the
    /// request to [`handle`]).
    pub(crate) fn head_arrived(&self) {
        self.seen.fetch_or(HEAD_ARRIVED, Ordering::AcqRel);
    }

    /// Whether the connection's request head has arrived (see [`Peer::head_arrived`]).
    pub(crate) fn has_head(&self) -> bool {
        self.seen.load(Ordering::Acquire) & HEAD_ARRIVED != 0
    }
}

/// Answers one request on the public listener.
pub(crate) async fn handle(
    request: Request<Incoming>,
    peer: Peer,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = match route(request, &peer, &shared).await {
        Ok(response) => response,
        Err(refusal) => {
            peer.refused(&shared.metrics, refusal.reason);
            refusal.into_response()
        }
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        close_after(&mut response);
    }
    Ok(response)
}

/// Marks an answer as the connection's last (`Connection: close`, added to a `Connection`
/// header it has). The public listener serves one request per connection, and says so on every
/// answer but the `101`: hyper, told to keep no connection alive, would instead add `close`
/// to the `101`'s `Connection: Upgrade` too, which strict clients (OkHttp, Java's
/// `java.net.http`) refuse, failing every handshake.
fn close_after<B>(response: &mut Response<B>) {
    let headers = response.headers_mut();
    let value = match headers.get(CONNECTION).and_then(|v| v.to_str().ok()) {
        Some(existing) => HeaderValue::try_from(format!("{existing}, close"))
            .unwrap_or(HeaderValue::from_static("close")),
        None => HeaderValue::from_static("close"),
    };
    headers.insert(CONNECTION, value);
}

/// Why a handshake was refused, and what the client gets.
struct Refusal {
    status: StatusCode,
    reason: RefusalReason,
    body: Bytes,
    headers: HeaderMap,
}

impl Refusal {
    fn new(status: StatusCode, reason: RefusalReason, body: &'static str) -> Refusal {
        Refusal {
            status,
            reason,
            body: Bytes::from_static(body.as_bytes()),
            headers: HeaderMap::new(),
        }
    }

    fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Refusal {
        self.headers.insert(name, value);
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = text_response(self.status, self.body);
        response.headers_mut().extend(self.headers);
        response
    }
}

fn header_has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// `Sec-WebSocket-Accept` for a client's key (RFC 6455, 4.2.2).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(WEBSOCKET_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

fn valid_key(key: &HeaderValue) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key.as_bytes())
        .is_ok_and(|raw| raw.len() == 16)
}

async fn route(
    mut request: Request<Incoming>,
    peer: &Peer,
    shared: &Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Refusal> {
    let path = request.uri().path();
    if request.method() != Method::GET {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            RefusalReason::BadRequest,
            "only websocket upgrades (GET) are served here\n",
        )
        .with_header(http::header::ALLOW, HeaderValue::from_static("GET")));
    }
    if path == "/healthz" {
        return Ok(health(shared));
    }
    let headers = request.headers();
    if !header_has_token(headers, UPGRADE, "websocket")
        || !header_has_token(headers, CONNECTION, "upgrade")
    {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            RefusalReason::BadRequest,
            "this endpoint only speaks websocket\n",
        )
        .with_header(UPGRADE, HeaderValue::from_static("websocket"))
        .with_header(CONNECTION, HeaderValue::from_static("Upgrade")));
    }
    if request.version() != http::Version::HTTP_11 {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalReason::BadRequest,
            "websocket upgrades need HTTP/1.1\n",
        ));
    }
    // RFC 6455, 4.1: the upgrade is a GET without a body. hyper reads one (chunked, or a
    // Content-Length over 0) before it hands the socket over only if it has arrived by then;
    // the rest would be read as the client's first websocket frames.
    if !request.body().is_end_stream() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalReason::BadRequest,
            "an upgrade request has no body\n",
        ));
    }
    // RFC 9112, 3.2: a request without a Host line, or with two, is answered 400; RFC 6455,
    // 11.3.1 and 11.3.5: the key and the version appear once (which of two keys would the
    // accept answer?).
    for (name, what) in [
        (&HOST, "exactly one Host header is needed\n"),
        (
            &SEC_WEBSOCKET_KEY,
            "more than one Sec-WebSocket-Key header\n",
        ),
        (
            &SEC_WEBSOCKET_VERSION,
            "more than one Sec-WebSocket-Version header\n",
        ),
    ] {
        let lines = headers.get_all(name).iter().count();
        if lines > 1 || (lines == 0 && *name == HOST) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                RefusalReason::BadRequest,
                what,
            ));
        }
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(Refusal::new(
            StatusCode::UPGRADE_REQUIRED,
            RefusalReason::BadRequest,
            "unsupported Sec-WebSocket-Version; use 13\n",
        )
        .with_header(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13")));
    }
    let key = match headers.get(SEC_WEBSOCKET_KEY) {
        Some(key) if valid_key(key) => key.clone(),
        _ => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                RefusalReason::BadRequest,
                "missing or malformed Sec-WebSocket-Key\n",
            ))
        }
    };
    if headers.get_all(AUTHORIZATION).iter().nth(1).is_some() {
        // Credentials are one value: which of several would the API's answer be about?
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalReason::BadRequest,
            "more than one Authorization header\n",
        ));
    }
    if headers.get_all(ORIGIN).iter().nth(1).is_some() {
        // One would be checked against --allowed-origins and the API would see both.
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalReason::BadRequest,
            "more than one Origin header\n",
        ));
    }
    if headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .any(|line| line.to_str().is_err())
    {
        // The chain goes on to the API as one line of visible ASCII: without this line it
        // would be shortened without a word, and the API would take the wrong address as the
        // client's.
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalReason::BadRequest,
            "an X-Forwarded-For line is not visible ASCII\n",
        ));
    }
    let client_id = ClientId::from_path(path).map_err(|e| Refusal {
        status: StatusCode::BAD_REQUEST,
        reason: RefusalReason::BadRequest,
        body: Bytes::from(format!("{e}\n")),
        headers: HeaderMap::new(),
    })?;
    if RESERVED_NAMES.contains(&client_id.as_str()) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            RefusalReason::BadRequest,
            "this ClientId is reserved\n",
        ));
    }
    if let Some(allowed) = &shared.config.allowed_origins {
        if let Some(origin) = headers.get(ORIGIN) {
            let ok = origin
                .to_str()
                .is_ok_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)));
            if !ok {
                return Err(Refusal::new(
                    StatusCode::FORBIDDEN,
                    RefusalReason::Origin,
                    "origin not allowed\n",
                ));
            }
        }
    }
    if shared.is_draining() {
        return Err(overloaded("the gateway is shutting down\n"));
    }
    let permit = Arc::clone(&shared.connection_permits)
        .try_acquire_owned()
        .map_err(|_| overloaded("too many connections\n"))?;

    let connection_id = ConnectionId::next();
    let context = Arc::new(
        shared
            .upstream
            .context(connection_id, client_id.clone(), headers)
            .map_err(|e| api_failure(&client_id, connection_id, &e))?,
    );
    let sent = Arc::new(AtomicBool::new(false));
    let connect_request = Box::pin(ask_the_api(
        Arc::clone(shared),
        Arc::clone(&context),
        connect_headers(headers, &request, peer),
        Arc::clone(&sent),
    ));
    let mut pending = PendingApproval {
        request: Some(connect_request),
        shared: Arc::clone(shared),
        context: Arc::clone(&context),
        permit: Some(permit),
        sent,
        if_abandoned: ABANDONED_BY_CLIENT,
    };
    let waited = tokio::time::timeout(shared.config.upstream_timeout, pending.answer()).await;
    let answer = match waited {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => {
            let refusal = api_failure(&client_id, connection_id, &error);
            // Its connection broke after it went out: the API may have approved it.
            if error.outcome_unknown() && pending.went_out() {
                pending.undo(error.close_reason());
            }
            return Err(refusal);
        }
        Err(_) if pending.went_out() => {
            // Dropping `pending` leaves the request to finish on its own (see there).
            pending.if_abandoned = ABANDONED_AFTER_TIMEOUT;
            let error = UpstreamError::Timeout(shared.config.upstream_timeout);
            return Err(api_failure(&client_id, connection_id, &error));
        }
        // Still waiting for an API slot or connection: the gateway's overload, and nothing
        // the API saw (dropping `pending` drops the request).
        Err(_) => {
            return Err(api_failure(
                &client_id,
                connection_id,
                &UpstreamError::Overloaded,
            ))
        }
    };
    if answer.status.is_server_error() {
        if failed_after_acting(answer.status) {
            tracing::warn!(
                %client_id, %connection_id, status = %answer.status,
                "API failed the connect request; client told 502, the API gets a DELETE `{UPSTREAM_FAILED}`"
            );
            pending.undo(UPSTREAM_FAILED);
        } else {
            tracing::warn!(
                %client_id, %connection_id, status = %answer.status,
                "API could not take the connect request; client told 502"
            );
        }
        return Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            RefusalReason::ApiFailure,
            "the API failed\n",
        ));
    }
    let Some(permit) = pending.settled() else {
        return Err(overloaded("internal error\n"));
    };
    if !approves(&answer) {
        let status = if answer.status.is_client_error() {
            answer.status
        } else {
            StatusCode::FORBIDDEN
        };
        tracing::debug!(%client_id, %connection_id, %status, "API refused the connection");
        let mut refusal = Refusal {
            status,
            reason: RefusalReason::Api,
            body: answer.body.clone(),
            headers: HeaderMap::new(),
        };
        if let Some(retry) = answer.headers.get(RETRY_AFTER) {
            refusal = refusal.with_header(RETRY_AFTER, retry.clone());
        }
        return Err(refusal);
    }

    // RFC 6455, 4.1: a subprotocol the client did not offer fails the connection in the
    // client, after the API has counted it open; the API's answer is refused here instead,
    // and the connection it approved is undone with a DELETE.
    let protocol = answer.headers.get(SEC_WEBSOCKET_PROTOCOL);
    if protocol.is_some_and(|chosen| !offered(headers, chosen)) {
        tracing::warn!(
            %client_id, %connection_id, chosen = ?protocol,
            "API chose a subprotocol the client did not offer; client told 502"
        );
        session::departed_before_opening(shared, Arc::clone(&context), UNOFFERED_PROTOCOL, permit);
        return Err(Refusal::new(
            StatusCode::BAD_GATEWAY,
            RefusalReason::ApiFailure,
            "the API chose a subprotocol the client did not offer\n",
        ));
    }

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = response.headers_mut();
    out.insert(UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = HeaderValue::try_from(accept_key(key.as_bytes()))
        .map_err(|_| overloaded("internal error\n"))?;
    out.insert(SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(protocol) = protocol {
        out.insert(SEC_WEBSOCKET_PROTOCOL, protocol.clone());
    }

    let handle = Arc::new(SessionHandle::new(connection_id, client_id, peer.remote));
    shared
        .metrics
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    // Of two connections of one ClientId, the one whose handshake began first is closed as
    // replaced: the one already there, or this one when its approval came after a newer
    // connection had opened (it opens only to be closed, as if it had opened first).
    // (The registry tells a connection it replaces itself, under the ClientId's lock.)
    let replaced = match shared.registry.insert(Arc::clone(&handle)) {
        Insertion::First => None,
        Insertion::Replaced(older) => Some((older, Arc::clone(&handle))),
        Insertion::Superseded(newer) => {
            handle.command(Command::Replaced);
            Some((Arc::clone(&handle), newer))
        }
    };
    if let Some((older, newer)) = replaced {
        tracing::debug!(
            client_id = %handle.client_id,
            older = %older.connection_id,
            newer = %newer.connection_id,
            "same ClientId connected again; the older connection closes with 4000 unless it was already closing"
        );
    }
    if shared.is_draining() {
        handle.command(Command::Shutdown);
    }
    let on_upgrade = hyper::upgrade::on(&mut request);
    drop(request);
    let session_shared = Arc::clone(shared);
    shared.tasks.spawn(start_session(
        on_upgrade,
        handle,
        context,
        session_shared,
        permit,
    ));
    Ok(response)
}

/// DELETE body for a connection the API approved with a subprotocol the client did not offer.
const UNOFFERED_PROTOCOL: &str = "subprotocol not offered";

/// Whether `chosen` (the API's `Sec-WebSocket-Protocol`) is one of the subprotocols the
/// client's `Sec-WebSocket-Protocol` lines offered, exactly (a single token, not a list).
fn offered(request: &HeaderMap, chosen: &HeaderValue) -> bool {
    let Ok(chosen) = chosen.to_str() else {
        return false;
    };
    request
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(|line| line.split(','))
        .any(|offer| offer.trim() == chosen)
}

/// Whether the API's answer to a connect request lets the websocket open: `200` and `ok`.
fn approves(answer: &ApiAnswer) -> bool {
    answer.status == StatusCode::OK && answer.body.as_ref() == b"ok"
}

/// The API's answer to a connect request, computed apart from the handshake that waits for
/// it, so that it can go on when the handshake stops waiting.
type ConnectRequest = Pin<Box<dyn Future<Output = Result<ApiAnswer, UpstreamError>> + Send>>;

/// `GET {api}<ClientId>` for `context`'s connection; `sent` tells whether it went out.
async fn ask_the_api(
    shared: Arc<Shared>,
    context: Arc<ConnectionContext>,
    headers: ConnectHeaders,
    sent: Arc<AtomicBool>,
) -> Result<ApiAnswer, UpstreamError> {
    shared.upstream.connect(&context, headers, &sent).await
}

/// DELETE body when the client left while the API was deciding on it.
const ABANDONED_BY_CLIENT: &str = "EOF";
/// DELETE body when the API took longer than `--upstream-timeout` to decide.
const ABANDONED_AFTER_TIMEOUT: &str = "upstream timeout";
/// DELETE body when the API answered the connect GET with a 5xx: the close reason of a
/// connection that broke after the GET went out (`UpstreamError::Broken`), whose outcome is
/// as unknown.
const UPSTREAM_FAILED: &str = "upstream error";

/// A connect request the handshake is waiting for, with what a DELETE for it would need.
///
/// If the handshake stops waiting (the client hung up, or `--upstream-timeout` passed and it
/// got `504`) after the request went out, the request is not cut short: the API may be
/// approving the connection, and recording it, right now. It finishes in a task of its own
/// (for at most another `--upstream-timeout`), and an approval it brings, a 5xx, or no answer
/// at all, is undone with a DELETE, which then reaches the API after its answer (when there was
/// one). A request not sent yet is simply dropped: the API never saw it. The abandoned
/// connection never registers, so it cannot replace a newer one of the same ClientId.
struct PendingApproval {
    request: Option<ConnectRequest>,
    shared: Arc<Shared>,
    context: Arc<ConnectionContext>,
    /// The connection's place under `--max-connections`: the session's, or the DELETE's.
    permit: Option<OwnedSemaphorePermit>,
    /// Whether the request has gone out to the API.
    sent: Arc<AtomicBool>,
    /// Body of the DELETE if the handshake stops waiting.
    if_abandoned: &'static str,
}

impl PendingApproval {
    /// The API's answer (the request is done with, whatever it is).
    async fn answer(&mut self) -> Result<ApiAnswer, UpstreamError> {
        let Some(request) = self.request.as_mut() else {
            return Err(UpstreamError::Broken(
                "connect request already answered".to_owned(),
            ));
        };
        let answer = request.await;
        self.request = None;
        answer
    }

    /// Whether the request has gone out to the API.
    fn went_out(&self) -> bool {
        self.sent.load(Ordering::Acquire)
    }

    /// DELETEs the connection now, with `reason`: its request failed in a way that leaves
    /// unknown what the API did (it broke after it went out, or was answered with a 5xx).
    fn undo(mut self, reason: &str) {
        self.request = None;
        if let Some(permit) = self.permit.take() {
            session::departed_before_opening(
                &self.shared,
                Arc::clone(&self.context),
                reason,
                permit,
            );
        }
    }

    /// The connection permit, once the handshake has its answer (always there: only this,
    /// `undo` and the drop take it, and each takes `self`).
    fn settled(mut self) -> Option<OwnedSemaphorePermit> {
        self.request = None;
        self.permit.take()
    }
}

impl Drop for PendingApproval {
    fn drop(&mut self) {
        if !self.went_out() {
            // Dropping the request cancels it: the API never saw it.
            return;
        }
        let (Some(request), Some(permit)) = (self.request.take(), self.permit.take()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let settle = settle_abandoned(
            request,
            Arc::clone(&self.shared),
            Arc::clone(&self.context),
            Arc::clone(&self.sent),
            self.if_abandoned,
            permit,
        );
        self.shared.tasks.spawn_on(settle, &runtime);
    }
}

/// Whether a 5xx answer to a connect GET leaves unknown what the API did, so that the
/// connection is undone with a DELETE: a proxy answers 502 when the worker died after recording
/// the connection, 504 when it gave up while the worker goes on, and an application 500 may
/// come after its write. Not a 503, which says the request was not processed (RFC 9110,
/// 15.6.4), as the DELETE's own retry rule takes it (a refused connect would otherwise queue a
/// DELETE that a proxy in maintenance answers 503 for its every retry).
fn failed_after_acting(status: StatusCode) -> bool {
    status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE
}

/// Lets an abandoned connect request finish, and DELETEs the connection if the API approved
/// it, failed it with a 5xx other than 503 (it may have recorded the connection first), or
/// never said.
async fn settle_abandoned(
    request: ConnectRequest,
    shared: Arc<Shared>,
    context: Arc<ConnectionContext>,
    sent: Arc<AtomicBool>,
    reason: &'static str,
    permit: OwnedSemaphorePermit,
) {
    let undo = match request.await {
        Ok(answer) => approves(&answer) || failed_after_acting(answer.status),
        Err(error) => error.outcome_unknown() && sent.load(Ordering::Acquire),
    };
    tracing::debug!(
        client_id = %context.client_id,
        connection_id = %context.connection_id,
        reason,
        undo,
        "connect request finished after its handshake ended"
    );
    if undo {
        session::departed_before_opening(&shared, context, reason, permit);
    }
}

fn overloaded(body: &'static str) -> Refusal {
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        RefusalReason::Overloaded,
        body,
    )
    .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
}

fn api_failure(
    client_id: &ClientId,
    connection_id: ConnectionId,
    error: &UpstreamError,
) -> Refusal {
    let (status, body) = match error {
        UpstreamError::Timeout(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "the API did not answer in time\n",
        ),
        UpstreamError::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "the API is overloaded\n"),
        UpstreamError::ResponseTooLarge(_) => {
            (StatusCode::BAD_GATEWAY, "the API's answer was too large\n")
        }
        _ => (StatusCode::BAD_GATEWAY, "the API could not be reached\n"),
    };
    tracing::warn!(%client_id, %connection_id, %error, "connect request failed; client told {status}");
    // No API slot came free (or too many requests wait for one): the gateway's own overload,
    // nothing the API did.
    let reason = match error {
        UpstreamError::Overloaded => RefusalReason::Overloaded,
        _ => RefusalReason::ApiFailure,
    };
    let refusal = Refusal::new(status, reason, body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        refusal.with_header(RETRY_AFTER, HeaderValue::from_static("1"))
    } else {
        refusal
    }
}

fn connect_headers(
    headers: &HeaderMap,
    request: &Request<Incoming>,
    peer: &Peer,
) -> ConnectHeaders {
    let mut forwarded = HeaderMap::with_capacity(8);
    for name in &FORWARDED_HEADERS {
        for value in headers.get_all(name) {
            forwarded.append(name.clone(), value.clone());
        }
    }
    // Every X-Forwarded-For line, in order, then the peer: a proxy in front (HAProxy's
    // `option forwardfor`) adds its own line after any the client sent. (`route` refused a
    // request with a line that is not visible ASCII: none is left out here.)
    let mut chain = String::new();
    for existing in headers.get_all(&X_FORWARDED_FOR) {
        let existing = existing.to_str().unwrap_or_default().trim();
        if !existing.is_empty() {
            chain.push_str(existing);
            chain.push_str(", ");
        }
    }
    // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; the API gets a.b.c.d.
    push_address(&mut chain, peer.remote.ip().to_canonical());
    if let Ok(value) = HeaderValue::try_from(chain) {
        forwarded.insert(X_FORWARDED_FOR.clone(), value);
    }
    forwarded.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if peer.tls { "https" } else { "http" }),
    );
    ConnectHeaders {
        forwarded,
        query: request.uri().query().map(str::to_owned),
    }
}

/// Appends `ip` to `out`: an IPv4 address digit by digit (as `Display` writes it, without its
/// formatting machinery, which every connection's X-Forwarded-For went through), IPv6 through
/// `Display`.
fn push_address(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

async fn start_session(
    on_upgrade: hyper::upgrade::OnUpgrade,
    handle: Arc<SessionHandle>,
    context: Arc<ConnectionContext>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let upgraded = tokio::time::timeout(shared.config.handshake_timeout, on_upgrade).await;
    let io = match upgraded {
        Ok(Ok(upgraded)) => Io::from_upgraded(upgraded)
            .map_err(|error| {
                tracing::error!(
                    %error,
                    client_id = %handle.client_id,
                    connection_id = %handle.connection_id,
                    "cannot take over the upgraded connection; the API is told EOF (or the reason of a control DELETE that came first)"
                )
            })
            .ok(),
        Ok(Err(error)) => {
            tracing::debug!(
                %error,
                client_id = %handle.client_id,
                connection_id = %handle.connection_id,
                "upgrade failed; the API is told EOF (or the reason of a control DELETE that came first)"
            );
            None
        }
        Err(_) => {
            tracing::debug!(
                client_id = %handle.client_id,
                connection_id = %handle.connection_id,
                "upgrade not done within --handshake-timeout; the API is told EOF (or the reason of a control DELETE that came first)"
            );
            None
        }
    };
    let Some(io) = io else {
        session::abandoned(handle, context, shared, permit);
        return;
    };
    let socket = ServerBuilder::new()
        .config(
            WsConfig::default()
                .read_buffer_size(WEBSOCKET_READ_BUFFER)
                .release_idle_read_buffer(true),
        )
        .limits(Limits::default().max_payload_len(Some(shared.config.max_message_size)))
        .serve(io);
    session::run(socket, handle, context, shared, permit).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "9.99.199.250",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = String::from("x, ");
            push_address(&mut out, ip);
            assert_eq!(out, format!("x, {ip}"));
        }
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn keys_must_be_sixteen_bytes_of_base64() {
        assert!(valid_key(&HeaderValue::from_static(
            "dGhlIHNhbXBsZSBub25jZQ=="
        )));
        assert!(!valid_key(&HeaderValue::from_static("dGhlIHNhbXBsZQ==")));
        assert!(!valid_key(&HeaderValue::from_static("not base64!")));
    }

    /// Every held websocket is one task holding this future, so its size is memory per idle
    /// connection (with the task's header, 1,280 B in jemalloc's size classes when the socket
    /// was kept twice; see README, "Example: the heap of 5,000 idle websockets").
    #[tokio::test]
    async fn a_session_task_stays_small() {
        let (shared, handle, context, permit) =
            session::one_connection(crate::Config::default()).await;
        let on_upgrade = hyper::upgrade::on(Request::new(()));
        let session = start_session(
            on_upgrade,
            handle,
            Arc::new(context),
            Arc::clone(&shared),
            permit,
        );
        let size = std::mem::size_of_val(&session);
        assert!(size <= 896, "the session future takes {size} bytes");
    }

    #[test]
    fn connection_tokens_are_matched_in_lists() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert!(header_has_token(&headers, CONNECTION, "upgrade"));
        assert!(!header_has_token(&headers, CONNECTION, "close"));
    }
}
