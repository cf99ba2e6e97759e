//! `Invalidator`: drops stored responses by tag or by URL.

use std::sync::Arc;

use http::{Method, Uri};

use crate::key::{self, Keying};
use crate::store::Store;
use crate::{Error, ErrorKind, Result};

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
/// invalidator.invalidate(&"http://shop.example/products/42".parse().unwrap()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Invalidator {
    store: Arc<dyn Store>,
    key_prefix: String,
    keying: Keying,
}

impl Invalidator {
    pub(crate) fn new(store: Arc<dyn Store>, key_prefix: String, keying: Keying) -> Self {
        Self {
            store,
            key_prefix,
            keying,
        }
    }

    /// Removes every response stored with `tag` (from the route's
    /// [`tags`](crate::CacheLayer::tags) or the response's `Cache-Tag` / `Surrogate-Key`
    /// header); returns how many entries were removed.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        self.store
            .invalidate_tag(&key::tag_key(&key::layer_namespace(&self.key_prefix), tag))
            .await
    }

    /// Removes the stored GET response for `uri`; returns whether there was one. Give the
    /// absolute URL (`http://host/path?query`, query as clients send it) when the layer keys
    /// on the host (the default), a path otherwise. For a response with `Vary`, this removes
    /// the marker that leads to its variants, so none of them is served again. Entries keyed
    /// on cookies or a key function are not reached this way: tag them.
    ///
    /// Fails with [`ErrorKind::InvalidInput`] for a relative `uri` on a layer that keys on
    /// the host.
    pub async fn invalidate(&self, uri: &Uri) -> Result<bool> {
        if self.keying.host && uri.authority().is_none() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "cannot invalidate {uri}: the layer keys on the host, so give an absolute \
                     URL (or turn key_host off)"
                ),
            ));
        }
        let no_headers = http::HeaderMap::new();
        let key = (self.keying).key_with(&self.key_prefix, &Method::GET, uri, &no_headers, None);
        self.store.delete(&key).await
    }
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}
