//! Coalescing: one computation per cold key, in one process (single-flight over a map of
//! in-flight keys) and across processes (a short lock in the store, polled by the others).
//! Shared by the response layer and `RedisCache`; each decides who may reuse what, this module
//! only runs the protocol.
//!
//! Like pingora-cache's lock, a flight ends with a named outcome ([`Released`]) that each
//! follower acts on: take the value, go to the origin at once (the answer cannot be shared),
//! fall back (the leader failed), take the flight over (the leader went away), or give up
//! waiting (timed out).

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// The keys whose computation is in flight in this process, each with the receiver its
/// followers wait on for the leader's value `T`.
#[derive(Debug)]
pub(crate) struct Flights<T> {
    map: Mutex<HashMap<String, Flight<T>>>,
    next_id: AtomicU64,
    /// How many flights' values reached the store: a logical clock, cheaper to read on every
    /// lookup than the system's.
    writes: AtomicU64,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Self {
            map: Mutex::default(),
            next_id: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }
}

#[derive(Debug)]
struct Flight<T> {
    id: u64,
    rx: watch::Receiver<Option<Released<T>>>,
    /// The write clock once the value was in the store (`u64::MAX` until then).
    written_at: Arc<AtomicU64>,
}

/// What a caller for a cold key does.
pub(crate) enum Role<T: Clone + Send + Sync + 'static> {
    /// Compute; share the value through the [`Lead`].
    Leader(Lead<T>),
    /// Another caller is computing: wait for its outcome with [`follow`].
    Follower(Following<T>),
}

/// A follower's side of a flight.
pub(crate) type Following<T> = watch::Receiver<Option<Released<T>>>;

/// How a flight ended for a follower: why it was released, and what it was handed.
#[derive(Debug, Clone)]
pub(crate) enum Released<T> {
    /// The leader's value.
    Done(T),
    /// The leader's answer may not be shared (it cannot be stored): go to the origin at
    /// once, without waiting on anyone.
    Uncacheable,
    /// The leader's call failed: an error, a server error, or a timeout (`timed_out`), with
    /// a description for callers that report it.
    Failed {
        timed_out: bool,
        // Read by `RedisCache` (feature `client`), which reports it to its callers.
        #[cfg_attr(not(feature = "client"), allow(dead_code))]
        reason: Arc<str>,
    },
    /// The leader went away before it finished (its caller was dropped): join again, so
    /// that one follower takes the flight over while the others keep waiting.
    Dropped,
    /// The follower waited longer than its timeout.
    TimedOut,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// A mark taken just before a store lookup, for [`join`](Self::join).
    pub(crate) fn mark(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Joins the flight for `key`, or starts one. `looked_up_at` is the [`mark`](Self::mark)
    /// taken before the caller's own store lookup: a flight whose value was stored before
    /// then is no use to it (the caller missed it in the store, so it was invalidated since).
    /// Pass 0 to join any flight.
    pub(crate) fn join(self: &Arc<Self>, key: &str, looked_up_at: u64) -> Role<T> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(flight) = map.get(key) {
            if flight.written_at.load(Ordering::Acquire) > looked_up_at {
                return Role::Follower(flight.rx.clone());
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let written_at = Arc::new(AtomicU64::new(u64::MAX));
        map.insert(
            key.to_owned(),
            Flight {
                id,
                rx,
                written_at: written_at.clone(),
            },
        );
        Role::Leader(Lead {
            flights: self.clone(),
            key: key.to_owned(),
            id,
            tx,
            written_at,
            lock: None,
            linger: Duration::ZERO,
        })
    }

    /// How many keys are in flight.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().map_or(0, |map| map.len())
    }

    fn leave(&self, key: &str, id: u64) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|flight| flight.id == id) {
            map.remove(key);
        }
    }
}

