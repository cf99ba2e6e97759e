//! Load benchmark: what a cache hit costs over the bare handler and over one Redis GET.
//!
//! ```text
//! scripts/loadbench.sh                       # installs wrk if missing, then runs this
//! cargo run --release --features bench-internals --example loadbench    # the same, wrk already installed
//! cargo run --release --features bench-internals --example loadbench -- --pools   # plus the connection-setup comparison
//! ```
//!
//! One run starts its own `redis-server` on a free loopback port (never a shared one), then
//! for each row starts a fresh server process (this binary, `serve` mode) on `127.0.0.1:0`,
//! primes it, and points wrk at `GET /items/{id}` (1 KiB JSON) with the same settings for every
//! row. It prints requests/s, p50, p99 and the server's peak RSS (VmHWM) per row:
//!
//! 1. the bare axum handler (no layer),
//! 2. the layer on `MemoryStore`, all hits,
//! 3. the layer on `RedisStore` (default settings), all hits,
//!    and next to it (feature `bb8`) the layer on a `RedisStore` built from an app's
//!    bb8-redis pool (`RedisStore::builder_from_pool`, pool of 20 with bb8's defaults),
//! 4. the layer on `RedisStore`, all misses (a unique id per request),
//! 5. the ceiling for row 3: a handler without the layer doing one Redis GET through one
//!    shared `MultiplexedConnection`,
//! 6. (feature `tiered`) the layer on a `TieredStore` (L1 `MemoryStore` in front of the
//!    `RedisStore` of row 3, invalidations on a Redis channel), all hits: L1 hits, next to
//!    row 2,
//! 7. (feature `cluster`) the layer on `RedisStore::builder_from_cluster_nodes`, all hits, on a private
//!    3-primary Redis Cluster (no replicas) started for the run; its Redis CPU is the sum
//!    over the three primaries,
//!
//! and the ratios 2/1, 3/5 and 4/1 against the targets. Options:
//!
//! ```text
//! --duration S     seconds of load per row (default 5; plus a 1 s warm-up)
//! --connections N  wrk connections (default 50)
//! --threads N      wrk threads (default 2)
//! --workers N      tokio worker threads of the server (default 2; 0 = current-thread runtime)
//! --ids N          distinct ids the hit rows cycle over (default 1000)
//! --rows LIST      comma-separated row names to run instead of the main rows above
//! --pools          also compare Redis connection setups (bb8 pools, round-robin, store sizes)
//! --rounds N       run every row N times, interleaved (default 1); the table shows each
//!                  row's median round, and each round's ratios are printed
//! ```
//!
//! wrk, the server and (for rows 3-5) redis-server share the machine's cores; every row runs
//! under the same conditions, so the ratios are the numbers to compare across machines.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path as FsPath, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use redis::aio::MultiplexedConnection;
use tower::ServiceExt;
use tower_redis_cache::__bench::DecodeEveryHit;
use tower_redis_cache::{CacheLayer, MemoryStore, RedisStore, X_CACHE};

const BODY_LEN: usize = 1024;
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// The rows of the main table, by name.
#[cfg(not(feature = "bb8"))]
const MAIN_ROWS: &[&str] = &["bare", "memory", "redis-hit", "redis-miss", "get-mux"];
/// The rows of the main table, by name, with the store on an app's bb8-redis pool.
#[cfg(feature = "bb8")]
const MAIN_ROWS: &[&str] = &[
    "bare",
    "memory",
    "memory-decode",
    "redis-hit",
    "redis-hit-bb8",
    "redis-miss",
    "get-mux",
];

/// The rows the optional stores add to the main table (`scripts/loadbench.sh` enables them).
const STORE_ROWS: &[(&str, bool)] = &[
    ("tiered", cfg!(feature = "tiered")),
    ("cluster", cfg!(feature = "cluster")),
];

/// The connection setups compared with `--pools`.
const POOL_ROWS: [&str; 10] = [
    "get-mux",
    "get-rr:2",
    "get-rr:4",
    "get-bb8:20:check",
    "get-bb8:20",
    "get-bb8:50",
    "get-bb8:4",
    "redis-hit:2",
    "redis-hit:4",
    "redis-hit:20",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve") {
        serve(&args[1..]);
    } else {
        run(Options::parse(&args));
    }
}

