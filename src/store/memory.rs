//! `MemoryStore`: an in-process store on moka, for examples, tests and apps without Redis.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;
use moka::Expiry;

use super::{Memo, Store, StoreFuture};

/// An embedded, bounded, in-process store (moka) with per-entry TTL.
///
/// Cloning is cheap and clones share the same entries. Entries are evicted when the bound is
/// reached (TinyLFU admission, LRU eviction) and expire after their TTL. The bound counts
/// each entry's key, value and tags plus estimates of the bookkeeping around them and of the
/// decoded form the response layer keeps beside a value it served (see
/// [`MemoryStoreBuilder::max_bytes`]), and a tag's record of an entry goes when the entry
/// goes, so the process's memory follows the bound (see the repository's
/// `docs/failure-modes.md` for the measured factor).
#[derive(Clone)]
pub struct MemoryStore {
    // foldhash, seeded per process: keys are hashed on every read, and SipHash (moka's
    // default) was a sixth of a lookup's instructions.
    cache: Cache<String, Value, foldhash::fast::RandomState>,
    tags: Arc<TagIndex>,
    /// Lock key -> owner token and expiry, for layers sharing this store in one process.
    locks: Arc<Mutex<HashMap<String, (String, Instant)>>>,
}

/// Which entries each tag names, shared by the store and moka's eviction listener.
///
/// A record names one value, not just a key: tag set name -> key -> the generation of the
/// value stored with that tag. Every write of a key records its tags inside moka's per-key
/// compute, before the value is in the cache, and the eviction listener drops only records
/// of the very value that left. So a removal notice that arrives late, or a record made
/// before a concurrent removal, can never drop or outlive the record of another value under
/// the same key, and the index needs no sweep.
#[derive(Default)]
struct TagIndex {
    sets: Mutex<TagSets>,
    /// The next value's generation: unique per store.
    generations: AtomicU64,
}

type TagSets = HashMap<String, HashMap<String, u64>>;

#[derive(Clone)]
struct Value {
    bytes: Bytes,
    /// A reader's decoded form of `bytes` (see [`Memo`]).
    memo: Memo,
    ttl: Duration,
    /// The tag sets the entry is recorded in.
    tags: Option<Arc<[String]>>,
    /// Tells this value from earlier and later ones under the same key, in its tag records.
    generation: u64,
}

impl Value {
    /// What the entry costs against the bound: its bytes, an estimate of moka's node, the
    /// key's and value's allocations and the tag index's records, and an estimate of the
    /// decoded form a reader may keep in its memo slot.
    fn weight(&self, key: &str) -> u64 {
        let tags = self.tags.as_deref().unwrap_or_default();
        let tag_bytes: usize = tags
            .iter()
            .map(|t| t.len() + key.len() + TAG_OVERHEAD)
            .sum();
        (key.len() + self.bytes.len() + ENTRY_OVERHEAD + tag_bytes + decoded_estimate(&self.bytes))
            as u64
    }
}

/// Bytes of bookkeeping per entry beyond its key and value (moka's node and timer wheel
/// entry, the key's `String`, the value's `Bytes`, the memo slot, allocator rounding),
/// measured with `examples/memory_bound.rs`.
const ENTRY_OVERHEAD: usize = 640;

/// Bytes of bookkeeping per tag record (a hash map slot with the key's copy and the value's
/// generation in it).
const TAG_OVERHEAD: usize = 104;

/// What the decoded form a reader keeps in a value's memo slot is counted as: moka weighs an
/// entry when it is written, before anyone decodes it, and the store cannot look inside its
/// values, so every value is charged an estimate from its size alone.
///
/// The layer's decoded response (measured with `examples/decoded_size.rs`: live heap bytes
/// after the first hit) costs about 1 KiB plus 150 to 300 bytes per header: its header map, whose
/// values share the stored bytes, and the parsed directives. The body is shared, not copied,
/// so the decoded form grows with the headers at the front of a value, never with its body.
/// Hence a fixed part plus twice the value's first 4 KiB: 1 KiB to 9 KiB per value. Measured
/// against it: 1 header and a 10-byte body, 1.0 KiB decoded (1.2 KiB counted); 8 headers and
/// 1 KiB, 3.2 KiB (3.8 KiB); 16 headers and 1 KiB, 3.5 KiB (4.6 KiB); 8 headers and 64 KiB,
/// 3.2 KiB (9 KiB). A small body with few headers is over-counted (1 header and 1 KiB:
/// 1.0 KiB decoded, 3.2 KiB counted), a value made mostly of many short headers under-counted
/// (32 headers over a 200-byte body: 6.6 KiB decoded, 4.4 KiB counted).
fn decoded_estimate(bytes: &[u8]) -> usize {
    DECODED_FIXED + 2 * bytes.len().min(DECODED_SPAN)
}

