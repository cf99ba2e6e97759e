//! What the cache counts and how it warns: per-layer counters (always on, relaxed atomics),
//! the same events on the `metrics` facade (feature `metrics`), and warnings rate-limited per
//! cause so that an outage logs a few lines, not one per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// At most one warning per cause in this interval; the next line says how many were held
/// back meanwhile.
pub(crate) const WARN_INTERVAL: Duration = Duration::from_secs(5);

/// Lets one warning of a cause through per [`WARN_INTERVAL`], counting the others. Time is
/// tokio's clock (std's outside a runtime), so tests drive it with `tokio::time::advance`.
#[derive(Debug, Default)]
pub(crate) struct WarnLimiter {
    state: Mutex<LimiterState>,
}

#[derive(Debug, Default)]
struct LimiterState {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    /// `Some(n)` when a warning may be logged now, `n` being how many were held back since
    /// the last one; `None` (and one more held back) otherwise.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.last {
            Some(last) if now.saturating_duration_since(last) < WARN_INTERVAL => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

/// How a request the cache handled was answered; one per labelled response. The layer labels
/// its answers from it (`X-Cache`, `Cache-Status`), and counts them by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// A fresh stored response (`HIT`).
    Hit,
    /// A stale copy the client accepted or that is being refreshed in the background.
    Stale,
    /// A stale copy served because the handler failed.
    StaleIfError,
    /// The handler confirmed the stored copy with a 304.
    Revalidated,
    Miss,
    /// The client forced a handler call (`no-cache`).
    Refresh,
    /// The cache stood aside, and why.
    Bypass(Bypass),
    /// Served the response of another request's handler call (in-process or cross-instance
    /// coalescing); says HIT.
    Coalesced,
    /// Went to the handler at once, without coalescing: the key is marked uncacheable, or
    /// the leader's answer turned out uncacheable; says MISS.
    HitForMiss,
    /// A stale copy stood in for a failing handler that was not called (fail-safe throttle,
    /// or the leader's call failed); says STALE.
    FailSafe,
    /// A stale copy served at the soft timeout; the handler's call went on in the background.
    SoftTimeout,
    /// The cache's own `504` at the hard timeout (no stale copy could stand in); says MISS.
    Timeout,
}

impl Served {
    const COUNT: usize = 12;

    /// One of each kind, in the order of the counters (every bypass counts as one kind).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    const KINDS: [Served; Self::COUNT] = [
        Served::Hit,
        Served::Stale,
        Served::StaleIfError,
        Served::Revalidated,
        Served::Miss,
        Served::Refresh,
        Served::Bypass(Bypass::NoStore),
        Served::Coalesced,
        Served::HitForMiss,
        Served::FailSafe,
        Served::SoftTimeout,
        Served::Timeout,
    ];

    /// This kind's counter.
    fn index(self) -> usize {
        match self {
            Served::Hit => 0,
            Served::Stale => 1,
            Served::StaleIfError => 2,
            Served::Revalidated => 3,
            Served::Miss => 4,
            Served::Refresh => 5,
            Served::Bypass(_) => 6,
            Served::Coalesced => 7,
            Served::HitForMiss => 8,
            Served::FailSafe => 9,
            Served::SoftTimeout => 10,
            Served::Timeout => 11,
        }
    }

    /// The kind's name in metrics (`outcome` label) and traces.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Stale => "stale",
            Served::StaleIfError => "stale_if_error",
            Served::Revalidated => "revalidated",
            Served::Miss => "miss",
            Served::Refresh => "refresh",
            Served::Bypass(_) => "bypass",
            Served::Coalesced => "coalesced",
            Served::HitForMiss => "hit_for_miss",
            Served::FailSafe => "fail_safe",
            Served::SoftTimeout => "soft_timeout",
            Served::Timeout => "timeout",
        }
    }
}

