//! The control listener the API talks to: push a message to a client, close a client, look a
//! client up, read metrics. Guarded by an optional bearer token.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::Secret;
use crate::handshake::{health, text_response, RESERVED_NAMES};
use crate::identity::ClientId;
use crate::session::{Command, Outbound, PushError, SessionHandle};
use crate::Shared;

/// Push bodies one control connection may be reading at once, in `--max-message-size`s: an
/// eighth of the gateway's budget ([`crate::config::CONTROL_CONNECTIONS`] of them), so that one
/// API client's HTTP/2 connection with many large bodies in flight cannot take all of it.
pub(crate) const CONNECTION_PUSH_BODIES: usize = 32;

/// The push-body bytes one control connection may be reading at once
/// ([`CONNECTION_PUSH_BODIES`] × `--max-message-size`), one permit a byte.
pub(crate) fn connection_push_share(max_message_size: usize) -> Semaphore {
    Semaphore::new(
        max_message_size
            .saturating_mul(CONNECTION_PUSH_BODIES)
            .min(Semaphore::MAX_PERMITS),
    )
}

/// Answers one request on the control listener; `push_share` is its connection's share of
/// the push-body budget ([`connection_push_share`]).
pub(crate) async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    push_share: Arc<Semaphore>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let head = request.method() == Method::HEAD;
    let response = answer(request, shared, push_share).await;
    Ok(if head {
        without_body(response)
    } else {
        response
    })
}

