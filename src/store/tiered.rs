//! `TieredStore`: an in-process L1 (a [`MemoryStore`]) in front of any store (L2), kept
//! coherent across instances by invalidations published on a Redis pub/sub channel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::Client;
use bytes::Bytes;
use futures_util::StreamExt;

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::{check_pattern, Memo, Store, StoreFuture, MAX_PATTERN_BYTES};
use crate::observe::WarnLimiter;
use crate::{Error, ErrorKind, Result};

/// The tag every L1 copy read through from L2 carries: its real tags are unknown here (they
/// live in L2's tag sets), so every tag invalidation drops these copies too.
const READ_THROUGH: &str = "\0tiered:read-through";

/// How long an L1 copy lives by default.
const DEFAULT_L1_TTL: Duration = Duration::from_secs(1);

/// Waits between attempts to (re)subscribe: the first, then doubling up to the last.
const RESUBSCRIBE_FIRST: Duration = Duration::from_millis(50);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(2);

/// A two-tier [`Store`]: reads are served from an in-process [`MemoryStore`] (L1) when it
/// holds a copy, otherwise from the L2 store (for example a [`RedisStore`]), and the copy is
/// kept in L1 for a short time (default 1 s, see [`TieredStoreBuilder::l1_ttl`]). Writes go
/// to L2, then to L1.
///
/// With [`invalidations`](TieredStoreBuilder::invalidations), every delete and tag
/// invalidation (and [`invalidate_pattern`](TieredStore::invalidate_pattern)) is published
/// on a Redis channel, and every instance subscribed to it drops its L1 copies: an
/// invalidation on one instance reaches the others within a network round trip. What a user
/// can rely on:
///
/// - An L1 copy is never older than the L1 TTL plus the time its invalidation takes to
///   arrive; a write that replaces an entry (not an invalidation) is not published, so other
///   instances may serve their previous copy for up to the L1 TTL.
/// - A copy read from L2 while an invalidation arrives is not kept in L1.
/// - While the subscription is lost (Redis down or unreachable), L1 copies still expire by
///   the L1 TTL; the store subscribes again with a growing back-off (50 ms to 2 s) and, once
///   subscribed, empties L1, since invalidations sent meanwhile were missed.
/// - Locks are L2's.
/// - A delete or tag invalidation whose publish fails returns that error, after L2 and this
///   instance's L1 were updated: other instances may then keep their copies up to the L1 TTL.
///
/// A tag invalidation drops the L1 copies recorded under the tag and every copy read through
/// from L2 (whose tags L1 does not know); entries this instance wrote with other tags stay.
///
/// Cloning is cheap; clones share both tiers and the subscription.
#[cfg_attr(docsrs, doc(cfg(feature = "tiered")))]
pub struct TieredStore<S = RedisStore> {
    shared: Arc<Tiers<S>>,
}

impl<S> Clone for TieredStore<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Tiers<S> {
    near: Arc<Near>,
    l2: S,
    l1_ttl: Duration,
    bus: Option<Bus>,
}

/// L1 and what the subscriber task shares with the store.
struct Near {
    l1: MemoryStore,
    /// Bumped by every invalidation applied here: an L2 read during which it moved may have
    /// read a value invalidated meanwhile, and is not copied into L1.
    epoch: AtomicU64,
    subscribed: AtomicBool,
    received: AtomicU64,
    /// Over-long patterns received are ignored with a warning, at most one per few seconds.
    refused: WarnLimiter,
}

/// The invalidation channel: published through a store (timeouts, back-off), received by a
/// task of this store's own.
struct Bus {
    publisher: RedisStore,
    channel: String,
    subscriber: tokio::task::AbortHandle,
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// Builds a [`TieredStore`]; see [`TieredStore::builder`].
pub struct TieredStoreBuilder<S> {
    l2: S,
    l1: Option<MemoryStore>,
    l1_ttl: Duration,
    bus: Option<(Client, String)>,
}

impl<S: Store> TieredStoreBuilder<S> {
    /// The L1 store (default: [`MemoryStore::new`], 64 MiB). Its bounds are L1's.
    pub fn l1(mut self, l1: MemoryStore) -> Self {
        self.l1 = Some(l1);
        self
    }

