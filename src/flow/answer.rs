//! How the cache answers: replaying a stored response (or a 304 for it), and labelling
//! every answer with `X-Cache` and RFC 9211's `Cache-Status`.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, AGE, CONTENT_LENGTH};
use http::{HeaderMap, Response, StatusCode};

use crate::cache_control::TARGETED_HEADERS;
use crate::clock;
use crate::entry::CachedResponse;
use crate::rules::conditional;
use crate::rules::request::BypassReason;
use crate::rules::tags::TAG_HEADERS;

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
/// match it, the full stored response otherwise (without its body for HEAD).
pub(crate) fn answer<B>(
    hit: CachedResponse,
    request: &HeaderMap,
    with_body: bool,
    outcome: Outcome,
) -> Response<CacheBody<B>> {
    let now = clock::now_ms();
    let age = hit.age(now).as_secs();
    // Both are below 2^63 ms (entries' TTLs are clamped on decode); saturate regardless.
    let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let ttl_left = millis(hit.ttl)
        .saturating_sub(millis(hit.elapsed(now)))
        .div_euclid(1000);
    let body_len = hit.body.len();
    let (status, mut headers, body) = if conditional::not_modified(&hit.headers, request) {
        (
            StatusCode::NOT_MODIFIED,
            conditional::not_modified_headers(&hit.headers),
            Bytes::new(),
        )
    } else {
        let body = if with_body { hit.body } else { Bytes::new() };
        (hit.status, hit.headers, body)
    };
    // The age the origin reported when we stored the response, plus our own.
    let origin_age = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    headers.insert(AGE, HeaderValue::from(origin_age.saturating_add(age)));
    if body_allowed(status) {
        // Also right for HEAD, which must announce the length a GET would get.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    strip_targeted_headers(&mut headers);
    headers.insert(X_CACHE, outcome.x_cache());
    headers.insert(CACHE_STATUS, outcome.stored_status(ttl_left));
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

/// Marks a response that came from the handler.
pub(crate) fn label_forwarded(headers: &mut HeaderMap, outcome: Outcome) {
    strip_cache_only_headers(headers);
    headers.insert(X_CACHE, outcome.x_cache());
    headers.insert(CACHE_STATUS, outcome.forwarded_status());
}

/// Cache-only headers (tags, CDN-Cache-Control / Surrogate-Control) are for the cache, not
/// for clients.
pub(crate) fn strip_cache_only_headers(headers: &mut HeaderMap) {
    for name in TAG_HEADERS.iter().chain(&TARGETED_HEADERS) {
        headers.remove(name);
    }
}

/// The cache-only headers a stored response may still carry: tag headers are dropped when
/// storing, but CDN-Cache-Control / Surrogate-Control are kept to judge the entry.
pub(crate) fn strip_targeted_headers(headers: &mut HeaderMap) {
    for name in &TARGETED_HEADERS {
        headers.remove(name);
    }
}
