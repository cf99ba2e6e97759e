//! `CacheService`: the request flow, top to bottom in [`respond`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue, AGE, CONTENT_LENGTH};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::{CacheBody, Recorder};
use crate::coalesce::{self, Lead, Lock, Role, Shared};
use crate::entry::{self, CachedResponse, StoredValue};
use crate::invalidate;
use crate::key;
use crate::layer::Config;
use crate::conditional;
use crate::policy::{self, RequestAction, Vary, Verdict};
use crate::store::Store;

/// The header telling clients how the cache handled the request.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

const HIT: HeaderValue = HeaderValue::from_static("HIT");
const MISS: HeaderValue = HeaderValue::from_static("MISS");
const BYPASS: HeaderValue = HeaderValue::from_static("BYPASS");
const REFRESH: HeaderValue = HeaderValue::from_static("REFRESH");
const STALE: HeaderValue = HeaderValue::from_static("STALE");
const REVALIDATED: HeaderValue = HeaderValue::from_static("REVALIDATED");

/// RFC 9211's `Cache-Status`, sent alongside `X-Cache`.
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The [`Service`] made by [`CacheLayer`](crate::CacheLayer).
#[derive(Clone)]
pub struct CacheService<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> CacheService<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S> std::fmt::Debug for CacheService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheService").finish_non_exhaustive()
    }
}

/// The future returned by [`CacheService`].
pub struct ResponseFuture<B, E> {
    inner: BoxedFlow<B, E>,
}

/// The boxed [`respond`] future: an async block is clearer than a hand-written state machine,
/// and one allocation per request does not show in the benchmarks.
type BoxedFlow<B, E> = Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send>>;

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<B, E> std::fmt::Debug for ResponseFuture<B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CacheService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = Response<CacheBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<ResBody, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Call the service that `poll_ready` made ready, and keep a fresh clone for the next
        // request (tower-service's documented pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            inner: Box::pin(respond(self.config.clone(), inner, req)),
        }
    }
}

/// One request through the cache. Every store failure degrades to a miss: the cache never
/// turns a good response into an error.
async fn respond<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    mut req: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    // 1. May this request use the cache at all?
    let plan = policy::classify_request(&config.rules, req.method(), req.headers());
    let label = match plan.action {
        RequestAction::Pass => return Ok(inner.call(req).await?.map(CacheBody::passthrough)),
        RequestAction::Invalidate => return invalidate_after_write(&config, inner, req).await,
        RequestAction::HeadLookup => {
            let key = key::base_key(&config.key_prefix, &Method::GET, req.uri());
            if let Some(hit) = lookup(&config, &key, req.headers()).await {
                if judge(&config, &plan, &hit) == Verdict::Fresh {
                    return Ok(answer(hit, req.headers(), false, Outcome::Hit));
                }
            }
            return Ok(inner.call(req).await?.map(CacheBody::passthrough));
        }
        RequestAction::Bypass => {
            let mut response = inner.call(req).await?.map(CacheBody::passthrough);
            label_forwarded(response.headers_mut(), Outcome::Bypass);
            return Ok(response);
        }
        RequestAction::Refresh => Outcome::Refresh,
        RequestAction::Lookup => Outcome::Miss,
    };
    let key = key::base_key(&config.key_prefix, req.method(), req.uri());

    // 2-3. Look up (unless the client asked for a refresh) and judge the stored copy for
    // this request: serve it, serve it stale while refreshing, or keep it to validate with
    // the handler or to stand in for a failing handler.
    let mut stored = None;
    let mut stale_if_error = false;
    let mut lead = None;
    if label == Outcome::Miss {
        let looked_up_at = Instant::now();
        if let Some(entry) = lookup(&config, &key, req.headers()).await {
            match judge(&config, &plan, &entry) {
                Verdict::Fresh => return Ok(answer(entry, req.headers(), true, Outcome::Hit)),
                Verdict::StaleAccepted => {
                    return Ok(answer(entry, req.headers(), true, Outcome::Stale));
                }
                Verdict::StaleWhileRevalidate => {
                    let response = answer(entry, req.headers(), true, Outcome::Stale);
                    refresh_in_background(config, key, inner, req, looked_up_at, plan.authorized);
                    return Ok(response);
                }
                Verdict::Validate { if_error } => {
                    stale_if_error = if_error;
                    stored = Some(entry);
                }
                Verdict::Unusable => {}
            }
        }
        if plan.directives.only_if_cached {
            return Ok(gateway_timeout());
        }
        // A cold or expired key: let one request call the handler and the others reuse its
        // response.
        // Requests with `Authorization` neither lead nor follow: their replies are their own.
        if !plan.authorized {
            match coalesce(&config, &key, req.headers(), looked_up_at).await {
                Coalesced::Hit(hit) => return Ok(answer(hit, req.headers(), true, Outcome::Hit)),
                Coalesced::Lead(l) => lead = Some(l),
                Coalesced::Alone => {}
            }
        }
    }

    // 4. Call the handler; conditionally when the stored copy has validators, so an
    // unchanged resource costs the handler a 304 instead of a body.
    let request_headers = req.headers().clone();
    let validating = match stored.as_ref().and_then(|s| conditional::validation_headers(&s.headers)) {
        Some(validators) => {
            conditional::replace_conditionals(req.headers_mut(), validators);
            true
        }
        None => false,
    };
    let result = inner.call(req).await;
    if let Some(stale) = stored.take_if(|_| stale_if_error && failed(&result)) {
        return Ok(answer(stale, &request_headers, true, Outcome::StaleIfError));
    }
    let (mut parts, body) = result?.into_parts();
    if let Some(stale) = stored.take_if(|_| validating && parts.status == StatusCode::NOT_MODIFIED) {
        let refreshed = revalidated(&config, key, stale, &parts.headers, &request_headers, plan.authorized, lead);
        return Ok(answer(refreshed, &request_headers, true, Outcome::Revalidated));
    }

    // 5. Record the body while it streams to the client, if the response may be stored; it is
    // written in the background once complete.
    let recorder = plan_store(&config, key, &request_headers, &parts, &body, lead, plan.authorized);
    let label = if plan.authorized && recorder.is_none() { Outcome::Bypass } else { label };
    label_forwarded(&mut parts.headers, label);
    Ok(Response::from_parts(parts, CacheBody::recording(body, recorder)))
}