    /// How long an L1 copy lives at most (default 1 s): the bound on staleness when an
    /// invalidation is lost, or an entry is replaced on another instance.
    pub fn l1_ttl(mut self, ttl: Duration) -> Self {
        self.l1_ttl = ttl;
        self
    }

    /// Publishes invalidations on, and subscribes to, `channel` on the Redis at `url`
    /// (usually L2's server). Every instance sharing L2 should use the same channel.
    pub fn invalidations(self, url: &str, channel: &str) -> Result<Self> {
        let client = Client::open(url).map_err(|e| {
            Error::new(ErrorKind::InvalidUrl, "invalid Redis URL for invalidations").with_source(e)
        })?;
        Ok(self.invalidations_from_client(client, channel))
    }

    /// [`invalidations`](Self::invalidations) through the app's redis-rs `client`.
    pub fn invalidations_from_client(mut self, client: Client, channel: &str) -> Self {
        self.bus = Some((client, channel.to_owned()));
        self
    }

    /// The store. With invalidations, it subscribes in a background task and waits up to a
    /// second for the subscription (an instance that starts while Redis is down keeps trying
    /// in the background). Must be called inside a Tokio runtime.
    pub async fn build(self) -> TieredStore<S> {
        let near = Arc::new(Near {
            l1: self.l1.unwrap_or_default(),
            epoch: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            received: AtomicU64::new(0),
            refused: WarnLimiter::default(),
        });
        let bus = match self.bus {
            None => None,
            Some((client, channel)) => {
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                let task = tokio::spawn(subscribe(
                    client.clone(),
                    channel.clone(),
                    near.clone(),
                    ready_tx,
                ));
                let _ = tokio::time::timeout(Duration::from_secs(1), ready_rx).await;
                Some(Bus {
                    publisher: RedisStore::builder_from_client(client).lazy(),
                    channel,
                    subscriber: task.abort_handle(),
                })
            }
        };
        TieredStore {
            shared: Arc::new(Tiers {
                near,
                l2: self.l2,
                l1_ttl: self.l1_ttl,
                bus,
            }),
        }
    }
}

impl<S: Store> TieredStore<S> {
    /// A builder for a two-tier store in front of `l2`.
    pub fn builder(l2: S) -> TieredStoreBuilder<S> {
        TieredStoreBuilder {
            l2,
            l1: None,
            l1_ttl: DEFAULT_L1_TTL,
            bus: None,
        }
    }

    /// The L1 store (for inspection and health checks).
    pub fn l1(&self) -> &MemoryStore {
        &self.shared.near.l1
    }

    /// The L2 store.
    pub fn l2(&self) -> &S {
        &self.shared.l2
    }

    /// Whether the invalidation subscription is up (false without invalidations).
    pub fn is_subscribed(&self) -> bool {
        self.shared.near.subscribed.load(Ordering::SeqCst)
    }

    /// How many invalidations this instance received on the channel (its own included).
    pub fn invalidations_received(&self) -> u64 {
        self.shared.near.received.load(Ordering::Relaxed)
    }

    /// Drops the L1 copies whose keys match the glob `pattern` (Redis `SCAN MATCH` syntax:
    /// `*`, `?`, `[...]`, `\` escapes) on every instance. L2 is left alone: delete the keys
    /// there first (for example with `RedisCache::delete_pattern` on the L2 store), then call
    /// this.
    ///
    /// Fails with [`ErrorKind::InvalidInput`] for a pattern over 1024 bytes (matching costs
    /// pattern length x key length per L1 key), and otherwise only when the invalidation
    /// could not be published. Instances ignore (and log) over-long patterns they receive.
    pub async fn invalidate_pattern(&self, pattern: &str) -> Result<()> {
        check_pattern(pattern)?;
        let message = Invalidation::Pattern(pattern);
        self.shared.near.apply(&message).await;
        self.publish(&message).await
    }

