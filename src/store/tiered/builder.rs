//! Building a [`TieredStore`]: [`TieredStoreBuilder`] and its settings (L1, copy lifetime,
//! where notifications go); `build`, which starts the subscriber and replay tasks, and
//! `connect`, which also waits briefly for the first subscription.

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
    bus: Option<(BusTarget, String)>,
}

/// Where notifications go, as the builder was told; resolved (and checked) by `build`.
enum BusTarget {
    Url(String),
    Client(Box<Client>),
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
}

fn invalid_url(e: ::redis::RedisError) -> Error {
    Error::new(ErrorKind::InvalidUrl, "invalid Redis URL for invalidations").with_source(e)
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
    /// [`MemoryStoreBuilder::max_bytes`]: crate::MemoryStoreBuilder::max_bytes
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
    /// (usually L2's server). Every instance sharing L2 should use the same channel. An
    /// invalid `url` makes [`build`](Self::build) fail with [`ErrorKind::InvalidUrl`].
    pub fn invalidations(mut self, url: &str, channel: &str) -> Self {
        self.bus = Some((BusTarget::Url(url.to_owned()), channel.to_owned()));
        self
    }

    /// [`invalidations`](Self::invalidations) through the app's redis-rs `client`.
    pub fn invalidations_from_client(mut self, client: Client, channel: &str) -> Self {
        self.bus = Some((BusTarget::Client(Box::new(client)), channel.to_owned()));
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
    pub fn invalidations_cluster<I, N>(mut self, nodes: I, channel: &str) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        let nodes = nodes.into_iter().map(Into::into).collect();
        self.bus = Some((BusTarget::Cluster(nodes), channel.to_owned()));
        self
    }

    /// The store, without waiting for anything: with invalidations, it subscribes in a
    /// background task (and keeps trying while Redis is down). Must be called inside a Tokio
    /// runtime (else [`ErrorKind::InvalidInput`]); an invalid invalidations URL fails with
    /// [`ErrorKind::InvalidUrl`].
    pub fn build(self) -> Result<TieredStore<S>> {
        Ok(self.start()?.0)
    }

    /// [`build`](Self::build), then waits up to a second for the subscription, so that the
    /// store sees other instances' changes from its first request (an instance that starts
    /// while Redis is down keeps trying in the background: this does not fail for that).
    pub async fn connect(self) -> Result<TieredStore<S>> {
        let (store, ready) = self.start()?;
        if let Some(ready) = ready {
            let _ = tokio::time::timeout(Duration::from_secs(1), ready).await;
        }
        Ok(store)
    }

    /// Builds the store and starts its tasks; with invalidations, also the receiver that
    /// fires once subscribed.
    #[allow(clippy::type_complexity)]
    fn start(self) -> Result<(TieredStore<S>, Option<tokio::sync::oneshot::Receiver<()>>)> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::new(
                ErrorKind::InvalidInput,
                "TieredStore's builder must run inside a Tokio runtime (it starts tasks)",
            )
        })?;
        let bus = match self.bus {
            None => None,
            Some((BusTarget::Url(url), channel)) => {
                let client = Client::open(url.as_str()).map_err(invalid_url)?;
                let publisher = RedisStore::builder_from_client(client.clone()).lazy();
                Some((Subscription::Server(Box::new(client)), publisher, channel))
            }
            Some((BusTarget::Client(client), channel)) => {
                let publisher = RedisStore::builder_from_client((*client).clone()).lazy();
                Some((Subscription::Server(client), publisher, channel))
            }
            #[cfg(feature = "cluster")]
            Some((BusTarget::Cluster(nodes), channel)) => {
                let publisher = RedisStore::builder_from_cluster_nodes(nodes.clone()).build()?;
                for node in &nodes {
                    Client::open(node.as_str()).map_err(invalid_url)?;
                }
                Some((Subscription::Cluster(nodes), publisher, channel))
            }
        };
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
        let default_ttl = if bus.is_some() {
            DEFAULT_L1_MAX_TTL
        } else {
            UNCOORDINATED_L1_TTL
        };
        let mut ready = None;
        let bus = match bus {
            None => None,
            Some((subscription, publisher, channel)) => {
                let journal = format!("{{{channel}}}:journal");
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                ready = Some(ready_rx);
                let subscriber = runtime.spawn(subscribe(
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
                let replayer = runtime.spawn(replay(
                    Journal {
                        store: publisher.clone(),
                        key: journal.clone(),
                        channel: channel.clone(),
                    },
                    queue.clone(),
                    queued.clone(),
                    near.origin,
                ));
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
        let store = TieredStore {
            shared: Arc::new(Tiers {
                near,
                l2: self.l2,
                l1_ttl: self.l1_ttl.unwrap_or(default_ttl),
                bus,
            }),
        };
        Ok((store, ready))
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
