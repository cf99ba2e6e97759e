//! Stampede protection and stale serving: coalescing in one process and across instances,
//! crashed lock holders, stale-while-revalidate, stale-if-error, TTL jitter; on single Redis
//! and, with feature `cluster`, on a cluster.

mod common;

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use common::backend::Backend;
use common::{advance_clock, cache_key, fetch, get_until_hit, http_key, serve, Counter};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_redis_cache::CacheLayer;

/// A slow handler (a database query) that counts its calls.
fn slow_app(layer: CacheLayer, calls: Counter, delay: Duration) -> Router {
    Router::new()
        .route(
            "/hot",
            get(move || {
                let n = calls.bump();
                async move {
                    tokio::time::sleep(delay).await;
                    format!("computed #{n}")
                }
            }),
        )
        .layer(layer)
}

// Every test of this file, on both backends. Stores come from `Backend::store`, with a
// generous operation timeout, so a loaded CI machine does not turn waits into misses.
backend_cases!(
    five_hundred_concurrent_misses_in_one_process_make_one_handler_call: multi_thread(2),
    four_instances_with_separate_pools_make_one_handler_call: multi_thread(2),
    without_cross_instance_locking_each_instance_calls_the_handler,
    a_crashed_lock_holder_blocks_others_only_until_the_lock_expires,
    a_hung_lock_holder_blocks_other_instances_only_until_the_lock_expires,
    a_response_that_may_not_be_stored_is_never_handed_to_waiters,
    waiters_give_up_after_the_coalesce_timeout_and_call_the_handler,
    stale_is_served_at_once_while_exactly_one_refresh_runs,
    the_response_stale_while_revalidate_directive_is_honoured,
    stale_is_served_when_the_handler_fails,
    without_stale_if_error_or_under_must_revalidate_the_error_is_returned,
    the_response_stale_if_error_directive_is_honoured,
    ttl_jitter_spreads_expiry,
    an_expired_popular_entry_kept_for_revalidation_or_errors_costs_one_handler_call,
    a_waiter_never_gets_a_content_coding_it_did_not_ask_for,
);

/// Every case above on one cluster; all of this file's tests run there.
#[cfg(feature = "cluster")]
#[test]
fn every_case_on_a_cluster() {
    common::backend::run_on_cluster(&[CASES]);
}