/// The answer to a `HEAD`: the `GET`'s head with its length, and no body. hyper leaves the
/// body out over HTTP/1.1 but sends it over HTTP/2, where a body after a `HEAD` is a protocol
/// error to the client (RFC 9110, 9.3.2).
fn without_body(response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    let length = hyper::body::Body::size_hint(response.body()).exact();
    let (mut parts, _) = response.into_parts();
    if let Some(length) = length {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}

async fn answer(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    push_share: Arc<Semaphore>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path == "/healthz" {
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            return method_not_allowed("GET, HEAD");
        }
        return health(&shared);
    }
    if !authorized(
        &request,
        shared.config.control_token.as_ref().map(Secret::expose),
    ) {
        let mut response =
            text_response(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    if path == "/metrics" {
        if !matches!(*request.method(), Method::GET | Method::HEAD) {
            return method_not_allowed("GET, HEAD");
        }
        let metrics = shared
            .metrics
            .render(shared.upstream.load(), shared.departures.load());
        let mut response = text_response(StatusCode::OK, metrics);
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        return response;
    }
    if path == "/debug/pprof/heap" {
        if request.method() != Method::GET {
            return method_not_allowed("GET");
        }
        return heap_profile().await;
    }
    // As on the public listener: a reserved name (however it is spelled, `/%64ebug` too) is no
    // ClientId.
    let client_id = match ClientId::from_path(path) {
        Ok(id) if !RESERVED_NAMES.contains(&id.as_str()) => id,
        Ok(_) => return text_response(StatusCode::BAD_REQUEST, "this ClientId is reserved\n"),
        Err(e) => return text_response(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match *request.method() {
        Method::POST => push(request, client_id, &shared, &push_share).await,
        Method::DELETE => disconnect(&request, &client_id, &shared),
        Method::GET => info(&client_id, &shared),
        _ => method_not_allowed("GET, POST, DELETE"),
    }
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// Whether the request carries `Authorization: Bearer <token>`, compared in constant time.
fn authorized<B>(request: &Request<B>, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let Some(given) = request.headers().get(AUTHORIZATION) else {
        return false;
    };
    // The scheme is case-insensitive (RFC 9110, 11.1); the token is not.
    let given = given.as_bytes();
    let Some((scheme, given)) = given.split_at_checked(7) else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case(b"Bearer ") {
        return false;
    }
    constant_time_eq(given, token.as_bytes())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// More push bodies are being read at once than the gateway, or this control connection's
/// share of it, has memory set aside for.
#[derive(Debug)]
enum PushBodiesFull {
    /// The whole gateway's budget.
    Gateway,
    /// This connection's share.
    Connection,
}

impl std::fmt::Display for PushBodiesFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushBodiesFull::Gateway => {
                "push bodies being read take all the memory set aside for them"
            }
            PushBodiesFull::Connection => {
                "this connection's push bodies being read take all of its share of the memory set aside for them"
            }
        })
    }
}

impl std::error::Error for PushBodiesFull {}

/// A push's body, each of its bytes taken from the gateway's budget for push bodies being
/// read (`Shared::push_bodies`) and from its connection's share of it as it arrives, and given
/// back once the body is dropped. HTTP/2 hands a stream's data over as it comes, so without it
/// the streams of one control connection could hold `--max-message-size` each. It reads
/// through the size limit, so that a body over `--max-message-size` is told 413, never 503.
struct BudgetedBody<'a, B> {
    inner: B,
    budget: &'a Semaphore,
    share: &'a Semaphore,
    held: Option<(SemaphorePermit<'a>, SemaphorePermit<'a>)>,
}

impl<B> hyper::body::Body for BudgetedBody<'_, B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
            None => return Poll::Ready(None),
        };
        if let Some(data) = frame.data_ref() {
            let Ok(n) = u32::try_from(data.len()) else {
                return Poll::Ready(Some(Err(Box::new(PushBodiesFull::Connection))));
            };
            let Ok(from_share) = this.share.try_acquire_many(n) else {
                return Poll::Ready(Some(Err(Box::new(PushBodiesFull::Connection))));
            };
            let Ok(from_budget) = this.budget.try_acquire_many(n) else {
                return Poll::Ready(Some(Err(Box::new(PushBodiesFull::Gateway))));
            };
            match &mut this.held {
                Some((share, budget)) => {
                    share.merge(from_share);
                    budget.merge(from_budget);
                }
                None => this.held = Some((from_share, from_budget)),
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn push(
    request: Request<Incoming>,
    client_id: ClientId,
    shared: &Shared,
    push_share: &Semaphore,
) -> Response<Full<Bytes>> {
    let binary = crate::upstream::is_octet_stream(request.headers());
    let refused = || {
        shared
            .metrics
            .pushes_refused
            .fetch_add(1, Ordering::Relaxed);
    };
    let max = shared.config.max_message_size;
    let too_large = || {
        text_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("message larger than --max-message-size ({max} bytes)\n"),
        )
    };
    // The body is held to the same deadline as the head (--handshake-timeout): a client that
    // stops halfway would otherwise hold one of the control connections for good.
    let limit = shared.config.handshake_timeout;
    // A body announced larger than the limit is told so before any of it is read (and before
    // the budget could answer 503 to a push that can never fit).
    if hyper::body::Body::size_hint(request.body()).lower() > max as u64 {
        refused();
        return too_large();
    }
    let body = BudgetedBody {
        inner: Limited::new(request.into_body(), max),
        budget: &shared.push_bodies,
        share: push_share,
        held: None,
    };
    let collect = body.collect();
    let Ok(collected) = tokio::time::timeout(limit, collect).await else {
        refused();
        return text_response(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within --handshake-timeout ({limit:?})\n"),
        );
    };
    let body = match collected {
        Ok(body) => body.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            refused();
            return too_large();
        }
        Err(e) if e.is::<PushBodiesFull>() => {
            refused();
            tracing::debug!(%client_id, "push refused: {e}; API told 503");
            return come_back_later(format!("{e}\n"));
        }
        Err(_) => {
            refused();
            return text_response(StatusCode::BAD_REQUEST, "could not read the body\n");
        }
    };
    if !binary && std::str::from_utf8(&body).is_err() {
        refused();
        return text_response(
            StatusCode::BAD_REQUEST,
            "a text push must be UTF-8; send binary as application/octet-stream\n",
        );
    }
    let Some(session) = shared.registry.get(&client_id) else {
        refused();
        return text_response(StatusCode::NOT_FOUND, "client not connected\n");
    };
    let message = Outbound {
        payload: body,
        binary,
    };
    let config = &shared.config;
    let accepted = &shared.metrics.pushes_accepted;
    let push_to = |session: &SessionHandle, message| {
        session.push(
            message,
            config.max_queued_messages,
            config.max_queued_bytes,
            accepted,
        )
    };
    let mut pushed = push_to(&session, message.clone());
    if pushed == Err(PushError::Closed) {
        // A newer connection may have taken the ClientId since the lookup, as the older one
        // began to close: the push is for it.
        if let Some(newer) = shared.registry.get(&client_id) {
            if newer.connection_id != session.connection_id {
                pushed = push_to(&newer, message);
            }
        }
    }
    match pushed {
        Ok(()) => text_response(StatusCode::OK, "ok"),
        Err(PushError::QueueFull) => {
            refused();
            tracing::debug!(%client_id, "push refused: outbound queue full; API told 503");
            come_back_later("the client's outbound queue is full\n")
        }
        Err(PushError::Closed) => {
            refused();
            text_response(StatusCode::NOT_FOUND, "client is disconnecting\n")
        }
    }
}

