//! `Invalidator`: drops stored responses by tag or by URL.

use std::sync::Arc;

use http::{Method, Uri};

use crate::key;
use crate::store::Store;
use crate::Result;

/// Drops a layer's stored responses; get one from
/// [`CacheLayer::invalidator`](crate::CacheLayer::invalidator).
///
/// ```rust
/// # async fn run() -> tower_redis_cache::Result<()> {
/// use tower_redis_cache::{CacheLayer, MemoryStore};
/// let layer = CacheLayer::new(MemoryStore::new()).tags(["products"]);
/// let invalidator = layer.invalidator();
/// // ... after a product changed:
/// invalidator.invalidate_tag("products").await?;
/// invalidator.invalidate(&"/products/42".parse().unwrap()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Invalidator {
    store: Arc<dyn Store>,
    key_prefix: String,
}

impl Invalidator {
    pub(crate) fn new(store: Arc<dyn Store>, key_prefix: String) -> Self {
        Self { store, key_prefix }
    }

    /// Removes every response stored with `tag` (from the route's
    /// [`tags`](crate::CacheLayer::tags) or the response's `Cache-Tag` / `Surrogate-Key`
    /// header); returns how many entries were removed.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        self.store
            .invalidate_tag(&tag_key(&self.key_prefix, tag))
            .await
    }

    /// Removes the stored GET response for `uri` (path and query; the query's order does not
    /// matter); returns whether there was one. For a response with `Vary`, this removes the
    /// marker that leads to its variants, so none of them is served again.
    pub async fn invalidate(&self, uri: &Uri) -> Result<bool> {
        self.store
            .delete(&key::base_key(&self.key_prefix, &Method::GET, uri))
            .await
    }
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

/// The store key of a tag's set: `{prefix}:__tag:{tag}`, where [`RedisCache`](crate::RedisCache)
/// with the same prefix keeps its tags too.
pub(crate) fn tag_key(prefix: &str, tag: &str) -> String {
    format!("{prefix}:__tag:{tag}")
}
