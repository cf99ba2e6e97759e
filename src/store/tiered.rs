//! `TieredStore`: an in-process L1 (a [`MemoryStore`]) in front of any store (L2), kept
//! coherent across instances by notifications published on a Redis pub/sub channel and
//! recorded in a journal (a Redis stream) from which a node that lost its subscription
//! catches up.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::{Client, Script, Value};
use bytes::Bytes;
use futures_util::StreamExt;

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::{check_pattern, Memo, Store, StoreFuture, MAX_PATTERN_BYTES};
use crate::observe::WarnLimiter;
use crate::{Error, ErrorKind, Result};

/// The tag an L1 copy read through from L2 carries: its real tags are unknown here (they
/// live in L2's tag sets). A tag invalidation whose keys L2 could not list drops these
/// copies too.
const READ_THROUGH: &str = "\0tiered:read-through";

/// How long an L1 copy lives at most by default, with notifications: as long as its entry,
/// up to this.
const DEFAULT_L1_MAX_TTL: Duration = Duration::from_secs(3600);

/// Without notifications nothing tells an instance of another's change: copies live 1 s.
const UNCOORDINATED_L1_TTL: Duration = Duration::from_secs(1);

/// Waits between attempts to (re)subscribe: the first, then doubling up to the last.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(50);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);

/// The journal keeps about this many notifications (`XADD MAXLEN ~`): a node away for
/// fewer catches up from it, one away for more empties its L1.
const JOURNAL_ENTRIES: u64 = 10_000;

/// The journal expires this long after the last notification (every key this crate writes
/// has a TTL, so `volatile-*` eviction policies can still evict it).
const JOURNAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Notifications whose publish failed wait in a queue of at most this many keys, tags and
/// patterns (one per key: the newest wins). Past it, the queue is replaced by one "empty
/// your L1" notification.
const QUEUE_MAX: usize = 10_000;

/// Between attempts to replay the queue while Redis does not answer.
const REPLAY_INTERVAL: Duration = Duration::from_millis(20);

/// A tag invalidation names at most this many keys; with more, every instance drops the
/// tag's copies it knows of and every copy read through from L2.
const LISTED_KEYS: usize = 1000;

/// Per-key guards against a read-through copying a value that changed during the read.
const GUARD_BUCKETS: usize = 4096;

/// Publishes a notification: appends it to the journal, then publishes it with the id the
/// journal gave it (its version), in one atomic step, so that every notification is either
/// in the journal before a subscriber's catch-up reads it, or arrives on the channel after.
/// KEYS[1]: the journal; ARGV: channel, notification, journal length, journal TTL in ms.
static PUBLISH_SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[1], id .. ' ' .. ARGV[2])
return id
",
    )
});

/// A two-tier [`Store`]: reads are served from an in-process [`MemoryStore`] (L1) when it
/// holds a copy, otherwise from the L2 store (for example a [`RedisStore`]), and the copy is
/// kept in L1 for as long as the entry lives in L2 (bounded by
/// [`l1_ttl`](TieredStoreBuilder::l1_ttl), default 1 hour). Writes go to L2, then to L1.
///
/// With [`invalidations`](TieredStoreBuilder::invalidations), every change made through the
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
/// On a Redis Cluster ([`invalidations_cluster`](TieredStoreBuilder::invalidations_cluster)),
/// notifications go out with `PUBLISH`, which the cluster forwards to every node, and each
/// instance subscribes on one node: when that node fails, it subscribes on another and
/// catches up from the journal (replicated with its slot's primary).
///
/// Cloning is cheap; clones share both tiers and the subscription.
#[cfg_attr(docsrs, doc(cfg(feature = "tiered")))]
pub struct TieredStore<S = RedisStore> {
    shared: Arc<Tiers<S>>,
}

impl<S> Clone for TieredStore<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Tiers<S> {
    near: Arc<Near>,
    l2: S,
    l1_ttl: Duration,
    bus: Option<Bus>,
}

/// A notification's version: the journal's entry id (milliseconds, sequence).
type Version = (u64, u64);

