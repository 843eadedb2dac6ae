//! The statements of failure triage. Every one names the call's project.

use super::{
    Change, HistoryEntry, ListSignatures, Order, Signature, SignatureEntry, Source, Triage,
    TriageState,
};
use crate::db::Stmt;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use std::collections::HashMap;
use tokio_postgres::Row;
use uuid::Uuid;

/// The list statement ordered by `$order` (the aggregate sorted on) after
/// the keyset position `$after` (`$5`, `$6`): the page's groups of the
/// project's failures, each with its newest failure (the example) and its
/// signature's triage.
macro_rules! list_sql {
    ($order:literal, $after:literal) => {
        concat!(
            "WITH groups AS ( \
               SELECT e.error_signature AS signature, count(*) AS failures, \
                      min(e.started_at) AS first_seen, max(e.started_at) AS last_seen, \
                      count(DISTINCT e.test_case_id) AS test_cases \
               FROM test_executions e \
               WHERE e.project_id = $1 AND e.error_signature IS NOT NULL \
                 AND ($2::uuid IS NULL OR e.run_id = $2) \
                 AND ($3::timestamptz IS NULL OR e.started_at >= $3) \
                 AND ($4::timestamptz IS NULL OR e.started_at < $4) \
               GROUP BY e.error_signature), \
             page AS ( \
               SELECT * FROM groups WHERE $6::bytea IS NULL OR ",
            $after,
            " ORDER BY ",
            $order,
            " DESC, signature LIMIT $7) \
             SELECT p.signature, p.failures, p.first_seen, p.last_seen, p.test_cases, \
                    x.id AS example_id, x.error_message AS example_message, \
                    verdict_normalise_error(x.error_message) AS normalised, \
                    s.state, s.comment, s.issue_url, s.actor, s.updated_at, s.version \
             FROM page p \
             CROSS JOIN LATERAL ( \
               SELECT e.id, e.error_message FROM test_executions e \
               WHERE e.project_id = $1 AND e.error_signature = p.signature \
                 AND ($2::uuid IS NULL OR e.run_id = $2) \
                 AND ($3::timestamptz IS NULL OR e.started_at >= $3) \
                 AND ($4::timestamptz IS NULL OR e.started_at < $4) \
               ORDER BY e.started_at DESC, e.id DESC LIMIT 1) x \
             LEFT JOIN failure_signature_triage s \
               ON s.project_id = $1 AND s.signature = p.signature \
             ORDER BY p.",
            $order,
            " DESC, p.signature"
        )
    };
}

const LIST_BY_COUNT: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    list_sql!(
        "failures",
        "(failures < $5::bigint OR (failures = $5::bigint AND signature > $6))"
    ),
);

const LIST_BY_LAST_SEEN: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    list_sql!(
        "last_seen",
        "(last_seen < $5::timestamptz OR (last_seen = $5::timestamptz AND signature > $6))"
    ),
);

/// The signature's triage from the columns `state, comment, issue_url,
/// actor, updated_at, version` starting at `at` (NULLs: never triaged).
fn triage_at(row: &Row, at: usize, source: Source) -> Result<Option<Triage>> {
    let Some(state) = row.try_get::<_, Option<String>>(at)? else {
        return Ok(None);
    };
    let version: i64 = row.try_get(at + 5)?;
    // A version-0 row is the placeholder of a change being made (see
    // `ensure_signature_row`); it holds no triage yet.
    if version == 0 {
        return Ok(None);
    }
    Ok(Some(Triage {
        state: TriageState::from_db(&state)?,
        comment: row.try_get(at + 1)?,
        issue_url: row.try_get(at + 2)?,
        actor: row.try_get(at + 3)?,
        updated_at: Some(row.try_get(at + 4)?),
        version,
        source,
    }))
}