// ---------------------------------------------------------------------------------------------
// The servers under test (a child process each).

/// A 1 KiB JSON object.
fn json_body() -> Bytes {
    let head = br#"{"id":1,"name":"item","tags":["a","b"],"data":""#;
    let tail = br#""}"#;
    let mut body = Vec::with_capacity(BODY_LEN);
    body.extend_from_slice(head);
    body.resize(BODY_LEN - tail.len(), b'x');
    body.extend_from_slice(tail);
    Bytes::from(body)
}

/// The handler of rows 1-4: a ready 1 KiB JSON body (the cheapest handler, so the layer's
/// own cost shows in full).
async fn item(Path(_id): Path<String>, State(body): State<Bytes>) -> Response {
    ([(CONTENT_TYPE, JSON)], body).into_response()
}

fn redis_key(id: &str) -> String {
    format!("item:{id}")
}

fn from_redis(value: Result<Option<Vec<u8>>, redis::RedisError>) -> Response {
    match value {
        Ok(Some(body)) => ([(CONTENT_TYPE, JSON)], body).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// Row 5 and its variants: the handler does one GET of the value and returns it.
#[derive(Clone)]
enum Getter {
    /// One shared multiplexed connection (cloning the handle shares the socket).
    Mux(MultiplexedConnection),
    /// Several multiplexed connections, one picked per request in turn.
    RoundRobin(Arc<(Vec<MultiplexedConnection>, AtomicUsize)>),
    /// A bb8 pool of multiplexed connections, each checked out for the whole command (what
    /// bb8-redis does).
    Bb8(bb8::Pool<MuxManager>),
}

/// bb8-redis's manager, on this crate's redis version: multiplexed connections, PING as the
/// validity check.
struct MuxManager(redis::Client);

impl bb8::ManageConnection for MuxManager {
    type Connection = MultiplexedConnection;
    type Error = redis::RedisError;

    async fn connect(&self) -> Result<MultiplexedConnection, redis::RedisError> {
        self.0.get_multiplexed_async_connection().await
    }

    async fn is_valid(&self, conn: &mut MultiplexedConnection) -> Result<(), redis::RedisError> {
        redis::cmd("PING").query_async(conn).await
    }

    fn has_broken(&self, _: &mut MultiplexedConnection) -> bool {
        false
    }
}

async fn redis_get(Path(id): Path<String>, State(getter): State<Getter>) -> Response {
    let cmd = redis::cmd("GET").arg(redis_key(&id)).clone();
    let value = match getter {
        Getter::Mux(mut conn) => cmd.query_async(&mut conn).await,
        Getter::RoundRobin(conns) => {
            let (conns, next) = &*conns;
            let mut conn = conns[next.fetch_add(1, Ordering::Relaxed) % conns.len()].clone();
            cmd.query_async(&mut conn).await
        }
        Getter::Bb8(pool) => match pool.get().await {
            Ok(mut conn) => cmd.query_async(&mut *conn).await,
            Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        },
    };
    from_redis(value)
}

/// `serve KIND REDIS_URL WORKERS IDS`: binds 127.0.0.1:0, primes, prints `READY port`, and
/// serves until its stdin closes (so it never outlives the benchmark).
fn serve(args: &[String]) {
    let [kind, url, workers, ids] = args else {
        panic!("usage: loadbench serve KIND REDIS_URL WORKERS IDS");
    };
    let workers: usize = workers.parse().expect("WORKERS");
    let ids: usize = ids.parse().expect("IDS");
    let runtime = if workers == 0 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
    .expect("tokio runtime");
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    runtime.block_on(async move {
        // Bound first: entries are keyed on the host, so priming must name the one wrk will.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let app = build_app(kind, url, ids, &host).await;
        println!("READY {}", listener.local_addr().unwrap().port());
        axum::serve(listener, app).await.unwrap();
    });
}

async fn build_app(kind: &str, url: &str, ids: usize, host: &str) -> Router {
    let body = json_body();
    let handler = Router::new()
        .route("/items/{id}", get(item))
        .with_state(body.clone());
    let mut parts = kind.split(':');
    let name = parts.next().unwrap();
    let n: Option<u32> = parts.next().map(|n| n.parse().expect("a number after ':'"));
    let check = parts.next() == Some("check");
    match name {
        "bare" => handler,
        "memory" => {
            primed(
                handler.layer(CacheLayer::new(MemoryStore::new())),
                ids,
                host,
            )
            .await
        }
        // The same store without its memo slot: every hit decodes the stored bytes (how
        // MemoryStore hits worked before hits were served from the decoded form).
        "memory-decode" => {
            let store = DecodeEveryHit(MemoryStore::new());
            primed(handler.layer(CacheLayer::new(store)), ids, host).await
        }
        "redis-hit" => {
            let store = match n {
                Some(n) => RedisStore::builder(url).max_connections(n).connect().await,
                None => RedisStore::connect(url).await,
            };
            primed(handler.layer(CacheLayer::new(store.unwrap())), ids, host).await
        }
        #[cfg(feature = "bb8")]
        "redis-hit-bb8" => {
            // The app's pool, as an app would build it: bb8's defaults (PING on checkout).
            let pool = bb8::Pool::builder()
                .max_size(n.unwrap_or(20))
                .build(bb8_redis::RedisConnectionManager::new(url).unwrap())
                .await
                .unwrap();
            let store = RedisStore::builder_from_pool(pool).connect().await.unwrap();
            primed(handler.layer(CacheLayer::new(store)), ids, host).await
        }
        #[cfg(feature = "tiered")]
        "tiered" => {
            let l2 = RedisStore::connect(url).await.unwrap();
            let store = tower_redis_cache::TieredStore::builder(l2)
                .invalidations(url, "loadbench:invalidations")
                .connect()
                .await
                .expect("a tiered store");
            primed(handler.layer(CacheLayer::new(store)), ids, host).await
        }
        #[cfg(feature = "cluster")]
        "cluster" => {
            // `url` is the nodes' URLs, comma-separated.
            let store = RedisStore::builder_from_cluster_nodes(url.split(','))
                .connect()
                .await
                .unwrap();
            primed(handler.layer(CacheLayer::new(store)), ids, host).await
        }
        "redis-miss" => {
            // A short TTL keeps Redis's memory bounded while every request stores an entry.
            let layer = CacheLayer::new(RedisStore::connect(url).await.unwrap());
            handler.layer(layer.ttl(Duration::from_secs(5)))
        }
        "get-mux" | "get-rr" | "get-bb8" => {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let mut pipe = redis::pipe();
            for id in 0..ids {
                pipe.set(redis_key(&id.to_string()), &body[..]).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.unwrap();
            let getter = match name {
                "get-mux" => Getter::Mux(conn),
                "get-rr" => {
                    let mut conns = Vec::new();
                    for _ in 0..n.unwrap_or(2) {
                        conns.push(client.get_multiplexed_async_connection().await.unwrap());
                    }
                    Getter::RoundRobin(Arc::new((conns, AtomicUsize::new(0))))
                }
                _ => Getter::Bb8(
                    bb8::Pool::builder()
                        .max_size(n.unwrap_or(20))
                        .test_on_check_out(check)
                        .build(MuxManager(client))
                        .await
                        .unwrap(),
                ),
            };
            Router::new()
                .route("/items/{id}", get(redis_get))
                .with_state(getter)
        }
        other => panic!("unknown server kind {other:?}"),
    }
}

/// Requests every id, naming `host` as wrk will, until each one is a hit (the layer stores
/// from a background task).
async fn primed(app: Router, ids: usize, host: &str) -> Router {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut pending: Vec<usize> = (0..ids).collect();
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "entries were not stored within 30 s"
        );
        let mut missed = Vec::new();
        for id in pending {
            let request = Request::get(format!("/items/{id}"))
                .header(axum::http::header::HOST, host)
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app.clone().oneshot(request).await.unwrap();
            let hit = response.headers().get(X_CACHE).is_some_and(|v| v == "HIT");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), BODY_LEN);
            if !hit {
                missed.push(id);
            }
        }
        pending = missed;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app
}

