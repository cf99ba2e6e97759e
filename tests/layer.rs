//! The layer's behaviour (README's builder table and docs/http-caching.md), row by row, through
//! real HTTP (axum/hyper) against a private redis-server and, with feature `cluster`, a private
//! Redis Cluster.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::backend::Backend;
use common::{advance_clock, fetch, get_until_hit, http_key, send, serve, Counter};
use tower_redis_cache::CacheLayer;

/// Header pairs in a table row.
type Pairs = &'static [(&'static str, &'static str)];

// Every Redis-backed row, on both backends (the one MemoryStore test is a plain test).
// Stores come from `Backend::store`, with a generous operation timeout: on a loaded CI
// machine a lookup that timed out would turn an expected HIT into a MISS.
backend_cases!(
    get_is_stored_then_replayed_as_hit_with_age_and_same_body,
    age_counts_whole_seconds_since_stored,
    entries_expire_after_the_ttl,
    with_sort_query_pairs_in_any_order_share_an_entry_and_other_queries_do_not,
    methods_outside_the_set_are_untouched_and_never_answered_from_cache,
    head_before_any_get_is_untouched_and_stores_no_empty_body,
    head_is_answered_from_a_fresh_get_entry_without_body,
    request_no_store_bypasses_and_stores_nothing,
    authorized_replies_are_never_stored_or_served_to_others,
    a_route_can_opt_in_to_caching_authorized_requests,
    client_no_cache_refreshes_the_stored_copy,
    a_route_can_ignore_client_no_cache,
    responses_that_must_not_be_shared_are_returned_but_never_stored,
    stored_status_codes_are_configurable,
    origin_max_age_and_s_maxage_set_the_ttl_unless_the_route_says_otherwise,
    multi_valued_headers_and_binary_bodies_replay_exactly,
    vary_keys_on_the_listed_request_headers,
    bodies_over_the_limit_stream_through_whole_and_are_not_stored,
    a_body_that_fails_midway_is_not_stored,
    a_body_the_client_abandoned_is_not_stored,
    two_routes_of_one_router_keep_their_own_ttl_and_methods,
    a_corrupt_entry_is_a_miss_and_is_overwritten,
    the_layer_wraps_a_plain_tower_service,
    the_inner_service_called_is_the_one_polled_ready,
    tags_from_route_and_response_headers_invalidate_exactly_their_entries,
    works_inside_and_outside_tower_http_compression,
    past_the_pending_write_limit_responses_are_served_but_not_stored,
);

/// Every case above on one cluster; all of this file's Redis-backed tests run there.
#[cfg(feature = "cluster")]
#[test]
fn every_case_on_a_cluster() {
    common::backend::run_on_cluster(&[CASES]);
}

/// `GET /items/{id}` answering `item {id} #{call}` and counting calls.
fn items_app(layer: CacheLayer, calls: Counter) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(
                move |axum::extract::Path(id): axum::extract::Path<String>| {
                    let n = calls.bump();
                    async move { format!("item {id} #{n}") }
                },
            )
            .post(|| async { "posted" }),
        )
        .layer(layer)
}

async fn get_is_stored_then_replayed_as_hit_with_age_and_same_body(backend: &Backend) {
    let calls = Counter::default();
    let addr = serve(items_app(
        CacheLayer::new(backend.store().await),
        calls.clone(),
    ))
    .await;

    let first = fetch(addr, "/items/1").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.x_cache(), Some("MISS"));
    assert_eq!(first.text(), "item 1 #1");
    assert_eq!(first.header("age"), None);

    let hit = get_until_hit(addr, "/items/1", &[]).await;
    assert_eq!(hit.text(), "item 1 #1");
    assert_eq!(hit.header("age"), Some("0"));
    assert_eq!(hit.header("content-type"), first.header("content-type"));
    assert_eq!(hit.header("content-length"), Some("9"));
    assert_eq!(calls.get(), 1, "a hit must not call the handler");
    assert_eq!(backend.dbsize(), 1);
    let key = http_key(addr, "GET", "/items/1");
    assert_eq!(
        backend.cmd::<i64>(&["EXISTS", &key]),
        1,
        "key layout {{prefix}}:{{md5}}"
    );
}

async fn age_counts_whole_seconds_since_stored(backend: &Backend) {
    let layer = CacheLayer::new(backend.store().await);
    let addr = serve(items_app(layer.clone(), Counter::default())).await;
    fetch(addr, "/items/1").await;
    layer.flush().await;
    assert_eq!(backend.dbsize(), 1);
    advance_clock(Duration::from_millis(1100)).await;
    assert_eq!(fetch(addr, "/items/1").await.header("age"), Some("1"));
}

