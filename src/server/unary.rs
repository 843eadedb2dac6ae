//! Unary calls of the Verdict services, read and answered without tonic's
//! streaming codec (issue 13).
//!
//! tonic serves a unary method as a stream of one: the request body goes
//! through a decoder that buffers and frames it, the reply through an
//! encoder body with its own state machine, and the `grpc-status` trailer
//! is built from a `Status` per call. For the usual unary request (one
//! uncompressed message within the size limit) none of that is needed: the
//! body's bytes are the five-byte gRPC prefix and the message, and the reply
//! is one data frame and a constant trailer. Measured with h2load against
//! the same PostgreSQL, alternating builds, GetSession's gateway CPU per
//! call fell by 0.9–2.4 µs in four of five alternations (README,
//! Benchmarks), and allocations per call from 49.1 to 43.2.
//!
//! Anything else — a compressed or oversized message, no message or more
//! than one, bytes that do not decode — is handed, with the bytes already
//! read, to the service's tonic server, so its answer (status, message) is
//! exactly tonic's.

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};
use tonic::Status;
use tower::Service;

pub type Req = http::Request<tonic::body::Body>;
pub type Reply = http::Response<tonic::body::Body>;
/// A call started by the generated dispatch.
pub type Call = BoxFuture<'static, Result<Reply, Infallible>>;

/// A service's tonic server: what gets a request this path does not take.
pub trait Fallback:
    Service<Req, Response = Reply, Error = Infallible, Future: Send> + Clone + Send + 'static
{
}

impl<S> Fallback for S where
    S: Service<Req, Response = Reply, Error = Infallible, Future: Send> + Clone + Send + 'static
{
}

/// The message size limits the tonic servers are configured with.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request message.
    pub decode: usize,
    /// Largest reply message.
    pub encode: usize,
}

// For every Verdict service, `fn <service>(api, fallback, req, limits) ->
// Result<Call, Req>`, generated from the descriptors.
include!(concat!(env!("OUT_DIR"), "/verdict_unary.rs"));

/// The service and what follows it in a path (`/pkg.Service/Method`): the
/// method, or something no method is named (`Method/More`); both empty for
/// a path of another shape.
pub(super) fn service_and_method(path: &str) -> (&str, &str) {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", ""))
}

/// The method part of a request's path (see [`service_and_method`]).
fn method(req: &Req) -> &str {
    service_and_method(req.uri().path()).1
}

/// Headers a reply's metadata may not set (tonic removes the same).
const RESERVED: [http::HeaderName; 5] = [
    http::HeaderName::from_static("te"),
    http::header::CONTENT_TYPE,
    http::HeaderName::from_static("grpc-message"),
    http::HeaderName::from_static("grpc-message-type"),
    http::HeaderName::from_static("grpc-status"),
];

