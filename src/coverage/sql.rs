//! The SQL of coverage reports and their per-file rows.

use super::{AggregateQuery, Counters, NewReport, Report, TrendQuery};
use crate::db::Stmt;
use crate::error::Result;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use futures::pin_mut;
use tokio_postgres::Row;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

macro_rules! report_columns {
    () => {
        "id, commit_sha, branch, subsystem, session_id, client_key, lines_covered, lines_total, \
         branches_covered, branches_total, functions_covered, functions_total, file_count, \
         recorded_at, created_at, labels"
    };
}

/// Counters from six consecutive bigint columns starting at `at`.
pub(super) fn counters_at(row: &Row, at: usize) -> Result<Counters> {
    Ok(Counters {
        lines_covered: row.try_get(at)?,
        lines_total: row.try_get(at + 1)?,
        branches_covered: row.try_get(at + 2)?,
        branches_total: row.try_get(at + 3)?,
        functions_covered: row.try_get(at + 4)?,
        functions_total: row.try_get(at + 5)?,
    })
}

/// Counters from six consecutive nullable bigint columns; `None` when the
/// first is NULL (the side of a join that has no row).
fn optional_counters_at(row: &Row, at: usize) -> Result<Option<Counters>> {
    if row.try_get::<_, Option<i64>>(at)?.is_none() {
        return Ok(None);
    }
    counters_at(row, at).map(Some)
}

pub(super) fn from_row(row: &Row) -> Result<Report> {
    Ok(Report {
        id: row.try_get("id")?,
        commit_sha: row.try_get("commit_sha")?,
        branch: row.try_get("branch")?,
        subsystem: row.try_get("subsystem")?,
        session_id: row.try_get("session_id")?,
        client_key: row.try_get("client_key")?,
        totals: counters_at(row, 6)?,
        file_count: row.try_get("file_count")?,
        recorded_at: row.try_get("recorded_at")?,
        created_at: row.try_get("created_at")?,
        labels: row.try_get::<_, crate::labels::LabelsColumn>("labels")?.0,
    })
}

fn one(row: Option<Row>) -> Result<Option<Report>> {
    row.as_ref().map(from_row).transpose()
}

const INSERT: Stmt = Stmt::new(
    "INSERT",
    "coverage_reports",
    concat!(
        "INSERT INTO coverage_reports (project_id, id, commit_sha, branch, subsystem, session_id, \
         client_key, lines_covered, lines_total, branches_covered, branches_total, \
         functions_covered, functions_total, file_count, recorded_at, content_digest, labels) \
         VALUES ($16, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, COALESCE($14, now()), \
                 $15, $17) \
         ON CONFLICT (project_id, commit_sha, subsystem, client_key) DO NOTHING RETURNING ",
        report_columns!()
    ),
);

/// Inserts a report's row in `project` unless its key is taken there;
/// `None` when it is. `digest` is the canonical digest of `r` (files
/// included), kept to decide replays.
pub async fn insert(
    c: &impl GenericClient,
    project: Uuid,
    id: Uuid,
    r: &NewReport,
    digest: &[u8],
) -> Result<Option<Report>> {
    let t = &r.totals;
    one(INSERT
        .query_opt(
            c,
            &[
                &id,
                &r.commit_sha,
                &r.branch,
                &r.subsystem,
                &r.session_id,
                &r.client_key,
                &t.lines_covered,
                &t.lines_total,
                &t.branches_covered,
                &t.branches_total,
                &t.functions_covered,
                &t.functions_total,
                &(r.files.len() as i32),
                &r.recorded_at,
                &digest,
                &project,
                &crate::labels::to_json(&r.labels),
            ],
        )
        .await?)
}

const COPY_FILES: Stmt = Stmt::new(
    "COPY",
    "coverage_files",
    "COPY coverage_files (project_id, report_id, session_id, path, lines_covered, lines_total, \
     branches_covered, branches_total, functions_covered, functions_total) FROM STDIN BINARY",
);

