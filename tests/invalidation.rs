//! Invalidation reaches every entry of a URL: `Vary` variants, entries keyed on cookies, on a
//! key function and on forwarded information, through an unsafe method and through
//! `Invalidator::invalidate` (absolute and relative URLs), on every store: MemoryStore,
//! RedisStore on one server and on a Cluster, and two tiers.

mod common;

use std::sync::Arc;

use axum::http::{HeaderMap, Method};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use common::backend::Backend;
use common::{send, serve, Counter, Reply};
use tower_redis_cache::{CacheLayer, MemoryStore, Store};

backend_cases!(
    a_write_drops_the_url_for_every_signed_in_user,
    the_invalidator_drops_every_variant_of_a_url,
    a_relative_url_is_dropped_on_every_host,
);

/// Every case above on one cluster.
#[cfg(feature = "cluster")]
#[test]
fn every_case_on_a_cluster() {
    common::backend::run_on_cluster(&[CASES]);
}

async fn a_write_drops_the_url_for_every_signed_in_user(backend: &Backend) {
    signed_in_users(Arc::new(backend.store().await)).await;
}

async fn the_invalidator_drops_every_variant_of_a_url(backend: &Backend) {
    every_variant(Arc::new(backend.store().await)).await;
}

async fn a_relative_url_is_dropped_on_every_host(backend: &Backend) {
    relative_urls(Arc::new(backend.store().await)).await;
}

#[tokio::test]
async fn on_the_memory_store() {
    signed_in_users(Arc::new(MemoryStore::new())).await;
    every_variant(Arc::new(MemoryStore::new())).await;
    relative_urls(Arc::new(MemoryStore::new())).await;
}

#[cfg(feature = "tiered")]
#[tokio::test]
async fn on_two_tiers() {
    use std::time::Duration;
    use tower_redis_cache::{RedisStore, TieredStore};
    let redis = common::RedisServer::start();
    let tiered = || async {
        let l2 = RedisStore::builder(&redis.url())
            .operation_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap();
        let store = TieredStore::builder(l2)
            .l1_ttl(Duration::from_secs(60))
            .invalidations(&redis.url(), "trc:invalidations")
            .connect()
            .await
            .unwrap();
        Arc::new(store) as Arc<dyn Store>
    };
    signed_in_users(tiered().await).await;
    every_variant(tiered().await).await;
    relative_urls(tiered().await).await;
}

fn header(headers: &HeaderMap, name: &str) -> String {
    let value = headers.get(name).and_then(|v| v.to_str().ok());
    value.unwrap_or("-").to_owned()
}

/// GETs `path` with `headers` once through `layer`, waits for its background write, and
/// returns the answer.
async fn get_page(
    layer: &CacheLayer,
    addr: std::net::SocketAddr,
    headers: &[(&str, &str)],
) -> Reply {
    let reply = send(addr, Method::GET, "/page", headers).await;
    layer.flush().await;
    reply
}

/// The test: a signed-in page keyed on a session cookie for three users, one POST,
/// three misses.
async fn signed_in_users(store: Arc<dyn Store>) {
    let calls = Counter::default();
    let layer = CacheLayer::with_shared_store(store).key_on_cookies(["session"]);
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/page",
            get(move |headers: HeaderMap| {
                counted.bump();
                async move { format!("page for {}", header(&headers, "cookie")) }
            })
            .post(|| async { "saved" }),
        )
        .layer(layer.clone());
    let addr = serve(app).await;
    let users = ["session=ann", "session=bob", "session=cy"];
    for user in users {
        assert_eq!(
            get_page(&layer, addr, &[("cookie", user)]).await.x_cache(),
            Some("MISS")
        );
        let hit = get_page(&layer, addr, &[("cookie", user)]).await;
        assert_eq!(
            (hit.x_cache(), hit.text()),
            (Some("HIT"), &*format!("page for {user}"))
        );
    }
    assert_eq!(calls.get(), 3);
    let post = send(addr, Method::POST, "/page", &[("cookie", users[0])]).await;
    assert_eq!(post.text(), "saved");
    for user in users {
        let reply = get_page(&layer, addr, &[("cookie", user)]).await;
        assert_eq!(
            reply.x_cache(),
            Some("MISS"),
            "{user}'s entry outlived the POST"
        );
        assert_eq!(reply.text(), format!("page for {user}"));
    }
    assert_eq!(calls.get(), 6);
}

