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
use crate::observe::{NotStored, Observer};
use crate::rules::conditional;
use crate::rules::freshness::{self, Unstorable};
use crate::rules::tags::{self, TAG_HEADERS};
use crate::rules::vary::{vary_names, Vary};
use crate::store::Store;

use super::answer::X_CACHE;
use super::body::Recorder;
use super::config::{Config, Lead, Shared, WriteBudget};

/// The request side of a handler call, as storing its response needs it.
pub(crate) struct Exchange<'a> {
    pub(crate) request_headers: &'a HeaderMap,
    /// When the request went to the handler (for the response's age, RFC 9111 §4.2.3).
    pub(crate) sent_at_ms: u64,
    /// The request carried credentials: only a response marked shareable may be stored.
    pub(crate) authorized: bool,
}

/// A recorder that stores the response once its body has streamed through, if the response
/// may be stored at all.
pub(crate) fn plan_store<B: Body>(
    config: &Arc<Config>,
    key: String,
    exchange: &Exchange<'_>,
    parts: &http::response::Parts,
    body: &B,
    lead: Option<Lead>,
) -> Option<Recorder> {
    let rules = &config.rules;
    // The response's directives, parsed once for every decision about storing it.
    let cc = CacheControl::for_cache(&parts.headers, &rules.targeted);
    let not_stored = |reason| {
        config.observe.not_stored(reason);
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
        Err(reason) => return not_stored(not_stored_reason(reason)),
    };
    // A body announcing more than the limit is not recorded at all.
    if body.size_hint().lower() > rules.max_body_bytes as u64 {
        return not_stored(NotStored::Size);
    }
    // A body must end at the length it announced, or it was cut short (or padded).
    let Ok(expected) = declared_length(&parts.headers) else {
        return not_stored(NotStored::BadLength);
    };
    let Some(pending) = PendingEntry::new(
        config,
        key,
        exchange,
        (parts.status, &parts.headers, &cc),
        ttl,
        lead,
    ) else {
        return not_stored(NotStored::VaryStar);
    };
    Some(Recorder::new(
        rules.max_body_bytes,
        expected,
        config.observe.clone(),
        Box::new(move |chunks| pending.store(chunks)),
    ))
}

/// The stats' name for why the rules refused a response.
fn not_stored_reason(reason: Unstorable) -> NotStored {
    match reason {
        Unstorable::Status => NotStored::Status,
        Unstorable::SetCookie => NotStored::SetCookie,
        Unstorable::Private => NotStored::Private,
        Unstorable::NoStore => NotStored::NoStore,
        Unstorable::Authorization => NotStored::Authorization,
        Unstorable::EventStream => NotStored::EventStream,
        Unstorable::VaryStar => NotStored::VaryStar,
        Unstorable::NoFreshness => NotStored::NoFreshness,
    }
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
    config: &Config,
    key: String,
    mut stale: CachedResponse,
    not_modified: &HeaderMap,
    exchange: &Exchange<'_>,
    lead: Option<Lead>,
) -> CachedResponse {
    conditional::merge_not_modified(&mut stale.headers, not_modified);
    let rules = &config.rules;
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
        if let Some(mut pending) = PendingEntry::new(config, key, exchange, response, ttl, lead) {
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
    config: &Config,
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
        revalidated(config, key, stale, head.headers(), exchange, None);
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
    lead: Option<Lead>,
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
}

impl PendingEntry {
    fn new(
        config: &Config,
        key: String,
        exchange: &Exchange<'_>,
        (status, headers, cc): (StatusCode, &HeaderMap, &CacheControl),
        ttl: Duration,
        lead: Option<Lead>,
    ) -> Option<Self> {
        let variant = match vary_names(headers) {
            Vary::Any => return None,
            Vary::Headers(names) if names.is_empty() => None,
            Vary::Headers(names) => {
                let variant_key = key::variant_key(&key, &names, exchange.request_headers);
                Some((names, variant_key))
            }
        };
        let rules = &config.rules;
        // Entries written together should not all expire together.
        let ttl = if rules.ttl_jitter > 0.0 {
            ttl.mul_f64(1.0 - rules.ttl_jitter * random_fraction())
        } else {
            ttl
        };
        let keep = ttl.saturating_add(freshness::keep_past_ttl(rules, cc, headers));
        let namespace = key::layer_namespace(&config.key_prefix);
        let tag_keys = config
            .tags
            .iter()
            .cloned()
            .chain(tags::response_tags(headers))
            .map(|tag| key::tag_key(&namespace, &tag))
            .collect();
        Some(Self {
            store: config.store.clone(),
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
            budget: config.pending_writes.clone(),
            max_pending_writes: rules.max_pending_writes,
            targeted: rules.targeted.clone(),
            observe: config.observe.clone(),
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
                lead.share(Arc::new(Shared {
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
            }
            // `self.lead` drops here, after the write: another instance waiting on the lock
            // finds the entry as soon as the lock is gone.
        });
    }
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