const FILE_TYPES: [Type; 10] = [
    Type::UUID,
    Type::UUID,
    Type::UUID,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
];

/// Writes the per-file rows of a new report of `project` with binary COPY.
pub async fn copy_files(
    tx: &deadpool_postgres::Transaction<'_>,
    project: Uuid,
    report: &Report,
    r: &NewReport,
) -> Result<u64> {
    COPY_FILES
        .traced_copy(async {
            let sink = tx.copy_in(COPY_FILES.sql).await?;
            let writer = BinaryCopyInWriter::new(sink, &FILE_TYPES);
            pin_mut!(writer);
            for f in &r.files {
                let c = &f.counters;
                let row: [&(dyn ToSql + Sync); 10] = [
                    &project,
                    &report.id,
                    &report.session_id,
                    &f.path,
                    &c.lines_covered,
                    &c.lines_total,
                    &c.branches_covered,
                    &c.branches_total,
                    &c.functions_covered,
                    &c.functions_total,
                ];
                writer.as_mut().write(&row).await?;
            }
            writer.finish().await
        })
        .await
}

const BY_KEY: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    concat!(
        "SELECT ",
        report_columns!(),
        ", content_digest FROM coverage_reports \
         WHERE project_id = $1 AND commit_sha = $2 AND subsystem = $3 AND client_key = $4"
    ),
);

/// The report stored under an idempotency key in `project` and its content
/// digest (`None` for a report recorded before V11), to decide a replay.
pub async fn get_for_replay(
    c: &impl GenericClient,
    project: Uuid,
    r: &NewReport,
) -> Result<Option<(Report, Option<Vec<u8>>)>> {
    BY_KEY
        .query_opt(c, &[&project, &r.commit_sha, &r.subsystem, &r.client_key])
        .await?
        .map(|row| Ok((from_row(&row)?, row.try_get("content_digest")?)))
        .transpose()
}

const LATEST_OF_COMMIT: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    concat!(
        "SELECT ",
        report_columns!(),
        " FROM coverage_reports WHERE project_id = $1 AND commit_sha = $2 AND subsystem = $3 \
         ORDER BY recorded_at DESC, id DESC LIMIT 1"
    ),
);

/// The latest report of a commit and subsystem in `project`.
pub async fn latest_of_commit(
    c: &impl GenericClient,
    project: Uuid,
    commit_sha: &str,
    subsystem: &str,
) -> Result<Option<Report>> {
    one(LATEST_OF_COMMIT
        .query_opt(c, &[&project, &commit_sha, &subsystem])
        .await?)
}

/// Summed counters of some reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pooled {
    /// `None` for the row pooling every subsystem.
    pub subsystem: Option<String>,
    pub report_count: i64,
    pub counters: Counters,
}

