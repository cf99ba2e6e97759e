//! The HTTP rules: may this request be answered from the cache, may this response be stored,
//! and for how long. Pure functions of headers and the route's settings; nothing here knows
//! about stores.

use std::time::Duration;

use http::header::{AUTHORIZATION, CACHE_CONTROL, PRAGMA, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderName, Method, StatusCode};

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
}

impl CacheControl {
    /// Parses every `Cache-Control` field line. Names are case-insensitive; unknown or
    /// malformed directives are ignored; for a repeated numeric directive the first wins.
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in split_list(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                let seconds = || arg.and_then(|a| a.parse::<u64>().ok());
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
    /// A HEAD request: answer from a fresh GET entry if there is one, else pass.
    HeadLookup,
    /// Call the handler, store nothing, say `X-Cache: BYPASS`.
    Bypass,
    /// Call the handler without looking up, then store (`X-Cache: REFRESH`).
    Refresh,
    /// Look up; on a miss call the handler and store.
    Lookup,
}

/// Decides how the cache treats a request (RFC 9111 §5.2.1 subset, plus the route's rules).
pub(crate) fn classify_request(rules: &Rules, method: &Method, headers: &HeaderMap) -> RequestAction {
    let cc = CacheControl::parse(headers);
    let authorized = headers.contains_key(AUTHORIZATION) && !rules.cache_authorized;
    let wants_fresh = rules.honor_request_no_cache
        && (cc.no_cache
            || (!headers.contains_key(CACHE_CONTROL) && pragma_no_cache(headers)));
    if method == Method::HEAD {
        // HEAD responses are never stored (their empty body must not reach a GET); a HEAD is
        // answered from the GET entry when the route caches GET.
        let usable = rules.methods.contains(&Method::GET) && !authorized && !cc.no_store && !wants_fresh;
        return if usable { RequestAction::HeadLookup } else { RequestAction::Pass };
    }
    if !rules.methods.contains(method) {
        return RequestAction::Pass;
    }
    if cc.no_store || authorized {
        RequestAction::Bypass
    } else if wants_fresh {
        RequestAction::Refresh
    } else {
        RequestAction::Lookup
    }
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
pub(crate) fn storable_ttl(rules: &Rules, status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    if !rules.statuses.contains(status) || headers.contains_key(SET_COOKIE) {
        return None;
    }
    let cc = CacheControl::parse(headers);
    if cc.private || cc.no_store || cc.no_cache {
        return None;
    }
    if matches!(vary_names(headers), Vary::Any) {
        return None;
    }
    let origin_ttl = rules
        .honor_origin_ttl
        .then(|| cc.s_maxage.or(cc.max_age))
        .flatten()
        .map(Duration::from_secs);
    Some(origin_ttl.unwrap_or(rules.ttl)).filter(|ttl| !ttl.is_zero())
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
    let cc = CacheControl::parse(headers);
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
        revalidate: rules.stale_while_revalidate.max(origin(cc.stale_while_revalidate)),
        if_error: rules.stale_if_error.max(origin(cc.stale_if_error)),
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
        let Ok(value) = value.to_str() else { return Vary::Any };
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
    use http::HeaderValue;

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
            (&[("cache-control", "No-Store")], CacheControl { no_store: true, ..Default::default() }),
            (
                &[("cache-control", "max-age=10, S-MAXAGE=20"), ("cache-control", "max-age=99")],
                CacheControl { max_age: Some(10), s_maxage: Some(20), ..Default::default() },
            ),
            (&[("cache-control", "max-age=\"30\"")], CacheControl { max_age: Some(30), ..Default::default() }),
            (&[("cache-control", "max-age=ten, foo=\"a,private\"")], CacheControl::default()),
            (
                &[("cache-control", "private=\"set-cookie, x\", public")],
                CacheControl { private: true, public: true, ..Default::default() },
            ),
            (&[("cache-control", " , no-cache ,, ")], CacheControl { no_cache: true, ..Default::default() }),
        ];
        for (input, expected) in cases {
            assert_eq!(&CacheControl::parse(&headers(input)), expected, "{input:?}");
        }
    }

