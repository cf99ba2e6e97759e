//! `CacheService`: the request flow, top to bottom in [`respond`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use tower_service::Service;
use tracing::Instrument;

use crate::clock;
use crate::coalesce::{Lock, Role};
use crate::entry::CachedResponse;
use crate::key;
use crate::rules::conditional;
use crate::rules::freshness::Verdict;
use crate::rules::request::{self, BypassReason, RequestAction, RequestPlan};

use super::answer::{answer, gateway_timeout, label_forwarded, Outcome};
use super::body::CacheBody;
use super::config::Config;
use super::join::{coalesce, Coalesced};
use super::lookup::{judge_entry, lookup, lookup_in_process};
use super::write::{drop_url, head_refreshed, plan_store, revalidated, Exchange};

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
    inner: Flow<B, E>,
}

enum Flow<B, E> {
    /// Answered in [`CacheService::call`]: a fresh hit in process memory.
    Answered(std::future::Ready<Result<Response<CacheBody<B>>, E>>),
    /// Everything else: [`respond`].
    Running(BoxedFlow<B, E>),
}

/// The boxed [`respond`] future: an async block is clearer than a hand-written state machine.
type BoxedFlow<B, E> = Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send>>;

impl<B, E> Future for ResponseFuture<B, E> {
    type Output = Result<Response<CacheBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Both variants are `Unpin` (a `Ready`, a `Pin<Box>`).
        match &mut self.get_mut().inner {
            Flow::Answered(ready) => Pin::new(ready).poll(cx),
            Flow::Running(flow) => flow.as_mut().poll(cx),
        }
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
        // One span per request, at debug: the key, the outcome and the store's time are
        // recorded on it as the flow decides them.
        let span = tracing::debug_span!(
            "cache",
            route = self.config.observe.route(),
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
            store_get_us = tracing::field::Empty,
        );
        let step = match span.in_scope(|| begin(&self.config, req)) {
            Begun::Answered(response) => {
                // The inner service stays ready for the next request.
                let inner = Flow::Answered(std::future::ready(Ok(response)));
                return ResponseFuture { inner };
            }
            Begun::Flow(step) => step,
        };
        // Call the service that `poll_ready` made ready, and keep a fresh clone for the next
        // request (tower-service's documented pattern).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let flow = respond(self.config.clone(), inner, step).instrument(span);
        ResponseFuture {
            inner: Flow::Running(Box::pin(flow)),
        }
    }
}

/// What [`begin`] decided.
enum Begun<ReqBody, ResBody> {
    /// A fresh hit, answered.
    Answered(Response<CacheBody<ResBody>>),
    /// The rest is [`respond`]'s.
    Flow(Step<ReqBody>),
}

/// Where [`respond`] picks the request up.
enum Step<B> {
    /// Not the cache's business: straight to the handler.
    Pass(Request<B>),
    /// A write: the handler, then the URL's stored responses dropped.
    Invalidate(Request<B>),
    /// The handler, labelled with why the cache stood aside.
    Bypass(Request<B>, BypassReason),
    /// A request for the stored response under `key`.
    Lookup(Lookup<B>),
}

struct Lookup<B> {
    req: Request<B>,
    plan: RequestPlan,
    /// What the answer says if it comes from the handler.
    label: Outcome,
    key: String,
    /// What a store in process memory held, and the flights' mark taken just before
    /// looking; `None` when the lookup needs I/O (or a refresh skips it).
    found: Option<(u64, Option<Arc<CachedResponse>>)>,
}

