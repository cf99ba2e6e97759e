//! `RedisStore`: the production store. A few multiplexed Redis connections shared by every
//! request, tuned for a cache: no PING per command, short timeouts, broken connections
//! replaced, fail fast while the server is down.
//!
//! One file per job, each importing only from the files listed after it (the module stack of
//! docs/ARCHITECTURE.md):
//!
//! - this file: the [`Store`] implementation, and the writes and the tag invalidation it
//!   shares with `RedisCache` (the size limit, the `PX` conversion);
//! - `builder.rs`: [`RedisStoreBuilder`], what it connects to, and the constructors;
//! - `health.rs`: PING, `INFO` and the eviction-policy warning ([`RedisHealth`]);
//! - `cluster.rs`: reaching each primary of a Redis Cluster (feature `cluster`);
//! - `scripts.rs`: the Lua scripts;
//! - `connection.rs`: [`RedisStore`] itself and what every command goes through: the
//!   connection slots, the operation timeout, the retry on a fresh connection, the back-off
//!   and its probe;
//! - `source.rs`: where the connections come from, and the connection a command runs on.

use std::time::Duration;

use bytes::Bytes;

#[cfg(feature = "cluster")]
use self::scripts::RECORD_TAG_SCRIPT;
use self::scripts::RELEASE_SCRIPT;
use self::scripts::SET_TAGGED_SCRIPT;
use crate::store::{Store, StoreFuture};
use crate::{Error, ErrorKind, Result};

mod builder;
#[cfg(feature = "cluster")]
mod cluster;
mod connection;
mod health;
mod scripts;
mod source;

pub use self::builder::RedisStoreBuilder;
pub use self::connection::{RedisStore, RedisStoreStats};
pub use self::health::RedisHealth;

impl RedisStore {
    /// Stores `value` under `key` for `ttl` (at least 1 ms: a zero TTL still stores, briefly).
    /// The one plain write, of the [`Store`] and of `RedisCache`: a value over the size limit
    /// is refused before anything is sent.
    pub(crate) async fn write(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.check_size(value)?;
        self.query(
            ::redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(px(ttl)),
        )
        .await
    }

    /// Stores each `(key, value)` for `ttl` in one pipeline (on a cluster, concurrently). Every
    /// value is checked against the size limit first: one over it means nothing is written.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) async fn write_many(
        &self,
        entries: &[(String, Vec<u8>)],
        ttl: Duration,
    ) -> Result<()> {
        for (_, value) in entries {
            self.check_size(value)?;
        }
        let millis = px(ttl);
        let mut pipe = ::redis::pipe();
        for (key, value) in entries {
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(millis)
                .ignore();
        }
        self.query_pipeline(&pipe).await
    }

    /// Stores `value` under `key` for `ttl` (at least 1 ms) and records the key in each tag
    /// set; a value over the size limit is refused before anything is sent.
    /// On one server: one script, atomic. On a cluster, where the value and its tag sets live
    /// in different slots: first each tag record (concurrently, one script per tag set),
    /// then the value, so a tag invalidation never misses a value that was stored before it
    /// began (see docs/ARCHITECTURE.md, "Cluster").
    pub(crate) async fn write_tagged(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        tag_keys: &[String],
    ) -> Result<()> {
        self.check_size(value)?;
        let millis = px(ttl);
        #[cfg(feature = "cluster")]
        if self.is_cluster() {
            let records = tag_keys.iter().map(|tag_key| {
                let mut invocation = RECORD_TAG_SCRIPT.prepare_invoke();
                invocation.key(tag_key).arg(key).arg(millis);
                async move { self.run_script::<i64>(&invocation).await }
            });
            futures_util::future::try_join_all(records).await?;
            return self
                .query(
                    ::redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(millis),
                )
                .await;
        }
        let mut invocation = SET_TAGGED_SCRIPT.prepare_invoke();
        invocation.key(key);
        for tag_key in tag_keys {
            invocation.key(tag_key);
        }
        invocation.arg(value).arg(millis);
        let _: i64 = self.run_script(&invocation).await?;
        Ok(())
    }

    /// Unlinks every key recorded in the tag set `tag_key`; returns how many were removed, and
    /// the members popped when there were at most `limit` of them.
    async fn unlink_tag(&self, tag_key: &str, limit: usize) -> Result<(u64, Option<Vec<String>>)> {
        let mut removed = 0;
        let mut listed = Some(Vec::new());
        loop {
            // Pop in batches: each step is one short command, within the op timeout.
            let popped: Vec<(Vec<u8>, f64)> = self
                .query(::redis::cmd("ZPOPMIN").arg(tag_key).arg(TAG_BATCH))
                .await?;
            if !popped.is_empty() {
                let mut unlink = ::redis::cmd("UNLINK");
                for (key, _) in &popped {
                    unlink.arg(key);
                }
                removed += self.query::<u64>(&unlink).await?;
                if let Some(keys) = &mut listed {
                    let names: Option<Vec<String>> = popped
                        .iter()
                        .map(|(k, _)| String::from_utf8(k.clone()).ok())
                        .collect();
                    match names {
                        Some(names) if keys.len() + names.len() <= limit => keys.extend(names),
                        // Too many to list, or a key that is not text: the listing would lie.
                        _ => listed = None,
                    }
                }
            }
            if popped.len() < TAG_BATCH {
                return Ok((removed, listed));
            }
        }
    }

    /// Refuses a value over the write size limit.
    fn check_size(&self, value: &[u8]) -> Result<()> {
        let limit = self.shared.max_value_bytes;
        if value.len() > limit {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "value of {} bytes is over the store's limit of {limit} bytes",
                    value.len()
                ),
            ));
        }
        Ok(())
    }
}

