//! `RedisStore`: the production store. A few multiplexed Redis connections shared by every
//! request, tuned for a cache: no PING per command, short timeouts, broken connections
//! replaced, fail fast while the server is down.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::{
    AsyncConnectionConfig, Client, FromRedisValue, RedisError, RedisFuture, Script,
    ScriptInvocation, Value,
};
use bytes::Bytes;

use super::{Store, StoreFuture};
use crate::observe::{ErrorCounters, StoreErrorCounts, WarnLimiter};
use crate::{Error, ErrorKind, Result};

/// A Redis-backed [`Store`] on a shared multiplexed connection.
///
/// Commands go out on one shared multiplexed connection (or on several in turn, see
/// [`RedisStoreBuilder::max_connections`]) without waiting for the previous ones to answer:
/// a multiplexed connection pipelines every command sent on it, so one connection carries
/// thousands of concurrent requests, and a cache hit costs one round trip. (A pool that lends
/// a connection to one command at a time, as bb8-redis does, makes requests queue for a
/// connection; `scripts/loadbench.sh --pools` compares the two, see the repository's
/// `docs/performance.md`. An app that already has a bb8-redis pool can still share
/// it, without that cost: see `RedisStore::builder_from_pool`, feature `bb8`.)
///
/// The connections come from a URL ([`RedisStore::connect`], [`RedisStore::builder`]), or
/// from what the app already has: a `redis::Client`, a `MultiplexedConnection`, a
/// `ConnectionManager`, a bb8-redis pool or Redis Sentinel (the `builder_from_*`
/// constructors, some behind features).
///
/// Every operation is bounded by the operation timeout (default 100 ms), and after a
/// connection failure or timeout the store answers errors at once for a short back-off
/// (default 500 ms) instead of making every request wait on a dead server. The response layer
/// turns those errors into cache misses, so a Redis outage costs hit rate, not availability.
/// A connection on which a command fails with an I/O error is dropped, and a new one is opened
/// on demand, so the store recovers by itself when the server comes back.
///
/// Cloning is cheap; clones share the connections.
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Inner>,
}

struct Inner {
    source: Source,
    config: AsyncConnectionConfig,
    slots: Box<[Slot]>,
    /// Which slot the next command uses.
    next: AtomicUsize,
    /// Tells a slot's connection apart from the one that replaced it.
    generation: AtomicU64,
    connection_timeout: Duration,
    op_timeout: Duration,
    backoff: Duration,
    max_value_bytes: usize,
    epoch: Instant,
    /// Milliseconds since `epoch` before which operations fail fast; 0 when healthy.
    down_until_ms: AtomicU64,
    /// Milliseconds since `epoch` from which the next operation during a back-off may try
    /// the server.
    next_probe_ms: AtomicU64,
    /// Failed operations by kind, and back-offs entered, for [`RedisStore::stats`].
    errors: ErrorCounters,
    backoffs: AtomicU64,
    backoff_warning: WarnLimiter,
}

/// What a [`RedisStore`] has seen since it was built, from [`RedisStore::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStoreStats {
    /// Failed operations, by kind (those failed fast during a back-off included).
    pub errors: StoreErrorCounts,
    /// How many times the store entered its failure back-off.
    pub backoffs: u64,
    /// Connections open now, of `connections`.
    pub open_connections: usize,
    /// The store's connection slots.
    pub connections: usize,
}

/// The server's health, from [`RedisStore::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisHealth {
    /// How long a PING took, round trip.
    pub ping: Duration,
    /// `used_memory`, in bytes.
    pub used_memory: Option<u64>,
    /// `maxmemory`, in bytes (0: no limit).
    pub maxmemory: Option<u64>,
    /// `maxmemory_policy` (`allkeys-lru`, `volatile-lru`, `noeviction`, ...).
    pub maxmemory_policy: Option<String>,
    /// `evicted_keys`: keys evicted for memory since the server started.
    pub evicted_keys: Option<u64>,
    /// Keys without a TTL over all databases (`keys` less `expires` in the keyspace section):
    /// data an `allkeys-*` policy may evict to make room for cache entries.
    pub keys_without_ttl: Option<u64>,
}

impl RedisHealth {
    /// A warning about the server's eviction policy for a cache, if it deserves one:
    ///
    /// - `noeviction`: once `maxmemory` is reached every write fails, so the cache stops
    ///   storing (and without `maxmemory` Redis grows until the host runs out).
    /// - `allkeys-*` while the server holds keys without a TTL: the policy evicts keys
    ///   whatever their TTL, so the app's own data (sessions, queues) may be evicted to make
    ///   room for cache entries. Every key this crate writes has a TTL, so `volatile-*` keeps
    ///   such data and evicts cache entries instead.
    ///
    /// `allkeys-*` on a server that holds only keys with a TTL (a Redis used only as a cache)
    /// and `volatile-*` are fine.
    pub fn eviction_warning(&self) -> Option<String> {
        let policy = self.maxmemory_policy.as_deref()?;
        if policy == "noeviction" {
            return Some(format!(
                "Redis maxmemory-policy is noeviction (maxmemory {}): once memory is full every \
                 cache write fails; use allkeys-lru for a Redis used only as a cache, \
                 volatile-lru for one shared with data without TTLs",
                self.maxmemory
                    .map_or("unknown".to_owned(), |m| m.to_string())
            ));
        }
        let persistent = self.keys_without_ttl.unwrap_or(0);
        if policy.starts_with("allkeys-") && persistent > 0 {
            return Some(format!(
                "Redis maxmemory-policy is {policy} and the server holds {persistent} keys \
                 without a TTL: they may be evicted to make room for cache entries; \
                 volatile-lru evicts only keys with a TTL (every cache entry has one)"
            ));
        }
        None
    }
}

/// One of the store's connections: opened on first use, dropped when a command finds it
/// broken, opened again by the next command that picks the slot.
#[derive(Default)]
struct Slot {
    conn: Mutex<Option<(u64, Conn)>>,
    /// Held while (re)connecting, so that a burst of requests opens one connection, not one
    /// each.
    connecting: tokio::sync::Mutex<()>,
}

