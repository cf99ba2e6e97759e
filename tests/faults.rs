//! Network faults between `RedisStore` and Redis, injected by a TCP proxy (added latency, a
//! stalled connection, resets, a reply cut midway), over real HTTP: every request is answered
//! by the handler within the operation timeout plus slack, a damaged reply is never served,
//! and caching resumes once the network heals.
#![cfg(feature = "redis")]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use common::fault_proxy::{Fault, FaultProxy};
use common::{fetch, get_until_hit, serve, Counter, RedisServer};
use tower_redis_cache::{CacheLayer, RedisStore};

const OP_TIMEOUT: Duration = Duration::from_millis(100);
const BACKOFF: Duration = Duration::from_millis(200);

/// A guard against a request that hangs on the misbehaving store (the failure mode seen in
/// other crates: 19-30 s). The latency the cache adds is bounded by the operation timeout
/// (100 ms); each test prints the slowest request it measured (100-120 ms here), and the
/// guard sits far enough above it that a loaded 2-core machine cannot trip it.
const BOUND: Duration = Duration::from_secs(5);

/// Size of the `/big/{id}` bodies: large enough that a reply cut at [`CUT_AT`] bytes is cut
/// inside the stored value, well under the layer's 1 MiB body limit.
const BIG: usize = 200 * 1024;
const CUT_AT: usize = 100 * 1024;

/// The handler's body for `/items/{id}`; the same on every call, so a HIT and a MISS can both
/// be checked against it.
fn item_body(id: &str) -> String {
    format!("item {id}")
}

/// The handler's body for `/big/{id}`: [`BIG`] bytes that depend on `id` and on the position,
/// so a truncated, shifted or mixed-up body does not compare equal.
fn big_body(id: u8) -> Vec<u8> {
    (0..BIG).map(|i| (i % 251) as u8 ^ id).collect()
}

struct Rig {
    /// Kept alive for the test; the store talks to it only through the proxy.
    _redis: RedisServer,
    proxy: FaultProxy,
    addr: SocketAddr,
    calls: Counter,
}

/// A redis-server, the proxy in front of it, and an app whose cache reaches Redis only
/// through the proxy.
async fn rig() -> Rig {
    let redis = RedisServer::start();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port()))).await;
    let store = RedisStore::builder(&proxy.url())
        .operation_timeout(OP_TIMEOUT)
        .failure_backoff(BACKOFF)
        .connect()
        .await
        .expect("connect through the proxy");
    let calls = Counter::default();
    let items = calls.clone();
    let big = calls.clone();
    let app = Router::new()
        .route(
            "/items/{id}",
            get(move |Path(id): Path<String>| {
                items.bump();
                async move { item_body(&id) }
            }),
        )
        .route(
            "/big/{id}",
            get(move |Path(id): Path<u8>| {
                big.bump();
                async move { big_body(id) }
            }),
        )
        .layer(CacheLayer::new(store));
    Rig {
        addr: serve(app).await,
        _redis: redis,
        proxy,
        calls,
    }
}

/// How long each fault lasts: several back-off periods, so the store retries the faulty
/// network more than once whatever its back-off policy.
const FAULT_PHASE: Duration = Duration::from_millis(4 * 200 + 100);