// ---------------------------------------------------------------------------------------------
// The driver.

#[derive(Clone)]
struct Options {
    duration: u64,
    connections: u32,
    threads: u32,
    workers: usize,
    ids: usize,
    rows: Vec<String>,
    pools: bool,
    rounds: usize,
}

impl Options {
    fn parse(args: &[String]) -> Self {
        let mut options = Options {
            duration: 5,
            connections: 50,
            threads: 2,
            workers: 2,
            ids: 1000,
            rows: MAIN_ROWS
                .iter()
                .copied()
                .chain(STORE_ROWS.iter().filter(|(_, on)| *on).map(|(row, _)| *row))
                .map(str::to_owned)
                .collect(),
            pools: false,
            rounds: 1,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
            match arg.as_str() {
                "--duration" => options.duration = value().parse().expect("--duration"),
                "--connections" => options.connections = value().parse().expect("--connections"),
                "--threads" => options.threads = value().parse().expect("--threads"),
                "--workers" => options.workers = value().parse().expect("--workers"),
                "--ids" => options.ids = value().parse().expect("--ids"),
                "--rows" => options.rows = value().split(',').map(str::to_owned).collect(),
                "--pools" => options.pools = true,
                "--rounds" => options.rounds = value().parse().expect("--rounds"),
                "--help" | "-h" => {
                    println!("see the docs at the top of examples/loadbench.rs");
                    std::process::exit(0);
                }
                other => panic!("unknown option {other:?} (try --help)"),
            }
        }
        options
    }
}