async fn entries_expire_after_the_ttl(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await).ttl(Duration::from_secs(1));
    let addr = serve(items_app(layer, calls.clone())).await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;
    advance_clock(Duration::from_millis(1100)).await;
    let after = fetch(addr, "/items/1").await;
    assert_eq!((after.x_cache(), after.text()), (Some("MISS"), "item 1 #2"));
}

async fn with_sort_query_pairs_in_any_order_share_an_entry_and_other_queries_do_not(
    backend: &Backend,
) {
    let calls = Counter::default();
    let addr = serve(items_app(
        CacheLayer::new(backend.store().await).sort_query(true),
        calls.clone(),
    ))
    .await;
    assert_eq!(
        fetch(addr, "/items/1?a=1&b=2").await.x_cache(),
        Some("MISS")
    );
    let hit = get_until_hit(addr, "/items/1?b=2&a=1", &[]).await;
    assert_eq!(hit.text(), "item 1 #1");
    assert_eq!(
        fetch(addr, "/items/1?a=1&b=3").await.x_cache(),
        Some("MISS")
    );
    assert_eq!(
        fetch(addr, "/items/2?a=1&b=2").await.x_cache(),
        Some("MISS")
    );
}

async fn methods_outside_the_set_are_untouched_and_never_answered_from_cache(backend: &Backend) {
    let posts = Counter::default();
    let counter = posts.clone();
    let app = Router::new()
        .route(
            "/items/{id}",
            get(|| async { "got" }).post(move || {
                let n = counter.bump();
                async move { format!("posted #{n}") }
            }),
        )
        .layer(CacheLayer::new(backend.store().await));
    let addr = serve(app).await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;
    for n in 1..=2 {
        let post = send(addr, Method::POST, "/items/1", &[]).await;
        assert_eq!(
            post.text(),
            format!("posted #{n}"),
            "a POST must reach the handler"
        );
        assert_eq!(post.x_cache(), None, "untouched: no X-Cache");
    }
    assert_eq!(
        backend.dbsize(),
        0,
        "POST responses are not stored, and a successful POST drops the GET entry"
    );
    assert_eq!(fetch(addr, "/items/1").await.x_cache(), Some("MISS"));
}

async fn head_before_any_get_is_untouched_and_stores_no_empty_body(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await);
    let addr = serve(items_app(layer.clone(), calls.clone())).await;
    let head = send(addr, Method::HEAD, "/items/1", &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.x_cache(), None);
    layer.flush().await;
    assert_eq!(backend.dbsize(), 0, "a HEAD response must not be stored");
    let get1 = fetch(addr, "/items/1").await;
    assert_eq!((get1.x_cache(), get1.text()), (Some("MISS"), "item 1 #2"));
    let hit = get_until_hit(addr, "/items/1", &[]).await;
    assert_eq!(hit.text(), "item 1 #2", "the GET entry has the full body");
}

async fn head_is_answered_from_a_fresh_get_entry_without_body(backend: &Backend) {
    let calls = Counter::default();
    let addr = serve(items_app(
        CacheLayer::new(backend.store().await),
        calls.clone(),
    ))
    .await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;
    let head = send(addr, Method::HEAD, "/items/1", &[]).await;
    assert_eq!(head.x_cache(), Some("HIT"));
    assert!(head.body.is_empty());
    assert_eq!(
        head.header("content-length"),
        Some("9"),
        "HEAD announces the GET's length"
    );
    assert_eq!(calls.get(), 1);
}

async fn request_no_store_bypasses_and_stores_nothing(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await);
    let addr = serve(items_app(layer.clone(), calls.clone())).await;
    for n in 1..=2 {
        let reply = send(
            addr,
            Method::GET,
            "/items/1",
            &[("Cache-Control", "No-Store")],
        )
        .await;
        assert_eq!(
            (reply.x_cache(), reply.text()),
            (Some("BYPASS"), &*format!("item 1 #{n}"))
        );
    }
    layer.flush().await;
    assert_eq!(backend.dbsize(), 0);
}

/// Answers with the caller's identity, as a per-user endpoint would.
async fn whoami(headers: HeaderMap) -> String {
    match headers.get("authorization") {
        Some(token) => format!("private data of {}", token.to_str().unwrap()),
        None => "anonymous".to_owned(),
    }
}

