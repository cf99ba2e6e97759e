//! HTTP dates (RFC 9110 §5.6.7), read as leniently as the RFC asks of recipients.

use std::time::SystemTime;

use http::HeaderValue;

/// Parses an HTTP date in any of its three formats (IMF-fixdate, RFC 850, asctime), with
/// day and month names in any case, as RFC 9110 §5.6.7 asks of recipients.
pub(crate) fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    let text = value.to_str().ok()?.trim();
    if let Ok(date) = httpdate::parse_http_date(text) {
        return Some(date);
    }
    // Names in canonical case: `Mon`, `Sunday`, `Jan`, `GMT`.
    let mut canonical = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if word.eq_ignore_ascii_case("gmt") {
            out.push_str("GMT");
        } else {
            for (i, c) in word.chars().enumerate() {
                out.push(if i == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                });
            }
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut canonical);
            canonical.push(c);
        }
    }
    flush(&mut word, &mut canonical);
    httpdate::parse_http_date(&canonical).ok()
}