// Label filters of reports (migrations/V21): `$n` and `$m` are the two
// parameters of `LabelFilter::params()` (NULL when unset). Every read that
// filters reports takes the same two predicates, e.g. a ListCoverageReports:
//   AND ($n::jsonb IS NULL OR labels @> $n) AND ($m::text[] IS NULL OR labels ?& $m)
// with `LabelFilter::validate(&mut v, &r.labels, &r.label_keys)` in its
// request conversion and the filter in its page-token fingerprint.
//
// sum(bigint) is numeric: sums are taken exactly and saturate at the int64
// maximum instead of failing the cast (unreachable for reports within
// MAX_COUNTER: it would take over 8 million of them at the bound).
// One constant statement per filter shape (issue 18): a generic plan of
// `($1 IS NULL OR branch = $1)` cannot use the (project_id, branch, subsystem,
// recorded_at) index. The recorded range stays optional in the statement:
// with a branch the index leads with it, and without one an open range
// reads every report of the project (a sequential pass beats the time
// index's random visits).
macro_rules! aggregate_sql {
    ($filter:literal) => {
        concat!(
            "WITH matching AS ( \
                 SELECT * FROM coverage_reports \
                 WHERE project_id = $6 \
                   AND ($3::timestamptz IS NULL OR recorded_at >= $3) \
                   AND ($4::timestamptz IS NULL OR recorded_at < $4) \
                   AND ($7::jsonb IS NULL OR labels @> $7) \
                   AND ($8::text[] IS NULL OR labels ?& $8)",
            $filter,
            "), \
             chosen AS ( \
                 SELECT * FROM matching WHERE NOT $5 \
                 UNION ALL \
                 (SELECT DISTINCT ON (subsystem) * FROM matching WHERE $5 \
                  ORDER BY subsystem, recorded_at DESC, id DESC)) \
             SELECT GROUPING(subsystem) = 1, subsystem, count(*), \
                    LEAST(COALESCE(sum(lines_covered), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(lines_total), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(branches_covered), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(branches_total), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(functions_covered), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(functions_total), 0), 9223372036854775807)::int8 \
             FROM chosen GROUP BY ROLLUP (subsystem) \
             ORDER BY GROUPING(subsystem) DESC, subsystem"
        )
    };
}

pub const AGGREGATE: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    aggregate_sql!(" AND $1::text IS NULL AND $2::text IS NULL"),
);
pub const AGGREGATE_BRANCH: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    aggregate_sql!(" AND branch = $1 AND $2::text IS NULL"),
);
pub const AGGREGATE_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    aggregate_sql!(" AND $1::text IS NULL AND subsystem = $2"),
);
pub const AGGREGATE_BRANCH_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    aggregate_sql!(" AND branch = $1 AND subsystem = $2"),
);

// Without a label filter and a recorded range, the aggregate reads the
// per-day rows of coverage_report_days (migrations/V37: per project, UTC
// day, branch and subsystem, the report count, the counters' sums and the
// day's latest report), one row per branch, subsystem and day instead of
// one per report; the latest report of a subsystem is the latest of its
// days' latest. Sums are numeric there; the same saturation applies.
macro_rules! aggregate_days_sql {
    ($filter:literal) => {
        concat!(
            "WITH matching AS ( \
                 SELECT * FROM coverage_report_days WHERE project_id = $4",
            $filter,
            "), \
             chosen AS ( \
                 SELECT subsystem, report_count AS n, lines_covered AS lc, lines_total AS lt, \
                        branches_covered AS bc, branches_total AS bt, functions_covered AS fc, \
                        functions_total AS ft \
                 FROM matching WHERE NOT $3 \
                 UNION ALL \
                 (SELECT DISTINCT ON (subsystem) subsystem, 1::int8, \
                         latest_lines_covered::numeric, latest_lines_total::numeric, \
                         latest_branches_covered::numeric, latest_branches_total::numeric, \
                         latest_functions_covered::numeric, latest_functions_total::numeric \
                  FROM matching WHERE $3 \
                  ORDER BY subsystem, latest_recorded_at DESC, latest_id DESC)) \
             SELECT GROUPING(subsystem) = 1, subsystem, COALESCE(sum(n), 0)::int8, \
                    LEAST(COALESCE(sum(lc), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(lt), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(bc), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(bt), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(fc), 0), 9223372036854775807)::int8, \
                    LEAST(COALESCE(sum(ft), 0), 9223372036854775807)::int8 \
             FROM chosen GROUP BY ROLLUP (subsystem) \
             ORDER BY GROUPING(subsystem) DESC, subsystem"
        )
    };
}

pub const AGGREGATE_DAYS: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    aggregate_days_sql!(" AND $1::text IS NULL AND $2::text IS NULL"),
);
pub const AGGREGATE_DAYS_BRANCH: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    aggregate_days_sql!(" AND branch = $1 AND $2::text IS NULL"),
);
pub const AGGREGATE_DAYS_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    aggregate_days_sql!(" AND $1::text IS NULL AND subsystem = $2"),
);
pub const AGGREGATE_DAYS_BRANCH_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    aggregate_days_sql!(" AND branch = $1 AND subsystem = $2"),
);

