//! The audit trail: one row per write or admin call, written by the handler
//! in the transaction of the write itself, so the row exists exactly when
//! the write committed. Every row records the project its call worked in
//! (`project_id`, no foreign key: the trail outlives a deleted project), and
//! ListAuditEvents reads one project's trail.

use crate::call::Call;
use crate::db::Stmt;
use crate::error::Result;
use deadpool_postgres::GenericClient;
use uuid::Uuid;

/// What a call did, as its audit row says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new object was stored.
    Created,
    /// An idempotent retry: the stored object was returned, nothing written.
    Replayed,
    /// An object changed.
    Updated,
    /// An object was deleted.
    Deleted,
    /// Rows were appended (logs, ingest batches).
    Appended,
    /// An admin read (e.g. of the audit trail itself).
    Read,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "created",
            Outcome::Replayed => "replayed",
            Outcome::Updated => "updated",
            Outcome::Deleted => "deleted",
            Outcome::Appended => "appended",
            Outcome::Read => "read",
        }
    }
}

/// Appends one audit row (public for `verdict-bench`'s same-SQL baseline).
pub const INSERT: Stmt = Stmt::new(
    "INSERT",
    "audit_events",
    "INSERT INTO audit_events (key_id, rpc, target_ids, outcome, trace_id, project_id) \
     VALUES ($1, $2, $3, $4, $5, $6)",
);

/// Appends the audit row of `call` in `tx`, the transaction of its write,
/// in the call's project (INTERNAL, and so no write, for a call without
/// one: every call past the auth layer has one).
pub async fn record(
    tx: &impl GenericClient,
    call: &Call,
    targets: &[String],
    outcome: Outcome,
) -> Result<()> {
    record_as(
        tx,
        call.key_id().as_ref().map(|k| k.as_str()),
        call.rpc(),
        targets,
        outcome,
        call.trace_id().as_deref(),
        call.project()?,
    )
    .await
}

/// Appends an audit row for something other than a gRPC call (the
/// `verdict keys` command line), in the project `project`.
pub async fn record_as(
    tx: &impl GenericClient,
    key_id: Option<&str>,
    rpc: &str,
    targets: &[String],
    outcome: Outcome,
    trace_id: Option<&str>,
    project: Uuid,
) -> Result<()> {
    INSERT
        .execute(
            tx,
            &[
                &key_id,
                &rpc,
                &targets,
                &outcome.as_str(),
                &trace_id,
                &project,
            ],
        )
        .await?;
    Ok(())
}
