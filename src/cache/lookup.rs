//! Finding the stored response for a request, and judging what it is good for.

use http::HeaderMap;

use crate::clock;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderName;

use crate::entry::{self, CachedResponse, StoredValue};
use crate::key;
use crate::rules::conditional;
use crate::rules::freshness::{self, Verdict};
use crate::rules::request::RequestPlan;
use crate::store::Memo;

use super::state::LayerState;

/// What a lookup found under a key.
#[derive(Debug, Clone)]
pub(crate) enum Found<E> {
    /// A stored response (for the request's variant).
    Entry(E),
    /// A hit-for-miss mark: the last answer could not be stored, so the request goes to the
    /// origin without coalescing or taking the cross-instance lock.
    Uncacheable,
    /// Nothing the request can use (absent, unreadable, another coding).
    Nothing,
}

impl<E> Found<E> {
    /// The entry, if one was found.
    pub(crate) fn entry(self) -> Option<E> {
        match self {
            Found::Entry(entry) => Some(entry),
            Found::Uncacheable | Found::Nothing => None,
        }
    }
}

/// The stored response for the request, following a `Vary` marker to the variant that
/// matches the request's headers; [`Found::Nothing`] when absent, unreadable, unreachable, or
/// in a content coding the request does not accept.
pub(crate) async fn lookup(
    state: &LayerState,
    key: &str,
    request: &HeaderMap,
) -> Found<Arc<CachedResponse>> {
    accepted_entry(request, lookup_entry(state, key, request).await)
}

/// [`lookup`] for a request whose store just said it cannot answer without I/O
/// ([`Store::get_in_process`](crate::Store::get_in_process) gave `None`): the value is not in
/// this process, so it is read with a plain `get`, without asking for a memo slot (the
/// default `get_memoized` wraps `get`'s future in a second boxed future, on every hit).
pub(crate) async fn lookup_not_in_process(
    state: &LayerState,
    key: &str,
    request: &HeaderMap,
) -> Found<Arc<CachedResponse>> {
    accepted_entry(
        request,
        lookup_entry_via(state, key, request, Via::Get).await,
    )
}

fn accepted_entry(
    request: &HeaderMap,
    found: Found<(Arc<CachedResponse>, Option<key::Variant>)>,
) -> Found<Arc<CachedResponse>> {
    match found {
        Found::Entry((response, _)) => accepted(request, response),
        Found::Uncacheable => Found::Uncacheable,
        Found::Nothing => Found::Nothing,
    }
}

/// Even without `Vary`, a client that did not ask for gzip must never receive gzip.
fn accepted(request: &HeaderMap, response: Arc<CachedResponse>) -> Found<Arc<CachedResponse>> {
    match conditional::accepts_encoding(request, &response.headers) {
        true => Found::Entry(response),
        false => Found::Nothing,
    }
}

/// [`lookup`] without waiting, on a store that keeps its values in this process:
/// `Some(found)` when the store could tell, `None` when the lookup needs I/O.
pub(crate) fn lookup_in_process(
    state: &LayerState,
    key: &str,
    request: &HeaderMap,
) -> Option<Found<Arc<CachedResponse>>> {
    let response = match fetch_in_process(state, key)? {
        Some(Decoded::Response(response)) => response,
        Some(Decoded::Variants(names)) => {
            let variant_key = key::variant_key(key, &names, request);
            match fetch_in_process(state, &variant_key)? {
                Some(Decoded::Response(response)) => response,
                Some(Decoded::Variants(_) | Decoded::Uncacheable) | None => {
                    return Some(Found::Nothing)
                }
            }
        }
        Some(Decoded::Uncacheable) => return Some(Found::Uncacheable),
        None => return Some(Found::Nothing),
    };
    Some(accepted(request, response))
}

/// What a stored response is good for, for this request.
pub(crate) fn judge_entry(
    state: &LayerState,
    plan: &RequestPlan,
    entry: &CachedResponse,
) -> Verdict {
    judge_entry_at(state, plan, entry, clock::now_ms())
}

/// [`judge_entry`] at `now_ms`: a hit reads the clock once, for judging and answering.
pub(crate) fn judge_entry_at(
    state: &LayerState,
    plan: &RequestPlan,
    entry: &CachedResponse,
    now_ms: u64,
) -> Verdict {
    freshness::judge(
        &state.rules,
        plan,
        &entry.directives,
        entry.elapsed(now_ms),
        entry.ttl,
    )
}

/// The stored response (fresh or not) and, for a `Vary` variant, its names and key.
pub(crate) async fn lookup_entry(
    state: &LayerState,
    key: &str,
    request: &HeaderMap,
) -> Found<(Arc<CachedResponse>, Option<key::Variant>)> {
    lookup_entry_via(state, key, request, Via::GetMemoized).await
}

