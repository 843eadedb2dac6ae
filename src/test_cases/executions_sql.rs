//! The SQL of executions: the COPY sink shared by RecordExecutions and
//! IngestExecutions, the list, and the statistics.

use super::executions::{Execution, ExecutionKey, ListExecutions, NewExecution};
use super::{ExecutionStatus, TestCaseRef};
use crate::db::Stmt;
use crate::error::{Error, Reason, Result};
use crate::ingest::Sink;
use crate::sessions::SessionStatus;
use deadpool_postgres::GenericClient;
use futures::pin_mut;
use std::collections::{HashMap, HashSet};
use tokio_postgres::Row;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

/// Writes executions with binary COPY into one project, after resolving the
/// test cases and sessions they name in that project (a test case or
/// session of another project is not found).
pub struct ExecutionSink {
    /// The call's project: every row is written in it.
    pub project: Uuid,
    /// Set for RecordExecutions: rows remember their batch and position.
    pub batch_id: Option<String>,
}

const RESOLVE_TEST_CASES: Stmt = Stmt::new(
    "SELECT",
    "test_cases",
    "SELECT id, key FROM test_cases WHERE project_id = $3 AND (id = ANY($1) OR key = ANY($2))",
);

const LOCK_SESSIONS: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT id, status FROM sessions WHERE id = ANY($1) AND project_id = $2 ORDER BY id FOR SHARE",
);

const LOCK_RUNS: Stmt = Stmt::new(
    "SELECT",
    "test_runs",
    "SELECT id, status FROM test_runs WHERE id = ANY($1) AND project_id = $2 ORDER BY id FOR SHARE",
);

const COPY: Stmt = Stmt::new(
    "COPY",
    "test_executions",
    "COPY test_executions (project_id, id, test_case_id, session_id, status, started_at, \
     duration_ms, environment, error_message, stack_trace, screenshot_refs, interaction_log, \
     performance, batch_id, batch_position, run_id, attempt, labels) FROM STDIN BINARY",
);

const COPY_TYPES: [Type; 18] = [
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::INT8,
    Type::JSONB,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT_ARRAY,
    Type::JSONB,
    Type::JSONB,
    Type::TEXT,
    Type::INT4,
    Type::UUID,
    Type::INT4,
    Type::JSONB,
];

/// The test case id of every item, or an error naming the first item whose
/// test case does not exist in `project`.
async fn resolve_test_cases(
    c: &impl GenericClient,
    project: Uuid,
    items: &[NewExecution],
) -> Result<Vec<Uuid>> {
    let mut ids = HashSet::new();
    let mut keys = HashSet::new();
    for e in items {
        match &e.test_case {
            TestCaseRef::Id(id) => ids.insert(*id),
            TestCaseRef::Key(key) => keys.insert(key.as_str()),
        };
    }
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let keys: Vec<&str> = keys.into_iter().collect();
    let mut known_ids = HashSet::new();
    let mut by_key = HashMap::new();
    for row in RESOLVE_TEST_CASES
        .query(c, &[&ids, &keys, &project])
        .await?
    {
        let id: Uuid = row.try_get(0)?;
        known_ids.insert(id);
        by_key.insert(row.try_get::<_, String>(1)?, id);
    }
    items
        .iter()
        .map(|e| match &e.test_case {
            TestCaseRef::Id(id) if known_ids.contains(id) => Ok(*id),
            TestCaseRef::Key(key) => by_key.get(key).copied().ok_or_else(|| {
                e.origin
                    .invalid("test_case_key", format!("no test case has key {key:?}"))
            }),
            TestCaseRef::Id(id) => Err(e
                .origin
                .invalid("test_case_id", format!("test case {id} not found"))),
        })
        .collect()
}

/// The distinct parent ids (sessions, runs) that `pick` reads from items.
fn named(items: &[NewExecution], pick: impl Fn(&NewExecution) -> Option<Uuid>) -> Vec<Uuid> {
    items
        .iter()
        .filter_map(pick)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect()
}