/// The pooled counters of every matching report of `project` (first,
/// subsystem `None`), then per subsystem in subsystem order.
pub async fn aggregate(
    c: &impl GenericClient,
    project: Uuid,
    q: &AggregateQuery,
) -> Result<Vec<Pooled>> {
    let (labels, label_keys) = q.labels.params();
    let rows = if labels.is_none() && label_keys.is_none() && q.from.is_none() && q.to.is_none() {
        let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] =
            &[&q.branch, &q.subsystem, &q.latest_per_subsystem, &project];
        match (&q.branch, &q.subsystem) {
            (None, None) => AGGREGATE_DAYS.query(c, params).await?,
            (Some(_), None) => AGGREGATE_DAYS_BRANCH.query(c, params).await?,
            (None, Some(_)) => AGGREGATE_DAYS_SUBSYSTEM.query(c, params).await?,
            (Some(_), Some(_)) => AGGREGATE_DAYS_BRANCH_SUBSYSTEM.query(c, params).await?,
        }
    } else {
        aggregate_reports(c, project, q, labels, label_keys).await?
    };
    rows.iter()
        .map(|r| {
            let overall: bool = r.try_get(0)?;
            Ok(Pooled {
                subsystem: if overall { None } else { r.try_get(1)? },
                report_count: r.try_get(2)?,
                counters: counters_at(r, 3)?,
            })
        })
        .collect()
}

/// The aggregate read from the reports themselves (a label filter or a
/// recorded range).
async fn aggregate_reports(
    c: &impl GenericClient,
    project: Uuid,
    q: &AggregateQuery,
    labels: Option<serde_json::Value>,
    label_keys: Option<&[String]>,
) -> Result<Vec<Row>> {
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &q.branch,
        &q.subsystem,
        &q.from,
        &q.to,
        &q.latest_per_subsystem,
        &project,
        &labels,
        &label_keys,
    ];
    let rows = match (&q.branch, &q.subsystem) {
        (None, None) => AGGREGATE.query(c, params).await?,
        (Some(_), None) => AGGREGATE_BRANCH.query(c, params).await?,
        (None, Some(_)) => AGGREGATE_SUBSYSTEM.query(c, params).await?,
        (Some(_), Some(_)) => AGGREGATE_BRANCH_SUBSYSTEM.query(c, params).await?,
    };
    Ok(rows)
}

/// One bucket of a trend.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub report_count: i64,
    pub counters: Counters,
}

// The trend's last step, shared by both sources: every bucket (kept by the
// LEFT JOIN) with its latest reports' count and summed counters, capped at
// the int8 range.
macro_rules! trend_totals {
    () => {
        "SELECT k.bucket_start, k.bucket_end, count(l.bucket_start), \
                LEAST(COALESCE(sum(l.lines_covered), 0), 9223372036854775807)::int8, \
                LEAST(COALESCE(sum(l.lines_total), 0), 9223372036854775807)::int8, \
                LEAST(COALESCE(sum(l.branches_covered), 0), 9223372036854775807)::int8, \
                LEAST(COALESCE(sum(l.branches_total), 0), 9223372036854775807)::int8, \
                LEAST(COALESCE(sum(l.functions_covered), 0), 9223372036854775807)::int8, \
                LEAST(COALESCE(sum(l.functions_total), 0), 9223372036854775807)::int8 \
         FROM buckets k LEFT JOIN latest l ON l.bucket_start = k.bucket_start \
         GROUP BY k.bucket_start, k.bucket_end ORDER BY k.bucket_start"
    };
}

