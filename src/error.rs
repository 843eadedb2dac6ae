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

/// Why a call failed, for programs: sent on every non-OK status as
/// `google.rpc.ErrorInfo { reason, domain: "verdict.v1" }`. The strings are
/// stable (clients branch on them) and listed in `proto/verdict/v1/common.proto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// INVALID_ARGUMENT: a field is malformed or out of range (see BadRequest).
    InvalidField,
    /// INVALID_ARGUMENT: the request bytes are not a valid message.
    MalformedMessage,
    /// INVALID_ARGUMENT: a page token is malformed, forged or from another filter.
    InvalidPageToken,
    /// NOT_FOUND.
    NotFound,
    /// ALREADY_EXISTS.
    AlreadyExists,
    /// FAILED_PRECONDITION: the status move is not allowed from the current status.
    IllegalStatusTransition,
    /// FAILED_PRECONDITION: the session is in a status that takes no more writes.
    SessionNotAcceptingWrites,
    /// FAILED_PRECONDITION: an idempotency key (request_id, key, batch or ingest id)
    /// was used before with other content.
    IdempotencyKeyReused,
    /// FAILED_PRECONDITION: the test case still has executions (use `force`).
    TestCaseHasExecutions,
    /// FAILED_PRECONDITION: the coverage commit compared against has no report.
    CoverageCommitMissing,
    /// FAILED_PRECONDITION: the API key is already revoked.
    KeyAlreadyRevoked,
    /// ABORTED: the `version` sent is not the stored one; read and retry.
    VersionMismatch,
    /// ABORTED: the call conflicted with a concurrent change; retry it.
    ConcurrentChange,
    /// UNAVAILABLE: the database cannot be reached; retry with backoff.
    DatabaseUnavailable,
    /// UNAVAILABLE: the gateway is shutting down; retry on another replica.
    ShuttingDown,
    /// RESOURCE_EXHAUSTED: no pooled connection became free in time.
    PoolExhausted,
    /// RESOURCE_EXHAUSTED: PostgreSQL has no connection slot left.
    DatabaseConnectionLimit,
    /// RESOURCE_EXHAUSTED: PostgreSQL is out of disk, memory or another resource.
    DatabaseOutOfResources,
    /// RESOURCE_EXHAUSTED: a value exceeds a limit of the database.
    ValueTooLarge,
    /// RESOURCE_EXHAUSTED: the message is larger than the gateway accepts or sends.
    MessageTooLarge,
    /// RESOURCE_EXHAUSTED: too many requests or streams; slow down.
    RateLimited,
    /// DEADLINE_EXCEEDED: the call's deadline or the statement timeout expired.
    DeadlineExceeded,
    /// DEADLINE_EXCEEDED: a client stream sent no message for the server's idle
    /// timeout; what it had not committed was rolled back.
    StreamIdle,
    /// INTERNAL: a bug of the gateway; the trace id is in the message.
    Internal,
    /// UNAUTHENTICATED: no key, or a key that is unknown, not valid or revoked.
    Unauthenticated,
    /// PERMISSION_DENIED: the key lacks the scope this call needs.
    MissingScope,
    /// UNIMPLEMENTED: no such service or method on this gateway.
    UnknownMethod,
    /// CANCELLED: the call was cancelled before it finished.
    Cancelled,
    /// FAILED_PRECONDITION without a more specific cause.
    FailedPrecondition,
    /// UNAUTHENTICATED: the (otherwise valid) API key was revoked; sent only
    /// to a caller presenting the key's right secret, and at the end of the
    /// key's open streams.
    KeyRevoked,
    /// UNAVAILABLE: the stream reached the gateway's maximum stream lifetime
    /// (`VERDICT_MAX_STREAM_LIFETIME`); open it again (watches resume).
    StreamLifetimeExceeded,
    /// PERMISSION_DENIED: the API key is bound to another project than the
    /// one the call names.
    ProjectNotAllowed,
    /// FAILED_PRECONDITION: the project still holds data (use `force`).
    ProjectHasData,
}

impl Reason {
    /// Every reason, in the order `proto/verdict/v1/common.proto` lists them.
    pub const ALL: [Reason; 33] = [
        Reason::InvalidField,
        Reason::MalformedMessage,
        Reason::InvalidPageToken,
        Reason::NotFound,
        Reason::AlreadyExists,
        Reason::IllegalStatusTransition,
        Reason::SessionNotAcceptingWrites,
        Reason::IdempotencyKeyReused,
        Reason::TestCaseHasExecutions,
        Reason::CoverageCommitMissing,
        Reason::KeyAlreadyRevoked,
        Reason::VersionMismatch,
        Reason::ConcurrentChange,
        Reason::DatabaseUnavailable,
        Reason::ShuttingDown,
        Reason::PoolExhausted,
        Reason::DatabaseConnectionLimit,
        Reason::DatabaseOutOfResources,
        Reason::ValueTooLarge,
        Reason::MessageTooLarge,
        Reason::RateLimited,
        Reason::DeadlineExceeded,
        Reason::Internal,
        Reason::Unauthenticated,
        Reason::MissingScope,
        Reason::UnknownMethod,
        Reason::Cancelled,
        Reason::FailedPrecondition,
        Reason::KeyRevoked,
        Reason::StreamLifetimeExceeded,
        Reason::StreamIdle,
        Reason::ProjectNotAllowed,
        Reason::ProjectHasData,
    ];