/// Share-locks the parents `pick` names (`lock`: their ids and the
/// project, returning (id, status) rows in id order) until the transaction
/// ends, then judges every item: INVALID_ARGUMENT on `field` for a parent
/// the project does not have, or `refuse`'s error for a parent in a status
/// that takes no more executions.
async fn lock_parents(
    c: &impl GenericClient,
    project: Uuid,
    items: &[NewExecution],
    (lock, field, what): (&Stmt, &str, &str),
    pick: impl Fn(&NewExecution) -> Option<Uuid>,
    refuse: impl Fn(Uuid, &str) -> Result<()>,
) -> Result<()> {
    let ids = named(items, &pick);
    if ids.is_empty() {
        return Ok(());
    }
    let mut status = HashMap::new();
    for row in lock.query(c, &[&ids, &project]).await? {
        status.insert(row.try_get::<_, Uuid>(0)?, row.try_get::<_, String>(1)?);
    }
    for e in items {
        let Some(id) = pick(e) else { continue };
        match status.get(&id) {
            None => return Err(e.origin.invalid(field, format!("{what} {id} not found"))),
            Some(s) => refuse(id, s)?,
        }
    }
    Ok(())
}

/// Checks that every named session exists in `project` and still accepts
/// findings, and holds a share lock on each until the transaction ends.
async fn lock_sessions(
    c: &impl GenericClient,
    project: Uuid,
    items: &[NewExecution],
) -> Result<()> {
    lock_parents(
        c,
        project,
        items,
        (&LOCK_SESSIONS, "session_id", "session"),
        |e| e.session_id,
        |id, status| match SessionStatus::from_db(status)? {
            s @ (SessionStatus::Failed | SessionStatus::Cancelled) => {
                Err(Error::FailedPrecondition(
                    Reason::SessionNotAcceptingWrites,
                    format!(
                        "session {id} is {}; it accepts no more executions",
                        s.as_str()
                    ),
                ))
            }
            _ => Ok(()),
        },
    )
    .await
}

/// Checks that every named test run exists in `project` and is still
/// RUNNING, and holds a share lock on each until the transaction ends (so
/// FinishTestRun waits for the executions being written).
async fn lock_runs(c: &impl GenericClient, project: Uuid, items: &[NewExecution]) -> Result<()> {
    lock_parents(
        c,
        project,
        items,
        (&LOCK_RUNS, "run_id", "test run"),
        |e| e.run_id,
        |id, status| match status {
            "running" => Ok(()),
            finished => Err(Error::FailedPrecondition(
                Reason::FailedPrecondition,
                format!("test run {id} is {finished}; it accepts no more executions"),
            )),
        },
    )
    .await
}

impl Sink for ExecutionSink {
    type Item = NewExecution;

    async fn write<'a>(
        &'a self,
        tx: &'a deadpool_postgres::Transaction<'a>,
        items: &'a [NewExecution],
    ) -> Result<u64> {
        let test_case_ids = resolve_test_cases(tx, self.project, items).await?;
        lock_sessions(tx, self.project, items).await?;
        lock_runs(tx, self.project, items).await?;

        let copy = COPY.traced_copy(async {
            let sink = tx.copy_in(COPY.sql).await?;
            let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
            pin_mut!(writer);
            for (position, (e, test_case_id)) in items.iter().zip(&test_case_ids).enumerate() {
                let position = self.batch_id.as_ref().map(|_| position as i32);
                let labels = crate::labels::to_json(&e.labels);
                let row: [&(dyn ToSql + Sync); 18] = [
                    &self.project,
                    &e.id,
                    test_case_id,
                    &e.session_id,
                    &e.status.as_str(),
                    &e.started_at,
                    &e.duration_ms,
                    &e.environment,
                    &e.error_message,
                    &e.stack_trace,
                    &e.screenshot_refs,
                    &e.interaction_log,
                    &e.performance,
                    &self.batch_id,
                    &position,
                    &e.run_id,
                    &e.attempt,
                    &labels,
                ];
                writer.as_mut().write(&row).await?;
            }
            writer.finish().await
        });
        let written = copy.await?;
        refresh_statistics_days(tx, self.project, items, &test_case_ids).await?;
        Ok(written)
    }
}

