//! `CacheService`: the layer's service, and the request flow, top to bottom in [`begin`] and
//! [`respond`].

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
use crate::observe::{Bypass, Event, Served};
use crate::rules::conditional;
use crate::rules::freshness::Verdict;
use crate::rules::request::{self, RequestAction, RequestPlan};
use crate::settings::clamp;

use super::answer::{answer, answer_at, gateway_timeout, handler_timeout, label_forwarded};
use super::body::CacheBody;
use super::future::{BoxedFlow, ResponseFuture};
use super::join::{coalesce, throttled, Coalesced};
use super::lookup::{
    judge_entry, judge_entry_at, lookup, lookup_in_process, lookup_not_in_process, Found,
};
use super::state::{LayerState, ResponseLead};
use super::write::{
    drop_url, fail_safe, failed_without_stand_in, head_refreshed, plan_store, revalidated, Exchange,
};

/// The [`Service`] made by [`CacheLayer`](crate::CacheLayer).
#[derive(Clone)]
pub struct CacheService<S> {
    inner: S,
    state: Arc<LayerState>,
}

impl<S> CacheService<S> {
    pub(crate) fn new(inner: S, state: Arc<LayerState>) -> Self {
        Self { inner, state }
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
            route = self.state.observe.route(),
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
            store_get_us = tracing::field::Empty,
        );
        let step = match span.in_scope(|| begin(&self.state, req)) {
            Begun::Answered(response, refresh) => {
                if let Some(ahead) = refresh {
                    // The ready service refreshes the entry; a clone waits for the next
                    // request (and its `poll_ready`).
                    let clone = self.inner.clone();
                    let inner = std::mem::replace(&mut self.inner, clone);
                    let state = self.state.clone();
                    refresh_in_background(
                        state,
                        ahead.key,
                        inner,
                        ahead.req,
                        ahead.looked_up_at,
                        ahead.authorized,
                        true,
                    );
                }
                // Otherwise the inner service stays ready for the next request.
                return ResponseFuture::answered(response);
            }
            Begun::Flow(step) => step,
        };
        // Call the service that `poll_ready` made ready, and keep a fresh clone for the next
        // request (tower-service's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        // One boxed future per path, each only as large as its own path needs: a hit's is
        // moved and allocated on every request, and would otherwise be as large as the
        // largest path's.
        let flow: BoxedFlow<ResBody, S::Error> = match step {
            Step::Pass(req) => {
                let call = inner.call(req);
                Box::pin(
                    async move { Ok(call.await?.map(CacheBody::passthrough)) }.instrument(span),
                )
            }
            Step::Invalidate(req) => Box::pin(
                async move { invalidate_after_write(&state, inner, req).await }.instrument(span),
            ),
            Step::Bypass(req, reason) => {
                Box::pin(async move { bypass(&state, inner, req, reason).await }.instrument(span))
            }
            Step::Lookup(lookup) => Box::pin(respond(state, inner, lookup).instrument(span)),
        };
        ResponseFuture::running(flow)
    }
}

/// What [`begin`] decided.
enum Begun<ReqBody, ResBody> {
    /// A fresh hit, answered; with the request when the entry is due to be refreshed ahead of
    /// its expiry.
    Answered(Response<CacheBody<ResBody>>, Option<RefreshAhead<ReqBody>>),
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
    Bypass(Request<B>, Bypass),
    /// A request for the stored response under `key`.
    Lookup(Lookup<B>),
}

/// A fresh hit past the route's `refresh_ahead` fraction of its lifetime: its request
/// refreshes the entry in the background.
struct RefreshAhead<B> {
    req: Request<B>,
    key: String,
    looked_up_at: u64,
    authorized: bool,
}

struct Lookup<B> {
    req: Request<B>,
    plan: RequestPlan,
    /// What the answer says if it comes from the handler.
    label: Served,
    key: String,
    /// What a store in process memory held, and the flights' mark taken just before
    /// looking; `None` when the lookup needs I/O (or a refresh skips it).
    found: Option<(u64, Found<Arc<CachedResponse>>)>,
}

