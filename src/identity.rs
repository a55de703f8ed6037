//! The two names a connection goes by: the `ClientId` the client chose (first path segment) and
//! the `ConnectionId` the gateway gives each websocket so the API can tell two of them apart.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Longest ClientId accepted, in bytes after percent-decoding.
pub const MAX_CLIENT_ID_LEN: usize = 256;

/// A client's chosen name: 1–256 bytes of UTF-8, no `/`, no control characters, not `.`/`..`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(Arc<str>);

/// Why a request path does not name a ClientId.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdError {
    /// The path is `/` or empty.
    Empty,
    /// The request target is not a path (`*`, the asterisk form of `OPTIONS *`).
    NotAPath,
    /// More than one path segment (`/a/b`) or a trailing slash.
    ExtraSegments,
    /// A `%` not followed by two hex digits.
    BadPercentEncoding,
    /// Longer than [`MAX_CLIENT_ID_LEN`] bytes once decoded.
    TooLong,
    /// The decoded bytes are not UTF-8.
    NotUtf8,
    /// A decoded `/` or a control character.
    ForbiddenCharacter,
    /// `.` or `..`.
    DotSegment,
}

impl fmt::Display for ClientIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientIdError::Empty => "the path names no ClientId",
            ClientIdError::NotAPath => "the request target is not a path such as /alice",
            ClientIdError::ExtraSegments => "the ClientId must be the only path segment",
            ClientIdError::BadPercentEncoding => "the ClientId has malformed percent-encoding",
            ClientIdError::TooLong => "the ClientId is longer than 256 bytes",
            ClientIdError::NotUtf8 => "the ClientId is not valid UTF-8",
            ClientIdError::ForbiddenCharacter => {
                "the ClientId contains a slash or a control character"
            }
            ClientIdError::DotSegment => "the ClientId may not be `.` or `..`",
        })
    }
}

impl std::error::Error for ClientIdError {}

impl ClientId {
    /// Reads the ClientId from a request path such as `/alice%20b`.
    pub fn from_path(path: &str) -> Result<ClientId, ClientIdError> {
        let segment = match path.strip_prefix('/') {
            Some(segment) => segment,
            None if path.is_empty() => return Err(ClientIdError::Empty),
            None => return Err(ClientIdError::NotAPath),
        };
        if segment.is_empty() {
            return Err(ClientIdError::Empty);
        }
        if segment.contains('/') {
            return Err(ClientIdError::ExtraSegments);
        }
        // Encoded form is at most three bytes per decoded byte: reject early, before decoding.
        if segment.len() > MAX_CLIENT_ID_LEN * 3 {
            return Err(ClientIdError::TooLong);
        }
        let decoded = percent_decode(segment.as_bytes())?;
        ClientId::from_decoded(decoded)
    }

    /// Checks an already-decoded name.
    pub fn from_decoded(bytes: Vec<u8>) -> Result<ClientId, ClientIdError> {
        if bytes.is_empty() {
            return Err(ClientIdError::Empty);
        }
        if bytes.len() > MAX_CLIENT_ID_LEN {
            return Err(ClientIdError::TooLong);
        }
        let text = String::from_utf8(bytes).map_err(|_| ClientIdError::NotUtf8)?;
        if text.chars().any(|c| c == '/' || c.is_control()) {
            return Err(ClientIdError::ForbiddenCharacter);
        }
        if text == "." || text == ".." {
            return Err(ClientIdError::DotSegment);
        }
        Ok(ClientId(text.into()))
    }

    /// The decoded name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name percent-encoded for a URL path: every byte but `A-Z a-z 0-9 - . _ ~` escaped.
    pub fn encoded(&self) -> String {
        let mut out = String::with_capacity(self.0.len());
        for &b in self.0.as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(b as char);
            } else {
                out.push('%');
                out.push(char::from(HEX[(b >> 4) as usize]));
                out.push(char::from(HEX[(b & 15) as usize]));
            }
        }
        out
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Printed escaped so a log line can never be split or forged by a ClientId.
        write!(f, "{}", self.0.escape_debug())
    }
}