/// What wrk and /proc said about one row.
struct Measured {
    row: String,
    requests_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    peak_rss_kib: u64,
    /// CPU time (user + system) the server process spent per request, in microseconds.
    server_cpu_us: f64,
    /// The same for redis-server.
    redis_cpu_us: f64,
    errors: String,
    redis_hits: i64,
    redis_misses: i64,
}

fn run(options: Options) {
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("wrk is not installed: `apt-get install -y wrk` (or run scripts/loadbench.sh)");
        std::process::exit(2);
    }
    let dir = std::env::temp_dir().join(format!("trc-loadbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let redis = RedisProcess::start(&dir);
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let (cycle, unique) = write_scripts(&dir);
    let (get_rtt, set_rtt) = redis_round_trips(&url);
    let cluster = options
        .rows
        .iter()
        .any(|r| r == "cluster")
        .then(|| Cluster::start(&dir));

    let mut rows = options.rows.clone();
    if options.pools {
        rows.extend(POOL_ROWS.iter().map(|r| r.to_string()));
    }
    println!(
        "loadbench: wrk -t{} -c{} -d{}s --latency, GET /items/{{id}} ({BODY_LEN} B JSON), \
         server runtime: {}, {} cores, redis-server {}",
        options.threads,
        options.connections,
        options.duration,
        if options.workers == 0 {
            "current-thread".to_owned()
        } else {
            format!("{} worker threads", options.workers)
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        redis.version,
    );
    println!(
        "loopback Redis round trip, one client, 1 KiB value: GET p50 {}, SET p50 {}",
        fmt_us(get_rtt),
        fmt_us(set_rtt)
    );

    // Every round runs every row once, in order, so the machine's drift hits all rows alike;
    // the table shows each row's median round.
    let mut rounds: Vec<Vec<Measured>> = Vec::new();
    for round in 0..options.rounds.max(1) {
        let mut results = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let script = if row == "redis-miss" { &unique } else { &cycle };
            let seq = round * rows.len() + i;
            let m = match (row.as_str(), &cluster) {
                ("cluster", Some(cluster)) => {
                    let urls = cluster.urls();
                    measure_row(row, &urls, &cluster.pids(), &options, script, seq)
                }
                _ => measure_row(row, &url, &[redis.child.id()], &options, script, seq),
            };
            eprintln!(
                "  round {}: {row}: {:.0} req/s, p50 {}, p99 {}, server CPU/req {:.1} µs",
                round + 1,
                m.requests_per_sec,
                fmt_us(m.p50_us),
                fmt_us(m.p99_us),
                m.server_cpu_us,
            );
            results.push(m);
        }
        rounds.push(results);
    }
    if rounds.len() > 1 {
        println!();
        for (round, results) in rounds.iter().enumerate() {
            println!("round {}: {}", round + 1, ratio_summary(results));
        }
    }
    let results = medians(rounds);
    print_table(&results);
    print_ratios(&results, set_rtt, &options);

    // Under load, p50 is mostly queueing (50 connections over the server's throughput), so
    // the miss path's own latency is also measured one request at a time.
    let has = |row: &str| rows.iter().any(|r| r == row);
    if has("bare") && has("redis-miss") {
        let single = Options {
            connections: 1,
            threads: 1,
            duration: options.duration.min(3),
            ..options.clone()
        };
        let pids = [redis.child.id()];
        let bare = measure_row("bare", &url, &pids, &single, &cycle, 100);
        let miss = measure_row("redis-miss", &url, &pids, &single, &unique, 101);
        let bound = (bare.p50_us + set_rtt) * 1.1;
        println!(
            "one request at a time (wrk -t1 -c1 -d{}s): bare p50 {} / p99 {}, miss p50 {} / p99 {}",
            single.duration,
            fmt_us(bare.p50_us),
            fmt_us(bare.p99_us),
            fmt_us(miss.p50_us),
            fmt_us(miss.p99_us),
        );
        println!(
            "miss p50 {} vs (bare p50 {} + SET round trip {}) x 1.1 = {}  {}",
            fmt_us(miss.p50_us),
            fmt_us(bare.p50_us),
            fmt_us(set_rtt),
            fmt_us(bound),
            verdict(miss.p50_us <= bound)
        );
    }
    drop(redis);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

fn describe(row: &str) -> String {
    let mut parts = row.split(':');
    let name = parts.next().unwrap_or_default();
    let n = parts.next();
    let check = parts.next() == Some("check");
    match (name, n) {
        ("bare", _) => "1. bare axum handler (no layer)".into(),
        ("memory", _) => "2. layer, MemoryStore, all hits".into(),
        ("memory-decode", _) => "2b. layer, MemoryStore without memo (decode per hit)".into(),
        ("tiered", _) => "6. layer, TieredStore (L1 over RedisStore), all hits".into(),
        ("cluster", _) => "7. layer, RedisStore on a 3-primary Cluster, all hits".into(),
        ("redis-hit", None) => "3. layer, RedisStore (defaults), all hits".into(),
        ("redis-hit", Some(n)) => format!("layer, RedisStore max_connections({n}), all hits"),
        ("redis-hit-bb8", _) => {
            "3b. layer, RedisStore on the app's bb8-redis pool, all hits".into()
        }
        ("redis-miss", _) => "4. layer, RedisStore (defaults), all misses".into(),
        ("get-mux", _) => "5. handler + 1 Redis GET, one shared MultiplexedConnection".into(),
        ("get-rr", Some(n)) => format!("handler + GET, {n} multiplexed conns round-robin"),
        ("get-bb8", Some(n)) if check => format!("handler + GET, bb8 pool {n}, PING on checkout"),
        ("get-bb8", Some(n)) => format!("handler + GET, bb8 pool {n}, no checkout test"),
        _ => row.into(),
    }
}

/// `url`: Redis's URL, or for the cluster row the nodes' URLs, comma-separated;
/// `redis_pids`: the redis-server processes whose CPU time the row is charged.
fn measure_row(
    row: &str,
    url: &str,
    redis_pids: &[u32],
    options: &Options,
    script: &FsPath,
    seq: usize,
) -> Measured {
    let mut server = ServerProcess::start(row, url, options);
    let base = format!("http://127.0.0.1:{}/items/", server.port);
    // A short warm-up opens the connections and wakes every thread; its numbers are dropped.
    let warmup_nonce = format!("w{seq}");
    wrk(options, 1, script, &base, &warmup_nonce, options.ids);
    let redis_before = redis_stats(url);
    let redis_cpu = || redis_pids.iter().map(|&pid| cpu_time(pid)).sum::<f64>();
    let cpu_before = (cpu_time(server.child.id()), redis_cpu());
    let output = wrk(
        options,
        options.duration,
        script,
        &base,
        &format!("r{seq}"),
        options.ids,
    );
    let cpu_after = (cpu_time(server.child.id()), redis_cpu());
    let redis_after = redis_stats(url);
    let peak_rss_kib = server.peak_rss_kib();
    server.stop();
    let parsed = parse_wrk(&output).unwrap_or_else(|| panic!("unreadable wrk output:\n{output}"));
    Measured {
        row: row.to_owned(),
        requests_per_sec: parsed.0,
        p50_us: parsed.1,
        p99_us: parsed.2,
        peak_rss_kib,
        server_cpu_us: (cpu_after.0 - cpu_before.0) / parsed.4 * 1e6,
        redis_cpu_us: (cpu_after.1 - cpu_before.1) / parsed.4 * 1e6,
        errors: parsed.3,
        redis_hits: redis_after.0 - redis_before.0,
        redis_misses: redis_after.1 - redis_before.1,
    }
}

fn wrk(
    options: &Options,
    secs: u64,
    script: &FsPath,
    base: &str,
    nonce: &str,
    ids: usize,
) -> String {
    let output = Command::new("wrk")
        .arg(format!("-t{}", options.threads))
        .arg(format!("-c{}", options.connections))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("5s")
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(base)
        .arg("--")
        .arg(nonce)
        .arg(ids.to_string())
        .output()
        .expect("run wrk");
    assert!(output.status.success(), "wrk failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Requests/s, p50 and p99 in microseconds, any error lines, and the number of requests.
fn parse_wrk(output: &str) -> Option<(f64, f64, f64, String, f64)> {
    let mut rps = None;
    let mut total = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = Vec::new();
    for line in output.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(n)) => rps = n.parse().ok(),
            (Some(n), Some("requests")) => total = n.parse().ok(),
            (Some("50%"), Some(t)) => p50 = parse_duration_us(t),
            (Some("99%"), Some(t)) => p99 = parse_duration_us(t),
            (Some("Socket"), Some("errors:")) | (Some("Non-2xx"), _) => {
                errors.push(line.to_owned())
            }
            _ => {}
        }
    }
    Some((rps?, p50?, p99?, errors.join("; "), total?))
}

fn parse_duration_us(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        _ => return None,
    };
    Some(number * scale)
}

