//! `RedisCache`: a typed client for application data, on the same pool as [`RedisStore`].
//!
//! Values are JSON (serde_json), so a Rust service and a service in another language can
//! share keys. See the repository's `docs/client-and-tags.md` for the caching patterns built
//! on it.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use md5::{Digest, Md5};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::coalesce::{self, follow, Contention, Flights, Looked, Released, Role};
use crate::key;
use crate::observe::WarnLimiter;
use crate::store::redis::RedisStore;
use crate::store::{check_pattern, Store};
use crate::{Error, ErrorKind, Result};

/// Keys per SCAN step, per UNLINK and per tag-set pop: each step is one short command, so a
/// large delete never blocks Redis for long and each call fits in the operation timeout.
const BATCH: usize = 1000;

/// How long a cross-instance lock of [`RedisCache::get_or_insert_with`] lives if its holder
/// never releases it (a crashed process), by default.
const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(5);

/// How long a caller waits on another instance's lock before computing the value itself, by
/// default: two lock lifetimes, so a crashed holder's lock can expire and a successor compute.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);

/// A typed cache client for application data: JSON values under string keys, with
/// get-or-compute (single-flight, in this process and across processes), pattern deletes and
/// tag invalidation.
///
/// Built on a [`RedisStore`], so it shares its pool, its operation timeout (default 100 ms)
/// and its fail-fast back-off. Set the timeout on the store:
///
/// ```rust,no_run
/// # async fn run() -> tower_redis_cache::Result<()> {
/// use std::time::Duration;
/// use tower_redis_cache::{RedisCache, RedisStore};
///
/// let store = RedisStore::builder("redis://127.0.0.1:6379")
///     .operation_timeout(Duration::from_millis(500))
///     .connect()
///     .await?;
/// let cache = RedisCache::from_store(&store).key_prefix("app");
/// cache.set("user:42", &"Ada", Duration::from_secs(60)).await?;
/// let name: Option<String> = cache.get("user:42").await?;
/// assert_eq!(name.as_deref(), Some("Ada"));
/// # Ok(()) }
/// ```
///
/// # Keys
///
/// With a prefix (see [`key_prefix`](Self::key_prefix)) every key, pattern and tag this
/// client touches lives under `{prefix}:`; without one, keys are used as given, which lets a
/// Rust service read and write the keys of another service during a migration. Tag sets are
/// stored at `{prefix}:__tag:{tag}`, so do not use keys starting with `__tag:`.
///
/// Build keys from user-supplied parts with [`RedisCache::key`], which escapes them, so that a
/// pattern built from a key (`{key}:*`) matches only that key's children.
///
/// # Values
///
/// Values are stored as JSON text. Any stored value is a hit, including `null`, `false`, `0`,
/// `""` and `[]`; only a missing key is a miss. A value that is not valid JSON for the
/// requested type is an [`ErrorKind::Codec`] error naming the key.
///
/// Cloning is cheap; clones share the pool and the in-flight computations.
#[derive(Clone)]
pub struct RedisCache {
    store: RedisStore,
    /// The same store, as the cross-instance [`Lock`] takes it.
    lock_store: Arc<dyn Store>,
    /// `""`, or the prefix followed by `:`.
    namespace: Arc<str>,
    flights: Arc<Flights<Landing>>,
    lock: LockSettings,
    /// Failures warn at most once per few seconds per cause, shared by clones.
    warnings: Arc<Warnings>,
}

/// One limiter per cause of a warning.
#[derive(Debug, Default)]
struct Warnings {
    lookup: WarnLimiter,
    store: WarnLimiter,
    lock: WarnLimiter,
    undecodable: WarnLimiter,
}

/// Cross-instance coalescing of [`RedisCache::get_or_insert_with`].
#[derive(Clone, Copy, Debug)]
struct LockSettings {
    enabled: bool,
    ttl: Duration,
    wait_timeout: Duration,
}

/// A leader's computed value as its followers get it: JSON, so that each follower decodes
/// its own copy and `T` need not be `Clone`.
type Landing = Bytes;

impl RedisCache {
    /// Connects to `url` with [`RedisStore`]'s default settings and no key prefix.
    pub async fn connect(url: &str) -> Result<Self> {
        Ok(Self::from_store(&RedisStore::connect(url).await?))
    }

