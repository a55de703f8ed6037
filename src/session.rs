//! One websocket's life, in one task: read frames and turn each message into an API request,
//! write the API's answers back in order, deliver pushes from the connection's bounded mailbox,
//! keep the connection alive with pings, and end it with exactly one DELETE to the API (queued
//! in [`crate::departures`], so the task ends as soon as the socket is closed).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::task::AtomicWaker;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_websockets::proto::ProtocolError;
use tokio_websockets::{CloseCode, Message, WebSocketStream};

use crate::departures::{Departure, Departures};
use crate::identity::{ClientId, ConnectionId};
use crate::metrics::CloseReason;
use crate::upstream::{ApiAnswer, ConnectionContext, UpstreamError};
use crate::Shared;

mod read_progress;
pub(crate) use read_progress::ReadProgress;

/// Close code sent to a connection replaced by a newer one with the same ClientId.
pub const CLOSE_REPLACED: u16 = 4000;
/// How long a closing handshake may take once our close frame is out.
const CLOSE_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// A message waiting in a connection's mailbox.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The message body.
    pub payload: Bytes,
    /// Sent as a binary frame when true, text otherwise.
    pub binary: bool,
}

/// Something the gateway asks a session to do, besides delivering messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Close with this code and reason (from the control API).
    Close {
        /// Close code sent to the client.
        code: u16,
        /// Close reason sent to the client and given to the API.
        reason: String,
    },
    /// A newer connection took this ClientId.
    Replaced,
    /// The gateway is shutting down: finish in-flight work, then close with 1001.
    Shutdown,
}

/// Why a push was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The mailbox holds `--max-queued-messages` or `--max-queued-bytes` already.
    QueueFull,
    /// The connection is closing or closed.
    Closed,
}

impl std::fmt::Display for PushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PushError::QueueFull => "the connection's outbound queue is full",
            PushError::Closed => "the connection is closing",
        })
    }
}

impl std::error::Error for PushError {}

#[derive(Default)]
struct Mailbox {
    queue: VecDeque<Outbound>,
    queued_bytes: usize,
    command: Option<Command>,
    /// No more pushes; and no more commands, but the drain's `Shutdown` while the session
    /// runs on after the client's close frame (see [`SessionHandle::command`]).
    closed: bool,
    /// The session has taken its `Shutdown`.
    shutdown_seen: bool,
    /// The session has ended: nothing more at all.
    ended: bool,
}

/// The shared side of a session: what the registry holds and the control API talks to.
pub struct SessionHandle {
    /// The gateway's id of this websocket.
    pub connection_id: ConnectionId,
    /// The client's chosen id.
    pub client_id: ClientId,
    /// The peer's address.
    pub remote: SocketAddr,
    /// When the API accepted the connection.
    pub connected_at: SystemTime,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    mailbox: Mutex<Mailbox>,
    waker: AtomicWaker,
}

/// A snapshot of a session for `GET /<ClientId>` on the control listener.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Messages received from the client.
    pub messages_in: u64,
    /// Messages sent to the client.
    pub messages_out: u64,
    /// Pushes waiting in the mailbox.
    pub queued: usize,
    /// Bytes waiting in the mailbox.
    pub queued_bytes: usize,
}

impl SessionHandle {
    /// A handle for a connection the API has just accepted.
    pub fn new(connection_id: ConnectionId, client_id: ClientId, remote: SocketAddr) -> Self {
        SessionHandle {
            connection_id,
            client_id,
            remote,
            connected_at: SystemTime::now(),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            mailbox: Mutex::new(Mailbox::default()),
            waker: AtomicWaker::new(),
        }
    }

    fn mailbox(&self) -> std::sync::MutexGuard<'_, Mailbox> {
        // A panic while holding this lock cannot leave the mailbox half-updated.
        self.mailbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message for the socket, within the given bounds.
    pub fn push(
        &self,
        message: Outbound,
        max_messages: usize,
        max_bytes: usize,
        accepted: &AtomicU64,
    ) -> Result<(), PushError> {
        let mut mailbox = self.mailbox();
        if mailbox.closed || mailbox.command.is_some() {
            return Err(PushError::Closed);
        }
        let bytes = mailbox.queued_bytes + message.payload.len();
        if mailbox.queue.len() >= max_messages || (bytes > max_bytes && !mailbox.queue.is_empty()) {
            return Err(PushError::QueueFull);
        }
        mailbox.queued_bytes = bytes;
        mailbox.queue.push_back(message);
        // Counted before the mailbox can be closed on it, so that no push is counted
        // undelivered before it was counted accepted.
        accepted.fetch_add(1, Ordering::Relaxed);
        drop(mailbox);
        self.waker.wake();
        Ok(())
    }

    /// Asks the session to end; the first command given wins. Says whether this one did (a
    /// session already ending keeps the reason and code it had). After the client's close
    /// frame only the drain's `Shutdown` is taken: the library's echo of that frame may wait
    /// on a socket that takes no writes, and the drain's deadline must end it before the
    /// shutdown's grace period does (its DELETE would be lost), not only `--write-timeout`.
    pub fn command(&self, command: Command) -> bool {
        let mut mailbox = self.mailbox();
        if mailbox.ended
            || mailbox.command.is_some()
            || (mailbox.closed && command != Command::Shutdown)
        {
            return false;
        }
        mailbox.command = Some(command);
        drop(mailbox);
        self.waker.wake();
        true
    }

    /// Pushes waiting in the mailbox.
    pub fn queued(&self) -> usize {
        self.mailbox().queue.len()
    }

    /// Counters and queue depth right now.
    pub fn info(&self) -> SessionInfo {
        let mailbox = self.mailbox();
        SessionInfo {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            queued: mailbox.queue.len(),
            queued_bytes: mailbox.queued_bytes,
        }
    }

    fn poll_mailbox(&self, cx: &mut Context<'_>, take_message: bool) -> MailboxEvent {
        self.waker.register(cx.waker());
        let mut mailbox = self.mailbox();
        if let Some(command) = mailbox.command.take() {
            // Keep a marker so later pushes and commands are refused.
            mailbox.command = Some(command.clone());
            if command != Command::Shutdown {
                return MailboxEvent::Command(command);
            }
            if !mailbox.shutdown_seen {
                mailbox.shutdown_seen = true;
                mailbox.closed = true;
                return MailboxEvent::Command(command);
            }
        }
        if take_message {
            if let Some(message) = mailbox.queue.pop_front() {
                mailbox.queued_bytes -= message.payload.len();
                let behind = mailbox.queue.len();
                if behind == 0 {
                    // Its room is given back once emptied (40 bytes a place, up to
                    // `--max-queued-messages` of them after a backlog), not kept for the
                    // connection's life.
                    mailbox.queue = VecDeque::new();
                }
                return MailboxEvent::Message(message, behind);
            }
        }
        MailboxEvent::Empty
    }

    /// Takes no more pushes or commands: the client has sent its close frame, and the socket
    /// takes no more data (a push then gets `404`; those already queued count undelivered).
    fn refuse_more(&self) {
        self.mailbox().closed = true;
    }

    /// Refuses further pushes and commands; hands back the pushes still queued, and a command
    /// taken but not yet seen by the session.
    fn close_mailbox(&self) -> (VecDeque<Outbound>, Option<Command>) {
        let mut mailbox = self.mailbox();
        mailbox.closed = true;
        mailbox.ended = true;
        mailbox.queued_bytes = 0;
        (std::mem::take(&mut mailbox.queue), mailbox.command.take())
    }
}

enum MailboxEvent {
    Command(Command),
    /// A push, and how many more wait behind it.
    Message(Outbound, usize),
    /// No push taken.
    Empty,
}

/// An API answer that came in while the socket took no writes, or while pushes waited: it
/// goes out once the pushes queued before it have gone out, ahead of any later push.
struct Answered {
    answer: Result<ApiAnswer, UpstreamError>,
    /// The session's `pushes_taken` once those pushes are out.
    after_pushes: u32,
}

impl Answered {
    /// Whether the pushes queued before it are out, `pushes_taken` having been taken.
    fn is_due(&self, pushes_taken: u32) -> bool {
        is_due(self.after_pushes, pushes_taken)
    }
}

/// Moves the answers at the head of `in_flight` that have already come in (in message order,
/// up to the first still at the API) to the end of `answered`, each to go out once
/// `after_pushes` pushes have.
fn take_finished(in_flight: &mut InFlight, answered: &mut VecDeque<Answered>, after_pushes: u32) {
    use futures_util::FutureExt as _;
    while let Some(Some(answer)) = in_flight.next().now_or_never() {
        answered.push_back(Answered {
            answer,
            after_pushes,
        });
    }
}

/// Whether a reply to go out once `pushes_taken` reaches `after_pushes` may go now. (The
/// counts wrap; the ones compared are never 2^31 apart, as no mailbox holds that many.)
fn is_due(after_pushes: u32, pushes_taken: u32) -> bool {
    pushes_taken.wrapping_sub(after_pushes) < 1 << 31
}

/// A data message a close sends ahead of its close frame.
enum Outgoing {
    Reply(Bytes, bool),
    Push(Outbound),
}

