//! Soak test: a mixed load against the layer on `RedisStore` while Redis restarts under it.
//!
//! ```text
//! scripts/soak.sh                        # 60 s; installs redis-server if missing
//! cargo run --release --example soak -- 60
//! ```
//!
//! One run starts its own `redis-server` on a free loopback port (never a shared one), serves
//! an axum app behind `CacheLayer` on `RedisStore` (default settings) on `127.0.0.1:0` in this
//! process, and drives it with a fixed number of clients, each sending one request at a time:
//! hits (a small set of paths), misses (a unique path per request), bypasses (requests with
//! `Authorization`) and 512 KiB bodies. Every few seconds it kills redis-server (SIGKILL) and
//! starts it again, empty, on the same port.
//!
//! Every response must be a 200 with exactly the body the handler produces for its path; it
//! prints the totals, the failures (non-200, wrong body, error or no answer within 10 s), and
//! this process's RSS after the warm-up and at the end, and exits non-zero if any request
//! failed. Settings, as arguments or environment variables:
//!
//! ```text
//! [SECONDS] or SOAK_SECS        duration of the load (default 60)
//! SOAK_RESTART_EVERY            seconds between Redis restarts (default 10)
//! SOAK_WARMUP                   seconds before the first RSS reading (default 5)
//! SOAK_CLIENTS                  concurrent clients (default 8)
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tower_redis_cache::{CacheLayer, RedisStore};

/// Size of the `/big/{id}` bodies (under the layer's default 1 MiB limit, so they are stored).
const BIG: usize = 512 * 1024;
/// Paths the hit requests cycle over.
const HOT_ITEMS: u64 = 50;
/// `/big/{id}` ids.
const BIG_ITEMS: u8 = 4;
/// A request without an answer after this long counts as failed.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

fn item_body(id: &str) -> String {
    format!("{{\"id\":\"{id}\",\"pad\":\"{}\"}}", "x".repeat(200))
}

fn big_body(id: u8) -> Bytes {
    (0..BIG).map(|i| (i % 251) as u8 ^ id).collect()
}

/// The request mix, in tenths: 6 hits, 2 misses, 1 bypass, 1 big body.
#[derive(Clone, Copy)]
enum Kind {
    Hit,
    Miss,
    Bypass,
    Big,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Hit, Kind::Miss, Kind::Bypass, Kind::Big];

    fn of(n: u64) -> Self {
        match n % 10 {
            0..=5 => Kind::Hit,
            6 | 7 => Kind::Miss,
            8 => Kind::Bypass,
            _ => Kind::Big,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Hit => "hit path",
            Kind::Miss => "miss",
            Kind::Bypass => "bypass",
            Kind::Big => "big body",
        }
    }
}

struct Settings {
    duration: Duration,
    restart_every: Duration,
    warmup: Duration,
    clients: u64,
}

fn settings() -> Settings {
    let env = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}={v} is not a number"))
            })
            .unwrap_or(default)
    };
    let secs = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .unwrap_or_else(|_| panic!("usage: soak [SECONDS], got {arg:?}")),
        None => env("SOAK_SECS", 60),
    };
    Settings {
        duration: Duration::from_secs(secs),
        restart_every: Duration::from_secs(env("SOAK_RESTART_EVERY", 10).max(1)),
        warmup: Duration::from_secs(env("SOAK_WARMUP", 5)),
        clients: env("SOAK_CLIENTS", 8).max(1),
    }
}

