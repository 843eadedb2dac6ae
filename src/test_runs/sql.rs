//! The statements of test runs. Every one names the call's project.

use super::{ListRuns, NewRun, RunStatus};
use crate::db::Stmt;
use crate::error::Result;
use crate::labels;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use uuid::Uuid;

/// A stored run.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: Uuid,
    pub client_key: String,
    pub content_digest: Vec<u8>,
    pub name: String,
    pub build_number: String,
    pub build_url: String,
    pub commit_sha: String,
    pub branch: String,
    pub pull_request: i64,
    pub status: RunStatus,
    pub labels: serde_json::Value,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub version: i64,
}

/// A run's counts over the last attempt of each test case.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub tests: i64,
    pub passed: i64,
    pub failed: i64,
    pub skipped: i64,
    pub errored: i64,
    pub passed_on_retry: i64,
    pub executions: i64,
    pub total_duration_ms: i64,
}

macro_rules! run_columns {
    () => {
        "id, client_key, content_digest, name, build_number, build_url, commit_sha, branch, \
         pull_request, status, labels, started_at, finished_at, created_at, version"
    };
}

fn from_row(row: &Row) -> Result<RunRow> {
    Ok(RunRow {
        id: row.try_get(0)?,
        client_key: row.try_get(1)?,
        content_digest: row.try_get(2)?,
        name: row.try_get(3)?,
        build_number: row.try_get(4)?,
        build_url: row.try_get(5)?,
        commit_sha: row.try_get(6)?,
        branch: row.try_get(7)?,
        pull_request: row.try_get(8)?,
        status: RunStatus::from_db(row.try_get(9)?)?,
        labels: row.try_get(10)?,
        started_at: row.try_get(11)?,
        finished_at: row.try_get(12)?,
        created_at: row.try_get(13)?,
        version: row.try_get(14)?,
    })
}

const INSERT: Stmt = Stmt::new(
    "INSERT",
    "test_runs",
    concat!(
        "INSERT INTO test_runs (id, project_id, client_key, content_digest, name, build_number, \
           build_url, commit_sha, branch, pull_request, labels, started_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, COALESCE($12, now())) \
         ON CONFLICT (project_id, client_key) DO NOTHING RETURNING ",
        run_columns!()
    ),
);

const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "test_runs",
    concat!(
        "SELECT ",
        run_columns!(),
        " FROM test_runs WHERE project_id = $1 AND id = $2"
    ),
);

const BY_KEY: Stmt = Stmt::new(
    "SELECT",
    "test_runs",
    concat!(
        "SELECT ",
        run_columns!(),
        " FROM test_runs WHERE project_id = $1 AND client_key = $2"
    ),
);

const LOCK: Stmt = Stmt::new(
    "SELECT",
    "test_runs",
    concat!(
        "SELECT ",
        run_columns!(),
        " FROM test_runs WHERE project_id = $1 AND id = $2 FOR UPDATE"
    ),
);

const LIST: Stmt = Stmt::new(
    "SELECT",
    "test_runs",
    concat!(
        "SELECT ",
        run_columns!(),
        " FROM test_runs \
         WHERE project_id = $1 \
           AND ($2::text[] IS NULL OR status = ANY($2)) \
           AND ($3::text IS NULL OR branch = $3) \
           AND ($4::text IS NULL OR commit_sha = $4) \
           AND ($5::jsonb IS NULL OR labels @> $5) \
           AND ($6::text[] IS NULL OR labels ?& $6) \
           AND ($7::timestamptz IS NULL OR started_at >= $7) \
           AND ($8::timestamptz IS NULL OR started_at < $8) \
           AND ($9::timestamptz IS NULL OR (started_at, id) < ($9, $10)) \
         ORDER BY started_at DESC, id DESC LIMIT $11"
    ),
);

const FINISH: Stmt = Stmt::new(
    "UPDATE",
    "test_runs",
    concat!(
        "UPDATE test_runs SET status = $3, finished_at = COALESCE($4, now()), \
           updated_at = now(), version = version + 1 \
         WHERE project_id = $1 AND id = $2 RETURNING ",
        run_columns!()
    ),
);

