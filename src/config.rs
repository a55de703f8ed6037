//! Gateway settings: the validated values every other module reads, and the parsers for the
//! human-friendly forms the command line accepts (`64KiB`, `30s`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

/// A token (`--control-token`, `--api-token`) whose text never shows in debug output, so that
/// a `{:?}` of the configuration in a log line cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The token's text, for the one place that compares or sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(text: String) -> Secret {
        Secret(text)
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Secret {
        Secret(text.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Everything a running gateway needs to know; built by the CLI or by tests.
#[derive(Clone, Debug)]
pub struct Config {
    /// Public websocket listener.
    pub listen: SocketAddr,
    /// Control listener for the API (push, disconnect, info, metrics).
    pub control_listen: SocketAddr,
    /// Base URL of the API; the percent-encoded ClientId is appended to it.
    pub api: ApiBase,
    /// Messages of one connection in flight to the API at once.
    pub pipeline: usize,
    /// Largest message accepted from a client, from the API, or in a push (bytes).
    pub max_message_size: usize,
    /// Websocket connections held at once; `None` derives it from the open-file limit.
    pub max_connections: Option<usize>,
    /// Sockets accepted but not yet upgraded (handshakes in progress) at once.
    pub max_pending_handshakes: usize,
    /// Deadline for one API request, from asking for a pooled connection to the last body byte.
    pub upstream_timeout: Duration,
    /// Concurrent API requests (and so pooled API connections); `None` derives it.
    pub upstream_max_connections: Option<usize>,
    /// API requests always allowed at once; above it (up to `upstream_max_connections`) more
    /// are allowed only while the API keeps its pace (see `upstream::limit`).
    pub upstream_min_concurrency: usize,
    /// Requests that may wait for a free API connection before more are refused (`1013` on a
    /// message, `503` on a handshake); `None`: as many as the clients can have outstanding, so
    /// that `upstream_max_wait` is the bound that applies.
    pub upstream_max_waiting: Option<usize>,
    /// Longest a request waits for a free API connection before it is refused (`1013` on a
    /// message, `503` on a handshake).
    pub upstream_max_wait: Duration,
    /// Speak HTTP/2 without TLS (h2c, prior knowledge) to the API.
    pub upstream_http2: bool,
    /// Extra CA certificate (PEM) trusted for an `https://` API, on top of the system roots.
    pub api_ca: Option<PathBuf>,
    /// Reach the API over this Unix stream socket instead of `api`'s host and port (which
    /// still give the `Host` header and the path); plain HTTP only.
    pub api_unix_socket: Option<PathBuf>,
    /// Pushes queued for one socket before further pushes get `503`.
    pub max_queued_messages: usize,
    /// Bytes queued for one socket before further pushes get `503`.
    pub max_queued_bytes: usize,
    /// A socket whose writes make no progress for this long is closed (`1008 slow consumer`);
    /// so is a control connection whose answers go unread.
    pub write_timeout: Duration,
    /// A client must complete its upgrade request within this time; a control connection must
    /// have sent its first request.
    pub handshake_timeout: Duration,
    /// Send a ping when nothing was received for this long; `None` disables pings.
    pub ping_interval: Option<Duration>,
    /// Close a connection when nothing at all was received for this long.
    pub ping_timeout: Duration,
    /// Close a connection with no data message in either direction for this long.
    pub idle_timeout: Option<Duration>,
    /// On shutdown, how long in-flight API requests may take before sockets are closed.
    pub shutdown_timeout: Duration,
    /// API requests at once for the DELETEs sent while shutting down.
    pub shutdown_delete_concurrency: usize,
    /// Also serve the control API on this Unix stream socket (mode 0660, removed at shutdown),
    /// for an API on the same machine.
    pub control_unix_socket: Option<PathBuf>,
    /// Bearer token required on the control listener (all but `/healthz`).
    pub control_token: Option<Secret>,
    /// Secret sent to the API with every request as `X-Ws2http-Token`, so that the API can
    /// refuse its four calls from anyone but its gateways.
    pub api_token: Option<Secret>,
    /// Origins allowed to open a websocket; `None` forwards Origin for the API to judge.
    pub allowed_origins: Option<Vec<String>>,
    /// Certificate chain and key (PEM) to serve `wss://` on the public listener.
    pub tls: Option<TlsFiles>,
}

/// PEM files for the public listener's TLS.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The API's base URL, checked to be `http://` or `https://` with a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiBase(String);

impl ApiBase {
    /// The base as given; a ClientId is appended to it as is.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The addresses a connection to the API can go to, as far as they are known without a
    /// resolver (the port as given, or the scheme's): an IP address in any spelling that
    /// getaddrinfo reads as one (`127.0.0.1`, `[::1]`, and IPv4's legacy forms: `127.1`,
    /// `0x7f.0.0.1`, `2130706433`; see [`legacy_ipv4`]); 127.0.0.1 and ::1 for `localhost`
    /// and names under it (`api.localhost`, RFC 6761), in any case, with or without a final
    /// dot; none for any other host name, which is not resolved.
    pub fn addresses_known_without_dns(&self) -> Vec<SocketAddr> {
        let Some(uri) = self.0.parse::<Uri>().ok() else {
            return Vec::new();
        };
        let Some(host) = uri.host() else {
            return Vec::new();
        };
        let port = uri
            .port_u16()
            .unwrap_or(if self.is_https() { 443 } else { 80 });
        let ips: Vec<IpAddr> =
            if let Some(ipv6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                ipv6.parse::<Ipv6Addr>()
                    .ok()
                    .map(IpAddr::V6)
                    .into_iter()
                    .collect()
            } else if let Some(ipv4) = legacy_ipv4(host) {
                vec![IpAddr::V4(ipv4)]
            } else if is_localhost(host) {
                vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
            } else {
                Vec::new()
            };
        ips.into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    }

    /// Whether the API is reached over TLS (the scheme is case-insensitive: `HTTPS://` too).
    pub fn is_https(&self) -> bool {
        self.0
            .get(..8)
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
    }
}

impl std::str::FromStr for ApiBase {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uri: Uri = s
            .parse()
            .map_err(|_| format!("`{s}` is not a URL; expected e.g. http://127.0.0.1:8000/"))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(format!("`{s}` must start with http:// or https://")),
        }
        let Some(authority) = uri.authority() else {
            return Err(format!("`{s}` has no host"));
        };
        if authority.as_str().contains('@') {
            // It would be sent as the Host header, and the password logged at start-up.
            return Err(format!(
                "`{s}` has a user name or password; the API is called without them (use \
                 --api-token to prove the caller)"
            ));
        }
        // `http` keeps a port it cannot read as text, and the connector then falls back to
        // 80 or 443 without a word; no server listens on port 0, so with it every API request
        // would fail (every handshake `502`).
        let host_port = authority.as_str();
        let port = host_port
            .rfind(':')
            .filter(|&colon| colon > host_port.rfind(']').unwrap_or(0))
            .map(|colon| &host_port[colon + 1..]);
        if port.is_some_and(|port| !port.parse::<u16>().is_ok_and(|port| port > 0)) {
            return Err(format!(
                "`{s}` has a port that is not a number from 1 to 65535"
            ));
        }
        if authority.host().is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        if uri.query().is_some() {
            return Err(format!("`{s}` must not have a query string"));
        }
        // The ClientId is appended to the text as given: without a path it would land in the
        // host name (`http://api` + `alice`), after a `#` nowhere the API sees.
        let after_scheme = &s[s.find("://").map_or(0, |i| i + 3)..];
        if !after_scheme.contains('/') {
            return Err(format!(
                "`{s}` has no path; the ClientId is appended to it, so end it with / \
                 (e.g. {s}/)"
            ));
        }
        if s.contains('#') {
            return Err(format!("`{s}` must not have a fragment (#)"));
        }
        // A `%` not followed by two hex digits is no escape: strict servers answer `400`, and a
        // trailing one would take the ClientId's first characters as its digits (`%` + `41…`).
        let bytes = s.as_bytes();
        let broken_escape = bytes.iter().enumerate().any(|(i, &b)| {
            b == b'%'
                && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        });
        if broken_escape {
            return Err(format!(
                "`{s}` has a % not followed by two hex digits; write a literal % as %25"
            ));
        }
        Ok(ApiBase(s.to_owned()))
    }
}