/// Sends `n` concurrent GETs through the router (the axum Router is the tower service) and
/// returns (x-cache, body) of each.
async fn burst(app: Router, n: usize, path: &'static str) -> Vec<(String, String)> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                let response = app
                    .oneshot(Request::get(path).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let label = response.headers()["x-cache"].to_str().unwrap().to_owned();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (label, String::from_utf8(body.to_vec()).unwrap())
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

async fn five_hundred_concurrent_misses_in_one_process_make_one_handler_call(backend: &Backend) {
    let calls = Counter::default();
    let app = slow_app(
        CacheLayer::new(backend.store().await),
        calls.clone(),
        Duration::from_millis(300),
    );
    let replies = burst(app, 500, "/hot").await;
    assert_eq!(calls.get(), 1, "the handler ran {} times", calls.get());
    assert!(replies.iter().all(|(_, body)| body == "computed #1"));
    assert_eq!(
        replies.iter().filter(|(label, _)| label == "MISS").count(),
        1
    );
}

async fn four_instances_with_separate_pools_make_one_handler_call(backend: &Backend) {
    let calls = Counter::default();
    let mut bursts = Vec::new();
    for _ in 0..4 {
        // Each instance has its own pool and its own in-process state, as a process would.
        let layer = CacheLayer::new(backend.store().await).lock_across_instances(true);
        let app = slow_app(layer, calls.clone(), Duration::from_millis(300));
        bursts.push(tokio::spawn(burst(app, 100, "/hot")));
    }
    let mut replies = Vec::new();
    for b in bursts {
        replies.extend(b.await.unwrap());
    }
    assert_eq!(
        calls.get(),
        1,
        "the handler ran {} times across 4 instances",
        calls.get()
    );
    assert_eq!(replies.len(), 400);
    assert!(replies.iter().all(|(_, body)| body == "computed #1"));
}

async fn without_cross_instance_locking_each_instance_calls_the_handler(backend: &Backend) {
    // The control for the test above: the lock is what makes it one call.
    let calls = Counter::default();
    let mut bursts = Vec::new();
    for _ in 0..4 {
        let app = slow_app(
            CacheLayer::new(backend.store().await),
            calls.clone(),
            Duration::from_millis(300),
        );
        bursts.push(tokio::spawn(burst(app, 10, "/hot")));
    }
    for b in bursts {
        b.await.unwrap();
    }
    assert_eq!(calls.get(), 4);
}

async fn a_crashed_lock_holder_blocks_others_only_until_the_lock_expires(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await)
        .lock_across_instances(true)
        .lock_ttl(Duration::from_secs(1))
        .coalesce_timeout(Duration::from_secs(30));
    let app = slow_app(layer, calls.clone(), Duration::ZERO);
    // The lock a crashed instance left behind: its owner will never release it.
    let lock = format!(
        "{}:lock",
        cache_key("http-cache", "GET", None, "/hot", None)
    );
    let _: () = backend.cmd(&["SET", &lock, "token-of-a-dead-process", "PX", "1000"]);
    let started = Instant::now();
    let replies = burst(app, 20, "/hot").await;
    let waited = started.elapsed();
    assert_eq!(
        calls.get(),
        1,
        "after the lock expired, one instance computed the value"
    );
    assert!(replies.iter().all(|(_, body)| body == "computed #1"));
    assert!(
        waited >= Duration::from_millis(800),
        "the lock was ignored: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "blocked far beyond the lock TTL: {waited:?}"
    );
}

async fn a_hung_lock_holder_blocks_other_instances_only_until_the_lock_expires(backend: &Backend) {
    let calls = Counter::default();
    let instance = |delay| {
        let calls = calls.clone();
        async move {
            let layer = CacheLayer::new(backend.store().await)
                .lock_across_instances(true)
                .lock_ttl(Duration::from_secs(1))
                .coalesce_timeout(Duration::from_secs(30));
            slow_app(layer, calls, delay)
        }
    };
    let stuck = instance(Duration::from_secs(3600)).await;
    let healthy = instance(Duration::ZERO).await;
    let stuck_request = tokio::spawn(burst(stuck, 1, "/hot"));
    backend.wait_for_keys(1).await; // the stuck instance holds the lock
    let started = Instant::now();
    let replies = burst(healthy, 5, "/hot").await;
    assert!(replies.iter().all(|(_, body)| body == "computed #2"));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(calls.get(), 2);
    stuck_request.abort();
}

async fn a_response_that_may_not_be_stored_is_never_handed_to_waiters(backend: &Backend) {
    let calls = Counter::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/me",
            get(move || {
                let n = counter.bump();
                async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    (
                        [("set-cookie", format!("session={n}"))],
                        format!("user #{n}"),
                    )
                        .into_response()
                }
            }),
        )
        .layer(CacheLayer::new(backend.store().await));
    let replies = burst(app, 10, "/me").await;
    let mut bodies: Vec<_> = replies.iter().map(|(_, b)| b.clone()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        10,
        "each waiter got its own reply: {bodies:?}"
    );
    assert_eq!(calls.get(), 10);
}

async fn waiters_give_up_after_the_coalesce_timeout_and_call_the_handler(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await).coalesce_timeout(Duration::from_millis(100));
    let app = slow_app(layer, calls.clone(), Duration::from_millis(500));
    let started = Instant::now();
    burst(app, 5, "/hot").await;
    assert_eq!(
        calls.get(),
        5,
        "every waiter called the handler after its timeout"
    );
    // A hang guard only: the count above shows the waiters gave up.
    assert!(started.elapsed() < Duration::from_secs(30));
}

