//! Keep-alive connections to the API, at most `max_open` of them (counted until their socket
//! is closed; one let go of is closed within [`CLOSE_GRACE`]): a request takes an idle
//! connection, or opens one (a few at a time, so a connect storm does not open a connection per
//! waiting request), or waits for one to come back; a request that waited (for a connection,
//! or for an API slot before) fails with an attempt to open one that failed meanwhile (the API
//! host unreachable) instead of trying again past its deadline. HTTP/2 (`--upstream-http2`) shares one multiplexed connection instead, whose
//! streams requests take as the API allows (its SETTINGS_MAX_CONCURRENT_STREAMS): the others
//! wait here, known unsent when that connection ends. One that the API sent away (a GOAWAY)
//! while requests were on it stays open for them beside the next: it counts among the
//! `max_open` until its socket is closed, and it is closed within [`CLOSE_GRACE`] once no
//! request is left on it. Connections go over TCP (or TLS) to the API's host, or to a Unix
//! socket on this machine (`--api-unix-socket`).

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST};
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use tower_service::Service;

use super::{error_chain, ApiConnector, Progress, UpstreamError};

/// Connections being opened at once; further requests wait for one of them or an idle one.
const MAX_CONNECTING: usize = 32;
/// How often a request waiting for a stream of an HTTP/2 connection looks at the API's limit
/// again, in case it was raised.
const STREAM_RECHECK: Duration = Duration::from_millis(50);
/// The pause before an HTTP/2 request the API turned away unprocessed (see
/// [`Pool::exchange_h2`]) goes out for the third time; each later time it doubles, up to
/// [`H2_RETRY_PAUSE_MAX`]. (The second time it goes out at once.)
const H2_RETRY_PAUSE_FIRST: Duration = Duration::from_millis(10);
/// The longest pause between two times an HTTP/2 request the API keeps turning away goes out.
const H2_RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);
/// HTTP/2 connections that ended without a byte from the API (not even its SETTINGS) while
/// they had a request, after which that request fails as unreachable instead of trying
/// another: something at the API's address takes connections and drops them, and will not
/// answer before the request's time runs out.
const H2_SILENT_CONNECTIONS: u32 = 3;
/// How often an HTTP/2 connection to the API is pinged (idle or not).
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before that connection is closed.
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections kept warm for the full idle timeout: the most recently used ones.
const WARM_IDLE: usize = 32;
/// How long idle connections beyond the warm ones are kept: a burst's surplus (say the
/// thousand connections a connect storm opened) is closed soon after the burst, giving back
/// its descriptors and buffers, while steady traffic keeps reusing the warm ones. At 1 s,
/// 15,000 clients sending once a second each had their p99 latency rise from 7-10 ms to
/// 12-50 ms: connections needed by every other burst were closed and opened again.
const SURPLUS_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often idle connections are checked for expiry.
const REAP_PERIOD: Duration = Duration::from_millis(500);
/// How long the body of an answer judged by its status alone (a DELETE's, a connect GET's
/// 5xx) may take to come once its head is in, within the request's own time: then the answer
/// stands with what came, and its connection, left with the rest unread, is closed. Long
/// enough for a body that is on its way from a distant API (64 KiB takes a few round trips
/// of TCP slow start), short enough that a body which stopped coming holds the API slot, and
/// a refused client's `502`, only a moment.
const STATUS_ONLY_BODY_WAIT: Duration = Duration::from_secs(1);
/// How long before the idle timeout an API announced (`Keep-Alive: timeout=N`, as Node and
/// Apache send, N = 5 by default) a connection stops being reused, and is closed: the API
/// counts from when it wrote its answer, the gateway from when it read it, and a request
/// needs a moment to arrive; servers check their keep-alive timers coarsely (whole seconds,
/// some of them). A request that meets the API's close on the way would go out and be reset.
/// Of a timeout of 2 s or less, at most half is given up: a connection idle for less than
/// that is reused still.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_secs(1);
/// How long the task of an HTTP/1.1 connection the pool let go of (closed idle, broken, or
/// given up under a request whose time ran out) may take to close it (and an HTTP/2 connection
/// that takes no more requests, once none is left on it: see [`drive_h2`]): hyper's close first
/// flushes whatever of a request it still holds, then shuts the stream down (over TLS, a
/// close_notify), all of which waits on the API reading. An API that completed the handshake
/// and then stopped reading (a hung worker: its kernel keeps the socket open) would hold that
/// socket forever, one more for each request given up on it. Past this the task is dropped, and
/// the socket closed with it (the kernel sends on what it holds, on its own). A close that goes
/// through takes a write of a few bytes into a socket with room; a second is far beyond that,
/// and short enough that an API which stops reading holds a place of the pool (it counts until
/// its socket is closed) only a moment beyond the request it failed.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long a connection whose answer was read in full, but which hyper cannot yet take
/// another request on, is waited for before it is let go of (see [`Lease::checkin`]): a healthy
/// one is ready within microseconds (its task, on another worker thread or preempted, had not
/// yet come back to wait for the next request); one still writing a request's body the API
/// stopped reading never is.
const READY_AT_CHECKIN: Duration = Duration::from_millis(100);
/// The header in which an API says how long it keeps an idle connection.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// How long an HTTP/1.1 connection must have lain idle for a request on it to be sent once
/// more, on a new connection, when the connection is lost under it (closed, or reset) before
/// any byte of an answer came: the API may have closed it for idleness just as the request
/// came, and never read it (browsers assume so of any reused connection). 1 s is below the
/// shortest idle timeouts in use (gunicorn's 2 s; Node's, uvicorn's and Apache's 5 s) and far
/// above the gaps between the requests of a busy connection, which therefore copy nothing; a
/// connection that breaks under a request soon after its last answer more likely lost an API
/// that had begun on it, and that request is not sent again.
const IDLE_BEFORE_RESEND: Duration = Duration::from_secs(1);
/// How soon after a request went out on such a connection its loss must come for it to be
/// sent again: an API that closed the connection for idleness as the request came answers it
/// with a reset (or its close) within a round trip; one that read the request, worked on it
/// and then dropped the connection (a crash, a killed worker) may have acted, and its request
/// is not sent again. 200 ms is many round trips inside a data centre; a loss noticed later
/// than that, on a machine too busy to notice sooner, is not resent (the safe side).
const RESEND_WINDOW: Duration = Duration::from_millis(200);

type Body = Full<Bytes>;

/// How a new API connection is opened: where to, and how long it may take.
#[derive(Clone)]
pub(super) struct Dialer {
    /// Where the API listens.
    pub(super) address: ApiAddress,
    /// Opening a connection (name lookup, connect and TLS handshake together) that takes
    /// longer fails.
    pub(super) timeout: Duration,
}

/// Where the API listens.
#[derive(Clone)]
pub(super) enum ApiAddress {
    /// TCP to the origin's host and port, with TLS for `https://`.
    Network(ApiConnector),
    /// A Unix stream socket at this path (plain HTTP).
    UnixSocket(Arc<PathBuf>),
}

/// The pooled connections to one API origin.
pub(super) struct Pool {
    /// Itself, for the connections it counts (see [`Link`]).
    this: Weak<Pool>,
    dialer: Dialer,
    origin: Uri,
    scheme: Scheme,
    host: HeaderValue,
    http2: bool,
    max_open: usize,
    idle_timeout: Duration,
    state: Mutex<State>,
    changed: Notify,
    /// An attempt to open a connection ended: what a retry that wants a new connection waits
    /// for while [`MAX_CONNECTING`] attempts are under way (see [`Pool::checkout`]).
    attempt_ended: Notify,
}

#[derive(Default)]
struct State {
    idle: Vec<Idle>,
    /// Connections being opened, open, or closing: each counts from the moment a request sets
    /// out to open it until its socket is closed (the request holds its place while it opens
    /// it, then its [`Place`]), not only while the pool uses it, so that the sockets of
    /// connections given up but not yet closed (HTTP/1.1), or sent away by the API and still
    /// finishing their requests (HTTP/2), are no more than `max_open` less the others.
    open: usize,
    connecting: usize,
    shared: Option<SharedH2>,
    /// HTTP/2 connections opened so far, to number them.
    h2_opened: u64,
    /// Attempts to open a connection that failed so far: a waiting request notes the count
    /// when it begins to wait, to learn later whether one failed meanwhile.
    open_failures: u64,
    /// Why the latest attempt to open a connection failed, while no attempt has succeeded
    /// since (each is an [`UpstreamError::Unreachable`]; this is its text).
    last_open_failure: Option<String>,
}

impl State {
    /// Notes how an attempt to open a connection ended.
    fn attempt_ended<T>(&mut self, outcome: &Result<T, UpstreamError>) {
        match outcome {
            Ok(_) => self.last_open_failure = None,
            Err(error) => {
                self.open_failures += 1;
                self.last_open_failure = Some(match error {
                    UpstreamError::Unreachable(why) => why.clone(),
                    other => other.to_string(),
                });
            }
        }
    }

    /// The error for a request that began to wait (for an API slot or a connection) when
    /// `failures_at_wait` attempts had failed (`None`: it has not waited): the latest
    /// attempt's failure, if that attempt ended since, and failed, and no established
    /// connection is open that could come back for it (`http2`: none can, as the HTTP/2
    /// connections open beside the one being opened take no more requests). Such a request
    /// would otherwise start an attempt of its own only now, and run out of time in it: with an
    /// API host that never answers, the deadline of a request that waited half of it comes in
    /// the middle of its attempt.
    fn failed_while_waiting(
        &self,
        failures_at_wait: Option<u64>,
        http2: bool,
    ) -> Option<UpstreamError> {
        if failures_at_wait? == self.open_failures {
            return None;
        }
        // An established HTTP/1.1 connection, busy now, may come back for it: it was waiting
        // for a place, not only for the attempt that failed. (So may the place of one closing,
        // within CLOSE_GRACE.)
        if !http2 && self.open > self.connecting {
            return None;
        }
        let why = self.last_open_failure.as_ref()?;
        Some(UpstreamError::Unreachable(format!(
            "the connection attempt this request waited for failed: {why}"
        )))
    }
}

/// How many attempts to open a connection had failed when a request began to wait for an API
/// slot: if one fails while it waits, it fails with it (see [`State::failed_while_waiting`]),
/// as a request that waited for a connection does, instead of starting an attempt of its own
/// only once a slot comes free.
#[derive(Clone, Copy, Debug)]
pub(super) struct FailedAttempts(u64);

/// The HTTP/2 connection requests share, its streams, and its number (in the order opened).
#[derive(Clone)]
struct SharedH2 {
    sender: http2::SendRequest<Body>,
    streams: Arc<Streams>,
    number: u64,
}

/// The streams requests hold on one HTTP/2 connection, at most as many as the API allows at
/// once (its SETTINGS_MAX_CONCURRENT_STREAMS, as h2 knows it: 100 until the API's SETTINGS
/// come). A request beyond them waits here, in the order it came (a stream given back goes to
/// the request waiting longest, never to a newcomer), not inside hyper: when the connection
/// ends, hyper fails a request it holds waiting for a stream without giving it back or saying
/// whether h2 had just sent it, while one waiting here is known unsent and goes on another
/// connection.
/// (Nearly always: a stream that ended by a reset, an answer left unread or a request given
/// up, counts in h2 until the reset is written; an API may lower its limit at any time; and on
/// a new connection, until the API's SETTINGS come, the limit read is hyper's 100: a request
/// handed to hyper meanwhile may still wait there for a moment.)
struct Streams {
    /// The streams free now: the limit `followed` less those held. A fair semaphore: a
    /// stream given back goes to the request waiting longest. Closed when the connection ends.
    free: Semaphore,
    /// The streams `free` follows, and those held.
    counts: Mutex<StreamCounts>,
    /// The API's limit as the connection's task last saw it (0 once the connection ended).
    limit: AtomicUsize,
    /// Set once a byte came from the API on the connection (see [`Listened`]).
    heard: Arc<AtomicBool>,
    /// Woken when the last stream held is given back after the connection ended (see
    /// [`Streams::all_given_back`]).
    given_back: Notify,
}

/// What [`Streams`] counts, under one lock.
struct StreamCounts {
    /// The API's limit as `free` follows it (see [`Streams::follow_limit`]): streams held and
    /// free, and those held beyond a limit the API lowered, which are not freed when given
    /// back.
    followed: usize,
    /// The streams held now: one for each [`Stream`] not yet dropped. Counted apart from
    /// `followed`, which can go on counting a stream no request holds (a stream given back
    /// to a waiter that went away before it took it, a limit a request followed just after
    /// the connection ended); what [`Streams::all_given_back`] waits for.
    held: usize,
}

/// One stream of an HTTP/2 connection, held by one request; given back when dropped.
struct Stream(Arc<Streams>);

impl Stream {
    /// A stream of `streams` for the request that took its permit (forgotten: a `Stream`
    /// gives it back when dropped).
    fn taken(streams: &Arc<Streams>) -> Stream {
        lock(&streams.counts).held += 1;
        Stream(streams.clone())
    }
}

impl Streams {
    /// Streams limited to `limit` (until [`Streams::limit`] says another), none taken yet, of
    /// a connection whose bytes from the API set `heard`.
    fn new(limit: usize, heard: Arc<AtomicBool>) -> Streams {
        Streams {
            free: Semaphore::new(0),
            counts: Mutex::new(StreamCounts {
                followed: 0,
                held: 0,
            }),
            limit: AtomicUsize::new(limit),
            heard,
            given_back: Notify::new(),
        }
    }

