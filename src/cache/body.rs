//! `CacheBody`: the response body the layer returns. Replays stored bytes, or passes the
//! handler's body through while recording a copy for the store.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::observe::{NotStored, Observer};

pin_project! {
    /// The body of responses from [`CacheService`](crate::CacheService): either a replayed
    /// cached body or the inner service's body, streamed through unchanged.
    pub struct CacheBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Replay { data: Option<Bytes> },
        Inner { #[pin] body: B, recorder: Option<Recorder> },
    }
}

/// Copies a body's chunks as they stream by, up to a limit, and hands them over once the
/// body has ended cleanly. If the body fails, carries trailers, outgrows the limit, is
/// abandoned by the client, or ends at another length than its `Content-Length` announced,
/// nothing is handed over (a truncated body is never stored): the sink is told why instead,
/// and the layer's stats count it.
pub(crate) struct Recorder {
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    /// The length the response's `Content-Length` announced, if any.
    expected: Option<u64>,
    /// Taken when the body completed and was handed over, or told why not.
    sink: Option<Box<dyn RecordSink>>,
    /// Why the response is not stored if the recorder is dropped now.
    dropped: Unrecorded,
    observe: Arc<Observer>,
}

/// Where a recorded body goes.
pub(crate) trait RecordSink: Send {
    /// The whole body, ended cleanly.
    fn complete(self: Box<Self>, chunks: Vec<Bytes>);
    /// The body could not be recorded, and why.
    fn unrecorded(self: Box<Self>, why: Unrecorded);
}

/// Why a body was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unrecorded {
    /// The client went away before the end (or the body was never read to its end).
    Abandoned,
    /// The body failed midway, or carried trailers.
    Failed,
    /// Over the size limit.
    TooBig,
    /// Another length than `Content-Length` announced.
    BadLength,
}

impl Unrecorded {
    fn not_stored(self) -> NotStored {
        match self {
            Unrecorded::Abandoned | Unrecorded::Failed => NotStored::Incomplete,
            Unrecorded::TooBig => NotStored::Size,
            Unrecorded::BadLength => NotStored::BadLength,
        }
    }
}

impl Recorder {
    pub(crate) fn new(
        limit: usize,
        expected: Option<u64>,
        observe: Arc<Observer>,
        sink: Box<dyn RecordSink>,
    ) -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            limit,
            expected,
            sink: Some(sink),
            dropped: Unrecorded::Abandoned,
            observe,
        }
    }

    /// Records a chunk; false once the body is over the limit.
    fn record(&mut self, chunk: &Bytes) -> bool {
        self.len = self.len.saturating_add(chunk.len());
        if self.len > self.limit {
            self.dropped = Unrecorded::TooBig;
            return false;
        }
        if !chunk.is_empty() {
            // Cloning `Bytes` shares the buffer: no copy until the entry is encoded.
            self.chunks.push(chunk.clone());
        }
        true
    }

    fn complete(mut self) {
        if self.expected.is_some_and(|n| n != self.len as u64) {
            tracing::debug!(
                announced = self.expected,
                received = self.len,
                "body length contradicts Content-Length; response not stored"
            );
            self.dropped = Unrecorded::BadLength;
            return;
        }
        if let Some(sink) = self.sink.take() {
            sink.complete(std::mem::take(&mut self.chunks));
        }
    }

    /// Drops the recording because the body failed (or carried trailers).
    fn fail(mut self) {
        self.dropped = Unrecorded::Failed;
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            self.observe.not_stored(self.dropped.not_stored());
            sink.unrecorded(self.dropped);
        }
    }
}

impl<B> CacheBody<B> {
    pub(crate) fn replay(data: Bytes) -> Self {
        let data = (!data.is_empty()).then_some(data);
        Self {
            kind: Kind::Replay { data },
        }
    }

    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Inner {
                body,
                recorder: None,
            },
        }
    }

    pub(crate) fn recording(body: B, mut recorder: Option<Recorder>) -> Self
    where
        B: Body,
    {
        // An empty body may never be polled at all: store it now.
        if body.is_end_stream() {
            if let Some(recorder) = recorder.take() {
                recorder.complete();
            }
        }
        Self {
            kind: Kind::Inner { body, recorder },
        }
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Replay { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Inner { mut body, recorder } => {
                let frame = match ready!(body.as_mut().poll_frame(cx)) {
                    None => {
                        if let Some(recorder) = recorder.take() {
                            recorder.complete();
                        }
                        return Poll::Ready(None);
                    }
                    Some(Err(error)) => {
                        if let Some(recorder) = recorder.take() {
                            recorder.fail();
                        }
                        return Poll::Ready(Some(Err(error)));
                    }
                    Some(Ok(frame)) => frame.map_data(|mut d| d.copy_to_bytes(d.remaining())),
                };
                if let Some(rec) = recorder {
                    // Trailers cannot be replayed, so a body with trailers is not stored.
                    match frame.data_ref() {
                        Some(chunk) if rec.record(chunk) => {}
                        Some(_) => *recorder = None,
                        None => {
                            if let Some(recorder) = recorder.take() {
                                recorder.fail();
                            }
                        }
                    }
                }
                // hyper stops polling once a body reports its end, so the end may never be
                // seen as `None`: complete here as well.
                if body.is_end_stream() {
                    if let Some(recorder) = recorder.take() {
                        recorder.complete();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Replay { data } => data.is_none(),
            Kind::Inner { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Replay { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Inner { body, .. } => body.size_hint(),
        }
    }
}

impl<B> std::fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Replay { .. } => "replay",
            Kind::Inner {
                recorder: Some(_), ..
            } => "inner (recording)",
            Kind::Inner { .. } => "inner",
        };
        f.debug_struct("CacheBody").field("kind", &kind).finish()
    }
}