fn failed<B, E>(result: &Result<Response<B>, E>) -> bool {
    result.as_ref().map_or(true, |r| r.status().is_server_error())
}

/// `only-if-cached` with nothing usable stored (RFC 9111 §5.2.1.7).
fn gateway_timeout<B>() -> Response<CacheBody<B>> {
    let mut response = Response::new(CacheBody::replay(Bytes::new()));
    *response.status_mut() = StatusCode::GATEWAY_TIMEOUT;
    response.headers_mut().insert(X_CACHE, MISS);
    response.headers_mut().insert(CACHE_STATUS, HeaderValue::from_static("tower-redis-cache; fwd=miss; detail=only-if-cached"));
    response
}

/// A write through an unsafe method: call the handler; if it succeeded, drop the stored GET
/// responses of the URL and of same-origin `Location` / `Content-Location` targets before
/// answering, so the client's next read sees its write (RFC 9111 §4.4).
async fn invalidate_after_write<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let uri = req.uri().clone();
    let host = req.headers().get(header::HOST).cloned();
    let response = inner.call(req).await?;
    if response.status().is_success() || response.status().is_redirection() {
        let mut targets = vec![uri.clone()];
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let value = response.headers().get(name);
            targets.extend(value.and_then(|v| policy::same_origin_target(v, &uri, host.as_ref())));
        }
        for target in targets {
            let key = key::base_key(&config.key_prefix, &Method::GET, &target);
            if let Err(e) = config.store.delete(&key).await {
                tracing::debug!(key, error = %e, "invalidating after a write failed");
            }
        }
    }
    Ok(response.map(CacheBody::passthrough))
}

/// The stored response with the headers and lifetime a 304 from the handler gave it; the
/// updated entry is written back in the background.
fn revalidated(
    config: &Config,
    key: String,
    mut stale: CachedResponse,
    not_modified: &HeaderMap,
    request_headers: &HeaderMap,
    authorized: bool,
    lead: Option<Lead>,
) -> CachedResponse {
    conditional::merge_not_modified(&mut stale.headers, not_modified);
    let ttl = policy::storable_ttl(&config.rules, stale.status, &stale.headers, authorized);
    stale.stored_at_ms = entry::now_ms();
    stale.ttl = ttl.unwrap_or(Duration::ZERO);
    if let Some(ttl) = ttl {
        let parts = {
            let mut response = Response::new(());
            *response.status_mut() = stale.status;
            *response.headers_mut() = stale.headers.clone();
            response.into_parts().0
        };
        if let Some(pending) = PendingEntry::new(config, key, request_headers, &parts, ttl, lead) {
            pending.store(vec![stale.body.clone()]);
        }
    }
    stale
}

/// Cache-only headers (tags, CDN-Cache-Control / Surrogate-Control) are for the cache, not
/// for clients.
fn strip_cache_only_headers(headers: &mut HeaderMap) {
    for name in policy::TAG_HEADERS.iter().chain(&policy::TARGETED_HEADERS) {
        headers.remove(name);
    }
}

