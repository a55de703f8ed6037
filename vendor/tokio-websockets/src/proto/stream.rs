//! Frame aggregating abstraction over the low-level [`super::codec`]
//! implementation that provides [`futures_sink::Sink`] and
//! [`futures_core::Stream`] implementations that take [`Message`] as a
//! parameter.
use std::{
    collections::VecDeque,
    io::{self, IoSlice},
    mem::{replace, take},
    pin::Pin,
    task::{Context, Poll, Waker, ready},
};

use bytes::{Buf, Bytes, BytesMut};
use futures_core::Stream;
use futures_sink::Sink;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::{codec::FramedRead, io::poll_write_buf};

#[cfg(any(feature = "client", feature = "server"))]
use super::types::Role;
use super::{
    Config, Limits,
    codec::WebSocketProtocol,
    types::{Frame, Message, OpCode, Payload, StreamState},
};
use crate::{CloseCode, Error};

/// Helper struct for storing a frame header, the header size and payload.
#[derive(Debug)]
struct EncodedFrame {
    /// Encoded frame header and mask.
    header: [u8; 14],
    /// Potentially masked message payload, ready for writing to the I/O.
    payload: Payload,
}

impl EncodedFrame {
    /// Whether or not this frame is masked.
    #[inline]
    fn is_masked(&self) -> bool {
        self.header[1] >> 7 != 0
    }

    /// Returns the length of the combined header and mask in bytes.
    #[inline]
    fn header_len(&self) -> usize {
        let mask_bytes = if self.is_masked() { 4 } else { 0 };
        match self.header[1] & 127 {
            127 => 10 + mask_bytes,
            126 => 4 + mask_bytes,
            _ => 2 + mask_bytes,
        }
    }

    /// Total length of the frame.
    fn len(&self) -> usize {
        self.header_len() + self.payload.len()
    }
}

/// Queued up frames that are being sent.
#[derive(Debug)]
struct FrameQueue {
    /// Queue of outgoing frames to send. Some parts of the first item may have
    /// been sent already.
    queue: VecDeque<EncodedFrame>,
    /// Amount of partial bytes written of the first frame in the queue.
    bytes_written: usize,
    /// Total amount of bytes remaining to be sent in the frame queue.
    pending_bytes: usize,
    /// Position in `queue` of the pong answering the latest ping, until it has
    /// been written in full (32 bits, as the next field, to keep the stream
    /// small: a gateway holds one per connection; a pong further back than
    /// that is not tracked, and the next one is queued behind it).
    pong: Option<u32>,
    /// Bytes of the pongs that a later one replaced since a pong was last
    /// written in full. They count toward the flush threshold as if they were
    /// still queued, so that a peer that pings without reading holds up the
    /// writer as soon as it did when every ping got a pong of its own.
    replaced_pong_bytes: u32,
}

impl FrameQueue {
    /// Capacity of a new queue, and of one that gave back a grown allocation.
    const INITIAL_CAPACITY: usize = 1;
    /// A queue that drains with room for more frames than this gives the
    /// allocation back. Bursts up to this size keep theirs, so they do not
    /// reallocate each time the queue empties.
    const SHRINK_ABOVE: usize = 32;

    /// Creates a new, empty [`FrameQueue`].
    #[cfg(any(feature = "client", feature = "server"))]
    fn new() -> Self {
        Self {
            queue: VecDeque::with_capacity(Self::INITIAL_CAPACITY),
            bytes_written: 0,
            pending_bytes: 0,
            pong: None,
            replaced_pong_bytes: 0,
        }
    }

    /// Queue a frame to be sent.
    fn push(&mut self, item: EncodedFrame) {
        self.pending_bytes += item.len();
        self.queue.push_back(item);
    }

    /// Queue the pong answering a ping. A pong for an earlier ping that is
    /// still waiting, none of it written yet, is replaced in its place in the
    /// queue (RFC 6455, 5.5.3: only the most recent ping needs an answer), so
    /// a peer that pings without reading makes at most one pong wait (two,
    /// while one is partly written).
    fn push_pong(&mut self, item: EncodedFrame) {
        match self.pong {
            Some(index) if index > 0 || self.bytes_written == 0 => {
                self.pending_bytes += item.len();
                let replaced = replace(&mut self.queue[index as usize], item);
                self.pending_bytes -= replaced.len();
                self.replaced_pong_bytes = self
                    .replaced_pong_bytes
                    .saturating_add(u32::try_from(replaced.len()).unwrap_or(u32::MAX));
            }
            _ => {
                self.push(item);
                self.pong = u32::try_from(self.queue.len() - 1).ok();
            }
        }
    }

    /// Bytes waiting to be written, with those of the pongs that were replaced
    /// while they waited.
    fn backlog(&self) -> usize {
        self.pending_bytes
            .saturating_add(self.replaced_pong_bytes as usize)
    }
}

impl Buf for FrameQueue {
    fn remaining(&self) -> usize {
        self.pending_bytes
    }

    fn chunk(&self) -> &[u8] {
        if let Some(frame) = self.queue.front() {
            if self.bytes_written >= frame.header_len() {
                unsafe {
                    frame
                        .payload
                        .get_unchecked(self.bytes_written - frame.header_len()..)
                }
            } else {
                &frame.header[self.bytes_written..frame.header_len()]
            }
        } else {
            &[]
        }
    }

