//! `CacheLayer`: the builder users see.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tower_layer::Layer;

use crate::policy::{Rules, StatusSet};
use crate::service::CacheService;
use crate::store::Store;

/// A tower [`Layer`] that caches responses of the wrapped service in a [`Store`].
///
/// Defaults: GET responses with a 2xx status are stored for 60 s (or for the response's
/// `s-maxage` / `max-age`), bodies up to 1 MiB, keys prefixed with `http-cache`. Requests
/// with `Authorization` bypass the cache; `Cache-Control: no-cache` from the client forces a
/// refresh. See the crate docs for the full behaviour table.
///
/// Clone it to apply the same settings to several routes; each builder call returns a new
/// layer, so one route's settings never change another's.
#[derive(Clone)]
pub struct CacheLayer {
    config: Arc<Config>,
}

/// Everything a `CacheService` needs, shared by all its clones.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) rules: Rules,
    pub(crate) key_prefix: String,
}

impl CacheLayer {
    /// A layer storing responses in `store` with the default settings.
    pub fn new(store: impl Store) -> Self {
        Self::with_shared_store(Arc::new(store))
    }

    /// A layer on a store already shared (for example with code that invalidates entries).
    pub fn with_shared_store(store: Arc<dyn Store>) -> Self {
        Self {
            config: Arc::new(Config {
                store,
                rules: Rules::default(),
                key_prefix: "http-cache".to_owned(),
            }),
        }
    }

    fn rules_mut(&mut self) -> &mut Rules {
        &mut Arc::make_mut(&mut self.config).rules
    }

    /// How long a response is kept when it does not set its own lifetime (default 60 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.rules_mut().ttl = ttl;
        self
    }

    /// Which request methods are cached (default: GET only). A HEAD request is answered from
    /// a fresh GET entry whenever GET is cached; HEAD responses themselves are never stored.
    ///
    /// For methods other than GET the key is still method, path and query: the request body
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
        Arc::make_mut(&mut self.config).key_prefix = prefix.into();
        self
    }

    /// Which response statuses are stored (default `200..=299`).
    pub fn status_codes(mut self, codes: impl IntoIterator<Item = u16>) -> Self {
        self.rules_mut().statuses = StatusSet::from_codes(codes);
        self
    }

    /// Whether the response's `s-maxage` / `max-age` set the TTL (default true). When false,
    /// the route's TTL always applies.
    pub fn honor_origin_ttl(mut self, honor: bool) -> Self {
        self.rules_mut().honor_origin_ttl = honor;
        self
    }

    /// Whether a client's `Cache-Control: no-cache` (or `Pragma: no-cache`) forces a call to
    /// the handler (default true). Turn it off on routes where any client forcing handler
    /// calls is a load risk; nginx and Varnish ignore it by default for that reason.
    pub fn honor_request_no_cache(mut self, honor: bool) -> Self {
        self.rules_mut().honor_request_no_cache = honor;
        self
    }

    /// Whether requests carrying `Authorization` are cached (default false: they bypass the
    /// cache). Turn it on only for routes whose responses are the same for every user: the
    /// stored response is served to every client, authorized or not.
    pub fn cache_authorized_requests(mut self, cache: bool) -> Self {
        self.rules_mut().cache_authorized = cache;
        self
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService::new(inner, self.config.clone())
    }
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer")
            .field("rules", &self.config.rules)
            .field("key_prefix", &self.config.key_prefix)
            .finish_non_exhaustive()
    }
}