/// One unary call: reads the request, calls `call` with it, writes the reply.
pub async fn unary<M, R, S, F, Fut>(
    req: Req,
    limits: Limits,
    mut fallback: S,
    call: F,
) -> Result<Reply, Infallible>
where
    M: prost::Message + Default,
    R: prost::Message,
    S: Fallback,
    F: FnOnce(tonic::Request<M>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, Status>>,
{
    let (mut parts, mut body) = req.into_parts();
    let mut received = Received::default();
    let mut trailers = None;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = match frame {
            Ok(frame) => frame,
            // As tonic's codec: a cancelled request body ends the request,
            // any other failure is the answer.
            Err(status) if status.code() == tonic::Code::Cancelled => break,
            Err(status) => return Ok(status.into_http()),
        };
        match frame.into_data() {
            Ok(data) => {
                received.push(data);
                if !received.may_be_one(limits.decode) {
                    let replay = Frames::body(received.into_bytes(), Some(body), None);
                    return fallback
                        .call(http::Request::from_parts(parts, replay))
                        .await;
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let bytes = received.into_bytes();
    let message = match one_message(&bytes, limits.decode).map(M::decode) {
        Some(Ok(message)) => message,
        _ => {
            let replay = Frames::body(bytes, None, trailers);
            return fallback
                .call(http::Request::from_parts(parts, replay))
                .await;
        }
    };
    // Trailers of a request are metadata too, as tonic merges them.
    if let Some(trailers) = trailers {
        parts.headers.extend(trailers);
    }
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    Ok(reply(call(request).await, limits.encode))
}

/// The reply to a unary call, as tonic writes it.
fn reply<R: prost::Message>(response: Result<tonic::Response<R>, Status>, limit: usize) -> Reply {
    let response = match response {
        Ok(response) => response,
        Err(status) => return status.into_http(),
    };
    let (metadata, message, extensions) = response.into_parts();
    let mut headers = metadata.into_headers();
    if !headers.is_empty() {
        for name in &RESERVED {
            headers.remove(name);
        }
    }
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    let len = message.encoded_len();
    let body = match u32::try_from(len) {
        Ok(prefix) if len <= limit => {
            let mut data = BytesMut::with_capacity(5 + len);
            data.extend_from_slice(&[0]);
            data.extend_from_slice(&prefix.to_be_bytes());
            message.encode_raw(&mut data);
            let mut trailers = http::HeaderMap::with_capacity(1);
            trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
            Frames::body(data.freeze(), None, Some(trailers))
        }
        _ => {
            // tonic's status and words for a reply over the limit.
            let status = Status::out_of_range(format!(
                "Error, encoded message length too large: found {len} bytes, the limit is: {limit} bytes"
            ));
            let mut trailers = http::HeaderMap::with_capacity(2);
            // Only a message with bytes no header may hold fails here;
            // this one has none.
            let _ = status.add_header(&mut trailers);
            Frames::body(Bytes::new(), None, Some(trailers))
        }
    };
    let mut reply = http::Response::new(body);
    *reply.version_mut() = http::Version::HTTP_2;
    *reply.headers_mut() = headers;
    *reply.extensions_mut() = extensions;
    reply
}

/// The whole message of a body holding exactly one uncompressed message
/// within `limit`.
fn one_message(bytes: &Bytes, limit: usize) -> Option<Bytes> {
    let (flag, len) = prefix(bytes)?;
    (flag == 0 && len <= limit && bytes.len() - 5 == len).then(|| bytes.slice(5..))
}

/// A message's compression flag and length, once its five bytes are in
/// (the gRPC length prefix).
pub(super) fn prefix(bytes: &[u8]) -> Option<(u8, usize)> {
    let head: [u8; 5] = bytes.get(..5)?.try_into().ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    Some((head[0], len as usize))
}

/// The bytes of a request body so far: usually one frame, kept as it came.
#[derive(Default)]
struct Received {
    first: Bytes,
    more: Option<BytesMut>,
}

impl Received {
    fn push(&mut self, data: Bytes) {
        match &mut self.more {
            Some(more) => more.extend_from_slice(&data),
            None if self.first.is_empty() => self.first = data,
            None => {
                let mut more = BytesMut::with_capacity(self.first.len() + data.len());
                more.extend_from_slice(&self.first);
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    fn as_slice(&self) -> &[u8] {
        self.more.as_deref().unwrap_or(&self.first)
    }

    /// Whether what came so far can still be one uncompressed message
    /// within `limit` (so buffering it costs no more than tonic would).
    fn may_be_one(&self, limit: usize) -> bool {
        let bytes = self.as_slice();
        match prefix(bytes) {
            None => true,
            Some((flag, len)) => flag == 0 && len <= limit && bytes.len() - 5 <= len,
        }
    }

    fn into_bytes(self) -> Bytes {
        match self.more {
            Some(more) => more.freeze(),
            None => self.first,
        }
    }
}

/// A body of frames already at hand: some data, then the rest of another
/// body, then trailers — a request body given back with the bytes read so
/// far, or a unary reply (its message, or none when it failed, and its
/// status).
struct Frames {
    data: Option<Bytes>,
    rest: Option<tonic::body::Body>,
    trailers: Option<http::HeaderMap>,
}

impl Frames {
    fn body(
        data: Bytes,
        rest: Option<tonic::body::Body>,
        trailers: Option<http::HeaderMap>,
    ) -> tonic::body::Body {
        tonic::body::Body::new(Frames {
            data: Some(data).filter(|b| !b.is_empty()),
            rest,
            trailers,
        })
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        if let Some(rest) = &mut this.rest {
            match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(None) => this.rest = None,
                other => return other,
            }
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    // No exact size hint: for a reply, hyper would then send a
    // content-length and end the stream after the data, without the
    // trailers.
    fn is_end_stream(&self) -> bool {
        self.data.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
            && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, message: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn only_one_whole_uncompressed_message_within_the_limit_is_taken() {
        let one = Bytes::from(framed(0, b"abc"));
        assert_eq!(one_message(&one, 3).as_deref(), Some(&b"abc"[..]));
        assert_eq!(one_message(&one, 2), None, "over the limit");
        assert_eq!(one_message(&Bytes::from(framed(1, b"abc")), 3), None);
        assert_eq!(
            one_message(&Bytes::from(framed(0, b"")), 3).as_deref(),
            Some(&b""[..])
        );
        assert_eq!(one_message(&Bytes::new(), 3), None, "no message");
        assert_eq!(one_message(&one.slice(..6), 3), None, "cut short");
        let two = Bytes::from([framed(0, b"a"), framed(0, b"b")].concat());
        assert_eq!(one_message(&two, 3), None, "two messages");
    }

    #[test]
    fn a_message_arriving_in_pieces_is_kept_whole_and_refused_early_when_it_cannot_fit() {
        let bytes = framed(0, b"hello");
        let mut received = Received::default();
        for piece in bytes.chunks(2) {
            received.push(Bytes::copy_from_slice(piece));
            assert!(received.may_be_one(5));
        }
        assert_eq!(&received.into_bytes()[..], &bytes[..]);

        let mut big = Received::default();
        big.push(Bytes::from(framed(0, b"hello")[..5].to_vec()));
        assert!(!big.may_be_one(4), "declared over the limit");
        let mut extra = Received::default();
        extra.push(Bytes::from([framed(0, b"a"), vec![0]].concat()));
        assert!(!extra.may_be_one(4), "bytes after the message");
        let mut compressed = Received::default();
        compressed.push(Bytes::from(vec![1]));
        assert!(compressed.may_be_one(4), "the flag alone says nothing yet");
        compressed.push(Bytes::from(vec![0, 0, 0, 1]));
        assert!(!compressed.may_be_one(4));
    }
}