/// `503` with `Retry-After: 1`: a push refused for now, worth sending again shortly.
fn come_back_later(message: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = text_response(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn query_param(query: &str, name: &str) -> Option<Result<String, ()>> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| {
            let value = value.replace('+', " ");
            crate::identity::percent_decode(value.as_bytes())
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok())
                .ok_or(())
        })
    })
}

fn disconnect<B>(
    request: &Request<B>,
    client_id: &ClientId,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    let query = request.uri().query().unwrap_or("");
    let code = match query_param(query, "code") {
        // `code=` filled in with nothing, as from a `?code=&reason=` template: the default.
        None => 1000,
        Some(Ok(text)) if text.is_empty() => 1000,
        Some(Ok(text)) => match text.parse::<u16>() {
            Ok(code @ (1000 | 1001 | 1008 | 1011 | 1012 | 1013 | 3000..=4999)) => code,
            _ => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    "code must be 1000, 1001, 1008, 1011, 1012, 1013 or 3000-4999\n",
                )
            }
        },
        Some(Err(())) => return text_response(StatusCode::BAD_REQUEST, "malformed code\n"),
    };
    let reason = match query_param(query, "reason") {
        None => String::new(),
        Some(Ok(reason)) if reason.len() <= 123 => reason,
        Some(Ok(_)) => {
            return text_response(StatusCode::BAD_REQUEST, "reason is longer than 123 bytes\n")
        }
        Some(Err(())) => {
            return text_response(
                StatusCode::BAD_REQUEST,
                "reason is not valid percent-encoded UTF-8\n",
            )
        }
    };
    match shared.registry.get(client_id) {
        Some(session) => close_connection(shared, session, code, reason),
        None => text_response(StatusCode::NOT_FOUND, "client not connected\n"),
    }
}

/// Closes `session`, the connection found for a control DELETE, with `code` and `reason`; if
/// it is closing already because a newer connection of its ClientId has replaced it since it
/// was found, the newer one is closed instead (the DELETE is for the ClientId, as a push is).
fn close_connection(
    shared: &Shared,
    session: Arc<SessionHandle>,
    code: u16,
    reason: String,
) -> Response<Full<Bytes>> {
    let close = |session: &SessionHandle, reason| session.command(Command::Close { code, reason });
    if close(&session, reason.clone()) {
        return text_response(StatusCode::OK, "ok");
    }
    match shared.registry.get(&session.client_id) {
        Some(newer) if newer.connection_id != session.connection_id && close(&newer, reason) => {
            text_response(StatusCode::OK, "ok")
        }
        // Already closing (replaced, shutting down, or closed by an earlier DELETE): its
        // close code and DELETE reason are already decided, and are not these.
        _ => text_response(StatusCode::NOT_FOUND, "client is disconnecting\n"),
    }
}