/// The replies (each with the `after_pushes` of its [`Answered`]) and the `queued` pushes in
/// the order they came, `pushes_taken` pushes having gone out already: each reply behind the
/// pushes queued before it, ahead of later ones.
fn in_arrival_order(
    replies: Vec<(Bytes, bool, u32)>,
    queued: VecDeque<Outbound>,
    mut pushes_taken: u32,
) -> Vec<Outgoing> {
    let mut out = Vec::with_capacity(replies.len() + queued.len());
    let mut queued = queued.into_iter();
    for (payload, binary, after_pushes) in replies {
        while !is_due(after_pushes, pushes_taken) {
            let Some(push) = queued.next() else {
                break;
            };
            out.push(Outgoing::Push(push));
            pushes_taken = pushes_taken.wrapping_add(1);
        }
        out.push(Outgoing::Reply(payload, binary));
    }
    out.extend(queued.map(Outgoing::Push));
    out
}

type AnswerFuture = Pin<Box<dyn Future<Output = Result<ApiAnswer, UpstreamError>> + Send>>;

/// The API requests of one connection's messages, answered in the order they were sent.
/// Allocated only while one is at the API: an empty `FuturesOrdered` still holds two
/// allocations (about 150 bytes), which every idle connection would otherwise keep.
#[derive(Default)]
struct InFlight(Option<FuturesOrdered<AnswerFuture>>);

impl InFlight {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(FuturesOrdered::is_empty)
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, FuturesOrdered::len)
    }

    fn push_back(&mut self, request: AnswerFuture) {
        self.0
            .get_or_insert_with(FuturesOrdered::new)
            .push_back(request);
    }
}

impl futures_util::Stream for InFlight {
    type Item = Result<ApiAnswer, UpstreamError>;

    /// The next answer in message order; the allocations are given back once none is left.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(requests) = self.0.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = requests.poll_next_unpin(cx);
        if requests.is_empty() {
            self.0 = None;
        }
        polled
    }
}

enum Event {
    Frame(Option<Result<Message, tokio_websockets::Error>>),
    Answer(Result<ApiAnswer, UpstreamError>),
    Push(Outbound),
    Command(Command),
    WriteFailed(tokio_websockets::Error),
    Timer,
}

/// How a session ends: what the client is told, what the API is told, and how it is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ending {
    why: CloseReason,
    /// Close frame we send, if the socket can still take one.
    send_close: Option<(u16, String)>,
    /// Body of the DELETE.
    api_reason: String,
    /// `X-Close-Code` of the DELETE.
    api_code: Option<u16>,
}

impl Ending {
    fn ours(why: CloseReason, code: u16, reason: &str) -> Ending {
        Ending {
            why,
            send_close: Some((code, reason.to_owned())),
            api_reason: reason.to_owned(),
            api_code: Some(code),
        }
    }

    fn eof() -> Ending {
        Ending {
            why: CloseReason::Eof,
            send_close: None,
            api_reason: "EOF".to_owned(),
            api_code: None,
        }
    }

    /// This ending, unless a control DELETE was taken (and answered `200`) while the session
    /// was deciding to end: the API, told `200`, then hears the DELETE's code and reason. If
    /// the session was ending on a timer of its own or an API failure, the client gets that
    /// close too. Not after the other endings: the client has gone or was told already (a
    /// protocol error's close frame is the library's), or its socket takes no writes (a slow
    /// consumer, which keeps its short close); those count as what they were.
    fn unless_closed_by(self, pending: Option<Command>) -> Ending {
        let own_decision = matches!(
            self.why,
            CloseReason::IdleTimeout | CloseReason::PingTimeout | CloseReason::UpstreamFailure
        );
        match pending {
            Some(Command::Close { code, reason }) if own_decision => {
                Ending::ours(CloseReason::Control, code, &reason)
            }
            Some(Command::Close { code, reason }) => Ending {
                api_reason: reason,
                api_code: Some(code),
                ..self
            },
            _ => self,
        }
    }
}

/// A socket that counts the bytes written to it, so a session whose writes are stalled can tell
/// a client that reads slowly (still progressing) from one that stopped reading, and notes
/// bytes read, so that a client sending one long frame slowly is heard before the frame ends,
/// and whether they were a data message's, so that its upload is no idleness.
pub(crate) trait TransferProgress {
    /// Bytes written to the socket so far.
    fn bytes_written(&self) -> u64;

    /// Whether any bytes were read since the last call.
    fn took_reads(&mut self) -> bool;

    /// Whether a data message is part-way in and some of its bytes were read since the last
    /// call (see [`ReadProgress`]): a message still arriving, not pings or pongs.
    fn took_message_bytes(&mut self) -> bool;
}

/// Runs an accepted connection until it ends; then hands its DELETE, with the connection's
/// `permit`, to the departures queue.
///
/// Not an `async fn`: one would keep its arguments (the socket among them) in its state beside
/// the session they are moved into, so every connection's task would hold the socket twice.
/// The session is built here and only it moves into the future.
pub(crate) fn run<S>(
    socket: WebSocketStream<S>,
    handle: Arc<SessionHandle>,
    context: Arc<ConnectionContext>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + TransferProgress,
{
    let mut session = Session::new(socket, handle, context, shared);
    async move {
        let ending = session.run_loop().await;
        // Boxed so that the closing steps' state does not enlarge every idle connection's task.
        Box::pin(session.finish(ending, permit)).await;
    }
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + TransferProgress,
{
    /// A session of a websocket that has just opened.
    fn new(
        socket: WebSocketStream<S>,
        handle: Arc<SessionHandle>,
        context: Arc<ConnectionContext>,
        shared: Arc<Shared>,
    ) -> Session<S> {
        let now = Instant::now();
        let mut session = Session {
            socket,
            in_flight: InFlight::default(),
            answered: VecDeque::new(),
            pushes_taken: 0,
            handle,
            context,
            timer: Box::pin(tokio::time::sleep_until(now)),
            timer_at: now,
            last_received: now,
            last_data: now,
            last_ping: now,
            write_stalled_since: None,
            written_at_stall: 0,
            unflushed: false,
            unflushed_messages: 0,
            unflushed_pushes: 0,
            reading: true,
            listening: true,
            drain_deadline: None,
            peer_close: None,
            shared,
        };
        session.schedule_timer(now);
        session
    }
}

/// Queues the DELETE for a connection the API accepted but whose upgrade never completed.
pub(crate) fn abandoned(
    handle: Arc<SessionHandle>,
    context: Arc<ConnectionContext>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    shared
        .registry
        .remove(&handle.client_id, handle.connection_id);
    // A websocket that never opened: its DELETE says EOF, without a close code, unless a
    // control DELETE was answered `200` for it meanwhile: then it carries that one's.
    let (queued, pending) = handle.close_mailbox();
    count_undelivered(&shared, queued.len());
    shared.metrics.connection_closed(CloseReason::Eof);
    depart(
        &shared,
        context,
        Ending::eof().unless_closed_by(pending),
        permit,
    );
}

/// Tells the API of a connection that never opened although the API approved it (or never
/// said): its handshake ended first. The DELETE's body is `reason`; no close code, as there
/// was never a websocket.
pub(crate) fn departed_before_opening(
    shared: &Arc<Shared>,
    context: Arc<ConnectionContext>,
    reason: &str,
    permit: OwnedSemaphorePermit,
) {
    let ending = Ending {
        why: CloseReason::UpstreamFailure,
        send_close: None,
        api_reason: reason.to_owned(),
        api_code: None,
    };
    depart(shared, context, ending, permit);
}

/// Counts pushes that were accepted but will never be written.
fn count_undelivered(shared: &Shared, undelivered: usize) {
    if undelivered > 0 {
        shared
            .metrics
            .pushes_undelivered
            .fetch_add(undelivered as u64, Ordering::Release);
    }
}

/// Counts `sent` data messages as sent on `handle`'s websocket.
fn count_sent_messages(shared: &Shared, handle: &SessionHandle, sent: u64) {
    if sent > 0 {
        handle.messages_out.fetch_add(sent, Ordering::Relaxed);
        shared
            .metrics
            .messages_sent
            .fetch_add(sent, Ordering::Relaxed);
    }
}

/// Counts a closed websocket: `sent` data messages went out while it closed, `delivered` of
/// the `accepted` pushes it still had.
fn record_close(
    shared: &Shared,
    handle: &SessionHandle,
    why: CloseReason,
    accepted: usize,
    sent: usize,
    delivered: usize,
) {
    count_sent_messages(shared, handle, sent as u64);
    // Counted against what was taken, so that one lost in a write that failed or ran out of
    // time is counted too.
    let undelivered = accepted - delivered;
    if undelivered > 0 {
        tracing::debug!(
            client_id = %handle.client_id,
            connection_id = %handle.connection_id,
            undelivered,
            "pushes still queued when the websocket closed were not delivered"
        );
    }
    count_undelivered(shared, undelivered);
    shared.metrics.connection_closed(why);
    tracing::debug!(
        client_id = %handle.client_id,
        connection_id = %handle.connection_id,
        reason = why.label(),
        "websocket closed"
    );
}

/// What closing a websocket sent.
struct Closed {
    /// Queued pushes that went out.
    pushes: usize,
    /// Replies that went out.
    replies: usize,
    /// Whether the socket was flushed, so that what was handed to it before went out too.
    flushed: bool,
}

/// Closes the websocket for `ending`: the `outgoing` replies and pushes go out, in that
/// order, before the close frame (a push and then a DELETE on the control API arrive in that
/// order), unless the socket has stopped taking writes; all within the close's time limit.
async fn close_socket<S>(
    mut socket: WebSocketStream<S>,
    ending: &Ending,
    outgoing: Vec<Outgoing>,
) -> Closed
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut pushes_fed, mut replies_fed) = (0, 0);
    let (mut flushed, mut written_by_reading) = (false, false);
    if let Some((code, reason)) = &ending.send_close {
        let code = CloseCode::try_from(*code).unwrap_or(CloseCode::NORMAL_CLOSURE);
        let close = Message::close(Some(code), reason);
        let deliver = ending.why != CloseReason::SlowConsumer;
        let handshake = async {
            for message in outgoing.into_iter().filter(|_| deliver) {
                let (payload, binary, push) = match message {
                    Outgoing::Reply(payload, binary) => (payload, binary, false),
                    Outgoing::Push(push) => (push.payload, push.binary, true),
                };
                if socket.feed(data_message(payload, binary)).await.is_err() {
                    break;
                }
                if push {
                    pushes_fed += 1;
                } else {
                    replies_fed += 1;
                }
            }
            // Errors here mean the peer is gone already; the DELETE still goes out. What was
            // fed counts as sent once the close frame behind it is flushed.
            flushed = socket.send(close).await.is_ok();
            // Read to the end. A socket whose peer closed first refuses our close frame, and
            // ends only once what was fed before is flushed (a failed flush is an error).
            loop {
                match socket.next().await {
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break,
                    None => {
                        // The library's queue is out; a transport that buffers too (TLS)
                        // must flush it before it counts.
                        written_by_reading =
                            socket.is_write_queue_empty() && socket.get_mut().flush().await.is_ok();
                        break;
                    }
                }
            }
        };
        let limit = if ending.why == CloseReason::SlowConsumer {
            Duration::from_millis(100)
        } else {
            CLOSE_HANDSHAKE_TIMEOUT
        };
        let _ = tokio::time::timeout(limit, handshake).await;
        flushed = flushed || written_by_reading;
    } else {
        // Flush a close acknowledgement the library may have queued.
        let done = tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, socket.flush()).await;
        flushed = matches!(done, Ok(Ok(())));
    }
    // What was fed went out only if it was flushed (with nothing fed, `flushed` covers what
    // was handed to the socket before).
    Closed {
        pushes: if flushed { pushes_fed } else { 0 },
        replies: if flushed { replies_fed } else { 0 },
        flushed,
    }
}