/// Steps 1-3 where they need no waiting, so that a fresh hit in process memory is answered
/// without a future of its own: may this request use the cache, under which key, and (on a
/// store that keeps its values in this process) is there a fresh response for it?
fn begin<ReqBody, ResBody>(config: &Config, req: Request<ReqBody>) -> Begun<ReqBody, ResBody> {
    // 1. May this request use the cache at all, and under which key?
    let plan = request::classify_request(&config.rules, req.method(), req.headers());
    let (label, method) = match plan.action {
        RequestAction::Pass => return Begun::Flow(Step::Pass(req)),
        RequestAction::Invalidate => return Begun::Flow(Step::Invalidate(req)),
        RequestAction::Bypass(reason) => return Begun::Flow(Step::Bypass(req, reason)),
        // A HEAD is answered from the GET entry.
        RequestAction::HeadLookup => (Outcome::Hit, Method::GET),
        RequestAction::Refresh => (Outcome::Refresh, req.method().clone()),
        RequestAction::Lookup => (Outcome::Miss, req.method().clone()),
    };
    let (req, key) = request_key(config, &method, req);
    let key = match key {
        Ok(key) => key,
        Err(key::NoKey::Declined) => return Begun::Flow(Step::Bypass(req, BypassReason::NoKey)),
        Err(key::NoKey::AuthorityMismatch) => {
            return Begun::Flow(Step::Bypass(req, BypassReason::AuthorityMismatch))
        }
    };
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("key", key.as_str());
    }
    // 2. Look up, if the store can answer now (a refresh does not look).
    let mut found = None;
    if label != Outcome::Refresh {
        let looked_up_at = config.flights.mark();
        found = lookup_in_process(config, &key, req.headers()).map(|f| (looked_up_at, f));
    }
    // 3. Serve it if fresh; anything else (stale, validation, absent) is respond's.
    if let Some((_, Some(entry))) = &found {
        if judge_entry(config, &plan, entry) == Verdict::Fresh {
            let with_body = plan.action != RequestAction::HeadLookup;
            // The entry is shared with the store's memo slot: a clone of the `Arc`.
            return Begun::Answered(answer(
                config,
                Arc::clone(entry),
                req.headers(),
                with_body,
                Outcome::Hit,
            ));
        }
    }
    Begun::Flow(Step::Lookup(Lookup {
        req,
        plan,
        label,
        key,
        found,
    }))
}