/// L1 and what the subscriber task shares with the store.
struct Near {
    l1: MemoryStore,
    /// This instance's id in its notifications, so it skips its own.
    origin: u64,
    /// Counts changes applied to L1 here. A read-through notes it before reading L2 and
    /// copies the value into L1 only if no change of its key (its guard bucket) or no wide
    /// change (tag, pattern, emptied L1) was applied since.
    changes: AtomicU64,
    guards: Box<[AtomicU64]>,
    wide: AtomicU64,
    hasher: std::collections::hash_map::RandomState,
    subscribed: AtomicBool,
    received: AtomicU64,
    caught_up: AtomicU64,
    emptied: AtomicU64,
    /// The version of the last notification applied from the channel or the journal.
    applied: Mutex<Option<Version>>,
    /// Over-long patterns received are ignored with a warning, at most one per few seconds.
    refused: WarnLimiter,
}

/// The notification channel: published through a store (timeouts, back-off), received by a
/// task of this store's own; failed publishes wait in a queue a second task replays.
struct Bus {
    publisher: RedisStore,
    channel: String,
    journal: String,
    queue: Arc<Mutex<Queue>>,
    queued: Arc<tokio::sync::Notify>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Notifications waiting to be published, one per key, tag or pattern (the newest wins).
#[derive(Default)]
struct Queue {
    waiting: HashMap<Vec<u8>, Vec<u8>>,
    order: VecDeque<Vec<u8>>,
    overflowed: bool,
}

impl Queue {
    fn push(&mut self, what: Vec<u8>, message: Vec<u8>) {
        if self.overflowed {
            return;
        }
        if self.waiting.len() >= QUEUE_MAX && !self.waiting.contains_key(&what) {
            // Too much to replay key by key: one notification that empties every L1.
            self.waiting.clear();
            self.order.clear();
            self.overflowed = true;
            return;
        }
        if self.waiting.insert(what.clone(), message).is_none() {
            self.order.push_back(what);
        }
    }

    fn pop(&mut self, origin: u64) -> Option<(Vec<u8>, Vec<u8>)> {
        if self.overflowed {
            self.overflowed = false;
            return Some((Vec::new(), Notice::Clear.encode(origin)));
        }
        let what = self.order.pop_front()?;
        let message = self.waiting.remove(&what)?;
        Some((what, message))
    }

    /// Puts a notification whose publish failed back at the head, unless a newer one of
    /// the same thing came meanwhile.
    fn put_back(&mut self, what: Vec<u8>, message: Vec<u8>) {
        if what.is_empty() {
            self.overflowed = true;
        } else if !self.overflowed && !self.waiting.contains_key(&what) {
            self.waiting.insert(what.clone(), message);
            self.order.push_front(what);
        }
    }

    fn len(&self) -> usize {
        self.waiting.len() + usize::from(self.overflowed)
    }
}

/// Where the subscriber subscribes.
enum Subscription {
    /// One server (standalone, or what the app's client names).
    Server(Box<Client>),
    /// A cluster: any node, the given ones first, then the primaries the cluster names.
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
}

/// Builds a [`TieredStore`]; see [`TieredStore::builder`].
pub struct TieredStoreBuilder<S> {
    l2: S,
    l1: Option<MemoryStore>,
    l1_ttl: Option<Duration>,
    bus: Option<(Subscription, RedisStore, String)>,
}

impl<S: Store> TieredStoreBuilder<S> {
    /// The L1 store (default: [`MemoryStore::new`], 64 MiB). Its bounds are L1's.
    pub fn l1(mut self, l1: MemoryStore) -> Self {
        self.l1 = Some(l1);
        self
    }

    /// L1's size: at most about this many bytes ([`MemoryStoreBuilder::max_bytes`]; default
    /// 64 MiB). Replaces an [`l1`](Self::l1) store set before.
    ///
    /// [`MemoryStoreBuilder::max_bytes`]: crate::MemoryStoreBuilder::max_bytes
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1 = Some(MemoryStore::builder().max_bytes(bytes).build());
        self
    }

