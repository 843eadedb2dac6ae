//! `google.protobuf.Struct` as the gateway's messages carry it (issue 13).
//!
//! Every `Struct` field of the Verdict messages is this type (the build maps
//! `.google.protobuf.Struct` here; nested objects inside a `Value` stay
//! `prost_types::Struct`). It is the same message on the wire. It holds
//! either decoded entries (what a request brings, what code builds) or, for a
//! JSON document read from PostgreSQL, the message's bytes, written by
//! [`encode_json`] straight from the document's text: a page of sessions
//! then costs no map of protobuf values per document to build, measure
//! twice, encode and free (in the ListSessions profile that was about a fifth
//! of the gateway's CPU).
//!
//! Reading the entries of an encoded one (`Deref`) decodes it once, on
//! first use; changing them (`DerefMut`) keeps the decoded entries only.

use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

/// A `google.protobuf.Struct` (see the module).
#[derive(Clone)]
pub struct Struct {
    repr: Repr,
}

#[derive(Clone)]
enum Repr {
    Fields(prost_types::Struct),
    Encoded {
        /// The message's bytes (its entries, without tag or length). A Vec
        /// as written: making it a boxed slice would reallocate it.
        bytes: Vec<u8>,
        decoded: OnceLock<prost_types::Struct>,
    },
}

impl Struct {
    /// A Struct of the JSON text `text` (an object's entries; anything else:
    /// none, as [`crate::convert::json_to_struct`]).
    pub fn from_json_text(text: &[u8]) -> Result<Self, serde_json::Error> {
        Ok(Struct::encoded(encode_json(text)?))
    }

    /// The Structs of the JSON text `text` of a list: one per item (an
    /// object's entries; any other item: none), and none at all when the
    /// text is not a list, as `json_to_struct` over a JSON array.
    pub fn list_from_json_text(text: &[u8]) -> Result<Vec<Self>, serde_json::Error> {
        Ok(read_list(text, TopList)?.unwrap_or_default())
    }

    fn encoded(bytes: Vec<u8>) -> Self {
        Struct {
            repr: Repr::Encoded {
                bytes,
                decoded: OnceLock::new(),
            },
        }
    }

    /// The entries as a `prost_types::Struct`.
    pub fn into_inner(self) -> prost_types::Struct {
        match self.repr {
            Repr::Fields(s) => s,
            Repr::Encoded { bytes, decoded } => {
                decoded.into_inner().unwrap_or_else(|| decode(&bytes))
            }
        }
    }
}

/// The entries of bytes [`encode_json`] wrote (which always decode).
fn decode(bytes: &[u8]) -> prost_types::Struct {
    prost_types::Struct::decode(bytes).unwrap_or_default()
}

impl Default for Struct {
    fn default() -> Self {
        Struct {
            repr: Repr::Fields(prost_types::Struct::default()),
        }
    }
}

impl From<prost_types::Struct> for Struct {
    fn from(s: prost_types::Struct) -> Self {
        Struct {
            repr: Repr::Fields(s),
        }
    }
}

impl From<Struct> for prost_types::Struct {
    fn from(s: Struct) -> Self {
        s.into_inner()
    }
}

impl Deref for Struct {
    type Target = prost_types::Struct;

    fn deref(&self) -> &prost_types::Struct {
        match &self.repr {
            Repr::Fields(s) => s,
            Repr::Encoded { bytes, decoded } => decoded.get_or_init(|| decode(bytes)),
        }
    }
}

impl DerefMut for Struct {
    fn deref_mut(&mut self) -> &mut prost_types::Struct {
        if let Repr::Encoded { .. } = self.repr {
            let fields = std::mem::take(self).into_inner();
            self.repr = Repr::Fields(fields);
        }
        match &mut self.repr {
            Repr::Fields(s) => s,
            Repr::Encoded { .. } => unreachable!("made decoded just above"),
        }
    }
}

impl PartialEq for Struct {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for Struct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl Message for Struct {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.repr {
            Repr::Fields(s) => s.encode_raw(buf),
            Repr::Encoded { bytes, .. } => buf.put_slice(bytes),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        (**self).merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        match &self.repr {
            Repr::Fields(s) => s.encoded_len(),
            Repr::Encoded { bytes, .. } => bytes.len(),
        }
    }

