//! The bench's message format and the per-connection reply checker.
//!
//! A request is `c<conn>:<seq>;` followed by padding; the echoed reply must carry the prefix of
//! the oldest request still in flight on the same connection. Anything else is classified as
//! cross-talk (another connection's reply), out of order (a later request of ours answered
//! first), or unexpected (no such request, or not our format at all). A reply that names the
//! right request must also be, byte for byte, what `mock-api` sends back for it ([`EchoShape`]),
//! else it is corrupted, and come in the frame type the gateway promises for that answer
//! ([`reply_is_binary`]), else it is of the wrong type. A push, likewise, must come in the frame
//! type the control API promises for it ([`push_is_binary`], [`LastPush::check_frame`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Prefix of a pushed message: `push:<ns since the epoch>:<index of the client id it was for>`.
pub const PUSH_PREFIX: &[u8] = b"push:";

/// The byte that pads a request to its size.
const PAD: u8 = b'x';

/// The longest request head, `c<u64::MAX>:<u64::MAX>;`.
const HEAD_MAX: usize = 1 + 20 + 1 + 20 + 1;

/// Writes the head `c<conn>:<seq>;` of a request into `buf` (no allocation) and returns its
/// length.
fn request_head(conn: u64, seq: u64, buf: &mut [u8; HEAD_MAX]) -> usize {
    use std::io::Write;
    let mut rest = &mut buf[..];
    write!(rest, "c{conn}:{seq};").expect("HEAD_MAX holds any head");
    HEAD_MAX - rest.len()
}

/// Builds a request payload for connection `conn`, sequence `seq`, padded with `x` to `size`
/// bytes (never shorter than the prefix itself).
pub fn request_payload(conn: u64, seq: u64, size: usize) -> Vec<u8> {
    let mut head = [0; HEAD_MAX];
    let n = request_head(conn, seq, &mut head);
    let mut v = head[..n].to_vec();
    if v.len() < size {
        v.resize(size, PAD);
    }
    v
}

/// The frame type the gateway sends an API answer back in: binary (`true`) if the answer says
/// `Content-Type: application/octet-stream` (`octet_stream`) or its body is not UTF-8, text
/// otherwise (README, "The flows, as the API sees them": "binary if `Content-Type:
/// application/octet-stream` or not UTF-8, text otherwise"). The request's own type plays no
/// part: a binary message whose answer is UTF-8 text without that header comes back as text.
pub fn reply_is_binary(octet_stream: bool, body: &[u8]) -> bool {
    octet_stream || std::str::from_utf8(body).is_err()
}

/// What the reply to a request of `load` must be, byte for byte: the request's payload as
/// `mock-api` echoes it, in full or (`--reply-bytes`) its first bytes only; and in which frame
/// type ([`EchoShape::binary`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EchoShape {
    /// The request size asked (`load --payload`): the head, padded with `x` up to it.
    pub payload: usize,
    /// `mock-api --reply-bytes`: it echoes at most this many bytes; 0 echoes the whole body.
    pub reply_bytes: usize,
}

impl EchoShape {
    /// True when `reply` is exactly what `mock-api` returns for the request (`conn`, `seq`):
    /// the same head in the same digits, the padding unchanged, nothing missing or added. It
    /// compares bytes against a head written on the stack: no allocation per reply.
    pub fn matches(&self, reply: &[u8], conn: u64, seq: u64) -> bool {
        let mut head = [0; HEAD_MAX];
        let head_len = request_head(conn, seq, &mut head);
        let mut len = head_len.max(self.payload);
        if self.reply_bytes > 0 {
            len = len.min(self.reply_bytes);
        }
        let in_head = head_len.min(len);
        reply.len() == len
            && reply[..in_head] == head[..in_head]
            && reply[in_head..].iter().all(|&b| b == PAD)
    }

