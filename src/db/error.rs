//! SQLSTATE and pool failures mapped to domain errors, in one place.

use crate::error::{Error, Reason};
use deadpool_postgres::{PoolError, TimeoutType};
use tokio_postgres::error::SqlState;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            // No SQLSTATE: the connection broke, could not be made, or a
            // value did not convert (our bug).
            let io = std::error::Error::source(&e)
                .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some());
            return if e.is_closed() || io || e.to_string().contains("connect") {
                super::note_connection_error();
                Error::Unavailable(Reason::DatabaseUnavailable, e.to_string())
            } else {
                Error::Internal(e.to_string())
            };
        };
        if matches!(
            db.parsed_severity(),
            Some(tokio_postgres::error::Severity::Fatal | tokio_postgres::error::Severity::Panic)
        ) {
            // The server ends the connection after a FATAL.
            super::note_connection_error();
        }
        let code = db.code();
        if code.code().starts_with("53") {
            // The server's own words stay in the log.
            tracing::warn!(
                sqlstate = code.code(),
                error.detail = db.message(),
                "database out of resources"
            );
        }
        match code {
            c if *c == SqlState::QUERY_CANCELED => {
                crate::observability::statement_timeout();
                Error::DeadlineExceeded
            }
            c if *c == SqlState::UNIQUE_VIOLATION => {
                Error::AlreadyExists("an object with the same unique key already exists".into())
            }
            c if *c == SqlState::FOREIGN_KEY_VIOLATION => {
                Error::NotFound("an object this request refers to does not exist".into())
            }
            c if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE =>
            {
                Error::Aborted(
                    Reason::ConcurrentChange,
                    "the call conflicted with a concurrent change; retry it".into(),
                )
            }
            c if *c == SqlState::PROGRAM_LIMIT_EXCEEDED => Error::ResourceExhausted(
                Reason::ValueTooLarge,
                "a value exceeds a limit of the database".into(),
            ),
            // Class 53, insufficient resources: RESOURCE_EXHAUSTED, as gRPC
            // says of "the entire file system is out of space"; retryable
            // (RetryInfo) since the condition passes when the server frees
            // the resource. The message names the cause, never internals.
            c if *c == SqlState::TOO_MANY_CONNECTIONS => Error::ResourceExhausted(
                Reason::DatabaseConnectionLimit,
                "the database has no connection slot left; retry later".into(),
            ),
            c if *c == SqlState::DISK_FULL => Error::ResourceExhausted(
                Reason::DatabaseOutOfResources,
                "the database is out of disk space; retry later".into(),
            ),
            c if *c == SqlState::OUT_OF_MEMORY => Error::ResourceExhausted(
                Reason::DatabaseOutOfResources,
                "the database is out of memory; retry later".into(),
            ),
            c if c.code().starts_with("53") => Error::ResourceExhausted(
                Reason::DatabaseOutOfResources,
                "the database reached a configured resource limit; retry later".into(),
            ),
            c if *c == SqlState::READ_ONLY_SQL_TRANSACTION => {
                // The server stopped taking writes under us (a demoted
                // primary, a standby behind the address after a failover):
                // have every pooled connection checked before reuse, so
                // those on that server are closed, not handed out again.
                super::note_connection_error();
                Error::Unavailable(
                    Reason::DatabaseUnavailable,
                    "the database does not accept writes right now (a failover in progress?); retry".into(),
                )
            }
            c if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
                || c.code().starts_with("08") =>
            {
                Error::Unavailable(
                    Reason::DatabaseUnavailable,
                    format!("{}: {}", c.code(), db.message()),
                )
            }
            c => Error::Internal(format!("SQLSTATE {}: {}", c.code(), db.message())),
        }
    }
}

impl From<PoolError> for Error {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Timeout(TimeoutType::Wait) => Error::ResourceExhausted(Reason::PoolExhausted,
                "no database connection became free in time; the gateway is overloaded, retry later"
                    .into(),
            ),
            PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => {
                Error::Unavailable(Reason::DatabaseUnavailable, "timed out connecting to PostgreSQL".into())
            }
            PoolError::Backend(e) => Error::from(e),
            PoolError::Closed => Error::Unavailable(Reason::ShuttingDown, "the connection pool is closed".into()),
            PoolError::NoRuntimeSpecified => Error::Internal("pool has no runtime".into()),
            PoolError::PostCreateHook(e) => Error::Unavailable(Reason::DatabaseUnavailable, e.to_string()),
        }
    }
}
