//! How the cache answers: replaying a stored response (or a 304 for it), and labelling
//! every answer with `X-Cache` and RFC 9211's `Cache-Status`.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE, CONTENT_LENGTH, CONTENT_RANGE};
use http::{HeaderMap, Response, StatusCode};

use crate::clock;
use crate::entry::CachedResponse;
use crate::rules::conditional;
use crate::rules::range::{self, RangeAnswer};
use crate::rules::request::BypassReason;
use crate::rules::tags::TAG_HEADERS;
use crate::settings::{Rules, MAX_DELTA_SECS};

use super::body::CacheBody;

/// The header telling clients how the cache handled the request.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

pub(crate) const HIT: HeaderValue = HeaderValue::from_static("HIT");
pub(crate) const MISS: HeaderValue = HeaderValue::from_static("MISS");
pub(crate) const BYPASS: HeaderValue = HeaderValue::from_static("BYPASS");
pub(crate) const REFRESH: HeaderValue = HeaderValue::from_static("REFRESH");
pub(crate) const STALE: HeaderValue = HeaderValue::from_static("STALE");
pub(crate) const REVALIDATED: HeaderValue = HeaderValue::from_static("REVALIDATED");

/// RFC 9211's `Cache-Status`, sent alongside `X-Cache`.
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How the cache answered, for `X-Cache` and `Cache-Status` (RFC 9211).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Hit,
    Miss,
    Bypass(BypassReason),
    Refresh,
    /// A stale copy the client accepted or that is being refreshed in the background.
    Stale,
    /// A stale copy served because the handler failed.
    StaleIfError,
    /// The handler confirmed the stored copy with a 304.
    Revalidated,
}

impl Outcome {
    fn x_cache(self) -> HeaderValue {
        match self {
            Outcome::Hit => HIT,
            Outcome::Miss => MISS,
            Outcome::Bypass(_) => BYPASS,
            Outcome::Refresh => REFRESH,
            Outcome::Stale | Outcome::StaleIfError => STALE,
            Outcome::Revalidated => REVALIDATED,
        }
    }

    /// `Cache-Status` of a response that came from the handler.
    fn forwarded_status(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Outcome::Bypass(BypassReason::NoStore) => {
                "tower-redis-cache; fwd=bypass; detail=no-store"
            }
            Outcome::Bypass(BypassReason::Authorization) => {
                "tower-redis-cache; fwd=bypass; detail=authorization"
            }
            Outcome::Bypass(BypassReason::Cookie) => "tower-redis-cache; fwd=bypass; detail=cookie",
            Outcome::Bypass(BypassReason::NoKey) => "tower-redis-cache; fwd=bypass; detail=no-key",
            Outcome::Refresh => "tower-redis-cache; fwd=request",
            _ => "tower-redis-cache; fwd=uri-miss",
        })
    }

    /// `Cache-Status` of an answer from a stored response with `ttl_left` seconds of
    /// freshness left (negative when stale).
    fn stored_status(self, ttl_left: i64) -> HeaderValue {
        let status = match self {
            Outcome::Stale => format!("tower-redis-cache; hit; ttl={ttl_left}; detail=stale"),
            Outcome::StaleIfError => {
                format!("tower-redis-cache; fwd=stale; ttl={ttl_left}; detail=stale-if-error")
            }
            Outcome::Revalidated => {
                format!("tower-redis-cache; fwd=stale; fwd-status=304; ttl={ttl_left}")
            }
            _ => format!("tower-redis-cache; hit; ttl={ttl_left}"),
        };
        HeaderValue::from_str(&status).expect("ASCII")
    }
}

/// The answer from a stored response: a 304 when the request's own conditional headers
/// match it, a 206 / 416 for a `Range` request of a stored 200 (RFC 9110 §14), the full
/// stored response otherwise (without its body for HEAD).
pub(crate) fn answer<B>(
    rules: &Rules,
    hit: CachedResponse,
    request: &HeaderMap,
    with_body: bool,
    outcome: Outcome,
) -> Response<CacheBody<B>> {
    let now = clock::now_ms();
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
            RangeAnswer::Full => (hit.status, hit.headers, hit.body),
            RangeAnswer::Partial { start, end } => {
                let mut headers = hit.headers;
                let range = format!("bytes {start}-{end}/{body_len}");
                headers.insert(CONTENT_RANGE, HeaderValue::from_str(&range).expect("ASCII"));
                let body = hit.body.slice(start as usize..=end as usize);
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
        let body = if with_body { hit.body } else { Bytes::new() };
        (hit.status, hit.headers, body)
    };
    headers.insert(AGE, HeaderValue::from(age));
    if let Some(length) = content_length.filter(|_| body_allowed(status)) {
        // Also right for HEAD, which must announce the length a GET would get.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    if rules.strip_targeted {
        strip_targeted_headers(rules, &mut headers);
    }
    headers.insert(X_CACHE, outcome.x_cache());
    // RFC 9211 §2: each cache appends its entry; the origin's (or an inner cache's) stay.
    headers.append(CACHE_STATUS, outcome.stored_status(ttl_left));
    let mut response = Response::new(CacheBody::replay(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

pub(crate) fn body_allowed(status: StatusCode) -> bool {
    !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED)
}

/// `only-if-cached` with nothing usable stored (RFC 9111 §5.2.1.7).
pub(crate) fn gateway_timeout<B>() -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::replay(Bytes::new()));
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    response.headers_mut().insert(X_CACHE, MISS);
    response.headers_mut().insert(
        CACHE_STATUS,
        HeaderValue::from_static("tower-redis-cache; fwd=miss; detail=only-if-cached"),
    );
    response
}

/// Marks a response that came from the handler. Tag headers are for this cache alone and
/// never reach clients.
pub(crate) fn label_forwarded(rules: &Rules, headers: &mut HeaderMap, outcome: Outcome) {
    for name in &TAG_HEADERS {
        headers.remove(name);
    }
    if rules.strip_targeted {
        strip_targeted_headers(rules, headers);
    }
    headers.insert(X_CACHE, outcome.x_cache());
    headers.append(CACHE_STATUS, outcome.forwarded_status());
}

/// Targeted cache-control fields (RFC 9213) are forwarded by default: an app behind a CDN
/// sets `CDN-Cache-Control` for the CDN. A route may strip them instead.
fn strip_targeted_headers(rules: &Rules, headers: &mut HeaderMap) {
    for name in &rules.targeted {
        headers.remove(name);
    }
}
