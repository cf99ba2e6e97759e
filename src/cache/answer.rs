//! How the cache answers: replaying a stored response (or a 304 for it), and labelling
//! every answer with `X-Cache` and RFC 9211's `Cache-Status`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE, CONTENT_LENGTH, CONTENT_RANGE};
use http::{HeaderMap, Response, StatusCode};

use crate::clock;
use crate::entry::CachedResponse;
use crate::observe::{Bypass, Served};
use crate::rules::conditional;
use crate::rules::range::{self, RangeAnswer};
use crate::rules::tags::TAG_HEADERS;
use crate::settings::{Rules, MAX_DELTA_SECS};

use super::body::CacheBody;
use super::state::LayerState;

/// The header telling clients how the cache handled the request.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

pub(crate) const HIT: HeaderValue = HeaderValue::from_static("HIT");
pub(crate) const MISS: HeaderValue = HeaderValue::from_static("MISS");
pub(crate) const BYPASS: HeaderValue = HeaderValue::from_static("BYPASS");
pub(crate) const REFRESH: HeaderValue = HeaderValue::from_static("REFRESH");
pub(crate) const STALE: HeaderValue = HeaderValue::from_static("STALE");
pub(crate) const REVALIDATED: HeaderValue = HeaderValue::from_static("REVALIDATED");

/// RFC 9211's `Cache-Status`, sent alongside `X-Cache` unless the route turns it off.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How the cache answered, as `X-Cache` and `Cache-Status` (RFC 9211) say it.
impl Served {
    fn x_cache(self) -> HeaderValue {
        match self {
            Served::Hit | Served::Coalesced => HIT,
            Served::Miss | Served::HitForMiss | Served::Timeout => MISS,
            Served::Bypass(_) => BYPASS,
            Served::Refresh => REFRESH,
            Served::Stale | Served::StaleIfError | Served::FailSafe | Served::SoftTimeout => STALE,
            Served::Revalidated => REVALIDATED,
        }
    }

    /// `Cache-Status` of a response that came from the handler, after the cache's name.
    fn forwarded_status(self) -> &'static str {
        match self {
            Served::Bypass(Bypass::NoStore) => "fwd=bypass; detail=no-store",
            Served::Bypass(Bypass::Authorization) => "fwd=bypass; detail=authorization",
            Served::Bypass(Bypass::Cookie) => "fwd=bypass; detail=cookie",
            Served::Bypass(Bypass::NoKey) => "fwd=bypass; detail=no-key",
            Served::Bypass(Bypass::AuthorityMismatch) => "fwd=bypass; detail=authority-mismatch",
            Served::Refresh => "fwd=request",
            Served::HitForMiss => "fwd=uri-miss; detail=hit-for-miss",
            _ => "fwd=uri-miss",
        }
    }

    /// `Cache-Status` of an answer from a stored response with `ttl_left` seconds of
    /// freshness left (negative when stale).
    fn stored_status(self, name: &str, ttl_left: i64) -> HeaderValue {
        let (how, detail) = match self {
            Served::Stale => ("; hit; ttl=", "; detail=stale"),
            Served::StaleIfError => ("; fwd=stale; ttl=", "; detail=stale-if-error"),
            Served::FailSafe => ("; hit; ttl=", "; detail=fail-safe"),
            Served::SoftTimeout => ("; fwd=stale; ttl=", "; detail=soft-timeout"),
            Served::Revalidated => ("; fwd=stale; fwd-status=304; ttl=", ""),
            _ => ("; hit; ttl=", ""),
        };
        // Built in one buffer of the right size: this runs on every hit, and `format!` would
        // grow a string and then copy it.
        let mut ttl = itoa::Buffer::new();
        let ttl = ttl.format(ttl_left);
        let mut status = Vec::with_capacity(name.len() + how.len() + ttl.len() + detail.len());
        for part in [name, how, ttl, detail] {
            status.extend_from_slice(part.as_bytes());
        }
        // Every part is visible ASCII (the layer quotes the cache's name when it is set), so
        // the fallback is never taken.
        HeaderValue::from_maybe_shared(Bytes::from(status))
            .unwrap_or_else(|_| HeaderValue::from_static("tower-redis-cache"))
    }

    /// Counts the answer in the layer's stats and metrics.
    fn observe(self, state: &LayerState) {
        state.observe.served(self);
    }
}

