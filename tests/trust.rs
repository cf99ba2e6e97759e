//! Trust under hostile input: the nine reproductions of issue 9, each over real HTTP
//! (axum/hyper) on both stores, plus the keying opt-ins that go with them.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::OriginalUri;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use bytes::{BufMut, Bytes, BytesMut};
use common::{fetch, get_until_hit, http_key, send, serve, Counter, RedisServer};
use tower_redis_cache::{CacheLayer, MemoryStore, RedisStore, Store};

/// A store under test, and the redis-server behind it (if any), kept alive with it.
struct Backend {
    name: &'static str,
    store: Arc<dyn Store>,
    _redis: Option<RedisServer>,
}

/// The two stores every reproduction runs on. The Redis store has a generous operation
/// timeout, so a loaded machine cannot turn an expected HIT into a MISS.
async fn backends() -> Vec<Backend> {
    let redis = RedisServer::start();
    let store = RedisStore::builder(&redis.url())
        .operation_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect("connect to test redis");
    vec![
        Backend {
            name: "memory",
            store: Arc::new(MemoryStore::new()),
            _redis: None,
        },
        Backend {
            name: "redis",
            store: Arc::new(store),
            _redis: Some(redis),
        },
    ]
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned()
}

// 1. Key collision through `:`.
#[tokio::test]
async fn a_colon_in_the_path_cannot_poison_another_urls_entry() {
    for backend in backends().await {
        let app = Router::new()
            .route(
                "/api/search",
                get(|uri: Uri| async move { format!("results for {}", uri.query().unwrap_or("")) }),
            )
            .fallback(|uri: Uri| async move { format!("<html>fallback for {}</html>", uri.path()) })
            .layer(CacheLayer::with_shared_store(backend.store.clone()));
        let addr = serve(app).await;
        let poison = get_until_hit(addr, "/api/search:q=tag?rust", &[]).await;
        assert!(
            poison.text().starts_with("<html>fallback"),
            "{}",
            backend.name
        );
        let victim = fetch(addr, "/api/search?q=tag:rust").await;
        assert_eq!(victim.x_cache(), Some("MISS"), "{}", backend.name);
        assert_eq!(victim.text(), "results for q=tag:rust", "{}", backend.name);
    }
}

/// Renders the page of the tenant named by the `Host` header.
fn tenant_app(layer: CacheLayer, calls: Counter) -> Router {
    Router::new()
        .route(
            "/",
            get(move |headers: HeaderMap| {
                calls.bump();
                async move { format!("tenant {}", header(&headers, "host")) }
            }),
        )
        .layer(layer)
}

// 2. Host is in the key (Host header and absolute-form targets).
#[tokio::test]
async fn tenants_on_different_hosts_never_get_each_others_pages() {
    for backend in backends().await {
        let calls = Counter::default();
        let layer = CacheLayer::with_shared_store(backend.store.clone());
        let addr = serve(tenant_app(layer, calls.clone())).await;
        let a = get_until_hit(addr, "/", &[("host", "a.example")]).await;
        assert_eq!(a.text(), "tenant a.example", "{}", backend.name);
        let b = send(addr, Method::GET, "/", &[("host", "b.example")]).await;
        assert_eq!(b.text(), "tenant b.example", "{}", backend.name);
        assert_eq!(b.x_cache(), Some("MISS"), "{}", backend.name);
        // Absolute-form targets name their host in the request line.
        let a_abs = raw_get(addr, "http://A.example/", "a.example").await;
        assert!(a_abs.contains("tenant a.example"), "{a_abs}");
        assert!(
            a_abs.to_ascii_lowercase().contains("x-cache: hit"),
            "{a_abs}"
        );
        let c_abs = raw_get(addr, "http://c.example/", "c.example").await;
        assert!(c_abs.contains("tenant c.example"), "{c_abs}");
        assert!(
            c_abs.to_ascii_lowercase().contains("x-cache: miss"),
            "{c_abs}"
        );
    }
}