/// See [`decoded_estimate`].
const DECODED_FIXED: usize = 1024;
/// See [`decoded_estimate`].
const DECODED_SPAN: usize = 4096;

fn lock(tags: &TagIndex) -> std::sync::MutexGuard<'_, TagSets> {
    tags.sets.lock().unwrap_or_else(|e| e.into_inner())
}

/// Drops the records of the value `generation` of `key` from the tag sets `tags`, and any
/// set left empty. A record of another value under the same key (a newer one, already
/// recorded) stays.
fn unrecord(sets: &mut TagSets, key: &str, generation: u64, tags: &[String]) {
    for tag in tags {
        if let Some(members) = sets.get_mut(tag) {
            if members.get(key) == Some(&generation) {
                members.remove(key);
                if members.is_empty() {
                    sets.remove(tag);
                }
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

    /// At most this many bytes (approximately: moka evicts asynchronously).
    ///
    /// Each entry counts its key and value, its tags, an estimate of the bookkeeping around
    /// them, and an estimate of the decoded form the response layer keeps beside a value it
    /// has served (about 1 KiB plus twice the value's first 4 KiB). That last part is counted
    /// for every entry from the moment it is written, decoded or not: moka weighs an entry
    /// only on writes, and an entry is decoded on its first in-process hit. The body is never
    /// counted twice (the decoded form shares it); a value of many short headers may be
    /// decoded into more than its estimate.
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
        let tags = Arc::new(TagIndex::default());
        let index = tags.clone();
        let mut builder = Cache::builder()
            .max_capacity(capacity)
            .expire_after(PerEntryTtl)
            // Whatever the cause (a replaced value too), a value that leaves takes its own
            // records with it; a newer value's records under the same tags stay.
            .eviction_listener(move |key: Arc<String>, value: Value, _| {
                if let Some(tags) = &value.tags {
                    unrecord(&mut lock(&index), &key, value.generation, tags);
                }
            });
        if let Some(floor) = floor {
            builder = builder.weigher(move |key: &String, value: &Value| {
                u32::try_from(value.weight(key).max(floor)).unwrap_or(u32::MAX)
            });
        }
        MemoryStore {
            cache: builder.build_with_hasher(foldhash::fast::RandomState::default()),
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

    /// The number of entries and their weighed size (keys, values, tags, bookkeeping and
    /// decoded forms, as counted against the bound), after running moka's pending maintenance.
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
        lock(&self.tags).values().map(HashMap::len).sum()
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

    /// Removes `key`, at once.
    #[cfg(feature = "tiered")]
    pub(crate) fn remove_matching_key(&self, key: &str) {
        self.cache.remove(key);
    }

    /// [`Store::invalidate_tag`], at once; returns how many entries were removed.
    pub(crate) fn invalidate_tag_now(&self, tag_key: &str) -> u64 {
        // Never call the cache while holding the index: its eviction listener takes the
        // index, and may run inside any cache call.
        let members = lock(&self.tags).remove(tag_key).unwrap_or_default();
        // Each recorded value goes if it is still the one under its key. A value written
        // since (in a compute after the set was taken) is not one the set named: it is kept,
        // and if it carries the tag, the tag's new set records it.
        members
            .iter()
            .filter(|(key, generation)| {
                let result = self
                    .cache
                    .entry_by_ref(key.as_str())
                    .and_compute_with(|current| match current {
                        Some(entry) if entry.value().generation == **generation => Op::Remove,
                        _ => Op::Nop,
                    });
                matches!(result, CompResult::Removed(_))
            })
            .count() as u64
    }

    /// Removes every entry.
    #[cfg(feature = "tiered")]
    pub(crate) fn clear(&self) {
        self.cache.invalidate_all();
    }

    /// Stores `bytes` under `key`, recorded in the tag sets `tags`.
    fn insert(&self, key: &str, bytes: Bytes, ttl: Duration, tags: &[String]) {
        // A zero TTL means "do not keep", in every store: the key holds nothing afterwards.
        if ttl.is_zero() {
            self.cache.remove(key);
            return;
        }
        let ttl = crate::settings::clamp(ttl);
        // Inside moka's compute, writes of one key run one at a time, and the records are
        // made before the value is in the cache: whenever the value leaves (at once, if moka
        // does not admit it), the listener finds its records to drop. Recording after the
        // insert would let a removal in between leave the records behind; recording outside
        // the compute would let two writers record and insert in opposite orders. The
        // previous value's records go with its replacement notice; those under tags the new
        // value keeps are already the new value's, and stay.
        self.cache.entry_by_ref(key).and_compute_with(|_| {
            let generation = self.tags.generations.fetch_add(1, Ordering::Relaxed);
            if !tags.is_empty() {
                let mut sets = lock(&self.tags);
                for tag in tags {
                    sets.entry(tag.clone())
                        .or_default()
                        .insert(key.to_owned(), generation);
                }
            }
            Op::Put(Value {
                bytes,
                memo: Memo::default(),
                ttl,
                tags: (!tags.is_empty()).then(|| tags.into()),
                generation,
            })
        });
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
    /// Their weight against the bound: keys, values, tags and estimates of bookkeeping and
    /// of decoded forms (when the store is bounded by entries only, each entry weighs 1).
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
        self.insert(key, value, ttl, &[]);
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
        self.insert(key, value, ttl, tag_keys);
        Box::pin(std::future::ready(Ok(())))
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        let removed = self.invalidate_tag_now(tag_key);
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

/// The lock table is pruned of expired locks when it reaches this size.
const PRUNE_AT: usize = 1024;

#[cfg(test)]
impl MemoryStore {
    /// What is wrong with the tag index once moka's pending maintenance has run: a live
    /// value missing from one of its tag sets, or a tag record of a key whose entry is gone,
    /// does not carry the tag, or is another value than the one recorded. Empty when the
    /// index matches the entries.
    fn tag_index_problems(&self) -> Vec<String> {
        self.cache.run_pending_tasks();
        let entries: HashMap<String, (u64, Arc<[String]>)> = self
            .cache
            .iter()
            .map(|(key, value)| {
                let tags = value.tags.unwrap_or_else(|| Arc::new([]));
                (key.to_string(), (value.generation, tags))
            })
            .collect();
        let sets = lock(&self.tags).clone();
        let mut problems = Vec::new();
        for (key, (generation, tags)) in &entries {
            for tag in tags.iter() {
                if sets.get(tag).and_then(|members| members.get(key)) != Some(generation) {
                    problems.push(format!("live {key} is missing from its tag {tag}"));
                }
            }
        }
        for (tag, members) in &sets {
            for (key, generation) in members {
                match entries.get(key) {
                    None => problems.push(format!("{tag} records {key}, which is gone")),
                    Some((_, tags)) if !tags.contains(tag) => {
                        problems.push(format!("{tag} records {key}, whose entry lacks the tag"))
                    }
                    Some((current, _)) if current != generation => {
                        problems.push(format!("{tag} records an earlier value of {key}"))
                    }
                    Some(_) => {}
                }
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a store call to its end: `MemoryStore`'s futures are ready when returned.
    fn now<T>(future: StoreFuture<'_, T>) -> T {
        let mut future = future;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match future.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(result) => result.expect("MemoryStore never fails"),
            std::task::Poll::Pending => panic!("a MemoryStore future was not ready"),
        }
    }

    /// A small xorshift generator: the stress test needs cheap, reproducible choices.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Several threads write, replace, delete and invalidate overlapping keys and tags while a
    /// small bound evicts; `keys` keys, `tags` tags besides one every tagged write carries
    /// (whose set grows past 1024 members when `keys` allows: the old index swept its sets
    /// of evicted keys there).
    fn stress(store: &MemoryStore, threads: u64, ops: usize, keys: usize, tags: usize) {
        let tag = |i: usize| format!("t{i}");
        std::thread::scope(|scope| {
            for seed in 1..=threads {
                scope.spawn(move || {
                    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
                    let hour = Duration::from_secs(3600);
                    for _ in 0..ops {
                        let key = format!("k{}", rng.below(keys));
                        let value = Bytes::from(vec![b'v'; 1 + rng.below(300)]);
                        match rng.below(20) {
                            0..=10 => {
                                let mut own: Vec<String> = vec!["all".to_owned()];
                                own.extend((0..1 + rng.below(3)).map(|_| tag(rng.below(tags))));
                                own.dedup();
                                now(store.set_tagged(&key, value, hour, &own));
                            }
                            11..=12 => now(store.set(&key, value, hour)),
                            13..=15 => {
                                now(store.delete(&key));
                            }
                            16..=17 => {
                                now(store.invalidate_tag(&tag(rng.below(tags))));
                            }
                            18 => {
                                let own = [tag(rng.below(tags))];
                                now(store.set_tagged(&key, value, Duration::ZERO, &own));
                            }
                            _ => {
                                now(store.get(&key));
                            }
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn the_tag_index_matches_the_entries_after_concurrent_writes_and_evictions() {
        // Few keys and tags under a bound of a handful of entries: every write races others
        // on its key, and moka evicts on most writes.
        for round in 0..10 {
            let store = MemoryStore::builder().max_bytes(16 * 1024).build();
            stress(&store, 4, 5_000, 24, 6);
            let problems = store.tag_index_problems();
            assert!(
                problems.is_empty(),
                "round {round}: {} problems, e.g. {:?}",
                problems.len(),
                &problems[..problems.len().min(5)]
            );
        }
    }

    #[test]
    fn the_tag_index_matches_the_entries_with_a_tag_on_over_a_thousand_keys() {
        // Enough keys that the shared tag's set passes 1024 members again and again while
        // keys are deleted and written anew under it (where the old index swept its sets).
        for round in 0..3 {
            let store = MemoryStore::builder().max_entries(1100).build();
            stress(&store, 4, 10_000, 1300, 4);
            let problems = store.tag_index_problems();
            assert!(
                problems.is_empty(),
                "round {round}: {} problems, e.g. {:?}",
                problems.len(),
                &problems[..problems.len().min(5)]
            );
        }
    }

    #[test]
    fn an_untagged_write_drops_the_tag_records_of_the_value_it_replaces() {
        let store = MemoryStore::new();
        let hour = Duration::from_secs(3600);
        let tags = ["a".to_owned(), "b".to_owned()];
        now(store.set_tagged("k", Bytes::from_static(b"v1"), hour, &tags));
        now(store.set_tagged("k", Bytes::from_static(b"v2"), hour, &tags[1..]));
        now(store.set("k", Bytes::from_static(b"v3"), hour));
        assert_eq!(store.tag_index_problems(), Vec::<String>::new());
        assert_eq!(store.tag_records(), 0);
        assert_eq!(now(store.invalidate_tag("b")), 0, "v3 carries no tag");
        assert_eq!(now(store.get("k")), Some(Bytes::from_static(b"v3")));
    }

    #[test]
    fn a_replacing_write_keeps_the_records_of_the_tags_it_shares() {
        let store = MemoryStore::new();
        let hour = Duration::from_secs(3600);
        let tags = ["a".to_owned(), "b".to_owned(), "c".to_owned()];
        now(store.set_tagged("k", Bytes::from_static(b"v1"), hour, &tags[..2]));
        now(store.set_tagged("k", Bytes::from_static(b"v2"), hour, &tags[1..]));
        assert_eq!(store.tag_index_problems(), Vec::<String>::new());
        assert_eq!(now(store.invalidate_tag("a")), 0, "v2 is not tagged a");
        assert_eq!(now(store.invalidate_tag("b")), 1);
        assert_eq!(now(store.get("k")), None);
        assert_eq!(store.tag_records(), 0, "v2 left c with it");
    }

    #[test]
    fn the_byte_bound_counts_the_decoded_form_beside_each_value() {
        let store = MemoryStore::builder().max_bytes(1024 * 1024).build();
        now(store.set("k", Bytes::from(vec![0; 1000]), Duration::from_secs(60)));
        let decoded = DECODED_FIXED + 2 * 1000;
        assert_eq!(
            store.stats().weighted_bytes,
            (1 + 1000 + ENTRY_OVERHEAD + decoded) as u64
        );
        // The body is shared by the decoded form: past the first 4 KiB, a value counts once.
        let large = MemoryStore::builder().max_bytes(1024 * 1024).build();
        now(large.set("k", Bytes::from(vec![0; 100_000]), Duration::from_secs(60)));
        let decoded = DECODED_FIXED + 2 * DECODED_SPAN;
        assert_eq!(
            large.stats().weighted_bytes,
            (1 + 100_000 + ENTRY_OVERHEAD + decoded) as u64
        );
        // So a bound holds fewer small entries than their bytes and bookkeeping alone allow.
        let bounded = MemoryStore::builder().max_bytes(64 * 1024).build();
        for i in 0..100 {
            let key = format!("k{i}");
            now(bounded.set(&key, Bytes::from(vec![0; 1024]), Duration::from_secs(60)));
        }
        let per_entry = 1024 + ENTRY_OVERHEAD + DECODED_FIXED + 2 * 1024;
        assert!(bounded.entry_count() <= (64 * 1024 / per_entry) as u64);
    }
}
