//! Where cached bytes live: the [`Store`] trait and its implementations.
//!
//! A store knows nothing of HTTP: it maps string keys to opaque byte values that expire.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::{Error, ErrorKind, Result};

// The stores, their builders and stats are public at the crate root only (lib.rs re-exports
// them): one path for each.
#[cfg(feature = "memory")]
pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "tiered")]
pub(crate) mod tiered;

/// A slot an in-process store keeps beside each value, in which a reader may keep the
/// value's decoded form, so that later reads of the same value skip decoding (the response
/// layer keeps its decoded response there: a hit on [`MemoryStore`](crate::MemoryStore) is a
/// lookup and a clone). The store never looks inside; a new value gets a new, empty slot.
pub type Memo = Arc<std::sync::OnceLock<Arc<dyn std::any::Any + Send + Sync>>>;

/// The future a [`Store`] operation returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A key-value store with per-entry expiry, used by the response cache.
///
/// Errors are values: an implementation never panics on a backend failure, and should bound
/// the time each operation may take (the layer treats every error as a cache miss, so a
/// store that hangs would make requests hang).
///
/// The methods return boxed futures so that `dyn Store` works: a layer can pick its store at
/// run time (for example Redis when `REDIS_URL` is set, memory otherwise).
pub trait Store: Send + Sync + 'static {
    /// The value stored under `key`, or `None` when there is none (or it expired).
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>>;

    /// [`get`](Self::get), with the value's [`Memo`] slot when the store keeps values in
    /// this process (the default has none: a store that serialises values has nothing to
    /// memoise beside).
    fn get_memoized<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(Bytes, Option<Memo>)>> {
        let get = self.get(key);
        Box::pin(async move { Ok(get.await?.map(|bytes| (bytes, None))) })
    }

    /// [`get_memoized`](Self::get_memoized) without waiting, for a store that keeps values in
    /// this process: `Some(found)` when it can tell now, `None` (the default) when the answer
    /// needs I/O. The layer answers fresh hits from it without a future of their own.
    fn get_in_process(&self, key: &str) -> Option<Option<(Bytes, Option<Memo>)>> {
        let _ = key;
        None
    }

    /// [`get`](Self::get) with the time the value has left to live, when the store can tell
    /// (the default cannot, and answers `None` for it). A two-tier store keeps its copy no
    /// longer than that.
    fn get_with_ttl<'a>(
        &'a self,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Bytes, Option<Duration>)>> {
        let get = self.get(key);
        Box::pin(async move { Ok(get.await?.map(|bytes| (bytes, None))) })
    }

    /// Stores `value` under `key` for `ttl`, replacing any previous value. A zero `ttl` means
    /// "do not keep": afterwards the key holds nothing, in every store.
    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()>;

    /// Removes `key`; returns whether something was removed.
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool>;

    /// Stores `value` under `key` for `ttl` and records `key` in each of the tag sets
    /// `tag_keys`, so [`invalidate_tag`](Self::invalidate_tag) can remove it. Without tags
    /// it is [`set`](Self::set); a store that cannot record tags keeps the default, which
    /// fails with [`ErrorKind::Unsupported`] rather than store an entry no invalidation
    /// would reach.
    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tag_keys: &'a [String],
    ) -> StoreFuture<'a, ()> {
        if tag_keys.is_empty() {
            return self.set(key, value, ttl);
        }
        unsupported("tags")
    }

    /// Removes every key recorded in the tag set `tag_key`, and the set; returns how many
    /// keys were removed. The default fails with [`ErrorKind::Unsupported`].
    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        let _ = tag_key;
        unsupported("tags")
    }

    /// [`invalidate_tag`](Self::invalidate_tag), with the keys it removed when the store can
    /// list them (at most `limit` of them; `None` when there were more, or when the store
    /// cannot tell, as the default). A two-tier store tells the other instances exactly which
    /// copies to drop.
    fn invalidate_tag_listed<'a>(
        &'a self,
        tag_key: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, (u64, Option<Vec<String>>)> {
        let _ = limit;
        let invalidate = self.invalidate_tag(tag_key);
        Box::pin(async move { Ok((invalidate.await?, None)) })
    }

    /// Takes the lock `key` for `ttl` if nobody holds it, recording `token` as its owner;
    /// returns whether it was taken. Used to make one handler call per cold key across app
    /// instances. The default fails with [`ErrorKind::Unsupported`] (the layer then calls
    /// the handler without the lock, as when the store is down).
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        let _ = (key, token, ttl);
        unsupported("locks")
    }

    /// Releases the lock `key` if `token` still owns it (a lock that expired and was taken by
    /// someone else is left alone). The default fails with [`ErrorKind::Unsupported`].
    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        let _ = (key, token);
        unsupported("locks")
    }
}

/// The answer of a [`Store`] method the store does not implement.
fn unsupported<'a, T: Send + 'a>(what: &str) -> StoreFuture<'a, T> {
    let error = Error::new(
        ErrorKind::Unsupported,
        format!("this store does not support {what}"),
    );
    Box::pin(std::future::ready(Err(error)))
}

/// The longest glob pattern the crate matches or sends (`TieredStore::invalidate_pattern`,
/// `RedisCache::delete_pattern`, patterns arriving on the invalidation channel). Real patterns
/// are a key prefix and a few wildcards; the bound keeps one pattern's matching cost (pattern
/// length x key length per key) small, whoever sent it.
#[cfg(any(feature = "client", feature = "tiered"))]
pub(crate) const MAX_PATTERN_BYTES: usize = 1024;

/// Refuses a pattern longer than [`MAX_PATTERN_BYTES`] with [`ErrorKind::InvalidInput`].
#[cfg(any(feature = "client", feature = "tiered"))]
pub(crate) fn check_pattern(pattern: &str) -> crate::Result<()> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "pattern of {} bytes is over the limit of {MAX_PATTERN_BYTES} bytes",
                pattern.len()
            ),
        ));
    }
    Ok(())
}

impl<S: Store + ?Sized> Store for Arc<S> {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        (**self).get(key)
    }

    fn get_memoized<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(Bytes, Option<Memo>)>> {
        (**self).get_memoized(key)
    }

    fn get_in_process(&self, key: &str) -> Option<Option<(Bytes, Option<Memo>)>> {
        (**self).get_in_process(key)
    }

    fn get_with_ttl<'a>(
        &'a self,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Bytes, Option<Duration>)>> {
        (**self).get_with_ttl(key)
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        (**self).set(key, value, ttl)
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        (**self).delete(key)
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tag_keys: &'a [String],
    ) -> StoreFuture<'a, ()> {
        (**self).set_tagged(key, value, ttl, tag_keys)
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        (**self).invalidate_tag(tag_key)
    }

    fn invalidate_tag_listed<'a>(
        &'a self,
        tag_key: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, (u64, Option<Vec<String>>)> {
        (**self).invalidate_tag_listed(tag_key, limit)
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        (**self).try_lock(key, token, ttl)
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        (**self).unlock(key, token)
    }
}
