//! Listeners and connection plumbing: binds both ports (and the control API's Unix socket, if
//! asked), terminates TLS, caps sockets that have not finished their handshake and control
//! connections, serves HTTP/1.1 on the public port and HTTP/1.1 or h2c on the control listeners,
//! and turns upgraded connections back into plain sockets for the sessions.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

use crate::config::TlsFiles;
use crate::handshake::{self, Peer};
use crate::metrics::RefusalReason;
use crate::session::{ReadProgress, TransferProgress};
use crate::{control, Shared};

/// Largest request head (request line + headers) accepted; larger gets `431`.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// Pause after an accept error such as EMFILE, so a full descriptor table is not spun on.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Connections the kernel may hold ready for `accept` (capped by `net.core.somaxconn`): deep
/// enough that a connect storm is queued rather than dropped into SYN retries.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`.
pub(crate) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A websocket's byte stream once hyper has let go of it.
pub(crate) struct Io {
    transport: Transport,
    /// Bytes the client sent after its upgrade request, read by hyper before the upgrade.
    prefix: Bytes,
    /// Bytes written so far (see [`TransferProgress`]).
    written: u64,
    /// What was read since the session last asked (see [`TransferProgress`]).
    reads: ReadProgress,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    /// Takes the socket back out of hyper's upgrade wrapper.
    pub(crate) fn from_upgraded(upgraded: hyper::upgrade::Upgraded) -> io::Result<Io> {
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                return Ok(Io {
                    transport: Transport::Plain(parts.io.into_inner()),
                    prefix: detach(parts.read_buf),
                    written: 0,
                    reads: ReadProgress::default(),
                })
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(parts) => Ok(Io {
                transport: Transport::Tls(Box::new(parts.io.into_inner())),
                prefix: detach(parts.read_buf),
                written: 0,
                reads: ReadProgress::default(),
            }),
            Err(_) => Err(io::Error::other("upgraded connection of an unknown type")),
        }
    }
}

/// hyper's leftover bytes are a view into its whole read buffer (8 KiB or more): keeping that
/// view would keep the buffer alive for the life of the socket, so copy what is there (usually
/// nothing) and let the buffer go.
fn detach(leftover: Bytes) -> Bytes {
    if leftover.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&leftover)
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.reads.scan(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        this.reads.scan(&buf.filled()[before..]);
        result
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        };
        if let Poll::Ready(Ok(n)) = result {
            this.written += n as u64;
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        };
        if let Poll::Ready(Ok(n)) = result {
            this.written += n as u64;
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        match &self.transport {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl TransferProgress for Io {
    fn bytes_written(&self) -> u64 {
        self.written
    }

    fn took_reads(&mut self) -> bool {
        self.reads.took_reads()
    }

    fn took_message_bytes(&mut self) -> bool {
        self.reads.took_message_bytes()
    }
}

/// Builds the TLS acceptor for `--tls-cert`/`--tls-key`.
pub(crate) fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let cert_pem = std::fs::read(&files.cert)
        .map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
    let key_pem =
        std::fs::read(&files.key).map_err(|e| format!("--tls-key {}: {e}", files.key.display()))?;
    let certs = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--tls-cert {}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--tls-cert {}: no PEM certificate in the file",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => format!(
            "--tls-key {}: no PEM private key in the file",
            files.key.display()
        ),
        e => format!("--tls-key {}: {e}", files.key.display()),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts websocket clients until `stop` fires.
pub(crate) async fn accept_public(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let pending = Arc::new(Semaphore::new(shared.budget.pending_handshakes));
    let waiters = Arc::new(Semaphore::new(shared.budget.handshake_waiters));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                accept_failed("public", &error).await;
                continue;
            }
        };
        // Over the cap, the socket waits for a slot in a task of its own, so that the accept
        // loop goes on, and the sockets behind it in the backlog are answered too.
        let place = match admit(&pending, &waiters, &stop).await {
            Some(Admission::Slot(permit)) => {
                spawn_public(stream, remote, &tls, &shared, permit);
                continue;
            }
            Some(Admission::OverCap(place)) => place,
            None => {
                stopped_waiting_for_a_place(&stream, remote, &shared.metrics);
                break;
            }
        };
        let task = wait_for_handshake_slot(
            stream,
            remote,
            tls.clone(),
            Arc::clone(&shared),
            Arc::clone(&pending),
            place,
            stop.clone(),
        );
        shared.tasks.spawn(Box::pin(task));
    }
}