async fn authorized_replies_are_never_stored_or_served_to_others(backend: &Backend) {
    let app = Router::new()
        .route("/me", get(whoami))
        .layer(CacheLayer::new(backend.store().await));
    let addr = serve(app).await;
    let alice = send(
        addr,
        Method::GET,
        "/me",
        &[("authorization", "Bearer alice")],
    )
    .await;
    assert_eq!(
        (alice.x_cache(), alice.text()),
        (Some("BYPASS"), "private data of Bearer alice")
    );
    let bob = send(addr, Method::GET, "/me", &[("Authorization", "Bearer bob")]).await;
    assert_eq!(
        (bob.x_cache(), bob.text()),
        (Some("BYPASS"), "private data of Bearer bob")
    );
    let anon = fetch(addr, "/me").await;
    assert_eq!((anon.x_cache(), anon.text()), (Some("MISS"), "anonymous"));
    get_until_hit(addr, "/me", &[]).await;
    // With an anonymous entry stored, an authorized request still bypasses it.
    let alice = send(
        addr,
        Method::GET,
        "/me",
        &[("authorization", "Bearer alice")],
    )
    .await;
    assert_eq!(alice.text(), "private data of Bearer alice");
    assert_eq!(backend.dbsize(), 1, "only the anonymous reply is stored");
}

async fn a_route_can_opt_in_to_caching_authorized_requests(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await).cache_authorized_requests(true);
    let addr = serve(items_app(layer, calls.clone())).await;
    let auth = [("authorization", "Bearer alice")];
    assert_eq!(
        send(addr, Method::GET, "/items/1", &auth).await.x_cache(),
        Some("MISS")
    );
    get_until_hit(addr, "/items/1", &auth).await;
    assert_eq!(calls.get(), 1);
}

async fn client_no_cache_refreshes_the_stored_copy(backend: &Backend) {
    let calls = Counter::default();
    let addr = serve(items_app(
        CacheLayer::new(backend.store().await),
        calls.clone(),
    ))
    .await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;
    let refresh = send(
        addr,
        Method::GET,
        "/items/1",
        &[("cache-control", "NO-CACHE")],
    )
    .await;
    assert_eq!(
        (refresh.x_cache(), refresh.text()),
        (Some("REFRESH"), "item 1 #2")
    );
    let pragma = send(addr, Method::GET, "/items/1", &[("pragma", "no-cache")]).await;
    assert_eq!(
        (pragma.x_cache(), pragma.text()),
        (Some("REFRESH"), "item 1 #3")
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let hit = get_until_hit(addr, "/items/1", &[]).await;
        if hit.text() == "item 1 #3" {
            break; // the stored copy was replaced by the refreshed response
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stored copy never replaced: {hit:?}"
        );
    }
}

async fn a_route_can_ignore_client_no_cache(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await).honor_request_no_cache(false);
    let addr = serve(items_app(layer, calls.clone())).await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;
    let reply = send(
        addr,
        Method::GET,
        "/items/1",
        &[("cache-control", "no-cache")],
    )
    .await;
    assert_eq!((reply.x_cache(), reply.text()), (Some("HIT"), "item 1 #1"));
    assert_eq!(calls.get(), 1);
}

/// A route whose handler returns the given status and headers, counting calls.
fn fixed_app(
    layer: CacheLayer,
    status: StatusCode,
    headers: &'static [(&'static str, &'static str)],
    calls: Counter,
) -> Router {
    Router::new()
        .route(
            "/r",
            get(move || {
                let n = calls.bump();
                async move {
                    let mut response = (status, format!("reply #{n}")).into_response();
                    for (name, value) in headers {
                        response.headers_mut().append(*name, value.parse().unwrap());
                    }
                    response
                }
            }),
        )
        .layer(layer)
}

/// Sends two GETs (waiting for any background write of the first) and returns the second
/// reply.
async fn twice(layer: &CacheLayer, addr: std::net::SocketAddr) -> common::Reply {
    fetch(addr, "/r").await;
    layer.flush().await;
    let second = fetch(addr, "/r").await;
    layer.flush().await;
    second
}

