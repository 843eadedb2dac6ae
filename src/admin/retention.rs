//! Retention of every kind of data, per project: a gateway-wide default per
//! kind (`VERDICT_RETENTION_<KIND>_DAYS`, 0 keeps it forever) that a project
//! may override (`projects.retention_<kind>_days`, NULL inherits).
//!
//! Rows are deleted in bounded batches, each its own short transaction with
//! a `lock_timeout`, oldest first, through indexes that lead with
//! `(project_id, <the kind's time>)`: a batch never holds a lock for long,
//! never blocks a reader (PostgreSQL's readers do not wait for deleters) and
//! a run cut short (a terminated backend, a shutdown) loses only its current
//! batch's work, which the next run does again.
//!
//! The periodic job ([`run_periodically`]) applies every kind to every
//! project, one replica at a time (a session-level advisory lock on a
//! connection of its own). The Cleanup RPC and `verdict cleanup` apply every
//! kind but the audit trail within their project ([`apply`] with
//! `audit: false`): audit events are deleted only by the job.

use super::cleanup;
use crate::call::Call;
use crate::db::{Conn, Db, PgConfig, Stmt};
use crate::error::{Error, Reason, Result};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use std::time::Duration;
use tracing::Instrument as _;
use uuid::Uuid;

/// A kind of data with a retention of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Sessions by creation time, with everything of theirs (logs, results,
    /// discrepancies and their history, executions, coverage).
    Sessions,
    /// Test executions of no session and no run, by start time.
    Executions,
    /// Coverage reports of no session (with their files), by recorded time.
    Coverage,
    /// Test runs by start time, with their executions.
    TestRuns,
    /// Metric points by recorded time.
    MetricPoints,
    /// Validation rollups by period start.
    MetricRollups,
    /// Audit events by time; only the periodic job deletes them.
    AuditEvents,
    /// Ingest bookkeeping (batch ids and stream marks) by commit time: the
    /// window in which a retried batch or a resumed stream is recognised.
    Ingest,
    /// Discrepancy resolution history by change time (the discrepancies
    /// keep their current resolution).
    Resolutions,
}

impl Kind {
    /// Every kind, in the order a run applies them (and reports use).
    pub const ALL: [Kind; 9] = [
        Kind::Sessions,
        Kind::Executions,
        Kind::Coverage,
        Kind::TestRuns,
        Kind::MetricPoints,
        Kind::MetricRollups,
        Kind::Ingest,
        Kind::Resolutions,
        Kind::AuditEvents,
    ];

    /// The kind's name in settings (`VERDICT_RETENTION_<NAME>_DAYS`,
    /// upper-cased) and reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sessions => "sessions",
            Kind::Executions => "executions",
            Kind::Coverage => "coverage",
            Kind::TestRuns => "test_runs",
            Kind::MetricPoints => "metric_points",
            Kind::MetricRollups => "metric_rollups",
            Kind::AuditEvents => "audit_events",
            Kind::Ingest => "ingest",
            Kind::Resolutions => "resolutions",
        }
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).expect("listed")
    }
}

/// Retention in days of every kind, in [`Kind::ALL`] order; `None`
/// inherits (in a project's overrides) and 0 keeps forever.
pub type Days = [Option<i32>; 9];

/// Longest retention accepted, in days: a century of 366-day years.
pub const MAX_DAYS: i32 = 36_600;

/// The gateway's retention settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Default days per kind ([`Kind::ALL`] order); 0 keeps forever.
    pub defaults: [i32; 9],
    /// Most rows one batch (one transaction) deletes.
    pub batch_size: i64,
    /// `lock_timeout` of every batch: a batch that would wait longer for a
    /// row lock gives up and is tried again.
    pub lock_timeout: Duration,
    /// How often the periodic job runs; `None`: never.
    pub interval: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            defaults: [0; 9],
            batch_size: 1_000,
            lock_timeout: Duration::from_secs(1),
            interval: None,
        }
    }
}

impl Settings {
    /// The retention of `kind` in a project with `overrides`: `None` keeps
    /// forever.
    pub fn effective(&self, overrides: &Days, kind: Kind) -> Option<i32> {
        let i = kind.index();
        let days = overrides[i].unwrap_or(self.defaults[i]);
        (days > 0).then_some(days)
    }