/// Counts and logs a public connection closed because the shutdown began while it waited for
/// a place (every handshake slot and every place for sockets over the cap taken): closed
/// unread, as one whose request head had not arrived, and counted the same way
/// (`handshakes_refused{reason="overloaded"}`), unless its peer had already closed it without
/// a byte, which was never a handshake (the caller drops it).
fn stopped_waiting_for_a_place(
    stream: &TcpStream,
    remote: SocketAddr,
    metrics: &crate::metrics::Metrics,
) {
    if closed_before_a_byte(stream) {
        return;
    }
    metrics.handshake_refused(RefusalReason::Overloaded);
    tracing::debug!(
        %remote,
        "the gateway is stopping and the socket was waiting for a handshake place; connection closed"
    );
}

/// What becomes of an accepted socket: served in a slot, or handled in a place for sockets over
/// the cap (waiting for a slot, or being answered `503`).
enum Admission {
    /// Served, holding one of the slots.
    Slot(OwnedSemaphorePermit),
    /// Over the cap, holding one of the places for such sockets.
    OverCap(OwnedSemaphorePermit),
}

/// A permit of `slots`, or else of `over_cap`, for the socket just accepted. With neither free
/// it waits for whichever frees first, and the sockets behind it wait in the listen backlog:
/// held back, not dropped. `None` when `stop` fires first, also when a permit has come free
/// by then: the stop closes the sockets still in their handshake, and the slots it frees so
/// are not handed to one it would close or refuse next.
async fn admit(
    slots: &Arc<Semaphore>,
    over_cap: &Arc<Semaphore>,
    stop: &CancellationToken,
) -> Option<Admission> {
    if let Ok(slot) = Arc::clone(slots).try_acquire_owned() {
        return Some(Admission::Slot(slot));
    }
    if let Ok(place) = Arc::clone(over_cap).try_acquire_owned() {
        return Some(Admission::OverCap(place));
    }
    tokio::select! {
        biased;
        _ = stop.cancelled() => None,
        slot = Arc::clone(slots).acquire_owned() => slot.ok().map(Admission::Slot),
        place = Arc::clone(over_cap).acquire_owned() => place.ok().map(Admission::OverCap),
    }
}

/// Serves a socket that holds a handshake slot, in a task of its own.
fn spawn_public(
    stream: TcpStream,
    remote: SocketAddr,
    tls: &Option<TlsAcceptor>,
    shared: &Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let task = serve_public(stream, remote, tls.clone(), Arc::clone(shared), permit);
    // Boxed: the task then holds a pointer, and tokio's poll and spawn frames for it stay
    // small; unboxed they were ~20 KiB of every worker's resident stack.
    shared.tasks.spawn(Box::pin(task));
}

/// How long a socket over the pending-handshake cap waits for a slot before it gets `503`. A
/// slot is often moments from free: its upgrade has written the `101` and is handing the socket
/// to its session, and a client that read the `101` may already be opening its next socket (a
/// connect storm that never had more handshakes in flight than the cap saw a `503` now and
/// then). It waits in a task of its own, in one of the [`HANDSHAKE_WAITERS`] places, while the
/// accept loop goes on.
///
/// [`HANDSHAKE_WAITERS`]: crate::config::HANDSHAKE_WAITERS
const HANDSHAKE_SLOT_GRACE: Duration = Duration::from_millis(250);

/// A socket over the pending-handshake cap, holding one of the places for such sockets: served
/// if a handshake slot comes free within [`HANDSHAKE_SLOT_GRACE`] and the gateway is not
/// stopping, else refused (`503`, or closed with TLS).
async fn wait_for_handshake_slot(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    pending: Arc<Semaphore>,
    place: OwnedSemaphorePermit,
    stop: CancellationToken,
) {
    let slot = tokio::select! {
        waited = tokio::time::timeout(HANDSHAKE_SLOT_GRACE, pending.acquire_owned()) => {
            waited.ok().and_then(Result::ok)
        }
        _ = stop.cancelled() => None,
    };
    if let Some(permit) = slot.filter(|_| !stop.is_cancelled()) {
        drop(place);
        serve_public(stream, remote, tls, shared, permit).await;
        return;
    }
    if closed_before_a_byte(&stream) {
        // A load balancer's TCP check, say: never a handshake, so nothing to count or answer,
        // as on the way in below the cap.
        drop(place);
        return;
    }
    shared.metrics.handshake_refused(RefusalReason::Overloaded);
    // A TLS client would read a plain-text 503 as a broken handshake, and a TLS handshake
    // only to refuse is the work the cap holds back: it is just closed.
    if tls.is_none() {
        refuse_busy(stream).await;
    }
    drop(place);
}

async fn accept_failed(which: &str, error: &io::Error) {
    // One connection's own trouble: the next is taken at once. Anything else (out of
    // descriptors or memory) is waited out a little, rather than retried in a tight loop.
    if one_connections_trouble(error) {
        tracing::debug!(%error, "accept on the {which} listener: one connection failed; taking the next");
        return;
    }
    tracing::warn!(%error, "accept on the {which} listener failed; backing off");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Whether an `accept` error is the trouble of the one connection being accepted, not the
/// listener's: it was reset or aborted while it waited in the backlog, the call was
/// interrupted, or (Linux) a network error was pending on the new connection, which accept(2)
/// passes on and says to treat like EAGAIN, retrying at once.
fn one_connections_trouble(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable
    ) || error
        .raw_os_error()
        .is_some_and(|code| PENDING_NETWORK_ERRORS.contains(&code))
}