/// Things the layer did besides answering, counted in [`CacheStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A hit-for-miss mark written.
    UncacheableMark = 0,
    /// A refresh ahead of expiry started in the background.
    RefreshAhead,
    /// A fail-safe throttle written after a failure.
    FailSafeThrottle,
}

#[cfg(feature = "metrics")]
const EVENTS: [&str; 3] = [
    "uncacheable_marks",
    "refreshes_ahead",
    "fail_safe_throttles",
];

/// Why a request bypassed the cache, for `Cache-Status`'s `detail` and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bypass {
    /// The client sent `Cache-Control: no-store`.
    NoStore = 0,
    /// The request carries credentials (`Authorization` / `Proxy-Authorization`) and the
    /// response was not marked shareable.
    Authorization,
    /// The request carries a cookie the route does not ignore or key on.
    Cookie,
    /// The route's key function declined the request.
    NoKey,
    /// The request names two different hosts (its target's authority and `Host`, or two
    /// `Host` fields), so no key says which page the app renders.
    AuthorityMismatch,
}

impl Bypass {
    /// Every reason, in the order of the counters.
    pub(crate) const ALL: [Bypass; 5] = [
        Bypass::NoStore,
        Bypass::Authorization,
        Bypass::Cookie,
        Bypass::NoKey,
        Bypass::AuthorityMismatch,
    ];

    /// The reason's name in `Cache-Status` (`detail=`) and metrics (`reason` label).
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Bypass::NoStore => "no-store",
            Bypass::Authorization => "authorization",
            Bypass::Cookie => "cookie",
            Bypass::NoKey => "no-key",
            Bypass::AuthorityMismatch => "authority-mismatch",
        }
    }
}

/// Why a response the cache considered storing was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotStored {
    /// A status the route does not store, without explicit freshness.
    Status = 0,
    SetCookie,
    Private,
    NoStore,
    /// The request carried credentials and the response was not marked shareable.
    Authorization,
    EventStream,
    VaryStar,
    /// Explicit freshness of zero (`max-age=0`) without `no-cache`.
    NoFreshness,
    /// The body was, or announced to be, over `max_body_bytes`.
    Size,
    /// `Content-Length` malformed, or contradicted by the body.
    BadLength,
    /// The body failed, carried trailers or was abandoned by the client.
    Incomplete,
    /// `max_pending_writes` background writes were already in flight.
    PendingWritesFull,
}

impl NotStored {
    /// Every reason, in the order of the counters.
    pub(crate) const ALL: [NotStored; 12] = [
        NotStored::Status,
        NotStored::SetCookie,
        NotStored::Private,
        NotStored::NoStore,
        NotStored::Authorization,
        NotStored::EventStream,
        NotStored::VaryStar,
        NotStored::NoFreshness,
        NotStored::Size,
        NotStored::BadLength,
        NotStored::Incomplete,
        NotStored::PendingWritesFull,
    ];

    /// The reason's name in metrics (`reason` label) and logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NotStored::Status => "status",
            NotStored::SetCookie => "set-cookie",
            NotStored::Private => "private",
            NotStored::NoStore => "no-store",
            NotStored::Authorization => "authorization",
            NotStored::EventStream => "event-stream",
            NotStored::VaryStar => "vary-star",
            NotStored::NoFreshness => "no-freshness",
            NotStored::Size => "size",
            NotStored::BadLength => "bad-length",
            NotStored::Incomplete => "incomplete",
            NotStored::PendingWritesFull => "pending-writes-full",
        }
    }
}

const ERROR_KINDS: [(ErrorKind, &str); 8] = [
    (ErrorKind::InvalidUrl, "invalid_url"),
    (ErrorKind::Unreachable, "unreachable"),
    (ErrorKind::Timeout, "timeout"),
    (ErrorKind::Codec, "codec"),
    (ErrorKind::Backend, "backend"),
    (ErrorKind::InvalidInput, "invalid_input"),
    (ErrorKind::Unsupported, "unsupported"),
    (ErrorKind::Compute, "compute"),
];

