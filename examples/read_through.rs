//! Read-through: callers ask the cache, and the cache loads what it lacks through a loader
//! (here a database query), with [`RedisCache::get_or_insert_with`]. Concurrent requests for
//! one cold key run the loader once, and "not found" is cached too, as JSON `null`.
//!
//! The "database" here is an in-memory map whose loader counts its calls. Run it against a
//! Redis server:
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example read_through
//! ```
//!
//! It writes keys under `example:read_through:` and exits non-zero if the pattern
//! misbehaved.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tower_redis_cache::{RedisCache, RedisStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Article {
    id: u64,
    title: String,
}

/// A cache that fills itself from `load`.
struct ReadThrough<L> {
    cache: RedisCache,
    ttl: Duration,
    load: L,
}

impl<L, Fut> ReadThrough<L>
where
    L: Fn(u64) -> Fut,
    Fut: Future<Output = Result<Option<Article>, BoxError>>,
{
    async fn get(&self, id: u64) -> Result<Option<Article>, BoxError> {
        // The decorator's default key: a name and the md5 of the arguments as JSON.
        let key = RedisCache::function_key("article", &id)?;
        self.cache
            .get_or_insert_with(&key, self.ttl, || (self.load)(id))
            .await
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
    let cache = RedisCache::from_store(&store).key_prefix("example:read_through");
    cache.delete_pattern("*").await?;

    // Stands in for the real database.
    let db: Arc<HashMap<u64, Article>> = Arc::new(
        (1..=3)
            .map(|id| {
                (
                    id,
                    Article {
                        id,
                        title: format!("article {id}"),
                    },
                )
            })
            .collect(),
    );
    let loads = Arc::new(AtomicUsize::new(0));
    let articles = Arc::new(ReadThrough {
        cache,
        ttl: Duration::from_secs(300),
        load: {
            let (db, loads) = (db.clone(), loads.clone());
            move |id| {
                let (db, loads) = (db.clone(), loads.clone());
                async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await; // a slow query
                    Ok(db.get(&id).cloned())
                }
            }
        },
    });

    let mut readers = JoinSet::new();
    for _ in 0..50 {
        let articles = articles.clone();
        readers.spawn(async move { articles.get(1).await });
    }
    while let Some(read) = readers.join_next().await {
        let title = read??.map(|a| a.title);
        check(
            title.as_deref() == Some("article 1"),
            "every reader got article 1",
        )?;
    }
    println!(
        "50 concurrent reads of article 1: {} load",
        loads.load(Ordering::SeqCst)
    );
    check(
        loads.load(Ordering::SeqCst) == 1,
        "one load for 50 concurrent readers",
    )?;

    articles.get(1).await?;
    check(
        loads.load(Ordering::SeqCst) == 1,
        "a later read is a cache hit",
    )?;

    check(
        articles.get(99).await?.is_none(),
        "article 99 does not exist",
    )?;
    check(
        articles.get(99).await?.is_none(),
        "article 99 still does not exist",
    )?;
    println!("2 reads of missing article 99: 1 load (the miss is cached as null)");
    check(loads.load(Ordering::SeqCst) == 2, "not-found is cached")?;

    println!("read_through: ok");
    Ok(())
}
