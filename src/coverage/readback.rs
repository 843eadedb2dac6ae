//! Reading stored coverage back: one report by id, its files page by page,
//! and the reports of a project filtered and paged (GetCoverageReport,
//! ListCoverageFiles, ListCoverageReports).

use super::sql::{counters_at, from_row};
use super::{MAX_BRANCH, Report, commit_sha};
use crate::db::Stmt;
use crate::error::Result;
use crate::pagination;
use crate::proto;
use crate::test_cases::MAX_SUBSYSTEM;
use crate::totals::{Counter, Mode, Total};
use crate::validate::Validator;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

const BY_ID: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    concat!(
        "SELECT ",
        report_columns!(),
        " FROM coverage_reports WHERE project_id = $1 AND id = $2"
    ),
);

/// Report `id` of `project`, if it has one.
pub async fn get(c: &impl GenericClient, project: Uuid, id: Uuid) -> Result<Option<Report>> {
    BY_ID
        .query_opt(c, &[&project, &id])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// A validated ListCoverageFiles call.
#[derive(Debug, Clone)]
pub struct ListFiles {
    pub report_id: Uuid,
    pub page_size: i64,
    /// The path of the last file of the previous page.
    pub after: Option<String>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListCoverageFilesRequest> for ListFiles {
    type Error = crate::error::Error;

    fn try_from(r: proto::ListCoverageFilesRequest) -> Result<Self> {
        let mut v = Validator::new();
        let report_id = v.uuid("report_id", &r.report_id);
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint("coverage_files", &report_id);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListFiles {
            report_id,
            page_size,
            after,
            fingerprint,
        })
    }
}

const LIST_FILES: Stmt = Stmt::new(
    "SELECT",
    "coverage_files",
    "SELECT path, lines_covered, lines_total, branches_covered, branches_total, \
            functions_covered, functions_total \
     FROM coverage_files \
     WHERE project_id = $1 AND report_id = $2 AND ($3::text IS NULL OR path > $3) \
     ORDER BY path LIMIT $4",
);

/// The total of ListCoverageFiles: every file of the report.
const COUNT_FILES: Counter = crate::counter!(
    "coverage_files",
    "coverage_files WHERE project_id = $1 AND report_id = $2"
);

/// One page of the files of a report of `project` in path order, plus one
/// extra row when more follow.
pub async fn list_files(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListFiles,
) -> Result<Vec<proto::FileCoverage>> {
    LIST_FILES
        .query(c, &[&project, &q.report_id, &q.after, &(q.page_size + 1)])
        .await?
        .iter()
        .map(|r| {
            Ok(proto::FileCoverage {
                path: r.try_get(0)?,
                counters: Some(counters_at(r, 1)?.into()),
            })
        })
        .collect()
}

/// How many files the report has, counted as `mode` asks.
pub async fn count_files(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListFiles,
    mode: Mode,
    exact_below: i64,
) -> Result<Total> {
    crate::totals::count(
        c,
        &COUNT_FILES,
        &[&project, &q.report_id],
        mode,
        exact_below,
    )
    .await
}

/// The filters of ListCoverageReports; serialised into the page-token
/// fingerprint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReportFilter {
    pub commit_sha: Option<String>,
    pub branch: Option<String>,
    pub subsystem: Option<String>,
    pub session_id: Option<Uuid>,
    pub recorded_from: Option<DateTime<Utc>>,
    pub recorded_to: Option<DateTime<Utc>>,
    #[serde(flatten)]
    pub labels: crate::labels::LabelFilter,
}

/// A validated ListCoverageReports call.
#[derive(Debug, Clone)]
pub struct ListReports {
    pub filter: ReportFilter,
    pub page_size: i64,
    /// Newest-first position: (recorded_at in microseconds, id).
    pub after: Option<(i64, Uuid)>,
    pub fingerprint: String,
}

impl TryFrom<proto::ListCoverageReportsRequest> for ListReports {
    type Error = crate::error::Error;

