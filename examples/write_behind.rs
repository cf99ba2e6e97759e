//! Write-behind (write-back): a write is acknowledged once it is in the cache; a background
//! task flushes the queued writes to the database in batches. On a graceful shutdown the
//! queue is drained and flushed, so no acknowledged write is lost.
//!
//! The queue lives in this process: a crash (not a graceful shutdown) loses the writes not
//! yet flushed. Where that matters, queue the writes in Redis (a list or a stream) and have
//! the flusher acknowledge them after the database commit. Keep the cache TTL well above the
//! flush interval, or a read could miss the cache before the database has the write.
//!
//! The "database" here is an in-memory map that counts its batch writes. Run it against a
//! Redis server:
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example write_behind
//! ```
//!
//! It writes keys under `example:write_behind:` and exits non-zero if the pattern
//! misbehaved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tower_redis_cache::{RedisCache, RedisStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TTL: Duration = Duration::from_secs(300);
const BATCH: usize = 100;
const FLUSH_EVERY: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Counter {
    id: u64,
    value: u64,
}

/// Stands in for the real database: an in-memory map that counts batch writes.
#[derive(Default)]
struct Database {
    counters: Mutex<HashMap<u64, Counter>>,
    batches: AtomicUsize,
}

impl Database {
    fn write_batch(&self, batch: impl IntoIterator<Item = Counter>) {
        let mut counters = self.counters.lock().unwrap();
        for counter in batch {
            counters.insert(counter.id, counter);
        }
        self.batches.fetch_add(1, Ordering::SeqCst);
    }
}

/// Writes to the cache now and to the database later.
struct WriteBehind {
    cache: RedisCache,
    queue: mpsc::Sender<Counter>,
    flusher: JoinHandle<()>,
}

impl WriteBehind {
    fn start(cache: RedisCache, db: Arc<Database>) -> Self {
        // Bounded: if the database falls behind, writers wait instead of memory growing.
        let (queue, mut pending) = mpsc::channel::<Counter>(10 * BATCH);
        let flusher = tokio::spawn(async move {
            let mut batch = Vec::with_capacity(BATCH);
            // recv_many returns 0 only once every sender is gone and the queue is empty.
            while pending.recv_many(&mut batch, BATCH).await > 0 {
                // Within a batch the last write to an id wins, as it would in the database.
                let latest: HashMap<u64, Counter> = batch.drain(..).map(|c| (c.id, c)).collect();
                db.write_batch(latest.into_values());
                tokio::time::sleep(FLUSH_EVERY).await; // let the next batch fill up
            }
        });
        Self {
            cache,
            queue,
            flusher,
        }
    }

    fn key(id: u64) -> String {
        RedisCache::key(&["counter", &id.to_string()])
    }

    /// Acknowledged once the cache holds the value and the write is queued.
    async fn write(&self, counter: Counter) -> Result<(), BoxError> {
        self.cache
            .set(&Self::key(counter.id), &counter, TTL)
            .await?;
        self.queue
            .send(counter)
            .await
            .map_err(|_| "the flusher stopped")?;
        Ok(())
    }

    /// Reads come from the cache, which is ahead of the database.
    async fn read(&self, id: u64) -> Result<Option<Counter>, BoxError> {
        Ok(self.cache.get(&Self::key(id)).await?)
    }

    /// Graceful shutdown: stop accepting writes, flush everything queued, wait for it.
    async fn shutdown(self) -> Result<(), BoxError> {
        drop(self.queue);
        self.flusher.await?;
        Ok(())
    }
}

fn check(ok: bool, what: &str) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(format!("check failed: {what}").into())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let store = RedisStore::builder(&url)
        .operation_timeout(Duration::from_secs(1))
        .connect()
        .await?;
    let cache = RedisCache::from_store(&store).key_prefix("example:write_behind");
    cache.delete_pattern("*").await?;
    let db = Arc::new(Database::default());
    let writer = WriteBehind::start(cache, db.clone());

    // 1000 writes over 200 counters: each counter is written 5 times, ending at value 5.
    let mut writes = 0;
    for round in 1..=5 {
        for id in 0..200 {
            writer.write(Counter { id, value: round }).await?;
            writes += 1;
        }
    }
    println!("acknowledged {writes} writes");
    let read = writer.read(7).await?.map(|c| c.value);
    check(
        read == Some(5),
        "reads see the latest write before it is flushed",
    )?;

    writer.shutdown().await?;
    let batches = db.batches.load(Ordering::SeqCst);
    println!("flushed to the database in {batches} batches");

    let counters = db.counters.lock().unwrap().clone();
    check(counters.len() == 200, "every counter reached the database")?;
    check(
        counters.values().all(|c| c.value == 5),
        "the database holds each counter's last write",
    )?;
    check(batches < writes, "writes were batched")?;

    println!("write_behind: ok");
    Ok(())
}
