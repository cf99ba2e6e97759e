//! Runs each pattern example against a private redis-server and checks what it reports.
//!
//! Each example checks its own pattern and exits non-zero when it misbehaves; these tests
//! also check the key lines it prints.
#![cfg(feature = "redis")]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

use common::RedisServer;

const EXAMPLES: [&str; 5] = [
    "cache_aside",
    "write_through",
    "write_behind",
    "read_through",
    "invalidation",
];

/// `target/{profile}/examples/{name}`, after making sure the examples are built and current
/// (a no-op under a plain `cargo test`, which builds them; filters such as
/// `cargo test --test examples` skip them).
fn example_binary(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent() // deps
        .and_then(|deps| deps.parent())
        .expect("target profile dir");
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet"]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        for example in EXAMPLES {
            build.args(["--example", example]);
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
