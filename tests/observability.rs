//! Stats, warnings and header control: exact counts after scripted sequences, and a bound on
//! the warn lines an outage logs.
#![cfg(all(feature = "memory", feature = "redis"))]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceExt};
use tower_redis_cache::store::StoreFuture;
use tower_redis_cache::{CacheLayer, Error, ErrorKind, MemoryStore, RedisCache, RedisStore, Store};

/// A handler whose response depends on the path.
async fn handler(req: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::builder().status(200);
    let mut body = "ok".to_owned();
    match req.uri().path() {
        "/status" => response = response.status(503),
        "/big" => body = "x".repeat(64),
        "/set-cookie" => response = response.header("set-cookie", "a=1"),
        "/private" => response = response.header("cache-control", "private"),
        "/no-store" => response = response.header("cache-control", "no-store"),
        "/vary-star" => response = response.header("vary", "*"),
        "/event-stream" => response = response.header("content-type", "text/event-stream"),
        "/bad-length" => response = response.header("content-length", "100"),
        _ => {}
    }
    Ok(response.body(Full::new(Bytes::from(body))).unwrap())
}

/// One request through `layer`, body read to its end, background writes flushed; returns
/// `X-Cache`.
async fn get(layer: &CacheLayer, path: &str, headers: &[(&str, &str)]) -> Option<String> {
    let mut service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(handler);
    let mut req = Request::get(format!("http://example.com{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let response = service
        .ready()
        .await
        .unwrap()
        .call(req.body(Full::default()).unwrap())
        .await
        .unwrap();
    let x_cache = response
        .headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    response.into_body().collect().await.unwrap();
    layer.flush().await;
    x_cache
}

#[tokio::test]
async fn a_scripted_sequence_gives_exact_counts() {
    let layer = CacheLayer::new(MemoryStore::new())
        .max_body_bytes(16)
        .route_name("items");
    assert_eq!(get(&layer, "/a", &[]).await.as_deref(), Some("MISS"));
    assert_eq!(get(&layer, "/a", &[]).await.as_deref(), Some("HIT"));
    assert_eq!(get(&layer, "/a", &[]).await.as_deref(), Some("HIT"));
    let h = |n, v| [(n, v)];
    get(&layer, "/a", &h("cookie", "session=1")).await;
    get(&layer, "/a", &h("cache-control", "no-store")).await;
    get(&layer, "/b", &h("authorization", "Bearer x")).await;
    get(&layer, "/a", &h("cache-control", "no-cache")).await;
    for path in [
        "/status",
        "/big",
        "/set-cookie",
        "/private",
        "/no-store",
        "/vary-star",
    ] {
        assert_eq!(get(&layer, path, &[]).await.as_deref(), Some("MISS"));
    }

    let stats = layer.stats();
    assert_eq!(stats.route, "items");
    assert_eq!(stats.hits, 2);
    assert_eq!(stats.misses, 7);
    assert_eq!(stats.refreshes, 1);
    assert_eq!(stats.bypassed, 3);
    assert_eq!(
        (
            stats.bypass.cookie,
            stats.bypass.no_store,
            stats.bypass.authorization
        ),
        (1, 1, 1)
    );
    let n = &stats.not_stored;
    assert_eq!(
        (
            n.status,
            n.size,
            n.set_cookie,
            n.private,
            n.no_store,
            n.vary_star,
            n.authorization
        ),
        (1, 1, 1, 1, 1, 1, 1)
    );
    assert_eq!(n.pending_writes_full, 0);
    assert_eq!(stats.store_errors.total(), 0);
    // Every lookup is a store get: the 3 plain requests of /a, the request with
    // `Authorization` (a shareable stored response could serve it) and the 6 misses.
    assert_eq!(stats.store_gets.count, 10);
    // /a stored twice (the miss and the refresh).
    assert_eq!(stats.store_sets.count, 2);
    // Handler calls after a lookup: the 7 misses, the refresh and the request with
    // `Authorization` (bypasses decided before the lookup are not timed).
    assert_eq!(stats.handler_calls.count, 9);
    assert!(stats
        .counters()
        .contains(&("not_stored.vary_star".to_owned(), 1)));
}

#[tokio::test]
async fn the_other_not_stored_reasons_are_counted_exactly() {
    let layer = CacheLayer::new(MemoryStore::new());
    for path in ["/event-stream", "/bad-length"] {
        assert_eq!(get(&layer, path, &[]).await.as_deref(), Some("MISS"));
    }
    // With no route TTL, a response that gives no lifetime is not stored.
    let origin_only = CacheLayer::new(MemoryStore::new()).ttl(Duration::ZERO);
    assert_eq!(get(&origin_only, "/a", &[]).await.as_deref(), Some("MISS"));
    let n = layer.stats().not_stored;
    assert_eq!((n.event_stream, n.bad_length), (1, 1));
    assert_eq!(origin_only.stats().not_stored.no_freshness, 1);

    // A body that fails midway is incomplete.
    let failing = tower::service_fn(|_: Request<Full<Bytes>>| async {
        let chunks: Vec<Result<http_body::Frame<Bytes>, std::io::Error>> = vec![
            Ok(http_body::Frame::data(Bytes::from_static(b"part"))),
            Err(std::io::Error::other("upstream went away")),
        ];
        let body = http_body_util::StreamBody::new(futures_iter(chunks));
        Ok::<_, Infallible>(Response::new(body))
    });
    let mut service = tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service(failing);
    let response = service
        .ready()
        .await
        .unwrap()
        .call(
            Request::get("http://example.com/fails")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(response.into_body().collect().await.is_err());
    layer.flush().await;
    assert_eq!(layer.stats().not_stored.incomplete, 1);
}

/// A stream over the items of a vector.
fn futures_iter<T: Unpin>(items: Vec<T>) -> impl futures_core::Stream<Item = T> + Unpin {
    struct Iter<T>(std::vec::IntoIter<T>);
    impl<T: Unpin> futures_core::Stream for Iter<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    Iter(items.into_iter())
}

#[tokio::test]
async fn a_full_write_budget_is_counted() {
    let layer = CacheLayer::new(MemoryStore::new()).max_pending_writes(0);
    get(&layer, "/a", &[]).await;
    get(&layer, "/a", &[]).await;
    let stats = layer.stats();
    assert_eq!((stats.misses, stats.hits), (2, 0));
    assert_eq!(stats.not_stored.pending_writes_full, 2);
    assert_eq!(stats.route, "default");
}

/// A store that is always down.
struct DownStore;

fn down<'a, T: Send + 'a>() -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(Err(Error::new(
        ErrorKind::Unreachable,
        "down",
    ))))
}

impl Store for DownStore {
    fn get<'a>(&'a self, _: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        down()
    }
    fn set<'a>(&'a self, _: &'a str, _: Bytes, _: Duration) -> StoreFuture<'a, ()> {
        down()
    }
    fn delete<'a>(&'a self, _: &'a str) -> StoreFuture<'a, bool> {
        down()
    }
}

