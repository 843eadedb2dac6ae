//! Key/value labels of test runs, sessions, executions and coverage
//! reports: at most [`MAX_LABELS`] per object, keys 1 to [`MAX_KEY`]
//! characters, values up to [`MAX_VALUE`], stored as a jsonb object of
//! strings and filtered with `@>` (equality) and `?&` (presence).

use crate::digest::Canonical;
use crate::validate::Validator;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

pub const MAX_LABELS: usize = 32;
pub const MAX_KEY: usize = 64;
pub const MAX_VALUE: usize = 256;

/// Validated labels, sorted by key.
pub type Labels = BTreeMap<String, String>;

/// Validates the labels of `field`.
pub fn validate(v: &mut Validator, field: &str, raw: &HashMap<String, String>) -> Labels {
    if raw.len() > MAX_LABELS {
        v.violation(
            field,
            format!("holds {} labels; at most {MAX_LABELS}", raw.len()),
        );
    }
    let mut labels = Labels::new();
    for (key, value) in raw {
        let name = format!("{field}[{key:?}]");
        v.required_text(&name, key, MAX_KEY);
        v.optional_message(&name, value, MAX_VALUE);
        labels.insert(key.clone(), value.clone());
    }
    labels
}

/// Validates label keys (a presence filter).
pub fn validate_keys(v: &mut Validator, field: &str, raw: &[String]) -> Vec<String> {
    if raw.len() > MAX_LABELS {
        v.violation(
            field,
            format!("holds {} keys; at most {MAX_LABELS}", raw.len()),
        );
    }
    let mut keys: Vec<String> = raw.to_vec();
    for (i, key) in raw.iter().enumerate() {
        v.required_text(&format!("{field}[{i}]"), key, MAX_KEY);
    }
    keys.sort();
    keys.dedup();
    keys
}

/// The jsonb value of labels.
pub fn to_json(labels: &Labels) -> serde_json::Value {
    serde_json::Value::Object(
        labels
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// Labels read straight from their jsonb column, as [`from_json`] reads
/// them (non-string values skipped, a document that is not an object read
/// as no labels), without building a `serde_json::Value` first; the common
/// empty object costs nothing.
pub struct LabelsColumn(pub Labels);

impl<'a> tokio_postgres::types::FromSql<'a> for LabelsColumn {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = crate::convert::json_text(ty, raw)?;
        if text == b"{}" {
            return Ok(LabelsColumn(Labels::new()));
        }
        let object: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(text).unwrap_or_default();
        Ok(LabelsColumn(
            object
                .into_iter()
                .filter_map(|(k, v)| match v {
                    serde_json::Value::String(v) => Some((k, v)),
                    _ => None,
                })
                .collect(),
        ))
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        use tokio_postgres::types::Type;
        *ty == Type::JSONB || *ty == Type::JSON
    }
}

/// Labels read back from their jsonb value (non-string values, which the
/// gateway never writes, are skipped).
pub fn from_json(value: &serde_json::Value) -> HashMap<String, String> {
    value
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// Feeds labels into a content digest, only when there are some: digests
/// of content stored before labels existed (or sent without them) stay
/// what they were, so their replays still match.
pub fn feed(h: &mut Canonical, labels: &Labels) {
    if !labels.is_empty() {
        h.str("labels").seq(labels.iter(), |h, (k, v)| {
            h.str(k).str(v);
        });
    }
}

/// The label filters of a list, as ListTestRuns has them: `labels` (every
/// one present with that value, `@>`) and `label_keys` (every key present,
/// `?&`). Part of the list's page-token fingerprint, left out when empty
/// so tokens issued before the filters existed stay valid.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabelFilter {
    #[serde(skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub label_keys: Vec<String>,
}

impl LabelFilter {
    /// Validates the request fields `labels` and `label_keys`.
    pub fn validate(
        v: &mut Validator,
        labels: &HashMap<String, String>,
        label_keys: &[String],
    ) -> LabelFilter {
        LabelFilter {
            labels: validate(v, "labels", labels),
            label_keys: validate_keys(v, "label_keys", label_keys),
        }
    }

    /// The SQL parameters of `($n::jsonb IS NULL OR labels @> $n)` and
    /// `($m::text[] IS NULL OR labels ?& $m)`: NULL when unset.
    pub fn params(&self) -> (Option<serde_json::Value>, Option<&[String]>) {
        (
            (!self.labels.is_empty()).then(|| to_json(&self.labels)),
            (!self.label_keys.is_empty()).then_some(self.label_keys.as_slice()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::types::{FromSql, Type};

    fn read(ty: &Type, raw: &[u8]) -> Labels {
        LabelsColumn::from_sql(ty, raw).unwrap().0
    }

    #[test]
    fn a_labels_column_reads_as_from_json_reads_its_value() {
        for text in [
            r#"{}"#,
            r#"{"team": "core", "n": 1, "nested": {"a": "b"}, "list": ["x"], "none": null}"#,
            r#"{"é": "ü", "esc\"aped": "line\nbreak"}"#,
            r#"null"#,
            r#"["not", "an", "object"]"#,
            r#""text""#,
        ] {
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            let expected: Labels = from_json(&value).into_iter().collect();
            let mut jsonb = vec![1u8];
            jsonb.extend_from_slice(text.as_bytes());
            assert_eq!(read(&Type::JSONB, &jsonb), expected, "{text}");
            assert_eq!(read(&Type::JSON, text.as_bytes()), expected, "{text}");
        }
        assert!(LabelsColumn::from_sql(&Type::JSONB, b"\x02{}").is_err());
    }
}
