//! Discrepancies: differences found between a migration's source and
//! target, their bulk ingest, and their triage.

mod service;
pub mod sql;

pub use service::DiscrepancyApi;

use crate::convert::{opt_timestamp, timestamp};
use crate::error::{Error, Result};
use crate::pagination;
use crate::proto;
use crate::results::enum_set;
use crate::validate::Validator;
use crate::wire::wire_enum;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Most discrepancies in one RecordDiscrepancies call or one ingest chunk.
pub const MAX_BATCH: usize = 5000;
const MAX_KIND: usize = 64;
const MAX_TEXT: usize = 8192;
const MAX_ELEMENT: usize = 2048;
const MAX_FINGERPRINT: usize = 128;
const MAX_ACTOR: usize = 128;

wire_enum!(Severity, proto::Severity, {
    Critical = "critical",
    High = "high",
    Medium = "medium",
    Low = "low",
    Info = "info",
});

impl Severity {
    /// The stored rank: 1 (critical) .. 5 (info), the proto enum's number.
    pub fn rank(self) -> i16 {
        self.to_proto() as i16
    }

    pub fn from_rank(rank: i16) -> Result<Self> {
        Severity::from_proto(i32::from(rank))
            .ok_or_else(|| Error::Internal(format!("unknown severity rank {rank} in the database")))
    }
}

wire_enum!(Resolution, proto::Resolution, {
    Open = "open",
    Acknowledged = "acknowledged",
    Resolved = "resolved",
    WontFix = "wont_fix",
    FalsePositive = "false_positive",
    Muted = "muted",
});

/// A validated discrepancy to store, its id already assigned.
#[derive(Debug, Clone)]
pub struct NewDiscrepancy {
    pub id: Uuid,
    pub result_id: Option<Uuid>,
    pub kind: String,
    pub severity: Severity,
    pub description: String,
    pub source_element: String,
    pub target_element: String,
    pub recommendation: String,
    pub confidence: f64,
    pub fingerprint: String,
}

