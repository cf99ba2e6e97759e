//! May a response be stored, for how long, and what is a stored response good for (RFC 9111
//! §3, §4.2, §4.3, RFC 5861).

use std::time::{Duration, SystemTime};

use http::header::{DATE, EXPIRES, SET_COOKIE};
use http::{HeaderMap, StatusCode};

use crate::cache_control::CacheControl;
use crate::entry::storable_status;
use crate::settings::{clamp, Rules, MAX_DELTA_SECS};

use super::date::http_date;
use super::request::RequestPlan;
use super::vary::{vary_names, Vary};
use crate::observe::NotStored;

/// How long a response may be stored, or why it must not be.
///
/// `cc`: the response's directives for this cache, parsed once from `headers`.
/// `authorized`: the request carried `Authorization`; then only a response marked
/// shareable may be stored (RFC 9111 §3.5).
///
/// With explicit freshness from the origin (`s-maxage`, `max-age`, `Expires`), any final
/// status the cache understands may be stored (§3), 206 and 304 aside; a response with a
/// heuristic lifetime needs a heuristically cacheable status or `public` (see
/// `heuristic_ttl`), and one that relies on the route's TTL a status in the route's set.
pub(crate) fn storable_ttl(
    rules: &Rules,
    status: StatusCode,
    headers: &HeaderMap,
    cc: &CacheControl,
    authorized: bool,
) -> Result<Duration, NotStored> {
    if !storable_status(status) {
        return Err(NotStored::Status);
    }
    if headers.contains_key(SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    if cc.no_store {
        return Err(NotStored::NoStore);
    }
    if authorized && !cc.shareable_when_authorized() {
        return Err(NotStored::Authorization);
    }
    // An event stream is a live feed, not a document: never replay it, and never make
    // concurrent subscribers wait for it to end.
    let event_stream = headers
        .get_all(http::header::CONTENT_TYPE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
    if event_stream {
        return Err(NotStored::EventStream);
    }
    if matches!(vary_names(headers), Vary::Any) {
        return Err(NotStored::VaryStar);
    }
    let explicit = rules
        .honor_origin_ttl
        .then(|| origin_ttl(cc, headers))
        .flatten()
        .filter(|_| status.canonical_reason().is_some());
    let ttl = match explicit {
        Some(ttl) => ttl,
        None => {
            let heuristic = heuristic_ttl(rules, status, headers, cc);
            if heuristic.is_none() && !rules.statuses.contains(status) {
                return Err(NotStored::Status);
            }
            heuristic.unwrap_or(rules.ttl)
        }
    };
    let has_validator = headers.contains_key(http::header::ETAG)
        || headers.contains_key(http::header::LAST_MODIFIED);
    // A response with `no-cache` is stored, but validated before every reuse: it needs a
    // place in the store even when its own lifetime is zero, and gets the route's TTL when
    // the route has one. A response stale on arrival (`max-age=0`, an `Expires` in the past,
    // an `Age` past its lifetime) is kept too when it has a validator, for the revalidation
    // window: its next request costs the handler a 304, not a body (RFC 9111 §4.3).
    if ttl.is_zero() {
        return if cc.no_cache && !rules.ttl.is_zero() {
            Ok(rules.ttl)
        } else if has_validator {
            Ok(Duration::ZERO)
        } else {
            Err(NotStored::NoFreshness)
        };
    }
    Ok(ttl)
}

/// The freshness lifetime the origin gave (RFC 9111 §4.2.1): `s-maxage`, else `max-age`,
/// else `Expires` minus `Date` (an invalid `Expires` means already expired).
fn origin_ttl(cc: &CacheControl, headers: &HeaderMap) -> Option<Duration> {
    if let Some(secs) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(secs));
    }
    let expires = headers.get(EXPIRES)?;
    // Past 2^31 s the lifetime is clamped like a delta-seconds value.
    let Some(expires) = http_date(expires) else {
        return Some(Duration::ZERO);
    };
    let date = headers
        .get(DATE)
        .and_then(http_date)
        .unwrap_or_else(crate::clock::now);
    Some(clamp(
        expires.duration_since(date).unwrap_or(Duration::ZERO),
    ))
}

/// Statuses a cache may give a heuristic lifetime (RFC 9110 §15.1).
const HEURISTICALLY_CACHEABLE: [u16; 10] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 501];

/// Heuristic freshness (RFC 9111 §4.2.2), when the route turned it on: a fraction of the
/// time between `Date` (or now) and `Last-Modified`, for a heuristically cacheable status or
/// a response marked `public`.
fn heuristic_ttl(
    rules: &Rules,
    status: StatusCode,
    headers: &HeaderMap,
    cc: &CacheControl,
) -> Option<Duration> {
    let fraction = rules.heuristic_fraction?;
    if !(HEURISTICALLY_CACHEABLE.contains(&status.as_u16()) || cc.public) {
        return None;
    }
    let modified = headers
        .get(http::header::LAST_MODIFIED)
        .and_then(http_date)?;
    let date = headers
        .get(DATE)
        .and_then(http_date)
        .unwrap_or_else(crate::clock::now);
    let since = date.duration_since(modified).ok()?;
    Some(clamp(since.mul_f64(fraction)))
}

