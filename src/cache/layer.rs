//! `CacheLayer`: the builder users see.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use tower_layer::Layer;

use crate::cache::invalidate::Invalidator;
use crate::cache::service::CacheService;
use crate::cache::state::LayerState;
use crate::key::Keying;
use crate::observe::{CacheStats, Observer};
use crate::settings::{clamp, Rules, StatusSet};
use crate::store::Store;

/// A tower [`Layer`] that caches responses of the wrapped service in a [`Store`].
///
/// Defaults: GET responses with a 2xx status are stored for 60 s (or for the response's
/// `s-maxage` / `max-age`), bodies up to 1 MiB, keys prefixed with `http-cache` and made of
/// method, host, path and raw query. Requests with `Authorization`, `Proxy-Authorization` or
/// any `Cookie` bypass the cache; `Cache-Control: no-cache` from the client forces a
/// refresh. See the crate docs for `X-Cache`, and the repository's `docs/http-caching.md` for
/// the HTTP rules.
///
/// Every duration is clamped to 2^31 s (RFC 9111 §1.2.2), so no setting can overflow.
///
/// Clone it to apply the same settings to several routes; each builder call returns a new
/// layer, so one route's settings never change another's.
#[derive(Clone)]
pub struct CacheLayer {
    state: Arc<LayerState>,
}

impl CacheLayer {
    /// A layer storing responses in `store` with the default settings.
    pub fn new(store: impl Store) -> Self {
        Self::with_shared_store(Arc::new(store))
    }

    /// A layer on a store already shared (for example with code that invalidates entries).
    pub fn with_shared_store(store: Arc<dyn Store>) -> Self {
        Self {
            state: Arc::new(LayerState {
                store,
                rules: Rules::default(),
                key_prefix: "http-cache".to_owned(),
                keying: Keying::default(),
                flights: Arc::default(),
                tags: Arc::from([]),
                pending_writes: Arc::default(),
                observe: Arc::new(Observer::new(DEFAULT_ROUTE)),
                hosts: Arc::default(),
            }),
        }
    }

    fn rules_mut(&mut self) -> &mut Rules {
        &mut Arc::make_mut(&mut self.state).rules
    }

    /// How long a response is kept when it does not set its own lifetime (default 60 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.rules_mut().ttl = clamp(ttl);
        self
    }

    /// Which request methods are cached (default: GET only). A HEAD request is answered from
    /// a fresh GET entry whenever GET is cached; HEAD responses themselves are never stored.
    ///
    /// For methods other than GET the key is still method, host, path and query: the request body
    /// is not part of it, so only add a method whose response does not depend on its body.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.rules_mut().methods = methods.into_iter().collect();
        self
    }

    /// The largest body stored (default 1 MiB). Larger bodies stream through unchanged and
    /// are not stored; at most this much is buffered per response in flight.
    pub fn max_body_bytes(mut self, limit: usize) -> Self {
        self.rules_mut().max_body_bytes = limit;
        self
    }

    /// The prefix of every key (default `http-cache`): keys are `{prefix}:{md5 hex}`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.state).key_prefix = prefix.into();
        self
    }

    /// Which response statuses are stored under the route's TTL (default: every 2xx). A
    /// response that gives its own explicit lifetime (`s-maxage`, `max-age`, `Expires`, with
    /// [`honor_origin_ttl`](Self::honor_origin_ttl) on) is stored whatever its final status,
    /// 206 and 304 aside (RFC 9111 §3).
    ///
    /// ```rust
    /// use http::StatusCode;
    /// use tower_redis_cache::{CacheLayer, MemoryStore};
    ///
    /// let layer = CacheLayer::new(MemoryStore::new())
    ///     .status_codes([StatusCode::OK, StatusCode::NOT_FOUND]);
    /// ```
    pub fn status_codes(mut self, codes: impl IntoIterator<Item = StatusCode>) -> Self {
        self.rules_mut().statuses = StatusSet::from_codes(codes.into_iter().map(|c| c.as_u16()));
        self
    }

    /// Whether the response's `s-maxage` / `max-age` / `Expires` set the TTL, and its
    /// `stale-while-revalidate` / `stale-if-error` extend the route's graces (default true).
    /// When false, the route's TTL always applies.
    pub fn honor_origin_ttl(mut self, honor: bool) -> Self {
        self.rules_mut().honor_origin_ttl = honor;
        self
    }

    /// Whether a client may force a call to the handler (default true): with `Cache-Control:
    /// no-cache` (or `Pragma: no-cache` without `Cache-Control`), or with `max-age` /
    /// `min-fresh` directives that reject the stored response. Off, the route drops those
    /// request directives and serves what it has. Turn it off on routes where any client
    /// forcing handler calls is a load risk; nginx and Varnish ignore them by default for
    /// that reason.
    pub fn honor_request_no_cache(mut self, honor: bool) -> Self {
        self.rules_mut().honor_request_no_cache = honor;
        self
    }

    /// Whether requests carrying `Authorization` or `Proxy-Authorization` are cached (default
    /// false: they are only served, and only store, responses marked `public`, `s-maxage` or
    /// `must-revalidate`). Turn it on only for routes whose responses are the same for every
    /// user: the stored response is served to every client, authorized or not.
    pub fn cache_authorized_requests(mut self, cache: bool) -> Self {
        self.rules_mut().cache_authorized = cache;
        self
    }
}

