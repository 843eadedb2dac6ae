//! Conversions between protobuf well-known types and the domain's types.

use chrono::{DateTime, Utc};
use prost_types::{ListValue, Struct, Timestamp, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// A `google.protobuf.Timestamp` for a database time.
pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<Timestamp> {
    t.map(timestamp)
}

/// A database time for a `google.protobuf.Timestamp`; `None` when it is out
/// of the range PostgreSQL and chrono share.
pub fn from_timestamp(t: &Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    let dt = DateTime::<Utc>::from_timestamp(t.seconds, t.nanos as u32)?;
    // PostgreSQL timestamptz spans 4713 BC .. 294276 AD; stay well inside.
    (-62_135_596_800..=253_402_300_799)
        .contains(&t.seconds)
        .then_some(dt)
}

/// Why a `Struct` could not become JSON, and where: `path` is the proto
/// field path of the offending value below the Struct, e.g.
/// `.fields["a"].list_value.values[2]` (append it to the Struct's field).
#[derive(Debug, PartialEq, Eq)]
pub enum JsonError {
    /// A NaN or infinite number (JSON and jsonb have neither).
    NotFinite { path: String },
    /// Objects and lists nested deeper than [`MAX_DEPTH`] (no path: it
    /// would be longer than any reader wants).
    TooDeep,
}

/// Most levels of objects and lists in a `Struct`, the outer object
/// included. The protobuf decoder refuses deeper messages (recursion limit
/// 100, two per level) before they reach this check, and every reader of
/// the stored JSON (PostgreSQL's jsonb, serde_json's 128) allows more.
pub const MAX_DEPTH: usize = 32;

/// A `google.protobuf.Struct` as a JSON object.
///
/// Every finite double is accepted and reads back bit for bit (jsonb keeps
/// the shortest decimal form exactly; serde_json parses it with
/// `float_roundtrip`), except that `-0` reads back as `0`.
pub fn struct_to_json(s: &Struct) -> Result<Json, JsonError> {
    let mut path = String::new();
    fields_to_json(s, 1, &mut path)
}

/// `depth`: the level of `s` (1 for the outer object).
fn fields_to_json(s: &Struct, depth: usize, path: &mut String) -> Result<Json, JsonError> {
    let mut map = Map::with_capacity(s.fields.len());
    // Sorted, so the first offending value is the same on every call.
    let mut keys: Vec<&String> = s.fields.keys().collect();
    keys.sort();
    for k in keys {
        let len = path.len();
        path.push_str(&format!(".fields[{k:?}]"));
        let v = value_to_json(&s.fields[k], depth, path)?;
        path.truncate(len);
        map.insert(k.clone(), v);
    }
    Ok(Json::Object(map))
}

/// `depth`: the level of the object or list holding `v`.
fn value_to_json(v: &Value, depth: usize, path: &mut String) -> Result<Json, JsonError> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        Some(Kind::NumberValue(n)) => Json::Number(
            Number::from_f64(*n).ok_or_else(|| JsonError::NotFinite { path: path.clone() })?,
        ),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::StructValue(_)) | Some(Kind::ListValue(_)) if depth >= MAX_DEPTH => {
            return Err(JsonError::TooDeep);
        }
        Some(Kind::StructValue(s)) => {
            let len = path.len();
            path.push_str(".struct_value");
            let j = fields_to_json(s, depth + 1, path)?;
            path.truncate(len);
            j
        }
        Some(Kind::ListValue(l)) => {
            let mut items = Vec::with_capacity(l.values.len());
            for (i, item) in l.values.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!(".list_value.values[{i}]"));
                items.push(value_to_json(item, depth + 1, path)?);
                path.truncate(len);
            }
            Json::Array(items)
        }
    })
}

/// A JSON object as a `google.protobuf.Struct` (anything else becomes an
/// empty one: the columns only ever hold objects).
pub fn json_to_struct(j: &Json) -> crate::structs::Struct {
    json_object(j).into()
}

fn json_object(j: &Json) -> Struct {
    match j {
        Json::Object(map) => Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        },
        _ => Struct::default(),
    }
}

fn json_to_value(j: &Json) -> Value {
    let kind = match j {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(a) => Kind::ListValue(ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Json::Object(_) => Kind::StructValue(json_object(j)),
    };
    Value { kind: Some(kind) }
}

/// The JSON text of a `jsonb` (a version byte, 1, then the text) or `json`
/// column's binary value.
pub(crate) fn json_text<'a>(
    ty: &tokio_postgres::types::Type,
    raw: &'a [u8],
) -> Result<&'a [u8], Box<dyn std::error::Error + Sync + Send>> {
    if *ty == tokio_postgres::types::Type::JSONB {
        match raw.split_first() {
            Some((1, text)) => Ok(text),
            _ => Err("unsupported jsonb encoding version".into()),
        }
    } else {
        Ok(raw)
    }
}

/// A JSON column as read: what replies send, parsed once straight from the
/// column's text (`D`: a [`crate::structs::Struct`] written as message
/// bytes, or one per item of a list), and the text itself for the rarer
/// readers that want JSON (exports, digests), which parse it on demand.
/// Serializes as the JSON it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JsonColumn<D> {
    text: Box<[u8]>,
    parsed: D,
}

/// A JSON object column ([`crate::structs::Struct::from_json_text`]).
pub type JsonDoc = JsonColumn<crate::structs::Struct>;

/// A JSON list column of objects: a Struct per item
/// ([`crate::structs::Struct::list_from_json_text`]).
pub type JsonDocList = JsonColumn<Vec<crate::structs::Struct>>;