/// `text` read as an IPv4 address the way glibc's inet_aton (and so getaddrinfo) reads it:
/// one to four parts split by dots, each decimal, octal after a leading `0` or hexadecimal after
/// `0x`/`0X`; every part but the last is one byte, the last fills the bytes that remain (`127.1`
/// is 127.0.0.1, `2130706433` too). `None` for an empty part (a final dot too, as glibc has
/// it), a part too large for its bytes, or any other character.
pub fn legacy_ipv4(text: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut address: u32 = 0;
    for (index, part) in parts.iter().enumerate() {
        let value = legacy_ipv4_part(part)?;
        let bytes_left = 4 - index as u32;
        let last = index + 1 == parts.len();
        let width = if last { bytes_left } else { 1 };
        if width < 4 && value >> (8 * width) != 0 {
            return None;
        }
        address |= value << (8 * (bytes_left - width));
    }
    Some(Ipv4Addr::from(address))
}

/// One part of a [`legacy_ipv4`] address: decimal, octal after a leading `0`, hexadecimal after
/// `0x`/`0X` (at least one digit after it); `None` when empty, not digits of its base, or over
/// `u32::MAX`.
fn legacy_ipv4_part(part: &str) -> Option<u32> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    if digits.is_empty() {
        return None;
    }
    digits.chars().try_fold(0u32, |value, c| {
        value.checked_mul(radix)?.checked_add(c.to_digit(radix)?)
    })
}

