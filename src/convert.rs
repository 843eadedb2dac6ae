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
pub fn json_to_struct(j: &Json) -> Struct {
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
        Json::Object(_) => Kind::StructValue(json_to_struct(j)),
    };
    Value { kind: Some(kind) }
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
}
