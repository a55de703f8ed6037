//! What came in from a client since the session last looked: any bytes at all (the client is
//! there), and bytes of a data message still arriving, from a scan of the frame headers as they
//! are read, so that `--idle-timeout` can tell a large upload over a slow link (busy) from pings
//! and pongs (idleness), whichever way the bytes are cut into reads.

/// Where the scan is within the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Step {
    /// Before the frame's first byte (FIN bit and opcode).
    #[default]
    Opcode,
    /// Before its second byte (mask bit and 7-bit length).
    Length,
    /// Within its 16- or 64-bit extended length.
    ExtendedLength,
    /// Within its masking key.
    Mask,
    /// Within its payload.
    Payload,
    /// Past a frame of 4 GiB or more, which the scan does not follow: every byte from here on
    /// counts as a data message's. Such a frame is always over `--max-message-size` (below
    /// 4 GiB), so the websocket decoder ends the connection.
    Untracked,
}

/// The current frame has a masking key.
const MASKED: u8 = 1;
/// The current frame is a data frame (text, binary or continuation).
const DATA: u8 = 1 << 1;
/// The current frame is its message's last.
const FIN: u8 = 1 << 2;
/// A data message has begun and its last frame has not ended.
const OPEN: u8 = 1 << 3;
/// Payload bytes of a data message came since the last look: headers alone (an empty
/// continuation frame) do not make a message grow, so they are no progress.
const PROGRESSED: u8 = 1 << 4;
/// Bytes came since the last look.
const TOOK_READS: u8 = 1 << 5;

/// Tracks a client's frames, header by header, skipping payloads: 8 bytes per connection.
///
/// It does not check the frames: the websocket decoder does, and ends the connection on a bad
/// one.
#[derive(Debug, Default)]
pub(crate) struct ReadProgress {
    /// The payload's bytes still to come; while its extended length is read, that length so far.
    left: u32,
    step: Step,
    /// Header bytes still to come in the current step: of the extended length, or the mask.
    header_left: u8,
    flags: u8,
}

impl ReadProgress {
    /// Notes `bytes`, the next ones read from the client.
    pub(crate) fn scan(&mut self, mut bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.flags |= TOOK_READS;
        while let Some((&byte, rest)) = bytes.split_first() {
            match self.step {
                Step::Opcode => {
                    bytes = rest;
                    self.set(FIN, byte & 0x80 != 0);
                    // 0 continuation, 1 text, 2 binary; control frames (8 and up) may come
                    // between a message's frames and are no part of it.
                    let data = byte & 0x0f <= 2;
                    self.set(DATA, data);
                    if data {
                        self.flags |= OPEN;
                    }
                    self.step = Step::Length;
                }
                Step::Length => {
                    bytes = rest;
                    self.set(MASKED, byte & 0x80 != 0);
                    match byte & 0x7f {
                        126 => self.begin_extended_length(2),
                        127 => self.begin_extended_length(8),
                        length => self.after_length(u32::from(length)),
                    }
                }
                Step::ExtendedLength => {
                    bytes = rest;
                    if self.left > 0x00ff_ffff {
                        self.step = Step::Untracked;
                        self.flags |= DATA | OPEN | PROGRESSED;
                    } else {
                        self.left = self.left << 8 | u32::from(byte);
                        self.header_left -= 1;
                        if self.header_left == 0 {
                            self.after_length(self.left);
                        }
                    }
                }
                Step::Mask => {
                    let n = bytes.len().min(usize::from(self.header_left));
                    bytes = &bytes[n..];
                    self.header_left -= n as u8;
                    if self.header_left == 0 {
                        self.begin_payload(self.left);
                    }
                }
                Step::Payload => {
                    let n = bytes.len().min(self.left as usize);
                    bytes = &bytes[n..];
                    self.left -= n as u32;
                    if self.flags & DATA != 0 {
                        self.flags |= PROGRESSED;
                    }
                    if self.left == 0 {
                        self.end_frame();
                    }
                }
                Step::Untracked => {
                    bytes = &[];
                    self.flags |= PROGRESSED;
                }
            }
        }
    }

    /// Whether any bytes were read since the last call.
    pub(crate) fn took_reads(&mut self) -> bool {
        self.take(TOOK_READS)
    }

    /// Whether a data message is part-way in, and some of its payload came since the last call.
    pub(crate) fn took_message_bytes(&mut self) -> bool {
        self.take(PROGRESSED) && self.flags & OPEN != 0
    }