    /// A client on the app's bb8-redis pool, shared with the rest of the app, with
    /// [`RedisStore`]'s default timeouts and no key prefix; see
    /// [`RedisStore::builder_from_pool`] for how it uses the pool, and for other settings.
    #[cfg(feature = "bb8")]
    #[cfg_attr(docsrs, doc(cfg(feature = "bb8")))]
    pub fn from_pool(pool: bb8::Pool<bb8_redis::RedisConnectionManager>) -> Self {
        Self::from_store(&RedisStore::builder_from_pool(pool).lazy())
    }

    /// A client that opens its connections from the app's redis-rs `client`, with
    /// [`RedisStore`]'s default settings and no key prefix (see
    /// [`RedisStore::builder_from_client`]).
    pub fn from_client(client: ::redis::Client) -> Self {
        Self::from_store(&RedisStore::builder_from_client(client).lazy())
    }

    /// A client on the app's multiplexed connection, with no key prefix. The connection
    /// never reconnects; see [`RedisStore::builder_from_connection`].
    pub fn from_connection(conn: ::redis::aio::MultiplexedConnection) -> Self {
        Self::from_store(&RedisStore::builder_from_connection(conn).lazy())
    }

    /// A client on the app's redis-rs `ConnectionManager` (which reconnects by itself), with
    /// no key prefix.
    #[cfg(feature = "connection-manager")]
    #[cfg_attr(docsrs, doc(cfg(feature = "connection-manager")))]
    pub fn from_connection_manager(manager: ::redis::aio::ConnectionManager) -> Self {
        Self::from_store(&RedisStore::builder_from_connection_manager(manager).lazy())
    }

    /// A client on `store`'s pool (and with its timeouts), with no key prefix.
    pub fn from_store(store: &RedisStore) -> Self {
        Self {
            store: store.clone(),
            lock_store: Arc::new(store.clone()),
            namespace: Arc::from(""),
            flights: Arc::default(),
            warnings: Arc::default(),
            lock: LockSettings {
                enabled: false,
                ttl: DEFAULT_LOCK_TTL,
                wait_timeout: DEFAULT_LOCK_WAIT,
            },
        }
    }

    /// Puts every key, pattern and tag of this client under `{prefix}:` (as
    /// [`CacheLayer::key_prefix`](crate::CacheLayer::key_prefix) does for the layer). An empty
    /// prefix means none.
    pub fn key_prefix(mut self, prefix: impl AsRef<str>) -> Self {
        let prefix = prefix.as_ref();
        self.namespace = if prefix.is_empty() {
            Arc::from("")
        } else {
            Arc::from(format!("{prefix}:"))
        };
        self
    }

    /// Whether [`get_or_insert_with`](Self::get_or_insert_with) also coalesces across
    /// instances (default false, as [`CacheLayer::lock_across_instances`](crate::CacheLayer::lock_across_instances)): clients with separate pools, in separate processes or on
    /// separate hosts, that share the Redis server run the closure once per cold key in total,
    /// rather than once per instance.
    ///
    /// It works through a lock in Redis at `{key}:lock`, taken only on a miss, by the one
    /// caller per instance that leads the in-process single-flight. That costs two more round
    /// trips per miss (taking the lock, then looking at the key once more); hits cost nothing
    /// extra. Instances that find the lock held poll the key every 20 ms; see
    /// [`lock_ttl`](Self::lock_ttl) and [`coalesce_timeout`](Self::coalesce_timeout) for the timings. Turn it off when the closure is cheap
    /// or when running it once per instance is fine.
    pub fn lock_across_instances(mut self, enable: bool) -> Self {
        self.lock.enabled = enable;
        self
    }

