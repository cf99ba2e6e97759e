//! [`RedisStore`] itself, and what every command goes through: the connection slots (opened on
//! first use, dropped when broken, opened again), the operation timeout, one retry on a fresh
//! connection, the back-off while the server is unreachable and the probe that ends it, and
//! the error counts of [`RedisStore::stats`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[cfg(feature = "cluster")]
use ::redis::Value;
use ::redis::{AsyncConnectionConfig, FromRedisValue, RedisError, ScriptInvocation};

use super::source::{Conn, Source};
use crate::observe::{ErrorCounters, StoreErrorCounts, WarnLimiter};
use crate::{Error, ErrorKind, Result};

/// A Redis-backed [`Store`](crate::store::Store) on a shared multiplexed connection.
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
///
/// [`RedisStoreBuilder::max_connections`]: crate::RedisStoreBuilder::max_connections
#[derive(Clone)]
pub struct RedisStore {
    pub(super) shared: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) source: Source,
    pub(super) config: AsyncConnectionConfig,
    pub(super) slots: Box<[Slot]>,
    /// Which slot the next command uses.
    pub(super) next: AtomicUsize,
    /// Tells a slot's connection apart from the one that replaced it.
    pub(super) generation: AtomicU64,
    pub(super) connection_timeout: Duration,
    pub(super) op_timeout: Duration,
    pub(super) backoff: Duration,
    pub(super) max_value_bytes: usize,
    pub(super) epoch: Instant,
    /// Milliseconds since `epoch` before which operations fail fast; 0 when healthy.
    pub(super) down_until_ms: AtomicU64,
    /// Milliseconds since `epoch` from which the next operation during a back-off may try
    /// the server.
    pub(super) next_probe_ms: AtomicU64,
    /// Failed operations by kind, and back-offs entered, for [`RedisStore::stats`].
    pub(super) errors: ErrorCounters,
    pub(super) backoffs: AtomicU64,
    pub(super) backoff_warning: WarnLimiter,
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

/// One of the store's connections: opened on first use, dropped when a command finds it
/// broken, opened again by the next command that picks the slot.
#[derive(Default)]
pub(super) struct Slot {
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

impl RedisStore {
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
    pub(super) fn open_connections(&self) -> usize {
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