    /// The reason of a status that carries none of its own (one made by
    /// tonic or the transport rather than from an [`Error`]), by its code.
    pub fn for_code(code: Code) -> Reason {
        match code {
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => Reason::Internal,
            Code::Cancelled => Reason::Cancelled,
            Code::InvalidArgument | Code::OutOfRange => Reason::InvalidField,
            Code::DeadlineExceeded => Reason::DeadlineExceeded,
            Code::NotFound => Reason::NotFound,
            Code::AlreadyExists => Reason::AlreadyExists,
            Code::PermissionDenied => Reason::MissingScope,
            Code::ResourceExhausted => Reason::RateLimited,
            Code::FailedPrecondition => Reason::FailedPrecondition,
            Code::Aborted => Reason::ConcurrentChange,
            Code::Unimplemented => Reason::UnknownMethod,
            Code::Unavailable => Reason::DatabaseUnavailable,
            Code::Unauthenticated => Reason::Unauthenticated,
        }
    }

    /// Whether a caller may retry the same call later (after the RetryInfo
    /// delay, with backoff).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Reason::ConcurrentChange
                | Reason::DatabaseUnavailable
                | Reason::ShuttingDown
                | Reason::PoolExhausted
                | Reason::DatabaseConnectionLimit
                | Reason::DatabaseOutOfResources
                | Reason::RateLimited
                | Reason::StreamLifetimeExceeded
        )
    }

    /// The stable UPPER_SNAKE_CASE string sent in `ErrorInfo.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidField => "INVALID_FIELD",
            Reason::MalformedMessage => "MALFORMED_MESSAGE",
            Reason::InvalidPageToken => "INVALID_PAGE_TOKEN",
            Reason::NotFound => "NOT_FOUND",
            Reason::AlreadyExists => "ALREADY_EXISTS",
            Reason::IllegalStatusTransition => "ILLEGAL_STATUS_TRANSITION",
            Reason::SessionNotAcceptingWrites => "SESSION_NOT_ACCEPTING_WRITES",
            Reason::IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
            Reason::TestCaseHasExecutions => "TEST_CASE_HAS_EXECUTIONS",
            Reason::CoverageCommitMissing => "COVERAGE_COMMIT_MISSING",
            Reason::KeyAlreadyRevoked => "KEY_ALREADY_REVOKED",
            Reason::VersionMismatch => "VERSION_MISMATCH",
            Reason::ConcurrentChange => "CONCURRENT_CHANGE",
            Reason::DatabaseUnavailable => "DATABASE_UNAVAILABLE",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::PoolExhausted => "POOL_EXHAUSTED",
            Reason::DatabaseConnectionLimit => "DATABASE_CONNECTION_LIMIT",
            Reason::DatabaseOutOfResources => "DATABASE_OUT_OF_RESOURCES",
            Reason::ValueTooLarge => "VALUE_TOO_LARGE",
            Reason::MessageTooLarge => "MESSAGE_TOO_LARGE",
            Reason::RateLimited => "RATE_LIMITED",
            Reason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Reason::StreamIdle => "STREAM_IDLE",
            Reason::Internal => "INTERNAL",
            Reason::Unauthenticated => "UNAUTHENTICATED",
            Reason::MissingScope => "MISSING_SCOPE",
            Reason::UnknownMethod => "UNKNOWN_METHOD",
            Reason::Cancelled => "CANCELLED",
            Reason::FailedPrecondition => "FAILED_PRECONDITION",
            Reason::KeyRevoked => "KEY_REVOKED",
            Reason::StreamLifetimeExceeded => "STREAM_LIFETIME_EXCEEDED",
            Reason::ProjectNotAllowed => "PROJECT_NOT_ALLOWED",
            Reason::ProjectHasData => "PROJECT_HAS_DATA",
        }
    }
}

/// The `ErrorInfo.domain` of every Verdict error.
pub const ERROR_DOMAIN: &str = "verdict.v1";

