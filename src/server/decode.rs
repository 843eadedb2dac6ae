//! Undecodable requests are the caller's fault: tonic answers a message it
//! cannot decode (bad wire format, invalid UTF-8 in a string) with
//! INTERNAL; this layer turns that reply into INVALID_ARGUMENT with a
//! `google.rpc.BadRequest`, like every other bad request.

use crate::error::Error;
use futures::future::BoxFuture;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// How tonic's codec begins the message of a decode failure.
const DECODE_FAILURE: &[u8] = b"failed to decode Protobuf message";

#[derive(Clone, Copy, Default)]
pub struct DecodeErrorLayer;

impl<S> Layer<S> for DecodeErrorLayer {
    type Service = DecodeError<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DecodeError { inner }
    }
}

#[derive(Clone)]
pub struct DecodeError<S> {
    inner: S,
}

/// Whether a reply's headers carry tonic's INTERNAL for a decode failure.
fn is_decode_failure(headers: &http::HeaderMap) -> bool {
    let internal = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"13");
    internal
        && headers.get("grpc-message").is_some_and(|m| {
            // grpc-message is percent-encoded; the prefix has only spaces
            // to encode.
            let m = m.as_bytes();
            let plain: Vec<u8> = DECODE_FAILURE.to_vec();
            let encoded: Vec<u8> = String::from_utf8_lossy(DECODE_FAILURE)
                .replace(' ', "%20")
                .into_bytes();
            m.starts_with(&plain) || m.starts_with(&encoded)
        })
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for DecodeError<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(req).await?;
            if !is_decode_failure(response.headers()) {
                return Ok(response);
            }
            let status = tonic::Status::from(Error::invalid(
                "request",
                "is not a valid protobuf encoding of this RPC's request message \
                 (wrong wire format, or a string that is not UTF-8)",
            ));
            Ok(status.into_http())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonic_decode_failures_are_recognised() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", "13".parse().unwrap());
        h.insert(
            "grpc-message",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20wire%20type"
                .parse()
                .unwrap(),
        );
        assert!(is_decode_failure(&h));
        h.insert("grpc-message", "internal error".parse().unwrap());
        assert!(!is_decode_failure(&h));
        h.insert("grpc-status", "3".parse().unwrap());
        assert!(!is_decode_failure(&h));
    }
}