// The last attempt of each test case in the run (highest attempt, then
// latest start), and whether an earlier attempt failed or errored.
const COUNTS: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "WITH attempts AS ( \
       SELECT test_case_id, status, duration_ms, \
              row_number() OVER (PARTITION BY test_case_id \
                                 ORDER BY attempt DESC, started_at DESC, id DESC) AS nth, \
              bool_or(status IN ('failed', 'error')) OVER (PARTITION BY test_case_id) AS ever_failed \
       FROM test_executions WHERE run_id = $1) \
     SELECT count(*) FILTER (WHERE nth = 1), \
            count(*) FILTER (WHERE nth = 1 AND status = 'passed'), \
            count(*) FILTER (WHERE nth = 1 AND status = 'failed'), \
            count(*) FILTER (WHERE nth = 1 AND status = 'skipped'), \
            count(*) FILTER (WHERE nth = 1 AND status = 'error'), \
            count(*) FILTER (WHERE nth = 1 AND status = 'passed' AND ever_failed), \
            count(*), \
            COALESCE(sum(duration_ms), 0)::bigint \
     FROM attempts",
);

/// Inserts a run; `None` when its client key is taken in the project.
pub async fn insert(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    run: &NewRun,
    digest: &[u8],
) -> Result<Option<RunRow>> {
    INSERT
        .query_opt(
            c,
            &[
                &id,
                &project,
                &run.client_key,
                &digest,
                &run.name,
                &run.build_number,
                &run.build_url,
                &run.commit_sha,
                &run.branch,
                &run.pull_request,
                &labels::to_json(&run.labels),
                &run.started_at,
            ],
        )
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The run `id` of the project.
pub async fn by_id(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<Option<RunRow>> {
    BY_ID
        .query_opt(c, &[&project, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The run with client key `key` in the project.
pub async fn by_key(c: &impl GenericClient, project: Uuid, key: &str) -> Result<Option<RunRow>> {
    BY_KEY
        .query_opt(c, &[&project, &key])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The run `id`, locked for a status move.
pub async fn lock(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<Option<RunRow>> {
    LOCK.query_opt(c, &[&project, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// The total of ListTestRuns: LIST's filters (`$1`…`$8`), without paging.
const COUNT: crate::totals::Counter = crate::counter!(
    "test_runs",
    "test_runs \
     WHERE project_id = $1 \
       AND ($2::text[] IS NULL OR status = ANY($2)) \
       AND ($3::text IS NULL OR branch = $3) \
       AND ($4::text IS NULL OR commit_sha = $4) \
       AND ($5::jsonb IS NULL OR labels @> $5) \
       AND ($6::text[] IS NULL OR labels ?& $6) \
       AND ($7::timestamptz IS NULL OR started_at >= $7) \
       AND ($8::timestamptz IS NULL OR started_at < $8)"
);

/// How many runs of `project` pass `q`'s filters, counted as `mode` asks.
pub async fn count(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListRuns,
    mode: crate::totals::Mode,
    exact_below: i64,
) -> Result<crate::totals::Total> {
    let f = &q.filter;
    let statuses: Option<Vec<&str>> =
        (!f.statuses.is_empty()).then(|| f.statuses.iter().map(|s| s.as_str()).collect());
    let labels = (!f.labels.is_empty()).then(|| labels::to_json(&f.labels));
    let keys = (!f.label_keys.is_empty()).then_some(&f.label_keys);
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &project,
        &statuses,
        &f.branch,
        &f.commit_sha,
        &labels,
        &keys,
        &f.started_from,
        &f.started_to,
    ];
    crate::totals::count(c, &COUNT, params, mode, exact_below).await
}

/// One page (and one more row) of runs.
pub async fn list(c: &impl GenericClient, project: Uuid, q: &ListRuns) -> Result<Vec<RunRow>> {
    let f = &q.filter;
    let statuses: Option<Vec<&str>> =
        (!f.statuses.is_empty()).then(|| f.statuses.iter().map(|s| s.as_str()).collect());
    let labels = (!f.labels.is_empty()).then(|| labels::to_json(&f.labels));
    let keys = (!f.label_keys.is_empty()).then_some(&f.label_keys);
    let (after_at, after_id) = crate::pagination::time_key(q.after)?;
    LIST.query(
        c,
        &[
            &project,
            &statuses,
            &f.branch,
            &f.commit_sha,
            &labels,
            &keys,
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

/// Moves the run to a final status.
pub async fn finish(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    status: RunStatus,
    finished_at: Option<DateTime<Utc>>,
) -> Result<RunRow> {
    from_row(
        &FINISH
            .query_one(c, &[&project, &id, &status.as_str(), &finished_at])
            .await?,
    )
}

/// The counts of a run (whose project the caller has checked).
pub async fn counts(c: &impl GenericClient, run: Uuid) -> Result<Counts> {
    let row = COUNTS.query_one(c, &[&run]).await?;
    Ok(Counts {
        tests: row.try_get(0)?,
        passed: row.try_get(1)?,
        failed: row.try_get(2)?,
        skipped: row.try_get(3)?,
        errored: row.try_get(4)?,
        passed_on_retry: row.try_get(5)?,
        executions: row.try_get(6)?,
        total_duration_ms: row.try_get(7)?,
    })
}

/// One row of a comparison: a test case in one category.
#[derive(Debug, Clone)]
pub struct Compared {
    pub category: String,
    /// Rows in the category before the cut.
    pub total: i64,
    pub test_case_id: Uuid,
    pub test_case_key: String,
    pub base_status: Option<String>,
    pub head_status: Option<String>,
    pub base_duration_ms: Option<i64>,
    pub head_duration_ms: Option<i64>,
}

// The last attempt of each test case in the base ($1) and head ($2) runs,
// joined by test case and sorted into categories (a test case may be in
// two: a new test that fails, a fixed one whose duration changed); at most
// $4 per category, with each category's total. $3: the duration threshold;
// $5: the project (of both runs, checked by the caller).
const COMPARE: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "WITH b AS ( \
       SELECT DISTINCT ON (test_case_id) test_case_id, status, duration_ms \
       FROM test_executions WHERE run_id = $1 \
       ORDER BY test_case_id, attempt DESC, started_at DESC, id DESC), \
     h AS ( \
       SELECT DISTINCT ON (test_case_id) test_case_id, status, duration_ms \
       FROM test_executions WHERE run_id = $2 \
       ORDER BY test_case_id, attempt DESC, started_at DESC, id DESC), \
     j AS ( \
       SELECT t.id AS test_case_id, t.key, b.status AS base_status, h.status AS head_status, \
              b.duration_ms AS base_ms, h.duration_ms AS head_ms \
       FROM b FULL JOIN h USING (test_case_id) \
       JOIN test_cases t ON t.project_id = $5 AND t.id = COALESCE(h.test_case_id, b.test_case_id)), \
     c AS ( \
       SELECT j.*, v.category FROM j CROSS JOIN LATERAL (VALUES \
         (CASE WHEN head_status IN ('failed', 'error') \
                AND (base_status IS NULL OR base_status NOT IN ('failed', 'error')) \
               THEN 'new_failures' END), \
         (CASE WHEN base_status IN ('failed', 'error') AND head_status = 'passed' \
               THEN 'fixed' END), \
         (CASE WHEN base_status IN ('failed', 'error') AND head_status IN ('failed', 'error') \
               THEN 'still_failing' END), \
         (CASE WHEN base_status IS NULL THEN 'new_tests' END), \
         (CASE WHEN head_status IS NULL THEN 'removed_tests' END), \
         (CASE WHEN base_status IS NOT NULL AND head_status IS NOT NULL \
                AND abs(head_ms - base_ms) >= $3 THEN 'duration_changes' END) \
       ) v(category) WHERE v.category IS NOT NULL), \
     r AS ( \
       SELECT c.*, \
              row_number() OVER (PARTITION BY category ORDER BY \
                CASE WHEN category = 'duration_changes' THEN -abs(head_ms - base_ms) ELSE 0 END, \
                key) AS nth, \
              count(*) OVER (PARTITION BY category) AS total \
       FROM c) \
     SELECT category, total, test_case_id, key, base_status, head_status, base_ms, head_ms \
     FROM r WHERE nth <= $4 ORDER BY category, nth",
);

/// Compares the runs `base` and `head` of `project` (see COMPARE).
pub async fn compare(
    c: &impl GenericClient,
    project: Uuid,
    base: Uuid,
    head: Uuid,
    min_change_ms: i64,
    max_items: i64,
) -> Result<Vec<Compared>> {
    COMPARE
        .query(c, &[&base, &head, &min_change_ms, &max_items, &project])
        .await?
        .iter()
        .map(|row| {
            Ok(Compared {
                category: row.try_get(0)?,
                total: row.try_get(1)?,
                test_case_id: row.try_get(2)?,
                test_case_key: row.try_get(3)?,
                base_status: row.try_get(4)?,
                head_status: row.try_get(5)?,
                base_duration_ms: row.try_get(6)?,
                head_duration_ms: row.try_get(7)?,
            })
        })
        .collect()
}