    /// Every kind's effective retention in days (0: forever).
    pub fn effective_days(&self, overrides: &Days) -> [i32; 9] {
        let mut out = [0; 9];
        for kind in Kind::ALL {
            out[kind.index()] = self.effective(overrides, kind).unwrap_or(0);
        }
        out
    }
}

/// What a retention run did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Rows per table, tables of kinds with a retention only.
    pub deleted: Vec<(&'static str, i64)>,
    /// Transactions used.
    pub batches: i64,
    /// Most rows one transaction deleted.
    pub largest_batch: i64,
}

impl Report {
    fn add(&mut self, table: &'static str, rows: i64) {
        match self.deleted.iter_mut().find(|(t, _)| *t == table) {
            Some((_, n)) => *n += rows,
            None => self.deleted.push((table, rows)),
        }
    }

    /// Rows deleted from `table`.
    pub fn rows(&self, table: &str) -> i64 {
        self.deleted
            .iter()
            .find(|(t, _)| *t == table)
            .map_or(0, |(_, n)| *n)
    }
}

const SET_LOCK_TIMEOUT: Stmt = Stmt::new(
    "SELECT",
    "set_config",
    "SELECT set_config('lock_timeout', $1, true)",
);
/// Lets this transaction (only) delete audit events: see the trigger of V12.
const ALLOW_AUDIT_DELETE: Stmt = Stmt::new(
    "SELECT",
    "set_config",
    "SELECT set_config('verdict.audit_retention', 'on', true)",
);

// Every delete names the project, picks its oldest expired rows through an
// index leading with (project_id, time), at most $3 of them, and repeats
// the expiry test on the rows it deletes (a row changed meanwhile is kept).
// $1 project, $2 cutoff, $3 batch size.

const DELETE_EXECUTIONS: Stmt = Stmt::new(
    "DELETE",
    "test_executions",
    "DELETE FROM test_executions WHERE project_id = $1 AND id = ANY(ARRAY( \
         SELECT id FROM test_executions WHERE project_id = $1 AND session_id IS NULL \
         AND run_id IS NULL AND started_at < $2 ORDER BY started_at LIMIT $3)) \
     AND session_id IS NULL AND run_id IS NULL AND started_at < $2",
);

/// Reports of no session, oldest first, as many as fit `$3` rows with
/// their files (at least one, whatever its size).
const PICK_COVERAGE: Stmt = Stmt::new(
    "SELECT",
    "coverage_reports",
    "SELECT id FROM ( \
         SELECT id, sum(file_count + 1) OVER (ORDER BY recorded_at, id) AS running, \
                row_number() OVER (ORDER BY recorded_at, id) AS n \
         FROM (SELECT id, file_count, recorded_at FROM coverage_reports \
               WHERE project_id = $1 AND session_id IS NULL AND recorded_at < $2 \
               ORDER BY recorded_at LIMIT $3) oldest) picked \
     WHERE running <= $3 OR n = 1",
);
const DELETE_COVERAGE_FILES: Stmt = Stmt::new(
    "DELETE",
    "coverage_files",
    "DELETE FROM coverage_files WHERE project_id = $1 AND report_id = ANY($2)",
);
const DELETE_COVERAGE_REPORTS: Stmt = Stmt::new(
    "DELETE",
    "coverage_reports",
    "DELETE FROM coverage_reports WHERE project_id = $1 AND id = ANY($2) AND session_id IS NULL",
);

/// Executions of expired runs first (a run of 100,000 executions is many
/// batches), then the runs.
const DELETE_RUN_EXECUTIONS: Stmt = Stmt::new(
    "DELETE",
    "test_executions",
    "DELETE FROM test_executions WHERE project_id = $1 AND id = ANY(ARRAY( \
         SELECT e.id FROM test_runs r JOIN test_executions e ON e.run_id = r.id \
         WHERE r.project_id = $1 AND r.started_at < $2 LIMIT $3))",
);
const DELETE_RUNS: Stmt = Stmt::new(
    "DELETE",
    "test_runs",
    "DELETE FROM test_runs WHERE project_id = $1 AND id = ANY(ARRAY( \
         SELECT id FROM test_runs WHERE project_id = $1 AND started_at < $2 \
         ORDER BY started_at LIMIT $3)) AND started_at < $2",
);

