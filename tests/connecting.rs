//! The ways of connecting a `RedisStore` / `RedisCache` to Redis as apps run it: the app's
//! bb8 pool, redis-rs client, multiplexed connection or connection manager, TLS and Sentinel.
//! Each one goes through a kill (or failover) of Redis with requests still answered.

mod common;

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{fetch, get_until_hit, serve, Counter, RedisServer};
use tower_redis_cache::{CacheLayer, ErrorKind, RedisCache, RedisStore, Store};

fn app(layer: CacheLayer) -> Router {
    let calls = Counter::default();
    Router::new()
        .route(
            "/items/{id}",
            get(move || {
                let n = calls.bump();
                async move { format!("fresh #{n}") }
            }),
        )
        .layer(layer)
}

/// Short timeouts, so a dead Redis costs little test time.
fn quick(builder: tower_redis_cache::RedisStoreBuilder) -> RedisStore {
    builder
        .operation_timeout(Duration::from_millis(100))
        .connection_timeout(Duration::from_millis(100))
        .failure_backoff(Duration::from_millis(100))
        .build()
        .unwrap()
}

/// The latency the cache may add while Redis is down (see tests/stores.rs).
const BOUND: Duration = Duration::from_millis(1500);

/// Caches through `store`, kills Redis (every request still answered, quickly, as a miss),
/// restarts it and, when `resumes`, waits for caching to resume.
async fn survives_a_restart(redis: &mut RedisServer, store: RedisStore, resumes: bool) {
    let addr = serve(app(CacheLayer::new(store))).await;
    fetch(addr, "/items/1").await;
    get_until_hit(addr, "/items/1", &[]).await;

    redis.kill();
    for i in 0..10 {
        let started = Instant::now();
        let reply = fetch(addr, &format!("/items/{}", i % 3)).await;
        assert_eq!(
            (reply.status.as_u16(), reply.x_cache()),
            (200, Some("MISS"))
        );
        assert!(
            started.elapsed() < BOUND,
            "request {i} took {:?}",
            started.elapsed()
        );
    }

    redis.restart();
    if resumes {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            fetch(addr, "/items/7").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if fetch(addr, "/items/7").await.x_cache() == Some("HIT") {
                break;
            }
            assert!(Instant::now() < deadline, "caching never resumed");
        }
    }
}

async fn round_trips(cache: &RedisCache) {
    // The first operation connects, which may take longer than the operation timeout on a
    // loaded machine (a TLS handshake in a debug build); the connection still lands.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = cache.store().ping().await {
        assert!(Instant::now() < deadline, "no connection: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cache.set("k", &42, Duration::from_secs(60)).await.unwrap();
    assert_eq!(cache.get::<i32>("k").await.unwrap(), Some(42));
    cache
        .set_tagged("t", &"tagged", Duration::from_secs(60), &["tag"])
        .await
        .unwrap();
    assert_eq!(cache.invalidate_tag("tag").await.unwrap(), 1);
}

#[tokio::test]
async fn builders_hide_passwords_and_name_bad_addresses() {
    let builder = RedisStore::builder("redis://user:secret@127.0.0.1:1");
    assert!(!format!("{builder:?}").contains("secret"), "{builder:?}");
    #[cfg(feature = "sentinel")]
    {
        let err = RedisStore::builder_from_sentinel(["not a url"], "mymaster", None)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidUrl, "{err}");
    }
}

#[cfg(feature = "bb8")]
mod bb8_pool {
    use super::*;
    use bb8_redis::RedisConnectionManager;