/// Waits for the flight's outcome, at most `timeout` (clamped to 2^31 s).
pub(crate) async fn follow<T: Clone>(mut rx: Following<T>, timeout: Duration) -> Released<T> {
    let timeout = crate::settings::clamp(timeout);
    match tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await {
        Err(_) => Released::TimedOut,
        // The lead is gone without a word (its task was dropped).
        Ok(Err(_)) => Released::Dropped,
        Ok(Ok(outcome)) => outcome.clone().unwrap_or(Released::Dropped),
    }
}

/// The leader's duty: end the flight with an outcome (its value, or why there is none), then
/// leave it (and release the cross-process lock) when dropped. Followers still waiting when
/// a lead is dropped without an outcome are told [`Released::Dropped`], and one of them takes
/// the flight over.
pub(crate) struct Lead<T: Clone + Send + Sync + 'static> {
    flights: Arc<Flights<T>>,
    key: String,
    id: u64,
    tx: watch::Sender<Option<Released<T>>>,
    written_at: Arc<AtomicU64>,
    lock: Option<Lock>,
    /// How long the shared value stays joinable after the lead ends.
    linger: Duration,
}

/// The longest a finished flight keeps answering late joiners whose lookup started before
/// its value was stored: they missed only because the write had not landed yet.
pub(crate) const MAX_LINGER: Duration = Duration::from_millis(100);

impl<T: Clone + Send + Sync + 'static> Lead<T> {
    /// Hands the value to the followers.
    pub(crate) fn share(&mut self, value: T) {
        self.tx.send_replace(Some(Released::Done(value)));
    }

    /// Ends the flight without a value: followers (and callers joining until the lead is
    /// dropped) are released with `outcome` at once. A value already shared stays.
    pub(crate) fn release(&mut self, outcome: Released<T>) {
        self.tx.send_if_modified(|state| match state {
            Some(Released::Done(_)) => false,
            _ => {
                *state = Some(outcome);
                true
            }
        });
    }

    /// Records that the shared value is now in the store: from here on only callers whose
    /// lookup started earlier (and so may have missed it) reuse it, for at most `linger`
    /// (capped at [`MAX_LINGER`]) after the lead ends. A value never stored has no such
    /// race and does not linger.
    pub(crate) fn written(&mut self, linger: Duration) {
        if matches!(*self.tx.borrow(), Some(Released::Done(_))) {
            let now = self.flights.writes.fetch_add(1, Ordering::AcqRel) + 1;
            self.written_at.store(now, Ordering::Release);
            self.linger = linger.min(MAX_LINGER);
        }
    }

    /// Releases the cross-process lock now, if this lead holds it, and waits for the store's
    /// answer (dropping the lead releases it in the background).
    pub(crate) async fn release_lock(&mut self) {
        if let Some(lock) = self.lock.take() {
            lock.release().await;
        }
    }

    /// Keeps the cross-process lock until this lead is dropped.
    pub(crate) fn hold(&mut self, lock: Lock) {
        self.lock = Some(lock);
    }
}

impl<T: Clone + Send + Sync + 'static> Drop for Lead<T> {
    fn drop(&mut self) {
        let (flights, key, id) = (self.flights.clone(), std::mem::take(&mut self.key), self.id);
        let unended = self.tx.borrow().is_none();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !unended && !self.linger.is_zero() => {
                let linger = self.linger;
                runtime.spawn(async move {
                    tokio::time::sleep(linger).await;
                    flights.leave(&key, id);
                });
            }
            _ => flights.leave(&key, id),
        }
        // Followers learn that the leader went away (rather than waiting for their timeout)
        // only after it left the map: the first to join again leads a new flight, the others
        // follow that one.
        if unended {
            self.tx.send_replace(Some(Released::Dropped));
        }
    }
}

/// What another instance's computation left for a caller that polls the store.
pub(crate) enum Looked<V> {
    /// The value is stored, and this caller may use it.
    Found(V),
    /// Something is stored that this caller may not use as is (it needs validation): stop
    /// waiting and compute.
    Unusable,
    /// Nothing yet.
    Missing,
}

