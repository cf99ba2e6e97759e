//! Finding the stored response for a request, and judging what it is good for.

use http::HeaderMap;

use crate::clock;
use crate::entry::{self, CachedResponse, StoredValue};
use crate::key;
use crate::rules::conditional;
use crate::rules::freshness::{self, Verdict};
use crate::rules::request::RequestPlan;

use super::config::Config;

/// The stored response for the request, following a `Vary` marker to the variant that
/// matches the request's headers; `None` when absent, unreadable, unreachable, or in a
/// content coding the request does not accept.
pub(crate) async fn lookup(
    config: &Config,
    key: &str,
    request: &HeaderMap,
) -> Option<CachedResponse> {
    let (response, _) = lookup_entry(config, key, request).await?;
    // Even without `Vary`, a client that did not ask for gzip must never receive gzip.
    conditional::accepts_encoding(request, &response.headers).then_some(response)
}

/// What a stored response is good for, for this request.
pub(crate) fn judge_entry(config: &Config, plan: &RequestPlan, entry: &CachedResponse) -> Verdict {
    freshness::judge(
        &config.rules,
        plan,
        &entry.directives,
        entry.elapsed(clock::now_ms()),
        entry.ttl,
    )
}

/// The stored response (fresh or not) and, for a `Vary` variant, its names and key.
pub(crate) async fn lookup_entry(
    config: &Config,
    key: &str,
    request: &HeaderMap,
) -> Option<(CachedResponse, Option<key::Variant>)> {
    match fetch(config, key).await? {
        StoredValue::Response(response) => Some((response, None)),
        StoredValue::Variants(names) => {
            let variant_key = key::variant_key(key, &names, request);
            match fetch(config, &variant_key).await? {
                StoredValue::Response(response) => Some((response, Some((names, variant_key)))),
                StoredValue::Variants(_) => None,
            }
        }
    }
}

pub(crate) async fn fetch(config: &Config, key: &str) -> Option<StoredValue> {
    let started = std::time::Instant::now();
    let result = config.store.get(key).await;
    config.observe.store_get(started.elapsed());
    match result {
        Ok(Some(bytes)) => entry::decode(bytes, &config.rules.targeted)
            .inspect_err(|e| {
                tracing::debug!(
                    key,
                    error = e as &dyn std::error::Error,
                    "treating entry as a miss"
                )
            })
            .ok(),
        Ok(None) => None,
        Err(e) => {
            config.observe.store_error("get", key, &e);
            None
        }
    }
}

/// A fresh stored response the request may be given (its variant, in a coding it accepts),
/// with its variant's names and key: what a request waiting on another instance's lock polls
/// for.
pub(crate) async fn fresh_entry(
    config: &Config,
    key: &str,
    headers: &HeaderMap,
) -> Option<(CachedResponse, Option<key::Variant>)> {
    let (response, variant) = lookup_entry(config, key, headers).await?;
    let usable = response.staleness(clock::now_ms()).is_none()
        && conditional::accepts_encoding(headers, &response.headers);
    usable.then_some((response, variant))
}
