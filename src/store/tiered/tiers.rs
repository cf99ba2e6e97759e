//! [`TieredStore`] itself: what its clones share (the two tiers and the notification bus),
//! its accessors and the bus's stats, and how a change is told to the other instances:
//! published at once, or queued behind earlier notifications that wait for Redis.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::bus::{lock, Bus, Journal};
use super::near::Near;
use super::notice::Notice;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::{check_pattern, Store};
use crate::Result;

/// A two-tier [`Store`]: reads are served from an in-process [`MemoryStore`] (L1) when it
/// holds a copy, otherwise from the L2 store (for example a [`RedisStore`]), and the copy is
/// kept in L1 for as long as the entry lives in L2 (bounded by
/// [`l1_ttl`][l1_ttl], default 1 hour). Writes go to L2, then to L1.
///
/// With [`invalidations`][invalidations], every change made through the
/// store is announced to every instance: stores and replacements (`set`, `set_tagged`: the
/// response layer's fills, refreshes, revalidations, hit-for-miss marks), deletes, tag and
/// pattern invalidations. A notification names what changed and carries its version (the id
/// the journal gave it), nothing else; an instance that holds a copy drops it, and its next
/// read takes the new value from L2. What a user can rely on:
///
/// - A change through one instance reaches the others within a network round trip (about a
///   millisecond on one host). An instance never copies into L1 a value read from L2 while a
///   change of its key arrived.
/// - A notification whose publish fails is queued (at most 10,000 keys, tags and patterns;
///   per key the newest wins) and published again once Redis answers; the operation returns
///   `Ok` once L2 was changed. Past the bound, the queue becomes one "empty your L1"
///   notification.
/// - Every notification is also appended to a journal (a Redis stream next to the channel,
///   `{channel}:journal`, about 10,000 entries, expiring a day after the last one). An
///   instance that lost its subscription (Redis restarted, the connection was killed)
///   subscribes again with a growing back-off (50 ms to 1 s) and reads the journal from the
///   last notification it applied: it drops only the copies that changed meanwhile. When the
///   journal cannot tell (it was trimmed past that point, or lost with a restart of Redis),
///   the instance empties its L1.
/// - While the subscription is down, L1 copies are served until their entry's TTL; what
///   changed meanwhile is dropped by the catch-up.
/// - Locks are L2's.
///
/// A tag invalidation drops on every instance the copies of exactly the keys L2 removed
/// (when L2 can list them, as [`RedisStore`] does, up to 1,000 keys), and the copies this
/// instance wrote under the tag; other copies stay.
///
/// On a Redis Cluster ([`invalidations_cluster`][invalidations_cluster]),
/// notifications go out with `PUBLISH`, which the cluster forwards to every node, and each
/// instance subscribes on one node: when that node fails, it subscribes on another and
/// catches up from the journal (replicated with its slot's primary).
///
/// Cloning is cheap; clones share both tiers and the subscription.
///
/// [l1_ttl]: crate::TieredStoreBuilder::l1_ttl
/// [invalidations]: crate::TieredStoreBuilder::invalidations
/// [invalidations_cluster]: crate::TieredStoreBuilder::invalidations_cluster
#[cfg_attr(docsrs, doc(cfg(feature = "tiered")))]
pub struct TieredStore<S = RedisStore> {
    pub(super) shared: Arc<Tiers<S>>,
}

impl<S> Clone for TieredStore<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

pub(super) struct Tiers<S> {
    pub(super) near: Arc<Near>,
    pub(super) l2: S,
    pub(super) l1_ttl: Duration,
    pub(super) bus: Option<Bus>,
}

impl<S: Store> TieredStore<S> {
    /// The L1 store (for inspection and health checks).
    pub fn l1(&self) -> &MemoryStore {
        &self.shared.near.l1
    }

    /// The L2 store.
    pub fn l2(&self) -> &S {
        &self.shared.l2
    }

    /// Whether the notification subscription is up and caught up (false without
    /// invalidations).
    pub fn is_subscribed(&self) -> bool {
        self.shared.near.subscribed.load(Ordering::SeqCst)
    }

    /// How many notifications this instance received on the channel or read from the journal
    /// (its own included).
    pub fn invalidations_received(&self) -> u64 {
        self.shared.near.received.load(Ordering::Relaxed)
    }

    /// What the notification bus has done since the store was built.
    pub fn bus_stats(&self) -> TieredBusStats {
        let near = &self.shared.near;
        TieredBusStats {
            received: near.received.load(Ordering::Relaxed),
            caught_up: near.caught_up.load(Ordering::Relaxed),
            l1_emptied: near.emptied.load(Ordering::Relaxed),
            queued: self
                .shared
                .bus
                .as_ref()
                .map_or(0, |bus| lock(&bus.queue).len()),
        }
    }

    /// Drops the L1 copies whose keys match the glob `pattern` (Redis `SCAN MATCH` syntax:
    /// `*`, `?`, `[...]`, `\` escapes) on every instance. L2 is left alone: delete the keys
    /// there first (for example with `RedisCache::delete_pattern` on the L2 store), then call
    /// this.
    ///
    /// Fails with [`ErrorKind::InvalidInput`] for a pattern over 1024 bytes (matching costs
    /// pattern length x key length per L1 key). A notification that cannot be published
    /// now is queued and published once Redis answers. Instances ignore (and log) over-long
    /// patterns they receive.
    ///
    /// [`ErrorKind::InvalidInput`]: crate::ErrorKind::InvalidInput
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<()> {
        check_pattern(pattern)?;
        let notice = Notice::Pattern(pattern);
        self.shared.near.apply(&notice);
        self.publish(&notice).await;
        Ok(())
    }

    /// Publishes `notice`; when that fails, queues it for the replay task.
    pub(super) async fn publish(&self, notice: &Notice<'_>) {
        let Some(bus) = &self.shared.bus else {
            return;
        };
        let message = notice.encode(self.shared.near.origin);
        // Behind queued notifications, so that their order is kept.
        let behind = lock(&bus.queue).len() > 0;

        if !behind {
            let journal = Journal {
                store: bus.publisher.clone(),
                key: bus.journal.clone(),
                channel: bus.channel.clone(),
            };
            match journal.publish(&message).await {
                Ok(()) => return,
                Err(e) => tracing::debug!(
                    error = &e as &dyn std::error::Error,
                    "could not publish a notification; queued for replay"
                ),
            }
        }
        lock(&bus.queue).push(notice.what(), message);
        bus.queued.notify_one();
    }

    pub(super) fn l1_ttl(&self, ttl: Duration) -> Duration {
        ttl.min(self.shared.l1_ttl)
    }
}

/// What the notification bus of a [`TieredStore`] has done, from
/// [`TieredStore::bus_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TieredBusStats {
    /// Notifications received on the channel or read from the journal.
    pub received: u64,
    /// Notifications applied from the journal after a gap in the subscription.
    pub caught_up: u64,
    /// How many times L1 was emptied because the journal could not tell what changed.
    pub l1_emptied: u64,
    /// Notifications waiting to be published again.
    pub queued: usize,
}
