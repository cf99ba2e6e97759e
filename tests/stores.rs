//! The stores: RedisStore's errors and fail-open behaviour (Redis killed, hung, unreachable,
//! restarted), MemoryStore's TTL and bounds.

mod common;

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::{advance_clock, fetch, get_until_hit, serve, Counter, RedisServer};
use tower_redis_cache::{CacheLayer, ErrorKind, MemoryStore, RedisStore, Store};

fn app(layer: CacheLayer, calls: Counter) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(move || {
                let n = calls.bump();
                async move { format!("fresh #{n}") }
            }),
        )
        .layer(layer)
}

/// A store with a short operation timeout, so a test of a dead Redis stays quick.
fn lazy_store(url: &str) -> RedisStore {
    RedisStore::builder(url)
        .operation_timeout(Duration::from_millis(100))
        .connection_timeout(Duration::from_millis(100))
        .build_lazy()
        .unwrap()
}

/// Upper bound on the latency the cache may add while Redis misbehaves: the operation
/// timeout for the lookup (the store write is off the response path), plus slack for a
/// loaded 2-core CI machine. Without the bound the failure mode observed elsewhere is 19-30 s.
const BOUND: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn errors_name_their_kind() {
    let err = RedisStore::connect("http://not-redis").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{err}");
    let err = RedisStore::connect("redis://user:secret@127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");
    assert!(
        !format!("{err}").contains("secret"),
        "the password leaked into {err}"
    );
}

#[tokio::test]
async fn redis_store_round_trips_bytes_with_ttl_and_deletes() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    let value = Bytes::from_static(b"\x00\xffbinary\r\n");
    store
        .set("k", value.clone(), Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(value));
    assert!(store.delete("k").await.unwrap());
    assert!(!store.delete("k").await.unwrap());
    store
        .set("k2", Bytes::from_static(b"v"), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.get("k2").await.unwrap(), None, "expired");
}

#[tokio::test]
async fn redis_killed_requests_still_served_and_caching_resumes_after_restart() {
    let mut redis = RedisServer::start();
    let calls = Counter::default();
    let layer = CacheLayer::new(lazy_store(&redis.url()));
    let addr = serve(app(layer.clone(), calls.clone())).await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;

    redis.kill();
    for i in 0..20 {
        let started = Instant::now();
        let reply = fetch(addr, &format!("/items/{}", i % 3)).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.x_cache(), Some("MISS"));
        assert!(reply.text().starts_with("fresh #"));
        assert!(
            started.elapsed() < BOUND,
            "request {i} took {:?}",
            started.elapsed()
        );
    }

    redis.restart();
    // Caching resumes without restarting the app: dead connections are replaced.
    assert_caching_resumes(&layer, addr, "/items/7", "Redis restarted").await;
}

#[tokio::test]
async fn redis_hung_adds_at_most_the_operation_timeout() {
    let redis = RedisServer::start();
    let calls = Counter::default();
    let layer = CacheLayer::new(lazy_store(&redis.url()));
    let addr = serve(app(layer.clone(), calls.clone())).await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;

    redis.pause();
    for i in 0..10 {
        let started = Instant::now();
        let reply = fetch(addr, &format!("/items/{i}")).await;
        assert_eq!(reply.status, 200, "the handler's response, not a 5xx");
        assert!(reply.text().starts_with("fresh #"));
        assert!(
            started.elapsed() < BOUND,
            "request {i} took {:?} with Redis hung",
            started.elapsed()
        );
    }
    redis.resume();
    assert_caching_resumes(&layer, addr, "/items/8", "Redis resumed").await;
}

/// Within 10 s of Redis coming back, a GET of `path` is stored and then served as a HIT.
async fn assert_caching_resumes(
    layer: &CacheLayer,
    addr: std::net::SocketAddr,
    path: &str,
    after: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        fetch(addr, path).await;
        layer.flush().await;
        if fetch(addr, path).await.x_cache() == Some("HIT") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "caching never resumed after {after}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await; // poll, while reconnecting
    }
}

#[tokio::test]
async fn redis_unreachable_from_the_start_serves_every_request() {
    let calls = Counter::default();
    // Port 1 on loopback: connection refused.
    let addr = serve(app(
        CacheLayer::new(lazy_store("redis://127.0.0.1:1")),
        calls.clone(),
    ))
    .await;
    for i in 0..10 {
        let started = Instant::now();
        let reply = fetch(addr, "/items/1").await;
        assert_eq!(
            (reply.status.as_u16(), reply.x_cache()),
            (200, Some("MISS"))
        );
        assert_eq!(reply.text(), format!("fresh #{}", i + 1));
        assert!(started.elapsed() < BOUND);
    }
}

#[tokio::test]
async fn memory_store_serves_the_layer_and_honours_ttl() {
    let calls = Counter::default();
    let layer = CacheLayer::new(MemoryStore::new()).ttl(Duration::from_secs(1));
    let addr = serve(app(layer, calls.clone())).await;
    assert_eq!(fetch(addr, "/items/1").await.x_cache(), Some("MISS"));
    let hit = get_until_hit(addr, "/items/1", &[]).await;
    assert_eq!(hit.text(), "fresh #1");
    // moka still holds the entry (it expires on its own clock); the cache judges it expired.
    advance_clock(Duration::from_millis(1200)).await;
    let expired = fetch(addr, "/items/1").await;
    assert_eq!(
        (expired.x_cache(), expired.text()),
        (Some("MISS"), "fresh #2")
    );
}

#[tokio::test]
async fn memory_store_is_bounded_by_entries_and_by_bytes() {
    let by_entries = MemoryStore::builder().max_entries(100).build();
    for i in 0..1000 {
        by_entries
            .set(
                &format!("k{i}"),
                Bytes::from_static(b"v"),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    assert!(
        by_entries.entry_count() <= 100,
        "{} entries",
        by_entries.entry_count()
    );

    let by_bytes = MemoryStore::builder().max_bytes(64 * 1024).build();
    for i in 0..1000 {
        by_bytes
            .set(
                &format!("k{i}"),
                Bytes::from(vec![0u8; 1024]),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    assert!(
        by_bytes.entry_count() <= 64,
        "{} entries of 1 KiB in 64 KiB",
        by_bytes.entry_count()
    );

    let both = MemoryStore::builder()
        .max_entries(10)
        .max_bytes(1024 * 1024)
        .build();
    for i in 0..100 {
        both.set(
            &format!("k{i}"),
            Bytes::from_static(b"small"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    }
    assert!(
        both.entry_count() <= 10,
        "{} entries with max 10",
        both.entry_count()
    );
}

#[tokio::test]
async fn memory_store_round_trips_and_deletes() {
    let store = MemoryStore::new();
    store
        .set("k", Bytes::from_static(b"v"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        store.get("k").await.unwrap(),
        Some(Bytes::from_static(b"v"))
    );
    assert!(store.delete("k").await.unwrap());
    assert_eq!(store.get("k").await.unwrap(), None);
}