/// A TTL as Redis's `PX` argument: at least 1 ms (Redis rejects 0), at most 2^31 s. The one
/// conversion of every write (the store's, and `RedisCache`'s through [`RedisStore::write`]).
fn px(ttl: Duration) -> u64 {
    let millis = crate::settings::clamp(ttl).as_millis();
    u64::try_from(millis).unwrap_or(u64::MAX).max(1)
}

/// Tag-set members popped and unlinked per step of a tag invalidation.
const TAG_BATCH: usize = 1000;

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("source", &self.shared.source.name())
            .field("connections", &self.shared.slots.len())
            .field("open", &self.open_connections())
            .field("op_timeout", &self.shared.op_timeout)
            .finish()
    }
}

impl Store for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let value: Option<Vec<u8>> = self.query(::redis::cmd("GET").arg(key)).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        if ttl.is_zero() {
            // A zero TTL means "do not keep" (Redis rejects PX 0): the key holds nothing.
            return Box::pin(async move { self.delete(key).await.map(drop) });
        }
        Box::pin(async move { self.write(key, &value, ttl).await })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed: u64 = self.query(::redis::cmd("UNLINK").arg(key)).await?;
            Ok(removed > 0)
        })
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tag_keys: &'a [String],
    ) -> StoreFuture<'a, ()> {
        if tag_keys.is_empty() || ttl.is_zero() {
            return self.set(key, value, ttl);
        }
        Box::pin(async move { self.write_tagged(key, &value, ttl, tag_keys).await })
    }

    fn get_with_ttl<'a>(
        &'a self,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Bytes, Option<Duration>)>> {
        Box::pin(async move {
            let mut pipe = ::redis::pipe();
            pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
            let (value, pttl): (Option<Vec<u8>>, i64) = self.query_pipeline(&pipe).await?;
            // PTTL: -1 without expiry (never written so by this crate), -2 gone meanwhile.
            let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
            Ok(value.map(|v| (Bytes::from(v), ttl)))
        })
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move { Ok(self.unlink_tag(tag_key, 0).await?.0) })
    }

    fn invalidate_tag_listed<'a>(
        &'a self,
        tag_key: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, (u64, Option<Vec<String>>)> {
        Box::pin(self.unlink_tag(tag_key, limit))
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let millis = px(ttl);
            let taken: Option<String> = self
                .query(
                    ::redis::cmd("SET")
                        .arg(key)
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis),
                )
                .await?;
            Ok(taken.is_some())
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        // Compare-and-delete in one step, so a lock that expired and was taken by another
        // instance is never released by its former owner.
        Box::pin(async move {
            let _: i64 = self.run_script(RELEASE_SCRIPT.key(key).arg(token)).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn px_is_at_least_one_ms_and_at_most_the_clamp() {
        assert_eq!(px(Duration::ZERO), 1);
        assert_eq!(px(Duration::from_micros(10)), 1);
        assert_eq!(px(Duration::from_secs(2)), 2000);
        assert_eq!(px(Duration::MAX), (1u64 << 31) * 1000);
    }
}
