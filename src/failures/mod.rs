//! Failure triage: executions grouped by error signature (computed by the
//! database, see `migrations/V23__failure_signatures.sql`), a triage state
//! per signature and per execution, and the history of every change.
//!
//! The normaliser lives in SQL only (`verdict_normalise_error`): the API
//! shows the normalised text by calling it, so there is no Rust copy to
//! keep in step.

mod service;
pub mod sql;

pub use service::FailureApi;

use crate::convert::timestamp;
use crate::error::{Error, Result};
use crate::proto;
use crate::validate::Validator;
use crate::wire::wire_enum;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Longest triage comment, in characters.
pub const MAX_COMMENT: usize = 4000;
/// Longest issue link, in characters.
pub const MAX_ISSUE_URL: usize = 2000;
/// Longest actor name, in characters.
pub const MAX_ACTOR: usize = 200;

wire_enum!(TriageState, proto::TriageState, {
    ToInvestigate = "to_investigate",
    ProductBug = "product_bug",
    AutomationBug = "automation_bug",
    SystemIssue = "system_issue",
    NoDefect = "no_defect",
});

/// An error signature: the SHA-256 of a normalised error message.
pub type Signature = Vec<u8>;

/// A signature as the API shows it: 64 lowercase hex digits.
pub fn to_hex(signature: &[u8]) -> String {
    signature.iter().map(|b| format!("{b:02x}")).collect()
}

/// A signature from its hex form (64 hex digits, either case).
pub fn parse_signature(v: &mut Validator, field: &str, value: &str) -> Signature {
    if value.is_empty() {
        v.violation(field, "is required");
        return Vec::new();
    }
    let bytes: Option<Vec<u8>> = (value.len() == 64 && value.is_ascii())
        .then(|| {
            (0..32)
                .map(|i| u8::from_str_radix(&value[2 * i..2 * i + 2], 16).ok())
                .collect()
        })
        .flatten();
    match bytes {
        Some(b) => b,
        None => {
            v.violation(field, "must be 64 hex digits (a signature)");
            Vec::new()
        }
    }
}

/// An issue link: empty, or an absolute http(s) URL with a host.
fn issue_url(v: &mut Validator, field: &str, value: &str) -> String {
    if value.is_empty() {
        return String::new();
    }
    if value.chars().count() > MAX_ISSUE_URL {
        v.violation(field, format!("must be at most {MAX_ISSUE_URL} characters"));
        return String::new();
    }
    let ok = value.parse::<http::Uri>().ok().is_some_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    });
    if !ok {
        v.violation(field, "must be an absolute http or https URL");
    }
    value.to_owned()
}

/// Where an effective triage state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Default,
    Signature,
    Execution,
}

/// A triage state with who set it, when and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Triage {
    pub state: TriageState,
    pub comment: String,
    pub issue_url: String,
    pub actor: String,
    pub updated_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub source: Source,
}

impl Triage {
    /// The state of a signature or execution nobody triaged.
    pub fn default_state() -> Self {
        Triage {
            state: TriageState::ToInvestigate,
            comment: String::new(),
            issue_url: String::new(),
            actor: String::new(),
            updated_at: None,
            version: 0,
            source: Source::Default,
        }
    }
}

impl From<Triage> for proto::Triage {
    fn from(t: Triage) -> Self {
        proto::Triage {
            state: t.state.to_proto() as i32,
            comment: t.comment,
            issue_url: t.issue_url,
            actor: t.actor,
            updated_at: t.updated_at.map(timestamp),
            version: t.version,
            source: match t.source {
                Source::Default => proto::TriageSource::Default,
                Source::Signature => proto::TriageSource::Signature,
                Source::Execution => proto::TriageSource::Execution,
            } as i32,
        }
    }
}

/// A validated triage change (of a signature or an execution).
#[derive(Debug, Clone)]
pub struct Change {
    pub state: TriageState,
    pub comment: String,
    pub issue_url: String,
    pub actor: String,
    pub expected_version: Option<i64>,
}

