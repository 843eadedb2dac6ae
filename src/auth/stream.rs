//! Ending streams from the outside: when the caller's key is revoked, or
//! when a stream reaches the gateway's maximum lifetime.
//!
//! The auth layer wraps the bodies of streaming calls (which RPCs stream is
//! read from the proto descriptors, so a new streaming RPC is covered
//! without a table row):
//! - a client stream's request body stops yielding messages and yields the
//!   status as an error instead: the handler sees its stream break, and
//!   drops (rolls back) the transaction it has open; the handler's error
//!   reply is then replaced by that status;
//! - a server stream's response body stops and ends with trailers carrying
//!   the status.
//!
//! Statuses: a revoked key ends its streams with UNAUTHENTICATED
//! (`KEY_REVOKED`, "the API key was revoked"); the lifetime ends them with
//! UNAVAILABLE (`STREAM_LIFETIME_EXCEEDED`, retryable: open the stream
//! again, a watch resumes where it was).

use super::cache::Revocation;
use crate::error::{Reason, error_info};
use bytes::Bytes;
use futures::Stream;
use http_body::{Body, Frame};
use prost::Message;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::WatchStream;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Which directions of an RPC stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shape {
    pub client_streaming: bool,
    pub server_streaming: bool,
}

/// The streaming RPCs of every Verdict service, by full gRPC path.
pub fn streaming_rpcs() -> HashMap<String, Shape> {
    let mut shapes = HashMap::new();
    let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) else {
        return shapes;
    };
    for file in set.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                let shape = Shape {
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                };
                if shape != Shape::default() {
                    let path = format!("/{package}.{}/{}", service.name(), method.name());
                    shapes.insert(path, shape);
                }
            }
        }
    }
    shapes
}

/// The status a stream of a revoked key ends with.
pub fn revoked_status() -> Status {
    Status::with_error_details(
        Code::Unauthenticated,
        "the API key was revoked",
        error_info(Reason::KeyRevoked),
    )
}

fn lifetime_status(lifetime: Duration) -> Status {
    let mut details: ErrorDetails = error_info(Reason::StreamLifetimeExceeded);
    details.set_retry_info(Some(Duration::ZERO));
    Status::with_error_details(
        Code::Unavailable,
        format!(
            "the stream reached the gateway's maximum stream lifetime ({} s); open it again",
            lifetime.as_secs()
        ),
        details,
    )
}

/// Why a stream must end, polled alongside its body.
pub struct Stop {
    revocation: Option<WatchStream<bool>>,
    deadline: Pin<Box<Sleep>>,
    lifetime: Duration,
}

impl Stop {
    pub fn new(revocation: Option<&Revocation>, started: Instant, lifetime: Duration) -> Self {
        Stop {
            revocation: revocation.map(|r| WatchStream::new(r.receiver())),
            deadline: Box::pin(tokio::time::sleep_until(started + lifetime)),
            lifetime,
        }
    }

    /// Ready with the status to end with once the key is revoked or the
    /// lifetime is over.
    fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        if let Some(revocation) = &mut self.revocation {
            loop {
                match Pin::new(&mut *revocation).poll_next(cx) {
                    Poll::Ready(Some(true)) => return Poll::Ready(revoked_status()),
                    Poll::Ready(Some(false)) => continue,
                    // The signal's sender is gone: it can no longer fire.
                    Poll::Ready(None) => {
                        self.revocation = None;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(lifetime_status(self.lifetime)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Whether the stream of a call must end now (checked when its handler
/// answers).
pub fn stopped(
    revocation: Option<&Revocation>,
    started: Instant,
    lifetime: Duration,
) -> Option<Status> {
    if revocation.is_some_and(Revocation::is_revoked) {
        return Some(revoked_status());
    }
    (Instant::now() >= started + lifetime).then(|| lifetime_status(lifetime))
}

/// A client stream's request body that breaks with the stop status.
pub struct RequestGuard<B> {
    inner: B,
    stop: Stop,
    stopped: bool,
}

impl<B> RequestGuard<B> {
    pub fn new(inner: B, stop: Stop) -> Self {
        RequestGuard {
            inner,
            stop,
            stopped: false,
        }
    }
}

impl<B> Body for RequestGuard<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.stopped {
            return Poll::Ready(None);
        }
        if let Poll::Ready(status) = this.stop.poll_stop(cx) {
            this.stopped = true;
            return Poll::Ready(Some(Err(status)));
        }
        Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(|e| Status::from_error(e.into()))
    }

    fn is_end_stream(&self) -> bool {
        self.stopped || self.inner.is_end_stream()
    }
}

/// A server stream's response body that ends with trailers carrying the
/// stop status.
pub struct ResponseGuard<B> {
    inner: B,
    stop: Stop,
    done: bool,
}

impl<B> ResponseGuard<B> {
    pub fn new(inner: B, stop: Stop) -> Self {
        ResponseGuard {
            inner,
            stop,
            done: false,
        }
    }
}

/// The `grpc-*` trailers of `status`.
fn trailers(status: Status) -> http::HeaderMap {
    let (parts, ()) = status.into_http::<()>().into_parts();
    let mut trailers = http::HeaderMap::new();
    for (name, value) in &parts.headers {
        if name.as_str().starts_with("grpc-") {
            trailers.append(name.clone(), value.clone());
        }
    }
    trailers
}

impl<B> Body for ResponseGuard<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(status) = this.stop.poll_stop(cx) {
            this.done = true;
            return Poll::Ready(Some(Ok(Frame::trailers(trailers(status)))));
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = &frame {
            this.done = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_streaming_rpcs_are_read_from_the_descriptors() {
        let shapes = streaming_rpcs();
        let watch = shapes["/verdict.v1.SessionService/WatchSession"];
        assert!(watch.server_streaming && !watch.client_streaming);
        let ingest = shapes["/verdict.v1.DiscrepancyService/IngestDiscrepancies"];
        assert!(ingest.client_streaming && !ingest.server_streaming);
        assert!(!shapes.contains_key("/verdict.v1.SessionService/GetSession"));
    }

    #[test]
    fn stop_trailers_carry_the_status_and_its_details() {
        let t = trailers(revoked_status());
        assert_eq!(t["grpc-status"], "16");
        assert!(t.contains_key("grpc-status-details-bin"));
        assert!(!t.contains_key("content-type"));
    }
}