/// The response's `Age` (RFC 9111 §5.1): the first field value that is a non-negative
/// integer, other values ignored (negative, with parameters, not a number), and values past
/// 2^31 s saturating.
pub(crate) fn age_value(headers: &HeaderMap) -> Option<u64> {
    headers
        .get_all(http::header::AGE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .find(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .map(|v| {
            v.parse::<u64>()
                .map_or(MAX_DELTA_SECS, |n| n.min(MAX_DELTA_SECS))
        })
}

/// How old a response already was when the cache received it (RFC 9111 §4.2.3,
/// `corrected_initial_age`): the larger of its apparent age (`response_time - Date`) and
/// its `Age` plus the time the request took (`response_time - request_time`).
pub(crate) fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let apparent = headers
        .get(DATE)
        .and_then(http_date)
        .and_then(|date| response_time.duration_since(date).ok())
        .unwrap_or(Duration::ZERO);
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    let age = Duration::from_secs(age_value(headers).unwrap_or(0));
    clamp(apparent.max(age.saturating_add(delay)))
}

/// What a stored response is good for, given its age and the request (RFC 9111 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Serve it.
    Fresh,
    /// Stale, but the client accepts it (`max-stale`): serve it, marked stale.
    StaleAccepted,
    /// Stale within its stale-while-revalidate grace: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Not servable as is: call the handler (conditionally, when it has validators);
    /// `if_error`: on a failure or 5xx, serve it instead.
    Validate { if_error: bool },
    /// Of no use to this request.
    Unusable,
}

/// Judges a stored response, whose directives are `cc`, for a request.
pub(crate) fn judge(
    rules: &Rules,
    plan: &RequestPlan,
    cc: &CacheControl,
    age: Duration,
    ttl: Duration,
) -> Verdict {
    if plan.authorized && !cc.shareable_when_authorized() {
        return Verdict::Unusable;
    }
    let wants = &plan.directives;
    let secs = |s: u64| Duration::from_secs(s);
    let fresh = age < ttl;
    let acceptable = fresh
        && !cc.no_cache
        && wants.max_age.is_none_or(|max| age <= secs(max))
        && wants
            .min_fresh
            .is_none_or(|min| ttl.saturating_sub(age) >= secs(min));
    if acceptable {
        return Verdict::Fresh;
    }
    if fresh || cc.no_cache {
        return Verdict::Validate { if_error: false };
    }
    let staleness = age.saturating_sub(ttl);
    if !cc.must_revalidate && !cc.no_cache {
        if let Some(limit) = wants.max_stale {
            if limit.is_none_or(|max| staleness <= secs(max)) {
                return Verdict::StaleAccepted;
            }
        }
    }
    let grace = grace(rules, cc);
    if staleness < grace.revalidate && wants.max_age.is_none() && wants.min_fresh.is_none() {
        Verdict::StaleWhileRevalidate
    } else {
        Verdict::Validate {
            if_error: staleness < grace.if_error,
        }
    }
}

/// How long past its TTL a stored response may still be served (RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Grace {
    /// Served stale at once while one background refresh runs.
    pub(crate) revalidate: Duration,
    /// Served stale when the handler fails or answers 5xx.
    pub(crate) if_error: Duration,
}

impl Grace {
    /// How long the store must keep an entry past its TTL.
    pub(crate) fn longest(&self) -> Duration {
        self.revalidate.max(self.if_error)
    }
}

/// The grace periods of a stored response: the route's, extended by the response's own
/// `stale-while-revalidate` / `stale-if-error` when the route honours origin directives, and
/// none at all under `must-revalidate` / `proxy-revalidate`.
pub(crate) fn grace(rules: &Rules, cc: &CacheControl) -> Grace {
    if cc.must_revalidate {
        return Grace::default();
    }
    let origin = |secs: Option<u64>| {
        rules
            .honor_origin_ttl
            .then_some(secs)
            .flatten()
            .map_or(Duration::ZERO, Duration::from_secs)
    };
    Grace {
        revalidate: rules
            .stale_while_revalidate
            .max(origin(cc.stale_while_revalidate)),
        if_error: rules.stale_if_error.max(origin(cc.stale_if_error)),
    }
}

/// How long past its TTL the store keeps a response: its stale grace, and for a response
/// with a validator (`ETag` / `Last-Modified`) at least the revalidation window, so that it
/// can be revalidated with a cheap 304 instead of refetched.
pub(crate) fn keep_past_ttl(rules: &Rules, cc: &CacheControl, headers: &HeaderMap) -> Duration {
    let grace = grace(rules, cc).longest();
    let has_validator = headers.contains_key(http::header::ETAG)
        || headers.contains_key(http::header::LAST_MODIFIED);
    if has_validator {
        grace.max(rules.revalidation_window)
    } else {
        grace
    }
}
