//! Validation rollups: computed in SQL per project and period, upserted,
//! incremental by a per-project, per-period-kind watermark, one computation
//! at a time across replicas (a transaction-scoped advisory lock, one for
//! every project).
//!
//! Discrepancies and executions are not counted from their raw rows: a
//! period sums the per-day counts kept at write time
//! (`discrepancy_created_days`, V36; `test_execution_days`, V25), whose
//! days are UTC days like the periods' bounds (the gateway's sessions run
//! in UTC). Sessions, results (the fidelity percentile needs every score)
//! and technology pairs are read from their (project, created_at) indexes.

use super::RollupPeriod;
use crate::call::Call;
use crate::db::{Db, Stmt};
use crate::error::{Error, Result};
use chrono::{DateTime, Duration as Span, Utc};
use deadpool_postgres::GenericClient;
use std::collections::BTreeSet;
use std::time::Duration;
use tracing::Instrument as _;
use uuid::Uuid;

/// Advisory lock key of rollup computation ("verdict" + 2).
const ROLLUP_LOCK: i64 = 0x7665_7264_6963_7402;
/// Rows committed shortly before the last computation may carry earlier
/// timestamps than its start: look back this far when finding touched periods.
const OVERLAP_MINUTES: i64 = 5;

impl RollupPeriod {
    /// The PostgreSQL interval of one period.
    fn step(self) -> &'static str {
        match self {
            RollupPeriod::Day => "1 day",
            RollupPeriod::Week => "1 week",
            RollupPeriod::Month => "1 month",
        }
    }
}

const LOCK_WAIT: Stmt = Stmt::new(
    "SELECT",
    "advisory_lock",
    "SELECT pg_advisory_xact_lock($1)",
);
const LOCK_TRY: Stmt = Stmt::new(
    "SELECT",
    "advisory_lock",
    "SELECT pg_try_advisory_xact_lock($1)",
);

const PERIODS_IN_RANGE: Stmt = Stmt::new(
    "SELECT",
    "generate_series",
    "SELECT generate_series(date_trunc($1, $2::timestamptz), $3::timestamptz - interval '1 microsecond', \
                            $4::text::interval)",
);

const WATERMARK: Stmt = Stmt::new(
    "SELECT",
    "rollup_watermarks",
    "SELECT computed_to FROM rollup_watermarks WHERE project_id = $2 AND period = $1",
);

const TOUCHED: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT DISTINCT date_trunc($1, t) FROM ( \
         SELECT created_at AS t FROM sessions WHERE project_id = $3 AND updated_at >= $2 \
         UNION ALL SELECT created_at FROM results WHERE project_id = $3 AND created_at >= $2 \
         UNION ALL SELECT day::timestamp AT TIME ZONE 'UTC' FROM discrepancy_created_days \
                   WHERE project_id = $3 AND changed_at >= $2 \
         UNION ALL SELECT started_at FROM test_executions \
                   WHERE project_id = $3 AND created_at >= $2) touched",
);

const ADVANCE: Stmt = Stmt::new(
    "INSERT",
    "rollup_watermarks",
    "INSERT INTO rollup_watermarks (project_id, period, computed_to) VALUES ($2, $1, now()) \
     ON CONFLICT (project_id, period) DO UPDATE SET computed_to = EXCLUDED.computed_to",
);