const DELETE_METRIC_POINTS: Stmt = Stmt::new(
    "DELETE",
    "metric_points",
    "DELETE FROM metric_points WHERE project_id = $1 AND id = ANY(ARRAY( \
         SELECT id FROM metric_points WHERE project_id = $1 AND recorded_at < $2 \
         ORDER BY recorded_at LIMIT $3)) AND recorded_at < $2",
);

const DELETE_METRIC_ROLLUPS: Stmt = Stmt::new(
    "DELETE",
    "metric_rollups",
    "DELETE FROM metric_rollups WHERE project_id = $1 AND (period, period_start) IN ( \
         SELECT period, period_start FROM metric_rollups WHERE project_id = $1 \
         AND period_start < $2 LIMIT $3)",
);

/// The project's oldest `$3` events by id (ids follow time), those of them
/// older than the cutoff: a batch reads no more than it may delete, and
/// the run stops at the first batch that deletes nothing.
const DELETE_AUDIT: Stmt = Stmt::new(
    "DELETE",
    "audit_events",
    "DELETE FROM audit_events WHERE project_id = $1 AND at < $2 AND id = ANY(ARRAY( \
         SELECT id FROM audit_events WHERE project_id = $1 ORDER BY id LIMIT $3))",
);

const DELETE_INGEST_BATCHES: Stmt = Stmt::new(
    "DELETE",
    "ingest_batches",
    "DELETE FROM ingest_batches WHERE ctid = ANY(ARRAY( \
         SELECT ctid FROM ingest_batches WHERE project_id = $1 AND committed_at < $2 \
         ORDER BY committed_at LIMIT $3)) AND project_id = $1 AND committed_at < $2",
);
const DELETE_INGEST_MARKS: Stmt = Stmt::new(
    "DELETE",
    "ingest_marks",
    "DELETE FROM ingest_marks WHERE ctid = ANY(ARRAY( \
         SELECT ctid FROM ingest_marks WHERE project_id = $1 AND updated_at < $2 \
         ORDER BY updated_at LIMIT $3)) AND project_id = $1 AND updated_at < $2",
);

const DELETE_RESOLUTIONS: Stmt = Stmt::new(
    "DELETE",
    "discrepancy_resolutions",
    "DELETE FROM discrepancy_resolutions WHERE ctid = ANY(ARRAY( \
         SELECT ctid FROM discrepancy_resolutions WHERE project_id = $1 AND changed_at < $2 \
         ORDER BY changed_at LIMIT $3)) AND project_id = $1 AND changed_at < $2",
);

/// What a run of each kind (sessions aside) would delete: $1 project and
/// one cutoff per kind, NULL for a kind kept forever (counts 0).
const COUNT: Stmt = Stmt::new(
    "SELECT",
    "test_executions",
    "SELECT \
       (SELECT count(*) FROM test_executions WHERE project_id = $1 AND session_id IS NULL \
        AND run_id IS NULL AND started_at < $2), \
       (SELECT count(*) FROM coverage_files f JOIN coverage_reports r \
          ON r.project_id = f.project_id AND r.id = f.report_id \
        WHERE f.project_id = $1 AND r.session_id IS NULL AND r.recorded_at < $3), \
       (SELECT count(*) FROM coverage_reports WHERE project_id = $1 AND session_id IS NULL \
        AND recorded_at < $3), \
       (SELECT count(*) FROM test_executions e JOIN test_runs r ON e.run_id = r.id \
        WHERE r.project_id = $1 AND r.started_at < $4), \
       (SELECT count(*) FROM test_runs WHERE project_id = $1 AND started_at < $4), \
       (SELECT count(*) FROM metric_points WHERE project_id = $1 AND recorded_at < $5), \
       (SELECT count(*) FROM metric_rollups WHERE project_id = $1 AND period_start < $6), \
       (SELECT count(*) FROM ingest_batches WHERE project_id = $1 AND committed_at < $7), \
       (SELECT count(*) FROM ingest_marks WHERE project_id = $1 AND updated_at < $7), \
       (SELECT count(*) FROM discrepancy_resolutions WHERE project_id = $1 AND changed_at < $8)",
);