/// What a [`JsonColumn`] parses its text into.
/// Whether the JSON text `text` is `null`.
pub fn is_json_null(text: &[u8]) -> bool {
    text.trim_ascii() == b"null"
}

pub trait FromJsonText: Sized {
    fn from_json_text(text: &[u8]) -> Result<Self, serde_json::Error>;
}

impl FromJsonText for crate::structs::Struct {
    fn from_json_text(text: &[u8]) -> Result<Self, serde_json::Error> {
        crate::structs::Struct::from_json_text(text)
    }
}

impl FromJsonText for Vec<crate::structs::Struct> {
    fn from_json_text(text: &[u8]) -> Result<Self, serde_json::Error> {
        crate::structs::Struct::list_from_json_text(text)
    }
}

impl<D> JsonColumn<D> {
    /// The document as JSON, exactly as stored.
    pub fn to_json(&self) -> Json {
        // The text parsed once already (into `parsed`).
        serde_json::from_slice(&self.text).unwrap_or_default()
    }

    /// Whether the document is JSON `null` (a column written from a
    /// missing value, as opposed to SQL NULL).
    pub fn is_null(&self) -> bool {
        is_json_null(&self.text)
    }
}

impl JsonDoc {
    /// The document as a protobuf Struct.
    pub fn into_struct(self) -> crate::structs::Struct {
        self.parsed
    }

    /// The document as a Struct unless it is JSON `null`.
    pub fn into_object(self) -> Option<crate::structs::Struct> {
        (!self.is_null()).then_some(self.parsed)
    }

    /// A stored document as the JSON a digest reads (null when left out).
    pub fn json_or_null(doc: Option<&JsonDoc>) -> Json {
        doc.map_or(Json::Null, JsonDoc::to_json)
    }
}

impl JsonDocList {
    /// The items as protobuf Structs.
    pub fn into_structs(self) -> Vec<crate::structs::Struct> {
        self.parsed
    }
}

impl<'a, D: FromJsonText> tokio_postgres::types::FromSql<'a> for JsonColumn<D> {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = json_text(ty, raw)?;
        Ok(JsonColumn {
            text: text.into(),
            parsed: D::from_json_text(text)?,
        })
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        use tokio_postgres::types::Type;
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

impl<D> serde::Serialize for JsonColumn<D> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let json: Json = serde_json::from_slice(&self.text).map_err(serde::ser::Error::custom)?;
        json.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_round_trips_through_json() {
        let j = serde_json::json!({"a": 1.5, "b": [true, null, "x"], "c": {"d": "e"}});
        assert_eq!(struct_to_json(&json_to_struct(&j)).unwrap(), j);
    }

    #[test]
    fn non_finite_numbers_are_refused() {
        let mut s = Struct::default();
        s.fields.insert(
            "n".into(),
            Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        assert_eq!(
            struct_to_json(&s),
            Err(JsonError::NotFinite {
                path: ".fields[\"n\"]".into()
            })
        );
    }

    #[test]
    fn timestamps_outside_the_supported_range_are_refused() {
        assert!(
            from_timestamp(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            })
            .is_none()
        );
        assert!(
            from_timestamp(&Timestamp {
                seconds: 0,
                nanos: -1
            })
            .is_none()
        );
        assert!(
            from_timestamp(&Timestamp {
                seconds: 1_700_000_000,
                nanos: 5
            })
            .is_some()
        );
    }

    #[test]
    fn jsonb_bytes_need_version_one() {
        use tokio_postgres::types::{FromSql, Type};
        let s = JsonDoc::from_sql(&Type::JSONB, b"\x01{\"a\": [true]}").unwrap();
        let json = serde_json::json!({"a": [true]});
        assert_eq!(s.into_struct(), json_to_struct(&json));
        assert!(JsonDoc::from_sql(&Type::JSONB, b"\x02{}").is_err());
        assert!(JsonDoc::from_sql(&Type::JSONB, b"").is_err());
        assert!(JsonDoc::from_sql(&Type::JSONB, b"\x01{\"a\": }").is_err());
        assert_eq!(
            JsonDoc::from_sql(&Type::JSON, b"{}").unwrap().into_struct(),
            crate::structs::Struct::default()
        );
    }

    #[test]
    fn a_json_null_document_is_no_object() {
        use tokio_postgres::types::{FromSql, Type};
        for raw in [&b"\x01null"[..], b"\x01 null "] {
            let doc = JsonDoc::from_sql(&Type::JSONB, raw).unwrap();
            assert!(doc.is_null());
            assert_eq!(doc.into_object(), None);
        }
        let doc = JsonDoc::from_sql(&Type::JSONB, b"\x01{}").unwrap();
        assert!(!doc.is_null());
        assert_eq!(doc.into_object(), Some(crate::structs::Struct::default()));
        assert_eq!(
            JsonDoc::json_or_null(None),
            Json::Null,
            "a column left out reads as null"
        );
    }

    #[test]
    fn a_json_doc_keeps_its_json_and_its_struct() {
        use tokio_postgres::types::{FromSql, Type};
        let doc =
            JsonDoc::from_sql(&Type::JSONB, b"\x01{\"n\": 1, \"f\": 1.0, \"l\": [\"x\"]}").unwrap();
        let json = serde_json::json!({"n": 1, "f": 1.0, "l": ["x"]});
        assert_eq!(doc.to_json(), json);
        assert_eq!(serde_json::to_value(&doc).unwrap(), json);
        assert_eq!(
            serde_json::to_string(&doc).unwrap(),
            r#"{"f":1.0,"l":["x"],"n":1}"#
        );
        assert_eq!(doc.into_struct(), json_to_struct(&json));
    }
}
