//! Validation sessions and their processing logs: domain types and their
//! conversions from and to the wire.

mod appends;
mod feed;
mod service;
pub mod sql;
mod summary;
mod watch;

pub use feed::Watches;

/// The SQL of a session's summary (a read [`crate::db`] may batch).
pub(crate) const SUMMARY_SQL: &str = summary::SUMMARY.sql;
pub use service::SessionApi;

use crate::convert::{JsonDoc, opt_timestamp, timestamp};
use crate::error::{Error, Result};
use crate::labels::{self, LabelFilter, Labels};
use crate::pagination;
use crate::proto;
use crate::validate::Validator;
use crate::wire::wire_enum;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value as Json;
use uuid::Uuid;

/// Longest request_id.
pub const MAX_REQUEST_ID: usize = 128;
/// Longest technology name.
pub const MAX_TECHNOLOGY: usize = 64;
/// Longest validation scope.
pub const MAX_SCOPE: usize = 256;
/// Longest log message.
pub const MAX_LOG_MESSAGE: usize = 8192;

wire_enum!(SessionStatus, proto::SessionStatus, {
    Pending = "pending",
    Processing = "processing",
    Completed = "completed",
    Failed = "failed",
    Cancelled = "cancelled",
});

/// Where a session is in its lifecycle.
impl SessionStatus {
    /// Completed, failed and cancelled sessions never change status again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SessionStatus::Completed | SessionStatus::Failed | SessionStatus::Cancelled
        )
    }

    /// The legal moves: pending → processing | cancelled;
    /// processing → completed | failed | cancelled.
    pub fn can_move_to(self, to: SessionStatus) -> bool {
        use SessionStatus::*;
        matches!(
            (self, to),
            (Pending, Processing)
                | (Pending, Cancelled)
                | (Processing, Completed | Failed | Cancelled)
        )
    }
}

/// A stored session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    pub id: Uuid,
    pub request_id: String,
    pub source_technology: String,
    pub target_technology: String,
    pub validation_scope: String,
    pub status: SessionStatus,
    /// `None` only when a BASIC list left it out.
    pub config: Option<JsonDoc>,
    pub input_refs: Option<JsonDoc>,
    pub metadata: Option<JsonDoc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub version: i64,
    pub labels: Labels,
}

impl From<Session> for proto::Session {
    fn from(s: Session) -> Self {
        proto::Session {
            id: s.id.to_string(),
            request_id: s.request_id,
            source_technology: s.source_technology,
            target_technology: s.target_technology,
            validation_scope: s.validation_scope,
            status: s.status.to_proto() as i32,
            // Null only when a BASIC list left them out.
            config: s.config.map(JsonDoc::into_struct),
            input_refs: s.input_refs.map(JsonDoc::into_struct),
            metadata: s.metadata.map(JsonDoc::into_struct),
            created_at: Some(timestamp(s.created_at)),
            updated_at: Some(timestamp(s.updated_at)),
            started_at: opt_timestamp(s.started_at),
            completed_at: opt_timestamp(s.completed_at),
            version: s.version,
            labels: s.labels.into_iter().collect(),
        }
    }
}

/// A session to create.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub request_id: String,
    pub source_technology: String,
    pub target_technology: String,
    pub validation_scope: String,
    pub config: Json,
    pub input_refs: Json,
    pub metadata: Json,
    pub labels: Labels,
}

impl TryFrom<proto::CreateSessionRequest> for NewSession {
    type Error = Error;

    fn try_from(r: proto::CreateSessionRequest) -> Result<Self> {
        let mut v = Validator::new();
        let new = NewSession {
            request_id: v.required_text("request_id", &r.request_id, MAX_REQUEST_ID),
            source_technology: v.required_text(
                "source_technology",
                &r.source_technology,
                MAX_TECHNOLOGY,
            ),
            target_technology: v.required_text(
                "target_technology",
                &r.target_technology,
                MAX_TECHNOLOGY,
            ),
            validation_scope: v.required_text("validation_scope", &r.validation_scope, MAX_SCOPE),
            config: v.json("config", r.config.as_ref()),
            input_refs: v.json("input_refs", r.input_refs.as_ref()),
            metadata: v.json("metadata", r.metadata.as_ref()),
            labels: labels::validate(&mut v, "labels", &r.labels),
        };
        v.finish()?;
        Ok(new)
    }
}