fn entry_from_row(row: &Row) -> Result<SignatureEntry> {
    Ok(SignatureEntry {
        signature: row.try_get(0)?,
        count: row.try_get(1)?,
        first_seen: row.try_get(2)?,
        last_seen: row.try_get(3)?,
        test_cases: row.try_get(4)?,
        example_id: row.try_get(5)?,
        example_message: row.try_get(6)?,
        normalised: row.try_get(7)?,
        triage: triage_at(row, 8, Source::Signature)?.unwrap_or_else(Triage::default_state),
    })
}

/// The sort key of an entry in `order`.
pub fn key(order: Order) -> impl Fn(&SignatureEntry) -> super::SignatureKey {
    move |e| {
        let value = match order {
            Order::Count => e.count,
            Order::LastSeen => e.last_seen.timestamp_micros(),
        };
        (value, super::to_hex(&e.signature))
    }
}

/// One page of the project's signatures (page_size + 1 rows when more
/// follow).
pub async fn list(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListSignatures,
) -> Result<Vec<SignatureEntry>> {
    let f = &q.filter;
    let bad_token = || {
        Error::InvalidPageToken(crate::error::FieldViolation::new(
            "page_token",
            "is not a page token issued by this list",
        ))
    };
    let after_sig: Option<Signature> = match &q.after {
        Some((_, hex)) => {
            let mut v = crate::validate::Validator::new();
            let sig = super::parse_signature(&mut v, "page_token", hex);
            v.finish().map_err(|_| bad_token())?;
            Some(sig)
        }
        None => None,
    };
    let limit = q.page_size + 1;
    let rows = match f.order {
        Order::Count => {
            let after_count: Option<i64> = q.after.as_ref().map(|(n, _)| *n);
            LIST_BY_COUNT
                .query(
                    c,
                    &[
                        &project,
                        &f.run_id,
                        &f.started_from,
                        &f.started_to,
                        &after_count,
                        &after_sig,
                        &limit,
                    ],
                )
                .await?
        }
        Order::LastSeen => {
            let after_seen: Option<DateTime<Utc>> = match &q.after {
                Some((micros, _)) => {
                    Some(DateTime::from_timestamp_micros(*micros).ok_or_else(bad_token)?)
                }
                None => None,
            };
            LIST_BY_LAST_SEEN
                .query(
                    c,
                    &[
                        &project,
                        &f.run_id,
                        &f.started_from,
                        &f.started_to,
                        &after_seen,
                        &after_sig,
                        &limit,
                    ],
                )
                .await?
        }
    };
    rows.iter().map(entry_from_row).collect()
}

const EFFECTIVE: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT e.id, e.error_signature, \
            x.state, x.comment, x.issue_url, x.actor, x.updated_at, x.version, \
            s.state, s.comment, s.issue_url, s.actor, s.updated_at, s.version \
     FROM test_executions e \
     LEFT JOIN execution_triage x ON x.project_id = e.project_id AND x.execution_id = e.id \
     LEFT JOIN failure_signature_triage s \
       ON s.project_id = e.project_id AND s.signature = e.error_signature \
     WHERE e.project_id = $1 AND e.id = ANY($2) AND e.error_signature IS NOT NULL",
);

/// The signature and effective triage of each failure among `ids` in
/// `project` (executions that are not failures are left out). The
/// execution's own override wins; else its signature's state; else
/// TO_INVESTIGATE.
pub async fn effective(
    c: &impl GenericClient,
    project: Uuid,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, (Signature, Triage)>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let mut out = HashMap::with_capacity(ids.len());
    for row in EFFECTIVE.query(c, &[&project, &ids]).await? {
        let triage = match triage_at(&row, 2, Source::Execution)? {
            Some(t) => t,
            None => triage_at(&row, 8, Source::Signature)?.unwrap_or_else(Triage::default_state),
        };
        out.insert(row.try_get(0)?, (row.try_get(1)?, triage));
    }
    Ok(out)
}