/// Keys and cookies.
impl CacheLayer {
    /// Whether the request's authority (the URI's, else the `Host` header's) is part of the
    /// key (default true). Turn it off only for an app that renders the same page whatever
    /// host it is reached on; with it on, apps serving several tenants on several hosts never
    /// serve one tenant's page to another. A request that names no host is keyed apart from
    /// every named host, and one that names two different hosts (an absolute-form target and
    /// a `Host` header that disagree, or two `Host` fields) bypasses the cache
    /// (`Cache-Status: ...; detail=authority-mismatch`), since the app may render for either.
    pub fn key_host(mut self, enable: bool) -> Self {
        Arc::make_mut(&mut self.state).keying.host = enable;
        self
    }

    /// Whether the forwarded host and scheme a request carries are part of its key (default
    /// true): the `Forwarded`, `X-Forwarded-Host` and `X-Forwarded-Proto` fields. Apps read
    /// them to render links and redirects (axum-extra's `Host` and `Scheme` extractors prefer
    /// them to `Host` and the target's scheme), and any client can send them, so a request
    /// carrying them gets its own entry instead of putting a page rendered for their values
    /// under the plain key. Requests without them keep their plain key. Turn it off behind a
    /// proxy that sets (or strips) these fields itself, or for an app that never reads them,
    /// so all requests share one entry. The target's own scheme is not keyed (see
    /// `docs/failure-modes.md` for what else is not).
    pub fn key_forwarded(mut self, enable: bool) -> Self {
        Arc::make_mut(&mut self.state).keying.forwarded = enable;
        self
    }

    /// Sort the query's pairs by name (keeping the order of repeated names) and drop empty
    /// pairs before keying (default false: the raw query is the key, since apps may read
    /// pairs in order). `?a=1&b=2` and `?b=2&a=1` then share an entry.
    pub fn sort_query(mut self, enable: bool) -> Self {
        Arc::make_mut(&mut self.state).keying.sort_query = enable;
        self
    }

    /// Query parameters left out of the key, such as tracking parameters; a name ending in
    /// `*` is a prefix (`"utm_*"`). The handler still sees them. Only list parameters the
    /// page does not depend on.
    pub fn ignore_query_params<T: Into<String>>(
        mut self,
        names: impl IntoIterator<Item = T>,
    ) -> Self {
        Arc::make_mut(&mut self.state).keying.ignore_params =
            names.into_iter().map(Into::into).collect();
        self
    }

    /// Adds material of your own to each request's key (a tenant id, a user segment from a
    /// request extension, ...). The function sees the request's head; returning `None` makes
    /// the request bypass the cache (`Cache-Status: ...; detail=no-key`). Entries keyed on
    /// it are dropped with their URL ([`Invalidator::invalidate`], writes to the URL) like
    /// any other.
    pub fn key_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.state).keying.key_fn = Some(Arc::new(f));
        self
    }

    /// Cache requests whatever cookies they carry (default false: a request with any cookie
    /// that is not ignored or keyed on bypasses the cache, since pages rendered from a
    /// session cookie are personal). The cookies are not part of the key: turn this on only
    /// for routes whose pages never depend on cookies.
    pub fn cache_requests_with_cookies(mut self, enable: bool) -> Self {
        self.rules_mut().cookies.cache_all = enable;
        self
    }

    /// Cookies that do not make a request bypass the cache (analytics cookies and the like,
    /// which the page does not depend on). They are not part of the key.
    pub fn ignore_cookies<T: Into<String>>(mut self, names: impl IntoIterator<Item = T>) -> Self {
        self.rules_mut().cookies.ignore = names.into_iter().map(Into::into).collect();
        self
    }

    /// Cookies whose values are part of the key (a `lang` or `currency` cookie): each value
    /// gets its own entry, and the cookie does not make a request bypass. A write to the URL
    /// (or [`Invalidator::invalidate`]) drops the entries of every cookie value.
    pub fn key_on_cookies<T: Into<String>>(mut self, names: impl IntoIterator<Item = T>) -> Self {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        Arc::make_mut(&mut self.state).keying.key_cookies = names.clone().into();
        self.rules_mut().cookies.key_on = names;
        self
    }
}