/// Whether `host` is `localhost` or a name under it (`api.localhost`), in any case, with or
/// without a final dot: loopback by RFC 6761, whatever a resolver is asked.
fn is_localhost(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: ([0, 0, 0, 0], 7001).into(),
            control_listen: ([127, 0, 0, 1], 7002).into(),
            api: ApiBase("http://127.0.0.1:8000/".to_owned()),
            pipeline: 1,
            max_message_size: 1024 * 1024,
            max_connections: None,
            max_pending_handshakes: 512,
            upstream_timeout: Duration::from_secs(30),
            upstream_max_connections: None,
            upstream_min_concurrency: DEFAULT_UPSTREAM_MIN_CONCURRENCY,
            upstream_max_waiting: None,
            upstream_max_wait: Duration::from_secs(5),
            upstream_http2: false,
            api_ca: None,
            api_unix_socket: None,
            max_queued_messages: 64,
            max_queued_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Some(Duration::from_secs(30)),
            ping_timeout: Duration::from_secs(60),
            idle_timeout: None,
            shutdown_timeout: Duration::from_secs(10),
            shutdown_delete_concurrency: 64,
            control_unix_socket: None,
            control_token: None,
            api_token: None,
            allowed_origins: None,
            tls: None,
        }
    }
}

/// `--upstream-min-concurrency` when it is not given.
pub const DEFAULT_UPSTREAM_MIN_CONCURRENCY: usize = 64;

/// Descriptors kept free for listeners, logs, profiles and the like.
pub const RESERVED_DESCRIPTORS: usize = 64;

/// Sockets over `--max-pending-handshakes` handled at once: each waits a moment for a handshake
/// slot, then is answered `503`. While all are taken the accept loop waits for one, and new
/// sockets wait in the listen backlog; the one socket the loop holds meanwhile (one per control
/// listener too) comes out of [`RESERVED_DESCRIPTORS`].
pub const HANDSHAKE_WAITERS: usize = 48;