    async fn publish(&self, message: &Invalidation<'_>) -> Result<()> {
        let Some(bus) = &self.shared.bus else {
            return Ok(());
        };
        let result = bus
            .publisher
            .query::<u64>(
                ::redis::cmd("PUBLISH")
                    .arg(&bus.channel)
                    .arg(message.encode()),
            )
            .await;
        if let Err(e) = &result {
            tracing::warn!(
                error = e as &dyn std::error::Error,
                "could not publish an invalidation; other instances keep their L1 copies \
                 until the L1 TTL"
            );
        }
        result.map(drop)
    }

    fn l1_ttl(&self, ttl: Duration) -> Duration {
        ttl.min(self.shared.l1_ttl)
    }
}

/// What an instance tells the others to drop from L1.
enum Invalidation<'a> {
    Key(&'a str),
    Tag(&'a str),
    Pattern(&'a str),
}

impl<'a> Invalidation<'a> {
    fn encode(&self) -> Vec<u8> {
        let (kind, text) = match self {
            Invalidation::Key(key) => (b'k', key),
            Invalidation::Tag(tag) => (b't', tag),
            Invalidation::Pattern(pattern) => (b'p', pattern),
        };
        let mut message = Vec::with_capacity(text.len() + 1);
        message.push(kind);
        message.extend_from_slice(text.as_bytes());
        message
    }

    fn decode(message: &'a [u8]) -> Option<Self> {
        let (kind, text) = message.split_first()?;
        let text = std::str::from_utf8(text).ok()?;
        match kind {
            b'k' => Some(Invalidation::Key(text)),
            b't' => Some(Invalidation::Tag(text)),
            b'p' => Some(Invalidation::Pattern(text)),
            _ => None,
        }
    }
}

impl Near {
    async fn apply(&self, message: &Invalidation<'_>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        // MemoryStore's operations never fail.
        match message {
            Invalidation::Key(key) => {
                let _ = self.l1.delete(key).await;
            }
            Invalidation::Tag(tag) => {
                let _ = self.l1.invalidate_tag(tag).await;
                let _ = self.l1.invalidate_tag(READ_THROUGH).await;
            }
            Invalidation::Pattern(pattern) => {
                self.l1
                    .remove_matching(|key| glob_match(pattern.as_bytes(), key.as_bytes()));
            }
        }
    }

    /// Applies an invalidation received on the channel. Anything that can publish there may
    /// send it, so a pattern over the bound is ignored (with a warning) rather than matched
    /// against every L1 key; this crate's own instances never send one.
    async fn receive(&self, payload: &[u8]) {
        self.received.fetch_add(1, Ordering::Relaxed);
        match Invalidation::decode(payload) {
            Some(Invalidation::Pattern(pattern)) if pattern.len() > MAX_PATTERN_BYTES => {
                if let Some(suppressed) = self.refused.allow() {
                    tracing::warn!(
                        bytes = pattern.len(),
                        limit = MAX_PATTERN_BYTES,
                        suppressed,
                        "ignoring an over-long pattern invalidation from the channel"
                    );
                }
            }
            Some(invalidation) => self.apply(&invalidation).await,
            None => {}
        }
    }

    /// Empties L1 (after a gap in the subscription, which may have missed invalidations).
    fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.l1.clear();
    }
}

/// The subscriber task: subscribes, applies each invalidation to L1, and subscribes again
/// after the connection is lost.
async fn subscribe(
    client: Client,
    channel: String,
    near: Arc<Near>,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut wait = RESUBSCRIBE_FIRST;
    loop {
        let connected = tokio::time::timeout(Duration::from_secs(1), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, ::redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                wait = RESUBSCRIBE_FIRST;
                near.clear();
                near.subscribed.store(true, Ordering::SeqCst);
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    near.receive(message.get_payload_bytes()).await;
                }
                near.subscribed.store(false, Ordering::SeqCst);
                tracing::warn!(
                    channel,
                    "lost the invalidation subscription; L1 copies live until their TTL; \
                     subscribing again"
                );
            }
            Ok(Err(e)) => tracing::debug!(
                channel,
                error = &e as &dyn std::error::Error,
                "could not subscribe to invalidations"
            ),
            Err(_) => tracing::debug!(channel, "subscribing to invalidations timed out"),
        }
        if let Some(ready) = ready.take() {
            // The first attempt failed: let `build` return, keep trying in the background.
            let _ = ready.send(());
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RESUBSCRIBE_MAX);
    }
}