// Buckets are computed in UTC wall time (timestamp without time zone), so the
// session's TimeZone and DST never shift or stretch them; every bucket of the
// series is kept by the LEFT JOIN, with or without reports.
macro_rules! trend_sql {
    ($filter:literal) => {
        concat!(
            "WITH buckets AS ( \
                 SELECT b AT TIME ZONE 'UTC' AS bucket_start, \
                        (b + make_interval(days => $4)) AT TIME ZONE 'UTC' AS bucket_end \
                 FROM generate_series(date_trunc($3, $5::timestamptz AT TIME ZONE 'UTC'), \
                                      date_trunc($3, $6::timestamptz AT TIME ZONE 'UTC'), \
                                      make_interval(days => $4)) AS b), \
             latest AS ( \
                 SELECT DISTINCT ON (k.bucket_start, r.branch, r.subsystem) k.bucket_start, \
                        r.lines_covered, r.lines_total, r.branches_covered, r.branches_total, \
                        r.functions_covered, r.functions_total \
                 FROM buckets k JOIN coverage_reports r \
                   ON r.recorded_at >= k.bucket_start AND r.recorded_at < k.bucket_end \
                 WHERE r.project_id = $7 \
                   AND ($8::jsonb IS NULL OR r.labels @> $8) \
                   AND ($9::text[] IS NULL OR r.labels ?& $9)",
            $filter,
            " ORDER BY k.bucket_start, r.branch, r.subsystem, r.recorded_at DESC, r.id DESC) ",
            trend_totals!()
        )
    };
}

// One constant statement per filter shape, as AGGREGATE.
pub const TREND: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    trend_sql!(" AND $1::text IS NULL AND $2::text IS NULL"),
);
pub const TREND_BRANCH: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    trend_sql!(" AND r.branch = $1 AND $2::text IS NULL"),
);
pub const TREND_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    trend_sql!(" AND $1::text IS NULL AND r.subsystem = $2"),
);
pub const TREND_BRANCH_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    trend_sql!(" AND r.branch = $1 AND r.subsystem = $2"),
);

// Without a label filter the trend reads coverage_report_days (V37): a
// bucket's latest report per branch and subsystem is the latest of its
// days' latest (buckets are whole UTC days: a day or a Monday-aligned week).
// A bucket costs its (branch, subsystem, day) rows, not its reports.
macro_rules! trend_days_sql {
    ($filter:literal) => {
        concat!(
            "WITH buckets AS ( \
                 SELECT b AT TIME ZONE 'UTC' AS bucket_start, \
                        (b + make_interval(days => $4)) AT TIME ZONE 'UTC' AS bucket_end, \
                        b::date AS first_day, (b + make_interval(days => $4))::date AS end_day \
                 FROM generate_series(date_trunc($3, $5::timestamptz AT TIME ZONE 'UTC'), \
                                      date_trunc($3, $6::timestamptz AT TIME ZONE 'UTC'), \
                                      make_interval(days => $4)) AS b), \
             latest AS ( \
                 SELECT DISTINCT ON (k.bucket_start, d.branch, d.subsystem) k.bucket_start, \
                        d.latest_lines_covered AS lines_covered, \
                        d.latest_lines_total AS lines_total, \
                        d.latest_branches_covered AS branches_covered, \
                        d.latest_branches_total AS branches_total, \
                        d.latest_functions_covered AS functions_covered, \
                        d.latest_functions_total AS functions_total \
                 FROM buckets k JOIN coverage_report_days d \
                   ON d.day >= k.first_day AND d.day < k.end_day \
                 WHERE d.project_id = $7",
            $filter,
            " ORDER BY k.bucket_start, d.branch, d.subsystem, d.latest_recorded_at DESC, \
                       d.latest_id DESC) ",
            trend_totals!()
        )
    };
}