const COUNT_FAILURES: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT count(*) FROM test_executions WHERE project_id = $1 AND error_signature = $2",
);

/// Failures of `project` with `signature`.
pub async fn count_failures(
    c: &impl GenericClient,
    project: Uuid,
    signature: &Signature,
) -> Result<i64> {
    Ok(COUNT_FAILURES
        .query_one(c, &[&project, signature])
        .await?
        .try_get(0)?)
}

const ENSURE_SIGNATURE_ROW: Stmt = Stmt::new(
    "INSERT",
    "failure_signature_triage",
    "INSERT INTO failure_signature_triage (project_id, signature, state, actor, version) \
     VALUES ($1, $2, 'to_investigate', '', 0) ON CONFLICT DO NOTHING",
);

const LOCK_SIGNATURE_ROW: Stmt = Stmt::new(
    "SELECT",
    "failure_signature_triage",
    "SELECT version FROM failure_signature_triage \
     WHERE project_id = $1 AND signature = $2 FOR UPDATE",
);

const UPDATE_SIGNATURE: Stmt = Stmt::new(
    "UPDATE",
    "failure_signature_triage",
    "UPDATE failure_signature_triage \
     SET state = $3, comment = $4, issue_url = $5, actor = $6, updated_at = now(), \
         version = version + 1 \
     WHERE project_id = $1 AND signature = $2 \
     RETURNING state, comment, issue_url, actor, updated_at, version",
);

const INSERT_HISTORY: Stmt = Stmt::new(
    "INSERT",
    "triage_history",
    "INSERT INTO triage_history \
       (project_id, signature, execution_id, state, comment, issue_url, actor, version, changed_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
);

/// Locks the triage row of `signature` in `project` (creating a version-0
/// placeholder first when there is none, so that concurrent first triages
/// queue on one row) and returns its version.
pub async fn lock_signature(
    c: &impl GenericClient,
    project: Uuid,
    signature: &Signature,
) -> Result<i64> {
    ENSURE_SIGNATURE_ROW
        .execute(c, &[&project, signature])
        .await?;
    Ok(LOCK_SIGNATURE_ROW
        .query_one(c, &[&project, signature])
        .await?
        .try_get(0)?)
}

fn stored(row: &Row, source: Source) -> Result<Triage> {
    triage_at(row, 0, source)?
        .ok_or_else(|| Error::Internal("a triage change stored version 0".into()))
}

/// Stores `change` on the (locked) triage row of `signature` and appends
/// it to the history.
pub async fn set_signature(
    c: &impl GenericClient,
    project: Uuid,
    signature: &Signature,
    change: &Change,
) -> Result<Triage> {
    let row = UPDATE_SIGNATURE
        .query_one(
            c,
            &[
                &project,
                signature,
                &change.state.as_str(),
                &change.comment,
                &change.issue_url,
                &change.actor,
            ],
        )
        .await?;
    let triage = stored(&row, Source::Signature)?;
    append(c, project, Some(signature), None, &triage).await?;
    Ok(triage)
}

async fn append(
    c: &impl GenericClient,
    project: Uuid,
    signature: Option<&Signature>,
    execution_id: Option<Uuid>,
    t: &Triage,
) -> Result<()> {
    INSERT_HISTORY
        .execute(
            c,
            &[
                &project,
                &signature,
                &execution_id,
                &t.state.as_str(),
                &t.comment,
                &t.issue_url,
                &t.actor,
                &t.version,
                &t.updated_at,
            ],
        )
        .await?;
    Ok(())
}

const GET_EXECUTION: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT error_signature FROM test_executions WHERE project_id = $1 AND id = $2 FOR KEY SHARE",
);

/// `None` when `project` has no execution `id`; else its signature (NULL
/// when it is not a failure). Key-share locks it until the transaction
/// ends, so it cannot be deleted under its override.
pub async fn execution_signature(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
) -> Result<Option<Option<Signature>>> {
    match GET_EXECUTION.query_opt(c, &[&project, &id]).await? {
        Some(row) => Ok(Some(row.try_get(0)?)),
        None => Ok(None),
    }
}

