//! `Invalidator`: drops stored responses by tag or by URL.

use std::sync::Arc;

use http::Uri;

use crate::cache::state::KnownHosts;
use crate::cache::write::drop_url;
use crate::key::{self, Keying};
use crate::store::Store;
use crate::Result;

/// Drops a layer's stored responses; get one from
/// [`CacheLayer::invalidator`](crate::CacheLayer::invalidator).
///
/// ```rust
/// # async fn run() -> tower_redis_cache::Result<()> {
/// use tower_redis_cache::{CacheLayer, MemoryStore};
/// let layer = CacheLayer::new(MemoryStore::new()).tags(["products"]);
/// let invalidator = layer.invalidator().hosts(["shop.example"]);
/// // ... after a product changed:
/// invalidator.invalidate_tag("products").await?;
/// invalidator.invalidate(&"http://shop.example/products/42".parse().unwrap()).await?;
/// invalidator.invalidate(&"/products/43".parse().unwrap()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Invalidator {
    store: Arc<dyn Store>,
    key_prefix: String,
    keying: Keying,
    /// The hosts the layer stored responses for, in this process.
    known_hosts: Arc<KnownHosts>,
    /// Hosts given with [`hosts`](Self::hosts).
    hosts: Vec<String>,
}

impl Invalidator {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        key_prefix: String,
        keying: Keying,
        known_hosts: Arc<KnownHosts>,
    ) -> Self {
        Self {
            store,
            key_prefix,
            keying,
            known_hosts,
            hosts: Vec::new(),
        }
    }

    /// Hosts (`host` or `host:port`, as clients name them) on which a relative URL given to
    /// [`invalidate`](Self::invalidate) is dropped, besides those the layer has stored
    /// responses for in this process. Give every host your app answers on when several
    /// instances share the store: an instance only knows the hosts it served itself.
    pub fn hosts<T: AsRef<str>>(mut self, hosts: impl IntoIterator<Item = T>) -> Self {
        self.hosts = (hosts.into_iter())
            .map(|h| h.as_ref().trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        self
    }

    /// Removes every response stored with `tag` (from the route's
    /// [`tags`](crate::CacheLayer::tags) or the response's `Cache-Tag` / `Surrogate-Key`
    /// header); returns how many entries were removed.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        self.store
            .invalidate_tag(&key::tag_key(&key::layer_namespace(&self.key_prefix), tag))
            .await
    }

    /// Removes every stored GET response for `uri` (query as clients send it); returns
    /// whether there was one. That is every entry of the URL, whoever stored it: its `Vary`
    /// variants, and the entries keyed on cookies
    /// ([`key_on_cookies`](crate::CacheLayer::key_on_cookies)), a
    /// [`key_fn`](crate::CacheLayer::key_fn) or forwarded host and scheme information.
    ///
    /// When the layer keys on the host (the default), an absolute URL
    /// (`http://host/path?query`) names one host's entries; a relative one (`/path?query`) is
    /// dropped on every host the layer stored responses for in this process (up to 1,024),
    /// on the hosts given with [`hosts`](Self::hosts), and for requests that named no host.
    pub async fn invalidate(&self, uri: &Uri) -> Result<bool> {
        let prefix = &self.key_prefix;
        if !self.keying.host || uri.authority().is_some() {
            let url_key = (self.keying).url_key(prefix, uri, &http::HeaderMap::new());
            return drop_url(&*self.store, prefix, &url_key).await;
        }
        let (mut hosts, overflowed) = self.known_hosts.snapshot();
        if overflowed {
            tracing::warn!(
                %uri,
                limit = KnownHosts::LIMIT,
                "invalidating a relative URL on the hosts recorded so far; more hosts were \
                 served than are recorded: name them with Invalidator::hosts"
            );
        }
        hosts.extend(self.hosts.iter().cloned());
        hosts.sort_unstable();
        hosts.dedup();
        let mut dropped = drop_url(
            &*self.store,
            prefix,
            &self.keying.url_key_on(prefix, uri, None),
        )
        .await?;
        for host in &hosts {
            let url_key = self.keying.url_key_on(prefix, uri, Some(host));
            dropped |= drop_url(&*self.store, prefix, &url_key).await?;
        }
        Ok(dropped)
    }
}

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator")
            .field("key_prefix", &self.key_prefix)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}