    fn advance(&mut self, mut cnt: usize) {
        self.pending_bytes -= cnt;
        cnt += self.bytes_written;

        while cnt > 0 {
            let item = self
                .queue
                .front()
                .expect("advance called with too long count");
            let item_len = item.len();

            if cnt >= item_len {
                self.queue.pop_front();
                self.pong = self.pong.and_then(|index| index.checked_sub(1));
                if self.pong.is_none() {
                    // The latest pong is out: the ones it replaced are answered.
                    self.replaced_pong_bytes = 0;
                }
                self.bytes_written = 0;
                cnt -= item_len;
            } else {
                self.bytes_written = cnt;
                return;
            }
        }

        // Drained after a burst: give back the grown allocation (only then, so a
        // queue that keeps filling and draining does not reallocate each time).
        if self.queue.is_empty() && self.queue.capacity() > Self::SHRINK_ABOVE {
            self.queue.shrink_to(Self::INITIAL_CAPACITY);
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (idx, frame) in self.queue.iter().enumerate() {
            if n >= dst.len() {
                break;
            }

            if idx == 0 {
                if frame.header_len() > self.bytes_written {
                    dst[n] = IoSlice::new(&frame.header[self.bytes_written..frame.header_len()]);
                    n += 1;
                }

                if !frame.payload.is_empty() && n < dst.len() {
                    dst[n] = IoSlice::new(unsafe {
                        frame
                            .payload
                            .get_unchecked(self.bytes_written.saturating_sub(frame.header_len())..)
                    });
                    n += 1;
                }
            } else {
                dst[n] = IoSlice::new(&frame.header[..frame.header_len()]);
                n += 1;
                if !frame.payload.is_empty() && n < dst.len() {
                    dst[n] = IoSlice::new(&frame.payload);
                    n += 1;
                }
            }
        }

        n
    }
}

/// A WebSocket stream that full messages can be read from and written to.
///
/// The stream implements [`futures_sink::Sink`] and [`futures_core::Stream`].
///
/// You must use a [`ClientBuilder`] or [`ServerBuilder`] to
/// obtain a WebSocket stream.
///
/// For usage examples, see the top level crate documentation, which showcases a
/// simple echo server and client.
///
/// [`ClientBuilder`]: crate::ClientBuilder
/// [`ServerBuilder`]: crate::ServerBuilder
#[allow(clippy::module_name_repetitions)]
#[derive(Debug)]
pub struct WebSocketStream<T> {
    /// The underlying stream using the [`WebSocketProtocol`] to read and write
    /// full frames.
    inner: FramedRead<T, WebSocketProtocol>,

    /// Configuration for the stream.
    config: Config,

    /// The [`StreamState`] of the current stream.
    state: StreamState,

    /// Payload of the full message that is being assembled.
    partial_payload: BytesMut,
    /// Opcode of the full message that is being assembled.
    partial_opcode: OpCode,

    /// Buffer that outgoing frame headers are formatted into.
    header_buf: [u8; 14],

    /// Queue of outgoing frames to send.
    frame_queue: FrameQueue,

    /// Waker used for currently actively polling
    /// [`WebSocketStream::poll_flush`] until completion.
    flushing_waker: Option<Waker>,

    /// Whether a frame larger than half of [`Config::read_buffer_size`] was
    /// read, so
    /// the read buffer's allocation may have grown beyond the configured size
    /// (possibly hidden behind a small view of it) and should be replaced
    /// once the stream is idle.
    read_buffer_grown: bool,
}

impl<T> WebSocketStream<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    /// Create a new [`WebSocketStream`] from a raw stream.
    #[cfg(any(feature = "client", feature = "server"))]
    pub(crate) fn from_raw_stream(stream: T, role: Role, config: Config, limits: Limits) -> Self {
        Self {
            inner: FramedRead::with_capacity(
                stream,
                WebSocketProtocol::new(role, limits),
                config.read_buffer_size,
            ),
            config,
            state: StreamState::Active,
            partial_payload: BytesMut::new(),
            partial_opcode: OpCode::Continuation,
            header_buf: [0; 14],
            frame_queue: FrameQueue::new(),
            flushing_waker: None,
            read_buffer_grown: false,
        }
    }

    /// Create a new [`WebSocketStream`] from an existing [`FramedRead`]. This
    /// allows for reusing the internal buffer of the [`FramedRead`] object.
    #[cfg(any(feature = "client", feature = "server"))]
    pub(crate) fn from_framed<U>(
        framed: FramedRead<T, U>,
        role: Role,
        config: Config,
        limits: Limits,
    ) -> Self {
        Self {
            inner: framed.map_decoder(|_| WebSocketProtocol::new(role, limits)),
            config,
            state: StreamState::Active,
            partial_payload: BytesMut::new(),
            partial_opcode: OpCode::Continuation,
            header_buf: [0; 14],
            frame_queue: FrameQueue::new(),
            flushing_waker: None,
            read_buffer_grown: false,
        }
    }

