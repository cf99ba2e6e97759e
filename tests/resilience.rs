//! Fill-path resilience: answers that cannot be stored never make requests queue (hit-for-miss,
//! waiters released at the response head), a leader that goes away hands its flight to one
//! waiter, a failing origin with a stale copy is called about once per key per throttle
//! (fail-safe), slow origins meet soft and hard timeouts, and hot keys are refreshed ahead of
//! expiry. On MemoryStore (paused time where the test is about time) and on real Redis, single
//! and, with feature `cluster`, a cluster.

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use common::backend::Backend;
use common::{advance_clock, Counter};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_redis_cache::{CacheLayer, MemoryStore};

backend_cases!(
    uncacheable_bursts_over_four_instances_do_not_queue: multi_thread(2),
    a_later_storable_answer_replaces_the_mark,
    pollers_in_other_instances_are_released_at_the_response_head: multi_thread(2),
    a_failing_origin_is_called_once_per_throttle_across_instances,
    a_hot_key_is_refreshed_ahead_across_instances_without_anyone_waiting,
);

/// Every case above on one cluster.
#[cfg(feature = "cluster")]
#[test]
fn every_case_on_a_cluster() {
    common::backend::run_on_cluster(&[CASES]);
}

/// What one request got.
#[derive(Debug, Clone)]
struct Got {
    status: StatusCode,
    x_cache: String,
    cache_status: String,
    body: String,
}

