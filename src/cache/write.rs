//! Writing responses to the store: what is stored, under which keys and tags, for how long;
//! written in the background once the body has streamed to the client.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, CONTENT_LENGTH};
use http::{HeaderMap, StatusCode};
use http_body::Body;

use crate::cache_control::CacheControl;
use crate::clock;

use crate::entry::{self, CachedResponse, StoredValue};
use crate::key;
use crate::observe::{Event, NotStored, Observer};
use crate::rules::conditional;
use crate::rules::freshness;
use crate::rules::tags::{self, TAG_HEADERS};
use crate::rules::vary::{vary_names, Vary};
use crate::store::Store;
use crate::{ErrorKind, Result};

use super::answer::X_CACHE;
use crate::coalesce::Released;

use super::body::{RecordSink, Recorder, Unrecorded};
use super::state::{LayerState, ResponseLead, SharedResponse, WriteBudget};

/// The request side of a handler call, as storing its response needs it.
pub(crate) struct Exchange<'a> {
    pub(crate) request_headers: &'a HeaderMap,
    /// The key of the request's URL ([`Keying::url_key`](crate::key::Keying::url_key)): an
    /// entry stored under any other key is tagged with the URL, so invalidating it reaches
    /// the entry.
    pub(crate) url_key: &'a str,
    /// When the request went to the handler (for the response's age, RFC 9111 §4.2.3).
    pub(crate) sent_at_ms: u64,
    /// The request carried credentials: only a response marked shareable may be stored.
    pub(crate) authorized: bool,
}

/// A recorder that stores the response once its body has streamed through, if the response
/// may be stored at all. One that may not releases the waiters (`lead`) at once and, when
/// `may_mark`, is remembered as uncacheable (hit-for-miss) so that requests for the key go
/// straight to the handler for a while.
pub(crate) fn plan_store<B: Body>(
    state: &Arc<LayerState>,
    key: String,
    exchange: &Exchange<'_>,
    parts: &http::response::Parts,
    body: &B,
    lead: Option<ResponseLead>,
    may_mark: bool,
) -> Option<Recorder> {
    let rules = &state.rules;
    // The response's directives, parsed once for every decision about storing it.
    let cc = CacheControl::for_cache(&parts.headers, &rules.targeted);
    let mark_ttl = mark_ttl(state, may_mark);
    let not_stored = |reason: NotStored, lead: Option<ResponseLead>| {
        state.observe.not_stored(reason);
        // A reply to credentials says nothing about the key's other requests.
        let ttl = match reason {
            NotStored::Authorization => Duration::ZERO,
            _ => mark_ttl,
        };
        mark_uncacheable(Marking::of(state), key.clone(), ttl, lead);
        None
    };
    let ttl = match freshness::storable_ttl(
        rules,
        parts.status,
        &parts.headers,
        &cc,
        exchange.authorized,
    ) {
        Ok(ttl) => ttl,
        Err(reason) => return not_stored(reason, lead),
    };
    // A body announcing more than the limit is not recorded at all.
    if body.size_hint().lower() > rules.max_body_bytes as u64 {
        return not_stored(NotStored::Size, lead);
    }
    // A body must end at the length it announced, or it was cut short (or padded).
    let Ok(expected) = declared_length(&parts.headers) else {
        return not_stored(NotStored::BadLength, lead);
    };
    if matches!(vary_names(&parts.headers), Vary::Any) {
        return not_stored(NotStored::VaryStar, lead);
    }
    let mut pending = PendingEntry::new(
        state,
        key.clone(),
        exchange,
        (parts.status, &parts.headers, &cc),
        ttl,
        lead,
    )?;
    pending.mark_ttl = mark_ttl;
    Some(Recorder::new(
        rules.max_body_bytes,
        expected,
        state.observe.clone(),
        Box::new(pending),
    ))
}

/// How long a mark lasts for a request that `may_mark` (zero: no mark).
fn mark_ttl(state: &LayerState, may_mark: bool) -> Duration {
    match may_mark {
        true => state.rules.hit_for_miss,
        false => Duration::ZERO,
    }
}

/// What writing a mark or a throttle needs from the layer.
struct Marking {
    store: Arc<dyn Store>,
    observe: Arc<Observer>,
    budget: Arc<WriteBudget>,
}

impl Marking {
    fn of(state: &LayerState) -> Self {
        Self {
            store: state.store.clone(),
            observe: state.observe.clone(),
            budget: state.pending_writes.clone(),
        }
    }
}

