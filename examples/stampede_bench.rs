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
//! `.lock_across_instances(true)`. Loopback only; bounded to a few seconds.

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
    let app = Router::new()
        .route(
            "/hot",
            get(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async {
                    tokio::time::sleep(HANDLER_TIME).await;
                    "expensive result"
                }
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
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
    let layer = |store, name: &str| {
        CacheLayer::with_shared_store(store).key_prefix(format!("stampede-bench:{run_id}:{name}"))
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
    }
    Ok(())
}
