//! A websocket client driven by hand on a raw TCP socket, for what a well-behaved client library
//! will not do: send fragments of our choosing, never read, never answer a ping, or shrink its
//! receive buffer so the gateway's writes stall.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{parse_response, upgrade_request, RawResponse};

/// Frame opcodes (RFC 6455, 5.2).
pub const CONTINUATION: u8 = 0x0;
/// Text frame.
pub const TEXT: u8 = 0x1;
/// Binary frame.
pub const BINARY: u8 = 0x2;
/// Close frame.
pub const CLOSE: u8 = 0x8;
/// Ping frame.
pub const PING: u8 = 0x9;
/// Pong frame.
pub const PONG: u8 = 0xA;

/// One frame as the server sent it.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// The FIN bit: the last frame of its message.
    pub fin: bool,
    /// The opcode ([`TEXT`], [`PING`], ...).
    pub opcode: u8,
    /// The (unmasked) payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame (`None` for other frames or an empty close).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// The close reason of a close frame.
    pub fn close_reason(&self) -> String {
        if self.opcode == CLOSE && self.payload.len() > 2 {
            String::from_utf8_lossy(&self.payload[2..]).into_owned()
        } else {
            String::new()
        }
    }
}

/// A raw websocket connection after a successful upgrade.
pub struct RawWs {
    /// The socket, for reading or writing raw bytes directly.
    pub stream: TcpStream,
    /// The upgrade response.
    pub response: RawResponse,
    buf: Vec<u8>,
}

impl RawWs {
    /// Upgrades `path`; panics unless the gateway answers 101.
    pub async fn connect(addr: SocketAddr, path: &str) -> RawWs {
        RawWs::connect_with_recv_buffer(addr, path, None).await
    }

    /// Like [`RawWs::connect`], with `SO_RCVBUF` set before connecting (so the kernel does not
    /// grow it): a small value makes the gateway's writes stall as soon as we stop reading.
    pub async fn connect_with_recv_buffer(
        addr: SocketAddr,
        path: &str,
        recv_buffer: Option<u32>,
    ) -> RawWs {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let mut stream = socket.connect(addr).await.expect("connect");
        stream
            .write_all(&upgrade_request(path, &[]))
            .await
            .expect("write upgrade request");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("upgrade response within 10s")
                .expect("read upgrade response");
            assert!(n > 0, "connection closed before the upgrade response");
            buf.extend_from_slice(&chunk[..n]);
        };
        let response = parse_response(&buf[..head_end]).expect("an HTTP response");
        assert_eq!(response.status, 101, "upgrade refused: {response:?}");
        let rest = buf[head_end..].to_vec();
        RawWs {
            stream,
            response,
            buf: rest,
        }
    }

    /// Sends one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let frame = encode_client_frame(fin, opcode, payload);
        self.stream.write_all(&frame).await.expect("write frame");
    }

    /// Reads the next frame; `None` when the connection ended (EOF or reset). Panics when
    /// nothing complete arrives within `within`.
    pub async fn read_frame(&mut self, within: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((frame, used)) = decode_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("no complete frame within {within:?}"));
            match read {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads until a close frame or the end of the connection, like [`RawWs::until_close`],
    /// and returns the data messages read on the way (fragments joined), then the close frame.
    pub async fn messages_until_close(
        &mut self,
        within: Duration,
    ) -> (Vec<Vec<u8>>, Option<RawFrame>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut messages = Vec::new();
        let mut partial = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Some(frame) if frame.opcode == CLOSE => return (messages, Some(frame)),
                Some(frame) if matches!(frame.opcode, TEXT | BINARY | CONTINUATION) => {
                    partial.extend_from_slice(&frame.payload);
                    if frame.fin {
                        messages.push(std::mem::take(&mut partial));
                    }
                }
                Some(_) => continue,
                None => return (messages, None),
            }
        }
    }

    /// Reads frames until a close frame (returned) or the end of the connection (`None`),
    /// skipping data and ping frames; gives up after `within`.
    pub async fn until_close(&mut self, within: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Some(frame) if frame.opcode == CLOSE => return Some(frame),
                Some(_) => continue,
                None => return None,
            }
        }
    }
}

/// Encodes a client frame (masked, as RFC 6455 requires of clients).
pub fn encode_client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![(u8::from(fin) << 7) | opcode];
    if payload.len() < 126 {
        frame.push(0x80 | payload.len() as u8);
    } else if let Ok(len) = u16::try_from(payload.len()) {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&len.to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    frame
}

/// Decodes one unmasked server frame off the front of `data`: the frame and the bytes it used.
pub fn decode_server_frame(data: &[u8]) -> Option<(RawFrame, usize)> {
    if data.len() < 2 {
        return None;
    }
    let fin = data[0] & 0x80 != 0;
    let opcode = data[0] & 0x0f;
    let masked = data[1] & 0x80 != 0;
    let (len, mut at) = match data[1] & 0x7f {
        126 => {
            if data.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([data[2], data[3]]) as usize, 4)
        }
        127 => {
            if data.len() < 10 {
                return None;
            }
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&data[2..10]);
            (u64::from_be_bytes(raw) as usize, 10)
        }
        n => (n as usize, 2),
    };
    assert!(!masked, "a server must not mask its frames");
    if data.len() < at + len {
        return None;
    }
    let payload = data[at..at + len].to_vec();
    at += len;
    Some((
        RawFrame {
            fin,
            opcode,
            payload,
        },
        at,
    ))
}
