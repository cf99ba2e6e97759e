//! A cold-key burst with and without stampede protection: handler calls and latency.
//!
//! ```sh
//! cargo run --release --example stampede_bench            # in-memory store
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --release --example stampede_bench
//! ```
//!
//! Fires `BURST` (default 500) concurrent GETs at one cold URL over real HTTP (loopback),
//! whose handler takes 50 ms (a database query), once with the default layer (coalescing on)
//! and once with `.coalesce(false)`; prints the handler calls and p50 / p99 / max latency.
//! With `REDIS_URL` set it also runs two "instances" (separate pools) with
//! `.lock_across_instances(true)`, and then answers that cannot be stored: 4 instances with
//! the lock, a handler of 200 ms answering `private`, `no-store` or `500`, two bursts of 40
//! requests (wall time of each burst, handler calls).
//!
//! Last, a hot key with a 1 s TTL under steady load (`HOT_SECS`, default 30 s, 16 clients in a
//! loop) with and without `.refresh_ahead(0.8)`: handler calls, requests that waited for the
//! handler (the layer's misses and coalesced waiters, from its stats), requests that took at
//! least half the handler's time (on a busy machine, scheduling alone can do that), p99.
//! Loopback only; bounded in time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower_redis_cache::{CacheLayer, MemoryStore, RedisStore, Store};

const HANDLER_TIME: Duration = Duration::from_millis(50);

async fn serve(layer: CacheLayer, calls: Arc<AtomicUsize>) -> std::net::SocketAddr {
    serve_answer(layer, calls, HANDLER_TIME, Answer::Storable).await
}

/// What the handler answers.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// A plain 200 the route stores for its TTL.
    Storable,
    /// 200 with `Cache-Control: private`.
    Private,
    /// 200 with `Cache-Control: no-store`.
    NoStore,
    /// 500.
    Error,
}

async fn serve_answer(
    layer: CacheLayer,
    calls: Arc<AtomicUsize>,
    delay: Duration,
    answer: Answer,
) -> std::net::SocketAddr {
    use axum::response::IntoResponse;
    let app = Router::new()
        .route(
            "/hot",
            get(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    tokio::time::sleep(delay).await;
                    let body = "expensive result";
                    match answer {
                        Answer::Storable => body.into_response(),
                        Answer::Private => ([("cache-control", "private")], body).into_response(),
                        Answer::NoStore => ([("cache-control", "no-store")], body).into_response(),
                        Answer::Error => {
                            (axum::http::StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
                        }
                    }
                }
            }),
        )
        .layer(layer);
    listen(app).await
}