impl Slot {
    fn current(&self) -> Option<(u64, Conn)> {
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Drops the connection, unless it was already replaced by a newer one.
    fn discard(&self, generation: u64) {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if conn.as_ref().is_some_and(|(g, _)| *g == generation) {
            *conn = None;
        }
    }
}

/// Where the store's connections come from. Whatever the source, every command gets the
/// same operation timeout and back-off, and a connection that breaks is dropped from its slot
/// and asked for again from the source.
enum Source {
    /// Connections the store opens itself from a client (built from a URL, or the app's).
    Client(Client),
    /// The app's connection, shared with it. A multiplexed connection never reconnects: once
    /// it breaks, every command fails (fast, as a cache miss) until the app replaces it.
    Connection(MultiplexedConnection),
    /// The app's connection manager, which reconnects by itself.
    #[cfg(feature = "connection-manager")]
    Manager(::redis::aio::ConnectionManager),
    /// The app's pool: the slot keeps a clone of one of its connections, taken again from
    /// the pool when it breaks (see [`RedisStore::builder_from_pool`]).
    #[cfg(feature = "bb8")]
    Pool(bb8::Pool<bb8_redis::RedisConnectionManager>),
    /// A connection to the master the sentinels name at the time of connecting.
    #[cfg(feature = "sentinel")]
    Sentinel(tokio::sync::Mutex<::redis::sentinel::SentinelClient>),
    /// A cluster connection: one multiplexed connection per node, commands routed by slot,
    /// redirects followed and the slot map refreshed by redis-rs.
    #[cfg(feature = "cluster")]
    Cluster(::redis::cluster::ClusterClient),
}

impl Source {
    /// A connection for a slot.
    async fn open(&self, config: &AsyncConnectionConfig) -> Result<Conn, RedisError> {
        match self {
            Source::Client(client) => client
                .get_multiplexed_async_connection_with_config(config)
                .await
                .map(Conn::Multiplexed),
            Source::Connection(conn) => Ok(Conn::Multiplexed(conn.clone())),
            #[cfg(feature = "connection-manager")]
            Source::Manager(manager) => Ok(Conn::Manager(manager.clone())),
            #[cfg(feature = "bb8")]
            Source::Pool(pool) => from_pool(pool).await.map(Conn::Multiplexed),
            #[cfg(feature = "sentinel")]
            Source::Sentinel(sentinel) => sentinel
                .lock()
                .await
                .get_async_connection_with_config(config)
                .await
                .map(Conn::Multiplexed),
            #[cfg(feature = "cluster")]
            Source::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Source::Client(_) => "client",
            Source::Connection(_) => "connection",
            #[cfg(feature = "connection-manager")]
            Source::Manager(_) => "connection manager",
            #[cfg(feature = "bb8")]
            Source::Pool(_) => "bb8 pool",
            #[cfg(feature = "sentinel")]
            Source::Sentinel(_) => "sentinel",
            #[cfg(feature = "cluster")]
            Source::Cluster(_) => "cluster",
        }
    }
}

/// Takes one of the pool's connections for a slot: a clone of the pooled multiplexed
/// connection, with the guard released at once, so the slot shares the connection with the
/// rest of the app instead of holding it out of the pool.
#[cfg(feature = "bb8")]
async fn from_pool(
    pool: &bb8::Pool<bb8_redis::RedisConnectionManager>,
) -> Result<MultiplexedConnection, RedisError> {
    let mut conn = pool
        .get()
        .await
        .map(|guard| guard.clone())
        .map_err(|e| match e {
            bb8::RunError::User(e) => e,
            bb8::RunError::TimedOut => RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out waiting for a connection from the bb8 pool",
            )),
        })?;
    if pool.config().test_on_check_out {
        // The pool PINGed it on checkout.
        return Ok(conn);
    }
    // bb8-redis's manager never reports a connection broken, so a pool that does not test on
    // checkout lends a connection to a dead server again and again. Check it here, and when it
    // is dead open a new one the way the pool would: the store is then healthy, though the
    // pool keeps its dead connection for the rest of the app.
    match ::redis::cmd("PING").query_async::<()>(&mut conn).await {
        Ok(()) => Ok(conn),
        Err(_) => pool.dedicated_connection().await,
    }
}

