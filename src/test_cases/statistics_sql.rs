//! The statistics of executions, computed in SQL: totals by status,
//! duration percentiles and the flakiness ranking.
//!
//! Cost stays flat as history grows (issue 18):
//! - One constant statement per scope shape (all, test case, subsystem,
//!   test type, labels, run): no catch-all `($n IS NULL OR …)` predicate,
//!   so even a generic plan uses the scope's index. An unset window is the
//!   range [year 1, year 10000), which every stored time is in.
//! - Totals and histograms of a test case read `test_execution_days` (per
//!   project, test case and UTC day; migration V25); those of a subsystem,
//!   a test type or the whole project read `test_execution_scope_days`
//!   (per project, scope and UTC day; migration V35), so their cost is one
//!   row per day whatever the number of test cases. Both levels cover the
//!   days the window covers entirely; the raw executions are read only for
//!   the partial days at its two edges (through the (project, started_at)
//!   index). The test case day rows are refreshed in the transaction that
//!   writes executions ([`refresh_days`]) and by a statement trigger when
//!   executions are deleted; statement triggers on them add every change
//!   to the scope rows (see V35). Both levels always equal the raw rows.
//! - Percentiles are exact (`percentile_cont` over the raw rows) when at
//!   most [`EXACT_PERCENTILES_UP_TO`] executions ran in scope; beyond that
//!   they are interpolated over a histogram of log-scale buckets (bucket
//!   b ≥ 1 holds [2^((b-1)/8), 2^(b/8)) ms; 0 holds 0 ms), each rank valued
//!   at its bucket's geometric middle, which is within 2^(1/16) - 1 < 4.5 %
//!   of every value in the bucket — so the estimate is within 4.5 % of the
//!   exact percentile (a bucket holding a single integer is exact).
//! - The flakiness ranking reads, per test case in scope, one row of
//!   `test_case_recent_outcomes` (its last 100 passed or failed outcomes
//!   and their times, refreshed with the day rows; migration V35) when the
//!   window ends after the newest of them and N ≤ 100 — exact, see
//!   `flaky_sql` — else its last N passed or failed executions by an
//!   index-only scan of (project, test case, started_at, id) INCLUDE
//!   (status). Either way the exact ranking, at a cost per test case in
//!   scope, whatever the history's length.
//! - Label- and run-scoped statistics cannot be rolled up (any label set,
//!   any run): they read the matching executions through the GIN index on
//!   labels and the (project, run) index.

use super::ExecutionStatus;
use super::executions::{StatisticsQuery, StatsScope};
use crate::db::Stmt;
use crate::error::Result;
use chrono::{DateTime, Days, NaiveDate, NaiveTime, Utc};
use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// Up to this many executions that ran in scope, percentiles are exact;
/// beyond, histogram estimates (see the module comment).
pub const EXACT_PERCENTILES_UP_TO: i64 = 10_000;

/// Totals, pass rate inputs and duration percentiles of a scope.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub total: i64,
    pub by_status: Vec<(ExecutionStatus, i64)>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// The percentiles are histogram estimates.
    pub estimated: bool,
    /// Run scope: test cases whose last attempt passed after a failure.
    pub passed_on_retry: i64,
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

/// A resolved scope: what the statements bind.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    All,
    TestCase(Uuid),
    Subsystem(String),
    /// The stored name of the test type.
    TestType(&'static str),
    Labels(serde_json::Value),
    Run(Uuid),
}

impl Scope {
    /// The scope of a query whose test case (if any) resolved to `test_case`.
    pub fn of(q: &StatisticsQuery, test_case: Option<Uuid>) -> Scope {
        match (&q.scope, test_case) {
            (StatsScope::TestCase(_), Some(id)) => Scope::TestCase(id),
            (StatsScope::Subsystem(s), _) => Scope::Subsystem(s.clone()),
            (StatsScope::TestType(t), _) => Scope::TestType(t.as_str()),
            (StatsScope::Labels(l), _) => Scope::Labels(crate::labels::to_json(l)),
            (StatsScope::Run(r), _) => Scope::Run(*r),
            _ => Scope::All,
        }
    }
}

// ---------------------------------------------------------------------------
// The window split into rollup days and raw edges.

/// The window [from, to) as: raw [from, full_from), days [day_from,
/// day_to) read from the rollup, raw [full_to, to). Without whole days,
/// full_from = full_to = to and the day range is empty.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub full_from: DateTime<Utc>,
    pub full_to: DateTime<Utc>,
    pub day_from: NaiveDate,
    pub day_to: NaiveDate,
}

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    d.and_time(NaiveTime::MIN).and_utc()
}