    /// Waits until no request holds a stream of this connection, which ended (takes no more
    /// requests: its limit is 0 and `free` closed). Each request gives its stream back when it
    /// ends, at its deadline at the latest.
    async fn all_given_back(&self) {
        loop {
            let given_back = self.given_back.notified();
            tokio::pin!(given_back);
            given_back.as_mut().enable();
            if lock(&self.counts).held == 0 {
                return;
            }
            given_back.await;
        }
    }

    /// Whether the connection ended (or is ending) without a byte from the API.
    fn never_heard(&self) -> bool {
        !self.heard.load(Ordering::Relaxed)
    }

    /// A stream of `sender`'s connection for one request, once the API allows one more and
    /// the requests that waited longer have theirs; `None` if the connection ended first (the
    /// request was not given to it).
    async fn take(self: &Arc<Self>, sender: &http2::SendRequest<Body>) -> Option<Stream> {
        if sender.is_closed() {
            return None;
        }
        self.follow_limit();
        // A stream free now is one no request waits for (a stream given back goes to the
        // longest waiting first): taken without the wait's timer.
        if let Ok(permit) = self.free.try_acquire() {
            permit.forget();
            return Some(Stream::taken(self));
        }
        // Kept across the looks below: its place in the queue stays.
        let acquire = self.free.acquire();
        tokio::pin!(acquire);
        loop {
            match tokio::time::timeout(STREAM_RECHECK, acquire.as_mut()).await {
                Ok(Ok(permit)) => {
                    // Given back by the stream's drop, not by the permit's.
                    permit.forget();
                    return Some(Stream::taken(self));
                }
                Ok(Err(_)) => return None,
                // A limit the API raised frees no stream and wakes no one: look again now and
                // then.
                Err(_) if sender.is_closed() => return None,
                Err(_) => self.follow_limit(),
            }
        }
    }

    /// Adds streams to `free` for a limit the API raised, or takes the free ones away for a
    /// limit it lowered (those held beyond it are not freed when given back: [`Stream`]'s
    /// drop).
    fn follow_limit(&self) {
        let mut counts = lock(&self.counts);
        let followed = &mut counts.followed;
        // Read under the lock: a limit read before the connection ended is not followed after
        // it (once its task stored 0 and looked under this lock).
        let limit = self
            .limit
            .load(Ordering::Relaxed)
            .min(Semaphore::MAX_PERMITS);
        if limit > *followed {
            self.free.add_permits(limit - *followed);
            *followed = limit;
        } else if limit < *followed {
            *followed -= self.free.forget_permits(*followed - limit);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let streams = &self.0;
        let mut counts = lock(&streams.counts);
        // Read under the lock: once the connection ended and `all_given_back` looked (under
        // it), the limit read here is 0, and the last stream given back wakes it.
        let limit = streams.limit.load(Ordering::Relaxed);
        counts.held -= 1;
        if counts.held == 0 && limit == 0 {
            streams.given_back.notify_one();
        }
        if counts.followed > limit {
            // Held beyond a limit the API lowered (or by a request on a connection that
            // ended): given up, not freed.
            counts.followed -= 1;
        } else {
            // To the request waiting longest, if any.
            streams.free.add_permits(1);
        }
    }
}

/// Locks `mutex`, also when a panic poisoned it (its data stays consistent: every change
/// under these locks is a single step).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// An HTTP/1.1 connection to the API. Dropping it lets the connection go: its task closes it
/// within [`CLOSE_GRACE`], or is dropped.
struct H1 {
    /// What requests are sent through.
    sender: http1::SendRequest<Body>,
    /// What it shares with its task.
    link: Arc<Link>,
}

impl Drop for H1 {
    fn drop(&mut self) {
        self.link.released.store(true, Ordering::Release);
        self.link.task.wake();
    }
}

/// What an HTTP/1.1 connection's holder ([`H1`]) and the task that drives it share. It goes
/// when both are gone: the holder let go of the connection, and its task ended (closing its
/// socket); then the connection's place in its pool's count is given back.
struct Link {
    /// Set whenever bytes come from the API (see [`Listened`]); cleared when the connection
    /// is taken after lying idle for [`IDLE_BEFORE_RESEND`], to tell whether any byte of the
    /// answer came before the connection was lost.
    heard: AtomicBool,
    /// Set when the holder lets go of the connection: its task has [`CLOSE_GRACE`] left.
    released: AtomicBool,
    /// The connection's task, woken when `released` is set.
    task: AtomicWaker,
    /// Its place in the pool's count, given back when this goes.
    place: Place,
}

impl Link {
    fn new() -> Arc<Link> {
        Arc::new(Link {
            heard: AtomicBool::new(false),
            released: AtomicBool::new(false),
            task: AtomicWaker::new(),
            place: Place::default(),
        })
    }
}

/// A connection's place in its pool's count of open connections ([`State::open`]), once the
/// pool took it over from the request that opened the connection ([`Pool::adopt`]); given back
/// when this is dropped, which is when the connection's socket is closed: it goes with an
/// HTTP/1.1 connection's [`Link`], and with an HTTP/2 connection's stream ([`H2Socket`]).
#[derive(Default)]
struct Place {
    /// The pool whose count holds it, once adopted.
    pool: OnceLock<Weak<Pool>>,
    /// The request that closed this (idle) connection to open another in its place, and waits
    /// for it (see [`Inheritance`]).
    heir: OnceLock<oneshot::Sender<()>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        // Passed on to the request waiting for it, if it still waits: the count stays.
        if let Some(heir) = self.heir.take() {
            if heir.send(()).is_ok() {
                return;
            }
        }
        // Else given back. Never dropped under the pool's lock: an idle connection the pool
        // lets go of is dropped once the lock is released (its task may have ended already),
        // and so is the place an opening request held of an HTTP/2 connection.
        if let Some(pool) = self.pool.get().and_then(Weak::upgrade) {
            pool.state().open -= 1;
            pool.changed.notify_one();
        }
    }
}

/// An open connection no request holds.
struct Idle {
    connection: H1,
    /// When it went idle.
    since: Instant,
    /// How long it may be kept idle and reused: the pool's idle timeout, or less when the API
    /// said it closes idle connections sooner (see [`reusable_for`]).
    keep_for: Duration,
}

enum Next {
    Reuse(Idle),
    /// An idle connection closed, or idle too long: let go of (once the lock is released, see
    /// [`Place`]'s drop), and the request looks again.
    Discard(Idle),
    /// Open a new connection: in a place of its own (counted already), or in that of an idle
    /// connection being closed to make room, once its socket is closed (see [`Inheritance`]).
    Connect(Option<oneshot::Receiver<()>>),
    Wait,
    /// The attempt the request waited for failed: it fails the same way.
    Fail(UpstreamError),
}

/// What a request for the shared HTTP/2 connection does next.
enum NextH2 {
    Use(SharedH2),
    Connect,
    Wait,
    /// The attempt the request waited for failed: it fails the same way.
    Fail(UpstreamError),
}