    fn take(&mut self, flag: u8) -> bool {
        let was = self.flags & flag != 0;
        self.flags &= !flag;
        was
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    fn begin_extended_length(&mut self, bytes: u8) {
        self.step = Step::ExtendedLength;
        self.header_left = bytes;
        self.left = 0;
    }

    fn after_length(&mut self, length: u32) {
        if self.flags & MASKED != 0 {
            self.step = Step::Mask;
            self.header_left = 4;
            self.left = length;
        } else {
            self.begin_payload(length);
        }
    }

    fn begin_payload(&mut self, length: u32) {
        self.step = Step::Payload;
        self.left = length;
        if length == 0 {
            self.end_frame();
        }
    }

    fn end_frame(&mut self) {
        if self.flags & (DATA | FIN) == DATA | FIN {
            self.flags &= !OPEN;
        }
        self.step = Step::Opcode;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: u8 = 0x1;
    const CONTINUATION: u8 = 0x0;
    const PING: u8 = 0x9;
    const PONG: u8 = 0xA;

    /// A masked client frame, as a browser sends it.
    fn frame(fin: bool, opcode: u8, payload_len: usize) -> Vec<u8> {
        let mut frame = vec![u8::from(fin) << 7 | opcode];
        match payload_len {
            0..=125 => frame.push(0x80 | payload_len as u8),
            126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(payload_len as u16).to_be_bytes());
            }
            _ => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(payload_len as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.extend(std::iter::repeat_n(b'x', payload_len));
        frame
    }

    #[test]
    fn a_whole_message_is_no_message_still_arriving() {
        for len in [0, 5, 125, 126, 1000, 70_000] {
            let mut reads = ReadProgress::default();
            reads.scan(&frame(true, TEXT, len));
            assert!(!reads.took_message_bytes(), "{len} bytes");
            assert_eq!(reads.step, Step::Opcode, "{len} bytes");
        }
    }

    #[test]
    fn part_of_a_message_is_a_message_still_arriving_however_the_bytes_are_cut() {
        // Cut a 3,000-byte message after every possible byte: once some of its payload is in,
        // and up to the last byte, it is arriving. Its 8 header bytes alone are not.
        let message = frame(true, TEXT, 3000);
        for cut in 1..message.len() {
            let mut reads = ReadProgress::default();
            reads.scan(&message[..cut]);
            assert_eq!(reads.took_message_bytes(), cut > 8, "cut at {cut}");
            reads.scan(&message[cut..]);
            assert!(!reads.took_message_bytes(), "rest after {cut}");
            assert_eq!(reads.step, Step::Opcode);
        }
    }

    #[test]
    fn empty_continuation_frames_do_not_make_a_message_grow() {
        let mut reads = ReadProgress::default();
        reads.scan(&frame(false, TEXT, 10));
        assert!(reads.took_message_bytes());
        for _ in 0..3 {
            reads.scan(&frame(false, CONTINUATION, 0));
            assert!(!reads.took_message_bytes(), "no payload, no progress");
        }
    }

    #[test]
    fn pings_and_pongs_are_no_message_arriving_whole_or_in_part() {
        let mut reads = ReadProgress::default();
        let ping = frame(true, PING, 10);
        reads.scan(&ping);
        assert!(!reads.took_message_bytes());
        reads.scan(&ping[..5]);
        assert!(!reads.took_message_bytes(), "half a ping");
        reads.scan(&ping[5..]);
        reads.scan(&frame(true, PONG, 0));
        assert!(!reads.took_message_bytes());
    }

    #[test]
    fn a_pong_before_or_inside_a_message_still_arriving_does_not_hide_it() {
        let mut reads = ReadProgress::default();
        let mut bytes = frame(true, PONG, 4);
        let first = frame(false, TEXT, 500);
        bytes.extend_from_slice(&first);
        bytes.extend_from_slice(&frame(true, PONG, 4));
        reads.scan(&bytes);
        assert!(reads.took_message_bytes(), "first frame of two is in");
        // Between the message's frames only pongs come: no progress on it.
        reads.scan(&frame(true, PONG, 4));
        assert!(!reads.took_message_bytes());
        let last = frame(true, CONTINUATION, 500);
        reads.scan(&last[..100]);
        assert!(reads.took_message_bytes(), "its last frame is coming");
        reads.scan(&last[100..]);
        assert!(!reads.took_message_bytes(), "whole");
    }

    #[test]
    fn a_message_that_stops_coming_is_seen_once_then_no_longer() {
        let mut reads = ReadProgress::default();
        reads.scan(&frame(true, TEXT, 3000)[..200]);
        assert!(reads.took_message_bytes());
        assert!(!reads.took_message_bytes(), "no bytes since the last look");
    }

    #[test]
    fn an_unmasked_frame_scans_like_a_masked_one() {
        let mut reads = ReadProgress::default();
        reads.scan(&[0x01, 0x03, b'a', b'b']);
        assert!(reads.took_message_bytes());
        reads.scan(&[b'c', 0x80, 0x00]);
        assert!(!reads.took_message_bytes(), "its last frame came whole");
        assert_eq!(reads.step, Step::Opcode);
    }

    #[test]
    fn a_frame_over_4_gib_leaves_every_later_byte_counted_as_a_message_s() {
        let mut reads = ReadProgress::default();
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(5u64 << 30).to_be_bytes());
        reads.scan(&header);
        assert_eq!(reads.step, Step::Untracked);
        assert!(reads.took_message_bytes());
        reads.scan(&frame(true, PING, 0));
        assert!(reads.took_message_bytes(), "not followed: counted as data");
        // Up to 4 GiB the length is followed exactly.
        let mut reads = ReadProgress::default();
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&u64::from(u32::MAX).to_be_bytes());
        header.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7]);
        reads.scan(&header);
        assert_eq!((reads.step, reads.left), (Step::Payload, u32::MAX - 3));
    }

    #[test]
    fn any_byte_read_is_noted_once() {
        let mut reads = ReadProgress::default();
        assert!(!reads.took_reads());
        reads.scan(&[]);
        assert!(!reads.took_reads());
        reads.scan(&frame(true, PING, 0)[..1]);
        assert!(reads.took_reads());
        assert!(!reads.took_reads());
    }

    #[test]
    fn the_scan_takes_eight_bytes_per_connection() {
        assert_eq!(std::mem::size_of::<ReadProgress>(), 8);
    }
}