/// The answer from a stored response: a 304 when the request's own conditional headers
/// match it, a 206 / 416 for a `Range` request of a stored 200 (RFC 9110 §14), the full
/// stored response otherwise (without its body for HEAD).
pub(crate) fn answer<B>(
    state: &LayerState,
    hit: Arc<CachedResponse>,
    request: &HeaderMap,
    with_body: bool,
    outcome: Served,
) -> Response<CacheBody<B>> {
    answer_at(state, hit, request, with_body, outcome, clock::now_ms())
}

/// [`answer`] at `now` (milliseconds since the Unix epoch): a hit judged at `now` answers
/// with the same clock reading.
pub(crate) fn answer_at<B>(
    state: &LayerState,
    hit: Arc<CachedResponse>,
    request: &HeaderMap,
    with_body: bool,
    outcome: Served,
    now: u64,
) -> Response<CacheBody<B>> {
    outcome.observe(state);
    let rules = &state.rules;
    // The entry's stored time was set back by the age the response had on arrival, so its
    // age is RFC 9111 §4.2.3's current_age (clamped to 2^31 s, §5.1).
    let age = hit.age(now).as_secs().min(MAX_DELTA_SECS);
    // Both are below 2^63 ms (entries' TTLs are clamped on decode); saturate regardless.
    let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let ttl_left = millis(hit.ttl)
        .saturating_sub(millis(hit.elapsed(now)))
        .div_euclid(1000);
    let body_len = hit.body.len() as u64;
    let mut content_length = Some(body_len);
    let (status, mut headers, body) = if conditional::not_modified(&hit.headers, request) {
        (
            StatusCode::NOT_MODIFIED,
            conditional::not_modified_headers(&hit.headers),
            Bytes::new(),
        )
    } else if hit.status == StatusCode::OK && with_body {
        match range::answer(request, &hit.headers, body_len) {
            RangeAnswer::Full => {
                let (headers, body) = replay_parts(hit);
                (StatusCode::OK, headers, body)
            }
            RangeAnswer::Partial { start, end } => {
                let (mut headers, body) = replay_parts(hit);
                let range = format!("bytes {start}-{end}/{body_len}");
                headers.insert(CONTENT_RANGE, HeaderValue::from_str(&range).expect("ASCII"));
                let body = body.slice(start as usize..=end as usize);
                content_length = Some(body.len() as u64);
                (StatusCode::PARTIAL_CONTENT, headers, body)
            }
            RangeAnswer::Unsatisfiable => {
                let mut headers = HeaderMap::new();
                let range = format!("bytes */{body_len}");
                headers.insert(CONTENT_RANGE, HeaderValue::from_str(&range).expect("ASCII"));
                content_length = Some(0);
                (StatusCode::RANGE_NOT_SATISFIABLE, headers, Bytes::new())
            }
        }
    } else {
        let status = hit.status;
        let (headers, body) = replay_parts(hit);
        (status, headers, if with_body { body } else { Bytes::new() })
    };
    headers.insert(AGE, small_number(age));
    if let Some(length) = content_length.filter(|_| body_allowed(status)) {
        // Also right for HEAD, which must announce the length a GET would get.
        headers.insert(CONTENT_LENGTH, small_number(length));
    }
    if rules.strip_targeted {
        strip_targeted_headers(rules, &mut headers);
    }
    if let Some(name) = &rules.x_cache {
        headers.insert(name.clone(), outcome.x_cache());
    }
    if let Some(cache) = &rules.cache_status {
        // RFC 9211 §2: each cache appends its entry; the origin's (or an inner cache's) stay.
        headers.append(CACHE_STATUS, outcome.stored_status(cache, ttl_left));
    }
    let mut response = Response::new(CacheBody::replay(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// The stored headers, in a map with room for the ones [`answer`] adds (a map that grows is
/// a reallocation on every hit), and the body. Moved out when this answer holds the only
/// reference (a response decoded for this request, which the decoder gave that room); copied
/// when the response is shared with an in-process store's memo slot.
fn replay_parts(hit: Arc<CachedResponse>) -> (HeaderMap, Bytes) {
    match Arc::try_unwrap(hit) {
        Ok(owned) => (owned.headers, owned.body),
        Err(shared) => {
            let mut headers = HeaderMap::with_capacity(shared.headers.len() + 5);
            for (name, value) in &shared.headers {
                headers.append(name.clone(), value.clone());
            }
            (headers, shared.body.clone())
        }
    }
}

/// `n` as a header value; below 10,000 (most ages, most body lengths) without an
/// allocation: a slice of static text.
fn small_number(n: u64) -> HeaderValue {
    match n {
        0..=9_999 => {
            // The four-digit text of `n`, without its leading zeros.
            let digits = match n {
                0..=9 => 1,
                10..=99 => 2,
                100..=999 => 3,
                _ => 4,
            };
            let end = (n as usize + 1) * 4;
            HeaderValue::from_static(&DECIMALS[end - digits..end])
        }
        _ => HeaderValue::from(n),
    }
}

/// "0000", "0001", ... "9999", one after the other.
static DECIMALS: &str = match std::str::from_utf8(&DECIMAL_BYTES) {
    Ok(text) => text,
    Err(_) => panic!("ASCII digits"),
};

static DECIMAL_BYTES: [u8; 40_000] = {
    let mut text = [0; 40_000];
    let mut n = 0;
    while n < 10_000 {
        text[n * 4] = b'0' + (n / 1000) as u8;
        text[n * 4 + 1] = b'0' + (n / 100 % 10) as u8;
        text[n * 4 + 2] = b'0' + (n / 10 % 10) as u8;
        text[n * 4 + 3] = b'0' + (n % 10) as u8;
        n += 1;
    }
    text
};

pub(crate) fn body_allowed(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// `only-if-cached` with nothing usable stored (RFC 9111 §5.2.1.7).
pub(crate) fn gateway_timeout<B>(state: &LayerState) -> Response<CacheBody<B>> {
    own_504(state, Served::Miss, "fwd=miss; detail=only-if-cached")
}

/// The handler did not answer within the route's hard timeout, and no stale copy may stand
/// in: the cache's own `504`.
pub(crate) fn handler_timeout<B>(state: &LayerState) -> Response<CacheBody<B>> {
    own_504(state, Served::Timeout, "fwd=uri-miss; detail=timeout")
}

fn own_504<B>(state: &LayerState, outcome: Served, detail: &str) -> Response<CacheBody<B>> {
    outcome.observe(state);
    let rules = &state.rules;
    let mut response = Response::new(CacheBody::replay(Bytes::new()));
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    if let Some(name) = &rules.x_cache {
        response
            .headers_mut()
            .insert(name.clone(), outcome.x_cache());
    }
    if let Some(cache) = &rules.cache_status {
        let status = format!("{cache}; {detail}");
        let status = HeaderValue::from_str(&status).expect("ASCII");
        response.headers_mut().insert(CACHE_STATUS, status);
    }
    response
}

/// Marks a response that came from the handler. Tag headers are for this cache alone and
/// never reach clients.
pub(crate) fn label_forwarded(state: &LayerState, headers: &mut HeaderMap, outcome: Served) {
    outcome.observe(state);
    let rules = &state.rules;
    for name in &TAG_HEADERS {
        headers.remove(name);
    }
    if rules.strip_targeted {
        strip_targeted_headers(rules, headers);
    }
    if let Some(name) = &rules.x_cache {
        headers.insert(name.clone(), outcome.x_cache());
    }
    if let Some(cache) = &rules.cache_status {
        let status = format!("{cache}; {}", outcome.forwarded_status());
        headers.append(CACHE_STATUS, HeaderValue::from_str(&status).expect("ASCII"));
    }
}

/// Targeted cache-control fields (RFC 9213) are forwarded by default: an app behind a CDN
/// sets `CDN-Cache-Control` for the CDN. A route may strip them instead.
fn strip_targeted_headers(rules: &Rules, headers: &mut HeaderMap) {
    for name in &rules.targeted {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_numbers_read_as_their_decimal_text() {
        for n in (0..=10_001).chain([u64::from(u32::MAX), u64::MAX]) {
            assert_eq!(small_number(n).to_str().unwrap(), n.to_string(), "{n}");
        }
    }
}
