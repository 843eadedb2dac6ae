//! The SQL of executions: the COPY sink shared by RecordExecutions and
//! IngestExecutions, the list, and the statistics.

use super::executions::{Execution, ExecutionKey, ListExecutions, NewExecution, StatisticsQuery};
use super::{ExecutionStatus, TestCaseRef};
use crate::db::Stmt;
use crate::error::{Error, Result};
use crate::ingest::Sink;
use crate::sessions::SessionStatus;
use deadpool_postgres::GenericClient;
use futures::pin_mut;
use std::collections::{HashMap, HashSet};
use tokio_postgres::Row;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tracing::Instrument;
use uuid::Uuid;

/// Writes executions with binary COPY, after resolving the test cases and
/// sessions they name.
pub struct ExecutionSink {
    /// Set for RecordExecutions: rows remember their batch and position.
    pub batch_id: Option<String>,
}

const RESOLVE_TEST_CASES: Stmt = Stmt::new(
    "SELECT",
    "test_cases",
    "SELECT id, key FROM test_cases WHERE id = ANY($1) OR key = ANY($2)",
);

const LOCK_SESSIONS: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT id, status FROM sessions WHERE id = ANY($1) ORDER BY id FOR SHARE",
);

const COPY: Stmt = Stmt::new(
    "COPY",
    "test_executions",
    "COPY test_executions (id, test_case_id, session_id, status, started_at, duration_ms, \
     environment, error_message, stack_trace, screenshot_refs, interaction_log, performance, \
     batch_id, batch_position) FROM STDIN BINARY",
);

const COPY_TYPES: [Type; 14] = [
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
];

