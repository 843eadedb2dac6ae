//! Test cases: test definitions, their executions at CI scale, and the
//! statistics (pass rate, durations, flakiness) computed over them.

pub mod executions;
pub mod executions_sql;
mod service;
pub mod sql;
pub mod statistics_sql;

pub use service::TestCaseApi;

use crate::convert::{json_to_struct, timestamp};
use crate::error::{Error, Result};
use crate::pagination;
use crate::proto;
use crate::results::enum_set;
use crate::validate::Validator;
use crate::wire::wire_enum;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value as Json;
use uuid::Uuid;

/// Longest key.
pub const MAX_KEY: usize = 128;
const MAX_NAME: usize = 256;
const MAX_DESCRIPTION: usize = 8192;
/// Longest subsystem name (test cases and coverage share it).
pub const MAX_SUBSYSTEM: usize = 128;
const MAX_TAGS: usize = 64;
const MAX_TAG: usize = 64;

wire_enum!(TestType, proto::TestType, {
    Unit = "unit",
    Integration = "integration",
    Behavioral = "behavioral",
    Performance = "performance",
    Security = "security",
    E2e = "e2e",
});

wire_enum!(ExecutionStatus, proto::ExecutionStatus, {
    Passed = "passed",
    Failed = "failed",
    Skipped = "skipped",
    Error = "error",
});

/// A stored test case.
#[derive(Debug, Clone, PartialEq)]
pub struct TestCase {
    pub id: Uuid,
    pub key: String,
    pub name: String,
    pub description: String,
    pub test_type: TestType,
    pub target_subsystem: String,
    pub required_hardware: Json,
    pub tags: Vec<String>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<TestCase> for proto::TestCase {
    fn from(t: TestCase) -> Self {
        proto::TestCase {
            id: t.id.to_string(),
            key: t.key,
            name: t.name,
            description: t.description,
            test_type: t.test_type.to_proto() as i32,
            target_subsystem: t.target_subsystem,
            required_hardware: Some(json_to_struct(&t.required_hardware)),
            tags: t.tags,
            version: t.version,
            created_at: Some(timestamp(t.created_at)),
            updated_at: Some(timestamp(t.updated_at)),
        }
    }
}

/// The editable fields of a test case, validated.
#[derive(Debug, Clone)]
pub struct TestCaseFields {
    pub name: String,
    pub description: String,
    pub test_type: TestType,
    pub target_subsystem: String,
    pub required_hardware: Json,
    pub tags: Vec<String>,
}

/// A test case to create.
#[derive(Debug, Clone)]
pub struct NewTestCase {
    pub key: String,
    pub fields: TestCaseFields,
}

fn name(v: &mut Validator, raw: &str) -> String {
    v.required_text("name", raw, MAX_NAME)
}

fn description(v: &mut Validator, raw: &str) -> String {
    v.optional_message("description", raw, MAX_DESCRIPTION)
}

fn test_type(v: &mut Validator, raw: i32) -> TestType {
    v.required_enum("test_type", raw, TestType::from_proto)
        .unwrap_or(TestType::Unit)
}

fn subsystem(v: &mut Validator, field: &str, raw: &str) -> String {
    v.optional_text(field, raw, MAX_SUBSYSTEM)
        .unwrap_or_default()
}

/// Tags, sorted and without duplicates.
fn tags(v: &mut Validator, raw: &[String]) -> Vec<String> {
    if raw.len() > MAX_TAGS {
        v.violation(
            "tags",
            format!("holds {} tags; at most {MAX_TAGS} are accepted", raw.len()),
        );
        return Vec::new();
    }
    let mut out: Vec<String> = raw
        .iter()
        .enumerate()
        .map(|(i, t)| v.required_text(&format!("tags[{i}]"), t, MAX_TAG))
        .collect();
    out.sort();
    out.dedup();
    out
}

impl TryFrom<proto::CreateTestCaseRequest> for NewTestCase {
    type Error = Error;

    fn try_from(r: proto::CreateTestCaseRequest) -> Result<Self> {
        let mut v = Validator::new();
        let new = NewTestCase {
            key: v.required_text("key", &r.key, MAX_KEY),
            fields: TestCaseFields {
                name: name(&mut v, &r.name),
                description: description(&mut v, &r.description),
                test_type: test_type(&mut v, r.test_type),
                target_subsystem: subsystem(&mut v, "target_subsystem", &r.target_subsystem),
                required_hardware: v.json("required_hardware", r.required_hardware.as_ref()),
                tags: tags(&mut v, &r.tags),
            },
        };
        v.finish()?;
        Ok(new)
    }
}

/// How a test case is named in a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TestCaseRef {
    Id(Uuid),
    Key(String),
}

impl std::fmt::Display for TestCaseRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TestCaseRef::Id(id) => write!(f, "test case {id}"),
            TestCaseRef::Key(key) => write!(f, "test case with key {key:?}"),
        }
    }
}

impl TestCaseRef {
    pub fn not_found(&self) -> Error {
        Error::NotFound(format!("{self} not found"))
    }
}

/// An optional test case named by id or key (at most one of them).
pub fn optional_ref(
    v: &mut Validator,
    (id_field, id): (&str, &str),
    (key_field, key): (&str, &str),
) -> Option<TestCaseRef> {
    match (id.is_empty(), key.is_empty()) {
        (true, true) => None,
        (false, true) => Some(TestCaseRef::Id(v.uuid(id_field, id))),
        (true, false) => Some(TestCaseRef::Key(v.required_text(key_field, key, MAX_KEY))),
        (false, false) => {
            v.violation(
                key_field,
                format!("set at most one of {id_field} and {key_field}"),
            );
            None
        }
    }
}

