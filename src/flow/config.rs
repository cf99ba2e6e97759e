//! What every request of a layer shares: the store, the route's settings, the flights of
//! in-process coalescing, the write budget. Built by the layer, read by the flow.

use std::sync::Arc;

use crate::coalesce::Flights;
use crate::key::Keying;
use crate::settings::Rules;
use crate::store::Store;

/// Everything a `CacheService` needs, shared by all its clones.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) rules: Rules,
    pub(crate) key_prefix: String,
    pub(crate) keying: Keying,
    pub(crate) flights: Arc<Flights>,
    /// Tags given to every response this layer stores.
    pub(crate) tags: Arc<[String]>,
    /// Background writes in flight, bounded by `rules.max_pending_writes`.
    pub(crate) pending_writes: Arc<WriteBudget>,
}

/// Counts the background writes in flight, so a miss storm against a slow store cannot
/// queue unbounded memory: past the limit, responses are served but not stored.
#[derive(Debug, Default)]
pub(crate) struct WriteBudget(std::sync::atomic::AtomicUsize);

impl WriteBudget {
    /// Takes a slot if fewer than `limit` writes are in flight.
    pub(crate) fn try_take(self: &Arc<Self>, limit: usize) -> Option<WriteSlot> {
        use std::sync::atomic::Ordering;
        let taken = self.0.fetch_add(1, Ordering::AcqRel);
        if taken >= limit {
            self.0.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(WriteSlot(self.clone()))
    }
}

/// One background write in flight; frees its slot when dropped.
pub(crate) struct WriteSlot(Arc<WriteBudget>);

impl Drop for WriteSlot {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