    /// Whether the gateway must send `body`, `mock-api`'s answer, back as a binary frame
    /// ([`reply_is_binary`]): `mock-api` answers a POST with no `Content-Type`, so only a body
    /// that is not UTF-8 would be. The requests `load` sends are ASCII, and so is any first
    /// part of one: their replies come back as text, whether the request was text or binary.
    pub fn binary(&self, body: &[u8]) -> bool {
        reply_is_binary(false, body)
    }
}

/// The frame type the gateway delivers a push in: binary (`true`) if the `POST /<ClientId>` to
/// its control API said `Content-Type: application/octet-stream` (`octet_stream`), text
/// otherwise (README, "Control API": "binary with `Content-Type: application/octet-stream`,
/// else text, which must be UTF-8"; a text push that is not UTF-8 is refused `400`, so unlike
/// an API answer its body plays no part: src/control.rs, `push`).
pub fn push_is_binary(octet_stream: bool) -> bool {
    octet_stream
}

/// Whether the pushes `push` sends come as binary frames ([`push_is_binary`]): `push` posts
/// its ASCII bodies ([`push_payload`]) with no `Content-Type`, so the gateway delivers them as
/// text.
pub const PUSH_BINARY: bool = false;

/// Builds a push body for client id number `target`, carrying the current wall-clock time.
pub fn push_payload(target: u64) -> String {
    format!("push:{}:{target}", now_ns())
}

/// Nanoseconds since the Unix epoch (wall clock, shared by all processes of the machine).
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// What a connection remembers of the pushes it has had: the send time of the newest, so that a
/// push delivered twice, or after a newer one, is caught.
///
/// Why one number is enough: a push carries the wall-clock time at which `push` built it, and
/// `push` sends the pushes for one client id one after another (round `r + 1` only once every
/// POST of round `r` was answered), while the gateway answers a POST only once the push is
/// queued on the client's socket, behind the ones before it. So the pushes one connection gets
/// come with strictly increasing send times, and a push that is not newer than the newest seen
/// is an error: the same push again ([`PushVerdict::Duplicate`]), or an older one after a newer
/// ([`PushVerdict::OutOfOrder`]: a repeat of an earlier one, or one delivered late). That is
/// 8 bytes per connection, at 15,000 connections, where keeping every push seen would grow
/// with the run; and successive `push` runs against the same `load` keep working, their times
/// being later. Two `push` runs at once to the same client ids (or the wall clock stepped
/// back during a run) would be reported as out of order: run one at a time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LastPush {
    /// Send time of the newest push seen, ns since the epoch; 0 before the first.
    newest_ns: u64,
}

/// The outcome of checking a push against the ones its connection had before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushVerdict {
    /// Newer than every push before it: a delivery.
    Delivered,
    /// The same send time as the newest push seen: that push delivered again.
    Duplicate,
    /// Older than a push already seen: delivered again, or out of order.
    OutOfOrder,
    /// Newer than every push before it, but in a frame of the other type than the gateway
    /// promises for it (binary for a text push, or text for a binary one: [`push_is_binary`]).
    WrongType,
}

impl PushVerdict {
    /// A short label used as the error kind in reports (`None` for a delivery).
    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            PushVerdict::Delivered => None,
            PushVerdict::Duplicate => Some("push_duplicate"),
            PushVerdict::OutOfOrder => Some("push_out_of_order"),
            PushVerdict::WrongType => Some("push_wrong_type"),
        }
    }
}

impl LastPush {
    /// Checks a push sent at `sent_ns` (ns since the epoch) and remembers it if it is the
    /// newest.
    pub fn check(&mut self, sent_ns: u128) -> PushVerdict {
        // ns since the epoch fit a u64 until 2554.
        let sent_ns = u64::try_from(sent_ns).unwrap_or(u64::MAX);
        if sent_ns > self.newest_ns {
            self.newest_ns = sent_ns;
            PushVerdict::Delivered
        } else if sent_ns == self.newest_ns {
            PushVerdict::Duplicate
        } else {
            PushVerdict::OutOfOrder
        }
    }

