//! Refuses over-long batches before they are decoded. Decoding materialises
//! every item of a repeated field: 4 MB of empty items (two bytes each on the
//! wire) becomes two million structs, hundreds of MB, before validation can
//! count them. This layer walks the top level of each request message of the
//! batch RPCs on the wire (tags and lengths only, no allocation per field),
//! counts the items of the batch field, and answers INVALID_ARGUMENT with a
//! field violation when there are more than the RPC's item cap, so the
//! message is never decoded.

use crate::error::Error;
use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use prost::Message as _;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// The batch field of each batch RPC and its item cap (the same caps the
/// validation applies with `Validator::items`).
const BATCHES: [(&str, &str, &str, usize); 6] = [
    (
        "verdict.v1.TestCaseService",
        "RecordExecutions",
        "items",
        crate::test_cases::executions::MAX_BATCH,
    ),
    (
        "verdict.v1.TestCaseService",
        "IngestExecutions",
        "items",
        crate::test_cases::executions::MAX_BATCH,
    ),
    (
        "verdict.v1.DiscrepancyService",
        "RecordDiscrepancies",
        "items",
        crate::discrepancies::MAX_BATCH,
    ),
    (
        "verdict.v1.DiscrepancyService",
        "IngestDiscrepancies",
        "items",
        crate::discrepancies::MAX_BATCH,
    ),
    (
        "verdict.v1.MetricsService",
        "RecordMetricPoints",
        "points",
        crate::metrics::MAX_POINTS,
    ),
    (
        "verdict.v1.CoverageService",
        "RecordCoverage",
        "files",
        crate::coverage::MAX_FILES,
    ),
];

/// What to count in the messages of one RPC.
#[derive(Clone, Copy)]
struct Batch {
    field_name: &'static str,
    field_number: u64,
    max: usize,
}

/// `/pkg.Service/Method` → its batch, the field numbers read from the
/// descriptor set of `proto/` (so a renumbering cannot go unnoticed: a
/// missing field panics the first call, and the unit test).
static BATCH_OF: LazyLock<HashMap<String, Batch>> = LazyLock::new(|| {
    let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes");
    let mut messages = HashMap::new();
    let mut inputs = HashMap::new();
    for file in &set.file {
        let package = file.package();
        for message in &file.message_type {
            messages.insert(format!(".{package}.{}", message.name()), message);
        }
        for service in &file.service {
            for method in &service.method {
                inputs.insert(
                    format!("{package}.{}/{}", service.name(), method.name()),
                    method.input_type(),
                );
            }
        }
    }
    BATCHES
        .iter()
        .map(|&(service, method, field_name, max)| {
            let path = format!("{service}/{method}");
            let input = inputs[&path];
            let field = messages[input]
                .field
                .iter()
                .find(|f| f.name() == field_name)
                .unwrap_or_else(|| panic!("{input} has no field {field_name}"));
            let batch = Batch {
                field_name,
                field_number: field.number() as u64,
                max,
            };
            (format!("/{path}"), batch)
        })
        .collect()
});

/// Tower layer counting batch items on the wire.
#[derive(Clone, Copy)]
pub struct PrescanLayer {
    /// Messages declaring more bytes than this are not buffered (tonic
    /// refuses them by their length).
    pub max_message_bytes: usize,
}

impl<S> Layer<S> for PrescanLayer {
    type Service = Prescan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Prescan {
            inner,
            max_message_bytes: self.max_message_bytes,
        }
    }
}

#[derive(Clone)]
pub struct Prescan<S> {
    inner: S,
    max_message_bytes: usize,
}

impl<S> Service<http::Request<tonic::body::Body>> for Prescan<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let req = match BATCH_OF.get(req.uri().path()) {
            Some(&batch) => {
                let max_message_bytes = self.max_message_bytes;
                req.map(|body| {
                    tonic::body::Body::new(ScannedBody {
                        inner: body,
                        batch,
                        max_message_bytes,
                        buf: BytesMut::new(),
                        passthrough: false,
                        trailers: None,
                        ended: false,
                    })
                })
            }
            None => req,
        };
        Box::pin(inner.call(req))
    }
}

