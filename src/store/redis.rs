//! `RedisStore`: the production store, a bb8 pool of multiplexed Redis connections tuned for
//! a cache (no PING per checkout, short timeouts, broken connections replaced, fail fast while
//! the server is down).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, FromRedisValue, RedisError};
use bytes::Bytes;

use super::{Store, StoreFuture};
use crate::{Error, ErrorKind, Result};

/// Creates multiplexed connections and tells bb8 when one broke.
///
/// bb8-redis's manager cannot tell a dead connection from a live one without a PING on every
/// checkout (one extra round trip per cache lookup), so it either costs a round trip or keeps
/// handing out a dead socket after Redis restarts. This manager marks a connection broken when
/// a command on it fails with an I/O error, and bb8 then replaces it.
struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
}

/// A pooled multiplexed connection and whether a command saw it break.
pub(crate) struct PooledConn {
    pub(crate) conn: MultiplexedConnection,
    broken: bool,
}

impl bb8::ManageConnection for Manager {
    type Connection = PooledConn;
    type Error = RedisError;

    async fn connect(&self) -> Result<PooledConn, RedisError> {
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        Ok(PooledConn {
            conn,
            broken: false,
        })
    }

    async fn is_valid(&self, conn: &mut PooledConn) -> Result<(), RedisError> {
        ::redis::cmd("PING")
            .query_async::<()>(&mut conn.conn)
            .await
    }

    fn has_broken(&self, conn: &mut PooledConn) -> bool {
        conn.broken
    }
}

/// A Redis-backed [`Store`]: a bb8 pool of multiplexed connections.
///
/// Every operation is bounded by the operation timeout (default 100 ms), and after a
/// connection failure or timeout the store answers errors at once for a short back-off
/// (default 500 ms) instead of making every request wait on a dead server. The response layer
/// turns those errors into cache misses, so a Redis outage costs hit rate, not availability.
/// When the server comes back, new connections are made on demand.
///
/// Cloning is cheap; clones share the pool.
#[derive(Clone)]
pub struct RedisStore {
    shared: Arc<Shared>,
}

struct Shared {
    pool: bb8::Pool<Manager>,
    op_timeout: Duration,
    backoff: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` before which operations fail fast; 0 when healthy.
    down_until_ms: AtomicU64,
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
#[derive(Debug, Clone)]
pub struct RedisStoreBuilder {
    url: String,
    max_connections: u32,
    connection_timeout: Duration,
    op_timeout: Duration,
    backoff: Duration,
}

impl RedisStoreBuilder {
    /// Largest number of connections in the pool (default 20). Connections are multiplexed,
    /// so a handful serve thousands of concurrent requests; more spread the load over cores.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long opening a TCP connection (and waiting for a free pooled one) may take
    /// (default 250 ms; bb8's default of 30 s suits a cache badly).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// Upper bound on one store operation, checkout included (default 100 ms).
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// After a connection failure or a timeout, how long operations fail at once before the
    /// server is tried again (default 500 ms; zero disables it).
    pub fn failure_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Builds the store and checks that the server answers a PING within the connection
    /// timeout. Fails with [`ErrorKind::InvalidUrl`] or [`ErrorKind::Unreachable`].
    pub async fn build(self) -> Result<RedisStore> {
        let store = self.build_lazy()?;
        store.ping().await.map_err(|e| {
            Error::new(ErrorKind::Unreachable, "Redis server did not answer PING").with_source(e)
        })?;
        Ok(store)
    }

    /// Builds the store without contacting the server: an app can start while Redis is down
    /// and cache once it is up. Fails only with [`ErrorKind::InvalidUrl`].
    pub fn build_lazy(self) -> Result<RedisStore> {
        let client = Client::open(self.url.as_str()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidUrl,
                format!("invalid Redis URL {:?}", redact(&self.url)),
            )
            .with_source(e)
        })?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.op_timeout));
        let pool = bb8::Pool::builder()
            .max_size(self.max_connections)
            .test_on_check_out(false)
            .connection_timeout(self.connection_timeout)
            .retry_connection(false)
            .build_unchecked(Manager { client, config });
        Ok(RedisStore {
            shared: Arc::new(Shared {
                pool,
                op_timeout: self.op_timeout,
                backoff: self.backoff,
                epoch: Instant::now(),
                down_until_ms: AtomicU64::new(0),
            }),
        })
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
    /// Connects to `url` (`redis://host:port/db`) with the default settings: a pool of up to
    /// 20 multiplexed connections, 250 ms connection timeout, 100 ms operation timeout.
    /// Fails if the URL is invalid or the server does not answer.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder(url).build().await
    }

    /// A builder for the pool size and timeouts.
    pub fn builder(url: &str) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.to_owned(),
            max_connections: 20,
            connection_timeout: Duration::from_millis(250),
            op_timeout: Duration::from_millis(100),
            backoff: Duration::from_millis(500),
        }
    }

    /// Sends a PING.
    pub async fn ping(&self) -> Result<()> {
        self.query(&::redis::cmd("PING")).await
    }

    /// Runs one command through the pool, bounded by the operation timeout.
    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T> {
        self.with_conn(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Runs a pipeline through the pool, bounded by the operation timeout.
    pub(crate) async fn query_pipeline<T: FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
    ) -> Result<T> {
        self.with_conn(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    /// Checks a connection out, runs `run` on it within the operation timeout, and keeps the
    /// pool and the back-off state honest about failures.
    pub(crate) async fn with_conn<T, F, Fut>(&self, run: F) -> Result<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let shared = &*self.shared;
        if shared.is_backing_off() {
            return Err(Error::new(
                ErrorKind::Unreachable,
                "Redis marked down after a recent failure; retrying shortly",
            ));
        }
        let outcome = tokio::time::timeout(shared.op_timeout, async {
            let mut pooled = shared.pool.get().await.map_err(|e| match e {
                bb8::RunError::User(e) => classify(e),
                bb8::RunError::TimedOut => {
                    Error::new(ErrorKind::Timeout, "timed out waiting for a Redis connection")
                }
            })?;
            // A multiplexed connection is a cheap handle to one socket task: the clone lets the
            // command own its handle while `pooled` stays here to be marked broken.
            let result = run(pooled.conn.clone()).await;
            if let Err(e) = &result {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
                    pooled.broken = true;
                }
            }
            result.map_err(classify)
        })
        .await;
        let result = outcome.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("Redis operation took longer than {:?}", shared.op_timeout),
            ))
        });
        if let Err(e) = &result {
            if matches!(e.kind(), ErrorKind::Unreachable | ErrorKind::Timeout) {
                shared.back_off();
            }
        }
        result
    }
}

impl Shared {
    fn is_backing_off(&self) -> bool {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        until != 0 && (self.epoch.elapsed().as_millis() as u64) < until
    }

    fn back_off(&self) {
        if !self.backoff.is_zero() {
            let until = (self.epoch.elapsed() + self.backoff).as_millis() as u64;
            self.down_until_ms.store(until, Ordering::Relaxed);
        }
    }
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

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("state", &self.shared.pool.state())
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
        Box::pin(async move {
            // Redis rejects PX 0; a zero TTL means "do not keep".
            let millis = ttl.as_millis().max(1) as u64;
            self.query(::redis::cmd("SET").arg(key).arg(&value[..]).arg("PX").arg(millis))
                .await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed: u64 = self.query(::redis::cmd("UNLINK").arg(key)).await?;
            Ok(removed > 0)
        })
    }
}