    /// Checks a push sent at `sent_ns` that came in a binary frame (`binary`) or a text one,
    /// where the gateway promises a binary one when `expect_binary` ([`push_is_binary`];
    /// [`PUSH_BINARY`] for the pushes of `push`): first as [`LastPush::check`] does (so a
    /// repeat is a duplicate, whatever its frame), then its frame type
    /// ([`PushVerdict::WrongType`] when it is not the one promised). A push in the wrong type
    /// is still remembered as the newest: it did arrive, and the same push again is a
    /// duplicate.
    pub fn check_frame(&mut self, sent_ns: u128, binary: bool, expect_binary: bool) -> PushVerdict {
        match self.check(sent_ns) {
            PushVerdict::Delivered if binary != expect_binary => PushVerdict::WrongType,
            v => v,
        }
    }
}

/// What a received message is, judged by its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// An echo of a request: the connection index and sequence number it names.
    Echo {
        /// Connection index named in the reply.
        conn: u64,
        /// Sequence number named in the reply.
        seq: u64,
    },
    /// A pushed message with its send time in ns since the epoch.
    Push {
        /// When `push` sent it.
        sent_ns: u128,
        /// The index of the client id it was pushed to, when it says (`load` checks that it
        /// came on that client's connection).
        target: Option<u64>,
    },
    /// Anything else (for example an empty error reply).
    Unknown,
}

/// Parses a received payload into a [`Reply`].
pub fn parse_reply(b: &[u8]) -> Reply {
    if let Some(rest) = b.strip_prefix(PUSH_PREFIX) {
        let (time, target) = match rest.iter().position(|&c| c == b':') {
            Some(colon) => (&rest[..colon], Some(&rest[colon + 1..])),
            None => (rest, None),
        };
        let target = match target.map(parse_u128) {
            None => None,
            Some(Some(t)) => Some(t as u64),
            Some(None) => return Reply::Unknown,
        };
        return match parse_u128(time) {
            Some(sent_ns) => Reply::Push { sent_ns, target },
            None => Reply::Unknown,
        };
    }
    let Some(rest) = b.strip_prefix(b"c") else {
        return Reply::Unknown;
    };
    let Some(colon) = rest.iter().position(|&c| c == b':') else {
        return Reply::Unknown;
    };
    let Some(semi) = rest.iter().position(|&c| c == b';') else {
        return Reply::Unknown;
    };
    if semi < colon {
        return Reply::Unknown;
    }
    match (
        parse_u128(&rest[..colon]),
        parse_u128(&rest[colon + 1..semi]),
    ) {
        (Some(conn), Some(seq)) => Reply::Echo {
            conn: conn as u64,
            seq: seq as u64,
        },
        _ => Reply::Unknown,
    }
}

fn parse_u128(b: &[u8]) -> Option<u128> {
    if b.is_empty() || b.len() > 38 {
        return None;
    }
    let mut n: u128 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u128::from(c - b'0');
    }
    Some(n)
}

/// The outcome of checking one echo reply against the requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The reply answers the oldest request in flight; the round-trip time is given.
    Ok(Duration),
    /// The reply names another connection.
    CrossTalk,
    /// The reply answers one of our requests, but not the oldest one in flight.
    OutOfOrder,
    /// The reply names a sequence number that is not in flight (duplicate or invented).
    Unexpected,
    /// The reply names the oldest request in flight, which it answers, but its bytes are not
    /// what the API sends back for it (a tail changed, cut short or extended).
    Corrupted,
    /// The reply answers the oldest request in flight with the right bytes, but in a frame of
    /// the other type (binary for a text answer, or text for a binary one: [`EchoShape::binary`]).
    WrongType,
    /// The reply answers a request already given up on and counted missing
    /// ([`InFlight::give_up`]): neither a reply nor a second error.
    Late,
}