/// How GetSession finds a session.
#[derive(Debug, Clone)]
pub enum SessionLookup {
    Id(Uuid),
    RequestId(String),
}

impl TryFrom<proto::GetSessionRequest> for SessionLookup {
    type Error = Error;

    fn try_from(r: proto::GetSessionRequest) -> Result<Self> {
        use proto::get_session_request::Lookup;
        let mut v = Validator::new();
        let lookup = match r.lookup {
            Some(Lookup::Id(id)) => SessionLookup::Id(v.uuid("id", &id)),
            Some(Lookup::RequestId(rid)) => {
                SessionLookup::RequestId(v.required_text("request_id", &rid, MAX_REQUEST_ID))
            }
            None => {
                v.violation("lookup", "set either id or request_id");
                SessionLookup::Id(Uuid::nil())
            }
        };
        v.finish()?;
        Ok(lookup)
    }
}

/// The filters of ListSessions; serialised into the page-token fingerprint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SessionFilter {
    pub statuses: Vec<SessionStatus>,
    pub source_technology: Option<String>,
    pub target_technology: Option<String>,
    pub validation_scope: Option<String>,
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    /// Left out of the fingerprint when empty (tokens from before stay valid).
    #[serde(flatten)]
    pub labels: LabelFilter,
}

/// Keyset position in the newest-first session order: (created_at in
/// microseconds, id).
pub type SessionKey = (i64, Uuid);

/// A validated ListSessions call.
#[derive(Debug, Clone)]
pub struct ListSessions {
    pub filter: SessionFilter,
    pub page_size: i64,
    /// BASIC leaves config, input_refs and metadata out (not read at all).
    pub view: pagination::View,
    pub after: Option<SessionKey>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListSessionsRequest> for ListSessions {
    type Error = Error;

    fn try_from(r: proto::ListSessionsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let mut statuses = Vec::new();
        for (i, s) in r.statuses.iter().enumerate() {
            if let Some(s) =
                v.required_enum(&format!("statuses[{i}]"), *s, SessionStatus::from_proto)
                && !statuses.contains(&s)
            {
                statuses.push(s);
            }
        }
        statuses.sort_by_key(|s| s.as_str());
        let (created_from, created_to) = v.time_range("created", r.created.as_ref());
        let filter = SessionFilter {
            statuses,
            source_technology: v.optional_text(
                "source_technology",
                &r.source_technology,
                MAX_TECHNOLOGY,
            ),
            target_technology: v.optional_text(
                "target_technology",
                &r.target_technology,
                MAX_TECHNOLOGY,
            ),
            validation_scope: v.optional_text("validation_scope", &r.validation_scope, MAX_SCOPE),
            created_from,
            created_to,
            labels: LabelFilter::validate(&mut v, &r.labels, &r.label_keys),
        };
        let page_size = v.page_size("page_size", r.page_size);
        let view = pagination::View::from_wire(&mut v, "view", r.view);
        v.finish()?;
        let fingerprint = pagination::fingerprint(&view.scope("sessions"), &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListSessions {
            filter,
            page_size,
            view,
            after,
            fingerprint,
        })
    }
}

/// A validated UpdateSessionStatus call.
#[derive(Debug, Clone)]
pub struct StatusChange {
    pub id: Uuid,
    pub status: SessionStatus,
    pub expected_version: Option<i64>,
}

impl TryFrom<proto::UpdateSessionStatusRequest> for StatusChange {
    type Error = Error;

