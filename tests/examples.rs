//! Runs each pattern example against a private redis-server and checks what it reports.
//!
//! Each example checks its own pattern and exits non-zero when it misbehaves; these tests
//! also check the key lines it prints.
#![cfg(feature = "redis")]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::RedisServer;

/// The examples built before the first one runs: those these tests start.
const EXAMPLES: [&str; 7] = [
    "quickstart",
    "cache_aside",
    "write_through",
    "write_behind",
    "read_through",
    "invalidation",
    "soak",
];

/// An example's binary, all of them built first (see [`common::example_binary`]).
fn example_binary(name: &str) -> PathBuf {
    let mut args: Vec<&str> = EXAMPLES.iter().flat_map(|e| ["--example", *e]).collect();
    if cfg!(all(
        feature = "metrics",
        feature = "memory",
        feature = "axum"
    )) {
        args.extend(["--example", "observability"]);
    }
    common::example_binary(name, &args)
}

/// Runs example `name` against a fresh redis-server; returns its stdout, asserting success.
fn run_example(name: &str) -> String {
    let server = RedisServer::start();
    let output = Command::new(example_binary(name))
        .env("REDIS_URL", server.url())
        .output()
        .expect("run example");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "example {name} failed ({}):\n--- stdout\n{stdout}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.lines().any(|l| l == format!("{name}: ok")),
        "example {name} did not report ok:\n{stdout}"
    );
    stdout
}

fn assert_line(stdout: &str, line: &str) {
    assert!(
        stdout.lines().any(|l| l == line),
        "missing line {line:?} in:\n{stdout}"
    );
}

#[test]
fn cache_aside_reads_through_the_cache_and_invalidates_on_update() {
    let out = run_example("cache_aside");
    assert_line(&out, "user 1: from the database");
    assert_line(&out, "user 1: from the cache");
    assert_line(
        &out,
        "user 1: updated in the database, cached copy invalidated",
    );
    assert_line(&out, "database reads: 3");
}

#[test]
fn write_through_serves_reads_after_writes_from_the_cache() {
    let out = run_example("write_through");
    assert_line(&out, "database reads: 0");
}

#[test]
fn write_behind_flushes_every_acknowledged_write_in_batches() {
    let out = run_example("write_behind");
    assert_line(&out, "acknowledged 1000 writes");
    let batches: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("flushed to the database in "))
        .and_then(|rest| rest.strip_suffix(" batches"))
        .expect("a batches line")
        .parse()
        .unwrap();
    assert!((1..1000).contains(&batches), "{batches} batches");
}

#[test]
fn read_through_loads_a_cold_key_once_for_concurrent_readers() {
    let out = run_example("read_through");
    assert_line(&out, "50 concurrent reads of article 1: 1 load");
    assert_line(
        &out,
        "2 reads of missing article 99: 1 load (the miss is cached as null)",
    );
}

#[test]
fn invalidation_drops_the_user_its_pages_lists_and_orders_only() {
    let out = run_example("invalidation");
    assert_line(
        &out,
        "user 1 updated: dropped user=true pages=2 lists=3 orders=3",
    );
    assert_line(
        &out,
        "user ali* updated: dropped user=true pages=2 lists=0 orders=3",
    );
}

/// The soak example, cut to 3 s with a Redis restart every second: it checks every answer
/// itself and reports the failures.
#[test]
fn soak_serves_every_request_while_redis_restarts() {
    let output = Command::new(example_binary("soak"))
        .arg("3")
        .env("SOAK_RESTART_EVERY", "1")
        .env("SOAK_WARMUP", "1")
        .output()
        .expect("run the soak example");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "soak failed ({}):\n--- stdout\n{stdout}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_line(&stdout, "failed: 0");
    assert_line(&stdout, "soak: ok");
    let restarts: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("redis restarts: "))
        .expect("a restarts line")
        .parse()
        .unwrap();
    assert!(restarts >= 1, "Redis was never restarted:\n{stdout}");
}

/// One plain HTTP/1.1 GET; returns the response head and body as text.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn x_cache(response: &str) -> Option<&str> {
    response
        .lines()
        .find_map(|line| line.strip_prefix("x-cache: "))
        .map(str::trim)
}

