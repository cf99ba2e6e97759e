//! `ResponseFuture`: what `CacheService::call` returns. A fresh hit in process memory is
//! already answered (a ready future, no allocation); everything else is the boxed request flow.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;

use super::body::CacheBody;

/// The future returned by [`CacheService`](crate::CacheService).
pub struct ResponseFuture<B, E> {
    inner: Flow<B, E>,
}

enum Flow<B, E> {
    /// Answered in [`CacheService::call`](super::service::CacheService): a fresh hit in
    /// process memory.
    Answered(std::future::Ready<Result<Response<CacheBody<B>>, E>>),
    /// Everything else: the request flow (`service::respond`).
    Running(BoxedFlow<B, E>),
}

/// The boxed flow future: an async block is clearer than a hand-written state machine.
pub(crate) type BoxedFlow<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<CacheBody<B>>, E>> + Send>>;

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

impl<B, E> ResponseFuture<B, E> {
    /// A response already made (a fresh in-process hit).
    pub(crate) fn answered(response: Response<CacheBody<B>>) -> Self {
        Self {
            inner: Flow::Answered(std::future::ready(Ok(response))),
        }
    }

    /// The request flow, still to run.
    pub(crate) fn running(flow: BoxedFlow<B, E>) -> Self {
        Self {
            inner: Flow::Running(flow),
        }
    }
}