impl Pool {
    /// A pool for `origin` (scheme and authority of the API).
    pub(super) fn new(
        dialer: Dialer,
        origin: &Uri,
        http2: bool,
        max_open: usize,
        idle_timeout: Duration,
    ) -> Result<Arc<Pool>, String> {
        let authority = origin
            .authority()
            .ok_or_else(|| format!("{origin} has no host"))?
            .clone();
        let scheme = origin.scheme().cloned().unwrap_or(Scheme::HTTP);
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(|e| e.to_string())?;
        let pool = Arc::new_cyclic(|this| Pool {
            this: this.clone(),
            dialer,
            origin,
            scheme,
            host,
            http2,
            max_open: max_open.max(1),
            idle_timeout,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            attempt_ended: Notify::new(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(close_expired(Arc::downgrade(&pool)));
        }
        Ok(pool)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Puts `connection`, ready for another request, on the idle list, to be reused while it
    /// has been idle (since `since`) for less than `keep_for`, and wakes a request waiting for
    /// one.
    fn put_idle(&self, connection: H1, since: Instant, keep_for: Duration) {
        self.state().idle.push(Idle {
            connection,
            since,
            keep_for,
        });
        self.changed.notify_one();
    }

    /// Takes a new connection's place in the count of open connections over from the request
    /// that opened it: from now on the connection's [`Place`] gives it back, once its socket is
    /// closed (an HTTP/1.1 connection's when both the connection and its task are gone; a
    /// [`Lease`] that holds it frees nothing).
    fn adopt(&self, place: &Place) {
        let adopted = place.pool.set(self.this.clone());
        debug_assert!(adopted.is_ok(), "adopted twice");
    }

    /// Connections open now (idle, busy, being opened, waiting to be checked in, let go of and
    /// not yet closed; over HTTP/2, the shared one and those still finishing requests after the
    /// API sent them away): the sockets the pool holds to the API.
    pub(super) fn open(&self) -> usize {
        self.state().open
    }

    /// Attempts to open a connection that failed so far, for a request that begins to wait
    /// for an API slot.
    pub(super) fn failed_attempts(&self) -> FailedAttempts {
        FailedAttempts(self.state().open_failures)
    }

    /// Sends `request` and reads its answer, as much of its body as `body_limit` says (of a
    /// body judged by its status alone, what comes within [`STATUS_ONLY_BODY_WAIT`] and the
    /// request's time); `waited` tells whether it waited for an API slot, and since when.
    pub(super) async fn exchange(
        &self,
        mut request: Request<Body>,
        body_limit: BodyLimit,
        progress: &mut Progress<'_>,
        mut waited: Option<FailedAttempts>,
    ) -> Result<Answer, UpstreamError> {
        if self.http2 {
            // Out of line: a rare path's state would otherwise be part of every HTTP/1
            // request's future (see the sizes test), and its temporaries part of the stack
            // frame every HTTP/1 request's `poll` touches (32 KiB; bench/README.md,
            // "Shallow worker stacks").
            return out_of_line(self.exchange_h2(request, body_limit, progress, waited)).await;
        }
        let path = request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *request.uri_mut() = Uri::from(path);
        request
            .headers_mut()
            .entry(HOST)
            .or_insert_with(|| self.host.clone());
        let mut retried = false;
        // Whether the request went out once already, on an idle connection lost under it.
        let mut went_out_once = false;
        loop {
            // A retry skips the idle connections: the API may have closed them all at once,
            // and the next one could be stale too.
            let mut lease = match self.checkout(waited.take(), retried).await {
                Ok(lease) => lease,
                // Its first copy went out (on an idle connection lost under it): however
                // unlikely, the API may have seen it, so this is no "never sent".
                Err(error) if went_out_once => return Err(lost_after_going_out_once(error)),
                Err(error) => return Err(error),
            };
            let Some(connection) = lease.connection.as_mut() else {
                return Err(UpstreamError::Broken("no connection".to_owned()));
            };
            // A connection that lay idle may have been closed by the API just as this request
            // takes it: a copy (the body's `Bytes` shared) to send once more if it was. Only
            // then: a busy connection's requests copy nothing.
            // With it, when it went out (in the box: not part of every request's future).
            let spare = (lease.idled && !retried)
                .then(|| Box::new((copy_request(&request), Instant::now())));
            progress.sent();
            match connection.sender.try_send_request(request).await {
                Ok(response) => {
                    let reusable =
                        reusable_for(response.version(), response.headers(), self.idle_timeout);
                    let answer = collect(response, body_limit, progress.deadline()).await?;
                    // A connection whose answer was left partly unread (over its limit, or
                    // stalled) takes no other request (hyper closes it): dropping the lease
                    // frees its slot.
                    if let (Some(keep_for), BodyEnd::Whole) = (reusable, answer.end) {
                        lease.checkin(keep_for);
                    }
                    return Ok(answer);
                }
                Err(mut error) => match error.take_message() {
                    // A kept-alive connection the API had closed: the request was never
                    // sent, so it is safe to send it once more on a fresh connection.
                    Some(unsent) if lease.reused && !retried => {
                        request = unsent;
                        retried = true;
                        progress.unsent();
                    }
                    // Handed back all the same (a fresh connection the API closed at once, or
                    // a second stale one): this copy never went out. If its first one did (on
                    // an idle connection lost under it), the API may have seen that, as when
                    // no connection could be had for the second (above).
                    Some(_) if went_out_once => {
                        return Err(lost_after_going_out_once(error_chain(error.error())))
                    }
                    // Otherwise it never went out, so the API cannot have acted on it, and a
                    // DELETE may be tried again.
                    Some(_) => return Err(never_sent(progress, error.error())),
                    // Sent on a connection that had lain idle, and lost with it within a
                    // round trip or so, before any byte of an answer came: the API closed it
                    // for idleness as the request came, and did not read it. Once more, on a
                    // fresh connection (its one retry, as above).
                    None => match spare {
                        Some(spare)
                            if spare.1.elapsed() <= RESEND_WINDOW
                                && lease.lost_unanswered(error.error()) =>
                        {
                            request = spare.0;
                            retried = true;
                            // Still counted as gone out (not `unsent`): its time running out
                            // now is a timeout, not an overload, and a connect is undone.
                            went_out_once = true;
                        }
                        _ => return Err(UpstreamError::Broken(error_chain(error.error()))),
                    },
                },
            }
        }
    }

    /// An open connection for one request: an idle one, a new one, or one that comes free;
    /// only a new one if `fresh` (closing an idle one to make room if the pool is full).
    /// A request that waited (here, or for an API slot since `waited`) while an attempt to
    /// open one failed fails with it (unless an idle connection is there for it).
    async fn checkout(
        &self,
        waited: Option<FailedAttempts>,
        fresh: bool,
    ) -> Result<Lease<'_>, UpstreamError> {
        // Failed attempts when this request began to wait, if it did.
        let mut failures_at_wait = waited.map(|FailedAttempts(failed)| failed);
        loop {
            // Armed only if this request waits, and then under the state lock, so that no
            // connection checked in after it looked goes unnoticed. A `notify_one` wakes the
            // oldest armed request: one armed while it opens a connection (up to half of
            // `--upstream-timeout`) or checks an idle one would absorb it, and a waiting
            // request would sleep while a connection is idle. (So would a retry that wants a
            // new connection, which takes no idle one: see below.)
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // An idle connection this request closes to make room for a new one (dropped once
            // the lock is released: see `Place`'s drop).
            let mut replaced = None;
            let next = {
                let mut state = self.state();
                // A request that wants a fresh connection takes no idle one.
                match if fresh { None } else { state.idle.pop() } {
                    Some(idle)
                        if idle.connection.sender.is_closed()
                            || idle.since.elapsed() >= idle.keep_for =>
                    {
                        Next::Discard(idle)
                    }
                    Some(idle) => Next::Reuse(idle),
                    None => match state.failed_while_waiting(failures_at_wait, false) {
                        Some(error) => Next::Fail(error),
                        None if state.connecting < MAX_CONNECTING
                            && (state.open < self.max_open
                                || (fresh && !state.idle.is_empty())) =>
                        {
                            let place = if state.open >= self.max_open {
                                // The oldest idle connection, the first to be closed when
                                // idle too long, is closed to make room. It counts until its
                                // socket is closed, a moment from now (at most CLOSE_GRACE:
                                // nothing is in flight on it), and then its place passes to
                                // this request, which opens its new one only then: the two
                                // never count, nor are open, at once.
                                let idle = state.idle.remove(0);
                                let (heir, inheritance) = oneshot::channel();
                                let set = idle.connection.link.place.heir.set(heir);
                                // Else the connection would give its place back when closed,
                                // while this request counts it as its own (see
                                // `Inheritance::received`).
                                debug_assert!(set.is_ok(), "an idle connection had an heir");
                                replaced = Some(idle);
                                Some(inheritance)
                            } else {
                                state.open += 1;
                                None
                            };
                            state.connecting += 1;
                            Next::Connect(place)
                        }
                        None => {
                            failures_at_wait.get_or_insert(state.open_failures);
                            if fresh && state.connecting >= MAX_CONNECTING {
                                // Only an attempt that ends lets it go on. Woken by a
                                // connection checked in, it would take the `notify_one` meant
                                // for a request that uses it, and wait on without passing it
                                // on: that request would sleep while the connection is idle.
                                changed.set(self.attempt_ended.notified());
                            }
                            changed.as_mut().enable();
                            Next::Wait
                        }
                    },
                }
            };
            drop(replaced);
            match next {
                Next::Discard(idle) => drop(idle),
                Next::Reuse(idle) => {
                    let idled = idle.since.elapsed() >= IDLE_BEFORE_RESEND;
                    let mut lease = Lease {
                        pool: self,
                        connection: Some(idle.connection),
                        reused: true,
                        idled,
                    };
                    // Looked at, not waited for: it was ready for another request when it was
                    // checked in (see `Lease::checkin`), and stays so until it takes one, unless
                    // it closed since.
                    if let Some(connection) = lease.connection.as_mut() {
                        if connection.sender.is_ready() {
                            if idled {
                                // Whatever comes from now on is of this request's answer.
                                connection.link.heard.store(false, Ordering::Relaxed);
                            }
                            return Ok(lease);
                        }
                    }
                    // Dropping the lease lets the dead connection go (its slot given back once
                    // its task ended).
                }
                Next::Connect(inheritance) => {
                    // Both guards give their counts back if this future is dropped mid-way:
                    // the lease first (dropped in the reverse order of these lines), so that,
                    // as when the attempt fails, its slot is given back before the waiting
                    // requests are woken (by `opening`), and none counts it as an established
                    // connection that may come back for it. (So does the inheritance, while
                    // the request waits for it.)
                    let opening = Opening { pool: self };
                    if let Some(place) = inheritance {
                        Inheritance {
                            pool: self,
                            place: Some(place),
                        }
                        .received()
                        .await;
                    }
                    let mut lease = Lease {
                        pool: self,
                        connection: None,
                        reused: false,
                        idled: false,
                    };
                    // Opened in a task of its own, at the top of a worker's stack: opening
                    // (handshake, spawning the connection's task) needs tens of KiB of stack,
                    // which would otherwise stack up under the websocket handshake's own
                    // frames and stay resident in every worker thread (bench/README.md,
                    // "Shallow worker stacks"). Aborted if this request goes away first, as the
                    // inline attempt was dropped.
                    let opened = AbortOnDropHandle::new(tokio::spawn(open_h1(
                        self.dialer.clone(),
                        self.origin.clone(),
                    )))
                    .await;
                    let opened = opened.unwrap_or_else(|e| {
                        Err(UpstreamError::Unreachable(format!(
                            "opening the connection failed: {e}"
                        )))
                    });
                    // Noted, and a failed attempt's slot given back, before the requests
                    // waiting for it are woken (by `opening`): one woken in between would
                    // count the slot as an established connection that may come back for it
                    // (`failed_while_waiting`), and start an attempt of its own instead of
                    // failing with this one.
                    let outcome = {
                        let mut state = self.state();
                        state.attempt_ended(&opened);
                        match opened {
                            Ok(connection) => {
                                self.adopt(&connection.link.place);
                                lease.connection = Some(connection);
                                Ok(lease)
                            }
                            Err(error) => {
                                lease.give_back(&mut state);
                                Err(error)
                            }
                        }
                    };
                    drop(opening);
                    return outcome;
                }
                Next::Wait => changed.await,
                Next::Fail(error) => return Err(error),
            }
        }
    }

    /// [`Pool::exchange`] over the shared HTTP/2 connection: `request` waits for one of the
    /// streams the API allows, and goes out again, for as long as the caller's deadline lets
    /// it, each time the API provably did not process it (see [`unprocessed_by_api`]); never
    /// once it may have.
    async fn exchange_h2(
        &self,
        mut request: Request<Body>,
        body_limit: BodyLimit,
        progress: &mut Progress<'_>,
        mut waited: Option<FailedAttempts>,
    ) -> Result<Answer, UpstreamError> {
        let mut parts = request.uri().clone().into_parts();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = self.origin.authority().cloned();
        *request.uri_mut() =
            Uri::from_parts(parts).map_err(|e| UpstreamError::Broken(e.to_string()))?;
        // Times so far the API turned this request away unprocessed, or its connection handed
        // it back unsent: it goes out again each time, as long as its deadline allows (the
        // caller drops it then), after a pause from the second time on (see `retry_pause`).
        let mut turned_away: u32 = 0;
        let mut pause = None;
        let mut silent = SilentConnections::default();
        loop {
            if let Some(pause) = pause.take() {
                tokio::time::sleep(pause).await;
            }
            let SharedH2 {
                mut sender,
                streams,
                number,
            } = self.shared_h2(waited.take()).await?;
            // Beyond the API's limit on streams, the request waits here, where it is known
            // unsent (see `Streams`): if the connection ends meanwhile, it goes on a new one,
            // and that is not a time it was turned away. The wait counts in the API's pace.
            progress.waiting_for_stream();
            let Some(_stream) = streams.take(&sender).await else {
                self.forget_h2(number);
                silent.ended(&streams, progress)?;
                continue;
            };
            // A stream the API turns away unprocessed comes back without its request: this
            // copy (the body's `Bytes` shared, not copied) is what goes out again.
            let spare = copy_request(&request);
            let has_body = hyper::body::Body::size_hint(request.body()).exact() != Some(0);
            progress.sent();
            match sender.try_send_request(request).await {
                // A body left unread resets its stream only.
                Ok(response) => return collect(response, body_limit, progress.deadline()).await,
                Err(mut error) => {
                    let refusal = unprocessed_by_api(error.error(), has_body);
                    request = match (error.take_message(), refusal) {
                        // Handed back unsent: the connection closed (after the API's GOAWAY,
                        // e.g. nginx after `http2_max_requests`, or a dropped socket) before
                        // it took the request. Again, on a fresh connection.
                        (Some(unsent), _) => {
                            self.forget_h2(number);
                            unsent
                        }
                        // Not processed (RFC 9113, 8.7): a stream above a GOAWAY's last
                        // stream id, one reset with REFUSED_STREAM, or a request with a body
                        // still waiting for the API to allow another stream when the
                        // connection ended. Again; unless refused alone, on a fresh
                        // connection.
                        (None, Some(refusal)) => {
                            if refusal != Refusal::RefusedStream {
                                self.forget_h2(number);
                            }
                            spare
                        }
                        // The API may have processed it: never sent again.
                        (None, None) => {
                            return Err(UpstreamError::Broken(error_chain(error.error())))
                        }
                    };
                    // A connection the API dropped without a word (no SETTINGS, no
                    // GOAWAY): after a few, it will not answer in time.
                    silent.ended(&streams, progress)?;
                    turned_away = turned_away.saturating_add(1);
                    pause = retry_pause(turned_away);
                    tracing::debug!(
                        ?refusal,
                        turned_away,
                        ?pause,
                        "the API did not process a request; it goes out again"
                    );
                    progress.unsent();
                    if pause.is_some() {
                        // An API that keeps turning requests away has no stream for them:
                        // the pause counts in its pace, as a wait for a stream does.
                        progress.waiting_for_stream();
                    }
                }
            }
        }
    }

    /// Stops sharing HTTP/2 connection number `number`, if it is still the shared one, so that
    /// the next request opens another; requests still on it finish there. (Many requests
    /// turned away by one GOAWAY thus replace it once, not once each.)
    fn forget_h2(&self, number: u64) {
        let mut state = self.state();
        if state.shared.as_ref().map(|shared| shared.number) == Some(number) {
            state.shared = None;
        }
    }

    /// The shared HTTP/2 connection, opened by this request if there is none and no other
    /// request is opening it. A request that waited while another opened it (or for an API
    /// slot since `waited` while an attempt failed) fails as that attempt did, if it failed.
    async fn shared_h2(&self, waited: Option<FailedAttempts>) -> Result<SharedH2, UpstreamError> {
        // Failed attempts when this request began to wait, if it did.
        let mut failures_at_wait = waited.map(|FailedAttempts(failed)| failed);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let next = {
                let mut state = self.state();
                match &state.shared {
                    Some(shared) if !shared.sender.is_closed() => NextH2::Use(shared.clone()),
                    _ => {
                        state.shared = None;
                        match state.failed_while_waiting(failures_at_wait, true) {
                            Some(error) => NextH2::Fail(error),
                            // Beside the connections the API sent away that still finish
                            // requests, if they leave room: else it waits for one to close.
                            None if state.connecting == 0 && state.open < self.max_open => {
                                state.connecting = 1;
                                state.open += 1;
                                NextH2::Connect
                            }
                            None => {
                                failures_at_wait.get_or_insert(state.open_failures);
                                NextH2::Wait
                            }
                        }
                    }
                }
            };
            match next {
                NextH2::Use(mut shared) => {
                    if shared.sender.ready().await.is_ok() {
                        return Ok(shared);
                    }
                    self.forget_h2(shared.number);
                }
                NextH2::Connect => {
                    // As for HTTP/1.1 (see `checkout`): the place in the count, given back if
                    // the attempt fails or this future is dropped, is given back before the
                    // requests waiting for the attempt are woken (by `opening`).
                    let opening = Opening { pool: self };
                    let place = Lease {
                        pool: self,
                        connection: None,
                        reused: false,
                        idled: false,
                    };
                    let opened = self.connect_h2().await;
                    let mut state = self.state();
                    // Noted before the requests waiting for it are woken (by `opening`).
                    state.attempt_ended(&opened);
                    let opened = match opened {
                        Ok(OpenedH2 {
                            sender,
                            streams,
                            place: socket,
                        }) => {
                            self.adopt(&socket);
                            place.handed_over();
                            state.h2_opened += 1;
                            let shared = SharedH2 {
                                sender,
                                streams,
                                number: state.h2_opened,
                            };
                            state.shared = Some(shared.clone());
                            Ok((shared, socket))
                        }
                        Err(error) => {
                            place.give_back(&mut state);
                            Err(error)
                        }
                    };
                    drop(state);
                    drop(opening);
                    // The socket's place is dropped here, the lock released: if the socket
                    // closed already, it gives its place back now.
                    return opened.map(|(shared, _socket)| shared);
                }
                NextH2::Wait => changed.await,
                NextH2::Fail(error) => return Err(error),
            }
        }
    }

    async fn connect_h2(&self) -> Result<OpenedH2, UpstreamError> {
        let timeout = self.dialer.timeout;
        match &self.dialer.address {
            ApiAddress::Network(connector) => {
                let connecting = connect_network(connector.clone(), self.origin.clone(), timeout);
                handshake_h2(connecting.await?).await
            }
            ApiAddress::UnixSocket(path) => {
                handshake_h2(connect_unix_socket(path, timeout).await?).await
            }
        }
    }
}

/// The error for a request hyper handed back without sending it (the connection closed
/// before the request went out), which the API cannot have acted on: marked unsent, and
/// [`UpstreamError::Unreachable`], so that a DELETE may be tried again. (An HTTP/2 request the
/// API did not process goes out again until its deadline: see [`Pool::exchange_h2`].)
fn never_sent(progress: &mut Progress<'_>, error: &hyper::Error) -> UpstreamError {
    progress.unsent();
    UpstreamError::Unreachable(format!(
        "the connection closed before the request went out: {}",
        error_chain(error)
    ))
}

/// The error for an HTTP/1.1 request whose second copy could not go out (`why`) after its
/// first went out on an idle connection lost under it: the API may have seen that one, so it
/// is no "never sent" (a connect is undone, a DELETE not sent again).
fn lost_after_going_out_once(why: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Broken(format!(
        "{why}, after the request went out once on an idle connection lost under it"
    ))
}

/// The HTTP/2 connections that ended, all told, without a byte from the API while they had
/// one request (holding it, or with it waiting for one of their streams).
#[derive(Default)]
struct SilentConnections(u32);

impl SilentConnections {
    /// Notes that `streams`' connection ended under the request, and counts it if the API
    /// never said a word on it. At [`H2_SILENT_CONNECTIONS`] of them the request fails:
    /// unreachable and unsent, as when the API refuses connections, so that the client hears
    /// at once and a DELETE may be tried again.
    fn ended(
        &mut self,
        streams: &Streams,
        progress: &mut Progress<'_>,
    ) -> Result<(), UpstreamError> {
        self.0 += u32::from(streams.never_heard());
        if self.0 < H2_SILENT_CONNECTIONS {
            return Ok(());
        }
        progress.unsent();
        Err(UpstreamError::Unreachable(format!(
            "the API closed {} HTTP/2 connections without a byte of an answer",
            self.0
        )))
    }
}

/// The pause before an HTTP/2 request goes out again after it was turned away unprocessed
/// `turned_away` times: none after the first (a GOAWAY sends it to a new connection anyway, and
/// a stream refused before the API's SETTINGS came goes out again within the limit they set,
/// read before the refusal on the same connection), then [`H2_RETRY_PAUSE_FIRST`], doubling
/// up to [`H2_RETRY_PAUSE_MAX`], so that an API that refuses everything gets a few tries a
/// second from each request, not a hot loop.
fn retry_pause(turned_away: u32) -> Option<Duration> {
    let doublings = turned_away.checked_sub(2)?;
    let pause = H2_RETRY_PAUSE_FIRST.saturating_mul(1 << doublings.min(16));
    Some(pause.min(H2_RETRY_PAUSE_MAX))
}

/// How an HTTP/2 request that failed is known not to have been processed by the API.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Refusal {
    /// The stream was above the last stream id of the API's GOAWAY: the connection takes no
    /// more streams.
    GoingAway,
    /// The stream was reset with REFUSED_STREAM: the connection still takes others.
    RefusedStream,
    /// The request was waiting inside hyper for the API to allow one more stream (its
    /// SETTINGS_MAX_CONCURRENT_STREAMS) when the connection ended, and hyper dropped it
    /// without its request ("dispatch task is gone"; with a body that cannot fail, as ours,
    /// the only user error a request can end with). h2 may have opened its stream just
    /// before, but hyper writes a body only after it has the stream back, so the API saw at
    /// most the head of a request with a body, then a reset: never a whole request. (A
    /// request without a body ends with its head, so it is not counted here.) Rare: requests
    /// wait for a stream in [`Streams`], and reach hyper beyond the API's limit only in the
    /// moments its note names.
    NeverWhole,
}