/// The network errors accept(2) passes on from a new connection on Linux (its man page, "Error
/// handling"), to be treated like EAGAIN. Elsewhere none: only the three of them std names as
/// error kinds are told apart.
#[cfg(any(target_os = "linux", target_os = "android"))]
const PENDING_NETWORK_ERRORS: &[i32] = &[
    libc::ENETDOWN,
    libc::EPROTO,
    libc::ENOPROTOOPT,
    libc::EHOSTDOWN,
    libc::ENONET,
    libc::EHOSTUNREACH,
    libc::EOPNOTSUPP,
    libc::ENETUNREACH,
];
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const PENDING_NETWORK_ERRORS: &[i32] = &[];

/// How long a refusal over a connection cap may hold its place: the control listener's wait
/// for the client's first bytes, the answer and the read-and-drop after it all fit in it (see
/// [`refuse_busy`] and [`refuse_busy_control`]).
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// The most a refusal reads and drops (see [`refuse_busy`]).
const REFUSAL_DRAIN: usize = 64 * 1024;

/// The refusal of a socket over a connection cap, in HTTP/1.1.
const BUSY_HTTP1: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Answers `503` to a socket over the pending-handshake cap at once, without parsing
/// anything (a browser speaks HTTP/1.1 there; see [`refuse_busy_control`] for the control
/// listener's). The request is read and dropped after the answer (for at most
/// 1 s, 64 KiB): a socket closed with unread data is reset, and some clients (Windows, macOS,
/// proxies) then lose the `503` and see only the reset.
async fn refuse_busy(stream: impl AsyncRead + AsyncWrite + Unpin) {
    let deadline = tokio::time::Instant::now() + REFUSAL_TIME;
    answer_and_drain(stream, BUSY_HTTP1, deadline, REFUSAL_DRAIN).await;
}

/// Writes `reply` to `stream`, shuts its writing side, then reads and drops what comes until
/// the peer closes, `drain` bytes have come or `deadline`, whichever is first.
async fn answer_and_drain(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    reply: &[u8],
    deadline: tokio::time::Instant,
    drain: usize,
) {
    let _ = tokio::time::timeout_at(deadline, async {
        stream.write_all(reply).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = drain;
        while left > 0 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => left -= n.min(left),
            }
        }
        Ok::<(), io::Error>(())
    })
    .await;
}

/// The 24 bytes that open an HTTP/2 connection with prior knowledge (RFC 9113, 3.4): what an
/// h2c client sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The GOAWAY's debug data in [`h2_refusal`], for a client's logs.
const H2_REFUSAL_DEBUG: &[u8] = b"control connections over capacity";

/// How long the answer to a control connection over the cap is given when its wait for the
/// client's first bytes took all of [`REFUSAL_TIME`]: a new socket takes those few bytes at
/// once, so this is a moment for the write and for the client to close after reading them.
const REFUSAL_ANSWER_GRACE: Duration = Duration::from_millis(100);

/// The refusal of an h2c connection over the control listener's cap, written after its
/// preface: the server's SETTINGS (empty: the defaults, never used), and a GOAWAY with last
/// stream id 0 and NO_ERROR, which says that none of the client's streams was processed and
/// that it may send them again (RFC 9113, 6.8), on another connection. NO_ERROR, not an error
/// code: Go's h2 client sends again a first stream refused so only under NO_ERROR (with an
/// error code it fails the request), as curl does either way.
fn h2_refusal() -> Vec<u8> {
    /// A frame header (RFC 9113, 4.1) without flags, on stream 0: 24-bit length, type,
    /// flags, reserved bit and 31-bit stream id.
    fn frame_header(length: usize, kind: u8) -> [u8; 9] {
        let [_, a, b, c] = u32::try_from(length)
            .expect("a frame of ours is short")
            .to_be_bytes();
        [a, b, c, kind, 0, 0, 0, 0, 0]
    }
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const NO_ERROR: u32 = 0x0;
    let goaway_length = 8 + H2_REFUSAL_DEBUG.len();
    let mut frames = Vec::with_capacity(9 + 9 + goaway_length);
    frames.extend_from_slice(&frame_header(0, SETTINGS));
    frames.extend_from_slice(&frame_header(goaway_length, GOAWAY));
    // Last stream id: none was processed.
    frames.extend_from_slice(&0u32.to_be_bytes());
    frames.extend_from_slice(&NO_ERROR.to_be_bytes());
    frames.extend_from_slice(H2_REFUSAL_DEBUG);
    frames
}

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, PartialEq, Eq)]
enum Opening {
    /// The whole h2c preface.
    Http2,
    /// The start of the preface (or nothing yet): either, until more comes.
    Undecided,
    /// Anything else: HTTP/1.1 (or junk), answered as HTTP/1.1.
    Http1,
}