/// Control connections over [`CONTROL_CONNECTIONS`] being refused at once (`503`, or h2c's
/// GOAWAY, each in about a second at most); while all are taken the control accept loop waits
/// for one. Apart from [`HANDSHAKE_WAITERS`], so that a crowd of websocket clients cannot turn
/// a proxy's health check into an unanswered socket.
pub const CONTROL_REFUSALS: usize = 16;

/// Control connections served at once, over the TCP and Unix control listeners together; those
/// over it are answered `503` (h2c: a GOAWAY) and closed ([`CONTROL_REFUSALS`] at a time). Budgeted like the API pool, so that a crowd of pushers
/// cannot take the descriptors the websockets were promised.
pub const CONTROL_CONNECTIONS: usize = 256;

/// Lookups of the API's host name run at once (see `upstream/resolve.rs`). A lookup is a
/// blocking getaddrinfo call that cannot be stopped: it holds its descriptors until it returns,
/// also after the connection attempt that asked for it gave up (at half `--upstream-timeout`),
/// and with a resolver that does not answer it returns after 10 s (glibc: 5 s a try, twice).
/// A fixed few keep what they hold small and counted ([`LOOKUP_DESCRIPTORS`] each); further
/// attempts wait for a place within their own time. With a resolver that answers in a
/// millisecond, four places serve some 4,000 lookups a second.
pub const LOOKUPS_AT_ONCE: usize = 4;

/// Descriptors one lookup holds at most: glibc's getaddrinfo holds one socket (UDP, or TCP)
/// per query at a time, and briefly opens `/etc/hosts`, `/etc/resolv.conf` and the nsswitch
/// files; 2 covers the socket and one file.
pub const LOOKUP_DESCRIPTORS: usize = 2;

/// How the open-file limit is split between websockets and API connections, and the bound on
/// requests waiting for an API connection that follows from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// The process's open-file limit (soft).
    pub open_file_limit: usize,
    /// Websocket connections allowed at once.
    pub max_connections: usize,
    /// Concurrent API requests / pooled API connections.
    pub upstream_max_connections: usize,
    /// Sockets in the middle of a handshake.
    pub pending_handshakes: usize,
    /// Control connections at once ([`CONTROL_CONNECTIONS`]).
    pub control_connections: usize,
    /// Sockets over the pending-handshake cap handled at once ([`HANDSHAKE_WAITERS`]).
    pub handshake_waiters: usize,
    /// Control connections over their cap answered at once ([`CONTROL_REFUSALS`]).
    pub control_refusals: usize,
    /// Descriptors of the API host name's lookups at once: [`LOOKUPS_AT_ONCE`] ×
    /// [`LOOKUP_DESCRIPTORS`]; counted however `--api` is given, although an IP address (or
    /// `--api-unix-socket`) needs no lookup.
    pub lookups: usize,
    /// Requests that may wait for a free API connection at once.
    pub upstream_max_waiting: usize,
    /// Descriptors kept free for listeners, logs and profiles ([`RESERVED_DESCRIPTORS`]).
    pub spare: usize,
}

