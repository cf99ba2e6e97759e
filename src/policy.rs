//! The HTTP rules: may this request be answered from the cache, may this response be stored,
//! and for how long. Pure functions of headers and the route's settings; nothing here knows
//! about stores.

use std::time::{Duration, SystemTime};

use http::header::{
    AUTHORIZATION, CACHE_CONTROL, DATE, EXPIRES, PRAGMA, PROXY_AUTHORIZATION, SET_COOKIE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};

/// The route's caching rules, fixed when the layer is built.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub(crate) ttl: Duration,
    pub(crate) methods: Vec<Method>,
    pub(crate) statuses: StatusSet,
    pub(crate) max_body_bytes: usize,
    pub(crate) honor_origin_ttl: bool,
    pub(crate) honor_request_no_cache: bool,
    pub(crate) cache_authorized: bool,
    pub(crate) stale_while_revalidate: Duration,
    pub(crate) stale_if_error: Duration,
    /// Fraction (0..=1) of the TTL by which entries' lifetimes are randomly shortened.
    pub(crate) ttl_jitter: f64,
    pub(crate) coalesce: bool,
    pub(crate) coalesce_timeout: Duration,
    pub(crate) lock_across_instances: bool,
    pub(crate) lock_ttl: Duration,
    pub(crate) generate_etag: bool,
    pub(crate) revalidation_window: Duration,
    pub(crate) max_pending_writes: usize,
    pub(crate) cookies: CookieRule,
}

/// How requests carrying cookies are treated.
#[derive(Debug, Clone, Default)]
pub(crate) struct CookieRule {
    /// Cache them regardless of their cookies (which are not part of the key).
    pub(crate) cache_all: bool,
    /// Cookies that never make a request bypass (analytics and the like).
    pub(crate) ignore: Vec<String>,
    /// Cookies that are part of the key, and so never make a request bypass.
    pub(crate) key_on: Vec<String>,
}

impl CookieRule {
    /// Whether a request with these headers carries a cookie that may personalise the page.
    fn personal(&self, headers: &HeaderMap) -> bool {
        !self.cache_all
            && crate::key::cookies(headers).any(|(name, _)| {
                !self.ignore.iter().any(|n| n == name) && !self.key_on.iter().any(|n| n == name)
            })
    }
}

/// The longest delta-seconds value the cache keeps (RFC 9111 §1.2.2: 2^31 s, about 68
/// years); larger values, and durations set on the builder, are clamped to it.
pub(crate) const MAX_DELTA_SECS: u64 = 1 << 31;

/// A duration no longer than [`MAX_DELTA_SECS`], so sums of durations never overflow.
pub(crate) fn clamp(duration: Duration) -> Duration {
    duration.min(Duration::from_secs(MAX_DELTA_SECS))
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            methods: vec![Method::GET],
            statuses: StatusSet::from_codes(200..=299),
            max_body_bytes: 1024 * 1024,
            honor_origin_ttl: true,
            honor_request_no_cache: true,
            cache_authorized: false,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            ttl_jitter: 0.0,
            coalesce: true,
            coalesce_timeout: Duration::from_secs(5),
            lock_across_instances: false,
            lock_ttl: Duration::from_secs(5),
            generate_etag: false,
            revalidation_window: Duration::from_secs(60),
            max_pending_writes: 1024,
            cookies: CookieRule::default(),
        }
    }
}

/// A set of status codes, as a bitmap over 0..1024 (status codes are 100..=999).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct StatusSet([u64; 16]);

impl StatusSet {
    pub(crate) fn from_codes(codes: impl IntoIterator<Item = u16>) -> Self {
        let mut bits = [0u64; 16];
        for code in codes.into_iter().filter(|c| *c < 1024) {
            bits[usize::from(code / 64)] |= 1 << (code % 64);
        }
        Self(bits)
    }

    pub(crate) fn contains(&self, status: StatusCode) -> bool {
        let code = status.as_u16();
        code < 1024 && self.0[usize::from(code / 64)] & (1 << (code % 64)) != 0
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let codes = (0u16..1024).filter(|c| self.0[usize::from(c / 64)] & (1 << (c % 64)) != 0);
        f.debug_list().entries(codes).finish()
    }
}

