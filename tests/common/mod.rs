//! Test harness: private `redis-server` processes and a real HTTP server and client.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod backend;
pub mod cluster;
pub mod fault_proxy;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// A `redis-server` of this test's own, on a free port, killed (and its directory removed)
/// on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// More command-line arguments (a replica's `--replicaof`, TLS settings).
    args: Vec<String>,
    /// A Sentinel's configuration file (Sentinel rewrites it, so it lives in `dir`).
    sentinel_conf: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with more command-line arguments (`{dir}` in them is replaced by the
    /// server's own temporary directory) and waits until it answers PING on its plain port.
    pub fn start_with(args: &[&str]) -> Self {
        Self::try_start_with(args, |_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`start_with`](Self::start_with), after `prepare` has written files into the
    /// server's directory; an error (from `prepare`, or a server that exits at once) says why
    /// the server did not start.
    pub fn try_start_with(
        args: &[&str],
        prepare: impl FnOnce(&std::path::Path) -> Option<String>,
    ) -> Result<Self, String> {
        ensure_installed();
        let dir = new_dir();
        if let Some(error) = prepare(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(error);
        }
        let dir_text = dir.to_str().expect("UTF-8 temp dir").to_owned();
        let args = args.iter().map(|a| a.replace("{dir}", &dir_text)).collect();
        Self::start_in(dir, args, None)
    }

    /// Starts a Redis Sentinel watching the master at `master_port` as `mymaster` (quorum 1),
    /// which considers the master down after `down_after_ms` without an answer.
    pub fn start_sentinel(master_port: u16, down_after_ms: u64) -> Self {
        ensure_installed();
        let dir = new_dir();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds mymaster {down_after_ms}\n\
                 sentinel failover-timeout mymaster 2000\n"
            ),
        )
        .expect("write sentinel.conf");
        Self::start_in(dir, Vec::new(), Some(conf)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn start_in(
        dir: PathBuf,
        args: Vec<String>,
        sentinel_conf: Option<PathBuf>,
    ) -> Result<Self, String> {
        for _ in 0..10 {
            let port = free_port();
            let mut server = Self {
                child: None,
                port,
                dir: dir.clone(),
                args: args.clone(),
                sentinel_conf: sentinel_conf.clone(),
            };
            if server.spawn() {
                return Ok(server);
            }
            // Another process took the port between our probe and redis-server's bind.
            server.dir = PathBuf::new();
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!(
            "redis-server {args:?} did not start on any of 10 free ports"
        ))
    }

    fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        if let Some(conf) = &self.sentinel_conf {
            command.arg(conf).arg("--sentinel");
        } else {
            command.args(["--save", "", "--appendonly", "no"]);
        }
        let mut child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
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

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temporary directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Kills the server (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty, like a restarted cache).
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("server running")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// A plain synchronous connection for inspecting what the cache wrote.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to test redis-server")
    }

    /// Runs one command and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        cmd.query(&mut self.conn()).expect("redis command")
    }

    /// How many keys the server holds.
    pub fn dbsize(&self) -> usize {
        self.cmd(&["DBSIZE"])
    }

    /// Waits until the server holds `n` keys (the layer stores in the background, so this
    /// yields to the runtime rather than blocking it).
    pub async fn wait_for_keys(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.dbsize() < n {
            assert!(
                Instant::now() < deadline,
                "expected {n} keys, have {}",
                self.dbsize()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ensure_installed() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "redis-server is not installed; the tests need it. Install it with \
         `sudo apt-get install -y redis-server` (scripts/test.sh does this for you)."
    );
}

fn new_dir() -> PathBuf {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "trc-redis-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir for redis-server");
    dir
}

/// A free port on 127.0.0.1 (free when asked).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
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

