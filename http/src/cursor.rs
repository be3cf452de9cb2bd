//! The opaque cursors of the list endpoints: URL-safe base64 of a position this API
//! made. Decoding refuses anything it could not have made, before the database sees it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;

/// The latest creation time a cursor can name: 9999-12-31, in µs since 1970 (PostgreSQL's
/// timestamps reach further, its intervals of microseconds do not).
const MAX_US: i64 = 253_402_300_799_999_999;

pub fn encode(position: &str) -> String {
    B64URL.encode(position)
}

/// The position inside a cursor, if it is base64 of UTF-8.
pub fn decode(cursor: &str) -> Option<String> {
    String::from_utf8(B64URL.decode(cursor).ok()?).ok()
}

/// A creation time in µs a cursor may hold (1970 to 9999).
pub fn micros(s: &str) -> Option<i64> {
    s.parse().ok().filter(|us| (0..=MAX_US).contains(us))
}