/// The answer for `key` cannot be stored: release the waiters at once (their requests go to
/// the handler without waiting any longer) and, for `ttl`, remember it (hit-for-miss), so
/// that requests for the key skip coalescing and the cross-instance lock. The mark is written
/// before the lead (and with it the cross-instance lock) is let go, so that other instances'
/// pollers find the mark, not a free lock to take in turn. A later answer that can be stored
/// replaces the mark.
fn mark_uncacheable(marking: Marking, key: String, ttl: Duration, mut lead: Option<ResponseLead>) {
    if let Some(lead) = &mut lead {
        lead.release(Released::Uncacheable);
    }
    write_then_release(
        marking,
        key,
        entry::encode_uncacheable(),
        ttl,
        lead,
        Event::UncacheableMark,
    );
}

/// The handler's call failed (an error, or `timed_out`) and no stale copy may stand in: the
/// waiters are released to try for themselves (or, after a timeout, to answer `504` rather
/// than wait that long again), and the key is marked uncacheable when `may_mark`, so that
/// later requests do not queue behind a failing origin.
pub(crate) fn failed_without_stand_in(
    state: &LayerState,
    key: String,
    mut lead: Option<ResponseLead>,
    may_mark: bool,
    timed_out: bool,
) {
    if let Some(lead) = &mut lead {
        lead.release(failure(timed_out));
    }
    let ttl = mark_ttl(state, may_mark);
    write_then_release(
        Marking::of(state),
        key,
        entry::encode_uncacheable(),
        ttl,
        lead,
        Event::UncacheableMark,
    );
}

/// The handler's call failed (an error, a server error, or `timed_out`) and the stale copy
/// stands in: the waiters are released to serve theirs, and for the route's fail-safe
/// throttle the stale copy is served without calling the handler again (FusionCache's
/// fail-safe), in this instance and, through the store, in every instance sharing it.
pub(crate) fn fail_safe(
    state: &LayerState,
    key: &str,
    mut lead: Option<ResponseLead>,
    timed_out: bool,
) {
    if let Some(lead) = &mut lead {
        lead.release(failure(timed_out));
    }
    let ttl = state.rules.fail_safe_throttle;
    let throttle = key::fail_safe_key(key);
    write_then_release(
        Marking::of(state),
        throttle,
        Bytes::from_static(b"1"),
        ttl,
        lead,
        Event::FailSafeThrottle,
    );
}

fn failure(timed_out: bool) -> Released<Arc<SharedResponse>> {
    let reason = match timed_out {
        true => "the handler timed out",
        false => "the handler failed",
    };
    Released::Failed {
        timed_out,
        reason: Arc::from(reason),
    }
}

/// Writes `value` under `key` for `ttl` in the background, then lets `lead` (and the
/// cross-instance lock it holds) go. Nothing is written for a zero `ttl`.
fn write_then_release(
    marking: Marking,
    key: String,
    value: Bytes,
    ttl: Duration,
    lead: Option<ResponseLead>,
    event: Event,
) {
    if ttl.is_zero() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // Tracked, so that `CacheLayer::flush` waits for it.
    let task = marking.budget.track();
    runtime.spawn(async move {
        let _task = task;
        match marking.store.set(&key, value, ttl).await {
            Ok(()) => marking.observe.event(event),
            Err(e) => marking.observe.store_error("set", &key, &e),
        }
        if let Some(mut lead) = lead {
            lead.release_lock().await;
        }
    });
}

/// The body length `Content-Length` announces: `Ok(None)` without one, `Err` when its
/// values are malformed or disagree (RFC 9110 §8.6), which makes the response unstorable.
fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    let mut declared = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.to_str().map_err(|_| ())?.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(());
            }
            let n = part.parse::<u64>().map_err(|_| ())?;
            if declared.is_some_and(|d| d != n) {
                return Err(());
            }
            declared = Some(n);
        }
    }
    Ok(declared)
}

/// The stored response with the headers and lifetime a 304 from the handler gave it; the
/// updated entry is written back in the background.
pub(crate) fn revalidated(
    state: &LayerState,
    key: String,
    mut stale: CachedResponse,
    not_modified: &HeaderMap,
    exchange: &Exchange<'_>,
    lead: Option<ResponseLead>,
) -> CachedResponse {
    conditional::merge_not_modified(&mut stale.headers, not_modified);
    let rules = &state.rules;
    stale.directives = CacheControl::for_cache(&stale.headers, &rules.targeted);
    let ttl = freshness::storable_ttl(
        rules,
        stale.status,
        &stale.headers,
        &stale.directives,
        exchange.authorized,
    )
    .ok();
    // The 304 is the response the entry's age now counts from.
    stale.stored_at_ms = received_at(not_modified, exchange);
    stale.ttl = ttl.unwrap_or(Duration::ZERO);
    if let Some(ttl) = ttl {
        let response = (stale.status, &stale.headers, &stale.directives);
        if let Some(mut pending) = PendingEntry::new(state, key, exchange, response, ttl, lead) {
            pending.stored_at_ms = stale.stored_at_ms;
            pending.store(vec![stale.body.clone()]);
        }
    }
    stale
}

