//! `TieredStore`: an in-process L1 (a [`MemoryStore`](crate::MemoryStore)) in front of
//! any store (L2), kept coherent across instances by notifications published on a Redis
//! pub/sub channel and recorded in a journal (a Redis stream) from which a node that lost its
//! subscription catches up.
//!
//! One file per job, each importing only from the files listed after it (the module stack of
//! docs/ARCHITECTURE.md):
//!
//! - this file: the [`Store`] implementation: L1 first, L2 on a miss, every change to L2,
//!   then L1, then out as a notification;
//! - `builder.rs`: [`TieredStoreBuilder`], which starts the subscriber and replay tasks;
//! - `tiers.rs`: [`TieredStore`] itself, what its clones share, its accessors and stats, and
//!   publishing a change (or queueing it when Redis does not answer);
//! - `subscriber.rs`: the subscriber task, which (re)subscribes, catches up from the journal
//!   and applies each notification;
//! - `near.rs`: L1 and what the subscriber shares with the store: the guards that keep a
//!   read-through from copying a value older than a change, and applying a notification;
//! - `bus.rs`: the Redis side of the notifications: the journal and the channel, the queue of
//!   notifications whose publish failed and the task that replays them;
//! - `notice.rs`: a notification's wire format and version;
//! - `glob.rs`: Redis's glob matcher, for pattern invalidations.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use self::near::READ_THROUGH;
use self::notice::Notice;
use crate::store::{Memo, Store, StoreFuture};

mod builder;
mod bus;
mod glob;
mod near;
mod notice;
mod subscriber;
mod tiers;

pub use self::builder::TieredStoreBuilder;
pub use self::tiers::{TieredBusStats, TieredStore};

/// A tag invalidation names at most this many keys; with more, every instance drops the
/// tag's copies it knows of and every copy read through from L2.
const LISTED_KEYS: usize = 1000;

impl<S> std::fmt::Debug for TieredStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &*self.shared;
        f.debug_struct("TieredStore")
            .field("l1", &shared.near.l1)
            .field("l1_ttl", &shared.l1_ttl)
            .field("channel", &shared.bus.as_ref().map(|b| &b.channel))
            .field("origin", &format_args!("{:016x}", shared.near.origin))
            .field(
                "subscribed",
                &shared.near.subscribed.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl<S: Store> Store for TieredStore<S> {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        let near = &self.shared.near;
        if let Some(value) = near.l1.peek(key) {
            return Box::pin(std::future::ready(Ok(Some(value))));
        }
        Box::pin(async move {
            let since = near.changes.load(Ordering::SeqCst);
            let Some((value, ttl)) = self.shared.l2.get_with_ttl(key).await? else {
                return Ok(None);
            };
            let ttl = ttl.map_or(self.shared.l1_ttl, |ttl| self.l1_ttl(ttl));
            if near.unchanged(key, since) && !ttl.is_zero() {
                let tags = [READ_THROUGH.to_owned()];
                let _ = near.l1.set_tagged(key, value.clone(), ttl, &tags).await;
                // A change applied between the check and the copy: drop the copy.
                if !near.unchanged(key, since) {
                    near.l1.remove_matching_key(key);
                }
            }
            Ok(Some(value))
        })
    }

    /// An L1 hit comes with L1's memo slot, so the layer serves it from the decoded form.
    fn get_memoized<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(Bytes, Option<Memo>)>> {
        if let Some(l1_hit) = self.get_in_process(key) {
            return Box::pin(std::future::ready(Ok(l1_hit)));
        }
        let get = self.get(key);
        Box::pin(async move { Ok(get.await?.map(|value| (value, None))) })
    }

    /// An L1 hit; an L1 miss needs L2.
    fn get_in_process(&self, key: &str) -> Option<Option<(Bytes, Option<Memo>)>> {
        let (value, memo) = self.shared.near.l1.peek_memoized(key)?;
        Some(Some((value, Some(memo))))
    }

    /// Stores in L2, then in L1, then tells the other instances (who drop their copies).
    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        self.set_tagged(key, value, ttl, &[])
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed = self.shared.l2.delete(key).await?;
            let notice = Notice::Key(key);
            self.shared.near.apply(&notice);
            self.publish(&notice).await;
            Ok(removed)
        })
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tag_keys: &'a [String],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.shared
                .l2
                .set_tagged(key, value.clone(), ttl, tag_keys)
                .await?;
            let near = &self.shared.near;
            // A read-through of this key under way must not copy the value it read before.
            near.mark(key);
            let l1_ttl = self.l1_ttl(ttl);
            near.l1.set_tagged(key, value, l1_ttl, tag_keys).await?;
            self.publish(&Notice::Set(key)).await;
            Ok(())
        })
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let (removed, listed) = self
                .shared
                .l2
                .invalidate_tag_listed(tag_key, LISTED_KEYS)
                .await?;
            let keys = listed
                .as_ref()
                .filter(|keys| keys.iter().all(|k| !k.contains('\n')))
                .map(|keys| keys.iter().map(String::as_str).collect());
            let notice = Notice::Tag(tag_key, keys);
            self.shared.near.apply(&notice);
            self.publish(&notice).await;
            Ok(removed)
        })
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.shared.l2.try_lock(key, token, ttl)
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        self.shared.l2.unlock(key, token)
    }
}