/// What of an API answer goes back on the socket: its body, and whether it is binary; none
/// for an empty body or `204`.
fn reply(answer: ApiAnswer) -> Option<(Bytes, bool)> {
    if answer.body.is_empty() || answer.status == http::StatusCode::NO_CONTENT {
        return None;
    }
    let binary = answer.is_binary() || std::str::from_utf8(&answer.body).is_err();
    Some((answer.body, binary))
}

/// The websocket message for a payload.
fn data_message(payload: Bytes, binary: bool) -> Message {
    if binary {
        Message::binary(payload)
    } else {
        Message::text(payload)
    }
}

/// Hands the API's DELETE for an ended connection to the departures queue.
fn depart(
    shared: &Arc<Shared>,
    context: Arc<ConnectionContext>,
    ending: Ending,
    permit: OwnedSemaphorePermit,
) {
    let departure = Departure {
        context,
        reason: Bytes::from(ending.api_reason),
        code: ending.api_code,
        permit,
        tries: 0,
    };
    Departures::push(shared, departure);
}

struct Session<S> {
    socket: WebSocketStream<S>,
    /// The API requests of this connection's messages, answered in the order they were sent.
    in_flight: InFlight,
    /// Answers taken from `in_flight` while the socket took no writes (or pushes queued before
    /// them waited), waiting for it in order: a request never waits on the client, so its API
    /// slot and connection go back at once.
    answered: VecDeque<Answered>,
    /// Pushes taken from the mailbox so far (wrapping).
    pushes_taken: u32,
    handle: Arc<SessionHandle>,
    context: Arc<ConnectionContext>,
    shared: Arc<Shared>,
    timer: Pin<Box<Sleep>>,
    timer_at: Instant,
    last_received: Instant,
    last_data: Instant,
    last_ping: Instant,
    write_stalled_since: Option<Instant>,
    /// Bytes the socket had taken when the stall (or its last progress) was noticed.
    written_at_stall: u64,
    unflushed: bool,
    /// Data messages handed to the socket and not yet counted as written, and how many of them
    /// are pushes: counted as sent once the socket's write queue is empty; if the socket closes
    /// before it is, the pushes among them count as undelivered.
    unflushed_messages: u32,
    unflushed_pushes: u32,
    /// False once the gateway stops reading for good (shutdown's drain).
    reading: bool,
    /// Whether the last poll read the socket: false while writes are backed up or every
    /// `--pipeline` place waits on the API. Silence while not listening is no sign of a dead
    /// client and does not count toward `--ping-timeout`.
    listening: bool,
    drain_deadline: Option<Instant>,
    /// Code (absent in a bare close frame) and reason of the client's close frame.
    peer_close: Option<(Option<u16>, String)>,
}

impl<S> Session<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + TransferProgress,
{
    async fn run_loop(&mut self) -> Ending {
        loop {
            if let Some(deadline) = self.drain_deadline {
                // Pushes queued after the client's close frame never go out (finish() counts
                // them undelivered): nothing to wait for.
                let done = self.in_flight.is_empty()
                    && self.answered.is_empty()
                    && (self.handle.queued() == 0 || self.peer_close.is_some());
                if done || Instant::now() >= deadline {
                    let ending = Ending::ours(CloseReason::Shutdown, 1001, "going away");
                    return self.closed_by_client_first(ending);
                }
            }
            let event = poll_fn(|cx| self.poll_event(cx)).await;
            if let Some(ending) = self.handle_event(event) {
                return self.closed_by_client_first(ending);
            }
        }
    }

    /// `ending`, unless the client's close frame came first: then the connection ends as
    /// the client closed it, with its code and reason for the API, whatever else ended it
    /// (the library's echo of that frame waiting on a socket that takes no writes, say, or
    /// the shutdown's drain).
    fn closed_by_client_first(&mut self, ending: Ending) -> Ending {
        if self.peer_close.is_some() && ending.why != CloseReason::Client {
            self.client_left()
        } else {
            ending
        }
    }

