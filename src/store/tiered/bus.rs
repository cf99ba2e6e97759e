//! The Redis side of the notifications: the journal and the channel (one script appends to
//! the one and publishes on the other; the journal is read back on catch-up), the queue of
//! notifications whose publish failed, and the task that replays them once Redis answers.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::{Script, Value};

use super::notice::{parse_version, Notice, Version};
use crate::store::redis::RedisStore;
use crate::Result;

/// The journal keeps about this many notifications (`XADD MAXLEN ~`): a node away for
/// fewer catches up from it, one away for more empties its L1.
const JOURNAL_ENTRIES: u64 = 10_000;

/// The journal expires this long after the last notification (every key this crate writes
/// has a TTL, so `volatile-*` eviction policies can still evict it).
const JOURNAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Notifications whose publish failed wait in a queue of at most this many keys, tags and
/// patterns (one per key: the newest wins). Past it, the queue is replaced by one "empty
/// your L1" notification.
const QUEUE_MAX: usize = 10_000;

/// Between attempts to replay the queue while Redis does not answer.
const REPLAY_INTERVAL: Duration = Duration::from_millis(20);

/// Publishes a notification: appends it to the journal, then publishes it with the id the
/// journal gave it (its version), in one atomic step, so that every notification is either
/// in the journal before a subscriber's catch-up reads it, or arrives on the channel after.
/// KEYS[1]: the journal; ARGV: channel, notification, journal length, journal TTL in ms.
static PUBLISH_SCRIPT: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
    Script::new(
        r"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[1], id .. ' ' .. ARGV[2])
return id
",
    )
});

/// The notification channel: published through a store (timeouts, back-off), received by a
/// task of this store's own; failed publishes wait in a queue a second task replays.
pub(super) struct Bus {
    pub(super) publisher: RedisStore,
    pub(super) channel: String,
    pub(super) journal: String,
    pub(super) queue: Arc<Mutex<Queue>>,
    pub(super) queued: Arc<tokio::sync::Notify>,
    pub(super) tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for Bus {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Notifications waiting to be published, one per key, tag or pattern (the newest wins).
#[derive(Default)]
pub(super) struct Queue {
    waiting: HashMap<Vec<u8>, Vec<u8>>,
    order: VecDeque<Vec<u8>>,
    overflowed: bool,
}

impl Queue {
    pub(super) fn push(&mut self, what: Vec<u8>, message: Vec<u8>) {
        if self.overflowed {
            return;
        }
        if self.waiting.len() >= QUEUE_MAX && !self.waiting.contains_key(&what) {
            // Too much to replay key by key: one notification that empties every L1.
            self.waiting.clear();
            self.order.clear();
            self.overflowed = true;
            return;
        }
        if self.waiting.insert(what.clone(), message).is_none() {
            self.order.push_back(what);
        }
    }

    fn pop(&mut self, origin: u64) -> Option<(Vec<u8>, Vec<u8>)> {
        if self.overflowed {
            self.overflowed = false;
            return Some((Vec::new(), Notice::Clear.encode(origin)));
        }
        let what = self.order.pop_front()?;
        let message = self.waiting.remove(&what)?;
        Some((what, message))
    }

    /// Puts a notification whose publish failed back at the head, unless a newer one of
    /// the same thing came meanwhile.
    fn put_back(&mut self, what: Vec<u8>, message: Vec<u8>) {
        if what.is_empty() {
            self.overflowed = true;
        } else if !self.overflowed && !self.waiting.contains_key(&what) {
            self.waiting.insert(what.clone(), message);
            self.order.push_front(what);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.waiting.len() + usize::from(self.overflowed)
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The journal and the channel, through the publishing store.
pub(super) struct Journal {
    pub(super) store: RedisStore,
    pub(super) key: String,
    pub(super) channel: String,
}

impl Journal {
    pub(super) async fn publish(&self, message: &[u8]) -> Result<()> {
        let mut invocation = PUBLISH_SCRIPT.prepare_invoke();
        invocation
            .key(&self.key)
            .arg(&self.channel)
            .arg(message)
            .arg(JOURNAL_ENTRIES)
            .arg(JOURNAL_TTL.as_millis() as u64);
        let _: Value = self.store.run_script(&invocation).await?;
        Ok(())
    }

    /// The newest entry's version, if the journal holds any.
    pub(super) async fn newest(&self) -> Result<Option<Version>> {
        let entries: Vec<(String, Value)> = self
            .store
            .query(
                ::redis::cmd("XREVRANGE")
                    .arg(&self.key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        Ok(entries.first().and_then(|(id, _)| parse_version(id)))
    }

    /// Up to `count` entries after `after` (exclusive), oldest first, with their versions;
    /// `None` when the journal no longer holds `after` itself (trimmed past it, expired, or
    /// lost with a restart): what happened since cannot be told.
    pub(super) async fn since(
        &self,
        after: Version,
        count: usize,
    ) -> Result<Option<Vec<(Version, Vec<u8>)>>> {
        let id = format!("{}-{}", after.0, after.1);
        let mut pipe = ::redis::pipe();
        pipe.cmd("XRANGE").arg(&self.key).arg(&id).arg(&id);
        pipe.cmd("XRANGE")
            .arg(&self.key)
            .arg(format!("({id}"))
            .arg("+")
            .arg("COUNT")
            .arg(count);
        let (anchor, entries): (Vec<(String, Value)>, Vec<JournalEntry>) =
            self.store.query_pipeline(&pipe).await?;
        if anchor.is_empty() {
            return Ok(None);
        }
        Ok(Some(
            entries
                .into_iter()
                .filter_map(|(id, mut fields)| Some((parse_version(&id)?, fields.remove("m")?)))
                .collect(),
        ))
    }
}

/// A journal entry as `XRANGE` answers it: the id, and the fields (`m`: the notification).
pub(super) type JournalEntry = (String, HashMap<String, Vec<u8>>);

/// The replay task: publishes queued notifications once Redis answers, in order.
pub(super) async fn replay(
    journal: Journal,
    queue: Arc<Mutex<Queue>>,
    queued: Arc<tokio::sync::Notify>,
    origin: u64,
) {
    loop {
        queued.notified().await;
        loop {
            let next = lock(&queue).pop(origin);
            let Some((what, message)) = next else {
                break;
            };
            if journal.publish(&message).await.is_err() {
                lock(&queue).put_back(what, message);
                tokio::time::sleep(REPLAY_INTERVAL).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_the_newest_per_key_and_overflows_into_one_clear() {
        let mut queue = Queue::default();
        queue.push(Notice::Set("a").what(), b"first".to_vec());
        queue.push(Notice::Key("a").what(), b"second".to_vec());
        queue.push(Notice::Set("b").what(), b"b".to_vec());
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.pop(1).unwrap().1, b"second");
        assert_eq!(queue.pop(1).unwrap().1, b"b");
        assert!(queue.pop(1).is_none());
        for i in 0..=QUEUE_MAX {
            queue.push(Notice::Set(&i.to_string()).what(), vec![]);
        }
        assert_eq!(queue.len(), 1);
        let (_, message) = queue.pop(1).unwrap();
        assert_eq!(Notice::decode(&message).unwrap().0, Notice::Clear);
        assert!(queue.pop(1).is_none());
    }
}