/// A request body handing on only whole gRPC messages, each counted first.
struct ScannedBody {
    inner: tonic::body::Body,
    batch: Batch,
    max_message_bytes: usize,
    /// Bytes received and not yet handed on.
    buf: BytesMut,
    /// Set once a message is too large to buffer: bytes then pass unread.
    passthrough: bool,
    /// Trailers received while messages were still buffered.
    trailers: Option<Frame<Bytes>>,
    ended: bool,
}

/// Outcome of looking at the front of the buffer.
enum Front {
    /// A whole message this long (header included) that may pass.
    Pass(usize),
    /// A whole message with too many items.
    TooMany,
    /// Not a whole message yet.
    Partial,
    /// A message too large to buffer.
    TooLarge,
}

impl ScannedBody {
    fn front(&self) -> Front {
        if self.buf.len() < 5 {
            return Front::Partial;
        }
        let compressed = self.buf[0] != 0;
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message_bytes {
            return Front::TooLarge;
        }
        if self.buf.len() < 5 + len {
            return Front::Partial;
        }
        // Compressed messages are not accepted by the services anyway.
        if !compressed
            && count_field(
                &self.buf[5..5 + len],
                self.batch.field_number,
                self.batch.max,
            ) > self.batch.max
        {
            return Front::TooMany;
        }
        Front::Pass(5 + len)
    }

    fn refusal(&self) -> tonic::Status {
        let Batch {
            field_name, max, ..
        } = self.batch;
        tonic::Status::from(Error::invalid(
            field_name,
            format!("holds more than {max} items; at most {max} are accepted"),
        ))
    }
}

impl Body for ScannedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        loop {
            if self.passthrough {
                if !self.buf.is_empty() {
                    let all = self.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(all))));
                }
                return Pin::new(&mut self.inner).poll_frame(cx);
            }
            match self.front() {
                Front::Pass(n) => {
                    let message = self.buf.split_to(n).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(message))));
                }
                Front::TooMany => {
                    self.buf.clear();
                    self.ended = true;
                    return Poll::Ready(Some(Err(self.refusal())));
                }
                Front::TooLarge => {
                    self.passthrough = true;
                    continue;
                }
                Front::Partial => {}
            }
            if self.ended {
                // A cut-off message is handed on for tonic to report.
                if !self.buf.is_empty() {
                    let rest = self.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                return Poll::Ready(self.trailers.take().map(Ok));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            self.buf.extend_from_slice(chunk);
                            data.advance(n);
                        }
                    }
                    Err(trailers) => {
                        self.trailers = Some(trailers);
                        self.ended = true;
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.buf.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// How many times the length-delimited field `number` occurs at the top
/// level of the protobuf message `bytes`, counting stops just past `max`.
/// Malformed input stops the count (the decoder reports it).
fn count_field(mut bytes: &[u8], number: u64, max: usize) -> usize {
    let mut count = 0;
    while !bytes.is_empty() {
        let Some(key) = varint(&mut bytes) else {
            break;
        };
        let skip = match key & 7 {
            0 => match varint(&mut bytes) {
                Some(_) => 0,
                None => break,
            },
            1 => 8,
            5 => 4,
            2 => {
                if key >> 3 == number {
                    count += 1;
                    if count > max {
                        break;
                    }
                }
                match varint(&mut bytes) {
                    Some(len) => len as usize,
                    None => break,
                }
            }
            _ => break,
        };
        if skip > bytes.len() {
            break;
        }
        bytes = &bytes[skip..];
    }
    count
}

/// Reads a base-128 varint off the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ExecutionInput, RecordExecutionsRequest};

    #[test]
    fn every_batch_field_exists_in_the_descriptors() {
        assert_eq!(BATCH_OF.len(), BATCHES.len());
    }

    #[test]
    fn count_field_counts_top_level_items_only() {
        let request = RecordExecutionsRequest {
            items: vec![ExecutionInput::default(); 7],
            ..Default::default()
        };
        let bytes = request.encode_to_vec();
        let number = BATCH_OF["/verdict.v1.TestCaseService/RecordExecutions"].field_number;
        assert_eq!(count_field(&bytes, number, 100), 7);
        assert_eq!(count_field(&bytes, number, 3), 4, "stops past the cap");
        assert_eq!(count_field(&bytes, number + 1, 100), 0);
    }
}
