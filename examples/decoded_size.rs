//! Measures what the layer's decoded form of a stored response costs beside its bytes in
//! `MemoryStore` (the memo slot a hit fills), for responses of several shapes: the live heap
//! bytes the first hit leaves behind, counted by a global allocator. `MemoryStore`'s byte bound
//! charges each value an estimate of this (`src/store/memory.rs`, `decoded_estimate`); this is
//! how its figures were measured.
//!
//! `cargo run --example decoded_size --features memory`

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use tower::{Layer, Service, ServiceExt};
use tower_redis_cache::{CacheLayer, MemoryStore, X_CACHE};

/// The system allocator, counting the bytes it has handed out and not yet taken back.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call forwards to the system allocator with the caller's arguments.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        LIVE.fetch_add(size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Sends `/x` through `svc`, reads the body, and says whether it was a hit.
async fn roundtrip<S, B>(svc: &mut S) -> bool
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let request = Request::get("/x").body(Empty::new()).unwrap();
    let response = svc.ready().await.unwrap().call(request).await.unwrap();
    let hit = response.headers().get(X_CACHE) == Some(&HeaderValue::from_static("HIT"));
    response.into_body().collect().await.unwrap();
    hit
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // (headers, bytes per header value, body bytes)
    let shapes = [
        (1, 16, 10),
        (1, 16, 1024),
        (4, 24, 1024),
        (8, 30, 1024),
        (16, 30, 1024),
        (8, 30, 65536),
        (32, 30, 200),
        (8, 200, 200),
    ];
    for (headers, value_len, body_len) in shapes {
        let store = MemoryStore::new();
        let layer = CacheLayer::new(store.clone());
        let body = Bytes::from(vec![b'x'; body_len]);
        let handler = tower::service_fn(move |_: Request<Empty<Bytes>>| {
            let body = body.clone();
            async move {
                let mut response = Response::new(Full::new(body));
                let map = response.headers_mut();
                map.insert("content-type", HeaderValue::from_static("application/json"));
                for i in 1..headers {
                    map.insert(
                        HeaderName::try_from(format!("x-header-{i}")).unwrap(),
                        HeaderValue::try_from("v".repeat(value_len)).unwrap(),
                    );
                }
                Ok::<_, Infallible>(response)
            }
        });
        let mut svc = layer.clone().layer(handler);
        assert!(!roundtrip(&mut svc).await, "the first request is a miss");
        layer.flush().await;
        let weighed = store.stats().weighted_bytes;
        let before = LIVE.load(Ordering::Relaxed);
        assert!(roundtrip(&mut svc).await, "the stored response is hit");
        let decoded = LIVE.load(Ordering::Relaxed) - before;
        assert!(roundtrip(&mut svc).await);
        let again = LIVE.load(Ordering::Relaxed) - before - decoded;
        println!(
            "{headers:>2} headers of {value_len:>3} B, body {body_len:>6} B: entry weighed \
             {weighed:>6} B, decoded form {decoded:>5} B (a second hit adds {again} B)"
        );
    }
}