async fn get_once(app: &Router, path: &str) -> Got {
    let response = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (status, x_cache, cache_status) = {
        let header = |name: &str| {
            let value = response.headers().get(name).and_then(|v| v.to_str().ok());
            value.unwrap_or("-").to_owned()
        };
        (response.status(), header("x-cache"), header("cache-status"))
    };
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Got {
        status,
        x_cache,
        cache_status,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `n` concurrent GETs of `path` on each app; every answer, and how long the burst took.
async fn burst(apps: &[Router], n: usize, path: &'static str) -> (Vec<Got>, Duration) {
    let started = Instant::now();
    let tasks: Vec<_> = (apps.iter())
        .flat_map(|app| (0..n).map(move |_| app.clone()))
        .map(|app| tokio::spawn(async move { get_once(&app, path).await }))
        .collect();
    let mut got = Vec::new();
    for task in tasks {
        got.push(task.await.unwrap());
    }
    (got, started.elapsed())
}

/// `GET /r`: sleeps `delay`, then answers with `answer(call number)`.
fn app_with(
    layer: CacheLayer,
    calls: Counter,
    delay: Duration,
    answer: impl Fn(usize) -> Response + Clone + Send + Sync + 'static,
) -> Router {
    Router::new()
        .route(
            "/r",
            get(move || {
                let n = calls.bump();
                let answer = answer.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    answer(n)
                }
            }),
        )
        .layer(layer)
}

fn with_cache_control(cache_control: &'static str) -> impl Fn(usize) -> Response + Clone {
    move |n| ([("cache-control", cache_control)], format!("reply #{n}")).into_response()
}

/// A handler's answer for its call number.
type AnswerFn = Arc<dyn Fn(usize) -> Response + Send + Sync>;

/// The issue's table as a test: 4 instances sharing one Redis with the cross-instance lock,
/// a slow handler, 10 concurrent requests per instance, twice. A storable answer costs one
/// call; an answer that cannot be stored releases everyone at its head (first burst within
/// 3.5 x the handler's time) and is remembered, so the next burst goes straight to the
/// handler (within 1.75 x).
async fn uncacheable_bursts_over_four_instances_do_not_queue(backend: &Backend) {
    const HANDLER: Duration = Duration::from_millis(400);
    let answers: [(&str, AnswerFn); 4] = [
        ("storable", Arc::new(with_cache_control("max-age=60"))),
        ("private", Arc::new(with_cache_control("private"))),
        ("no-store", Arc::new(with_cache_control("no-store"))),
        (
            "500",
            Arc::new(|n| {
                (StatusCode::INTERNAL_SERVER_ERROR, format!("error #{n}")).into_response()
            }),
        ),
    ];
    for (name, answer) in answers {
        backend.flush();
        let calls = Counter::default();
        let mut apps = Vec::new();
        for _ in 0..4 {
            let layer = CacheLayer::new(backend.store().await).lock_across_instances(true);
            let answer = answer.clone();
            apps.push(app_with(layer, calls.clone(), HANDLER, move |n| answer(n)));
        }
        let (first, first_took) = burst(&apps, 10, "/r").await;
        let first_calls = calls.get();
        let (second, second_took) = burst(&apps, 10, "/r").await;
        println!(
            "{name}: first burst {first_took:?} ({first_calls} calls), second {second_took:?} \
             ({} calls)",
            calls.get() - first_calls
        );
        assert_eq!(first.len() + second.len(), 80);
        if name == "storable" {
            assert_eq!(calls.get(), 1, "a storable cold key costs exactly one call");
            assert!(second.iter().all(|g| g.x_cache == "HIT"), "{second:?}");
            continue;
        }
        assert!(
            first_took < HANDLER.mul_f64(3.5),
            "{name}: the first burst took {first_took:?}: requests queued"
        );
        assert!(
            second_took < HANDLER.mul_f64(1.75),
            "{name}: the second burst took {second_took:?}: the mark was not used"
        );
        assert_eq!(calls.get(), 80, "{name}: every request got its own answer");
        assert!(
            second
                .iter()
                .all(|g| g.cache_status.ends_with("detail=hit-for-miss")),
            "{name}: {second:?}"
        );
        // Each answer is the request's own, never another's.
        let mut bodies: Vec<&str> = second.iter().map(|g| g.body.as_str()).collect();
        bodies.sort_unstable();
        bodies.dedup();
        assert_eq!(bodies.len(), 40, "{name}");
    }
}

/// A key marked uncacheable goes to the handler; the first answer that can be stored
/// replaces the mark, and hits resume.
async fn a_later_storable_answer_replaces_the_mark(backend: &Backend) {
    let calls = Counter::default();
    let layer = CacheLayer::new(backend.store().await);
    let answer = |n: usize| {
        let cache_control = if n == 1 { "private" } else { "max-age=60" };
        ([("cache-control", cache_control)], format!("reply #{n}")).into_response()
    };
    let app = app_with(layer.clone(), calls.clone(), Duration::ZERO, answer);
    let first = get_once(&app, "/r").await;
    layer.flush().await;
    assert_eq!(first.x_cache, "MISS");
    let second = get_once(&app, "/r").await;
    layer.flush().await;
    assert_eq!(
        (second.x_cache.as_str(), second.cache_status.as_str()),
        (
            "MISS",
            "tower-redis-cache; fwd=uri-miss; detail=hit-for-miss"
        )
    );
    let third = get_once(&app, "/r").await;
    assert_eq!(
        (third.x_cache.as_str(), third.body.as_str()),
        ("HIT", "reply #2")
    );
    let stats = layer.stats();
    assert_eq!((stats.uncacheable_marks, stats.hit_for_miss), (1, 1));
}

/// With the lock on, a poller in another instance learns that the leader's answer cannot be
/// stored as soon as its head arrives, not when its (slow) body ends or the lock expires.
async fn pollers_in_other_instances_are_released_at_the_response_head(backend: &Backend) {
    const HEAD: Duration = Duration::from_millis(300);
    const BODY: Duration = Duration::from_millis(1500);
    let calls = Counter::default();
    let counted = calls.clone();
    let slow_body_app = |layer: CacheLayer| {
        let calls = counted.clone();
        Router::new()
            .route(
                "/r",
                get(move || {
                    calls.bump();
                    async move {
                        // The head after HEAD, the body only BODY later.
                        tokio::time::sleep(HEAD).await;
                        let body = futures_body(BODY);
                        ([("cache-control", "no-store")], body).into_response()
                    }
                }),
            )
            .layer(layer)
    };
    let leader_app = slow_body_app(
        CacheLayer::new(backend.store().await)
            .lock_across_instances(true)
            .lock_ttl(Duration::from_secs(10)),
    );
    let other_app = slow_body_app(
        CacheLayer::new(backend.store().await)
            .lock_across_instances(true)
            .lock_ttl(Duration::from_secs(10)),
    );
    let started = Instant::now();
    let leader = tokio::spawn(async move { get_once(&leader_app, "/r").await });
    while calls.get() == 0 {
        tokio::task::yield_now().await;
    }
    // The other instance's request starts while the leader waits for its head: it finds the
    // lock taken and polls. It must go to its own handler once the leader's head is known to
    // be uncacheable (its own head then takes HEAD more), not when the leader's body ends
    // (HEAD + BODY) or the lock expires (10 s).
    let request = Request::get("/r").body(Body::empty()).unwrap();
    let other = other_app.oneshot(request).await.unwrap();
    let other_took = started.elapsed();
    println!("the other instance's head came after {other_took:?}");
    assert!(other_took < HEAD + BODY, "the poller waited {other_took:?}");
    assert_eq!(calls.get(), 2);
    let cache_status = other.headers()["cache-status"].to_str().unwrap();
    assert!(
        cache_status.ends_with("detail=hit-for-miss"),
        "{cache_status}"
    );
    assert_eq!(leader.await.unwrap().body, "slow body");
}

/// A body that ends `after` the head was sent.
fn futures_body(after: Duration) -> Body {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let _ = tx.send(());
    });
    let stream = futures_util_stream(rx);
    Body::from_stream(stream)
}

