//! Write-through: every write goes to the database and then to the cache, so reads after a
//! write are served from the cache with the new value, without a database read.
//!
//! The "database" here is an in-memory map that counts its reads. Run it against a Redis
//! server:
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example write_through
//! ```
//!
//! It writes keys under `example:write_through:` and exits non-zero if the pattern
//! misbehaved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tower_redis_cache::{RedisCache, RedisStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
    price_cents: u64,
}

/// Stands in for the real database: an in-memory map that counts reads.
#[derive(Default)]
struct Database {
    products: Mutex<HashMap<u64, Product>>,
    reads: AtomicUsize,
}

struct ProductStore {
    db: Database,
    cache: RedisCache,
}

impl ProductStore {
    fn key(id: u64) -> String {
        RedisCache::key(&["product", &id.to_string()])
    }

    /// The database is the source of truth: write it first, then the cache. If the cache
    /// write fails the caller hears of it (the cached copy may be stale until its TTL).
    async fn save(&self, product: &Product) -> Result<(), BoxError> {
        self.db
            .products
            .lock()
            .unwrap()
            .insert(product.id, product.clone());
        self.cache.set(&Self::key(product.id), product, TTL).await?;
        Ok(())
    }

    /// Reads hit the cache; the database only backs up a miss (for example after eviction).
    async fn get(&self, id: u64) -> Result<Option<Product>, BoxError> {
        if let Some(product) = self.cache.get(&Self::key(id)).await? {
            return Ok(Some(product));
        }
        self.db.reads.fetch_add(1, Ordering::SeqCst);
        let product = self.db.products.lock().unwrap().get(&id).cloned();
        if let Some(product) = &product {
            self.cache.set(&Self::key(id), product, TTL).await?;
        }
        Ok(product)
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
    let cache = RedisCache::from_store(&store).key_prefix("example:write_through");
    cache.delete_pattern("*").await?;
    let products = ProductStore {
        db: Database::default(),
        cache,
    };

    for id in 1..=3 {
        let product = Product {
            id,
            name: format!("widget {id}"),
            price_cents: 100 * id,
        };
        products.save(&product).await?;
    }
    println!("saved 3 products");
    let mut repriced = products.get(2).await?.ok_or("product 2 is missing")?;
    repriced.price_cents = 250;
    products.save(&repriced).await?;
    println!("repriced product 2");

    for id in 1..=3 {
        let product = products
            .get(id)
            .await?
            .ok_or("a saved product is missing")?;
        let in_db = products.db.products.lock().unwrap().get(&id).cloned();
        check(in_db.as_ref() == Some(&product), "cache and database agree")?;
    }
    let price = products.get(2).await?.map(|p| p.price_cents);
    check(
        price == Some(250),
        "the read after the write sees the new price",
    )?;
    let reads = products.db.reads.load(Ordering::SeqCst);
    check(reads == 0, "no read reached the database")?;

    println!("database reads: {reads}");
    println!("write_through: ok");
    Ok(())
}
