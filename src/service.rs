//! `CacheService`: the request flow, top to bottom in [`respond`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue, AGE, CONTENT_LENGTH};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use tower_service::Service;

use crate::body::{CacheBody, Recorder};
use crate::entry::{self, CachedResponse, StoredValue};
use crate::key;
use crate::layer::Config;
use crate::policy::{self, RequestAction, Vary};
use crate::store::Store;

/// The header telling clients how the cache handled the request.
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

const HIT: HeaderValue = HeaderValue::from_static("HIT");
const MISS: HeaderValue = HeaderValue::from_static("MISS");
const BYPASS: HeaderValue = HeaderValue::from_static("BYPASS");
const REFRESH: HeaderValue = HeaderValue::from_static("REFRESH");

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
    inner: Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send>>,
}

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
    req: Request<ReqBody>,
) -> Result<Response<CacheBody<ResBody>>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body,
{
    // 1. May this request use the cache at all?
    let label = match policy::classify_request(&config.rules, req.method(), req.headers()) {
        RequestAction::Pass => return Ok(inner.call(req).await?.map(CacheBody::passthrough)),
        RequestAction::HeadLookup => {
            let key = key::base_key(&config.key_prefix, &Method::GET, req.uri());
            if let Some(hit) = lookup(&*config.store, &key, req.headers()).await {
                return Ok(replay(hit, false));
            }
            return Ok(inner.call(req).await?.map(CacheBody::passthrough));
        }
        RequestAction::Bypass => {
            let mut response = inner.call(req).await?.map(CacheBody::passthrough);
            response.headers_mut().insert(X_CACHE, BYPASS);
            return Ok(response);
        }
        RequestAction::Refresh => REFRESH,
        RequestAction::Lookup => MISS,
    };

    // 2-3. Build the key; serve a fresh stored copy unless the client asked for a refresh.
    let key = key::base_key(&config.key_prefix, req.method(), req.uri());
    if label == MISS {
        if let Some(hit) = lookup(&*config.store, &key, req.headers()).await {
            return Ok(replay(hit, true));
        }
    }

    // 4. Call the handler; record its body while it streams to the client if it may be stored.
    let request_headers = req.headers().clone();
    let (mut parts, body) = inner.call(req).await?.into_parts();
    let recorder = policy::storable_ttl(&config.rules, parts.status, &parts.headers)
        .filter(|_| fits(&body, config.rules.max_body_bytes))
        .and_then(|ttl| {
            let pending = PendingEntry::new(&config, key, &request_headers, &parts, ttl)?;
            Some(Recorder::new(
                config.rules.max_body_bytes,
                Box::new(move |chunks| pending.store(chunks)),
            ))
        });
    parts.headers.insert(X_CACHE, label);
    Ok(Response::from_parts(parts, CacheBody::recording(body, recorder)))
}

/// Whether a body might fit the limit (a body that announces a larger size is not recorded).
fn fits(body: &impl Body, limit: usize) -> bool {
    body.size_hint().lower() <= limit as u64
}

/// A fresh stored response for the request, following a `Vary` marker to the variant that
/// matches the request's headers. Absent, stale, unreadable or unreachable: `None`.
async fn lookup(store: &dyn Store, key: &str, request: &HeaderMap) -> Option<CachedResponse> {
    let response = match fetch(store, key).await? {
        StoredValue::Response(response) => response,
        StoredValue::Variants(names) => {
            match fetch(store, &key::variant_key(key, &names, request)).await? {
                StoredValue::Response(response) => response,
                StoredValue::Variants(_) => return None,
            }
        }
    };
    response.is_fresh(entry::now_ms()).then_some(response)
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

/// The stored response as an HTTP response, marked as a hit.
fn replay<B>(hit: CachedResponse, with_body: bool) -> Response<CacheBody<B>> {
    let age = hit.age(entry::now_ms()).as_secs();
    let body_len = hit.body.len();
    let body = if with_body { hit.body } else { Bytes::new() };
    let mut response = Response::new(CacheBody::replay(body));
    *response.status_mut() = hit.status;
    let headers = response.headers_mut();
    *headers = hit.headers;
    // The age the origin reported when we stored the response, plus our own.
    let origin_age = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    headers.insert(AGE, HeaderValue::from(origin_age.saturating_add(age)));
    if body_allowed(hit.status) {
        // Also right for HEAD, which must announce the length a GET would get.
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    headers.insert(X_CACHE, HIT);
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
    ttl: Duration,
}

impl PendingEntry {
    fn new(
        config: &Config,
        key: String,
        request: &HeaderMap,
        response: &http::response::Parts,
        ttl: Duration,
    ) -> Option<Self> {
        let variant = match policy::vary_names(&response.headers) {
            Vary::Any => return None,
            Vary::Headers(names) if names.is_empty() => None,
            Vary::Headers(names) => {
                let variant_key = key::variant_key(&key, &names, request);
                Some((names, variant_key))
            }
        };
        Some(Self {
            store: config.store.clone(),
            key,
            variant,
            status: response.status,
            headers: storable_headers(&response.headers),
            ttl,
        })
    }

    /// Encodes the entry and writes it in a background task, so the client never waits on
    /// the store for a miss.
    fn store(self, chunks: Vec<Bytes>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no tokio runtime; response not stored");
            return;
        };
        let entry = CachedResponse::encode(self.status, &self.headers, &chunks, entry::now_ms(), self.ttl);
        runtime.spawn(async move {
            let result = match &self.variant {
                None => self.store.set(&self.key, entry, self.ttl).await,
                Some((names, variant_key)) => {
                    // Variant first, so the marker never points at a variant not yet written.
                    let stored = self.store.set(variant_key, entry, self.ttl).await;
                    match stored {
                        Ok(()) => self.store.set(&self.key, entry::encode_variants(names), self.ttl).await,
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(key = %self.key, error = %e, "cache store set failed");
            }
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
    ] {
        stored.remove(name);
    }
    stored
}