/// One request through the cache, from where [`begin`] left it. Every store failure
/// degrades to a miss: the cache never turns a good response into an error.
async fn respond<S, ReqBody, ResBody>(
    config: Arc<Config>,
    mut inner: S,
    step: Step<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    let Lookup {
        req,
        plan,
        label,
        key,
        found,
    } = match step {
        Step::Pass(req) => return Ok(inner.call(req).await?.map(CacheBody::passthrough)),
        Step::Invalidate(req) => return invalidate_after_write(&config, inner, req).await,
        Step::Bypass(req, reason) => return bypass(&config, inner, req, reason).await,
        Step::Lookup(lookup) => lookup,
    };
    if plan.action == RequestAction::HeadLookup {
        let stored = match found {
            Some((_, stored)) => stored,
            None => lookup(&config, &key, req.headers()).await,
        };
        let stored = match stored {
            Some(hit) if judge_entry(&config, &plan, &hit) == Verdict::Fresh => {
                return Ok(answer(&config, hit, req.headers(), false, Outcome::Hit));
            }
            other => other.map(Arc::unwrap_or_clone),
        };
        // Not fresh: ask the handler. Its HEAD response may refresh the stored GET
        // response's headers when it is the same representation (RFC 9111 §4.3.5).
        let request_headers = req.headers().clone();
        let url_key = url_key(&config, &req);
        let sent_at_ms = clock::now_ms();
        let response = inner.call(req).await?;
        if let Some(stale) = stored {
            let exchange = Exchange {
                request_headers: &request_headers,
                url_key: &url_key,
                sent_at_ms,
                authorized: plan.authorized,
            };
            head_refreshed(&config, key, stale, &response, &exchange);
        }
        return Ok(response.map(CacheBody::passthrough));
    }
    let mut req = req;

    // 2-3. Look up (unless the client asked for a refresh, or `begin` looked already) and
    // judge the stored copy for this request: serve it, serve it stale while refreshing, or
    // keep it to validate with the handler or to stand in for a failing handler.
    let mut stored = None;
    let mut stale_if_error = false;
    let mut lead = None;
    if label == Outcome::Miss {
        let (looked_up_at, found) = match found {
            Some(found) => found,
            None => {
                let looked_up_at = config.flights.mark();
                (looked_up_at, lookup(&config, &key, req.headers()).await)
            }
        };
        if let Some(entry) = found {
            match judge_entry(&config, &plan, &entry) {
                Verdict::Fresh => {
                    return Ok(answer(&config, entry, req.headers(), true, Outcome::Hit))
                }
                Verdict::StaleAccepted => {
                    return Ok(answer(&config, entry, req.headers(), true, Outcome::Stale));
                }
                Verdict::StaleWhileRevalidate => {
                    let response = answer(&config, entry, req.headers(), true, Outcome::Stale);
                    refresh_in_background(config, key, inner, req, looked_up_at, plan.authorized);
                    return Ok(response);
                }
                Verdict::Validate { if_error } => {
                    stale_if_error = if_error;
                    stored = Some(Arc::unwrap_or_clone(entry));
                }
                Verdict::Unusable => {}
            }
        }
        if plan.directives.only_if_cached {
            return Ok(gateway_timeout(&config));
        }
        // A cold or expired key: let one request call the handler and the others reuse its
        // response.
        // Requests with `Authorization` neither lead nor follow: their replies are their own.
        if !plan.authorized {
            match coalesce(&config, &plan, &key, req.headers(), looked_up_at).await {
                Coalesced::Hit(hit) => {
                    return Ok(answer(
                        &config,
                        Arc::new(hit),
                        req.headers(),
                        true,
                        Outcome::Coalesced,
                    ))
                }
                Coalesced::Lead(l) => lead = Some(l),
                Coalesced::Alone => {}
            }
        }
    }

    // 4. Call the handler; conditionally when the stored copy has validators, so an
    // unchanged resource costs the handler a 304 instead of a body.
    let request_headers = req.headers().clone();
    let url_key = url_key(&config, &req);
    let validating = match stored
        .as_ref()
        .and_then(|s| conditional::validation_headers(&s.headers))
    {
        Some(validators) => {
            conditional::replace_conditionals(req.headers_mut(), validators);
            true
        }
        None => false,
    };
    let exchange = Exchange {
        request_headers: &request_headers,
        url_key: &url_key,
        sent_at_ms: clock::now_ms(),
        authorized: plan.authorized,
    };
    let called_at = std::time::Instant::now();
    let result = inner.call(req).await;
    config.observe.handler(called_at.elapsed());
    if let Some(stale) = stored.take_if(|_| stale_if_error && failed(&result)) {
        return Ok(answer(
            &config,
            Arc::new(stale),
            &request_headers,
            true,
            Outcome::StaleIfError,
        ));
    }
    let (mut parts, body) = result?.into_parts();
    if let Some(stale) = stored.take_if(|_| validating && parts.status == StatusCode::NOT_MODIFIED)
    {
        let refreshed = revalidated(&config, key, stale, &parts.headers, &exchange, lead);
        return Ok(answer(
            &config,
            Arc::new(refreshed),
            &request_headers,
            true,
            Outcome::Revalidated,
        ));
    }

    // 5. Record the body while it streams to the client, if the response may be stored; it is
    // written in the background once complete.
    let recorder = plan_store(&config, key, &exchange, &parts, &body, lead);
    let label = if plan.authorized && recorder.is_none() {
        Outcome::Bypass(BypassReason::Authorization)
    } else {
        label
    };
    label_forwarded(&config, &mut parts.headers, label);
    Ok(Response::from_parts(
        parts,
        CacheBody::recording(body, recorder),
    ))
}

/// Calls the handler and labels its response as having bypassed the cache, and why.
async fn bypass<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    req: Request<ReqBody>,
    reason: BypassReason,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let mut response = inner.call(req).await?.map(CacheBody::passthrough);
    label_forwarded(config, response.headers_mut(), Outcome::Bypass(reason));
    Ok(response)
}