    /// How long the cross-instance lock lives if its holder never releases it (a crashed or
    /// stuck process; default 5 s); other instances proceed after it. Make it longer than the
    /// closure usually takes: a closure that outlives the lock may run again elsewhere. Named
    /// and clamped as [`CacheLayer::lock_ttl`](crate::CacheLayer::lock_ttl).
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock.ttl = crate::settings::clamp(ttl);
        self
    }

    /// How long a caller waits for another caller's value (in this process, or in another
    /// instance with the lock on) before running the closure itself (default 10 s). Named
    /// and clamped as [`CacheLayer::coalesce_timeout`](crate::CacheLayer::coalesce_timeout).
    pub fn coalesce_timeout(mut self, timeout: Duration) -> Self {
        self.lock.wait_timeout = crate::settings::clamp(timeout);
        self
    }

    /// The key prefix, without the trailing `:` (empty when there is none).
    pub fn prefix(&self) -> &str {
        self.namespace.strip_suffix(':').unwrap_or("")
    }

    /// The store whose pool this client uses.
    pub fn store(&self) -> &RedisStore {
        &self.store
    }

    /// Joins `segments` with `:` after escaping each one, so user input cannot add segments or
    /// glob syntax: `%`, `:`, `*`, `?`, `[`, `]` and `\` inside a segment are percent-encoded
    /// (`:` becomes `%3A`, `*` becomes `%2A`, ...). Segments without those characters are kept
    /// as they are, so `key(&["user", "42"])` is `user:42`.
    ///
    /// The result holds no glob metacharacters from the segments, so it is also a pattern
    /// that matches itself only: `format!("{}:*", RedisCache::key(&["user", id]))` matches
    /// the children of that one user, whatever `id` contains.
    ///
    /// ```
    /// use tower_redis_cache::RedisCache;
    /// assert_eq!(RedisCache::key(&["user", "42"]), "user:42");
    /// assert_eq!(RedisCache::key(&["user", "a*:b"]), "user:a%2A%3Ab");
    /// ```
    pub fn key<S: AsRef<str>>(segments: &[S]) -> String {
        let mut key = String::new();
        for (i, segment) in segments.iter().enumerate() {
            if i > 0 {
                key.push(':');
            }
            for c in segment.as_ref().chars() {
                match c {
                    '%' | ':' | '*' | '?' | '[' | ']' | '\\' => {
                        key.push_str(&format!("%{:02X}", u32::from(c)));
                    }
                    c => key.push(c),
                }
            }
        }
        key
    }

    /// The default key for caching a function's result: `{prefix}:{md5 hex of the arguments
    /// as JSON}`, for example `RedisCache::function_key("get_user", &(42, "en"))`. Fails with
    /// [`ErrorKind::Codec`] if the arguments cannot be serialized.
    pub fn function_key<A: Serialize + ?Sized>(prefix: &str, args: &A) -> Result<String> {
        let json = serde_json::to_vec(args).map_err(|e| {
            Error::new(
                ErrorKind::Codec,
                format!("could not serialize the arguments of {prefix:?} as JSON"),
            )
            .with_source(e)
        })?;
        Ok(format!("{prefix}:{:x}", Md5::digest(&json)))
    }

    /// The value under `key`, or `None` when there is none. Fails with [`ErrorKind::Codec`]
    /// when the stored value is not valid JSON for `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let key = self.full_key(key);
        match self.get_raw(&key).await? {
            Some(json) => decode(&key, &json).map(Some),
            None => Ok(None),
        }
    }

    /// Stores `value` as JSON under `key` for `ttl` (at least 1 ms), replacing any value.
    ///
    /// Fails with [`ErrorKind::InvalidInput`], writing nothing, when the JSON is over the
    /// store's [`max_value_bytes`](crate::RedisStoreBuilder::max_value_bytes)
    /// (default 8 MiB), as every write of this client does.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let key = self.full_key(key);
        let json = encode(&key, value)?;
        self.set_raw(&key, &json, ttl).await
    }

    /// Removes `key`; returns whether it existed. Tag sets keep the key's name until its
    /// expiry, which is harmless: invalidating the tag later removes nothing extra.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let removed: u64 = self
            .store
            .query(::redis::cmd("UNLINK").arg(self.full_key(key)))
            .await?;
        Ok(removed > 0)
    }

    /// Whether a value is stored under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        let found: u64 = self
            .store
            .query(::redis::cmd("EXISTS").arg(self.full_key(key)))
            .await?;
        Ok(found > 0)
    }

    /// Removes every key matching the glob `pattern` (under the client's prefix) and returns
    /// how many it removed.
    ///
    /// Walks the keyspace with `SCAN` in batches and removes each batch with `UNLINK`, never
    /// `KEYS`, so Redis keeps serving other clients meanwhile; each step is a separate command
    /// bounded by the operation timeout. Keys present for the whole walk are removed; keys
    /// written during it may or may not be. Build patterns from [`RedisCache::key`] so that
    /// user input in them is literal.
    ///
    /// Fails with [`ErrorKind::InvalidInput`], before sending anything, for a pattern over
    /// 1024 bytes: Redis matches it against every key it scans, and patterns with many `*`
    /// cost servers without the CVE-2022-36021 fix exponential time.
    pub async fn delete_pattern(&self, pattern: &str) -> Result<u64> {
        check_pattern(pattern)?;
        let pattern = format!("{}{pattern}", escape_glob(&self.namespace));
        #[cfg(feature = "cluster")]
        if self.store.is_cluster() {
            return self.delete_pattern_on_primaries(&pattern).await;
        }
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = self
                .store
                .query(
                    ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(BATCH),
                )
                .await?;
            removed += self.unlink(&keys).await?;
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// [`delete_pattern`](Self::delete_pattern) on a cluster: `SCAN` sees one node's keys, so
    /// every primary is walked in turn. (The UNLINK of a batch is split by slot by redis-rs.)
    #[cfg(feature = "cluster")]
    async fn delete_pattern_on_primaries(&self, pattern: &str) -> Result<u64> {
        let mut removed = 0;
        for node in self.store.primaries().await? {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = self
                    .store
                    .query_node(
                        &node,
                        ::redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(pattern)
                            .arg("COUNT")
                            .arg(BATCH),
                    )
                    .await?;
                removed += self.unlink(&keys).await?;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(removed)
    }

    /// The values under `keys`, in order, in one round trip (`MGET`; on a Cluster, one `MGET`
    /// per hash slot, sent concurrently).
    pub async fn get_many<T: DeserializeOwned, K: AsRef<str>>(
        &self,
        keys: &[K],
    ) -> Result<Vec<Option<T>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = keys.iter().map(|k| self.full_key(k.as_ref())).collect();
        let values: Vec<Option<Vec<u8>>> =
            self.store.query(::redis::cmd("MGET").arg(&keys)).await?;
        keys.iter()
            .zip(values)
            .map(|(key, json)| json.map(|json| decode(key, &json)).transpose())
            .collect()
    }

    /// Stores each `(key, value)` for `ttl` in one round trip (a pipeline). Every value is
    /// serialized and checked against the store's size limit first, so a value that cannot be
    /// serialized ([`ErrorKind::Codec`]) or is too large ([`ErrorKind::InvalidInput`]) means
    /// nothing is written.
    pub async fn set_many<K: AsRef<str>, V: Serialize>(
        &self,
        entries: &[(K, V)],
        ttl: Duration,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let entries = entries
            .iter()
            .map(|(key, value)| {
                let key = self.full_key(key.as_ref());
                let json = encode(&key, value)?;
                Ok((key, json))
            })
            .collect::<Result<Vec<_>>>()?;
        self.store.write_many(&entries, ttl).await
    }

    /// Stores `value` under `key` for `ttl` and records the key under each of `tags`, so that
    /// [`invalidate_tag`](Self::invalidate_tag) can remove it. Value and tags are written
    /// atomically (one script).
    ///
    /// Each tag is a sorted set of key names scored by their expiry: expired names are trimmed
    /// on every write, and the set expires with its longest-lived member. A value over the
    /// store's size limit fails with [`ErrorKind::InvalidInput`], writing neither value nor tags.
    pub async fn set_tagged<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
        tags: &[&str],
    ) -> Result<()> {
        let key = self.full_key(key);
        let json = encode(&key, value)?;
        let tag_keys: Vec<String> = tags.iter().map(|tag| self.tag_key(tag)).collect();
        // One script on one server; on a cluster, tag records then the value (see
        // `RedisStore::write_tagged`).
        self.store.write_tagged(&key, &json, ttl, &tag_keys).await
    }

    /// Removes every key stored with `tag` (see [`set_tagged`](Self::set_tagged)) and the tag
    /// itself; returns how many keys it removed. Costs O(keys carrying the tag), whatever the
    /// size of the keyspace: the tag's set is popped and its keys unlinked in batches.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        // The same tag sets as the response layer's: one implementation in the store.
        self.store.invalidate_tag(&self.tag_key(tag)).await
    }

    /// The value under `key`; on a miss, runs `compute`, stores its value for `ttl` and
    /// returns it. This is what a caching decorator does; build `key` with
    /// [`function_key`](Self::function_key) or any key builder of your own.
    ///
    /// - Single-flight: concurrent calls for one key on this client (and its clones) share one
    ///   lookup and one run of `compute`, and all get its value. If the caller running it is
    ///   dropped, a waiting caller takes over.
    /// - Across instances (off by default; see
    ///   [`lock_across_instances`](Self::lock_across_instances)): on a miss, the caller about
    ///   to compute takes a lock in Redis at `{key}:lock` for the lock TTL, then looks at the
    ///   key once more (the previous holder may just have stored it). It runs `compute`,
    ///   stores the value, and only then releases the lock. This is the response layer's
    ///   protocol too (one implementation, in the crate's coalescing module). A caller that finds the lock held polls the key every 20 ms until the value
    ///   appears (and returns it), the lock is free (and takes it), or the wait timeout passes
    ///   (and computes without the lock). So concurrent callers in separate processes run
    ///   `compute` once in total, and a crashed lock holder delays the others by at most the
    ///   lock TTL.
    /// - An error from `compute` is returned and nothing is cached; the callers that were
    ///   waiting on it in this process get an [`ErrorKind::Compute`] error carrying its
    ///   message. The lock is released at once, so a caller in another instance then runs its
    ///   own `compute`.
    /// - The cache never fails the call: if Redis is down or slow, or holds a value that is not
    ///   valid JSON for `T`, `compute` runs (without the lock) and its value is returned (the
    ///   problem is logged with `tracing`).
    ///
    /// ```rust,no_run
    /// # async fn run(cache: tower_redis_cache::RedisCache) -> tower_redis_cache::Result<()> {
    /// use std::time::Duration;
    /// use tower_redis_cache::RedisCache;
    ///
    /// let id = 42;
    /// let key = RedisCache::function_key("user_name", &id)?;
    /// let name: String = cache
    ///     .get_or_insert_with(&key, Duration::from_secs(60), || async move {
    ///         Ok::<_, tower_redis_cache::Error>(format!("user {id}")) // the slow query
    ///     })
    ///     .await?;
    /// # let _ = name; Ok(()) }
    /// ```
    pub async fn get_or_insert_with<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        compute: F,
    ) -> Result<T, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error> + fmt::Display,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let key = self.full_key(key);
        let mut flight = loop {
            let following = match self.flights.join(&key, 0) {
                Role::Leader(lead) => break Some(lead),
                Role::Follower(following) => following,
            };
            match follow(following, self.lock.wait_timeout).await {
                Released::Done(json) => return Ok(decode(&key, &json)?),
                Released::Failed { reason, .. } => {
                    return Err(Error::new(
                        ErrorKind::Compute,
                        format!("computing the value of {key:?} failed: {reason}"),
                    )
                    .into())
                }
                // The leader's future was dropped before it finished: one follower leads now.
                Released::Dropped => continue,
                // The leader could not share its value, or is too slow: compute on our own.
                Released::Uncacheable | Released::TimedOut => break None,
            }
        };
        let Some(mut flight) = flight.take() else {
            return compute().await;
        };

        let mut lock = None;
        match self.get_raw(&key).await {
            Ok(Some(json)) => match decode::<T>(&key, &json) {
                Ok(value) => {
                    flight.share(Bytes::from(json));
                    return Ok(value);
                }
                Err(e) => warn(
                    &self.warnings.undecodable,
                    &key,
                    &e,
                    "replacing an undecodable cached value",
                ),
            },
            Ok(None) if self.lock.enabled => match self.lock_or_wait(&key).await {
                Contention::Found(json) => match decode::<T>(&key, &json) {
                    Ok(value) => {
                        flight.share(Bytes::from(json));
                        return Ok(value);
                    }
                    Err(e) => warn(
                        &self.warnings.undecodable,
                        &key,
                        &e,
                        "replacing an undecodable cached value",
                    ),
                },
                Contention::Locked(taken) => lock = Some(taken),
                Contention::Failed(e) => warn(
                    &self.warnings.lock,
                    &key,
                    &e,
                    "cache lock unavailable; computing",
                ),
                Contention::Alone => {}
            },
            Ok(None) => {}
            Err(e) => warn(
                &self.warnings.lookup,
                &key,
                &e,
                "cache lookup failed; computing",
            ),
        }

        let value = match compute().await {
            Ok(value) => value,
            Err(e) => {
                flight.release(Released::Failed {
                    timed_out: false,
                    reason: Arc::from(e.to_string()),
                });
                // Other instances waiting on the lock compute their own values now.
                if let Some(lock) = lock {
                    lock.release().await;
                }
                return Err(e);
            }
        };
        match encode(&key, &value) {
            Ok(json) => {
                // Waiters go on at once; the flight stays registered until the value is
                // stored, so that callers arriving meanwhile do not compute it again.
                flight.share(Bytes::from(json.clone()));
                if let Err(e) = self.set_raw(&key, &json, ttl).await {
                    warn(
                        &self.warnings.store,
                        &key,
                        &e,
                        "could not cache a computed value",
                    );
                }
            }
            // The waiters compute their own values, at once.
            Err(e) => {
                flight.release(Released::Uncacheable);
                warn(
                    &self.warnings.store,
                    &key,
                    &e,
                    "could not cache a computed value",
                )
            }
        }
        // Released (in the background) only now that the value is stored, so instances
        // waiting on the lock find the value rather than the lock free.
        drop(lock);
        Ok(value)
    }

    /// After a miss: takes the cross-instance lock for `key`, or waits for the instance
    /// holding it to store the value (the protocol the response layer uses too).
    async fn lock_or_wait(&self, key: &str) -> Contention<Vec<u8>> {
        let look = || async {
            match self.get_raw(key).await {
                Ok(Some(json)) => Looked::Found(json),
                // A failing store fails the lock too, which ends the wait.
                Ok(None) | Err(_) => Looked::Missing,
            }
        };
        let (ttl, wait) = (self.lock.ttl, self.lock.wait_timeout);
        coalesce::lock_or_wait(&self.lock_store, key, ttl, wait, look).await
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.namespace)
    }

    fn tag_key(&self, tag: &str) -> String {
        key::tag_key(&self.namespace, tag)
    }

    async fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.store.query(::redis::cmd("GET").arg(key)).await
    }

    async fn set_raw(&self, key: &str, json: &[u8], ttl: Duration) -> Result<()> {
        self.store.write(key, json, ttl).await
    }

    /// UNLINKs `keys` in batches; returns how many existed.
    async fn unlink(&self, keys: &[Vec<u8>]) -> Result<u64> {
        let mut removed = 0;
        for batch in keys.chunks(BATCH) {
            removed += self
                .store
                .query::<u64>(::redis::cmd("UNLINK").arg(batch))
                .await?;
        }
        Ok(removed)
    }
}