/// Statistics rollup (GetTestStatistics): refreshes the per-day rows of
/// the (test case, UTC day) pairs this batch wrote, in the batch's
/// transaction, once per pair (not per row); see
/// `statistics_sql::refresh_days`.
async fn refresh_statistics_days(
    c: &impl GenericClient,
    project: Uuid,
    items: &[NewExecution],
    test_case_ids: &[Uuid],
) -> Result<()> {
    let keys: Vec<_> = items
        .iter()
        .zip(test_case_ids)
        .map(|(e, id)| (*id, e.started_at.date_naive()))
        .collect();
    super::statistics_sql::refresh_days(c, project, &keys).await
}

const BATCH_IDS: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT id FROM test_executions WHERE project_id = $1 AND batch_id = $2 \
     ORDER BY batch_position",
);

/// Ids of a batch committed in `project`, in item order.
pub async fn batch_ids(c: &impl GenericClient, project: Uuid, batch_id: &str) -> Result<Vec<Uuid>> {
    BATCH_IDS
        .query(c, &[&project, &batch_id])
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}

fn from_row(row: &Row) -> Result<Execution> {
    Ok(Execution {
        id: row.try_get("id")?,
        test_case_id: row.try_get("test_case_id")?,
        test_case_key: row.try_get("test_case_key")?,
        session_id: row.try_get("session_id")?,
        run_id: row.try_get("run_id")?,
        attempt: row.try_get("attempt")?,
        status: ExecutionStatus::from_db(row.try_get("status")?)?,
        started_at: row.try_get("started_at")?,
        duration_ms: row.try_get("duration_ms")?,
        // NULL (left out by a BASIC list) reads as JSON null.
        environment: row.try_get("environment")?,
        error_message: row.try_get("error_message")?,
        stack_trace: row.try_get("stack_trace")?,
        screenshot_refs: row.try_get("screenshot_refs")?,
        interaction_log: row.try_get("interaction_log")?,
        performance: row
            .try_get::<_, Option<serde_json::Value>>("performance")?
            .unwrap_or_default(),
        created_at: row.try_get("created_at")?,
        triage: None,
        labels: row.try_get::<_, crate::labels::LabelsColumn>("labels")?.0,
    })
}

pub fn key(e: &Execution) -> ExecutionKey {
    (e.started_at.timestamp_micros(), e.id)
}

/// The list-order key of a row of a list statement (either view).
pub fn row_key(row: &Row) -> Result<ExecutionKey> {
    let started_at: chrono::DateTime<chrono::Utc> = row.try_get(7)?;
    Ok((started_at.timestamp_micros(), row.try_get(0)?))
}

/// The ids of a page's failures (rows with an error message), whose
/// triage the reply carries (`crate::failures::sql::effective`).
pub fn failure_ids(rows: &[Row]) -> Result<Vec<Uuid>> {
    let mut ids = Vec::new();
    for row in rows {
        if !row.try_get::<_, &str>(10)?.is_empty() {
            ids.push(row.try_get(0)?);
        }
    }
    Ok(ids)
}

