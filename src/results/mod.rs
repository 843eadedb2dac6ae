//! Validation results: domain types and their conversions.

mod service;
pub mod sql;

pub use service::ResultApi;

use crate::convert::{JsonDoc, timestamp};
use crate::error::{Error, Result};
use crate::pagination;
use crate::proto;
use crate::validate::Validator;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value as Json;
use uuid::Uuid;

/// Largest source/target representation, encoded as JSON.
pub const MAX_REPRESENTATION_BYTES: usize = 1024 * 1024;
/// Longest summary.
pub const MAX_SUMMARY: usize = 8192;

use crate::wire::wire_enum;

wire_enum!(ResultType, proto::ResultType, {
    Static = "static",
    Behavioral = "behavioral",
    Hybrid = "hybrid",
});

wire_enum!(OverallStatus, proto::OverallStatus, {
    Passed = "passed",
    Failed = "failed",
    Warning = "warning",
    Error = "error",
});

/// A stored result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ValidationResult {
    pub id: Uuid,
    pub session_id: Uuid,
    pub request_id: String,
    pub result_type: ResultType,
    pub overall_status: OverallStatus,
    pub fidelity_score: f64,
    pub summary: String,
    pub execution_time_ms: i64,
    /// `None` when a BASIC list left it out.
    pub source_representation: Option<JsonDoc>,
    pub target_representation: Option<JsonDoc>,
    pub created_at: DateTime<Utc>,
}

impl From<ValidationResult> for proto::ValidationResult {
    fn from(r: ValidationResult) -> Self {
        proto::ValidationResult {
            id: r.id.to_string(),
            session_id: r.session_id.to_string(),
            request_id: r.request_id,
            result_type: r.result_type.to_proto() as i32,
            overall_status: r.overall_status.to_proto() as i32,
            fidelity_score: r.fidelity_score,
            summary: r.summary,
            execution_time_ms: r.execution_time_ms,
            // Null only when a BASIC list left them out.
            source_representation: r.source_representation.and_then(JsonDoc::into_object),
            target_representation: r.target_representation.and_then(JsonDoc::into_object),
            created_at: Some(timestamp(r.created_at)),
        }
    }
}

/// A result to record.
#[derive(Debug, Clone)]
pub struct NewResult {
    pub session_id: Uuid,
    pub request_id: String,
    pub result_type: ResultType,
    pub overall_status: OverallStatus,
    pub fidelity_score: f64,
    pub summary: String,
    pub execution_time_ms: i64,
    pub source_representation: Json,
    pub target_representation: Json,
}

impl TryFrom<proto::RecordResultRequest> for NewResult {
    type Error = Error;

    fn try_from(r: proto::RecordResultRequest) -> Result<Self> {
        let mut v = Validator::new();
        let new = NewResult {
            session_id: v.uuid("session_id", &r.session_id),
            request_id: v.required_text(
                "request_id",
                &r.request_id,
                crate::sessions::MAX_REQUEST_ID,
            ),
            result_type: v
                .required_enum("result_type", r.result_type, ResultType::from_proto)
                .unwrap_or(ResultType::Static),
            overall_status: v
                .required_enum(
                    "overall_status",
                    r.overall_status,
                    OverallStatus::from_proto,
                )
                .unwrap_or(OverallStatus::Error),
            fidelity_score: v.unit_interval("fidelity_score", r.fidelity_score),
            summary: v.optional_message("summary", &r.summary, MAX_SUMMARY),
            execution_time_ms: v.non_negative("execution_time_ms", r.execution_time_ms),
            source_representation: v.json_max(
                "source_representation",
                r.source_representation.as_ref(),
                MAX_REPRESENTATION_BYTES,
            ),
            target_representation: v.json_max(
                "target_representation",
                r.target_representation.as_ref(),
                MAX_REPRESENTATION_BYTES,
            ),
        };
        v.finish()?;
        Ok(new)
    }
}

/// Filters of ListResults; part of the page-token fingerprint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ResultFilter {
    pub session_id: Option<Uuid>,
    pub result_types: Vec<ResultType>,
    pub overall_statuses: Vec<OverallStatus>,
    pub min_fidelity: Option<f64>,
    pub max_fidelity: Option<f64>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
}

/// Keyset position in newest-first order: (created_at microseconds, id).
pub type ResultKey = (i64, Uuid);

/// A validated ListResults call.
#[derive(Debug, Clone)]
pub struct ListResults {
    pub filter: ResultFilter,
    pub page_size: i64,
    /// BASIC leaves the representations out (not read at all).
    pub view: pagination::View,
    pub after: Option<ResultKey>,
    pub fingerprint: String,
}

/// Distinct, sorted values of a repeated enum filter.
pub fn enum_set<T: Ord + Copy>(
    v: &mut Validator,
    field: &str,
    raw: &[i32],
    convert: impl Fn(i32) -> Option<T>,
) -> Vec<T> {
    let mut out: Vec<T> = raw
        .iter()
        .enumerate()
        .filter_map(|(i, x)| v.required_enum(&format!("{field}[{i}]"), *x, &convert))
        .collect();
    out.sort();
    out.dedup();
    out
}

impl TryFrom<proto::ListResultsRequest> for ListResults {
    type Error = Error;

    fn try_from(r: proto::ListResultsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let (created_from, created_to) = v.time_range("created", r.created.as_ref());
        let filter = ResultFilter {
            session_id: v.optional_uuid("session_id", &r.session_id),
            result_types: enum_set(
                &mut v,
                "result_types",
                &r.result_types,
                ResultType::from_proto,
            ),
            overall_statuses: enum_set(
                &mut v,
                "overall_statuses",
                &r.overall_statuses,
                OverallStatus::from_proto,
            ),
            min_fidelity: r.min_fidelity.map(|x| v.unit_interval("min_fidelity", x)),
            max_fidelity: r.max_fidelity.map(|x| v.unit_interval("max_fidelity", x)),
            created_from,
            created_to,
        };
        if let (Some(lo), Some(hi)) = (filter.min_fidelity, filter.max_fidelity)
            && lo > hi
        {
            v.violation("min_fidelity", "must not exceed max_fidelity");
        }
        let page_size = v.page_size("page_size", r.page_size);
        let view = pagination::View::from_wire(&mut v, "view", r.view);
        v.finish()?;
        let fingerprint = pagination::fingerprint(&view.scope("results"), &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListResults {
            filter,
            page_size,
            view,
            after,
            fingerprint,
        })
    }
}