impl Verdict {
    /// A short label used as the error kind in reports (`None` for [`Verdict::Ok`]).
    pub fn error_kind(self) -> Option<&'static str> {
        match self {
            Verdict::Ok(_) | Verdict::Late => None,
            Verdict::CrossTalk => Some("reply_crosstalk"),
            Verdict::OutOfOrder => Some("reply_out_of_order"),
            Verdict::Unexpected => Some("reply_unexpected"),
            Verdict::Corrupted => Some("reply_corrupted"),
            Verdict::WrongType => Some("reply_wrong_type"),
        }
    }

    /// True when the verdict took a request in flight off the queue as answered: the oldest
    /// (well, corrupted or in the wrong frame type) or a later one (out of order). In flood mode its slot is free for
    /// the next request: were it not refilled, each reply out of order would leave its
    /// connection one request fewer in flight for the rest of the run, and the figures after
    /// it (replies/s, CPU per message) would be of a lighter load than asked.
    pub fn answered(self) -> bool {
        matches!(
            self,
            Verdict::Ok(_) | Verdict::Corrupted | Verdict::WrongType | Verdict::OutOfOrder
        )
    }
}

/// The requests one connection has sent and not yet seen answered, oldest first.
#[derive(Debug)]
pub struct InFlight {
    conn: u64,
    next_seq: u64,
    queue: VecDeque<(u64, Instant)>,
    /// The sequence numbers given up on ([`InFlight::give_up`]) whose replies have not come.
    given_up: VecDeque<u64>,
}

impl InFlight {
    /// An empty tracker for connection `conn`.
    pub fn new(conn: u64) -> Self {
        Self {
            conn,
            next_seq: 0,
            queue: VecDeque::new(),
            given_up: VecDeque::new(),
        }
    }

    /// Stops waiting for the requests in flight and returns how many there were: each is
    /// counted missing once, and a reply to one of them that still comes is [`Verdict::Late`].
    pub fn give_up(&mut self) -> usize {
        let n = self.queue.len();
        self.given_up
            .extend(self.queue.drain(..).map(|(seq, _)| seq));
        n
    }