/// Counts of what the clients saw.
#[derive(Default)]
struct Tally {
    requests: [AtomicU64; 4],
    failed: AtomicU64,
    hit: AtomicU64,
    miss: AtomicU64,
    bypass: AtomicU64,
    other: AtomicU64,
    slowest_ms: AtomicU64,
    /// The first few failures, for the report.
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 5 {
            samples.push(what);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = settings();
    let redis = Arc::new(Mutex::new(RedisProcess::start()));
    let port = redis.lock().unwrap().port;
    let store = RedisStore::builder(&format!("redis://127.0.0.1:{port}"))
        .build()
        .expect("valid URL");
    let addr = serve(app(store)).await;
    println!(
        "soak: {} s, {} clients, redis-server on 127.0.0.1:{port} restarted every {} s",
        settings.duration.as_secs(),
        settings.clients,
        settings.restart_every.as_secs()
    );

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let deadline = started + settings.duration;
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let unique = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..settings.clients)
        .map(|c| {
            let (client, tally, unique) = (client.clone(), tally.clone(), unique.clone());
            tokio::spawn(async move {
                let mut n = c;
                while Instant::now() < deadline {
                    one_request(&client, addr, Kind::of(n), n, &unique, &tally).await;
                    n += 1;
                }
            })
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let restarts = tokio::spawn(restart_periodically(
        redis.clone(),
        settings.restart_every,
        deadline,
        stop.clone(),
    ));

    tokio::time::sleep(settings.warmup.min(settings.duration)).await;
    let rss_warm = rss_kb("VmRSS");
    println!(
        "rss after {} s warm-up: {rss_warm} kB",
        settings.warmup.as_secs()
    );

    for client in clients {
        client.await.expect("client task");
    }
    stop.store(true, Ordering::Relaxed);
    let restarts = restarts.await.expect("restart task");
    drop(redis);

    let requests: Vec<u64> = tally
        .requests
        .iter()
        .map(|r| r.load(Ordering::Relaxed))
        .collect();
    let total: u64 = requests.iter().sum();
    let mix: Vec<String> = Kind::ALL
        .iter()
        .zip(&requests)
        .map(|(kind, n)| format!("{} {n}", kind.name()))
        .collect();
    let failed = tally.failed.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "requests: {total} in {elapsed:.1} s ({:.0}/s): {}",
        total as f64 / elapsed,
        mix.join(", ")
    );
    println!(
        "x-cache: HIT {}, MISS {}, BYPASS {}, other {}",
        tally.hit.load(Ordering::Relaxed),
        tally.miss.load(Ordering::Relaxed),
        tally.bypass.load(Ordering::Relaxed),
        tally.other.load(Ordering::Relaxed)
    );
    println!(
        "slowest request: {} ms",
        tally.slowest_ms.load(Ordering::Relaxed)
    );
    println!("redis restarts: {restarts}");
    println!("failed: {failed}");
    for sample in tally.samples.lock().unwrap().iter() {
        println!("  {sample}");
    }
    println!(
        "rss at end: {} kB (peak {} kB)",
        rss_kb("VmRSS"),
        rss_kb("VmHWM")
    );
    if failed == 0 && total > 0 {
        println!("soak: ok");
        ExitCode::SUCCESS
    } else {
        println!("soak: FAILED");
        ExitCode::FAILURE
    }
}

fn app(store: RedisStore) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(|Path(id): Path<String>| async move { item_body(&id) }),
        )
        .route(
            "/big/{id}",
            get(|Path(id): Path<u8>| async move { big_body(id) }),
        )
        .layer(CacheLayer::new(store))
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Sends one request of `kind` and checks its status and body.
async fn one_request(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    kind: Kind,
    n: u64,
    unique: &AtomicU64,
    tally: &Tally,
) {
    let (path, expected) = match kind {
        Kind::Hit | Kind::Bypass => {
            let id = (n / 10 % HOT_ITEMS).to_string();
            (format!("/items/{id}"), Bytes::from(item_body(&id)))
        }
        Kind::Miss => {
            let id = format!("u{}", unique.fetch_add(1, Ordering::Relaxed));
            (format!("/items/{id}"), Bytes::from(item_body(&id)))
        }
        Kind::Big => {
            let id = (n / 10 % u64::from(BIG_ITEMS)) as u8;
            (format!("/big/{id}"), big_body(id))
        }
    };
    let mut request = Request::get(format!("http://{addr}{path}"));
    if let Kind::Bypass = kind {
        request = request.header("authorization", "Bearer soak");
    }
    tally.requests[kind as usize].fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let answer = tokio::time::timeout(REQUEST_DEADLINE, async {
        let response = client.request(request.body(Empty::new()).unwrap()).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
    })
    .await;
    let took = started.elapsed();
    tally
        .slowest_ms
        .fetch_max(took.as_millis() as u64, Ordering::Relaxed);
    let (parts, body) = match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => return tally.fail(format!("GET {path}: {e}")),
        Err(_) => return tally.fail(format!("GET {path}: no answer in {REQUEST_DEADLINE:?}")),
    };
    if parts.status != 200 {
        return tally.fail(format!("GET {path}: status {}", parts.status));
    }
    if body != expected {
        return tally.fail(format!(
            "GET {path}: wrong body ({} bytes, expected {})",
            body.len(),
            expected.len()
        ));
    }
    let counter = match parts.headers.get("x-cache").map(|v| v.as_bytes()) {
        Some(b"HIT") => &tally.hit,
        Some(b"MISS") => &tally.miss,
        Some(b"BYPASS") => &tally.bypass,
        _ => &tally.other,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Kills and restarts Redis every `every` until `deadline`; returns how many restarts.
async fn restart_periodically(
    redis: Arc<Mutex<RedisProcess>>,
    every: Duration,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> u32 {
    let mut restarts = 0;
    loop {
        tokio::time::sleep(every).await;
        if stop.load(Ordering::Relaxed) || Instant::now() + Duration::from_secs(1) >= deadline {
            return restarts;
        }
        let redis = redis.clone();
        tokio::task::spawn_blocking(move || redis.lock().unwrap().restart())
            .await
            .expect("restart task");
        restarts += 1;
    }
}

/// This process's memory from /proc/self/status (`VmRSS`, `VmHWM`), in kB; 0 elsewhere.
fn rss_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// A private `redis-server` on a free loopback port, killed on drop.
struct RedisProcess {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl RedisProcess {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("trc-soak-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a directory for redis-server");
        for _ in 0..10 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("find a free port")
                .port();
            let mut redis = Self {
                child: None,
                port,
                dir: dir.clone(),
            };
            if redis.spawn() {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 10 free ports (is it installed?)");
    }

    /// Kills the server (SIGKILL, as a crash) and starts it again, empty, on the same port.
    fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    fn spawn(&mut self) -> bool {
        let Ok(mut child) = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if ping(self.port) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}
