//! One test body, two Redis deployments: a [`Backend`] is a private single `redis-server` or a
//! private 3-primary cluster (feature `cluster`), with what the test bodies need from either.
//!
//! A suite declares its cases once with [`backend_cases!`](crate::backend_cases): each case is
//! an `async fn(&Backend)`, run as its own test on its own single server (in parallel, as
//! before), and collected in a `CASES` table that one test per file runs in turn on one
//! cluster ([`run_on_cluster`]).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tower_redis_cache::RedisStore;
use tower_redis_cache::RedisStoreBuilder;

use super::RedisServer;

/// Where the tests' Redis lives.
pub enum Backend {
    /// One `redis-server` of the test's own.
    Single(RedisServer),
    /// A private cluster (3 primaries, 1 replica each), shared by a file's cases in turn.
    #[cfg(feature = "cluster")]
    Cluster(Box<ClusterBackend>),
}

/// A cluster and what the harness keeps to reach it.
#[cfg(feature = "cluster")]
pub struct ClusterBackend {
    cluster: super::cluster::RedisCluster,
    /// The indexes of the primaries (the suites run no failover, so they stay put).
    primaries: Vec<usize>,
    /// A synchronous cluster connection for keyed commands (routed by slot by redis-rs).
    conn: std::sync::Mutex<redis::cluster::ClusterConnection>,
}

impl Backend {
    /// Starts a single `redis-server`.
    pub fn single() -> Self {
        Self::Single(RedisServer::start())
    }

    /// Starts a cluster and waits until it serves every slot.
    #[cfg(feature = "cluster")]
    pub fn cluster() -> Self {
        let cluster = super::cluster::RedisCluster::start();
        let primaries = cluster.primaries();
        let conn = redis::cluster::ClusterClient::new(cluster.urls())
            .and_then(|client| client.get_connection())
            .expect("connect to the test cluster");
        Self::Cluster(Box::new(ClusterBackend {
            cluster,
            primaries,
            conn: std::sync::Mutex::new(conn),
        }))
    }