impl CacheLayer {
    /// Serve an entry up to `grace` past its TTL at once (`X-Cache: STALE`) while one
    /// background call refreshes it (default zero; a response's own
    /// `stale-while-revalidate=N` extends it when origin TTLs are honoured).
    pub fn stale_while_revalidate(mut self, grace: Duration) -> Self {
        self.rules_mut().stale_while_revalidate = clamp(grace);
        self
    }

    /// Serve an entry up to `grace` past its TTL (`X-Cache: STALE`) when the handler fails
    /// or answers 5xx (default zero; a response's own `stale-if-error=N` extends it when
    /// origin TTLs are honoured). `must-revalidate` on a response turns both graces off.
    pub fn stale_if_error(mut self, grace: Duration) -> Self {
        self.rules_mut().stale_if_error = clamp(grace);
        self
    }

    /// How long a key whose answer could not be stored (`private`, `no-store`, `Set-Cookie`,
    /// `Vary: *`, a status or size that is not stored, a body that failed midway, a failed
    /// or timed-out handler call without a stale copy) sends its requests straight to the
    /// handler, without coalescing or the cross-instance lock (default 120 s, as Varnish's
    /// hit-for-miss; `ZERO`: off). Such requests say `Cache-Status: ...; detail=hit-for-miss`.
    /// The mark is stored under the key itself (so every instance sharing the store sees it,
    /// and the store's bounds bound it); the first later answer that can be stored replaces
    /// it, and caching resumes.
    pub fn hit_for_miss(mut self, duration: Duration) -> Self {
        self.rules_mut().hit_for_miss = clamp(duration);
        self
    }

    /// After the handler failed (a 5xx, an error, a timeout) and a stale copy stood in for it
    /// (within [`stale_if_error`](Self::stale_if_error)), how long that stale copy keeps
    /// being served without calling the handler again (default 5 s; `ZERO`: every request
    /// tries the handler). Per key, and across instances through the store, so a broken
    /// origin sees about one call per key per throttle (FusionCache's fail-safe throttle).
    /// Such answers say `X-Cache: STALE`, `Cache-Status: ...; detail=fail-safe`.
    pub fn fail_safe_throttle(mut self, duration: Duration) -> Self {
        self.rules_mut().fail_safe_throttle = clamp(duration);
        self
    }

