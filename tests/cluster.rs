//! What is particular to a Redis Cluster (feature `cluster`), on a private 3-primary cluster
//! with one replica each: entries spread over every primary, tag invalidation exact across
//! slots, and a primary killed under load. The store, layer, client and lock suites
//! (`stores.rs`, `layer.rs`, `client.rs`, `stampede.rs`) run on a cluster too, each in its
//! `every_case_on_a_cluster` test.
#![cfg(feature = "cluster")]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::cluster::RedisCluster;
use common::{fetch, get_until_hit, http_key, serve, Counter};
use tower_redis_cache::{CacheLayer, RedisStore, Store};

async fn cluster_store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::builder_cluster(cluster.urls())
        .build()
        .await
        .expect("connect to the cluster")
}

/// The handler's body for an item: what every answer must carry, hit or miss.
fn item_body(id: &str) -> String {
    format!("item {id}")
}

fn app(layer: CacheLayer, calls: Counter) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(move |Path(id): Path<String>| {
                calls.bump();
                async move { item_body(&id) }
            }),
        )
        .layer(layer)
}

/// One cluster for both checks (starting one costs ~1-2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_entries_reach_every_primary() {
    let cluster = RedisCluster::start();
    let store = cluster_store(&cluster).await;
    tags_are_exact_across_slots(&cluster, &store).await;
    layer_spreads_entries_over_every_primary(&cluster, &store).await;
}

/// Keys of one tag live in many slots (on every primary); invalidating the tag removes
/// exactly them, not their untagged neighbours nor another tag's keys.
async fn tags_are_exact_across_slots(cluster: &RedisCluster, store: &RedisStore) {
    let ttl = Duration::from_secs(60);
    let red = ["t:__tag:red".to_owned()];
    let both = ["t:__tag:red".to_owned(), "t:__tag:blue".to_owned()];
    let blue = ["t:__tag:blue".to_owned()];
    let mut primaries_hit = std::collections::BTreeSet::new();
    for i in 0..60 {
        let key = format!("t:{i}");
        let tags: &[String] = match i % 3 {
            0 => &red,
            1 => &both,
            _ => &blue,
        };
        store
            .set_tagged(&key, Bytes::from(key.clone()), ttl, tags)
            .await
            .unwrap();
        store
            .set(&format!("u:{i}"), Bytes::from_static(b"untagged"), ttl)
            .await
            .unwrap();
        if i % 3 != 2 {
            primaries_hit.insert(cluster.primary_of(&key));
        }
    }
    assert_eq!(primaries_hit.len(), 3, "the red keys live on every primary");
    assert_eq!(store.invalidate_tag("t:__tag:red").await.unwrap(), 40);
    for i in 0..60 {
        let tagged = store.get(&format!("t:{i}")).await.unwrap();
        assert_eq!(tagged.is_some(), i % 3 == 2, "t:{i}");
        assert!(store.get(&format!("u:{i}")).await.unwrap().is_some());
    }
    // The blue set still names the removed keys of both tags; they are gone already.
    assert_eq!(store.invalidate_tag("t:__tag:blue").await.unwrap(), 20);
    assert_eq!(store.invalidate_tag("t:__tag:red").await.unwrap(), 0);
}

async fn layer_spreads_entries_over_every_primary(cluster: &RedisCluster, store: &RedisStore) {
    let calls = Counter::default();
    let layer = CacheLayer::new(store.clone());
    let addr = serve(app(layer, calls.clone())).await;
    let first = fetch(addr, "/items/0").await;
    assert_eq!(first.x_cache(), Some("MISS"));
    let hit = get_until_hit(addr, "/items/0", &[]).await;
    assert_eq!(hit.text(), item_body("0"));
    for i in 1..30 {
        fetch(addr, &format!("/items/{i}")).await;
    }
    for i in 0..30 {
        let reply = get_until_hit(addr, &format!("/items/{i}"), &[]).await;
        assert_eq!(reply.text(), item_body(&i.to_string()));
    }
    assert_eq!(calls.get(), 30, "one handler call per path");
    let mut per_primary = std::collections::BTreeMap::new();
    for i in 0..30 {
        let key = http_key(addr, "GET", &format!("/items/{i}"));
        *per_primary.entry(cluster.primary_of(&key)).or_insert(0) += 1;
    }
    assert_eq!(
        per_primary.len(),
        3,
        "entries on every primary: {per_primary:?}"
    );
    for primary in cluster.primaries() {
        let keys: usize = cluster.node(primary).dbsize();
        assert!(keys > 0, "primary {primary} holds no keys");
    }
}

/// A primary is killed while requests run: every request is answered with the handler's
/// body (misses meanwhile), and after the replica took over, entries are cached again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_fails_no_request_and_caching_resumes() {
    let mut cluster = RedisCluster::start();
    let store = cluster_store(&cluster).await;
    let calls = Counter::default();
    let addr = serve(app(CacheLayer::new(store), calls.clone())).await;
    const PATHS: usize = 30;
    for i in 0..PATHS {
        fetch(addr, &format!("/items/{i}")).await;
    }
    for i in 0..PATHS {
        get_until_hit(addr, &format!("/items/{i}"), &[]).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut answered, mut misses, mut slowest) = (0usize, 0usize, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let id = (answered % PATHS).to_string();
                let started = Instant::now();
                let reply = fetch(addr, &format!("/items/{id}")).await;
                slowest = slowest.max(started.elapsed());
                assert_eq!(reply.status, 200, "request {answered}");
                assert_eq!(reply.text(), item_body(&id), "request {answered}");
                misses += usize::from(reply.x_cache() != Some("HIT"));
                answered += 1;
            }
            (answered, misses, slowest)
        }
    });

    let victim_key = http_key(addr, "GET", "/items/0");
    let victim = cluster.primary_of(&victim_key);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed = Instant::now();
    cluster.kill(victim);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_until_ok(Duration::from_secs(10));
        cluster
    })
    .await
    .unwrap();
    let failed_over = killed.elapsed();
    assert_ne!(cluster.primary_of(&victim_key), victim);

    // Caching resumes on the failed slots: a new entry there is stored and hit.
    let resumed_path = (PATHS..PATHS + 200)
        .map(|i| format!("/items/{i}"))
        .find(|p| cluster.primary_of(&http_key(addr, "GET", p)) == cluster.primary_of(&victim_key))
        .expect("a path in one of the failed-over slots");
    fetch(addr, &resumed_path).await;
    get_until_hit(addr, &resumed_path, &[]).await;
    let resumed = killed.elapsed();
    get_until_hit(addr, "/items/0", &[]).await;

    stop.store(true, Ordering::Relaxed);
    let (answered, misses, slowest) = load.await.expect("every request answered 200");
    println!(
        "failover: cluster ok again after {failed_over:?}, caching resumed after {resumed:?}; \
         {answered} requests under load, all 200, {misses} misses, slowest {slowest:?}"
    );
    assert!(answered > 0);
}