/// One URL stored under five keys: two `Vary: Accept-Language` variants, a key function's
/// tenant, a forwarded host, and (after it) the plain one. One `invalidate` drops them all,
/// and a variant dropped with its marker does not come back when the marker is written again.
async fn every_variant(store: Arc<dyn Store>) {
    let calls = Counter::default();
    let layer = CacheLayer::with_shared_store(store)
        .key_fn(|parts| Some(header(&parts.headers, "x-tenant")));
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/page",
            get(move |headers: HeaderMap| {
                let n = counted.bump();
                async move {
                    let page = format!(
                        "lang {} tenant {} host {} #{n}",
                        header(&headers, "accept-language"),
                        header(&headers, "x-tenant"),
                        header(&headers, "x-forwarded-host"),
                    );
                    ([("vary", "accept-language")], page).into_response()
                }
            }),
        )
        .layer(layer.clone());
    let addr = serve(app).await;
    let host = addr.to_string();
    let variants: [&[(&str, &str)]; 5] = [
        &[("accept-language", "en")],
        &[("accept-language", "fr")],
        &[("x-tenant", "acme")],
        &[("x-forwarded-host", "shop.example")],
        &[],
    ];
    for headers in variants {
        assert_eq!(
            get_page(&layer, addr, headers).await.x_cache(),
            Some("MISS"),
            "{headers:?}"
        );
        assert_eq!(
            get_page(&layer, addr, headers).await.x_cache(),
            Some("HIT"),
            "{headers:?}"
        );
    }
    let invalidator = layer.invalidator();
    let url = format!("http://{host}/page").parse().unwrap();
    assert!(invalidator.invalidate(&url).await.unwrap());
    // `en` first: it writes the `Vary` marker again, which must not lead `fr` to its old copy.
    for headers in variants {
        let reply = get_page(&layer, addr, headers).await;
        assert_eq!(
            reply.x_cache(),
            Some("MISS"),
            "{headers:?} outlived the invalidation"
        );
    }
    assert_eq!(calls.get(), 10);
    assert!(
        !invalidator
            .invalidate(&"http://elsewhere.example/page".parse().unwrap())
            .await
            .unwrap(),
        "another host's URL names none of these entries"
    );
    assert_eq!(
        get_page(&layer, addr, variants[2]).await.x_cache(),
        Some("HIT")
    );
}

/// With host keying on, `invalidate("/page")` drops the page on every host this layer
/// stored it for; another instance's invalidator reaches the hosts it is given.
async fn relative_urls(store: Arc<dyn Store>) {
    let layer = CacheLayer::with_shared_store(store.clone());
    let app = Router::new()
        .route(
            "/page",
            get(|headers: HeaderMap| async move { format!("host {}", header(&headers, "host")) }),
        )
        .layer(layer.clone());
    let addr = serve(app).await;
    let hosts = ["a.example", "b.example:8080"];
    for host in hosts {
        get_page(&layer, addr, &[("host", host)]).await;
        assert_eq!(
            get_page(&layer, addr, &[("host", host)]).await.x_cache(),
            Some("HIT")
        );
    }
    let relative = "/page".parse().unwrap();
    assert!(layer.invalidator().invalidate(&relative).await.unwrap());
    for host in hosts {
        let reply = get_page(&layer, addr, &[("host", host)]).await;
        assert_eq!(reply.x_cache(), Some("MISS"), "{host}");
        assert_eq!(reply.text(), format!("host {host}"));
    }
    // Another instance's layer on the same store has served no host yet.
    let other = CacheLayer::with_shared_store(store).invalidator();
    assert!(!other.invalidate(&relative).await.unwrap());
    assert_eq!(
        get_page(&layer, addr, &[("host", hosts[0])])
            .await
            .x_cache(),
        Some("HIT")
    );
    assert!(other
        .hosts(["A.example"])
        .invalidate(&relative)
        .await
        .unwrap());
    assert_eq!(
        get_page(&layer, addr, &[("host", hosts[0])])
            .await
            .x_cache(),
        Some("MISS")
    );
    assert_eq!(
        get_page(&layer, addr, &[("host", hosts[1])])
            .await
            .x_cache(),
        Some("HIT")
    );
}