const ENSURE_EXECUTION_ROW: Stmt = Stmt::new(
    "INSERT",
    "execution_triage",
    "INSERT INTO execution_triage (project_id, execution_id, state, actor, version) \
     VALUES ($1, $2, 'to_investigate', '', 0) ON CONFLICT DO NOTHING",
);

const LOCK_EXECUTION_ROW: Stmt = Stmt::new(
    "SELECT",
    "execution_triage",
    "SELECT version FROM execution_triage \
     WHERE project_id = $1 AND execution_id = $2 FOR UPDATE",
);

const UPDATE_EXECUTION: Stmt = Stmt::new(
    "UPDATE",
    "execution_triage",
    "UPDATE execution_triage \
     SET state = $3, comment = $4, issue_url = $5, actor = $6, updated_at = now(), \
         version = version + 1 \
     WHERE project_id = $1 AND execution_id = $2 \
     RETURNING state, comment, issue_url, actor, updated_at, version",
);

/// As [`lock_signature`], for the override of one execution.
pub async fn lock_execution(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<i64> {
    ENSURE_EXECUTION_ROW.execute(c, &[&project, &id]).await?;
    Ok(LOCK_EXECUTION_ROW
        .query_one(c, &[&project, &id])
        .await?
        .try_get(0)?)
}

/// As [`set_signature`], for the override of one execution.
pub async fn set_execution(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    change: &Change,
) -> Result<Triage> {
    let row = UPDATE_EXECUTION
        .query_one(
            c,
            &[
                &project,
                &id,
                &change.state.as_str(),
                &change.comment,
                &change.issue_url,
                &change.actor,
            ],
        )
        .await?;
    let triage = stored(&row, Source::Execution)?;
    append(c, project, None, Some(id), &triage).await?;
    Ok(triage)
}

const HISTORY_OF_SIGNATURE: Stmt = Stmt::new(
    "SELECT",
    "triage_history",
    "SELECT id, signature, execution_id, state, comment, issue_url, actor, version, changed_at \
     FROM triage_history WHERE project_id = $1 AND signature = $2 AND id > $3 \
     ORDER BY id LIMIT $4",
);

const HISTORY_OF_EXECUTION: Stmt = Stmt::new(
    "SELECT",
    "triage_history",
    "SELECT id, signature, execution_id, state, comment, issue_url, actor, version, changed_at \
     FROM triage_history WHERE project_id = $1 AND execution_id = $2 AND id > $3 \
     ORDER BY id LIMIT $4",
);

fn history_from_row(row: &Row) -> Result<HistoryEntry> {
    Ok(HistoryEntry {
        id: row.try_get(0)?,
        signature: row.try_get(1)?,
        execution_id: row.try_get(2)?,
        state: TriageState::from_db(row.try_get(3)?)?,
        comment: row.try_get(4)?,
        issue_url: row.try_get(5)?,
        actor: row.try_get(6)?,
        version: row.try_get(7)?,
        changed_at: row.try_get(8)?,
    })
}

/// Up to `limit` history entries of a signature after entry `after`.
pub async fn history_of_signature(
    c: &impl GenericClient,
    project: Uuid,
    signature: &Signature,
    after: i64,
    limit: i64,
) -> Result<Vec<HistoryEntry>> {
    HISTORY_OF_SIGNATURE
        .query(c, &[&project, signature, &after, &limit])
        .await?
        .iter()
        .map(history_from_row)
        .collect()
}

/// Up to `limit` history entries of an execution after entry `after`.
pub async fn history_of_execution(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<HistoryEntry>> {
    HISTORY_OF_EXECUTION
        .query(c, &[&project, &id, &after, &limit])
        .await?
        .iter()
        .map(history_from_row)
        .collect()
}
