//! `MemoryStore`: an in-process store on moka, for examples, tests and apps without Redis.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;

use super::{Memo, Store, StoreFuture};

/// An embedded, bounded, in-process store (moka) with per-entry TTL.
///
/// Cloning is cheap and clones share the same entries. Entries are evicted when the bound is
/// reached (TinyLFU admission, LRU eviction) and expire after their TTL. The bound counts
/// each entry's key, value and tags plus an estimate of the bookkeeping around them, and a
/// tag's record of an entry goes when the entry goes, so the process's memory follows the
/// bound (see the repository's `docs/failure-modes.md` for the measured factor).
#[derive(Clone)]
pub struct MemoryStore {
    cache: Cache<String, Value>,
    tags: TagIndex,
    /// Lock key -> owner token and expiry, for layers sharing this store in one process.
    locks: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

/// Tag set name -> keys stored with that tag. An entry leaves its tag sets when it is
/// evicted, expires or is removed.
type TagIndex = Arc<Mutex<HashMap<String, HashSet<String>>>>;

#[derive(Clone)]
struct Value {
    bytes: Bytes,
    /// A reader's decoded form of `bytes` (see [`Memo`]).
    memo: Memo,
    ttl: Duration,
    /// The tag sets the entry is recorded in.
    tags: Option<Arc<[String]>>,
}

impl Value {
    /// What the entry costs against the bound: its bytes, and an estimate of moka's node,
    /// the key's and value's allocations and the tag index's records.
    fn weight(&self, key: &str) -> u64 {
        let tags = self.tags.as_deref().unwrap_or_default();
        let tag_bytes: usize = tags
            .iter()
            .map(|t| t.len() + key.len() + TAG_OVERHEAD)
            .sum();
        (key.len() + self.bytes.len() + ENTRY_OVERHEAD + tag_bytes) as u64
    }
}

/// Bytes of bookkeeping per entry beyond its key and value (moka's node and timer wheel
/// entry, the key's `String`, the value's `Bytes`, the memo slot, allocator rounding),
/// measured with `examples/memory_bound.rs`. A reader's decoded form in the memo slot (the
/// layer's header map; the body shares the value's bytes) comes on top of it.
const ENTRY_OVERHEAD: usize = 640;

/// Bytes of bookkeeping per tag record (a hash set slot and the key's copy in it).
const TAG_OVERHEAD: usize = 96;

fn lock(tags: &TagIndex) -> std::sync::MutexGuard<'_, HashMap<String, HashSet<String>>> {
    tags.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops `key` from the tag sets `tags`, and any set left empty.
fn unrecord(index: &mut HashMap<String, HashSet<String>>, key: &str, tags: &[String]) {
    for tag in tags {
        if let Some(members) = index.get_mut(tag) {
            members.remove(key);
            if members.is_empty() {
                index.remove(tag);
            }
        }
    }
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
        let tags = TagIndex::default();
        let index = tags.clone();
        let mut builder = Cache::builder()
            .max_capacity(capacity)
            .expire_after(PerEntryTtl)
            // A replaced entry's tag records are updated by the write that replaced it.
            .eviction_listener(move |key: Arc<String>, value: Value, cause| {
                if let (Some(tags), false) = (&value.tags, cause == RemovalCause::Replaced) {
                    unrecord(&mut lock(&index), &key, tags);
                }
            });
        if let Some(floor) = floor {
            builder = builder.weigher(move |key: &String, value: &Value| {
                u32::try_from(value.weight(key).max(floor)).unwrap_or(u32::MAX)
            });
        }
        MemoryStore {
            cache: builder.build(),
            tags,
            locks: Arc::default(),
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

    /// The number of entries and their weighed size (keys, values, tags and bookkeeping, as
    /// counted against the bound), after running moka's pending maintenance.
    pub fn stats(&self) -> MemoryStoreStats {
        self.cache.run_pending_tasks();
        let stats = MemoryStoreStats {
            entries: self.cache.entry_count(),
            weighted_bytes: self.cache.weighted_size(),
        };
        #[cfg(feature = "metrics")]
        stats.publish();
        stats
    }

    /// Sets the size gauges (feature `metrics`) after a write; moka's counts are approximate
    /// until its pending maintenance runs, which they do not wait for.
    fn publish_size(&self) {
        #[cfg(feature = "metrics")]
        MemoryStoreStats {
            entries: self.cache.entry_count(),
            weighted_bytes: self.cache.weighted_size(),
        }
        .publish();
    }

    /// How many keys the tag index records, over all tags (for tests and health checks).
    pub fn tag_records(&self) -> usize {
        self.cache.run_pending_tasks();
        lock(&self.tags).values().map(HashSet::len).sum()
    }

    /// The value under `key`, without a future (the two-tier store's L1 hit).
    #[cfg(feature = "tiered")]
    pub(crate) fn peek(&self, key: &str) -> Option<Bytes> {
        self.cache.get(key).map(|v| v.bytes)
    }

    /// The value under `key` and its memo slot, without a future (for the two-tier store's
    /// L1).
    #[cfg(feature = "tiered")]
    pub(crate) fn peek_memoized(&self, key: &str) -> Option<(Bytes, Memo)> {
        self.cache.get(key).map(|v| (v.bytes, v.memo))
    }

    /// Removes every entry whose key `matches`; returns how many (for the two-tier store's
    /// pattern invalidations: a walk over every entry).
    #[cfg(feature = "tiered")]
    pub(crate) fn remove_matching(&self, matches: impl Fn(&str) -> bool) -> u64 {
        let keys: Vec<Arc<String>> = self
            .cache
            .iter()
            .filter(|(key, _)| matches(key))
            .map(|(key, _)| key)
            .collect();
        keys.iter()
            .filter(|key| self.cache.remove(key.as_str()).is_some())
            .count() as u64
    }

    /// Removes every entry.
    #[cfg(feature = "tiered")]
    pub(crate) fn clear(&self) {
        self.cache.invalidate_all();
    }

    fn insert(&self, key: &str, bytes: Bytes, ttl: Duration, tags: Option<Arc<[String]>>) {
        // A zero TTL means "do not keep", in every store: the key holds nothing afterwards.
        if ttl.is_zero() {
            self.cache.remove(key);
            return;
        }
        let ttl = crate::settings::clamp(ttl);
        self.cache.insert(
            key.to_owned(),
            Value {
                bytes,
                memo: Memo::default(),
                ttl,
                tags,
            },
        );
        self.publish_size();
    }
}

/// A [`MemoryStore`]'s size, from [`MemoryStore::stats`]. With feature `metrics` the same
/// values are the gauges `cache_store_memory_entries` and `cache_store_memory_bytes`, set after
/// each write (and each call to `stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryStoreStats {
    /// Entries held.
    pub entries: u64,
    /// Their weight against the bound: keys, values, tags and an estimate of bookkeeping
    /// (when the store is bounded by entries only, each entry weighs 1).
    pub weighted_bytes: u64,
}

#[cfg(feature = "metrics")]
impl MemoryStoreStats {
    fn publish(&self) {
        use crate::observe::names;
        metrics::gauge!(names::MEMORY_ENTRIES).set(self.entries as f64);
        metrics::gauge!(names::MEMORY_BYTES).set(self.weighted_bytes as f64);
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

    fn get_memoized<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(Bytes, Option<Memo>)>> {
        let value = self.get_in_process(key).flatten();
        Box::pin(std::future::ready(Ok(value)))
    }

    fn get_in_process(&self, key: &str) -> Option<Option<(Bytes, Option<Memo>)>> {
        Some(self.cache.get(key).map(|v| (v.bytes, Some(v.memo))))
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        self.insert(key, value, ttl, None);
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
        // Never call the cache while holding the index: its eviction listener takes the
        // index, and may run inside any cache call.
        let old_tags = self.cache.get(key).and_then(|v| v.tags);
        let new_tags: Option<Arc<[String]>> = (!tag_keys.is_empty()).then(|| tag_keys.into());
        self.insert(key, value, ttl, new_tags);
        let mut grown = Vec::new();
        {
            let mut index = lock(&self.tags);
            if let Some(old) = old_tags {
                let dropped: Vec<String> = old
                    .iter()
                    .filter(|tag| !tag_keys.contains(tag))
                    .cloned()
                    .collect();
                unrecord(&mut index, key, &dropped);
            }
            if !ttl.is_zero() {
                for tag_key in tag_keys {
                    let members = index.entry(tag_key.clone()).or_default();
                    if members.insert(key.to_owned())
                        && members.len() >= PRUNE_AT
                        && members.len().is_power_of_two()
                    {
                        grown.push(tag_key.clone());
                    }
                }
            }
        }
        // An entry evicted between its insert and its record above leaves a record behind;
        // sweep such records when a set doubles, so they stay a small fraction of it.
        for tag_key in grown {
            let members: Vec<String> = lock(&self.tags)
                .get(&tag_key)
                .map(|m| m.iter().cloned().collect())
                .unwrap_or_default();
            let dead: Vec<String> = members
                .into_iter()
                .filter(|m| !self.cache.contains_key(m))
                .collect();
            let mut index = lock(&self.tags);
            for key in &dead {
                unrecord(&mut index, key, std::slice::from_ref(&tag_key));
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        let members = lock(&self.tags).remove(tag_key).unwrap_or_default();
        let removed = members
            .iter()
            .filter(|key| self.cache.remove(key.as_str()).is_some())
            .count() as u64;
        Box::pin(std::future::ready(Ok(removed)))
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let now = Instant::now();
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.len() >= PRUNE_AT {
            locks.retain(|_, (_, expires)| *expires > now);
        }
        let free = locks.get(key).is_none_or(|(_, expires)| *expires <= now);
        if free {
            let expires = now + crate::settings::clamp(ttl);
            locks.insert(key.to_owned(), (token.to_owned(), expires));
        }
        Box::pin(std::future::ready(Ok(free)))
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if locks.get(key).is_some_and(|(owner, _)| owner == token) {
            locks.remove(key);
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// Tag sets are pruned of evicted keys when they reach this size (and each doubling).
const PRUNE_AT: usize = 1024;