/// A connection a command runs on: one of the two kinds redis-rs multiplexes commands over.
#[derive(Clone)]
pub(crate) enum Conn {
    Multiplexed(MultiplexedConnection),
    #[cfg(feature = "connection-manager")]
    Manager(::redis::aio::ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(::redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a ::redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Multiplexed(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "connection-manager")]
            Conn::Manager(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a ::redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Multiplexed(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "connection-manager")]
            Conn::Manager(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Multiplexed(conn) => conn.get_db(),
            #[cfg(feature = "connection-manager")]
            Conn::Manager(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`] and the `builder_from_*` constructors.
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    target: Target,
    max_connections: u32,
    connection_timeout: Duration,
    op_timeout: Duration,
    backoff: Duration,
    max_value_bytes: usize,
}

/// The default number of connections: one. A multiplexed connection pipelines every command
/// sent on it, so one carries as many commands as the server answers; on the benchmark
/// machine (2 cores) four connections cost the server and Redis 20-60% more CPU per hit than
/// one, because each socket read and write then carries fewer commands.
const DEFAULT_CONNECTIONS: u32 = 1;

/// The default write size limit: a value this large takes a few milliseconds on a local
/// network; a 64 MiB one took longer than the whole operation timeout.
const DEFAULT_MAX_VALUE_BYTES: usize = 8 * 1024 * 1024;

impl RedisStoreBuilder {
    /// How many multiplexed connections the store opens and spreads its commands over, in
    /// turn (default 1). Each connection carries any number of concurrent commands, so this
    /// is not a limit on concurrency, and more connections cost more CPU per command (fewer
    /// commands per socket read and write). Raise it only when one connection's socket work
    /// saturates a core of a many-core server, or when a large value would hold up the
    /// commands queued behind it.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long opening a TCP connection may take (default 250 ms).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Upper bound on one store operation, connecting included (default 100 ms).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// After a connection-level failure (the server refused or dropped the connection, or
    /// connecting failed or timed out), how long operations fail at once before the server is
    /// tried again (default 500 ms; zero disables it). A single slow command is not one: it
    /// costs its own request a miss and its connection is replaced, but other requests carry
    /// on.
    ///
    /// A command whose connection broke is first retried once on a fresh connection, so a
    /// restart of Redis that is over by then costs no back-off at all. During a back-off one
    /// operation every 25 ms tries the server, and the first that gets an answer ends the
    /// back-off: the store is used again within 25 ms of Redis answering, while the others
    /// still fail at once.
    pub fn failure_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The largest value the store writes (default 8 MiB); a larger one is refused at once
    /// with [`ErrorKind::InvalidInput`] instead of holding up the commands queued behind it
    /// on the shared connection.
    pub fn max_value_bytes(mut self, limit: usize) -> Self {
        self.max_value_bytes = limit;
        self
    }

    /// Builds the store and checks that the server answers a PING within the connection
    /// timeout. Fails with [`ErrorKind::InvalidUrl`] or [`ErrorKind::Unreachable`].
    ///
    /// It also reads the server's eviction policy once and logs a warning when it does not
    /// suit a cache (see [`RedisHealth::eviction_warning`]).
    pub async fn build(self) -> Result<RedisStore> {
        let store = self.build_lazy()?;
        store.ping().await.map_err(|e| {
            Error::new(ErrorKind::Unreachable, "Redis server did not answer PING").with_source(e)
        })?;
        match store.health().await {
            Ok(health) => {
                if let Some(warning) = health.eviction_warning() {
                    tracing::warn!("{warning}");
                }
            }
            Err(e) => tracing::debug!(
                error = &e as &dyn std::error::Error,
                "could not read the Redis eviction policy"
            ),
        }
        Ok(store)
    }

    /// [`build_lazy`](Self::build_lazy) for the targets that cannot fail: an app's handle.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) fn lazy(self) -> RedisStore {
        debug_assert!(!matches!(self.target, Target::Url(_)));
        self.build_lazy()
            .unwrap_or_else(|_| unreachable!("only URLs and Sentinel addresses fail to build"))
    }

    /// Builds the store without contacting the server: an app can start while Redis is down
    /// and cache once it is up. Fails only with [`ErrorKind::InvalidUrl`].
    pub fn build_lazy(self) -> Result<RedisStore> {
        #[cfg(feature = "tls")]
        install_crypto_provider();
        let source = self.target.into_source()?;
        let max_connections = match source {
            // One handle of the app's: more slots would hold clones of the same connection
            // (a pool, too, lends its idle connection to each slot in turn).
            Source::Connection(_) => 1,
            #[cfg(feature = "connection-manager")]
            Source::Manager(_) => 1,
            #[cfg(feature = "bb8")]
            Source::Pool(_) => 1,
            // A cluster connection already holds one multiplexed connection per node.
            #[cfg(feature = "cluster")]
            Source::Cluster(_) => 1,
            _ => self.max_connections,
        };
        // The operation timeout in `with_conn` bounds every command; a second, per-response
        // timer inside redis-rs would cost a timer-wheel insert and removal per hit for nothing.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(None);
        let slots = (0..max_connections).map(|_| Slot::default()).collect();
        Ok(RedisStore {
            shared: Arc::new(Inner {
                source,
                config,
                slots,
                next: AtomicUsize::new(0),
                generation: AtomicU64::new(0),
                connection_timeout: self.connection_timeout,
                op_timeout: self.op_timeout,
                backoff: self.backoff,
                max_value_bytes: self.max_value_bytes,
                epoch: Instant::now(),
                down_until_ms: AtomicU64::new(0),
                next_probe_ms: AtomicU64::new(0),
                errors: ErrorCounters::default(),
                backoffs: AtomicU64::new(0),
                backoff_warning: WarnLimiter::default(),
            }),
        })
    }
}

/// What the builder connects to.
#[derive(Clone)]
enum Target {
    Url(String),
    Client(Client),
    Connection(MultiplexedConnection),
    #[cfg(feature = "connection-manager")]
    Manager(::redis::aio::ConnectionManager),
    #[cfg(feature = "bb8")]
    Pool(bb8::Pool<bb8_redis::RedisConnectionManager>),
    #[cfg(feature = "sentinel")]
    Sentinel {
        sentinels: Vec<String>,
        service_name: String,
        node: Option<::redis::sentinel::SentinelNodeConnectionInfo>,
    },
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
    #[cfg(feature = "cluster")]
    ClusterClient(Box<::redis::cluster::ClusterClient>),
}

impl Target {
    fn into_source(self) -> Result<Source> {
        Ok(match self {
            Target::Url(url) => Source::Client(Client::open(url.as_str()).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidUrl,
                    format!("invalid Redis URL {:?}", redact(&url)),
                )
                .with_source(e)
            })?),
            Target::Client(client) => Source::Client(client),
            Target::Connection(conn) => Source::Connection(conn),
            #[cfg(feature = "connection-manager")]
            Target::Manager(manager) => Source::Manager(manager),
            #[cfg(feature = "bb8")]
            Target::Pool(pool) => Source::Pool(pool),
            #[cfg(feature = "sentinel")]
            Target::Sentinel {
                sentinels,
                service_name,
                node,
            } => {
                let redacted: Vec<String> = sentinels.iter().map(|s| redact(s)).collect();
                let client = ::redis::sentinel::SentinelClient::build(
                    sentinels,
                    service_name,
                    node,
                    ::redis::sentinel::SentinelServerType::Master,
                )
                .map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidUrl,
                        format!("invalid Sentinel addresses {redacted:?}"),
                    )
                    .with_source(e)
                })?;
                Source::Sentinel(tokio::sync::Mutex::new(client))
            }
            #[cfg(feature = "cluster")]
            Target::Cluster(nodes) => {
                let redacted: Vec<String> = nodes.iter().map(|s| redact(s)).collect();
                let client = ::redis::cluster::ClusterClient::new(nodes).map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidUrl,
                        format!("invalid cluster node addresses {redacted:?}"),
                    )
                    .with_source(e)
                })?;
                Source::Cluster(client)
            }
            #[cfg(feature = "cluster")]
            Target::ClusterClient(client) => Source::Cluster(*client),
        })
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Url(url) => f.debug_tuple("Url").field(&redact(url)).finish(),
            Target::Client(_) => f.write_str("Client"),
            Target::Connection(_) => f.write_str("Connection"),
            #[cfg(feature = "connection-manager")]
            Target::Manager(_) => f.write_str("ConnectionManager"),
            #[cfg(feature = "bb8")]
            Target::Pool(pool) => f.debug_tuple("Pool").field(&pool.state()).finish(),
            #[cfg(feature = "sentinel")]
            Target::Sentinel {
                sentinels,
                service_name,
                ..
            } => f
                .debug_struct("Sentinel")
                .field(
                    "sentinels",
                    &sentinels.iter().map(|s| redact(s)).collect::<Vec<_>>(),
                )
                .field("service_name", service_name)
                .finish(),
            #[cfg(feature = "cluster")]
            Target::Cluster(nodes) => f
                .debug_tuple("Cluster")
                .field(&nodes.iter().map(|s| redact(s)).collect::<Vec<_>>())
                .finish(),
            #[cfg(feature = "cluster")]
            Target::ClusterClient(_) => f.write_str("ClusterClient"),
        }
    }
}

/// Makes ring rustls's process-wide crypto provider unless the app chose one. rustls picks a
/// provider by itself only when exactly one is compiled in; an app that also pulls in
/// aws-lc-rs would otherwise fail every TLS handshake.
#[cfg(feature = "tls")]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Hides a password in a URL we echo in an error message.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) with the default settings: one multiplexed
    /// connection, 250 ms connection timeout, 100 ms operation timeout, 500 ms back-off.
    /// Fails if the URL is invalid or the server does not answer.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder(url).build().await
    }

    /// A builder for the number of connections and the timeouts. `url` is
    /// `redis://[user:password@]host:port[/db]`, or `rediss://...` for TLS (feature `tls`).
    pub fn builder(url: &str) -> RedisStoreBuilder {
        Self::builder_for(Target::Url(url.to_owned()))
    }

    /// A builder for a store that opens its connections from the app's `client`, for
    /// settings a URL cannot carry (a TLS client built with `Client::build_with_tls`, a
    /// connection info assembled in code). Broken connections are replaced, as with a URL.
    pub fn builder_from_client(client: Client) -> RedisStoreBuilder {
        Self::builder_for(Target::Client(client))
    }

    /// A builder for a store that sends its commands on the app's multiplexed connection,
    /// sharing it with the rest of the app (`max_connections` is ignored).
    ///
    /// A `MultiplexedConnection` never reconnects: once Redis restarts or the connection
    /// breaks, every operation fails at once (the layer serves misses) until the app builds a
    /// new store. Prefer [`builder_from_client`](Self::builder_from_client) or a
    /// `ConnectionManager` (feature `connection-manager`) where that matters.
    pub fn builder_from_connection(conn: MultiplexedConnection) -> RedisStoreBuilder {
        Self::builder_for(Target::Connection(conn))
    }

    /// A builder for a store on the app's redis-rs `ConnectionManager`, which reconnects by
    /// itself after a failure (`max_connections` is ignored). The manager's own retry and
    /// response-timeout settings apply inside the store's operation timeout.
    #[cfg(feature = "connection-manager")]
    #[cfg_attr(docsrs, doc(cfg(feature = "connection-manager")))]
    pub fn builder_from_connection_manager(
        manager: ::redis::aio::ConnectionManager,
    ) -> RedisStoreBuilder {
        Self::builder_for(Target::Manager(manager))
    }

    /// A builder for a store on the app's bb8-redis pool, shared with the rest of the app.
    ///
    /// The pool's connections are multiplexed, so the store does not hold one per command: it
    /// checks a connection out, keeps a clone and returns it to the pool at once, then
    /// pipelines every command on that clone, exactly like the store's own connection
    /// (`max_connections` is ignored: the pool would lend its idle connection to each). It
    /// goes back to the pool only when the connection breaks, so a hit costs one round trip,
    /// not a checkout (a pool mutex and, with bb8's default `test_on_check_out`, a PING) plus
    /// the command. The pool stays free for the rest of the app; its `idle_timeout` and
    /// `max_lifetime` do not close a connection while the store still uses it.
    ///
    /// After a restart of Redis the pool's checkout test (bb8's default) evicts the dead
    /// connection and the pool connects again. bb8-redis cannot tell a broken connection
    /// otherwise (its `has_broken` is always false), so with `test_on_check_out(false)` the
    /// store PINGs what the pool lends it after a failure and, if it is dead, opens a
    /// connection of its own through the pool's manager; the pool itself then keeps lending
    /// the dead connection to the rest of the app.
    #[cfg(feature = "bb8")]
    #[cfg_attr(docsrs, doc(cfg(feature = "bb8")))]
    pub fn builder_from_pool(
        pool: bb8::Pool<bb8_redis::RedisConnectionManager>,
    ) -> RedisStoreBuilder {
        Self::builder_for(Target::Pool(pool))
    }

    /// A builder for a store that asks the Redis Sentinels at `sentinels`
    /// (`redis://host:port` each) for the master of `service_name`, and follows failovers: a
    /// connection that breaks, or that a demoted master answers with `READONLY`, is dropped,
    /// and the next one is opened to the master the sentinels name then. `node` carries the
    /// master's password, database and TLS settings, if any.
    ///
    /// During a failover operations fail (as cache misses, with the usual back-off) until the
    /// sentinels have promoted a replica.
    #[cfg(feature = "sentinel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "sentinel")))]
    pub fn builder_from_sentinel<I, S>(
        sentinels: I,
        service_name: &str,
        node: Option<::redis::sentinel::SentinelNodeConnectionInfo>,
    ) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder_for(Target::Sentinel {
            sentinels: sentinels.into_iter().map(Into::into).collect(),
            service_name: service_name.to_owned(),
            node,
        })
    }

    /// A builder for a store on a Redis Cluster, reached through any of `nodes`
    /// (`redis://host:port` each; the others are found with `CLUSTER SLOTS`).
    ///
    /// Every operation stays in one slot: an entry, its tag records and its lock are separate
    /// keys written by separate commands, each routed to its own slot's primary, so entries
    /// spread over every primary (see docs/ARCHITECTURE.md for the placement). A tag
    /// invalidation unlinks the tag's keys slot by slot; `RedisCache::delete_pattern` scans
    /// every primary.
    ///
    /// The cluster connection keeps one multiplexed connection per node, follows `MOVED` and
    /// `ASK`, and reloads the slot map when a node fails, so it heals itself after a
    /// failover: meanwhile operations on the failed primary's slots time out (cache misses)
    /// while the other primaries keep serving hits. For that reason the store's
    /// [failure back-off](RedisStoreBuilder::failure_backoff) applies only when the cluster
    /// cannot be reached at all (connecting failed), never to one node's errors, and
    /// `max_connections` is ignored.
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn builder_cluster<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder_for(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    /// [`builder_cluster`](Self::builder_cluster) on the app's redis-rs `ClusterClient`, for
    /// settings node URLs cannot carry (TLS, credentials, read-from-replicas, retries).
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn builder_from_cluster_client(
        client: ::redis::cluster::ClusterClient,
    ) -> RedisStoreBuilder {
        Self::builder_for(Target::ClusterClient(Box::new(client)))
    }

    /// Whether the store runs on a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        #[cfg(feature = "cluster")]
        {
            matches!(self.shared.source, Source::Cluster(_))
        }
        #[cfg(not(feature = "cluster"))]
        {
            false
        }
    }

    fn builder_for(target: Target) -> RedisStoreBuilder {
        RedisStoreBuilder {
            target,
            max_connections: DEFAULT_CONNECTIONS,
            connection_timeout: Duration::from_millis(250),
            op_timeout: Duration::from_millis(100),
            backoff: Duration::from_millis(500),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }

    /// Sends a PING.
    pub async fn ping(&self) -> Result<()> {
        self.query(&::redis::cmd("PING")).await
    }

    /// Probes the server: PING latency, then memory, eviction policy, evictions and keys
    /// without TTL from `INFO` (fields a server does not report are `None`). Two round trips,
    /// each within the operation timeout; for a health endpoint, not for every request.
    ///
    /// On a Cluster every primary is asked (PING and `INFO` on each, concurrently): the ping
    /// is the slowest primary's, memory, evictions and keys without a TTL are summed, and the
    /// eviction policy is the one that deserves a warning if any primary runs it
    /// (`noeviction` first), else the first primary's.
    pub async fn health(&self) -> Result<RedisHealth> {
        #[cfg(feature = "cluster")]
        if self.is_cluster() {
            return self.cluster_health().await;
        }
        let started = tokio::time::Instant::now();
        self.ping().await?;
        let ping = started.elapsed();
        let info: String = self.query(&::redis::cmd("INFO")).await?;
        Ok(parse_info(ping, &info))
    }

    /// [`health`](Self::health) on a Cluster: every primary's, combined.
    #[cfg(feature = "cluster")]
    async fn cluster_health(&self) -> Result<RedisHealth> {
        let primaries = self.primaries().await?;
        let probes = primaries.iter().map(|node| async move {
            let started = tokio::time::Instant::now();
            self.query_node::<String>(node, &::redis::cmd("PING"))
                .await?;
            let ping = started.elapsed();
            let info: String = self.query_node(node, &::redis::cmd("INFO")).await?;
            Ok::<_, Error>(parse_info(ping, &info))
        });
        let each = futures_util::future::try_join_all(probes).await?;
        Ok(combine_health(each))
    }

    /// Failed operations by kind, back-offs entered and open connections since the store was
    /// built; a few atomic loads.
    pub fn stats(&self) -> RedisStoreStats {
        let shared = &self.shared;
        RedisStoreStats {
            errors: shared.errors.snapshot(),
            backoffs: shared.backoffs.load(Ordering::Relaxed),
            open_connections: self.open_connections(),
            connections: shared.slots.len(),
        }
    }

    /// Runs one command, bounded by the operation timeout.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T> {
        self.with_conn(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs a Lua script by its SHA1 (`EVALSHA`), bounded by the operation timeout. The
    /// script's text is sent only when the server does not know it yet (`NOSCRIPT`: first use,
    /// or after a restart or `SCRIPT FLUSH`), and the call is then retried once.
    pub(crate) async fn run_script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        self.with_conn(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    /// Runs a pipeline, bounded by the operation timeout.
    ///
    /// On a cluster a pipeline may only hold commands of one slot, so there the commands go out
    /// one by one, concurrently, each to its own slot, and `T` is read from the array of every
    /// command's reply. Not atomic (neither is a pipeline).
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) async fn query_pipeline<T: FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
    ) -> Result<T> {
        #[cfg(feature = "cluster")]
        if self.is_cluster() {
            let replies = self
                .with_conn(|conn| async move {
                    let sends = pipe.cmd_iter().map(|cmd| {
                        let mut conn = conn.clone();
                        async move { cmd.query_async::<Value>(&mut conn).await }
                    });
                    futures_util::future::try_join_all(sends).await
                })
                .await?;
            return T::from_redis_value(Value::Array(replies)).map_err(|e| {
                Error::new(ErrorKind::Backend, "unexpected reply from Redis").with_source(e)
            });
        }
        self.with_conn(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// The addresses of the cluster's primaries, from `CLUSTER SLOTS` (sorted, without
    /// duplicates).
    #[cfg(feature = "cluster")]
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) async fn primaries(&self) -> Result<Vec<(String, u16)>> {
        let ranges: Vec<Vec<Value>> = self.query(::redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let mut primaries: Vec<(String, u16)> = ranges
            .iter()
            .filter_map(|range| match range.get(2)? {
                Value::Array(node) => {
                    let host = String::from_redis_value(node.first()?.clone()).ok()?;
                    let port = u16::from_redis_value(node.get(1)?.clone()).ok()?;
                    Some((host, port))
                }
                _ => None,
            })
            .collect();
        primaries.sort();
        primaries.dedup();
        Ok(primaries)
    }

    /// Runs one command on the cluster node at `node` (a `SCAN` step, which names no key),
    /// bounded by the operation timeout.
    #[cfg(feature = "cluster")]
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) async fn query_node<T: FromRedisValue>(
        &self,
        node: &(String, u16),
        cmd: &::redis::Cmd,
    ) -> Result<T> {
        use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: node.0.clone(),
            port: node.1,
        });
        let routing = &routing;
        let value = self
            .with_conn(|conn| async move {
                match conn {
                    Conn::Cluster(mut conn) => {
                        conn.route_command(cmd.clone(), routing.clone()).await
                    }
                    // Not a cluster: the only node there is.
                    mut conn => cmd.query_async::<Value>(&mut conn).await,
                }
            })
            .await?;
        T::from_redis_value(value).map_err(|e| {
            Error::new(ErrorKind::Backend, "unexpected reply from Redis").with_source(e)
        })
    }

    /// Stores `value` under `key` for `ttl` (at least 1 ms: a zero TTL still stores, briefly).
    /// The one plain write, of the [`Store`] and of `RedisCache`: a value over the size limit
    /// is refused before anything is sent.
    pub(crate) async fn write(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        self.check_size(value)?;
        self.query(
            ::redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(px(ttl)),
        )
        .await
    }

    /// Stores each `(key, value)` for `ttl` in one pipeline (on a cluster, concurrently). Every
    /// value is checked against the size limit first: one over it means nothing is written.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) async fn write_many(
        &self,
        entries: &[(String, Vec<u8>)],
        ttl: Duration,
    ) -> Result<()> {
        for (_, value) in entries {
            self.check_size(value)?;
        }
        let millis = px(ttl);
        let mut pipe = ::redis::pipe();
        for (key, value) in entries {
            pipe.cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(millis)
                .ignore();
        }
        self.query_pipeline(&pipe).await
    }

    /// Stores `value` under `key` for `ttl` (at least 1 ms) and records the key in each tag
    /// set; a value over the size limit is refused before anything is sent.
    /// On one server: one script, atomic. On a cluster, where the value and its tag sets live
    /// in different slots: first each tag record (concurrently, one script per tag set),
    /// then the value, so a tag invalidation never misses a value that was stored before it
    /// began (see docs/ARCHITECTURE.md, "Cluster").
    pub(crate) async fn write_tagged(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        tag_keys: &[String],
    ) -> Result<()> {
        self.check_size(value)?;
        let millis = px(ttl);
        #[cfg(feature = "cluster")]
        if self.is_cluster() {
            let records = tag_keys.iter().map(|tag_key| {
                let mut invocation = RECORD_TAG_SCRIPT.prepare_invoke();
                invocation.key(tag_key).arg(key).arg(millis);
                async move { self.run_script::<i64>(&invocation).await }
            });
            futures_util::future::try_join_all(records).await?;
            return self
                .query(
                    ::redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(millis),
                )
                .await;
        }
        let mut invocation = SET_TAGGED_SCRIPT.prepare_invoke();
        invocation.key(key);
        for tag_key in tag_keys {
            invocation.key(tag_key);
        }
        invocation.arg(value).arg(millis);
        let _: i64 = self.run_script(&invocation).await?;
        Ok(())
    }

    /// Runs `run` on the next connection within the operation timeout, and keeps the
    /// connections and the back-off state honest about failures.
    ///
    /// A command that fails because its connection broke (the server restarted, or dropped
    /// the connection) is run once more on a fresh connection before anything is reported:
    /// after a Redis restart, the first command of each instance would otherwise fail on the
    /// dead connection and put the store in its back-off while the server already answers.
    /// During a back-off, one operation every [`PROBE_INTERVAL`] tries the server, and the
    /// first that succeeds ends the back-off at once.
    pub(crate) async fn with_conn<T, F, Fut>(&self, run: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let shared = &*self.shared;
        let probing = shared.is_backing_off();
        if probing && !shared.take_probe() {
            shared.errors.count(ErrorKind::Unreachable);
            return Err(Error::new(
                ErrorKind::Unreachable,
                "Redis marked down after a recent failure; retrying shortly",
            ));
        }
        // A cluster connection heals itself (per-node reconnects, slot map reloads): never
        // replaced for a command's error, and one node's failure never backs off the others.
        let self_healing = self.is_cluster();
        // The app's own multiplexed connection never reconnects: a retry would meet the same
        // dead connection.
        let may_retry = !self_healing && !matches!(shared.source, Source::Connection(_));
        let index = shared.next.fetch_add(1, Ordering::Relaxed) % shared.slots.len();
        let slot = &shared.slots[index];
        let mut used = None;
        let mut connect_failed = false;
        let outcome = tokio::time::timeout(shared.op_timeout, async {
            let mut retried = false;
            loop {
                let (generation, conn, fresh) = match slot.current() {
                    Some((generation, conn)) => (generation, conn, false),
                    None => {
                        let (generation, conn) = self
                            .open_slot(index)
                            .await
                            .inspect_err(|_| connect_failed = true)?;
                        (generation, conn, true)
                    }
                };
                used = Some(generation);
                let result = run(conn).await;
                let Err(e) = &result else {
                    return result.map_err(classify);
                };
                let broken = e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error()
                    || is_read_only(e);
                if broken && !self_healing {
                    slot.discard(generation);
                }
                // Once, and only on a connection opened before this command: a fresh one
                // that breaks at once says the server is down, not that a restart is over.
                if broken && may_retry && !fresh && !retried {
                    retried = true;
                    continue;
                }
                return result.map_err(classify);
            }
        })
        .await;
        let timed_out = outcome.is_err();
        let result = outcome.unwrap_or_else(|_| {
            // A connection that stopped answering may be half-open (a peer gone without a
            // reset, a failed-over address): replace it rather than wait on it forever.
            if let (Some(generation), false) = (used, self_healing) {
                slot.discard(generation);
            }
            Err(Error::new(
                ErrorKind::Timeout,
                format!("Redis operation took longer than {:?}", shared.op_timeout),
            ))
        });
        // Back off only when the server itself is unreachable: connecting failed or timed
        // out, or the connection was refused or broke. One slow command (a large value) must
        // not fail every other request for the back-off period.
        let still_connecting = timed_out && used.is_none();
        let unreachable =
            !self_healing && matches!(&result, Err(e) if e.kind() == ErrorKind::Unreachable);
        if connect_failed || still_connecting || unreachable {
            shared.back_off(result.as_ref().err());
        } else if shared.down_until_ms.load(Ordering::Relaxed) != 0
            && result
                .as_ref()
                .err()
                .is_none_or(|e| e.kind() == ErrorKind::Backend)
        {
            // The server answered (a reply, or an error reply): the back-off is over.
            shared.down_until_ms.store(0, Ordering::Relaxed);
        }
        if let Err(e) = &result {
            shared.errors.count(e.kind());
        }
        result
    }

    /// Unlinks every key recorded in the tag set `tag_key`; returns how many were removed, and
    /// the members popped when there were at most `limit` of them.
    async fn unlink_tag(&self, tag_key: &str, limit: usize) -> Result<(u64, Option<Vec<String>>)> {
        let mut removed = 0;
        let mut listed = Some(Vec::new());
        loop {
            // Pop in batches: each step is one short command, within the op timeout.
            let popped: Vec<(Vec<u8>, f64)> = self
                .query(::redis::cmd("ZPOPMIN").arg(tag_key).arg(TAG_BATCH))
                .await?;
            if !popped.is_empty() {
                let mut unlink = ::redis::cmd("UNLINK");
                for (key, _) in &popped {
                    unlink.arg(key);
                }
                removed += self.query::<u64>(&unlink).await?;
                if let Some(keys) = &mut listed {
                    let names: Option<Vec<String>> = popped
                        .iter()
                        .map(|(k, _)| String::from_utf8(k.clone()).ok())
                        .collect();
                    match names {
                        Some(names) if keys.len() + names.len() <= limit => keys.extend(names),
                        // Too many to list, or a key that is not text: the listing would lie.
                        _ => listed = None,
                    }
                }
            }
            if popped.len() < TAG_BATCH {
                return Ok((removed, listed));
            }
        }
    }

    /// Refuses a value over the write size limit.
    fn check_size(&self, value: &[u8]) -> Result<()> {
        let limit = self.shared.max_value_bytes;
        if value.len() > limit {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "value of {} bytes is over the store's limit of {limit} bytes",
                    value.len()
                ),
            ));
        }
        Ok(())
    }

    /// Opens the connection of slot `index` unless another command already did. The connect
    /// runs in its own task: when the operation that asked for it times out first, the
    /// connection still lands in the slot for the next command.
    async fn open_slot(&self, index: usize) -> Result<(u64, Conn)> {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            let slot = &shared.slots[index];
            let _connecting = slot.connecting.lock().await;
            if let Some(current) = slot.current() {
                return Ok(current);
            }
            let conn = tokio::time::timeout(
                shared.connection_timeout,
                shared.source.open(&shared.config),
            )
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "connecting to Redis took longer than {:?}",
                        shared.connection_timeout
                    ),
                )
            })?
            .map_err(classify)?;
            let generation = shared.generation.fetch_add(1, Ordering::Relaxed);
            *slot.conn.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((generation, conn.clone()));
            Ok((generation, conn))
        });
        task.await.unwrap_or_else(|e| {
            Err(Error::new(ErrorKind::Backend, "Redis connect task failed").with_source(e))
        })
    }

    /// How many of the store's connections are open.
    fn open_connections(&self) -> usize {
        let slots = &self.shared.slots;
        slots.iter().filter(|s| s.current().is_some()).count()
    }
}