    #[test]
    fn request_classification_table() {
        let rules = Rules::default();
        let cases: &[(Method, &[(&str, &str)], RequestAction)] = &[
            (Method::GET, &[], RequestAction::Lookup),
            (Method::POST, &[], RequestAction::Pass),
            (Method::HEAD, &[], RequestAction::HeadLookup),
            (Method::HEAD, &[("authorization", "Bearer x")], RequestAction::Pass),
            (Method::GET, &[("authorization", "Bearer x")], RequestAction::Bypass),
            (Method::GET, &[("Cache-Control", "NO-STORE")], RequestAction::Bypass),
            (Method::GET, &[("cache-control", "no-cache")], RequestAction::Refresh),
            (Method::GET, &[("pragma", "no-cache")], RequestAction::Refresh),
            (Method::GET, &[("pragma", "no-cache"), ("cache-control", "max-age=5")], RequestAction::Lookup),
        ];
        for (method, input, expected) in cases {
            assert_eq!(classify_request(&rules, method, &headers(input)), *expected, "{method} {input:?}");
        }
        let no_refresh = Rules { honor_request_no_cache: false, ..Rules::default() };
        let h = headers(&[("cache-control", "no-cache")]);
        assert_eq!(classify_request(&no_refresh, &Method::GET, &h), RequestAction::Lookup);
    }

    #[test]
    fn storability_table() {
        let rules = Rules::default();
        let ok = StatusCode::OK;
        let secs = |s| Some(Duration::from_secs(s));
        let cases: &[(StatusCode, &[(&str, &str)], Option<Duration>)] = &[
            (ok, &[], secs(60)),
            (StatusCode::NOT_FOUND, &[], None),
            (StatusCode::NO_CONTENT, &[], secs(60)),
            (ok, &[("set-cookie", "a=b")], None),
            (ok, &[("cache-control", "Private")], None),
            (ok, &[("cache-control", "no-store")], None),
            (ok, &[("vary", "accept-encoding, *")], None),
            (ok, &[("cache-control", "max-age=5")], secs(5)),
            (ok, &[("cache-control", "max-age=5, s-maxage=9")], secs(9)),
            (ok, &[("cache-control", "max-age=0")], None),
        ];
        for (status, input, expected) in cases {
            assert_eq!(storable_ttl(&rules, *status, &headers(input)), *expected, "{status} {input:?}");
        }
        let route_ttl = Rules { honor_origin_ttl: false, ..Rules::default() };
        let h = headers(&[("cache-control", "max-age=5")]);
        assert_eq!(storable_ttl(&route_ttl, ok, &h), secs(60));
    }

    #[test]
    fn vary_is_normalized() {
        let h = headers(&[("vary", "X-B, accept-encoding"), ("vary", "x-b")]);
        let names = |v: &[&'static str]| v.iter().map(|n| HeaderName::from_static(n)).collect();
        assert_eq!(vary_names(&h), Vary::Headers(names(&["accept-encoding", "x-b"])));
        assert_eq!(vary_names(&headers(&[("vary", "*")])), Vary::Any);
    }

    #[test]
    fn grace_table() {
        let secs = Duration::from_secs;
        let route = Rules { stale_while_revalidate: secs(5), stale_if_error: secs(7), ..Rules::default() };
        let cases: &[(&Rules, &[(&str, &str)], (u64, u64))] = &[
            (&route, &[], (5, 7)),
            (&route, &[("cache-control", "stale-while-revalidate=30, stale-if-error=1")], (30, 7)),
            (&route, &[("cache-control", "max-age=5, Must-Revalidate, stale-if-error=60")], (0, 0)),
            (&route, &[("cache-control", "proxy-revalidate")], (0, 0)),
            (&Rules::default(), &[("cache-control", "stale-if-error=9")], (0, 9)),
        ];
        for (rules, input, (revalidate, if_error)) in cases {
            let expected = Grace { revalidate: secs(*revalidate), if_error: secs(*if_error) };
            assert_eq!(grace(rules, &headers(input)), expected, "{input:?}");
        }
        let no_origin = Rules { honor_origin_ttl: false, ..Rules::default() };
        let h = headers(&[("cache-control", "stale-while-revalidate=30")]);
        assert_eq!(grace(&no_origin, &h), Grace::default());
    }

    #[test]
    fn response_tags_from_both_headers() {
        let h = headers(&[("Cache-Tag", "a, b"), ("surrogate-key", "c  d"), ("cache-tag", "")]);
        assert_eq!(response_tags(&h), ["a", "b", "c", "d"]);
    }

    #[test]
    fn status_set_membership() {
        let set = StatusSet::from_codes([200, 203, 404]);
        assert!(set.contains(StatusCode::NOT_FOUND));
        assert!(!set.contains(StatusCode::CREATED));
    }
}