    /// For messages: "single Redis" or "cluster".
    pub fn name(&self) -> &'static str {
        match self {
            Self::Single(_) => "single Redis",
            #[cfg(feature = "cluster")]
            Self::Cluster(_) => "cluster",
        }
    }

    pub fn is_cluster(&self) -> bool {
        !matches!(self, Self::Single(_))
    }

    /// How many servers hold data: 1, or the cluster's primaries.
    pub fn primaries(&self) -> usize {
        match self {
            Self::Single(_) => 1,
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => c.primaries.len(),
        }
    }

    /// How many hash slots `keys` fall in (on one server, whose keyspace is one: 1, or 0 for
    /// no keys).
    pub fn slots_of(&self, keys: &[&str]) -> usize {
        match self {
            Self::Single(_) => usize::from(!keys.is_empty()),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => {
                let node = c.cluster.node(c.primaries[0]);
                let mut slots: Vec<i64> = keys
                    .iter()
                    .map(|key| node.cmd(&["CLUSTER", "KEYSLOT", key]))
                    .collect();
                slots.sort();
                slots.dedup();
                slots.len()
            }
        }
    }

    /// A store builder for this backend (`RedisStore::builder` or `builder_from_cluster_nodes`), for a
    /// suite's own timeouts.
    pub fn builder(&self) -> RedisStoreBuilder {
        match self {
            Self::Single(server) => RedisStore::builder(&server.url()),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => RedisStore::builder_from_cluster_nodes(c.cluster.urls()),
        }
    }

    /// A store with timeouts generous enough for a loaded 2-core machine (an operation that
    /// timed out would turn an expected hit into a miss).
    pub async fn store(&self) -> RedisStore {
        self.builder()
            .operation_timeout(Duration::from_secs(2))
            .connection_timeout(Duration::from_secs(2))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to the test {}: {e}", self.name()))
    }

    /// Runs one command that names its key first (`GET k`, `TTL k`, `SET k v PX 1000`): on
    /// the cluster, on the primary holding the key's slot.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        match self {
            Self::Single(server) => server.cmd(args),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => {
                let mut conn = c.conn.lock().unwrap_or_else(|e| e.into_inner());
                command(args)
                    .query(&mut *conn)
                    .unwrap_or_else(|e| panic!("cluster command {args:?}: {e}"))
            }
        }
    }

    /// Writes `key = value` for each pair, without expiry, in pipelines.
    pub fn set_raw(&self, pairs: impl IntoIterator<Item = (String, String)>) {
        let pairs: Vec<_> = pairs.into_iter().collect();
        for chunk in pairs.chunks(10_000) {
            match self {
                Self::Single(server) => {
                    let mut pipe = redis::pipe();
                    for (key, value) in chunk {
                        pipe.cmd("SET").arg(key).arg(value).ignore();
                    }
                    pipe.query::<()>(&mut server.conn())
                        .expect("pipelined SETs");
                }
                #[cfg(feature = "cluster")]
                Self::Cluster(c) => {
                    let mut pipe = redis::cluster::cluster_pipe();
                    for (key, value) in chunk {
                        pipe.cmd("SET").arg(key).arg(value).ignore();
                    }
                    let mut conn = c.conn.lock().unwrap_or_else(|e| e.into_inner());
                    pipe.query::<()>(&mut conn).expect("pipelined SETs");
                }
            }
        }
    }

    /// Runs a command that names no key (`INFO`, `CONFIG RESETSTAT`, `DBSIZE`) on every
    /// server holding data, and returns each reply.
    pub fn on_every_primary<T: redis::FromRedisValue>(&self, args: &[&str]) -> Vec<T> {
        match self {
            Self::Single(server) => vec![server.cmd(args)],
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => c
                .primaries
                .iter()
                .map(|&i| c.cluster.node(i).cmd(args))
                .collect(),
        }
    }

    /// How many keys the servers hold in all.
    pub fn dbsize(&self) -> usize {
        self.on_every_primary::<usize>(&["DBSIZE"]).iter().sum()
    }

    /// How many keys hold something other than a hit-for-miss mark (the layer's note that a
    /// key's last answer could not be stored): responses, `Vary` markers, tag sets, locks.
    pub fn dbsize_without_marks(&self) -> usize {
        let marks = self
            .keys("*")
            .iter()
            .filter(|key| self.cmd::<String>(&["TYPE", key]) == "string")
            .filter(|key| self.cmd::<Vec<u8>>(&["GET", key]) == HIT_FOR_MISS_MARK)
            .count();
        self.dbsize() - marks
    }

    /// The keys matching `pattern` on every server (with `SCAN`, so a test that counts the
    /// code's `KEYS` calls is not disturbed).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let scan = |server: &RedisServer| {
            let mut conn = server.conn();
            let mut keys = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(10_000)
                    .query(&mut conn)
                    .expect("SCAN");
                keys.extend(batch);
                if next == 0 {
                    return keys;
                }
                cursor = next;
            }
        };
        match self {
            Self::Single(server) => scan(server),
            #[cfg(feature = "cluster")]
            Self::Cluster(c) => c
                .primaries
                .iter()
                .flat_map(|&i| scan(c.cluster.node(i)))
                .collect(),
        }
    }

    /// Waits until the servers hold `n` keys in all (the layer stores in the background, so
    /// this yields to the runtime rather than blocking it).
    pub async fn wait_for_keys(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.dbsize() < n {
            assert!(
                Instant::now() < deadline,
                "expected {n} keys on the {}, have {}",
                self.name(),
                self.dbsize()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Calls of `command` (e.g. "mget", "script|load") since the last
    /// [`reset_stats`](Self::reset_stats), summed over the servers.
    pub fn command_calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.on_every_primary::<String>(&["INFO", "commandstats"])
            .iter()
            .flat_map(|info| info.lines())
            .filter_map(|line| line.strip_prefix(&prefix))
            .map(|rest| rest.split(',').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// `CONFIG RESETSTAT` on every server.
    pub fn reset_stats(&self) {
        self.on_every_primary::<()>(&["CONFIG", "RESETSTAT"]);
    }

    /// Removes every key on every server (`FLUSHALL`; replicas follow their primary).
    pub fn flush(&self) {
        self.on_every_primary::<()>(&["FLUSHALL"]);
    }
}

#[cfg(feature = "cluster")]
fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd
}

/// The stored form of a hit-for-miss mark (`entry.rs`: magic, version 1, kind 2).
pub const HIT_FOR_MISS_MARK: &[u8] = b"TRC\x01\x02";

/// One test body of a suite, for [`run_on_cluster`].
pub struct Case {
    /// `file::module::case`, as printed before the case runs.
    pub name: &'static str,
    /// 0: a current-thread runtime (as `#[tokio::test]`, which moving tokio's clock needs);
    /// otherwise a multi-thread runtime with that many workers.
    pub worker_threads: usize,
    pub run: CaseFn,
}

pub type CaseFn = for<'a> fn(&'a Backend) -> Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Starts one cluster and runs every case of `suites` on it in turn, flushing it before each.
/// Each case gets a fresh runtime of the flavour its single-Redis test has, so its spawned
/// servers and tasks end with it and tokio's clock starts afresh. Every case runs even after
/// one failed; the test then fails naming the failed cases (each one's panic is printed above
/// its name's line).
#[cfg(feature = "cluster")]
pub fn run_on_cluster(suites: &[&[Case]]) {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    let started = Instant::now();
    let backend = Backend::cluster();
    println!("cluster started in {:?}", started.elapsed());
    let mut failed = Vec::new();
    let cases: Vec<&Case> = suites.iter().flat_map(|suite| suite.iter()).collect();
    for case in &cases {
        backend.flush();
        println!("cluster case {} ...", case.name);
        let case_started = Instant::now();
        let runtime = match case.worker_threads {
            0 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(n);
                builder
            }
        }
        .enable_all()
        .build()
        .expect("a tokio runtime");
        let outcome = catch_unwind(AssertUnwindSafe(|| runtime.block_on((case.run)(&backend))));
        runtime.shutdown_timeout(Duration::from_secs(1));
        let verdict = if outcome.is_ok() { "ok" } else { "FAILED" };
        println!(
            "cluster case {} {verdict} in {:?}",
            case.name,
            case_started.elapsed()
        );
        if outcome.is_err() {
            failed.push(case.name);
        }
    }
    println!(
        "{} cases on the cluster in {:?}",
        cases.len(),
        started.elapsed()
    );
    assert!(
        failed.is_empty(),
        "{} of {} cases failed on the cluster: {failed:#?}",
        failed.len(),
        cases.len()
    );
}

