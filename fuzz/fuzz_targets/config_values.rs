//! Fuzzes the human-friendly value parsers of the command line (`64KiB`, `30s`, the API base URL)
//! and the websocket accept-key computation: no input panics, and every accepted value parses
//! back to itself from its canonical form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws2http::config::{parse_duration, parse_size, ApiBase};
use ws2http::handshake::accept_key;

fuzz_target!(|data: &[u8]| {
    let _ = accept_key(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(size) = parse_size(text) {
        assert_eq!(parse_size(&size.to_string()), Ok(size), "{text:?}");
        let digits = text.trim();
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            assert_eq!(digits.parse::<usize>().ok(), Some(size));
        }
    }
    if let Ok(duration) = parse_duration(text) {
        let millis = format!("{}ms", duration.as_millis());
        assert_eq!(parse_duration(&millis), Ok(duration), "{text:?}");
    }
    if let Ok(base) = text.parse::<ApiBase>() {
        assert_eq!(base.as_str(), text);
        // Schemes are case-insensitive (RFC 3986, 3.1): `HTTPS://` is TLS too.
        let scheme = text.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
        assert_eq!(
            base.is_https(),
            scheme.as_deref() == Some("https"),
            "{text:?}"
        );
        assert!(
            matches!(scheme.as_deref(), Some("http" | "https")),
            "{text:?}"
        );
    }
});