    async fn pool(url: &str, test_on_check_out: bool) -> bb8::Pool<RedisConnectionManager> {
        bb8::Pool::builder()
            .max_size(4)
            .test_on_check_out(test_on_check_out)
            .connection_timeout(Duration::from_millis(200))
            .build(RedisConnectionManager::new(url).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn store_and_client_share_the_apps_pool_and_survive_a_restart() {
        let mut redis = RedisServer::start();
        let pool = pool(&redis.url(), true).await;
        let cache = RedisCache::from_pool(pool.clone()).key_prefix("app");
        round_trips(&cache).await;
        let store = quick(RedisStore::builder_from_pool(pool.clone()));
        survives_a_restart(&mut redis, store, true).await;

        // The pool gave the dead connections up: the app's own commands work again, and so
        // does the client built on the pool.
        let mut conn = pool.get().await.unwrap();
        let pong: String = redis::cmd("PING").query_async(&mut *conn).await.unwrap();
        assert_eq!(pong, "PONG");
        drop(conn);
        let deadline = Instant::now() + Duration::from_secs(5);
        while cache.set("k", &1, Duration::from_secs(60)).await.is_err() {
            assert!(Instant::now() < deadline, "the client never recovered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(pool.state().connections <= 4, "{:?}", pool.state());
    }

    /// bb8-redis cannot tell a broken connection without the checkout PING; the store checks
    /// what the pool lends it after a failure, so it still recovers.
    #[tokio::test]
    async fn a_pool_without_checkout_test_still_recovers_after_a_restart() {
        let mut redis = RedisServer::start();
        let pool = pool(&redis.url(), false).await;
        let store = quick(RedisStore::builder_from_pool(pool));
        survives_a_restart(&mut redis, store, true).await;
    }
}

#[tokio::test]
async fn the_apps_client_reconnects_after_a_restart() {
    let mut redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    round_trips(&RedisCache::from_client(client.clone())).await;
    let store = quick(RedisStore::builder_from_client(client));
    survives_a_restart(&mut redis, store, true).await;
}

/// A multiplexed connection never reconnects: the store keeps answering (misses, fast) and
/// says the server is unreachable, as documented.
#[tokio::test]
async fn the_apps_multiplexed_connection_is_shared_and_fails_fast_once_broken() {
    let mut redis = RedisServer::start();
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    round_trips(&RedisCache::from_connection(conn.clone())).await;
    let store = quick(RedisStore::builder_from_connection(conn));
    survives_a_restart(&mut redis, store.clone(), false).await;
    let started = Instant::now();
    let err = store.get("k").await.unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::Unreachable | ErrorKind::Timeout),
        "{err}"
    );
    assert!(started.elapsed() < BOUND);
}

#[cfg(feature = "connection-manager")]
#[tokio::test]
async fn the_apps_connection_manager_reconnects_after_a_restart() {
    let mut redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    round_trips(&RedisCache::from_connection_manager(manager.clone())).await;
    let store = quick(RedisStore::builder_from_connection_manager(manager));
    survives_a_restart(&mut redis, store, true).await;
}

#[cfg(feature = "tls")]
mod tls {
    use super::*;
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// A CA and a server certificate for 127.0.0.1 signed by it, made with the openssl CLI.
    fn make_certs(dir: &Path) -> Option<String> {
        let run = |args: &[&str]| {
            Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ok = run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.crt"],
            &["-days", "2", "-subj", "/CN=tower-redis-cache test CA"],
        ]
        .concat())
            && run(&[
                &["req"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
                &["-subj", "/CN=localhost"],
            ]
            .concat())
            && run(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ]);
        (!ok).then(|| "the openssl CLI is missing or could not make the test certificates".into())
    }

    #[tokio::test]
    async fn rediss_verifies_the_server_and_survives_a_restart() {
        let tls_port = common::free_port().to_string();
        let started = RedisServer::try_start_with(
            &[
                "--tls-port",
                &tls_port,
                "--tls-cert-file",
                "{dir}/server.crt",
                "--tls-key-file",
                "{dir}/server.key",
                "--tls-ca-cert-file",
                "{dir}/ca.crt",
                "--tls-auth-clients",
                "no",
            ],
            make_certs,
        );
        let mut redis = match started {
            Ok(redis) => redis,
            Err(reason) => {
                eprintln!("SKIPPED: no TLS-enabled redis-server to test against: {reason}");
                return;
            }
        };
        let url = format!("rediss://127.0.0.1:{tls_port}");

        // The system's roots do not know the test CA: the certificate is checked.
        let err = RedisStore::connect(&url).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unreachable, "{err}");

        let ca = std::fs::read(redis.dir().join("ca.crt")).unwrap();
        let client = redis::Client::build_with_tls(
            url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        )
        .unwrap();
        round_trips(&RedisCache::from_client(client.clone())).await;
        let store = quick(RedisStore::builder_from_client(client));
        store.ping().await.unwrap();
        survives_a_restart(&mut redis, store, true).await;
    }
}

