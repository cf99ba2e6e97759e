//! The stores: RedisStore's contract (on single Redis and, with feature `cluster`, on a
//! cluster), its errors and fail-open behaviour (Redis killed, hung, unreachable, restarted),
//! MemoryStore's TTL and bounds.

mod common;

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::backend::Backend;
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
        .build()
        .unwrap()
}

/// A guard against a request that hangs while Redis misbehaves (the failure mode observed
/// elsewhere: 19-30 s). The latency the cache adds is bounded by the 100 ms operation timeout;
/// the guard sits far enough above it that a loaded 2-core machine cannot trip it.
const BOUND: Duration = Duration::from_secs(5);

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

// The cases on both backends (the tests that need one redis-server process of their own are
// below, and listed at the cluster test).
backend_cases!(
    redis_store_round_trips_bytes_with_ttl_and_deletes,
    a_zero_ttl_means_do_not_keep_in_every_store,
    redis_store_locks_have_one_owner_until_released,
    a_redis_store_has_no_memo_slot,
);

/// Every case above on one cluster. Not run there, because each is about one redis-server
/// process or none: `scripts_run_by_hash_and_are_sent_again_after_script_flush` (`SCRIPT
/// FLUSH` and the script-load counts of one server), `redis_killed_...` (kill and restart),
/// `redis_hung_...` (SIGSTOP), `redis_unreachable_from_the_start_...` and the error tests
/// (no server), and the MemoryStore tests.
#[cfg(feature = "cluster")]
#[test]
fn every_case_on_a_cluster() {
    common::backend::run_on_cluster(&[CASES]);
}

async fn redis_store_round_trips_bytes_with_ttl_and_deletes(backend: &Backend) {
    let store = backend.store().await;
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

/// Lua scripts go out once and then run by hash; a server that lost them (a restart, `SCRIPT
/// FLUSH`) gets them again.
#[tokio::test]
async fn scripts_run_by_hash_and_are_sent_again_after_script_flush() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    let cache = tower_redis_cache::RedisCache::from_store(&store);
    let tags = ["t:a".to_owned()];
    for round in 0..2 {
        for i in 0..5 {
            store
                .set_tagged(
                    &format!("k{i}"),
                    Bytes::from_static(b"v"),
                    Duration::from_secs(60),
                    &tags,
                )
                .await
                .unwrap();
            assert!(store
                .try_lock("lock", "me", Duration::from_secs(5))
                .await
                .unwrap());
            store.unlock("lock", "me").await.unwrap();
            cache
                .set_tagged("c", &i, Duration::from_secs(60), &["t"])
                .await
                .unwrap();
            let v: i32 = cache
                .get_or_insert_with(&format!("g{round}{i}"), Duration::from_secs(60), || async {
                    Ok::<_, tower_redis_cache::Error>(7)
                })
                .await
                .unwrap();
            assert_eq!(v, 7);
        }
        let stats: String = redis.cmd(&["INFO", "commandstats"]);
        assert!(
            !stats.contains("cmdstat_eval:"),
            "a script was sent with EVAL: {stats}"
        );
        let loads = stats
            .lines()
            .find(|l| l.starts_with("cmdstat_script|load:"))
            .unwrap_or_else(|| panic!("no SCRIPT LOAD: {stats}"));
        assert!(
            // The tagged write and the lock release (the client shares both).
            loads.starts_with("cmdstat_script|load:calls=2,"),
            "each script loaded once: {loads}"
        );
        redis.cmd::<()>(&["SCRIPT", "FLUSH"]);
        redis.cmd::<()>(&["CONFIG", "RESETSTAT"]);
    }
    assert_eq!(store.invalidate_tag("t:a").await.unwrap(), 5);
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

/// A store of the user's own that implements only the required methods.
struct PlainStore(MemoryStore);

impl Store for PlainStore {
    fn get<'a>(&'a self, key: &'a str) -> tower_redis_cache::store::StoreFuture<'a, Option<Bytes>> {
        self.0.get(key)
    }

    fn set<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> tower_redis_cache::store::StoreFuture<'a, ()> {
        self.0.set(key, value, ttl)
    }

    fn delete<'a>(&'a self, key: &'a str) -> tower_redis_cache::store::StoreFuture<'a, bool> {
        self.0.delete(key)
    }
}

#[tokio::test]
async fn store_methods_a_store_cannot_honour_say_so() {
    let store = PlainStore(MemoryStore::new());
    let tags = ["t".to_owned()];
    let v = || Bytes::from_static(b"v");
    let unsupported = |e: tower_redis_cache::Error| assert_eq!(e.kind(), ErrorKind::Unsupported);
    unsupported(
        store
            .set_tagged("k", v(), Duration::from_secs(5), &tags)
            .await
            .unwrap_err(),
    );
    assert_eq!(store.get("k").await.unwrap(), None, "no half-done write");
    store
        .set_tagged("k", v(), Duration::from_secs(5), &[])
        .await
        .unwrap();
    assert_eq!(
        store.get("k").await.unwrap(),
        Some(v()),
        "without tags it is a set"
    );
    unsupported(store.invalidate_tag("t").await.unwrap_err());
    unsupported(
        store
            .try_lock("l", "me", Duration::from_secs(1))
            .await
            .unwrap_err(),
    );
    unsupported(store.unlock("l", "me").await.unwrap_err());
}