    /// Returns a reference to the underlying I/O stream wrapped by this stream.
    ///
    /// Care should be taken not to tamper with the stream of data to avoid
    /// corrupting the stream of frames.
    pub fn get_ref(&self) -> &T {
        self.inner.get_ref()
    }

    /// Returns a mutable reference to the underlying I/O stream wrapped by this
    /// stream.
    ///
    /// Care should be taken not to tamper with the stream of data to avoid
    /// corrupting the stream of frames.
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// Whether every frame given to the sink has been written to the underlying
    /// I/O stream: nothing waits in this stream's write queue (the I/O stream
    /// may still buffer, see [`SinkExt::flush`](futures_sink::Sink::poll_flush)).
    /// Frames leave the queue on an explicit flush, but also when
    /// `poll_ready` finds the queue over the flush threshold and when reading
    /// flushes opportunistically.
    pub fn is_write_queue_empty(&self) -> bool {
        !self.frame_queue.has_remaining()
    }

    /// Returns a reference to the inner websocket limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.decoder().limits
    }

    /// Returns a mutable reference to the inner websocket limits.
    pub fn limits_mut(&mut self) -> &mut Limits {
        &mut self.inner.decoder_mut().limits
    }

    /// Consumes the `WebSocketStream`, returning its underlying I/O stream.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }

    /// Attempt to pull out the next frame from the [`Framed`] this stream and
    /// from that update the stream's internal state.
    ///
    /// # Errors
    ///
    /// This method returns an [`Error`] if reading from the stream fails or a
    /// protocol violation is encountered.
    fn poll_next_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame, Error>>> {
        // In the case of Active or ClosedByUs, we want to receive more messages from
        // the remote. In the case of ClosedByPeer, we have to flush to make sure our
        // close acknowledge goes through.
        if self.state == StreamState::CloseAcknowledged {
            return Poll::Ready(None);
        } else if self.state == StreamState::ClosedByPeer {
            ready!(self.as_mut().poll_flush(cx))?;
            self.state = StreamState::CloseAcknowledged;
            return Poll::Ready(None);
        }

        // If there are pending items, try to flush the sink.
        // Futures only store a single waker. If we use poll_flush(cx) here, the stored
        // waker (i.e. usually that of the write task) is replaced with our waker (i.e.
        // that of the read task) and our write task may never get woken up again. We
        // circumvent this by not calling poll_flush at all if poll_flush is polled by
        // another task at the moment.
        if self.frame_queue.has_remaining() {
            let waker = self.flushing_waker.clone();
            _ = self.as_mut().poll_flush(&mut Context::from_waker(
                waker.as_ref().unwrap_or(cx.waker()),
            ))?;
        }

        if self.config.release_idle_read_buffer && self.inner.read_buffer().capacity() == 0 {
            // Released while idle: read into a buffer of the configured size
            // again, rather than letting the reader grow one from nothing.
            let size = self.config.read_buffer_size;
            self.inner.read_buffer_mut().reserve(size);
        }

        let Poll::Ready(next) = Pin::new(&mut self.inner).poll_next(cx) else {
            // Nothing more to read for now: give back memory held by the read
            // buffer (or by one that grew for a large frame).
            self.shrink_idle_read_buffer();
            return Poll::Pending;
        };

        let frame = match next {
            Some(Ok(frame)) => {
                // A frame larger than the buffer made it grow; one larger than half
                // of it (its header counted) may have, when it arrived split across
                // the buffer's end.
                let frame_len = frame.payload.len() + super::codec::MAX_FRAME_HEADER_SIZE;
                if frame_len > self.config.read_buffer_size / 2 {
                    self.read_buffer_grown = true;
                }
                frame
            }
            Some(Err(e)) => {
                if matches!(e, Error::Io(_)) || self.state == StreamState::ClosedByUs {
                    self.state = StreamState::CloseAcknowledged;
                } else {
                    self.state = StreamState::ClosedByPeer;

                    match &e {
                        Error::Protocol(e) => self.queue_frame(Frame::from(e)),
                        Error::PayloadTooLong { max_len, .. } => self.queue_frame(
                            Message::close(
                                Some(CloseCode::MESSAGE_TOO_BIG),
                                &format!("max length: {max_len}"),
                            )
                            .into(),
                        ),
                        _ => {}
                    }
                }
                return Poll::Ready(Some(Err(e)));
            }
            None => return Poll::Ready(None),
        };

        match frame.opcode {
            OpCode::Close => match self.state {
                StreamState::Active => {
                    self.state = StreamState::ClosedByPeer;

                    let mut frame = frame.clone();
                    frame.payload.truncate(2);

                    self.queue_frame(frame);
                }
                StreamState::ClosedByPeer | StreamState::CloseAcknowledged => {
                    debug_assert!(false, "unexpected StreamState");
                }
                StreamState::ClosedByUs => {
                    self.state = StreamState::CloseAcknowledged;
                }
            },
            OpCode::Ping if self.state == StreamState::Active => {
                // The pong gets a copy of the payload (at most 125 bytes): a slice of
                // the ping's would keep the whole read buffer it was read into alive for
                // as long as the pong waits.
                let pong = Frame {
                    opcode: OpCode::Pong,
                    is_final: true,
                    payload: Bytes::copy_from_slice(&frame.payload).into(),
                };
                let pong = self.encode_frame(pong);
                self.frame_queue.push_pong(pong);
            }
            _ => {}
        }

        Poll::Ready(Some(Ok(frame)))
    }

    /// Masks and queues a frame for sending when [`poll_flush`] gets called.
    fn queue_frame(&mut self, frame: Frame) {
        if frame.opcode == OpCode::Close && self.state != StreamState::ClosedByPeer {
            self.state = StreamState::ClosedByUs;
        }

        let item = self.encode_frame(frame);
        self.frame_queue.push(item);
    }

    /// Encodes (and, for a client, masks) a frame, ready to be queued.
    fn encode_frame(
        &mut self,
        #[cfg_attr(not(feature = "client"), allow(unused_mut))] mut frame: Frame,
    ) -> EncodedFrame {
        #[cfg_attr(not(feature = "client"), allow(unused_variables))]
        let mask = frame.encode(&mut self.header_buf);

        #[cfg(feature = "client")]
        {
            if self.inner.decoder().role == Role::Client {
                let mut payload = BytesMut::from(frame.payload);
                crate::rand::get_mask(mask);
                // mask::frame will mutate the mask in-place, but we want to send the original
                // mask. This is essentially a u32, so copying it is cheap and easier than
                // special-casing this in the masking implementation.
                // &mut *mask won't work, the compiler will optimize the deref/copy away
                let mut mask_copy = *mask;
                crate::mask::frame(&mut mask_copy, &mut payload);
                frame.payload = Payload::from(payload);
                self.header_buf[1] |= 1 << 7;
            }
        }

        EncodedFrame {
            header: self.header_buf,
            payload: frame.payload,
        }
    }

    /// Drops an empty read buffer if [`Config::release_idle_read_buffer`] is
    /// set; otherwise replaces it by a new one of the configured size if it
    /// had to grow beyond that size.
    ///
    /// Only called when the underlying I/O returned [`Poll::Pending`], so no
    /// partial frame is lost and a burst of large frames does not reallocate
    /// for each of them.
    fn shrink_idle_read_buffer(&mut self) {
        let size = self.config.read_buffer_size;
        let buffer = self.inner.read_buffer();
        if self.config.release_idle_read_buffer {
            if buffer.is_empty() && buffer.capacity() > 0 {
                *self.inner.read_buffer_mut() = BytesMut::new();
                self.read_buffer_grown = false;
            }
        } else if buffer.is_empty() && (self.read_buffer_grown || buffer.capacity() > size) {
            *self.inner.read_buffer_mut() = BytesMut::with_capacity(size);
            self.read_buffer_grown = false;
        }
    }

    /// Sets the waker that is currently flushing to a new one and does nothing
    /// if the waker is the same.
    fn set_flushing_waker(&mut self, waker: &Waker) {
        if !self
            .flushing_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(waker))
        {
            self.flushing_waker = Some(waker.clone());
        }
    }
}