    fn clear(&mut self) {
        *self = Struct::default();
    }
}

// Field keys of the messages written here (field number << 3 | wire type).
/// `Struct.fields` (map entry), `ListValue.values`, a map entry's key.
const KEY_1_LEN: u8 = 0x0a;
/// A map entry's value.
const KEY_2_LEN: u8 = 0x12;
/// `Value.null_value` (varint).
const NULL_VALUE: u8 = 0x08;
/// `Value.number_value` (64-bit).
const NUMBER_VALUE: u8 = 0x11;
/// `Value.string_value`.
const STRING_VALUE: u8 = 0x1a;
/// `Value.bool_value` (varint).
const BOOL_VALUE: u8 = 0x20;
/// `Value.struct_value`.
const STRUCT_VALUE: u8 = 0x2a;
/// `Value.list_value`.
const LIST_VALUE: u8 = 0x32;

/// The bytes of the `google.protobuf.Struct` of the JSON text `text`: an
/// object's entries, each value as `prost_types::Value` holds it (numbers as
/// doubles, read as `serde_json` reads them); any other JSON value gives no
/// entries. Fails on text that is not JSON (or nests deeper than
/// `serde_json`'s limit), as parsing it does.
pub fn encode_json(text: &[u8]) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 2 + 8);
    encode_json_into(text, &mut out)?;
    Ok(out)
}

/// [`encode_json`], appending the Struct's bytes to `out`. On failure `out`
/// may hold part of them.
pub fn encode_json_into(text: &[u8], out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    Top(out).deserialize(&mut de)?;
    de.end()
}

/// Writes a one-byte length placeholder; returns where the content starts.
pub(crate) fn open(out: &mut Vec<u8>) -> usize {
    out.push(0);
    out.len()
}

/// Sets the length of the content from `start` (see [`open`]), moving the
/// content when its length takes more than one byte.
pub(crate) fn close(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len < 0x80 {
        out[start - 1] = len as u8;
        return;
    }
    let width = prost::encoding::encoded_len_varint(len as u64);
    out.resize(out.len() + width - 1, 0);
    out.copy_within(start..start + len, start + width - 1);
    let mut at = &mut out[start - 1..start - 1 + width];
    prost::encoding::encode_varint(len as u64, &mut at);
}

fn put_str(out: &mut Vec<u8>, key: u8, s: &str) {
    out.push(key);
    prost::encoding::encode_varint(s.len() as u64, out);
    out.extend_from_slice(s.as_bytes());
}

/// The outer JSON value: an object's entries, or nothing.
struct Top<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Top<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Top<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        entries(self.0, map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
}

/// The outer JSON list of a list of Structs: one per item.
struct TopList;

impl<'de> Visitor<'de> for TopList {
    type Value = Vec<Struct>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Struct>, A::Error> {
        let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(Item)? {
            list.push(item);
        }
        Ok(list)
    }
}

/// [`Struct::list_from_json_text`], written as the repeated Struct field
/// `field` of a message into `out`: one entry per item of the list (an
/// object's entries; any other item: an empty Struct), none when the text is
/// not a list. On failure `out` may hold part of them.
pub fn encode_json_list_into(
    text: &[u8],
    field: u32,
    out: &mut Vec<u8>,
) -> Result<(), serde_json::Error> {
    read_list(text, ListInto { field, out }).map(drop)
}

/// The JSON text `text` read by `items` when it is a list; `None` when it
/// is not (it is only checked to be JSON).
fn read_list<'de, V: Visitor<'de>>(
    text: &'de [u8],
    items: V,
) -> Result<Option<V::Value>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let starts_list = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let read = if starts_list {
        Some(serde::Deserializer::deserialize_seq(&mut de, items)?)
    } else {
        serde::Deserialize::deserialize(&mut de).map(|IgnoredAny| None)?
    };
    de.end()?;
    Ok(read)
}

/// The items of a list, each written as field `field` (see
/// [`encode_json_list_into`]).
struct ListInto<'a> {
    field: u32,
    out: &'a mut Vec<u8>,
}

impl<'de> Visitor<'de> for ListInto<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (field, out) = (self.field, self.out);
        while seq
            .next_element_seed(ItemInto {
                field,
                out: &mut *out,
            })?
            .is_some()
        {}
        Ok(())
    }
}

