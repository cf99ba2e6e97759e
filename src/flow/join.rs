//! Joining the single-flight of a cold key: who leads, who waits, and what a waiter may be
//! handed (the same rules as a lookup: its variant, a coding it accepts, fresh for it).

use http::HeaderMap;

use std::sync::Arc;

use crate::coalesce::{self, follow, Contention, Looked, Role};
use crate::entry::CachedResponse;
use crate::key;
use crate::rules::conditional;
use crate::rules::freshness::Verdict;
use crate::rules::request::RequestPlan;

use super::config::{Config, Lead, Shared};
use super::lookup::{fresh_entry, judge_entry};

/// How a cold-key request proceeds.
pub(crate) enum Coalesced {
    /// Another request (in this process or another) produced the response.
    Hit(CachedResponse),
    /// This request calls the handler and shares the result.
    Lead(Lead),
    /// This request calls the handler on its own (coalescing off, or waiting gave up).
    Alone,
}

/// Makes concurrent misses for one key wait for a single handler call: in this process
/// through the flight map, across processes (when enabled) through a lock in the store.
///
/// A waiter is only handed a response it could have been served from the store: fresh for
/// its own request directives, not one that needs validation first (`no-cache`), of its
/// variant and in a coding it accepts. Otherwise it calls the handler itself.
pub(crate) async fn coalesce(
    config: &Config,
    plan: &RequestPlan,
    key: &str,
    headers: &HeaderMap,
    looked_up_at: u64,
) -> Coalesced {
    let rules = &config.rules;
    if !rules.coalesce {
        return Coalesced::Alone;
    }
    let mut lead = match config.flights.join(key, looked_up_at) {
        Role::Follower(rx) => {
            return match follow(rx, rules.coalesce_timeout).await {
                Some(shared) if fits(&shared, key, headers) => {
                    let hit = shared.response.clone();
                    if judge_entry(config, plan, &hit) == Verdict::Fresh {
                        Coalesced::Hit(hit)
                    } else {
                        Coalesced::Alone
                    }
                }
                _ => Coalesced::Alone,
            };
        }
        Role::Leader(lead) => lead,
    };
    if !rules.lock_across_instances {
        return Coalesced::Lead(lead);
    }
    // Another instance may be computing this key: take its lock, or wait for its entry. An
    // entry that needs validation before use is validated by this request's own handler
    // call, not handed over.
    let look = || async {
        match fresh_entry(config, key, headers).await {
            Some(found) if judge_entry(config, plan, &found.0) == Verdict::Fresh => {
                Looked::Found(found)
            }
            Some(_) => Looked::Unusable,
            None => Looked::Missing,
        }
    };
    let (ttl, wait) = (rules.lock_ttl, rules.coalesce_timeout);
    match coalesce::lock_or_wait(&config.store, key, ttl, wait, look).await {
        Contention::Found((response, variant)) => {
            // Another instance stored it: give it to this process's waiters too.
            let linger = response.ttl;
            lead.share(Arc::new(Shared {
                response: response.clone(),
                variant,
            }));
            lead.written(linger);
            Coalesced::Hit(response)
        }
        Contention::Locked(lock) => {
            lead.hold(lock);
            Coalesced::Lead(lead)
        }
        Contention::Failed(e) => {
            config.observe.store_error("lock", key, &e);
            Coalesced::Lead(lead)
        }
        Contention::Alone => Coalesced::Lead(lead),
    }
}

/// Whether a request with `headers` for base key `key` may be given the shared response: the
/// same variant, in a content coding it accepts.
fn fits(shared: &Shared, key: &str, headers: &HeaderMap) -> bool {
    let same_variant = match &shared.variant {
        None => true,
        Some((names, variant_key)) => key::variant_key(key, names, headers) == *variant_key,
    };
    same_variant && conditional::accepts_encoding(headers, &shared.response.headers)
}
