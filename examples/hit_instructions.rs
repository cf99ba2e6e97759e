//! Instructions per request of an in-process hit, next to the bare handler: a measure of the
//! hit path that machine noise does not move (callgrind counts instructions, not seconds).
//!
//! ```text
//! scripts/hit_instructions.sh          # builds this, runs each mode under callgrind, prints
//!                                      # instructions per request and the difference
//! cargo run --release --features bench-internals --example hit_instructions -- memory 100000 1000  # one mode over 1,000
//!                                      # ids (default 1), no valgrind
//! ```
//!
//! Modes: `bare` (the handler alone), `memory` (the layer on `MemoryStore`, every request a
//! hit), `decoding` (the same on a store without a memo slot, so every hit decodes). Each
//! request is built, sent through the service on a current-thread runtime and its body read
//! to the end, as in `benches/cache.rs`'s `hit_path` group.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use tower::{Layer, Service, ServiceExt};
use tower_redis_cache::__bench::DecodeEveryHit;
use tower_redis_cache::{CacheLayer, MemoryStore, X_CACHE};

/// Sends `/items/{id}` through `svc`, reads the body, and says whether it was a hit.
async fn roundtrip<S, B>(svc: &mut S, id: u64) -> bool
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let request = Request::get(format!("/items/{id}"))
        .body(Empty::new())
        .unwrap();
    let response = svc.ready().await.unwrap().call(request).await.unwrap();
    let hit = response.headers().get(X_CACHE) == Some(&HeaderValue::from_static("HIT"));
    response.into_body().collect().await.unwrap();
    hit
}

/// Primes the cache with `ids` entries (a miss stores from a spawned task), then sends `n`
/// requests cycling over them, which must all be hits.
async fn run_cached<S, B>(mut svc: S, n: u64, ids: u64)
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    for id in 0..ids {
        let mut primed = false;
        for _ in 0..1000 {
            if roundtrip(&mut svc, id).await {
                primed = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(primed, "entry {id} was never stored");
    }
    for i in 0..n {
        let hit = roundtrip(&mut svc, i % ids).await;
        assert!(hit, "every request after priming is a hit");
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "memory".to_owned());
    let n: u64 = args.next().map_or(100_000, |n| n.parse().expect("a count"));
    let ids: u64 = args
        .next()
        .map_or(1, |n| n.parse().expect("a number of ids"));
    let body = Bytes::from(vec![b'x'; 1024]);
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        match mode.as_str() {
            "bare" => {
                // The same round trip as the hit modes, `X-Cache` check included, so that
                // the difference is the layer's work alone.
                let mut svc = handler;
                for i in 0..n {
                    roundtrip(&mut svc, i % ids).await;
                }
            }
            "memory" => {
                let svc = CacheLayer::new(MemoryStore::new()).layer(handler);
                run_cached(svc, n, ids).await;
            }
            "decoding" => {
                let svc = CacheLayer::new(DecodeEveryHit(MemoryStore::new())).layer(handler);
                run_cached(svc, n, ids).await;
            }
            other => panic!("unknown mode {other}: bare, memory or decoding"),
        }
    });
}
