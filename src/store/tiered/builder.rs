//! Building a [`TieredStore`]: [`TieredStoreBuilder`] and its settings (L1, copy lifetime,
//! where notifications go), and `build`, which starts the subscriber and replay tasks and
//! waits briefly for the first subscription.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::Client;

use super::bus::{replay, Bus, Journal, Queue};
use super::near::{Near, GUARD_BUCKETS};
use super::subscriber::{subscribe, Subscription};
use super::tiers::{TieredStore, Tiers};
use crate::observe::WarnLimiter;
use crate::store::memory::MemoryStore;
use crate::store::redis::RedisStore;
use crate::store::Store;
use crate::{Error, ErrorKind, Result};

/// How long an L1 copy lives at most by default, with notifications: as long as its entry,
/// up to this.
const DEFAULT_L1_MAX_TTL: Duration = Duration::from_secs(3600);

/// Without notifications nothing tells an instance of another's change: copies live 1 s.
const UNCOORDINATED_L1_TTL: Duration = Duration::from_secs(1);

/// Builds a [`TieredStore`]; see [`TieredStore::builder`].
pub struct TieredStoreBuilder<S> {
    l2: S,
    l1: Option<MemoryStore>,
    l1_ttl: Option<Duration>,
    bus: Option<(Subscription, RedisStore, String)>,
}

impl<S: Store> TieredStoreBuilder<S> {
    /// The L1 store (default: [`MemoryStore::new`], 64 MiB). Its bounds are L1's.
    pub fn l1(mut self, l1: MemoryStore) -> Self {
        self.l1 = Some(l1);
        self
    }

    /// L1's size: at most about this many bytes ([`MemoryStoreBuilder::max_bytes`]; default
    /// 64 MiB). Replaces an [`l1`](Self::l1) store set before.
    ///
    /// [`MemoryStoreBuilder::max_bytes`]: crate::store::MemoryStoreBuilder::max_bytes
    pub fn l1_max_bytes(mut self, bytes: u64) -> Self {
        self.l1 = Some(MemoryStore::builder().max_bytes(bytes).build());
        self
    }

    /// How long an L1 copy lives at most. A copy never outlives its entry in L2 (when L2 can
    /// tell its TTL, as [`RedisStore`] does). Default: 1 hour with
    /// [`invalidations`](Self::invalidations), which keep copies coherent; 1 s without, the
    /// bound on how long another instance's change goes unseen.
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_ttl = Some(ttl);
        self
    }

    /// Publishes notifications on, and subscribes to, `channel` on the Redis at `url`
    /// (usually L2's server). Every instance sharing L2 should use the same channel.
    pub fn invalidations(self, url: &str, channel: &str) -> Result<Self> {
        let client = Client::open(url).map_err(|e| {
            Error::new(ErrorKind::InvalidUrl, "invalid Redis URL for invalidations").with_source(e)
        })?;
        Ok(self.invalidations_from_client(client, channel))
    }

    /// [`invalidations`](Self::invalidations) through the app's redis-rs `client`.
    pub fn invalidations_from_client(mut self, client: Client, channel: &str) -> Self {
        let publisher = RedisStore::builder_from_client(client.clone()).lazy();
        self.bus = Some((
            Subscription::Server(Box::new(client)),
            publisher,
            channel.to_owned(),
        ));
        self
    }

    /// [`invalidations`](Self::invalidations) on a Redis Cluster reached through any of
    /// `nodes` (`redis://host:port` each; give several, or all). Notifications are
    /// published with `PUBLISH`, which a cluster delivers to subscribers on every node; each
    /// instance subscribes on one node and moves to another (given, or a primary the cluster
    /// names) when it fails, catching up from the journal.
    ///
    /// Sharded pub/sub (`SSUBSCRIBE`) is not used: redis-rs 1.8 offers it only on its cluster
    /// connection over RESP3, which resubscribes by itself without telling when, so a node
    /// could not know which gap to catch up.
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn invalidations_cluster<I, N>(mut self, nodes: I, channel: &str) -> Result<Self>
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let publisher = RedisStore::builder_cluster(nodes.clone()).build_lazy()?;
        for node in &nodes {
            Client::open(node.as_str()).map_err(|e| {
                Error::new(ErrorKind::InvalidUrl, "invalid Redis URL for invalidations")
                    .with_source(e)
            })?;
        }
        self.bus = Some((Subscription::Cluster(nodes), publisher, channel.to_owned()));
        Ok(self)
    }

    /// The store. With invalidations, it subscribes in a background task and waits up to a
    /// second for the subscription (an instance that starts while Redis is down keeps trying
    /// in the background). Must be called inside a Tokio runtime.
    pub async fn build(self) -> TieredStore<S> {
        let near = Arc::new(Near {
            l1: self.l1.unwrap_or_default(),
            origin: origin(),
            changes: AtomicU64::new(0),
            guards: (0..GUARD_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            wide: AtomicU64::new(0),
            hasher: Default::default(),
            subscribed: AtomicBool::new(false),
            received: AtomicU64::new(0),
            caught_up: AtomicU64::new(0),
            emptied: AtomicU64::new(0),
            applied: Mutex::new(None),
            refused: WarnLimiter::default(),
        });
        let default_ttl = if self.bus.is_some() {
            DEFAULT_L1_MAX_TTL
        } else {
            UNCOORDINATED_L1_TTL
        };
        let bus = match self.bus {
            None => None,
            Some((subscription, publisher, channel)) => {
                let journal = format!("{{{channel}}}:journal");
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let subscriber = tokio::spawn(subscribe(
                    subscription,
                    Journal {
                        store: publisher.clone(),
                        key: journal.clone(),
                        channel: channel.clone(),
                    },
                    near.clone(),
                    ready_tx,
                ));
                let queue = Arc::new(Mutex::new(Queue::default()));
                let queued = Arc::new(tokio::sync::Notify::new());
                let replayer = tokio::spawn(replay(
                    Journal {
                        store: publisher.clone(),
                        key: journal.clone(),
                        channel: channel.clone(),
                    },
                    queue.clone(),
                    queued.clone(),
                    near.origin,
                ));
                let _ = tokio::time::timeout(Duration::from_secs(1), ready_rx).await;
                Some(Bus {
                    publisher,
                    channel,
                    journal,
                    queue,
                    queued,
                    tasks: vec![subscriber.abort_handle(), replayer.abort_handle()],
                })
            }
        };
        TieredStore {
            shared: Arc::new(Tiers {
                near,
                l2: self.l2,
                l1_ttl: self.l1_ttl.unwrap_or(default_ttl),
                bus,
            }),
        }
    }
}

/// A random id for this instance's notifications.
fn origin() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut hasher);
    std::time::SystemTime::now().hash(&mut hasher);
    hasher.finish()
}

impl<S: Store> TieredStore<S> {
    /// A builder for a two-tier store in front of `l2`.
    pub fn builder(l2: S) -> TieredStoreBuilder<S> {
        TieredStoreBuilder {
            l2,
            l1: None,
            l1_ttl: None,
            bus: None,
        }
    }
}
