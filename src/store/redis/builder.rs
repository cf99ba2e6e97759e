//! Building a [`RedisStore`]: [`RedisStoreBuilder`] and its settings, what it connects to (a
//! URL, or the app's client, connection, connection manager, bb8 pool, Sentinel or Cluster
//! client) and the store's constructors. Everything a store is made of is fixed here, once.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client};

use super::connection::{Inner, RedisStore, Slot};
use super::source::Source;
use crate::observe::{ErrorCounters, WarnLimiter};
use crate::{Error, ErrorKind, Result};

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

    /// Builds the store (as [`build`](Self::build)) and checks that the server answers a PING
    /// within the connection timeout. Fails with [`ErrorKind::InvalidUrl`] or
    /// [`ErrorKind::Unreachable`].
    ///
    /// It also reads the server's eviction policy once and logs a warning when it does not
    /// suit a cache (see [`RedisHealth::eviction_warning`]).
    ///
    /// [`RedisHealth::eviction_warning`]: crate::RedisHealth::eviction_warning
    pub async fn connect(self) -> Result<RedisStore> {
        let store = self.build()?;
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

    /// [`build`](Self::build) for the targets that cannot fail: an app's handle.
    #[cfg_attr(not(feature = "client"), allow(dead_code))]
    pub(crate) fn lazy(self) -> RedisStore {
        debug_assert!(!matches!(self.target, Target::Url(_)));
        self.build()
            .unwrap_or_else(|_| unreachable!("only URLs and Sentinel addresses fail to build"))
    }

    /// Builds the store without contacting the server: an app can start while Redis is down
    /// and cache once it is up ([`connect`](Self::connect) waits for a PING instead). Fails
    /// only with [`ErrorKind::InvalidUrl`].
    pub fn build(self) -> Result<RedisStore> {
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
        Self::builder(url).connect().await
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
    pub fn builder_from_cluster_nodes<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::builder_for(Target::Cluster(nodes.into_iter().map(Into::into).collect()))
    }

    /// [`builder_from_cluster_nodes`](Self::builder_from_cluster_nodes) on the app's redis-rs `ClusterClient`, for
    /// settings node URLs cannot carry (TLS, credentials, read-from-replicas, retries).
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn builder_from_cluster_client(
        client: ::redis::cluster::ClusterClient,
    ) -> RedisStoreBuilder {
        Self::builder_for(Target::ClusterClient(Box::new(client)))
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
}