    fn try_from(r: proto::UpdateSessionStatusRequest) -> Result<Self> {
        let mut v = Validator::new();
        let id = v.uuid("id", &r.id);
        let status = v.required_enum("status", r.status, SessionStatus::from_proto);
        let expected_version = v.expected_version("expected_version", r.expected_version);
        v.finish()?;
        Ok(StatusChange {
            id,
            status: status.expect("validated"),
            expected_version,
        })
    }
}

// Severity of a log entry, ordered from least to most severe.
wire_enum!(LogLevel, proto::LogLevel, {
    Debug = "debug",
    Info = "info",
    Warning = "warning",
    Error = "error",
});

/// A stored log entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogEntry {
    pub id: i64,
    pub session_id: Uuid,
    /// Position in the session's log: 1, 2, 3, … in commit order.
    pub seq: i64,
    pub logged_at: DateTime<Utc>,
    pub level: LogLevel,
    pub message: String,
    pub fields: JsonDoc,
}

impl From<LogEntry> for proto::SessionLogEntry {
    fn from(e: LogEntry) -> Self {
        proto::SessionLogEntry {
            id: e.id,
            session_id: e.session_id.to_string(),
            logged_at: Some(timestamp(e.logged_at)),
            level: e.level.to_proto() as i32,
            message: e.message,
            fields: Some(e.fields.into_struct()),
            sequence: e.seq,
        }
    }
}

/// A log entry to append.
#[derive(Debug, Clone)]
pub struct NewLogEntry {
    pub session_id: Uuid,
    pub level: LogLevel,
    pub message: String,
    pub fields: Json,
}

impl TryFrom<proto::AppendSessionLogRequest> for NewLogEntry {
    type Error = Error;

    fn try_from(r: proto::AppendSessionLogRequest) -> Result<Self> {
        let mut v = Validator::new();
        let entry = NewLogEntry {
            session_id: v.uuid("session_id", &r.session_id),
            level: v
                .required_enum("level", r.level, LogLevel::from_proto)
                .unwrap_or(LogLevel::Info),
            message: v.required_message("message", &r.message, MAX_LOG_MESSAGE),
            fields: v.json("fields", r.fields.as_ref()),
        };
        v.finish()?;
        Ok(entry)
    }
}

/// A validated ListSessionLogs call.
#[derive(Debug, Clone)]
pub struct ListLogs {
    pub session_id: Uuid,
    pub min_level: LogLevel,
    /// The full-text filter over messages (`None`: every entry).
    pub query: Option<String>,
    pub page_size: i64,
    /// The sequence of the last entry of the previous page (0: first page).
    pub after_seq: i64,
    pub fingerprint: String,
}

impl TryFrom<proto::ListSessionLogsRequest> for ListLogs {
    type Error = Error;

    fn try_from(r: proto::ListSessionLogsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let session_id = v.uuid("session_id", &r.session_id);
        let min_level = if r.min_level == 0 {
            LogLevel::Debug
        } else {
            v.required_enum("min_level", r.min_level, LogLevel::from_proto)
                .unwrap_or(LogLevel::Debug)
        };
        let query = crate::search::validate(&mut v, "query", &r.query);
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        // Pages are keyed by sequence; the name differs from the one of the
        // id-keyed tokens of earlier versions so those are refused, not
        // misread. Without a query the filter is the one tokens were bound
        // to before queries existed.
        let fingerprint = match &query {
            None => pagination::fingerprint("session_logs.seq", &(session_id, min_level)),
            Some(q) => pagination::fingerprint("session_logs.seq", &(session_id, min_level, q)),
        };
        let after_seq = pagination::decode("page_token", &r.page_token, &fingerprint)?.unwrap_or(0);
        Ok(ListLogs {
            session_id,
            min_level,
            query,
            page_size,
            after_seq,
            fingerprint,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SessionStatus::*;

    #[test]
    fn only_the_documented_status_moves_are_legal() {
        let all = [Pending, Processing, Completed, Failed, Cancelled];
        let legal = [
            (Pending, Processing),
            (Pending, Cancelled),
            (Processing, Completed),
            (Processing, Failed),
            (Processing, Cancelled),
        ];
        for from in all {
            for to in all {
                assert_eq!(
                    from.can_move_to(to),
                    legal.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }
}