/// The upsert of the rollups of some periods of one project (public for the
/// plan test: it reads per-day counts, never discrepancies or executions).
pub const COMPUTE: Stmt = Stmt::new(
    "INSERT",
    "metric_rollups",
    "WITH bounds AS ( \
         SELECT s AS period_start, s + $3::text::interval AS period_end, \
                (s AT TIME ZONE 'UTC')::date AS first_day, \
                ((s + $3::text::interval) AT TIME ZONE 'UTC')::date AS end_day \
         FROM unnest($2::timestamptz[]) AS s), \
     se AS ( \
         SELECT b.period_start, count(x.id) AS total, \
                count(x.id) FILTER (WHERE x.status = 'pending') AS pending, \
                count(x.id) FILTER (WHERE x.status = 'processing') AS processing, \
                count(x.id) FILTER (WHERE x.status = 'completed') AS completed, \
                count(x.id) FILTER (WHERE x.status = 'failed') AS failed, \
                count(x.id) FILTER (WHERE x.status = 'cancelled') AS cancelled, \
                avg(EXTRACT(EPOCH FROM (x.completed_at - x.started_at)) * 1000)::float8 AS duration_ms \
         FROM bounds b LEFT JOIN sessions x \
           ON x.project_id = $4 AND x.created_at >= b.period_start AND x.created_at < b.period_end \
         GROUP BY b.period_start), \
     re AS ( \
         SELECT b.period_start, avg(r.fidelity_score) AS avg_fidelity, \
                percentile_cont(0.95) WITHIN GROUP (ORDER BY r.fidelity_score) AS p95_fidelity \
         FROM bounds b LEFT JOIN results r \
           ON r.project_id = $4 AND r.created_at >= b.period_start AND r.created_at < b.period_end \
         GROUP BY b.period_start), \
     di AS ( \
         SELECT b.period_start, \
                COALESCE(sum(d.n) FILTER (WHERE d.severity = 1), 0)::int8 AS critical, \
                COALESCE(sum(d.n) FILTER (WHERE d.severity = 2), 0)::int8 AS high, \
                COALESCE(sum(d.n) FILTER (WHERE d.severity = 3), 0)::int8 AS medium, \
                COALESCE(sum(d.n) FILTER (WHERE d.severity = 4), 0)::int8 AS low, \
                COALESCE(sum(d.n) FILTER (WHERE d.severity = 5), 0)::int8 AS info \
         FROM bounds b LEFT JOIN discrepancy_created_days d \
           ON d.project_id = $4 AND d.day >= b.first_day AND d.day < b.end_day \
         GROUP BY b.period_start), \
     ex AS ( \
         SELECT b.period_start, COALESCE(sum(e.total), 0)::int8 AS executions, \
                COALESCE(sum(e.passed), 0)::int8 AS passed, \
                COALESCE(sum(e.failed_or_error), 0)::int8 AS failed_or_error \
         FROM bounds b LEFT JOIN ( \
             SELECT d.day, sum(d.total) AS total, sum(d.passed) AS passed, \
                    sum(d.failed + d.error) AS failed_or_error \
             FROM test_execution_days d \
             WHERE d.project_id = $4 AND d.day >= (SELECT min(first_day) FROM bounds) \
               AND d.day < (SELECT max(end_day) FROM bounds) \
             GROUP BY d.day) e \
           ON e.day >= b.first_day AND e.day < b.end_day \
         GROUP BY b.period_start), \
     tp AS ( \
         SELECT period_start, jsonb_object_agg(pair, n) AS pairs FROM ( \
             SELECT b.period_start, x.source_technology || '->' || x.target_technology AS pair, count(*) AS n \
             FROM bounds b JOIN sessions x \
               ON x.project_id = $4 AND x.created_at >= b.period_start AND x.created_at < b.period_end \
             GROUP BY 1, 2) per_pair \
         GROUP BY period_start) \
     INSERT INTO metric_rollups (project_id, period, period_start, sessions_total, sessions_pending, \
         sessions_processing, sessions_completed, sessions_failed, sessions_cancelled, \
         avg_fidelity, p95_fidelity, discrepancies_critical, discrepancies_high, \
         discrepancies_medium, discrepancies_low, discrepancies_info, avg_session_duration_ms, \
         test_executions, test_passed, test_failed_or_error, technology_pairs, computed_at) \
     SELECT $4, $1, se.period_start, se.total, se.pending, se.processing, se.completed, se.failed, \
            se.cancelled, re.avg_fidelity, re.p95_fidelity, di.critical, di.high, di.medium, \
            di.low, di.info, se.duration_ms, ex.executions, ex.passed, ex.failed_or_error, \
            COALESCE(tp.pairs, '{}'::jsonb), now() \
     FROM se JOIN re USING (period_start) JOIN di USING (period_start) JOIN ex USING (period_start) \
          LEFT JOIN tp USING (period_start) \
     ON CONFLICT (project_id, period, period_start) DO UPDATE SET \
         sessions_total = EXCLUDED.sessions_total, sessions_pending = EXCLUDED.sessions_pending, \
         sessions_processing = EXCLUDED.sessions_processing, \
         sessions_completed = EXCLUDED.sessions_completed, sessions_failed = EXCLUDED.sessions_failed, \
         sessions_cancelled = EXCLUDED.sessions_cancelled, avg_fidelity = EXCLUDED.avg_fidelity, \
         p95_fidelity = EXCLUDED.p95_fidelity, discrepancies_critical = EXCLUDED.discrepancies_critical, \
         discrepancies_high = EXCLUDED.discrepancies_high, discrepancies_medium = EXCLUDED.discrepancies_medium, \
         discrepancies_low = EXCLUDED.discrepancies_low, discrepancies_info = EXCLUDED.discrepancies_info, \
         avg_session_duration_ms = EXCLUDED.avg_session_duration_ms, \
         test_executions = EXCLUDED.test_executions, test_passed = EXCLUDED.test_passed, \
         test_failed_or_error = EXCLUDED.test_failed_or_error, \
         technology_pairs = EXCLUDED.technology_pairs, computed_at = EXCLUDED.computed_at",
);

/// Whether to wait for another replica's computation or skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locking {
    Wait,
    SkipIfBusy,
}