async fn a_zero_ttl_means_do_not_keep_in_every_store(backend: &Backend) {
    let stores: [(&str, Box<dyn Store>); 2] = [
        ("memory", Box::new(MemoryStore::new())),
        (backend.name(), Box::new(backend.store().await)),
    ];
    for (name, store) in stores {
        let v = Bytes::from_static(b"old");
        store
            .set("k", v.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        store
            .set("k", Bytes::from_static(b"new"), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(store.get("k").await.unwrap(), None, "{name}");
        let tags = ["tag".to_owned()];
        store
            .set_tagged("t", v, Duration::ZERO, &tags)
            .await
            .unwrap();
        assert_eq!(store.get("t").await.unwrap(), None, "{name}");
    }
}

/// Locks: one owner until released; a stranger's release leaves the lock alone.
async fn redis_store_locks_have_one_owner_until_released(backend: &Backend) {
    let store = backend.store().await;
    let ttl = Duration::from_secs(5);
    assert!(store.try_lock("p:abc:lock", "a", ttl).await.unwrap());
    assert!(!store.try_lock("p:abc:lock", "b", ttl).await.unwrap());
    store.unlock("p:abc:lock", "b").await.unwrap();
    assert!(!store.try_lock("p:abc:lock", "b", ttl).await.unwrap());
    store.unlock("p:abc:lock", "a").await.unwrap();
    assert!(store.try_lock("p:abc:lock", "b", ttl).await.unwrap());
    store.unlock("p:abc:lock", "b").await.unwrap();
    assert_eq!(backend.dbsize(), 0, "a released lock leaves no key");
}

#[tokio::test]
async fn memory_store_locks_have_one_owner_until_released_or_expired() {
    let store = MemoryStore::new();
    let ttl = Duration::from_secs(60);
    assert!(store.try_lock("l", "a", ttl).await.unwrap());
    assert!(!store.try_lock("l", "b", ttl).await.unwrap());
    store.unlock("l", "b").await.unwrap(); // not the owner: no effect
    assert!(!store.try_lock("l", "b", ttl).await.unwrap());
    store.unlock("l", "a").await.unwrap();
    assert!(store.try_lock("l", "b", Duration::ZERO).await.unwrap());
    // A lock of zero TTL has already expired.
    assert!(store.try_lock("l", "c", ttl).await.unwrap());
}

#[tokio::test]
async fn errors_print_their_cause_once() {
    use std::error::Error as _;
    let err = RedisStore::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    let source = err.source().expect("the cause is kept").to_string();
    assert!(!err.to_string().contains(&source), "{err} repeats {source}");
}

#[tokio::test]
async fn memory_store_keeps_a_memo_slot_per_value() {
    use std::sync::Arc;
    let store = MemoryStore::new();
    let ttl = Duration::from_secs(60);
    store
        .set("k", Bytes::from_static(b"v1"), ttl)
        .await
        .unwrap();
    let (bytes, memo) = store.get_memoized("k").await.unwrap().unwrap();
    let memo = memo.expect("an in-process store has a memo slot");
    assert_eq!(bytes, Bytes::from_static(b"v1"));
    assert!(memo.get().is_none(), "a new value's slot is empty");
    memo.set(Arc::new(42u32)).unwrap();
    let (_, again) = store.get_memoized("k").await.unwrap().unwrap();
    let again = again.unwrap();
    assert_eq!(
        again.get().unwrap().downcast_ref::<u32>(),
        Some(&42),
        "the same slot"
    );
    store
        .set("k", Bytes::from_static(b"v2"), ttl)
        .await
        .unwrap();
    let (bytes, fresh) = store.get_memoized("k").await.unwrap().unwrap();
    assert_eq!(bytes, Bytes::from_static(b"v2"));
    assert!(
        fresh.unwrap().get().is_none(),
        "a replaced value starts with an empty slot"
    );
    // Read without waiting: the same value and the same slot, and an absent key is known
    // absent (not "ask again with I/O").
    let (bytes, now) = store.get_in_process("k").unwrap().unwrap();
    assert_eq!(bytes, Bytes::from_static(b"v2"));
    now.unwrap().set(Arc::new(7u32)).unwrap();
    let (_, slot) = store.get_memoized("k").await.unwrap().unwrap();
    assert_eq!(slot.unwrap().get().unwrap().downcast_ref::<u32>(), Some(&7));
    assert!(store.get_in_process("absent").unwrap().is_none());
}

async fn a_redis_store_has_no_memo_slot(backend: &Backend) {
    let redis_store = backend.store().await;
    let ttl = Duration::from_secs(60);
    redis_store
        .set("k", Bytes::from_static(b"v"), ttl)
        .await
        .unwrap();
    let (_, memo) = redis_store.get_memoized("k").await.unwrap().unwrap();
    assert!(memo.is_none(), "a store that serialises values has no slot");
    assert!(
        redis_store.get_in_process("k").is_none(),
        "a Redis read needs I/O"
    );
}
