//! The typed client, `RedisCache`, against private redis-server processes and, with feature
//! `cluster`, a private Redis Cluster.
#![cfg(feature = "redis")]

mod common;

use std::time::Duration;

use common::backend::Backend;
use common::{Counter, RedisServer};
use serde::{Deserialize, Serialize};
use tower_redis_cache::{Error, ErrorKind, RedisCache, RedisStore};

/// A client with timeouts generous enough for a busy test machine.
async fn client(backend: &Backend) -> RedisCache {
    let store = backend
        .builder()
        .operation_timeout(Duration::from_secs(5))
        .connection_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to the test {}: {e}", backend.name()));
    RedisCache::from_store(&store)
}

/// Every case of every module below on one cluster. Not run there:
/// `get_or_insert::with_redis_down_the_closure_still_answers`, which kills its redis-server.
#[cfg(feature = "cluster")]
#[test]
fn every_case_on_a_cluster() {
    common::backend::run_on_cluster(&[
        values::CASES,
        patterns::CASES,
        tags::CASES,
        get_or_insert::CASES,
        across_instances::CASES,
    ]);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

const MINUTE: Duration = Duration::from_secs(60);

mod values {
    use super::*;

    backend_cases!(
        get_returns_what_set_stored_as_json_with_its_ttl,
        falsy_json_values_are_hits_not_misses,
        undecodable_value_is_a_codec_error_naming_the_key,
        reads_values_written_by_python_json_dumps,
        delete_and_exists,
        get_many_uses_one_mget_and_set_many_one_pipeline,
        prefix_namespaces_keys_and_patterns,
        a_zero_ttl_still_stores_briefly_instead_of_failing,
        writes_over_the_size_limit_fail_with_invalid_input_and_write_nothing,
        writes_at_the_size_limit_succeed,
        a_computed_value_over_the_size_limit_is_returned_but_not_stored,
    );

    async fn get_returns_what_set_stored_as_json_with_its_ttl(backend: &Backend) {
        let cache = client(backend).await;
        let ada = User {
            id: 1,
            name: "Ada".into(),
        };

        cache.set("user:1", &ada, MINUTE).await.unwrap();

        assert_eq!(cache.get::<User>("user:1").await.unwrap(), Some(ada));
        let raw: String = backend.cmd(&["GET", "user:1"]);
        assert_eq!(raw, r#"{"id":1,"name":"Ada"}"#);
        let pttl: i64 = backend.cmd(&["PTTL", "user:1"]);
        assert!((59_000..=60_000).contains(&pttl), "PTTL {pttl}");
        assert_eq!(cache.get::<User>("user:2").await.unwrap(), None);
    }

    async fn falsy_json_values_are_hits_not_misses(backend: &Backend) {
        let cache = client(backend).await;
        cache.set("null", &None::<u32>, MINUTE).await.unwrap();
        cache.set("false", &false, MINUTE).await.unwrap();
        cache.set("zero", &0, MINUTE).await.unwrap();
        cache.set("empty-string", "", MINUTE).await.unwrap();
        cache
            .set("empty-list", &Vec::<u32>::new(), MINUTE)
            .await
            .unwrap();

        assert_eq!(cache.get::<Option<u32>>("null").await.unwrap(), Some(None));
        assert_eq!(cache.get::<bool>("false").await.unwrap(), Some(false));
        assert_eq!(cache.get::<i64>("zero").await.unwrap(), Some(0));
        assert_eq!(
            cache.get::<String>("empty-string").await.unwrap(),
            Some(String::new())
        );
        assert_eq!(
            cache.get::<Vec<u32>>("empty-list").await.unwrap(),
            Some(vec![])
        );

        // And get_or_insert_with serves them without computing.
        let computed = Counter::default();
        let value: bool = cache
            .get_or_insert_with("false", MINUTE, || async {
                computed.bump();
                Ok::<_, Error>(true)
            })
            .await
            .unwrap();
        let list: Vec<u32> = cache
            .get_or_insert_with("empty-list", MINUTE, || async {
                computed.bump();
                Ok::<_, Error>(vec![1])
            })
            .await
            .unwrap();
        assert!(!value);
        assert!(list.is_empty());
        assert_eq!(computed.get(), 0);
    }

    async fn undecodable_value_is_a_codec_error_naming_the_key(backend: &Backend) {
        let cache = client(backend).await;
        backend.cmd::<()>(&["SET", "user:7", "not json"]);
        backend.cmd::<()>(&["SET", "user:8", r#"{"id":"eight"}"#]);

        for key in ["user:7", "user:8"] {
            let err = cache.get::<User>(key).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Codec);
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = cache
            .get_many::<User, _>(&["user:1", "user:8"])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("user:8"), "{err}");
    }

    async fn reads_values_written_by_python_json_dumps(backend: &Backend) {
        let cache = client(backend).await;
        // json.dumps({"id": 3, "name": "Zoé"}): spaces after separators, non-ASCII escaped.
        backend.cmd::<()>(&["SET", "user:3", r#"{"id": 3, "name": "Zo\u00e9"}"#]);

        let user = cache.get::<User>("user:3").await.unwrap().unwrap();
        assert_eq!(
            user,
            User {
                id: 3,
                name: "Zoé".into()
            }
        );
    }

    async fn delete_and_exists(backend: &Backend) {
        let cache = client(backend).await;
        cache.set("k", &1, MINUTE).await.unwrap();

        assert!(cache.exists("k").await.unwrap());
        assert!(cache.delete("k").await.unwrap());
        assert!(!cache.exists("k").await.unwrap());
        assert!(!cache.delete("k").await.unwrap());
        assert_eq!(backend.dbsize(), 0);
    }

    async fn get_many_uses_one_mget_and_set_many_one_pipeline(backend: &Backend) {
        let cache = client(backend).await;
        let users: Vec<(String, User)> = (1..=3)
            .map(|id| {
                (
                    format!("user:{id}"),
                    User {
                        id,
                        name: format!("u{id}"),
                    },
                )
            })
            .collect();

        cache.set_many(&users, MINUTE).await.unwrap();
        backend.reset_stats();
        let got: Vec<Option<User>> = cache
            .get_many(&["user:3", "user:9", "user:1"])
            .await
            .unwrap();

        assert_eq!(
            got,
            vec![Some(users[2].1.clone()), None, Some(users[0].1.clone())]
        );
        // On a cluster redis-rs splits a cross-slot MGET into one MGET per slot, sent
        // concurrently.
        assert_eq!(
            backend.command_calls("mget"),
            backend.slots_of(&["user:3", "user:9", "user:1"]) as u64
        );
        assert_eq!(backend.command_calls("get"), 0);
        let pttl: i64 = backend.cmd(&["PTTL", "user:2"]);
        assert!(pttl > 59_000, "PTTL {pttl}");
        assert!(cache.get_many::<User, &str>(&[]).await.unwrap().is_empty());
        cache.set_many::<&str, u32>(&[], MINUTE).await.unwrap();
    }

    async fn prefix_namespaces_keys_and_patterns(backend: &Backend) {
        let root = client(backend).await;
        let app = root.clone().key_prefix("app");
        let globby = root.clone().key_prefix("a*");
        assert_eq!(app.prefix(), "app");

        app.set("k", &1, MINUTE).await.unwrap();
        root.set("k", &2, MINUTE).await.unwrap();
        root.set("ab:k", &3, MINUTE).await.unwrap();
        globby.set("k", &4, MINUTE).await.unwrap();

        let raw: String = backend.cmd(&["GET", "app:k"]);
        assert_eq!(raw, "1");
        assert_eq!(app.get::<u32>("k").await.unwrap(), Some(1));
        assert_eq!(root.get::<u32>("k").await.unwrap(), Some(2));
        // The prefix is literal in patterns: "a*" matches neither "app:k" nor "ab:k".
        assert_eq!(globby.delete_pattern("*").await.unwrap(), 1);
        assert_eq!(app.delete_pattern("*").await.unwrap(), 1);
        assert_eq!(root.get::<u32>("k").await.unwrap(), Some(2));
        assert_eq!(root.get::<u32>("ab:k").await.unwrap(), Some(3));
    }

    async fn a_zero_ttl_still_stores_briefly_instead_of_failing(backend: &Backend) {
        let cache = client(backend).await;
        cache.set("brief", &1, Duration::ZERO).await.unwrap();
        // Stored for Redis's shortest expiry (1 ms: it refuses `PX 0`), then gone: poll for the
        // expiry with a deadline rather than sleep a fixed time.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        while cache.get::<u32>("brief").await.unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "a zero TTL kept the value"
            );
            tokio::task::yield_now().await;
        }
    }

    /// The store's write limit, small enough to test.
    const LIMIT: usize = 64;

    /// A client whose store refuses values over [`LIMIT`] bytes.
    async fn limited_client(backend: &Backend) -> RedisCache {
        let store = backend
            .builder()
            .operation_timeout(Duration::from_secs(5))
            .connection_timeout(Duration::from_secs(2))
            .max_value_bytes(LIMIT)
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to the test {}: {e}", backend.name()));
        RedisCache::from_store(&store).key_prefix("app")
    }

    /// A string whose JSON form (quoted) is `bytes` long.
    fn json_of_len(bytes: usize) -> String {
        "x".repeat(bytes - 2)
    }

    fn assert_refused(result: tower_redis_cache::Result<()>, what: &str) {
        let e = result.expect_err(what);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{what}: {e}");
        assert!(e.to_string().contains(&LIMIT.to_string()), "{what}: {e}");
    }

    async fn writes_over_the_size_limit_fail_with_invalid_input_and_write_nothing(
        backend: &Backend,
    ) {
        let cache = limited_client(backend).await;
        let over = json_of_len(LIMIT + 1);

        assert_refused(cache.set("k", &over, MINUTE).await, "set");
        assert_refused(
            cache
                .set_many(&[("small", "ok".to_owned()), ("k", over.clone())], MINUTE)
                .await,
            "set_many",
        );
        assert_refused(
            cache.set_tagged("k", &over, MINUTE, &["t"]).await,
            "set_tagged",
        );

        // Not the value, not the small entry of set_many, not the tag set.
        assert_eq!(backend.dbsize(), 0);
    }

    async fn writes_at_the_size_limit_succeed(backend: &Backend) {
        let cache = limited_client(backend).await;
        let at = json_of_len(LIMIT);

        cache.set("set", &at, MINUTE).await.unwrap();
        cache
            .set_many(&[("many:1", at.clone()), ("many:2", at.clone())], MINUTE)
            .await
            .unwrap();
        cache
            .set_tagged("tagged", &at, MINUTE, &["t"])
            .await
            .unwrap();

        for key in ["set", "many:1", "many:2", "tagged"] {
            let raw: String = backend.cmd(&["GET", &format!("app:{key}")]);
            assert_eq!(raw.len(), LIMIT, "{key}");
        }
        assert_eq!(cache.invalidate_tag("t").await.unwrap(), 1);
    }

    async fn a_computed_value_over_the_size_limit_is_returned_but_not_stored(backend: &Backend) {
        let cache = limited_client(backend).await.lock_across_instances(false);
        let over = json_of_len(LIMIT + 1);

        let value: String = cache
            .get_or_insert_with("k", MINUTE, || async { Ok::<_, Error>(over.clone()) })
            .await
            .unwrap();

        assert_eq!(value, over);
        assert_eq!(backend.dbsize(), 0);
    }
}

mod patterns {
    use super::*;

    backend_cases!(
        delete_pattern_removes_exactly_the_1k_matching_keys_among_100k,
        a_pattern_built_from_escaped_keys_stays_in_its_namespace,
        an_over_long_pattern_is_refused_before_scanning,
    );

    /// The longest pattern `delete_pattern` takes, as documented.
    const MAX_PATTERN_BYTES: usize = 1024;

    async fn an_over_long_pattern_is_refused_before_scanning(backend: &Backend) {
        let cache = client(backend).await.key_prefix("app");
        cache.set("k", &1, MINUTE).await.unwrap();
        backend.reset_stats();

        let e = cache
            .delete_pattern(&"*".repeat(MAX_PATTERN_BYTES + 1))
            .await
            .unwrap_err();

        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("1024"), "names the limit: {e}");
        assert_eq!(backend.command_calls("scan"), 0);
        assert!(cache.exists("k").await.unwrap());
        // At the limit it is sent.
        let at_limit = "*".repeat(MAX_PATTERN_BYTES);
        assert_eq!(cache.delete_pattern(&at_limit).await.unwrap(), 1);
    }

    async fn delete_pattern_removes_exactly_the_1k_matching_keys_among_100k(backend: &Backend) {
        let cache = client(backend).await;
        backend.set_raw((0..100_000).map(|i| {
            let key = if i % 100 == 0 {
                format!("session:{i}")
            } else if i % 100 == 1 {
                format!("sessions:{i}") // close, but not matching "session:*"
            } else {
                format!("other:{i}")
            };
            (key, i.to_string())
        }));
        assert_eq!(backend.dbsize(), 100_000);
        backend.reset_stats();

        let removed = cache.delete_pattern("session:*").await.unwrap();

        assert_eq!(removed, 1_000);
        assert_eq!(backend.dbsize(), 99_000);
        assert_eq!(backend.command_calls("keys"), 0);
        assert!(
            backend.command_calls("scan") > 1,
            "expected SCAN in batches"
        );
        assert!(backend.command_calls("unlink") >= 1);
        // (After the counts: this looks with SCAN too.)
        let left = backend.keys("session:*");
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    async fn a_pattern_built_from_escaped_keys_stays_in_its_namespace(backend: &Backend) {
        let cache = client(backend).await;
        let ids = ["ali*", "alice", "a", "a:b", "[ab]", "b"];
        for id in ids {
            for order in 1..=2 {
                let key = RedisCache::key(&["user", id, "orders", &order.to_string()]);
                cache.set(&key, &order, MINUTE).await.unwrap();
            }
        }

        for (id, also_matched_without_escaping) in [("ali*", "alice"), ("a", "a:b"), ("[ab]", "b")]
        {
            let pattern = format!("{}:*", RedisCache::key(&["user", id]));
            assert_eq!(cache.delete_pattern(&pattern).await.unwrap(), 2, "{id}");
            let other = RedisCache::key(&["user", also_matched_without_escaping, "orders", "1"]);
            assert!(
                cache.exists(&other).await.unwrap(),
                "{pattern} removed {other}"
            );
        }
        assert_eq!(backend.dbsize(), 6);
    }
}

mod tags {
    use super::*;

    backend_cases!(
        invalidate_tag_removes_exactly_the_tagged_keys_without_scanning,
        large_tags_are_invalidated_in_batches,
        tag_sets_trim_expired_members_and_expire_with_their_last_member,
    );

    async fn invalidate_tag_removes_exactly_the_tagged_keys_without_scanning(backend: &Backend) {
        let cache = client(backend).await.key_prefix("app");
        for id in 0..1_000u64 {
            let key = format!("user:{id}");
            let user = User {
                id,
                name: format!("u{id}"),
            };
            match id % 10 {
                0..=2 => cache.set_tagged(&key, &user, MINUTE, &["users"]).await,
                3 => cache.set_tagged(&key, &user, MINUTE, &["admins"]).await,
                4 => {
                    cache
                        .set_tagged(&key, &user, MINUTE, &["users", "admins"])
                        .await
                }
                _ => cache.set(&key, &user, MINUTE).await,
            }
            .unwrap();
        }
        backend.reset_stats();

        let removed = cache.invalidate_tag("users").await.unwrap();

        assert_eq!(removed, 400);
        for id in 0..1_000u64 {
            let tagged_users = matches!(id % 10, 0..=2 | 4);
            let exists = cache.exists(&format!("user:{id}")).await.unwrap();
            assert_eq!(exists, !tagged_users, "user:{id}");
        }
        assert_eq!(backend.command_calls("keys"), 0);
        assert_eq!(backend.command_calls("scan"), 0);
        let users_tag: bool = backend.cmd(&["EXISTS", "app:__tag:users"]);
        assert!(!users_tag, "the tag's set is removed with its keys");
        // The other tag still names its live keys (and one that is gone, which is harmless).
        assert_eq!(cache.invalidate_tag("admins").await.unwrap(), 100);
        assert_eq!(cache.invalidate_tag("users").await.unwrap(), 0);
    }

    async fn large_tags_are_invalidated_in_batches(backend: &Backend) {
        let cache = client(backend).await;
        // Written concurrently: one after the other they take seconds on a cluster (two round
        // trips each there), and only the invalidation is under test.
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..2_500 {
            let cache = cache.clone();
            writes.spawn(async move {
                cache
                    .set_tagged(&format!("k:{i}"), &i, MINUTE, &["big"])
                    .await
            });
        }
        while let Some(write) = writes.join_next().await {
            write.unwrap().unwrap();
        }
        cache.set("untagged", &0, MINUTE).await.unwrap();

        assert_eq!(cache.invalidate_tag("big").await.unwrap(), 2_500);
        assert_eq!(backend.dbsize(), 1);
    }

    async fn tag_sets_trim_expired_members_and_expire_with_their_last_member(backend: &Backend) {
        let cache = client(backend).await;
        cache
            .set_tagged("short", &1, Duration::from_millis(50), &["t"])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        cache
            .set_tagged("long", &2, Duration::from_secs(30), &["t"])
            .await
            .unwrap();

        let members: Vec<String> = backend.cmd(&["ZRANGE", "__tag:t", "0", "-1"]);
        assert_eq!(members, vec!["long".to_owned()]);
        let pttl: i64 = backend.cmd(&["PTTL", "__tag:t"]);
        assert!((29_000..=30_000).contains(&pttl), "tag set PTTL {pttl}");
        // A shorter-lived member does not shorten the set's life.
        cache
            .set_tagged("shorter", &3, Duration::from_secs(5), &["t"])
            .await
            .unwrap();
        let pttl: i64 = backend.cmd(&["PTTL", "__tag:t"]);
        assert!(pttl > 25_000, "tag set PTTL {pttl}");
        let value_pttl: i64 = backend.cmd(&["PTTL", "shorter"]);
        assert!((4_000..=5_000).contains(&value_pttl), "PTTL {value_pttl}");
    }
}

mod get_or_insert {
    use std::sync::Arc;

    use tokio::task::JoinSet;

    use super::*;

    backend_cases!(
        a_hundred_concurrent_callers_on_a_cold_key_run_the_closure_once: multi_thread(4),
        a_closure_error_is_returned_and_not_cached,
        waiting_callers_get_the_leaders_error_without_rerunning_it: multi_thread(2),
        a_dropped_leader_does_not_wedge_the_waiting_callers: multi_thread(2),
        an_undecodable_cached_value_is_recomputed_and_replaced,
    );

    async fn a_hundred_concurrent_callers_on_a_cold_key_run_the_closure_once(backend: &Backend) {
        let cache = client(backend).await;
        let computed = Counter::default();
        let key = RedisCache::function_key("load_user", &(42, "en")).unwrap();
        let start = Arc::new(tokio::sync::Barrier::new(100));

        let mut callers = JoinSet::new();
        for _ in 0..100 {
            let (cache, computed, key, start) =
                (cache.clone(), computed.clone(), key.clone(), start.clone());
            callers.spawn(async move {
                start.wait().await;
                cache
                    .get_or_insert_with(&key, MINUTE, || async move {
                        computed.bump();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, Error>(User {
                            id: 42,
                            name: "Ada".into(),
                        })
                    })
                    .await
            });
        }
        let mut results = 0;
        while let Some(result) = callers.join_next().await {
            assert_eq!(result.unwrap().unwrap().name, "Ada");
            results += 1;
        }

        assert_eq!(results, 100);
        assert_eq!(computed.get(), 1, "the closure ran more than once");
        assert!(key.starts_with("load_user:") && key.len() == "load_user:".len() + 32);
        assert_eq!(
            cache.get::<User>(&key).await.unwrap().map(|u| u.id),
            Some(42)
        );
        let pttl: i64 = backend.cmd(&["PTTL", &key]);
        assert!(pttl > 59_000, "PTTL {pttl}");
    }

    async fn a_closure_error_is_returned_and_not_cached(backend: &Backend) {
        let cache = client(backend).await;
        let computed = Counter::default();

        let failed = cache
            .get_or_insert_with("k", MINUTE, || async {
                computed.bump();
                Err::<u32, _>(Error::new(ErrorKind::Backend, "database down"))
            })
            .await
            .unwrap_err();
        assert_eq!(failed.to_string(), "database down");
        assert!(!cache.exists("k").await.unwrap());

        let value = cache
            .get_or_insert_with("k", MINUTE, || async {
                computed.bump();
                Ok::<_, Error>(7u32)
            })
            .await
            .unwrap();
        assert_eq!(value, 7);
        assert_eq!(computed.get(), 2);
        assert_eq!(cache.get::<u32>("k").await.unwrap(), Some(7));
    }

    async fn waiting_callers_get_the_leaders_error_without_rerunning_it(backend: &Backend) {
        let cache = client(backend).await;
        let computed = Counter::default();

        let start = Arc::new(tokio::sync::Barrier::new(10));
        let mut callers = JoinSet::new();
        for _ in 0..10 {
            let (cache, computed, start) = (cache.clone(), computed.clone(), start.clone());
            callers.spawn(async move {
                start.wait().await;
                cache
                    .get_or_insert_with("k", MINUTE, || async move {
                        computed.bump();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Err::<u32, _>(Error::new(ErrorKind::Backend, "database down"))
                    })
                    .await
            });
        }
        let mut kinds = Vec::new();
        while let Some(result) = callers.join_next().await {
            let err = result.unwrap().unwrap_err();
            assert!(err.to_string().contains("database down"), "{err}");
            kinds.push(err.kind());
        }

        assert_eq!(computed.get(), 1);
        assert_eq!(
            kinds.iter().filter(|k| **k == ErrorKind::Backend).count(),
            1
        );
        assert_eq!(
            kinds.iter().filter(|k| **k == ErrorKind::Compute).count(),
            9
        );
        assert!(!cache.exists("k").await.unwrap());
    }

    async fn a_dropped_leader_does_not_wedge_the_waiting_callers(backend: &Backend) {
        let cache = client(backend).await;
        let computed = Counter::default();

        let leader = {
            let (cache, computed) = (cache.clone(), computed.clone());
            tokio::spawn(async move {
                cache
                    .get_or_insert_with("k", MINUTE, || async move {
                        computed.bump();
                        std::future::pending::<Result<u32, Error>>().await
                    })
                    .await
            })
        };
        // Wait until the leader is computing.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while computed.get() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the leader never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut waiters = JoinSet::new();
        for _ in 0..5 {
            let (cache, computed) = (cache.clone(), computed.clone());
            waiters.spawn(async move {
                cache
                    .get_or_insert_with("k", MINUTE, || async move {
                        computed.bump();
                        Ok::<_, Error>(5u32)
                    })
                    .await
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(computed.get(), 1, "waiters must wait for the leader");
        leader.abort();

        let all = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(result) = waiters.join_next().await {
                assert_eq!(result.unwrap().unwrap(), 5);
            }
        });
        all.await
            .expect("waiters wedged after the leader was dropped");
        assert_eq!(computed.get(), 2, "one waiter took over");
    }

    async fn an_undecodable_cached_value_is_recomputed_and_replaced(backend: &Backend) {
        let cache = client(backend).await;
        backend.cmd::<()>(&["SET", "k", "not json"]);

        let value = cache
            .get_or_insert_with("k", MINUTE, || async { Ok::<_, Error>(vec![1u8, 2]) })
            .await
            .unwrap();

        assert_eq!(value, vec![1, 2]);
        let raw: String = backend.cmd(&["GET", "k"]);
        assert_eq!(raw, "[1,2]");
    }

    #[tokio::test]
    async fn with_redis_down_the_closure_still_answers() {
        let mut server = RedisServer::start();
        let store = RedisStore::builder(&server.url())
            .operation_timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap();
        let cache = RedisCache::from_store(&store);
        server.kill();

        let value = tokio::time::timeout(
            Duration::from_secs(5),
            cache.get_or_insert_with("k", MINUTE, || async { Ok::<_, Error>(9u32) }),
        )
        .await
        .expect("bounded by the operation timeout")
        .unwrap();

        assert_eq!(value, 9);
        assert!(
            cache.get::<u32>("k").await.is_err(),
            "plain get reports the outage"
        );
    }
}

/// `get_or_insert_with` across independent clients (separate pools, as separate processes
/// would have) sharing one Redis server.
mod across_instances {
    use std::sync::Arc;
    use std::time::Instant;

    use tokio::task::JoinSet;

    use super::*;

    backend_cases!(
        four_instances_on_a_cold_key_run_the_closure_once_in_total: multi_thread(4),
        without_the_lock_each_instance_runs_the_closure: multi_thread(4),
        a_crashed_lock_holder_delays_the_others_by_at_most_the_lock_ttl: multi_thread(2),
        a_caller_stops_waiting_after_the_wait_timeout,
        a_closure_error_releases_the_lock_at_once: multi_thread(2),
    );

    /// `instances` independent clients x `callers` concurrent callers each, all on one cold
    /// key, each closure taking 200 ms. Returns how many times the closure ran; asserts that
    /// every caller got the value.
    async fn stampede(instances: &[RedisCache], callers: usize) -> usize {
        let computed = Counter::default();
        let start = Arc::new(tokio::sync::Barrier::new(instances.len() * callers));
        let mut tasks = JoinSet::new();
        for cache in instances {
            for _ in 0..callers {
                let (cache, computed, start) = (cache.clone(), computed.clone(), start.clone());
                tasks.spawn(async move {
                    start.wait().await;
                    cache
                        .get_or_insert_with("report", MINUTE, || async move {
                            computed.bump();
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            Ok::<_, Error>(User {
                                id: 7,
                                name: "Grace".into(),
                            })
                        })
                        .await
                });
            }
        }
        let mut answered = 0;
        while let Some(result) = tasks.join_next().await {
            assert_eq!(result.unwrap().unwrap().name, "Grace");
            answered += 1;
        }
        assert_eq!(answered, instances.len() * callers);
        computed.get()
    }

    /// Waits until the lock of `key` is gone (it is released in the background once the
    /// value is stored).
    async fn wait_for_lock_release(backend: &Backend, key: &str) {
        let lock = format!("{key}:lock");
        let deadline = Instant::now() + Duration::from_secs(5);
        while backend.cmd::<bool>(&["EXISTS", &lock]) {
            assert!(Instant::now() < deadline, "{lock} was never released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn four_instances_on_a_cold_key_run_the_closure_once_in_total(backend: &Backend) {
        let mut instances = Vec::new();
        for _ in 0..4 {
            instances.push(client(backend).await.lock_across_instances(true)); // each with its own pool
        }

        let computed = stampede(&instances, 25).await;

        assert_eq!(
            computed, 1,
            "the closure ran more than once across instances"
        );
        assert_eq!(
            instances[3]
                .get::<User>("report")
                .await
                .unwrap()
                .map(|u| u.id),
            Some(7)
        );
        wait_for_lock_release(backend, "report").await;
        assert_eq!(backend.dbsize(), 1, "only the value is left");
    }

    async fn without_the_lock_each_instance_runs_the_closure(backend: &Backend) {
        let mut instances = Vec::new();
        for _ in 0..4 {
            instances.push(client(backend).await.lock_across_instances(false));
        }

        let computed = stampede(&instances, 25).await;

        // Once per instance (in-process single-flight still holds), unless an instance
        // missed only after another had stored the value.
        assert!((2..=4).contains(&computed), "ran {computed} times");
        assert_eq!(backend.command_calls("eval"), 0, "no lock taken");
    }

    async fn a_crashed_lock_holder_delays_the_others_by_at_most_the_lock_ttl(backend: &Backend) {
        // A holder that crashed: its lock stays until its TTL.
        backend.cmd::<()>(&["SET", "report:lock", "crashed-holder", "PX", "1000"]);
        let instances = [
            client(backend).await.lock_across_instances(true),
            client(backend).await.lock_across_instances(true),
        ];

        let started = Instant::now();
        let computed = stampede(&instances, 5).await;
        let waited = started.elapsed();

        assert_eq!(
            computed, 1,
            "one instance took the expired lock, the others waited"
        );
        assert!(
            waited >= Duration::from_millis(800),
            "did not wait for the lock: {waited:?}"
        );
        assert!(waited < Duration::from_secs(10), "waited {waited:?}");
        wait_for_lock_release(backend, "report").await;
    }

    async fn a_caller_stops_waiting_after_the_wait_timeout(backend: &Backend) {
        backend.cmd::<()>(&["SET", "k:lock", "stuck-holder", "PX", "60000"]);
        let cache = client(backend)
            .await
            .lock_across_instances(true)
            .lock_ttl(Duration::from_secs(5))
            .coalesce_timeout(Duration::from_millis(300));

        let started = Instant::now();
        let value = cache
            .get_or_insert_with("k", MINUTE, || async { Ok::<_, Error>(3u32) })
            .await
            .unwrap();
        let waited = started.elapsed();

        assert_eq!(value, 3);
        assert!(
            (Duration::from_millis(250)..Duration::from_secs(5)).contains(&waited),
            "waited {waited:?}"
        );
        assert_eq!(cache.get::<u32>("k").await.unwrap(), Some(3));
        let holder: String = backend.cmd(&["GET", "k:lock"]);
        assert_eq!(
            holder, "stuck-holder",
            "another holder's lock is left alone"
        );
    }

    async fn a_closure_error_releases_the_lock_at_once(backend: &Backend) {
        // A lock that would hold the second instance for a minute if it were not released.
        let first = client(backend)
            .await
            .lock_across_instances(true)
            .lock_ttl(MINUTE)
            .coalesce_timeout(Duration::from_secs(30));
        let second = client(backend)
            .await
            .lock_across_instances(true)
            .lock_ttl(MINUTE)
            .coalesce_timeout(Duration::from_secs(30));
        let computed = Counter::default();

        let failing = {
            let computed = computed.clone();
            tokio::spawn(async move {
                first
                    .get_or_insert_with("k", MINUTE, || async move {
                        computed.bump();
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Err::<u32, _>(Error::new(ErrorKind::Backend, "database down"))
                    })
                    .await
            })
        };
        // Wait until the first instance holds the lock and is computing.
        let deadline = Instant::now() + Duration::from_secs(5);
        while computed.get() == 0 {
            assert!(
                Instant::now() < deadline,
                "the first instance never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(backend.cmd::<bool>(&["EXISTS", "k:lock"]));

        let started = Instant::now();
        let value = {
            let computed = computed.clone();
            second
                .get_or_insert_with("k", MINUTE, || async move {
                    computed.bump();
                    Ok::<_, Error>(8u32)
                })
                .await
                .unwrap()
        };
        let waited = started.elapsed();

        let err = failing.await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "database down");
        assert_eq!(value, 8);
        assert_eq!(
            computed.get(),
            2,
            "the second instance computed after the error"
        );
        assert!(
            waited < Duration::from_secs(5),
            "the second instance waited {waited:?}: the lock was not released"
        );
        wait_for_lock_release(backend, "k").await;
    }
}