/// The reproduction: one anonymous request whose absolute-form target names the
/// victim's host and whose `Host` names the attacker's. The app renders from `Host`; the
/// response must never be stored under the victim's key.
#[tokio::test]
async fn a_target_and_host_that_disagree_never_poison_either_hosts_entry() {
    for backend in backends().await {
        let calls = Counter::default();
        let layer = CacheLayer::with_shared_store(backend.store.clone());
        let addr = serve(tenant_app(layer.clone(), calls.clone())).await;
        for _ in 0..2 {
            let attack = raw_get(addr, "http://victim.example/", "attacker.example").await;
            let lower = attack.to_ascii_lowercase();
            assert!(attack.contains("tenant attacker.example"), "{attack}");
            assert!(lower.contains("x-cache: bypass"), "{attack}");
            assert!(lower.contains("detail=authority-mismatch"), "{attack}");
            layer.flush().await;
        }
        for host in ["victim.example", "attacker.example"] {
            let reply = send(addr, Method::GET, "/", &[("host", host)]).await;
            assert_eq!(reply.text(), format!("tenant {host}"), "{}", backend.name);
            assert_eq!(reply.x_cache(), Some("MISS"), "{}", backend.name);
        }
        let absolute = raw_get(addr, "http://victim.example/", "victim.example").await;
        assert!(absolute.contains("tenant victim.example"), "{absolute}");
        assert_eq!(layer.stats().bypass.authority_mismatch, 2);
    }
}

/// Renders links from the forwarded host and scheme, as an app using axum-extra's `Host` and
/// `Scheme` extractors does.
fn link_app(layer: CacheLayer, calls: Counter) -> Router {
    Router::new()
        .route(
            "/",
            get(move |headers: HeaderMap| {
                calls.bump();
                async move {
                    let forwarded = header(&headers, "forwarded");
                    let host = header(&headers, "x-forwarded-host");
                    let proto = header(&headers, "x-forwarded-proto");
                    format!("link to {proto}://{host} ({forwarded})")
                }
            }),
        )
        .layer(layer)
}