/// Computes `project`'s rollups of `period` for the periods overlapping
/// [from, to): every one with `full`, else those touched since the
/// project's last computation. Only the project's sessions, results,
/// discrepancies and executions count. Returns the starts computed, or
/// `None` when skipped because another replica holds the lock.
pub async fn compute(
    c: &impl GenericClient,
    project: Uuid,
    period: RollupPeriod,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    full: bool,
    locking: Locking,
) -> Result<Option<Vec<DateTime<Utc>>>> {
    match locking {
        Locking::Wait => {
            LOCK_WAIT.query_one(c, &[&ROLLUP_LOCK]).await?;
        }
        Locking::SkipIfBusy => {
            let got: bool = LOCK_TRY.query_one(c, &[&ROLLUP_LOCK]).await?.try_get(0)?;
            if !got {
                return Ok(None);
            }
        }
    }
    let in_range: BTreeSet<DateTime<Utc>> = PERIODS_IN_RANGE
        .query(c, &[&period.as_str(), &from, &to, &period.step()])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let since = match WATERMARK
        .query_opt(c, &[&period.as_str(), &project])
        .await?
    {
        Some(row) => row.try_get::<_, DateTime<Utc>>(0)? - Span::minutes(OVERLAP_MINUTES),
        None => DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).expect("year 1 is valid"),
    };
    let touched: BTreeSet<DateTime<Utc>> = TOUCHED
        .query(c, &[&period.as_str(), &since, &project])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let targets: Vec<DateTime<Utc>> = if full {
        in_range.iter().copied().collect()
    } else {
        touched.intersection(&in_range).copied().collect()
    };
    if !targets.is_empty() {
        COMPUTE
            .execute(c, &[&period.as_str(), &targets, &period.step(), &project])
            .await?;
    }
    // The watermark only moves when nothing touched was left out, so a
    // narrow range never hides changes outside it from a later run.
    if touched.is_subset(&in_range) {
        ADVANCE.execute(c, &[&period.as_str(), &project]).await?;
    }
    Ok(Some(targets))
}

const PROJECTS: Stmt = Stmt::new("SELECT", "projects", "SELECT id FROM projects ORDER BY id");

/// Every project's id, in a stable order.
async fn projects(c: &impl GenericClient) -> Result<Vec<Uuid>> {
    PROJECTS
        .query(c, &[])
        .await?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
}

/// Recomputes touched rollups of every project and period kind every
/// `interval`, for the last 400 days; one replica at a time.
pub async fn run_periodically(db: Db, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if !db.is_ready() {
            continue;
        }
        // Every statement of a run belongs to the run's own trace.
        let run = tracing::info_span!(
            parent: None,
            "rollup.run",
            otel.kind = "internal",
            otel.status_code = tracing::field::Empty
        );
        run_once(&db).instrument(run).await;
    }
}

/// What a periodic run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunOutcome {
    Ok,
    /// Another replica was computing: this run stopped (that one covers
    /// every project).
    Skipped,
    Error,
}

/// One periodic run: every project and period kind, each in its own
/// transaction (one project's failure does not hold back the others).
async fn run_once(db: &Db) {
    let started = std::time::Instant::now();
    let outcome = run_all(db).await;
    let outcome = match outcome {
        RunOutcome::Ok => "ok",
        RunOutcome::Skipped => "skipped",
        RunOutcome::Error => "error",
    };
    crate::observability::job_run("rollup", outcome, started.elapsed());
}

async fn run_all(db: &Db) -> RunOutcome {
    let listed = async {
        let mut conn = db.conn(&Call::command_line("job:rollup")).await?;
        projects(conn.client().await?).await
    }
    .await;
    let ids = match listed {
        Ok(ids) => ids,
        Err(e) => {
            tracing::Span::current().record("otel.status_code", "ERROR");
            tracing::warn!(error = %e, "periodic rollup computation failed to list projects");
            return RunOutcome::Error;
        }
    };
    let now = Utc::now();
    let mut outcome = RunOutcome::Ok;
    for project in ids {
        let call = Call::command_line("job:rollup").in_project(project);
        for period in RollupPeriod::ALL {
            let done = async {
                let mut conn = db.conn(&call).await?;
                let tx = conn.begin().await?;
                let computed = compute(
                    &tx,
                    project,
                    *period,
                    now - Span::days(400),
                    now + Span::days(1),
                    false,
                    Locking::SkipIfBusy,
                )
                .await?;
                tx.commit().await.map_err(Error::from)?;
                Ok::<_, Error>(computed)
            }
            .await;
            match done {
                Ok(Some(starts)) => {
                    tracing::debug!(
                        %project,
                        period = period.as_str(),
                        periods = starts.len(),
                        "rollups computed"
                    )
                }
                Ok(None) => {
                    tracing::debug!("another replica is computing rollups");
                    return RunOutcome::Skipped;
                }
                // A project deleted meanwhile fails its upsert (foreign
                // key); the others go on.
                Err(e) => {
                    outcome = RunOutcome::Error;
                    tracing::Span::current().record("otel.status_code", "ERROR");
                    tracing::warn!(%project, error = %e, "periodic rollup computation failed")
                }
            }
        }
    }
    outcome
}