/// Whether `error` says that the API did not process the request, so that sending it again
/// cannot do anything twice; `has_body` tells whether the request had a body.
fn unprocessed_by_api(error: &hyper::Error, has_body: bool) -> Option<Refusal> {
    if error.is_user() {
        return has_body.then_some(Refusal::NeverWhole);
    }
    let h2 = std::error::Error::source(error)?.downcast_ref::<h2::Error>()?;
    if !h2.is_remote() {
        None
    } else if h2.is_go_away() {
        Some(Refusal::GoingAway)
    } else if h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
        Some(Refusal::RefusedStream)
    } else {
        None
    }
}

/// A copy of `request` for another try: the headers are copied, the body is shared.
fn copy_request(request: &Request<Body>) -> Request<Body> {
    let mut copy = Request::new(request.body().clone());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    copy
}

/// Opens a TCP (or TLS) connection to `origin`.
async fn connect_network(
    mut connector: ApiConnector,
    origin: Uri,
    timeout: Duration,
) -> Result<hyper_rustls::MaybeHttpsStream<TokioIo<TcpStream>>, UpstreamError> {
    match tokio::time::timeout(timeout, connector.call(origin)).await {
        Ok(connected) => connected.map_err(|e| UpstreamError::Unreachable(error_chain(&*e))),
        Err(_) => Err(UpstreamError::Unreachable(format!(
            "connecting (name lookup, TCP and TLS) timed out after {timeout:?}"
        ))),
    }
}

/// Connects to the API's Unix socket at `path` within `timeout`.
async fn connect_unix_socket(
    path: &std::path::Path,
    timeout: Duration,
) -> Result<TokioIo<UnixStream>, UpstreamError> {
    match tokio::time::timeout(timeout, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
        Ok(Err(error)) => Err(UpstreamError::Unreachable(format!(
            "connecting to {}: {error}",
            path.display()
        ))),
        Err(_) => Err(UpstreamError::Unreachable(format!(
            "connecting to {}: timed out after {timeout:?}",
            path.display()
        ))),
    }
}

/// Opens an HTTP/1.1 connection to the API and spawns the task that drives it.
async fn open_h1(dialer: Dialer, origin: Uri) -> Result<H1, UpstreamError> {
    let timeout = dialer.timeout;
    match dialer.address {
        ApiAddress::Network(connector) => {
            handshake_h1(connect_network(connector, origin, timeout).await?).await
        }
        ApiAddress::UnixSocket(path) => {
            handshake_h1(connect_unix_socket(&path, timeout).await?).await
        }
    }
}

/// Starts HTTP/1.1 on an open connection and spawns the task that drives it.
async fn handshake_h1<T>(io: T) -> Result<H1, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let link = Link::new();
    let io = TokioIo::new(Listened {
        io: TokioIo::new(io),
        heard: link.clone(),
    });
    let (sender, connection) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
    drive_h1(connection, link.clone());
    Ok(H1 { sender, link })
}

/// Spawns the task that drives an HTTP/1.1 connection until it closes, but for no longer than
/// [`CLOSE_GRACE`] once its holder let go of it (`link`): then the connection, its socket
/// among it, is dropped, whatever hyper's close still waits for.
fn drive_h1<T>(connection: http1::Connection<T, Body>, link: Arc<Link>)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    drive(
        async move {
            let mut connection = std::pin::pin!(connection);
            // Until it ends, or its holder lets go of it (a look at a flag per wake-up).
            let ended = std::future::poll_fn(|cx| {
                if let Poll::Ready(outcome) = connection.as_mut().poll(cx) {
                    return Poll::Ready(Some(outcome));
                }
                link.task.register(cx.waker());
                if link.released.load(Ordering::Acquire) {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            })
            .await;
            match ended {
                Some(outcome) => outcome,
                None => match tokio::time::timeout(CLOSE_GRACE, connection).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        tracing::debug!(
                            grace = ?CLOSE_GRACE,
                            "an API connection let go of did not close in time (the API reads \
                             nothing); its socket is closed"
                        );
                        Ok(())
                    }
                },
            }
        },
        "HTTP/1.1",
    );
}

/// Where a [`Listened`] stream notes that bytes came: an HTTP/2 connection's flag (in its
/// [`H2Socket`]), or an HTTP/1.1 connection's [`Link`].
trait Hearing {
    fn heard(&self) -> &AtomicBool;
}

impl Hearing for H2Socket {
    fn heard(&self) -> &AtomicBool {
        &self.heard
    }
}

impl Hearing for Arc<Link> {
    fn heard(&self) -> &AtomicBool {
        &self.heard
    }
}

/// An API connection's stream, that sets `heard` whenever bytes come in (one look at a flag
/// per read, written only when it was cleared). (hyper's own read interface does not
/// say how many bytes a read brought without unsafe code; tokio's does, hence the two
/// `TokioIo` around it.)
struct Listened<T, H> {
    io: T,
    heard: H,
}

impl<T: tokio::io::AsyncRead + Unpin, H: Hearing + Unpin> tokio::io::AsyncRead for Listened<T, H> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let heard = this.heard.heard();
        if buf.filled().len() > before && !heard.load(Ordering::Relaxed) {
            heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin, H: Unpin> tokio::io::AsyncWrite for Listened<T, H> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A new HTTP/2 connection to the API: its sender, its streams, and its socket's place in the
/// count of open connections, for the pool to adopt ([`Pool::adopt`]).
struct OpenedH2 {
    sender: http2::SendRequest<Body>,
    streams: Arc<Streams>,
    place: Arc<Place>,
}

/// What an HTTP/2 connection's stream holds beside its socket (see [`Listened`]), all dropped
/// with it, when the socket is closed, whatever task of hyper's holds it then: the flag its
/// reads set, its place in the pool's count, and the sender whose drop tells the task that
/// drives the connection that the socket is closed (see [`drive_h2`]).
struct H2Socket {
    heard: Arc<AtomicBool>,
    _place: Arc<Place>,
    _open: oneshot::Sender<Infallible>,
}

/// Spawns the tasks hyper runs for one HTTP/2 connection (the one that holds its socket and
/// drives it, and some for each request), and can end the first, closing the socket: how a
/// connection that takes no more requests and does not close is closed (see [`drive_h2`]).
///
/// It relies on hyper 1.x's HTTP/2 client: the first task its `handshake` spawns is the
/// connection's, which owns the socket (h2's `Connection`); ended, it drops them, which fails
/// the streams left and so ends hyper's tasks for their requests. Cloned by hyper for each
/// request: only an `Arc` to clone, and nothing done beside each task's own polls.
/// `h2c_connections_an_api_never_finishes_after_its_goaway_are_closed_and_never_pile_up_past_the_pool`
/// (tests/upstream_http2.rs) fails if hyper stops doing so.
#[derive(Clone, Default)]
struct H2Tasks(Arc<OnceLock<tokio::task::AbortHandle>>);

impl H2Tasks {
    /// Ends the connection's task (if it has not ended), closing its socket.
    fn end(&self) {
        if let Some(connection) = self.0.get() {
            connection.abort();
        }
    }
}

impl<F> hyper::rt::Executor<F> for H2Tasks
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, task: F) {
        let spawned = tokio::spawn(task);
        if self.0.get().is_none() {
            // The first: the connection's.
            let _ = self.0.set(spawned.abort_handle());
        }
    }
}

/// Starts HTTP/2 (prior knowledge) on an open connection and spawns the task that drives it.
async fn handshake_h2<T>(io: T) -> Result<OpenedH2, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let heard = Arc::new(AtomicBool::new(false));
    let place = Arc::new(Place::default());
    let (open, closed) = oneshot::channel();
    let io = TokioIo::new(Listened {
        io: TokioIo::new(io),
        heard: H2Socket {
            heard: heard.clone(),
            _place: place.clone(),
            _open: open,
        },
    });
    let tasks = H2Tasks::default();
    let (sender, connection) = http2::Builder::new(tasks.clone())
        .timer(TokioTimer::new())
        // A dead API host or a dropped flow shows as an unanswered ping, not only when the
        // kernel gives up retransmitting minutes later.
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .handshake(io)
        .await
        .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
    let streams = drive_h2(connection, heard, closed, tasks);
    Ok(OpenedH2 {
        sender,
        streams,
        place,
    })
}

/// Spawns the task that drives an HTTP/2 connection until it takes no more requests, and
/// returns its [`Streams`], which read the API's limit as the task last saw it (after each poll
/// of the connection: the API's SETTINGS are read in one; 0 once it ended), and `heard`, set
/// by the connection's reads.
///
/// A connection ends so when the API sent it away (a GOAWAY), it failed, or the pool is gone;
/// its socket, driven by a task of hyper's (spawned by `tasks`), stays open for the streams
/// still on it, and closes once they ended (after a GOAWAY, h2 closes a connection with no
/// stream left). The task then waits until no request holds one of its streams (each gives
/// its stream back when it ends, at its deadline at the latest), and then at most
/// [`CLOSE_GRACE`] for the socket to close (`closed`): a stream the API never ended (say, an
/// answer that came before the request's body, and no window for the rest of it, nor a reset)
/// would keep it open as long as the API answers pings, holding a place of the pool. Past that,
/// its tasks are ended, and the socket closed with them.
fn drive_h2<T>(
    mut connection: http2::Connection<T, Body, H2Tasks>,
    heard: Arc<AtomicBool>,
    closed: oneshot::Receiver<Infallible>,
    tasks: H2Tasks,
) -> Arc<Streams>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let streams = Arc::new(Streams::new(connection.current_max_send_streams(), heard));
    let ended = streams.clone();
    drive(
        async move {
            let outcome = std::future::poll_fn(|cx| {
                let polled = Pin::new(&mut connection).poll(cx);
                let limit = connection.current_max_send_streams();
                ended.limit.store(limit, Ordering::Relaxed);
                polled
            })
            .await;
            drop(connection);
            ended.limit.store(0, Ordering::Relaxed);
            // The requests waiting for one of its streams go to another connection.
            ended.free.close();
            if let Err(error) = &outcome {
                tracing::debug!(%error, "HTTP/2 API connection ended with an error");
            }
            ended.all_given_back().await;
            if tokio::time::timeout(CLOSE_GRACE, closed).await.is_err() {
                tracing::debug!(
                    grace = ?CLOSE_GRACE,
                    "an HTTP/2 API connection that takes no more requests, and has none left, \
                     did not close in time (a stream the API never ended); its socket is closed"
                );
                tasks.end();
            }
            Ok(())
        },
        "HTTP/2",
    );
    streams
}

