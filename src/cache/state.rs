//! What every request of a layer shares: the store, the route's settings, the flights of
//! in-process coalescing, the write budget. Built by the layer, read by the flow.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::coalesce;
use crate::entry::CachedResponse;
use crate::key::{self, Keying};
use crate::observe::Observer;
use crate::settings::Rules;
use crate::store::Store;

/// Everything a `CacheService` needs, shared by all its clones.
#[derive(Clone)]
pub(crate) struct LayerState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) rules: Rules,
    pub(crate) key_prefix: String,
    pub(crate) keying: Keying,
    pub(crate) flights: Arc<ResponseFlights>,
    /// Tags given to every response this layer stores.
    pub(crate) tags: Arc<[String]>,
    /// Background writes in flight, bounded by `rules.max_pending_writes`.
    pub(crate) pending_writes: Arc<WriteBudget>,
    /// The route's counters and metrics.
    pub(crate) observe: Arc<Observer>,
    /// The hosts this layer stored responses for, for invalidating relative URLs.
    pub(crate) hosts: Arc<KnownHosts>,
}

/// The hosts a layer has stored responses for (in this process), so that a relative URL can
/// be invalidated on each of them. Bounded: past [`KnownHosts::LIMIT`] hosts, new ones are not
/// recorded (and relative invalidation warns that it may miss some).
#[derive(Debug, Default)]
pub(crate) struct KnownHosts {
    hosts: std::sync::RwLock<std::collections::HashSet<String>>,
    overflowed: std::sync::atomic::AtomicBool,
}

impl KnownHosts {
    /// How many hosts are recorded at most.
    pub(crate) const LIMIT: usize = 1024;

    /// Records `host` (lower-cased); a read lock when it is known already, as it nearly
    /// always is.
    pub(crate) fn record(&self, host: &str) {
        let known = self.hosts.read().unwrap_or_else(|e| e.into_inner());
        if known.contains(host) {
            return;
        }
        drop(known);
        let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
        if hosts.len() >= Self::LIMIT {
            self.overflowed.store(true, Ordering::Relaxed);
            return;
        }
        hosts.insert(host.to_owned());
    }

    /// The recorded hosts, and whether some were not recorded (past the limit).
    pub(crate) fn snapshot(&self) -> (Vec<String>, bool) {
        let hosts = self.hosts.read().unwrap_or_else(|e| e.into_inner());
        let overflowed = self.overflowed.load(Ordering::Relaxed);
        (hosts.iter().cloned().collect(), overflowed)
    }
}

/// Counts the background writes in flight, so a miss storm against a slow store cannot
/// queue unbounded memory: past the limit, responses are served but not stored. It also
/// tracks every background task that writes (writes and stale refreshes) so that
/// [`flush`](Self::flush) can wait for them.
#[derive(Debug, Default)]
pub(crate) struct WriteBudget {
    /// Budgeted writes in flight.
    taken: AtomicUsize,
    tracked: Mutex<Tracked>,
    /// Woken whenever a tracked task ends.
    ended: Notify,
}

/// The tracked tasks in flight, by the order they started.
#[derive(Debug, Default)]
struct Tracked {
    next: u64,
    in_flight: BTreeSet<u64>,
}

impl WriteBudget {
    /// Takes a slot if fewer than `limit` writes are in flight.
    pub(crate) fn try_take(self: &Arc<Self>, limit: usize) -> Option<WriteSlot> {
        let taken = self.taken.fetch_add(1, Ordering::AcqRel);
        if taken >= limit {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(WriteSlot {
            _task: self.track(),
            budget: self.clone(),
        })
    }

    /// Tracks a background task that will write (a stale refresh) without taking a slot:
    /// its write takes one when it starts, before this is dropped.
    pub(crate) fn track(self: &Arc<Self>) -> TrackedTask {
        let mut tracked = self.lock();
        let id = tracked.next;
        tracked.next += 1;
        tracked.in_flight.insert(id);
        TrackedTask {
            id,
            budget: self.clone(),
        }
    }

    /// Resolves once every task tracked before the call has ended; tasks started later do
    /// not hold it up.
    pub(crate) async fn flush(&self) {
        let cutoff = self.lock().next;
        loop {
            let ended = self.ended.notified();
            let mut ended = std::pin::pin!(ended);
            // Registered before the check, so an end between the check and the wait wakes it.
            ended.as_mut().enable();
            if self.lock().in_flight.first().is_none_or(|&id| id >= cutoff) {
                return;
            }
            ended.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        // The set stays consistent whatever panicked while holding the lock.
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A tracked background task; ends when dropped.
pub(crate) struct TrackedTask {
    id: u64,
    budget: Arc<WriteBudget>,
}

impl Drop for TrackedTask {
    fn drop(&mut self) {
        self.budget.lock().in_flight.remove(&self.id);
        self.budget.ended.notify_waiters();
    }
}

/// One background write in flight; frees its slot when dropped.
pub(crate) struct WriteSlot {
    budget: Arc<WriteBudget>,
    _task: TrackedTask,
}

impl Drop for WriteSlot {
    fn drop(&mut self) {
        self.budget.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flush_waits_for_tasks_started_before_it_and_only_those() {
        let budget = Arc::new(WriteBudget::default());
        let before = budget.try_take(8).unwrap();
        let refresh = budget.track();
        let flush = tokio::spawn({
            let budget = budget.clone();
            async move { budget.flush().await }
        });
        tokio::task::yield_now().await;
        let after = budget.track();
        drop(before);
        tokio::task::yield_now().await;
        assert!(
            !flush.is_finished(),
            "a task started before is still running"
        );
        drop(refresh);
        flush.await.unwrap();
        drop(after);
        assert_eq!(budget.taken.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn flush_with_nothing_in_flight_resolves_at_once() {
        WriteBudget::default().flush().await;
    }
}

/// A response one request stored, which its concurrent twins may reuse: the response and, for
/// a response with `Vary`, the names and the variant key it was stored under.
#[derive(Debug)]
pub(crate) struct SharedResponse {
    pub(crate) response: CachedResponse,
    pub(crate) variant: Option<key::Variant>,
}

/// The layer's flights: concurrent misses of one key share one handler call's response.
pub(crate) type ResponseFlights = coalesce::Flights<Arc<SharedResponse>>;

/// The lead of a layer's flight.
pub(crate) type ResponseLead = coalesce::Lead<Arc<SharedResponse>>;