    /// How long an L1 copy lives at most. A copy never outlives its entry in L2 (when L2 can
    /// tell its TTL, as [`RedisStore`] does). Default: 1 hour with
    /// [`invalidations`](Self::invalidations), which keep copies coherent; 1 s without, the
    /// bound on how long another instance's change goes unseen.
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_ttl = Some(ttl);
        self
    }

    /// Publishes notifications on, and subscribes to, `channel` on the Redis at `url`
    /// (usually L2's server). Every instance sharing L2 should use the same channel.
    pub fn invalidations(self, url: &str, channel: &str) -> Result<Self> {
        let client = Client::open(url).map_err(|e| {
            Error::new(ErrorKind::InvalidUrl, "invalid Redis URL for invalidations").with_source(e)
        })?;
        Ok(self.invalidations_from_client(client, channel))
    }

    /// [`invalidations`](Self::invalidations) through the app's redis-rs `client`.
    pub fn invalidations_from_client(mut self, client: Client, channel: &str) -> Self {
        let publisher = RedisStore::builder_from_client(client.clone()).lazy();
        self.bus = Some((
            Subscription::Server(Box::new(client)),
            publisher,
            channel.to_owned(),
        ));
        self
    }

    /// [`invalidations`](Self::invalidations) on a Redis Cluster reached through any of
    /// `nodes` (`redis://host:port` each; give several, or all). Notifications are
    /// published with `PUBLISH`, which a cluster delivers to subscribers on every node; each
    /// instance subscribes on one node and moves to another (given, or a primary the cluster
    /// names) when it fails, catching up from the journal.
    ///
    /// Sharded pub/sub (`SSUBSCRIBE`) is not used: redis-rs 1.8 offers it only on its cluster
    /// connection over RESP3, which resubscribes by itself without telling when, so a node
    /// could not know which gap to catch up.
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn invalidations_cluster<I, N>(mut self, nodes: I, channel: &str) -> Result<Self>
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let publisher = RedisStore::builder_cluster(nodes.clone()).build_lazy()?;
        for node in &nodes {
            Client::open(node.as_str()).map_err(|e| {
                Error::new(ErrorKind::InvalidUrl, "invalid Redis URL for invalidations")
                    .with_source(e)
            })?;
        }
        self.bus = Some((Subscription::Cluster(nodes), publisher, channel.to_owned()));
        Ok(self)
    }

    /// The store. With invalidations, it subscribes in a background task and waits up to a
    /// second for the subscription (an instance that starts while Redis is down keeps trying
    /// in the background). Must be called inside a Tokio runtime.
    pub async fn build(self) -> TieredStore<S> {
        let near = Arc::new(Near {
            l1: self.l1.unwrap_or_default(),
            origin: origin(),
            changes: AtomicU64::new(0),
            guards: (0..GUARD_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            wide: AtomicU64::new(0),
            hasher: Default::default(),
            subscribed: AtomicBool::new(false),
            received: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            emptied: AtomicU64::new(0),
            applied: Mutex::new(None),
            refused: WarnLimiter::default(),
        });
        let default_ttl = if self.bus.is_some() {
            DEFAULT_L1_MAX_TTL
        } else {
            UNCOORDINATED_L1_TTL
        };
        let bus = match self.bus {
            None => None,
            Some((subscription, publisher, channel)) => {
                let journal = format!("{{{channel}}}:journal");
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let subscriber = tokio::spawn(subscribe(
                    subscription,
                    Journal {
                        store: publisher.clone(),
                        key: journal.clone(),
                        channel: channel.clone(),
                    },
                    near.clone(),
                    ready_tx,
                ));
                let queue = Arc::new(Mutex::new(Queue::default()));
                let queued = Arc::new(tokio::sync::Notify::new());
                let replayer = tokio::spawn(replay(
                    Journal {
                        store: publisher.clone(),
                        key: journal.clone(),
                        channel: channel.clone(),
                    },
                    queue.clone(),
                    queued.clone(),
                    near.origin,
                ));
                let _ = tokio::time::timeout(Duration::from_secs(1), ready_rx).await;
                Some(Bus {
                    publisher,
                    channel,
                    journal,
                    queue,
                    queued,
                    tasks: vec![subscriber.abort_handle(), replayer.abort_handle()],
                })
            }
        };
        TieredStore {
            shared: Arc::new(Tiers {
                near,
                l2: self.l2,
                l1_ttl: self.l1_ttl.unwrap_or(default_ttl),
                bus,
            }),
        }
    }
}