#[tokio::test]
async fn a_store_that_is_down_counts_misses_and_errors() {
    let layer = CacheLayer::new(DownStore);
    for _ in 0..3 {
        assert_eq!(get(&layer, "/a", &[]).await.as_deref(), Some("MISS"));
    }
    let stats = layer.stats();
    assert_eq!(stats.misses, 3);
    // A failed get and a failed set per request.
    assert_eq!(stats.store_errors.unreachable, 6);
    assert_eq!(stats.store_errors.total(), 6);
}

/// A Redis address nothing listens on.
fn dead_redis() -> RedisStore {
    let port = common::free_port();
    RedisStore::builder(&format!("redis://127.0.0.1:{port}"))
        // Long enough that the whole test runs inside one back-off.
        .failure_backoff(Duration::from_secs(3600))
        .build()
        .unwrap()
}

#[tokio::test]
async fn redis_down_enters_one_back_off_and_fails_fast() {
    let store = dead_redis();
    let layer = CacheLayer::new(store.clone());
    for _ in 0..3 {
        assert_eq!(get(&layer, "/a", &[]).await.as_deref(), Some("MISS"));
    }
    let stats = store.stats();
    assert_eq!(stats.backoffs, 1);
    assert_eq!(stats.errors.total(), 6);
    assert_eq!(stats.open_connections, 0);
    assert_eq!(layer.stats().store_errors.total(), 6);
    assert_eq!(layer.stats().misses, 3);
}