/// One chunk, once `ready` fires.
fn futures_util_stream(
    ready: tokio::sync::oneshot::Receiver<()>,
) -> impl futures_core::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send {
    struct Once(Option<tokio::sync::oneshot::Receiver<()>>);
    impl futures_core::Stream for Once {
        type Item = Result<bytes::Bytes, std::io::Error>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            let Some(rx) = self.0.as_mut() else {
                return std::task::Poll::Ready(None);
            };
            match std::pin::Pin::new(rx).poll(cx) {
                std::task::Poll::Pending => std::task::Poll::Pending,
                std::task::Poll::Ready(_) => {
                    self.0 = None;
                    std::task::Poll::Ready(Some(Ok(bytes::Bytes::from_static(b"slow body"))))
                }
            }
        }
    }
    Once(Some(ready))
}

/// 200 (`max-age=1`) on the first call, 500 afterwards.
fn failing_after_first(n: usize) -> Response {
    match n {
        1 => ([("cache-control", "max-age=1")], "reply #1".to_owned()).into_response(),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, format!("error #{n}")).into_response(),
    }
}

/// After expiry the origin fails: 100 requests over 4 instances cost one call, and the
/// stale copy keeps standing in without calling the origin until the throttle ends, after
/// which one call tries again.
async fn a_failing_origin_is_called_once_per_throttle_across_instances(backend: &Backend) {
    const THROTTLE: Duration = Duration::from_millis(800);
    let calls = Counter::default();
    let mut apps = Vec::new();
    for _ in 0..4 {
        let layer = CacheLayer::new(backend.store().await)
            .lock_across_instances(true)
            .stale_if_error(Duration::from_secs(60))
            .fail_safe_throttle(THROTTLE);
        apps.push(app_with(
            layer,
            calls.clone(),
            Duration::from_millis(50),
            failing_after_first,
        ));
    }
    assert_eq!(get_once(&apps[0], "/r").await.body, "reply #1");
    let stored = std::time::Instant::now();
    while get_once(&apps[1], "/r").await.x_cache != "HIT" {
        tokio::task::yield_now().await;
    }
    // Expire the entry on the cache's clock (the store keeps it for stale-if-error).
    advance_clock(Duration::from_millis(1100)).await;
    let (got, _) = burst(&apps, 25, "/r").await;
    assert_eq!(calls.get(), 2, "100 requests after expiry cost one call");
    assert!(
        got.iter()
            .all(|g| g.status == StatusCode::OK && g.body == "reply #1"),
        "{got:?}"
    );
    assert!(got.iter().all(|g| g.x_cache == "STALE"), "{got:?}");
    let (got, _) = burst(&apps, 25, "/r").await;
    assert_eq!(
        calls.get(),
        2,
        "within the throttle the origin is not called"
    );
    assert!(
        got.iter()
            .all(|g| g.cache_status.ends_with("detail=fail-safe")),
        "{got:?}"
    );
    // The throttle lives in the store, on the store's clock: wait for it to go.
    let throttle = format!(
        "{}:fail-safe",
        common::cache_key("http-cache", "GET", None, "/r", None)
    );
    while backend.cmd::<bool>(&["EXISTS", &throttle]) {
        assert!(
            stored.elapsed() < Duration::from_secs(10),
            "the throttle never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (got, _) = burst(&apps, 25, "/r").await;
    assert_eq!(calls.get(), 3, "after the throttle, one call tries again");
    assert!(got.iter().all(|g| g.body == "reply #1"), "{got:?}");
}

/// Refresh ahead with the lock on, on two instances: a hit past the fraction starts one
/// background refresh in all; every request is a hit.
async fn a_hot_key_is_refreshed_ahead_across_instances_without_anyone_waiting(backend: &Backend) {
    let calls = Counter::default();
    let mut apps = Vec::new();
    let mut layers = Vec::new();
    for _ in 0..2 {
        let layer = CacheLayer::new(backend.store().await)
            .ttl(Duration::from_secs(10))
            .refresh_ahead(0.5)
            .lock_across_instances(true);
        layers.push(layer.clone());
        apps.push(app_with(
            layer,
            calls.clone(),
            Duration::from_millis(20),
            |n| format!("reply #{n}").into_response(),
        ));
    }
    get_once(&apps[0], "/r").await;
    layers[0].flush().await;
    advance_clock(Duration::from_secs(6)).await;
    let (got, _) = burst(&apps, 20, "/r").await;
    assert!(
        got.iter()
            .all(|g| g.x_cache == "HIT" && g.body == "reply #1"),
        "{got:?}"
    );
    for layer in &layers {
        layer.flush().await;
    }
    assert_eq!(calls.get(), 2, "one refresh across both instances");
    let refreshed = get_once(&apps[1], "/r").await;
    assert_eq!(
        (refreshed.x_cache.as_str(), refreshed.body.as_str()),
        ("HIT", "reply #2")
    );
    let started: u64 = layers.iter().map(|l| l.stats().refreshes_ahead).sum();
    assert_eq!(started, 1);
}

// MemoryStore, on paused time.

fn memory_layer() -> CacheLayer {
    CacheLayer::new(MemoryStore::new())
}

#[tokio::test(start_paused = true)]
async fn in_process_waiters_of_an_uncacheable_answer_are_released_at_its_head() {
    const HANDLER: Duration = Duration::from_millis(200);
    let calls = Counter::default();
    let app = app_with(
        memory_layer(),
        calls.clone(),
        HANDLER,
        with_cache_control("private"),
    );
    let (got, took) = burst(std::slice::from_ref(&app), 40, "/r").await;
    assert_eq!(calls.get(), 40);
    assert_eq!(
        took,
        HANDLER * 2,
        "the waiters went on at the leader's head"
    );
    assert_eq!(
        got.iter()
            .filter(|g| g.cache_status.ends_with("hit-for-miss"))
            .count(),
        39
    );
    let (_, took) = burst(&[app], 40, "/r").await;
    assert_eq!(
        took, HANDLER,
        "the mark sends everyone straight to the handler"
    );
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_client_went_away_hands_the_flight_to_one_waiter() {
    let calls = Counter::default();
    let app = app_with(
        memory_layer(),
        calls.clone(),
        Duration::from_secs(1),
        with_cache_control("max-age=60"),
    );
    let leader = tokio::spawn({
        let app = app.clone();
        async move { get_once(&app, "/r").await }
    });
    while calls.get() == 0 {
        tokio::task::yield_now().await;
    }
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { get_once(&app, "/r").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    leader.abort();
    let mut got = Vec::new();
    for waiter in waiters {
        got.push(waiter.await.unwrap());
    }
    assert_eq!(
        calls.get(),
        2,
        "one waiter took the flight over; the others followed it"
    );
    assert!(got.iter().all(|g| g.body == "reply #2"), "{got:?}");
    assert_eq!(got.iter().filter(|g| g.x_cache == "MISS").count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_stale_copy_answers_at_the_soft_timeout_and_the_call_refreshes_it() {
    let calls = Counter::default();
    // A TTL longer than the slow call, or its answer would be stale on arrival (its age
    // counts the time it took, RFC 9111 §4.2.3).
    let layer = memory_layer()
        .ttl(Duration::from_secs(10))
        .stale_if_error(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(100));
    let slow_after_first = Router::new()
        .route(
            "/r",
            get({
                let calls = calls.clone();
                move || {
                    let n = calls.bump();
                    async move {
                        if n > 1 {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        format!("reply #{n}")
                    }
                }
            }),
        )
        .layer(layer.clone());
    get_once(&slow_after_first, "/r").await;
    layer.flush().await;
    tokio::time::advance(Duration::from_secs(11)).await;
    let started = Instant::now();
    let (got, _) = burst(std::slice::from_ref(&slow_after_first), 5, "/r").await;
    assert_eq!(started.elapsed(), Duration::from_millis(100));
    assert!(
        got.iter()
            .all(|g| g.body == "reply #1" && g.x_cache == "STALE"),
        "{got:?}"
    );
    assert!(
        got.iter()
            .all(|g| g.cache_status.ends_with("detail=soft-timeout")),
        "{got:?}"
    );
    assert_eq!(calls.get(), 2, "one call, going on in the background");
    layer.flush().await;
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    let refreshed = get_once(&slow_after_first, "/r").await;
    assert_eq!(
        (refreshed.x_cache.as_str(), refreshed.body.as_str()),
        ("HIT", "reply #2")
    );
    assert_eq!(layer.stats().soft_timeouts, 5);
}

#[tokio::test(start_paused = true)]
async fn past_the_hard_timeout_the_call_is_dropped_and_the_answer_is_504_or_stale() {
    let calls = Counter::default();
    let dropped = Counter::default();
    let layer = memory_layer()
        .ttl(Duration::from_secs(1))
        .hard_timeout(Duration::from_millis(500));
    let hanging = {
        let (calls, dropped) = (calls.clone(), dropped.clone());
        move || {
            let n = calls.bump();
            let guard = DropCount(dropped.clone());
            async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(3600)).await;
                format!("reply #{n}")
            }
        }
    };
    let app = Router::new().route("/r", get(hanging)).layer(layer.clone());
    let started = Instant::now();
    let (got, _) = burst(&[app], 10, "/r").await;
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(500),
        "waiters did not wait again"
    );
    assert!(
        got.iter().all(|g| g.status == StatusCode::GATEWAY_TIMEOUT),
        "{got:?}"
    );
    assert!(
        got.iter()
            .all(|g| g.cache_status.ends_with("detail=timeout")),
        "{got:?}"
    );
    assert_eq!(calls.get(), 1);
    tokio::task::yield_now().await;
    assert_eq!(dropped.get(), 1, "the handler's call was dropped");
    assert_eq!(layer.stats().timeouts, 10);

    // With a stale copy that may stand in, it answers instead of the 504.
    let calls = Counter::default();
    let layer = memory_layer()
        .ttl(Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(60))
        .hard_timeout(Duration::from_millis(500));
    let app = Router::new()
        .route(
            "/r",
            get({
                let calls = calls.clone();
                move || {
                    let n = calls.bump();
                    async move {
                        if n > 1 {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        format!("reply #{n}")
                    }
                }
            }),
        )
        .layer(layer.clone());
    get_once(&app, "/r").await;
    layer.flush().await;
    tokio::time::advance(Duration::from_millis(1100)).await;
    let stale = get_once(&app, "/r").await;
    assert_eq!(
        (stale.status, stale.x_cache.as_str(), stale.body.as_str()),
        (StatusCode::OK, "STALE", "reply #1")
    );
}

/// Counts its drops.
struct DropCount(Counter);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.bump();
    }
}

#[tokio::test(start_paused = true)]
async fn a_hot_key_with_refresh_ahead_never_makes_a_request_wait() {
    let calls = Counter::default();
    let layer = memory_layer()
        .ttl(Duration::from_secs(1))
        .refresh_ahead(0.8);
    let app = app_with(
        layer.clone(),
        calls.clone(),
        Duration::from_millis(50),
        |n| format!("reply #{n}").into_response(),
    );
    get_once(&app, "/r").await;
    layer.flush().await;
    // Steady load: a request every 10 ms for 30 s of (paused) time.
    let mut waited = 0;
    for _ in 0..3000 {
        let started = Instant::now();
        let got = get_once(&app, "/r").await;
        if got.x_cache != "HIT" || started.elapsed() > Duration::ZERO {
            waited += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(waited, 0, "requests waited for the handler");
    let stats = layer.stats();
    println!(
        "{} handler calls, {} refreshes ahead",
        calls.get(),
        stats.refreshes_ahead
    );
    // One refresh per lifetime: 30 s of 1 s entries refreshed at 0.8 s.
    assert!((30..=40).contains(&calls.get()), "{} calls", calls.get());
    assert_eq!(stats.misses, 1);
}

/// The client's followers stop waiting at the lock's wait timeout and compute for
/// themselves.
#[tokio::test]
async fn the_clients_followers_time_out_and_compute() {
    let redis = common::RedisServer::start();
    let store = tower_redis_cache::RedisStore::builder(&redis.url())
        .connect()
        .await
        .unwrap();
    let cache = tower_redis_cache::RedisCache::from_store(&store)
        .lock_ttl(Duration::from_secs(5))
        .coalesce_timeout(Duration::from_millis(100));
    let (computing, started_computing) = tokio::sync::oneshot::channel();
    let slow = {
        let cache = cache.clone();
        tokio::spawn(async move {
            cache
                .get_or_insert_with("k", Duration::from_secs(60), || async move {
                    let _ = computing.send(());
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok::<_, tower_redis_cache::Error>("slow".to_owned())
                })
                .await
        })
    };
    started_computing.await.unwrap();
    let started = Instant::now();
    let fast: String = cache
        .get_or_insert_with("k", Duration::from_secs(60), || async {
            Ok::<_, tower_redis_cache::Error>("fast".to_owned())
        })
        .await
        .unwrap();
    assert_eq!(fast, "fast");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.await.unwrap().unwrap(), "slow");
}

/// A request that looked the key up before another request's answer was stored does not
/// clobber that entry with a hit-for-miss mark when its own (older) answer cannot be stored.
#[tokio::test(start_paused = true)]
async fn an_answer_older_than_a_stored_entry_does_not_mark_the_key() {
    let calls = Counter::default();
    let layer = memory_layer();
    let app = Router::new()
        .route(
            "/r",
            get({
                let calls = calls.clone();
                move || {
                    let n = calls.bump();
                    async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        match n {
                            // Stored, but never fresh: a waiter goes to the handler itself.
                            1 => ([("cache-control", "max-age=0"), ("etag", "\"a\"")], "v1")
                                .into_response(),
                            _ => ([("cache-control", "private")], "mine").into_response(),
                        }
                    }
                }
            }),
        )
        .layer(layer.clone());
    let first = tokio::spawn({
        let app = app.clone();
        async move { get_once(&app, "/r").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Looks the key up before the first answer is stored, waits for it, may not use it,
    // and calls the handler itself; its `private` answer arrives after the entry was stored.
    let second = get_once(&app, "/r").await;
    assert_eq!(first.await.unwrap().body, "v1");
    assert_eq!(second.body, "mine");
    layer.flush().await;
    assert_eq!(layer.stats().uncacheable_marks, 0);
    let third = get_once(&app, "/r").await;
    assert!(
        !third.cache_status.ends_with("detail=hit-for-miss"),
        "the entry was clobbered by a mark: {third:?}"
    );
}