fn kind_index(kind: ErrorKind) -> usize {
    ERROR_KINDS
        .iter()
        .position(|(k, _)| *k == kind)
        .unwrap_or(ERROR_KINDS.len() - 1)
}

fn counters<const N: usize>() -> [AtomicU64; N] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

fn load<const N: usize>(counters: &[AtomicU64; N]) -> [u64; N] {
    std::array::from_fn(|i| counters[i].load(Ordering::Relaxed))
}

/// A count of operations and their total time.
#[derive(Debug, Default)]
struct Timer {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl Timer {
    fn record(&self, elapsed: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Timing {
        Timing {
            count: self.count.load(Ordering::Relaxed),
            total: Duration::from_nanos(self.nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Metric names, Prometheus-style. Every layer metric carries a `route` label.
#[cfg(feature = "metrics")]
pub(crate) mod names {
    /// Requests the cache handled, by `outcome`.
    pub(crate) const REQUESTS: &str = "http_cache_requests_total";
    /// Bypasses, by `reason`.
    pub(crate) const BYPASSES: &str = "http_cache_bypasses_total";
    /// Responses not stored, by `reason`.
    pub(crate) const NOT_STORED: &str = "http_cache_not_stored_total";
    /// Failed store operations, by error `kind`.
    pub(crate) const STORE_ERRORS: &str = "http_cache_store_errors_total";
    pub(crate) const STORE_GET: &str = "http_cache_store_get_duration_seconds";
    pub(crate) const STORE_SET: &str = "http_cache_store_set_duration_seconds";
    /// Hit-for-miss marks, refreshes ahead and fail-safe throttles, by `event`.
    pub(crate) const EVENTS: &str = "http_cache_events_total";
    /// Handler calls on misses, refreshes and revalidations.
    pub(crate) const HANDLER: &str = "http_cache_handler_duration_seconds";
    /// `RedisStore` back-offs entered (no route: a store may serve several layers).
    pub(crate) const BACKOFFS: &str = "cache_store_backoffs_total";
    /// `MemoryStore`'s weighed size and entry count.
    pub(crate) const MEMORY_BYTES: &str = "cache_store_memory_bytes";
    pub(crate) const MEMORY_ENTRIES: &str = "cache_store_memory_entries";
}

/// The metric handles of one route, registered on first use (so a recorder installed after
/// the layer was built, but before its first request, still gets them).
#[cfg(feature = "metrics")]
struct Handles {
    served: [metrics::Counter; Served::COUNT],
    events: [metrics::Counter; 3],
    bypass: [metrics::Counter; 5],
    not_stored: [metrics::Counter; 12],
    errors: [metrics::Counter; 8],
    get: metrics::Histogram,
    set: metrics::Histogram,
    handler: metrics::Histogram,
}

#[cfg(feature = "metrics")]
impl Handles {
    fn new(route: &str) -> Self {
        fn labelled<const N: usize>(
            name: &'static str,
            route: &str,
            label: &'static str,
            values: [&'static str; N],
        ) -> [metrics::Counter; N] {
            values.map(|v| metrics::counter!(name, "route" => route.to_owned(), label => v))
        }
        let errors = ERROR_KINDS.map(|(_, n)| n);
        Self {
            served: labelled(
                names::REQUESTS,
                route,
                "outcome",
                Served::KINDS.map(Served::as_str),
            ),
            events: labelled(names::EVENTS, route, "event", EVENTS),
            bypass: labelled(
                names::BYPASSES,
                route,
                "reason",
                Bypass::ALL.map(Bypass::as_str),
            ),
            not_stored: labelled(
                names::NOT_STORED,
                route,
                "reason",
                NotStored::ALL.map(NotStored::as_str),
            ),
            errors: labelled(names::STORE_ERRORS, route, "kind", errors),
            get: metrics::histogram!(names::STORE_GET, "route" => route.to_owned()),
            set: metrics::histogram!(names::STORE_SET, "route" => route.to_owned()),
            handler: metrics::histogram!(names::HANDLER, "route" => route.to_owned()),
        }
    }
}

/// The counters of one layer (one route), shared by its services.
pub(crate) struct Observer {
    route: String,
    served: [AtomicU64; Served::COUNT],
    events: [AtomicU64; 3],
    bypass: [AtomicU64; 5],
    not_stored: [AtomicU64; 12],
    errors: [AtomicU64; 8],
    get: Timer,
    set: Timer,
    handler: Timer,
    /// One per error kind: store failures warn at most once per interval per kind.
    warn: [WarnLimiter; 8],
    #[cfg(feature = "metrics")]
    handles: std::sync::OnceLock<Handles>,
}

impl Observer {
    pub(crate) fn new(route: impl Into<String>) -> Self {
        Self {
            route: route.into(),
            served: counters(),
            events: counters(),
            bypass: counters(),
            not_stored: counters(),
            errors: counters(),
            get: Timer::default(),
            set: Timer::default(),
            handler: Timer::default(),
            warn: Default::default(),
            #[cfg(feature = "metrics")]
            handles: std::sync::OnceLock::new(),
        }
    }

    #[cfg(feature = "metrics")]
    fn handles(&self) -> &Handles {
        self.handles.get_or_init(|| Handles::new(&self.route))
    }

    /// The route name the layer's metrics are labelled with.
    pub(crate) fn route(&self) -> &str {
        &self.route
    }

    /// Counts an answer (and, for a bypass, its reason).
    pub(crate) fn served(&self, served: Served) {
        if let Served::Bypass(reason) = served {
            self.bypass[reason as usize].fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            self.handles().bypass[reason as usize].increment(1);
        }
        self.served[served.index()].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.handles().served[served.index()].increment(1);
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("outcome", served.as_str());
        }
    }

    pub(crate) fn event(&self, event: Event) {
        self.events[event as usize].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.handles().events[event as usize].increment(1);
    }

    pub(crate) fn not_stored(&self, reason: NotStored) {
        self.not_stored[reason as usize].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.handles().not_stored[reason as usize].increment(1);
        tracing::debug!(reason = reason.as_str(), "response not stored");
    }

    /// Counts a failed store operation and warns, at most once per [`WARN_INTERVAL`] per
    /// error kind.
    pub(crate) fn store_error(&self, op: &'static str, key: &str, error: &Error) {
        let index = kind_index(error.kind());
        self.errors[index].fetch_add(1, Ordering::Relaxed);
        #[cfg(feature = "metrics")]
        self.handles().errors[index].increment(1);
        if let Some(suppressed) = self.warn[index].allow() {
            tracing::warn!(
                route = %self.route,
                op,
                key,
                kind = ERROR_KINDS[index].1,
                suppressed,
                error = error as &dyn std::error::Error,
                "cache store failed; serving without the cache"
            );
        }
    }

    pub(crate) fn store_get(&self, elapsed: Duration) {
        self.get.record(elapsed);
        #[cfg(feature = "metrics")]
        self.handles().get.record(elapsed.as_secs_f64());
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("store_get_us", elapsed.as_micros() as u64);
        }
    }

    pub(crate) fn store_set(&self, elapsed: Duration) {
        self.set.record(elapsed);
        #[cfg(feature = "metrics")]
        self.handles().set.record(elapsed.as_secs_f64());
    }

    pub(crate) fn handler(&self, elapsed: Duration) {
        self.handler.record(elapsed);
        #[cfg(feature = "metrics")]
        self.handles().handler.record(elapsed.as_secs_f64());
    }

    pub(crate) fn snapshot(&self) -> CacheStats {
        let [hits, stale, stale_if_error, revalidated, misses, refreshes, bypassed, coalesced, hit_for_miss, fail_safe, soft_timeouts, timeouts] =
            load(&self.served);
        let [uncacheable_marks, refreshes_ahead, fail_safe_throttles] = load(&self.events);
        let [b_no_store, b_authorization, b_cookie, b_no_key, b_authority_mismatch] =
            load(&self.bypass);
        let [status, set_cookie, private, no_store, authorization, event_stream, vary_star, no_freshness, size, bad_length, incomplete, pending_writes_full] =
            load(&self.not_stored);
        CacheStats {
            route: self.route.clone(),
            hits,
            stale,
            stale_if_error,
            revalidated,
            misses,
            refreshes,
            bypassed,
            coalesced,
            hit_for_miss,
            fail_safe,
            soft_timeouts,
            timeouts,
            uncacheable_marks,
            refreshes_ahead,
            fail_safe_throttles,
            bypass: BypassCounts {
                no_store: b_no_store,
                authorization: b_authorization,
                cookie: b_cookie,
                no_key: b_no_key,
                authority_mismatch: b_authority_mismatch,
            },
            not_stored: NotStoredCounts {
                status,
                set_cookie,
                private,
                no_store,
                authorization,
                event_stream,
                vary_star,
                no_freshness,
                size,
                bad_length,
                incomplete,
                pending_writes_full,
            },
            store_errors: StoreErrorCounts::from_array(load(&self.errors)),
            store_gets: self.get.snapshot(),
            store_sets: self.set.snapshot(),
            handler_calls: self.handler.snapshot(),
        }
    }
}

/// Counts of store errors by [`ErrorKind`], for `RedisStore::stats`.
#[cfg(feature = "redis")]
#[derive(Debug, Default)]
pub(crate) struct ErrorCounters([AtomicU64; 8]);

#[cfg(feature = "redis")]
impl ErrorCounters {
    pub(crate) fn count(&self, kind: ErrorKind) {
        self.0[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> StoreErrorCounts {
        StoreErrorCounts::from_array(load(&self.0))
    }
}

/// What a [`CacheLayer`](crate::CacheLayer) has done since it was built, from
/// [`CacheLayer::stats`](crate::CacheLayer::stats): the same counts the `metrics` feature
/// exports, without an exporter.
///
/// Every request the cache handled counts once in exactly one of `hits`, `stale`,
/// `stale_if_error`, `revalidated`, `misses`, `refreshes`, `bypassed`, `coalesced`,
/// `hit_for_miss`, `fail_safe`, `soft_timeouts` and `timeouts` (requests the layer leaves
/// alone, such as methods it does not cache, are not counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// The layer's route name (see [`CacheLayer::route_name`](crate::CacheLayer::route_name)).
    pub route: String,
    /// Answered from a fresh stored response (`X-Cache: HIT`), HEAD requests included.
    pub hits: u64,
    /// Answered from a stale stored response within a grace or the client's `max-stale`.
    pub stale: u64,
    /// Answered from a stale stored response because the handler failed.
    pub stale_if_error: u64,
    /// The handler confirmed the stored response with a 304.
    pub revalidated: u64,
    /// The handler was called (nothing usable stored, or the store failed), including
    /// `only-if-cached` requests answered 504.
    pub misses: u64,
    /// The client forced a handler call (`no-cache`).
    pub refreshes: u64,
    /// The request bypassed the cache; `bypass` says why.
    pub bypassed: u64,
    /// Served the response of another request's handler call (coalescing).
    pub coalesced: u64,
    /// Went to the handler at once, without waiting on another request: the key was marked
    /// uncacheable (hit-for-miss), or the answer the request waited for turned out
    /// uncacheable (`Cache-Status: ...; detail=hit-for-miss`).
    pub hit_for_miss: u64,
    /// A stale copy stood in for a failing handler without calling it: within the fail-safe
    /// throttle after a failure, or because the call it waited for failed
    /// (`Cache-Status: ...; detail=fail-safe`).
    pub fail_safe: u64,
    /// A stale copy answered at the soft timeout while the handler's call went on
    /// (`detail=soft-timeout`).
    pub soft_timeouts: u64,
    /// Answered `504` at the hard timeout, with no stale copy to stand in (`detail=timeout`).
    pub timeouts: u64,
    /// Hit-for-miss marks written: answers that could not be stored, remembered so that
    /// requests for the key go straight to the handler.
    pub uncacheable_marks: u64,
    /// Background refreshes started ahead of expiry (`refresh_ahead`).
    pub refreshes_ahead: u64,
    /// Fail-safe throttles written after a failed handler call with a stale copy.
    pub fail_safe_throttles: u64,
    /// Bypasses by reason.
    pub bypass: BypassCounts,
    /// Responses the handler sent that were not stored, by reason.
    pub not_stored: NotStoredCounts,
    /// Failed store operations, by kind.
    pub store_errors: StoreErrorCounts,
    /// Store lookups (each `GET` of an entry or a `Vary` variant) and their time.
    pub store_gets: Timing,
    /// Store writes and their time.
    pub store_sets: Timing,
    /// Handler calls on misses, refreshes and revalidations, and their time.
    pub handler_calls: Timing,
}

/// Why requests bypassed the cache (`Cache-Status: ...; detail=...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)]
pub struct BypassCounts {
    pub no_store: u64,
    pub authorization: u64,
    pub cookie: u64,
    pub no_key: u64,
    /// The request named two different hosts (target and `Host`, or two `Host` fields).
    pub authority_mismatch: u64,
}

/// Why responses were not stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NotStoredCounts {
    /// A status the route does not store, without explicit freshness.
    pub status: u64,
    /// The response sets a cookie.
    pub set_cookie: u64,
    /// `Cache-Control: private`.
    pub private: u64,
    /// `Cache-Control: no-store`.
    pub no_store: u64,
    /// The request carried credentials and the response was not marked shareable.
    pub authorization: u64,
    /// `text/event-stream`.
    pub event_stream: u64,
    /// `Vary: *`.
    pub vary_star: u64,
    /// Explicit freshness of zero (`max-age=0`) without `no-cache`.
    pub no_freshness: u64,
    /// The body was, or announced to be, over `max_body_bytes`.
    pub size: u64,
    /// `Content-Length` malformed, or contradicted by the body.
    pub bad_length: u64,
    /// The body failed, carried trailers, or the client went away before its end.
    pub incomplete: u64,
    /// `max_pending_writes` background writes were already in flight.
    pub pending_writes_full: u64,
}

/// Failed store operations by [`ErrorKind`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)]
pub struct StoreErrorCounts {
    pub invalid_url: u64,
    pub unreachable: u64,
    pub timeout: u64,
    pub codec: u64,
    pub backend: u64,
    pub invalid_input: u64,
    pub unsupported: u64,
    pub compute: u64,
}

impl StoreErrorCounts {
    fn from_array(
        [invalid_url, unreachable, timeout, codec, backend, invalid_input, unsupported, compute]: [u64; 8],
    ) -> Self {
        Self {
            invalid_url,
            unreachable,
            timeout,
            codec,
            backend,
            invalid_input,
            unsupported,
            compute,
        }
    }

    /// All kinds together.
    pub fn total(&self) -> u64 {
        self.invalid_url
            + self.unreachable
            + self.timeout
            + self.codec
            + self.backend
            + self.invalid_input
            + self.unsupported
            + self.compute
    }
}

/// How many operations ran, and their total time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timing {
    /// Operations counted.
    pub count: u64,
    /// Their time, summed.
    pub total: Duration,
}

impl Timing {
    /// The mean time of one operation (zero when none ran).
    pub fn mean(&self) -> Duration {
        u32::try_from(self.count)
            .ok()
            .filter(|n| *n > 0)
            .map_or(Duration::ZERO, |n| self.total / n)
    }
}

impl CacheStats {
    /// The counters as flat `(name, value)` pairs (`"hits"`, `"bypass.cookie"`,
    /// `"not_stored.set_cookie"`, `"store_errors.timeout"`, `"store_gets.count"`,
    /// `"store_gets.micros"`, ...), for a JSON health endpoint or a log line.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let micros = |t: &Timing| u64::try_from(t.total.as_micros()).unwrap_or(u64::MAX);
        let mut out: Vec<(String, u64)> = [
            ("hits", self.hits),
            ("stale", self.stale),
            ("stale_if_error", self.stale_if_error),
            ("revalidated", self.revalidated),
            ("misses", self.misses),
            ("refreshes", self.refreshes),
            ("bypassed", self.bypassed),
            ("coalesced", self.coalesced),
            ("hit_for_miss", self.hit_for_miss),
            ("fail_safe", self.fail_safe),
            ("soft_timeouts", self.soft_timeouts),
            ("timeouts", self.timeouts),
            ("uncacheable_marks", self.uncacheable_marks),
            ("refreshes_ahead", self.refreshes_ahead),
            ("fail_safe_throttles", self.fail_safe_throttles),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        let b = &self.bypass;
        let bypass = [
            b.no_store,
            b.authorization,
            b.cookie,
            b.no_key,
            b.authority_mismatch,
        ];
        for (name, value) in Bypass::ALL.map(Bypass::as_str).iter().zip(bypass) {
            out.push((format!("bypass.{}", name.replace('-', "_")), value));
        }
        let n = &self.not_stored;
        let not_stored = [
            n.status,
            n.set_cookie,
            n.private,
            n.no_store,
            n.authorization,
            n.event_stream,
            n.vary_star,
            n.no_freshness,
            n.size,
            n.bad_length,
            n.incomplete,
            n.pending_writes_full,
        ];
        for (name, value) in NotStored::ALL.map(NotStored::as_str).iter().zip(not_stored) {
            out.push((format!("not_stored.{}", name.replace('-', "_")), value));
        }
        let e = &self.store_errors;
        let errors = [
            e.invalid_url,
            e.unreachable,
            e.timeout,
            e.codec,
            e.backend,
            e.invalid_input,
            e.unsupported,
            e.compute,
        ];
        for ((_, name), value) in ERROR_KINDS.iter().zip(errors) {
            out.push((format!("store_errors.{name}"), value));
        }
        for (name, t) in [
            ("store_gets", &self.store_gets),
            ("store_sets", &self.store_sets),
            ("handler_calls", &self.handler_calls),
        ] {
            out.push((format!("{name}.count"), t.count));
            out.push((format!("{name}.micros"), micros(t)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_kinds_are_listed_in_counter_order_with_distinct_names() {
        for (i, kind) in Served::KINDS.iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind:?}");
        }
        let mut names = Served::KINDS.map(Served::as_str).to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Served::COUNT);
        for (i, reason) in Bypass::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
        for (i, reason) in NotStored::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_limiter_lets_one_line_per_interval_and_counts_the_rest() {
        let limiter = WarnLimiter::default();
        assert_eq!(limiter.allow(), Some(0));
        for _ in 0..999 {
            tokio::time::advance(Duration::from_millis(1)).await;
            assert_eq!(limiter.allow(), None);
        }
        tokio::time::advance(WARN_INTERVAL).await;
        assert_eq!(limiter.allow(), Some(999));
        assert_eq!(limiter.allow(), None);
    }

    #[test]
    fn every_kind_has_its_own_counter() {
        for (i, (kind, _)) in ERROR_KINDS.iter().enumerate() {
            assert_eq!(kind_index(*kind), i);
        }
    }
}