async fn responses_that_must_not_be_shared_are_returned_but_never_stored(backend: &Backend) {
    let cases: &[(StatusCode, &[(&str, &str)])] = &[
        (StatusCode::NOT_FOUND, &[]),
        (StatusCode::INTERNAL_SERVER_ERROR, &[]),
        (StatusCode::MOVED_PERMANENTLY, &[("location", "/elsewhere")]),
        (StatusCode::OK, &[("set-cookie", "session=alice")]),
        (StatusCode::OK, &[("cache-control", "Private, max-age=60")]),
        (StatusCode::OK, &[("cache-control", "no-store")]),
        (StatusCode::OK, &[("vary", "*")]),
        (StatusCode::OK, &[("content-type", "text/event-stream")]),
        (
            StatusCode::OK,
            &[("vary", "accept-encoding"), ("vary", "*")],
        ),
    ];
    for (status, headers) in cases {
        backend.flush();
        let calls = Counter::default();
        let layer = CacheLayer::new(backend.store().await);
        let addr = serve(fixed_app(layer.clone(), *status, headers, calls.clone())).await;
        let second = twice(&layer, addr).await;
        assert_eq!(second.status, *status);
        assert_eq!(second.x_cache(), Some("MISS"), "{status} {headers:?}");
        assert_eq!(
            second.text(),
            "reply #2",
            "{status} {headers:?} was served from cache"
        );
        assert_eq!(
            backend.dbsize_without_marks(),
            0,
            "{status} {headers:?} was stored"
        );
        assert_eq!(
            second.header("cache-status"),
            Some("tower-redis-cache; fwd=uri-miss; detail=hit-for-miss"),
            "{status} {headers:?}: the second request went straight to the handler"
        );
        if headers.iter().any(|(n, _)| *n == "set-cookie") {
            assert_eq!(
                second.header("set-cookie"),
                Some("session=alice"),
                "the handler's own cookie"
            );
        }
    }
}

async fn stored_status_codes_are_configurable(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await)
        .status_codes([StatusCode::OK, StatusCode::NOT_FOUND]);
    let addr = serve(fixed_app(layer, StatusCode::NOT_FOUND, &[], calls.clone())).await;
    fetch(addr, "/r").await;
    let hit = get_until_hit(addr, "/r", &[]).await;
    assert_eq!(
        (hit.status, hit.text()),
        (StatusCode::NOT_FOUND, "reply #1")
    );
}

async fn origin_max_age_and_s_maxage_set_the_ttl_unless_the_route_says_otherwise(
    backend: &Backend,
) {
    let cases: &[(Pairs, bool, i64)] = &[
        (&[("cache-control", "max-age=100")], true, 100),
        (&[("cache-control", "max-age=100, s-maxage=200")], true, 200),
        (&[("cache-control", "max-age=100")], false, 60),
        (&[], true, 60),
    ];
    for (headers, honor, expected) in cases {
        backend.flush();
        let layer = CacheLayer::new(backend.store().await).honor_origin_ttl(*honor);
        let addr = serve(fixed_app(
            layer,
            StatusCode::OK,
            headers,
            Counter::default(),
        ))
        .await;
        fetch(addr, "/r").await;
        backend.wait_for_keys(1).await;
        let key = http_key(addr, "GET", "/r");
        let ttl: i64 = backend.cmd(&["TTL", &key]);
        assert!(
            (expected - 2..=*expected).contains(&ttl),
            "{headers:?} honor={honor}: ttl {ttl}"
        );
    }
}

async fn multi_valued_headers_and_binary_bodies_replay_exactly(backend: &Backend) {
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff\xfe\x00";
    let app = Router::new()
        .route(
            "/logo.png",
            get(|| async {
                Response::builder()
                    .header("content-type", "image/png")
                    .header("link", "</a.css>; rel=preload")
                    .header("link", "</b.js>; rel=preload")
                    .header("x-trace", "1")
                    .body(Body::from(PNG))
                    .unwrap()
            }),
        )
        .layer(CacheLayer::new(backend.store().await));
    let addr = serve(app).await;
    let first = fetch(addr, "/logo.png").await;
    let hit = get_until_hit(addr, "/logo.png", &[]).await;
    assert_eq!(&hit.body[..], PNG);
    assert_eq!(hit.body, first.body);
    let links: Vec<_> = hit
        .headers
        .get_all("link")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(links, ["</a.css>; rel=preload", "</b.js>; rel=preload"]);
    assert_eq!(hit.header("x-trace"), Some("1"));
}

/// Gzip bytes for clients that accept gzip, identity otherwise, with `Vary: Accept-Encoding`.
async fn negotiated(headers: HeaderMap) -> Response {
    const GZIP: &[u8] = &[
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x01, 0x00,
    ];
    let accepts = headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let builder = Response::builder().header("vary", "Accept-Encoding");
    if accepts.contains("gzip") {
        builder
            .header("content-encoding", "gzip")
            .body(Body::from(GZIP))
            .unwrap()
    } else {
        builder.body(Body::from("plain text")).unwrap()
    }
}

