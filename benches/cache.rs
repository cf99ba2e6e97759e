//! Micro-benchmarks of the cache's hot path: key building, the entry codec, Cache-Control
//! parsing and request classification, and one full hit through `CacheService` on a
//! `MemoryStore` (next to the same handler without the layer).
//!
//! Run with `cargo bench --features bench-internals --bench cache`; filter with
//! `cargo bench --features bench-internals --bench cache -- hit_path`.
//! The HTTP-level load benchmark is `examples/loadbench.rs` (`scripts/loadbench.sh`).

use std::convert::Infallible;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Full};
use tower::{Layer, Service, ServiceExt};
use tower_redis_cache::__bench as internals;
use tower_redis_cache::__bench::DecodeEveryHit;
use tower_redis_cache::{CacheLayer, MemoryStore, X_CACHE};

/// Headers of a typical JSON API response.
fn response_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    headers.insert(
        "etag",
        HeaderValue::from_static("\"5d41402abc4b2a76b9719d911017c592\""),
    );
    headers.insert(
        "date",
        HeaderValue::from_static("Tue, 15 Nov 1994 08:12:31 GMT"),
    );
    headers
}

/// A JSON body of exactly `len` bytes.
fn json_body(len: usize) -> Bytes {
    let head = br#"{"id":1,"name":"item","data":""#;
    let tail = br#""}"#;
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(head);
    body.resize(len - tail.len(), b'x');
    body.extend_from_slice(tail);
    Bytes::from(body)
}

fn keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    let plain: Uri = "/items/12345".parse().unwrap();
    let query: Uri = "/search?q=tower&page=2&sort=desc&lang=en&limit=50"
        .parse()
        .unwrap();
    group.bench_function("path_only", |b| {
        b.iter(|| {
            internals::base_key(
                black_box("http-cache"),
                &Method::GET,
                "localhost:3000",
                black_box(&plain),
            )
        })
    });
    group.bench_function("query_5_pairs", |b| {
        b.iter(|| {
            internals::base_key(
                black_box("http-cache"),
                &Method::GET,
                "localhost:3000",
                black_box(&query),
            )
        })
    });
    group.finish();
}

fn entry_codec(c: &mut Criterion) {
    let headers = response_headers();
    for (name, len) in [("1KiB", 1024), ("256KiB", 256 * 1024)] {
        let mut group = c.benchmark_group(format!("entry/{name}"));
        group.throughput(Throughput::Bytes(len as u64));
        let body = json_body(len);
        // The recorder hands the body over as the chunks it streamed in: one for a small
        // body, 16 KiB frames for a large one.
        let chunks: Vec<Bytes> = (0..len)
            .step_by(16 * 1024)
            .map(|start| body.slice(start..(start + 16 * 1024).min(len)))
            .collect();
        let ttl = Duration::from_secs(60);
        group.bench_function("encode", |b| {
            b.iter(|| internals::encode(StatusCode::OK, &headers, black_box(&chunks), 1, ttl))
        });
        let encoded = internals::encode(StatusCode::OK, &headers, &chunks, 1, ttl);
        group.bench_function("decode", |b| {
            // Cloning `Bytes` is a reference count; decoding slices it without copying.
            b.iter(|| internals::decode(black_box(encoded.clone())))
        });
        group.finish();
    }
}

fn policy(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    let response = response_headers();
    group.bench_function("parse_cache_control", |b| {
        b.iter(|| internals::parse_cache_control(black_box(&response)))
    });
    let mut long = HeaderMap::new();
    long.insert(
        CACHE_CONTROL,
        HeaderValue::from_static(
            "public, max-age=300, s-maxage=600, stale-while-revalidate=30, \
             stale-if-error=\"86400\", must-revalidate, no-transform",
        ),
    );
    group.bench_function("parse_cache_control_long", |b| {
        b.iter(|| internals::parse_cache_control(black_box(&long)))
    });
    let rules = internals::BenchRules::default();
    let mut request = HeaderMap::new();
    request.insert("host", HeaderValue::from_static("example.com"));
    request.insert("accept", HeaderValue::from_static("application/json"));
    request.insert("user-agent", HeaderValue::from_static("wrk"));
    group.bench_function("classify_request", |b| {
        b.iter(|| internals::classify_request(&rules, &Method::GET, black_box(&request)))
    });
    group.finish();
}

/// One request through the service and its body read to the end, as hyper would.
async fn roundtrip<S, B>(svc: &mut S, path: &'static str) -> usize
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let request = Request::get(path).body(Empty::new()).unwrap();
    let response = svc.ready().await.unwrap().call(request).await.unwrap();
    response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .len()
}

/// Requests `/items/1` until it is a hit: the miss stores it from a spawned task once the
/// body has ended.
fn prime<S>(rt: &tokio::runtime::Runtime, svc: &mut S)
where
    S: Service<
        Request<Empty<Bytes>>,
        Response = Response<tower_redis_cache::CacheBody<Full<Bytes>>>,
    >,
    S::Error: std::fmt::Debug,
{
    rt.block_on(async {
        for _ in 0..1000 {
            let request = Request::get("/items/1").body(Empty::new()).unwrap();
            let response = svc.ready().await.unwrap().call(request).await.unwrap();
            let hit = response.headers().get(X_CACHE) == Some(&HeaderValue::from_static("HIT"));
            response.into_body().collect().await.unwrap();
            if hit {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the entry was never stored");
    });
}

fn hit_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = json_body(1024);
    let handler = tower::service_fn(move |_req: Request<Empty<Bytes>>| {
        let body = body.clone();
        async move {
            let mut response = Response::new(Full::new(body));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok::<_, Infallible>(response)
        }
    });
    let mut cached = CacheLayer::new(MemoryStore::new()).layer(handler.clone());
    let mut decoding = CacheLayer::new(DecodeEveryHit(MemoryStore::new())).layer(handler.clone());
    prime(&rt, &mut cached);
    prime(&rt, &mut decoding);

    let mut group = c.benchmark_group("hit_path");
    group.throughput(Throughput::Elements(1));
    let bare = handler;
    group.bench_function("handler_without_layer", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = bare.clone();
            async move { roundtrip(&mut svc, "/items/1").await }
        })
    });
    group.bench_function("memory_store_hit", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = cached.clone();
            async move { roundtrip(&mut svc, "/items/1").await }
        })
    });
    // The same hit decoding the stored bytes each time (a store without a memo slot).
    group.bench_function("memory_store_hit_decoding", |b| {
        b.to_async(&rt).iter(|| {
            let mut svc = decoding.clone();
            async move { roundtrip(&mut svc, "/items/1").await }
        })
    });
    // The miss path without the store write's cost: a fresh key each time would grow the
    // store, so measure a request the layer passes through (POST) as the layer's floor.
    group.bench_function("layer_passthrough_post", |b| {
        b.to_async(&rt).iter_batched(
            || cached.clone(),
            |mut svc| async move {
                let request = Request::post("/items/1").body(Empty::new()).unwrap();
                let response = svc.ready().await.unwrap().call(request).await.unwrap();
                response
                    .into_body()
                    .collect()
                    .await
                    .unwrap()
                    .to_bytes()
                    .len()
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, keys, entry_codec, policy, hit_path);
criterion_main!(benches);