/// The directives of the `Cache-Control` header fields that the layer acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct CacheControl {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) public: bool,
    pub(crate) max_age: Option<u64>,
    pub(crate) s_maxage: Option<u64>,
    pub(crate) must_revalidate: bool,
    pub(crate) stale_while_revalidate: Option<u64>,
    pub(crate) stale_if_error: Option<u64>,
    /// Request only: `max-stale`, with its limit (`Some(None)`: any staleness).
    pub(crate) max_stale: Option<Option<u64>>,
    /// Request only: `min-fresh`.
    pub(crate) min_fresh: Option<u64>,
    /// Request only: `only-if-cached`.
    pub(crate) only_if_cached: bool,
}

impl CacheControl {
    /// Parses every `Cache-Control` field line. Names are case-insensitive; unknown or
    /// malformed directives are ignored; for a repeated numeric directive the first wins.
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        Self::parse_field(headers, &CACHE_CONTROL)
    }

    /// The directives this cache obeys on a response: those of `CDN-Cache-Control`
    /// (RFC 9213) or `Surrogate-Control` when present, which then replace `Cache-Control`
    /// for this cache alone; otherwise `Cache-Control`.
    pub(crate) fn for_cache(headers: &HeaderMap) -> Self {
        match TARGETED_HEADERS
            .iter()
            .find(|name| headers.contains_key(*name))
        {
            Some(name) => Self::parse_field(headers, name),
            None => Self::parse(headers),
        }
    }

    fn parse_field(headers: &HeaderMap, field: &HeaderName) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(field) {
            let Ok(value) = value.to_str() else { continue };
            for directive in split_list(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                // Digits only (no sign); values past 2^31 s mean "very long" (RFC 9111
                // §1.2.2), including those too large for any integer type.
                let seconds = || {
                    arg.filter(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_digit()))
                        .map(|a| {
                            a.parse::<u64>()
                                .map_or(MAX_DELTA_SECS, |s| s.min(MAX_DELTA_SECS))
                        })
                };
                if name.eq_ignore_ascii_case("no-store") {
                    cc.no_store = true;
                } else if name.eq_ignore_ascii_case("no-cache") {
                    // `no-cache="field"` limits the directive to fields; storing any part
                    // of such a response would need per-field handling, so treat it whole.
                    cc.no_cache = true;
                } else if name.eq_ignore_ascii_case("private") {
                    cc.private = true;
                } else if name.eq_ignore_ascii_case("public") {
                    cc.public = true;
                } else if name.eq_ignore_ascii_case("max-age") {
                    cc.max_age = cc.max_age.or_else(seconds);
                } else if name.eq_ignore_ascii_case("s-maxage") {
                    cc.s_maxage = cc.s_maxage.or_else(seconds);
                } else if name.eq_ignore_ascii_case("must-revalidate")
                    || name.eq_ignore_ascii_case("proxy-revalidate")
                {
                    cc.must_revalidate = true;
                } else if name.eq_ignore_ascii_case("stale-while-revalidate") {
                    cc.stale_while_revalidate = cc.stale_while_revalidate.or_else(seconds);
                } else if name.eq_ignore_ascii_case("stale-if-error") {
                    cc.stale_if_error = cc.stale_if_error.or_else(seconds);
                } else if name.eq_ignore_ascii_case("max-stale") {
                    // Without a value: any staleness; with a malformed one: ignored.
                    match arg {
                        None => cc.max_stale = cc.max_stale.or(Some(None)),
                        Some(_) => cc.max_stale = cc.max_stale.or(seconds().map(Some)),
                    }
                } else if name.eq_ignore_ascii_case("min-fresh") {
                    cc.min_fresh = cc.min_fresh.or_else(seconds);
                } else if name.eq_ignore_ascii_case("only-if-cached") {
                    cc.only_if_cached = true;
                }
            }
        }
        cc
    }
}

