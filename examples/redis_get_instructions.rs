//! Instructions per Redis GET, through `RedisStore::get` and straight through one shared
//! `MultiplexedConnection` (as the load benchmark's "handler + one GET" row), with and without
//! a `tokio::time::timeout` around it: what the store adds to the GET it sends.
//!
//! ```text
//! redis-server --port 6390 --save '' &     # any Redis but a shared one
//! cargo build --release --example redis_get_instructions
//! valgrind --tool=callgrind target/release/examples/redis_get_instructions store 2000 redis://127.0.0.1:6390
//! ```
//!
//! Modes: `store` (`Store::get` of a `RedisStore` with default settings), `mux` (a GET on a
//! clone of one `MultiplexedConnection`), `mux-timeout` (the same inside
//! `tokio::time::timeout`). Run each mode with two counts; the difference divided by the
//! difference in counts is one GET's instructions without start-up.

use std::time::Duration;

use bytes::Bytes;
use tower_redis_cache::{RedisStore, Store};

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_else(|| "store".to_owned());
    let n: usize = args.next().map_or(1000, |n| n.parse().expect("a count"));
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6390".to_owned());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = redis::Client::open(url.as_str()).unwrap();
        let conn = client.get_multiplexed_async_connection().await.unwrap();
        let store = RedisStore::builder(&url).connect().await.unwrap();
        let value = Bytes::from(vec![b'x'; 1024]);
        store
            .set("trc-bench:get", value, Duration::from_secs(600))
            .await
            .unwrap();
        for _ in 0..n {
            let found = match mode.as_str() {
                "store" => store.get("trc-bench:get").await.unwrap().map(|b| b.len()),
                "mux" => {
                    let mut conn = conn.clone();
                    let got: Option<Vec<u8>> = redis::cmd("GET")
                        .arg("trc-bench:get")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    got.map(|b| b.len())
                }
                "mux-timeout" => {
                    let mut conn = conn.clone();
                    let mut cmd = redis::cmd("GET");
                    cmd.arg("trc-bench:get");
                    let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
                    let got = tokio::time::timeout(Duration::from_secs(1), get)
                        .await
                        .unwrap()
                        .unwrap();
                    got.map(|b| b.len())
                }
                other => panic!("unknown mode {other}: store, mux or mux-timeout"),
            };
            assert_eq!(found, Some(1024));
        }
    });
}