/// Declares a suite's cases, each an `async fn name(backend: &Backend)` in the same module:
///
/// ```ignore
/// backend_cases!(first_case, second_case: multi_thread(4));
/// ```
///
/// gives a module `single` with one test per case, on the case's own single `redis-server`
/// (`#[tokio::test]`, or a multi-thread runtime with that many workers), and a table `CASES`
/// for [`run_on_cluster`], which each file's one cluster test runs.
#[macro_export]
macro_rules! backend_cases {
    ($($name:ident $(: multi_thread($workers:tt))?),* $(,)?) => {
        /// Each case as its own test, on its own single `redis-server`.
        mod single {
            $( $crate::backend_cases!(@single $name $($workers)?); )*
        }

        /// Every case of this module, in order, for one run on a cluster.
        #[allow(dead_code)] // used only with feature `cluster`
        pub(crate) const CASES: &[$crate::common::backend::Case] = &[
            $(
                $crate::common::backend::Case {
                    name: concat!(module_path!(), "::", stringify!($name)),
                    worker_threads: $crate::backend_cases!(@workers $($workers)?),
                    run: |backend| Box::pin($name(backend)),
                },
            )*
        ];
    };
    (@single $name:ident) => {
        #[tokio::test]
        async fn $name() {
            super::$name(&$crate::common::backend::Backend::single()).await;
        }
    };
    (@single $name:ident $workers:tt) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = $workers)]
        async fn $name() {
            super::$name(&$crate::common::backend::Backend::single()).await;
        }
    };
    (@workers) => { 0 };
    (@workers $workers:tt) => { $workers };
}