async fn vary_keys_on_the_listed_request_headers(backend: &Backend) {
    let app = Router::new()
        .route("/asset", get(negotiated))
        .layer(CacheLayer::new(backend.store().await));
    let addr = serve(app).await;
    let gzip = [("accept-encoding", "gzip")];
    assert_eq!(
        send(addr, Method::GET, "/asset", &gzip).await.x_cache(),
        Some("MISS")
    );
    let gz_hit = get_until_hit(addr, "/asset", &gzip).await;
    assert_eq!(gz_hit.header("content-encoding"), Some("gzip"));

    let br = send(addr, Method::GET, "/asset", &[("accept-encoding", "br")]).await;
    assert_eq!(
        br.x_cache(),
        Some("MISS"),
        "a br client must not get the gzip variant"
    );
    assert_eq!(
        (br.header("content-encoding"), br.text()),
        (None, "plain text")
    );
    let br_hit = get_until_hit(addr, "/asset", &[("accept-encoding", "br")]).await;
    assert_eq!(
        (br_hit.header("content-encoding"), br_hit.text()),
        (None, "plain text")
    );
    let plain = send(addr, Method::GET, "/asset", &[]).await;
    assert_eq!(plain.header("content-encoding"), None);
    let gz_again = get_until_hit(addr, "/asset", &gzip).await;
    assert_eq!(gz_again.header("content-encoding"), Some("gzip"));
}

async fn bodies_over_the_limit_stream_through_whole_and_are_not_stored(backend: &Backend) {
    let calls = Counter::default();
    let counter = calls.clone();
    let layer = CacheLayer::new(backend.store().await).max_body_bytes(2048);
    let app = Router::new()
        .route(
            "/big",
            get(move || {
                counter.bump();
                // A streamed body of unknown length, in 64 chunks of 1 KiB.
                let chunks = (0..64u8).map(|i| Ok::<_, Infallible>(Bytes::from(vec![i; 1024])));
                async move { Body::from_stream(futures_stream(chunks)) }
            }),
        )
        .route("/big-known", get(|| async { vec![7u8; 4096] }))
        .layer(layer.clone());
    let addr = serve(app).await;
    for path in ["/big", "/big-known"] {
        let second = twice_at(&layer, addr, path).await;
        assert_eq!(second.x_cache(), Some("MISS"), "{path}");
    }
    let big = fetch(addr, "/big").await;
    assert_eq!(big.body.len(), 64 * 1024, "the client gets the whole body");
    assert!(big
        .body
        .chunks(1024)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == i as u8)));
    layer.flush().await;
    assert_eq!(calls.get(), 3);
    assert_eq!(backend.dbsize_without_marks(), 0);
}

async fn twice_at(layer: &CacheLayer, addr: std::net::SocketAddr, path: &str) -> common::Reply {
    fetch(addr, path).await;
    layer.flush().await;
    fetch(addr, path).await
}

/// A stream over an iterator, yielding between items so chunks arrive separately.
fn futures_stream<I: Iterator + Send + 'static>(
    iter: I,
) -> impl futures_core::Stream<Item = I::Item> + Send
where
    I::Item: Send,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for item in iter {
            if tx.send(item).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    tokio_stream_from(rx)
}

/// A stream that notifies when it is dropped.
struct DropSignal<S>(S, std::sync::Arc<tokio::sync::Notify>);

impl<S> Drop for DropSignal<S> {
    fn drop(&mut self) {
        self.1.notify_one();
    }
}

impl<S: futures_core::Stream + Unpin> futures_core::Stream for DropSignal<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        std::pin::Pin::new(&mut self.0).poll_next(cx)
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core::Stream<Item = T> + Send {
    struct Rx<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for Rx<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    Rx(rx)
}