#[tokio::test]
async fn forwarded_host_and_scheme_are_keyed_unless_the_route_opts_out() {
    for backend in backends().await {
        let calls = Counter::default();
        let layer = CacheLayer::with_shared_store(backend.store.clone());
        let addr = serve(link_app(layer, calls.clone())).await;
        let plain = get_until_hit(addr, "/", &[]).await;
        assert_eq!(plain.text(), "link to -://- (-)");
        let forged: [&[(&str, &str)]; 3] = [
            &[("x-forwarded-host", "evil.example")],
            &[("x-forwarded-proto", "gopher")],
            &[("forwarded", "host=evil.example;proto=http")],
        ];
        for headers in forged {
            let reply = send(addr, Method::GET, "/", headers).await;
            assert_eq!(
                reply.x_cache(),
                Some("MISS"),
                "{}: {headers:?}",
                backend.name
            );
            get_until_hit(addr, "/", headers).await;
            let plain = send(addr, Method::GET, "/", &[]).await;
            assert_eq!(plain.text(), "link to -://- (-)", "{}", backend.name);
            assert_eq!(plain.x_cache(), Some("HIT"), "{}", backend.name);
        }
        assert_eq!(calls.get(), 4);
    }
    // Behind a proxy that sets the fields itself, a route may share one entry.
    let calls = Counter::default();
    let layer = CacheLayer::new(MemoryStore::new()).key_forwarded(false);
    let addr = serve(link_app(layer, calls.clone())).await;
    get_until_hit(addr, "/", &[("x-forwarded-proto", "https")]).await;
    let other = send(addr, Method::GET, "/", &[("x-forwarded-proto", "http")]).await;
    assert_eq!(other.x_cache(), Some("HIT"));
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_single_host_app_can_leave_the_host_out_of_the_key() {
    let calls = Counter::default();
    let layer = CacheLayer::new(MemoryStore::new()).key_host(false);
    let addr = serve(tenant_app(layer, calls.clone())).await;
    get_until_hit(addr, "/", &[("host", "a.example")]).await;
    let other = send(addr, Method::GET, "/", &[("host", "www.a.example")]).await;
    assert_eq!(other.x_cache(), Some("HIT"));
    assert_eq!(calls.get(), 1);
}

/// Sends one HTTP/1.1 request with a raw request target and returns the raw response.
async fn raw_get(addr: std::net::SocketAddr, target: &str, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

/// Renders a page from the request's credentials, as most apps do: no `Vary`, no `private`.
fn personal_app(layer: CacheLayer, calls: Counter) -> Router {
    Router::new()
        .route(
            "/me",
            get(move |headers: HeaderMap| {
                calls.bump();
                async move {
                    format!(
                        "cookie {} proxy-auth {}",
                        header(&headers, "cookie"),
                        header(&headers, "proxy-authorization")
                    )
                }
            }),
        )
        .layer(layer)
}

// 3. Cookie-dependent pages are not shared; Proxy-Authorization is a credential.
#[tokio::test]
async fn pages_for_cookies_or_proxy_credentials_are_never_served_to_others() {
    for backend in backends().await {
        let calls = Counter::default();
        let layer = CacheLayer::with_shared_store(backend.store.clone());
        let addr = serve(personal_app(layer, calls.clone())).await;
        for user in ["alice", "bob", "alice"] {
            let cookie = format!("session={user}");
            let reply = send(addr, Method::GET, "/me", &[("cookie", &cookie)]).await;
            assert_eq!(reply.text(), format!("cookie {cookie} proxy-auth -"));
            assert_eq!(reply.x_cache(), Some("BYPASS"), "{}", backend.name);
            assert_eq!(
                reply.header("cache-status"),
                Some("tower-redis-cache; fwd=bypass; detail=cookie")
            );
        }
        for user in ["Basic YWxpY2U6eA==", "Basic Ym9iOng="] {
            let reply = send(addr, Method::GET, "/me", &[("proxy-authorization", user)]).await;
            assert_eq!(reply.text(), format!("cookie - proxy-auth {user}"));
            assert_eq!(reply.x_cache(), Some("BYPASS"), "{}", backend.name);
        }
        assert_eq!(
            calls.get(),
            5,
            "{}: every personal request reached the app",
            backend.name
        );
        // Nothing personal was stored: an anonymous request is a miss.
        assert_eq!(fetch(addr, "/me").await.x_cache(), Some("MISS"));
    }
}

#[tokio::test]
async fn cookie_opt_ins_ignore_key_on_or_cache_regardless() {
    for backend in backends().await {
        let store = backend.store.clone();
        // Ignored cookies do not make a request bypass.
        let calls = Counter::default();
        let layer = CacheLayer::with_shared_store(store.clone())
            .key_prefix("ignore")
            .ignore_cookies(["_ga"]);
        let addr = serve(personal_app(layer, calls.clone())).await;
        get_until_hit(addr, "/me", &[("cookie", "_ga=GA1.1")]).await;
        let other = send(addr, Method::GET, "/me", &[("cookie", "_ga=GA1.2")]).await;
        assert_eq!(other.x_cache(), Some("HIT"), "{}", backend.name);
        let session = [("cookie", "_ga=GA1.1; session=alice")];
        let with_session = send(addr, Method::GET, "/me", &session).await;
        assert_eq!(with_session.x_cache(), Some("BYPASS"), "{}", backend.name);

        // Keyed cookies get an entry per value.
        let calls = Counter::default();
        let layer = CacheLayer::with_shared_store(store.clone())
            .key_prefix("key-on")
            .key_on_cookies(["lang"]);
        let addr = serve(personal_app(layer, calls.clone())).await;
        let en = get_until_hit(addr, "/me", &[("cookie", "lang=en")]).await;
        assert_eq!(en.text(), "cookie lang=en proxy-auth -");
        let fr = send(addr, Method::GET, "/me", &[("cookie", "lang=fr")]).await;
        assert_eq!(fr.text(), "cookie lang=fr proxy-auth -", "{}", backend.name);
        assert_eq!(fr.x_cache(), Some("MISS"));
        let fr = get_until_hit(addr, "/me", &[("cookie", "lang=fr")]).await;
        assert_eq!(fr.text(), "cookie lang=fr proxy-auth -");

        // Cache regardless: the route declares its pages independent of cookies.
        let calls = Counter::default();
        let layer = CacheLayer::with_shared_store(store.clone())
            .key_prefix("all")
            .cache_requests_with_cookies(true);
        let addr = serve(personal_app(layer, calls.clone())).await;
        get_until_hit(addr, "/me", &[("cookie", "session=alice")]).await;
        assert_eq!(calls.get(), 1, "{}", backend.name);
    }
}

// 4. Coalescing never hands waiters a response that needs validation.
#[tokio::test]
async fn coalesced_waiters_never_get_a_no_cache_response_without_validation() {
    for backend in backends().await {
        let calls = Counter::default();
        let counter = calls.clone();
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
        let release = Arc::new(tokio::sync::Notify::new());
        let gate = release.clone();
        let app = Router::new()
            .route(
                "/slow",
                get(move |headers: HeaderMap| {
                    let n = counter.bump();
                    let (entered_tx, gate) = (entered_tx.clone(), gate.clone());
                    async move {
                        // The first call waits until every request has arrived.
                        if n == 1 {
                            let _ = entered_tx.send(());
                            gate.notified().await;
                        }
                        (
                            [("cache-control", "no-cache")],
                            format!("page for {}", header(&headers, "x-user")),
                        )
                    }
                }),
            )
            .layer(CacheLayer::with_shared_store(backend.store.clone()));
        let addr = serve(app).await;
        let first =
            tokio::spawn(
                async move { send(addr, Method::GET, "/slow", &[("x-user", "u0")]).await },
            );
        entered.recv().await.unwrap();
        let others: Vec<_> = (1..3)
            .map(|i| {
                tokio::spawn(async move {
                    let user = format!("u{i}");
                    send(addr, Method::GET, "/slow", &[("x-user", &user)]).await
                })
            })
            .collect();
        // Give the waiters time to join the flight (the assertions hold however long they
        // take; the pause only makes the race the bug needed likely).
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.notify_one();
        assert_eq!(first.await.unwrap().text(), "page for u0");
        for (i, other) in others.into_iter().enumerate() {
            let reply = other.await.unwrap();
            assert_eq!(
                reply.text(),
                format!("page for u{}", i + 1),
                "{}",
                backend.name
            );
            assert_ne!(reply.x_cache(), Some("HIT"), "{}", backend.name);
        }
        assert_eq!(calls.get(), 3, "{}", backend.name);
    }
}

// 5. The raw query is the key.
#[tokio::test]
async fn distinct_queries_never_share_an_entry() {
    for backend in backends().await {
        let app = Router::new()
            .route(
                "/q/{pair}",
                get(|uri: Uri| async move { format!("{:?}", uri.query()) }),
            )
            .layer(CacheLayer::with_shared_store(backend.store.clone()));
        let addr = serve(app).await;
        let pairs = [
            ("/q/1?a=1&b=2", "/q/1?b=2&a=1"),
            ("/q/2?f=x&op=eq&f=y&op=ne", "/q/2?f=x&f=y&op=eq&op=ne"),
            ("/q/3?", "/q/3"),
            ("/q/4?a=1&&b=2&", "/q/4?a=1&b=2"),
        ];
        for (first, second) in pairs {
            get_until_hit(addr, first, &[]).await;
            let reply = fetch(addr, second).await;
            assert_eq!(
                reply.x_cache(),
                Some("MISS"),
                "{}: {second} after {first}",
                backend.name
            );
            let expected = format!("{:?}", second.parse::<Uri>().unwrap().query());
            assert_eq!(reply.text(), expected);
        }
    }
}

#[tokio::test]
async fn query_normalisation_is_an_opt_in() {
    let app = Router::new()
        .route(
            "/q",
            get(|uri: Uri| async move { format!("{:?}", uri.query()) }),
        )
        .layer(
            CacheLayer::new(MemoryStore::new())
                .sort_query(true)
                .ignore_query_params(["utm_*", "fbclid"]),
        );
    let addr = serve(app).await;
    get_until_hit(addr, "/q?b=2&a=1&utm_source=x", &[]).await;
    for same in [
        "/q?a=1&b=2",
        "/q?a=1&fbclid=9&b=2&utm_medium=y",
        "/q?&a=1&&b=2",
    ] {
        assert_eq!(fetch(addr, same).await.x_cache(), Some("HIT"), "{same}");
    }
    assert_eq!(fetch(addr, "/q?a=1&b=3").await.x_cache(), Some("MISS"));
}

// 6. Large directive values are clamped, never an overflow.
#[tokio::test]
async fn huge_directive_values_and_durations_never_panic() {
    const HUGE: &str = "18446744073709551615";
    for backend in backends().await {
        let app = Router::new()
            .route(
                "/r/{case}",
                get(
                    |axum::extract::Path(case): axum::extract::Path<u8>| async move {
                        let cc = match case {
                            0 => format!("max-age=60, stale-if-error={HUGE}"),
                            1 => format!("max-age=60, stale-while-revalidate={HUGE}"),
                            2 => format!("max-age={HUGE}"),
                            _ => format!("max-age=99999999999999999999999999, s-maxage={HUGE}0"),
                        };
                        (
                            [("cache-control", cc), ("etag", "\"v1\"".to_owned())],
                            "body",
                        )
                    },
                ),
            )
            .layer(
                CacheLayer::with_shared_store(backend.store.clone())
                    .stale_if_error(Duration::MAX)
                    .stale_while_revalidate(Duration::MAX)
                    .revalidation_window(Duration::MAX)
                    .lock_ttl(Duration::MAX)
                    .coalesce_timeout(Duration::MAX),
            );
        let addr = serve(app).await;
        for case in 0..4 {
            let hit = get_until_hit(addr, &format!("/r/{case}"), &[]).await;
            assert_eq!(
                (hit.status, hit.text()),
                (StatusCode::OK, "body"),
                "{}",
                backend.name
            );
        }
        // A stored entry claiming a TTL of 2^63 ms or more is not an entry.
        let key = http_key(addr, "GET", "/r/9");
        let forged = forged_entry(200, &[], b"forged", 1 << 63);
        backend
            .store
            .set(&key, forged, Duration::from_secs(60))
            .await
            .unwrap();
        let reply = fetch(addr, "/r/9").await;
        assert_eq!((reply.status, reply.text()), (StatusCode::OK, "body"));
        assert_eq!(reply.x_cache(), Some("MISS"), "{}", backend.name);
    }
}

/// A forged entry: status, headers, body.
type Forged = (u16, &'static [(&'static str, &'static str)], &'static [u8]);

/// An entry in the store's documented binary layout (see `src/entry.rs`), stored now.
fn forged_entry(status: u16, headers: &[(&str, &str)], body: &[u8], ttl_ms: u64) -> Bytes {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let mut buf = BytesMut::new();
    buf.put_slice(b"TRC\x01\x00");
    buf.put_u64(now.as_millis() as u64);
    buf.put_u64(ttl_ms);
    buf.put_u16(status);
    buf.put_u32(headers.len() as u32);
    for (name, value) in headers {
        buf.put_u16(name.len() as u16);
        buf.put_slice(name.as_bytes());
        buf.put_u32(value.len() as u32);
        buf.put_slice(value.as_bytes());
    }
    buf.put_u64(body.len() as u64);
    buf.put_slice(body);
    buf.freeze()
}

// 7. MemoryStore's tag index is bounded with its entries.
#[tokio::test]
async fn memory_store_tag_records_go_with_their_evicted_entries() {
    let store = MemoryStore::builder().max_bytes(64 * 1024).build();
    let app = Router::new()
        .route(
            "/t/{id}",
            get(
                |axum::extract::Path(id): axum::extract::Path<u32>| async move {
                    (
                        [("cache-tag", format!("unique-{id}, all"))],
                        "x".repeat(200),
                    )
                },
            ),
        )
        .layer(CacheLayer::new(store.clone()));
    let addr = serve(app).await;
    for id in 0..3000 {
        fetch(addr, &format!("/t/{id}")).await;
    }
    let entries = store.entry_count() as usize;
    let records = store.tag_records();
    // Each entry is in two tag sets: its own and "all".
    assert!(
        entries < 3000,
        "the 64 KiB bound evicted entries: {entries} left"
    );
    assert!(
        records <= 2 * entries + 64,
        "{records} tag records for {entries} entries"
    );
}

// 8. Stored entries are checked for meaning, and truncated bodies never stored.
#[tokio::test]
async fn entries_a_cache_must_not_replay_are_misses() {
    for backend in backends().await {
        let calls = Counter::default();
        let counter = calls.clone();
        let app = Router::new()
            .route(
                "/e/{case}",
                get(move || {
                    counter.bump();
                    async { "fresh from the app" }
                }),
            )
            .layer(CacheLayer::with_shared_store(backend.store.clone()));
        let addr = serve(app).await;
        let forged: [Forged; 9] = [
            (100, &[], b""),
            (103, &[("link", "</a>; rel=preload")], b""),
            (101, &[("upgrade", "websocket")], b""),
            (
                200,
                &[("transfer-encoding", "chunked")],
                b"5\r\nhello\r\n0\r\n\r\n",
            ),
            (200, &[("connection", "close")], b"hop"),
            (200, &[("content-length", "100")], b"short"),
            (204, &[], b"a body on a 204"),
            (304, &[], b""),
            (206, &[("content-range", "bytes 0-1/10")], b"ab"),
        ];
        for (case, (status, headers, body)) in forged.iter().enumerate() {
            let path = format!("/e/{case}");
            let entry = forged_entry(*status, headers, body, 60_000);
            let key = http_key(addr, "GET", &path);
            backend
                .store
                .set(&key, entry, Duration::from_secs(60))
                .await
                .unwrap();
            let reply = fetch(addr, &path).await;
            assert_eq!(
                (reply.status, reply.text(), reply.x_cache()),
                (StatusCode::OK, "fresh from the app", Some("MISS")),
                "{}: forged {status} {headers:?}",
                backend.name
            );
        }
        assert_eq!(calls.get(), forged.len());
    }
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_never_stored() {
    for backend in backends().await {
        let calls = Counter::default();
        let counter = calls.clone();
        let app = Router::new()
            .route(
                "/liar",
                get(move || {
                    counter.bump();
                    async {
                        // A streamed body (no size hint hyper could check up front) that ends
                        // at 12 of the 100 bytes announced.
                        let body = OneChunk(Some(Bytes::from_static(b"twelve bytes")));
                        let mut response = axum::body::Body::new(body).into_response();
                        response
                            .headers_mut()
                            .insert("content-length", "100".parse().unwrap());
                        response
                    }
                }),
            )
            .route("/ok", get(|| async { "ok" }))
            .layer(CacheLayer::with_shared_store(backend.store.clone()));
        let addr = serve(app).await;
        // hyper cuts the connection when the body ends short; the client sees an error.
        let request = http::Request::get(format!("http://{addr}/liar"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let _ = common::client()
            .request(request)
            .await
            .map(|r| r.into_body());
        // A storable response on the same layer lands; the liar's never does.
        get_until_hit(addr, "/ok", &[]).await;
        let again = raw_get(addr, "/liar", &addr.to_string()).await;
        assert!(
            !again.to_ascii_lowercase().contains("x-cache: hit"),
            "{again}"
        );
        assert_eq!(
            calls.get(),
            2,
            "{}: the short body was not replayed",
            backend.name
        );
    }
}

/// A body of one chunk with no size hint.
struct OneChunk(Option<Bytes>);

impl http_body::Body for OneChunk {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
    }
}

// 9. An oversized write fails alone; it does not trip the back-off for everyone.
#[tokio::test]
async fn a_64_mib_response_does_not_fail_other_requests() {
    const BIG: usize = 64 * 1024 * 1024;
    let redis = RedisServer::start();
    // The default operation timeout (100 ms), under which a 64 MiB SET timed out.
    let redis_store = RedisStore::connect(&redis.url()).await.unwrap();
    let stores: [(&str, Arc<dyn Store>); 2] = [
        ("memory", Arc::new(MemoryStore::new())),
        ("redis", Arc::new(redis_store.clone())),
    ];
    for (name, store) in stores {
        let app = Router::new()
            .route("/big", get(|| async { vec![b'x'; BIG] }))
            .route("/small", get(|| async { "small" }))
            .layer(CacheLayer::with_shared_store(store).max_body_bytes(2 * BIG));
        let addr = serve(app).await;
        get_until_hit(addr, "/small", &[]).await;
        let big = fetch(addr, "/big").await;
        assert_eq!(big.body.len(), BIG, "{name}");
        for _ in 0..20 {
            assert_eq!(fetch(addr, "/small").await.x_cache(), Some("HIT"), "{name}");
        }
    }
    let refused = redis_store
        .set(
            "too-big",
            Bytes::from(vec![0u8; BIG]),
            Duration::from_secs(5),
        )
        .await
        .expect_err("over the write size limit");
    assert_eq!(refused.kind(), tower_redis_cache::ErrorKind::InvalidInput);
    assert_eq!(redis.cmd::<i64>(&["EXISTS", "too-big"]), 0);
    // And the store still works.
    redis_store
        .set("small", Bytes::from_static(b"v"), Duration::from_secs(5))
        .await
        .unwrap();
}

// Nested routers key on the original URI.
#[tokio::test]
async fn routers_nested_under_different_prefixes_never_share_entries() {
    for backend in backends().await {
        let layer = CacheLayer::with_shared_store(backend.store.clone());
        let nested = |name: &'static str| {
            Router::new()
                .route(
                    "/items",
                    get(move |OriginalUri(uri): OriginalUri| async move {
                        format!("{name} {}", uri.path())
                    }),
                )
                .layer(layer.clone())
        };
        let app = Router::new()
            .nest("/a", nested("a"))
            .nest("/b", nested("b"));
        let addr = serve(app).await;
        assert_eq!(
            get_until_hit(addr, "/a/items", &[]).await.text(),
            "a /a/items"
        );
        let b = fetch(addr, "/b/items").await;
        assert_eq!(
            (b.text(), b.x_cache()),
            ("b /b/items", Some("MISS")),
            "{}",
            backend.name
        );
    }
}

// A key function of the user's own.
#[tokio::test]
async fn a_key_function_adds_material_or_declines_the_request() {
    let calls = Counter::default();
    let counter = calls.clone();
    let layer = CacheLayer::new(MemoryStore::new()).key_fn(|head| {
        let tenant = head.headers.get("x-tenant")?.to_str().ok()?;
        Some(tenant.to_owned())
    });
    let app = Router::new()
        .route(
            "/",
            get(move |headers: HeaderMap| {
                counter.bump();
                async move { format!("tenant {}", header(&headers, "x-tenant")) }
            }),
        )
        .layer(layer);
    let addr = serve(app).await;
    get_until_hit(addr, "/", &[("x-tenant", "t1")]).await;
    let t2 = send(addr, Method::GET, "/", &[("x-tenant", "t2")]).await;
    assert_eq!((t2.text(), t2.x_cache()), ("tenant t2", Some("MISS")));
    let none = fetch(addr, "/").await;
    assert_eq!(none.x_cache(), Some("BYPASS"));
    assert_eq!(
        none.header("cache-status"),
        Some("tower-redis-cache; fwd=bypass; detail=no-key")
    );
}

// Durations given to the client are clamped too.
#[tokio::test]
async fn the_client_takes_duration_max_without_panicking() {
    let redis = RedisServer::start();
    let cache = tower_redis_cache::RedisCache::connect(&redis.url())
        .await
        .unwrap()
        .lock_ttl(Duration::MAX)
        .coalesce_timeout(Duration::MAX);
    let value: u32 = cache
        .get_or_insert_with("k", Duration::MAX, || async {
            Ok::<_, tower_redis_cache::Error>(7)
        })
        .await
        .unwrap();
    assert_eq!(value, 7);
    cache.set("s", &1u8, Duration::MAX).await.unwrap();
    assert_eq!(cache.get::<u8>("s").await.unwrap(), Some(1));
}