impl TryFrom<proto::GetTestCaseRequest> for TestCaseRef {
    type Error = Error;

    fn try_from(r: proto::GetTestCaseRequest) -> Result<Self> {
        use proto::get_test_case_request::Lookup;
        let mut v = Validator::new();
        let lookup = match r.lookup {
            Some(Lookup::Id(id)) => TestCaseRef::Id(v.uuid("id", &id)),
            Some(Lookup::Key(key)) => TestCaseRef::Key(v.required_text("key", &key, MAX_KEY)),
            None => {
                v.violation("lookup", "set either id or key");
                TestCaseRef::Id(Uuid::nil())
            }
        };
        v.finish()?;
        Ok(lookup)
    }
}

/// Filters of ListTestCases; part of the page-token fingerprint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TestCaseFilter {
    pub test_types: Vec<TestType>,
    pub target_subsystem: Option<String>,
    pub tag: Option<String>,
    pub name_prefix: Option<String>,
    /// The full-text filter over names and descriptions; left out of the
    /// fingerprint when unset (tokens from before stay valid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// A validated ListTestCases call; pages resume after a key.
#[derive(Debug, Clone)]
pub struct ListTestCases {
    pub filter: TestCaseFilter,
    pub page_size: i64,
    pub after: Option<String>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListTestCasesRequest> for ListTestCases {
    type Error = Error;

    fn try_from(r: proto::ListTestCasesRequest) -> Result<Self> {
        let mut v = Validator::new();
        let filter = TestCaseFilter {
            test_types: enum_set(&mut v, "test_types", &r.test_types, TestType::from_proto),
            target_subsystem: v.optional_text(
                "target_subsystem",
                &r.target_subsystem,
                MAX_SUBSYSTEM,
            ),
            tag: v.optional_text("tag", &r.tag, MAX_TAG),
            name_prefix: v.optional_text("name_prefix", &r.name_prefix, MAX_NAME),
            query: crate::search::validate(&mut v, "query", &r.query),
        };
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint("test_cases", &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListTestCases {
            filter,
            page_size,
            after,
            fingerprint,
        })
    }
}

/// The fields an update may name.
const UPDATABLE: [&str; 6] = [
    "name",
    "description",
    "test_type",
    "target_subsystem",
    "required_hardware",
    "tags",
];

/// A validated UpdateTestCase call: the new value of each field named by the
/// mask, `None` for the others.
#[derive(Debug, Clone, Default)]
pub struct TestCaseUpdate {
    pub id: Uuid,
    pub expected_version: Option<i64>,
    pub name: Option<String>,
    pub description: Option<String>,
    pub test_type: Option<TestType>,
    pub target_subsystem: Option<String>,
    pub required_hardware: Option<Json>,
    pub tags: Option<Vec<String>>,
}

impl TryFrom<proto::UpdateTestCaseRequest> for TestCaseUpdate {
    type Error = Error;

    fn try_from(r: proto::UpdateTestCaseRequest) -> Result<Self> {
        let mut v = Validator::new();
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            v.violation("update_mask", "name at least one field to update");
        }
        for (i, p) in paths.iter().enumerate() {
            if p == "key" || p == "id" {
                v.violation(
                    format!("update_mask.paths[{i}]"),
                    format!("{p:?} is immutable"),
                );
            } else if !UPDATABLE.contains(&p.as_str()) {
                v.violation(
                    format!("update_mask.paths[{i}]"),
                    format!("{p:?} is not an updatable field ({})", UPDATABLE.join(", ")),
                );
            }
        }
        let expected_version = v.expected_version("expected_version", r.expected_version);
        let tc = r.test_case.unwrap_or_default();
        let mut nested = Validator::scoped("test_case.");
        let named = |f: &str| paths.iter().any(|p| p == f);
        let update = TestCaseUpdate {
            id: nested.uuid("id", &tc.id),
            expected_version,
            name: named("name").then(|| name(&mut nested, &tc.name)),
            description: named("description").then(|| description(&mut nested, &tc.description)),
            test_type: named("test_type").then(|| test_type(&mut nested, tc.test_type)),
            target_subsystem: named("target_subsystem")
                .then(|| subsystem(&mut nested, "target_subsystem", &tc.target_subsystem)),
            required_hardware: named("required_hardware")
                .then(|| nested.json("required_hardware", tc.required_hardware.as_ref())),
            tags: named("tags").then(|| tags(&mut nested, &tc.tags)),
        };
        v.absorb(nested);
        v.finish()?;
        Ok(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_sorted_and_deduplicated() {
        let mut v = Validator::new();
        let t = tags(&mut v, &["b".into(), "a".into(), "b".into()]);
        assert!(v.finish().is_ok());
        assert_eq!(t, ["a", "b"]);
    }

    #[test]
    fn an_update_refuses_unknown_and_immutable_paths() {
        let err = TestCaseUpdate::try_from(proto::UpdateTestCaseRequest {
            test_case: Some(proto::TestCase {
                id: Uuid::now_v7().to_string(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["name".into(), "key".into(), "colour".into()],
            }),
            expected_version: None,
        })
        .unwrap_err();
        let Error::InvalidArgument(vs) = err else {
            panic!("{err:?}")
        };
        let fields: Vec<_> = vs.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "update_mask.paths[1]",
                "update_mask.paths[2]",
                "test_case.name"
            ]
        );
    }
}
