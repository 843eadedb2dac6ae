//! Tells a client's reset of an ingest stream from its half-close.
//!
//! tonic's `Streaming` ends a request stream whose body fails with
//! CANCELLED (an HTTP/2 `RST_STREAM(CANCEL)` from the client: a dropped
//! call, a client-side deadline) exactly as if the client had half-closed,
//! and an ingest would then commit its tail for a caller that gave up. This
//! layer turns that body error into ABORTED on the client-stream ingest RPCs,
//! so the handler sees a broken stream and rolls back what it had not
//! committed.

use bytes::Bytes;
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::body::Body;
use tower::{Layer, Service};

/// What the handler reads in place of the client's reset.
pub const RESET_MESSAGE: &str = "the client reset the stream";

/// Whether a gRPC path is a client-stream ingest.
fn is_ingest(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|method| method.starts_with("Ingest"))
}

#[derive(Clone, Copy, Default)]
pub struct ResetLayer;

impl<S> Layer<S> for ResetLayer {
    type Service = Reset<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Reset { inner }
    }
}

#[derive(Clone)]
pub struct Reset<S> {
    inner: S,
}

impl<S> Service<http::Request<Body>> for Reset<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if is_ingest(req.uri().path()) {
            self.inner.call(req.map(|b| Body::new(ResetIsError(b))))
        } else {
            self.inner.call(req)
        }
    }
}

struct ResetIsError(Body);

impl http_body::Body for ResetIsError {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        match Pin::new(&mut self.0).poll_frame(cx) {
            Poll::Ready(Some(Err(s))) if s.code() == tonic::Code::Cancelled => {
                Poll::Ready(Some(Err(tonic::Status::aborted(RESET_MESSAGE))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_ingest_rpcs_are_wrapped() {
        assert!(super::is_ingest(
            "/verdict.v1.DiscrepancyService/IngestDiscrepancies"
        ));
        assert!(super::is_ingest(
            "/verdict.v1.TestCaseService/IngestExecutions"
        ));
        assert!(!super::is_ingest(
            "/verdict.v1.DiscrepancyService/GetIngestStatus"
        ));
        assert!(!super::is_ingest("/verdict.v1.SessionService/WatchSession"));
    }
}