/// Writes an execution from a row of a list statement (either view) as
/// `field` of a reply, with its failure's signature and triage when it has
/// them: the bytes `From<Execution>` gives, without the execution in
/// between.
pub fn execution_to_wire(
    row: &Row,
    triage: Option<&(crate::failures::Signature, crate::failures::Triage)>,
    field: u32,
    out: &mut Vec<u8>,
) -> Result<()> {
    use crate::encode::*;
    let unreadable = |e: serde_json::Error| {
        Error::Internal(format!("a stored JSON document is unreadable: {e}"))
    };
    let at = start_message(out, field);
    put_uuid(out, 1, row.try_get(0)?);
    put_uuid(out, 2, row.try_get(1)?);
    put_str(out, 3, row.try_get(2)?);
    if let Some(session) = row.try_get(3)? {
        put_uuid(out, 4, session);
    }
    put_varint(
        out,
        5,
        ExecutionStatus::from_db(row.try_get(6)?)?.to_proto() as i64,
    );
    put_timestamp(out, 6, row.try_get(7)?);
    put_varint(out, 7, row.try_get(8)?);
    put_opt_struct_json(out, 8, row.try_get(9)?)?;
    put_str(out, 9, row.try_get(10)?);
    put_str(out, 10, row.try_get(11)?);
    if let Some(refs) = row.try_get::<_, Option<Vec<&str>>>(12)? {
        put_repeated_str(out, 11, refs);
    }
    if let Some(JsonText(steps)) = row.try_get(13)? {
        crate::structs::encode_json_list_into(steps, 12, out).map_err(unreadable)?;
    }
    if let Some(JsonText(performance)) = row.try_get(14)? {
        let doc = serde_json::from_slice(performance).map_err(unreadable)?;
        for (k, v) in super::executions::performance_figures(&doc) {
            let entry = start_message(out, 13);
            put_str(out, 1, k);
            put_double(out, 2, v);
            end_message(out, entry);
        }
    }
    put_timestamp(out, 14, row.try_get(15)?);
    if let Some(run) = row.try_get(4)? {
        put_uuid(out, 15, run);
    }
    put_varint(out, 16, i64::from(row.try_get::<_, i32>(5)?));
    let labels = row.try_get::<_, crate::labels::LabelsColumn>(16)?.0;
    put_str_map(out, 20, &labels);
    if let Some((signature, triage)) = triage {
        put_str(out, 30, &crate::failures::to_hex(signature));
        prost::encoding::message::encode(31, &crate::proto::Triage::from(triage.clone()), out);
    }
    end_message(out, at);
    Ok(())
}

/// The list statement over `columns` (of `e`, the executions, and `t`,
/// their test cases) with `extra` (a further predicate) in its WHERE: the
/// executions of the project `$9` that pass the filters, newest
/// `started_at` first.
macro_rules! list_sql {
    ($columns:expr, $extra:expr) => {
        concat!(
            "SELECT ",
            $columns,
            " FROM test_executions e \
             JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id \
             WHERE e.project_id = $9 \
               AND ($1::uuid IS NULL OR e.test_case_id = $1) \
               AND ($2::uuid IS NULL OR e.session_id = $2) \
               AND ($3::text[] IS NULL OR e.status = ANY($3)) \
               AND ($4::timestamptz IS NULL OR e.started_at >= $4) \
               AND ($5::timestamptz IS NULL OR e.started_at < $5) \
               AND ($6::timestamptz IS NULL OR (e.started_at, e.id) < ($6, $7)) \
               AND ($10::uuid IS NULL OR e.run_id = $10) \
               AND ($11::jsonb IS NULL OR e.labels @> $11) \
               AND ($12::text[] IS NULL OR e.labels ?& $12)",
            $extra,
            " ORDER BY e.started_at DESC, e.id DESC LIMIT $8"
        )
    };
}