    fn try_from(r: proto::ListCoverageReportsRequest) -> Result<Self> {
        let mut v = Validator::new();
        let (recorded_from, recorded_to) = v.time_range("recorded", r.recorded.as_ref());
        let filter = ReportFilter {
            commit_sha: (!r.commit_sha.is_empty())
                .then(|| commit_sha(&mut v, "commit_sha", &r.commit_sha)),
            branch: v.optional_text("branch", &r.branch, MAX_BRANCH),
            // Set but empty is a filter too: the whole code base's reports.
            subsystem: r.subsystem.as_ref().map(|s| {
                v.optional_text("subsystem", s, MAX_SUBSYSTEM)
                    .unwrap_or_default()
            }),
            session_id: v.optional_uuid("session_id", &r.session_id),
            recorded_from,
            recorded_to,
            labels: crate::labels::LabelFilter::validate(&mut v, &r.labels, &r.label_keys),
        };
        let page_size = v.page_size("page_size", r.page_size);
        v.finish()?;
        let fingerprint = pagination::fingerprint("coverage_reports", &filter);
        let after = pagination::decode("page_token", &r.page_token, &fingerprint)?;
        Ok(ListReports {
            filter,
            page_size,
            after,
            fingerprint,
        })
    }
}

const LIST_REPORTS: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    concat!(
        "SELECT ",
        report_columns!(),
        " FROM coverage_reports \
         WHERE project_id = $1 \
           AND ($2::text IS NULL OR commit_sha = $2) \
           AND ($3::text IS NULL OR branch = $3) \
           AND ($4::text IS NULL OR subsystem = $4) \
           AND ($5::uuid IS NULL OR session_id = $5) \
           AND ($6::timestamptz IS NULL OR recorded_at >= $6) \
           AND ($7::timestamptz IS NULL OR recorded_at < $7) \
           AND ($8::timestamptz IS NULL OR (recorded_at, id) < ($8, $9)) \
           AND ($11::jsonb IS NULL OR labels @> $11) \
           AND ($12::text[] IS NULL OR labels ?& $12) \
         ORDER BY recorded_at DESC, id DESC LIMIT $10"
    ),
);

/// The total of ListCoverageReports: LIST_REPORTS's filters, without paging.
const COUNT_REPORTS: Counter = crate::counter!(
    "coverage_reports",
    "coverage_reports \
     WHERE project_id = $1 \
       AND ($2::text IS NULL OR commit_sha = $2) \
       AND ($3::text IS NULL OR branch = $3) \
       AND ($4::text IS NULL OR subsystem = $4) \
       AND ($5::uuid IS NULL OR session_id = $5) \
       AND ($6::timestamptz IS NULL OR recorded_at >= $6) \
       AND ($7::timestamptz IS NULL OR recorded_at < $7) \
       AND ($8::jsonb IS NULL OR labels @> $8) \
       AND ($9::text[] IS NULL OR labels ?& $9)"
);

/// One page of `project`'s reports, newest first, plus one extra row when
/// more follow.
pub async fn list_reports(
    c: &impl GenericClient,
    project: Uuid,
    q: &ListReports,
) -> Result<Vec<Report>> {
    let f = &q.filter;
    let (after_at, after_id) = pagination::time_key(q.after)?;
    let limit = q.page_size + 1;
    let (labels, label_keys) = f.labels.params();
    let params: &[&(dyn ToSql + Sync)] = &[
        &project,
        &f.commit_sha,
        &f.branch,
        &f.subsystem,
        &f.session_id,
        &f.recorded_from,
        &f.recorded_to,
        &after_at,
        &after_id,
        &limit,
        &labels,
        &label_keys,
    ];
    LIST_REPORTS
        .query(c, params)
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// How many of `project`'s reports pass `f`, counted as `mode` asks.
pub async fn count_reports(
    c: &impl GenericClient,
    project: Uuid,
    f: &ReportFilter,
    mode: Mode,
    exact_below: i64,
) -> Result<Total> {
    let (labels, label_keys) = f.labels.params();
    let params: &[&(dyn ToSql + Sync)] = &[
        &project,
        &f.commit_sha,
        &f.branch,
        &f.subsystem,
        &f.session_id,
        &f.recorded_from,
        &f.recorded_to,
        &labels,
        &label_keys,
    ];
    crate::totals::count(c, &COUNT_REPORTS, params, mode, exact_below).await
}

/// The keyset position of a report in the newest-first order.
pub fn report_key(r: &Report) -> (i64, Uuid) {
    (r.recorded_at.timestamp_micros(), r.id)
}
