//! Joining the single-flight of a cold key: who leads, who waits, and what a waiter may be
//! handed (the same rules as a lookup: its variant, a coding it accepts, fresh for it).

use http::HeaderMap;

use std::sync::Arc;

use crate::coalesce::{self, follow, Contention, Looked, Released, Role};
use crate::entry::CachedResponse;
use crate::key;
use crate::rules::conditional;
use crate::rules::freshness::Verdict;
use crate::rules::request::RequestPlan;

use super::lookup::{judge_entry, poll_entry, Polled};
use super::state::{LayerState, ResponseLead, SharedResponse};

/// How a cold-key request proceeds.
pub(crate) enum Coalesced {
    /// Another request (in this process or another) produced the response.
    Hit(CachedResponse),
    /// This request calls the handler and shares the result.
    Lead(ResponseLead),
    /// The answer this request waited for cannot be stored or shared (hit-for-miss): call the
    /// handler at once, without leading.
    Uncacheable,
    /// The call this request waited for failed (`timed_out`: it took too long), here or in
    /// another instance: a stale copy that may stand in for errors serves; without one, the
    /// request calls the handler itself (or, after a timeout, answers `504`).
    LeaderFailed { timed_out: bool },
    /// The wait ended at the request's own timeout.
    TimedOut,
    /// This request calls the handler on its own (coalescing off, or the stored response
    /// changed into one it must validate itself).
    Alone,
}

/// What a request waiting on another instance's lock may act on.
enum Seen {
    /// A fresh response it may be given.
    Fresh(Box<CachedResponse>, Option<key::Variant>),
    /// A hit-for-miss mark: the other instance's answer could not be stored.
    Uncacheable,
    /// A fail-safe throttle: the other instance's call failed and its stale copy stands in.
    FailSafe,
}

/// Makes concurrent misses for one key wait for a single handler call: in this process
/// through the flight map, across processes (when enabled) through a lock in the store.
///
/// A waiter is only handed a response it could have been served from the store: fresh for
/// its own request directives, not one that needs validation first (`no-cache`), of its
/// variant and in a coding it accepts. Otherwise it calls the handler itself. A waiter is
/// released as soon as the leader knows its answer cannot be shared (at the response head),
/// and a leader that goes away hands the flight to one waiter.
///
/// `stand_in` is the stale copy that may stand in for a failing handler, if any: with one,
/// a waiter gives up at the soft timeout, and a poller keeps waiting while the store still
/// holds that same copy.
pub(crate) async fn coalesce(
    state: &LayerState,
    plan: &RequestPlan,
    key: &str,
    headers: &HeaderMap,
    looked_up_at: u64,
    stand_in: Option<&CachedResponse>,
) -> Coalesced {
    let rules = &state.rules;
    if !rules.coalesce {
        return Coalesced::Alone;
    }
    let wait = match (stand_in, rules.soft_timeout) {
        (Some(_), Some(soft)) => soft.min(rules.coalesce_timeout),
        _ => rules.coalesce_timeout,
    };
    let deadline = tokio::time::Instant::now() + crate::settings::clamp(wait);
    let mut lead = loop {
        let following = match state.flights.join(key, looked_up_at) {
            Role::Leader(lead) => break lead,
            Role::Follower(following) => following,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        return match follow(following, left).await {
            Released::Done(shared) if fits(&shared, key, headers) => {
                let hit = shared.response.clone();
                match judge_entry(state, plan, &hit) == Verdict::Fresh {
                    true => Coalesced::Hit(hit),
                    false => Coalesced::Alone,
                }
            }
            Released::Done(_) => Coalesced::Alone,
            Released::Uncacheable => Coalesced::Uncacheable,
            Released::Failed { timed_out, .. } => Coalesced::LeaderFailed { timed_out },
            // The leader went away: the first waiter to join again leads.
            Released::Dropped => continue,
            Released::TimedOut => Coalesced::TimedOut,
        };
    };
    if !rules.lock_across_instances {
        return Coalesced::Lead(lead);
    }
    // Another instance may be computing this key: take its lock, or wait for its entry. An
    // entry that needs validation before use is validated by this request's own handler
    // call, not handed over; the stale copy this request found is not news.
    let stand_in_stored_at = stand_in.map(|s| s.stored_at_ms);
    let look = || async {
        match poll_entry(state, key, headers).await {
            Polled::Fresh(found, variant) => match judge_entry(state, plan, &found) {
                Verdict::Fresh => Looked::Found(Seen::Fresh(found, variant)),
                _ => Looked::Unusable,
            },
            Polled::Uncacheable => Looked::Found(Seen::Uncacheable),
            Polled::Other(stored_at) if stored_at.is_some() && stored_at != stand_in_stored_at => {
                Looked::Unusable
            }
            Polled::Other(_) if stand_in.is_some() && throttled(state, key).await => {
                Looked::Found(Seen::FailSafe)
            }
            Polled::Other(_) => Looked::Missing,
        }
    };
    let (ttl, wait) = (rules.lock_ttl, wait);
    match coalesce::lock_or_wait(&state.store, key, ttl, wait, look).await {
        Contention::Found(Seen::Fresh(response, variant)) => {
            let response = *response;
            // Another instance stored it: give it to this process's waiters too.
            let linger = response.ttl;
            lead.share(Arc::new(SharedResponse {
                response: response.clone(),
                variant,
            }));
            lead.written(linger);
            Coalesced::Hit(response)
        }
        Contention::Found(Seen::Uncacheable) => {
            lead.release(Released::Uncacheable);
            Coalesced::Uncacheable
        }
        Contention::Found(Seen::FailSafe) => {
            lead.release(Released::Failed {
                timed_out: false,
                reason: Arc::from("another instance's call failed"),
            });
            Coalesced::LeaderFailed { timed_out: false }
        }
        Contention::Locked(lock) => {
            lead.hold(lock);
            Coalesced::Lead(lead)
        }
        Contention::Failed(e) => {
            state.observe.store_error("lock", key, &e);
            Coalesced::Lead(lead)
        }
        Contention::Alone => Coalesced::Lead(lead),
    }
}

/// Whether a fail-safe throttle for `key` is in the store: a call for it failed lately and
/// its stale copy stands in without calling the handler again.
pub(crate) async fn throttled(state: &LayerState, key: &str) -> bool {
    match state.store.get(&key::fail_safe_key(key)).await {
        Ok(found) => found.is_some(),
        Err(e) => {
            state.observe.store_error("get", key, &e);
            false
        }
    }
}

/// Whether a request with `headers` for base key `key` may be given the shared response: the
/// same variant, in a content coding it accepts.
fn fits(shared: &SharedResponse, key: &str, headers: &HeaderMap) -> bool {
    let same_variant = match &shared.variant {
        None => true,
        Some((names, variant_key)) => key::variant_key(key, names, headers) == *variant_key,
    };
    same_variant && conditional::accepts_encoding(headers, &shared.response.headers)
}