/// The test case id of every item, or an error naming the first item whose
/// test case does not exist.
async fn resolve_test_cases(c: &impl GenericClient, items: &[NewExecution]) -> Result<Vec<Uuid>> {
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
    for row in RESOLVE_TEST_CASES.query(c, &[&ids, &keys]).await? {
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

/// Checks that every named session exists and still accepts findings, and
/// holds a share lock on each until the transaction ends.
async fn lock_sessions(c: &impl GenericClient, items: &[NewExecution]) -> Result<()> {
    let named: Vec<Uuid> = items
        .iter()
        .filter_map(|e| e.session_id)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    if named.is_empty() {
        return Ok(());
    }
    let mut status = HashMap::new();
    for row in LOCK_SESSIONS.query(c, &[&named]).await? {
        status.insert(
            row.try_get::<_, Uuid>(0)?,
            SessionStatus::from_db(row.try_get(1)?)?,
        );
    }
    for e in items {
        let Some(id) = e.session_id else { continue };
        match status.get(&id) {
            None => {
                return Err(e
                    .origin
                    .invalid("session_id", format!("session {id} not found")));
            }
            Some(s @ (SessionStatus::Failed | SessionStatus::Cancelled)) => {
                return Err(Error::FailedPrecondition(format!(
                    "session {id} is {}; it accepts no more executions",
                    s.as_str()
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

impl Sink for ExecutionSink {
    type Item = NewExecution;

    async fn write<'a>(
        &'a self,
        tx: &'a deadpool_postgres::Transaction<'a>,
        items: &'a [NewExecution],
    ) -> Result<u64> {
        let test_case_ids = resolve_test_cases(tx, items).await?;
        lock_sessions(tx, items).await?;

        let span = COPY.span();
        let copied = async {
            let sink = tx.copy_in(COPY.sql).await?;
            let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
            pin_mut!(writer);
            for (position, (e, test_case_id)) in items.iter().zip(&test_case_ids).enumerate() {
                let position = self.batch_id.as_ref().map(|_| position as i32);
                let row: [&(dyn ToSql + Sync); 14] = [
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
                ];
                writer.as_mut().write(&row).await?;
            }
            writer.finish().await
        }
        .instrument(span.clone())
        .await;
        match copied {
            Ok(n) => {
                Stmt::record_copied(&span, n);
                Ok(n)
            }
            Err(e) => {
                Stmt::fail(&span, &e);
                Err(e.into())
            }
        }
    }
}

const BATCH_IDS: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT id FROM test_executions WHERE batch_id = $1 ORDER BY batch_position",
);

/// Ids of a committed batch, in item order.
pub async fn batch_ids(c: &impl GenericClient, batch_id: &str) -> Result<Vec<Uuid>> {
    BATCH_IDS
        .query(c, &[&batch_id])
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
        status: ExecutionStatus::from_db(row.try_get("status")?)?,
        started_at: row.try_get("started_at")?,
        duration_ms: row.try_get("duration_ms")?,
        environment: row.try_get("environment")?,
        error_message: row.try_get("error_message")?,
        stack_trace: row.try_get("stack_trace")?,
        screenshot_refs: row.try_get("screenshot_refs")?,
        interaction_log: row.try_get("interaction_log")?,
        performance: row.try_get("performance")?,
        created_at: row.try_get("created_at")?,
    })
}

pub fn key(e: &Execution) -> ExecutionKey {
    (e.started_at.timestamp_micros(), e.id)
}

const LIST: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT e.id, e.test_case_id, t.key AS test_case_key, e.session_id, e.status, e.started_at, \
            e.duration_ms, e.environment, e.error_message, e.stack_trace, e.screenshot_refs, \
            e.interaction_log, e.performance, e.created_at \
     FROM test_executions e JOIN test_cases t ON t.id = e.test_case_id \
     WHERE ($1::uuid IS NULL OR e.test_case_id = $1) \
       AND ($2::uuid IS NULL OR e.session_id = $2) \
       AND ($3::text[] IS NULL OR e.status = ANY($3)) \
       AND ($4::timestamptz IS NULL OR e.started_at >= $4) \
       AND ($5::timestamptz IS NULL OR e.started_at < $5) \
       AND ($6::timestamptz IS NULL OR (e.started_at, e.id) < ($6, $7)) \
     ORDER BY e.started_at DESC, e.id DESC LIMIT $8",
);

/// One page of executions, newest first, plus one extra row when more
/// follow. `test_case_id` is the resolved test case filter.
pub async fn list(
    c: &impl GenericClient,
    q: &ListExecutions,
    test_case_id: Option<Uuid>,
) -> Result<Vec<Execution>> {
    let f = &q.filter;
    let statuses: Option<Vec<&str>> =
        (!f.statuses.is_empty()).then(|| f.statuses.iter().map(|s| s.as_str()).collect());
    let (after_at, after_id) = crate::pagination::time_key(q.after)?;
    LIST.query(
        c,
        &[
            &test_case_id,
            &f.session_id,
            &statuses,
            &f.started_from,
            &f.started_to,
            &after_at,
            &after_id,
            &(q.page_size + 1),
        ],
    )
    .await?
    .iter()
    .map(from_row)
    .collect()
}

/// Totals, pass rate inputs and duration percentiles of a scope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub total: i64,
    pub by_status: Vec<(ExecutionStatus, i64)>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
}

/// The scope predicate of the statistics: $1 test case, $2 subsystem,
/// $3..$4 the window on started_at.
macro_rules! stats_scope {
    () => {
        "FROM test_executions e JOIN test_cases t ON t.id = e.test_case_id \
         WHERE ($1::uuid IS NULL OR e.test_case_id = $1) \
           AND ($2::text IS NULL OR t.target_subsystem = $2) \
           AND ($3::timestamptz IS NULL OR e.started_at >= $3) \
           AND ($4::timestamptz IS NULL OR e.started_at < $4)"
    };
}

const TOTALS: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    concat!(
        "SELECT count(*), \
                count(*) FILTER (WHERE e.status = 'passed'), \
                count(*) FILTER (WHERE e.status = 'failed'), \
                count(*) FILTER (WHERE e.status = 'skipped'), \
                count(*) FILTER (WHERE e.status = 'error'), \
                percentile_cont(0.5) WITHIN GROUP (ORDER BY e.duration_ms::float8) \
                    FILTER (WHERE e.status <> 'skipped'), \
                percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms::float8) \
                    FILTER (WHERE e.status <> 'skipped') ",
        stats_scope!()
    ),
);

pub async fn totals(
    c: &impl GenericClient,
    q: &StatisticsQuery,
    test_case_id: Option<Uuid>,
    subsystem: Option<&str>,
) -> Result<Totals> {
    let row = TOTALS
        .query_one(c, &[&test_case_id, &subsystem, &q.from, &q.to])
        .await?;
    let by_status = [
        ExecutionStatus::Passed,
        ExecutionStatus::Failed,
        ExecutionStatus::Skipped,
        ExecutionStatus::Error,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, s)| Ok((s, row.try_get::<_, i64>(i + 1)?)))
    .collect::<Result<_>>()?;
    Ok(Totals {
        total: row.try_get(0)?,
        by_status,
        p50_ms: row.try_get(5)?,
        p95_ms: row.try_get(6)?,
    })
}

/// One test case of the flakiness ranking.
#[derive(Debug, Clone, PartialEq)]
pub struct Flaky {
    pub test_case_id: Uuid,
    pub key: String,
    pub name: String,
    pub flips: i64,
    pub considered: i64,
}

// Per test case: its last $5 passed-or-failed executions (row_number over
// newest first), then lag() over them oldest first to count the changes
// between consecutive outcomes. Only the ranking leaves the database.
const FLAKY: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    concat!(
        "WITH scoped AS ( \
             SELECT e.test_case_id, e.status, e.started_at, e.id, \
                    row_number() OVER (PARTITION BY e.test_case_id \
                                       ORDER BY e.started_at DESC, e.id DESC) AS recency ",
        stats_scope!(),
        "    AND e.status IN ('passed', 'failed')), \
         recent AS ( \
             SELECT test_case_id, status, \
                    lag(status) OVER (PARTITION BY test_case_id ORDER BY started_at, id) AS previous \
             FROM scoped WHERE recency <= $5), \
         counted AS ( \
             SELECT test_case_id, \
                    count(*) FILTER (WHERE previous IS NOT NULL AND previous <> status) AS flips, \
                    count(*) AS considered \
             FROM recent GROUP BY test_case_id) \
         SELECT c.test_case_id, t.key, t.name, c.flips, c.considered, count(*) OVER () AS flaky \
         FROM counted c JOIN test_cases t ON t.id = c.test_case_id \
         WHERE c.flips > 0 \
         ORDER BY c.flips DESC, t.key LIMIT $6"
    ),
);

/// The flakiest test cases (most flips first, then by key) and how many
/// test cases in scope flipped at all.
pub async fn flakiest(
    c: &impl GenericClient,
    q: &StatisticsQuery,
    test_case_id: Option<Uuid>,
    subsystem: Option<&str>,
) -> Result<(Vec<Flaky>, i64)> {
    let rows = FLAKY
        .query(
            c,
            &[
                &test_case_id,
                &subsystem,
                &q.from,
                &q.to,
                &q.flakiness_window,
                &q.top_flaky,
            ],
        )
        .await?;
    let count = match rows.first() {
        Some(r) => r.try_get(5)?,
        None => 0,
    };
    let ranked = rows
        .iter()
        .map(|r| {
            Ok(Flaky {
                test_case_id: r.try_get(0)?,
                key: r.try_get(1)?,
                name: r.try_get(2)?,
                flips: r.try_get(3)?,
                considered: r.try_get(4)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((ranked, count))
}