/// The cutoff of a retention of `days` days as of `now`.
pub fn cutoff(now: DateTime<Utc>, days: i32) -> DateTime<Utc> {
    now - chrono::Duration::days(i64::from(days))
}

/// Counts what [`apply`] (without the audit trail and sessions) would
/// delete in `project` with `overrides`.
pub async fn dry_run(
    c: &impl GenericClient,
    settings: &Settings,
    project: Uuid,
    overrides: &Days,
    now: DateTime<Utc>,
) -> Result<Report> {
    let at = |kind| {
        settings
            .effective(overrides, kind)
            .map(|days| cutoff(now, days))
    };
    let (executions, coverage, runs, points, rollups, ingest, resolutions) = (
        at(Kind::Executions),
        at(Kind::Coverage),
        at(Kind::TestRuns),
        at(Kind::MetricPoints),
        at(Kind::MetricRollups),
        at(Kind::Ingest),
        at(Kind::Resolutions),
    );
    let row = COUNT
        .query_one(
            c,
            &[
                &project,
                &executions,
                &coverage,
                &runs,
                &points,
                &rollups,
                &ingest,
                &resolutions,
            ],
        )
        .await?;
    let mut report = Report::default();
    let columns: [(Kind, &'static str, usize); 10] = [
        (Kind::Executions, "test_executions", 0),
        (Kind::Coverage, "coverage_files", 1),
        (Kind::Coverage, "coverage_reports", 2),
        (Kind::TestRuns, "test_executions", 3),
        (Kind::TestRuns, "test_runs", 4),
        (Kind::MetricPoints, "metric_points", 5),
        (Kind::MetricRollups, "metric_rollups", 6),
        (Kind::Ingest, "ingest_batches", 7),
        (Kind::Ingest, "ingest_marks", 8),
        (Kind::Resolutions, "discrepancy_resolutions", 9),
    ];
    for (kind, table, i) in columns {
        if settings.effective(overrides, kind).is_some() {
            report.add(table, row.try_get(i)?);
        }
    }
    Ok(report)
}

/// Runs `step` ($1 project, $2 cutoff, $3 batch) in transactions of its
/// own until it deletes fewer rows than a batch; a batch that times out on
/// a lock (or conflicts) is tried again a few times.
#[allow(clippy::too_many_arguments)]
async fn drain(
    conn: &mut Conn,
    settings: &Settings,
    step: &Stmt,
    audit: bool,
    project: Uuid,
    cutoff: DateTime<Utc>,
    table: &'static str,
    report: &mut Report,
) -> Result<()> {
    let lock_timeout = format!("{}ms", settings.lock_timeout.as_millis().max(1));
    let mut conflicts = 0;
    loop {
        let done = async {
            let tx = conn.begin().await?;
            SET_LOCK_TIMEOUT.query_one(&tx, &[&lock_timeout]).await?;
            if audit {
                ALLOW_AUDIT_DELETE.query_one(&tx, &[]).await?;
            }
            let n = Stmt::execute(step, &tx, &[&project, &cutoff, &settings.batch_size]).await?;
            tx.commit().await.map_err(Error::from)?;
            Ok::<_, Error>(n as i64)
        }
        .await;
        let n = match done {
            Ok(n) => n,
            Err(Error::Aborted(Reason::ConcurrentChange, _)) if conflicts < 5 => {
                conflicts += 1;
                tokio::time::sleep(Duration::from_millis(50 << conflicts)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        report.add(table, n);
        report.batches += 1;
        report.largest_batch = report.largest_batch.max(n);
        if n < settings.batch_size {
            return Ok(());
        }
    }
}

/// Coverage reports of no session with their files: each transaction
/// deletes whole reports (a reader never sees a report without its files),
/// at most a batch of rows unless one report alone has more.
async fn drain_coverage(
    conn: &mut Conn,
    settings: &Settings,
    project: Uuid,
    cutoff: DateTime<Utc>,
    report: &mut Report,
) -> Result<()> {
    let lock_timeout = format!("{}ms", settings.lock_timeout.as_millis().max(1));
    loop {
        let tx = conn.begin().await?;
        SET_LOCK_TIMEOUT.query_one(&tx, &[&lock_timeout]).await?;
        let ids: Vec<Uuid> = PICK_COVERAGE
            .query(&tx, &[&project, &cutoff, &settings.batch_size])
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(());
        }
        let files = DELETE_COVERAGE_FILES
            .execute(&tx, &[&project, &ids])
            .await? as i64;
        let reports = DELETE_COVERAGE_REPORTS
            .execute(&tx, &[&project, &ids])
            .await? as i64;
        tx.commit().await.map_err(Error::from)?;
        report.add("coverage_files", files);
        report.add("coverage_reports", reports);
        report.batches += 1;
        report.largest_batch = report.largest_batch.max(files + reports);
    }
}

/// Rows a session is counted as when sizing the batches of sessions.
const SESSION_ROWS: i64 = 100;

/// Applies the retention of every kind (the audit trail only with `audit`)
/// to `call`'s project, whose overrides are `overrides`, as of `now`.
/// Sessions are deleted with [`cleanup::run`] (which records each batch in
/// the audit trail) unless `sessions` is false (the Cleanup RPC deletes
/// them by its own cutoff).
#[allow(clippy::too_many_arguments)]
pub async fn apply(
    conn: &mut Conn,
    call: &Call,
    settings: &Settings,
    overrides: &Days,
    now: DateTime<Utc>,
    sessions: bool,
    audit: bool,
) -> Result<Report> {
    let project = call.project()?;
    let mut report = Report::default();
    for kind in Kind::ALL {
        let Some(days) = settings.effective(overrides, kind) else {
            continue;
        };
        let at = cutoff(now, days);
        match kind {
            Kind::Sessions if sessions => {
                // A session brings its logs, results, discrepancies,
                // executions and coverage along: a hundredth of a batch of
                // sessions per transaction.
                let per_batch = (settings.batch_size / SESSION_ROWS).max(1);
                let done = cleanup::run(conn, call, at, per_batch).await?;
                for (table, n) in done.deleted {
                    report.add(table, n);
                }
                report.batches += done.batches;
            }
            Kind::Sessions => {}
            Kind::Executions => {
                drain(
                    conn,
                    settings,
                    &DELETE_EXECUTIONS,
                    false,
                    project,
                    at,
                    "test_executions",
                    &mut report,
                )
                .await?
            }
            Kind::Coverage => drain_coverage(conn, settings, project, at, &mut report).await?,
            Kind::TestRuns => {
                drain(
                    conn,
                    settings,
                    &DELETE_RUN_EXECUTIONS,
                    false,
                    project,
                    at,
                    "test_executions",
                    &mut report,
                )
                .await?;
                drain(
                    conn,
                    settings,
                    &DELETE_RUNS,
                    false,
                    project,
                    at,
                    "test_runs",
                    &mut report,
                )
                .await?;
            }
            Kind::MetricPoints => {
                drain(
                    conn,
                    settings,
                    &DELETE_METRIC_POINTS,
                    false,
                    project,
                    at,
                    "metric_points",
                    &mut report,
                )
                .await?
            }
            Kind::MetricRollups => {
                drain(
                    conn,
                    settings,
                    &DELETE_METRIC_ROLLUPS,
                    false,
                    project,
                    at,
                    "metric_rollups",
                    &mut report,
                )
                .await?
            }
            Kind::Ingest => {
                drain(
                    conn,
                    settings,
                    &DELETE_INGEST_BATCHES,
                    false,
                    project,
                    at,
                    "ingest_batches",
                    &mut report,
                )
                .await?;
                drain(
                    conn,
                    settings,
                    &DELETE_INGEST_MARKS,
                    false,
                    project,
                    at,
                    "ingest_marks",
                    &mut report,
                )
                .await?;
            }
            Kind::Resolutions => {
                drain(
                    conn,
                    settings,
                    &DELETE_RESOLUTIONS,
                    false,
                    project,
                    at,
                    "discrepancy_resolutions",
                    &mut report,
                )
                .await?
            }
            Kind::AuditEvents if audit => {
                drain(
                    conn,
                    settings,
                    &DELETE_AUDIT,
                    true,
                    project,
                    at,
                    "audit_events",
                    &mut report,
                )
                .await?
            }
            Kind::AuditEvents => {}
        }
    }
    Ok(report)
}

/// Advisory lock key of the retention job ("verdict" + 3).
pub const RETENTION_LOCK: i64 = 0x7665_7264_6963_7403;

/// Every project's id with its overrides, in a stable order.
async fn projects(c: &impl GenericClient) -> Result<Vec<(Uuid, Days)>> {
    crate::projects::sql::retention_of_all(c).await
}

/// What one run of the job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// Every project was done; the rows deleted in all of them.
    Done(Report),
    /// Another replica holds the job's lock: nothing was done.
    Skipped,
}

/// One run of the retention job: takes the job's advisory lock on a
/// connection of its own (so a run cut short releases it with the
/// connection), then applies every kind, the audit trail included, to every
/// project, each project in its own batches. A project that fails (deleted
/// meanwhile, a lost connection) is logged and the others go on; the first
/// error is returned after all were tried.
pub async fn run_once(pg: &PgConfig, db: &Db, settings: &Settings) -> Result<JobOutcome> {
    let lock = crate::db::connect_direct(pg).await.map_err(|e| {
        Error::Unavailable(
            Reason::DatabaseUnavailable,
            format!("retention job: cannot connect: {e}"),
        )
    })?;
    let got: bool = lock
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
        .await?
        .try_get(0)?;
    if !got {
        return Ok(JobOutcome::Skipped);
    }
    let result = async {
        let listed = {
            let mut conn = db.conn(&Call::command_line("job:retention")).await?;
            projects(conn.client().await?).await?
        };
        let now = Utc::now();
        let mut total = Report::default();
        let mut first_error = None;
        for (project, overrides) in listed {
            let call = Call::command_line("job:retention").in_project(project);
            let done = async {
                let mut conn = db.conn(&call).await?;
                apply(&mut conn, &call, settings, &overrides, now, true, true).await
            }
            .await;
            match done {
                Ok(report) => {
                    for (table, n) in report.deleted {
                        total.add(table, n);
                    }
                    total.batches += report.batches;
                    total.largest_batch = total.largest_batch.max(report.largest_batch);
                }
                Err(e) => {
                    tracing::warn!(%project, error = %e, "retention of a project failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(JobOutcome::Done(total)),
        }
    }
    .await;
    // Released with the connection anyway; said explicitly for a prompt
    // hand-over to another replica.
    let _ = lock
        .query_one("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await;
    result
}

/// Runs [`run_once`] every `settings.interval` (first after one interval)
/// while the gateway runs.
pub async fn run_periodically(pg: PgConfig, db: Db, settings: Settings) {
    let Some(every) = settings.interval else {
        return;
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !db.is_ready() {
            continue;
        }
        let span = tracing::info_span!(
            parent: None,
            "retention.run",
            otel.kind = "internal",
            otel.status_code = tracing::field::Empty
        );
        let started = std::time::Instant::now();
        let outcome = run_once(&pg, &db, &settings).instrument(span.clone()).await;
        let label = match &outcome {
            Ok(JobOutcome::Done(report)) => {
                tracing::info!(deleted = ?report.deleted, batches = report.batches, "retention run finished");
                "ok"
            }
            Ok(JobOutcome::Skipped) => "skipped",
            Err(e) => {
                span.record("otel.status_code", "ERROR");
                tracing::warn!(error = %e, "retention run failed");
                "error"
            }
        };
        crate::observability::job_run("retention", label, started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_override_beats_the_default_and_zero_keeps_forever() {
        let settings = Settings {
            defaults: [30, 0, 0, 0, 7, 0, 0, 0, 0],
            ..Settings::default()
        };
        let mut overrides: Days = [None; 9];
        assert_eq!(settings.effective(&overrides, Kind::Sessions), Some(30));
        assert_eq!(settings.effective(&overrides, Kind::Executions), None);
        overrides[Kind::Sessions.index()] = Some(0);
        overrides[Kind::Executions.index()] = Some(3);
        assert_eq!(settings.effective(&overrides, Kind::Sessions), None);
        assert_eq!(settings.effective(&overrides, Kind::Executions), Some(3));
    }
}