fn info(client_id: &ClientId, shared: &Shared) -> Response<Full<Bytes>> {
    let Some(session) = shared.registry.get(client_id) else {
        return text_response(StatusCode::NOT_FOUND, "client not connected\n");
    };
    let info = session.info();
    let mut json = String::with_capacity(256);
    json.push_str("{\"client_id\":");
    json_string(&mut json, session.client_id.as_str());
    let _ = write!(
        json,
        ",\"connection_id\":\"{}\",\"remote_addr\":\"{}\",\"connected_at\":\"{}\",\
         \"messages_in\":{},\"messages_out\":{},\"queued\":{},\"queued_bytes\":{}}}",
        session.connection_id,
        session.remote,
        rfc3339(session.connected_at),
        info.messages_in,
        info.messages_out,
        info.queued,
        info.queued_bytes
    );
    let mut response = text_response(StatusCode::OK, json);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

async fn heap_profile() -> Response<Full<Bytes>> {
    match crate::profile::heap_profile().await {
        Ok(profile) => {
            let mut response = Response::new(Full::new(Bytes::from(profile)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        Err(error @ crate::profile::ProfileError::HeapUnavailable(_)) => {
            text_response(StatusCode::NOT_FOUND, format!("{error}\n"))
        }
        Err(error @ crate::profile::ProfileError::HeapBusy) => {
            come_back_later(format!("{error}\n"))
        }
        Err(error) => {
            tracing::error!(%error, "heap profile failed; told 500");
            text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"))
        }
    }
}

/// Appends `text` as a JSON string literal.
fn json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Formats a time as `2026-11-23T08:09:15.123Z`.
fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_delete_that_found_a_connection_replaced_since_closes_the_newer_one() {
        let gateway = crate::Gateway::bind_on_free_ports(crate::Config::default()).await;
        let shared = &gateway.shared;
        let client_id = ClientId::from_path("/amy").unwrap();
        let connection = |n: u16| {
            Arc::new(SessionHandle::new(
                crate::identity::ConnectionId::next(),
                client_id.clone(),
                ([127, 0, 0, 1], n).into(),
            ))
        };
        let (older, newer) = (connection(1), connection(2));
        shared.registry.insert(Arc::clone(&older));
        // The DELETE found `older`; then `newer` opened and replaced it (and told it so).
        shared.registry.insert(Arc::clone(&newer));
        let response = close_connection(shared, older, 4001, "bye".to_owned());
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            !newer.command(Command::Shutdown),
            "the newer connection has a close command already"
        );
        // With no newer connection, a connection already closing is told so.
        let response = close_connection(shared, newer, 4001, "bye".to_owned());
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn bearer_token_is_required_when_configured() {
        let with = |value: &'static str| {
            Request::builder()
                .header(AUTHORIZATION, value)
                .body(())
                .unwrap()
        };
        assert!(authorized(&with("Bearer s3cret"), Some("s3cret")));
        assert!(!authorized(&with("Bearer nope"), Some("s3cret")));
        assert!(authorized(&with("bearer s3cret"), Some("s3cret")));
        assert!(!authorized(&with("Bearer S3CRET"), Some("s3cret")));
        assert!(!authorized(&with("Bearers3cret"), Some("s3cret")));
        assert!(!authorized(&with("s3cret"), Some("s3cret")));
        assert!(!authorized(&Request::new(()), Some("s3cret")));
        assert!(authorized(&Request::new(()), None));
    }

    #[test]
    fn times_format_as_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_421_355_123);
        assert_eq!(rfc3339(t), "2026-11-23T08:09:15.123Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn json_strings_escape_quotes_and_controls() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\u{1}");
        assert_eq!(out, "\"a\\\"b\\\\c\\u0001\"");
    }

    #[test]
    fn query_params_are_percent_decoded() {
        assert_eq!(
            query_param("code=4001&reason=bye%20now", "reason"),
            Some(Ok("bye now".to_owned()))
        );
        assert_eq!(query_param("code=4001", "reason"), None);
        assert_eq!(query_param("reason=%ZZ", "reason"), Some(Err(())));
    }
}
