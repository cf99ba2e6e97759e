//! Event-based invalidation: when a user is updated, drop everything derived from it:
//!
//! - the user itself, `user:{id}`, by key;
//! - every page that shows the user (profile, dashboard), by the tag `user:{id}`;
//! - the user lists, by the tag `users`;
//! - the user's orders, `user:{id}:orders:*`, by pattern.
//!
//! Tags cost O(keys carrying the tag); the pattern walks the keyspace with SCAN (never KEYS),
//! so prefer tags for hot paths. Keys are built with [`RedisCache::key`], whose escaping keeps
//! the pattern for user `1` from matching user `10`'s orders, or user `ali*` from matching
//! `alice`'s.
//!
//! The "database" is left out: the events stand for updates that were written to it. Run it
//! against a Redis server:
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example invalidation
//! ```
//!
//! It writes keys under `example:invalidation:` and exits non-zero if the pattern
//! misbehaved.

use std::time::Duration;

use tokio::sync::mpsc;
use tower_redis_cache::{RedisCache, RedisStore};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const TTL: Duration = Duration::from_secs(300);

/// What the rest of the system publishes (in production: a queue, Redis pub/sub, a CDC feed).
#[derive(Debug)]
enum Event {
    UserUpdated { id: String },
}

fn user_key(id: &str) -> String {
    RedisCache::key(&["user", id])
}

/// Fills the cache as the application's reads would.
async fn warm(cache: &RedisCache, ids: &[&str]) -> Result<(), BoxError> {
    for id in ids {
        let user_tag = format!("user:{id}");
        cache.set(&user_key(id), &format!("user {id}"), TTL).await?;
        for page in ["profile", "dashboard"] {
            let key = RedisCache::key(&[page, id]);
            cache
                .set_tagged(&key, &format!("{page} of {id}"), TTL, &[&user_tag])
                .await?;
        }
        for order in 1..=3 {
            let key = RedisCache::key(&["user", id, "orders", &order.to_string()]);
            cache.set(&key, &order, TTL).await?;
        }
    }
    for list in ["users:page:1", "users:page:2", "users:active"] {
        cache.set_tagged(list, &ids, TTL, &["users"]).await?;
    }
    Ok(())
}

/// What one `UserUpdated` event drops, by each mechanism.
#[derive(Debug, PartialEq)]
struct Dropped {
    user: bool,
    pages: u64,
    lists: u64,
    orders: u64,
}

async fn on_user_updated(cache: &RedisCache, id: &str) -> Result<Dropped, BoxError> {
    Ok(Dropped {
        user: cache.delete(&user_key(id)).await?,
        pages: cache.invalidate_tag(&format!("user:{id}")).await?,
        lists: cache.invalidate_tag("users").await?,
        orders: cache
            .delete_pattern(&format!("{}:orders:*", user_key(id)))
            .await?,
    })
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
    let cache = RedisCache::from_store(&store).key_prefix("example:invalidation");
    cache.delete_pattern("*").await?;
    let ids = ["1", "10", "ali*", "alice"];
    warm(&cache, &ids).await?;

    // The invalidator: a task that consumes events and reports what it dropped.
    let (events, mut inbox) = mpsc::channel::<Event>(16);
    let (done, mut reports) = mpsc::channel::<(String, Dropped)>(16);
    let invalidator = tokio::spawn({
        let cache = cache.clone();
        async move {
            while let Some(Event::UserUpdated { id }) = inbox.recv().await {
                match on_user_updated(&cache, &id).await {
                    Ok(dropped) => done.send((id, dropped)).await.unwrap(),
                    Err(e) => eprintln!("invalidating user {id} failed: {e}"),
                }
            }
        }
    });

    for id in ["1", "ali*"] {
        events.send(Event::UserUpdated { id: id.into() }).await?;
        let (id, dropped) = reports.recv().await.ok_or("the invalidator stopped")?;
        println!(
            "user {id} updated: dropped user={} pages={} lists={} orders={}",
            dropped.user, dropped.pages, dropped.lists, dropped.orders
        );
        let lists = if id == "1" { 3 } else { 0 }; // the second event finds them gone
        check(
            dropped
                == Dropped {
                    user: true,
                    pages: 2,
                    lists,
                    orders: 3,
                },
            "each event drops the user, its pages, the lists and its orders",
        )?;
    }
    drop(events);
    invalidator.await?;

    for id in ["1", "ali*"] {
        check(
            !cache.exists(&user_key(id)).await?,
            "updated users are gone",
        )?;
        let pages = [
            RedisCache::key(&["profile", id]),
            RedisCache::key(&["dashboard", id]),
        ];
        check(
            cache
                .get_many::<String, _>(&pages)
                .await?
                .iter()
                .all(Option::is_none),
            "pages gone",
        )?;
    }
    for id in ["10", "alice"] {
        check(
            cache.exists(&user_key(id)).await?,
            "other users stay cached",
        )?;
        let order = RedisCache::key(&["user", id, "orders", "1"]);
        check(
            cache.exists(&order).await?,
            "other users' orders stay cached",
        )?;
        check(
            cache.exists(&RedisCache::key(&["profile", id])).await?,
            "other pages stay",
        )?;
    }
    check(
        !cache.exists("users:active").await?,
        "the user lists are gone",
    )?;

    println!("invalidation: ok");
    Ok(())
}