/// Marks a response that came from the handler.
fn label_forwarded(headers: &mut HeaderMap, outcome: Outcome) {
    strip_cache_only_headers(headers);
    headers.insert(X_CACHE, outcome.x_cache());
    headers.insert(CACHE_STATUS, outcome.forwarded_status());
}

/// How the cache answered, for `X-Cache` and `Cache-Status` (RFC 9211).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Miss,
    Bypass,
    Refresh,
    /// A stale copy the client accepted or that is being refreshed in the background.
    Stale,
    /// A stale copy served because the handler failed.
    StaleIfError,
    /// The handler confirmed the stored copy with a 304.
    Revalidated,
}

impl Outcome {
    fn x_cache(self) -> HeaderValue {
        match self {
            Outcome::Hit => HIT,
            Outcome::Miss => MISS,
            Outcome::Bypass => BYPASS,
            Outcome::Refresh => REFRESH,
            Outcome::Stale | Outcome::StaleIfError => STALE,
            Outcome::Revalidated => REVALIDATED,
        }
    }

    /// `Cache-Status` of a response that came from the handler.
    fn forwarded_status(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            Outcome::Bypass => "tower-redis-cache; fwd=bypass",
            Outcome::Refresh => "tower-redis-cache; fwd=request",
            _ => "tower-redis-cache; fwd=uri-miss",
        })
    }

    /// `Cache-Status` of an answer from a stored response with `ttl_left` seconds of
    /// freshness left (negative when stale).
    fn stored_status(self, ttl_left: i64) -> HeaderValue {
        let status = match self {
            Outcome::Stale => format!("tower-redis-cache; hit; ttl={ttl_left}; detail=stale"),
            Outcome::StaleIfError => format!("tower-redis-cache; fwd=stale; ttl={ttl_left}; detail=stale-if-error"),
            Outcome::Revalidated => format!("tower-redis-cache; fwd=stale; fwd-status=304; ttl={ttl_left}"),
            _ => format!("tower-redis-cache; hit; ttl={ttl_left}"),
        };
        HeaderValue::from_str(&status).expect("ASCII")
    }
}

/// A recorder that stores the response once its body has streamed through, if the response
/// may be stored at all.
fn plan_store<B: Body>(
    config: &Arc<Config>,
    key: String,
    request_headers: &HeaderMap,
    parts: &http::response::Parts,
    body: &B,
    lead: Option<Lead>,
    authorized: bool,
) -> Option<Recorder> {
    let rules = &config.rules;
    let ttl = policy::storable_ttl(rules, parts.status, &parts.headers, authorized)?;
    // A body announcing more than the limit is not recorded at all.
    if body.size_hint().lower() > rules.max_body_bytes as u64 {
        return None;
    }
    let pending = PendingEntry::new(config, key, request_headers, parts, ttl, lead)?;
    Some(Recorder::new(
        rules.max_body_bytes,
        Box::new(move |chunks| pending.store(chunks)),
    ))
}

/// The stored response for the request, following a `Vary` marker to the variant that
/// matches the request's headers; `None` when absent, unreadable, unreachable, or in a
/// content coding the request does not accept.
async fn lookup(config: &Config, key: &str, request: &HeaderMap) -> Option<CachedResponse> {
    let (response, _) = lookup_entry(&*config.store, key, request).await?;
    // Even without `Vary`, a client that did not ask for gzip must never receive gzip.
    conditional::accepts_encoding(request, &response.headers).then_some(response)
}

/// What a stored response is good for, for this request.
fn judge(config: &Config, plan: &policy::RequestPlan, entry: &CachedResponse) -> Verdict {
    policy::judge(&config.rules, plan, &entry.headers, entry.elapsed(entry::now_ms()), entry.ttl)
}

/// The stored response (fresh or not) and, for a `Vary` variant, its names and key.
async fn lookup_entry(
    store: &dyn Store,
    key: &str,
    request: &HeaderMap,
) -> Option<(CachedResponse, Option<(Vec<HeaderName>, String)>)> {
    match fetch(store, key).await? {
        StoredValue::Response(response) => Some((response, None)),
        StoredValue::Variants(names) => {
            let variant_key = key::variant_key(key, &names, request);
            match fetch(store, &variant_key).await? {
                StoredValue::Response(response) => Some((response, Some((names, variant_key)))),
                StoredValue::Variants(_) => None,
            }
        }
    }
}