/// Primes a cached entry, switches the proxy to `fault`, and sends requests (the cached path
/// and fresh ones in turn, at least 20, for at least [`FAULT_PHASE`]): each must be answered
/// 200 with the handler's body within [`BOUND`]. Then heals the network and checks that a
/// fresh path becomes a HIT.
async fn serves_through(fault: Fault) {
    let rig = rig().await;
    fetch(rig.addr, "/items/primed").await;
    get_until_hit(rig.addr, "/items/primed", &[]).await;

    let injected = rig.proxy.injected();
    rig.proxy.set(fault);
    let phase = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut requests = 0;
    while requests < 20 || phase.elapsed() < FAULT_PHASE {
        let id = if requests % 2 == 0 {
            "primed".to_owned()
        } else {
            format!("fresh-{requests}")
        };
        let started = Instant::now();
        let reply = fetch(rig.addr, &format!("/items/{id}")).await;
        let took = started.elapsed();
        assert_eq!(
            reply.status, 200,
            "request {requests} under {fault:?}: {reply:?}"
        );
        assert_eq!(
            reply.text(),
            item_body(&id),
            "request {requests} under {fault:?}"
        );
        assert!(
            took < BOUND,
            "request {requests} took {took:?} under {fault:?} (bound {BOUND:?})"
        );
        slowest = slowest.max(took);
        requests += 1;
        // Pacing only: spreads the requests over the phase.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let injected = rig.proxy.injected() - injected;
    println!(
        "{fault:?}: slowest of {requests} requests {slowest:?} (bound {BOUND:?}), fault acted \
         {injected} times, handler called {} times",
        rig.calls.get()
    );
    assert!(injected > 0, "the proxy never applied {fault:?}");

    rig.proxy.set(Fault::PassThrough);
    let reply = get_until_hit(rig.addr, "/items/after-heal", &[]).await;
    assert_eq!(reply.text(), item_body("after-heal"));
}

#[tokio::test]
async fn added_latency_serves_every_request_within_the_bound_and_caching_resumes() {
    serves_through(Fault::Latency(Duration::from_millis(30))).await;
}

#[tokio::test]
async fn stalled_connection_serves_every_request_within_the_bound_and_caching_resumes() {
    serves_through(Fault::Stall).await;
}

#[tokio::test]
async fn reset_connections_serve_every_request_within_the_bound_and_caching_resumes() {
    serves_through(Fault::Reset).await;
}

#[tokio::test]
async fn replies_cut_midway_serve_every_request_within_the_bound_and_caching_resumes() {
    // 16 bytes: shorter than any stored entry, so every GET that finds one is cut.
    serves_through(Fault::CutReply(16)).await;
}

/// A cached 200 KB entry whose GET reply is cut halfway: the lookup fails, and the client
/// gets the handler's whole body, never the truncated value; the entry is served again once
/// the network heals.
#[tokio::test]
async fn a_big_entry_cut_midway_is_never_served_truncated() {
    let rig = rig().await;
    let expected = big_body(7);
    fetch(rig.addr, "/big/7").await;
    let hit = get_until_hit(rig.addr, "/big/7", &[]).await;
    assert_eq!(hit.body, expected, "the cached entry round-trips whole");

    let injected = rig.proxy.injected();
    let calls = rig.calls.get();
    rig.proxy.set(Fault::CutReply(CUT_AT));
    let mut slowest = Duration::ZERO;
    let mut misses = 0;
    for i in 0..5 {
        let started = Instant::now();
        let reply = fetch(rig.addr, "/big/7").await;
        let took = started.elapsed();
        assert_eq!(reply.status, 200, "request {i}: {:?}", reply.headers);
        assert_eq!(reply.body.len(), BIG, "request {i}: {:?}", reply.headers);
        assert!(reply.body == expected, "request {i}: the body differs");
        assert!(took < BOUND, "request {i} took {took:?} (bound {BOUND:?})");
        slowest = slowest.max(took);
        // A HIT here is the previous MISS's response, handed over in process by request
        // coalescing (a lookup that failed just before that response was stored may reuse
        // it); it never comes from the cut reply.
        match reply.x_cache() {
            Some("MISS") => misses += 1,
            Some("HIT") => {}
            other => panic!("request {i}: X-Cache {other:?}"),
        }
    }
    let cuts = rig.proxy.injected() - injected;
    println!(
        "CutReply({CUT_AT}) on a {BIG}-byte entry: slowest of 5 {slowest:?}, {cuts} replies \
         cut, {misses} misses"
    );
    assert!(cuts > 0, "no reply was cut");
    assert!(misses > 0, "no request fell through to the handler");
    assert_eq!(
        rig.calls.get() - calls,
        misses,
        "every MISS, and only a MISS, reached the handler"
    );

    rig.proxy.set(Fault::PassThrough);
    let hit = get_until_hit(rig.addr, "/big/7", &[]).await;
    assert!(hit.body == expected, "the entry after healing differs");
}

/// Every connection the store gave up on while the network stalled is closed once the stall
/// ends: after many timed-out operations, the proxy relays no more connections than the
/// store keeps open (one, the default). The proxy cannot see a close while it holds the
/// bytes, so the count during the stall includes every connection opened in it.
#[tokio::test]
async fn connections_abandoned_during_a_stall_are_closed() {
    let rig = rig().await;
    get_until_hit(rig.addr, "/items/primed", &[]).await;
    rig.proxy.set(Fault::Stall);
    let phase = Instant::now();
    let mut requests = 0;
    while requests < 20 || phase.elapsed() < FAULT_PHASE {
        let reply = fetch(rig.addr, &format!("/items/{requests}")).await;
        assert_eq!(reply.status, 200);
        requests += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = rig.proxy.open_connections();
    rig.proxy.set(Fault::PassThrough);
    get_until_hit(rig.addr, "/items/after-heal", &[]).await;

    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.proxy.open_connections() > 1 {
        assert!(
            Instant::now() < deadline,
            "{} connections still open 5 s after the stall ended ({during} during it)",
            rig.proxy.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "Stall: {during} connections open during it, {} after",
        rig.proxy.open_connections()
    );
}

/// Thirty concurrent requests for one cold key while Redis stalls: the lookups time out
/// together and the requests coalesce or call the handler, but every one is answered whole
/// within the bound.
#[tokio::test]
async fn concurrent_requests_for_one_key_in_a_stall_are_all_answered_within_the_bound() {
    let rig = rig().await;
    get_until_hit(rig.addr, "/items/primed", &[]).await;
    let injected = rig.proxy.injected();
    rig.proxy.set(Fault::Stall);
    let expected = big_body(3);
    let addr = rig.addr;
    let mut slowest = Duration::ZERO;
    for round in 0..3 {
        let requests: Vec<_> = (0..30)
            .map(|_| {
                tokio::spawn(async move {
                    let started = Instant::now();
                    let reply = fetch(addr, "/big/3").await;
                    (reply, started.elapsed())
                })
            })
            .collect();
        for request in requests {
            let (reply, took) = request.await.unwrap();
            assert_eq!(reply.status, 200, "round {round}: {:?}", reply.headers);
            assert!(reply.body == expected, "round {round}: the body differs");
            assert!(
                took < BOUND,
                "round {round}: took {took:?} (bound {BOUND:?})"
            );
            slowest = slowest.max(took);
        }
    }
    println!(
        "Stall, 3 rounds of 30 concurrent requests for one key: slowest {slowest:?}, handler \
         called {} times",
        rig.calls.get()
    );
    assert!(rig.proxy.injected() > injected, "the stall never engaged");
}
