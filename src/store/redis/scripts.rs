//! The store's Lua scripts, each run by its SHA1 (`EVALSHA`; the text only after `NOSCRIPT`,
//! see `RedisStore::run_script`): a tagged write, a tag record on a Cluster, and the release of
//! a lock.

use std::sync::LazyLock;

use ::redis::Script;

/// Stores a value and records its key in each tag set, scored by its expiry on the server's
/// clock. Expired members are trimmed on each write; a tag set lives as long as its
/// longest-lived member. KEYS[1]: the value's key; KEYS[2..]: tag sets. ARGV[1]: the value;
/// ARGV[2]: TTL in ms. Run by [`RedisStore::write_tagged`], for the response layer and
/// [`RedisCache`](crate::RedisCache).
///
/// [`RedisStore::write_tagged`]: crate::RedisStore::write_tagged
pub(super) static SET_TAGGED_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SET_TAGGED));

const SET_TAGGED: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('ZADD', KEYS[i], now + ttl, KEYS[1])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
";

/// On a cluster: records a key in one tag set, as [`SET_TAGGED_SCRIPT`] does for each of its
/// tag sets. KEYS[1]: the tag set; ARGV[1]: the value's key; ARGV[2]: TTL in ms.
#[cfg(feature = "cluster")]
pub(super) static RECORD_TAG_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RECORD_TAG));

#[cfg(feature = "cluster")]
const RECORD_TAG: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
";

/// Releases a lock if the token still owns it, in one step (see `RedisStore`'s
/// `Store::unlock`). KEYS[1]: the lock; ARGV[1]: the owner's token.
pub(super) static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
         return redis.call('DEL', KEYS[1]) else return 0 end",
    )
});