/// Redis's glob (`SCAN MATCH`, `KEYS`): `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\` escapes, with
/// Redis's reading of odd classes (a class left open ends with the pattern; `[a-]` is a range
/// up to `]`).
///
/// Iterative, in O(pattern x text) steps: Redis's own matcher recursed per `*` and was
/// exponential on patterns like `a*a*a*b` (CVE-2022-36021), and this one runs on every L1 key
/// for patterns any instance publishes. Every token but `*` matches exactly one byte, so only
/// the latest `*` needs to be retried at a later position: whatever an earlier `*` could
/// absorb, the latest one can too.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // The pattern position just after the latest `*`, and the text position it is tried at.
    let mut retry: Option<(usize, usize)> = None;
    while t < text.len() {
        if pattern.get(p) == Some(&b'*') {
            p += 1;
            retry = Some((p, t));
        } else if let Some(next) = match_one(pattern, p, text[t]) {
            p = next;
            t += 1;
        } else if let Some((after_star, at)) = retry {
            // The `*` absorbs one more byte, and the rest is tried from there.
            p = after_star;
            t = at + 1;
            retry = Some((after_star, t));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether the one-byte token at `pattern[p]` (anything but `*`) matches `c`: the position
/// after the token if it does, `None` if not or at the end of the pattern.
fn match_one(pattern: &[u8], p: usize, c: u8) -> Option<usize> {
    match *pattern.get(p)? {
        b'?' => Some(p + 1),
        b'[' => {
            let mut i = p + 1;
            let negated = pattern.get(i) == Some(&b'^');
            if negated {
                i += 1;
            }
            let mut matched = false;
            loop {
                match pattern[i..] {
                    // An open class ends with the pattern, as in Redis.
                    [] => break,
                    [b'\\', x, ..] => {
                        matched |= x == c;
                        i += 2;
                    }
                    [b']', ..] => {
                        i += 1;
                        break;
                    }
                    [lo, b'-', hi, ..] => {
                        matched |= (lo.min(hi)..=lo.max(hi)).contains(&c);
                        i += 3;
                    }
                    [x, ..] => {
                        matched |= x == c;
                        i += 1;
                    }
                }
            }
            (matched != negated).then_some(i)
        }
        b'\\' if p + 1 < pattern.len() => (pattern[p + 1] == c).then_some(p + 2),
        x => (x == c).then_some(p + 1),
    }
}

impl<S> std::fmt::Debug for TieredStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &*self.shared;
        f.debug_struct("TieredStore")
            .field("l1", &shared.near.l1)
            .field("l1_ttl", &shared.l1_ttl)
            .field("channel", &shared.bus.as_ref().map(|b| &b.channel))
            .field(
                "subscribed",
                &shared.near.subscribed.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl<S: Store> Store for TieredStore<S> {
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Bytes>> {
        let near = &self.shared.near;
        if let Some(value) = near.l1.peek(key) {
            return Box::pin(std::future::ready(Ok(Some(value))));
        }
        Box::pin(async move {
            let epoch = near.epoch.load(Ordering::SeqCst);
            let value = self.shared.l2.get(key).await?;
            if let Some(value) = &value {
                if near.epoch.load(Ordering::SeqCst) == epoch {
                    let tags = [READ_THROUGH.to_owned()];
                    let ttl = self.shared.l1_ttl;
                    let _ = near.l1.set_tagged(key, value.clone(), ttl, &tags).await;
                }
            }
            Ok(value)
        })
    }

    /// An L1 hit comes with L1's memo slot, so the layer serves it from the decoded form.
    fn get_memoized<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<(Bytes, Option<Memo>)>> {
        if let Some(l1_hit) = self.get_in_process(key) {
            return Box::pin(std::future::ready(Ok(l1_hit)));
        }
        let get = self.get(key);
        Box::pin(async move { Ok(get.await?.map(|value| (value, None))) })
    }

    /// An L1 hit; an L1 miss needs L2.
    fn get_in_process(&self, key: &str) -> Option<Option<(Bytes, Option<Memo>)>> {
        let (value, memo) = self.shared.near.l1.peek_memoized(key)?;
        Some(Some((value, Some(memo))))
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.shared.l2.set(key, value.clone(), ttl).await?;
            self.shared.near.l1.set(key, value, self.l1_ttl(ttl)).await
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let removed = self.shared.l2.delete(key).await;
            let message = Invalidation::Key(key);
            self.shared.near.apply(&message).await;
            let published = self.publish(&message).await;
            let removed = removed?;
            published.map(|()| removed)
        })
    }

    fn set_tagged<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
        tag_keys: &'a [String],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.shared
                .l2
                .set_tagged(key, value.clone(), ttl, tag_keys)
                .await?;
            let l1_ttl = self.l1_ttl(ttl);
            self.shared
                .near
                .l1
                .set_tagged(key, value, l1_ttl, tag_keys)
                .await
        })
    }

    fn invalidate_tag<'a>(&'a self, tag_key: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            let removed = self.shared.l2.invalidate_tag(tag_key).await;
            let message = Invalidation::Tag(tag_key);
            self.shared.near.apply(&message).await;
            let published = self.publish(&message).await;
            let removed = removed?;
            published.map(|()| removed)
        })
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool> {
        self.shared.l2.try_lock(key, token, ttl)
    }

    fn unlock<'a>(&'a self, key: &'a str, token: &'a str) -> StoreFuture<'a, ()> {
        self.shared.l2.unlock(key, token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_redis() {
        let cases: &[(&str, &str, bool)] = &[
            ("*", "", true),
            ("a*", "abc", true),
            ("a*c", "abxc", true),
            ("a*c", "abxd", false),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h[a-b]llo", "hcllo", false),
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("user:1:*", "user:1:posts", true),
            ("user:1:*", "user:10:posts", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                *expected,
                "{pattern} ~ {text}"
            );
        }
    }

    /// The corners, each answered as redis-server 7.0's `KEYS` answers it (and a run of 1.2
    /// million random patterns and keys against it agreed on every one).
    #[test]
    fn glob_reads_odd_patterns_as_redis_does() {
        let cases: &[(&str, &str, bool)] = &[
            // A class left open ends with the pattern.
            ("h[ae", "ha", true),
            ("h[ae", "hx", false),
            ("a[", "a", false),
            ("a[^", "ab", true),
            // `-` before the closing bracket makes a range up to `]`; ranges may run backwards.
            ("[a-]", "]", true),
            ("[a-]", "b", false),
            ("[z-a]", "m", true),
            ("[\\]]", "]", true),
            ("[]", "]", false),
            ("[^]", "x", true),
            // A trailing backslash is itself.
            ("a\\", "a\\", true),
            // Stars, retried at later positions.
            ("a*b*c", "axbxxc", true),
            ("a*b*c", "axbxxcx", false),
            ("*a*", "bab", true),
            ("a*a*b", "aaaab", true),
            ("a*a*b", "aaaa", false),
            ("**", "x", true),
            ("?*?", "ab", true),
            ("?*?", "a", false),
        ];
        for (pattern, text, expected) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                *expected,
                "{pattern} ~ {text}"
            );
        }
    }

    #[test]
    fn invalidations_round_trip() {
        for message in [
            Invalidation::Key("a:b"),
            Invalidation::Tag("p:__tag:x"),
            Invalidation::Pattern("p:*"),
        ] {
            let encoded = message.encode();
            let decoded = Invalidation::decode(&encoded).unwrap();
            assert_eq!(decoded.encode(), encoded);
        }
        assert!(Invalidation::decode(b"").is_none());
        assert!(Invalidation::decode(b"zkey").is_none());
    }
}