impl Inner {
    fn is_backing_off(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether this operation may try the server during a back-off: one per
    /// [`PROBE_INTERVAL`], whoever asks first.
    fn take_probe(&self) -> bool {
        let now = self.now_ms();
        let due = self.next_probe_ms.load(Ordering::Relaxed);
        now >= due
            && self
                .next_probe_ms
                .compare_exchange(
                    due,
                    now + PROBE_INTERVAL.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Fails operations fast for the back-off period; counted, and warned about at most once
    /// per few seconds (with the number of back-offs not logged meanwhile).
    fn back_off(&self, error: Option<&Error>) {
        if !self.backoff.is_zero() {
            let already = self.is_backing_off();
            let until = self
                .epoch
                .elapsed()
                .saturating_add(self.backoff)
                .as_millis();
            let until = u64::try_from(until).unwrap_or(u64::MAX);
            self.down_until_ms.store(until, Ordering::Relaxed);
            self.next_probe_ms.store(
                self.now_ms() + PROBE_INTERVAL.as_millis() as u64,
                Ordering::Relaxed,
            );
            if already {
                // A failed probe (or a command that was already under way): the same outage,
                // extended; counted and logged once.
                return;
            }
            self.backoffs.fetch_add(1, Ordering::Relaxed);
            #[cfg(feature = "metrics")]
            metrics::counter!(crate::observe::names::BACKOFFS).increment(1);
            if let Some(suppressed) = self.backoff_warning.allow() {
                tracing::warn!(
                    backoff = ?self.backoff,
                    suppressed,
                    error = error.map(|e| e as &dyn std::error::Error),
                    "Redis unreachable; cache operations fail fast during the back-off"
                );
            }
        }
    }
}

/// The fields of `INFO`'s answer a [`RedisHealth`] reports.
fn parse_info(ping: Duration, info: &str) -> RedisHealth {
    let mut health = RedisHealth {
        ping,
        used_memory: None,
        maxmemory: None,
        maxmemory_policy: None,
        evicted_keys: None,
        keys_without_ttl: None,
    };
    for line in info.lines() {
        let Some((name, value)) = line.trim_end().split_once(':') else {
            continue;
        };
        match name {
            "used_memory" => health.used_memory = value.parse().ok(),
            "maxmemory" => health.maxmemory = value.parse().ok(),
            "maxmemory_policy" => health.maxmemory_policy = Some(value.to_owned()),
            "evicted_keys" => health.evicted_keys = value.parse().ok(),
            db if db.starts_with("db") => {
                // db0:keys=3,expires=1,avg_ttl=0
                let field = |wanted: &str| {
                    value.split(',').find_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        (k == wanted).then(|| v.parse::<u64>().ok()).flatten()
                    })
                };
                if let (Some(keys), Some(expires)) = (field("keys"), field("expires")) {
                    let total = health.keys_without_ttl.unwrap_or(0);
                    health.keys_without_ttl = Some(total + keys.saturating_sub(expires));
                }
            }
            _ => {}
        }
    }
    if health.keys_without_ttl.is_none() && info.contains("# Keyspace") {
        health.keys_without_ttl = Some(0);
    }
    health
}

/// One health for a cluster from each primary's (see [`RedisStore::health`]).
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
fn combine_health(each: Vec<RedisHealth>) -> RedisHealth {
    fn sum(values: impl Iterator<Item = Option<u64>>) -> Option<u64> {
        values.fold(None, |total, v| match (total, v) {
            (None, v) => v,
            (Some(t), v) => Some(t + v.unwrap_or(0)),
        })
    }
    let policy = |h: &RedisHealth| h.maxmemory_policy.clone();
    let worst = each
        .iter()
        .find(|h| h.maxmemory_policy.as_deref() == Some("noeviction"))
        .or_else(|| {
            each.iter().find(|h| {
                h.maxmemory_policy
                    .as_deref()
                    .is_some_and(|p| p.starts_with("allkeys-"))
                    && h.keys_without_ttl.unwrap_or(0) > 0
            })
        })
        .or(each.first());
    RedisHealth {
        ping: each.iter().map(|h| h.ping).max().unwrap_or_default(),
        used_memory: sum(each.iter().map(|h| h.used_memory)),
        maxmemory: sum(each.iter().map(|h| h.maxmemory)),
        maxmemory_policy: worst.and_then(policy),
        evicted_keys: sum(each.iter().map(|h| h.evicted_keys)),
        keys_without_ttl: sum(each.iter().map(|h| h.keys_without_ttl)),
    }
}

/// A TTL as Redis's `PX` argument: at least 1 ms (Redis rejects 0), at most 2^31 s. The one
/// conversion of every write (the store's, and `RedisCache`'s through [`RedisStore::write`]).
fn px(ttl: Duration) -> u64 {
    let millis = crate::settings::clamp(ttl).as_millis();
    u64::try_from(millis).unwrap_or(u64::MAX).max(1)
}

/// A replica's answer to a write: the connection reaches a master that was demoted (a
/// Sentinel failover), so the next command should connect again.
fn is_read_only(e: &RedisError) -> bool {
    e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::ReadOnly)
}