impl Span {
    pub fn new(from: Option<DateTime<Utc>>, to: Option<DateTime<Utc>>) -> Span {
        let from = from.unwrap_or_else(|| midnight(NaiveDate::from_ymd_opt(1, 1, 1).unwrap()));
        let to = to.unwrap_or_else(|| midnight(NaiveDate::from_ymd_opt(10_000, 1, 1).unwrap()));
        let first = from.date_naive();
        let day_from = if midnight(first) == from {
            first
        } else {
            first.checked_add_days(Days::new(1)).unwrap_or(first)
        };
        let day_to = to.date_naive();
        if day_from < day_to {
            Span {
                from,
                to,
                full_from: midnight(day_from),
                full_to: midnight(day_to),
                day_from,
                day_to,
            }
        } else {
            Span {
                from,
                to,
                full_from: to,
                full_to: to,
                day_from: day_to,
                day_to,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Statements. Rollup-backed ones bind: $1 project, $2 from, $3 full_from,
// $4 full_to, $5 to, $6 day_from, $7 day_to, $8 the scope's value (absent
// for the whole project).

/// The scope fragments of the test-case-level scopes: (join and predicate
/// on the day rows `d`, join and predicate on the executions `e`, predicate
/// on the test cases `t` of the flakiness ranking).
macro_rules! scope_all {
    ($m:ident, $v:literal $(, $arg:tt)*) => {
        $m!($($arg,)* "", "", "", "", "")
    };
}
macro_rules! scope_test_case {
    ($m:ident, $v:literal $(, $arg:tt)*) => {
        $m!($($arg,)* "", concat!(" AND d.test_case_id = ", $v), "",
            concat!(" AND e.test_case_id = ", $v), concat!(" AND t.id = ", $v))
    };
}
macro_rules! scope_subsystem {
    ($m:ident, $v:literal $(, $arg:tt)*) => {
        $m!($($arg,)*
            " JOIN test_cases t ON t.project_id = d.project_id AND t.id = d.test_case_id",
            concat!(" AND t.target_subsystem = ", $v),
            " JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id",
            concat!(" AND t.target_subsystem = ", $v),
            concat!(" AND t.target_subsystem = ", $v))
    };
}
macro_rules! scope_test_type {
    ($m:ident, $v:literal $(, $arg:tt)*) => {
        $m!($($arg,)*
            " JOIN test_cases t ON t.project_id = d.project_id AND t.id = d.test_case_id",
            concat!(" AND t.test_type = ", $v),
            " JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id",
            concat!(" AND t.test_type = ", $v),
            concat!(" AND t.test_type = ", $v))
    };
}

/// Totals of the day rows `d` of [day_from, day_to). `$days` is their
/// FROM .. WHERE (a rollup level and the scope's predicate on it).
macro_rules! totals_sql {
    ($days:expr) => {
        concat!(
            "SELECT coalesce(sum(d.total), 0)::int8, coalesce(sum(d.passed), 0)::int8, \
                    coalesce(sum(d.failed), 0)::int8, coalesce(sum(d.skipped), 0)::int8, \
                    coalesce(sum(d.error), 0)::int8",
            $days
        )
    };
}

/// The merged duration histogram (bucket, count) of the day rows `d`.
macro_rules! histogram_sql {
    ($days:expr) => {
        concat!(
            "SELECT h.bucket, sum(h.n)::int8",
            $days,
            " GROUP BY h.bucket ORDER BY h.bucket"
        )
    };
}

/// The raw executions of the window's two partial edge days, read once,
/// counted by status and duration bucket: $1 project, [$2, $3) and
/// [$4, $5) the edges, $6 the scope's value.
macro_rules! edges_sql {
    ($ej:expr, $ew:expr) => {
        concat!(
            "SELECT x.status, x.bucket, count(*)::int8 FROM ( \
               SELECT e.status, verdict_duration_bucket(e.duration_ms) AS bucket \
               FROM test_executions e",
            $ej,
            " WHERE e.project_id = $1 AND e.started_at >= $2 AND e.started_at < $3",
            $ew,
            " UNION ALL SELECT e.status, verdict_duration_bucket(e.duration_ms) \
               FROM test_executions e",
            $ej,
            " WHERE e.project_id = $1 AND e.started_at >= $4 AND e.started_at < $5",
            $ew,
            ") x GROUP BY x.status, x.bucket"
        )
    };
}

/// The day rows of a test case (first level, test_execution_days): $1
/// project, [$2, $3) the days, $4 the test case.
macro_rules! test_case_days {
    ($lateral:expr) => {
        concat!(
            " FROM test_execution_days d",
            $lateral,
            " WHERE d.project_id = $1 AND d.day >= $2 AND d.day < $3 AND d.test_case_id = $4"
        )
    };
}

/// The day rows of a scope of the second level (test_execution_scope_days;
/// migration V35), one row per day whatever the number of test cases: $1
/// project, [$2, $3) the days, $4 the scope's value.
macro_rules! scope_days {
    ($lateral:expr, $kind:literal, $value:literal) => {
        concat!(
            " FROM test_execution_scope_days d",
            $lateral,
            " WHERE d.project_id = $1 AND d.kind = '",
            $kind,
            "' AND d.value = ",
            $value,
            " AND d.day >= $2 AND d.day < $3"
        )
    };
}

/// The histogram entries of the day rows `d`.
macro_rules! hist {
    () => {
        " CROSS JOIN LATERAL unnest(d.hist_buckets, d.hist_counts) AS h(bucket, n)"
    };
}

/// The join of executions `e` to their test cases `t`.
macro_rules! join_t {
    () => {
        " JOIN test_cases t ON t.project_id = e.project_id AND t.id = e.test_case_id"
    };
}

/// Exact percentiles over the raw rows: $1 project, $2 from, $3 to, $4 the
/// scope's value.
macro_rules! exact_sql {
    ($dj:expr, $dw:expr, $ej:expr, $ew:expr, $tw:expr) => {
        concat!(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY e.duration_ms::float8), \
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms::float8) \
             FROM test_executions e",
            $ej,
            " WHERE e.project_id = $1 AND e.started_at >= $2 AND e.started_at < $3 \
                AND e.status <> 'skipped'",
            $ew
        )
    };
}

/// The flakiness ranking of the test cases `t` in scope. Per test case:
/// when $4 ≤ 100 and its newest kept outcome started before $3, from its
/// row of test_case_recent_outcomes (the last 100 passed or failed
/// executions, oldest first): the suffix of those that started at or after
/// $2, at most $4 (exact: older executions are older than every kept one);
/// else its last $4 passed-or-failed executions in [$2, $3), newest first,
/// by an index-only scan of (project, test case, started_at, id) INCLUDE
/// (status) (migration V35), the changes between neighbours counted in that
/// order (lead(), no sort). Flips are the runs of equal outcomes minus one.
/// $1 project, $5 how many to return, $6 the scope's value.
macro_rules! flaky_sql {
    ($dj:expr, $dw:expr, $ej:expr, $ew:expr, $tw:expr) => {
        concat!(
            "SELECT t.id, t.key, t.name, f.flips, f.considered, count(*) OVER () \
             FROM test_cases t \
             LEFT JOIN test_case_recent_outcomes o \
               ON o.project_id = t.project_id AND o.test_case_id = t.id \
             CROSS JOIN LATERAL ( \
               SELECT $4::int8 <= 100 AND o.test_case_id IS NOT NULL \
                      AND (o.outcomes = '' OR o.times[cardinality(o.times)] < $3) AS covered) c \
             LEFT JOIN LATERAL ( \
               SELECT right(o.outcomes, \
                            CASE WHEN cardinality(o.times) >= $4 \
                                      AND o.times[cardinality(o.times) - $4::int4 + 1] >= $2 THEN $4::int4 \
                                 ELSE (SELECT count(*) FROM unnest(o.times) AS x(at) \
                                       WHERE x.at >= $2)::int4 END) AS s \
               WHERE c.covered) k ON true \
             CROSS JOIN LATERAL ( \
               SELECT count(*) FILTER (WHERE w.next <> w.status) AS flips, \
                      count(*) AS considered \
               FROM (SELECT r.status, \
                            lead(r.status) OVER (ORDER BY r.started_at DESC, r.id DESC) AS next \
                     FROM (SELECT e.status, e.started_at, e.id FROM test_executions e \
                           WHERE NOT c.covered AND e.project_id = $1 AND e.test_case_id = t.id \
                             AND e.started_at >= $2 AND e.started_at < $3 \
                             AND e.status IN ('passed', 'failed') \
                           ORDER BY e.started_at DESC, e.id DESC LIMIT $4) r) w) raw \
             CROSS JOIN LATERAL ( \
               SELECT CASE WHEN c.covered THEN greatest(regexp_count(k.s, 'P+|F+') - 1, 0)::int8 \
                           ELSE raw.flips END AS flips, \
                      CASE WHEN c.covered THEN length(k.s)::int8 ELSE raw.considered END \
                          AS considered) f \
             WHERE t.project_id = $1",
            $tw,
            " AND f.flips > 0 \
             ORDER BY f.flips DESC, t.key LIMIT $5"
        )
    };
}

macro_rules! stmt {
    ($table:literal, $sql:expr) => {
        Stmt::new("SELECT", $table, $sql)
    };
}

pub const TOTALS_ALL: Stmt = stmt!(
    "test_execution_scope_days",
    totals_sql!(scope_days!("", "project", "''"))
);
pub const TOTALS_TEST_CASE: Stmt = stmt!("test_execution_days", totals_sql!(test_case_days!("")));
pub const TOTALS_SUBSYSTEM: Stmt = stmt!(
    "test_execution_scope_days",
    totals_sql!(scope_days!("", "subsystem", "$4"))
);
pub const TOTALS_TEST_TYPE: Stmt = stmt!(
    "test_execution_scope_days",
    totals_sql!(scope_days!("", "test_type", "$4"))
);

pub const HISTOGRAM_ALL: Stmt = stmt!(
    "test_execution_scope_days",
    histogram_sql!(scope_days!(hist!(), "project", "''"))
);
pub const HISTOGRAM_TEST_CASE: Stmt = stmt!(
    "test_execution_days",
    histogram_sql!(test_case_days!(hist!()))
);
pub const HISTOGRAM_SUBSYSTEM: Stmt = stmt!(
    "test_execution_scope_days",
    histogram_sql!(scope_days!(hist!(), "subsystem", "$4"))
);
pub const HISTOGRAM_TEST_TYPE: Stmt = stmt!(
    "test_execution_scope_days",
    histogram_sql!(scope_days!(hist!(), "test_type", "$4"))
);

pub const EDGES_ALL: Stmt = stmt!("test_executions", edges_sql!("", ""));
pub const EDGES_TEST_CASE: Stmt = stmt!(
    "test_executions",
    edges_sql!("", " AND e.test_case_id = $6")
);
pub const EDGES_SUBSYSTEM: Stmt = stmt!(
    "test_executions",
    edges_sql!(join_t!(), " AND t.target_subsystem = $6")
);
pub const EDGES_TEST_TYPE: Stmt = stmt!(
    "test_executions",
    edges_sql!(join_t!(), " AND t.test_type = $6")
);

pub const EXACT_ALL: Stmt = stmt!("test_executions", scope_all!(exact_sql, "$4"));
pub const EXACT_TEST_CASE: Stmt = stmt!("test_executions", scope_test_case!(exact_sql, "$4"));
pub const EXACT_SUBSYSTEM: Stmt = stmt!("test_executions", scope_subsystem!(exact_sql, "$4"));
pub const EXACT_TEST_TYPE: Stmt = stmt!("test_executions", scope_test_type!(exact_sql, "$4"));

pub const FLAKY_ALL: Stmt = stmt!("test_executions", scope_all!(flaky_sql, "$6"));
pub const FLAKY_TEST_CASE: Stmt = stmt!("test_executions", scope_test_case!(flaky_sql, "$6"));
pub const FLAKY_SUBSYSTEM: Stmt = stmt!("test_executions", scope_subsystem!(flaky_sql, "$6"));
pub const FLAKY_TEST_TYPE: Stmt = stmt!("test_executions", scope_test_type!(flaky_sql, "$6"));

/// Label scope: every figure from the raw executions carrying the labels
/// $4 (GIN index on labels): $1 project, $2 from, $3 to.
pub const TOTALS_LABELS: Stmt = stmt!(
    "test_executions",
    "SELECT count(*), \
            count(*) FILTER (WHERE e.status = 'passed'), \
            count(*) FILTER (WHERE e.status = 'failed'), \
            count(*) FILTER (WHERE e.status = 'skipped'), \
            count(*) FILTER (WHERE e.status = 'error'), \
            percentile_cont(0.5) WITHIN GROUP (ORDER BY e.duration_ms::float8) \
                FILTER (WHERE e.status <> 'skipped'), \
            percentile_cont(0.95) WITHIN GROUP (ORDER BY e.duration_ms::float8) \
                FILTER (WHERE e.status <> 'skipped'), \
            0::int8 \
     FROM test_executions e \
     WHERE e.project_id = $1 AND e.labels @> $4 AND e.started_at >= $2 AND e.started_at < $3"
);

/// Label scope flakiness: per test case its last $5 passed-or-failed
/// executions carrying the labels; $6 how many to return.
pub const FLAKY_LABELS: Stmt = stmt!(
    "test_executions",
    "WITH scoped AS ( \
       SELECT e.test_case_id, e.status, e.started_at, e.id, \
              row_number() OVER (PARTITION BY e.test_case_id \
                                 ORDER BY e.started_at DESC, e.id DESC) AS recency \
       FROM test_executions e \
       WHERE e.project_id = $1 AND e.labels @> $4 AND e.started_at >= $2 AND e.started_at < $3 \
         AND e.status IN ('passed', 'failed')), \
     recent AS ( \
       SELECT test_case_id, status, \
              lag(status) OVER (PARTITION BY test_case_id ORDER BY started_at, id) AS previous \
       FROM scoped WHERE recency <= $5), \
     counted AS ( \
       SELECT test_case_id, \
              count(*) FILTER (WHERE previous IS NOT NULL AND previous <> status) AS flips, \
              count(*) AS considered \
       FROM recent GROUP BY test_case_id) \
     SELECT c.test_case_id, t.key, t.name, c.flips, c.considered, count(*) OVER () \
     FROM counted c JOIN test_cases t ON t.project_id = $1 AND t.id = c.test_case_id \
     WHERE c.flips > 0 \
     ORDER BY c.flips DESC, t.key LIMIT $6"
);

/// Run scope: the last attempt of each test case in run $2 (highest
/// attempt, then latest start; as the test run's own counts), with the
/// passed-on-retry count. Reads the run's index.
pub const TOTALS_RUN: Stmt = stmt!(
    "test_executions",
    "WITH attempts AS ( \
       SELECT e.status, e.duration_ms, \
              row_number() OVER (PARTITION BY e.test_case_id \
                                 ORDER BY e.attempt DESC, e.started_at DESC, e.id DESC) AS nth, \
              bool_or(e.status IN ('failed', 'error')) OVER (PARTITION BY e.test_case_id) \
                  AS ever_failed \
       FROM test_executions e WHERE e.project_id = $1 AND e.run_id = $2), \
     last AS (SELECT * FROM attempts WHERE nth = 1) \
     SELECT count(*), \
            count(*) FILTER (WHERE status = 'passed'), \
            count(*) FILTER (WHERE status = 'failed'), \
            count(*) FILTER (WHERE status = 'skipped'), \
            count(*) FILTER (WHERE status = 'error'), \
            percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms::float8) \
                FILTER (WHERE status <> 'skipped'), \
            percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms::float8) \
                FILTER (WHERE status <> 'skipped'), \
            count(*) FILTER (WHERE status = 'passed' AND ever_failed) \
     FROM last"
);

/// Run scope flakiness: per test case its last $3 passed-or-failed
/// attempts in run $2, oldest first; $4 how many to return.
pub const FLAKY_RUN: Stmt = stmt!(
    "test_executions",
    "WITH scoped AS ( \
       SELECT e.test_case_id, e.status, e.attempt, e.started_at, e.id, \
              row_number() OVER (PARTITION BY e.test_case_id \
                                 ORDER BY e.attempt DESC, e.started_at DESC, e.id DESC) AS recency \
       FROM test_executions e \
       WHERE e.project_id = $1 AND e.run_id = $2 AND e.status IN ('passed', 'failed')), \
     recent AS ( \
       SELECT test_case_id, status, \
              lag(status) OVER (PARTITION BY test_case_id ORDER BY attempt, started_at, id) \
                  AS previous \
       FROM scoped WHERE recency <= $3), \
     counted AS ( \
       SELECT test_case_id, \
              count(*) FILTER (WHERE previous IS NOT NULL AND previous <> status) AS flips, \
              count(*) AS considered \
       FROM recent GROUP BY test_case_id) \
     SELECT c.test_case_id, t.key, t.name, c.flips, c.considered, count(*) OVER () \
     FROM counted c JOIN test_cases t ON t.project_id = $1 AND t.id = c.test_case_id \
     WHERE c.flips > 0 \
     ORDER BY c.flips DESC, t.key LIMIT $4"
);

/// The test-case-level scope shapes: the ones the day rows serve.
#[derive(Debug, Clone, Copy)]
enum Shape {
    All,
    TestCase,
    Subsystem,
    TestType,
}

const STATUSES: [ExecutionStatus; 4] = [
    ExecutionStatus::Passed,
    ExecutionStatus::Failed,
    ExecutionStatus::Skipped,
    ExecutionStatus::Error,
];

fn by_status(row: &tokio_postgres::Row) -> Result<Vec<(ExecutionStatus, i64)>> {
    STATUSES
        .into_iter()
        .enumerate()
        .map(|(i, s)| Ok((s, row.try_get::<_, i64>(i + 1)?)))
        .collect()
}

/// Totals and duration percentiles of the executions of `project` in scope.
pub async fn totals(
    c: &impl GenericClient,
    project: Uuid,
    q: &StatisticsQuery,
    scope: &Scope,
) -> Result<Totals> {
    let span = Span::new(q.from, q.to);
    let (shape, value): (Shape, Option<&(dyn ToSql + Sync)>) = match scope {
        Scope::All => (Shape::All, None),
        Scope::TestCase(id) => (Shape::TestCase, Some(id)),
        Scope::Subsystem(s) => (Shape::Subsystem, Some(s)),
        Scope::TestType(t) => (Shape::TestType, Some(t)),
        Scope::Labels(labels) => {
            return raw_totals(
                TOTALS_LABELS
                    .query_one(c, &[&project, &span.from, &span.to, labels])
                    .await?,
            );
        }
        Scope::Run(run) => return raw_totals(TOTALS_RUN.query_one(c, &[&project, run]).await?),
    };
    let mut days: Vec<&(dyn ToSql + Sync)> = vec![&project, &span.day_from, &span.day_to];
    days.extend(value);
    let mut edges: Vec<&(dyn ToSql + Sync)> = vec![
        &project,
        &span.from,
        &span.full_from,
        &span.full_to,
        &span.to,
    ];
    edges.extend(value);
    let row = match shape {
        Shape::All => TOTALS_ALL.query_one(c, &days).await?,
        Shape::TestCase => TOTALS_TEST_CASE.query_one(c, &days).await?,
        Shape::Subsystem => TOTALS_SUBSYSTEM.query_one(c, &days).await?,
        Shape::TestType => TOTALS_TEST_TYPE.query_one(c, &days).await?,
    };
    let edge_rows = match shape {
        Shape::All => EDGES_ALL.query(c, &edges).await?,
        Shape::TestCase => EDGES_TEST_CASE.query(c, &edges).await?,
        Shape::Subsystem => EDGES_SUBSYSTEM.query(c, &edges).await?,
        Shape::TestType => EDGES_TEST_TYPE.query(c, &edges).await?,
    };
    // (status, bucket, count) of the edges.
    let edge_counts = edge_rows
        .iter()
        .map(|r| {
            Ok((
                ExecutionStatus::from_db(r.try_get(0)?)?,
                r.try_get::<_, i16>(1)?,
                r.try_get::<_, i64>(2)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut by_status = by_status(&row)?;
    for (status, count) in &mut by_status {
        *count += edge_counts
            .iter()
            .filter(|(s, _, _)| s == status)
            .map(|(_, _, n)| n)
            .sum::<i64>();
    }
    let ran: i64 = by_status
        .iter()
        .filter(|(s, _)| *s != ExecutionStatus::Skipped)
        .map(|(_, n)| n)
        .sum();
    let mut totals = Totals {
        total: row.try_get::<_, i64>(0)? + edge_counts.iter().map(|(_, _, n)| n).sum::<i64>(),
        by_status,
        ..Totals::default()
    };
    if ran == 0 {
        return Ok(totals);
    }
    if ran <= EXACT_PERCENTILES_UP_TO {
        let mut exact: Vec<&(dyn ToSql + Sync)> = vec![&project, &span.from, &span.to];
        exact.extend(value);
        let row = match shape {
            Shape::All => EXACT_ALL.query_one(c, &exact).await?,
            Shape::TestCase => EXACT_TEST_CASE.query_one(c, &exact).await?,
            Shape::Subsystem => EXACT_SUBSYSTEM.query_one(c, &exact).await?,
            Shape::TestType => EXACT_TEST_TYPE.query_one(c, &exact).await?,
        };
        totals.p50_ms = row.try_get(0)?;
        totals.p95_ms = row.try_get(1)?;
    } else {
        let rows = match shape {
            Shape::All => HISTOGRAM_ALL.query(c, &days).await?,
            Shape::TestCase => HISTOGRAM_TEST_CASE.query(c, &days).await?,
            Shape::Subsystem => HISTOGRAM_SUBSYSTEM.query(c, &days).await?,
            Shape::TestType => HISTOGRAM_TEST_TYPE.query(c, &days).await?,
        };
        let mut merged = std::collections::BTreeMap::new();
        for r in &rows {
            *merged.entry(r.try_get::<_, i16>(0)?).or_insert(0i64) += r.try_get::<_, i64>(1)?;
        }
        for (status, bucket, n) in &edge_counts {
            if *status != ExecutionStatus::Skipped {
                *merged.entry(*bucket).or_insert(0) += n;
            }
        }
        let histogram: Vec<(i16, i64)> = merged.into_iter().collect();
        totals.p50_ms = percentile(&histogram, 0.5);
        totals.p95_ms = percentile(&histogram, 0.95);
        totals.estimated = true;
    }
    Ok(totals)
}

fn raw_totals(row: tokio_postgres::Row) -> Result<Totals> {
    Ok(Totals {
        total: row.try_get(0)?,
        by_status: by_status(&row)?,
        p50_ms: row.try_get(5)?,
        p95_ms: row.try_get(6)?,
        estimated: false,
        passed_on_retry: row.try_get(7)?,
    })
}

/// The value a rank in histogram bucket `b` stands for: its geometric
/// middle, or the only integer the bucket holds (durations are whole
/// milliseconds).
pub fn bucket_value(b: i16) -> f64 {
    if b <= 0 {
        return 0.0;
    }
    let lo = 2f64.powf(f64::from(b - 1) / 8.0);
    let hi = 2f64.powf(f64::from(b) / 8.0);
    let (first, last) = (lo.ceil(), hi.ceil() - 1.0);
    if first >= last {
        first
    } else {
        (lo * hi).sqrt()
    }
}

/// percentile_cont over a histogram (buckets ascending): the values at the
/// two ranks around p·(n − 1), each its bucket's value, interpolated.
pub fn percentile(histogram: &[(i16, i64)], p: f64) -> Option<f64> {
    let n: i64 = histogram.iter().map(|(_, c)| c).sum();
    if n == 0 {
        return None;
    }
    let position = p * (n - 1) as f64;
    let (lo, hi) = (position.floor() as i64, position.ceil() as i64);
    let at = |rank: i64| {
        let mut seen = 0;
        for (b, c) in histogram {
            seen += c;
            if rank < seen {
                return bucket_value(*b);
            }
        }
        bucket_value(histogram.last().map_or(0, |(b, _)| *b))
    };
    let (a, b) = (at(lo), at(hi));
    Some(a + (position - lo as f64) * (b - a))
}

/// The flakiest test cases of `project` in scope (most flips first, then
/// by key) and how many test cases in scope flipped at all.
pub async fn flakiest(
    c: &impl GenericClient,
    project: Uuid,
    q: &StatisticsQuery,
    scope: &Scope,
) -> Result<(Vec<Flaky>, i64)> {
    let span = Span::new(q.from, q.to);
    let window = &q.flakiness_window;
    let top = &q.top_flaky;
    let base: [&(dyn ToSql + Sync); 5] = [&project, &span.from, &span.to, window, top];
    let rows = match scope {
        Scope::All => FLAKY_ALL.query(c, &base).await?,
        Scope::TestCase(id) => {
            FLAKY_TEST_CASE
                .query(c, &[&base[..], &[id]].concat())
                .await?
        }
        Scope::Subsystem(s) => {
            FLAKY_SUBSYSTEM
                .query(c, &[&base[..], &[s]].concat())
                .await?
        }
        Scope::TestType(t) => {
            FLAKY_TEST_TYPE
                .query(c, &[&base[..], &[t]].concat())
                .await?
        }
        Scope::Labels(labels) => {
            FLAKY_LABELS
                .query(c, &[&project, &span.from, &span.to, labels, window, top])
                .await?
        }
        Scope::Run(run) => FLAKY_RUN.query(c, &[&project, run, window, top]).await?,
    };
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

// ---------------------------------------------------------------------------
// The write side: refreshing the day rows a batch touched.

/// Locks the day rows of the keys ($2 test cases, $3 days, sorted, no
/// duplicates) in key order, creating missing ones, so concurrent writers
/// of the same days queue here. A new row takes the subsystem and type of
/// its test case (the scope its counts are added to, migration V35), read
/// FOR SHARE: an UpdateTestCase changing them either committed before
/// (this reads the new values) or waits until this transaction ends (and
/// then moves this row too).
const LOCK_DAYS: Stmt = Stmt::new(
    "INSERT",
    "test_execution_days",
    "WITH tc AS ( \
       SELECT t.id, t.target_subsystem, t.test_type FROM test_cases t \
       WHERE t.project_id = $1 AND t.id = ANY($2::uuid[]) ORDER BY t.id FOR SHARE) \
     INSERT INTO test_execution_days AS d (project_id, test_case_id, day, target_subsystem, \
                                           test_type) \
     SELECT $1, k.test_case_id, k.day, tc.target_subsystem, tc.test_type \
     FROM unnest($2::uuid[], $3::date[]) AS k(test_case_id, day) \
     JOIN tc ON tc.id = k.test_case_id \
     ORDER BY k.test_case_id, k.day \
     ON CONFLICT (project_id, test_case_id, day) DO UPDATE SET total = d.total",
);

/// Recounts the locked day rows from the raw executions. A statement of its
/// own: its snapshot, taken after the locks were granted, sees every
/// execution a concurrent writer of the same days committed.
const REFRESH_DAYS: Stmt = Stmt::new(
    "UPDATE",
    "test_execution_days",
    "UPDATE test_execution_days d \
     SET total = a.total, passed = a.passed, failed = a.failed, skipped = a.skipped, \
         error = a.error, duration_ms = a.duration_ms, \
         hist_buckets = a.hist_buckets, hist_counts = a.hist_counts \
     FROM verdict_execution_days_of(array_fill($1::uuid, ARRAY[cardinality($2::uuid[])]), \
                                    $2::uuid[], $3::date[]) a \
     WHERE d.project_id = $1 AND d.test_case_id = a.test_case_id AND d.day = a.day",
);

/// Locks the recent-outcome rows of the test cases $2 (sorted, no
/// duplicates) in key order, creating missing ones. Taken after the day
/// and scope rows (as the delete trigger does), so writers queue in one
/// order.
const LOCK_RECENT: Stmt = Stmt::new(
    "INSERT",
    "test_case_recent_outcomes",
    "INSERT INTO test_case_recent_outcomes AS o (project_id, test_case_id) \
     SELECT $1, k.test_case_id FROM unnest($2::uuid[]) AS k(test_case_id) \
     ORDER BY k.test_case_id \
     ON CONFLICT (project_id, test_case_id) DO UPDATE SET outcomes = o.outcomes",
);

/// Recomputes the locked recent-outcome rows from the executions (the
/// last 100 passed or failed of each, by index-only scan). A statement of
/// its own, for the same reason as [`REFRESH_DAYS`].
const REFRESH_RECENT: Stmt = Stmt::new(
    "UPDATE",
    "test_case_recent_outcomes",
    "UPDATE test_case_recent_outcomes o SET outcomes = a.outcomes, times = a.times \
     FROM unnest($2::uuid[]) AS k(test_case_id) \
     CROSS JOIN LATERAL verdict_recent_outcomes_of($1, k.test_case_id) a \
     WHERE o.project_id = $1 AND o.test_case_id = k.test_case_id",
);

/// Brings the day rows of `keys` (test case, UTC day) of `project`, the
/// scope rows they add to (by trigger) and the recent outcomes of their
/// test cases up to date with the executions stored, in the caller's
/// transaction.
pub async fn refresh_days(
    c: &impl GenericClient,
    project: Uuid,
    keys: &[(Uuid, NaiveDate)],
) -> Result<()> {
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    if keys.is_empty() {
        return Ok(());
    }
    let (test_cases, days): (Vec<Uuid>, Vec<NaiveDate>) = keys.into_iter().unzip();
    LOCK_DAYS
        .execute(c, &[&project, &test_cases, &days])
        .await?;
    REFRESH_DAYS
        .execute(c, &[&project, &test_cases, &days])
        .await?;
    let mut test_cases = test_cases;
    test_cases.dedup();
    LOCK_RECENT.execute(c, &[&project, &test_cases]).await?;
    REFRESH_RECENT.execute(c, &[&project, &test_cases]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_splits_into_whole_days_and_raw_edges() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        let d = |s: &str| s.parse::<NaiveDate>().unwrap();
        let s = Span::new(
            Some(t("2026-01-01T10:00:00Z")),
            Some(t("2026-01-04T05:00:00Z")),
        );
        assert_eq!((s.day_from, s.day_to), (d("2026-01-02"), d("2026-01-04")));
        assert_eq!(s.full_from, t("2026-01-02T00:00:00Z"));
        assert_eq!(s.full_to, t("2026-01-04T00:00:00Z"));
        let s = Span::new(
            Some(t("2026-01-01T00:00:00Z")),
            Some(t("2026-01-02T00:00:00Z")),
        );
        assert_eq!((s.day_from, s.day_to), (d("2026-01-01"), d("2026-01-02")));
        assert_eq!((s.full_from, s.full_to), (s.from, s.to));
        // Within one day: everything raw.
        let s = Span::new(
            Some(t("2026-01-01T01:00:00Z")),
            Some(t("2026-01-01T05:00:00Z")),
        );
        assert_eq!(s.day_from, s.day_to);
        assert_eq!((s.full_from, s.full_to), (s.to, s.to));
    }

    #[test]
    fn histogram_percentiles_are_within_the_documented_error() {
        // Buckets as verdict_duration_bucket computes them.
        let bucket = |d: i64| -> i16 {
            if d <= 0 {
                0
            } else {
                1 + (8.0 * (d as f64).ln() / 2f64.ln()).floor() as i16
            }
        };
        let values: Vec<i64> = (0..5000).map(|i| (i * i) % 100_003 + i % 7).collect();
        let mut sorted = values.clone();
        sorted.sort_unstable();
        let mut histogram = std::collections::BTreeMap::new();
        for v in &values {
            *histogram.entry(bucket(*v)).or_insert(0i64) += 1;
        }
        let histogram: Vec<(i16, i64)> = histogram.into_iter().collect();
        for p in [0.5, 0.9, 0.95, 0.99] {
            let pos = p * (sorted.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            let exact = sorted[lo] as f64 + (pos - lo as f64) * (sorted[hi] - sorted[lo]) as f64;
            let estimate = percentile(&histogram, p).unwrap();
            assert!(
                (estimate - exact).abs() <= 0.045 * exact,
                "p{p}: {estimate} vs {exact}"
            );
        }
        // Small integers sit alone in their buckets: exact.
        assert_eq!(
            percentile(&[(bucket(1), 1), (bucket(3), 1)], 0.5),
            Some(2.0)
        );
        assert_eq!(percentile(&[], 0.5), None);
    }
}
