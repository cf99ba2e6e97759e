//! Where the store's connections come from (a client it opens them with, or the app's
//! connection, connection manager, bb8 pool, Sentinel or Cluster client), and the connection
//! a command runs on. The rest of the store treats every source alike.

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::{AsyncConnectionConfig, Client, RedisError, RedisFuture, Value};

/// Where the store's connections come from. Whatever the source, every command gets the
/// same operation timeout and back-off, and a connection that breaks is dropped from its slot
/// and asked for again from the source.
pub(super) enum Source {
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
    ///
    /// [`RedisStore::builder_from_pool`]: crate::RedisStore::builder_from_pool
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
    pub(super) async fn open(&self, config: &AsyncConnectionConfig) -> Result<Conn, RedisError> {
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

    pub(super) fn name(&self) -> &'static str {
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