fn classify(e: RedisError) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
        ErrorKind::Unreachable
    } else {
        ErrorKind::Backend
    };
    Error::new(kind, "Redis command failed").with_source(e)
}

/// How often, during a back-off, one operation tries the server: a server back from a
/// restart is used again within this time instead of after the whole back-off.
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// Tag-set members popped and unlinked per step of a tag invalidation.
const TAG_BATCH: usize = 1000;

/// Stores a value and records its key in each tag set, scored by its expiry on the server's
/// clock. Expired members are trimmed on each write; a tag set lives as long as its
/// longest-lived member. KEYS[1]: the value's key; KEYS[2..]: tag sets. ARGV[1]: the value;
/// ARGV[2]: TTL in ms. Run by [`RedisStore::write_tagged`], for the response layer and
/// [`RedisCache`](crate::RedisCache).
static SET_TAGGED_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SET_TAGGED));

const SET_TAGGED: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + ttl, KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
";

/// On a cluster: records a key in one tag set, as [`SET_TAGGED_SCRIPT`] does for each of its
/// tag sets. KEYS[1]: the tag set; ARGV[1]: the value's key; ARGV[2]: TTL in ms.
#[cfg(feature = "cluster")]
static RECORD_TAG_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RECORD_TAG));

#[cfg(feature = "cluster")]
const RECORD_TAG: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
";

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("source", &self.shared.source.name())
            .field("connections", &self.shared.slots.len())
            .field("open", &self.open_connections())
            .field("op_timeout", &self.shared.op_timeout)
            .finish()
    }
}