async fn a_body_that_fails_midway_is_not_stored(backend: &Backend) {
    let calls = Counter::default();
    let counter = calls.clone();
    let layer = CacheLayer::new(backend.store().await);
    let app = Router::new()
        .route(
            "/flaky",
            get(move || {
                counter.bump();
                let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                    Ok(Bytes::from_static(b"first half")),
                    Err(std::io::Error::other("database went away")),
                ];
                async move { Body::from_stream(futures_stream(chunks.into_iter())) }
            }),
        )
        .layer(layer.clone());
    let addr = serve(app).await;
    for _ in 0..2 {
        let request = http::Request::get(format!("http://{addr}/flaky"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = common::client().request(request).await.unwrap();
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert!(body.is_err(), "the client sees the failure");
    }
    layer.flush().await;
    assert_eq!(calls.get(), 2);
    assert_eq!(
        backend.dbsize_without_marks(),
        0,
        "a truncated body was stored"
    );
}

async fn a_body_the_client_abandoned_is_not_stored(backend: &Backend) {
    let layer = CacheLayer::new(backend.store().await);
    // Notified when the server drops the handler's body: at once if it noticed the client
    // leave, or after the last chunk if it kept streaming (and recording) regardless.
    let dropped = std::sync::Arc::new(tokio::sync::Notify::new());
    let body_dropped = dropped.clone();
    let app = Router::new()
        .route(
            "/slow",
            get(move || {
                let body_dropped = body_dropped.clone();
                async move {
                    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1);
                    tokio::spawn(async move {
                        for _ in 0..20 {
                            if tx.send(Ok(Bytes::from_static(b"chunk "))).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    });
                    Body::from_stream(DropSignal(tokio_stream_from(rx), body_dropped))
                }
            }),
        )
        .layer(layer.clone());
    let addr = serve(app).await;
    let request = http::Request::get(format!("http://{addr}/slow"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = common::client().request(request).await.unwrap();
    assert_eq!(response.headers().get("x-cache").unwrap(), "MISS");
    let mut body = response.into_body();
    let first = http_body_util::BodyExt::frame(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), "chunk ");
    drop(body); // the client goes away mid-body
    dropped.notified().await;
    layer.flush().await;
    assert_eq!(
        backend.dbsize(),
        0,
        "a body the client abandoned was stored"
    );
}

async fn two_routes_of_one_router_keep_their_own_ttl_and_methods(backend: &Backend) {
    let store = backend.store().await;
    let base = CacheLayer::new(store);
    let short = base.clone().ttl(Duration::from_secs(10));
    let long = base
        .ttl(Duration::from_secs(300))
        .methods([Method::GET, Method::POST]);
    let app = Router::new()
        .route(
            "/short",
            get(|| async { "short" }).post(|| async { "short post" }),
        )
        .route_layer(short)
        .merge(
            Router::new()
                .route(
                    "/long",
                    get(|| async { "long" }).post(|| async { "long post" }),
                )
                .route_layer(long),
        );
    let addr = serve(app).await;
    // A POST to /short (not cached there) invalidates its GET entry, so it goes first.
    assert_eq!(
        send(addr, Method::POST, "/short", &[]).await.x_cache(),
        None
    );
    assert_eq!(
        send(addr, Method::POST, "/long", &[]).await.x_cache(),
        Some("MISS")
    );
    fetch(addr, "/short").await;
    fetch(addr, "/long").await;
    backend.wait_for_keys(3).await;
    let ttl =
        |method: &str, path: &str| -> i64 { backend.cmd(&["TTL", &http_key(addr, method, path)]) };
    assert!(
        (8..=10).contains(&ttl("GET", "/short")),
        "short ttl {}",
        ttl("GET", "/short")
    );
    assert!(
        (298..=300).contains(&ttl("GET", "/long")),
        "long ttl {}",
        ttl("GET", "/long")
    );
    assert!((298..=300).contains(&ttl("POST", "/long")));
    assert_eq!(
        backend.cmd::<i64>(&["EXISTS", &http_key(addr, "POST", "/short")]),
        0
    );
}

async fn a_corrupt_entry_is_a_miss_and_is_overwritten(backend: &Backend) {
    let calls = Counter::default();
    let addr = serve(items_app(
        CacheLayer::new(backend.store().await),
        calls.clone(),
    ))
    .await;
    let key = http_key(addr, "GET", "/items/1");
    for junk in ["not an entry", "TRC\u{1}\u{0}\u{0}", ""] {
        let _: () = backend.cmd(&["SET", &key, junk]);
        let reply = fetch(addr, "/items/1").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.x_cache(), Some("MISS"), "junk {junk:?} was served");
        let hit = get_until_hit(addr, "/items/1", &[]).await;
        assert_eq!(
            hit.text(),
            reply.text(),
            "the junk was overwritten by the response"
        );
    }
}

async fn the_layer_wraps_a_plain_tower_service(backend: &Backend) {
    use tower::{Layer, ServiceExt};
    let calls = Counter::default();
    let counter = calls.clone();
    let service = tower::service_fn(move |_req: http::Request<http_body_util::Empty<Bytes>>| {
        let n = counter.bump();
        async move {
            Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(Bytes::from(
                format!("plain #{n}"),
            ))))
        }
    });
    let service = CacheLayer::new(backend.store().await).layer(service);
    let request = || {
        http::Request::get("/plain")
            .body(http_body_util::Empty::new())
            .unwrap()
    };
    let first = service.clone().oneshot(request()).await.unwrap();
    assert_eq!(first.headers()["x-cache"], "MISS");
    let body = http_body_util::BodyExt::collect(first.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "plain #1");
    backend.wait_for_keys(1).await;
    let second = service.oneshot(request()).await.unwrap();
    assert_eq!(second.headers()["x-cache"], "HIT");
    let body = http_body_util::BodyExt::collect(second.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, "plain #1");
}

