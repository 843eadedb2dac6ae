//! A seeded, schema-driven fuzzer: arbitrary bytes and arbitrary
//! well-formed messages for every RPC of every service in `proto/`, sent
//! through a real client to a real server. Fixed seed and case count, so a
//! failure reproduces exactly.

use bytes::{Buf, BufMut};
use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use std::collections::HashMap;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// xorshift64*: small, deterministic, good enough to pick cases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One RPC of the API, as the descriptor set describes it.
#[derive(Debug, Clone)]
pub struct Method {
    pub path: String,
    pub input: String,
    pub client_streaming: bool,
    pub server_streaming: bool,
}

/// Every message type and every RPC of an encoded descriptor set.
pub struct Schema {
    messages: HashMap<String, DescriptorProto>,
    pub methods: Vec<Method>,
}

impl Schema {
    pub fn load(encoded: &[u8]) -> Schema {
        let set = FileDescriptorSet::decode(encoded).expect("descriptor set");
        let mut messages = HashMap::new();
        let mut methods = Vec::new();
        fn add(prefix: &str, m: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
            let name = format!("{prefix}.{}", m.name());
            for nested in &m.nested_type {
                add(&name, nested, out);
            }
            out.insert(name, m.clone());
        }
        for file in set.file {
            let prefix = format!(".{}", file.package());
            for m in &file.message_type {
                add(&prefix, m, &mut messages);
            }
            for s in &file.service {
                for m in &s.method {
                    methods.push(Method {
                        path: format!("/{}.{}/{}", file.package(), s.name(), m.name()),
                        input: m.input_type().to_owned(),
                        client_streaming: m.client_streaming(),
                        server_streaming: m.server_streaming(),
                    });
                }
            }
        }
        Schema { messages, methods }
    }

    /// A random, well-formed encoding of message type `name`. Types outside
    /// the set (none today) get random length-delimited bytes.
    pub fn message(&self, name: &str, rng: &mut Rng, strings: &[String], depth: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let Some(desc) = self.messages.get(name) else {
            return rng.bytes(32);
        };
        for field in &desc.field {
            if !rng.chance(60) {
                continue;
            }
            let repeats = if field.label() == Label::Repeated {
                rng.below(4)
            } else {
                1
            };
            for _ in 0..repeats {
                self.field(&mut out, field, rng, strings, depth);
            }
        }
        out
    }

    fn field(
        &self,
        out: &mut Vec<u8>,
        f: &prost_types::FieldDescriptorProto,
        rng: &mut Rng,
        strings: &[String],
        depth: u32,
    ) {
        let number = f.number() as u64;
        let varint = |out: &mut Vec<u8>, v: u64| {
            prost::encoding::encode_varint(number << 3, out);
            prost::encoding::encode_varint(v, out);
        };
        let delimited = |out: &mut Vec<u8>, bytes: &[u8]| {
            prost::encoding::encode_varint((number << 3) | 2, out);
            prost::encoding::encode_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        };
        match f.r#type() {
            Type::String => {
                let s = if rng.chance(85) {
                    strings[rng.below(strings.len())].clone().into_bytes()
                } else {
                    // Possibly invalid UTF-8: must be a decode error, not a panic.
                    rng.bytes(40)
                };
                delimited(out, &s);
            }
            Type::Bytes => delimited(out, &rng.bytes(64)),
            Type::Message | Type::Group => {
                let inner = if depth >= 5 {
                    Vec::new()
                } else {
                    self.message(f.type_name(), rng, strings, depth + 1)
                };
                delimited(out, &inner);
            }
            Type::Double => {
                let v = [
                    f64::NAN,
                    f64::INFINITY,
                    f64::NEG_INFINITY,
                    0.0,
                    0.5,
                    1.0,
                    -1.0,
                    1e308,
                    f64::MIN_POSITIVE,
                    f64::MAX,
                    f64::MIN,
                    5e-324,
                    1e100,
                ][rng.below(13)];
                prost::encoding::encode_varint((number << 3) | 1, out);
                out.put_f64_le(v);
            }
            Type::Float => {
                let v = [f32::NAN, f32::INFINITY, 0.5, -1.0][rng.below(4)];
                prost::encoding::encode_varint((number << 3) | 5, out);
                out.put_f32_le(v);
            }
            Type::Fixed64 | Type::Sfixed64 => {
                prost::encoding::encode_varint((number << 3) | 1, out);
                out.put_u64_le(rng.next());
            }
            Type::Fixed32 | Type::Sfixed32 => {
                prost::encoding::encode_varint((number << 3) | 5, out);
                out.put_u32_le(rng.next() as u32);
            }
            _ => {
                // Every varint type, enums included.
                let v: i64 = [
                    0,
                    1,
                    2,
                    3,
                    5,
                    7,
                    -1,
                    50,
                    1000,
                    1001,
                    i32::MAX as i64,
                    i32::MIN as i64,
                    i64::MAX,
                    i64::MIN,
                    1 << 40,
                    (1 << 40) + 1,
                    1 << 62,
                ][rng.below(17)];
                let v = if f.r#type() == Type::Bool { v & 1 } else { v };
                varint(out, v as u64);
            }
        }
    }
}

/// A codec that passes raw message bytes both ways.
#[derive(Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// The code of a non-OK status a fuzzed call got, after checking that the
/// status carries what every Verdict error carries: a `google.rpc.ErrorInfo`
/// in domain `verdict.v1` whose reason is one of the documented reasons.
#[track_caller]
pub fn checked_code(status: &tonic::Status) -> tonic::Code {
    use tonic_types::StatusExt;
    let info = status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("a non-OK status without ErrorInfo: {status:?}"));
    assert_eq!(info.domain, verdict::error::ERROR_DOMAIN, "{status:?}");
    assert!(
        verdict::error::Reason::ALL
            .iter()
            .any(|r| r.as_str() == info.reason),
        "an undocumented reason: {status:?}"
    );
    status.code()
}
