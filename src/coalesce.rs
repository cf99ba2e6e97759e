//! Request coalescing: one handler call per cold key, in one process (single-flight over a
//! map of in-flight keys) and, when enabled, across processes (a short lock in the store).

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderMap;
use tokio::sync::watch;

use crate::conditional;
use crate::entry::CachedResponse;
use crate::key;
use crate::layer::Config;
use crate::lookup::{fresh_entry, judge};
use crate::policy::{RequestPlan, Verdict};
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

    /// Whether a request with `headers` for base key `key` would get this same variant.
    /// Whether a request with `headers` for base key `key` may be given this response: the
    /// same variant, in a content coding it accepts.
    fn fits(&self, key: &str, headers: &HeaderMap) -> bool {
        let same_variant = match &self.variant {
            None => true,
            Some((names, variant_key)) => key::variant_key(key, names, headers) == *variant_key,
        };
        same_variant && conditional::accepts_encoding(headers, &self.response.headers)
    }
}

type Outcome = Option<Arc<Shared>>;

/// The keys whose handler call is in flight in this process.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, (u64, watch::Receiver<Outcome>)>>,
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
    Follower(watch::Receiver<Outcome>),
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
/// not shareable (not storable, failed, abandoned), for another variant, or too slow: the
/// caller then calls the handler itself.
pub(crate) async fn follow(
    mut rx: watch::Receiver<Outcome>,
    timeout: Duration,
    key: &str,
    headers: &HeaderMap,
) -> Option<CachedResponse> {
    let outcome = tokio::time::timeout(timeout, rx.wait_for(Option::is_some)).await;
    let shared = outcome.ok()?.ok()?.clone()?;
    shared.fits(key, headers).then(|| shared.response.clone())
}

/// The leader's duty: share the outcome with followers, then leave the flight (and release
/// the cross-process lock) when dropped.
pub(crate) struct Lead {
    flights: Arc<Flights>,
    key: String,
    id: u64,
    tx: watch::Sender<Outcome>,
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
    fn hand_over(
        mut self,
        (response, variant): (CachedResponse, Option<key::Variant>),
    ) -> Coalesced {
        self.share(Shared::new(response.clone(), variant));
        self.written();
        Coalesced::Hit(response)
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
            tracing::debug!(key, error = %e, "releasing cache lock failed");
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
                    tracing::debug!(key, error = %e, "releasing cache lock failed");
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

/// A random fraction in [0, 1) from the standard library's per-instance hash keys: enough
/// to spread expiry times, no cryptographic strength needed.
pub(crate) fn random_fraction() -> f64 {
    let bits = std::collections::hash_map::RandomState::new().hash_one(0u8);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// How a cold-key request proceeds.
pub(crate) enum Coalesced {
    /// Another request (in this process or another) produced the response.
    Hit(CachedResponse),
    /// This request calls the handler and shares the result.
    Lead(Lead),
    /// This request calls the handler on its own (coalescing off, or waiting gave up).
    Alone,
}

/// Makes concurrent misses for one key wait for a single handler call: in this process
/// through the flight map, across processes (when enabled) through a lock in the store.
///
/// A waiter is only handed a response it could have been served from the store: fresh for
/// its own request directives, not one that needs validation first (`no-cache`), of its
/// variant and in a coding it accepts. Otherwise it calls the handler itself.
pub(crate) async fn coalesce(
    config: &Config,
    plan: &RequestPlan,
    key: &str,
    headers: &HeaderMap,
    looked_up_at: u64,
) -> Coalesced {
    let rules = &config.rules;
    if !rules.coalesce {
        return Coalesced::Alone;
    }
    let mut lead = match config.flights.join(key, looked_up_at) {
        Role::Follower(rx) => {
            return match follow(rx, rules.coalesce_timeout, key, headers).await {
                Some(hit) if judge(config, plan, &hit) == Verdict::Fresh => Coalesced::Hit(hit),
                _ => Coalesced::Alone,
            };
        }
        Role::Leader(lead) => lead,
    };
    if !rules.lock_across_instances {
        return Coalesced::Lead(lead);
    }
    // Another instance may be computing this key: take its lock, or wait for its entry.
    let deadline = tokio::time::Instant::now() + rules.coalesce_timeout;
    loop {
        match Lock::try_acquire(&config.store, key, rules.lock_ttl).await {
            Ok(Some(lock)) => {
                // The previous holder may have just stored the entry and released the lock.
                if let Some(found) = fresh_entry(config, key, headers).await {
                    if judge(config, plan, &found.0) == Verdict::Fresh {
                        return lead.hand_over(found);
                    }
                }
                lead.hold(lock);
                return Coalesced::Lead(lead);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(key, error = %e, "cache lock unavailable; calling the handler");
                return Coalesced::Lead(lead);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Coalesced::Lead(lead);
        }
        tokio::time::sleep(LOCK_POLL_INTERVAL).await;
        if let Some(found) = fresh_entry(config, key, headers).await {
            // An entry that needs validation before use is validated by this request's own
            // handler call, not handed over.
            if judge(config, plan, &found.0) != Verdict::Fresh {
                return Coalesced::Lead(lead);
            }
            return lead.hand_over(found);
        }
    }
}

/// How often an instance waiting on another's lock looks for the entry.
pub(crate) const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(20);