/// One item of a list, written as field `field` of the message in `out`.
struct ItemInto<'a> {
    field: u32,
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for ItemInto<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        prost::encoding::encode_key(self.field, WireType::LengthDelimited, self.out);
        let at = open(self.out);
        Top(&mut *self.out).deserialize(d)?;
        close(self.out, at);
        Ok(())
    }
}

/// One item of a list of Structs.
struct Item;

impl<'de> DeserializeSeed<'de> for Item {
    type Value = Struct;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Struct, D::Error> {
        let mut out = Vec::new();
        Top(&mut out).deserialize(d)?;
        Ok(Struct::encoded(out))
    }
}

/// An object's entries, as `Struct.fields` map entries.
fn entries<'de, A: MapAccess<'de>>(out: &mut Vec<u8>, mut map: A) -> Result<(), A::Error> {
    loop {
        let at = out.len();
        out.push(KEY_1_LEN);
        let entry = open(out);
        if map.next_key_seed(Key(out))?.is_none() {
            out.truncate(at);
            return Ok(());
        }
        out.push(KEY_2_LEN);
        let value = open(out);
        map.next_value_seed(ValueOf(out))?;
        close(out, value);
        close(out, entry);
    }
}

/// An object's key, as a map entry's key field.
struct Key<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        put_str(self.0, KEY_1_LEN, s);
        Ok(())
    }
}

/// One JSON value, as the content of a `google.protobuf.Value`.
struct ValueOf<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for ValueOf<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueOf<'_> {
    fn number(self, n: f64) {
        self.0.push(NUMBER_VALUE);
        self.0.extend_from_slice(&n.to_le_bytes());
    }
}