impl fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let in_flight = self.flights.len();
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix())
            .field("store", &self.store)
            .field("lock", &self.lock)
            .field("in_flight", &in_flight)
            .finish()
    }
}

/// Logs a failure at warn, at most once per few seconds per cause, with the number of
/// failures not logged meanwhile (a Redis outage would otherwise log one line per call).
fn warn(limiter: &WarnLimiter, key: &str, error: &Error, message: &'static str) {
    if let Some(suppressed) = limiter.allow() {
        tracing::warn!(
            key,
            suppressed,
            error = error as &dyn std::error::Error,
            "{message}"
        );
    }
}

fn decode<T: DeserializeOwned>(key: &str, json: &[u8]) -> Result<T> {
    serde_json::from_slice(json).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!(
                "the value at {key:?} is not valid JSON for {}",
                std::any::type_name::<T>()
            ),
        )
        .with_source(e)
    })
}

fn encode<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| {
        Error::new(
            ErrorKind::Codec,
            format!("could not serialize the value for {key:?} as JSON"),
        )
        .with_source(e)
    })
}

/// `literal` with the glob metacharacters of `SCAN MATCH` escaped.
fn escape_glob(literal: &str) -> String {
    let mut escaped = String::with_capacity(literal.len());
    for c in literal.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_escapes_separators_and_glob_syntax_only() {
        assert_eq!(RedisCache::key(&["user", "42"]), "user:42");
        assert_eq!(RedisCache::key(&["user", "a:b"]), "user:a%3Ab");
        assert_eq!(
            RedisCache::key(&["*?[]\\%", "é x"]),
            "%2A%3F%5B%5D%5C%25:é x"
        );
        // Escaping is injective: `%` itself is escaped.
        assert_ne!(RedisCache::key(&["%2A"]), RedisCache::key(&["*"]));
    }

    #[test]
    fn function_key_is_prefix_and_md5_of_the_json_arguments() {
        let key = RedisCache::function_key("get_user", &(42, "en")).unwrap();
        assert_eq!(key, format!("get_user:{:x}", Md5::digest(br#"[42,"en"]"#)));
        assert_ne!(
            key,
            RedisCache::function_key("get_user", &(43, "en")).unwrap()
        );
    }

    #[test]
    fn escape_glob_escapes_metacharacters() {
        assert_eq!(escape_glob("a*b?[c]\\d:e"), "a\\*b\\?\\[c\\]\\\\d:e");
    }
}