/// How [`fetch`] reads the store.
#[derive(Clone, Copy)]
enum Via {
    /// [`Store::get_memoized`](crate::Store::get_memoized): with the value's memo slot, if
    /// the store keeps one.
    GetMemoized,
    /// [`Store::get`](crate::Store::get): for a value the store does not keep in process.
    Get,
}

async fn lookup_entry_via(
    state: &LayerState,
    key: &str,
    request: &HeaderMap,
    via: Via,
) -> Found<(Arc<CachedResponse>, Option<key::Variant>)> {
    match fetch(state, key, via).await {
        Some(Decoded::Response(response)) => Found::Entry((response, None)),
        Some(Decoded::Variants(names)) => {
            let variant_key = key::variant_key(key, &names, request);
            match fetch(state, &variant_key, via).await {
                Some(Decoded::Response(response)) => {
                    Found::Entry((response, Some((names, variant_key))))
                }
                Some(Decoded::Variants(_) | Decoded::Uncacheable) | None => Found::Nothing,
            }
        }
        Some(Decoded::Uncacheable) => Found::Uncacheable,
        None => Found::Nothing,
    }
}

/// A stored value as lookups hand it on. A response is shared with the store's memo slot
/// (an in-process store's), so an in-process hit copies nothing until it answers.
#[derive(Clone)]
enum Decoded {
    Response(Arc<CachedResponse>),
    Variants(Vec<HeaderName>),
    Uncacheable,
}

async fn fetch(state: &LayerState, key: &str, via: Via) -> Option<Decoded> {
    let started = std::time::Instant::now();
    let result = match via {
        Via::GetMemoized => state.store.get_memoized(key).await,
        Via::Get => (state.store.get(key).await).map(|found| found.map(|bytes| (bytes, None))),
    };
    state.observe.store_get(started.elapsed());
    match result {
        Ok(Some((bytes, memo))) => decode_memoized(state, key, bytes, memo),
        Ok(None) => None,
        Err(e) => {
            state.observe.store_error("get", key, &e);
            None
        }
    }
}

/// [`fetch`] from a store that can answer without waiting.
fn fetch_in_process(state: &LayerState, key: &str) -> Option<Option<Decoded>> {
    let started = std::time::Instant::now();
    let found = state.store.get_in_process(key)?;
    state.observe.store_get(started.elapsed());
    Some(found.and_then(|(bytes, memo)| decode_memoized(state, key, bytes, memo)))
}

/// A decoded entry, kept in the store's memo slot (an in-process store's) with the targeted
/// fields its directives were parsed for: another layer on the same store with other
/// targeted fields decodes its own.
type Memoized = (Vec<HeaderName>, Decoded);

/// Decodes `bytes`, or shares the decoded form an earlier read left in `memo`: an in-process
/// hit then costs a lookup, not a parse.
fn decode_memoized(
    state: &LayerState,
    key: &str,
    bytes: Bytes,
    memo: Option<Memo>,
) -> Option<Decoded> {
    let targeted = &state.rules.targeted;
    let memoized = memo
        .as_ref()
        .and_then(|m| m.get()?.downcast_ref::<Memoized>());
    if let Some((_, value)) = memoized.filter(|(for_targeted, _)| for_targeted == targeted) {
        return Some(value.clone());
    }
    let value = match entry::decode(bytes, targeted)
        .inspect_err(|e| {
            tracing::debug!(
                key,
                error = e as &dyn std::error::Error,
                "treating entry as a miss"
            )
        })
        .ok()?
    {
        StoredValue::Response(response) => Decoded::Response(Arc::new(response)),
        StoredValue::Variants(names) => Decoded::Variants(names),
        StoredValue::Uncacheable => Decoded::Uncacheable,
    };
    if let Some(memo) = memo {
        let _ = memo.set(Arc::new((targeted.clone(), value.clone())));
    }
    Some(value)
}

/// What a request waiting on another instance's lock finds when it polls the store: a fresh
/// response it may be given (its variant, in a coding it accepts) with its variant's names
/// and key, a hit-for-miss mark, or anything else (nothing, or a response it may not use, with
/// the time that response was stored).
pub(crate) async fn poll_entry(state: &LayerState, key: &str, headers: &HeaderMap) -> Polled {
    match lookup_entry(state, key, headers).await {
        Found::Entry((response, variant)) => {
            let usable = response.staleness(clock::now_ms()).is_none()
                && conditional::accepts_encoding(headers, &response.headers);
            match usable {
                true => Polled::Fresh(Box::new(Arc::unwrap_or_clone(response)), variant),
                false => Polled::Other(Some(response.stored_at_ms)),
            }
        }
        Found::Uncacheable => Polled::Uncacheable,
        Found::Nothing => Polled::Other(None),
    }
}

/// See [`poll_entry`].
pub(crate) enum Polled {
    // Boxed: polling is the slow path, and the other variants are a few bytes.
    Fresh(Box<CachedResponse>, Option<key::Variant>),
    Uncacheable,
    /// Nothing fresh: the stored time of the response found, if any.
    Other(Option<u64>),
}