/// A service that fails any call on a clone that was not polled ready, as a service holding
/// a reserved slot (a semaphore permit, a connection) would.
#[derive(Default)]
struct ReadyTracked {
    ready: bool,
}

impl tower::Service<http::Request<Body>> for ReadyTracked {
    type Response = Response;
    type Error = &'static str;
    type Future = std::future::Ready<Result<Response, &'static str>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.ready = true;
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Body>) -> Self::Future {
        let was_ready = std::mem::take(&mut self.ready);
        std::future::ready(if was_ready {
            Ok("ok".into_response())
        } else {
            Err("called before poll_ready")
        })
    }
}

async fn the_inner_service_called_is_the_one_polled_ready(backend: &Backend) {
    use tower::{Layer, Service, ServiceExt};
    // A clone starts not ready, so calling a clone instead of the polled service fails.
    #[derive(Default)]
    struct Fresh(ReadyTracked);
    impl Clone for Fresh {
        fn clone(&self) -> Self {
            Fresh(ReadyTracked::default())
        }
    }
    impl tower::Service<http::Request<Body>> for Fresh {
        type Response = Response;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Response, &'static str>>;
        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, req: http::Request<Body>) -> Self::Future {
            self.0.call(req)
        }
    }
    let mut service = CacheLayer::new(backend.store().await).layer(Fresh::default());
    for method in [Method::GET, Method::POST, Method::GET] {
        let request = http::Request::builder()
            .method(method)
            .uri("/x")
            .body(Body::empty())
            .unwrap();
        let response = service.ready().await.unwrap().call(request).await;
        assert!(response.is_ok(), "{:?}", response.err());
    }
}

/// Products tagged by the route, and by the response's `Cache-Tag` / `Surrogate-Key`.
fn tagged_app(layer: CacheLayer, calls: Counter) -> Router {
    Router::new()
        .route(
            "/products/{id}",
            get(move |axum::extract::Path(id): axum::extract::Path<u32>| {
                let n = calls.bump();
                async move {
                    let tags = if id % 2 == 0 {
                        "even, product"
                    } else {
                        "odd product"
                    };
                    let header = if id % 2 == 0 {
                        "cache-tag"
                    } else {
                        "surrogate-key"
                    };
                    ([(header, tags)], format!("product {id} #{n}"))
                }
            }),
        )
        .layer(layer)
}

async fn tags_from_route_and_response_headers_invalidate_exactly_their_entries(backend: &Backend) {
    let store = backend.store().await;
    let layer = CacheLayer::new(store.clone()).tags(["catalog"]);
    let invalidator = layer.invalidator();
    let addr = serve(tagged_app(layer.clone(), Counter::default())).await;
    for id in 1..=6 {
        let reply = fetch(addr, &format!("/products/{id}")).await;
        assert_eq!(reply.header("cache-tag"), None, "tag headers are stripped");
        assert_eq!(reply.header("surrogate-key"), None);
    }
    for id in 1..=6 {
        let hit = get_until_hit(addr, &format!("/products/{id}"), &[]).await;
        assert_eq!(
            (hit.header("cache-tag"), hit.header("surrogate-key")),
            (None, None)
        );
    }
    assert_eq!(invalidator.invalidate_tag("even").await.unwrap(), 3);
    for id in 1..=6 {
        let reply = fetch(addr, &format!("/products/{id}")).await;
        let expected = if id % 2 == 0 { "MISS" } else { "HIT" };
        assert_eq!(reply.x_cache(), Some(expected), "product {id}");
    }
    // The typed client with the layer's prefix sees the same tags.
    let client = tower_redis_cache::RedisCache::from_store(&store).key_prefix("http-cache");
    layer.flush().await;
    assert_eq!(client.invalidate_tag("catalog").await.unwrap(), 6);
    // Only tag sets remain (their members now name removed keys and expire with them).
    let left = backend.keys("*");
    assert!(
        left.iter().all(|k| k.starts_with("http-cache:__tag:")),
        "{left:?}"
    );
    assert_eq!(fetch(addr, "/products/1").await.x_cache(), Some("MISS"));
}

