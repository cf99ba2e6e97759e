//! Cache-aside: the repository reads the cache, falls back to the database on a miss and
//! fills the cache; an update writes the database, then invalidates the cached copy.
//!
//! The "database" here is an in-memory map that counts its reads, so the example can show
//! (and check) which reads reached it. Run it against a Redis server:
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example cache_aside
//! ```
//!
//! It writes keys under `example:cache_aside:` and exits non-zero if the pattern misbehaved.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tower_redis_cache::{RedisCache, RedisStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

/// Stands in for the real database: an in-memory map that counts reads.
#[derive(Default)]
struct Database {
    users: Mutex<HashMap<u64, User>>,
    reads: AtomicUsize,
}

impl Database {
    fn find(&self, id: u64) -> Option<User> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.users.lock().unwrap().get(&id).cloned()
    }

    fn save(&self, user: User) {
        self.users.lock().unwrap().insert(user.id, user);
    }

    fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }
}

/// The application's view of users: the cache is an implementation detail of it.
struct UserRepository {
    db: Database,
    cache: RedisCache,
}

impl UserRepository {
    fn key(id: u64) -> String {
        RedisCache::key(&["user", &id.to_string()])
    }

    /// Cache first; on a miss, the database, then fill the cache. A cache failure is not a
    /// failure of the read: it falls through to the database.
    async fn get(&self, id: u64) -> Option<User> {
        let key = Self::key(id);
        match self.cache.get::<User>(&key).await {
            Ok(Some(user)) => {
                println!("user {id}: from the cache");
                return Some(user);
            }
            Ok(None) => {}
            Err(e) => eprintln!("user {id}: cache read failed ({e}); using the database"),
        }
        let user = self.db.find(id)?;
        println!("user {id}: from the database");
        if let Err(e) = self.cache.set(&key, &user, TTL).await {
            eprintln!("user {id}: could not fill the cache: {e}");
        }
        Some(user)
    }

    /// The database first, then drop the cached copy, so the next read loads the new value.
    /// Deleting (rather than overwriting) keeps a slow concurrent reader from re-filling the
    /// cache with the value it read before the update for longer than its TTL allows.
    async fn update(&self, user: User) -> Result<(), BoxError> {
        let key = Self::key(user.id);
        self.db.save(user);
        self.cache.delete(&key).await?;
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
    let cache = RedisCache::from_store(&store).key_prefix("example:cache_aside");
    cache.delete_pattern("*").await?; // a clean slate for the checks below

    let repo = UserRepository {
        db: Database::default(),
        cache,
    };
    repo.db.save(User {
        id: 1,
        name: "Ada".into(),
    });

    let first = repo.get(1).await;
    let second = repo.get(1).await;
    check(first == second && first.is_some(), "both reads see user 1")?;
    check(
        repo.db.reads() == 1,
        "the second read was served by the cache",
    )?;

    repo.update(User {
        id: 1,
        name: "Ada Lovelace".into(),
    })
    .await?;
    println!("user 1: updated in the database, cached copy invalidated");
    check(
        !repo.cache.exists(&UserRepository::key(1)).await?,
        "update invalidated",
    )?;

    let after = repo.get(1).await.map(|u| u.name);
    check(
        after.as_deref() == Some("Ada Lovelace"),
        "the read after the update is fresh",
    )?;
    check(
        repo.db.reads() == 2,
        "the read after the update reached the database",
    )?;
    check(repo.get(404).await.is_none(), "a missing user is None")?;

    println!("database reads: {}", repo.db.reads());
    println!("cache_aside: ok");
    Ok(())
}