/// Steps 1-3 where they need no waiting, so that a fresh hit in process memory is answered
/// without a future of its own: may this request use the cache, under which key, and (on a
/// store that keeps its values in this process) is there a fresh response for it?
fn begin<ReqBody, ResBody>(state: &LayerState, req: Request<ReqBody>) -> Begun<ReqBody, ResBody> {
    // 1. May this request use the cache at all?
    let plan = request::classify_request(&state.rules, req.method(), req.headers());
    let (label, method) = match plan.action {
        RequestAction::Pass => return Begun::Flow(Step::Pass(req)),
        RequestAction::Invalidate => return Begun::Flow(Step::Invalidate(req)),
        RequestAction::Bypass(reason) => return Begun::Flow(Step::Bypass(req, reason)),
        // A HEAD is answered from the GET entry.
        RequestAction::HeadLookup => (Served::Hit, Method::GET),
        RequestAction::Refresh => (Served::Refresh, req.method().clone()),
        RequestAction::Lookup => (Served::Miss, req.method().clone()),
    };
    // 2. Under which key?
    let (req, key) = request_key(state, &method, req);
    let key = match key {
        Ok(key) => key,
        Err(key::NoKey::Declined) => return Begun::Flow(Step::Bypass(req, Bypass::NoKey)),
        Err(key::NoKey::AuthorityMismatch) => {
            return Begun::Flow(Step::Bypass(req, Bypass::AuthorityMismatch))
        }
    };
    let span = tracing::Span::current();
    if !span.is_disabled() {
        span.record("key", key.as_str());
    }
    // 3. Look up, if the store can answer now (a refresh does not look), and serve it if
    // fresh; anything else (stale, validation, absent) is respond's.
    let mut found = None;
    if label != Served::Refresh {
        let looked_up_at = state.flights.mark();
        found = lookup_in_process(state, &key, req.headers()).map(|f| (looked_up_at, f));
    }
    if let Some((looked_up_at, Found::Entry(entry))) = &found {
        let now = clock::now_ms();
        if judge_entry_at(state, &plan, entry, now) == Verdict::Fresh {
            let with_body = plan.action != RequestAction::HeadLookup;
            let due = with_body && refresh_due(state, entry, now);
            // The entry is shared with the store's memo slot: a clone of the `Arc`.
            let response = answer_at(
                state,
                Arc::clone(entry),
                req.headers(),
                with_body,
                Served::Hit,
                now,
            );
            let refresh = due.then(|| RefreshAhead {
                req,
                key,
                looked_up_at: *looked_up_at,
                authorized: plan.authorized,
            });
            return Begun::Answered(response, refresh);
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

/// A request for a stored response, from where [`begin`] left it (the other steps are
/// answered in [`CacheService::call`]). Every store failure degrades to a miss: the cache
/// never turns a good response into an error.
///
/// Only the lookup is awaited here; the rest of a miss runs in a future of its own, boxed:
/// this future, allocated and moved on every hit, stays small.
// A function returning an `async` block rather than an `async fn`: an `async fn` keeps its
// arguments twice in its future (as passed, and bound again as locals), 1,200 bytes against
// 768 here.
#[allow(clippy::manual_async_fn)]
fn respond<S, ReqBody, ResBody>(
    state: Arc<LayerState>,
    inner: S,
    mut step: Lookup<ReqBody>,
) -> impl Future<Output = Result<Response<CacheBody<ResBody>>, S::Error>> + Send
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    async move {
        // 3. Look up, unless `begin` looked already or the client asked for a refresh. Here
        // the store has just said it needs I/O for this key (`begin` asked it).
        if step.found.is_none() && step.label != Served::Refresh {
            let looked_up_at = state.flights.mark();
            let found = lookup_not_in_process(&state, &step.key, step.req.headers()).await;
            step.found = Some((looked_up_at, found));
        }
        // Decided in a plain function, so that nothing it returns is held across the await.
        let rest: BoxedFlow<ResBody, S::Error> = match judged(&state, inner, step) {
            Judged::Answered(response) => return Ok(response),
            Judged::Head(head) => Box::pin(head_from_handler(state, head)),
            Judged::Forward(inner, forward) => Box::pin(from_handler(state, inner, forward)),
        };
        rest.await
    }
}

/// What [`judged`] made of a lookup.
enum Judged<S, ReqBody, ResBody> {
    /// Answered from the store.
    Answered(Response<CacheBody<ResBody>>),
    /// A HEAD request with no fresh GET response stored.
    Head(Head<S, ReqBody>),
    /// Anything else with nothing to serve: the handler's turn.
    Forward(S, Forward<ReqBody>),
}

/// Judges what [`respond`]'s lookup found for the request: serve it (fresh, or stale while
/// refreshing), or keep it to validate with the handler or to stand in for a failing one.
fn judged<S, ReqBody, ResBody>(
    state: &Arc<LayerState>,
    inner: S,
    step: Lookup<ReqBody>,
) -> Judged<S, ReqBody, ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    let Lookup {
        req,
        plan,
        label,
        key,
        found,
    } = step;
    if plan.action == RequestAction::HeadLookup {
        let stored = found.and_then(|(_, stored)| stored.entry());
        let stored = match stored {
            Some(hit) if judge_entry(state, &plan, &hit) == Verdict::Fresh => {
                let response = answer(state, hit, req.headers(), false, Served::Hit);
                return Judged::Answered(response);
            }
            other => other.map(Arc::unwrap_or_clone),
        };
        let head = Head {
            inner,
            req,
            plan,
            key,
            stored,
        };
        return Judged::Head(head);
    }
    let mut label = label;
    let mut stored = None;
    // The stored copy may stand in for a failing (or, past the soft timeout, slow) handler.
    let mut stand_in = false;
    let mut looked_up = None;
    if let Some((looked_up_at, found)) = found {
        looked_up = Some(looked_up_at);
        // One clock reading judges the entry and dates the answer.
        let now = clock::now_ms();
        match found {
            Found::Entry(entry) => match judge_entry_at(state, &plan, &entry, now) {
                Verdict::Fresh => {
                    // Decided before answering, so that the answer may take the entry: one
                    // decoded for this request alone gives its headers to the answer
                    // instead of having them copied.
                    let refresh = refresh_due(state, &entry, now);
                    let response = answer_at(state, entry, req.headers(), true, Served::Hit, now);
                    if refresh {
                        refresh_in_background(
                            state.clone(),
                            key,
                            inner,
                            req,
                            looked_up_at,
                            plan.authorized,
                            true,
                        );
                    }
                    return Judged::Answered(response);
                }
                Verdict::StaleAccepted => {
                    let outcome = Served::Stale;
                    let response = answer_at(state, entry, req.headers(), true, outcome, now);
                    return Judged::Answered(response);
                }
                Verdict::StaleWhileRevalidate => {
                    let outcome = Served::Stale;
                    let response = answer_at(state, entry, req.headers(), true, outcome, now);
                    refresh_in_background(
                        state.clone(),
                        key,
                        inner,
                        req,
                        looked_up_at,
                        plan.authorized,
                        false,
                    );
                    return Judged::Answered(response);
                }
                Verdict::Validate { if_error } => {
                    stand_in = if_error;
                    stored = Some(Arc::unwrap_or_clone(entry));
                }
                Verdict::Unusable => {}
            },
            // The last answer for this key could not be stored: straight to the handler,
            // without waiting on anyone (hit-for-miss).
            Found::Uncacheable => label = Served::HitForMiss,
            Found::Nothing => {}
        }
    }
    let forward = Forward {
        req,
        plan,
        label,
        key,
        looked_up_at: looked_up,
        stored,
        stand_in,
    };
    Judged::Forward(inner, forward)
}

/// A HEAD request [`respond`] could not answer from the store.
struct Head<S, B> {
    inner: S,
    req: Request<B>,
    plan: RequestPlan,
    key: String,
    /// The stored GET response, not fresh.
    stored: Option<CachedResponse>,
}

/// A request [`respond`] could not answer from the store, and what the lookup found.
struct Forward<B> {
    req: Request<B>,
    plan: RequestPlan,
    label: Served,
    key: String,
    /// The flights' mark taken before the lookup; `None` when the request did not look up
    /// (a refresh).
    looked_up_at: Option<u64>,
    /// The stored copy, to validate or to stand in.
    stored: Option<CachedResponse>,
    /// `stored` may stand in for a failing (or, past the soft timeout, slow) handler.
    stand_in: bool,
}

/// Steps 3 (what is left of it after a lookup found no fresh copy) to 6: the handler's
/// answer, coalesced with other requests', validated or stood in for, recorded to be stored.
async fn from_handler<S, ReqBody, ResBody>(
    state: Arc<LayerState>,
    mut inner: S,
    forward: Forward<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    let Forward {
        mut req,
        plan,
        mut label,
        key,
        looked_up_at,
        mut stored,
        stand_in,
    } = forward;
    let mut lead = None;
    if let Some(looked_up_at) = looked_up_at {
        if plan.directives.only_if_cached {
            return Ok(gateway_timeout(&state));
        }
        // Fail-safe: a call for this key failed lately, and its stale copy stands in
        // without the handler being called again until the throttle ends.
        if stand_in && !state.rules.fail_safe_throttle.is_zero() && throttled(&state, &key).await {
            if let Some(stale) = stored.take() {
                return Ok(answer(
                    &state,
                    Arc::new(stale),
                    req.headers(),
                    true,
                    Served::FailSafe,
                ));
            }
        }
        // 4. A cold or expired key: let one request call the handler and the others reuse
        // its response. Requests with `Authorization` neither lead nor follow: their replies
        // are their own.
        if label == Served::Miss && !plan.authorized {
            let stand_in_copy = stored.as_ref().filter(|_| stand_in);
            match coalesce(
                &state,
                &plan,
                &key,
                req.headers(),
                looked_up_at,
                stand_in_copy,
            )
            .await
            {
                Coalesced::Hit(hit) => {
                    return Ok(answer(
                        &state,
                        Arc::new(hit),
                        req.headers(),
                        true,
                        Served::Coalesced,
                    ))
                }
                Coalesced::Lead(l) => lead = Some(l),
                Coalesced::Uncacheable => label = Served::HitForMiss,
                Coalesced::LeaderFailed { timed_out } => {
                    // The identical call just failed: the stale copy stands in, or after a
                    // timeout the request is not sent to wait that long again.
                    if let Some(stale) = stored.take_if(|_| stand_in) {
                        return Ok(answer(
                            &state,
                            Arc::new(stale),
                            req.headers(),
                            true,
                            Served::FailSafe,
                        ));
                    }
                    if timed_out {
                        return Ok(handler_timeout(&state));
                    }
                }
                Coalesced::TimedOut => {
                    if let Some(stale) =
                        stored.take_if(|_| stand_in && state.rules.soft_timeout.is_some())
                    {
                        return Ok(answer(
                            &state,
                            Arc::new(stale),
                            req.headers(),
                            true,
                            Served::SoftTimeout,
                        ));
                    }
                }
                Coalesced::Alone => {}
            }
        }
    }

    // 5. Call the handler; conditionally when the stored copy has validators, so an
    // unchanged resource costs the handler a 304 instead of a body. Past the soft timeout a
    // stale copy that may stand in answers while the call goes on; past the hard timeout the
    // call is dropped.
    let request_headers = req.headers().clone();
    let url_key = url_key(&state, &req);
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
    let sent_at_ms = clock::now_ms();
    // A request that came through a hit-for-miss mark does not write it again.
    let may_mark = label != Served::HitForMiss;
    let called_at = std::time::Instant::now();
    let result = match call_in_time(&state, inner.call(req), stored.is_some() && stand_in).await {
        InTime::Answered(result) => result,
        InTime::SoftTimeout(call) => {
            // Only reached with a stand-in: `call_in_time` has no soft timeout without one.
            let response = match stored.take() {
                Some(stale) => answer(
                    &state,
                    Arc::new(stale),
                    &request_headers,
                    true,
                    Served::SoftTimeout,
                ),
                None => handler_timeout(&state),
            };
            let pending = Pending {
                key,
                request_headers,
                url_key,
                sent_at_ms,
                authorized: plan.authorized,
                lead,
            };
            finish_in_background(state.clone(), call, pending, called_at);
            return Ok(response);
        }
        InTime::HardTimeout => {
            state.observe.handler(called_at.elapsed());
            if let Some(stale) = stored.take_if(|_| stand_in) {
                fail_safe(&state, &key, lead, true);
                return Ok(answer(
                    &state,
                    Arc::new(stale),
                    &request_headers,
                    true,
                    Served::StaleIfError,
                ));
            }
            failed_without_stand_in(&state, key, lead, may_mark, true);
            return Ok(handler_timeout(&state));
        }
    };
    state.observe.handler(called_at.elapsed());
    let exchange = Exchange {
        request_headers: &request_headers,
        url_key: &url_key,
        sent_at_ms,
        authorized: plan.authorized,
    };
    if let Some(stale) = stored.take_if(|_| stand_in && failed(&result)) {
        fail_safe(&state, &key, lead, false);
        return Ok(answer(
            &state,
            Arc::new(stale),
            &request_headers,
            true,
            Served::StaleIfError,
        ));
    }
    let (mut parts, body) = match result {
        Ok(response) => response.into_parts(),
        Err(e) => {
            failed_without_stand_in(&state, key, lead, may_mark, false);
            return Err(e);
        }
    };
    if let Some(stale) = stored.take_if(|_| validating && parts.status == StatusCode::NOT_MODIFIED)
    {
        let refreshed = revalidated(&state, key, stale, &parts.headers, &exchange, lead);
        return Ok(answer(
            &state,
            Arc::new(refreshed),
            &request_headers,
            true,
            Served::Revalidated,
        ));
    }

    // 6. Record the body while it streams to the client, if the response may be stored; it is
    // written in the background once complete. An answer that may not be stored releases the
    // waiters at once and is remembered (hit-for-miss).
    // Nor does one that started before another request's answer was stored here: its
    // answer is older news than that entry, which a mark would clobber.
    let may_mark = may_mark && looked_up_at.is_none_or(|at| state.flights.mark() == at);
    let recorder = plan_store(&state, key, &exchange, &parts, &body, lead, may_mark);
    let label = if plan.authorized && recorder.is_none() {
        Served::Bypass(Bypass::Authorization)
    } else {
        label
    };
    label_forwarded(&state, &mut parts.headers, label);
    Ok(Response::from_parts(
        parts,
        CacheBody::recording(body, recorder),
    ))
}

/// A HEAD request with no fresh GET response stored: the handler answers, and its response
/// may refresh the stored (stale) GET response's headers.
async fn head_from_handler<S, ReqBody, ResBody>(
    state: Arc<LayerState>,
    head: Head<S, ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    let Head {
        mut inner,
        req,
        plan,
        key,
        stored,
    } = head;
    // Not fresh: ask the handler. Its HEAD response may refresh the stored GET
    // response's headers when it is the same representation (RFC 9111 §4.3.5).
    let request_headers = req.headers().clone();
    let url_key = url_key(&state, &req);
    let sent_at_ms = clock::now_ms();
    let response = inner.call(req).await?;
    if let Some(stale) = stored {
        let exchange = Exchange {
            request_headers: &request_headers,
            url_key: &url_key,
            sent_at_ms,
            authorized: plan.authorized,
        };
        head_refreshed(&state, key, stale, &response, &exchange);
    }
    Ok(response.map(CacheBody::passthrough))
}

/// Whether a fresh `entry` is past the route's `refresh_ahead` fraction of its lifetime at
/// `now_ms`.
fn refresh_due(state: &LayerState, entry: &CachedResponse, now_ms: u64) -> bool {
    state.rules.refresh_ahead.is_some_and(|fraction| {
        entry.elapsed(now_ms).as_secs_f64() >= entry.ttl.as_secs_f64() * fraction
    })
}

/// How the handler's call ended against the route's soft and hard timeouts.
enum InTime<F: Future> {
    Answered(F::Output),
    /// Past the soft timeout, with a stale copy to stand in: the call, still running.
    SoftTimeout(Pin<Box<F>>),
    /// Past the hard timeout: the call was dropped.
    HardTimeout,
}

/// Runs the handler's `call` against the route's timeouts: the soft one only when a stale
/// copy may stand in. Without timeouts (the default) the call is awaited as it is.
async fn call_in_time<F: Future>(state: &LayerState, call: F, stand_in: bool) -> InTime<F> {
    let rules = &state.rules;
    let soft = rules.soft_timeout.filter(|_| stand_in);
    if soft.is_none() && rules.hard_timeout.is_none() {
        return InTime::Answered(call.await);
    }
    let started = tokio::time::Instant::now();
    let hard_at = rules.hard_timeout.map(|hard| started + clamp(hard));
    let mut call = Box::pin(call);
    if let Some(soft) = soft {
        let soft_at = started + clamp(soft);
        if hard_at.is_none_or(|hard_at| soft_at < hard_at) {
            match tokio::time::timeout_at(soft_at, call.as_mut()).await {
                Ok(result) => return InTime::Answered(result),
                Err(_) => return InTime::SoftTimeout(call),
            }
        }
    }
    match hard_at {
        Some(hard_at) => match tokio::time::timeout_at(hard_at, call.as_mut()).await {
            Ok(result) => InTime::Answered(result),
            Err(_) => InTime::HardTimeout,
        },
        None => InTime::Answered(call.await),
    }
}

/// A handler call whose answer is stored when it arrives, after its request was answered.
struct Pending {
    key: String,
    request_headers: http::HeaderMap,
    url_key: String,
    sent_at_ms: u64,
    authorized: bool,
    lead: Option<ResponseLead>,
}

/// Lets a call that passed the soft timeout finish in the background (within the hard
/// timeout, if any) and stores its answer; a failure keeps the stale copy standing in.
fn finish_in_background<F, B, E>(
    state: Arc<LayerState>,
    call: Pin<Box<F>>,
    pending: Pending,
    called_at: std::time::Instant,
) where
    F: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: Body + Send + 'static,
    E: Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // Tracked until the answer is stored, so `CacheLayer::flush` waits for it.
    let task = state.pending_writes.track();
    let left = state
        .rules
        .hard_timeout
        .map(|hard| clamp(hard).saturating_sub(called_at.elapsed()));
    runtime.spawn(async move {
        let _task = task;
        let result = match left {
            Some(left) => tokio::time::timeout(left, call).await.ok(),
            None => Some(call.await),
        };
        state.observe.handler(called_at.elapsed());
        let Pending {
            key,
            request_headers,
            url_key,
            sent_at_ms,
            authorized,
            lead,
        } = pending;
        match result {
            Some(Ok(response)) if !response.status().is_server_error() => {
                let exchange = Exchange {
                    request_headers: &request_headers,
                    url_key: &url_key,
                    sent_at_ms,
                    authorized,
                };
                let (parts, body) = response.into_parts();
                let recorder = plan_store(&state, key, &exchange, &parts, &body, lead, true);
                drain(CacheBody::recording(body, recorder)).await;
            }
            // The stale copy keeps standing in.
            _ => fail_safe(&state, &key, lead, left.is_some()),
        }
    });
}

