//! Range requests answered from a stored complete response (RFC 9110 §14): one byte range,
//! open-ended or suffix, becomes a `206` with `Content-Range`; an unsatisfiable one a `416`.
//! Requests for several ranges go to the handler (the cache does not build multipart
//! bodies), and a `Range` field that does not parse is ignored, as the RFC says.

use http::header::{ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use http::HeaderMap;

use super::date::http_date;

/// How to answer a request from a stored body of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RangeAnswer {
    /// The whole body (no `Range`, an invalid one, or a failed `If-Range`).
    Full,
    /// Bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// No byte of the body is in the range.
    Unsatisfiable,
}

/// Whether the request asks for several ranges, which the handler must answer.
pub(crate) fn is_multi_range(request: &HeaderMap) -> bool {
    byte_ranges(request).is_some_and(|ranges| ranges.len() > 1)
}

/// The `bytes=` range specs of the request's `Range` field, if it has exactly one valid
/// field line of that unit.
fn byte_ranges(request: &HeaderMap) -> Option<Vec<&str>> {
    let mut values = request.get_all(RANGE).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (unit, specs) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let specs: Vec<&str> = specs
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    (!specs.is_empty()).then_some(specs)
}

/// How to answer `request` from a stored `200` with `stored` headers and a `len`-byte body.
pub(crate) fn answer(request: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(specs) = byte_ranges(request) else {
        return RangeAnswer::Full;
    };
    if specs.len() != 1 || !if_range_holds(request, stored) {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = specs[0].split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().unwrap_or(u64::MAX))
    };
    match (number(first), number(last), first.trim().is_empty()) {
        // `-N`: the last N bytes.
        (None, Some(suffix), true) => {
            if suffix == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial {
                    start: len.saturating_sub(suffix),
                    end: len - 1,
                }
            }
        }
        // `N-` or `N-M` (a non-numeric last position is invalid).
        (Some(start), last, false) if last.is_some() || last_part_empty(specs[0]) => match last {
            Some(end) if end < start => RangeAnswer::Full,
            _ if start >= len => RangeAnswer::Unsatisfiable,
            Some(end) => RangeAnswer::Partial {
                start,
                end: end.min(len - 1),
            },
            None => RangeAnswer::Partial {
                start,
                end: len - 1,
            },
        },
        _ => RangeAnswer::Full,
    }
}

fn last_part_empty(spec: &str) -> bool {
    spec.split_once('-')
        .is_some_and(|(_, last)| last.trim().is_empty())
}

/// `If-Range` (RFC 9110 §13.1.5): the range applies only if the stored response is the one
/// the client has, by strong entity tag or by an exact `Last-Modified` date.
fn if_range_holds(request: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(condition) = request.get(IF_RANGE) else {
        return true;
    };
    let Ok(text) = condition.to_str() else {
        return false;
    };
    let text = text.trim();
    if text.starts_with('"') {
        let strong = stored
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|tag| !tag.starts_with("W/"));
        return strong == Some(text);
    }
    match (
        http_date(condition),
        stored.get(LAST_MODIFIED).and_then(http_date),
    ) {
        (Some(since), Some(modified)) => since == modified,
        _ => false,
    }
}