/// EXECUTION_VIEW_FULL with `extra` in the WHERE: the page's rows (`$8`,
/// page_size + 1), cut after the row that brings their JSON and text to
/// `$budget` bytes (the reply limit, the statement's last parameter; the
/// first row always comes). `batch_rows` tells how many rows the cut saw,
/// so a cut page still ends with a token: the gateway never holds more
/// than about one reply of large executions, whatever the page size.
macro_rules! list_full_sql {
    ($extra:expr, $budget:expr) => {
        concat!(
            "SELECT id, test_case_id, test_case_key, session_id, run_id, attempt, status, \
                    started_at, duration_ms, environment, error_message, stack_trace, \
                    screenshot_refs, interaction_log, performance, created_at, labels, batch_rows \
             FROM (SELECT *, \
               sum(row_bytes) OVER (ORDER BY started_at DESC, id DESC ROWS UNBOUNDED PRECEDING) \
                 - row_bytes AS bytes_before, \
               count(*) OVER () AS batch_rows \
             FROM (",
            list_sql!(
                "e.id, e.test_case_id, t.key AS test_case_key, e.session_id, e.run_id, \
                 e.attempt, e.status, e.started_at, \
                 e.duration_ms, e.environment, e.error_message, e.stack_trace, \
                 e.screenshot_refs, e.interaction_log, e.performance, e.created_at, e.labels, \
                 octet_length(e.environment::text) + octet_length(e.interaction_log::text) \
                 + octet_length(e.performance::text) + octet_length(e.error_message) \
                 + octet_length(e.stack_trace) + octet_length(e.labels::text) \
                 + coalesce(octet_length(e.screenshot_refs::text), 0) AS row_bytes",
                $extra
            ),
            ") batch) sized WHERE bytes_before < ",
            $budget,
            " ORDER BY started_at DESC, id DESC"
        )
    };
}

/// EXECUTION_VIEW_BASIC with `extra` in the WHERE: environment, stack
/// trace, interaction log and performance are not read at all (NULL or
/// empty).
macro_rules! list_basic_sql {
    ($extra:expr) => {
        list_sql!(
            "e.id, e.test_case_id, t.key AS test_case_key, e.session_id, e.run_id, e.attempt, \
             e.status, e.started_at, \
             e.duration_ms, NULL::jsonb AS environment, e.error_message, ''::text AS stack_trace, \
             e.screenshot_refs, NULL::jsonb AS interaction_log, NULL::jsonb AS performance, \
             e.created_at, e.labels",
            $extra
        )
    };
}

/// The search predicate of the `query` filter (`$13`): PostgreSQL text
/// search over the stored vector of error messages (migrations/V22).
macro_rules! search_predicate {
    () => {
        " AND e.search_vector @@ websearch_to_tsquery('simple', $13)"
    };
}

const LIST: Stmt = Stmt::new("SELECT", "test_executions", list_full_sql!("", "$13"));

const LIST_BASIC: Stmt = Stmt::new("SELECT", "test_executions", list_basic_sql!(""));

/// LIST with a full-text `query` (`$13`; the byte budget moves to `$14`):
/// statements of their own, so the plans of the list without a query stay
/// what they were.
const LIST_SEARCH: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    list_full_sql!(search_predicate!(), "$14"),
);

const LIST_BASIC_SEARCH: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    list_basic_sql!(search_predicate!()),
);

/// One execution of project `$1` by id `$2`, every field.
const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT e.id, e.test_case_id, t.key AS test_case_key, e.session_id, e.run_id, e.attempt, \
            e.status, e.started_at, e.duration_ms, e.environment, e.error_message, \
            e.stack_trace, e.screenshot_refs, e.interaction_log, e.performance, e.created_at, \
            e.labels \
     FROM test_executions e \
     JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id \
     WHERE e.project_id = $1 AND e.id = $2",
);