/// Calls the handler and labels its response as having bypassed the cache, and why.
async fn bypass<S, ReqBody, ResBody>(
    state: &LayerState,
    mut inner: S,
    req: Request<ReqBody>,
    reason: Bypass,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    let mut response = inner.call(req).await?.map(CacheBody::passthrough);
    label_forwarded(state, response.headers_mut(), Served::Bypass(reason));
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
fn url_key<B>(state: &LayerState, req: &Request<B>) -> String {
    let uri = key_uri(req.uri(), req.extensions());
    let host = match state.keying.host {
        true => key::authority(uri, req.headers()),
        false => None,
    };
    if let Some(host) = &host {
        state.hosts.record(host);
    }
    state
        .keying
        .url_key_on(&state.key_prefix, uri, host.as_deref())
}

/// The key of the entry `method` would use for `req`.
fn request_key<B>(
    state: &LayerState,
    method: &Method,
    req: Request<B>,
) -> (Request<B>, Result<String, key::NoKey>) {
    // The key function sees the request's head; taking it apart and back is two moves.
    let (parts, body) = req.into_parts();
    let uri = key_uri(&parts.uri, &parts.extensions);
    let key = state.keying.key(&state.key_prefix, method, uri, &parts);
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
    state: &LayerState,
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
            let url_key = (state.keying).url_key(&state.key_prefix, &target, &request_headers);
            if let Err(e) = drop_url(&*state.store, &state.key_prefix, &url_key).await {
                state.observe.store_error("delete", &url_key, &e);
            }
        }
    }
    Ok(response.map(CacheBody::passthrough))
}

