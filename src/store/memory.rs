//! `MemoryStore`: an in-process store on moka, for examples, tests and apps without Redis.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

use super::{Store, StoreFuture};

/// An embedded, bounded, in-process store (moka) with per-entry TTL.
///
/// Cloning is cheap and clones share the same entries. Entries are evicted when the bound is
/// reached (TinyLFU admission, LRU eviction) and expire after their TTL.
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Value>,
    /// Tag set name -> keys stored with that tag (pruned of evicted keys as it grows).
    tags: Arc<Mutex<HashMap<String, HashSet<String>>>>,
}

#[derive(Clone)]
struct Value {
    bytes: Bytes,
    ttl: Duration,
}

/// Expires each entry after the TTL it was stored with.
struct PerEntryTtl;

impl Expiry<String, Value> for PerEntryTtl {
    fn expire_after_create(&self, _: &String, value: &Value, _: Instant) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Value,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// Builds a [`MemoryStore`] with explicit bounds.
#[derive(Debug, Clone, Default)]
pub struct MemoryStoreBuilder {
    max_entries: Option<u64>,
    max_bytes: Option<u64>,
}

impl MemoryStoreBuilder {
    /// At most this many entries.
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = Some(n.max(1));
        self
    }

    /// At most this many bytes of keys and values (approximately: moka evicts asynchronously).
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = Some(n.max(1));
        self
    }

    /// The store. Without any bound set, it holds at most 64 MiB.
    pub fn build(self) -> MemoryStore {
        let (capacity, floor) = match (self.max_entries, self.max_bytes) {
            (Some(entries), None) => (entries, None),
            (None, bytes) => (bytes.unwrap_or(DEFAULT_MAX_BYTES), Some(1)),
            // Weighing each entry at least max_bytes / max_entries keeps both bounds: the
            // weights sum to at most max_bytes, so there are at most max_entries entries.
            (Some(entries), Some(bytes)) => (bytes, Some((bytes / entries).max(1))),
        };
        let mut builder = Cache::builder()
            .max_capacity(capacity)
            .expire_after(PerEntryTtl);
        if let Some(floor) = floor {
            builder = builder.weigher(move |key: &String, value: &Value| {
                let size = (key.len() + value.bytes.len()) as u64;
                u32::try_from(size.max(floor)).unwrap_or(u32::MAX)
            });
        }
        MemoryStore {
            cache: builder.build(),
            tags: Arc::default(),
        }
    }
}

const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;

impl MemoryStore {
    /// A store bounded to 64 MiB of keys and values.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder to choose the bounds.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// The number of entries (approximate: pending evictions may not be counted yet).
    pub fn entry_count(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl Store for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        let value = self.cache.get(key).map(|v| v.bytes);
        Box::pin(std::future::ready(Ok(value)))
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        if !ttl.is_zero() {
            let value = Value { bytes: value, ttl };
            self.cache.insert(key.to_owned(), value);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        let removed = self.cache.remove(key).is_some();
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tag_keys: &'a [String],
    ) -> StoreFuture<'a, ()> {
        let stored = self.set(key, value, ttl);
        let mut tags = self.tags.lock().unwrap_or_else(|e| e.into_inner());
        for tag_key in tag_keys {
            let members = tags.entry(tag_key.clone()).or_default();
            members.insert(key.to_owned());
            if members.len() >= PRUNE_AT && members.len().is_power_of_two() {
                members.retain(|member| self.cache.contains_key(member));
            }
        }
        stored
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        let members = self
            .tags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(tag_key)
            .unwrap_or_default();
        let removed = members
            .iter()
            .filter(|key| self.cache.remove(key.as_str()).is_some())
            .count() as u64;
        Box::pin(std::future::ready(Ok(removed)))
    }
}

/// Tag sets are pruned of evicted keys when they reach this size (and each doubling).
const PRUNE_AT: usize = 1024;
