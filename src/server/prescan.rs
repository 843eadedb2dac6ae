//! Refuses requests whose decoding would amplify memory, before they are
//! decoded. Decoding materialises every element of a repeated field: 4 MB
//! of empty items (two bytes each on the wire) becomes two million structs,
//! hundreds of MB, before validation can count them; the same holds for the
//! values of a `google.protobuf.Struct` or `ListValue` at any depth (a
//! session config holding two million empty list values).
//!
//! This layer walks each request message on the wire (tags and lengths
//! only, no allocation per field) before tonic decodes it:
//! - for the batch RPCs, it counts the items of the batch field at the top
//!   level and refuses more than the RPC's item cap;
//! - for every RPC, it counts the elements decoding would allocate at any
//!   depth (each occurrence of a repeated or map field; each element of a
//!   packed list) using the message types of the descriptor set, and
//!   refuses more than [`ELEMENT_BASE`] plus one per [`BYTES_PER_ELEMENT`]
//!   bytes of the message.
//!
//! Either refusal is INVALID_ARGUMENT with a field violation naming the
//! top-level field, so the message is never decoded.

use crate::error::Error;
use bytes::{Buf, Bytes, BytesMut};
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

/// Repeated elements any request may hold, whatever its size.
pub const ELEMENT_BASE: usize = 65_536;
/// Beyond [`ELEMENT_BASE`], one repeated element per this many bytes of the
/// message. Legitimate data spends more: a list value with a number takes
/// 11 bytes, a Struct entry with a one-letter key and a number 16, an item
/// of a batch dozens; only lists of empty, null or boolean values come
/// below. A decoded element costs up to about 64 bytes, so decoding stays
/// within about 8 times the message, plus the base.
pub const BYTES_PER_ELEMENT: usize = 8;
/// Nesting beyond this is not walked (prost refuses it at 100 anyway).
const MAX_DEPTH: u32 = 100;

/// What to count in the messages of one batch RPC.
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

/// One field of a message type, as the wire walk needs it.
struct FieldShape {
    name: String,
    repeated: bool,
    /// Fewest bytes one element of a packed scalar list takes (1 for
    /// varints, 4 or 8 for fixed); 0 for strings, bytes and messages.
    packed_min: usize,
    /// The message type of a message (or map) field, e.g.
    /// `.google.protobuf.Value`.
    message: Option<String>,
}

/// Every message type of the descriptor set (nested and imported ones
/// included) by full name, and the input type of every RPC by path.
struct Registry {
    messages: HashMap<String, HashMap<u64, FieldShape>>,
    inputs: HashMap<String, String>,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    use prost_types::field_descriptor_proto::{Label, Type};
    let set = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET)
        .expect("the embedded descriptor set decodes");
    let mut registry = Registry {
        messages: HashMap::new(),
        inputs: HashMap::new(),
    };
    fn add(registry: &mut Registry, scope: &str, message: &prost_types::DescriptorProto) {
        let name = format!("{scope}.{}", message.name());
        let fields = message
            .field
            .iter()
            .map(|f| {
                let packed_min = match f.r#type() {
                    Type::Fixed64 | Type::Sfixed64 | Type::Double => 8,
                    Type::Fixed32 | Type::Sfixed32 | Type::Float => 4,
                    Type::String | Type::Bytes | Type::Message | Type::Group => 0,
                    _ => 1,
                };
                let shape = FieldShape {
                    name: f.name().to_owned(),
                    repeated: f.label() == Label::Repeated,
                    packed_min,
                    message: (f.r#type() == Type::Message).then(|| f.type_name().to_owned()),
                };
                (f.number() as u64, shape)
            })
            .collect();
        for nested in &message.nested_type {
            add(registry, &name, nested);
        }
        registry.messages.insert(name, fields);
    }
    for file in &set.file {
        let package = file.package();
        let scope = if package.is_empty() {
            String::new()
        } else {
            format!(".{package}")
        };
        for message in &file.message_type {
            add(&mut registry, &scope, message);
        }
        for service in &file.service {
            for method in &service.method {
                registry.inputs.insert(
                    format!("/{package}.{}/{}", service.name(), method.name()),
                    method.input_type().to_owned(),
                );
            }
        }
    }
    registry
});