#[tokio::test]
async fn the_invalidator_drops_one_url_and_works_on_the_memory_store() {
    let layer = CacheLayer::new(tower_redis_cache::MemoryStore::new());
    let invalidator = layer.invalidator();
    let calls = Counter::default();
    let addr = serve(tagged_app(layer, calls.clone())).await;
    fetch(addr, "/products/2?a=1&b=2").await;
    fetch(addr, "/products/3").await;
    get_until_hit(addr, "/products/2?a=1&b=2", &[]).await;
    get_until_hit(addr, "/products/3", &[]).await;
    let other_order = format!("http://{addr}/products/2?b=2&a=1").parse().unwrap();
    assert!(
        !invalidator.invalidate(&other_order).await.unwrap(),
        "raw queries are keys"
    );
    let url = format!("http://{addr}/products/2?a=1&b=2").parse().unwrap();
    assert!(invalidator.invalidate(&url).await.unwrap());
    assert_eq!(
        fetch(addr, "/products/2?a=1&b=2").await.x_cache(),
        Some("MISS")
    );
    assert_eq!(fetch(addr, "/products/3").await.x_cache(), Some("HIT"));
    assert_eq!(invalidator.invalidate_tag("product").await.unwrap(), 2);
    assert_eq!(fetch(addr, "/products/3").await.x_cache(), Some("MISS"));
}

/// A compressible 2 KiB text body.
fn long_text() -> String {
    "tower-redis-cache compresses well. ".repeat(60)
}

fn gunzip(bytes: &[u8]) -> String {
    use std::io::Read;
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("valid gzip");
    out
}

/// Both orders of the cache and tower-http's CompressionLayer are safe: a client that did
/// not ask for gzip never receives gzip, and a gzip client gets a body that decodes to the
/// same text.
async fn works_inside_and_outside_tower_http_compression(backend: &Backend) {
    use tower_http::compression::CompressionLayer;
    for cache_outside in [false, true] {
        backend.flush();
        let calls = Counter::default();
        let counter = calls.clone();
        let routes = Router::new().route(
            "/text",
            get(move || {
                counter.bump();
                async { long_text() }
            }),
        );
        let layer = CacheLayer::new(backend.store().await);
        let app = if cache_outside {
            // The cache stores compressed variants, keyed by Accept-Encoding (the compression
            // layer adds `Vary: accept-encoding`).
            routes.layer(CompressionLayer::new()).layer(layer.clone())
        } else {
            // The cache stores the identity body; compression runs per request on the way out.
            routes.layer(layer.clone()).layer(CompressionLayer::new())
        };
        let addr = serve(app).await;
        let order = if cache_outside {
            "cache outside"
        } else {
            "cache inside"
        };
        let gzip = [("accept-encoding", "gzip")];
        for round in 0..3 {
            let zipped = send(addr, Method::GET, "/text", &gzip).await;
            assert_eq!(
                zipped.header("content-encoding"),
                Some("gzip"),
                "{order} round {round}"
            );
            assert_eq!(gunzip(&zipped.body), long_text(), "{order}");
            let plain = fetch(addr, "/text").await;
            assert_eq!(
                plain.header("content-encoding"),
                None,
                "{order}: gzip sent to a client that did not ask"
            );
            assert_eq!(plain.text(), long_text());
            let br = send(addr, Method::GET, "/text", &[("accept-encoding", "br")]).await;
            assert_eq!(br.header("content-encoding"), None, "{order}");
            layer.flush().await;
        }
        let expected = if cache_outside { 3 } else { 1 }; // one per variant, or one in all
        assert!(
            calls.get() <= expected + 1,
            "{order}: {} handler calls",
            calls.get()
        );
    }
}

async fn past_the_pending_write_limit_responses_are_served_but_not_stored(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await).max_pending_writes(0);
    let addr = serve(items_app(layer.clone(), calls.clone())).await;
    for n in 1..=3 {
        let reply = fetch(addr, "/items/1").await;
        assert_eq!(
            (reply.x_cache(), reply.text()),
            (Some("MISS"), &*format!("item 1 #{n}"))
        );
        layer.flush().await;
    }
    assert_eq!(backend.dbsize(), 0);
}