/// A HEAD response from the handler for a stored GET response that is not fresh: if it is
/// the same representation (same status, and the same `ETag`, or the same `Last-Modified`
/// when there is no `ETag`), its headers refresh the stored ones and the entry is written
/// back with the lifetime they give (RFC 9111 §4.3.5). Anything else leaves the entry alone.
pub(crate) fn head_refreshed<B>(
    state: &LayerState,
    key: String,
    stale: CachedResponse,
    head: &http::Response<B>,
    exchange: &Exchange<'_>,
) {
    let validator = |h: &HeaderMap| {
        h.get(header::ETAG)
            .map(|v| (true, v.clone()))
            .or_else(|| h.get(header::LAST_MODIFIED).map(|v| (false, v.clone())))
    };
    let same = head.status() == stale.status
        && validator(&stale.headers).is_some()
        && validator(&stale.headers) == validator(head.headers());
    if same {
        revalidated(state, key, stale, head.headers(), exchange, None);
    }
}

/// When the response with `headers` was, in effect, generated: now, less the age it already
/// had on arrival (RFC 9111 §4.2.3), so that the entry's age is its `current_age`.
fn received_at(headers: &HeaderMap, exchange: &Exchange<'_>) -> u64 {
    let now = clock::now_ms();
    let at = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
    let initial = freshness::initial_age(headers, at(exchange.sent_at_ms), at(now));
    now.saturating_sub(u64::try_from(initial.as_millis()).unwrap_or(u64::MAX))
}

/// What a storable miss will write once its body has streamed through completely.
pub(crate) struct PendingEntry {
    store: Arc<dyn Store>,
    key: String,
    /// For a response with `Vary`: the header names and the variant's own key.
    variant: Option<key::Variant>,
    status: StatusCode,
    headers: HeaderMap,
    /// When the response was generated, by the cache's clock (see [`received_at`]).
    stored_at_ms: u64,
    /// How long the entry is fresh.
    ttl: Duration,
    /// How long the store keeps it: the TTL plus any grace for serving it stale.
    keep: Duration,
    /// The coalesced requests waiting for this response, if this request leads them.
    lead: Option<ResponseLead>,
    /// How long the shared response may answer late joiners once written (its TTL, capped).
    linger: Duration,
    /// The tag sets the entry is recorded in.
    tag_keys: Vec<String>,
    /// Give the entry a strong `ETag` (a hash of its body) if it has none.
    generate_etag: bool,
    budget: Arc<WriteBudget>,
    max_pending_writes: usize,
    /// The route's targeted fields, to decode the entry for waiters as lookups would.
    targeted: Vec<HeaderName>,
    observe: Arc<Observer>,
    /// How long the key is marked uncacheable if the body cannot be recorded after all (a
    /// failure midway, over the limit, a wrong length); zero: no mark.
    mark_ttl: Duration,
}

impl RecordSink for PendingEntry {
    fn complete(self: Box<Self>, chunks: Vec<Bytes>) {
        self.store(chunks);
    }

    fn unrecorded(self: Box<Self>, why: Unrecorded) {
        let this = *self;
        match why {
            // The client went away: nothing is known about the answer. Dropping the lead
            // hands the flight to one waiter.
            Unrecorded::Abandoned => {}
            Unrecorded::Failed | Unrecorded::TooBig | Unrecorded::BadLength => {
                let marking = Marking {
                    store: this.store,
                    observe: this.observe,
                    budget: this.budget,
                };
                mark_uncacheable(marking, this.key, this.mark_ttl, this.lead);
            }
        }
    }
}

impl PendingEntry {
    fn new(
        state: &LayerState,
        key: String,
        exchange: &Exchange<'_>,
        (status, headers, cc): (StatusCode, &HeaderMap, &CacheControl),
        ttl: Duration,
        lead: Option<ResponseLead>,
    ) -> Option<Self> {
        let variant = match vary_names(headers) {
            Vary::Any => return None,
            Vary::Headers(names) if names.is_empty() => None,
            Vary::Headers(names) => {
                let variant_key = key::variant_key(&key, &names, exchange.request_headers);
                Some((names, variant_key))
            }
        };
        let rules = &state.rules;
        // Entries written together should not all expire together.
        let ttl = if rules.ttl_jitter > 0.0 {
            ttl.mul_f64(1.0 - rules.ttl_jitter * random_fraction())
        } else {
            ttl
        };
        let keep = ttl.saturating_add(freshness::keep_past_ttl(rules, cc, headers));
        let namespace = key::layer_namespace(&state.key_prefix);
        let mut tag_keys: Vec<String> = state
            .tags
            .iter()
            .cloned()
            .chain(tags::response_tags(headers))
            .map(|tag| key::tag_key(&namespace, &tag))
            .collect();
        // Invalidating the URL deletes its key and this tag set: an entry under any other
        // key (a variant, a key extended by cookies, a key function or forwarded
        // information) must be in the set, or it would outlive the invalidation.
        if variant.is_some() || key != exchange.url_key {
            tag_keys.push(key::url_tag_key(&state.key_prefix, exchange.url_key));
        }
        Some(Self {
            store: state.store.clone(),
            key,
            variant,
            status,
            headers: storable_headers(headers),
            stored_at_ms: received_at(headers, exchange),
            ttl,
            keep,
            lead,
            linger: Duration::ZERO,
            tag_keys,
            generate_etag: rules.generate_etag,
            budget: state.pending_writes.clone(),
            max_pending_writes: rules.max_pending_writes,
            targeted: rules.targeted.clone(),
            observe: state.observe.clone(),
            mark_ttl: Duration::ZERO,
        })
    }