impl<T> Stream for WebSocketStream<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Item = Result<Message, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let max_len = self.inner.decoder().limits.max_payload_len;

        loop {
            let (opcode, payload, fin) = match ready!(self.as_mut().poll_next_frame(cx)?) {
                Some(frame) => (frame.opcode, frame.payload, frame.is_final),
                None => return Poll::Ready(None),
            };
            let len = self.partial_payload.len() + payload.len();

            if opcode != OpCode::Continuation {
                if fin {
                    return Poll::Ready(Some(Ok(Message { opcode, payload })));
                }
                self.partial_opcode = opcode;
                self.partial_payload = BytesMut::from(payload);
            } else if len > max_len {
                return Poll::Ready(Some(Err(Error::PayloadTooLong { len, max_len })));
            } else {
                self.partial_payload.extend_from_slice(&payload);
            }

            if fin {
                break;
            }
        }

        let opcode = replace(&mut self.partial_opcode, OpCode::Continuation);
        let mut payload = Payload::from(take(&mut self.partial_payload));
        payload.set_utf8_validated(opcode == OpCode::Text);

        Poll::Ready(Some(Ok(Message { opcode, payload })))
    }
}

// The tokio-util implementation of a sink uses a buffer which start_send
// appends to and poll_flush tries to write from. This makes sense, but comes
// with a hefty performance penalty when sending large payloads, since this adds
// a memmove from the payload to the buffer. We completely avoid that overhead
// by storing messages in a deque.
impl<T> Sink<Message> for WebSocketStream<T>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    type Error = Error;

    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // tokio-util calls poll_flush when more than 8096 bytes are pending, otherwise
        // it returns Ready. We will just replicate that behavior.
        // The pongs that a later one replaced count as queued: otherwise a peer that
        // pings without reading would never bring the queue to the threshold, and a
        // caller that waits for the sink before reading would read its pings forever.
        if self.frame_queue.backlog() >= self.config.flush_threshold {
            self.as_mut().poll_flush(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
        if self.state != StreamState::Active {
            return Err(Error::AlreadyClosed);
        }

        if item.opcode.is_control() || item.payload.len() <= self.config.frame_size {
            let frame: Frame = item.into();
            self.queue_frame(frame);
        } else {
            // Chunk the message into frames
            for frame in item.into_frames(self.config.frame_size) {
                self.queue_frame(frame);
            }
        }

        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Borrow checker hacks... It needs this to understand that we can separately
        // borrow the fields of the struct mutably
        let this = self.get_mut();
        let frame_queue = &mut this.frame_queue;
        let io = this.inner.get_mut();
        let flushing_waker = &mut this.flushing_waker;

        while frame_queue.has_remaining() {
            let n = match poll_write_buf(Pin::new(io), cx, frame_queue) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => {
                    *flushing_waker = None;
                    this.state = StreamState::CloseAcknowledged;
                    return Poll::Ready(Err(Error::Io(e)));
                }
                Poll::Pending => {
                    this.set_flushing_waker(cx.waker());
                    return Poll::Pending;
                }
            };

            if n == 0 {
                *flushing_waker = None;
                this.state = StreamState::CloseAcknowledged;
                return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())));
            }
        }

        match Pin::new(io).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                *flushing_waker = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                *flushing_waker = None;
                this.state = StreamState::CloseAcknowledged;
                Poll::Ready(Err(Error::Io(e)))
            }
            Poll::Pending => {
                this.set_flushing_waker(cx.waker());
                Poll::Pending
            }
        }
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.state == StreamState::Active {
            self.queue_frame(Frame::DEFAULT_CLOSE);
        }
        while ready!(self.as_mut().poll_next(cx)).is_some() {}

        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(self.inner.get_mut())
            .poll_shutdown(cx)
            .map_err(Error::Io)
    }
}