async fn fetch(store: &dyn Store, key: &str) -> Option<StoredValue> {
    match store.get(key).await {
        Ok(Some(bytes)) => entry::decode(bytes)
            .inspect_err(|e| tracing::debug!(key, error = %e, "treating entry as a miss"))
            .ok(),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(key, error = %e, "cache store get failed; treating as a miss");
            None
        }
    }
}

/// How a cold-key request proceeds.
enum Coalesced {
    /// Another request (in this process or another) produced the response.
    Hit(CachedResponse),
    /// This request calls the handler and shares the result.
    Lead(Lead),
    /// This request calls the handler on its own (coalescing off, or waiting gave up).
    Alone,
}

/// Makes concurrent misses for one key wait for a single handler call: in this process
/// through the flight map, across processes (when enabled) through a lock in the store.
async fn coalesce(config: &Config, key: &str, headers: &HeaderMap, looked_up_at: Instant) -> Coalesced {
    let rules = &config.rules;
    if !rules.coalesce {
        return Coalesced::Alone;
    }
    let mut lead = match config.flights.join(key, looked_up_at) {
        Role::Follower(rx) => {
            return match coalesce::follow(rx, rules.coalesce_timeout, key, headers).await {
                Some(hit) => Coalesced::Hit(hit),
                None => Coalesced::Alone,
            };
        }
        Role::Leader(lead) => lead,
    };
    if !rules.lock_across_instances {
        return Coalesced::Lead(lead);
    }
    // Another instance may be computing this key: take its lock, or wait for its entry.
    let deadline = tokio::time::Instant::now() + rules.coalesce_timeout;
    loop {
        match Lock::try_acquire(&config.store, key, rules.lock_ttl).await {
            Ok(Some(lock)) => {
                // The previous holder may have just stored the entry and released the lock.
                if let Some((hit, variant)) = fresh_entry(config, key, headers).await {
                    lead.share(Shared::new(hit.clone(), variant));
                    return Coalesced::Hit(hit);
                }
                lead.hold(lock);
                return Coalesced::Lead(lead);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(key, error = %e, "cache lock unavailable; calling the handler");
                return Coalesced::Lead(lead);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Coalesced::Lead(lead);
        }
        tokio::time::sleep(LOCK_POLL_INTERVAL).await;
        if let Some((hit, variant)) = fresh_entry(config, key, headers).await {
            lead.share(Shared::new(hit.clone(), variant));
            return Coalesced::Hit(hit);
        }
    }
}

/// How often an instance waiting on another's lock looks for the entry.
const LOCK_POLL_INTERVAL: Duration = Duration::from_millis(20);

async fn fresh_entry(
    config: &Config,
    key: &str,
    headers: &HeaderMap,
) -> Option<(CachedResponse, Option<(Vec<HeaderName>, String)>)> {
    let (response, variant) = lookup_entry(&*config.store, key, headers).await?;
    response.staleness(entry::now_ms()).is_none().then_some((response, variant))
}

/// Calls the handler for a stale key in the background and stores its response, unless a
/// refresh of the key is already running (here, or in another instance when cross-instance
/// locking is on).
fn refresh_in_background<S, ReqBody, ResBody>(
    config: Arc<Config>,
    key: String,
    mut inner: S,
    req: Request<ReqBody>,
    looked_up_at: Instant,
    authorized: bool,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    let Role::Leader(mut lead) = config.flights.join(&key, looked_up_at) else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        if config.rules.lock_across_instances {
            match Lock::try_acquire(&config.store, &key, config.rules.lock_ttl).await {
                Ok(Some(lock)) => lead.hold(lock),
                _ => return,
            }
        }
        let request_headers = req.headers().clone();
        let Ok(response) = inner.call(req).await else {
            return;
        };
        let (parts, body) = response.into_parts();
        let recorder = plan_store(&config, key, &request_headers, &parts, &body, Some(lead), authorized);
        drain(CacheBody::recording(body, recorder)).await;
    });
}

/// Reads a body to its end (so its recorder sees it complete).
async fn drain<B: Body>(body: B) {
    let mut body = std::pin::pin!(body);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if frame.is_err() {
            return;
        }
    }
}