    /// When a stale copy may stand in for the handler (within
    /// [`stale_if_error`](Self::stale_if_error)) and the handler takes longer than `timeout`,
    /// serve the stale copy (`Cache-Status: ...; detail=soft-timeout`) and let the call go on
    /// in the background, storing its answer when it arrives (default: off). Requests waiting
    /// on another's call give up at the same time.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.rules_mut().soft_timeout = Some(clamp(timeout));
        self
    }

    /// Past `timeout`, drop the handler's call and answer `504` (`Cache-Status: ...;
    /// detail=timeout`), or the stale copy when one may stand in (default: off). Applies to
    /// the handler calls the cache makes for its routes' lookups (misses, refreshes,
    /// revalidations), not to requests it passes through. Requests that waited on the
    /// timed-out call answer the same way rather than wait as long again.
    pub fn hard_timeout(mut self, timeout: Duration) -> Self {
        self.rules_mut().hard_timeout = Some(clamp(timeout));
        self
    }

    /// Refresh an entry in the background when a hit finds it past `fraction` of its
    /// freshness lifetime (for example `0.8`: in its last fifth), so that a hot key never
    /// expires in front of a request (default: off). One refresh per key at a time, and with
    /// [`lock_across_instances`](Self::lock_across_instances) one across instances; the hit
    /// itself is answered at once. A fraction outside `0.0 < fraction < 1.0` (or NaN) turns
    /// it off.
    pub fn refresh_ahead(mut self, fraction: f64) -> Self {
        self.rules_mut().refresh_ahead = (fraction > 0.0 && fraction < 1.0).then_some(fraction);
        self
    }

    /// Shorten each entry's TTL by a random fraction of up to `fraction` (0.0 to 1.0,
    /// default 0), so entries written together do not expire together.
    pub fn ttl_jitter(mut self, fraction: f64) -> Self {
        self.rules_mut().ttl_jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Whether concurrent misses for one key in this process wait for a single handler
    /// call and share its response (default true). The waiters get `X-Cache: HIT`. A
    /// response that may not be stored is never shared: the waiters are released as soon as
    /// its head arrives and call the handler at once (see [`hit_for_miss`](Self::hit_for_miss)).
    pub fn coalesce(mut self, enable: bool) -> Self {
        self.rules_mut().coalesce = enable;
        self
    }

    /// How long a coalesced request waits for another's handler call before calling the
    /// handler itself (default 5 s).
    pub fn coalesce_timeout(mut self, timeout: Duration) -> Self {
        self.rules_mut().coalesce_timeout = clamp(timeout);
        self
    }

    /// Whether misses are also coalesced across app instances sharing the store, through a
    /// short lock per key in the store (default false). It costs two more store round trips
    /// on each miss (taking the lock, then looking for the entry once more); it makes a cold
    /// popular key cost one handler call in total rather than one per instance. Instances
    /// that do not get the lock poll for the entry.
    pub fn lock_across_instances(mut self, enable: bool) -> Self {
        self.rules_mut().lock_across_instances = enable;
        self
    }

    /// Tags every response stored by this layer with `tags` (in addition to those named by
    /// the response's `Cache-Tag` / `Surrogate-Key` header), so that
    /// [`Invalidator::invalidate_tag`] or [`RedisCache::invalidate_tag`](crate::RedisCache::invalidate_tag)
    /// (on a client with this layer's key prefix) drops them.
    pub fn tags<T: Into<String>>(mut self, tags: impl IntoIterator<Item = T>) -> Self {
        Arc::make_mut(&mut self.state).tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// A handle that drops this layer's stored responses by tag or by URL, for invalidating
    /// on writes or events.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator::new(
            self.state.store.clone(),
            self.state.key_prefix.clone(),
            self.state.keying.clone(),
            self.state.hosts.clone(),
        )
    }

    /// Give stored responses that have no `ETag` a strong one, the md5 of their body
    /// (default false), so clients can revalidate hits with `If-None-Match` and get a 304.
    /// The tag appears on hits; the first (streamed) response cannot carry it.
    pub fn generate_etag(mut self, enable: bool) -> Self {
        self.rules_mut().generate_etag = enable;
        self
    }

    /// How long past its TTL a response with a validator (`ETag` or `Last-Modified`) is kept,
    /// so that once stale it can be revalidated: the handler gets `If-None-Match` /
    /// `If-Modified-Since`, and a 304 refreshes the entry without resending the body
    /// (default 60 s; zero turns it off).
    pub fn revalidation_window(mut self, window: Duration) -> Self {
        self.rules_mut().revalidation_window = clamp(window);
        self
    }

    /// At most this many responses are written to the store in the background at once
    /// (default 1024). Past it, responses are still served, just not stored: a miss storm
    /// against a slow store costs hit rate, not unbounded memory.
    pub fn max_pending_writes(mut self, limit: usize) -> Self {
        self.rules_mut().max_pending_writes = limit;
        self
    }

    /// Waits for the layer's background work: resolves once every store write (and every
    /// background refresh of a stale entry) started before the call has finished,
    /// successfully or not. Work started after the call does not hold it up.
    ///
    /// Responses are written to the store in the background after their body has streamed
    /// to the client; call this on graceful shutdown, after the server has stopped taking
    /// requests, so that the last responses are not lost, or in tests, to check the store
    /// once a response was written. Layers cloned from one another (and their services)
    /// share their background work; to wait for it, keep a clone of the layer before
    /// handing it to `Router::layer` or `ServiceBuilder`.
    ///
    /// ```
    /// # #[cfg(feature = "memory")]
    /// # async fn demo() {
    /// use tower_redis_cache::{CacheLayer, MemoryStore};
    ///
    /// let layer = CacheLayer::new(MemoryStore::new());
    /// let service = tower::ServiceBuilder::new()
    ///     .layer(layer.clone())
    ///     .service_fn(|_req: http::Request<String>| async {
    ///         Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
    ///     });
    /// // ... serve requests with `service`, then stop taking new ones ...
    /// # drop(service);
    /// layer.flush().await;
    /// # }
    /// ```
    pub fn flush(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let writes = self.state.pending_writes.clone();
        async move { writes.flush().await }
    }

    /// The targeted cache-control fields this cache obeys, in priority order (RFC 9213;
    /// default `CDN-Cache-Control`, then `Surrogate-Control`). The first one present and
    /// valid replaces `Cache-Control` for this cache; give the layer a field of its own
    /// (`myapp-cache-control`, then `cdn-cache-control`) to steer it apart from your CDN.
    pub fn targeted_fields(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.rules_mut().targeted = names.into_iter().collect();
        self
    }

    /// Remove the targeted fields from responses before clients see them (default false:
    /// they are forwarded, since an app behind a CDN sets `CDN-Cache-Control` for the CDN).
    pub fn strip_targeted_fields(mut self, strip: bool) -> Self {
        self.rules_mut().strip_targeted = strip;
        self
    }

    /// Heuristic freshness (RFC 9111 §4.2.2, default off): a response without explicit
    /// freshness but with `Last-Modified` is fresh for `fraction` (0 to 1; 0.1 is usual) of
    /// the time since it was last modified, if its status is heuristically cacheable (200,
    /// 203, 204, 300, 301, 308, 404, 405, 410, 501) or it is marked `public`.
    pub fn heuristic_freshness(mut self, fraction: f64) -> Self {
        self.rules_mut().heuristic_fraction =
            (fraction.is_finite() && fraction > 0.0).then(|| fraction.min(1.0));
        self
    }

    /// How long a cross-instance lock lives if its holder never releases it (a crashed
    /// instance): other instances proceed after this (default 5 s).
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.rules_mut().lock_ttl = clamp(ttl);
        self
    }
}