/// Spawns the task that drives an API connection (`protocol` names it in the log) until it
/// closes.
fn drive(
    connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    protocol: &'static str,
) {
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, protocol, "API connection ended with an error");
        }
    });
}

/// A future boxed behind a trait object, for rare paths.
type OutOfLine<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Boxes `future` so that neither its state nor its `poll` becomes part of the caller's: a
/// trait object's `poll` cannot be inlined, so the stack frame of every request's `poll` does
/// not grow by the rare path's temporaries (its stack probes touch every page of the frame on
/// each call).
#[inline(never)]
fn out_of_line<'a, T>(future: impl Future<Output = T> + Send + 'a) -> OutOfLine<'a, T> {
    Box::pin(future)
}

/// The place in the count of an idle connection that a request closes to open a new one in a
/// full pool (see [`Pool::checkout`]): the connection's [`Place`] passes it on when its socket is
/// closed, instead of giving it back, so that the two connections never count, nor are open, at
/// once. If the request goes away first, the place is given back: by this, if it was passed on
/// already, else by the connection's [`Place`] once it is closed.
struct Inheritance<'a> {
    pool: &'a Pool,
    /// Told when the place is passed on (`None` once the request has it).
    place: Option<oneshot::Receiver<()>>,
}

impl Inheritance<'_> {
    /// Waits until the place is the request's (the idle connection's socket closed, within
    /// [`CLOSE_GRACE`]), whose lease then holds it.
    async fn received(mut self) {
        if let Some(place) = self.place.as_mut() {
            // Never an error: a `Place` with an heir passes its place on when dropped, or
            // gives it back only once the heir stopped waiting. Either way, the place counted
            // until now is the request's.
            let _ = place.await;
        }
        self.place = None;
    }
}

impl Drop for Inheritance<'_> {
    fn drop(&mut self) {
        let Some(mut place) = self.place.take() else {
            return;
        };
        // From now on the connection gives its place back itself; if it passed it on already,
        // that is done here.
        place.close();
        if place.try_recv().is_ok() {
            self.pool.state().open -= 1;
            self.pool.changed.notify_one();
        }
    }
}

/// A connection being opened: gives the "opening" count back however the attempt ends.
struct Opening<'a> {
    pool: &'a Pool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.pool.state().connecting -= 1;
        self.pool.changed.notify_waiters();
        self.pool.attempt_ended.notify_waiters();
    }
}

/// A connection (or, while it is being opened, its slot) held by one request. Unless checked
/// in, dropping it — request failed, timed out or cancelled — closes it (within
/// [`CLOSE_GRACE`]) and frees its slot (once closed).
struct Lease<'a> {
    pool: &'a Pool,
    connection: Option<H1>,
    /// Whether the connection was taken idle from the pool (not opened for this request).
    reused: bool,
    /// Whether it had lain idle for [`IDLE_BEFORE_RESEND`] or longer before.
    idled: bool,
}

impl Lease<'_> {
    /// Gives a connection whose answer was read in full back to the pool, to be reused while
    /// it has been idle for less than `keep_for`, if it is ready for another request (a look at
    /// a flag, no wait). One that is closed is let go of. One that is not ready yet is waited
    /// for out of line, for at most [`READY_AT_CHECKIN`], then checked in, or let go of: it may
    /// be still writing the request's body, which an API that answered before reading all of
    /// it may never read (it should close the connection then, but need not), and which hyper
    /// finishes before it takes another request, so a request that took it would wait its
    /// whole time; or its task has not yet come back to wait for another request after the
    /// answer (another worker thread, or preempted), which is a moment.
    fn checkin(mut self, keep_for: Duration) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        // Idle from its answer, not from the end of a wait for readiness.
        let since = Instant::now();
        if connection.sender.is_ready() {
            self.pool.put_idle(connection, since, keep_for);
            std::mem::forget(self);
            return;
        }
        // (The pool is alive: the lease borrows it. Let go of the connection all the same if
        // it were not.)
        let pool = match self.pool.this.upgrade() {
            Some(pool) if !connection.sender.is_closed() => pool,
            _ => {
                // Let go of by the drop (its place given back once its task ended).
                self.connection = Some(connection);
                return;
            }
        };
        // Its place in the count is its Link's: the lease holds nothing more to give back.
        std::mem::forget(self);
        tokio::spawn(async move {
            let ready = tokio::time::timeout(READY_AT_CHECKIN, connection.sender.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                pool.put_idle(connection, since, keep_for);
            }
            // Else it is let go of here, and closed within CLOSE_GRACE.
        });
    }

    /// Ends the hold on the place of a connection being opened, which the connection itself
    /// holds now (the pool adopted its [`Place`]): nothing is given back.
    fn handed_over(self) {
        debug_assert!(self.connection.is_none());
        std::mem::forget(self);
    }

    /// Frees the slot of a connection that could not be opened, in `state` (the pool's,
    /// locked by the caller), without waking anyone: the caller does, once it unlocks.
    fn give_back(self, state: &mut State) {
        debug_assert!(self.connection.is_none());
        state.open -= 1;
        // It holds no connection: forgetting it leaks nothing, and skips the drop's own
        // lock and wake-up.
        std::mem::forget(self);
    }

    /// Whether its connection was lost under the request (`error`: closed, or reset) before
    /// any byte came from the API since it was taken idle. (`heard` is written by the
    /// connection's task before it fails the request, which reaches this task through a
    /// channel that orders the two.)
    fn lost_unanswered(&self, error: &hyper::Error) -> bool {
        let unheard = self
            .connection
            .as_ref()
            .is_some_and(|connection| !connection.link.heard.load(Ordering::Relaxed));
        unheard && connection_lost(error)
    }
}

/// Whether `error` is the connection ending under a request (the end of its stream before a
/// whole answer, a reset, a broken pipe), rather than something the API said.
fn connection_lost(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // A connection is let go of with the lease, and gives its place back once its task
        // ended (see `Link`); a place held to open one is given back now.
        if self.connection.is_none() {
            self.pool.state().open -= 1;
            self.pool.changed.notify_one();
        }
    }
}

/// How long a connection whose answer came with this HTTP `version` and `headers` may be kept
/// idle and reused, at most `idle_timeout`: `None` after `Connection: close` (PHP's built-in
/// server says so every time) or an HTTP/1.0 answer, since reusing such a connection would
/// race the API's close and could lose a request; less than the idle timeout the API announced
/// in `Keep-Alive: timeout=N`, by [`KEEP_ALIVE_MARGIN`] but at most half of it (`None` for 0).
/// An answer without that header (most of them) costs one look-up and nothing else.
fn reusable_for(
    version: http::Version,
    headers: &HeaderMap,
    idle_timeout: Duration,
) -> Option<Duration> {
    let close = headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    });
    if close || version != http::Version::HTTP_11 {
        return None;
    }
    let Some(announced) = headers.get(&KEEP_ALIVE).and_then(keep_alive_timeout) else {
        return Some(idle_timeout);
    };
    let keep_for = announced - KEEP_ALIVE_MARGIN.min(announced / 2);
    Some(keep_for.min(idle_timeout)).filter(|keep_for| !keep_for.is_zero())
}

/// The `timeout=N` (seconds) of a `Keep-Alive` header's value (`timeout=5, max=100`), if it
/// has one that is a number; read in place, without allocating.
fn keep_alive_timeout(value: &HeaderValue) -> Option<Duration> {
    value
        .as_bytes()
        .split(|&byte| byte == b',')
        .find_map(|parameter| {
            let (name, seconds) = parameter.trim_ascii().split_at_checked(7)?;
            if !name.eq_ignore_ascii_case(b"timeout") {
                return None;
            }
            let seconds = seconds.trim_ascii_start().strip_prefix(b"=")?.trim_ascii();
            if seconds.is_empty() || seconds.len() > 9 || !seconds.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let seconds = seconds
                .iter()
                .fold(0, |n, digit| n * 10 + u64::from(digit - b'0'));
            Some(Duration::from_secs(seconds))
        })
}

/// How much of an answer's body is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyLimit {
    /// All of it, at most this many bytes: a larger body fails the request
    /// ([`UpstreamError::ResponseTooLarge`]).
    Whole(usize),
    /// At most this many bytes, for an answer whose status is all that counts: a larger body
    /// is left unread and the answer stands, with the bytes read until then.
    Head(usize),
    /// As `Whole`, but of a 5xx answer only as much as `Head` reads: for a connect GET, whose
    /// failure is judged by its status alone (and undone), however large its error page.
    WholeUnlessServerError(usize),
}

/// The API's answer to one request: its head and its body (all of it, or as much as its
/// [`BodyLimit`] let be read), and where the read of its body stopped.
pub(super) struct Answer {
    pub(super) parts: http::response::Parts,
    pub(super) body: Bytes,
    pub(super) end: BodyEnd,
}

/// Where the read of an answer's body stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyEnd {
    /// At its end: all of it was read.
    Whole,
    /// At its limit, of a body judged by its status alone: the rest was left unread.
    OverLimit,
    /// Of a body judged by its status alone, not all came within [`STATUS_ONLY_BODY_WAIT`] of
    /// the head (or before the request's time ran out): what came is kept, the rest given up,
    /// and the answer stands on its status. Not an answer at the API's pace: its slot was held
    /// for the wait.
    Stalled,
    /// Of a body judged by its status alone, the connection failed (a reset, a close) before
    /// its end: what came is kept and the answer stands on its status.
    Cut,
}

/// Reads `response`'s body as `limit` says, a body judged by its status alone only until
/// `deadline` and for at most [`STATUS_ONLY_BODY_WAIT`].
async fn collect(
    response: Response<Incoming>,
    limit: BodyLimit,
    deadline: Option<Instant>,
) -> Result<Answer, UpstreamError> {
    let (parts, body) = response.into_parts();
    let (max_body, whole) = match limit {
        BodyLimit::Whole(max_body) => (max_body, true),
        BodyLimit::Head(max_body) => (max_body, false),
        BodyLimit::WholeUnlessServerError(max_body) => (max_body, !parts.status.is_server_error()),
    };
    let (body, end) = if whole {
        let body = Limited::new(body, max_body)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    UpstreamError::ResponseTooLarge(max_body)
                } else {
                    UpstreamError::Broken(error_chain(&*e))
                }
            })?
            .to_bytes();
        (body, BodyEnd::Whole)
    } else {
        let waited = Instant::now() + STATUS_ONLY_BODY_WAIT;
        let until = deadline.map_or(waited, |deadline| deadline.min(waited));
        // Out of line: its timer would otherwise be part of every request's future (see the
        // sizes test), for a read that only a DELETE's answer or a failed connect takes.
        out_of_line(read_head(body, max_body, until)).await?
    };
    Ok(Answer { parts, body, end })
}

/// Reads `body` up to `max_body` bytes, until `until`: all of it if it fits and comes in time,
/// else the data frames that fitted (the rest left unread), or those that came in time.
async fn read_head<B>(
    mut body: B,
    max_body: usize,
    until: Instant,
) -> Result<(Bytes, BodyEnd), UpstreamError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    let announced = body.size_hint().lower();
    if usize::try_from(announced).map_or(true, |announced| announced > max_body) {
        return Ok((Bytes::new(), BodyEnd::OverLimit));
    }
    let mut read: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(until, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok((Bytes::from(read), BodyEnd::Whole)),
            Err(_) => return Ok((Bytes::from(read), BodyEnd::Stalled)),
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(error) => {
                tracing::debug!(
                    error = error_chain(&error),
                    "an answer judged by its status lost the rest of its body; it stands"
                );
                return Ok((Bytes::from(read), BodyEnd::Cut));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if read.len() + data.len() > max_body {
            return Ok((Bytes::from(read), BodyEnd::OverLimit));
        }
        read.extend_from_slice(&data);
    }
}

/// Closes idle connections that expired, until the pool is gone: the [`WARM_IDLE`] most
/// recently used ones after the idle timeout (or the shorter one their API announced), the
/// others after [`SURPLUS_IDLE_TIMEOUT`] (or that shorter one).
async fn close_expired(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(REAP_PERIOD).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut state = pool.state();
        let closed = reap_idle(
            &mut state.idle,
            |idle| {
                (
                    idle.since,
                    idle.keep_for,
                    idle.connection.sender.is_closed(),
                )
            },
            Instant::now(),
        );
        shrink_idle_list(&mut state.idle);
        drop(state);
        // Let go of once the lock is released (see `Place`'s drop); each gives its place back
        // once its task ended.
        drop(closed);
    }
}

/// Gives back the room a burst's idle connections left in `idle` once most of them are gone,
/// all of it when none is left, keeping twice what is still there (at least [`WARM_IDLE`]).
fn shrink_idle_list<T>(idle: &mut Vec<T>) {
    if idle.is_empty() {
        *idle = Vec::new();
    } else if idle.capacity() > 4 * idle.len().max(WARM_IDLE) {
        idle.shrink_to(2 * idle.len().max(WARM_IDLE));
    }
}

