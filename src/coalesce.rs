//! Request coalescing: one computation per cold key, in one process (single-flight over a
//! map of in-flight keys) and across processes (a short lock in the store). The request flow
//! decides who may reuse what (see `flow::join`); this module only runs the protocol.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::entry::CachedResponse;
use crate::key;
use crate::store::Store;

/// A response one request produced and its concurrent twins may reuse.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The flights' logical clock once this response was in the store (`u64::MAX` until
    /// then): a request whose own lookup started later (see [`Flights::mark`]) saw the store
    /// with it, so it must not reuse it (it may have been invalidated since).
    written_at: AtomicU64,
    pub(crate) response: CachedResponse,
    /// For a response with `Vary`: the names and the variant key it was stored under.
    pub(crate) variant: Option<key::Variant>,
}

impl Shared {
    pub(crate) fn new(response: CachedResponse, variant: Option<key::Variant>) -> Self {
        Self {
            written_at: AtomicU64::new(u64::MAX),
            response,
            variant,
        }
    }
}

type Landing = Option<Arc<Shared>>;

/// The keys whose handler call is in flight in this process.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, (u64, watch::Receiver<Landing>)>>,
    next_id: AtomicU64,
    /// How many shared outcomes reached the store: a logical clock, cheaper to read on every
    /// lookup than the system's.
    writes: AtomicU64,
}

/// What a request for a cold key does.
pub(crate) enum Role {
    /// Call the handler; share the result through the [`Lead`].
    Leader(Lead),
    /// Another request is calling the handler: wait for its outcome.
    Follower(watch::Receiver<Landing>),
}

impl Flights {
    /// A mark taken just before a store lookup, for [`join`](Self::join).
    pub(crate) fn mark(&self) -> u64 {
        self.writes.load(Ordering::Acquire)
    }

    /// Joins the flight for `key`, or starts one. `looked_up_at` is the [`mark`](Self::mark)
    /// taken before the caller's own store lookup: a flight that finished before then is no
    /// use to it.
    pub(crate) fn join(self: &Arc<Self>, key: &str, looked_up_at: u64) -> Role {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, rx)) = map.get(key) {
            let finished_before_lookup = rx
                .borrow()
                .as_ref()
                .is_some_and(|shared| shared.written_at.load(Ordering::Acquire) <= looked_up_at);
            if !finished_before_lookup {
                return Role::Follower(rx.clone());
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_owned(), (id, rx));
        Role::Leader(Lead {
            flights: self.clone(),
            key: key.to_owned(),
            id,
            tx,
            lock: None,
            linger: Duration::ZERO,
        })
    }
}

/// Waits for the leader's outcome, at most `timeout`. `None` when the leader's response was
/// not shareable (not storable, failed, abandoned) or too slow: the caller then calls the
/// handler itself.
pub(crate) async fn follow(mut rx: watch::Receiver<Landing>, timeout: Duration) -> Landing {
    let outcome = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
    outcome.ok()?.ok()?.clone()
}

/// The leader's duty: share the outcome with followers, then leave the flight (and release
/// the cross-process lock) when dropped.
pub(crate) struct Lead {
    flights: Arc<Flights>,
    key: String,
    id: u64,
    tx: watch::Sender<Landing>,
    lock: Option<Lock>,
    /// How long the shared outcome stays joinable after the lead ends.
    linger: Duration,
}

/// How long a finished flight keeps answering late joiners whose lookup started before it
/// finished: they missed only because the entry was not written yet.
const MAX_LINGER: Duration = Duration::from_millis(100);

impl Lead {
    /// Hands the stored response to the followers (and, briefly, to late joiners).
    pub(crate) fn share(&mut self, shared: Shared) {
        self.tx.send_replace(Some(Arc::new(shared)));
    }

    /// Records that the shared response is now in the store: from here on, only requests
    /// whose lookup started earlier (and so may have missed it) reuse it.
    /// Lingering covers the requests that missed the store just before the write landed;
    /// a response that was never written has no such race, and does not linger.
    pub(crate) fn written(&mut self) {
        if let Some(shared) = &*self.tx.borrow() {
            let now = self.flights.writes.fetch_add(1, Ordering::AcqRel) + 1;
            shared.written_at.store(now, Ordering::Release);
            self.linger = shared.response.ttl.min(MAX_LINGER);
        }
    }

    /// Another instance stored the response: give it to this process's waiters too.
    pub(crate) fn hand_over(
        mut self,
        (response, variant): (CachedResponse, Option<key::Variant>),
    ) -> CachedResponse {
        self.share(Shared::new(response.clone(), variant));
        self.written();
        response
    }

    /// Keeps the cross-process lock until this lead is dropped.
    pub(crate) fn hold(&mut self, lock: Lock) {
        self.lock = Some(lock);
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let (flights, key, id) = (self.flights.clone(), std::mem::take(&mut self.key), self.id);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if !self.linger.is_zero() => {
                let linger = self.linger;
                runtime.spawn(async move {
                    tokio::time::sleep(linger).await;
                    flights.leave(&key, id);
                });
            }
            // Nothing shared: followers still waiting are woken by `tx` dropping, and call
            // the handler themselves.
            _ => flights.leave(&key, id),
        }
    }
}

impl Flights {
    fn leave(&self, key: &str, id: u64) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(key).is_some_and(|(current, _)| *current == id) {
            map.remove(key);
        }
    }
}

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

    /// The lock for `entry_key`, already taken with `token` (from [`new_token`]) by a
    /// command of the caller's own, for example a script that also reads the entry.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn taken(store: &Arc<dyn Store>, entry_key: &str, token: String) -> Lock {
        Lock {
            store: store.clone(),
            key: lock_key(entry_key),
            token,
        }
    }

    /// Releases the lock now (if still ours) and waits for the store's answer, rather than
    /// in the background as dropping it does.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
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
pub(crate) fn lock_key(entry_key: &str) -> String {
    format!("{entry_key}:lock")
}

/// A token unique to this lock holder: process id, a counter, and per-process random bits.
pub(crate) fn new_token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let random =
        std::collections::hash_map::RandomState::new().hash_one(COUNTER.load(Ordering::Relaxed));
    format!(
        "{}-{}-{random:016x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// How often an instance waiting on another's lock looks for the entry.
pub(crate) const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(20);