/// Validates the fields every triage request shares.
fn change(
    v: &mut Validator,
    state: i32,
    comment: &str,
    url: &str,
    actor: &str,
    expected_version: Option<i64>,
) -> Change {
    let state = v
        .required_enum("state", state, TriageState::from_proto)
        .unwrap_or(TriageState::ToInvestigate);
    if let Some(ver) = expected_version
        && ver < 0
    {
        v.violation("expected_version", "must be 0 (never triaged) or more");
    }
    Change {
        state,
        comment: v.optional_message("comment", comment, MAX_COMMENT),
        issue_url: issue_url(v, "issue_url", url),
        actor: v.required_text("actor", actor, MAX_ACTOR),
        expected_version,
    }
}

/// A validated TriageFailureSignature.
pub struct SignatureChange {
    pub signature: Signature,
    pub change: Change,
}

impl TryFrom<proto::TriageFailureSignatureRequest> for SignatureChange {
    type Error = Error;

    fn try_from(r: proto::TriageFailureSignatureRequest) -> Result<Self> {
        let mut v = Validator::new();
        let signature = parse_signature(&mut v, "signature", &r.signature);
        let change = change(
            &mut v,
            r.state,
            &r.comment,
            &r.issue_url,
            &r.actor,
            r.expected_version,
        );
        v.finish()?;
        Ok(SignatureChange { signature, change })
    }
}

/// A validated TriageExecution.
pub struct ExecutionChange {
    pub execution_id: Uuid,
    pub change: Change,
}

impl TryFrom<proto::TriageExecutionRequest> for ExecutionChange {
    type Error = Error;

    fn try_from(r: proto::TriageExecutionRequest) -> Result<Self> {
        let mut v = Validator::new();
        let execution_id = v.uuid("execution_id", &r.execution_id);
        let change = change(
            &mut v,
            r.state,
            &r.comment,
            &r.issue_url,
            &r.actor,
            r.expected_version,
        );
        v.finish()?;
        Ok(ExecutionChange {
            execution_id,
            change,
        })
    }
}

/// How ListFailureSignatures orders its entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Order {
    /// Most failures first, then by signature.
    Count,
    /// Most recently seen first, then by signature.
    LastSeen,
}

/// The filters of ListFailureSignatures (what its page tokens are bound to).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SignatureFilter {
    pub run_id: Option<Uuid>,
    pub started_from: Option<DateTime<Utc>>,
    pub started_to: Option<DateTime<Utc>>,
    pub order: Order,
}

/// The position a page resumes after: the sort value (a count, or
/// `last_seen` in microseconds) and the signature in hex.
pub type SignatureKey = (i64, String);

/// A validated ListFailureSignatures.
pub struct ListSignatures {
    pub filter: SignatureFilter,
    pub page_size: i64,
    pub after: Option<SignatureKey>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListFailureSignaturesRequest> for ListSignatures {
    type Error = Error;

    fn try_from(r: proto::ListFailureSignaturesRequest) -> Result<Self> {
        let mut v = Validator::new();
        let run_id = v.optional_uuid("run_id", &r.run_id);
        let (started_from, started_to) = v.time_range("started", r.started.as_ref());
        let order = match proto::FailureSignatureOrder::try_from(r.order_by) {
            Ok(proto::FailureSignatureOrder::Unspecified | proto::FailureSignatureOrder::Count) => {
                Order::Count
            }
            Ok(proto::FailureSignatureOrder::LastSeen) => Order::LastSeen,
            Err(_) => {
                v.violation("order_by", format!("{} is not a known value", r.order_by));
                Order::Count
            }
        };
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let filter = SignatureFilter {
            run_id,
            started_from,
            started_to,
            order,
        };
        let fingerprint = crate::pagination::fingerprint("failure_signatures", &filter);
        let after = crate::pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListSignatures {
            filter,
            page_size,
            after,
            fingerprint,
        })
    }
}

