//! What the server says about itself: a PING's round trip and the `INFO` fields a cache
//! cares about ([`RedisHealth`]), every primary's combined on a Cluster, and the warning
//! about an eviction policy that does not suit a cache (logged once when a store is built).

use std::time::Duration;

use super::connection::RedisStore;
#[cfg(feature = "cluster")]
use crate::Error;
use crate::Result;

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

impl RedisStore {
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

#[cfg(test)]
mod tests {
    use super::*;

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
