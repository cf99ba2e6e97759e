//! One request through the proxy: forwarding fields checked, the path's rule picked, the
//! cache (or a plain pass) in front of the upstream, upstream failures labelled as such.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use tower_layer::Layer;
use tower_redis_cache::{CacheBody, CacheLayer, CacheService, Invalidator, Store};
use tower_service::Service;

use crate::config::{Config, CookiePolicy, Rule};
use crate::forward::{self, Forward, GatewayError, Peer, ProxyBody};

/// Every response body: the cache's (a replay, or the upstream's streamed through it), or the
/// upstream's without the cache (passed routes, tunnels).
pub type OutBody = Either<CacheBody<ProxyBody>, ProxyBody>;

/// The proxy: its routes, the upstream client, and what the admin listener needs.
pub struct Proxy {
    config: Arc<Config>,
    forward: Forward,
    /// One per `config.rules` entry, then the `[cache]` rule's.
    routes: Vec<Route>,
}

struct Route {
    layer: CacheLayer,
    /// `None`: the rule says `cache = false`.
    service: Option<CacheService<Forward>>,
}

impl Proxy {
    /// The proxy for `config`, caching in `store`.
    pub fn new(config: Arc<Config>, store: Arc<dyn Store>) -> Result<Self, forward::BoxError> {
        let forward = Forward::new(&config)?;
        let routes = config
            .rules
            .iter()
            .chain(std::iter::once(&config.default_rule))
            .map(|rule| {
                let layer = cache_layer(&config, rule, store.clone());
                let service = rule.cache.then(|| layer.layer(forward.clone()));
                Route { layer, service }
            })
            .collect();
        Ok(Proxy {
            config,
            forward,
            routes,
        })
    }

    fn route(&self, path: &str) -> &Route {
        let index = self
            .config
            .rule_index(path)
            .unwrap_or(self.config.rules.len());
        &self.routes[index]
    }

    /// The invalidator of the rule that serves `path` (rules key URLs differently).
    pub fn invalidator(&self, path: &str) -> Invalidator {
        self.route(path).layer.invalidator()
    }

    /// Every route's layer (stats, flush).
    pub fn layers(&self) -> impl Iterator<Item = &CacheLayer> {
        self.routes.iter().map(|r| &r.layer)
    }

    /// Answers one request from `peer`.
    pub async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<OutBody> {
        let started = self.config.log_requests.then(Instant::now);
        let log_line = started.map(|_| request_line(&req, peer));
        let trusted = self
            .config
            .trusted_proxies
            .iter()
            .any(|c| c.contains(peer.ip()));
        if !trusted {
            // Before the cache keys the request: forged forwarding fields must neither
            // reach the upstream nor split (or poison) the cache.
            forward::strip_untrusted_forwarding(req.headers_mut());
        }
        req.extensions_mut().insert(Peer { addr: peer });

        let mut response = if forward::is_upgrade(&req) {
            metrics::counter!("proxy_tunnels_total").increment(1);
            self.forward.tunnel(req).await.map(Either::Right)
        } else {
            // The client's hop-by-hop fields describe its connection to us, not a request to
            // the upstream, and must not sway the cache either.
            forward::strip_hop_by_hop(req.headers_mut());
            match &self.route(req.uri().path()).service {
                Some(service) => {
                    let mut service = service.clone();
                    // Always ready (the upstream client queues internally), but a clone is
                    // only called once polled ready.
                    let ready = std::future::poll_fn(|cx| service.poll_ready(cx)).await;
                    match ready {
                        Ok(()) => match service.call(req).await {
                            Ok(response) => response.map(Either::Left),
                            Err(never) => match never {},
                        },
                        Err(never) => match never {},
                    }
                }
                None => self.forward.forward(req).await.map(Either::Right),
            }
        };
        if let Some(&error) = response.extensions().get::<GatewayError>() {
            label_gateway_error(response.headers_mut(), error);
        }
        if let (Some(started), Some(line)) = (started, log_line) {
            log_request(&line, &response, started.elapsed());
        }
        response
    }
}

/// The cache of one rule.
fn cache_layer(config: &Config, rule: &Rule, store: Arc<dyn Store>) -> CacheLayer {
    let mut layer = CacheLayer::with_shared_store(store)
        .route_name(rule.prefix.clone())
        .key_prefix(config.key_prefix.clone())
        // With no TTL of its own, the upstream sets every lifetime: what it gives no explicit
        // (or heuristic) freshness is not stored.
        .ttl(rule.ttl.unwrap_or(Duration::ZERO))
        .methods(rule.methods.iter().cloned())
        // One upstream, reached with its own `Host` whatever name the client used: keying on
        // the client's `Host` would only split the cache per alias of the proxy (and let a
        // client fill the store with made-up hosts).
        .key_host(config.key_host)
        .sort_query(rule.sort_query)
        .ignore_query_params(rule.ignore_query_params.iter().cloned())
        .cache_requests_with_cookies(rule.cookies == CookiePolicy::Ignore)
        .stale_while_revalidate(rule.stale_while_revalidate)
        .stale_if_error(rule.stale_if_error)
        .heuristic_freshness(rule.heuristic_freshness)
        .hit_for_miss(rule.hit_for_miss)
        .max_body_bytes(config.limits.max_body_bytes)
        // Nodes sharing a store share cold keys too: one upstream call per key in total.
        .lock_across_instances(config.store.is_shared());
    if !rule.ignore_cookies.is_empty() {
        layer = layer.ignore_cookies(rule.ignore_cookies.iter().cloned());
    }
    if !rule.key_on_cookies.is_empty() {
        layer = layer.key_on_cookies(rule.key_on_cookies.iter().cloned());
    }
    if let Some(fraction) = rule.refresh_ahead {
        layer = layer.refresh_ahead(fraction);
    }
    if let Some(timeout) = rule.soft_timeout {
        layer = layer.soft_timeout(timeout);
    }
    layer
}

/// The proxy's own `502` / `504` came through the cache labelled as a miss; it is not one.
fn label_gateway_error(headers: &mut http::HeaderMap, error: GatewayError) {
    headers.insert("x-cache", HeaderValue::from_static("ERROR"));
    let status = match error {
        GatewayError::Unreachable => "tower-redis-cache; fwd=uri-miss; detail=upstream-unreachable",
        GatewayError::Timeout => "tower-redis-cache; fwd=uri-miss; detail=upstream-timeout",
    };
    headers.insert("cache-status", HeaderValue::from_static(status));
}

fn request_line(req: &Request<Incoming>, peer: SocketAddr) -> String {
    format!(
        "{} \"{} {} {:?}\"",
        peer.ip(),
        req.method(),
        req.uri().path_and_query().map_or("/", |pq| pq.as_str()),
        req.version()
    )
}

/// One line per request, when the head is sent: who, what, status, cache outcome, time.
fn log_request(line: &str, response: &Response<OutBody>, elapsed: Duration) {
    let outcome = response
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("PASS");
    println!(
        "{line} {} {outcome} {:.3}ms",
        response.status().as_u16(),
        elapsed.as_secs_f64() * 1000.0
    );
}
