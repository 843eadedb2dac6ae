//! Operations: statistics, retention, integrity, migration status,
//! whole-session export and the audit trail — as AdminService RPCs and, for
//! some, CLI commands. Every RPC needs the `admin` scope and is audited.
//!
//! Everything works within the call's project; the only cross-project reads
//! (GetStats and ListAuditEvents with `all_projects`) are for a key bound to
//! no project ([`cross_project`]).

pub mod cleanup;
pub mod export;
pub mod integrity;
pub mod retention;
mod service;
pub mod sql;
pub mod stats;

pub use service::AdminApi;

use crate::call::Call;
use crate::error::{Error, Result};
use crate::pagination;
use crate::proto;
use crate::validate::Validator;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;
use uuid::Uuid;

/// Parses a retention age such as `30d`, `12h`, `90m` or `45s`.
pub fn parse_age(text: &str) -> Result<Duration> {
    let bad = || {
        Error::invalid(
            "older_than",
            format!("{text:?} is not an age like 30d, 12h, 90m or 45s"),
        )
    };
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs = match unit {
        "d" => n.checked_mul(86_400),
        "h" => n.checked_mul(3_600),
        "m" => n.checked_mul(60),
        "s" => Some(n),
        _ => None,
    }
    .ok_or_else(bad)?;
    if secs == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(secs))
}

/// Checks that `call` may read across projects (`all_projects`): only a
/// key bound to no project may; a bound key gets PERMISSION_DENIED
/// (PROJECT_NOT_ALLOWED), as when it names another project.
pub fn cross_project(call: &Call) -> Result<()> {
    match call.bound_project() {
        None => Ok(()),
        Some(_) => Err(Error::ProjectNotAllowed(
            "all_projects: this API key is bound to one project".into(),
        )),
    }
}

/// Shortest Cleanup `older_than` accepted.
pub const MIN_AGE: Duration = Duration::from_secs(1);
/// Longest Cleanup `older_than` or CheckIntegrity `stuck_after` accepted: a
/// century (of 366-day years), so `now - age` stays a valid time.
pub const MAX_AGE: Duration = Duration::from_secs(100 * 366 * 86_400);
/// CheckIntegrity's `stuck_after` when unset or 0.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(24 * 3_600);

/// Longest `rpc` or `target_id` filter accepted.
const MAX_FILTER_CHARS: usize = 256;

/// A validated ListAuditEvents request.
#[derive(Debug)]
pub struct ListAuditEvents {
    pub key_id: Option<String>,
    pub rpc: Option<String>,
    pub target_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub page_size: i64,
    /// Every project's trail instead of the call's project's.
    pub all_projects: bool,
    /// Resume below this event id.
    pub before_id: Option<i64>,
    pub fingerprint: String,
}

#[derive(Serialize)]
struct Filter<'a> {
    key_id: &'a Option<String>,
    rpc: &'a Option<String>,
    target_id: &'a Option<String>,
    from: Option<i64>,
    to: Option<i64>,
    all_projects: bool,
}

impl TryFrom<proto::ListAuditEventsRequest> for ListAuditEvents {
    type Error = Error;

    fn try_from(r: proto::ListAuditEventsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let key_id = v.optional_text("key_id", &r.key_id, 16);
        if let Some(k) = &key_id
            && crate::auth::KeyId::parse(k).is_none()
        {
            v.violation("key_id", "must be a key id: 16 lowercase hex characters");
        }
        let rpc = v.optional_text("rpc", &r.rpc, MAX_FILTER_CHARS);
        let target_id = v.optional_text("target_id", &r.target_id, MAX_FILTER_CHARS);
        let (from, to) = v.time_range("time", r.time.as_ref());
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint(
            "audit_events",
            &Filter {
                key_id: &key_id,
                rpc: &rpc,
                target_id: &target_id,
                from: from.map(|t| t.timestamp_micros()),
                to: to.map(|t| t.timestamp_micros()),
                all_projects: r.all_projects,
            },
        );
        let before_id = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListAuditEvents {
            key_id,
            rpc,
            target_id,
            from,
            to,
            page_size,
            all_projects: r.all_projects,
            before_id,
            fingerprint,
        })
    }
}

/// A stored audit event.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub key_id: Option<String>,
    pub rpc: String,
    pub target_ids: Vec<String>,
    pub outcome: String,
    pub trace_id: Option<String>,
    /// The project the call worked in.
    pub project_id: Uuid,
}

impl From<AuditEvent> for proto::AuditEvent {
    fn from(e: AuditEvent) -> Self {
        proto::AuditEvent {
            id: e.id,
            time: Some(crate::convert::timestamp(e.at)),
            key_id: e.key_id.unwrap_or_default(),
            rpc: e.rpc,
            target_ids: e.target_ids,
            outcome: e.outcome,
            trace_id: e.trace_id.unwrap_or_default(),
            project_id: e.project_id.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_their_units() {
        assert_eq!(parse_age("30d").unwrap(), Duration::from_secs(30 * 86_400));
        assert_eq!(parse_age("12h").unwrap(), Duration::from_secs(12 * 3_600));
        assert_eq!(parse_age("45s").unwrap(), Duration::from_secs(45));
        for bad in ["", "d", "0d", "3w", "-1d", "99999999999999999999d"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }
}