impl Store for RedisStore {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let value: Option<Vec<u8>> = self.query(::redis::cmd("GET").arg(key)).await?;
            Ok(value.map(Bytes::from))
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        if ttl.is_zero() {
            // A zero TTL means "do not keep" (Redis rejects PX 0): the key holds nothing.
            return Box::pin(async move { self.delete(key).await.map(drop) });
        }
        Box::pin(async move { self.write(key, &value, ttl).await })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed: u64 = self.query(::redis::cmd("UNLINK").arg(key)).await?;
            Ok(removed > 0)
        })
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tag_keys: &'a [String],
    ) -> StoreFuture<'a, ()> {
        if tag_keys.is_empty() || ttl.is_zero() {
            return self.set(key, value, ttl);
        }
        Box::pin(async move { self.write_tagged(key, &value, ttl, tag_keys).await })
    }

    fn get_with_ttl<'a>(
        &'a self,
        key: &'a str,
    ) -> StoreFuture<'a, Option<(Bytes, Option<Duration>)>> {
        Box::pin(async move {
            let mut pipe = ::redis::pipe();
            pipe.cmd("GET").arg(key).cmd("PTTL").arg(key);
            let (value, pttl): (Option<Vec<u8>>, i64) = self.query_pipeline(&pipe).await?;
            // PTTL: -1 without expiry (never written so by this crate), -2 gone meanwhile.
            let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
            Ok(value.map(|v| (Bytes::from(v), ttl)))
        })
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move { Ok(self.unlink_tag(tag_key, 0).await?.0) })
    }

    fn invalidate_tag_listed<'a>(
        &'a self,
        tag_key: &'a str,
        limit: usize,
    ) -> StoreFuture<'a, (u64, Option<Vec<String>>)> {
        Box::pin(self.unlink_tag(tag_key, limit))
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let millis = px(ttl);
            let taken: Option<String> = self
                .query(
                    ::redis::cmd("SET")
                        .arg(key)
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(millis),
                )
                .await?;
            Ok(taken.is_some())
        })
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        // Compare-and-delete in one step, so a lock that expired and was taken by another
        // instance is never released by its former owner.
        static RELEASE: LazyLock<Script> = LazyLock::new(|| {
            Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                 return redis.call('DEL', KEYS[1]) else return 0 end",
            )
        });
        Box::pin(async move {
            let _: i64 = self.run_script(RELEASE.key(key).arg(token)).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn px_is_at_least_one_ms_and_at_most_the_clamp() {
        assert_eq!(px(Duration::ZERO), 1);
        assert_eq!(px(Duration::from_micros(10)), 1);
        assert_eq!(px(Duration::from_secs(2)), 2000);
        assert_eq!(px(Duration::MAX), (1u64 << 31) * 1000);
    }

    fn health(policy: &str, keyspace: &str) -> RedisHealth {
        let info = format!(
            "# Memory\r\nused_memory:1024\r\nmaxmemory:0\r\nmaxmemory_policy:{policy}\r\n\
             # Stats\r\nevicted_keys:7\r\n# Keyspace\r\n{keyspace}"
        );
        parse_info(Duration::from_micros(80), &info)
    }

    #[test]
    fn info_fields_are_read() {
        let h = health(
            "allkeys-lru",
            "db0:keys=5,expires=3,avg_ttl=10\r\ndb1:keys=2,expires=2,avg_ttl=0\r\n",
        );
        assert_eq!(h.used_memory, Some(1024));
        assert_eq!(h.maxmemory, Some(0));
        assert_eq!(h.maxmemory_policy.as_deref(), Some("allkeys-lru"));
        assert_eq!(h.evicted_keys, Some(7));
        assert_eq!(h.keys_without_ttl, Some(2));
    }

    #[test]
    fn eviction_warnings() {
        let ttl_only = "db0:keys=5,expires=5,avg_ttl=10\r\n";
        let persistent = "db0:keys=5,expires=4,avg_ttl=10\r\n";
        assert!(health("noeviction", ttl_only).eviction_warning().is_some());
        assert!(health("allkeys-lru", persistent)
            .eviction_warning()
            .is_some());
        assert!(health("allkeys-lfu", ttl_only).eviction_warning().is_none());
        assert!(health("allkeys-lru", "").eviction_warning().is_none());
        assert!(health("volatile-lru", persistent)
            .eviction_warning()
            .is_none());
        assert!(health("volatile-ttl", ttl_only)
            .eviction_warning()
            .is_none());
    }
}