/// A random id for this instance's notifications.
fn origin() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    hasher.finish()
}

impl<S: Store> TieredStore<S> {
    /// A builder for a two-tier store in front of `l2`.
    pub fn builder(l2: S) -> TieredStoreBuilder<S> {
        TieredStoreBuilder {
            l2,
            l1: None,
            l1_ttl: None,
            bus: None,
        }
    }

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
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<()> {
        check_pattern(pattern)?;
        let notice = Notice::Pattern(pattern);
        self.shared.near.apply(&notice);
        self.publish(&notice).await;
        Ok(())
    }

    /// Publishes `notice`; when that fails, queues it for the replay task.
    async fn publish(&self, notice: &Notice<'_>) {
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

    fn l1_ttl(&self, ttl: Duration) -> Duration {
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The journal and the channel, through the publishing store.
struct Journal {
    store: RedisStore,
    key: String,
    channel: String,
}

impl Journal {
    async fn publish(&self, message: &[u8]) -> Result<()> {
        let mut invocation = PUBLISH_SCRIPT.prepare_invoke();
        invocation
            .key(&self.key)
            .arg(&self.channel)
            .arg(message)
            .arg(JOURNAL_ENTRIES)
            .arg(JOURNAL_TTL.as_millis() as u64);
        let _: Value = self.store.run_script(&invocation).await?;
        Ok(())
    }

    /// The newest entry's version, if the journal holds any.
    async fn newest(&self) -> Result<Option<Version>> {
        let entries: Vec<(String, Value)> = self
            .store
            .query(
                ::redis::cmd("XREVRANGE")
                    .arg(&self.key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        Ok(entries.first().and_then(|(id, _)| parse_version(id)))
    }

    /// Up to `count` entries after `after` (exclusive), oldest first, with their versions;
    /// `None` when the journal no longer holds `after` itself (trimmed past it, expired, or
    /// lost with a restart): what happened since cannot be told.
    async fn since(&self, after: Version, count: usize) -> Result<Option<Vec<(Version, Vec<u8>)>>> {
        let id = format!("{}-{}", after.0, after.1);
        let mut pipe = ::redis::pipe();
        pipe.cmd("XRANGE").arg(&self.key).arg(&id).arg(&id);
        pipe.cmd("XRANGE")
            .arg(&self.key)
            .arg(format!("({id}"))
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let (anchor, entries): (Vec<(String, Value)>, Vec<JournalEntry>) =
            self.store.query_pipeline(&pipe).await?;
        if anchor.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            entries
                .into_iter()
                .filter_map(|(id, mut fields)| Some((parse_version(&id)?, fields.remove("m")?)))
                .collect(),
        ))
    }
}

/// A journal entry as `XRANGE` answers it: the id, and the fields (`m`: the notification).
type JournalEntry = (String, HashMap<String, Vec<u8>>);

fn parse_version(id: &str) -> Option<Version> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// What an instance tells the others: what changed, so they drop their copies.
#[derive(Debug, PartialEq, Eq)]
enum Notice<'a> {
    /// A value stored or replaced.
    Set(&'a str),
    /// A key deleted.
    Key(&'a str),
    /// A tag invalidated: the keys L2 removed, when it could list them.
    Tag(&'a str, Option<Vec<&'a str>>),
    Pattern(&'a str),
    /// Empty L1: too many notifications were lost to tell them one by one.
    Clear,
}

impl<'a> Notice<'a> {
    /// `kind`, the origin in 16 hex digits, then the text.
    fn encode(&self, origin: u64) -> Vec<u8> {
        let (kind, text) = match self {
            Notice::Set(key) => (b's', *key),
            Notice::Key(key) => (b'k', *key),
            Notice::Tag(tag, _) => (b't', *tag),
            Notice::Pattern(pattern) => (b'p', *pattern),
            Notice::Clear => (b'c', ""),
        };
        let mut message = Vec::with_capacity(text.len() + 17);
        message.push(kind);
        message.extend_from_slice(format!("{origin:016x}").as_bytes());
        message.extend_from_slice(text.as_bytes());
        if let Notice::Tag(_, Some(keys)) = self {
            // Keys never hold a newline: the layer's are percent-encoded; a key that does is
            // refused by `tag_keys` below, and the tag's copies dropped the wide way.
            for key in keys {
                message.push(b'\n');
                message.extend_from_slice(key.as_bytes());
            }
        }
        message
    }

    /// A notification and its origin (`None` for one without: published by hand or by an
    /// older version of this crate, `kind` then text).
    fn decode(message: &'a [u8]) -> Option<(Self, Option<u64>)> {
        let (&kind, rest) = message.split_first()?;
        let (origin, text) = match rest.get(..16).and_then(|hex| std::str::from_utf8(hex).ok()) {
            Some(hex) if kind != b'c' || rest.len() == 16 => match u64::from_str_radix(hex, 16) {
                Ok(origin) => (Some(origin), &rest[16..]),
                Err(_) => (None, rest),
            },
            _ => (None, rest),
        };
        let text = std::str::from_utf8(text).ok()?;
        let notice = match kind {
            b's' => Notice::Set(text),
            b'k' => Notice::Key(text),
            b't' => {
                let mut lines = text.split('\n');
                let tag = lines.next().unwrap_or_default();
                let keys: Vec<&str> = lines.collect();
                Notice::Tag(tag, (!keys.is_empty()).then_some(keys))
            }
            b'p' => Notice::Pattern(text),
            b'c' => Notice::Clear,
            _ => return None,
        };
        Some((notice, origin))
    }

    /// What the notification is about, for the queue's "newest wins": a key's store and
    /// delete are one thing (either drops the copy).
    fn what(&self) -> Vec<u8> {
        let (class, text) = match self {
            Notice::Set(key) | Notice::Key(key) => (b'k', *key),
            Notice::Tag(tag, _) => (b't', *tag),
            Notice::Pattern(pattern) => (b'p', *pattern),
            Notice::Clear => (b'c', ""),
        };
        let mut what = vec![class];
        what.extend_from_slice(text.as_bytes());
        what
    }
}

/// A live message: `version notification`, or a bare notification (no version).
fn split_version(payload: &[u8]) -> (Option<Version>, &[u8]) {
    if payload.first().is_some_and(u8::is_ascii_digit) {
        if let Some(space) = payload.iter().position(|&b| b == b' ') {
            if let Some(version) = std::str::from_utf8(&payload[..space])
                .ok()
                .and_then(parse_version)
            {
                return (Some(version), &payload[space + 1..]);
            }
        }
    }
    (None, payload)
}

impl Near {
    fn guard(&self, key: &str) -> &AtomicU64 {
        let bucket = self.hasher.hash_one(key) as usize % self.guards.len();
        &self.guards[bucket]
    }

    /// Marks `key` changed: a read-through of it under way does not keep its value.
    fn mark(&self, key: &str) {
        let change = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        self.guard(key).fetch_max(change, Ordering::SeqCst);
    }

    fn mark_wide(&self) {
        let change = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        self.wide.fetch_max(change, Ordering::SeqCst);
    }

    /// Whether no change of `key` was applied since `since` (a value of `changes`).
    fn unchanged(&self, key: &str, since: u64) -> bool {
        self.guard(key).load(Ordering::SeqCst) <= since && self.wide.load(Ordering::SeqCst) <= since
    }

    /// Drops the copies `notice` names. MemoryStore's operations never fail, and complete
    /// without waiting: the futures are polled once.
    fn apply(&self, notice: &Notice<'_>) {
        match notice {
            Notice::Set(key) | Notice::Key(key) => {
                self.mark(key);
                self.l1.remove_matching_key(key);
            }
            Notice::Tag(tag, keys) => {
                match keys {
                    Some(keys) => {
                        for key in keys {
                            self.mark(key);
                            self.l1.remove_matching_key(key);
                        }
                    }
                    None => {
                        self.mark_wide();
                        self.l1.invalidate_tag_now(READ_THROUGH);
                    }
                }
                self.mark_wide();
                self.l1.invalidate_tag_now(tag);
            }
            Notice::Pattern(pattern) => {
                self.mark_wide();
                self.l1
                    .remove_matching(|key| glob_match(pattern.as_bytes(), key.as_bytes()));
            }
            Notice::Clear => self.clear(),
        }
    }

    /// Applies a notification received on the channel or read from the journal. Anything
    /// that can publish there may send it, so a pattern over the bound is ignored (with a
    /// warning) rather than matched against every L1 key; this crate's own instances never
    /// send one. This instance's own notifications were applied when it sent them.
    fn receive(&self, version: Option<Version>, message: &[u8]) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Some(version) = version {
            let mut applied = lock(&self.applied);
            if applied.is_some_and(|applied| version <= applied) {
                // Read from the journal during a catch-up already.
                return;
            }
            *applied = Some(version);
        }
        match Notice::decode(message) {
            Some((_, Some(origin))) if origin == self.origin => {}
            Some((Notice::Pattern(pattern), _)) if pattern.len() > MAX_PATTERN_BYTES => {
                if let Some(suppressed) = self.refused.allow() {
                    tracing::warn!(
                        bytes = pattern.len(),
                        limit = MAX_PATTERN_BYTES,
                        suppressed,
                        "ignoring an over-long pattern invalidation from the channel"
                    );
                }
            }
            Some((notice, _)) => self.apply(&notice),
            None => {}
        }
    }

    /// Empties L1 (after a gap in the subscription the journal cannot account for).
    fn clear(&self) {
        self.mark_wide();
        self.l1.clear();
        self.emptied.fetch_add(1, Ordering::Relaxed);
    }

    /// After (re)subscribing: applies what the journal holds since the last notification
    /// applied here, or empties L1 when it cannot tell.
    async fn catch_up(&self, journal: &Journal, first: bool) -> Result<()> {
        let applied = *lock(&self.applied);
        let Some(mut after) = applied else {
            // Nothing applied yet: start from the journal's newest entry. Before the first
            // subscription L1 holds only this instance's own writes; after a failed
            // catch-up, anything.
            if !first {
                self.clear();
            }
            let newest = journal.newest().await?.unwrap_or((0, 0));
            let mut applied = lock(&self.applied);
            if applied.is_none() {
                *applied = Some(newest);
            }
            return Ok(());
        };
        loop {
            let entries = if after == (0, 0) {
                // The journal was empty: everything in it now is new.
                let entries: Vec<JournalEntry> = journal
                    .store
                    .query(
                        ::redis::cmd("XRANGE")
                            .arg(&journal.key)
                            .arg("-")
                            .arg("+")
                            .arg("COUNT")
                            .arg(1000),
                    )
                    .await?;
                Some(
                    entries
                        .into_iter()
                        .filter_map(|(id, mut f)| Some((parse_version(&id)?, f.remove("m")?)))
                        .collect::<Vec<_>>(),
                )
            } else {
                journal.since(after, 1000).await?
            };
            let Some(entries) = entries else {
                tracing::warn!(
                    "the invalidation journal no longer reaches back to the last notification \
                     applied here; emptying L1"
                );
                self.clear();
                *lock(&self.applied) = None;
                let newest = journal.newest().await?.unwrap_or((0, 0));
                *lock(&self.applied) = Some(newest);
                return Ok(());
            };
            let done = entries.len() < 1000;
            for (version, message) in &entries {
                self.caught_up.fetch_add(1, Ordering::Relaxed);
                self.receive(Some(*version), message);
                after = *version;
            }
            if done {
                return Ok(());
            }
        }
    }
}

/// The subscriber task: subscribes, catches up from the journal, applies each notification
/// to L1, and subscribes again after the connection is lost.
async fn subscribe(
    subscription: Subscription,
    journal: Journal,
    near: Arc<Near>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut wait = RESUBSCRIBE_FIRST;
    let mut first = true;
    let mut next_node = 0usize;
    let channel = journal.channel.clone();
    loop {
        let Some(client) = subscription.client(&journal.store, next_node).await else {
            next_node += 1;
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RESUBSCRIBE_MAX);
            continue;
        };
        let connected = tokio::time::timeout(Duration::from_secs(1), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                let mut messages = pubsub.into_on_message();
                // Subscribed first, then the journal: whatever the catch-up misses arrives
                // on the channel (buffered meanwhile).
                let caught_up =
                    tokio::time::timeout(Duration::from_secs(2), near.catch_up(&journal, first))
                        .await;
                if !matches!(caught_up, Ok(Ok(()))) {
                    tracing::warn!(
                        channel,
                        "could not read the invalidation journal after subscribing; emptying L1"
                    );
                    near.clear();
                    *lock(&near.applied) = None;
                }
                first = false;
                wait = RESUBSCRIBE_FIRST;
                near.subscribed.store(true, Ordering::SeqCst);
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                while let Some(message) = messages.next().await {
                    let (version, notice) = split_version(message.get_payload_bytes());
                    near.receive(version, notice);
                }
                near.subscribed.store(false, Ordering::SeqCst);
                tracing::warn!(
                    channel,
                    "lost the invalidation subscription; subscribing again, then catching up \
                     from the journal"
                );
                next_node += 1;
            }
            Ok(Err(e)) => {
                next_node += 1;
                tracing::debug!(
                    channel,
                    error = &e as &dyn std::error::Error,
                    "could not subscribe to invalidations"
                )
            }
            Err(_) => {
                next_node += 1;
                tracing::debug!(channel, "subscribing to invalidations timed out")
            }
        }
        if let Some(ready) = ready.take() {
            // The first attempt failed: let `build` return, keep trying in the background.
            let _ = ready.send(());
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RESUBSCRIBE_MAX);
    }
}

impl Subscription {
    /// The client to subscribe with on attempt `n`.
    async fn client(&self, store: &RedisStore, n: usize) -> Option<Client> {
        let _ = store;
        match self {
            Subscription::Server(client) => Some((**client).clone()),
            #[cfg(feature = "cluster")]
            Subscription::Cluster(nodes) => {
                // The given nodes, then the primaries the cluster names now (a failed-over
                // replica's address, for one).
                let mut candidates = nodes.clone();
                if n >= nodes.len() {
                    if let Ok(primaries) = store.primaries().await {
                        candidates.extend(
                            primaries
                                .into_iter()
                                .map(|(host, port)| format!("redis://{host}:{port}")),
                        );
                    }
                }
                let url = candidates.get(n % candidates.len().max(1))?;
                Client::open(url.as_str()).ok()
            }
        }
    }
}

/// The replay task: publishes queued notifications once Redis answers, in order.
async fn replay(
    journal: Journal,
    queue: Arc<Mutex<Queue>>,
    queued: Arc<tokio::sync::Notify>,
    origin: u64,
) {
    loop {
        queued.notified().await;
        loop {
            let next = lock(&queue).pop(origin);
            let Some((what, message)) = next else {
                break;
            };
            if journal.publish(&message).await.is_err() {
                lock(&queue).put_back(what, message);
                tokio::time::sleep(REPLAY_INTERVAL).await;
            }
        }
    }
}

/// Redis's glob (`SCAN MATCH`, `KEYS`): `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\` escapes, with
/// Redis's reading of odd classes (a class left open ends with the pattern; `[a-]` is a range
/// up to `]`).
///
/// Iterative, in O(pattern x text) steps: Redis's own matcher recursed per `*` and was
/// exponential on patterns like `a*a*a*b` (CVE-2022-36021), and this one runs on every L1 key
/// for patterns any instance publishes. Every token but `*` matches exactly one byte, so only
/// the latest `*` needs to be retried at a later position: whatever an earlier `*` could
/// absorb, the latest one can too.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // The pattern position just after the latest `*`, and the text position it is tried at.
    let mut retry: Option<(usize, usize)> = None;
    while t < text.len() {
        if pattern.get(p) == Some(&b'*') {
            p += 1;
            retry = Some((p, t));
        } else if let Some(next) = match_one(pattern, p, text[t]) {
            p = next;
            t += 1;
        } else if let Some((after_star, at)) = retry {
            // The `*` absorbs one more byte, and the rest is tried from there.
            p = after_star;
            t = at + 1;
            retry = Some((after_star, t));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether the one-byte token at `pattern[p]` (anything but `*`) matches `c`: the position
/// after the token if it does, `None` if not or at the end of the pattern.
fn match_one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match *pattern.get(p)? {
        b'?' => Some(p + 1),
        b'[' => {
            let mut i = p + 1;
            let negated = pattern.get(i) == Some(&b'^');
            if negated {
                i += 1;
            }
            let mut matched = false;
            loop {
                match pattern[i..] {
                    // An open class ends with the pattern, as in Redis.
                    [] => break,
                    [b'\\', x, ..] => {
                        matched |= x == c;
                        i += 2;
                    }
                    [b']', ..] => {
                        i += 1;
                        break;
                    }
                    [lo, b'-', hi, ..] => {
                        matched |= (lo.min(hi)..=lo.max(hi)).contains(&c);
                        i += 3;
                    }
                    [x, ..] => {
                        matched |= x == c;
                        i += 1;
                    }
                }
            }
            (matched != negated).then_some(i)
        }
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        x => (x == c).then_some(p + 1),
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_redis() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("a*", "abc", true),
            ("a*c", "abxc", true),
            ("a*c", "abxd", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[a-b]llo", "hcllo", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("user:1:*", "user:1:posts", true),
            ("user:1:*", "user:10:posts", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                *expected,
                "{pattern} ~ {text}"
            );
        }
    }

    /// The corners, each answered as redis-server 7.0's `KEYS` answers it (and a run of 1.2
    /// million random patterns and keys against it agreed on every one).
    #[test]
    fn glob_reads_odd_patterns_as_redis_does() {
        let cases: &[(&str, &str, bool)] = &[
            // A class left open ends with the pattern.
            ("h[ae", "ha", true),
            ("h[ae", "hx", false),
            ("a[", "a", false),
            ("a[^", "ab", true),
            // `-` before the closing bracket makes a range up to `]`; ranges may run backwards.
            ("[a-]", "]", true),
            ("[a-]", "b", false),
            ("[z-a]", "m", true),
            ("[\\]]", "]", true),
            ("[]", "]", false),
            ("[^]", "x", true),
            // A trailing backslash is itself.
            ("a\\", "a\\", true),
            // Stars, retried at later positions.
            ("a*b*c", "axbxxc", true),
            ("a*b*c", "axbxxcx", false),
            ("*a*", "bab", true),
            ("a*a*b", "aaaab", true),
            ("a*a*b", "aaaa", false),
            ("**", "x", true),
            ("?*?", "ab", true),
            ("?*?", "a", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                *expected,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn notifications_round_trip() {
        let origin = 0x0123_4567_89ab_cdef;
        for notice in [
            Notice::Set("a:b"),
            Notice::Key("a:b"),
            Notice::Tag("p:__tag:x", None),
            Notice::Tag("p:__tag:x", Some(vec!["a", "b:c"])),
            Notice::Pattern("p:*"),
            Notice::Clear,
        ] {
            let encoded = notice.encode(origin);
            let (decoded, from) = Notice::decode(&encoded).unwrap();
            assert_eq!(decoded, notice);
            assert_eq!(from, Some(origin));
        }
        // A bare notification, as published by hand: no origin.
        assert_eq!(Notice::decode(b"kk2"), Some((Notice::Key("k2"), None)));
        assert!(Notice::decode(b"").is_none());
        assert!(Notice::decode(b"zkey").is_none());
        assert_eq!(
            split_version(b"1700000000000-3 kx"),
            (Some((1_700_000_000_000, 3)), &b"kx"[..])
        );
        assert_eq!(split_version(b"kx"), (None, &b"kx"[..]));
    }

    #[test]
    fn the_queue_keeps_the_newest_per_key_and_overflows_into_one_clear() {
        let mut queue = Queue::default();
        queue.push(Notice::Set("a").what(), b"first".to_vec());
        queue.push(Notice::Key("a").what(), b"second".to_vec());
        queue.push(Notice::Set("b").what(), b"b".to_vec());
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.pop(1).unwrap().1, b"second");
        assert_eq!(queue.pop(1).unwrap().1, b"b");
        assert!(queue.pop(1).is_none());
        for i in 0..=QUEUE_MAX {
            queue.push(Notice::Set(&i.to_string()).what(), vec![]);
        }
        assert_eq!(queue.len(), 1);
        let (_, message) = queue.pop(1).unwrap();
        assert_eq!(Notice::decode(&message).unwrap().0, Notice::Clear);
        assert!(queue.pop(1).is_none());
    }
}