/// Everything that can go wrong in a call. The text of `Unavailable` and
/// `Internal` is internal detail: it is logged, never sent to the caller.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0:?}")]
    InvalidArgument(Vec<FieldViolation>),
    /// A list refusing the page token it was given (malformed, forged,
    /// altered, or issued for another list, filter or view): INVALID_ARGUMENT
    /// with reason INVALID_PAGE_TOKEN and the one field violation.
    #[error("invalid page token: {0:?}")]
    InvalidPageToken(FieldViolation),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{1}")]
    FailedPrecondition(Reason, String),
    #[error("{1}")]
    Aborted(Reason, String),
    #[error("unavailable: {1}")]
    Unavailable(Reason, String),
    #[error("{1}")]
    ResourceExhausted(Reason, String),
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// A client stream was silent for longer than the idle timeout.
    #[error("{0}")]
    StreamIdle(String),
    /// The bytes of a message are not a valid encoding of its type (inside
    /// a client stream, where no layer sees them).
    #[error("{0}")]
    MalformedMessage(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's API key was revoked while its call was running:
    /// UNAUTHENTICATED with reason KEY_REVOKED.
    #[error("the API key was revoked")]
    KeyRevoked,
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller's key is bound to another project: PERMISSION_DENIED with
    /// reason PROJECT_NOT_ALLOWED.
    #[error("{0}")]
    ProjectNotAllowed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// One field violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The machine-readable cause sent with the status.
    pub fn reason(&self) -> Reason {
        match self {
            Error::InvalidArgument(_) => Reason::InvalidField,
            Error::InvalidPageToken(_) => Reason::InvalidPageToken,
            Error::NotFound(_) => Reason::NotFound,
            Error::AlreadyExists(_) => Reason::AlreadyExists,
            Error::FailedPrecondition(r, _)
            | Error::Aborted(r, _)
            | Error::Unavailable(r, _)
            | Error::ResourceExhausted(r, _) => *r,
            Error::DeadlineExceeded => Reason::DeadlineExceeded,
            Error::StreamIdle(_) => Reason::StreamIdle,
            Error::MalformedMessage(_) => Reason::MalformedMessage,
            Error::Internal(_) => Reason::Internal,
            Error::Unauthenticated(_) => Reason::Unauthenticated,
            Error::KeyRevoked => Reason::KeyRevoked,
            Error::PermissionDenied(_) => Reason::MissingScope,
            Error::ProjectNotAllowed(_) => Reason::ProjectNotAllowed,
        }
    }
}

/// `ErrorInfo` for `reason`, in Verdict's domain.
pub fn error_info(reason: Reason) -> ErrorDetails {
    ErrorDetails::with_error_info(
        reason.as_str(),
        ERROR_DOMAIN,
        std::collections::HashMap::new(),
    )
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
pub const RETRY_DELAY: Duration = Duration::from_millis(500);

impl From<Error> for Status {
    fn from(error: Error) -> Status {
        let reason = error.reason();
        let mut details = error_info(reason);
        let (code, message) = match error {
            Error::InvalidPageToken(violation) => {
                let field = clip(&violation.field, MAX_FIELD_CHARS);
                let description = clip(&violation.description, MAX_DESCRIPTION_CHARS);
                details.add_bad_request_violation(field.clone(), description.clone());
                (Code::InvalidArgument, format!("{field}: {description}"))
            }
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
                (Code::InvalidArgument, summary)
            }
            Error::NotFound(msg) => (Code::NotFound, msg),
            Error::AlreadyExists(msg) => (Code::AlreadyExists, msg),
            Error::FailedPrecondition(_, msg) => (Code::FailedPrecondition, msg),
            Error::Aborted(_, msg) => (Code::Aborted, msg),
            Error::Unavailable(reason, detail) => {
                tracing::warn!(error.detail = %detail, reason = reason.as_str(), "unavailable");
                details.set_retry_info(Some(RETRY_DELAY));
                let msg = match reason {
                    Reason::ShuttingDown => "the gateway is shutting down; retry with backoff",
                    _ => "the database is unavailable; retry with backoff",
                };
                (Code::Unavailable, msg.to_owned())
            }
            Error::ResourceExhausted(reason, msg) => {
                if reason.is_retryable() {
                    details.set_retry_info(Some(RETRY_DELAY));
                }
                (Code::ResourceExhausted, msg)
            }
            Error::DeadlineExceeded => (
                Code::DeadlineExceeded,
                "the call's deadline (or the server's statement timeout) expired; the query was cancelled"
                    .to_owned(),
            ),
            Error::StreamIdle(msg) => (Code::DeadlineExceeded, msg),
            Error::MalformedMessage(msg) => (Code::InvalidArgument, msg),
            Error::Internal(detail) => {
                tracing::error!(error.detail = %detail, "internal error");
                (
                    Code::Internal,
                    "internal error; see the gateway's logs for this trace".to_owned(),
                )
            }
            Error::Unauthenticated(msg) => (Code::Unauthenticated, msg),
            Error::KeyRevoked => (Code::Unauthenticated, "the API key was revoked".to_owned()),
            Error::PermissionDenied(msg) | Error::ProjectNotAllowed(msg) => {
                (Code::PermissionDenied, msg)
            }
        };
        Status::with_error_details(code, message, details)
    }
}