async fn stale_is_served_at_once_while_exactly_one_refresh_runs(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await)
        .ttl(Duration::from_secs(1))
        .stale_while_revalidate(Duration::from_secs(30));
    // The first call answers at once; later calls (the refresh) wait until the gate opens,
    // so a stale reply that arrives while it is closed did not wait for the refresh.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let app = {
        let (calls, gate) = (calls.clone(), gate.clone());
        Router::new()
            .route(
                "/hot",
                get(move || {
                    let n = calls.bump();
                    let gate = gate.clone();
                    async move {
                        if n > 1 {
                            gate.acquire().await.unwrap().forget();
                        }
                        format!("computed #{n}")
                    }
                }),
            )
            .layer(layer.clone())
    };
    let addr = serve(app).await;
    fetch(addr, "/hot").await;
    let stored = get_until_hit(addr, "/hot", &[]).await.text().to_owned();
    let calls_before = calls.get();
    advance_clock(Duration::from_millis(1100)).await; // now stale, within grace

    let mut stale = Vec::new();
    for _ in 0..10 {
        stale.push(tokio::spawn(async move { fetch(addr, "/hot").await }));
    }
    for reply in stale {
        let reply = reply.await.unwrap();
        assert_eq!((reply.x_cache(), reply.text()), (Some("STALE"), &*stored));
    }
    assert_eq!(
        gate.available_permits(),
        0,
        "stale copies waited for the refresh"
    );
    gate.add_permits(1);
    layer.flush().await;
    assert_eq!(
        calls.get(),
        calls_before + 1,
        "exactly one background refresh"
    );
    let fresh = fetch(addr, "/hot").await;
    assert_eq!(fresh.x_cache(), Some("HIT"));
    assert_eq!(
        fresh.text(),
        format!("computed #{}", calls_before + 1),
        "the refreshed copy"
    );
}

async fn the_response_stale_while_revalidate_directive_is_honoured(backend: &Backend) {
    let calls = Counter::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/r",
            get(move || {
                let n = counter.bump();
                async move {
                    (
                        [("cache-control", "max-age=1, stale-while-revalidate=30")],
                        format!("v{n}"),
                    )
                }
            }),
        )
        .layer(CacheLayer::new(backend.store().await));
    let addr = serve(app).await;
    fetch(addr, "/r").await;
    get_until_hit(addr, "/r", &[]).await;
    let ttl: i64 = backend.cmd(&["TTL", &http_key(addr, "GET", "/r")]);
    assert!(
        ttl > 25,
        "the store keeps the entry for its grace too: ttl {ttl}"
    );
    advance_clock(Duration::from_millis(1100)).await;
    let reply = fetch(addr, "/r").await;
    assert_eq!((reply.x_cache(), reply.text()), (Some("STALE"), "v1"));
}

/// 200 on the first call, 500 afterwards.
fn failing_app(layer: CacheLayer, calls: Counter, cache_control: &'static str) -> Router {
    Router::new()
        .route(
            "/r",
            get(move || {
                let n = calls.bump();
                async move {
                    let status = if n == 1 {
                        StatusCode::OK
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    };
                    (
                        status,
                        [("cache-control", cache_control)],
                        format!("reply #{n}"),
                    )
                        .into_response()
                }
            }),
        )
        .layer(layer)
}

async fn stale_is_served_when_the_handler_fails(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await)
        .ttl(Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(30));
    let addr = serve(failing_app(layer, calls.clone(), "public")).await;
    fetch(addr, "/r").await;
    get_until_hit(addr, "/r", &[]).await;
    advance_clock(Duration::from_millis(1100)).await;
    let before = calls.get();
    let reply = fetch(addr, "/r").await;
    assert_eq!(calls.get(), before + 1, "the handler was tried");
    assert_eq!(
        (reply.status, reply.x_cache(), reply.text()),
        (StatusCode::OK, Some("STALE"), "reply #1")
    );
}

async fn without_stale_if_error_or_under_must_revalidate_the_error_is_returned(backend: &Backend) {
    for (layer_grace, cache_control) in [
        (Duration::ZERO, "public"),
        (Duration::from_secs(30), "must-revalidate"),
    ] {
        backend.flush();
        let calls = Counter::default();
        let layer = CacheLayer::new(backend.store().await)
            .ttl(Duration::from_secs(1))
            .stale_if_error(layer_grace);
        let addr = serve(failing_app(layer, calls.clone(), cache_control)).await;
        fetch(addr, "/r").await;
        get_until_hit(addr, "/r", &[]).await;
        advance_clock(Duration::from_millis(1100)).await;
        let reply = fetch(addr, "/r").await;
        assert_eq!(
            reply.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{cache_control}"
        );
        assert_eq!(reply.x_cache(), Some("MISS"));
        assert_ne!(reply.text(), "reply #1", "the stale copy was served");
    }
}