/// Sends `n` concurrent GETs spread over `addrs`; returns each request's latency.
async fn burst(addrs: &[std::net::SocketAddr], n: usize) -> Vec<Duration> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let uri = format!("http://{}/hot", addrs[i % addrs.len()]);
            tokio::spawn(async move {
                let started = Instant::now();
                let response = client.get(uri.parse().unwrap()).await.expect("request");
                response.into_body().collect().await.expect("body");
                started.elapsed()
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(n);
    for task in tasks {
        latencies.push(task.await.unwrap());
    }
    latencies.sort();
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn run(name: &str, layers: Vec<CacheLayer>, n: usize) {
    let calls = Arc::new(AtomicUsize::new(0));
    let mut addrs = Vec::new();
    for layer in layers {
        addrs.push(serve(layer, calls.clone()).await);
    }
    let latencies = burst(&addrs, n).await;
    println!(
        "| {name:<44} | {:>13} | {:>8.1?} | {:>8.1?} | {:>8.1?} |",
        calls.load(Ordering::SeqCst),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::var("BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let redis_url = std::env::var("REDIS_URL").ok();
    let store = || async {
        match &redis_url {
            Some(url) => {
                let store = RedisStore::connect(url)
                    .await
                    .expect("connect to REDIS_URL");
                Arc::new(store) as Arc<dyn Store>
            }
            None => Arc::new(MemoryStore::new()) as Arc<dyn Store>,
        }
    };
    println!(
        "{n} concurrent GETs on one cold key, handler takes {HANDLER_TIME:?}, store: {}",
        if redis_url.is_some() {
            "Redis"
        } else {
            "memory"
        }
    );
    println!(
        "| {:<44} | handler calls | {:>8} | {:>8} | {:>8} |",
        "setup", "p50", "p99", "max"
    );
    println!(
        "|{:-<46}|{:-<15}|{:-<10}|{:-<10}|{:-<10}|",
        "", "", "", "", ""
    );
    // Each burst uses its own key prefix (unique to this run too), so every burst starts cold.
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    // The instances listen on their own ports, so the host (which clients name) is not keyed:
    // they stand for instances behind one name.
    let layer = |store, name: &str| {
        CacheLayer::with_shared_store(store)
            .key_prefix(format!("stampede-bench:{run_id}:{name}"))
            .key_host(false)
    };
    run(
        "no protection (.coalesce(false))",
        vec![layer(store().await, "a").coalesce(false)],
        n,
    )
    .await;
    run(
        "in-process coalescing (default)",
        vec![layer(store().await, "b")],
        n,
    )
    .await;
    if redis_url.is_some() {
        let two = vec![layer(store().await, "c"), layer(store().await, "c")];
        run("2 instances, in-process coalescing only", two, n).await;
        let two = vec![
            layer(store().await, "d").lock_across_instances(true),
            layer(store().await, "d").lock_across_instances(true),
        ];
        run("2 instances, .lock_across_instances(true)", two, n).await;

        println!();
        println!(
            "answers that cannot be stored: 4 instances, lock on, handler 200 ms, 2 bursts of 40"
        );
        println!("| answer    | first burst | second burst | handler calls |");
        println!("|-----------|-------------|--------------|---------------|");
        for (name, answer) in [
            ("storable", Answer::Storable),
            ("private", Answer::Private),
            ("no-store", Answer::NoStore),
            ("500", Answer::Error),
        ] {
            let calls = Arc::new(AtomicUsize::new(0));
            let mut addrs = Vec::new();
            for _ in 0..4 {
                let layer = layer(store().await, &format!("u-{name}")).lock_across_instances(true);
                let delay = Duration::from_millis(200);
                addrs.push(serve_answer(layer, calls.clone(), delay, answer).await);
            }
            let started = Instant::now();
            burst(&addrs, 40).await;
            let first = started.elapsed();
            let started = Instant::now();
            burst(&addrs, 40).await;
            let second = started.elapsed();
            let calls = calls.load(Ordering::SeqCst);
            let (first, second) = (first.as_millis(), second.as_millis());
            println!("| {name:<9} | {first:>9} ms | {second:>10} ms | {calls:>13} |");
        }
    }
    // refresh-ahead rows (absent from runs of older versions)
    hot_key(&store, &layer).await;
    if redis_url.is_some() {
        failing_origin(&store, &layer).await;
    }
    slow_origin(&store, &layer).await;
    Ok(())
}

/// 16 clients in a loop on `addrs` for `secs`; every latency, sorted, and the statuses seen.
async fn load(addrs: &[std::net::SocketAddr], secs: f64) -> (Vec<Duration>, Vec<u16>) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let clients: Vec<_> = (0..16)
        .map(|i| {
            let client = client.clone();
            let uri: hyper::Uri = format!("http://{}/hot", addrs[i % addrs.len()])
                .parse()
                .unwrap();
            tokio::spawn(async move {
                let (mut latencies, mut statuses) = (Vec::new(), Vec::new());
                while Instant::now() < until {
                    let started = Instant::now();
                    let response = client.get(uri.clone()).await.expect("request");
                    statuses.push(response.status().as_u16());
                    response.into_body().collect().await.expect("body");
                    latencies.push(started.elapsed());
                }
                (latencies, statuses)
            })
        })
        .collect();
    let (mut latencies, mut statuses) = (Vec::new(), Vec::new());
    for c in clients {
        let (l, s) = c.await.unwrap();
        latencies.extend(l);
        statuses.extend(s);
    }
    latencies.sort();
    statuses.sort_unstable();
    statuses.dedup();
    (latencies, statuses)
}

/// An origin that fails after the first call, behind 4 instances with the lock, a stale copy
/// and the default fail-safe throttle (5 s): 12 s of load after expiry.
async fn failing_origin<F, Fut>(store: &F, layer: &impl Fn(Arc<dyn Store>, &str) -> CacheLayer)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let mut addrs = Vec::new();
    let mut layers = Vec::new();
    for _ in 0..4 {
        let route = layer(store().await, "failing")
            .ttl(Duration::from_secs(1))
            .stale_if_error(Duration::from_secs(60))
            .lock_across_instances(true);
        layers.push(route.clone());
        addrs.push(serve_failing(route, calls.clone()).await);
    }
    fill(addrs[0]).await;
    for route in &layers {
        route.flush().await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (latencies, statuses) = load(&addrs, 12.0).await;
    let served_stale: u64 = layers
        .iter()
        .map(|l| {
            let s = l.stats();
            s.stale_if_error + s.fail_safe
        })
        .sum();
    println!();
    println!("a failing origin (500 after the first call), 4 instances, lock on, stale-if-error, fail-safe throttle 5 s, 12 s of load after expiry");
    println!(
        "| requests | served stale | statuses | origin calls after expiry |      p99 |      max |"
    );
    println!(
        "|----------|--------------|----------|---------------------------|----------|----------|"
    );
    println!(
        "| {:>8} | {served_stale:>12} | {statuses:?} | {:>25} | {:>8.1?} | {:>8.1?} |",
        latencies.len(),
        calls.load(Ordering::SeqCst) - 1,
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
}

async fn serve_failing(layer: CacheLayer, calls: Arc<AtomicUsize>) -> std::net::SocketAddr {
    use axum::response::IntoResponse;
    let app = Router::new()
        .route(
            "/hot",
            get(move || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match n {
                        0 => "expensive result".into_response(),
                        _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        )
        .layer(layer);
    listen(app).await
}

/// An origin that slows to 1 s after the first call, with a stale copy and
/// `.soft_timeout(100 ms)`: 5 s of load after expiry.
async fn slow_origin<F, Fut>(store: &F, layer: &impl Fn(Arc<dyn Store>, &str) -> CacheLayer)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    let calls = Arc::new(AtomicUsize::new(0));
    let route = layer(store().await, "slow")
        .ttl(Duration::from_secs(5))
        .stale_if_error(Duration::from_secs(60))
        .soft_timeout(Duration::from_millis(100));
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/hot",
            get(move || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    "expensive result"
                }
            }),
        )
        .layer(route.clone());
    let addr = listen(app).await;
    fill(addr).await;
    route.flush().await;
    tokio::time::sleep(Duration::from_millis(5100)).await;
    let (latencies, _) = load(&[addr], 5.0).await;
    let stats = route.stats();
    let over = latencies
        .iter()
        .filter(|l| **l > Duration::from_millis(150))
        .count();
    println!();
    println!(
        "an origin that slows to 1 s, stale copy, .soft_timeout(100 ms), 5 s of load after expiry"
    );
    println!("| requests | answered at the soft timeout | took > 150 ms | origin calls after expiry |      p99 |      max |");
    println!("|----------|------------------------------|---------------|---------------------------|----------|----------|");
    println!(
        "| {:>8} | {:>28} | {over:>13} | {:>25} | {:>8.1?} | {:>8.1?} |",
        latencies.len(),
        stats.soft_timeouts,
        calls.load(Ordering::SeqCst) - 1,
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
    );
}

/// A hot key with a 1 s TTL under steady load, with and without refresh ahead.
async fn hot_key<F, Fut>(store: &F, layer: &impl Fn(Arc<dyn Store>, &str) -> CacheLayer)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Arc<dyn Store>>,
{
    let secs: u64 = std::env::var("HOT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    println!();
    println!("a hot key, TTL 1 s, handler {HANDLER_TIME:?}, 16 clients in a loop for {secs} s");
    println!(
        "| setup                   | requests | handler calls | waited for the handler | took >= 25 ms |      p99 |      max |"
    );
    println!(
        "|-------------------------|----------|---------------|------------------------|---------------|----------|----------|"
    );
    for (name, ahead) in [("TTL only", None), (".refresh_ahead(0.8)", Some(0.8))] {
        let mut route = layer(store().await, &format!("hot-{name}")).ttl(Duration::from_secs(1));
        if let Some(fraction) = ahead {
            route = route.refresh_ahead(fraction);
        }
        let calls = Arc::new(AtomicUsize::new(0));
        let addr = serve(route.clone(), calls.clone()).await;
        let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri: hyper::Uri = format!("http://{addr}/hot").parse().unwrap();
        // Warm: the first request fills the entry.
        client
            .get(uri.clone())
            .await
            .unwrap()
            .into_body()
            .collect()
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(secs);
        let clients: Vec<_> = (0..16)
            .map(|_| {
                let (client, uri) = (client.clone(), uri.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < until {
                        let started = Instant::now();
                        let response = client.get(uri.clone()).await.expect("request");
                        response.into_body().collect().await.expect("body");
                        latencies.push(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for c in clients {
            latencies.extend(c.await.unwrap());
        }
        latencies.sort();
        let slow = latencies.iter().filter(|l| **l >= HANDLER_TIME / 2).count();
        let stats = route.stats();
        // Less the request that filled the entry.
        let waited = (stats.misses + stats.coalesced).saturating_sub(1);
        println!(
            "| {name:<23} | {:>8} | {:>13} | {waited:>22} | {slow:>13} | {:>8.1?} | {:>8.1?} |",
            latencies.len(),
            calls.load(Ordering::SeqCst) - 1,
            percentile(&latencies, 0.99),
            latencies[latencies.len() - 1],
        );
    }
}

/// Serves `app` on a free loopback port.
async fn listen(app: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// One GET of `/hot` at `addr`, read to its end: fills the entry.
async fn fill(addr: std::net::SocketAddr) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri: hyper::Uri = format!("http://{addr}/hot").parse().unwrap();
    let response = client.get(uri).await.unwrap();
    response.into_body().collect().await.unwrap();
}