/// How a caller that missed proceeds across instances.
pub(crate) enum Contention<V> {
    /// Another instance stored the value meanwhile.
    Found(V),
    /// This caller holds the lock: compute, store, then drop (or release) the lock.
    Locked(Lock),
    /// Compute without the lock: the store holds something unusable, or waiting timed out.
    Alone,
    /// Compute without the lock: the store could not take it (down, or it has no locks).
    Failed(crate::Error),
}

/// The one cross-instance protocol: take the lock for `key`; if another instance holds it,
/// poll the store with `look` every [`LOCK_POLL_INTERVAL`] until the value appears, the
/// lock is free (and taken), or `wait` has passed. Right after taking the lock it looks once
/// more, since the previous holder may just have stored the value and released it.
pub(crate) async fn lock_or_wait<V, F, Fut>(
    store: &Arc<dyn Store>,
    key: &str,
    ttl: Duration,
    wait: Duration,
    mut look: F,
) -> Contention<V>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Looked<V>>,
{
    // Clamped like every duration the crate takes (a caller may pass `Duration::MAX`).
    let deadline = tokio::time::Instant::now() + crate::settings::clamp(wait);
    loop {
        match Lock::try_acquire(store, key, ttl).await {
            Ok(Some(lock)) => {
                return match look().await {
                    Looked::Found(value) => Contention::Found(value),
                    Looked::Unusable | Looked::Missing => Contention::Locked(lock),
                };
            }
            Ok(None) => {}
            Err(e) => return Contention::Failed(e),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::debug!(key, "gave up waiting on another instance's lock; computing");
            return Contention::Alone;
        }
        tokio::time::sleep(LOCK_POLL_INTERVAL.min(deadline - now)).await;
        match look().await {
            Looked::Found(value) => return Contention::Found(value),
            Looked::Unusable => return Contention::Alone,
            Looked::Missing => {}
        }
    }
}

/// How often a caller waiting on another instance's lock looks for the value.
pub(crate) const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A lock on a key in the store, released (if still ours) when dropped.
pub(crate) struct Lock {
    store: Arc<dyn Store>,
    key: String,
    token: String,
}

impl Lock {
    /// Tries to take the lock for `entry_key`.
    pub(crate) async fn try_acquire(
        store: &Arc<dyn Store>,
        entry_key: &str,
        ttl: Duration,
    ) -> Result<Option<Lock>, crate::Error> {
        let key = lock_key(entry_key);
        let token = new_token();
        let taken = store.try_lock(&key, &token, ttl).await?;
        Ok(taken.then(|| Lock {
            store: store.clone(),
            key,
            token,
        }))
    }

    /// Releases the lock now (if still ours) and waits for the store's answer, rather than
    /// in the background as dropping it does.
    pub(crate) async fn release(mut self) {
        let (key, token) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        if let Err(e) = self.store.unlock(&key, &token).await {
            // The lock expires on its own after its TTL.
            tracing::debug!(
                key,
                error = &e as &dyn std::error::Error,
                "releasing cache lock failed"
            );
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if self.token.is_empty() {
            return; // already released
        }
        let (store, key, token) = (
            self.store.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.unlock(&key, &token).await {
                    // The lock expires on its own after its TTL.
                    tracing::debug!(
                        key,
                        error = &e as &dyn std::error::Error,
                        "releasing cache lock failed"
                    );
                }
            });
        }
    }
}

/// The lock's key: beside the entry's, so both share a cluster slot when hash-tagged.
fn lock_key(entry_key: &str) -> String {
    format!("{entry_key}:lock")
}

/// A token unique to this lock holder: process id, a counter, and per-process random bits.
fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let random =
        std::collections::hash_map::RandomState::new().hash_one(COUNTER.load(Ordering::Relaxed));
    format!(
        "{}-{}-{random:016x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