/// The URI a request is keyed on: under axum's `nest`, the original one (nested routers see
/// the path without their prefix, and two of them must never share keys).
fn key_uri<'a>(uri: &'a Uri, extensions: &'a http::Extensions) -> &'a Uri {
    #[cfg(feature = "axum")]
    if let Some(axum::extract::OriginalUri(uri)) = extensions.get() {
        return uri;
    }
    let _ = extensions;
    uri
}

/// The key of the request's URL (see [`key::Keying::url_key`]), which every entry stored for
/// it under another key is tagged with; the host is recorded for relative invalidations.
fn url_key<B>(config: &Config, req: &Request<B>) -> String {
    let uri = key_uri(req.uri(), req.extensions());
    let host = match config.keying.host {
        true => key::authority(uri, req.headers()),
        false => None,
    };
    if let Some(host) = &host {
        config.hosts.record(host);
    }
    config
        .keying
        .url_key_on(&config.key_prefix, uri, host.as_deref())
}

/// The key of the entry `method` would use for `req`.
fn request_key<B>(
    config: &Config,
    method: &Method,
    req: Request<B>,
) -> (Request<B>, Result<String, key::NoKey>) {
    // The key function sees the request's head; taking it apart and back is two moves.
    let (parts, body) = req.into_parts();
    let uri = key_uri(&parts.uri, &parts.extensions);
    let key = config.keying.key(&config.key_prefix, method, uri, &parts);
    (Request::from_parts(parts, body), key)
}

fn failed<B, E>(result: &Result<Response<B>, E>) -> bool {
    result
        .as_ref()
        .map_or(true, |r| r.status().is_server_error())
}

/// A write through an unsafe method: call the handler; if it succeeded, drop the stored GET
/// responses of the URL and of same-origin `Location` / `Content-Location` targets before
/// answering, so the client's next read sees its write (RFC 9111 §4.4). Every entry of each
/// URL goes: its `Vary` variants and the entries keyed on cookies, a key function or
/// forwarded information, whoever stored them.
async fn invalidate_after_write<S, ReqBody, ResBody>(
    config: &Config,
    mut inner: S,
    req: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let (parts, body) = req.into_parts();
    let uri = key_uri(&parts.uri, &parts.extensions).clone();
    let request_headers = parts.headers.clone();
    let response = inner.call(Request::from_parts(parts, body)).await?;
    if response.status().is_success() || response.status().is_redirection() {
        let host = request_headers.get(header::HOST);
        let mut targets = vec![uri.clone()];
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let value = response.headers().get(name);
            targets.extend(value.and_then(|v| request::same_origin_target(v, &uri, host)));
        }
        for target in targets {
            let url_key = (config.keying).url_key(&config.key_prefix, &target, &request_headers);
            if let Err(e) = drop_url(&*config.store, &config.key_prefix, &url_key).await {
                config.observe.store_error("delete", &url_key, &e);
            }
        }
    }
    Ok(response.map(CacheBody::passthrough))
}

/// Calls the handler for a stale key in the background and stores its response, unless a
/// refresh of the key is already running (here, or in another instance when cross-instance
/// locking is on).
fn refresh_in_background<S, ReqBody, ResBody>(
    config: Arc<Config>,
    key: String,
    mut inner: S,
    req: Request<ReqBody>,
    looked_up_at: u64,
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
    // Tracked until the response is stored, so `CacheLayer::flush` waits for the refresh.
    let task = config.pending_writes.track();
    runtime.spawn(async move {
        let _task = task;
        if config.rules.lock_across_instances {
            match Lock::try_acquire(&config.store, &key, config.rules.lock_ttl).await {
                Ok(Some(lock)) => lead.hold(lock),
                _ => return,
            }
        }
        let request_headers = req.headers().clone();
        let url_key = url_key(&config, &req);
        let exchange = Exchange {
            request_headers: &request_headers,
            url_key: &url_key,
            sent_at_ms: clock::now_ms(),
            authorized,
        };
        let Ok(response) = inner.call(req).await else {
            return;
        };
        let (parts, body) = response.into_parts();
        let recorder = plan_store(&config, key, &exchange, &parts, &body, Some(lead));
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