pub const TREND_DAYS: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    trend_days_sql!(" AND $1::text IS NULL AND $2::text IS NULL"),
);
pub const TREND_DAYS_BRANCH: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    trend_days_sql!(" AND d.branch = $1 AND $2::text IS NULL"),
);
pub const TREND_DAYS_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    trend_days_sql!(" AND $1::text IS NULL AND d.subsystem = $2"),
);
pub const TREND_DAYS_BRANCH_SUBSYSTEM: Stmt = Stmt::new(
    "SELECT",
    "coverage_report_days",
    trend_days_sql!(" AND d.branch = $1 AND d.subsystem = $2"),
);

/// Every bucket of a trend of `project`'s reports, oldest first, empty ones
/// included.
pub async fn trend(c: &impl GenericClient, project: Uuid, q: &TrendQuery) -> Result<Vec<Bucket>> {
    let (labels, label_keys) = q.labels.params();
    let rows = if labels.is_none() && label_keys.is_none() {
        let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
            &q.branch,
            &q.subsystem,
            &q.unit,
            &q.step_days,
            &q.start,
            &q.end,
            &project,
        ];
        match (&q.branch, &q.subsystem) {
            (None, None) => TREND_DAYS.query(c, params).await?,
            (Some(_), None) => TREND_DAYS_BRANCH.query(c, params).await?,
            (None, Some(_)) => TREND_DAYS_SUBSYSTEM.query(c, params).await?,
            (Some(_), Some(_)) => TREND_DAYS_BRANCH_SUBSYSTEM.query(c, params).await?,
        }
    } else {
        trend_reports(c, project, q, labels, label_keys).await?
    };
    rows.iter()
        .map(|r| {
            Ok(Bucket {
                start: r.try_get(0)?,
                end: r.try_get(1)?,
                report_count: r.try_get(2)?,
                counters: counters_at(r, 3)?,
            })
        })
        .collect()
}

/// The trend read from the reports themselves (a label filter).
async fn trend_reports(
    c: &impl GenericClient,
    project: Uuid,
    q: &TrendQuery,
    labels: Option<serde_json::Value>,
    label_keys: Option<&[String]>,
) -> Result<Vec<Row>> {
    let params: &[&(dyn tokio_postgres::types::ToSql + Sync)] = &[
        &q.branch,
        &q.subsystem,
        &q.unit,
        &q.step_days,
        &q.start,
        &q.end,
        &project,
        &labels,
        &label_keys,
    ];
    let rows = match (&q.branch, &q.subsystem) {
        (None, None) => TREND.query(c, params).await?,
        (Some(_), None) => TREND_BRANCH.query(c, params).await?,
        (None, Some(_)) => TREND_SUBSYSTEM.query(c, params).await?,
        (Some(_), Some(_)) => TREND_BRANCH_SUBSYSTEM.query(c, params).await?,
    };
    Ok(rows)
}

/// How a file differs between two reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// One differing file.
#[derive(Debug, Clone, PartialEq)]
pub struct FileDiff {
    pub path: String,
    pub change: Change,
    pub base: Option<Counters>,
    pub head: Option<Counters>,
}

/// Counts of differing files, over every file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffCounts {
    pub added: i64,
    pub removed: i64,
    pub changed: i64,
}