impl DescriptorBudget {
    /// Splits `open_file_limit` for `config`, or says which flag asks for more than there is.
    pub fn plan(config: &Config, open_file_limit: usize) -> Result<Self, String> {
        let upstream = config
            .upstream_max_connections
            .unwrap_or_else(|| (open_file_limit / 16).clamp(16, 1024));
        // Saturating: flags near usize::MAX must fail the check below, not wrap past it.
        let over_caps = HANDSHAKE_WAITERS + CONTROL_REFUSALS;
        let lookups = LOOKUPS_AT_ONCE * LOOKUP_DESCRIPTORS;
        let fixed = upstream
            .saturating_add(config.max_pending_handshakes)
            .saturating_add(CONTROL_CONNECTIONS + over_caps + lookups + RESERVED_DESCRIPTORS);
        let room = open_file_limit.saturating_sub(fixed);
        let max_connections = match config.max_connections {
            Some(n) if n > room => {
                return Err(format!(
                    "--max-connections {n} does not fit the open-file limit {open_file_limit}: \
                     at most {room} with --upstream-max-connections {upstream}, \
                     --max-pending-handshakes {}, {CONTROL_CONNECTIONS} control connections, \
                     {over_caps} sockets over those caps, {lookups} for API host name lookups \
                     and {RESERVED_DESCRIPTORS} spare",
                    config.max_pending_handshakes
                ))
            }
            Some(n) => n,
            None if room == 0 => {
                return Err(format!(
                    "the open-file limit {open_file_limit} leaves no room for websockets next to \
                     --upstream-max-connections {upstream}, --max-pending-handshakes {}, \
                     {CONTROL_CONNECTIONS} control connections, {over_caps} sockets over \
                     those caps, {lookups} for API host name lookups and \
                     {RESERVED_DESCRIPTORS} spare",
                    config.max_pending_handshakes
                ))
            }
            None => room,
        };
        // Every request the clients can have outstanding: a message per pipeline place of each
        // connection (a leaving one's DELETE takes the place of its messages) and a GET per
        // pending handshake. What bounds the queue is then how long its head has waited
        // (--upstream-max-wait): a count bound that a hiccup of a few hundred milliseconds
        // fills at 15,000 messages/s closed most clients at once (bench/README.md, "What
        // moved the figures").
        let default_waiting = max_connections
            .saturating_mul(config.pipeline.max(1))
            .saturating_add(config.max_pending_handshakes);
        Ok(DescriptorBudget {
            open_file_limit,
            max_connections,
            upstream_max_connections: upstream,
            pending_handshakes: config.max_pending_handshakes,
            control_connections: CONTROL_CONNECTIONS,
            handshake_waiters: HANDSHAKE_WAITERS,
            control_refusals: CONTROL_REFUSALS,
            lookups,
            spare: RESERVED_DESCRIPTORS,
            upstream_max_waiting: config.upstream_max_waiting.unwrap_or(default_waiting),
        })
    }
}