    /// Encodes the entry, hands it to any coalesced waiters, and writes it in a background
    /// task, so the client never waits on the store for a miss.
    fn store(mut self, chunks: Vec<Bytes>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no tokio runtime; response not stored");
            return;
        };
        if self.generate_etag && !self.headers.contains_key(header::ETAG) {
            self.headers.insert(header::ETAG, key::body_etag(&chunks));
        }
        let entry = CachedResponse::encode(
            self.status,
            &self.headers,
            &chunks,
            self.stored_at_ms,
            self.ttl,
        );
        if let Some(lead) = &mut self.lead {
            if let Ok(StoredValue::Response(response)) =
                entry::decode(entry.clone(), &self.targeted)
            {
                let linger = response.ttl;
                lead.share(Arc::new(SharedResponse {
                    response,
                    variant: self.variant.clone(),
                }));
                self.linger = linger;
            }
        }
        let Some(slot) = self.budget.try_take(self.max_pending_writes) else {
            self.observe.not_stored(NotStored::PendingWritesFull);
            return;
        };
        runtime.spawn(async move {
            let _slot = slot;
            let (store, tags, keep) = (&self.store, &self.tag_keys, self.keep);
            let started = std::time::Instant::now();
            let result = match &self.variant {
                None => store.set_tagged(&self.key, entry, keep, tags).await,
                Some((names, variant_key)) => {
                    // Variant first, so the marker never points at a variant not yet written.
                    match store.set_tagged(variant_key, entry, keep, tags).await {
                        Ok(()) => {
                            store
                                .set_tagged(&self.key, entry::encode_variants(names), keep, tags)
                                .await
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match result {
                Ok(()) => self.observe.store_set(started.elapsed()),
                Err(e) => self.observe.store_error("set", &self.key, &e),
            }
            if let Some(lead) = &mut self.lead {
                lead.written(self.linger);
                // After the write: another instance waiting on the lock finds the entry as
                // soon as the lock is gone. Released here rather than when the lead drops,
                // so that `CacheLayer::flush` covers it.
                lead.release_lock().await;
            }
        });
    }
}

/// Drops every stored GET response of the URL whose key is `url_key`: the entry under the key
/// itself and every entry tagged with the URL (its `Vary` variants, entries keyed on cookies,
/// a key function or forwarded information). Returns whether anything was removed. A store
/// without tags has no such entries (it cannot store them), so its `Unsupported` is no error.
pub(crate) async fn drop_url(store: &dyn Store, prefix: &str, url_key: &str) -> Result<bool> {
    let deleted = store.delete(url_key).await?;
    let tagged = match store
        .invalidate_tag(&key::url_tag_key(prefix, url_key))
        .await
    {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::Unsupported => 0,
        Err(e) => return Err(e),
    };
    Ok(deleted || tagged > 0)
}

/// The response headers worth storing: hop-by-hop headers describe one connection, and
/// `Content-Length` is recomputed from the stored body on replay.
pub(crate) fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut stored = headers.clone();
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        stored.remove(name);
    }
    let cache_only = [X_CACHE, TAG_HEADERS[0].clone(), TAG_HEADERS[1].clone()];
    for name in entry::CONNECTION_HEADERS.into_iter().chain(cache_only) {
        stored.remove(name);
    }
    // A cache stamps a response that lacks a Date with the time it received it, so every
    // replay carries the same Date (RFC 9110 §6.6.1).
    if !stored.contains_key(header::DATE) {
        stored.insert(header::DATE, conditional::date_now());
    }
    stored
}

/// A random fraction in [0, 1) from the standard library's per-instance hash keys: enough
/// to spread expiry times, no cryptographic strength needed.
fn random_fraction() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(0u8);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}
