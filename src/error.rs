//! The one domain error of the gateway and its one mapping to gRPC statuses.

use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A bad field of a request: which field (its proto path, e.g. `config` or
/// `items[3].severity`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// Everything that can go wrong in a call. The text of `Unavailable` and
/// `Internal` is internal detail: it is logged, never sent to the caller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0:?}")]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("deadline exceeded")]
    DeadlineExceeded,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// One field violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

/// Statuses travel in HTTP/2 headers and trailers, which clients cap (16 KiB
/// by default): a reply that quotes request text must stay well below that.
const MAX_REPORTED_VIOLATIONS: usize = 20;
const MAX_FIELD_CHARS: usize = 128;
const MAX_DESCRIPTION_CHARS: usize = 256;

fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(max).collect();
    clipped.push('…');
    clipped
}

/// How long a client should wait before retrying a retryable failure.
const RETRY_DELAY: Duration = Duration::from_millis(500);

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        match error {
            Error::InvalidArgument(violations) => {
                let shown: Vec<(String, String)> = violations
                    .iter()
                    .take(MAX_REPORTED_VIOLATIONS)
                    .map(|v| {
                        (
                            clip(&v.field, MAX_FIELD_CHARS),
                            clip(&v.description, MAX_DESCRIPTION_CHARS),
                        )
                    })
                    .collect();
                let mut details = ErrorDetails::new();
                for (field, description) in &shown {
                    details.add_bad_request_violation(field.clone(), description.clone());
                }
                let mut summary = shown
                    .iter()
                    .take(3)
                    .map(|(f, d)| format!("{f}: {d}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                if violations.len() > 3 {
                    summary.push_str(&format!(" (and {} more)", violations.len() - 3));
                }
                Status::with_error_details(Code::InvalidArgument, summary, details)
            }
            Error::NotFound(msg) => Status::not_found(msg),
            Error::AlreadyExists(msg) => Status::already_exists(msg),
            Error::FailedPrecondition(msg) => Status::failed_precondition(msg),
            Error::Aborted(msg) => Status::aborted(msg),
            Error::Unavailable(detail) => {
                tracing::warn!(error.detail = %detail, "database unavailable");
                Status::with_error_details(
                    Code::Unavailable,
                    "the database is unavailable; retry with backoff",
                    ErrorDetails::with_retry_info(Some(RETRY_DELAY)),
                )
            }
            Error::ResourceExhausted(msg) => Status::with_error_details(
                Code::ResourceExhausted,
                msg,
                ErrorDetails::with_retry_info(Some(RETRY_DELAY)),
            ),
            Error::DeadlineExceeded => Status::deadline_exceeded(
                "the call's deadline (or the server's statement timeout) expired; the query was cancelled",
            ),
            Error::Internal(detail) => {
                tracing::error!(error.detail = %detail, "internal error");
                Status::internal("internal error; see the gateway's logs for this trace")
            }
            Error::Unauthenticated(msg) => Status::unauthenticated(msg),
            Error::PermissionDenied(msg) => Status::permission_denied(msg),
        }
    }
}