const FILE_DIFF: Stmt = Stmt::new(
    "SELECT",
    "coverage_files",
    "WITH b AS (SELECT * FROM coverage_files WHERE project_id = $4 AND report_id = $1), \
          h AS (SELECT * FROM coverage_files WHERE project_id = $4 AND report_id = $2), \
          diff AS ( \
         SELECT COALESCE(b.path, h.path) AS path, \
                b.lines_covered AS b_lc, b.lines_total AS b_lt, b.branches_covered AS b_bc, \
                b.branches_total AS b_bt, b.functions_covered AS b_fc, b.functions_total AS b_ft, \
                h.lines_covered AS h_lc, h.lines_total AS h_lt, h.branches_covered AS h_bc, \
                h.branches_total AS h_bt, h.functions_covered AS h_fc, h.functions_total AS h_ft \
         FROM b FULL JOIN h ON b.path = h.path \
         WHERE b.path IS NULL OR h.path IS NULL \
            OR (b.lines_covered, b.lines_total, b.branches_covered, b.branches_total, \
                b.functions_covered, b.functions_total) \
               IS DISTINCT FROM (h.lines_covered, h.lines_total, h.branches_covered, \
                h.branches_total, h.functions_covered, h.functions_total)) \
     SELECT path, b_lc, b_lt, b_bc, b_bt, b_fc, b_ft, h_lc, h_lt, h_bc, h_bt, h_fc, h_ft, \
            count(*) FILTER (WHERE b_lc IS NULL) OVER (), \
            count(*) FILTER (WHERE h_lc IS NULL) OVER (), \
            count(*) FILTER (WHERE b_lc IS NOT NULL AND h_lc IS NOT NULL) OVER () \
     FROM diff ORDER BY path LIMIT $3",
);

/// The files that differ between two reports of `project`, in path order
/// (at most `limit`), and the counts over every differing file.
pub async fn file_diff(
    c: &impl GenericClient,
    project: Uuid,
    base: Uuid,
    head: Uuid,
    limit: i64,
) -> Result<(Vec<FileDiff>, DiffCounts)> {
    let rows = FILE_DIFF
        .query(c, &[&base, &head, &limit, &project])
        .await?;
    let counts = match rows.first() {
        Some(r) => DiffCounts {
            added: r.try_get(13)?,
            removed: r.try_get(14)?,
            changed: r.try_get(15)?,
        },
        None => DiffCounts::default(),
    };
    let files = rows
        .iter()
        .map(|r| {
            let base = optional_counters_at(r, 1)?;
            let head = optional_counters_at(r, 7)?;
            let change = match (&base, &head) {
                (None, _) => Change::Added,
                (_, None) => Change::Removed,
                _ => Change::Changed,
            };
            Ok(FileDiff {
                path: r.try_get(0)?,
                change,
                base,
                head,
            })
        })
        .collect::<Result<_>>()?;
    Ok((files, counts))
}

const REPORTS_OF_SESSION: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    concat!(
        "SELECT ",
        report_columns!(),
        " FROM coverage_reports WHERE project_id = $4 AND session_id = $1 \
          AND ($2::uuid IS NULL OR id > $2) ORDER BY id LIMIT $3"
    ),
);

/// Coverage reports of a session of `project` in id order after `after`,
/// for exports.
pub async fn reports_of_session(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Report>> {
    REPORTS_OF_SESSION
        .query(c, &[&session_id, &after, &limit, &project])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

const FILES_OF_SESSION: Stmt = Stmt::new(
    "SELECT",
    "coverage_files",
    "SELECT f.report_id, f.path, f.lines_covered, f.lines_total, f.branches_covered, \
            f.branches_total, f.functions_covered, f.functions_total \
     FROM coverage_files f \
     JOIN coverage_reports r ON r.project_id = f.project_id AND r.id = f.report_id \
     WHERE f.project_id = $5 AND r.project_id = $5 AND r.session_id = $1 AND ($2::uuid IS NULL OR (f.report_id, f.path) > ($2, $3)) \
     ORDER BY f.report_id, f.path LIMIT $4",
);

/// Per-file rows of the reports of a session of `project` after a
/// position, for exports.
pub async fn files_of_session(
    c: &impl GenericClient,
    project: Uuid,
    session_id: Uuid,
    after: Option<(Uuid, String)>,
    limit: i64,
) -> Result<Vec<(Uuid, String, Counters)>> {
    let (after_report, after_path) = match &after {
        Some((r, p)) => (Some(*r), p.as_str()),
        None => (None, ""),
    };
    FILES_OF_SESSION
        .query(
            c,
            &[&session_id, &after_report, &after_path, &limit, &project],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, counters_at(r, 2)?)))
        .collect()
}