/// Starts example `name` on a free port (`PORT`) and waits until it answers `path`; the
/// process is killed when the guard drops.
#[cfg(all(feature = "metrics", feature = "memory", feature = "axum"))]
fn start_example(name: &str, path: &str) -> (KillOnDrop, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = KillOnDrop(
        Command::new(example_binary(name))
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the example"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while http_get(port, path).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "{name} never answered on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (app, port)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The observability example: its `/metrics` scrape and `/cache/stats` agree with the
/// requests sent.
#[cfg(all(feature = "metrics", feature = "memory", feature = "axum"))]
#[test]
fn observability_exports_prometheus_metrics_and_json_stats() {
    let (_app, port) = start_example("observability", "/cache/stats");
    // MISS, then requests until the background write has landed and one is a HIT.
    let first = http_get(port, "/items/1").expect("an answer");
    assert_eq!(x_cache(&first), Some("MISS"), "{first}");
    let mut misses = 1;
    let mut hits = 0;
    for _ in 0..100 {
        match x_cache(&http_get(port, "/items/1").expect("an answer")) {
            Some("HIT") => {
                hits += 1;
                break;
            }
            _ => misses += 1,
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(hits, 1, "no HIT after the MISS");
    http_get(port, "/items/2").expect("an answer");
    misses += 1;

    let scrape = http_get(port, "/metrics").expect("a scrape");
    let value = |series: &str| -> Option<f64> {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    };
    let series = |outcome: &str| {
        format!("http_cache_requests_total{{route=\"items\",outcome=\"{outcome}\"}}")
    };
    assert_eq!(value(&series("miss")), Some(misses as f64), "{scrape}");
    // The HIT may have come from the store or, while the write was landing, from the miss's
    // finished flight (counted as `coalesced`; it also says `X-Cache: HIT`).
    let hit_or_joined =
        value(&series("hit")).unwrap_or(0.0) + value(&series("coalesced")).unwrap_or(0.0);
    assert_eq!(hit_or_joined, 1.0, "{scrape}");
    assert_eq!(value(&series("bypass")), Some(0.0), "{scrape}");
    for name in [
        "# TYPE http_cache_requests_total counter",
        "# TYPE http_cache_bypasses_total counter",
        "# TYPE http_cache_not_stored_total counter",
        "# TYPE http_cache_store_errors_total counter",
        "# TYPE http_cache_store_get_duration_seconds summary",
        "# TYPE http_cache_handler_duration_seconds summary",
        "# TYPE cache_store_memory_entries gauge",
    ] {
        assert!(scrape.contains(name), "no {name:?} in:\n{scrape}");
    }
    assert_eq!(
        value("http_cache_store_get_duration_seconds_count{route=\"items\"}"),
        Some((misses + hits) as f64),
        "{scrape}"
    );
    let joined = value(&series("coalesced")).unwrap_or(0.0) as u64;

    let stats = http_get(port, "/cache/stats").expect("stats");
    let json = stats.split("\r\n\r\n").nth(1).expect("a body");
    let json: serde_json::Value = serde_json::from_str(json).expect("JSON");
    assert_eq!(
        json["items"]["hits"].as_u64().unwrap() + joined,
        1,
        "{json}"
    );
    assert_eq!(json["items"]["misses"], misses, "{json}");
}

/// The README's promise: run the quickstart, curl `/items/1` twice, see MISS then HIT.
fn quickstart_shows_miss_then_hit(redis_url: Option<&str>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut command = Command::new(example_binary("quickstart"));
    command
        .env("PORT", port.to_string())
        .env_remove("REDIS_URL");
    if let Some(url) = redis_url {
        command.env("REDIS_URL", url);
    }
    let _app = KillOnDrop(
        command
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start quickstart"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let first = loop {
        if let Some(response) = http_get(port, "/items/1") {
            break response;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "quickstart never answered on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(x_cache(&first), Some("MISS"), "{first}");
    assert!(first.ends_with(r#"{"id":1,"name":"item 1"}"#), "{first}");
    // The entry is written in the background; the next request is a HIT once it lands.
    let second = (0..50)
        .map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            http_get(port, "/items/1").expect("quickstart answers")
        })
        .find(|r| x_cache(r) == Some("HIT"))
        .expect("no HIT after the MISS");
    assert!(second.ends_with(r#"{"id":1,"name":"item 1"}"#), "{second}");
}

#[test]
fn quickstart_serves_miss_then_hit_on_the_memory_store() {
    quickstart_shows_miss_then_hit(None);
}

#[test]
fn quickstart_serves_miss_then_hit_on_redis() {
    let server = RedisServer::start();
    quickstart_shows_miss_then_hit(Some(&server.url()));
    let keys: usize = server.dbsize();
    assert_eq!(keys, 1, "the quickstart stored its entry in Redis");
}