/// Calls the handler for a stale key (or, `ahead`, a fresh one past the route's
/// `refresh_ahead` fraction) in the background and stores its response, unless a refresh of
/// the key is already running (here, or in another instance when cross-instance locking is
/// on).
fn refresh_in_background<S, ReqBody, ResBody>(
    state: Arc<LayerState>,
    key: String,
    mut inner: S,
    req: Request<ReqBody>,
    looked_up_at: u64,
    authorized: bool,
    ahead: bool,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body + Send + 'static,
{
    let Role::Leader(mut lead) = state.flights.join(&key, looked_up_at) else {
        return;
    };
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    // Tracked until the response is stored, so `CacheLayer::flush` waits for the refresh.
    let task = state.pending_writes.track();
    runtime.spawn(async move {
        let _task = task;
        if state.rules.lock_across_instances {
            match Lock::try_acquire(&state.store, &key, state.rules.lock_ttl).await {
                Ok(Some(lock)) => {
                    lead.hold(lock);
                    // Look once more: another instance may have refreshed it and let the
                    // lock go just now.
                    let found = lookup(&state, &key, req.headers()).await;
                    if let Found::Entry(entry) = found {
                        let plan =
                            request::classify_request(&state.rules, req.method(), req.headers());
                        let fresh = judge_entry(&state, &plan, &entry) == Verdict::Fresh;
                        if fresh && !(ahead && refresh_due(&state, &entry, clock::now_ms())) {
                            return;
                        }
                    }
                }
                _ => {
                    // Another instance refreshes it. Holding the flight a moment keeps this
                    // instance's hits from asking for the lock on every request meanwhile.
                    tokio::time::sleep(REFRESH_LOCK_BACKOFF).await;
                    return;
                }
            }
        }
        if ahead {
            state.observe.event(Event::RefreshAhead);
        }
        let request_headers = req.headers().clone();
        let url_key = url_key(&state, &req);
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
        let recorder = plan_store(&state, key, &exchange, &parts, &body, Some(lead), true);
        drain(CacheBody::recording(body, recorder)).await;
    });
}

/// How long an instance that found another instance refreshing a key leaves it alone.
const REFRESH_LOCK_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Reads a body to its end (so its recorder sees it complete).
async fn drain<B: Body>(body: B) {
    let mut body = std::pin::pin!(body);
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        if frame.is_err() {
            return;
        }
    }
}
