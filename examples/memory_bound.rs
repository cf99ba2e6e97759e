//! Measures how the process's memory follows `MemoryStore`'s byte bound: writes distinct
//! small entries (each with a unique tag and a shared one, the worst case for the tag index)
//! well past the bound, and prints RSS against the bound.
//!
//! `cargo run --release --example memory_bound [bound_mib] [entries] [value_bytes]`

use std::time::Duration;

use bytes::Bytes;
use tower_redis_cache::{MemoryStore, Store};

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let bound_mib = args.first().copied().unwrap_or(64);
    let entries = args.get(1).copied().unwrap_or(1_200_000);
    let value_bytes = args.get(2).copied().unwrap_or(200) as usize;
    let baseline = rss_mib();
    let store = MemoryStore::builder()
        .max_bytes(bound_mib * 1024 * 1024)
        .build();
    let value = Bytes::from(vec![b'x'; value_bytes]);
    println!("bound {bound_mib} MiB, {value_bytes}-byte values, baseline RSS {baseline:.0} MiB");
    for i in 0..entries {
        let key = format!("http-cache:{i:032x}");
        let tags = [
            format!("http-cache:__tag:u{i}"),
            "http-cache:__tag:all".to_owned(),
        ];
        // A fresh copy per entry, as the layer's encoder makes.
        let value = Bytes::copy_from_slice(&value);
        store
            .set_tagged(&key, value, Duration::from_secs(3600), &tags)
            .await
            .unwrap();
        if (i + 1) % (entries / 6).max(1) == 0 {
            let rss = rss_mib() - baseline;
            println!(
                "{:>8} written: {:>7} entries, {:>8} tag records, RSS +{rss:.0} MiB = {:.2}x the bound",
                i + 1,
                store.entry_count(),
                store.tag_records(),
                rss / bound_mib as f64
            );
        }
    }
}
