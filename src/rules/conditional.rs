//! Validators and conditional requests (RFC 9110 §13): answering `If-None-Match` /
//! `If-Modified-Since` from a stored response, revalidating a stored response with the
//! handler, and content-coding checks. Pure functions of headers.

use http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LOCATION, DATE, ETAG, EXPIRES,
    IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, VARY,
};
use http::{HeaderMap, HeaderValue};

use super::date::http_date;

/// Whether a request's conditional headers are satisfied by a stored response with
/// `stored` headers, so a 304 answers it (RFC 9110 §13.2.2: `If-None-Match` first, with weak
/// comparison; `If-Modified-Since` only without it).
pub(crate) fn not_modified(stored: &HeaderMap, request: &HeaderMap) -> bool {
    if request.contains_key(IF_NONE_MATCH) {
        let Some(etag) = stored.get(ETAG).and_then(|v| v.to_str().ok()) else {
            return request_etags(request).any(|tag| tag == "*");
        };
        return request_etags(request).any(|tag| tag == "*" || weak_eq(tag, etag));
    }
    let Some(since) = request.get(IF_MODIFIED_SINCE).and_then(http_date) else {
        return false;
    };
    let modified = stored
        .get(LAST_MODIFIED)
        .or_else(|| stored.get(DATE))
        .and_then(http_date);
    modified.is_some_and(|modified| modified <= since)
}

fn request_etags(request: &HeaderMap) -> impl Iterator<Item = &str> {
    request
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Weak comparison: equal opaque tags, ignoring `W/`.
fn weak_eq(a: &str, b: &str) -> bool {
    let strip = |t: &str| t.strip_prefix("W/").unwrap_or(t).to_owned();
    strip(a) == strip(b)
}

/// The headers a 304 carries from the stored response (RFC 9110 §15.4.5).
pub(crate) fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        CACHE_CONTROL,
        CONTENT_LOCATION,
        DATE,
        ETAG,
        EXPIRES,
        VARY,
        LAST_MODIFIED,
    ] {
        for value in stored.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Conditional headers that ask the handler whether the stored response is still current,
/// or `None` when it has no validator.
pub(crate) fn validation_headers(
    stored: &HeaderMap,
) -> Option<Vec<(http::HeaderName, HeaderValue)>> {
    let mut out = Vec::new();
    if let Some(etag) = stored.get(ETAG) {
        out.push((IF_NONE_MATCH, etag.clone()));
    }
    if let Some(modified) = stored.get(LAST_MODIFIED) {
        out.push((IF_MODIFIED_SINCE, modified.clone()));
    }
    (!out.is_empty()).then_some(out)
}

/// Puts the cache's own validators on a request in place of the client's conditional
/// headers (the client's are evaluated by the cache against the validated response).
pub(crate) fn replace_conditionals(
    request: &mut HeaderMap,
    validators: Vec<(http::HeaderName, HeaderValue)>,
) {
    for name in [
        IF_NONE_MATCH,
        IF_MODIFIED_SINCE,
        http::header::IF_MATCH,
        http::header::IF_UNMODIFIED_SINCE,
        http::header::IF_RANGE,
    ] {
        request.remove(name);
    }
    for (name, value) in validators {
        request.insert(name, value);
    }
}

/// Updates a stored response's headers from a 304 (RFC 9111 §4.3.4): each field the 304
/// carries replaces the stored one, except those describing the body.
pub(crate) fn merge_not_modified(stored: &mut HeaderMap, fresh: &HeaderMap) {
    let keep_stored = |name: &http::HeaderName| {
        matches!(
            name.as_str(),
            "content-length" | "content-encoding" | "content-type" | "transfer-encoding"
        )
    };
    let mut replaced = Vec::new();
    for (name, value) in fresh {
        if keep_stored(name) {
            continue;
        }
        if !replaced.contains(name) {
            stored.remove(name);
            replaced.push(name.clone());
        }
        stored.append(name.clone(), value.clone());
    }
}

/// Whether the request accepts a response with this `Content-Encoding`. A request without
/// `Accept-Encoding` gets identity only: a client that did not ask for gzip never receives it.
pub(crate) fn accepts_encoding(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(coding) = stored.get(CONTENT_ENCODING).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let coding = coding.trim();
    if coding.is_empty() || coding.eq_ignore_ascii_case("identity") {
        return true;
    }
    let mut star = None;
    for item in request
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
            })
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if name.eq_ignore_ascii_case(coding) {
            return q > 0.0;
        }
        if name == "*" {
            star = Some(q > 0.0);
        }
    }
    star.unwrap_or(false)
}

/// A `Date` value for now, added to a stored response that has none (RFC 9110 §6.6.1).
pub(crate) fn date_now() -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(crate::clock::now()))
        .expect("HTTP dates are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in pairs {
            m.append(*n, HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn conditional_table() {
        let stored = map(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Jan 2030 00:00:00 GMT"),
        ]);
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("if-none-match", "\"v1\"")], true),
            (&[("if-none-match", "W/\"v1\"")], true),
            (&[("if-none-match", "\"v0\", \"v1\"")], true),
            (&[("if-none-match", "*")], true),
            (&[("if-none-match", "\"v2\"")], false),
            // If-None-Match wins over If-Modified-Since.
            (
                &[
                    ("if-none-match", "\"v2\""),
                    ("if-modified-since", "Wed, 01 Jan 2031 00:00:00 GMT"),
                ],
                false,
            ),
            (
                &[("if-modified-since", "Wed, 01 Jan 2031 00:00:00 GMT")],
                true,
            ),
            (
                &[("if-modified-since", "Mon, 01 Jan 2029 00:00:00 GMT")],
                false,
            ),
            (&[("if-modified-since", "not a date")], false),
            (&[], false),
        ];
        for (request, expected) in cases {
            assert_eq!(
                not_modified(&stored, &map(request)),
                *expected,
                "{request:?}"
            );
        }
    }

    #[test]
    fn accept_encoding_table() {
        let gzip = map(&[("content-encoding", "gzip")]);
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[], false),
            (&[("accept-encoding", "gzip")], true),
            (&[("accept-encoding", "br, GZIP;q=0.5")], true),
            (&[("accept-encoding", "gzip;q=0")], false),
            (&[("accept-encoding", "br")], false),
            (&[("accept-encoding", "*")], true),
            (&[("accept-encoding", "*;q=0")], false),
        ];
        for (request, expected) in cases {
            assert_eq!(
                accepts_encoding(&map(request), &gzip),
                *expected,
                "{request:?}"
            );
        }
        assert!(accepts_encoding(&HeaderMap::new(), &HeaderMap::new()));
    }

    #[test]
    fn a_304_replaces_fields_but_not_the_body_description() {
        let mut stored = map(&[
            ("etag", "\"v1\""),
            ("content-type", "text/plain"),
            ("x-a", "1"),
            ("x-a", "2"),
        ]);
        merge_not_modified(
            &mut stored,
            &map(&[
                ("x-a", "3"),
                ("content-type", "image/png"),
                ("cache-control", "max-age=9"),
            ]),
        );
        assert_eq!(stored.get_all("x-a").iter().collect::<Vec<_>>(), ["3"]);
        assert_eq!(stored["content-type"], "text/plain");
        assert_eq!(stored["cache-control"], "max-age=9");
        assert_eq!(stored["etag"], "\"v1\"");
    }
}