/// Splits a comma-separated header list, ignoring commas inside quoted strings, trimming
/// whitespace and dropping empty elements.
fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut in_quotes = false;
    let mut escaped = false;
    value
        .split(move |c: char| {
            if escaped {
                escaped = false;
            } else if in_quotes && c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quotes = !in_quotes;
            } else if c == ',' && !in_quotes {
                return true;
            }
            false
        })
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestAction {
    /// Not the cache's business: call the handler, leave the response untouched.
    Pass,
    /// An unsafe method (POST, PUT, PATCH, DELETE) the route does not cache: call the
    /// handler; on success drop the stored GET entries of the URL (RFC 9111 §4.4).
    Invalidate,
    /// A HEAD request: answer from a fresh GET entry if there is one, else pass.
    HeadLookup,
    /// Call the handler, store nothing, say `X-Cache: BYPASS` (and why).
    Bypass(BypassReason),
    /// Call the handler without looking up, then store (`X-Cache: REFRESH`).
    Refresh,
    /// Look up; on a miss call the handler and store.
    Lookup,
}

/// Why a request bypassed the cache, for `Cache-Status`'s `detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BypassReason {
    /// The client sent `Cache-Control: no-store`.
    NoStore,
    /// The request carries credentials (`Authorization` / `Proxy-Authorization`) and the
    /// response was not marked shareable.
    Authorization,
    /// The request carries a cookie the route does not ignore or key on.
    Cookie,
    /// The route's key function declined the request.
    NoKey,
}

/// How the cache treats a request, and what the request asks of a stored response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestPlan {
    pub(crate) action: RequestAction,
    /// The request carries `Authorization`: only responses marked shareable (`public`,
    /// `s-maxage`, `must-revalidate`) may be served to it or stored from it (RFC 9111 §3.5).
    pub(crate) authorized: bool,
    /// The request's `Cache-Control` (client limits on age and staleness).
    pub(crate) directives: CacheControl,
}

/// Decides how the cache treats a request (RFC 9111 §5.2.1, plus the route's rules).
pub(crate) fn classify_request(rules: &Rules, method: &Method, headers: &HeaderMap) -> RequestPlan {
    let mut cc = CacheControl::parse(headers);
    // Proxy credentials are credentials too: a reply to them is as personal.
    let authorized = (headers.contains_key(AUTHORIZATION)
        || headers.contains_key(PROXY_AUTHORIZATION))
        && !rules.cache_authorized;
    let personal_cookie = rules.cookies.personal(headers);
    let has_cache_control = headers.contains_key(CACHE_CONTROL);
    if !rules.honor_request_no_cache {
        // The route does not let clients force handler calls: drop every directive that
        // would (`no-cache`, and `max-age` / `min-fresh` that reject a stored response).
        cc.no_cache = false;
        cc.max_age = None;
        cc.min_fresh = None;
    }
    let wants_fresh = cc.no_cache
        || (rules.honor_request_no_cache && !has_cache_control && pragma_no_cache(headers));
    let action = if method == Method::HEAD {
        // HEAD responses are never stored (their empty body must not reach a GET); a HEAD is
        // answered from the GET entry when the route caches GET.
        let usable = rules.methods.contains(&Method::GET)
            && !authorized
            && !personal_cookie
            && !cc.no_store
            && !wants_fresh;
        if usable {
            RequestAction::HeadLookup
        } else {
            RequestAction::Pass
        }
    } else if !rules.methods.contains(method) {
        if is_unsafe(method) {
            RequestAction::Invalidate
        } else {
            RequestAction::Pass
        }
    } else if cc.no_store {
        RequestAction::Bypass(BypassReason::NoStore)
    } else if personal_cookie {
        RequestAction::Bypass(BypassReason::Cookie)
    } else if wants_fresh {
        if authorized {
            RequestAction::Bypass(BypassReason::Authorization)
        } else {
            RequestAction::Refresh
        }
    } else {
        RequestAction::Lookup
    };
    RequestPlan {
        action,
        authorized,
        directives: cc,
    }
}

