//! Validation rollups: computed in SQL per period, upserted, incremental by
//! a per-period-kind watermark, one computation at a time across replicas
//! (a transaction-scoped advisory lock).

use super::RollupPeriod;
use crate::call::Call;
use crate::db::{Db, Stmt};
use crate::error::{Error, Result};
use chrono::{DateTime, Duration as Span, Utc};
use deadpool_postgres::GenericClient;
use std::collections::BTreeSet;
use std::time::Duration;
use tracing::Instrument as _;

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
    "SELECT computed_to FROM rollup_watermarks WHERE period = $1",
);

const TOUCHED: Stmt = Stmt::new(
    "SELECT",
    "sessions",
    "SELECT DISTINCT date_trunc($1, t) FROM ( \
         SELECT created_at AS t FROM sessions WHERE updated_at >= $2 \
         UNION ALL SELECT created_at FROM results WHERE created_at >= $2 \
         UNION ALL SELECT created_at FROM discrepancies WHERE created_at >= $2 \
         UNION ALL SELECT started_at FROM test_executions WHERE created_at >= $2) touched",
);

const ADVANCE: Stmt = Stmt::new(
    "INSERT",
    "rollup_watermarks",
    "INSERT INTO rollup_watermarks (period, computed_to) VALUES ($1, now()) \
     ON CONFLICT (period) DO UPDATE SET computed_to = EXCLUDED.computed_to",
);

const COMPUTE: Stmt = Stmt::new(
    "INSERT",
    "metric_rollups",
    "WITH bounds AS ( \
         SELECT s AS period_start, s + $3::text::interval AS period_end \
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
           ON x.created_at >= b.period_start AND x.created_at < b.period_end \
         GROUP BY b.period_start), \
     re AS ( \
         SELECT b.period_start, avg(r.fidelity_score) AS avg_fidelity, \
                percentile_cont(0.95) WITHIN GROUP (ORDER BY r.fidelity_score) AS p95_fidelity \
         FROM bounds b LEFT JOIN results r \
           ON r.created_at >= b.period_start AND r.created_at < b.period_end \
         GROUP BY b.period_start), \
     di AS ( \
         SELECT b.period_start, \
                count(d.id) FILTER (WHERE d.severity = 1) AS critical, \
                count(d.id) FILTER (WHERE d.severity = 2) AS high, \
                count(d.id) FILTER (WHERE d.severity = 3) AS medium, \
                count(d.id) FILTER (WHERE d.severity = 4) AS low, \
                count(d.id) FILTER (WHERE d.severity = 5) AS info \
         FROM bounds b LEFT JOIN discrepancies d \
           ON d.created_at >= b.period_start AND d.created_at < b.period_end \
         GROUP BY b.period_start), \
     ex AS ( \
         SELECT b.period_start, count(e.id) AS executions, \
                count(e.id) FILTER (WHERE e.status = 'passed') AS passed, \
                count(e.id) FILTER (WHERE e.status IN ('failed', 'error')) AS failed_or_error \
         FROM bounds b LEFT JOIN test_executions e \
           ON e.started_at >= b.period_start AND e.started_at < b.period_end \
         GROUP BY b.period_start), \
     tp AS ( \
         SELECT period_start, jsonb_object_agg(pair, n) AS pairs FROM ( \
             SELECT b.period_start, x.source_technology || '->' || x.target_technology AS pair, count(*) AS n \
             FROM bounds b JOIN sessions x \
               ON x.created_at >= b.period_start AND x.created_at < b.period_end \
             GROUP BY 1, 2) per_pair \
         GROUP BY period_start) \
     INSERT INTO metric_rollups (period, period_start, sessions_total, sessions_pending, \
         sessions_processing, sessions_completed, sessions_failed, sessions_cancelled, \
         avg_fidelity, p95_fidelity, discrepancies_critical, discrepancies_high, \
         discrepancies_medium, discrepancies_low, discrepancies_info, avg_session_duration_ms, \
         test_executions, test_passed, test_failed_or_error, technology_pairs, computed_at) \
     SELECT $1, se.period_start, se.total, se.pending, se.processing, se.completed, se.failed, \
            se.cancelled, re.avg_fidelity, re.p95_fidelity, di.critical, di.high, di.medium, \
            di.low, di.info, se.duration_ms, ex.executions, ex.passed, ex.failed_or_error, \
            COALESCE(tp.pairs, '{}'::jsonb), now() \
     FROM se JOIN re USING (period_start) JOIN di USING (period_start) JOIN ex USING (period_start) \
          LEFT JOIN tp USING (period_start) \
     ON CONFLICT (period, period_start) DO UPDATE SET \
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

/// Computes the rollups of `period` for the periods overlapping
/// [from, to): every one with `full`, else those touched since the last
/// computation. Returns the starts computed, or `None` when skipped because
/// another replica holds the lock.
pub async fn compute(
    c: &impl GenericClient,
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
    let since = match WATERMARK.query_opt(c, &[&period.as_str()]).await? {
        Some(row) => row.try_get::<_, DateTime<Utc>>(0)? - Span::minutes(OVERLAP_MINUTES),
        None => DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).expect("year 1 is valid"),
    };
    let touched: BTreeSet<DateTime<Utc>> = TOUCHED
        .query(c, &[&period.as_str(), &since])
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
            .execute(c, &[&period.as_str(), &targets, &period.step()])
            .await?;
    }
    // The watermark only moves when nothing touched was left out, so a
    // narrow range never hides changes outside it from a later run.
    if touched.is_subset(&in_range) {
        ADVANCE.execute(c, &[&period.as_str()]).await?;
    }
    Ok(Some(targets))
}

/// Recomputes touched rollups of every period kind every `interval`, for
/// the last 400 days; one replica at a time.
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

/// One periodic run: every period kind, each in its own transaction.
async fn run_once(db: &Db) {
    let started = std::time::Instant::now();
    let mut outcome = "ok";
    {
        let now = Utc::now();
        for period in RollupPeriod::ALL {
            let done = async {
                let mut conn = db.conn(&Call::default()).await?;
                let tx = conn.begin().await?;
                let computed = compute(
                    &tx,
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
                        period = period.as_str(),
                        periods = starts.len(),
                        "rollups computed"
                    )
                }
                Ok(None) => {
                    outcome = "skipped";
                    tracing::debug!("another replica is computing rollups")
                }
                Err(e) => {
                    outcome = "error";
                    tracing::Span::current().record("otel.status_code", "ERROR");
                    tracing::warn!(error = %e, "periodic rollup computation failed")
                }
            }
        }
    }
    crate::observability::job_run("rollup", outcome, started.elapsed());
}