async fn the_response_stale_if_error_directive_is_honoured(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await);
    let addr = serve(failing_app(
        layer,
        calls.clone(),
        "max-age=1, stale-if-error=30",
    ))
    .await;
    fetch(addr, "/r").await;
    get_until_hit(addr, "/r", &[]).await;
    advance_clock(Duration::from_millis(1100)).await;
    let reply = fetch(addr, "/r").await;
    assert_eq!((reply.x_cache(), reply.text()), (Some("STALE"), "reply #1"));
}

async fn ttl_jitter_spreads_expiry(backend: &Backend) {
    let layer = CacheLayer::new(backend.store().await)
        .ttl(Duration::from_secs(1000))
        .ttl_jitter(0.5);
    let app = Router::new()
        .route("/items/{id}", get(|| async { "x" }))
        .layer(layer);
    let addr = serve(app).await;
    for i in 0..30 {
        fetch(addr, &format!("/items/{i}")).await;
    }
    backend.wait_for_keys(30).await;
    let mut ttls: Vec<i64> = (0..30)
        .map(|i| backend.cmd(&["TTL", &http_key(addr, "GET", &format!("/items/{i}"))]))
        .collect();
    assert!(ttls.iter().all(|t| (499..=1000).contains(t)), "{ttls:?}");
    ttls.sort();
    ttls.dedup();
    assert!(ttls.len() > 10, "expiry times were not spread: {ttls:?}");
}

// A current-thread runtime, so the test can move tokio's clock: the 200 requests still
// interleave at every await.
async fn an_expired_popular_entry_kept_for_revalidation_or_errors_costs_one_handler_call(
    backend: &Backend,
) {
    // Entries kept past their TTL (stale-if-error grace, or a validator for revalidation)
    // must not turn their expiry into a stampede.
    for layer in [
        |l: CacheLayer| l.stale_if_error(Duration::from_secs(60)),
        |l: CacheLayer| l.generate_etag(true),
    ] {
        backend.flush();
        let calls = Counter::default();
        let base = CacheLayer::new(backend.store().await).ttl(Duration::from_secs(1));
        let layer = layer(base);
        let app = slow_app(layer.clone(), calls.clone(), Duration::from_millis(300));
        burst(app.clone(), 1, "/hot").await;
        layer.flush().await;
        advance_clock(Duration::from_millis(1300)).await;
        let replies = burst(app, 200, "/hot").await;
        assert_eq!(
            calls.get(),
            2,
            "the expired entry was refetched {} times",
            calls.get() - 1
        );
        assert!(replies.iter().all(|(_, body)| body == "computed #2"));
        // The refreshed entry is written in the background: done before the next round
        // flushes Redis, so it cannot land in that round (both rounds use one key).
        layer.flush().await;
    }
}

async fn a_waiter_never_gets_a_content_coding_it_did_not_ask_for(backend: &Backend) {
    // The handler negotiates gzip but forgets `Vary`: a coalesced waiter without gzip must
    // not be handed the gzip reply of the request it waited on.
    let calls = Counter::default();
    let counter = calls.clone();
    let app = Router::new()
        .route(
            "/asset",
            get(move |headers: axum::http::HeaderMap| {
                counter.bump();
                let gzip = headers
                    .get("accept-encoding")
                    .is_some_and(|v| v.to_str().unwrap().contains("gzip"));
                async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    if gzip {
                        ([("content-encoding", "gzip")], "GZIP BYTES").into_response()
                    } else {
                        "plain".into_response()
                    }
                }
            }),
        )
        // Waiters held for the coalesce timeout would hang the test, not slow it.
        .layer(CacheLayer::new(backend.store().await).coalesce_timeout(Duration::from_secs(3600)));
    let leader = {
        let app = app.clone();
        tokio::spawn(async move {
            let request = Request::get("/asset")
                .header("accept-encoding", "gzip")
                .body(Body::empty())
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            let encoding = response.headers()["content-encoding"].clone();
            response.into_body().collect().await.unwrap();
            encoding
        })
    };
    while calls.get() == 0 {
        tokio::task::yield_now().await; // until the leader's handler call is in flight
    }
    let waiters = tokio::time::timeout(Duration::from_secs(60), burst(app, 10, "/asset"));
    for (_, body) in waiters
        .await
        .expect("the waiters were held until the coalesce timeout")
    {
        assert_eq!(body, "plain", "a client without gzip got the gzip reply");
    }
    assert_eq!(leader.await.unwrap(), "gzip");
}