/// The URL a `Location` / `Content-Location` value names, when it is on the request's own
/// origin (a path, or an absolute URL whose authority is the request's Host); a write must
/// not invalidate entries of other sites (RFC 9111 §4.4).
pub(crate) fn same_origin_target(
    value: &HeaderValue,
    request: &Uri,
    host: Option<&HeaderValue>,
) -> Option<Uri> {
    let target: Uri = value.to_str().ok()?.parse().ok()?;
    match target.authority() {
        None => target.path().starts_with('/').then_some(target),
        Some(authority) => {
            let own = request
                .authority()
                .map(|a| a.as_str().to_owned())
                .or_else(|| host.and_then(|h| h.to_str().ok()).map(str::to_owned))?;
            authority
                .as_str()
                .eq_ignore_ascii_case(&own)
                .then_some(target)
        }
    }
}

fn is_unsafe(method: &Method) -> bool {
    [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method)
}

fn pragma_no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(PRAGMA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .any(|d| d.eq_ignore_ascii_case("no-cache"))
}

/// How long a response may be stored, or `None` if it must not be stored.
///
/// `authorized`: the request carried `Authorization`; then only a response marked
/// shareable may be stored (RFC 9111 §3.5).
pub(crate) fn storable_ttl(
    rules: &Rules,
    status: StatusCode,
    headers: &HeaderMap,
    authorized: bool,
) -> Option<Duration> {
    if !storable_status(status)
        || !rules.statuses.contains(status)
        || headers.contains_key(SET_COOKIE)
    {
        return None;
    }
    let cc = CacheControl::for_cache(headers);
    if cc.private || cc.no_store || (authorized && !cc.shareable_when_authorized()) {
        return None;
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
        return None;
    }
    if matches!(vary_names(headers), Vary::Any) {
        return None;
    }
    let ttl = if rules.honor_origin_ttl {
        origin_ttl(&cc, headers).unwrap_or(rules.ttl)
    } else {
        rules.ttl
    };
    // A response with `no-cache` is stored, but validated before every reuse; it needs a
    // lifetime in the store even when its own is zero.
    let ttl = if cc.no_cache && ttl.is_zero() {
        rules.ttl
    } else {
        ttl
    };
    Some(ttl).filter(|ttl| !ttl.is_zero())
}

/// Whether a response with `status` can be replayed from a store at all: a final status
/// (200-599) other than 206, which holds part of a body and would be replayed as the whole,
/// and 304, which only confirms another response.
pub(crate) fn storable_status(status: StatusCode) -> bool {
    (200..=599).contains(&status.as_u16())
        && status != StatusCode::PARTIAL_CONTENT
        && status != StatusCode::NOT_MODIFIED
}

impl CacheControl {
    /// RFC 9111 §3.5: directives that let a shared cache reuse a response to a request with
    /// `Authorization`.
    pub(crate) fn shareable_when_authorized(&self) -> bool {
        self.public || self.s_maxage.is_some() || self.must_revalidate
    }
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
        .unwrap_or_else(SystemTime::now);
    Some(clamp(
        expires.duration_since(date).unwrap_or(Duration::ZERO),
    ))
}

/// Parses an HTTP date (IMF-fixdate, RFC 850 or asctime).
pub(crate) fn http_date(value: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(value.to_str().ok()?).ok()
}

/// Fields that give this cache its own directives (RFC 9213's CDN-Cache-Control, and
/// Surrogate-Control); the layer strips them before the client sees the response.
pub(crate) const TARGETED_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("cdn-cache-control"),
    HeaderName::from_static("surrogate-control"),
];

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