/// What the layer checks in the messages of one RPC.
#[derive(Clone, Copy)]
struct Scan {
    /// The input message type (a key of the registry).
    input: &'static str,
    batch: Option<Batch>,
}

/// Every RPC by path.
static SCAN_OF: LazyLock<HashMap<String, Scan>> = LazyLock::new(|| {
    REGISTRY
        .inputs
        .iter()
        .map(|(path, input)| {
            let scan = Scan {
                input: input.as_str(),
                batch: BATCH_OF.get(path).copied(),
            };
            (path.clone(), scan)
        })
        .collect()
});

/// Where a message went over its element budget: the top-level field
/// under which the budget ran out.
fn over_budget(input: &str, bytes: &[u8]) -> Option<&'static str> {
    let mut left = ELEMENT_BASE + bytes.len() / BYTES_PER_ELEMENT;
    let registry: &'static Registry = &REGISTRY;
    walk(registry, input, bytes, 0, &mut left)
        .err()
        .map(|number| {
            registry
                .messages
                .get(input)
                .and_then(|fields| fields.get(&number))
                .map_or("request", |f| f.name.as_str())
        })
}

/// Walks the message `bytes` of type `ty`, taking each element decoding
/// would allocate from `left`; `Err(n)` when the budget runs out under
/// field `n` of this message. Malformed input ends the walk (the decoder
/// reports it); unknown fields are skipped (the decoder skips them too).
fn walk(
    registry: &Registry,
    ty: &str,
    mut bytes: &[u8],
    depth: u32,
    left: &mut usize,
) -> Result<(), u64> {
    let fields = registry.messages.get(ty);
    fn take(left: &mut usize, n: usize, number: u64) -> Result<(), u64> {
        *left = left.checked_sub(n).ok_or(number)?;
        Ok(())
    }
    while !bytes.is_empty() {
        let Some(key) = varint(&mut bytes) else {
            return Ok(());
        };
        let number = key >> 3;
        let field = fields.and_then(|f| f.get(&number));
        let repeated = field.is_some_and(|f| f.repeated);
        let skip = match key & 7 {
            0 => {
                if varint(&mut bytes).is_none() {
                    return Ok(());
                }
                0
            }
            1 => 8,
            5 => 4,
            2 => {
                let Some(len) = varint(&mut bytes) else {
                    return Ok(());
                };
                let len = len as usize;
                if len > bytes.len() {
                    return Ok(());
                }
                if let Some(f) = field {
                    if f.repeated && f.packed_min > 0 {
                        take(left, len / f.packed_min, number)?;
                    } else if f.repeated {
                        take(left, 1, number)?;
                    }
                    if let Some(inner) = &f.message
                        && depth < MAX_DEPTH
                    {
                        walk(registry, inner, &bytes[..len], depth + 1, left)
                            .map_err(|_| number)?;
                    }
                }
                len
            }
            _ => return Ok(()),
        };
        if key & 7 != 2 && repeated {
            take(left, 1, number)?;
        }
        if skip > bytes.len() {
            return Ok(());
        }
        bytes = &bytes[skip..];
    }
    Ok(())
}

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
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        // The service polled ready takes the call: nothing here waits, so
        // nothing needs a clone of it.
        let req = match SCAN_OF.get(req.uri().path()) {
            Some(&scan) => {
                let max_message_bytes = self.max_message_bytes;
                req.map(|body| {
                    tonic::body::Body::new(ScannedBody {
                        inner: body,
                        scan,
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
        self.inner.call(req)
    }
}

/// A request body handing on only whole gRPC messages, each counted first.
struct ScannedBody {
    inner: tonic::body::Body,
    scan: Scan,
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
    /// A whole message refused: the status to answer.
    Refused(tonic::Status),
    /// Not a whole message yet.
    Partial,
    /// A message too large to buffer.
    TooLarge,
}

impl ScannedBody {
    fn front(&self) -> Front {
        let Some((flag, len)) = super::unary::prefix(&self.buf) else {
            return Front::Partial;
        };
        let compressed = flag != 0;
        if len > self.max_message_bytes {
            return Front::TooLarge;
        }
        if self.buf.len() < 5 + len {
            return Front::Partial;
        }
        // Compressed messages are not accepted by the services anyway.
        if !compressed {
            let message = &self.buf[5..5 + len];
            if let Some(batch) = self.scan.batch
                && count_field(message, batch.field_number, batch.max) > batch.max
            {
                let Batch {
                    field_name, max, ..
                } = batch;
                return Front::Refused(tonic::Status::from(Error::invalid(
                    field_name,
                    format!("holds more than {max} items; at most {max} are accepted"),
                )));
            }
            if let Some(field) = over_budget(self.scan.input, message) {
                return Front::Refused(tonic::Status::from(Error::invalid(
                    field,
                    format!(
                        "holds too many values to decode: a message may hold at most \
                         {ELEMENT_BASE} repeated elements (items, list values, map entries, \
                         at any depth) plus one per {BYTES_PER_ELEMENT} bytes of its size"
                    ),
                )));
            }
        }
        Front::Pass(5 + len)
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
                Front::Refused(status) => {
                    self.buf.clear();
                    self.ended = true;
                    return Poll::Ready(Some(Err(status)));
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

    /// `{"l": [v; n]}` as a Struct.
    fn list_struct(n: usize, v: prost_types::Value) -> crate::structs::Struct {
        use prost_types::value::Kind;
        prost_types::Struct {
            fields: [(
                "l".to_string(),
                prost_types::Value {
                    kind: Some(Kind::ListValue(prost_types::ListValue {
                        values: vec![v; n],
                    })),
                },
            )]
            .into(),
        }
        .into()
    }

    #[test]
    fn nested_values_count_at_any_depth_against_the_budget() {
        use crate::proto::CreateSessionRequest;
        use prost_types::value::Kind;
        assert!(REGISTRY.messages.contains_key(".google.protobuf.ListValue"));
        let input = ".verdict.v1.CreateSessionRequest";
        // 1.5 million empty list values: 3 MB, refused under `config`.
        let hostile = CreateSessionRequest {
            request_id: "r".into(),
            config: Some(list_struct(1_500_000, prost_types::Value::default())),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(over_budget(input, &hostile), Some("config"));
        // Three JSON fields of 20,000 numbers each: accepted.
        let number = prost_types::Value {
            kind: Some(Kind::NumberValue(1.5)),
        };
        let legit = CreateSessionRequest {
            request_id: "r".into(),
            config: Some(list_struct(20_000, number.clone())),
            input_refs: Some(list_struct(20_000, number.clone())),
            metadata: Some(list_struct(20_000, number)),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(over_budget(input, &legit), None);
        // A batch of 1,000 executions with a 100-step log each: accepted.
        let text = |t: &str| prost_types::Value {
            kind: Some(Kind::StringValue(t.into())),
        };
        let step = prost_types::Struct {
            fields: [
                ("action".to_string(), text("click")),
                ("target".to_string(), text("#submit")),
            ]
            .into(),
        };
        let batch = RecordExecutionsRequest {
            items: vec![
                ExecutionInput {
                    interaction_log: vec![step.into(); 100],
                    screenshot_refs: vec!["s3://bucket/shot.png".into(); 5],
                    ..Default::default()
                };
                1_000
            ],
            ..Default::default()
        }
        .encode_to_vec();
        let input = ".verdict.v1.RecordExecutionsRequest";
        assert_eq!(over_budget(input, &batch), None);
        // One execution whose log holds two million empty steps: refused.
        let huge = RecordExecutionsRequest {
            items: vec![ExecutionInput {
                interaction_log: vec![crate::structs::Struct::default(); 2_000_000],
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(over_budget(input, &huge), Some("items"));
        // Every RPC is scanned.
        assert!(SCAN_OF.contains_key("/verdict.v1.SessionService/CreateSession"));
    }
}