/// Tells `first` (the bytes that came first, at most 24) apart: the h2c preface, a start of
/// it, or something else.
fn opening(first: &[u8]) -> Opening {
    if !H2_PREFACE.starts_with(first) {
        Opening::Http1
    } else if first.len() == H2_PREFACE.len() {
        Opening::Http2
    } else {
        Opening::Undecided
    }
}

/// Refuses a control connection over the cap in the client's own protocol: an h2c client
/// would read [`refuse_busy`]'s HTTP/1.1 `503` as a framing error and never learn that it was
/// refused. It reads the first bytes, at most the 24 of the h2c preface, until they tell one
/// from the other or [`REFUSAL_TIME`] passes: the whole preface gets [`h2_refusal`] at once;
/// a byte off the preface, the end or an error gets the HTTP/1.1 `503` at once, as does a
/// start of the preface (or nothing) when the time is up. Then it reads and drops what comes
/// as [`refuse_busy`] does, within what is left of [`REFUSAL_TIME`] (but at least
/// [`REFUSAL_ANSWER_GRACE`]) and 64 KiB in all, the bytes read before counted. No metric
/// counts it, as before (none counts control connections).
async fn refuse_busy_control(mut stream: impl AsyncRead + AsyncWrite + Unpin) {
    let deadline = tokio::time::Instant::now() + REFUSAL_TIME;
    let mut first = [0u8; H2_PREFACE.len()];
    let mut read = 0;
    let sniffed = tokio::time::timeout_at(deadline, async {
        loop {
            match opening(&first[..read]) {
                Opening::Undecided => {}
                decided => return decided,
            }
            match stream.read(&mut first[read..]).await {
                Ok(0) | Err(_) => return Opening::Http1,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    let h2;
    let reply = match sniffed {
        Ok(Opening::Http2) => {
            h2 = h2_refusal();
            h2.as_slice()
        }
        _ => BUSY_HTTP1,
    };
    let deadline = deadline.max(tokio::time::Instant::now() + REFUSAL_ANSWER_GRACE);
    answer_and_drain(stream, reply, deadline, REFUSAL_DRAIN - read).await;
}

/// Serves one socket on the public listener, holding a handshake slot, until its upgrade
/// request is answered (the `101`: the session takes the socket over) or the handshake's time
/// limit. When the shutdown begins ([`Shared::stop_public`]) before its request head has
/// arrived (a silent socket, a head still coming, a TLS handshake not done), it is closed at
/// once, counted `handshakes_refused{reason="overloaded"}` (shutting down), instead of holding
/// up the drain until `--handshake-timeout`; a request whose head arrived is answered as
/// usual (`503` once the gateway drains).
async fn serve_public(
    stream: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    _pending: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let handshake_timeout = shared.config.handshake_timeout;
    // A margin over the request head's and the API's own deadlines, so that those answer
    // (a 504, say) rather than this cut.
    let limit = handshake_timeout + shared.config.upstream_timeout + Duration::from_secs(1);
    let peer = Peer::new(remote, tls.is_some());
    let metrics = Arc::clone(&shared.metrics);
    let served = async {
        match tls {
            None => {
                let peer = peer.clone();
                serve_http(TokioIo::new(stream), peer, shared, handshake_timeout).await
            }
            Some(acceptor) => {
                let started = Instant::now();
                // A connection closed (or reset) before its first byte is no failed handshake
                // (a balancer's TCP check, a port scan): not counted, as on a plain listener.
                let handshake = async {
                    if !first_byte_comes(&stream).await {
                        return None;
                    }
                    Some(acceptor.accept(stream).await)
                };
                let handshake = tokio::select! {
                    biased;
                    within = tokio::time::timeout(handshake_timeout, handshake) => within,
                    _ = shared.stop_public.cancelled() => {
                        stopped_before_the_head(&peer, &metrics);
                        return;
                    }
                };
                match handshake {
                    Ok(None) => {
                        tracing::debug!(%remote, "closed before its TLS handshake began");
                    }
                    Ok(Some(Ok(stream))) => {
                        // The TLS handshake and the request head share one deadline.
                        let left = handshake_timeout
                            .saturating_sub(started.elapsed())
                            .max(Duration::from_millis(1));
                        serve_http(TokioIo::new(stream), peer.clone(), shared, left).await
                    }
                    Ok(Some(Err(error))) => {
                        peer.refused(&metrics, RefusalReason::BadRequest);
                        tracing::debug!(%remote, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        peer.refused(&metrics, RefusalReason::Timeout);
                        tracing::debug!(%remote, "TLS handshake timed out");
                    }
                }
            }
        }
    };
    if tokio::time::timeout(limit, served).await.is_err() {
        // Not a second count for a refusal cut off while its answer was being written.
        peer.refused(&metrics, RefusalReason::Timeout);
        tracing::debug!(%remote, "handshake did not finish in time; connection dropped");
    }
}

/// Counts and logs a public connection closed because the shutdown began before its request
/// head arrived (the caller drops it).
fn stopped_before_the_head(peer: &Peer, metrics: &crate::metrics::Metrics) {
    peer.refused(metrics, RefusalReason::Overloaded);
    tracing::debug!(
        remote = %peer.remote,
        "the gateway is stopping and the request head had not arrived; connection closed"
    );
}

/// Serves the upgrade request on `io`, whose head must arrive within `head_deadline`; closes
/// the connection at once if the shutdown begins before it has arrived.
async fn serve_http<S>(io: TokioIo<S>, peer: Peer, shared: Arc<Shared>, head_deadline: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_peer = peer.clone();
    let service_shared = Arc::clone(&shared);
    let service = service_fn(move |request| {
        // Called as soon as hyper has parsed the head, before the select below can look.
        service_peer.head_arrived();
        handshake::handle(request, service_peer.clone(), Arc::clone(&service_shared))
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_deadline)
        // One request per connection: every answer but the 101 says `Connection: close`
        // (handshake::handle). Not `keep_alive(false)`, which puts `close` on the 101 as well.
        .max_buf_size(MAX_REQUEST_HEAD)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    // hyper's own graceful_shutdown would close only a connection that has read no byte yet;
    // one with part of a head (or a whole one not read yet) would still hold up the drain
    // until its header timeout. Dropping the connection closes it, whatever it has read.
    let ended = tokio::select! {
        biased;
        ended = connection.as_mut() => ended,
        _ = shared.stop_public.cancelled() => {
            if !peer.has_head() {
                stopped_before_the_head(&peer, &shared.metrics);
                return;
            }
            connection.await
        }
    };
    if let Err(error) = ended {
        if error.is_timeout() {
            // The request head did not arrive within --handshake-timeout.
            peer.refused(&shared.metrics, RefusalReason::Timeout);
        } else if error.is_parse() {
            // A head hyper could not parse, answered by hyper itself: 400, or 431 for one
            // over MAX_REQUEST_HEAD.
            peer.refused(&shared.metrics, RefusalReason::BadRequest);
        }
        tracing::debug!(%error, "public connection ended with an error");
    }
}

/// Where the control API is served: the `--control-listen` port, or a Unix socket
/// (`--control-unix-socket`) for an API on the same machine.
pub(crate) enum ControlListener {
    /// TCP, `--control-listen`.
    Network(TcpListener),
    /// A Unix stream socket, `--control-unix-socket`.
    UnixSocket(UnixListener),
}

impl ControlListener {
    async fn accept(&self) -> io::Result<ControlStream> {
        match self {
            ControlListener::Network(listener) => {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                Ok(Either::Left(stream))
            }
            ControlListener::UnixSocket(listener) => {
                let (stream, _) = listener.accept().await?;
                Ok(Either::Right(stream))
            }
        }
    }
}

/// One control connection: TCP (`Left`) or a Unix socket (`Right`); tokio-util's `Either`
/// forwards reads and writes to whichever it is.
type ControlStream = Either<TcpStream, UnixStream>;

/// Waits for the first byte (or the end, or an error) on `tcp`, leaving it to be read; says
/// whether a byte came.
async fn first_byte_comes(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(tcp.peek(&mut first).await, Ok(n) if n > 0)
}

/// Whether `tcp`'s peer has already closed it (or it broke) with no byte sent: what
/// [`first_byte_comes`] would say at once, without waiting; false while it is open, or once a
/// byte came.
fn closed_before_a_byte(tcp: &TcpStream) -> bool {
    futures_util::FutureExt::now_or_never(first_byte_comes(tcp)) == Some(false)
}

/// Waits for the first bytes (or the end) of a control connection; says whether any came.
async fn spoke(stream: &ControlStream) -> bool {
    match stream {
        Either::Left(tcp) => first_byte_comes(tcp).await,
        // No `peek` here: readable means bytes or the end, which hyper then reads.
        Either::Right(unix) => unix.readable().await.is_ok(),
    }
}

/// Binds the control API's Unix socket at `path`, readable and writable by the gateway's user
/// and group only (mode 0660). A socket file left by a gateway that did not stop cleanly is
/// replaced; one that a live process answers on, or a file that is not a socket, is not.
pub(crate) async fn listen_unix(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on it",
                ))
            }
            // Refused: nobody listens, the file is stale.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
            }
            // Anything else (a full backlog answers EAGAIN) may be a live listener.
            Err(error) => {
                return Err(io::Error::new(
                    error.kind(),
                    format!("a socket is there and connecting to it failed: {error}"),
                ))
            }
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ))
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// The control listeners' places, shared by the TCP and Unix listeners: connections served
/// ([`CONTROL_CONNECTIONS`]) and connections over that being answered `503` (h2c: a GOAWAY)
/// ([`CONTROL_REFUSALS`]).
///
/// [`CONTROL_CONNECTIONS`]: crate::config::CONTROL_CONNECTIONS
/// [`CONTROL_REFUSALS`]: crate::config::CONTROL_REFUSALS
#[derive(Clone)]
pub(crate) struct ControlSlots {
    connections: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
}

impl ControlSlots {
    /// The places `budget` gives the control listeners.
    pub(crate) fn new(budget: &crate::config::DescriptorBudget) -> Self {
        ControlSlots {
            connections: Arc::new(Semaphore::new(budget.control_connections)),
            refusals: Arc::new(Semaphore::new(budget.control_refusals)),
        }
    }
}

/// Serves the control API on `listener` until `stop` fires; `slots` caps the control
/// connections of all control listeners together.
pub(crate) async fn accept_control(
    listener: ControlListener,
    slots: ControlSlots,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                accept_failed("control", &error).await;
                continue;
            }
        };
        // Over the budget, answered 503 (h2c: a GOAWAY) in a task of its own.
        let slot = match admit(&slots.connections, &slots.refusals, &stop).await {
            Some(Admission::Slot(slot)) => slot,
            Some(Admission::OverCap(place)) => {
                connections.spawn(async move {
                    refuse_busy_control(stream).await;
                    drop(place);
                });
                continue;
            }
            None => break,
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        connections.spawn(async move {
            // The first byte must come within --handshake-timeout of the accept. Telling
            // HTTP/1.1 from h2c waits for the first bytes, and then for the rest of h2c's
            // opening, without a deadline of its own: a connection that sends nothing, or
            // only the start of that opening, loses its slot at that deadline (by the idle
            // close below), as does one still silent when the shutdown starts. The rest of a
            // first HTTP/1.1 head has no deadline of the accept's: hyper's header timer
            // starts when hyper first reads, at the first byte, and gives it
            // --handshake-timeout from there; the idle close below cuts that short, but only
            // after its CONTROL_CLOSING_GRACE (a head begun with one byte at 1.9 s of a 2 s
            // limit is closed at 3.0 s, one begun at 0.1 s at 2.1 s).
            let accepted = tokio::time::Instant::now();
            let first_byte_by = accepted + shared.config.handshake_timeout;
            let spoke = tokio::select! {
                within = tokio::time::timeout_at(first_byte_by, spoke(&stream)) => {
                    matches!(within, Ok(true))
                }
                _ = stop.cancelled() => false,
            };
            if !spoke {
                return;
            }
            // Idle (no request in flight, no answer waiting for the peer to read) for
            // --handshake-timeout, counted from the accept before the first request: shut
            // down gracefully, then closed once idle for CONTROL_CLOSING_GRACE more (a
            // request head still arriving is no request in flight), so that a client holding
            // connections it does not use gives their slots back. hyper's header read timeout
            // does much the same for HTTP/1.1, counted from when it starts reading a head;
            // nothing in hyper does it for h2c, which is kept alive by its pings.
            let activity = Arc::new(ControlActivity::new(accepted));
            let service_shared = Arc::clone(&shared);
            let service_activity = Arc::clone(&activity);
            let push_share = Arc::new(control::connection_push_share(
                shared.config.max_message_size,
            ));
            let service = service_fn(move |request| {
                let busy = ControlActivity::begin(&service_activity);
                let handled = control::handle(
                    request,
                    Arc::clone(&service_shared),
                    Arc::clone(&push_share),
                );
                async move {
                    let answer = handled.await;
                    drop(busy);
                    answer
                }
            });
            let idle_limit = shared.config.handshake_timeout;
            let builder = control_http(shared.config.handshake_timeout);
            let io =
                WritesThatStall::new(stream, shared.config.write_timeout, Arc::clone(&activity));
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            let stopping = tokio::select! {
                ended = connection.as_mut() => {
                    control_connection_ended(ended);
                    None
                }
                _ = activity.idle_for(idle_limit, None) => Some(false),
                _ = stop.cancelled() => Some(true),
            };
            if let Some(stopping) = stopping {
                // After the graceful shutdown (h2c: a GOAWAY, and a ping the client may never
                // answer), the connection goes once it has been idle for
                // CONTROL_CLOSING_GRACE. Answers still being written (a large heap profile
                // read slowly, a request that crossed the GOAWAY) keep it busy for as long as
                // the peer reads, each write for at most --write-timeout (WritesThatStall);
                // once the gateway stops, for at most CONTROL_CLOSING_GRACE more.
                connection.as_mut().graceful_shutdown();
                let quiet = tokio::time::Instant::now() + CONTROL_CLOSING_GRACE;
                let stop_waiting = async {
                    if !stopping {
                        stop.cancelled().await;
                    }
                    tokio::time::sleep(CONTROL_CLOSING_GRACE).await;
                };
                tokio::select! {
                    ended = connection.as_mut() => control_connection_ended(ended),
                    _ = activity.idle_for(CONTROL_CLOSING_GRACE, Some(quiet)) => {}
                    _ = stop_waiting => {}
                }
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// Logs a control connection that ended with an error (a peer that reset it, a head hyper
/// could not parse, h2c's ping timeout), at debug as the public listener does.
fn control_connection_ended(ended: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(error) = ended {
        tracing::debug!(%error, "control connection ended with an error");
    }
}

/// Whether a control connection is busy (requests in flight, or an answer waiting for the
/// peer to read), and since when it has been idle.
struct ControlActivity {
    state: std::sync::Mutex<ControlIdleness>,
}

struct ControlIdleness {
    in_flight: usize,
    /// A write is waiting for the peer to read (a large answer read slowly).
    write_waiting: bool,
    /// When the connection last became idle (or was accepted).
    idle_since: tokio::time::Instant,
}

impl ControlIdleness {
    fn busy(&self) -> bool {
        self.in_flight > 0 || self.write_waiting
    }
}

/// One request in flight on a control connection, until dropped (answered, or given up).
struct ControlRequest(Arc<ControlActivity>);

impl ControlActivity {
    /// A connection idle since `since`.
    fn new(since: tokio::time::Instant) -> ControlActivity {
        ControlActivity {
            state: std::sync::Mutex::new(ControlIdleness {
                in_flight: 0,
                write_waiting: false,
                idle_since: since,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ControlIdleness> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request in flight until the returned guard is dropped.
    fn begin(activity: &Arc<ControlActivity>) -> ControlRequest {
        activity.state().in_flight += 1;
        ControlRequest(Arc::clone(activity))
    }

    /// Notes that a write started or stopped waiting for the peer to read.
    fn set_write_waiting(&self, waiting: bool) {
        let mut state = self.state();
        state.write_waiting = waiting;
        if !state.busy() {
            state.idle_since = tokio::time::Instant::now();
        }
    }

    /// Whether a request is in flight or a write waits for the peer.
    #[cfg(test)]
    fn busy(&self) -> bool {
        self.state().busy()
    }

    /// Finishes once the connection has been idle for `limit`, and not before `not_before`.
    async fn idle_for(&self, limit: Duration, not_before: Option<tokio::time::Instant>) {
        loop {
            let next_look = {
                let state = self.state();
                if state.busy() {
                    tokio::time::Instant::now() + limit
                } else {
                    (state.idle_since + limit).max(not_before.unwrap_or(state.idle_since))
                }
            };
            if next_look <= tokio::time::Instant::now() {
                return;
            }
            tokio::time::sleep_until(next_look).await;
        }
    }
}

impl Drop for ControlRequest {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight -= 1;
        if !state.busy() {
            state.idle_since = tokio::time::Instant::now();
        }
    }
}

/// A control connection's stream that fails a write making no progress for `limit`: a peer
/// that sends requests but never reads the answers gives its control slot back, as a
/// websocket client that stops reading is closed after `--write-timeout`. While a write
/// waits, the connection counts as busy in its [`ControlActivity`].
struct WritesThatStall<S> {
    inner: S,
    limit: Duration,
    /// Since when the pending write has waited; none while writes go through.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    activity: Arc<ControlActivity>,
}

impl<S> WritesThatStall<S> {
    fn new(inner: S, limit: Duration, activity: Arc<ControlActivity>) -> WritesThatStall<S> {
        WritesThatStall {
            inner,
            limit,
            stalled: None,
            activity,
        }
    }

    /// Passes on a write's `result`: a ready one ends any stall, a pending one fails once it
    /// has waited `limit`.
    fn after<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if result.is_ready() {
            if self.stalled.take().is_some() {
                self.activity.set_write_waiting(false);
            }
            return result;
        }
        let limit = self.limit;
        let activity = &self.activity;
        let stalled = self.stalled.get_or_insert_with(|| {
            activity.set_write_waiting(true);
            Box::pin(tokio::time::sleep(limit))
        });
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {limit:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WritesThatStall<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WritesThatStall<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.after(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How long a control connection being closed may stay idle (or, once the gateway stops,
/// busy).
const CONTROL_CLOSING_GRACE: Duration = Duration::from_secs(1);
/// HTTP/2 streams one control connection may carry at once.
const MAX_CONTROL_STREAMS: u32 = 256;
/// Ping an idle HTTP/2 control connection this often; close it if the answer takes longer than
/// [`CONTROL_PING_TIMEOUT`].
const CONTROL_PING_INTERVAL: Duration = Duration::from_secs(30);
/// See [`CONTROL_PING_INTERVAL`].
const CONTROL_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Unread request body bytes one HTTP/2 control connection may hold (its flow-control window),
/// so that a connection's many streams together stay as bounded as one HTTP/1.1 request.
const CONTROL_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The control listener's HTTP: HTTP/1.1, or HTTP/2 with prior knowledge (h2c) on the same port,
/// told apart by the first bytes. HTTP/2 lets an API push many messages at once over one
/// connection, and their answers leave in shared writes.
fn control_http(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONTROL_STREAMS)
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .initial_connection_window_size(CONTROL_CONNECTION_WINDOW)
        .keep_alive_interval(CONTROL_PING_INTERVAL)
        .keep_alive_timeout(CONTROL_PING_TIMEOUT);
    builder
}

/// Runs `future`, giving up after `limit`; says whether it finished.
pub(crate) async fn finishes_within<F: Future>(limit: Duration, future: F) -> bool {
    tokio::time::timeout(limit, future).await.is_ok()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn the_first_bytes_of_a_control_connection_tell_h2c_from_http1() {
        assert_eq!(opening(b""), Opening::Undecided);
        assert_eq!(opening(b"PRI * HTTP/2.0\r\n"), Opening::Undecided);
        assert_eq!(opening(H2_PREFACE), Opening::Http2);
        assert_eq!(opening(b"P"), Opening::Undecided);
        assert_eq!(opening(b"POST /x HTTP/1.1\r\nHost:"), Opening::Http1);
        assert_eq!(opening(b"GET /healthz HTTP/1.1\r\nH"), Opening::Http1);
        assert_eq!(opening(b"PRI * HTTP/1.1\r\n"), Opening::Http1);
        assert_eq!(opening(b"\x16\x03\x01"), Opening::Http1);
    }

    /// RFC 9113, 4.1 (frame header), 6.5 (SETTINGS), 6.8 (GOAWAY), 7 (NO_ERROR = 0x0).
    #[test]
    fn the_h2c_refusal_is_an_empty_settings_then_a_goaway_for_no_stream() {
        let mut expected = vec![
            0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, no payload, stream 0
            0, 0, 41, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 + 33 bytes, stream 0
            0, 0, 0, 0, // last stream id 0
            0, 0, 0, 0, // NO_ERROR
        ];
        expected.extend_from_slice(b"control connections over capacity");
        assert_eq!(h2_refusal(), expected);
    }

    /// accept(2) on Linux: "pending network errors on the new socket [...] should be treated
    /// like EAGAIN by retrying".
    #[cfg(target_os = "linux")]
    #[test]
    fn accept_errors_of_one_connection_are_told_from_the_listener_s_own() {
        for code in [
            libc::ECONNABORTED,
            libc::ECONNRESET,
            libc::EINTR,
            libc::ENETDOWN,
            libc::EPROTO,
            libc::ENOPROTOOPT,
            libc::EHOSTDOWN,
            libc::ENONET,
            libc::EHOSTUNREACH,
            libc::EOPNOTSUPP,
            libc::ENETUNREACH,
        ] {
            let error = io::Error::from_raw_os_error(code);
            assert!(
                one_connections_trouble(&error),
                "{error}: the next is taken at once"
            );
        }
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBADF,
            libc::EINVAL,
        ] {
            let error = io::Error::from_raw_os_error(code);
            assert!(!one_connections_trouble(&error), "{error}: waited out");
        }
    }

    #[tokio::test]
    async fn a_control_answer_waiting_for_the_peer_to_read_keeps_its_connection_busy() {
        let (near, mut far) = tokio::io::duplex(64);
        let activity = Arc::new(ControlActivity::new(tokio::time::Instant::now()));
        let mut io = WritesThatStall::new(near, Duration::from_secs(30), Arc::clone(&activity));
        assert!(!activity.busy());
        let writing = tokio::spawn(async move { io.write_all(&[7u8; 1024]).await });
        for _ in 0..100 {
            if activity.busy() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(activity.busy(), "the answer waits for the peer");

        let mut answer = vec![0u8; 1024];
        far.read_exact(&mut answer).await.unwrap();
        writing.await.unwrap().unwrap();
        assert!(!activity.busy(), "all of it was read");
    }

    #[tokio::test]
    async fn a_control_connection_is_idle_once_its_last_request_is_answered() {
        let activity = Arc::new(ControlActivity::new(tokio::time::Instant::now()));
        let first = ControlActivity::begin(&activity);
        let second = ControlActivity::begin(&activity);
        drop(first);
        assert!(activity.busy());
        drop(second);
        assert!(!activity.busy());
    }
}