#[cfg(all(test, feature = "server"))]
mod read_buffer_tests {
    //! Tests for [`Config::read_buffer_size`].
    use std::{
        future::poll_fn,
        pin::Pin,
        task::{Context, Poll, Waker},
    };

    use futures_core::Stream;
    use tokio::io::{AsyncWriteExt, DuplexStream, duplex};

    use super::WebSocketStream;
    use crate::{Config, Message, ServerBuilder};

    /// Encodes a final, masked binary frame as a client sends it.
    fn client_frame(payload: &[u8]) -> Vec<u8> {
        let mask = [0x1f, 0x2e, 0x3d, 0x4c];
        let mut frame = vec![0x82];
        if payload.len() < 126 {
            frame.push(0x80 | u8::try_from(payload.len()).unwrap());
        } else if let Ok(len) = u16::try_from(payload.len()) {
            frame.push(0xfe);
            frame.extend_from_slice(&len.to_be_bytes());
        } else {
            frame.push(0xff);
            frame.extend_from_slice(&u64::try_from(payload.len()).unwrap().to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        frame
    }

    /// A server stream over an in-memory pipe, and the client end of it.
    fn server(config: Config) -> (WebSocketStream<DuplexStream>, DuplexStream) {
        let (client, server) = duplex(1 << 20);
        (ServerBuilder::new().config(config).serve(server), client)
    }

    /// Polls for the next message once, without waiting.
    fn poll_once(ws: &mut WebSocketStream<DuplexStream>) -> Poll<Option<Message>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(ws)
            .poll_next(&mut cx)
            .map(|item| item.map(|message| message.unwrap()))
    }

    /// Waits for the next message.
    async fn next(ws: &mut WebSocketStream<DuplexStream>) -> Message {
        poll_fn(|cx| Pin::new(&mut *ws).poll_next(cx))
            .await
            .unwrap()
            .unwrap()
    }

    #[test]
    fn read_buffer_starts_at_configured_capacity() {
        let (ws, _client) = server(Config::default().read_buffer_size(1024));
        assert_eq!(ws.inner.read_buffer().capacity(), 1024);

        let (ws, _client) = server(Config::default());
        assert_eq!(ws.inner.read_buffer().capacity(), 8 * 1024);
    }

    #[test]
    #[should_panic(expected = "read_buffer_size must be non-zero")]
    fn zero_read_buffer_size_panics() {
        let _ = Config::default().read_buffer_size(0);
    }

    #[tokio::test]
    async fn grown_read_buffer_is_released_when_idle() {
        let (mut ws, mut client) = server(Config::default().read_buffer_size(1024));
        let large: Vec<u8> = (0..64 * 1024u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();

        // Once the message is dropped the buffer could reclaim its whole grown
        // allocation; idle, it must be back at the configured size instead.
        client.write_all(&client_frame(&large)).await.unwrap();
        assert_eq!(&next(&mut ws).await.as_payload()[..], large.as_slice());
        assert!(poll_once(&mut ws).is_pending());
        let buffer = ws.inner.read_buffer();
        assert!(buffer.is_empty());
        assert_eq!(buffer.capacity(), 1024);

        // Large and small messages keep working after the shrink.
        client.write_all(&client_frame(&large)).await.unwrap();
        client.write_all(&client_frame(b"small")).await.unwrap();
        assert_eq!(&next(&mut ws).await.as_payload()[..], large.as_slice());
        assert_eq!(&next(&mut ws).await.as_payload()[..], b"small");
        assert!(poll_once(&mut ws).is_pending());
        assert_eq!(ws.inner.read_buffer().capacity(), 1024);
    }

    #[tokio::test]
    async fn buffer_is_not_left_as_a_view_into_a_grown_allocation() {
        let (mut ws, mut client) = server(Config::default().read_buffer_size(1024));
        // Larger than the buffer: it grows to twice its size, and after the frame
        // is split off, the rest of that allocation stays behind as a small view.
        let medium = vec![3u8; 1500];
        client.write_all(&client_frame(&medium)).await.unwrap();

        let message = next(&mut ws).await;
        assert_eq!(&message.as_payload()[..], medium.as_slice());
        let message_end = message.as_payload().as_ptr().wrapping_add(medium.len());
        assert!(poll_once(&mut ws).is_pending());

        let buffer = ws.inner.read_buffer();
        assert_eq!(buffer.capacity(), 1024);
        assert_ne!(buffer.as_ptr(), message_end);
    }

    #[tokio::test]
    async fn a_frame_split_across_the_buffers_end_does_not_leave_a_grown_buffer() {
        let (mut ws, mut client) = server(Config::default().read_buffer_size(1024));
        // A first frame of 510 bytes (a 502-byte payload and its 8-byte header), then one
        // of 516 (a 508-byte payload, not over half the buffer, and its 8-byte header):
        // the second one arrives split across the buffer's end, and the buffer grows for
        // its last bytes.
        let first = client_frame(&[1u8; 502]);
        assert_eq!(first.len(), 510);
        let second = client_frame(&[2u8; 508]);
        assert_eq!(second.len(), 516);
        let bytes = [first, second].concat();
        client.write_all(&bytes).await.unwrap();
        let one = next(&mut ws).await;
        let two = next(&mut ws).await;
        assert_eq!(two.as_payload().len(), 508);
        drop((one, two));
        assert!(poll_once(&mut ws).is_pending());
        // Idle, the buffer is one of the configured size, not a view into the grown one.
        let buffer = ws.inner.read_buffer();
        assert!(buffer.is_empty());
        assert_eq!(buffer.capacity(), 1024);
    }

    #[tokio::test]
    async fn partial_frame_survives_idle_polls() {
        let (mut ws, mut client) = server(Config::default().read_buffer_size(1024));
        let large = vec![7u8; 10_000];
        let frame = client_frame(&large);
        let (head, tail) = frame.split_at(frame.len() / 2);

        client.write_all(head).await.unwrap();
        assert!(poll_once(&mut ws).is_pending());
        assert_eq!(ws.inner.read_buffer().len(), head.len());

        client.write_all(tail).await.unwrap();
        assert_eq!(&next(&mut ws).await.as_payload()[..], large.as_slice());
    }

    #[tokio::test]
    async fn idle_read_buffer_is_released_and_comes_back_on_data() {
        let config = Config::default()
            .read_buffer_size(1024)
            .release_idle_read_buffer(true);
        let (mut ws, mut client) = server(config);
        // Idle from the start: nothing to read, no buffer held.
        assert!(poll_once(&mut ws).is_pending());
        assert_eq!(ws.inner.read_buffer().capacity(), 0);

        // Data arrives: read into a buffer of the configured size, not one
        // grown from nothing a few bytes at a time.
        let large = vec![9u8; 5000];
        client.write_all(&client_frame(b"first")).await.unwrap();
        client.write_all(&client_frame(&large)).await.unwrap();
        assert_eq!(&next(&mut ws).await.as_payload()[..], b"first");
        assert!(ws.inner.read_buffer().capacity() >= 1024 - 11);
        assert_eq!(&next(&mut ws).await.as_payload()[..], large.as_slice());
        assert!(poll_once(&mut ws).is_pending());
        assert_eq!(ws.inner.read_buffer().capacity(), 0);

        for i in 0..50u8 {
            client.write_all(&client_frame(&[i; 100])).await.unwrap();
            assert_eq!(&next(&mut ws).await.as_payload()[..], &[i; 100]);
        }
        assert!(poll_once(&mut ws).is_pending());
        assert_eq!(ws.inner.read_buffer().capacity(), 0);
    }

    #[tokio::test]
    async fn partial_frame_is_kept_when_idle_buffers_are_released() {
        let config = Config::default()
            .read_buffer_size(1024)
            .release_idle_read_buffer(true);
        let (mut ws, mut client) = server(config);
        let large = vec![7u8; 10_000];
        let frame = client_frame(&large);
        let (head, tail) = frame.split_at(frame.len() / 2);

        client.write_all(head).await.unwrap();
        assert!(poll_once(&mut ws).is_pending());
        assert_eq!(ws.inner.read_buffer().len(), head.len());

        client.write_all(tail).await.unwrap();
        assert_eq!(&next(&mut ws).await.as_payload()[..], large.as_slice());
        assert!(poll_once(&mut ws).is_pending());
        assert_eq!(ws.inner.read_buffer().capacity(), 0);
    }

    #[tokio::test]
    async fn small_messages_keep_the_configured_buffer() {
        let (mut ws, mut client) = server(Config::default().read_buffer_size(1024));
        for i in 0..100u8 {
            client.write_all(&client_frame(&[i; 100])).await.unwrap();
            assert_eq!(&next(&mut ws).await.as_payload()[..], &[i; 100]);
        }
        assert!(poll_once(&mut ws).is_pending());
        assert!(ws.inner.read_buffer().capacity() <= 1024);
    }
}

#[cfg(all(test, feature = "server"))]
mod pong_tests {
    //! Tests for the answers to pings (at most one pong waits, in a buffer of its own)
    //! and for the memory of the write queue.
    use std::{
        collections::VecDeque,
        io,
        pin::Pin,
        sync::{Arc, Mutex},
        task::{Context, Poll, Waker},
    };

    use futures_core::Stream;
    use futures_sink::Sink;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    use super::WebSocketStream;
    #[cfg(feature = "client")]
    use crate::ClientBuilder;
    use crate::{Config, Message, ServerBuilder};

    /// The far end of a [`TestIo`].
    #[derive(Default)]
    struct Peer {
        /// What the stream will read: one chunk per read, as one TCP segment each.
        incoming: VecDeque<Vec<u8>>,
        /// What the stream wrote.
        written: Vec<u8>,
        /// How many more bytes the stream may write before its writes pend.
        allowance: usize,
    }

    /// An I/O stream over a shared [`Peer`]: reads pend once nothing is left, writes pend
    /// once the allowance is used up (nothing is woken: the tests poll by hand).
    struct TestIo(Arc<Mutex<Peer>>);

    impl AsyncRead for TestIo {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let mut peer = self.0.lock().unwrap();
            let Some(chunk) = peer.incoming.front_mut() else {
                return Poll::Pending;
            };
            let n = buf.remaining().min(chunk.len());
            buf.put_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                peer.incoming.pop_front();
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for TestIo {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let mut peer = self.0.lock().unwrap();
            let n = buf.len().min(peer.allowance);
            if n == 0 {
                return Poll::Pending;
            }
            peer.allowance -= n;
            peer.written.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A server stream with a 1 KiB read buffer over a [`TestIo`] whose writes pend, and
    /// its peer.
    fn server() -> (WebSocketStream<TestIo>, Arc<Mutex<Peer>>) {
        server_with(Config::default())
    }

    /// Like [`server`], with `config` (its read buffer set to 1 KiB).
    fn server_with(config: Config) -> (WebSocketStream<TestIo>, Arc<Mutex<Peer>>) {
        let peer = Arc::new(Mutex::new(Peer::default()));
        let config = config.read_buffer_size(1024);
        let ws = ServerBuilder::new()
            .config(config)
            .serve(TestIo(Arc::clone(&peer)));
        (ws, peer)
    }

    /// A masked ping as a client sends it.
    fn client_ping(payload: &[u8]) -> Vec<u8> {
        let mask = [0x5a, 0x01, 0xc3, 0x7e];
        let mut frame = vec![0x89, 0x80 | u8::try_from(payload.len()).unwrap()];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        frame
    }

    /// An unmasked pong as a server sends it.
    fn server_pong(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x8a, u8::try_from(payload.len()).unwrap()];
        frame.extend_from_slice(payload);
        frame
    }

    /// Data that the stream will find in one read.
    fn arrive(peer: &Mutex<Peer>, bytes: Vec<u8>) {
        peer.lock().unwrap().incoming.push_back(bytes);
    }

    /// Lets the stream write `bytes` more bytes.
    fn allow(peer: &Mutex<Peer>, bytes: usize) {
        peer.lock().unwrap().allowance = bytes;
    }

    fn cx() -> Context<'static> {
        Context::from_waker(Waker::noop())
    }

    /// Reads the next message, which must be there already.
    fn read<T: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<T>) -> Message {
        match Pin::new(ws).poll_next(&mut cx()) {
            Poll::Ready(Some(Ok(message))) => message,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Lets writes through and flushes everything queued.
    fn flush_all(ws: &mut WebSocketStream<TestIo>, peer: &Mutex<Peer>) -> Vec<u8> {
        allow(peer, usize::MAX);
        assert!(matches!(
            Pin::new(&mut *ws).poll_flush(&mut cx()),
            Poll::Ready(Ok(()))
        ));
        std::mem::take(&mut peer.lock().unwrap().written)
    }

    #[test]
    fn pings_read_while_no_pong_can_be_written_leave_one_pong_queued_for_the_latest() {
        let (mut ws, peer) = server();
        for i in 0..1000u16 {
            arrive(&peer, client_ping(&i.to_be_bytes()));
        }
        for i in 0..1000u16 {
            let ping = read(&mut ws);
            assert!(ping.is_ping());
            assert_eq!(&ping.as_payload()[..], &i.to_be_bytes());
        }
        // RFC 6455, 5.5.3: a pong for the most recent ping only.
        assert_eq!(ws.frame_queue.queue.len(), 1);
        assert_eq!(ws.frame_queue.pending_bytes, 4);
        assert_eq!(
            flush_all(&mut ws, &peer),
            server_pong(&999u16.to_be_bytes())
        );
        // Written, it is no longer replaced: the next ping gets a pong of its own.
        allow(&peer, 0);
        arrive(&peer, client_ping(b"next"));
        assert!(read(&mut ws).is_ping());
        assert_eq!(flush_all(&mut ws, &peer), server_pong(b"next"));
    }

    #[test]
    fn a_queued_pong_does_not_hold_on_to_the_read_buffer() {
        let (mut ws, peer) = server();
        arrive(&peer, client_ping(b"hello"));
        let ping = read(&mut ws);
        assert_eq!(&ping.as_payload()[..], b"hello");
        drop(ping);
        // The pong waits; the read buffer can still take back its whole allocation, which
        // it could not if the pong's payload were a slice of it.
        assert_eq!(ws.frame_queue.queue.len(), 1);
        assert!(ws.inner.read_buffer_mut().try_reclaim(1024));
        assert_eq!(flush_all(&mut ws, &peer), server_pong(b"hello"));
    }

    #[test]
    fn a_pong_partly_written_goes_out_whole_and_the_latest_ping_gets_the_next() {
        let (mut ws, peer) = server();
        allow(&peer, 1);
        for payload in [&b"first"[..], b"second", b"third", b"fourth"] {
            arrive(&peer, client_ping(payload));
        }
        assert!(read(&mut ws).is_ping());
        // Reading the next ping first writes what it can of the first pong: one byte.
        for _ in 0..3 {
            assert!(read(&mut ws).is_ping());
        }
        assert_eq!(peer.lock().unwrap().written, [0x8a]);
        assert_eq!(ws.frame_queue.queue.len(), 2);
        let expected = [server_pong(b"first"), server_pong(b"fourth")].concat();
        assert_eq!(flush_all(&mut ws, &peer), expected);
    }

    #[test]
    fn poll_ready_counts_the_replaced_pongs_toward_the_flush_threshold() {
        let (mut ws, peer) = server_with(Config::default().flush_threshold(16));
        // Pongs of 4 bytes: the fourth ping brings them to the threshold, though only one
        // is kept.
        for i in 0..4u8 {
            arrive(&peer, client_ping(&[i; 2]));
            assert!(matches!(
                Pin::new(&mut ws).poll_ready(&mut cx()),
                Poll::Ready(Ok(()))
            ));
            assert!(read(&mut ws).is_ping());
        }
        assert_eq!(ws.frame_queue.queue.len(), 1);
        // The caller is held back (and one that waits for the sink before reading, as a
        // server that stops reading a peer it cannot write to, reads no more).
        assert!(Pin::new(&mut ws).poll_ready(&mut cx()).is_pending());
        allow(&peer, usize::MAX);
        assert!(matches!(
            Pin::new(&mut ws).poll_ready(&mut cx()),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(peer.lock().unwrap().written, server_pong(&[3; 2]));
        // Once the pong is out, the ones it replaced no longer count.
        allow(&peer, 0);
        for i in 4..7u8 {
            arrive(&peer, client_ping(&[i; 2]));
            assert!(read(&mut ws).is_ping());
        }
        assert!(matches!(
            Pin::new(&mut ws).poll_ready(&mut cx()),
            Poll::Ready(Ok(()))
        ));
    }

    #[test]
    #[cfg(feature = "client")]
    fn a_client_replacing_its_queued_pong_masks_the_new_one() {
        let peer = Arc::new(Mutex::new(Peer::default()));
        let mut ws = ClientBuilder::new().take_over(TestIo(Arc::clone(&peer)));
        for payload in [&b"one"[..], b"two"] {
            let mut ping = vec![0x89, u8::try_from(payload.len()).unwrap()];
            ping.extend_from_slice(payload);
            arrive(&peer, ping);
            assert!(read(&mut ws).is_ping());
        }
        allow(&peer, usize::MAX);
        assert!(matches!(
            Pin::new(&mut ws).poll_flush(&mut cx()),
            Poll::Ready(Ok(()))
        ));
        let written = std::mem::take(&mut peer.lock().unwrap().written);
        assert_eq!(written.len(), 2 + 4 + 3, "one masked pong: {written:?}");
        assert_eq!(written[..2], [0x8a, 0x80 | 3]);
        let mask = &written[2..6];
        let payload: Vec<u8> = written[6..]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(b, m)| b ^ m)
            .collect();
        assert_eq!(payload, b"two");
    }

    #[test]
    fn the_write_queue_gives_back_its_grown_capacity_once_drained() {
        let (mut ws, peer) = server();
        for i in 0..1000u16 {
            let message = Message::binary(i.to_be_bytes().to_vec());
            Pin::new(&mut ws).start_send(message).unwrap();
        }
        assert!(ws.frame_queue.queue.capacity() >= 1000);
        assert_eq!(flush_all(&mut ws, &peer).len(), 1000 * 4);
        assert!(
            ws.frame_queue.queue.capacity() <= 4,
            "capacity {} kept",
            ws.frame_queue.queue.capacity()
        );
        // A small burst keeps its room: no reallocation each time the queue drains.
        for i in 0..20u8 {
            Pin::new(&mut ws)
                .start_send(Message::binary(vec![i]))
                .unwrap();
        }
        let capacity = ws.frame_queue.queue.capacity();
        assert!(capacity >= 20);
        assert_eq!(flush_all(&mut ws, &peer).len(), 20 * 3);
        assert_eq!(ws.frame_queue.queue.capacity(), capacity);
    }
}