    /// Registers a request sent at `at` and returns its sequence number.
    pub fn sent(&mut self, at: Instant) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back((seq, at));
        seq
    }

    /// The sequence number the next [`InFlight::sent`] will hand out.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// How many requests are awaiting a reply.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when no request awaits a reply.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Checks an echo reply `body`, naming (`conn`, `seq`), received at `now` in a binary
    /// frame (`binary`) or a text one: first as [`InFlight::check`] does, then, if it answers
    /// the oldest request in flight, its whole body against `shape` ([`Verdict::Corrupted`]
    /// when it differs), then its frame type ([`Verdict::WrongType`] when it is not the one
    /// the gateway promises for that body: [`EchoShape::binary`]).
    pub fn check_echo(
        &mut self,
        body: &[u8],
        binary: bool,
        conn: u64,
        seq: u64,
        shape: &EchoShape,
        now: Instant,
    ) -> Verdict {
        match self.check(conn, seq, now) {
            Verdict::Ok(_) if !shape.matches(body, conn, seq) => Verdict::Corrupted,
            Verdict::Ok(_) if binary != shape.binary(body) => Verdict::WrongType,
            v => v,
        }
    }

    /// Checks an echo reply naming (`conn`, `seq`) received at `now`.
    ///
    /// An out-of-order reply removes the request it answers, so that the rest of the stream
    /// is still judged against what is truly outstanding.
    pub fn check(&mut self, conn: u64, seq: u64, now: Instant) -> Verdict {
        if conn != self.conn {
            return Verdict::CrossTalk;
        }
        match self.queue.front() {
            Some(&(s, at)) if s == seq => {
                self.queue.pop_front();
                Verdict::Ok(now.saturating_duration_since(at))
            }
            _ => match self.queue.iter().position(|&(s, _)| s == seq) {
                Some(i) => {
                    self.queue.remove(i);
                    Verdict::OutOfOrder
                }
                None => match self.given_up.iter().position(|&s| s == seq) {
                    Some(i) => {
                        self.given_up.remove(i);
                        Verdict::Late
                    }
                    None => Verdict::Unexpected,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_given_up_on_count_once_and_their_late_replies_are_neither_replies_nor_errors() {
        let t0 = Instant::now();
        let mut f = InFlight::new(3);
        f.sent(t0);
        f.sent(t0);
        assert_eq!(f.give_up(), 2, "both counted missing, once");
        assert_eq!(f.give_up(), 0, "and not again");
        assert_eq!(f.check(3, 1, t0), Verdict::Late);
        assert_eq!(f.check(3, 0, t0), Verdict::Late);
        assert_eq!(
            f.check(3, 0, t0),
            Verdict::Unexpected,
            "a third reply is a duplicate"
        );
        assert_eq!(f.check(3, 9, t0), Verdict::Unexpected, "never sent");
        assert_eq!(Verdict::Late.error_kind(), None);
        // A duplicate of a reply already counted is no late reply, whatever is given up.
        let mut g = InFlight::new(4);
        g.sent(t0);
        assert!(matches!(g.check(4, 0, t0), Verdict::Ok(_)));
        g.sent(t0);
        assert_eq!(g.give_up(), 1);
        assert_eq!(
            g.check(4, 0, t0),
            Verdict::Unexpected,
            "a duplicate of seq 0"
        );
        assert_eq!(g.check(4, 1, t0), Verdict::Late);
    }

    #[test]
    fn request_payload_is_padded_and_parses_back() {
        let p = request_payload(42, 7, 64);
        assert_eq!(p.len(), 64);
        assert!(p.starts_with(b"c42:7;x"));
        assert_eq!(parse_reply(&p), Reply::Echo { conn: 42, seq: 7 });
        // Never truncated below the prefix.
        let short = request_payload(123456, 999, 4);
        assert_eq!(short, b"c123456:999;");
    }

    #[test]
    fn only_the_exact_echo_of_a_request_matches() {
        let whole = EchoShape {
            payload: 64,
            reply_bytes: 0,
        };
        let sent = request_payload(42, 7, 64);
        assert!(whole.matches(&sent, 42, 7));
        let mut changed = sent.clone();
        *changed.last_mut().unwrap() = b'y';
        assert!(!whole.matches(&changed, 42, 7), "tail changed");
        assert!(!whole.matches(&sent[..63], 42, 7), "cut short");
        let mut longer = sent.clone();
        longer.push(b'x');
        assert!(
            !whole.matches(&longer, 42, 7),
            "extended, even with padding"
        );
        assert!(!whole.matches(&sent, 42, 8), "another request's reply");
        // The head in other digits parses to the same numbers but is not what was sent.
        let mut zero = b"c042:7;".to_vec();
        zero.resize(64, b'x');
        assert_eq!(parse_reply(&zero), Reply::Echo { conn: 42, seq: 7 });
        assert!(!whole.matches(&zero, 42, 7), "leading zero");
        // A head longer than the payload is sent unpadded, and so echoed.
        let short = EchoShape {
            payload: 4,
            reply_bytes: 0,
        };
        assert!(short.matches(b"c123456:999;", 123456, 999));
        assert!(!short.matches(b"c123456:999;x", 123456, 999));
        // mock-api --reply-bytes 16 echoes the first 16 bytes only.
        let cut = EchoShape {
            payload: 64,
            reply_bytes: 16,
        };
        assert!(cut.matches(&sent[..16], 42, 7));
        assert!(!cut.matches(&sent, 42, 7));
        let big = EchoShape {
            payload: 8,
            reply_bytes: 100,
        };
        assert!(big.matches(&request_payload(1, 2, 8), 1, 2));
        assert!(whole.matches(&request_payload(u64::MAX, u64::MAX, 64), u64::MAX, u64::MAX));
    }

    #[test]
    fn a_corrupted_echo_answers_its_request_but_is_an_error() {
        let t0 = Instant::now();
        let shape = EchoShape {
            payload: 16,
            reply_bytes: 0,
        };
        let mut f = InFlight::new(5);
        f.sent(t0);
        f.sent(t0);
        let bad = b"c5:0;xxxxxxxxxxz";
        assert_eq!(
            f.check_echo(bad, false, 5, 0, &shape, t0),
            Verdict::Corrupted
        );
        assert_eq!(f.len(), 1, "the request it answers is no longer in flight");
        assert!(Verdict::Corrupted.answered());
        assert_eq!(Verdict::Corrupted.error_kind(), Some("reply_corrupted"));
        let good = request_payload(5, 1, 16);
        assert!(matches!(
            f.check_echo(&good, false, 5, 1, &shape, t0),
            Verdict::Ok(_)
        ));
        // The other verdicts come first: a corrupted cross-talk reply is cross-talk.
        f.sent(t0);
        assert_eq!(
            f.check_echo(bad, false, 6, 2, &shape, t0),
            Verdict::CrossTalk
        );
    }

    #[test]
    fn a_reply_comes_in_the_frame_type_the_gateway_promises_for_its_body() {
        // The gateway's rule: binary for an octet-stream answer or a body not UTF-8, else text;
        // not the request's type.
        assert!(!reply_is_binary(false, b"c1:2;xxxx"));
        assert!(reply_is_binary(true, b"c1:2;xxxx"));
        assert!(reply_is_binary(false, &[0xff, 0xfe]));
        assert!(reply_is_binary(false, "é".as_bytes().get(..1).unwrap()));
        assert!(!reply_is_binary(false, b""));
        let t0 = Instant::now();
        let shape = EchoShape {
            payload: 16,
            reply_bytes: 0,
        };
        let mut f = InFlight::new(5);
        for _ in 0..3 {
            f.sent(t0);
        }
        // mock-api answers without a Content-Type and `load`'s requests are ASCII: the reply
        // is text, whichever type the request was sent as.
        let echo = request_payload(5, 0, 16);
        assert!(!shape.binary(&echo));
        assert!(matches!(
            f.check_echo(&echo, false, 5, 0, &shape, t0),
            Verdict::Ok(_)
        ));
        // The right bytes in a binary frame: an error, that answers its request.
        let echo = request_payload(5, 1, 16);
        assert_eq!(
            f.check_echo(&echo, true, 5, 1, &shape, t0),
            Verdict::WrongType
        );
        assert_eq!(f.len(), 1, "the request it answers is no longer in flight");
        assert!(Verdict::WrongType.answered());
        assert_eq!(Verdict::WrongType.error_kind(), Some("reply_wrong_type"));
        // Bytes that differ are corrupted first, whatever the frame.
        assert_eq!(
            f.check_echo(b"c5:2;xxxxxxxxxxz", true, 5, 2, &shape, t0),
            Verdict::Corrupted
        );
    }

    #[test]
    fn a_push_not_newer_than_the_newest_seen_is_a_duplicate_or_out_of_order() {
        let mut last = LastPush::default();
        assert_eq!(last.check(1_000), PushVerdict::Delivered);
        assert_eq!(last.check(1_000), PushVerdict::Duplicate);
        assert_eq!(last.check(3_000), PushVerdict::Delivered);
        assert_eq!(
            last.check(2_000),
            PushVerdict::OutOfOrder,
            "older, after a newer"
        );
        assert_eq!(
            last.check(1_000),
            PushVerdict::OutOfOrder,
            "an old one again"
        );
        assert_eq!(last.check(3_000), PushVerdict::Duplicate);
        assert_eq!(last.check(3_001), PushVerdict::Delivered);
        assert_eq!(PushVerdict::Delivered.error_kind(), None);
        assert_eq!(PushVerdict::Duplicate.error_kind(), Some("push_duplicate"));
        assert_eq!(
            PushVerdict::OutOfOrder.error_kind(),
            Some("push_out_of_order")
        );
        assert_eq!(std::mem::size_of::<LastPush>(), 8, "small per connection");
    }

    #[test]
    fn a_push_comes_in_the_frame_type_the_control_api_promises() {
        // The control API's rule: binary with an octet-stream Content-Type, else text; `push`
        // sends none.
        assert!(push_is_binary(true));
        assert!(!push_is_binary(false));
        assert_eq!(PUSH_BINARY, push_is_binary(false), "no octet-stream type");
        let mut last = LastPush::default();
        assert_eq!(
            last.check_frame(1_000, false, PUSH_BINARY),
            PushVerdict::Delivered
        );
        // A text push in a binary frame: an error, not a delivery.
        assert_eq!(
            last.check_frame(2_000, true, PUSH_BINARY),
            PushVerdict::WrongType
        );
        assert_eq!(PushVerdict::WrongType.error_kind(), Some("push_wrong_type"));
        // It was remembered as the newest all the same: the same push again is a duplicate.
        assert_eq!(
            last.check_frame(2_000, false, PUSH_BINARY),
            PushVerdict::Duplicate
        );
        // Repeats and reorderings come first, whatever the frame.
        assert_eq!(
            last.check_frame(1_500, true, PUSH_BINARY),
            PushVerdict::OutOfOrder
        );
        // A binary push (octet-stream) must come binary.
        assert_eq!(
            last.check_frame(3_000, false, push_is_binary(true)),
            PushVerdict::WrongType
        );
        assert_eq!(
            last.check_frame(4_000, true, push_is_binary(true)),
            PushVerdict::Delivered
        );
    }

    #[test]
    fn push_and_garbage_are_told_apart() {
        assert_eq!(
            parse_reply(b"push:1700000000123456789"),
            Reply::Push {
                sent_ns: 1_700_000_000_123_456_789,
                target: None
            }
        );
        assert_eq!(
            parse_reply(b"push:1700000000123456789:42"),
            Reply::Push {
                sent_ns: 1_700_000_000_123_456_789,
                target: Some(42)
            }
        );
        assert!(matches!(
            parse_reply(push_payload(7).as_bytes()),
            Reply::Push {
                target: Some(7),
                ..
            }
        ));
        assert_eq!(parse_reply(b"push:1:x"), Reply::Unknown);
        assert_eq!(parse_reply(b""), Reply::Unknown);
        assert_eq!(parse_reply(b"push:abc"), Reply::Unknown);
        assert_eq!(parse_reply(b"c1;2:"), Reply::Unknown);
        assert_eq!(parse_reply(b"{\"received\":1}"), Reply::Unknown);
    }

    #[test]
    fn in_order_replies_give_round_trip_times() {
        let t0 = Instant::now();
        let mut f = InFlight::new(3);
        let a = f.sent(t0);
        let b = f.sent(t0 + Duration::from_millis(1));
        assert_eq!((a, b), (0, 1));
        assert_eq!(
            f.check(3, 0, t0 + Duration::from_millis(5)),
            Verdict::Ok(Duration::from_millis(5))
        );
        assert_eq!(
            f.check(3, 1, t0 + Duration::from_millis(5)),
            Verdict::Ok(Duration::from_millis(4))
        );
        assert!(f.is_empty());
    }

    #[test]
    fn crosstalk_reordering_and_duplicates_are_caught() {
        let t0 = Instant::now();
        let mut f = InFlight::new(1);
        f.sent(t0);
        f.sent(t0);
        f.sent(t0);
        assert_eq!(f.check(2, 0, t0), Verdict::CrossTalk);
        assert_eq!(f.len(), 3, "cross-talk must not consume our request");
        assert_eq!(f.check(1, 1, t0), Verdict::OutOfOrder);
        assert_eq!(f.len(), 2);
        // It answered a request of ours, if not the one due: in flood mode its slot is refilled.
        assert!(Verdict::OutOfOrder.answered());
        assert!(matches!(f.check(1, 0, t0), Verdict::Ok(_)));
        assert_eq!(f.check(1, 0, t0), Verdict::Unexpected, "duplicate reply");
        assert!(matches!(f.check(1, 2, t0), Verdict::Ok(_)));
        assert_eq!(f.check(1, 9, t0), Verdict::Unexpected);
        assert_eq!(Verdict::CrossTalk.error_kind(), Some("reply_crosstalk"));
        assert!(!Verdict::CrossTalk.answered() && !Verdict::Unexpected.answered());
        assert!(!Verdict::Late.answered());
    }
}