/// Execution `id` of `project`, if it has one.
pub async fn get(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<Option<Execution>> {
    BY_ID
        .query_opt(c, &[&project, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The total of ListExecutions: LIST's filters, without paging (no join:
/// every execution has its test case).
const COUNT: crate::totals::Counter = crate::counter!(
    "test_executions",
    "test_executions e \
     WHERE e.project_id = $1 \
       AND ($2::uuid IS NULL OR e.test_case_id = $2) \
       AND ($3::uuid IS NULL OR e.session_id = $3) \
       AND ($4::text[] IS NULL OR e.status = ANY($4)) \
       AND ($5::timestamptz IS NULL OR e.started_at >= $5) \
       AND ($6::timestamptz IS NULL OR e.started_at < $6) \
       AND ($7::uuid IS NULL OR e.run_id = $7) \
       AND ($8::jsonb IS NULL OR e.labels @> $8) \
       AND ($9::text[] IS NULL OR e.labels ?& $9) \
       AND ($10::text IS NULL OR e.search_vector @@ websearch_to_tsquery('simple', $10))"
);

/// How many executions of `project` pass `q`'s filters (`test_case_id`
/// resolved), counted as `mode` asks.
pub async fn count(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListExecutions,
    test_case_id: Option<Uuid>,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let f = &q.filter;
    let statuses: Option<Vec<&str>> =
        (!f.statuses.is_empty()).then(|| f.statuses.iter().map(|s| s.as_str()).collect());
    let (labels, label_keys) = f.labels.params();
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project,
        &test_case_id,
        &f.session_id,
        &statuses,
        &f.started_from,
        &f.started_to,
        &f.run_id,
        &labels,
        &label_keys,
        &f.query,
    ];
    crate::totals::count(c, &COUNT, params, mode, exact_below).await
}

/// One page of the executions of `project`, newest first, plus one extra
/// row when more follow; in the FULL view at most about `max_bytes` of them
/// (see LIST). `test_case_id` is the resolved test case filter.
pub async fn list(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListExecutions,
    test_case_id: Option<Uuid>,
    max_bytes: i64,
) -> Result<crate::pagination::Fetched<Row>> {
    let f = &q.filter;
    let statuses: Option<Vec<&str>> =
        (!f.statuses.is_empty()).then(|| f.statuses.iter().map(|s| s.as_str()).collect());
    let (after_at, after_id) = crate::pagination::time_key(q.after)?;
    let limit = q.page_size + 1;
    let (labels, label_keys) = f.labels.params();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![
        &test_case_id,
        &f.session_id,
        &statuses,
        &f.started_from,
        &f.started_to,
        &after_at,
        &after_id,
        &limit,
        &project,
        &f.run_id,
        &labels,
        &label_keys,
    ];
    let (full, basic) = match &f.query {
        None => (&LIST, &LIST_BASIC),
        Some(query) => {
            params.push(query);
            (&LIST_SEARCH, &LIST_BASIC_SEARCH)
        }
    };
    // Last: the BASIC statement takes every parameter but this one.
    params.push(&max_bytes);
    crate::pagination::fetch_rows(c, q.view, full, basic, &params).await
}

/// A batch of a session's executions for exports: at most `$3` rows after
/// id `$2`, cut after the row that brings their JSON and text to `$4` bytes
/// (the first row always comes), so a batch of large executions stays near
/// `$4` bytes however many rows `$3` allows.
const PAGE_OF_SESSION: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT e.id, e.test_case_id, t.key AS test_case_key, e.session_id, e.run_id, e.attempt, \
            e.status, e.started_at, e.duration_ms, e.environment, e.error_message, e.stack_trace, e.screenshot_refs, \
            e.interaction_log, e.performance, e.created_at, e.labels \
     FROM (SELECT *, sum(row_bytes) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) - row_bytes AS bytes_before \
           FROM (SELECT *, octet_length(environment::text) + octet_length(interaction_log::text) \
                         + octet_length(performance::text) + coalesce(octet_length(error_message), 0) \
                         + coalesce(octet_length(stack_trace), 0) \
                         + coalesce(octet_length(screenshot_refs::text), 0) AS row_bytes \
                 FROM test_executions WHERE session_id = $1 AND ($2::uuid IS NULL OR id > $2) \
                 ORDER BY id LIMIT $3) batch) e \
     JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id \
     WHERE e.bytes_before < $4 ORDER BY e.id",
);

/// Executions of a session in id order after `after`, for exports: at
/// most `limit` rows, fewer when they reach `max_bytes` (see
/// PAGE_OF_SESSION); an empty batch is the end. The session names its
/// project: every execution of a session is in the session's project (the
/// sink checks it before writing), so the caller, which found the session
/// in its call's project, gets that project's executions only.
pub async fn page_of_session(
    c: &impl GenericClient,
    session_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
    max_bytes: i64,
) -> Result<Vec<Execution>> {
    PAGE_OF_SESSION
        .query(c, &[&session_id, &after, &limit, &max_bytes])
        .await?
        .iter()
        .map(from_row)
        .collect()
}