/// The answer from a stored response: a 304 when the request's own conditional headers
/// match it, the full stored response otherwise (without its body for HEAD).
fn answer<B>(hit: CachedResponse, request: &HeaderMap, with_body: bool, outcome: Outcome) -> Response<CacheBody<B>> {
    let now = entry::now_ms();
    let age = hit.age(now).as_secs();
    let ttl_left = (hit.ttl.as_millis() as i64 - hit.elapsed(now).as_millis() as i64).div_euclid(1000);
    let body_len = hit.body.len();
    let (status, mut headers, body) = if conditional::not_modified(&hit.headers, request) {
        (StatusCode::NOT_MODIFIED, conditional::not_modified_headers(&hit.headers), Bytes::new())
    } else {
        let body = if with_body { hit.body } else { Bytes::new() };
        (hit.status, hit.headers, body)
    };
    // The age the origin reported when we stored the response, plus our own.
    let origin_age = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    headers.insert(AGE, HeaderValue::from(origin_age.saturating_add(age)));
    if body_allowed(status) {
        // Also right for HEAD, which must announce the length a GET would get.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    strip_cache_only_headers(&mut headers);
    headers.insert(X_CACHE, outcome.x_cache());
    headers.insert(CACHE_STATUS, outcome.stored_status(ttl_left));
    let mut response = Response::new(CacheBody::replay(body));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn body_allowed(status: StatusCode) -> bool {
    !(status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED)
}

/// What a storable miss will write once its body has streamed through completely.
struct PendingEntry {
    store: Arc<dyn Store>,
    key: String,
    /// For a response with `Vary`: the header names and the variant's own key.
    variant: Option<(Vec<HeaderName>, String)>,
    status: StatusCode,
    headers: HeaderMap,
    /// How long the entry is fresh.
    ttl: Duration,
    /// How long the store keeps it: the TTL plus any grace for serving it stale.
    keep: Duration,
    /// The coalesced requests waiting for this response, if this request leads them.
    lead: Option<Lead>,
    /// The tag sets the entry is recorded in.
    tag_keys: Vec<String>,
    /// Give the entry a strong `ETag` (a hash of its body) if it has none.
    generate_etag: bool,
}

impl PendingEntry {
    fn new(
        config: &Config,
        key: String,
        request: &HeaderMap,
        response: &http::response::Parts,
        ttl: Duration,
        lead: Option<Lead>,
    ) -> Option<Self> {
        let variant = match policy::vary_names(&response.headers) {
            Vary::Any => return None,
            Vary::Headers(names) if names.is_empty() => None,
            Vary::Headers(names) => {
                let variant_key = key::variant_key(&key, &names, request);
                Some((names, variant_key))
            }
        };
        let rules = &config.rules;
        // Entries written together should not all expire together.
        let ttl = if rules.ttl_jitter > 0.0 {
            ttl.mul_f64(1.0 - rules.ttl_jitter * coalesce::random_fraction())
        } else {
            ttl
        };
        let keep = ttl + policy::keep_past_ttl(rules, &response.headers);
        let tag_keys = config
            .tags
            .iter()
            .cloned()
            .chain(policy::response_tags(&response.headers))
            .map(|tag| invalidate::tag_key(&config.key_prefix, &tag))
            .collect();
        Some(Self {
            store: config.store.clone(),
            key,
            variant,
            status: response.status,
            headers: storable_headers(&response.headers),
            ttl,
            keep,
            lead,
            tag_keys,
            generate_etag: rules.generate_etag,
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
        let entry = CachedResponse::encode(self.status, &self.headers, &chunks, entry::now_ms(), self.ttl);
        if let Some(lead) = &mut self.lead {
            if let Ok(StoredValue::Response(response)) = entry::decode(entry.clone()) {
                lead.share(Shared::new(response, self.variant.clone()));
            }
        }
        runtime.spawn(async move {
            let (store, tags, keep) = (&self.store, &self.tag_keys, self.keep);
            let result = match &self.variant {
                None => store.set_tagged(&self.key, entry, keep, tags).await,
                Some((names, variant_key)) => {
                    // Variant first, so the marker never points at a variant not yet written.
                    match store.set_tagged(variant_key, entry, keep, tags).await {
                        Ok(()) => store.set_tagged(&self.key, entry::encode_variants(names), keep, tags).await,
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(key = %self.key, error = %e, "cache store set failed");
            }
            // `self.lead` drops here, after the write: another instance waiting on the lock
            // finds the entry as soon as the lock is gone.
        });
    }
}

/// The response headers worth storing: hop-by-hop headers describe one connection, and
/// `Content-Length` is recomputed from the stored body on replay.
fn storable_headers(headers: &HeaderMap) -> HeaderMap {
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
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("proxy-connection"),
        CONTENT_LENGTH,
        X_CACHE,
        policy::TAG_HEADERS[0].clone(),
        policy::TAG_HEADERS[1].clone(),
    ] {
        stored.remove(name);
    }
    // A cache stamps a response that lacks a Date with the time it received it, so every
    // replay carries the same Date (RFC 9110 §6.6.1).
    if !stored.contains_key(header::DATE) {
        stored.insert(header::DATE, conditional::date_now());
    }
    stored
}