impl fmt::Debug for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientId({:?})", &*self.0)
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes; any other byte stands for itself.
pub fn percent_decode(input: &[u8]) -> Result<Vec<u8>, ClientIdError> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hi = input.get(i + 1).copied().and_then(hex_value);
            let lo = input.get(i + 2).copied().and_then(hex_value);
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(ClientIdError::BadPercentEncoding),
            }
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// A websocket connection's own number, unique across restarts of the gateway in practice:
/// the upper 24 bits come from the process start, the lower 40 count connections.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(u64);

impl ConnectionId {
    /// The next id of this process.
    pub fn next() -> ConnectionId {
        static COUNTER: AtomicU64 = AtomicU64::new(1);
        static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let prefix = *PREFIX.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let mixed =
                (nanos ^ (u64::from(std::process::id()) << 20)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (mixed >> 40) << 40
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed) & ((1 << 40) - 1);
        ConnectionId(prefix | n)
    }

    /// The id as a number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// The id as it is shown and sent (`X-Connection-Id`): 16 lowercase hex digits, written
    /// without the formatting machinery, which every connection's headers went through.
    pub fn hex(self) -> [u8; 16] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 16];
        for (i, digit) in out.iter_mut().enumerate() {
            *digit = DIGITS[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ConnectionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnectionId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_id_shows_as_16_hex_digits() {
        for n in [0, 1, 0xabc, 0x0123_4567_89ab_cdef, u64::MAX] {
            let id = ConnectionId(n);
            assert_eq!(id.to_string(), format!("{n:016x}"));
            assert_eq!(&id.hex(), format!("{n:016x}").as_bytes());
        }
    }

    #[test]
    fn plain_and_encoded_names_are_accepted() {
        assert_eq!(ClientId::from_path("/alice").unwrap().as_str(), "alice");
        assert_eq!(ClientId::from_path("/a%20b").unwrap().as_str(), "a b");
        assert_eq!(
            ClientId::from_path("/%C3%A9t%C3%A9").unwrap().as_str(),
            "été"
        );
        let longest = format!("/{}", "x".repeat(256));
        assert!(ClientId::from_path(&longest).is_ok());
    }

    #[test]
    fn malformed_names_are_refused_with_their_reason() {
        let cases = [
            ("/", ClientIdError::Empty),
            ("", ClientIdError::Empty),
            ("*", ClientIdError::NotAPath),
            ("alice", ClientIdError::NotAPath),
            ("/a/b", ClientIdError::ExtraSegments),
            ("/a/", ClientIdError::ExtraSegments),
            ("/a%2", ClientIdError::BadPercentEncoding),
            ("/a%zz", ClientIdError::BadPercentEncoding),
            ("/%FF", ClientIdError::NotUtf8),
            ("/a%2Fb", ClientIdError::ForbiddenCharacter),
            ("/a%0D%0AX-Evil:%201", ClientIdError::ForbiddenCharacter),
            ("/%00", ClientIdError::ForbiddenCharacter),
            ("/.", ClientIdError::DotSegment),
            ("/%2E%2E", ClientIdError::DotSegment),
        ];
        for (path, want) in cases {
            assert_eq!(ClientId::from_path(path).unwrap_err(), want, "{path}");
        }
        let long = format!("/{}", "x".repeat(257));
        assert_eq!(
            ClientId::from_path(&long).unwrap_err(),
            ClientIdError::TooLong
        );
        let huge = format!("/{}", "%41".repeat(100_000));
        assert_eq!(
            ClientId::from_path(&huge).unwrap_err(),
            ClientIdError::TooLong
        );
    }

    #[test]
    fn encoding_round_trips_through_decoding() {
        for name in ["alice", "a b", "été", "x?y#z&w=1", "100%", "~tilde_-."] {
            let id = ClientId::from_decoded(name.as_bytes().to_vec()).unwrap();
            let again = ClientId::from_path(&format!("/{}", id.encoded())).unwrap();
            assert_eq!(again, id);
        }
        let id = ClientId::from_decoded(b"a b?c".to_vec()).unwrap();
        assert_eq!(id.encoded(), "a%20b%3Fc");
    }

    #[test]
    fn connection_ids_are_unique_and_share_a_process_prefix() {
        let a = ConnectionId::next();
        let b = ConnectionId::next();
        assert_ne!(a, b);
        assert_eq!(a.get() >> 40, b.get() >> 40);
        assert_eq!(a.to_string().len(), 16);
    }
}