#[cfg(feature = "sentinel")]
#[tokio::test]
async fn sentinel_store_follows_a_failover() {
    let mut master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let master_port = master.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &master_port]);
    let sentinel = RedisServer::start_sentinel(master.port(), 200);

    // Wait for the replica to sync and for the sentinel to know it: events, not sleeps.
    wait_for("the replica to sync", Duration::from_secs(10), || {
        let info: String = replica.cmd(&["INFO", "replication"]);
        info.contains("master_link_status:up")
    })
    .await;
    wait_for(
        "the sentinel to see the replica",
        Duration::from_secs(10),
        || {
            let replicas: Vec<redis::Value> = sentinel.cmd(&["SENTINEL", "REPLICAS", "mymaster"]);
            !replicas.is_empty()
        },
    )
    .await;

    let store = RedisStore::builder_from_sentinel(
        [format!("redis://127.0.0.1:{}", sentinel.port())],
        "mymaster",
        None,
    )
    .operation_timeout(Duration::from_millis(200))
    .failure_backoff(Duration::from_millis(100))
    .connect()
    .await
    .unwrap();
    store
        .set(
            "before",
            bytes::Bytes::from_static(b"1"),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(
        master.cmd::<Option<String>>(&["GET", "before"]).as_deref(),
        Some("1")
    );
    let addr = serve(app(CacheLayer::new(store.clone()))).await;
    get_until_hit(addr, "/items/1", &[]).await;
    // Replication is asynchronous: a failover loses what the replica had not received yet.
    let keys = master.dbsize();
    wait_for(
        "the replica to have the writes",
        Duration::from_secs(5),
        || replica.dbsize() == keys,
    )
    .await;

    let failover_started = Instant::now();
    master.kill();
    let new_master = replica.port().to_string();
    // Requests keep being answered while the sentinel fails over.
    let mut requests = 0;
    loop {
        let reply = fetch(addr, "/items/2").await;
        assert_eq!(reply.status, 200);
        requests += 1;
        let addr_by_name: Option<(String, String)> =
            sentinel.cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"]);
        if addr_by_name.is_some_and(|(_, port)| port == new_master) {
            break;
        }
        assert!(
            failover_started.elapsed() < Duration::from_secs(15),
            "no failover within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "failover after {:?}, {requests} requests answered meanwhile",
        failover_started.elapsed()
    );

    // The store writes to the promoted replica.
    let deadline = Instant::now() + Duration::from_secs(5);
    while store
        .set(
            "after",
            bytes::Bytes::from_static(b"2"),
            Duration::from_secs(60),
        )
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the store never reached the new master"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        replica.cmd::<Option<String>>(&["GET", "after"]).as_deref(),
        Some("2")
    );
    assert_eq!(
        store.get("before").await.unwrap(),
        Some(bytes::Bytes::from_static(b"1")),
        "replicated before the failover; the new master holds {:?}",
        replica.cmd::<Vec<String>>(&["KEYS", "*"]),
    );
    get_until_hit(addr, "/items/3", &[]).await;
}

#[cfg(feature = "sentinel")]
async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
