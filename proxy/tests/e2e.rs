//! End to end: the `tower-redis-cache-proxy` binary as a real process, in front of a real
//! upstream (an axum app in this test) and, for the shared cache, a real `redis-server` of
//! the test's own (the root crate's harness, `tests/common`).
#![allow(unexpected_cfgs)] // the shared harness names the root crate's features

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/http_rules/table.rs"]
mod table;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use common::{fetch, get_until_hit, send, serve, RedisServer};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const TOKEN: &str = "test-token-0123456789";

// ---------------------------------------------------------------------------------------------
// The proxy process

/// A running proxy, killed (and reaped) on drop, a failed test included.
struct ProxyProcess {
    child: Child,
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    lines: Mutex<mpsc::Receiver<String>>,
}

impl ProxyProcess {
    /// Starts the binary with `env` on a free port (and a free admin port when `admin`);
    /// returns once it listens.
    fn start(env: &[(&str, &str)], admin: bool) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tower-redis-cache-proxy"));
        for name in [
            "UPSTREAM",
            "LISTEN",
            "STORE",
            "REDIS_URL",
            "STORE_TIERED",
            "TRUSTED_PROXIES",
            "LOG_REQUESTS",
            "MAX_CONNECTIONS",
            "ADMIN_LISTEN",
            "ADMIN_TOKEN",
            "CONFIG",
        ] {
            command.env_remove(name);
        }
        command.env("LISTEN", "127.0.0.1:0");
        if admin {
            command
                .env("ADMIN_LISTEN", "127.0.0.1:0")
                .env("ADMIN_TOKEN", TOKEN);
        }
        command.envs(env.iter().copied());
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tower-redis-cache-proxy");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Keeps reading, so the proxy never blocks on a full pipe; ends when it exits.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proxy = ProxyProcess {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: None,
            lines: Mutex::new(rx),
        };
        loop {
            let line = proxy.next_line();
            if let Some(addr) = line.strip_prefix("listening on http://") {
                proxy.addr = addr.parse().expect("a socket address");
            } else if let Some(addr) = line.strip_prefix("admin on http://") {
                proxy.admin = Some(addr.parse().expect("a socket address"));
            } else if line.starts_with("store: ") {
                return proxy;
            }
        }
    }

    fn next_line(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20))
            .expect("the proxy exited or said nothing for 20 s")
    }

    /// Waits for a line starting with `prefix` (blocking: call from `spawn_blocking`).
    fn wait_for_line(&self, prefix: &str) {
        while !self.next_line().starts_with(prefix) {}
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// POSTs to the admin API with the token; returns status and body.
    async fn purge(&self, query: &str) -> (StatusCode, String) {
        let admin = self.admin.expect("started with the admin listener");
        let reply = send(
            admin,
            Method::POST,
            &format!("/purge?{query}"),
            &[("authorization", &format!("Bearer {TOKEN}"))],
        )
        .await;
        (reply.status, reply.text().to_owned())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_proxy(env: Vec<(&'static str, String)>, admin: bool) -> ProxyProcess {
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        ProxyProcess::start(&env, admin)
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The upstream

/// An upstream that counts its calls per path and can hold its answers until released.
#[derive(Clone)]
struct Upstream {
    calls: Arc<Mutex<Vec<String>>>,
    arrived: Arc<tokio::sync::Notify>,
    release: watch::Receiver<bool>,
}

impl Upstream {
    fn calls(&self, path: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }

    fn calls_under(&self, prefix: &str) -> usize {
        let calls = self.calls.lock().unwrap();
        calls.iter().filter(|p| p.starts_with(prefix)).count()
    }

    async fn respond(self, mut req: Request<Body>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        if path == "/ws" {
            return websocket_echo(&mut req);
        }
        if path == "/forwarding" {
            let seen: Vec<String> = [
                "host",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "forwarded",
            ]
            .iter()
            .map(|name| {
                let values: Vec<&str> = req
                    .headers()
                    .get_all(*name)
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect();
                format!("{name}: {}", values.join(" | "))
            })
            .collect();
            return Response::new(Body::from(seen.join("\n")));
        }
        self.calls.lock().unwrap().push(path.clone());
        self.arrived.notify_waiters();
        let mut response = Response::new(Body::empty());
        let headers = response.headers_mut();
        if path.starts_with("/held/") || path.starts_with("/slow/") {
            let mut release = self.release.clone();
            let _ = release.wait_for(|r| *r).await;
        }
        if path.starts_with("/slow/") {
            headers.insert("cache-control", "no-store".parse().unwrap());
            // Big enough to be streamed in several pieces.
            *response.body_mut() = Body::from(format!("{path}\n").repeat(20_000));
            return response;
        }
        headers.insert("cache-control", "max-age=600".parse().unwrap());
        if path.starts_with("/tagged/") {
            headers.insert("cache-tag", "products, red".parse().unwrap());
        }
        let n = self.calls(&path);
        *response.body_mut() = Body::from(format!("{path} #{n}"));
        response
    }
}

fn upstream() -> (Upstream, watch::Sender<bool>, Router) {
    let (release_tx, release) = watch::channel(false);
    let upstream = Upstream {
        calls: Arc::default(),
        arrived: Arc::default(),
        release,
    };
    let app = {
        let upstream = upstream.clone();
        Router::new().fallback_service(tower::service_fn(move |req: Request<Body>| {
            let upstream = upstream.clone();
            async move { Ok::<_, std::convert::Infallible>(upstream.respond(req).await) }
        }))
    };
    (upstream, release_tx, app)
}

// ---------------------------------------------------------------------------------------------
// Two nodes, one Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_entries_and_a_purge_through_one_is_a_miss_on_both() {
    let redis = RedisServer::start();
    let (upstream, _release, app) = upstream();
    let origin = serve(app).await;
    let env = || {
        vec![
            ("UPSTREAM", format!("http://{origin}")),
            ("REDIS_URL", redis.url()),
        ]
    };
    let a = start_proxy(env(), true).await;
    let b = start_proxy(env(), true).await;

    // Stored through A, a hit through B.
    let first = fetch(a.addr, "/page/1").await;
    assert_eq!(
        (first.status, first.x_cache()),
        (StatusCode::OK, Some("MISS"))
    );
    let hit = get_until_hit(b.addr, "/page/1", &[]).await;
    assert_eq!(hit.text(), "/page/1 #1");
    assert_eq!(upstream.calls("/page/1"), 1);

    // Purged by URL through B's admin API: a miss through A and through B.
    let (status, body) = b.purge("url=%2Fpage%2F1").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "{\"purged\":1}\n")
    );
    let after = fetch(a.addr, "/page/1").await;
    assert_eq!(
        (after.x_cache(), after.text()),
        (Some("MISS"), "/page/1 #2")
    );
    get_until_hit(b.addr, "/page/1", &[]).await;
    let (status, _) = a.purge("url=/page/1").await;
    assert_eq!(status, StatusCode::OK);
    let after = fetch(b.addr, "/page/1").await;
    assert_eq!(
        (after.x_cache(), after.text()),
        (Some("MISS"), "/page/1 #3")
    );

    // By tag (the upstream's `Cache-Tag`, which clients never see).
    let tagged = fetch(a.addr, "/tagged/1").await;
    assert_eq!(tagged.header("cache-tag"), None);
    get_until_hit(b.addr, "/tagged/1", &[]).await;
    let (status, body) = a.purge("tag=red").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "{\"purged\":1}\n")
    );
    assert_eq!(fetch(b.addr, "/tagged/1").await.x_cache(), Some("MISS"));

    // By directory prefix: everything under /dir/, nothing else.
    fetch(a.addr, "/dir/x").await;
    fetch(a.addr, "/dir/sub/y").await;
    fetch(a.addr, "/other/z").await;
    for path in ["/dir/x", "/dir/sub/y", "/other/z"] {
        get_until_hit(b.addr, path, &[]).await;
    }
    let (status, body) = b.purge("prefix=/dir/").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "{\"purged\":2}\n")
    );
    assert_eq!(fetch(a.addr, "/dir/x").await.x_cache(), Some("MISS"));
    assert_eq!(fetch(b.addr, "/dir/sub/y").await.x_cache(), Some("MISS"));
    assert_eq!(fetch(a.addr, "/other/z").await.x_cache(), Some("HIT"));
    assert_eq!(upstream.calls_under("/dir/"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_the_token_and_answers_health_and_metrics() {
    let redis = RedisServer::start();
    let (_upstream, _release, app) = upstream();
    let origin = serve(app).await;
    let proxy = start_proxy(
        vec![
            ("UPSTREAM", format!("http://{origin}")),
            ("REDIS_URL", redis.url()),
        ],
        true,
    )
    .await;
    let admin = proxy.admin.unwrap();
    for auth in [
        vec![],
        vec![("authorization", "Bearer wrong-token-0123456789")],
    ] {
        let reply = send(admin, Method::POST, "/purge?tag=x", &auth).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    let (status, body) = proxy.purge("prefix=/no-slash").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(fetch(admin, "/healthz").await.status, StatusCode::OK);
    assert_eq!(fetch(admin, "/readyz").await.status, StatusCode::OK);
    fetch(proxy.addr, "/page/m").await;
    let metrics = fetch(admin, "/metrics").await;
    assert!(
        metrics
            .text()
            .contains("http_cache_requests_total{route=\"/\",outcome=\"miss\"} 1"),
        "{}",
        metrics.text()
    );
    // Not ready while the store does not answer.
    redis.pause();
    let ready = fetch(admin, "/readyz").await;
    redis.resume();
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
}

/// Writes a GET for `path` on a connection of its own; returns the connection to read from.
async fn send_raw(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

async fn read_raw(mut stream: TcpStream) -> String {
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cold_requests_over_two_nodes_cost_one_upstream_call() {
    let redis = RedisServer::start();
    let (upstream, release, app) = upstream();
    let origin = serve(app).await;
    let env = || {
        vec![
            ("UPSTREAM", format!("http://{origin}")),
            ("REDIS_URL", redis.url()),
        ]
    };
    let a = start_proxy(env(), false).await;
    let b = start_proxy(env(), false).await;

    // Every request is on the wire before the upstream answers the first one.
    let mut streams = Vec::new();
    for i in 0..200 {
        let node = if i % 2 == 0 { a.addr } else { b.addr };
        streams.push(send_raw(node, "/held/cold").await);
    }
    let arrived = upstream.arrived.notified();
    if upstream.calls("/held/cold") == 0 {
        arrived.await;
    }
    release.send(true).unwrap();
    let replies: Vec<String> =
        futures_join(streams.into_iter().map(read_raw).collect::<Vec<_>>()).await;
    for reply in &replies {
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        assert!(reply.ends_with("/held/cold #1"), "{reply}");
    }
    assert_eq!(upstream.calls("/held/cold"), 1);
}

async fn futures_join<F: std::future::Future + Send + 'static>(futures: Vec<F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_in_flight_request() {
    let (upstream, release, app) = upstream();
    let origin = serve(app).await;
    let proxy = Arc::new(start_proxy(vec![("UPSTREAM", format!("http://{origin}"))], false).await);

    const N: usize = 40;
    let mut streams = Vec::new();
    for i in 0..N {
        streams.push(send_raw(proxy.addr, &format!("/slow/{i}")).await);
    }
    // Every request is at the upstream, in flight, when the signal comes.
    while upstream.calls_under("/slow/") < N {
        let arrived = upstream.arrived.notified();
        if upstream.calls_under("/slow/") < N {
            arrived.await;
        }
    }
    proxy.terminate();
    let waiting = proxy.clone();
    tokio::task::spawn_blocking(move || waiting.wait_for_line("shutting down"))
        .await
        .unwrap();
    // The listener is closed: no new connection is taken.
    let started = Instant::now();
    loop {
        match TcpStream::connect(proxy.addr).await {
            Err(_) => break,
            Ok(_) if started.elapsed() > Duration::from_secs(5) => {
                panic!("the proxy still accepts connections 5 s after SIGTERM")
            }
            Ok(_) => tokio::task::yield_now().await,
        }
    }
    release.send(true).unwrap();
    let replies = futures_join(streams.into_iter().map(read_raw).collect::<Vec<_>>()).await;
    for (i, reply) in replies.iter().enumerate() {
        assert!(
            reply.starts_with("HTTP/1.1 200"),
            "request {i}: {:.200}",
            reply
        );
        let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
        // Chunked or not, every line of the body arrived.
        let lines = body.matches(&format!("/slow/{i}\n")).count();
        assert_eq!(lines, 20_000, "request {i} lost part of its body");
    }
    let waiting = proxy.clone();
    tokio::task::spawn_blocking(move || waiting.wait_for_line("stopped"))
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Upgrades

/// The upstream's side of a WebSocket (RFC 6455) echo: accepts the handshake, then echoes
/// each frame's payload back unmasked.
fn websocket_echo(req: &mut Request<Body>) -> Response<Body> {
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
        .unwrap_or_default();
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut io = hyper_util::rt::TokioIo::new(upgraded);
        while let Some((opcode, payload)) = read_frame(&mut io).await {
            if opcode == 0x8 {
                break;
            }
            io.write_all(&frame(opcode, &payload, None)).await.unwrap();
        }
    });
    let mut accept_input = key;
    accept_input.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", base64(&sha1(&accept_input)))
        .body(Body::empty())
        .unwrap()
}

fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mut out = vec![
        0x80 | opcode,
        payload.len() as u8 | if mask.is_some() { 0x80 } else { 0 },
    ];
    match mask {
        Some(mask) => {
            out.extend_from_slice(&mask);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

async fn read_frame(io: &mut (impl AsyncReadExt + Unpin)) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[1] & 0x7f);
    assert!(len < 126, "short frames only");
    let mask = if head[1] & 0x80 != 0 {
        let mut mask = [0u8; 4];
        io.read_exact(&mut mask).await.ok()?;
        Some(mask)
    } else {
        None
    };
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await.ok()?;
    if let Some(mask) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((head[0] & 0x0f, payload))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_echo_works_through_the_proxy() {
    let (upstream, _release, app) = upstream();
    let origin = serve(app).await;
    let proxy = start_proxy(vec![("UPSTREAM", format!("http://{origin}"))], false).await;

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nhost: proxy\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n\r\n"
    );
    stream.write_all(handshake.as_bytes()).await.unwrap();
    // The head, byte by byte up to the blank line: what follows is WebSocket frames.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(
            stream
                .read_u8()
                .await
                .expect("the proxy closed during the handshake"),
        );
    }
    let head = String::from_utf8(head).unwrap().to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // RFC 6455's own example: this key's accept value.
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    for message in ["hello", "through the proxy", "and back"] {
        stream
            .write_all(&frame(0x1, message.as_bytes(), Some([1, 2, 3, 4])))
            .await
            .unwrap();
        let (opcode, payload) = read_frame(&mut stream).await.expect("an echo");
        assert_eq!((opcode, payload.as_slice()), (0x1, message.as_bytes()));
    }
    stream
        .write_all(&frame(0x8, b"", Some([0; 4])))
        .await
        .unwrap();
    // Upgrades are tunnelled, never cached or counted as upstream calls of the cache.
    assert_eq!(upstream.calls("/ws"), 0);
}

/// SHA-1 (RFC 3174), for the WebSocket accept value only.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(block[i * 4..i * 4 + 4].try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The HTTP rules table and upstream failures

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_holds_through_the_proxy_binary() {
    let origin = Arc::new(table::Origin::default());
    let origin_addr = serve(origin.clone().router()).await;
    // One proxy for the whole table (rows keep to their own paths).
    // Trusting the test's own address: the `via` row checks that the lists grow.
    let env = vec![
        ("UPSTREAM", format!("http://{origin_addr}")),
        ("TRUSTED_PROXIES", "127.0.0.0/8".to_owned()),
    ];
    let proxy = start_proxy(env, false).await;
    table::run_table(
        table::Through::Proxy,
        proxy.addr,
        origin,
        origin_addr.to_string(),
    )
    .await;
}

/// Any client can send forwarding fields: from a peer that is not trusted they are dropped
/// and replaced, so the upstream never sees a forged client address or host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_fields_from_an_untrusted_peer_are_replaced() {
    let (_upstream, _release, app) = upstream();
    let origin = serve(app).await;
    let forged = [
        ("host", "proxy.example"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("forwarded", "for=6.6.6.6;host=evil.example"),
    ];
    let untrusted = start_proxy(vec![("UPSTREAM", format!("http://{origin}"))], false).await;
    let seen = send(untrusted.addr, Method::GET, "/forwarding", &forged).await;
    assert_eq!(
        seen.text(),
        format!(
            "host: {origin}\nx-forwarded-for: 127.0.0.1\nx-forwarded-host: proxy.example\n\
             x-forwarded-proto: http\nforwarded: for=127.0.0.1;host=\"proxy.example\";proto=http"
        )
    );
    // The same request from a trusted peer keeps them and appends to the lists.
    let env = vec![
        ("UPSTREAM", format!("http://{origin}")),
        ("TRUSTED_PROXIES", "127.0.0.1".to_owned()),
    ];
    let trusted = start_proxy(env, false).await;
    let seen = send(trusted.addr, Method::GET, "/forwarding", &forged).await;
    assert_eq!(
        seen.text(),
        format!(
            "host: {origin}\nx-forwarded-for: 6.6.6.6, 127.0.0.1\nx-forwarded-host: evil.example\n\
             x-forwarded-proto: https\n\
             forwarded: for=6.6.6.6;host=evil.example, for=127.0.0.1;host=\"proxy.example\";proto=http"
        )
    );
}

/// RFC 9110 §15.6.3: a gateway that gets no answer from its upstream says 502, and labels it
/// as its own error, never as a cache miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_a_502_labelled_as_an_error() {
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy(vec![("UPSTREAM", format!("http://{closed}"))], false).await;
    let reply = fetch(proxy.addr, "/anything").await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{reply:?}");
    assert_eq!(reply.x_cache(), Some("ERROR"));
    assert_eq!(
        reply.header("cache-status"),
        Some("tower-redis-cache; fwd=uri-miss; detail=upstream-unreachable")
    );
    assert!(
        reply.text().starts_with("502 Bad Gateway"),
        "{}",
        reply.text()
    );
}

#[test]
fn a_bad_config_file_is_refused_at_start_with_its_line() {
    let dir = std::env::temp_dir().join(format!("trc-proxy-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    std::fs::write(
        &file,
        "upstream = \"http://127.0.0.1:1\"\n\n[limits]\nconnect_timeout = \"soon\"\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tower-redis-cache-proxy"))
        .arg("--config")
        .arg(&file)
        .env_remove("UPSTREAM")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("proxy.toml:4: "), "{stderr}");
    assert!(stderr.contains("\"soon\" is not a duration"), "{stderr}");
}