#[tokio::test]
async fn health_reports_the_servers_memory_and_policy() {
    let redis = common::RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    redis.cmd::<()>(&["SET", "persistent", "1"]);
    let health = store.health().await.unwrap();
    assert_eq!(health.maxmemory_policy.as_deref(), Some("allkeys-lru"));
    assert!(health.used_memory.unwrap() > 0);
    assert_eq!(health.evicted_keys, Some(0));
    assert_eq!(health.keys_without_ttl, Some(1));
    assert!(health
        .eviction_warning()
        .unwrap()
        .contains("1 keys without a TTL"));
}

#[tokio::test]
async fn headers_can_be_renamed_or_turned_off() {
    let run = |layer: CacheLayer| async move {
        let mut service = tower::ServiceBuilder::new()
            .layer(layer)
            .service_fn(handler);
        let req = Request::get("http://example.com/a")
            .body(Full::default())
            .unwrap();
        let response = service.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.headers().clone()
    };
    let base = CacheLayer::new(MemoryStore::new());
    let headers = run(base.clone()).await;
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(headers["cache-status"], "tower-redis-cache; fwd=uri-miss");

    let headers = run(base
        .clone()
        .x_cache_header(Some(http::HeaderName::from_static("x-edge-cache")))
        .cache_status(Some("edge")))
    .await;
    assert!(!headers.contains_key("x-cache"));
    assert_eq!(headers["x-edge-cache"], "MISS");
    assert_eq!(headers["cache-status"], "edge; fwd=uri-miss");

    let headers = run(base.clone().x_cache_header(None).cache_status(None)).await;
    assert!(!headers.contains_key("x-cache"));
    assert!(!headers.contains_key("cache-status"));

    let headers = run(base.cache_status(Some("my cache"))).await;
    assert_eq!(headers["cache-status"], "\"my cache\"; fwd=uri-miss");
}

/// A subscriber keeping the warn (and error) lines, formatted as `message field=value ...`.
#[derive(Clone, Default)]
struct WarnLines(Arc<Mutex<Vec<String>>>);

struct Line<'a>(&'a mut String);

impl tracing::field::Visit for Line<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl tracing::Subscriber for WarnLines {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = String::new();
        event.record(&mut Line(&mut line));
        self.0.lock().unwrap().push(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl WarnLines {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Runs `test` on a current-thread runtime with paused time, under `lines`.
fn with_warn_lines<F: std::future::Future>(lines: &WarnLines, test: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::subscriber::with_default(lines.clone(), || runtime.block_on(test))
}

#[test]
fn a_thousand_failed_store_calls_in_a_second_log_a_bounded_number_of_lines() {
    let lines = WarnLines::default();
    let layer = CacheLayer::new(DownStore);
    with_warn_lines(&lines, async {
        for _ in 0..500 {
            // A get and a set fail per request: 1,000 failed store calls in 1 s.
            get(&layer, "/a", &[]).await;
            tokio::time::advance(Duration::from_millis(2)).await;
        }
    });
    assert_eq!(layer.stats().store_errors.unreachable, 1000);
    let logged = lines.lines();
    assert_eq!(logged.len(), 1, "{logged:#?}");
    assert!(logged[0].contains("suppressed=0"), "{}", logged[0]);

    // After the interval, the next failure logs one line counting those held back.
    with_warn_lines(&lines, async {
        tokio::time::advance(Duration::from_secs(5)).await;
        get(&layer, "/a", &[]).await;
    });
    let logged = lines.lines();
    assert_eq!(logged.len(), 2, "{logged:#?}");
    assert!(logged[1].contains("suppressed=999"), "{}", logged[1]);
}

#[test]
fn a_thousand_failed_client_calls_in_a_second_log_a_bounded_number_of_lines() {
    let lines = WarnLines::default();
    let store = dead_redis();
    let cache = RedisCache::from_store(&store).lock_across_instances(false);
    with_warn_lines(&lines, async {
        for i in 0..1000 {
            let value: u32 = cache
                .get_or_insert_with("k", Duration::from_secs(60), || async { Ok::<_, Error>(i) })
                .await
                .unwrap();
            assert_eq!(value, i);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
    });
    assert_eq!(store.stats().backoffs, 1);
    let logged = lines.lines();
    // One line per cause: the store's back-off, the failed lookup, the failed write.
    assert_eq!(logged.len(), 3, "{logged:#?}");
}