/// Takes the expired or closed entries out of `idle` (oldest first, most recent last) as of
/// `now`, and returns them; `state` tells when an entry went idle, how long it may be kept
/// idle, and whether it is closed.
fn reap_idle<T>(
    idle: &mut Vec<T>,
    state: impl Fn(&T) -> (Instant, Duration, bool),
    now: Instant,
) -> Vec<T> {
    let before = idle.len();
    let mut position = 0;
    idle.extract_if(.., |entry| {
        let from_top = before - 1 - position;
        position += 1;
        let (since, keep_for, closed) = state(entry);
        let timeout = if from_top < WARM_IDLE {
            keep_for
        } else {
            SURPLUS_IDLE_TIMEOUT.min(keep_for)
        };
        closed || now.saturating_duration_since(since) >= timeout
    })
    .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_waiter_fails_with_a_failed_attempt_only_when_no_established_connection_may_come_back() {
        let after_a_failure = |open, connecting| State {
            open,
            connecting,
            open_failures: 1,
            last_open_failure: Some("refused".to_owned()),
            ..State::default()
        };
        // Waiting since before the failure, with only attempts open: it fails as they did.
        let state = after_a_failure(1, 1);
        assert!(matches!(
            state.failed_while_waiting(Some(0), false),
            Some(UpstreamError::Unreachable(_))
        ));
        // A busy established connection will come back: it waits on.
        assert!(after_a_failure(2, 1)
            .failed_while_waiting(Some(0), false)
            .is_none());
        // Over HTTP/2 the connections open beside the attempt are ones the API sent away,
        // which take no more requests: it fails.
        assert!(after_a_failure(2, 1)
            .failed_while_waiting(Some(0), true)
            .is_some());
        // No failure since it began to wait, or it never waited.
        assert!(state.failed_while_waiting(Some(1), false).is_none());
        assert!(state.failed_while_waiting(None, false).is_none());
    }

    use super::*;

    #[test]
    fn an_h2_request_turned_away_again_and_again_waits_twice_as_long_each_time_up_to_a_second() {
        let pauses: Vec<_> = (1..=10).map(retry_pause).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            pauses,
            [
                None,
                Some(ms(10)),
                Some(ms(20)),
                Some(ms(40)),
                Some(ms(80)),
                Some(ms(160)),
                Some(ms(320)),
                Some(ms(640)),
                Some(ms(1000)),
                Some(ms(1000)),
            ],
            "the first time again at once, then doubling from 10 ms"
        );
        assert_eq!(retry_pause(u32::MAX), Some(H2_RETRY_PAUSE_MAX));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_connection_whose_pings_go_unanswered_is_closed() {
        // The API's end stays open but never reads nor answers: a host gone dark.
        let (gateway_end, _api_end) = tokio::io::duplex(1 << 16);
        let OpenedH2 { sender, .. } = handshake_h2(TokioIo::new(gateway_end)).await.unwrap();
        tokio::time::sleep(H2_KEEP_ALIVE_INTERVAL - Duration::from_secs(1)).await;
        assert!(!sender.is_closed(), "open until a ping is due");
        tokio::time::sleep(H2_KEEP_ALIVE_TIMEOUT + Duration::from_secs(2)).await;
        assert!(sender.is_closed(), "closed once a ping went unanswered");
    }

    /// An HTTP/2 connection whose API end stays open but never answers (kept while the
    /// returned pipe end is), and streams on it limited to `limit` (until the test stores
    /// another in [`Streams::limit`]).
    async fn silent_h2_connection(
        limit: usize,
    ) -> (
        http2::SendRequest<Body>,
        Arc<Streams>,
        tokio::io::DuplexStream,
    ) {
        let (gateway_end, api_end) = tokio::io::duplex(1 << 16);
        let OpenedH2 { sender, .. } = handshake_h2(TokioIo::new(gateway_end)).await.unwrap();
        (
            sender,
            Arc::new(Streams::new(limit, Arc::new(AtomicBool::new(true)))),
            api_end,
        )
    }

    #[tokio::test]
    async fn a_freed_stream_goes_to_the_oldest_waiter_not_to_a_newcomer() {
        use futures_util::FutureExt;
        let (sender, streams, _api_end) = silent_h2_connection(1).await;
        let held = streams.take(&sender).await.expect("the only stream");
        let oldest = streams.take(&sender);
        tokio::pin!(oldest);
        assert!(oldest.as_mut().now_or_never().is_none(), "waits for it");
        drop(held);
        assert!(
            streams.take(&sender).now_or_never().is_none(),
            "a newcomer took the stream freed for the request waiting longest"
        );
        let served = tokio::time::timeout(Duration::from_secs(1), oldest).await;
        assert!(
            matches!(served, Ok(Some(_))),
            "the oldest waiter was served"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn streams_follow_the_apis_limit_as_it_moves() {
        use futures_util::FutureExt;
        let (sender, streams, _api_end) = silent_h2_connection(2).await;
        let first = streams.take(&sender).await.expect("one of two");
        let _second = streams.take(&sender).await.expect("two of two");
        let third = streams.take(&sender);
        tokio::pin!(third);
        assert!(third.as_mut().now_or_never().is_none(), "beyond the limit");
        // The API lowers its limit to one: a stream given back while two are held frees none.
        streams.limit.store(1, Ordering::Relaxed);
        drop(first);
        tokio::time::sleep(STREAM_RECHECK * 2).await;
        assert!(
            third.as_mut().now_or_never().is_none(),
            "one held, one allowed"
        );
        // It raises it to three: the waiting request sees it within STREAM_RECHECK.
        streams.limit.store(3, Ordering::Relaxed);
        let raised = tokio::time::timeout(STREAM_RECHECK * 2, third).await;
        assert!(matches!(raised, Ok(Some(_))), "a raised limit went unseen");
        let _fourth = streams.take(&sender).await.expect("three of three");
        assert!(streams.take(&sender).now_or_never().is_none(), "four held");
    }

    /// What one poll of `future` gives.
    async fn polled_once<F: Future>(mut future: Pin<&mut F>) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await
    }

    /// Ends `streams`' connection as its task does: its limit 0, its requests waiting turned
    /// away.
    fn end_connection(streams: &Streams) {
        streams.limit.store(0, Ordering::Relaxed);
        streams.free.close();
    }

    /// Whether `streams.all_given_back()` was over at its first poll, and whether it is over
    /// within a second after `meanwhile` ran (at once, if it was over at the first poll).
    async fn all_given_back_around(streams: &Streams, meanwhile: impl FnOnce()) -> (bool, bool) {
        let all_given_back = streams.all_given_back();
        tokio::pin!(all_given_back);
        let at_once = polled_once(all_given_back.as_mut()).await.is_ready();
        meanwhile();
        let over = at_once
            || tokio::time::timeout(Duration::from_secs(1), all_given_back)
                .await
                .is_ok();
        (at_once, over)
    }

    #[tokio::test]
    async fn an_ended_connection_has_all_streams_back_once_the_last_held_is_dropped_after_a_stale_limit_was_followed(
    ) {
        let (sender, streams, _api_end) = silent_h2_connection(2).await;
        let held = streams.take(&sender).await.expect("one of two");
        end_connection(&streams);
        let (at_once, over) = all_given_back_around(&streams, || {
            // A request that read the limit (2) just before the connection ended follows it
            // only now.
            streams.limit.store(2, Ordering::Relaxed);
            streams.follow_limit();
            streams.limit.store(0, Ordering::Relaxed);
            drop(held);
        })
        .await;
        assert!(!at_once, "over while a stream was still held");
        assert!(
            over,
            "no stream is held, yet the connection's task still waits for one"
        );
    }

    #[tokio::test]
    async fn an_ended_connection_has_all_streams_back_though_a_stream_went_to_a_waiter_that_went_away(
    ) {
        let (sender, streams, _api_end) = silent_h2_connection(1).await;
        let held = streams.take(&sender).await.expect("the only stream");
        // Boxed, to be dropped below.
        let mut waiter = Box::pin(streams.free.acquire());
        assert!(polled_once(waiter.as_mut()).await.is_pending(), "queued");
        // Given back to the waiter, which never takes it.
        drop(held);
        end_connection(&streams);
        let (_, over) = all_given_back_around(&streams, || drop(waiter)).await;
        assert!(
            over,
            "no stream is held, yet the connection's task still waits for one"
        );
    }

    /// A body of `chunks`, one data frame each, that does not say its length.
    fn unannounced_body(
        chunks: &[&'static [u8]],
    ) -> impl hyper::body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin {
        let frames: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = chunks
            .iter()
            .map(|chunk| Ok(hyper::body::Frame::data(Bytes::from_static(chunk))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_head_read_stops_at_its_limit_and_says_so() {
        let until = Instant::now() + Duration::from_secs(5);
        let (head, end) = read_head(unannounced_body(&[b"ab", b"cd"]), 4, until)
            .await
            .unwrap();
        assert_eq!((head.as_ref(), end), (&b"abcd"[..], BodyEnd::Whole), "fits");
        let (head, end) = read_head(unannounced_body(&[b"ab", b"cd", b"e"]), 4, until)
            .await
            .unwrap();
        assert_eq!(
            (head.as_ref(), end),
            (&b"abcd"[..], BodyEnd::OverLimit),
            "one over"
        );
        // A body that says it is larger is not read at all.
        let announced = Full::new(Bytes::from_static(b"abcde"));
        let (head, end) = read_head(announced, 4, until).await.unwrap();
        assert_eq!((head.len(), end), (0, BodyEnd::OverLimit));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_read_gives_up_on_a_body_that_stops_coming_and_keeps_what_came() {
        use futures_util::StreamExt;
        // Two bytes, then nothing more (the API announced more and stopped sending).
        let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            hyper::body::Frame::data(Bytes::from_static(b"ab")),
        )]);
        let stalled = http_body_util::StreamBody::new(first.chain(futures_util::stream::pending()));
        let started = Instant::now();
        let until = started + STATUS_ONLY_BODY_WAIT;
        let (head, end) = read_head(stalled, 4096, until).await.unwrap();
        assert_eq!((head.as_ref(), end), (&b"ab"[..], BodyEnd::Stalled));
        assert_eq!(
            started.elapsed(),
            STATUS_ONLY_BODY_WAIT,
            "given up at its time"
        );
    }

    #[tokio::test]
    async fn a_head_read_keeps_what_came_when_the_body_breaks_off() {
        // Two bytes, then the connection is reset: the status has come, the answer stands.
        let frames = [
            Ok(hyper::body::Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
        ];
        let cut = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let until = Instant::now() + Duration::from_secs(5);
        let (head, end) = read_head(cut, 4096, until).await.unwrap();
        assert_eq!((head.as_ref(), end), (&b"ab"[..], BodyEnd::Cut));
    }

    #[test]
    fn idle_list_gives_back_a_burst_room() {
        let mut idle: Vec<u64> = Vec::with_capacity(1024);
        idle.extend(0..10);
        shrink_idle_list(&mut idle);
        assert!(idle.capacity() <= 2 * WARM_IDLE, "{}", idle.capacity());
        assert_eq!(idle, (0..10).collect::<Vec<_>>(), "entries kept in order");
        let mut steady: Vec<u64> = Vec::with_capacity(WARM_IDLE * 2);
        steady.push(1);
        shrink_idle_list(&mut steady);
        assert_eq!(
            steady.capacity(),
            WARM_IDLE * 2,
            "small lists are left alone"
        );
        steady.clear();
        shrink_idle_list(&mut steady);
        assert_eq!(steady.capacity(), 0, "an empty list holds nothing");
    }

    #[test]
    fn surplus_idle_connections_close_sooner_than_the_warm_ones() {
        // In the future, so that going back a few seconds cannot underflow the clock.
        let now = Instant::now() + Duration::from_secs(60);
        let idle_timeout = Duration::from_secs(10);
        // 100 connections, all idle a little longer than the surplus timeout: only the most
        // recent WARM_IDLE survive.
        let idle_since = now - SURPLUS_IDLE_TIMEOUT - Duration::from_millis(100);
        let mut idle: Vec<(usize, Instant)> = (0..100).map(|i| (i, idle_since)).collect();
        let closed = reap_idle(&mut idle, |e| (e.1, idle_timeout, false), now);
        assert_eq!(closed.len(), 100 - WARM_IDLE);
        assert_eq!(idle.first().map(|e| e.0), Some(100 - WARM_IDLE));
        assert_eq!(idle.last().map(|e| e.0), Some(99));
        // Within the surplus timeout nothing goes; past the idle timeout everything does.
        let mut fresh: Vec<(usize, Instant)> = (0..100).map(|i| (i, now)).collect();
        assert_eq!(
            reap_idle(&mut fresh, |e| (e.1, idle_timeout, false), now).len(),
            0
        );
        let later = now + idle_timeout;
        assert_eq!(
            reap_idle(&mut fresh, |e| (e.1, idle_timeout, false), later).len(),
            100
        );
    }

    #[test]
    fn closed_idle_connections_are_dropped_at_once() {
        let now = Instant::now();
        let mut idle: Vec<(bool, Instant)> = vec![(true, now), (false, now), (true, now)];
        let closed = reap_idle(&mut idle, |e| (e.1, Duration::from_secs(10), e.0), now);
        assert_eq!(closed.len(), 2);
        assert_eq!(idle.len(), 1);
    }

    #[test]
    fn an_idle_connection_is_closed_once_idle_past_the_time_its_api_allows() {
        let now = Instant::now() + Duration::from_secs(60);
        let since = now - Duration::from_secs(2);
        // Both among the warm ones; the one whose API said `timeout=2` is kept 1 s.
        let mut idle: Vec<(&str, Duration)> = vec![
            ("ours", Duration::from_secs(10)),
            ("announced", Duration::from_secs(1)),
        ];
        let closed = reap_idle(&mut idle, |e| (since, e.1, false), now);
        assert_eq!((closed.len(), idle[0].0), (1, "ours"));
    }

    #[test]
    fn the_keep_alive_timeout_an_api_announces_is_read_from_its_header() {
        let read = |value: &'static str| keep_alive_timeout(&HeaderValue::from_static(value));
        let seconds = |n| Some(Duration::from_secs(n));
        assert_eq!(read("timeout=5"), seconds(5), "Node");
        assert_eq!(read("timeout=5, max=100"), seconds(5), "Apache");
        assert_eq!(read("max=100,timeout=2"), seconds(2));
        assert_eq!(read(" Timeout = 3 "), seconds(3));
        assert_eq!(read("timeout=0"), seconds(0));
        for unreadable in [
            "",
            "max=100",
            "timeout=",
            "timeout=-1",
            "timeout=1.5",
            "timeouts=5",
        ] {
            assert_eq!(read(unreadable), None, "{unreadable:?}");
        }
        assert_eq!(
            read("timeout=99999999999999999999"),
            None,
            "too long to mean"
        );
    }

    #[test]
    fn a_connection_is_reused_until_a_margin_before_the_keep_alive_timeout_its_api_announced() {
        let ours = Duration::from_secs(10);
        let reusable = |keep_alive: Option<&'static str>, connection: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = keep_alive {
                headers.insert(&KEEP_ALIVE, HeaderValue::from_static(value));
            }
            if let Some(value) = connection {
                headers.insert(CONNECTION, HeaderValue::from_static(value));
            }
            reusable_for(http::Version::HTTP_11, &headers, ours)
        };
        let millis = |n| Some(Duration::from_millis(n));
        assert_eq!(reusable(None, None), Some(ours), "nothing said: ours");
        assert_eq!(reusable(Some("timeout=5"), None), millis(4000), "Node");
        assert_eq!(reusable(Some("timeout=2"), None), millis(1000));
        assert_eq!(reusable(Some("timeout=1"), None), millis(500), "half of it");
        assert_eq!(reusable(Some("timeout=0"), None), None, "not kept at all");
        assert_eq!(
            reusable(Some("timeout=60"), None),
            Some(ours),
            "ours is shorter"
        );
        assert_eq!(reusable(Some("max=100"), None), Some(ours));
        assert_eq!(
            reusable(Some("timeout=5"), Some("keep-alive")),
            millis(4000)
        );
        assert_eq!(reusable(Some("timeout=5"), Some("close")), None);
        let http10 = reusable_for(http::Version::HTTP_10, &HeaderMap::new(), ours);
        assert_eq!(http10, None);
    }

    /// A pool of at most `max_open` HTTP/1.1 connections to `address` (for `origin`).
    fn http1_pool(address: ApiAddress, origin: &str, max_open: usize) -> Arc<Pool> {
        let dialer = Dialer {
            address,
            timeout: Duration::from_secs(5),
        };
        let origin = origin.parse().unwrap();
        Pool::new(dialer, &origin, false, max_open, Duration::from_secs(60)).unwrap()
    }

    /// A Unix socket path nothing listens at: every attempt to connect fails at once.
    fn nowhere() -> ApiAddress {
        ApiAddress::UnixSocket(Arc::new(PathBuf::from(
            "/nonexistent/ws2http-test-api.sock",
        )))
    }

    /// An HTTP/1.1 connection over an in-memory pipe, ready for a request (its task waits for
    /// one), and the API's end of the pipe (the connection lasts while it is kept).
    async fn piped_connection() -> (H1, tokio::io::DuplexStream) {
        let (gateway_end, api_end) = tokio::io::duplex(1 << 16);
        let mut connection = handshake_h1(TokioIo::new(gateway_end)).await.unwrap();
        connection.sender.ready().await.unwrap();
        (connection, api_end)
    }

    /// A connection of `pool`'s held by a request, as [`Pool::checkout`] hands one out.
    fn busy(pool: &Pool, connection: H1) -> Lease<'_> {
        pool.state().open += 1;
        pool.adopt(&connection.link.place);
        Lease {
            pool,
            connection: Some(connection),
            reused: false,
            idled: false,
        }
    }

    #[tokio::test]
    async fn a_connection_checked_in_goes_to_a_waiting_request_not_to_one_opening_a_connection() {
        use futures_util::FutureExt;
        let pool = http1_pool(nowhere(), "http://api.test/", 2);
        let (sender, _api_end) = piped_connection().await;
        let held = busy(&pool, sender);
        // A request opens the second connection; it is not polled again, so its attempt
        // stays under way (as one to a distant or silent API host does, for up to half of
        // --upstream-timeout).
        let opening = pool.checkout(None, false);
        tokio::pin!(opening);
        assert!(opening.as_mut().now_or_never().is_none(), "opening");
        let counts = |state: MutexGuard<'_, State>| (state.open, state.connecting);
        assert_eq!(counts(pool.state()), (2, 1));
        // A third finds the pool full and waits.
        let waiting = pool.checkout(None, false);
        tokio::pin!(waiting);
        assert!(waiting.as_mut().now_or_never().is_none(), "waiting");
        held.checkin(pool.idle_timeout);
        let taken = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(
            matches!(taken, Ok(Ok(ref lease)) if lease.reused),
            "the waiting request was not given the connection checked in (woken only when \
             the attempt under way ends)"
        );
    }

    #[tokio::test]
    async fn a_connection_checked_in_goes_to_a_waiting_request_not_to_a_retry_that_wants_a_new_one()
    {
        use futures_util::FutureExt;
        let pool = http1_pool(nowhere(), "http://api.test/", MAX_CONNECTING + 2);
        let (sender, _api_end) = piped_connection().await;
        let held = busy(&pool, sender);
        // As many attempts under way as may be at once, each holding its slot (as to a
        // distant or silent API host, for up to half of --upstream-timeout).
        {
            let mut state = pool.state();
            state.open += MAX_CONNECTING;
            state.connecting = MAX_CONNECTING;
        }
        // A retry handed back by a stale connection, which takes no idle connection, waits
        // for one of them to end; then a request that would take one waits too.
        let retry = pool.checkout(None, true);
        tokio::pin!(retry);
        assert!(retry.as_mut().now_or_never().is_none(), "the retry waits");
        let waiting = pool.checkout(None, false);
        tokio::pin!(waiting);
        assert!(waiting.as_mut().now_or_never().is_none(), "waiting");
        held.checkin(pool.idle_timeout);
        assert!(
            retry.as_mut().now_or_never().is_none(),
            "the retry waits on for an attempt to end"
        );
        let taken = tokio::time::timeout(Duration::from_secs(1), waiting).await;
        assert!(
            matches!(taken, Ok(Ok(ref lease)) if lease.reused),
            "the waiting request slept next to the connection checked in: the retry, woken \
             first, took the wake-up and waited on without using it"
        );
        // One of the attempts ends: the retry goes on, with an attempt of its own (which fails
        // here: nothing listens).
        drop(Opening { pool: &pool });
        let retried = tokio::time::timeout(Duration::from_secs(1), retry).await;
        assert!(
            matches!(retried, Ok(Err(UpstreamError::Unreachable(_)))),
            "the retry was not woken when an attempt ended"
        );
    }

    /// Stands for a request that began to wait when no attempt had failed yet: woken, it looks
    /// at the pool at once, as one on another worker thread may while the task that woke it
    /// has not gone on yet, and notes whether it would fail with an attempt that failed since.
    struct Waiter {
        pool: Weak<Pool>,
        would_fail: Mutex<Vec<bool>>,
    }

    impl std::task::Wake for Waiter {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            let pool = self.pool.upgrade().unwrap();
            let fails = pool.state().failed_while_waiting(Some(0), false).is_some();
            lock(&self.would_fail).push(fails);
        }
    }

    impl Waiter {
        /// A [`Waiter`] woken by `armed`, a wait on `pool`'s `changed` such as a request
        /// waiting for a connection arms (woken once: by a `notify_one` or a `notify_waiters`,
        /// whichever comes first).
        fn arm<'a>(
            pool: &'a Arc<Pool>,
            armed: Pin<&mut tokio::sync::futures::Notified<'a>>,
        ) -> Arc<Waiter> {
            let waiter = Arc::new(Waiter {
                pool: Arc::downgrade(pool),
                would_fail: Mutex::new(Vec::new()),
            });
            let waker = std::task::Waker::from(waiter.clone());
            let mut context = std::task::Context::from_waker(&waker);
            assert!(armed.poll(&mut context).is_pending());
            waiter
        }
    }

    #[tokio::test]
    async fn requests_woken_by_a_failed_attempt_find_its_slot_given_back() {
        let pool = http1_pool(nowhere(), "http://api.test/", 1);
        let changed = pool.changed.notified();
        tokio::pin!(changed);
        let waiter = Waiter::arm(&pool, changed.as_mut());
        let attempt = pool.checkout(None, false).await;
        assert!(matches!(attempt, Err(UpstreamError::Unreachable(_))));
        assert_eq!(
            *lock(&waiter.would_fail),
            [true],
            "woken by the failed attempt, a waiting request saw its slot still open (as an \
             established connection that may come back) and would have tried on its own"
        );
        assert_eq!(pool.open(), 0);
    }

    #[tokio::test]
    async fn requests_woken_by_a_cancelled_attempt_find_its_slot_given_back() {
        use futures_util::FutureExt;
        let pool = http1_pool(nowhere(), "http://api.test/", 2);
        // An attempt failed a moment ago; a request waiting since before it has not looked
        // at the pool since.
        {
            let mut state = pool.state();
            state.open_failures = 1;
            state.last_open_failure = Some("refused".to_owned());
        }
        let changed = pool.changed.notified();
        tokio::pin!(changed);
        let waiter = Waiter::arm(&pool, changed.as_mut());
        // Another request starts an attempt, and goes away while it is under way (its client
        // hung up, its deadline passed).
        let mut attempt = Box::pin(pool.checkout(None, false));
        assert!(attempt.as_mut().now_or_never().is_none(), "under way");
        drop(attempt);
        assert_eq!(
            *lock(&waiter.would_fail),
            [true],
            "woken by the cancelled attempt, a waiting request saw its slot still open (as an \
             established connection that may come back) and would have tried on its own"
        );
        let state = pool.state();
        assert_eq!((state.open, state.connecting), (0, 0));
    }

    /// An API on a loopback port that answers every request `200 fresh`; the pool's origin
    /// and address for it.
    async fn answering_api() -> (String, ApiAddress) {
        let origin = crate::upstream::loopback_api(hyper::service::service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(Response::new(Body::from("fresh")))
        }))
        .await;
        let connector = crate::upstream::network_connector(&crate::config::Config::default());
        (origin, ApiAddress::Network(connector.unwrap()))
    }

    #[tokio::test]
    async fn attempts_whose_host_name_lookup_gets_no_answer_are_unreachable_at_their_timeout() {
        // A resolver that does not answer, with one place: the first attempt's lookup holds
        // it, the second waits for it; each attempt's own time bounds both.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let resolver = super::super::BoundedResolver::with_lookup(
            1,
            Arc::new(move |_host: &str| {
                let _ = released.lock().unwrap().recv();
                Err(std::io::Error::other("no answer"))
            }),
        );
        let connector =
            super::super::network_connector_with(&crate::config::Config::default(), resolver)
                .unwrap();
        let origin: Uri = "http://api.internal:8000/".parse().unwrap();
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let (first, second) = tokio::join!(
            connect_network(connector.clone(), origin.clone(), timeout),
            connect_network(connector, origin, timeout)
        );
        for attempt in [first, second] {
            match attempt {
                Err(UpstreamError::Unreachable(text)) => {
                    assert!(text.contains("timed out after 200ms"), "{text}")
                }
                Err(other) => panic!("{other:?}"),
                Ok(_) => panic!("connected"),
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        drop(release);
    }

    #[tokio::test]
    async fn a_request_handed_back_by_a_stale_connection_is_sent_again_on_a_new_one() {
        let (origin, address) = answering_api().await;
        let pool = http1_pool(address, &origin, 4);
        // Two idle connections the API closed at once: the newest is seen closed only when
        // the request is handed to it (handed back unsent); the other still looks open, and
        // the request sent on it goes unanswered.
        let (crossed, mut crossed_api_end) = piped_connection().await;
        let (handed_back, handed_back_api_end) = piped_connection().await;
        tokio::spawn(async move {
            let mut request = [0; 64];
            let _ = tokio::io::AsyncReadExt::read(&mut crossed_api_end, &mut request).await;
        });
        // Their connections' tasks start and wait for a request.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        busy(&pool, crossed).checkin(pool.idle_timeout);
        busy(&pool, handed_back).checkin(pool.idle_timeout);
        drop(handed_back_api_end);
        let request = Request::post("/m").body(Body::from("hi")).unwrap();
        let mut progress = Progress::new(None, None);
        let answer = pool
            .exchange(request, BodyLimit::Whole(1024), &mut progress, None)
            .await;
        assert_eq!(
            answer
                .map(|answer| answer.body)
                .map_err(|error| error.to_string()),
            Ok(Bytes::from("fresh")),
            "the request handed back went on another idle connection, not a new one"
        );
        assert_eq!(
            pool.state().idle.len(),
            2,
            "a new connection, and the untried idle one"
        );
    }

    /// An idle connection of `pool`'s over a pipe, idle for `idle_for` already; the API's end
    /// of the pipe, handed to `api` once the connection is up.
    async fn idle_piped_connection<F>(
        pool: &Pool,
        idle_for: Duration,
        api: impl FnOnce(tokio::io::DuplexStream) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let (connection, api_end) = piped_connection().await;
        tokio::spawn(api(api_end));
        pool.adopt(&connection.link.place);
        let mut state = pool.state();
        state.open += 1;
        state.idle.push(Idle {
            connection,
            since: Instant::now().checked_sub(idle_for).unwrap(),
            keep_for: pool.idle_timeout,
        });
    }

    /// The API's end of a connection that reads a request and then, after writing `answer`
    /// (its beginning, say), closes it.
    async fn reads_and_closes(mut api_end: tokio::io::DuplexStream, answer: &'static [u8]) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut request = [0; 256];
        let _ = api_end.read(&mut request).await;
        let _ = api_end.write_all(answer).await;
    }

    /// Sends a POST through `pool` and says what came of it: the answer's body, or the error.
    async fn post(pool: &Pool) -> Result<Bytes, String> {
        let request = Request::post("/m").body(Body::from("hi")).unwrap();
        let mut progress = Progress::new(None, None);
        pool.exchange(request, BodyLimit::Whole(1024), &mut progress, None)
            .await
            .map(|answer| answer.body)
            .map_err(|error| error.to_string())
    }

    #[tokio::test]
    async fn a_request_lost_on_a_connection_closed_as_it_came_out_of_idleness_is_sent_again() {
        let (origin, address) = answering_api().await;
        let pool = http1_pool(address, &origin, 4);
        // Idle past IDLE_BEFORE_RESEND; the API reads the request and closes it, answering
        // nothing (as one whose idle timer fired as it came).
        idle_piped_connection(&pool, IDLE_BEFORE_RESEND, |api_end| {
            reads_and_closes(api_end, b"")
        })
        .await;
        assert_eq!(post(&pool).await, Ok(Bytes::from("fresh")));
        let state = pool.state();
        assert_eq!(
            (state.open, state.idle.len()),
            (1, 1),
            "the lost one's place given back; the new one idle"
        );
    }

    /// Takes an idle connection (idle for `idle_for`, its API end played by `api`) for a POST
    /// and checks that the request failed as one that went out (the API may have acted) and
    /// was not sent again on a new connection.
    async fn assert_lost_and_not_sent_again<F>(
        idle_for: Duration,
        api: impl FnOnce(tokio::io::DuplexStream) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        let (origin, address) = answering_api().await;
        let pool = http1_pool(address, &origin, 4);
        idle_piped_connection(&pool, idle_for, api).await;
        let lost = post(&pool).await;
        assert!(
            lost.as_ref()
                .is_err_and(|e| e.starts_with("API request failed")),
            "{lost:?}"
        );
        let state = pool.state();
        assert_eq!((state.open, state.idle.len()), (0, 0));
    }

    #[tokio::test]
    async fn a_request_lost_on_a_connection_in_use_a_moment_before_is_not_sent_again() {
        assert_lost_and_not_sent_again(Duration::from_millis(100), |api_end| {
            reads_and_closes(api_end, b"")
        })
        .await;
    }

    #[tokio::test]
    async fn a_resend_that_cannot_go_out_fails_as_sent_not_as_never_sent() {
        // The idle connection is lost under the request at once, as in the idle-close race,
        // and no new connection can be opened: the first copy went out all the same.
        let pool = http1_pool(nowhere(), "http://api.internal", 4);
        idle_piped_connection(&pool, IDLE_BEFORE_RESEND, |api_end| {
            reads_and_closes(api_end, b"")
        })
        .await;
        assert_a_post_fails_as_sent_once(&pool).await;
        assert_eq!(pool.state().open, 0);
    }

    /// Checks that a POST through `pool`, whose first copy goes out on an idle connection
    /// lost under it and whose second cannot go out, fails as one the API may have seen.
    async fn assert_a_post_fails_as_sent_once(pool: &Pool) {
        let request = Request::post("/m").body(Body::from("hi")).unwrap();
        let mut progress = Progress::new(None, None);
        let failed = pool
            .exchange(request, BodyLimit::Whole(1024), &mut progress, None)
            .await;
        assert!(
            matches!(&failed, Err(UpstreamError::Broken(why)) if why.contains("went out once")),
            "{:?}",
            failed.as_ref().err()
        );
        assert!(
            failed.err().is_some_and(|error| error.outcome_unknown()),
            "a connect is undone, a DELETE not sent again"
        );
    }

    #[tokio::test]
    async fn a_resend_handed_back_by_a_fresh_connection_fails_as_sent_not_as_never_sent() {
        // The idle connection is lost under the request at once, as in the idle-close race;
        // the fresh connection for its second copy is taken by the API and dropped at once
        // (say, as it restarts), so hyper hands that copy back unsent. The first copy went out
        // all the same: the API may have seen it.
        let dir = std::env::temp_dir().join(format!("ws2http-resend-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let dropping = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let pool = http1_pool(
            ApiAddress::UnixSocket(Arc::new(path.clone())),
            "http://api.internal",
            4,
        );
        idle_piped_connection(&pool, IDLE_BEFORE_RESEND, |api_end| {
            reads_and_closes(api_end, b"")
        })
        .await;
        assert_a_post_fails_as_sent_once(&pool).await;
        dropping.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_request_lost_well_after_it_went_out_on_an_idle_connection_is_not_sent_again() {
        // Idle long enough, but the API read the request, worked on it past the resend window
        // and then dropped the connection (a crash): it may have acted.
        assert_lost_and_not_sent_again(IDLE_BEFORE_RESEND * 2, |mut api_end| async move {
            use tokio::io::AsyncReadExt;
            let mut request = [0; 256];
            let _ = api_end.read(&mut request).await;
            tokio::time::sleep(RESEND_WINDOW * 2).await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_lost_after_part_of_its_answer_came_is_not_sent_again() {
        // Idle long enough, but the API had begun to answer: it read the request.
        assert_lost_and_not_sent_again(IDLE_BEFORE_RESEND * 2, |api_end| {
            reads_and_closes(api_end, b"HTTP/1.1 200 OK\r\n")
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_given_up_on_an_api_that_reads_nothing_counts_until_closed_within_the_grace(
    ) {
        use tokio::io::AsyncReadExt;
        let pool = http1_pool(nowhere(), "http://api.test/", 1);
        // The API's end takes 64 KiB and then reads nothing, and stays open: a request with a
        // larger body is still being written when its time runs out, and so would hyper's
        // close of the connection (it flushes what it holds first).
        let (connection, mut api_end) = piped_connection().await;
        let mut lease = busy(&pool, connection);
        let request = Request::post("/m")
            .header(HOST, "api.test")
            .body(Body::from(vec![b'x'; 1 << 20]))
            .unwrap();
        let sender = &mut lease.connection.as_mut().unwrap().sender;
        let sending =
            tokio::time::timeout(Duration::from_secs(1), sender.try_send_request(request));
        assert!(sending.await.is_err(), "the API answered nothing");
        drop(lease);
        tokio::time::sleep(CLOSE_GRACE / 2).await;
        assert_eq!(
            pool.open(),
            1,
            "given up, its socket still open: it counts against the pool until it is closed"
        );
        tokio::time::sleep(CLOSE_GRACE / 2 + Duration::from_millis(10)).await;
        assert_eq!(
            pool.open(),
            0,
            "closed within CLOSE_GRACE: its place given back"
        );
        // The API's end reads what it had, and then the end of the stream.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(1), api_end.read_to_end(&mut rest));
        assert!(
            matches!(closed.await, Ok(Ok(_))),
            "the connection was not closed"
        );
    }

    #[tokio::test]
    async fn a_connection_let_go_of_gives_its_place_back_once_its_task_has_closed_it() {
        let pool = http1_pool(nowhere(), "http://api.test/", 1);
        let (connection, _api_end) = piped_connection().await;
        drop(busy(&pool, connection));
        assert_eq!(pool.open(), 1, "its task has not run yet");
        let waited = tokio::time::timeout(Duration::from_secs(1), async {
            while pool.open() > 0 {
                tokio::task::yield_now().await;
            }
        });
        assert!(waited.await.is_ok(), "a healthy connection closes at once");
    }

    #[tokio::test]
    async fn a_healthy_connection_not_yet_ready_at_checkin_is_checked_in_once_it_is() {
        // A connection whose task has not yet come back to wait for another request (here:
        // not yet polled at all) when its answer is checked in: not let go of, but put back
        // once hyper says it is ready.
        let pool = http1_pool(nowhere(), "http://api.test/", 2);
        let (gateway_end, _api_end) = tokio::io::duplex(1 << 16);
        let connection = handshake_h1(TokioIo::new(gateway_end)).await.unwrap();
        assert!(!connection.sender.is_ready(), "its task has not run yet");
        busy(&pool, connection).checkin(Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(1);
        while pool.state().idle.is_empty() {
            assert!(Instant::now() < deadline, "never checked in");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.open(), 1);
    }

    #[tokio::test]
    async fn a_connection_still_writing_its_request_body_is_not_checked_in() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (origin, address) = answering_api().await;
        let pool = http1_pool(address, &origin, 4);
        // The API answers after the first bytes of the request, and then reads nothing more
        // of that connection, nor closes it: hyper has the whole answer while it still writes
        // the body (1 MiB, the pipe holds 64 KiB), and can take no other request until it has.
        idle_piped_connection(&pool, Duration::ZERO, |mut api_end| async move {
            let mut head = [0; 256];
            let _ = api_end.read(&mut head).await;
            let _ = api_end
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                .await;
            std::future::pending::<()>().await;
        })
        .await;
        let request = Request::post("/m")
            .body(Body::from(vec![b'x'; 1 << 20]))
            .unwrap();
        let mut progress = Progress::new(None, None);
        let answer = pool
            .exchange(request, BodyLimit::Whole(1024), &mut progress, None)
            .await
            .map(|answer| answer.body);
        assert_eq!(answer.ok(), Some(Bytes::from("hi")));
        // Not put back once its wait for readiness is over either: let go of, and closed.
        tokio::time::sleep(READY_AT_CHECKIN * 3).await;
        assert_eq!(pool.state().idle.len(), 0, "checked in while still writing");
        let deadline = Instant::now() + CLOSE_GRACE * 2;
        while pool.open() > 0 {
            assert!(
                Instant::now() < deadline,
                "the stuck connection was never closed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The next request goes on a new connection, at once.
        let next = tokio::time::timeout(Duration::from_secs(1), post(&pool)).await;
        assert_eq!(next.ok(), Some(Ok(Bytes::from("fresh"))));
    }

    #[tokio::test]
    async fn a_retry_in_a_full_pool_opens_its_connection_in_the_place_of_the_idle_one_it_closes() {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;
        let (origin, address) = answering_api().await;
        let pool = http1_pool(address, &origin, 1);
        let (idle, mut idle_api_end) = piped_connection().await;
        busy(&pool, idle).checkin(pool.idle_timeout);
        let retry = pool.checkout(None, true);
        tokio::pin!(retry);
        assert!(retry.as_mut().now_or_never().is_none(), "under way");
        assert_eq!(
            pool.open(),
            1,
            "the retry's connection counted beside the idle one it closes, still open"
        );
        // The idle connection's socket closes; its place passes to the retry, which has not
        // been polled since: not given back meanwhile, for another request to take.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(CLOSE_GRACE * 2, idle_api_end.read_to_end(&mut rest));
        assert!(
            matches!(closed.await, Ok(Ok(0))),
            "the idle one was not closed"
        );
        assert_eq!(pool.open(), 1, "its place given back, not passed on");
        let lease = tokio::time::timeout(Duration::from_secs(5), retry)
            .await
            .expect("the retry went on once the idle connection was closed")
            .unwrap();
        assert!(!lease.reused, "a new connection");
        let state = pool.state();
        assert_eq!((state.open, state.connecting, state.idle.len()), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_retry_that_goes_away_while_the_idle_connection_it_closes_closes_leaves_its_place_free(
    ) {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;
        let (origin, address) = answering_api().await;
        let pool = http1_pool(address, &origin, 1);
        // Gone before the idle connection's socket closed, and after.
        for after_the_close in [false, true] {
            let (idle, mut idle_api_end) = piped_connection().await;
            busy(&pool, idle).checkin(pool.idle_timeout);
            let mut retry = Box::pin(pool.checkout(None, true));
            assert!(retry.as_mut().now_or_never().is_none(), "under way");
            let mut rest = Vec::new();
            if after_the_close {
                idle_api_end.read_to_end(&mut rest).await.unwrap();
                assert_eq!(pool.open(), 1, "after the close: the retry's place");
            }
            drop(retry);
            idle_api_end.read_to_end(&mut rest).await.unwrap();
            let waited = tokio::time::timeout(Duration::from_secs(5), async {
                while pool.open() > 0 {
                    tokio::task::yield_now().await;
                }
            });
            assert!(waited.await.is_ok(), "a place left counted");
            // Free indeed: a request opens a connection in it.
            let lease = tokio::time::timeout(Duration::from_secs(5), pool.checkout(None, false))
                .await
                .expect("the place was free")
                .unwrap();
            assert_eq!((pool.open(), pool.state().connecting), (1, 0));
            drop(lease);
            let gone = tokio::time::timeout(Duration::from_secs(5), async {
                while pool.open() > 0 {
                    tokio::task::yield_now().await;
                }
            });
            assert!(
                gone.await.is_ok(),
                "the new connection's place left counted"
            );
        }
    }

    #[tokio::test]
    async fn a_retry_in_a_full_pool_closes_an_idle_connection_to_open_a_new_one() {
        let (origin, address) = answering_api().await;
        let pool = http1_pool(address, &origin, 1);
        let (idle, _api_end) = piped_connection().await;
        busy(&pool, idle).checkin(pool.idle_timeout);
        let lease = tokio::time::timeout(Duration::from_secs(5), pool.checkout(None, true))
            .await
            .expect("not left waiting for a connection next to an idle one")
            .unwrap();
        assert!(!lease.reused, "a new connection");
        let state = pool.state();
        assert_eq!(
            (state.open, state.idle.len()),
            (1, 0),
            "the idle one closed"
        );
    }
}
