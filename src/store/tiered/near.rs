//! L1 and what the subscriber task shares with the store ([`Near`]): the guards that keep a
//! read-through from copying into L1 a value older than a change applied here, applying a
//! notification to L1, and catching up from the journal after a gap.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::bus::{lock, Journal, JournalEntry};
use super::glob::glob_match;
use super::notice::{parse_version, Notice, Version};
use crate::observe::WarnLimiter;
use crate::store::memory::MemoryStore;
use crate::store::MAX_PATTERN_BYTES;
use crate::Result;

/// The tag an L1 copy read through from L2 carries: its real tags are unknown here (they
/// live in L2's tag sets). A tag invalidation whose keys L2 could not list drops these
/// copies too.
pub(super) const READ_THROUGH: &str = "\0tiered:read-through";

/// Per-key guards against a read-through copying a value that changed during the read.
pub(super) const GUARD_BUCKETS: usize = 4096;

/// L1 and what the subscriber task shares with the store.
pub(super) struct Near {
    pub(super) l1: MemoryStore,
    /// This instance's id in its notifications, so it skips its own.
    pub(super) origin: u64,
    /// Counts changes applied to L1 here. A read-through notes it before reading L2 and
    /// copies the value into L1 only if no change of its key (its guard bucket) or no wide
    /// change (tag, pattern, emptied L1) was applied since.
    pub(super) changes: AtomicU64,
    pub(super) guards: Box<[AtomicU64]>,
    pub(super) wide: AtomicU64,
    pub(super) hasher: std::collections::hash_map::RandomState,
    pub(super) subscribed: AtomicBool,
    pub(super) received: AtomicU64,
    pub(super) caught_up: AtomicU64,
    pub(super) emptied: AtomicU64,
    /// The version of the last notification applied from the channel or the journal.
    pub(super) applied: Mutex<Option<Version>>,
    /// Over-long patterns received are ignored with a warning, at most one per few seconds.
    pub(super) refused: WarnLimiter,
}

impl Near {
    fn guard(&self, key: &str) -> &AtomicU64 {
        let bucket = self.hasher.hash_one(key) as usize % self.guards.len();
        &self.guards[bucket]
    }

    /// Marks `key` changed: a read-through of it under way does not keep its value.
    pub(super) fn mark(&self, key: &str) {
        let change = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        self.guard(key).fetch_max(change, Ordering::SeqCst);
    }

    fn mark_wide(&self) {
        let change = self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        self.wide.fetch_max(change, Ordering::SeqCst);
    }

    /// Whether no change of `key` was applied since `since` (a value of `changes`).
    pub(super) fn unchanged(&self, key: &str, since: u64) -> bool {
        self.guard(key).load(Ordering::SeqCst) <= since && self.wide.load(Ordering::SeqCst) <= since
    }

    /// Drops the copies `notice` names. MemoryStore's operations never fail, and complete
    /// without waiting: the futures are polled once.
    pub(super) fn apply(&self, notice: &Notice<'_>) {
        match notice {
            Notice::Set(key) | Notice::Key(key) => {
                self.mark(key);
                self.l1.remove_matching_key(key);
            }
            Notice::Tag(tag, keys) => {
                match keys {
                    Some(keys) => {
                        for key in keys {
                            self.mark(key);
                            self.l1.remove_matching_key(key);
                        }
                    }
                    None => {
                        self.mark_wide();
                        self.l1.invalidate_tag_now(READ_THROUGH);
                    }
                }
                self.mark_wide();
                self.l1.invalidate_tag_now(tag);
            }
            Notice::Pattern(pattern) => {
                self.mark_wide();
                self.l1
                    .remove_matching(|key| glob_match(pattern.as_bytes(), key.as_bytes()));
            }
            Notice::Clear => self.clear(),
        }
    }

    /// Applies a notification received on the channel or read from the journal. Anything
    /// that can publish there may send it, so a pattern over the bound is ignored (with a
    /// warning) rather than matched against every L1 key; this crate's own instances never
    /// send one. This instance's own notifications were applied when it sent them.
    pub(super) fn receive(&self, version: Option<Version>, message: &[u8]) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Some(version) = version {
            let mut applied = lock(&self.applied);
            if applied.is_some_and(|applied| version <= applied) {
                // Read from the journal during a catch-up already.
                return;
            }
            *applied = Some(version);
        }
        match Notice::decode(message) {
            Some((_, Some(origin))) if origin == self.origin => {}
            Some((Notice::Pattern(pattern), _)) if pattern.len() > MAX_PATTERN_BYTES => {
                if let Some(suppressed) = self.refused.allow() {
                    tracing::warn!(
                        bytes = pattern.len(),
                        limit = MAX_PATTERN_BYTES,
                        suppressed,
                        "ignoring an over-long pattern invalidation from the channel"
                    );
                }
            }
            Some((notice, _)) => self.apply(&notice),
            None => {}
        }
    }

    /// Empties L1 (after a gap in the subscription the journal cannot account for).
    pub(super) fn clear(&self) {
        self.mark_wide();
        self.l1.clear();
        self.emptied.fetch_add(1, Ordering::Relaxed);
    }

    /// After (re)subscribing: applies what the journal holds since the last notification
    /// applied here, or empties L1 when it cannot tell.
    pub(super) async fn catch_up(&self, journal: &Journal, first: bool) -> Result<()> {
        let applied = *lock(&self.applied);
        let Some(mut after) = applied else {
            // Nothing applied yet: start from the journal's newest entry. Before the first
            // subscription L1 holds only this instance's own writes; after a failed
            // catch-up, anything.
            if !first {
                self.clear();
            }
            let newest = journal.newest().await?.unwrap_or((0, 0));
            let mut applied = lock(&self.applied);
            if applied.is_none() {
                *applied = Some(newest);
            }
            return Ok(());
        };
        loop {
            let entries = if after == (0, 0) {
                // The journal was empty: everything in it now is new.
                let entries: Vec<JournalEntry> = journal
                    .store
                    .query(
                        ::redis::cmd("XRANGE")
                            .arg(&journal.key)
                            .arg("-")
                            .arg("+")
                            .arg("COUNT")
                            .arg(1000),
                    )
                    .await?;
                Some(
                    entries
                        .into_iter()
                        .filter_map(|(id, mut f)| Some((parse_version(&id)?, f.remove("m")?)))
                        .collect::<Vec<_>>(),
                )
            } else {
                journal.since(after, 1000).await?
            };
            let Some(entries) = entries else {
                tracing::warn!(
                    "the invalidation journal no longer reaches back to the last notification \
                     applied here; emptying L1"
                );
                self.clear();
                *lock(&self.applied) = None;
                let newest = journal.newest().await?.unwrap_or((0, 0));
                *lock(&self.applied) = Some(newest);
                return Ok(());
            };
            let done = entries.len() < 1000;
            for (version, message) in &entries {
                self.caught_up.fetch_add(1, Ordering::Relaxed);
                self.receive(Some(*version), message);
                after = *version;
            }
            if done {
                return Ok(());
            }
        }
    }
}