/// The gateway's fingerprint: kind plus normalised source and target
/// elements (trimmed, whitespace collapsed, lower-cased), hashed.
pub fn fingerprint(kind: &str, source: &str, target: &str) -> String {
    let normalise = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    h.update([0]);
    h.update(normalise(source).as_bytes());
    h.update([0]);
    h.update(normalise(target).as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Validates one reported discrepancy; violations are named `items[i].field`.
pub fn validate_input(
    v: &mut Validator,
    index: usize,
    raw: proto::DiscrepancyInput,
) -> NewDiscrepancy {
    let mut iv = Validator::scoped(format!("items[{index}]."));
    let kind = iv.required_text("kind", &raw.kind, MAX_KIND);
    let source_element = iv.optional_message("source_element", &raw.source_element, MAX_ELEMENT);
    let target_element = iv.optional_message("target_element", &raw.target_element, MAX_ELEMENT);
    let fingerprint = if raw.fingerprint.is_empty() {
        fingerprint(&kind, &source_element, &target_element)
    } else {
        iv.required_text("fingerprint", &raw.fingerprint, MAX_FINGERPRINT)
    };
    let new = NewDiscrepancy {
        id: Uuid::now_v7(),
        result_id: iv.optional_uuid("result_id", &raw.result_id),
        severity: iv
            .required_enum("severity", raw.severity, Severity::from_proto)
            .unwrap_or(Severity::Info),
        description: iv.required_message("description", &raw.description, MAX_TEXT),
        recommendation: iv.optional_message("recommendation", &raw.recommendation, MAX_TEXT),
        confidence: iv.unit_interval("confidence", raw.confidence),
        kind,
        source_element,
        target_element,
        fingerprint,
    };
    v.absorb(iv);
    new
}

/// Validates a list of reported discrepancies (1..=MAX_BATCH unless `allow_empty`).
pub fn validate_items(
    v: &mut Validator,
    items: Vec<proto::DiscrepancyInput>,
    allow_empty: bool,
) -> Vec<NewDiscrepancy> {
    v.items("items", items, MAX_BATCH, allow_empty, validate_input)
}

/// A stored discrepancy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Discrepancy {
    pub id: Uuid,
    pub session_id: Uuid,
    pub result_id: Option<Uuid>,
    pub kind: String,
    pub severity: Severity,
    pub description: String,
    pub source_element: String,
    pub target_element: String,
    pub recommendation: String,
    pub confidence: f64,
    pub fingerprint: String,
    pub resolution: Resolution,
    pub resolved_by: String,
    pub resolution_note: String,
    pub resolution_updated_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl From<Discrepancy> for proto::Discrepancy {
    fn from(d: Discrepancy) -> Self {
        proto::Discrepancy {
            id: d.id.to_string(),
            session_id: d.session_id.to_string(),
            result_id: d.result_id.map(|r| r.to_string()).unwrap_or_default(),
            kind: d.kind,
            severity: d.severity.to_proto() as i32,
            description: d.description,
            source_element: d.source_element,
            target_element: d.target_element,
            recommendation: d.recommendation,
            confidence: d.confidence,
            fingerprint: d.fingerprint,
            resolution: d.resolution.to_proto() as i32,
            resolved_by: d.resolved_by,
            resolution_note: d.resolution_note,
            resolution_updated_at: opt_timestamp(d.resolution_updated_at),
            created_at: Some(timestamp(d.created_at)),
        }
    }
}

/// Filters of ListDiscrepancies; part of the page-token fingerprint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiscrepancyFilter {
    pub session_id: Option<Uuid>,
    pub result_id: Option<Uuid>,
    pub severities: Vec<Severity>,
    pub kind: Option<String>,
    pub resolutions: Vec<Resolution>,
    pub fingerprint: Option<String>,
    pub min_confidence: Option<f64>,
    /// The full-text filter over descriptions; left out of the fingerprint
    /// when unset (tokens from before stay valid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Only these ids (sorted, distinct; empty: any). Left out of the
    /// fingerprint when empty, so tokens issued before the filter existed
    /// stay valid.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<Uuid>,
}

/// Keyset position in list order: (severity rank, created_at microseconds, id).
pub type DiscrepancyKey = (i16, i64, Uuid);

/// A validated ListDiscrepancies call.
#[derive(Debug, Clone)]
pub struct ListDiscrepancies {
    pub filter: DiscrepancyFilter,
    pub page_size: i64,
    pub after: Option<DiscrepancyKey>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListDiscrepanciesRequest> for ListDiscrepancies {
    type Error = Error;

    fn try_from(r: proto::ListDiscrepanciesRequest) -> Result<Self> {
        let mut v = Validator::new();
        let filter = DiscrepancyFilter {
            session_id: v.optional_uuid("session_id", &r.session_id),
            result_id: v.optional_uuid("result_id", &r.result_id),
            severities: enum_set(&mut v, "severities", &r.severities, Severity::from_proto),
            kind: v.optional_text("kind", &r.kind, MAX_KIND),
            resolutions: enum_set(
                &mut v,
                "resolutions",
                &r.resolutions,
                Resolution::from_proto,
            ),
            fingerprint: v.optional_text("fingerprint", &r.fingerprint, MAX_FINGERPRINT),
            min_confidence: r
                .min_confidence
                .map(|c| v.unit_interval("min_confidence", c)),
            query: crate::search::validate(&mut v, "query", &r.query),
            ids: id_set(&mut v, "ids", &r.ids),
        };
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint("discrepancies", &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListDiscrepancies {
            filter,
            page_size,
            after,
            fingerprint,
        })
    }
}

/// Most ids a ListDiscrepancies `ids` filter takes (a page's worth).
pub const MAX_IDS: usize = 1000;

/// The distinct, sorted UUIDs of `field`: at most [`MAX_IDS`], each valid.
fn id_set(v: &mut Validator, field: &str, raw: &[String]) -> Vec<Uuid> {
    if raw.len() > MAX_IDS {
        v.violation(field, format!("at most {MAX_IDS} ids, not {}", raw.len()));
        return Vec::new();
    }
    let mut ids: Vec<Uuid> = raw
        .iter()
        .enumerate()
        .map(|(i, id)| v.uuid(&format!("{field}[{i}]"), id))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// A validated ResolveDiscrepancy call.
#[derive(Debug, Clone)]
pub struct Resolve {
    pub id: Uuid,
    pub resolution: Resolution,
    pub actor: String,
    pub note: String,
    pub apply_to_fingerprint: bool,
}

impl TryFrom<proto::ResolveDiscrepancyRequest> for Resolve {
    type Error = Error;

    fn try_from(r: proto::ResolveDiscrepancyRequest) -> Result<Self> {
        let mut v = Validator::new();
        let resolve = Resolve {
            id: v.uuid("id", &r.id),
            resolution: v
                .required_enum("resolution", r.resolution, Resolution::from_proto)
                .unwrap_or(Resolution::Open),
            actor: v.required_text("actor", &r.actor, MAX_ACTOR),
            note: v.optional_message("note", &r.note, MAX_TEXT),
            apply_to_fingerprint: r.apply_to_fingerprint,
        };
        v.finish()?;
        Ok(resolve)
    }
}

/// One change of a resolution.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResolutionChange {
    pub id: i64,
    pub from: Resolution,
    pub to: Resolution,
    pub actor: String,
    pub note: String,
    pub via_fingerprint: bool,
    pub changed_at: DateTime<Utc>,
}

impl From<ResolutionChange> for proto::ResolutionChange {
    fn from(c: ResolutionChange) -> Self {
        proto::ResolutionChange {
            from_resolution: c.from.to_proto() as i32,
            to_resolution: c.to.to_proto() as i32,
            actor: c.actor,
            note: c.note,
            changed_at: Some(timestamp(c.changed_at)),
            via_fingerprint: c.via_fingerprint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_case_and_spacing_but_not_kind_or_content() {
        let a = fingerprint("precision", "  Foo.bar(x)\n", "foo.BAR(x)");
        assert_eq!(a, fingerprint("precision", "foo.bar(x)", "foo.bar(x)  "));
        assert_ne!(a, fingerprint("rounding", "foo.bar(x)", "foo.bar(x)"));
        assert_ne!(a, fingerprint("precision", "foo.bar(y)", "foo.bar(x)"));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn severity_ranks_follow_the_proto_numbers() {
        assert_eq!(Severity::Critical.rank(), 1);
        assert_eq!(Severity::Info.rank(), 5);
        assert_eq!(Severity::from_rank(3).unwrap(), Severity::Medium);
    }
}
