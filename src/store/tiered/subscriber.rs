//! The subscriber task: subscribes to the notification channel (on one server, or on one
//! node of a Cluster after another), catches up from the journal after each (re)subscription,
//! and hands every notification to L1.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ::redis::Client;
use futures_util::StreamExt;

use super::bus::{lock, Journal};
use super::near::Near;
use super::notice::split_version;
use crate::store::redis::RedisStore;

/// Waits between attempts to (re)subscribe: the first, then doubling up to the last.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(50);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(1);

/// Where the subscriber subscribes.
pub(super) enum Subscription {
    /// One server (standalone, or what the app's client names).
    Server(Box<Client>),
    /// A cluster: any node, the given ones first, then the primaries the cluster names.
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
}

/// The subscriber task: subscribes, catches up from the journal, applies each notification
/// to L1, and subscribes again after the connection is lost.
pub(super) async fn subscribe(
    subscription: Subscription,
    journal: Journal,
    near: Arc<Near>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut wait = RESUBSCRIBE_FIRST;
    let mut first = true;
    let mut next_node = 0usize;
    let channel = journal.channel.clone();
    loop {
        let Some(client) = subscription.client(&journal.store, next_node).await else {
            next_node += 1;
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(RESUBSCRIBE_MAX);
            continue;
        };
        let connected = tokio::time::timeout(Duration::from_secs(1), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                let mut messages = pubsub.into_on_message();
                // Subscribed first, then the journal: whatever the catch-up misses arrives
                // on the channel (buffered meanwhile).
                let caught_up =
                    tokio::time::timeout(Duration::from_secs(2), near.catch_up(&journal, first))
                        .await;
                if !matches!(caught_up, Ok(Ok(()))) {
                    tracing::warn!(
                        channel,
                        "could not read the invalidation journal after subscribing; emptying L1"
                    );
                    near.clear();
                    *lock(&near.applied) = None;
                }
                first = false;
                wait = RESUBSCRIBE_FIRST;
                near.subscribed.store(true, Ordering::SeqCst);
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                while let Some(message) = messages.next().await {
                    let (version, notice) = split_version(message.get_payload_bytes());
                    near.receive(version, notice);
                }
                near.subscribed.store(false, Ordering::SeqCst);
                tracing::warn!(
                    channel,
                    "lost the invalidation subscription; subscribing again, then catching up \
                     from the journal"
                );
                next_node += 1;
            }
            Ok(Err(e)) => {
                next_node += 1;
                tracing::debug!(
                    channel,
                    error = &e as &dyn std::error::Error,
                    "could not subscribe to invalidations"
                )
            }
            Err(_) => {
                next_node += 1;
                tracing::debug!(channel, "subscribing to invalidations timed out")
            }
        }
        if let Some(ready) = ready.take() {
            // The first attempt failed: let `build` return, keep trying in the background.
            let _ = ready.send(());
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RESUBSCRIBE_MAX);
    }
}

impl Subscription {
    /// The client to subscribe with on attempt `n`.
    async fn client(&self, store: &RedisStore, n: usize) -> Option<Client> {
        let _ = (store, n);
        match self {
            Subscription::Server(client) => Some((**client).clone()),
            #[cfg(feature = "cluster")]
            Subscription::Cluster(nodes) => {
                // The given nodes, then the primaries the cluster names now (a failed-over
                // replica's address, for one).
                let mut candidates = nodes.clone();
                if n >= nodes.len() {
                    if let Ok(primaries) = store.primaries().await {
                        candidates.extend(
                            primaries
                                .into_iter()
                                .map(|(host, port)| format!("redis://{host}:{port}")),
                        );
                    }
                }
                let url = candidates.get(n % candidates.len().max(1))?;
                Client::open(url.as_str()).ok()
            }
        }
    }
}