/// The route name of a layer that was not given one.
const DEFAULT_ROUTE: &str = "default";

/// Observability: stats, metrics labels and the headers naming the outcome.
impl CacheLayer {
    /// The name this layer's metrics are labelled with (`route="..."`, default `default`)
    /// and its [`stats`](Self::stats) report. Name each route's layer after the route
    /// (`"items"`, `"GET /items/{id}"`), never after the raw request path, so the number of
    /// label values stays bounded.
    ///
    /// Giving a name starts new counts: layers cloned from one another share their counts
    /// until one of them is given a name of its own.
    pub fn route_name(mut self, name: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.state).observe = Arc::new(Observer::new(name));
        self
    }

    /// What the layer (and every layer cloned from it without a new
    /// [`route_name`](Self::route_name)) has done so far: outcomes, bypass and not-stored
    /// reasons, store errors by kind, store and handler time. Always on, with or without
    /// feature `metrics`; reading it costs a few atomic loads.
    ///
    /// ```
    /// # #[cfg(feature = "memory")] {
    /// use tower_redis_cache::{CacheLayer, MemoryStore};
    ///
    /// let layer = CacheLayer::new(MemoryStore::new()).route_name("items");
    /// let stats = layer.stats();
    /// assert_eq!((stats.route.as_str(), stats.hits, stats.misses), ("items", 0, 0));
    /// # }
    /// ```
    pub fn stats(&self) -> CacheStats {
        self.state.observe.snapshot()
    }

    /// The header naming the outcome (`HIT`, `MISS`, ...): [`X_CACHE`](crate::X_CACHE)
    /// (`x-cache`) by default, another name, or `None` to send none.
    pub fn x_cache_header(mut self, name: Option<HeaderName>) -> Self {
        self.rules_mut().x_cache = name;
        self
    }

    /// RFC 9211's [`Cache-Status`](crate::CACHE_STATUS) with this cache's name
    /// (default `Some("tower-redis-cache")`), for example the service's name when several
    /// caches stand in a response's path, or `None` to send none. A name that is not an RFC
    /// 8941 token is sent as a quoted string.
    pub fn cache_status(mut self, name: Option<&str>) -> Self {
        self.rules_mut().cache_status = name.map(|name| Arc::from(cache_name(name)));
        self
    }
}

/// `name` as RFC 9211 wants it: an sf-token as is, anything else as an sf-string (printable
/// ASCII, quoted, `"` and `\` escaped; other characters dropped).
fn cache_name(name: &str) -> String {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '*');
    let token = first_ok
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c));
    if token {
        return name.to_owned();
    }
    let mut quoted = String::with_capacity(name.len() + 2);
    quoted.push('"');
    for c in name.chars().filter(|c| (' '..='~').contains(c)) {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService::new(inner, self.state.clone())
    }
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("rules", &self.state.rules)
            .field("key_prefix", &self.state.key_prefix)
            .field("route", &self.state.observe.route())
            .finish_non_exhaustive()
    }
}
