//! The store named by the configuration, and whether it answers (for `/readyz`).

use std::sync::Arc;

use tower_redis_cache::{MemoryStore, RedisStore, Store, TieredStore};

use crate::config::StoreConfig;

/// The store the proxy caches in, with a handle to check that it answers.
pub struct Stores {
    pub store: Arc<dyn Store>,
    health: Health,
    pub description: String,
}

enum Health {
    /// In this process: ready whenever the process is.
    Embedded,
    Redis(Arc<RedisStore>),
    Tiered(Arc<TieredStore<RedisStore>>),
}

impl Stores {
    /// Builds the store without waiting for Redis: the proxy starts (and forwards, uncached)
    /// while Redis is down, and `/readyz` says so.
    pub async fn build(config: &StoreConfig) -> tower_redis_cache::Result<Stores> {
        Ok(match config {
            StoreConfig::Memory { max_bytes } => Stores {
                store: Arc::new(MemoryStore::builder().max_bytes(*max_bytes).build()),
                health: Health::Embedded,
                description: format!("in-process memory ({} MiB)", max_bytes >> 20),
            },
            StoreConfig::Tiered {
                l2,
                l1_ttl,
                l1_max_bytes,
                invalidation_url,
                channel,
            } => {
                let l2_store = redis_store(l2)?;
                let tiered = TieredStore::builder(l2_store)
                    .l1(MemoryStore::builder().max_bytes(*l1_max_bytes).build())
                    .l1_ttl(*l1_ttl)
                    .invalidations(invalidation_url, channel)
                    .connect()
                    .await?;
                let tiered = Arc::new(tiered);
                Stores {
                    store: tiered.clone(),
                    health: Health::Tiered(tiered),
                    description: format!("two tiers: memory for {l1_ttl:?}, then {}", describe(l2)),
                }
            }
            other => {
                let redis = Arc::new(redis_store(other)?);
                Stores {
                    store: redis.clone(),
                    health: Health::Redis(redis),
                    description: describe(other),
                }
            }
        })
    }

    /// Whether the store answers now (the embedded store always does).
    pub async fn ready(&self) -> bool {
        match &self.health {
            Health::Embedded => true,
            Health::Redis(redis) => redis.ping().await.is_ok(),
            Health::Tiered(tiered) => tiered.l2().ping().await.is_ok(),
        }
    }
}

fn redis_store(config: &StoreConfig) -> tower_redis_cache::Result<RedisStore> {
    let builder = match config {
        StoreConfig::Redis { url } => RedisStore::builder(url),
        StoreConfig::Sentinel { sentinels, master } => {
            RedisStore::builder_from_sentinel(sentinels.iter().cloned(), master, None)
        }
        StoreConfig::Cluster { nodes } => {
            RedisStore::builder_from_cluster_nodes(nodes.iter().cloned())
        }
        StoreConfig::Memory { .. } | StoreConfig::Tiered { .. } => {
            unreachable!("the configuration puts only Redis stores here")
        }
    };
    builder.build()
}

fn describe(config: &StoreConfig) -> String {
    match config {
        StoreConfig::Redis { url } => format!("Redis at {}", redact(url)),
        StoreConfig::Sentinel { sentinels, master } => {
            format!("Redis Sentinel {master} via {}", sentinels.len())
        }
        StoreConfig::Cluster { nodes } => format!("Redis Cluster ({} seed nodes)", nodes.len()),
        StoreConfig::Memory { .. } => "memory".to_owned(),
        StoreConfig::Tiered { l2, .. } => describe(l2),
    }
}

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}
