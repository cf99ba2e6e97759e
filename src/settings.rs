//! The route's settings, as the builder fixed them: plain data read by the rules and the
//! request flow, below everything that reads it.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};

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
    /// Targeted cache-control fields this cache obeys, in priority order (RFC 9213).
    pub(crate) targeted: Vec<HeaderName>,
    /// Remove the targeted fields from responses before clients see them.
    pub(crate) strip_targeted: bool,
    /// Heuristic freshness (RFC 9111 §4.2.2): this fraction of the time since
    /// `Last-Modified`, for responses without explicit freshness; `None`: off.
    pub(crate) heuristic_fraction: Option<f64>,
    /// The header naming the outcome (`X-Cache` by default); `None`: not sent.
    pub(crate) x_cache: Option<HeaderName>,
    /// The cache's name in RFC 9211's `Cache-Status`; `None`: the field is not sent.
    pub(crate) cache_status: Option<Arc<str>>,
    /// How long a key whose answer could not be stored sends requests straight to the
    /// handler (hit-for-miss); zero: off.
    pub(crate) hit_for_miss: Duration,
    /// After a failure with a stale copy standing in, how long the stale copy is served
    /// without calling the handler again; zero: off.
    pub(crate) fail_safe_throttle: Duration,
    /// With a stale copy that may stand in, serve it if the handler is slower than this.
    pub(crate) soft_timeout: Option<Duration>,
    /// Answer `504` (or a stale copy that may stand in) past this, dropping the call.
    pub(crate) hard_timeout: Option<Duration>,
    /// A hit past this fraction of its freshness lifetime refreshes it in the background.
    pub(crate) refresh_ahead: Option<f64>,
}

/// The cache's name in `Cache-Status` unless the route sets another.
pub(crate) const CACHE_NAME: &str = "tower-redis-cache";

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
            targeted: DEFAULT_TARGETED.to_vec(),
            strip_targeted: false,
            heuristic_fraction: None,
            x_cache: Some(HeaderName::from_static("x-cache")),
            cache_status: Some(Arc::from(CACHE_NAME)),
            hit_for_miss: Duration::from_secs(120),
            fail_safe_throttle: Duration::from_secs(5),
            soft_timeout: None,
            hard_timeout: None,
            refresh_ahead: None,
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

/// The targeted fields this cache obeys by default, in priority order: RFC 9213's
/// `CDN-Cache-Control`, then `Surrogate-Control`.
pub(crate) const DEFAULT_TARGETED: [HeaderName; 2] = [
    HeaderName::from_static("cdn-cache-control"),
    HeaderName::from_static("surrogate-control"),
];