/// One signature of a ListFailureSignatures page.
#[derive(Debug, Clone)]
pub struct SignatureEntry {
    pub signature: Signature,
    pub count: i64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub test_cases: i64,
    pub normalised: String,
    pub example_message: String,
    pub example_id: Uuid,
    pub triage: Triage,
}

impl From<SignatureEntry> for proto::FailureSignature {
    fn from(e: SignatureEntry) -> Self {
        proto::FailureSignature {
            signature: to_hex(&e.signature),
            count: e.count,
            first_seen: Some(timestamp(e.first_seen)),
            last_seen: Some(timestamp(e.last_seen)),
            test_cases_affected: e.test_cases,
            normalised_message: e.normalised,
            example_message: e.example_message,
            example_execution_id: e.example_id.to_string(),
            triage: Some(e.triage.into()),
        }
    }
}

/// One entry of the triage history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub id: i64,
    pub signature: Option<Signature>,
    pub execution_id: Option<Uuid>,
    pub state: TriageState,
    pub comment: String,
    pub issue_url: String,
    pub actor: String,
    pub version: i64,
    pub changed_at: DateTime<Utc>,
}

impl From<HistoryEntry> for proto::TriageChange {
    fn from(h: HistoryEntry) -> Self {
        proto::TriageChange {
            signature: h.signature.as_deref().map(to_hex).unwrap_or_default(),
            execution_id: h.execution_id.map(|id| id.to_string()).unwrap_or_default(),
            state: h.state.to_proto() as i32,
            comment: h.comment,
            issue_url: h.issue_url,
            actor: h.actor,
            version: h.version,
            changed_at: Some(timestamp(h.changed_at)),
        }
    }
}

/// The triage target of ListTriageHistory.
#[derive(Debug, Clone, serde::Serialize)]
pub enum Target {
    Signature(String),
    Execution(Uuid),
}

/// Fills in the error signature and effective triage of the failures among
/// `executions` (of `project`), with one query.
pub async fn fill_triage(
    c: &impl deadpool_postgres::GenericClient,
    project: Uuid,
    executions: &mut [crate::test_cases::executions::Execution],
) -> Result<()> {
    let ids: Vec<Uuid> = executions
        .iter()
        .filter(|e| !e.error_message.is_empty())
        .map(|e| e.id)
        .collect();
    let mut found = sql::effective(c, project, &ids).await?;
    for e in executions {
        e.triage = found.remove(&e.id);
    }
    Ok(())
}

/// The version conflict of a triage change: ABORTED, VERSION_MISMATCH.
pub fn stale(what: &str, current: i64, expected: i64) -> Error {
    Error::Aborted(
        crate::error::Reason::VersionMismatch,
        format!(
            "the triage of {what} is at version {current}, not {expected}; re-read it and retry"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_round_trip_through_hex_and_reject_anything_else() {
        let sig: Vec<u8> = (0..32).collect();
        let hex = to_hex(&sig);
        assert_eq!(hex.len(), 64);
        let mut v = Validator::new();
        assert_eq!(parse_signature(&mut v, "s", &hex), sig);
        assert_eq!(parse_signature(&mut v, "s", &hex.to_uppercase()), sig);
        v.finish().unwrap();
        for bad in ["", "ab", &format!("{}g", &hex[..63]), &format!("{hex}00")] {
            let mut v = Validator::new();
            parse_signature(&mut v, "s", bad);
            assert!(v.finish().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn issue_links_must_be_absolute_http_urls() {
        for good in [
            "",
            "https://issues.example.com/BUG-1",
            "http://jira:8080/browse/X-2?a=b",
        ] {
            let mut v = Validator::new();
            issue_url(&mut v, "issue_url", good);
            assert!(v.finish().is_ok(), "{good:?} refused");
        }
        for bad in [
            "BUG-1",
            "ftp://example.com/x",
            "https://",
            "https://exa mple.com/",
            "/relative/path",
            "javascript:alert(1)",
        ] {
            let mut v = Validator::new();
            issue_url(&mut v, "issue_url", bad);
            assert!(v.finish().is_err(), "{bad:?} accepted");
        }
    }
}