/// Serves `app` on 127.0.0.1 on a free port; the server lives until the test's runtime ends.
pub async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The `X-Cache` header, if any.
    pub fn x_cache(&self) -> Option<&str> {
        self.headers.get("x-cache").map(|v| v.to_str().unwrap())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

/// A real HTTP/1 client (hyper).
pub fn client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// Sends a request with `headers` and reads the whole response.
pub async fn send(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client()
        .request(request.body(Empty::new()).unwrap())
        .await
        .expect("request failed");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("read body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn fetch(addr: SocketAddr, path: &str) -> Reply {
    send(addr, Method::GET, path, &[]).await
}

/// GETs `path` until the answer is a HIT: the layer writes to the store in the background,
/// so the request right after a miss may race the write. Panics after 5 s.
pub async fn get_until_hit(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = send(addr, Method::GET, path, headers).await;
        if reply.x_cache() == Some("HIT") {
            return reply;
        }
        assert!(
            Instant::now() < deadline,
            "no HIT for {path} within 5 s: last {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Moves tokio's clock, which the cache reads its time from, forward by `by` at once: entries
/// age without the test sleeping. Real time, and with it Redis's and moka's key expiry, does
/// not move. Needs a current-thread runtime (the default of `#[tokio::test]`); pending tokio
/// timers due within `by` fire.
pub async fn advance_clock(by: Duration) {
    tokio::time::pause();
    tokio::time::advance(by).await;
    tokio::time::resume();
}

/// Counts handler calls.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn bump(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The key the layer uses for a GET-like request, computed from the documented encoding:
/// `{prefix}:{md5 hex}` of "trc-key-v2" then, for each field (method, authority, path,
/// query, extra), a tag byte and either `0` (absent) or `1`, a u32 big-endian length and the
/// bytes.
pub fn cache_key(
    prefix: &str,
    method: &str,
    host: Option<&str>,
    path: &str,
    query: Option<&str>,
) -> String {
    use md5::{Digest, Md5};
    let mut hasher = Md5::new();
    hasher.update(b"trc-key-v2");
    let fields: [(u8, Option<&str>); 5] = [
        (b'm', Some(method)),
        (b'a', host),
        (b'p', Some(path)),
        (b'q', query),
        (b'x', None),
    ];
    for (tag, value) in fields {
        match value {
            None => hasher.update([tag, 0]),
            Some(v) => {
                hasher.update([tag, 1]);
                hasher.update((v.len() as u32).to_be_bytes());
                hasher.update(v.as_bytes());
            }
        }
    }
    format!("{prefix}:{:x}", hasher.finalize())
}

/// The key of `path` (no query) requested over HTTP from a server at `addr`.
pub fn http_key(addr: SocketAddr, method: &str, path: &str) -> String {
    cache_key("http-cache", method, Some(&addr.to_string()), path, None)
}

/// `target/{profile}/examples/{name}`, after one `cargo build --quiet {build_args}` per test
/// process (a no-op under a plain `cargo test`, which has built the examples; filters such as
/// `cargo test --test examples` have not).
pub fn example_binary(name: &str, build_args: &[&str]) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent() // deps
        .and_then(|deps| deps.parent())
        .expect("target profile dir");
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // The features this test was built with: `cargo test` has built the examples with
        // them already, so the build below finds them fresh instead of compiling the crate
        // (and its dependencies) again for another feature set.
        let features = this_builds_features().join(",");
        // Nor the variables cargo sets for a running test: some build scripts (ring's) watch
        // `CARGO_PKG_*` and `OUT_DIR`, and seeing them change would rebuild them and all that
        // depends on them, here and again in the next plain `cargo` command.
        for (name, _) in std::env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            let set_by_cargo_test = name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
                || [
                    "OUT_DIR",
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_CRATE_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                ]
                .contains(&name);
            if set_by_cargo_test {
                build.env_remove(name);
            }
        }
        // `--workspace`, as `scripts/test.sh` tests it: the proxy crate's dependencies turn on
        // more features of shared crates (hyper's server, h2), and a build of this package
        // alone would resolve them differently and rebuild them, and all above them.
        build
            .args([
                "build",
                "--quiet",
                "--workspace",
                "--no-default-features",
                "--features",
            ])
            .arg(features)
            .args(build_args);
        // `cargo test` built the examples with the `test` profile (`--release`: `release`).
        if profile_dir.ends_with("release") {
            build.arg("--release");
        } else {
            build.args(["--profile", "test"]);
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the examples failed");
    });
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "no example binary at {}", binary.display());
    binary
}

/// The crate features enabled in this build (`default` too: it is a feature of its own, and
/// `--all-features` turns it on).
fn this_builds_features() -> Vec<&'static str> {
    [
        ("default", cfg!(feature = "default")),
        ("redis", cfg!(feature = "redis")),
        ("memory", cfg!(feature = "memory")),
        ("axum", cfg!(feature = "axum")),
        ("client", cfg!(feature = "client")),
        ("bb8", cfg!(feature = "bb8")),
        ("connection-manager", cfg!(feature = "connection-manager")),
        ("tls", cfg!(feature = "tls")),
        ("sentinel", cfg!(feature = "sentinel")),
        ("metrics", cfg!(feature = "metrics")),
        ("cluster", cfg!(feature = "cluster")),
        ("tiered", cfg!(feature = "tiered")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect()
}