/// Judges a stored response for a request.
pub(crate) fn judge(
    rules: &Rules,
    plan: &RequestPlan,
    stored: &HeaderMap,
    age: Duration,
    ttl: Duration,
) -> Verdict {
    let cc = CacheControl::for_cache(stored);
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
    let grace = grace(rules, stored);
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
pub(crate) fn grace(rules: &Rules, headers: &HeaderMap) -> Grace {
    let cc = CacheControl::for_cache(headers);
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
pub(crate) fn keep_past_ttl(rules: &Rules, headers: &HeaderMap) -> Duration {
    let grace = grace(rules, headers).longest();
    let has_validator = headers.contains_key(http::header::ETAG)
        || headers.contains_key(http::header::LAST_MODIFIED);
    if has_validator {
        grace.max(rules.revalidation_window)
    } else {
        grace
    }
}

/// The headers through which a response names its tags for the cache (Cloudflare's
/// comma-separated `Cache-Tag`, Fastly's space-separated `Surrogate-Key`). Meant for the cache
/// alone: the layer strips them before the client sees the response.
pub(crate) const TAG_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("cache-tag"),
    HeaderName::from_static("surrogate-key"),
];

/// The tags a response names in its tag headers.
pub(crate) fn response_tags(headers: &HeaderMap) -> Vec<String> {
    TAG_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(name))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(|c: char| c == ',' || c.is_ascii_whitespace()))
        .filter(|tag| !tag.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The request headers a response varies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Vary {
    /// `Vary: *`: every request is different; never store.
    Any,
    /// These header names, lower-cased, sorted, without duplicates (possibly none).
    Headers(Vec<HeaderName>),
}

/// Reads every `Vary` field line into a normalized list.
pub(crate) fn vary_names(headers: &HeaderMap) -> Vary {
    let mut names = Vec::new();
    for value in headers.get_all(VARY) {
        let Ok(value) = value.to_str() else {
            return Vary::Any;
        };
        for name in split_list(value) {
            if name == "*" {
                return Vary::Any;
            }
            // An unparseable name cannot be matched against requests: refuse to store.
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) => names.push(name),
                Err(_) => return Vary::Any,
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Vary::Headers(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Header pairs in a table row.
    type Pairs = &'static [(&'static str, &'static str)];

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn cache_control_parsing_table() {
        let cases: &[(&[(&str, &str)], CacheControl)] = &[
            (&[], CacheControl::default()),
            (
                &[("cache-control", "No-Store")],
                CacheControl {
                    no_store: true,
                    ..Default::default()
                },
            ),
            (
                &[
                    ("cache-control", "max-age=10, S-MAXAGE=20"),
                    ("cache-control", "max-age=99"),
                ],
                CacheControl {
                    max_age: Some(10),
                    s_maxage: Some(20),
                    ..Default::default()
                },
            ),
            (
                &[("cache-control", "max-age=\"30\"")],
                CacheControl {
                    max_age: Some(30),
                    ..Default::default()
                },
            ),
            (
                &[("cache-control", "max-age=ten, foo=\"a,private\"")],
                CacheControl::default(),
            ),
            (
                &[("cache-control", "private=\"set-cookie, x\", public")],
                CacheControl {
                    private: true,
                    public: true,
                    ..Default::default()
                },
            ),
            (
                &[("cache-control", " , no-cache ,, ")],
                CacheControl {
                    no_cache: true,
                    ..Default::default()
                },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(&CacheControl::parse(&headers(input)), expected, "{input:?}");
        }
    }

    #[test]
    fn request_classification_table() {
        use RequestAction::*;
        let rules = Rules::default();
        let cases: &[(Method, Pairs, RequestAction, bool)] = &[
            (Method::GET, &[], Lookup, false),
            (Method::POST, &[], Invalidate, false),
            (Method::DELETE, &[], Invalidate, false),
            (Method::OPTIONS, &[], Pass, false),
            (Method::HEAD, &[], HeadLookup, false),
            (Method::HEAD, &[("authorization", "Bearer x")], Pass, true),
            (Method::GET, &[("authorization", "Bearer x")], Lookup, true),
            (
                Method::GET,
                &[("authorization", "Bearer x"), ("cache-control", "no-cache")],
                Bypass(BypassReason::Authorization),
                true,
            ),
            (
                Method::GET,
                &[("proxy-authorization", "Basic x")],
                Lookup,
                true,
            ),
            (
                Method::HEAD,
                &[("proxy-authorization", "Basic x")],
                Pass,
                true,
            ),
            (
                Method::GET,
                &[("Cache-Control", "NO-STORE")],
                Bypass(BypassReason::NoStore),
                false,
            ),
            (
                Method::GET,
                &[("cookie", "session=abc")],
                Bypass(BypassReason::Cookie),
                false,
            ),
            (Method::HEAD, &[("cookie", "session=abc")], Pass, false),
            (
                Method::GET,
                &[("cache-control", "no-cache")],
                Refresh,
                false,
            ),
            (Method::GET, &[("pragma", "no-cache")], Refresh, false),
            (
                Method::GET,
                &[("pragma", "no-cache"), ("cache-control", "max-age=5")],
                Lookup,
                false,
            ),
        ];
        for (method, input, action, authorized) in cases {
            let plan = classify_request(&rules, method, &headers(input));
            assert_eq!(
                (plan.action, plan.authorized),
                (*action, *authorized),
                "{method} {input:?}"
            );
        }
        let no_refresh = Rules {
            honor_request_no_cache: false,
            ..Rules::default()
        };
        let h = headers(&[("cache-control", "no-cache, max-age=0, min-fresh=9")]);
        let plan = classify_request(&no_refresh, &Method::GET, &h);
        assert_eq!(plan.action, Lookup);
        assert_eq!(
            (plan.directives.max_age, plan.directives.min_fresh),
            (None, None)
        );
    }

    #[test]
    fn storability_table() {
        let rules = Rules::default();
        let ok = StatusCode::OK;
        let secs = |s| Some(Duration::from_secs(s));
        let cases: &[(StatusCode, Pairs, bool, Option<Duration>)] = &[
            (ok, &[], false, secs(60)),
            (StatusCode::NOT_FOUND, &[], false, None),
            (StatusCode::NO_CONTENT, &[], false, secs(60)),
            (ok, &[("set-cookie", "a=b")], false, None),
            (ok, &[("cache-control", "Private")], false, None),
            (ok, &[("cache-control", "no-store")], false, None),
            (ok, &[("vary", "accept-encoding, *")], false, None),
            (ok, &[("cache-control", "max-age=5")], false, secs(5)),
            (
                ok,
                &[("cache-control", "max-age=5, s-maxage=9")],
                false,
                secs(9),
            ),
            (ok, &[("cache-control", "max-age=0")], false, None),
            (ok, &[("cache-control", "no-cache")], false, secs(60)),
            (
                ok,
                &[
                    ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
                    ("expires", "Tue, 01 Jan 2030 00:01:40 GMT"),
                ],
                false,
                secs(100),
            ),
            (ok, &[("expires", "0")], false, None),
            (
                ok,
                &[("cache-control", "max-age=7"), ("expires", "0")],
                false,
                secs(7),
            ),
            (ok, &[], true, None),
            (ok, &[("cache-control", "public")], true, secs(60)),
            (ok, &[("cache-control", "s-maxage=30")], true, secs(30)),
            (
                ok,
                &[
                    ("cache-control", "private"),
                    ("cdn-cache-control", "max-age=90"),
                ],
                false,
                secs(90),
            ),
            (
                ok,
                &[
                    ("cache-control", "max-age=5"),
                    ("surrogate-control", "no-store"),
                ],
                false,
                None,
            ),
        ];
        for (status, input, authorized, expected) in cases {
            assert_eq!(
                storable_ttl(&rules, *status, &headers(input), *authorized),
                *expected,
                "{status} {input:?}"
            );
        }
        let route_ttl = Rules {
            honor_origin_ttl: false,
            ..Rules::default()
        };
        let h = headers(&[("cache-control", "max-age=5")]);
        assert_eq!(storable_ttl(&route_ttl, ok, &h, false), secs(60));
    }

    #[test]
    fn judging_a_stored_response_table() {
        use Verdict::*;
        let secs = Duration::from_secs;
        let rules = Rules {
            stale_while_revalidate: secs(10),
            stale_if_error: secs(100),
            ..Rules::default()
        };
        let plan = |req: &[(&'static str, &'static str)]| {
            classify_request(&rules, &Method::GET, &headers(req))
        };
        // (request, stored, age, ttl) -> verdict
        let cases: &[(Pairs, Pairs, u64, u64, Verdict)] = &[
            (&[], &[], 5, 60, Fresh),
            (
                &[],
                &[("cache-control", "no-cache")],
                5,
                60,
                Validate { if_error: false },
            ),
            (
                &[("cache-control", "max-age=3")],
                &[],
                5,
                60,
                Validate { if_error: false },
            ),
            (
                &[("cache-control", "min-fresh=58")],
                &[],
                5,
                60,
                Validate { if_error: false },
            ),
            (&[("cache-control", "min-fresh=50")], &[], 5, 60, Fresh),
            (&[], &[], 65, 60, StaleWhileRevalidate),
            (&[], &[], 80, 60, Validate { if_error: true }),
            (&[], &[], 200, 60, Validate { if_error: false }),
            (
                &[("cache-control", "max-stale")],
                &[],
                500,
                60,
                StaleAccepted,
            ),
            (
                &[("cache-control", "max-stale=10")],
                &[],
                65,
                60,
                StaleAccepted,
            ),
            (
                &[("cache-control", "max-stale=10")],
                &[],
                80,
                60,
                Validate { if_error: true },
            ),
            (
                &[("cache-control", "max-stale")],
                &[("cache-control", "must-revalidate")],
                65,
                60,
                Validate { if_error: false },
            ),
            (&[("authorization", "x")], &[], 5, 60, Unusable),
            (
                &[("authorization", "x")],
                &[("cache-control", "public")],
                5,
                60,
                Fresh,
            ),
        ];
        for (request, stored, age, ttl, expected) in cases {
            let verdict = judge(
                &rules,
                &plan(request),
                &headers(stored),
                secs(*age),
                secs(*ttl),
            );
            assert_eq!(
                verdict, *expected,
                "request {request:?} stored {stored:?} age {age} ttl {ttl}"
            );
        }
    }

    #[test]
    fn same_origin_targets() {
        let request: Uri = "/items/1".parse().unwrap();
        let host = HeaderValue::from_static("example.com");
        let target = |v: &'static str| {
            same_origin_target(&HeaderValue::from_static(v), &request, Some(&host))
        };
        assert_eq!(target("/items/2"), Some("/items/2".parse().unwrap()));
        assert_eq!(
            target("http://example.com/items/3?x=1").map(|u| u.path().to_owned()),
            Some("/items/3".into())
        );
        assert_eq!(target("https://evil.example/items/1"), None);
        assert_eq!(target("relative"), None);
    }

    #[test]
    fn grace_table() {
        let secs = Duration::from_secs;
        let route = Rules {
            stale_while_revalidate: secs(5),
            stale_if_error: secs(7),
            ..Rules::default()
        };
        let cases: &[(&Rules, Pairs, (u64, u64))] = &[
            (&route, &[], (5, 7)),
            (
                &route,
                &[(
                    "cache-control",
                    "stale-while-revalidate=30, stale-if-error=1",
                )],
                (30, 7),
            ),
            (
                &route,
                &[(
                    "cache-control",
                    "max-age=5, Must-Revalidate, stale-if-error=60",
                )],
                (0, 0),
            ),
            (&route, &[("cache-control", "proxy-revalidate")], (0, 0)),
            (
                &Rules::default(),
                &[("cache-control", "stale-if-error=9")],
                (0, 9),
            ),
        ];
        for (rules, input, (revalidate, if_error)) in cases {
            let expected = Grace {
                revalidate: secs(*revalidate),
                if_error: secs(*if_error),
            };
            assert_eq!(grace(rules, &headers(input)), expected, "{input:?}");
        }
        let no_origin = Rules {
            honor_origin_ttl: false,
            ..Rules::default()
        };
        let h = headers(&[("cache-control", "stale-while-revalidate=30")]);
        assert_eq!(grace(&no_origin, &h), Grace::default());
    }

    #[test]
    fn response_tags_from_both_headers() {
        let h = headers(&[
            ("Cache-Tag", "a, b"),
            ("surrogate-key", "c  d"),
            ("cache-tag", ""),
        ]);
        assert_eq!(response_tags(&h), ["a", "b", "c", "d"]);
    }

    #[test]
    fn status_set_membership() {
        let set = StatusSet::from_codes([200, 203, 404]);
        assert!(set.contains(StatusCode::NOT_FOUND));
        assert!(!set.contains(StatusCode::CREATED));
    }
}