    /// Puts an answer in `answered`, to go out once the `queued` pushes waiting now have.
    fn wait_behind_pushes(&mut self, answer: Result<ApiAnswer, UpstreamError>, queued: usize) {
        self.answered.push_back(Answered {
            answer,
            after_pushes: self.pushes_taken.wrapping_add(queued as u32),
        });
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let writable = match self.socket.poll_ready_unpin(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Event::WriteFailed(e)),
            Poll::Pending => false,
        };
        // The library writes its queue out on its own too (poll_ready above, reads): what has
        // left it is sent, whether or not our own flush has come round.
        // (With TLS the transport buffers too: it is flushed before they count.)
        if self.unflushed_messages > 0 && self.socket.is_write_queue_empty() {
            match self.socket.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.flushed(),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::WriteFailed(e)),
                Poll::Pending => {}
            }
        }
        // Once the client's close frame is in, pushes stay queued: the socket takes no more
        // data, and finish() counts them undelivered.
        let take_push = writable && self.peer_close.is_none();
        // Answers and pushes go out in the order they came in: an answer goes behind the
        // pushes queued when it came, ahead of later ones (which cannot hold it back).
        let mut ready = None;
        if writable && self.answered.is_empty() {
            match self.in_flight.poll_next_unpin(cx) {
                // A failure is never parked behind pushes: it ends the connection now (the
                // pushes queued still go out first, see finish()).
                Poll::Ready(Some(failed @ Err(_))) => return Poll::Ready(Event::Answer(failed)),
                Poll::Ready(Some(answer)) => ready = Some(answer),
                _ => {}
            }
        }
        let answer_due = ready.is_none()
            && writable
            && (self.answered.front()).is_some_and(|a| a.is_due(self.pushes_taken));
        match self.handle.poll_mailbox(cx, take_push && !answer_due) {
            MailboxEvent::Command(command) => {
                if let Some(answer) = ready {
                    self.wait_behind_pushes(answer, self.handle.queued());
                }
                return Poll::Ready(Event::Command(command));
            }
            MailboxEvent::Message(message, behind) => {
                self.pushes_taken = self.pushes_taken.wrapping_add(1);
                if let Some(answer) = ready {
                    self.wait_behind_pushes(answer, behind);
                }
                return Poll::Ready(Event::Push(message));
            }
            MailboxEvent::Empty => {}
        }
        if let Some(answer) = ready {
            return Poll::Ready(Event::Answer(answer));
        }
        if writable {
            if let Some(answered) = self.answered.pop_front() {
                if self.answered.is_empty() {
                    // Room for several answers (about 150 bytes each) is not kept once they
                    // have gone out.
                    self.answered = VecDeque::new();
                }
                return Poll::Ready(Event::Answer(answered.answer));
            }
        } else {
            // (While the socket takes writes, `in_flight` was polled above.) A failure ends
            // the connection now: no reply goes out after it anyway (see finish()).
            while let Poll::Ready(Some(answer)) = self.in_flight.poll_next_unpin(cx) {
                if answer.is_err() {
                    return Poll::Ready(Event::Answer(answer));
                }
                // Behind the pushes queued when the answer is seen (not when the mailbox was
                // looked at above: one that came in since came before this answer).
                self.wait_behind_pushes(answer, self.handle.queued());
            }
        }
        let mut write_pending = !writable;
        if writable && self.unflushed {
            match self.socket.poll_flush_unpin(cx) {
                Poll::Ready(Ok(())) => self.flushed(),
                Poll::Ready(Err(e)) => return Poll::Ready(Event::WriteFailed(e)),
                Poll::Pending => write_pending = true,
            }
        }
        if write_pending {
            if self.write_stalled_since.is_none() {
                let now = Instant::now();
                self.write_stalled_since = Some(now);
                self.written_at_stall = self.socket.get_ref().bytes_written();
                self.schedule_timer(now);
            } else {
                // Some of it may have gone out (this poll may come from the socket taking
                // more): the write timeout then counts from now, not from the next timer
                // tick, which could be up to --write-timeout later.
                self.note_write_progress(Instant::now());
            }
        } else if self.write_stalled_since.take().is_some() {
            // The stalled write went out: not idle till now.
            self.last_data = Instant::now();
        }
        // Read only while writes flow: each ping read queues a pong, so a client that sends
        // pings but never reads would otherwise grow our write queue without bound.
        let waiting_on_api = self.in_flight.len() + self.answered.len();
        self.listening = self.reading && writable && waiting_on_api < self.shared.config.pipeline;
        // The timer before the socket: a client whose frames keep coming (a flood of pings,
        // each already in the read buffer) would otherwise be read from on every poll, and
        // its idle timeout and our pings would never come.
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        if self.listening {
            if let Poll::Ready(frame) = self.socket.poll_next_unpin(cx) {
                return Poll::Ready(Event::Frame(frame));
            }
        }
        Poll::Pending
    }

    fn handle_event(&mut self, event: Event) -> Option<Ending> {
        match event {
            Event::Frame(Some(Ok(message))) => self.on_message(message),
            Event::Frame(Some(Err(error))) => Some(self.on_read_error(error)),
            Event::Frame(None) => Some(self.client_left()),
            Event::Answer(Ok(answer)) => {
                self.on_answer(answer);
                None
            }
            Event::Answer(Err(error)) => {
                let code = if error == UpstreamError::Overloaded {
                    1013
                } else {
                    1011
                };
                tracing::warn!(
                    client_id = %self.handle.client_id,
                    connection_id = %self.handle.connection_id,
                    %error,
                    "message not handled; closing the websocket with {code} `{}` (unless a \
                     control DELETE or the client's own close came first)",
                    error.close_reason()
                );
                Some(Ending::ours(
                    CloseReason::UpstreamFailure,
                    code,
                    error.close_reason(),
                ))
            }
            Event::Push(message) => {
                self.send(message.payload, message.binary, true);
                None
            }
            Event::Command(Command::Close { code, reason }) => {
                Some(Ending::ours(CloseReason::Control, code, &reason))
            }
            Event::Command(Command::Replaced) => Some(Ending::ours(
                CloseReason::Replaced,
                CLOSE_REPLACED,
                "replaced",
            )),
            Event::Command(Command::Shutdown) => {
                self.reading = false;
                let deadline = self
                    .shared
                    .shutdown_deadline()
                    .unwrap_or_else(|| Instant::now() + self.shared.config.shutdown_timeout);
                self.drain_deadline = Some(deadline);
                if deadline < self.timer_at {
                    self.timer_at = deadline;
                    self.timer.as_mut().reset(deadline);
                }
                None
            }
            Event::WriteFailed(error) => {
                tracing::debug!(
                    client_id = %self.handle.client_id,
                    connection_id = %self.handle.connection_id,
                    %error,
                    "write to websocket failed"
                );
                Some(self.client_left())
            }
            Event::Timer => self.on_timer(),
        }
    }

    /// The ending when the client's socket is gone: with the code and reason of its close
    /// frame if it sent one (a client that resets right after its close frame keeps them),
    /// else `EOF`.
    fn client_left(&mut self) -> Ending {
        match self.peer_close.take() {
            Some((code, reason)) => Ending {
                why: CloseReason::Client,
                send_close: None,
                api_reason: reason,
                api_code: code,
            },
            None => Ending::eof(),
        }
    }

    fn on_message(&mut self, message: Message) -> Option<Ending> {
        let now = Instant::now();
        self.last_received = now;
        if message.is_text() || message.is_binary() {
            self.last_data = now;
            let binary = message.is_binary();
            let payload = Bytes::from(message.into_payload());
            self.handle.messages_in.fetch_add(1, Ordering::Relaxed);
            self.shared
                .metrics
                .messages_received
                .fetch_add(1, Ordering::Relaxed);
            let shared = Arc::clone(&self.shared);
            let context = Arc::clone(&self.context);
            self.in_flight.push_back(Box::pin(async move {
                shared.upstream.message(&context, payload, binary).await
            }));
        } else if let Some((code, reason)) = message.as_close() {
            // 1005 stands for "the frame had no code"; the API then gets no X-Close-Code.
            let code = Some(u16::from(code)).filter(|c| *c != 1005);
            self.peer_close = Some((code, reason.to_owned()));
            self.handle.refuse_more();
        } else if message.is_close() {
            self.peer_close = Some((None, String::new()));
            self.handle.refuse_more();
        }
        if self.peer_close.is_some() {
            // The library has queued its echo of the close frame: flushed by the session like
            // its own writes, so that a client that does not read it is held to
            // --write-timeout, not kept until it hangs up.
            self.unflushed = true;
        }
        None
    }

    fn on_read_error(&mut self, error: tokio_websockets::Error) -> Ending {
        let (why, code, reason) = match &error {
            // The same text as the library's own close frame for a single oversized frame.
            tokio_websockets::Error::PayloadTooLong { max_len, .. } => {
                (CloseReason::TooBig, 1009, format!("max length: {max_len}"))
            }
            tokio_websockets::Error::Protocol(ProtocolError::InvalidUtf8) => {
                (CloseReason::ProtocolError, 1007, "invalid utf8".to_owned())
            }
            tokio_websockets::Error::Protocol(e) => {
                (CloseReason::ProtocolError, 1002, e.to_string())
            }
            _ => return self.client_left(),
        };
        tracing::debug!(
            client_id = %self.handle.client_id,
            connection_id = %self.handle.connection_id,
            %error,
            "closing the websocket with {code}"
        );
        // The library has already queued its own close frame for most errors; for a message
        // that grew too big over several fragments it has not, so ours goes out.
        Ending::ours(why, code, &reason)
    }

    fn on_answer(&mut self, answer: ApiAnswer) {
        match reply(answer) {
            Some((payload, binary)) => self.send(payload, binary, false),
            // An answer without a reply ends the exchange all the same: not idle till now.
            None => self.last_data = Instant::now(),
        }
    }

    /// Hands a reply, or a push, to the socket; it counts as sent once flushed.
    fn send(&mut self, payload: Bytes, binary: bool, push: bool) {
        // poll_event only yields pushes and answers when the sink was ready.
        if self
            .socket
            .start_send_unpin(data_message(payload, binary))
            .is_ok()
        {
            self.unflushed = true;
            self.unflushed_messages += 1;
            self.unflushed_pushes += u32::from(push);
            self.last_data = Instant::now();
        } else if push {
            // The socket has failed: the push was taken, and will never be written.
            count_undelivered(&self.shared, 1);
        }
    }

    /// After a completed flush: what was handed to the socket is sent.
    fn flushed(&mut self) {
        self.unflushed = false;
        self.count_sent();
    }

    /// Counts the messages handed to the socket as sent: they have been written.
    fn count_sent(&mut self) {
        let sent = u64::from(std::mem::take(&mut self.unflushed_messages));
        self.unflushed_pushes = 0;
        count_sent_messages(&self.shared, &self.handle, sent);
    }

    /// While a write is stalled: if bytes went out since it stalled, or since this last saw
    /// some go, the write timeout counts from `now`. Says whether they did.
    fn note_write_progress(&mut self, now: Instant) -> bool {
        let written = self.socket.get_ref().bytes_written();
        if written == self.written_at_stall {
            return false;
        }
        self.written_at_stall = written;
        self.write_stalled_since = Some(now);
        true
    }

    fn on_timer(&mut self) -> Option<Ending> {
        let now = Instant::now();
        if self.socket.get_mut().took_reads() {
            // Part of a frame came in: the client is there, though no whole frame is yet.
            self.last_received = now;
        }
        // Taken at every look, so that it says "since the last look".
        let message_arriving = self.socket.get_mut().took_message_bytes();
        if !self.listening || self.write_stalled_since.is_some() {
            // Not reading, so not hearing; or our writes wait on the client, and our ping (or
            // its pong) waits behind them: --write-timeout and --upstream-timeout bound this
            // state, and --ping-timeout counts again from when it ends.
            self.last_received = now;
        }
        if let Some(since) = self.write_stalled_since {
            // Bytes that went out since (slow, but the client is reading) restart the write
            // timeout from here.
            let write_timeout = self.shared.config.write_timeout;
            if !self.note_write_progress(now) && now >= since + write_timeout {
                return Some(Ending {
                    why: CloseReason::SlowConsumer,
                    send_close: Some((1008, "slow consumer".to_owned())),
                    api_reason: "slow consumer".to_owned(),
                    api_code: Some(1008),
                });
            }
        }
        let config = &self.shared.config;
        if config.ping_interval.is_some() && now >= self.last_received + config.ping_timeout {
            return Some(Ending::ours(CloseReason::PingTimeout, 1001, "ping timeout"));
        }
        if let Some(idle) = config.idle_timeout {
            // A message at the API, data going out to a slow reader, or a message whose bytes
            // are still coming in (a large upload over a slow link) is no idleness: the idle
            // time counts from when that is done, or from the last look that saw its bytes
            // come. Pings and pongs, whole or in part, never count.
            let busy = !self.in_flight.is_empty()
                || !self.answered.is_empty()
                || self.write_stalled_since.is_some()
                || message_arriving;
            if busy {
                self.last_data = now;
            } else if now >= self.last_data + idle {
                return Some(Ending::ours(CloseReason::IdleTimeout, 1000, "idle timeout"));
            }
        }
        if let Some(interval) = config.ping_interval {
            if now >= self.last_received.max(self.last_ping) + interval {
                self.last_ping = now;
                if self
                    .socket
                    .start_send_unpin(Message::ping(Bytes::new()))
                    .is_ok()
                {
                    self.unflushed = true;
                }
            }
        }
        self.schedule_timer(now);
        None
    }

    /// Points the timer at the earliest moment something may be due; firing early is harmless.
    fn schedule_timer(&mut self, now: Instant) {
        let config = &self.shared.config;
        let far = now + Duration::from_secs(3600);
        let mut at = far;
        if let Some(interval) = config.ping_interval {
            at = at.min(self.last_received.max(self.last_ping) + interval);
            at = at.min(self.last_received + config.ping_timeout);
        }
        if let Some(idle) = config.idle_timeout {
            at = at.min(self.last_data + idle);
        }
        if let Some(since) = self.write_stalled_since {
            at = at.min(since + config.write_timeout);
        }
        if let Some(deadline) = self.drain_deadline {
            at = at.min(deadline);
        }
        let at = at.max(now + Duration::from_millis(1));
        if at != self.timer_at {
            self.timer_at = at;
            self.timer.as_mut().reset(at);
        }
    }

    async fn finish(self, ending: Ending, permit: OwnedSemaphorePermit) {
        let Session {
            socket,
            mut in_flight,
            mut answered,
            handle,
            context,
            shared,
            unflushed_messages,
            unflushed_pushes,
            pushes_taken,
            ..
        } = self;
        // Answers that came in but were not taken yet (the close was noticed in the same
        // wake-up) count as given: they go out behind every push queued now.
        // After an API failure nothing behind it goes out: the failed message's reply is
        // missing, and a client matching replies by position would take the next one for it.
        if ending.why != CloseReason::UpstreamFailure {
            take_finished(
                &mut in_flight,
                &mut answered,
                pushes_taken.wrapping_add(handle.queued() as u32),
            );
        }
        // Replies the API gave while the socket was backed up (or pushes waited): they go out
        // among the queued pushes in the order they came, as they would have had the
        // connection stayed (the messages they answer came in before the close, and before
        // any failure: an answer that failed is never parked among them).
        let replies: Vec<(Bytes, bool, u32)> = answered
            .into_iter()
            .map_while(|answered| Some((answered.answer.ok()?, answered.after_pushes)))
            .filter_map(|(answer, after_pushes)| {
                reply(answer).map(|(payload, binary)| (payload, binary, after_pushes))
            })
            .collect();
        shared
            .registry
            .remove(&handle.client_id, handle.connection_id);
        let (queued, pending) = handle.close_mailbox();
        let ending = ending.unless_closed_by(pending);
        // The pushes still queued, and those handed to the socket whose flush is not done.
        let accepted = queued.len() + unflushed_pushes as usize;
        // The socket is closed (and dropped) apart from the requests still at the API, which
        // are driven meanwhile: their answers (which can no longer be sent) free their API
        // slot and connection as they come, and are not timed as if the API had taken the
        // close handshake's time to answer.
        let why = ending.why;
        let closing = async {
            let outgoing = in_arrival_order(replies, queued, pushes_taken);
            let closed = close_socket(socket, &ending, outgoing).await;
            // What was handed to the socket before is sent if the close flushed it.
            let (earlier_sent, earlier_pushes) = if closed.flushed {
                (unflushed_messages as usize, unflushed_pushes as usize)
            } else {
                (0, 0)
            };
            // Counted as soon as the socket is closed, not when the API has answered too.
            record_close(
                &shared,
                &handle,
                why,
                accepted,
                closed.pushes + closed.replies + earlier_sent,
                closed.pushes + earlier_pushes,
            );
        };
        let answers = async { while in_flight.next().await.is_some() {} };
        futures_util::future::join(closing, answers).await;
        // The API hears of the close only after it has answered every earlier message (all
        // of them are answered by now).
        depart(&shared, context, ending, permit);
    }
}