/// User plus system CPU seconds a process has used so far.
fn cpu_time(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn print_table(results: &[Measured]) {
    println!();
    println!(
        "| row | requests/s | p50 | p99 | server peak RSS | server CPU/req | redis CPU/req | Redis hits / misses |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for m in results {
        let (redis, redis_cpu) = if m.row == "bare" || m.row == "memory" {
            ("-".to_owned(), "-".to_owned())
        } else {
            (
                format!("{} / {}", m.redis_hits, m.redis_misses),
                format!("{:.1} µs", m.redis_cpu_us),
            )
        };
        println!(
            "| {} | {:.0} | {} | {} | {:.1} MiB | {:.1} µs | {} | {} |",
            describe(&m.row),
            m.requests_per_sec,
            fmt_us(m.p50_us),
            fmt_us(m.p99_us),
            m.peak_rss_kib as f64 / 1024.0,
            m.server_cpu_us,
            redis_cpu,
            redis,
        );
        if !m.errors.is_empty() {
            println!("|   wrk reported: {} | | | | | | | |", m.errors);
        }
    }
}

/// Each row's median round by requests/s (rows in their first order).
fn medians(rounds: Vec<Vec<Measured>>) -> Vec<Measured> {
    let mut by_row: Vec<Vec<Measured>> = Vec::new();
    for m in rounds.into_iter().flatten() {
        match by_row.iter_mut().find(|runs| runs[0].row == m.row) {
            Some(runs) => runs.push(m),
            None => by_row.push(vec![m]),
        }
    }
    by_row
        .into_iter()
        .map(|mut runs| {
            runs.sort_by(|a, b| a.requests_per_sec.total_cmp(&b.requests_per_sec));
            runs.swap_remove(runs.len() / 2)
        })
        .collect()
}

/// One round's in-process and Redis ratios, on one line.
fn ratio_summary(results: &[Measured]) -> String {
    let rps = |row: &str| {
        results
            .iter()
            .find(|m| m.row == row)
            .map(|m| m.requests_per_sec)
    };
    [
        ("2/1", "memory", "bare"),
        ("L1/1", "tiered", "bare"),
        ("3/5", "redis-hit", "get-mux"),
    ]
    .iter()
    .filter_map(|(name, a, b)| Some(format!("{name} {:.2}", rps(a)? / rps(b)?)))
    .collect::<Vec<_>>()
    .join(", ")
}

fn print_ratios(results: &[Measured], set_rtt_us: f64, options: &Options) {
    let find = |row: &str| results.iter().find(|m| m.row == row);
    println!();
    if let (Some(bare), Some(memory)) = (find("bare"), find("memory")) {
        let ratio = memory.requests_per_sec / bare.requests_per_sec;
        println!(
            "2/1 (MemoryStore hit / bare handler):   {ratio:.2}  target >= 0.90  {}",
            verdict(ratio >= 0.9)
        );
    }
    if let (Some(bare), Some(l1)) = (find("bare"), find("tiered")) {
        let ratio = l1.requests_per_sec / bare.requests_per_sec;
        println!(
            "L1/1 (TieredStore L1 hit / bare handler): {ratio:.2}  target >= 0.90  {}",
            verdict(ratio >= 0.9)
        );
    }
    if let Some(l1) = find("tiered") {
        // Every request of the row falls inside one entry lifetime (the entries outlive the
        // row), so Redis reads per id is per entry lifetime; the goal is at most 1 (the first
        // read of each id on this instance, done by the priming before the row).
        let requests = l1.requests_per_sec * options.duration as f64;
        let reads = (l1.redis_hits + l1.redis_misses) as f64;
        let per_id = reads / options.ids as f64;
        println!(
            "two tiers: {reads} Redis reads over {} ids = {per_id:.2} per id per entry \
             lifetime (goal <= 1) {}; L1 hit ratio {:.4}; server CPU/request {:.1} µs{}",
            options.ids,
            verdict(per_id <= 1.0),
            1.0 - reads / requests.max(1.0),
            l1.server_cpu_us,
            find("memory")
                .map(|m| format!(" (MemoryStore {:.1} µs)", m.server_cpu_us))
                .unwrap_or_default()
        );
    }
    if let (Some(hit), Some(ceiling)) = (find("redis-hit"), find("get-mux")) {
        let ratio = hit.requests_per_sec / ceiling.requests_per_sec;
        println!(
            "3/5 (RedisStore hit / one Redis GET):   {ratio:.2}  target >= 0.90  {}",
            verdict(ratio >= 0.9)
        );
    }
    if let (Some(bare), Some(miss)) = (find("bare"), find("redis-miss")) {
        let ratio = miss.requests_per_sec / bare.requests_per_sec;
        let bound = (bare.p50_us + set_rtt_us) * 1.1;
        println!("4/1 (RedisStore miss / bare handler):   {ratio:.2}");
        println!(
            "under load: miss p50 {} vs (bare p50 {} + SET round trip {}) x 1.1 = {}  {}",
            fmt_us(miss.p50_us),
            fmt_us(bare.p50_us),
            fmt_us(set_rtt_us),
            fmt_us(bound),
            verdict(miss.p50_us <= bound)
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// The wrk scripts: one cycling over the primed ids, one making every id unique (its nonce
/// keeps ids unique across the rows of a run and their warm-ups).
fn write_scripts(dir: &FsPath) -> (PathBuf, PathBuf) {
    let setup = r#"
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
"#;
    let cycle = dir.join("cycle.lua");
    std::fs::write(
        &cycle,
        format!(
            "{setup}
function init(args)
  n = tonumber(args[2])
  i = tid * 7919
end
function request()
  i = i + 1
  return wrk.format(\"GET\", wrk.path .. (i % n))
end
"
        ),
    )
    .unwrap();
    let unique = dir.join("unique.lua");
    std::fs::write(
        &unique,
        format!(
            "{setup}
function init(args)
  prefix = wrk.path .. args[1] .. \"-\" .. tid .. \"-\"
  i = 0
end
function request()
  i = i + 1
  return wrk.format(\"GET\", prefix .. i)
end
"
        ),
    )
    .unwrap();
    (cycle, unique)
}

// ---------------------------------------------------------------------------------------------
// Processes.

/// A server under test: this binary in `serve` mode.
struct ServerProcess {
    child: Child,
    port: u16,
}

impl ServerProcess {
    fn start(row: &str, url: &str, options: &Options) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["serve", row, url])
            .arg(options.workers.to_string())
            .arg(options.ids.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server process");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("READY ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("server {row} did not start: {line:?}"));
        Self { child, port }
    }

    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        // Closing stdin makes it exit; kill it if it does not.
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// This run's own redis-server, on a free loopback port, with no persistence and a memory
/// bound (the miss row writes an entry per request).
struct RedisProcess {
    child: Child,
    port: u16,
    version: String,
}

impl RedisProcess {
    fn start(dir: &FsPath) -> Self {
        Self::start_with(dir, &[])
    }

    fn start_with(dir: &FsPath, extra: &[String]) -> Self {
        let version = Command::new("redis-server")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|_| {
                panic!("redis-server is not installed (apt-get install redis-server)")
            });
        let version = version
            .split_whitespace()
            .find_map(|w| w.strip_prefix("v="))
            .unwrap_or("?")
            .to_owned();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxmemory", "256mb", "--maxmemory-policy", "allkeys-lru"])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let server = Self {
            child,
            port,
            version,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.answers_ping() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn answers_ping(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let mut reply = String::new();
        stream.write_all(b"PING\r\n").is_ok()
            && BufReader::new(stream).read_line(&mut reply).is_ok()
            && reply.starts_with("+PONG")
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster row's Redis Cluster: three primaries, no replicas.
struct Cluster {
    nodes: Vec<RedisProcess>,
}

impl Cluster {
    fn start(dir: &FsPath) -> Self {
        let nodes: Vec<RedisProcess> = (0..3)
            .map(|i| {
                let args = [
                    "--cluster-enabled".to_owned(),
                    "yes".to_owned(),
                    "--cluster-config-file".to_owned(),
                    format!("nodes-{}-{i}.conf", std::process::id()),
                ];
                RedisProcess::start_with(dir, &args)
            })
            .collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cluster.urls().split(',').all(|url| {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut conn).unwrap();
            info.contains("cluster_state:ok")
        }) {
            assert!(Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    fn urls(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect();
        urls.join(",")
    }

    fn pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.child.id()).collect()
    }
}

/// `keyspace_hits` and `keyspace_misses` of the benchmark's Redis (summed over the nodes of
/// a comma-separated list).
fn redis_stats(urls: &str) -> (i64, i64) {
    urls.split(',')
        .map(node_stats)
        .fold((0, 0), |(h, m), (nh, nm)| (h + nh, m + nm))
}

fn node_stats(url: &str) -> (i64, i64) {
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    let info: String = redis::cmd("INFO").arg("stats").query(&mut conn).unwrap();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("keyspace_hits"), field("keyspace_misses"))
}

/// Median latency of a GET and of a SET of a 1 KiB value, one at a time, in microseconds.
fn redis_round_trips(url: &str) -> (f64, f64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let value = json_body();
        let mut gets = Vec::new();
        let mut sets = Vec::new();
        for i in 0..3000 {
            let started = Instant::now();
            let _: () = redis::cmd("SET")
                .arg("rtt-probe")
                .arg(&value[..])
                .arg("PX")
                .arg(60_000)
                .query_async(&mut conn)
                .await
                .unwrap();
            let set = started.elapsed();
            let started = Instant::now();
            let _: Option<Vec<u8>> = redis::cmd("GET")
                .arg("rtt-probe")
                .query_async(&mut conn)
                .await
                .unwrap();
            if i >= 500 {
                sets.push(set);
                gets.push(started.elapsed());
            }
        }
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2].as_secs_f64() * 1e6
        };
        (median(gets), median(sets))
    })
}
