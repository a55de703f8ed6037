//! Fuzzes the ClientId parser with arbitrary request paths and checks what every accepted name
//! must satisfy: the documented rules hold, `encoded()` is URL-safe, and encoding then parsing
//! again gives the same ClientId. Arbitrary decoded bytes go through `from_decoded` too, and the
//! two ways in must agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ws2http::identity::{percent_decode, ClientId, ClientIdError, MAX_CLIENT_ID_LEN};

fn check_accepted(id: &ClientId) {
    let name = id.as_str();
    assert!(
        !name.is_empty() && name.len() <= MAX_CLIENT_ID_LEN,
        "{id:?}"
    );
    assert!(!name.chars().any(|c| c == '/' || c.is_control()), "{id:?}");
    assert!(name != "." && name != "..", "{id:?}");

    // Every byte of the encoded form is unreserved or part of a %XX escape: nothing in it can
    // end a path, start a query, or break a header line.
    let encoded = id.encoded();
    let bytes = encoded.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            assert!(
                bytes.len() >= i + 3
                    && bytes[i + 1].is_ascii_hexdigit()
                    && bytes[i + 2].is_ascii_hexdigit(),
                "bad escape in {encoded:?}"
            );
            i += 3;
        } else {
            assert!(
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'),
                "unescaped byte {b:#04x} in {encoded:?}"
            );
            i += 1;
        }
    }
    let uri = format!("/{encoded}")
        .parse::<http::uri::PathAndQuery>()
        .expect("a valid URI path");
    assert_eq!(uri.query(), None);

    // Round trip.
    let again = ClientId::from_path(&format!("/{encoded}")).expect("encoded form parses");
    assert_eq!(&again, id);

    // Display is escaped: a log line cannot be split by a ClientId.
    let shown = id.to_string();
    assert!(!shown.contains('\n') && !shown.contains('\r'), "{shown:?}");
}

fuzz_target!(|data: &[u8]| {
    // 1. As a request path.
    if let Ok(path) = std::str::from_utf8(data) {
        match ClientId::from_path(path) {
            Ok(id) => {
                check_accepted(&id);
                // An accepted path decodes to exactly the name.
                let segment = path.strip_prefix('/').unwrap_or(path);
                assert_eq!(
                    percent_decode(segment.as_bytes()).expect("decodes"),
                    id.as_str().as_bytes()
                );
            }
            Err(ClientIdError::TooLong) => {
                let segment = path.strip_prefix('/').unwrap_or(path);
                assert!(
                    segment.len() > MAX_CLIENT_ID_LEN * 3
                        || percent_decode(segment.as_bytes())
                            .is_ok_and(|d| d.len() > MAX_CLIENT_ID_LEN)
                );
            }
            Err(_) => {}
        }
    }
    // 2. As decoded bytes: accepted exactly when their encoded path is accepted.
    let direct = ClientId::from_decoded(data.to_vec());
    if let Ok(id) = &direct {
        check_accepted(id);
        assert_eq!(id.as_str().as_bytes(), data);
    }
    // Percent-decoding never grows its input and never panics.
    if let Ok(decoded) = percent_decode(data) {
        assert!(decoded.len() <= data.len());
    }
});