impl<'de> Visitor<'de> for ValueOf<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.extend_from_slice(&[NULL_VALUE, 0]);
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.0.extend_from_slice(&[NULL_VALUE, 0]);
        Ok(())
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        self.0.extend_from_slice(&[BOOL_VALUE, u8::from(b)]);
        Ok(())
    }

    fn visit_i64<E>(self, n: i64) -> Result<(), E> {
        self.number(n as f64);
        Ok(())
    }

    fn visit_u64<E>(self, n: u64) -> Result<(), E> {
        self.number(n as f64);
        Ok(())
    }

    fn visit_f64<E>(self, n: f64) -> Result<(), E> {
        self.number(n);
        Ok(())
    }

    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        put_str(self.0, STRING_VALUE, s);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.0.push(STRUCT_VALUE);
        let start = open(self.0);
        entries(self.0, map)?;
        close(self.0, start);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push(LIST_VALUE);
        let list = open(out);
        loop {
            let at = out.len();
            out.push(KEY_1_LEN);
            let item = open(out);
            if seq.next_element_seed(ValueOf(out))?.is_none() {
                out.truncate(at);
                break;
            }
            close(out, item);
        }
        close(out, list);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::json_to_struct;

    /// The Struct of `text` by the serde_json path: what the bytes must
    /// decode to.
    fn parse_struct(text: &[u8]) -> serde_json::Result<prost_types::Struct> {
        let json: serde_json::Value = serde_json::from_slice(text)?;
        Ok(json_to_struct(&json).into_inner())
    }

    /// Each document decodes to the Struct the parsing path builds.
    #[test]
    fn encoded_documents_decode_to_the_parsed_struct() {
        let long = "x".repeat(300);
        let many: String = (0..200)
            .map(|i| format!("\"k{i}\": {i}"))
            .collect::<Vec<_>>()
            .join(",");
        let docs = [
            "{}".to_string(),
            r#"{"strict": true, "depth": 2}"#.to_string(),
            r#"{"a": null, "b": false, "c": -0, "d": 1e308, "e": -4.9e-324, "f": 18446744073709551615, "g": -9223372036854775808, "h": 0.1}"#.to_string(),
            r#"{"s": "esc\"aped \\ \u00e9 \ud83d\ude00 \n", "": "empty key"}"#.to_string(),
            r#"{"l": [], "m": {}, "n": [1, "two", [3, [4, {"five": [null]}]], {"six": {}}]}"#.to_string(),
            format!(r#"{{"long": "{long}", "nested": {{"long": "{long}", "list": ["{long}", "{long}"]}}}}"#),
            format!("{{{many}}}"),
            "[1, 2, {\"a\": 1}]".to_string(),
            "\"just a string\"".to_string(),
            "42".to_string(),
            "null".to_string(),
        ];
        for doc in docs {
            let encoded = encode_json(doc.as_bytes()).unwrap();
            let expected = parse_struct(doc.as_bytes()).unwrap();
            assert_eq!(
                prost_types::Struct::decode(&encoded[..]).unwrap(),
                expected,
                "{doc}"
            );
            // Re-encoding the decoded entries gives a message of the same
            // length (the same entries; prost orders map keys, jsonb need
            // not), except that prost leaves out an empty key.
            if !expected.fields.contains_key("") {
                assert_eq!(expected.encoded_len(), encoded.len(), "{doc}");
            }
            let s = Struct::from_json_text(doc.as_bytes()).unwrap();
            assert_eq!(s.encoded_len(), encoded.len());
            assert_eq!(*s, expected);
            assert_eq!(s, Struct::from(expected.clone()));
            assert_eq!(s.clone().into_inner(), expected);
        }
    }

    #[test]
    fn a_list_gives_a_struct_per_item_as_json_to_struct_does() {
        for doc in [
            r#"[{"action": "click", "n": 1}, {}, {"nested": {"l": [1, {"a": null}]}}]"#,
            r#"[1, "two", null, [{"a": 1}], {"b": true}]"#,
            "[]",
            r#"{"not": "a list"}"#,
            "\"text\"",
            "null",
            "7",
        ] {
            let json: serde_json::Value = serde_json::from_str(doc).unwrap();
            let expected: Vec<prost_types::Struct> = match &json {
                serde_json::Value::Array(items) => items
                    .iter()
                    .map(|i| crate::convert::json_to_struct(i).into_inner())
                    .collect(),
                _ => Vec::new(),
            };
            let got: Vec<prost_types::Struct> = Struct::list_from_json_text(doc.as_bytes())
                .unwrap()
                .into_iter()
                .map(Struct::into_inner)
                .collect();
            assert_eq!(got, expected, "{doc}");
        }
        assert!(Struct::list_from_json_text(b"[{}, ").is_err());
        assert!(Struct::list_from_json_text(b"[] []").is_err());
    }

    #[test]
    fn lengths_of_every_width_are_minimal_varints() {
        for n in [0, 1, 100, 127, 128, 200, 16_383, 16_384, 70_000, 2_100_000] {
            let doc = format!(r#"{{"k": "{}"}}"#, "y".repeat(n));
            let encoded = encode_json(doc.as_bytes()).unwrap();
            let expected = parse_struct(doc.as_bytes()).unwrap();
            assert_eq!(encoded, expected.encode_to_vec(), "string of {n}");
        }
    }

    #[test]
    fn text_that_is_not_json_is_refused() {
        for bad in [
            "",
            "{",
            r#"{"a": }"#,
            r#"{"a": 1} trailing"#,
            "[1,]",
            "{\"a\": tru}",
        ] {
            assert!(encode_json(bad.as_bytes()).is_err(), "{bad:?}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(encode_json(format!(r#"{{"d": {deep}}}"#).as_bytes()).is_err());
    }

    #[test]
    fn an_encoded_struct_sent_in_a_message_reads_back_as_its_entries() {
        let doc = br#"{"owner": "team-3", "tags": ["a", "b"], "n": 7}"#;
        let session = crate::proto::Session {
            config: Some(Struct::from_json_text(doc).unwrap()),
            metadata: Some(Struct::default()),
            ..Default::default()
        };
        let bytes = session.encode_to_vec();
        assert_eq!(bytes.len(), session.encoded_len());
        let back = crate::proto::Session::decode(&bytes[..]).unwrap();
        assert_eq!(back, session);
        assert_eq!(
            back.config.as_ref().unwrap().fields["owner"],
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("team-3".into()))
            }
        );
        assert!(back.metadata.unwrap().fields.is_empty());
    }

    #[test]
    fn changing_an_encoded_struct_keeps_its_entries() {
        let mut s = Struct::from_json_text(br#"{"a": 1, "b": "two"}"#).unwrap();
        s.fields.remove("a");
        s.fields.insert(
            "c".into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::BoolValue(true)),
            },
        );
        let back = prost_types::Struct::decode(&s.encode_to_vec()[..]).unwrap();
        assert_eq!(back.fields.len(), 2);
        assert!(back.fields.contains_key("b") && back.fields.contains_key("c"));
        s.clear();
        assert_eq!(s.encoded_len(), 0);
    }
}