/// Whether `token` (`--api-token`, `--control-token`) can travel in an HTTP header as given:
/// non-empty visible ASCII, no spaces.
pub fn is_header_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Parses a byte size: `1048576`, `64KiB`, `1MiB`, `2GiB`, `64kB`, `1MB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let number: usize = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size; use e.g. 65536, 64KiB or 1MiB"))?;
    let factor: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" | "m" => 1 << 20,
        "GiB" | "G" | "g" => 1 << 30,
        "kB" | "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!(
                "`{s}` is not a size; use a whole number with B, KiB, MiB or GiB (e.g. 64KiB)"
            ))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses a duration: `30s`, `500ms`, `2m`, `1h`, or plain seconds (`30`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; use e.g. 500ms, 30s, 2m"))?;
    let millis = match unit {
        "ms" => Some(number),
        "" | "s" => number.checked_mul(1000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => {
            return Err(format!(
                "`{s}` is not a duration; use a whole number with ms, s, m or h (e.g. 500ms)"
            ))
        }
    };
    millis
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configurations_debug_output_shows_no_token() {
        let config = Config {
            control_token: Some("control-s3cret".into()),
            api_token: Some("api-s3cret".into()),
            ..Config::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("control_token: Some(Secret(..))"), "{shown}");
        assert_eq!(config.api_token.unwrap().expose(), "api-s3cret");
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn durations_accept_common_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn api_base_must_be_http_with_host() {
        assert!("http://127.0.0.1:8000/".parse::<ApiBase>().is_ok());
        assert!("https://api.example/ws/"
            .parse::<ApiBase>()
            .unwrap()
            .is_https());
        assert!("ftp://x/".parse::<ApiBase>().is_err());
        assert!("127.0.0.1:8000".parse::<ApiBase>().is_err());
        assert!("http://x/?a=b".parse::<ApiBase>().is_err());
    }

    #[test]
    fn api_base_with_a_bad_port_or_credentials_is_refused() {
        let port = "http://api:99999/".parse::<ApiBase>().unwrap_err();
        assert!(port.contains("port"), "{port}");
        assert!("http://api:8o00/".parse::<ApiBase>().is_err());
        let credentials = "http://user:secret@api/".parse::<ApiBase>().unwrap_err();
        assert!(credentials.contains("password"), "{credentials}");
        assert!("http://api:8000/".parse::<ApiBase>().is_ok());
        assert!("http://[::1]:8000/".parse::<ApiBase>().is_ok());
    }

    #[test]
    fn api_base_with_port_zero_is_refused() {
        // No server listens on port 0: every API request would fail, every handshake 502.
        for base in [
            "http://127.0.0.1:0/",
            "http://api:00/",
            "https://[::1]:0/ws/",
        ] {
            let error = base.parse::<ApiBase>().unwrap_err();
            assert!(error.contains("port"), "{base}: {error}");
            assert!(!error.contains('\n'), "{base}: {error}");
        }
        assert!("http://127.0.0.1:1/".parse::<ApiBase>().is_ok());
        assert!("http://127.0.0.1:65535/".parse::<ApiBase>().is_ok());
    }

    #[test]
    fn api_base_without_a_path_or_with_a_fragment_is_refused() {
        // The ClientId would join the host name (`http://apialice`) or vanish after the `#`.
        let no_path = "http://api.internal:8000".parse::<ApiBase>().unwrap_err();
        assert!(no_path.contains("end it with /"), "{no_path}");
        assert!("http://api.internal".parse::<ApiBase>().is_err());
        assert!("http://api/ws/#".parse::<ApiBase>().is_err());
        // A path that ends in a prefix rather than a slash is the user's choice.
        assert!("http://api/ws/client-".parse::<ApiBase>().is_ok());
    }

    #[test]
    fn api_base_with_a_percent_that_is_no_escape_is_refused() {
        // A trailing `%` would take the ClientId's first two characters as its hex digits.
        for broken in [
            "http://api/%",
            "http://api/%4",
            "http://api/x%zz/",
            "http://api/a%",
        ] {
            let error = broken.parse::<ApiBase>().unwrap_err();
            assert!(error.contains("%25"), "{broken}: {error}");
        }
        assert!("http://api/a%20b/".parse::<ApiBase>().is_ok());
        assert!("http://api/%2Fx/%25".parse::<ApiBase>().is_ok());
    }

    #[test]
    fn flags_near_usize_max_fail_the_budget_instead_of_wrapping() {
        let config = Config {
            upstream_max_connections: Some(usize::MAX),
            ..Config::default()
        };
        let error = DescriptorBudget::plan(&config, 20_000).unwrap_err();
        assert!(error.contains("--upstream-max-connections"), "{error}");
        let config = Config {
            max_pending_handshakes: usize::MAX - 10,
            ..Config::default()
        };
        let error = DescriptorBudget::plan(&config, 20_000).unwrap_err();
        assert!(error.contains("--max-pending-handshakes"), "{error}");
    }

    #[test]
    fn api_base_scheme_is_case_insensitive() {
        // Found by fuzz/config_values: `HTTPS://` parsed as https but was not treated as TLS,
        // so the system roots were not loaded and every API request failed.
        let base = "HTTPS://api.example/".parse::<ApiBase>().unwrap();
        assert!(base.is_https());
        assert!("httpS://api.example/"
            .parse::<ApiBase>()
            .unwrap()
            .is_https());
        assert!(!"HTTP://api.example/".parse::<ApiBase>().unwrap().is_https());
    }

    #[test]
    fn budget_derives_connections_from_the_open_file_limit() {
        let budget = DescriptorBudget::plan(&Config::default(), 20_000).unwrap();
        assert_eq!(budget.upstream_max_connections, 1024);
        assert_eq!(
            budget.max_connections,
            20_000
                - 1024
                - 512
                - CONTROL_CONNECTIONS
                - HANDSHAKE_WAITERS
                - CONTROL_REFUSALS
                - LOOKUPS_AT_ONCE * LOOKUP_DESCRIPTORS
                - RESERVED_DESCRIPTORS
        );
        // The figures README.md shows: 8 descriptors for host name lookups, whatever --api is.
        assert_eq!(budget.lookups, 8);
        assert_eq!(budget.max_connections, 18_072);
        assert_eq!(budget.upstream_max_waiting, 18_072 + 512);
        let by_address = Config {
            api: "http://10.0.0.1:8000/".parse().unwrap(),
            ..Config::default()
        };
        assert_eq!(DescriptorBudget::plan(&by_address, 20_000), Ok(budget));
    }

    #[test]
    fn every_request_the_clients_can_have_outstanding_may_wait_unless_a_bound_is_given() {
        let config = Config::default();
        let budget = DescriptorBudget::plan(&config, 20_000).unwrap();
        assert_eq!(
            budget.upstream_max_waiting,
            budget.max_connections + budget.pending_handshakes
        );
        let config = Config {
            pipeline: 4,
            max_connections: Some(1000),
            ..Config::default()
        };
        let budget = DescriptorBudget::plan(&config, 20_000).unwrap();
        assert_eq!(budget.upstream_max_waiting, 4 * 1000 + 512);
        let config = Config {
            upstream_max_waiting: Some(100),
            ..config
        };
        assert_eq!(
            DescriptorBudget::plan(&config, 20_000)
                .unwrap()
                .upstream_max_waiting,
            100
        );
    }

    #[test]
    fn budget_refuses_more_connections_than_descriptors() {
        let config = Config {
            max_connections: Some(30_000),
            ..Config::default()
        };
        let err = DescriptorBudget::plan(&config, 20_000).unwrap_err();
        assert!(err.contains("--max-connections"), "{err}");
        // The flag that takes the room is named too, not only the one that asks for it.
        let config = Config {
            max_connections: Some(1),
            max_pending_handshakes: 99_999_999,
            ..Config::default()
        };
        let err = DescriptorBudget::plan(&config, 20_000).unwrap_err();
        assert!(err.contains("--max-pending-handshakes 99999999"), "{err}");
    }

    #[test]
    fn the_host_name_lookups_take_their_descriptors_and_are_named_when_none_are_left() {
        // 1024 API connections, 512 handshakes, 256 control connections, 64 over those caps,
        // 8 for lookups and 64 spare: 1928. One fewer leaves no room for a websocket.
        let config = Config {
            upstream_max_connections: Some(1024),
            ..Config::default()
        };
        let budget = DescriptorBudget::plan(&config, 1929).unwrap();
        assert_eq!((budget.max_connections, budget.lookups), (1, 8));
        let err = DescriptorBudget::plan(&config, 1928).unwrap_err();
        assert!(err.contains("8 for API host name lookups"), "{err}");
        let config = Config {
            max_connections: Some(2),
            ..config
        };
        let err = DescriptorBudget::plan(&config, 1929).unwrap_err();
        assert!(err.contains("at most 1 "), "{err}");
        assert!(err.contains("8 for API host name lookups"), "{err}");
    }

    #[test]
    fn the_api_addresses_are_known_when_its_host_is_an_ip_address_or_localhost() {
        let addresses = |base: &str| {
            base.parse::<ApiBase>()
                .unwrap()
                .addresses_known_without_dns()
        };
        let v4 = |a: [u8; 4], port: u16| vec![SocketAddr::from((a, port))];
        assert_eq!(
            addresses("http://127.0.0.1:7002/"),
            v4([127, 0, 0, 1], 7002)
        );
        assert_eq!(addresses("http://127.0.0.1/"), v4([127, 0, 0, 1], 80));
        assert_eq!(addresses("https://10.0.0.1/api/"), v4([10, 0, 0, 1], 443));
        assert_eq!(
            addresses("http://[::1]:8000/"),
            vec![SocketAddr::from((Ipv6Addr::LOCALHOST, 8000))]
        );
        assert_eq!(addresses("http://0x7f.1:7002/"), v4([127, 0, 0, 1], 7002));
        let loopback = vec![
            SocketAddr::from((Ipv4Addr::LOCALHOST, 7002)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, 7002)),
        ];
        for host in [
            "localhost",
            "LocalHost",
            "localhost.",
            "api.localhost",
            "a.b.localhost.",
        ] {
            assert_eq!(
                addresses(&format!("http://{host}:7002/")),
                loopback,
                "{host}"
            );
        }
        // Host names are not resolved; nor is a name that only looks like localhost.
        for host in [
            "api.internal",
            "localhost.example",
            "mylocalhost",
            "127.1.",
            "256.1",
        ] {
            assert_eq!(addresses(&format!("http://{host}:7002/")), vec![], "{host}");
        }
    }

    #[test]
    fn legacy_ipv4_reads_what_getaddrinfo_reads_as_an_address() {
        // Each answer as glibc 2.36's getaddrinfo (AI_NUMERICHOST, AF_INET) gave it.
        for (text, address) in [
            ("127.0.0.1", Some([127, 0, 0, 1])),
            ("127.1", Some([127, 0, 0, 1])),
            ("127.0.1", Some([127, 0, 0, 1])),
            ("0x7f.0.0.1", Some([127, 0, 0, 1])),
            ("0X7F.1", Some([127, 0, 0, 1])),
            ("0x0000007f.1", Some([127, 0, 0, 1])),
            ("2130706433", Some([127, 0, 0, 1])),
            ("017700000001", Some([127, 0, 0, 1])),
            ("00000000000000000000177.1", Some([127, 0, 0, 1])),
            ("127.000.000.001", Some([127, 0, 0, 1])),
            ("0127.1", Some([87, 0, 0, 1])),
            ("0xa.0xb.0xc.0xd", Some([10, 11, 12, 13])),
            ("1.2.65535", Some([1, 2, 255, 255])),
            ("127.16777215", Some([127, 255, 255, 255])),
            ("4294967295", Some([255, 255, 255, 255])),
            ("0xffffffff", Some([255, 255, 255, 255])),
            ("0", Some([0, 0, 0, 0])),
            ("00", Some([0, 0, 0, 0])),
            ("0x0", Some([0, 0, 0, 0])),
            ("07", Some([0, 0, 0, 7])),
            // A final dot, an empty part, a part too large for its bytes, a digit not of its
            // base, anything else: not an address.
            ("127.1.", None),
            ("127.0.0.1.", None),
            ("0.", None),
            (".1", None),
            ("1..1", None),
            ("", None),
            ("1.2.3.4.5", None),
            ("256.1", None),
            ("1.2.3.256", None),
            ("1.2.65536", None),
            ("127.16777216", None),
            ("4294967296", None),
            ("0x100000001", None),
            ("18446744073709551617", None),
            ("0x7g.1", None),
            ("08.1", None),
            ("09", None),
            ("0x", None),
            ("0x.1", None),
            ("1.2.3.0x", None),
            ("+1", None),
            ("-1", None),
            ("127.1 ", None),
            ("1e2", None),
            ("localhost", None),
        ] {
            assert_eq!(legacy_ipv4(text), address.map(Ipv4Addr::from), "{text:?}");
        }
    }
}