/// For unit tests: a gateway bound with `config` on free loopback ports and one connection
/// registered in it: the gateway's shared state, the connection's handle, its context and its
/// place under `--max-connections`.
#[cfg(test)]
pub(crate) async fn one_connection(
    config: crate::Config,
) -> (
    Arc<Shared>,
    Arc<SessionHandle>,
    ConnectionContext,
    OwnedSemaphorePermit,
) {
    let gateway = crate::Gateway::bind_on_free_ports(config).await;
    let shared = Arc::clone(&gateway.shared);
    let handle = Arc::new(SessionHandle::new(
        ConnectionId::next(),
        ClientId::from_path("/a").unwrap(),
        ([127, 0, 0, 1], 1).into(),
    ));
    let context = shared
        .upstream
        .context(
            handle.connection_id,
            handle.client_id.clone(),
            &http::HeaderMap::new(),
        )
        .unwrap();
    let permit = Arc::clone(&shared.connection_permits)
        .try_acquire_owned()
        .unwrap();
    shared.registry.insert(Arc::clone(&handle));
    (shared, handle, context, permit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle() -> SessionHandle {
        SessionHandle::new(
            ConnectionId::next(),
            ClientId::from_path("/a").unwrap(),
            ([127, 0, 0, 1], 1).into(),
        )
    }

    /// A `pushes_accepted` counter for the tests' pushes.
    static ACCEPTED: AtomicU64 = AtomicU64::new(0);

    fn message(len: usize) -> Outbound {
        Outbound {
            payload: Bytes::from(vec![b'x'; len]),
            binary: false,
        }
    }

    #[test]
    fn a_close_sends_each_reply_behind_the_pushes_queued_before_it() {
        let names = |out: Vec<Outgoing>| -> Vec<String> {
            out.into_iter()
                .map(|o| match o {
                    Outgoing::Reply(p, _) => format!("r{}", p.len()),
                    Outgoing::Push(p) => format!("p{}", p.payload.len()),
                })
                .collect()
        };
        let reply = |len: usize, after: u32| (Bytes::from(vec![b'r'; len]), false, after);
        let queued = || VecDeque::from([message(1), message(2), message(3)]);
        for taken in [0, u32::MAX - 1] {
            // Came after the first queued push, and after the second.
            let replies = vec![
                reply(1, taken.wrapping_add(1)),
                reply(2, taken.wrapping_add(2)),
            ];
            assert_eq!(
                names(in_arrival_order(replies, queued(), taken)),
                ["p1", "r1", "p2", "r2", "p3"]
            );
            // Came before any of them.
            assert_eq!(
                names(in_arrival_order(vec![reply(1, taken)], queued(), taken)),
                ["r1", "p1", "p2", "p3"]
            );
        }
    }

    /// A client of a test session, scripted: the bytes it sends first, what its reads find
    /// then, and what becomes of the gateway's writes.
    struct TestClient {
        /// Sent first, read at once, whole.
        incoming: Vec<u8>,
        /// What reads find once `incoming` is read.
        then: Reads,
        /// What becomes of the gateway's writes.
        writes: Writes,
        /// Bytes of the gateway's writes taken so far.
        written: u64,
    }

    /// What a [`TestClient`]'s reads find after its `incoming` bytes.
    enum Reads {
        /// Nothing, for ever: pending without a wake-up (the session's own timer polls again).
        Nothing,
        /// The end of the stream.
        End,
        /// A ping whenever read, without end, each taking from the task's budget as a socket
        /// with data does.
        Pings,
    }

    /// What becomes of the gateway's writes to a [`TestClient`].
    enum Writes {
        /// None is taken: a client that reads nothing.
        Refused,
        /// Taken into a buffer that no flush ever empties: a TLS layer over a peer that has
        /// gone (flushes fail).
        Lost,
        /// All taken at once, and kept in the buffer given, if any.
        Taken(Option<Arc<Mutex<Vec<u8>>>>),
        /// Taken only as far as the [`Allowance`] lets.
        Trickled(Arc<Mutex<Allowance>>),
    }

    /// How many bytes a [`Writes::Trickled`] client takes now, and the session's waker to
    /// call when it is given more.
    #[derive(Default)]
    struct Allowance {
        bytes: usize,
        waker: Option<std::task::Waker>,
    }

    impl TestClient {
        /// Sends `incoming`, then nothing, and reads nothing.
        fn silent(incoming: Vec<u8>) -> TestClient {
            TestClient::new(incoming, Reads::Nothing, Writes::Refused)
        }

        /// Gone behind a TLS layer: reads find the end, flushes fail.
        fn gone() -> TestClient {
            TestClient::new(Vec::new(), Reads::End, Writes::Lost)
        }

        /// Sends nothing (reads find the end) and keeps all the gateway writes in `written`.
        fn recording(written: Arc<Mutex<Vec<u8>>>) -> TestClient {
            TestClient::new(Vec::new(), Reads::End, Writes::Taken(Some(written)))
        }

        /// Sends pings without end and takes every write.
        fn ping_flood() -> TestClient {
            TestClient::new(Vec::new(), Reads::Pings, Writes::Taken(None))
        }

        /// Sends nothing and takes writes only as far as `allowance` lets.
        fn trickling(allowance: Arc<Mutex<Allowance>>) -> TestClient {
            TestClient::new(Vec::new(), Reads::Nothing, Writes::Trickled(allowance))
        }

        fn new(incoming: Vec<u8>, then: Reads, writes: Writes) -> TestClient {
            TestClient {
                incoming,
                then,
                writes,
                written: 0,
            }
        }
    }

    impl AsyncRead for TestClient {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            if !this.incoming.is_empty() {
                buf.put_slice(&std::mem::take(&mut this.incoming));
                return Poll::Ready(Ok(()));
            }
            match this.then {
                Reads::Nothing => Poll::Pending,
                Reads::End => Poll::Ready(Ok(())),
                Reads::Pings => {
                    let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
                    // A masked ping with no payload and a zero key.
                    buf.put_slice(&[0x89, 0x80, 0, 0, 0, 0]);
                    coop.made_progress();
                    Poll::Ready(Ok(()))
                }
            }
        }
    }

    impl AsyncWrite for TestClient {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let n = match &this.writes {
                Writes::Refused => return Poll::Pending,
                Writes::Lost | Writes::Taken(None) => buf.len(),
                Writes::Taken(Some(kept)) => {
                    kept.lock().unwrap().extend_from_slice(buf);
                    buf.len()
                }
                Writes::Trickled(allowance) => {
                    let mut allowance = allowance.lock().unwrap();
                    if allowance.bytes == 0 {
                        allowance.waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    let n = buf.len().min(allowance.bytes);
                    allowance.bytes -= n;
                    n
                }
            };
            this.written += n as u64;
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            if matches!(self.writes, Writes::Lost) {
                Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()))
            } else {
                Poll::Ready(Ok(()))
            }
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl TransferProgress for TestClient {
        fn bytes_written(&self) -> u64 {
            self.written
        }

        fn took_reads(&mut self) -> bool {
            matches!(self.then, Reads::Pings)
        }

        fn took_message_bytes(&mut self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn a_client_whose_pings_never_stop_coming_still_reaches_its_idle_timeout() {
        let config = crate::Config {
            ping_interval: None,
            idle_timeout: Some(Duration::from_millis(100)),
            ..crate::Config::default()
        };
        // Every read finds another ping: the timer must still be heard.
        let shared = run_client_until_it_ends(config, None, TestClient::ping_flood()).await;
        assert_eq!(closed_by(&shared, CloseReason::IdleTimeout), "1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_write_timeout_counts_from_the_last_write_progress_not_the_next_timer_tick() {
        let config = crate::Config {
            ping_interval: None,
            write_timeout: Duration::from_secs(1),
            ..crate::Config::default()
        };
        let (shared, handle, context, permit) = one_connection(config).await;
        assert_eq!(
            handle.push(message(64 * 1024), 10, 1 << 20, &ACCEPTED),
            Ok(())
        );
        let allowance = Arc::new(Mutex::new(Allowance::default()));
        let socket = tokio_websockets::ServerBuilder::new()
            .serve(TestClient::trickling(Arc::clone(&allowance)));
        let started = Instant::now();
        let session = tokio::spawn(run(
            socket,
            handle,
            Arc::new(context),
            Arc::clone(&shared),
            permit,
        ));
        // The push's write stalls at once; 200 ms later the client reads a little, then
        // nothing more.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waker = {
            let mut allowance = allowance.lock().unwrap();
            allowance.bytes = 1000;
            allowance.waker.take()
        };
        waker.expect("the session waits to write").wake();
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("the session ends")
            .unwrap();
        let took = started.elapsed();
        assert_eq!(closed_by(&shared, CloseReason::SlowConsumer), "1");
        // Closed 1 s after that read (the close itself may take a little: a frame that
        // cannot be written is not waited for long), not 1 s after the timer first saw it.
        assert!(
            took >= Duration::from_millis(1200) && took < Duration::from_millis(1700),
            "closed {took:?} after the stall began; the last progress was at 200 ms"
        );
    }

    /// Runs a session of a gateway with `config` (its API nowhere) over a client that sends
    /// `incoming` and reads nothing, with `pushed` queued first, until it ends (within 5 s);
    /// returns the gateway's shared state, to read how it ended.
    async fn run_until_it_ends(
        config: crate::Config,
        pushed: Option<Outbound>,
        incoming: Vec<u8>,
    ) -> Arc<Shared> {
        run_client_until_it_ends(config, pushed, TestClient::silent(incoming)).await
    }

    /// Runs a session of a gateway with `config` (its API nowhere) over `client`, with
    /// `pushed` queued first, until it ends (within 5 s); returns the gateway's shared state.
    async fn run_client_until_it_ends(
        config: crate::Config,
        pushed: Option<Outbound>,
        client: TestClient,
    ) -> Arc<Shared> {
        let (shared, handle, context, permit) = one_connection(config).await;
        if let Some(message) = pushed {
            assert_eq!(handle.push(message, 10, 1 << 20, &ACCEPTED), Ok(()));
        }
        let socket = tokio_websockets::ServerBuilder::new().serve(client);
        let session = run(
            socket,
            handle,
            Arc::new(context),
            Arc::clone(&shared),
            permit,
        );
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("the session ends");
        shared
    }

    /// The frames in what a server wrote (unmasked, each under 126 bytes): opcode, payload.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while bytes.len() >= 2 {
            let (opcode, len) = (bytes[0] & 0x0f, usize::from(bytes[1] & 0x7f));
            assert!(len < 126, "a test frame is short");
            out.push((opcode, bytes[2..2 + len].to_vec()));
            bytes = &bytes[2 + len..];
        }
        out
    }

    #[tokio::test]
    async fn answers_in_when_a_control_close_is_seen_go_out_before_its_close_frame() {
        let config = crate::Config {
            ping_interval: None,
            pipeline: 2,
            ..crate::Config::default()
        };
        let (mut session, handle, permit, written) = recorded_session(config).await;
        // Both answers are in when the session next wakes, and so is the API's DELETE.
        session.in_flight.push_back(answer("a1"));
        session.in_flight.push_back(answer("a2"));
        assert!(handle.command(close(4001, "bye")));
        let ending = tokio::time::timeout(Duration::from_secs(5), session.run_loop())
            .await
            .expect("the session sees the close");
        tokio::time::timeout(Duration::from_secs(5), session.finish(ending, permit))
            .await
            .expect("the session ends");
        let mut close_frame = 4001u16.to_be_bytes().to_vec();
        close_frame.extend_from_slice(b"bye");
        assert_eq!(
            frames(&written.lock().unwrap()),
            [(1, b"a1".to_vec()), (1, b"a2".to_vec()), (8, close_frame)]
        );
    }

    fn closed_by(shared: &Shared, reason: CloseReason) -> String {
        let text = shared
            .metrics
            .render(shared.upstream.load(), shared.departures.load());
        let label = format!(
            "connections_closed_by_reason{{reason=\"{}\"}} ",
            reason.label()
        );
        let line = text.lines().find(|l| l.starts_with(&label)).unwrap();
        line[label.len()..].to_owned()
    }

    #[test]
    fn an_answer_is_due_once_the_pushes_before_it_are_taken_also_when_the_count_wraps() {
        for taken_then in [0, 7, u32::MAX - 1] {
            let answered = Answered {
                answer: Err(UpstreamError::Overloaded),
                after_pushes: taken_then.wrapping_add(2),
            };
            assert!(!answered.is_due(taken_then));
            assert!(!answered.is_due(taken_then.wrapping_add(1)));
            assert!(answered.is_due(taken_then.wrapping_add(2)));
            assert!(answered.is_due(taken_then.wrapping_add(1000)));
        }
    }

    /// A `200` answer with `body`.
    fn ok_answer(body: &'static str) -> ApiAnswer {
        ApiAnswer {
            status: http::StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    /// An API answer that has come in, with `body`.
    fn answer(body: &'static str) -> AnswerFuture {
        Box::pin(std::future::ready(Ok(ok_answer(body))))
    }

    /// A session of a gateway with `config` (its API nowhere) over a [`TestClient::recording`]:
    /// the session, its handle, its place under `--max-connections`, and what it writes.
    async fn recorded_session(
        config: crate::Config,
    ) -> (
        Session<TestClient>,
        Arc<SessionHandle>,
        OwnedSemaphorePermit,
        Arc<Mutex<Vec<u8>>>,
    ) {
        let (shared, handle, context, permit) = one_connection(config).await;
        let written = Arc::new(Mutex::new(Vec::new()));
        let socket = tokio_websockets::ServerBuilder::new()
            .serve(TestClient::recording(Arc::clone(&written)));
        let session = Session::new(socket, Arc::clone(&handle), Arc::new(context), shared);
        (session, handle, permit, written)
    }

    #[test]
    fn requests_in_flight_hold_no_allocation_while_none_is_at_the_api() {
        use futures_util::FutureExt as _;
        let mut in_flight = InFlight::default();
        assert!(
            in_flight.0.is_none(),
            "a new connection allocates nothing for them"
        );
        in_flight.push_back(answer("a1"));
        in_flight.push_back(answer("a2"));
        assert_eq!(in_flight.len(), 2);
        let first = in_flight.next().now_or_never().flatten().unwrap().unwrap();
        assert_eq!(first.body, "a1");
        assert!(in_flight.0.is_some(), "kept while one is still at the API");
        let second = in_flight.next().now_or_never().flatten().unwrap().unwrap();
        assert_eq!(second.body, "a2");
        assert!(
            in_flight.0.is_none(),
            "given back once the last is answered"
        );
        assert!(in_flight.is_empty());
        assert!(matches!(in_flight.next().now_or_never(), Some(None)));
    }

    #[test]
    fn the_push_queue_gives_back_its_room_once_emptied() {
        let handle = handle();
        for _ in 0..64 {
            assert_eq!(handle.push(message(8), 64, 1 << 20, &ACCEPTED), Ok(()));
        }
        assert!(handle.mailbox().queue.capacity() >= 64);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for behind in (0..64).rev() {
            match handle.poll_mailbox(&mut cx, true) {
                MailboxEvent::Message(_, left) => assert_eq!(left, behind),
                _ => panic!("a queued push is taken"),
            }
        }
        assert_eq!(handle.mailbox().queue.capacity(), 0);
        assert_eq!(handle.info().queued_bytes, 0);
    }

    #[tokio::test]
    async fn answers_that_waited_for_the_socket_give_back_their_room_once_sent() {
        let config = crate::Config {
            ping_interval: None,
            pipeline: 4,
            ..crate::Config::default()
        };
        let (mut session, _handle, _permit, _written) = recorded_session(config).await;
        for body in ["a1", "a2", "a3"] {
            session.answered.push_back(Answered {
                answer: Ok(ok_answer(body)),
                after_pushes: 0,
            });
        }
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        for expected in ["a1", "a2", "a3"] {
            match session.poll_event(&mut cx) {
                Poll::Ready(Event::Answer(Ok(answer))) => assert_eq!(answer.body, expected),
                _ => panic!("the waiting answer {expected} goes out"),
            }
        }
        assert!(session.answered.is_empty());
        assert_eq!(session.answered.capacity(), 0);
    }

    #[tokio::test]
    async fn after_an_api_failure_the_replies_before_it_go_out_and_none_after_it() {
        let config = crate::Config {
            ping_interval: None,
            pipeline: 3,
            ..crate::Config::default()
        };
        let (mut session, _handle, permit, written) = recorded_session(config).await;
        // The first message's reply waited for the socket; the second failed; the third's
        // answer came in too, after the failure.
        session.answered.push_back(Answered {
            answer: Ok(ok_answer("a1")),
            after_pushes: 0,
        });
        session.in_flight.push_back(answer("a3"));
        let ending = Ending::ours(CloseReason::UpstreamFailure, 1011, "upstream timeout");
        tokio::time::timeout(Duration::from_secs(5), session.finish(ending, permit))
            .await
            .expect("the session ends");
        let mut close_frame = 1011u16.to_be_bytes().to_vec();
        close_frame.extend_from_slice(b"upstream timeout");
        assert_eq!(
            frames(&written.lock().unwrap()),
            [(1, b"a1".to_vec()), (8, close_frame)]
        );
    }

    #[tokio::test]
    async fn an_api_failure_taken_while_a_push_waits_ends_the_connection_as_a_failure() {
        // The failure and a push come in together; the push backs the socket up. The failure
        // must not wait behind it until --write-timeout calls the client a slow consumer.
        let config = crate::Config {
            ping_interval: None,
            write_timeout: Duration::from_millis(500),
            ..crate::Config::default()
        };
        let (shared, handle, context, _permit) = one_connection(config).await;
        assert_eq!(
            handle.push(message(64 * 1024), 10, 1 << 20, &ACCEPTED),
            Ok(())
        );
        let socket = tokio_websockets::ServerBuilder::new().serve(TestClient::silent(Vec::new()));
        let mut session = Session::new(socket, handle, Arc::new(context), shared);
        session
            .in_flight
            .push_back(Box::pin(std::future::ready(Err(UpstreamError::Timeout(
                Duration::from_secs(1),
            )))));
        let ending = tokio::time::timeout(Duration::from_secs(5), session.run_loop())
            .await
            .expect("the session ends");
        assert_eq!(ending.why, CloseReason::UpstreamFailure, "{ending:?}");
    }

    #[tokio::test]
    async fn a_delete_answered_before_the_upgrade_completed_gives_the_api_its_code_and_reason() {
        // An API on a loopback port that hands over each request's method, X-Close-Code and
        // body.
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let api = crate::upstream::loopback_api(hyper::service::service_fn(
            move |request: http::Request<_>| {
                let seen_tx = seen_tx.clone();
                async move {
                    let method = request.method().clone();
                    let code = request
                        .headers()
                        .get("x-close-code")
                        .map(|v| v.to_str().unwrap_or("").to_owned());
                    let body = http_body_util::BodyExt::collect(request.into_body())
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let _ = seen_tx.send((method, code, body));
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from("ok")),
                    ))
                }
            },
        ))
        .await;
        let config = crate::Config {
            api: api.parse().unwrap(),
            ..crate::Config::default()
        };
        let (shared, handle, context, permit) = one_connection(config).await;
        assert!(
            handle.command(close(4001, "bye")),
            "the DELETE is answered 200"
        );
        abandoned(handle, Arc::new(context), shared, permit);
        let (method, code, body) = tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
            .await
            .expect("the API is told")
            .expect("a request");
        assert_eq!(method, http::Method::DELETE);
        assert_eq!(
            (code.as_deref(), &body[..]),
            (Some("4001"), &b"bye"[..]),
            "the API's DELETE carries the code and reason of the DELETE answered 200"
        );
    }

    #[test]
    fn answers_that_came_in_before_the_close_was_seen_are_kept_in_order() {
        let mut in_flight = InFlight::default();
        in_flight.push_back(answer("a1"));
        in_flight.push_back(answer("a2"));
        in_flight.push_back(Box::pin(std::future::pending()) as AnswerFuture);
        // Came in after the one still at the API: it waits for it, as its reply would.
        in_flight.push_back(answer("a4"));
        let mut answered = VecDeque::from([Answered {
            answer: Err(UpstreamError::Overloaded),
            after_pushes: 1,
        }]);
        take_finished(&mut in_flight, &mut answered, 5);
        let bodies: Vec<_> = answered
            .iter()
            .map(|a| match &a.answer {
                Ok(answer) => (
                    String::from_utf8_lossy(&answer.body).into_owned(),
                    a.after_pushes,
                ),
                Err(_) => ("error".to_owned(), a.after_pushes),
            })
            .collect();
        assert_eq!(
            bodies,
            [("error".into(), 1), ("a1".into(), 5), ("a2".into(), 5)]
        );
        assert_eq!(
            in_flight.len(),
            2,
            "the one at the API and the one behind it stay"
        );
    }

    #[tokio::test]
    async fn silence_while_a_push_waits_to_be_written_is_no_ping_timeout() {
        let config = crate::Config {
            ping_interval: Some(Duration::from_millis(50)),
            ping_timeout: Duration::from_millis(200),
            write_timeout: Duration::from_millis(1500),
            ..crate::Config::default()
        };
        // Small enough for the library to take at once (under its flush threshold), so the
        // socket still takes writes while the flush waits on a client that reads nothing.
        let shared = run_until_it_ends(config, Some(message(100)), Vec::new()).await;
        assert_eq!(closed_by(&shared, CloseReason::PingTimeout), "0");
        assert_eq!(closed_by(&shared, CloseReason::SlowConsumer), "1");
    }

    #[tokio::test]
    async fn a_client_that_closes_and_then_reads_nothing_ends_as_it_closed_not_as_a_slow_consumer()
    {
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = crate::Config {
            ping_interval: None,
            write_timeout: Duration::from_millis(300),
            api: format!("http://{}/", api.local_addr().unwrap())
                .parse()
                .unwrap(),
            ..crate::Config::default()
        };
        // Close 4321 `bye`, masked with a zero key; the library's echo of it is never written.
        let close = vec![0x88, 0x85, 0, 0, 0, 0, 0x10, 0xE1, b'b', b'y', b'e'];
        let started = Instant::now();
        let shared = run_until_it_ends(config, None, close).await;
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "ended {:?} after the close, before the write timeout",
            started.elapsed()
        );
        assert_eq!(closed_by(&shared, CloseReason::SlowConsumer), "0");
        assert_eq!(closed_by(&shared, CloseReason::Client), "1");
        // The API hears the client's own close, as for any client close.
        let delete = tokio::time::timeout(Duration::from_secs(5), one_request(&api))
            .await
            .expect("a DELETE within 5 s");
        assert!(delete.starts_with("DELETE /a HTTP/1.1\r\n"), "{delete}");
        assert!(
            delete
                .to_ascii_lowercase()
                .contains("\r\nx-close-code: 4321\r\n"),
            "{delete}"
        );
        assert!(delete.ends_with("\r\n\r\nbye"), "{delete}");
    }

    #[tokio::test]
    async fn a_client_that_closed_and_reads_nothing_is_ended_by_the_drain_before_its_write_timeout()
    {
        // The client's close frame is read; the library's echo of it is never written, and
        // --write-timeout is 60 s. The drain (--shutdown-timeout 300 ms) must end it, as the
        // client closed it, well within the shutdown's grace period, so that its DELETE goes.
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = crate::Config {
            ping_interval: None,
            write_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_millis(300),
            api: format!("http://{}/", api.local_addr().unwrap())
                .parse()
                .unwrap(),
            ..crate::Config::default()
        };
        // Close 4321 `bye`, masked with a zero key.
        let close = vec![0x88, 0x85, 0, 0, 0, 0, 0x10, 0xE1, b'b', b'y', b'e'];
        let (shared, handle, context, permit) = one_connection(config).await;
        let socket = tokio_websockets::ServerBuilder::new().serve(TestClient::silent(close));
        let session = tokio::spawn(run(
            socket,
            Arc::clone(&handle),
            Arc::new(context),
            Arc::clone(&shared),
            permit,
        ));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !handle.mailbox().closed {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the close frame is read");
        shared.begin_drain();
        tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("the drain ends the session, not the 60 s write timeout")
            .unwrap();
        assert_eq!(closed_by(&shared, CloseReason::Client), "1");
        let delete = tokio::time::timeout(Duration::from_secs(5), one_request(&api))
            .await
            .expect("a DELETE within 5 s");
        assert!(
            delete
                .to_ascii_lowercase()
                .contains("\r\nx-close-code: 4321\r\n"),
            "{delete}"
        );
    }

    /// The first request made to `api`, head and body, as text; answered `200`.
    async fn one_request(api: &tokio::net::TcpListener) -> String {
        use tokio::io::AsyncReadExt;
        let (mut stream, _) = api.accept().await.unwrap();
        let mut data = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the request ended early: {data:?}");
            data.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&data).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .map_or(0, |v| v.parse().unwrap());
            if data.len() >= end + 4 + length {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                stream.write_all(answer).await.unwrap();
                return text;
            }
        }
    }

    #[tokio::test]
    async fn a_close_whose_flush_fails_counts_its_pushes_undelivered() {
        let ending = Ending::ours(CloseReason::Control, 4001, "bye");
        let socket = tokio_websockets::ServerBuilder::new().serve(TestClient::gone());
        let queued = VecDeque::from([message(10), message(20)]);
        let outgoing = in_arrival_order(vec![(Bytes::from("r"), false, 0)], queued, 0);
        let closed = close_socket(socket, &ending, outgoing).await;
        assert!(!closed.flushed, "nothing was flushed");
        assert_eq!((closed.pushes, closed.replies), (0, 0));
    }

    #[test]
    fn mailbox_refuses_pushes_over_its_message_bound_and_counts_those_it_takes() {
        let h = handle();
        let accepted = AtomicU64::new(0);
        assert_eq!(h.push(message(1), 2, 100, &accepted), Ok(()));
        assert_eq!(h.push(message(1), 2, 100, &accepted), Ok(()));
        assert_eq!(
            h.push(message(1), 2, 100, &accepted),
            Err(PushError::QueueFull)
        );
        assert_eq!(h.info().queued, 2);
        assert_eq!(h.info().queued_bytes, 2);
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn mailbox_refuses_pushes_over_its_byte_bound_but_takes_one_large_message() {
        let h = handle();
        assert_eq!(h.push(message(150), 10, 100, &ACCEPTED), Ok(()));
        assert_eq!(
            h.push(message(1), 10, 100, &ACCEPTED),
            Err(PushError::QueueFull)
        );
    }

    #[test]
    fn mailbox_refuses_pushes_and_commands_but_the_drains_once_the_client_sent_its_close() {
        let h = handle();
        h.refuse_more();
        assert_eq!(
            h.push(message(1), 10, 100, &ACCEPTED),
            Err(PushError::Closed)
        );
        assert!(!h.command(Command::Replaced), "the client closed first");
        assert!(h.command(Command::Shutdown), "the drain still bounds it");
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            h.poll_mailbox(&mut cx, true),
            MailboxEvent::Command(Command::Shutdown)
        ));
        assert!(
            matches!(h.poll_mailbox(&mut cx, true), MailboxEvent::Empty),
            "taken once"
        );
        h.close_mailbox();
        assert!(!h.command(Command::Shutdown), "nothing left once it ended");
    }

    #[test]
    fn mailbox_refuses_pushes_once_a_close_was_asked() {
        let h = handle();
        assert!(h.command(Command::Replaced), "the first command is taken");
        assert!(!h.command(Command::Shutdown), "a later one says it was not");
        assert_eq!(
            h.push(message(1), 10, 100, &ACCEPTED),
            Err(PushError::Closed)
        );
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        match h.poll_mailbox(&mut cx, true) {
            MailboxEvent::Command(Command::Replaced) => {}
            _ => panic!("the first command should win"),
        }
    }

    fn close(code: u16, reason: &str) -> Command {
        Command::Close {
            code,
            reason: reason.to_owned(),
        }
    }

    #[test]
    fn closing_the_mailbox_hands_back_a_command_the_session_never_saw() {
        let h = handle();
        assert_eq!(h.push(message(3), 10, 100, &ACCEPTED), Ok(()));
        assert!(h.command(close(4001, "bye")));
        let (queued, pending) = h.close_mailbox();
        assert_eq!(queued.len(), 1);
        assert!(matches!(pending, Some(Command::Close { code: 4001, .. })));
        assert!(!h.command(close(4002, "late")), "closed to later commands");
    }

    #[test]
    fn a_delete_taken_while_the_session_was_ending_decides_what_the_api_hears() {
        // An idle or ping timeout, an API failure: the DELETE's code and reason go to the
        // client and the API.
        for why in [
            CloseReason::IdleTimeout,
            CloseReason::PingTimeout,
            CloseReason::UpstreamFailure,
        ] {
            let ending = Ending::ours(why, 1000, "own").unless_closed_by(Some(close(4001, "bye")));
            assert_eq!(
                ending,
                Ending::ours(CloseReason::Control, 4001, "bye"),
                "{why:?}"
            );
        }
        // The client gone or told already, or a socket that takes no writes: its close and
        // its count as they were, and the API hears the DELETE's code and reason.
        for ending in [
            Ending::eof(),
            Ending::ours(CloseReason::ProtocolError, 1002, "protocol error"),
            Ending::ours(CloseReason::SlowConsumer, 1008, "slow consumer"),
        ] {
            let kept = ending.clone().unless_closed_by(Some(close(4001, "bye")));
            assert_eq!(
                kept,
                Ending {
                    api_reason: "bye".to_owned(),
                    api_code: Some(4001),
                    ..ending
                }
            );
        }
        // Any other command, or none, leaves the ending as it was.
        let idle = Ending::ours(CloseReason::IdleTimeout, 1000, "idle timeout");
        assert_eq!(idle.clone().unless_closed_by(Some(Command::Replaced)), idle);
        assert_eq!(idle.clone().unless_closed_by(None), idle);
    }
}
