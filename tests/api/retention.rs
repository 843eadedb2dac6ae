//! Retention of every kind of data, per project: the Cleanup RPC and the
//! periodic job delete exactly the expired rows of one project (counted
//! with direct SQL before and after) and nothing of another, a project's
//! override beats the gateway's default, audit events go only by the job,
//! batches are bounded, readers are not held up, and a run cut short by a
//! terminated backend resumes without losing anything it should keep.

use crate::errors::assert_reason;
use crate::helpers::*;
use crate::sessions::new_session;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::Code;
use uuid::Uuid;
use verdict::admin::retention::{self, JobOutcome, RETENTION_LOCK};
use verdict::db::PgConfig;
use verdict::proto::project_service_client::ProjectServiceClient;
use verdict::proto::{
    CleanupRequest, GetProjectRequest, GetSessionRequest, ListSessionsRequest, Retention,
    UpdateProjectRequest, get_project_request, get_session_request,
};

/// Every table retention touches.
const TABLES: &[&str] = &[
    "sessions",
    "results",
    "discrepancies",
    "discrepancy_resolutions",
    "test_runs",
    "test_executions",
    "coverage_reports",
    "coverage_files",
    "metric_points",
    "metric_rollups",
    "ingest_batches",
    "ingest_marks",
    "audit_events",
];

/// Plants `n` rows 40 days old and `n` rows 1 day old of every kind in
/// `project`, plus rows that are old but belong to a young parent (they go
/// with their parent, never by their own age): executions and coverage
/// reports of young sessions, resolutions of young sessions' discrepancies.
async fn plant(app: &TestApp, project: Uuid, n: i64) {
    let mut sql = String::new();
    for (age, days) in [("old", 40), ("young", 1)] {
        let at = format!("now() - interval '{days} days'");
        sql.push_str(&format!(
            "INSERT INTO sessions (project_id, id, request_id, source_technology,
                 target_technology, validation_scope, created_at)
             SELECT '{project}', gen_random_uuid(), '{age}-' || i, 'cobol', 'java', 'full', {at}
             FROM generate_series(1, {n}) i;
             INSERT INTO test_runs (project_id, id, client_key, content_digest, started_at)
             SELECT '{project}', gen_random_uuid(), '{age}-run-' || i, '\\x00'::bytea, {at}
             FROM generate_series(1, {n}) i;
             INSERT INTO coverage_reports (project_id, id, commit_sha, branch, client_key,
                 lines_covered, lines_total, branches_covered, branches_total,
                 functions_covered, functions_total, file_count, recorded_at)
             SELECT '{project}', gen_random_uuid(), 'abcdef1', 'main', '{age}-' || i,
                    1, 2, 1, 2, 1, 2, 3, {at}
             FROM generate_series(1, {n}) i;
             INSERT INTO metric_points (project_id, name, value, recorded_at)
             SELECT '{project}', 'm', i, {at} FROM generate_series(1, {n}) i;
             INSERT INTO audit_events (project_id, at, rpc, outcome)
             SELECT '{project}', {at}, 'planted', 'created' FROM generate_series(1, {n});
             INSERT INTO ingest_batches (project_id, kind, scope, batch_id, digest, item_count,
                 committed_at)
             SELECT '{project}', 'k', 's', '{age}-' || i, '\\x00'::bytea, 1, {at}
             FROM generate_series(1, {n}) i;
             INSERT INTO ingest_marks (project_id, kind, ingest_id, scope, high_water_mark,
                 updated_at)
             SELECT '{project}', 'k', '{age}-' || i, 's', 1, {at}
             FROM generate_series(1, {n}) i;
             INSERT INTO metric_rollups (project_id, period, period_start, sessions_total,
                 sessions_pending, sessions_processing, sessions_completed, sessions_failed,
                 sessions_cancelled, discrepancies_critical, discrepancies_high,
                 discrepancies_medium, discrepancies_low, discrepancies_info)
             SELECT '{project}', 'day', date_trunc('day', {at}) - i * interval '1 day',
                    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
             FROM generate_series(0, {n} - 1) i;"
        ));
    }
    sql.push_str(&format!(
        "INSERT INTO results (project_id, session_id, id, request_id, result_type,
             overall_status, fidelity_score, created_at)
         SELECT project_id, id, gen_random_uuid(), 'r', 'static', 'passed', 0.5, created_at
         FROM sessions WHERE project_id = '{project}';
         INSERT INTO discrepancies (project_id, session_id, id, kind, severity, description,
             confidence, fingerprint)
         SELECT project_id, id, gen_random_uuid(), 'k', 2, 'd', 0.5, 'f'
         FROM sessions WHERE project_id = '{project}' AND request_id LIKE 'young-%';
         INSERT INTO discrepancy_resolutions (project_id, session_id, discrepancy_id,
             from_resolution, to_resolution, actor, changed_at)
         SELECT project_id, session_id, id, 'open', 'acknowledged', 'ana', now() - d * interval '1 day'
         FROM discrepancies, (VALUES (40), (1)) ages(d) WHERE project_id = '{project}';
         INSERT INTO test_cases (project_id, id, key, name, test_type)
         VALUES ('{project}', gen_random_uuid(), 'case', 't', 'unit');
         INSERT INTO test_executions (project_id, id, test_case_id, status, started_at)
         SELECT '{project}', gen_random_uuid(), c.id, 'passed', now() - d * interval '1 day'
         FROM test_cases c, generate_series(1, {n}) i, (VALUES (40), (1)) ages(d)
         WHERE c.project_id = '{project}';
         INSERT INTO test_executions (project_id, id, test_case_id, session_id, status, started_at)
         SELECT s.project_id, gen_random_uuid(), c.id, s.id, 'passed', now() - interval '40 days'
         FROM sessions s JOIN test_cases c ON c.project_id = s.project_id
         WHERE s.project_id = '{project}' AND s.request_id LIKE 'young-%';
         INSERT INTO test_executions (project_id, id, test_case_id, run_id, status, started_at)
         SELECT r.project_id, gen_random_uuid(), c.id, r.id, 'passed', now() - interval '40 days'
         FROM test_runs r JOIN test_cases c ON c.project_id = r.project_id, generate_series(1, 2)
         WHERE r.project_id = '{project}';
         INSERT INTO coverage_reports (project_id, id, session_id, commit_sha, branch, client_key,
             lines_covered, lines_total, branches_covered, branches_total, functions_covered,
             functions_total, file_count, recorded_at)
         SELECT project_id, gen_random_uuid(), id, 'abcdef1', 'main', 'session-' || request_id,
                1, 2, 1, 2, 1, 2, 3, now() - interval '40 days'
         FROM sessions WHERE project_id = '{project}' AND request_id LIKE 'young-%';
         INSERT INTO coverage_files (project_id, report_id, session_id, path, lines_covered,
             lines_total, branches_covered, branches_total, functions_covered, functions_total)
         SELECT project_id, id, session_id, 'f' || f || '.rs', 1, 2, 1, 2, 1, 2
         FROM coverage_reports, generate_series(1, 3) f WHERE project_id = '{project}';"
    ));
    app.sql().await.batch_execute(&sql).await.unwrap();
}

/// Rows of every table in `project`, counted directly.
async fn census(sql: &tokio_postgres::Client, project: Uuid) -> BTreeMap<&'static str, i64> {
    let mut out = BTreeMap::new();
    for table in TABLES {
        let n: i64 = sql
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE project_id = $1"),
                &[&project],
            )
            .await
            .unwrap()
            .get(0);
        out.insert(*table, n);
    }
    out
}

/// Audit events of `project` planted 40 days ago.
async fn old_audit(sql: &tokio_postgres::Client, project: Uuid) -> i64 {
    sql.query_one(
        "SELECT count(*) FROM audit_events WHERE project_id = $1 AND rpc = 'planted' \
         AND at < now() - interval '30 days'",
        &[&project],
    )
    .await
    .unwrap()
    .get(0)
}

fn projects(app: &TestApp) -> ProjectServiceClient<tonic::transport::Channel> {
    ProjectServiceClient::new(app.channel.clone())
}

fn every_kind(days: i32) -> Retention {
    Retention {
        sessions_days: Some(days),
        executions_days: Some(days),
        coverage_days: Some(days),
        test_runs_days: Some(days),
        metric_points_days: Some(days),
        metric_rollups_days: Some(days),
        ingest_days: Some(days),
        resolutions_days: Some(days),
        audit_events_days: Some(days),
    }
}

async fn set_retention(app: &TestApp, slug: &str, retention: Retention) {
    projects(app)
        .update_project(UpdateProjectRequest {
            slug: slug.into(),
            retention: Some(retention),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// A Cleanup that deletes no session (none is that old): only the
/// project's retention of the other kinds applies.
fn cleanup(batch_size: i32, dry_run: bool) -> CleanupRequest {
    CleanupRequest {
        older_than: Some(prost_types::Duration {
            seconds: 1000 * 86_400,
            nanos: 0,
        }),
        cutoff: None,
        dry_run,
        batch_size,
    }
}

fn pg_of(app: &TestApp) -> PgConfig {
    PgConfig::parse(&app.database_url).unwrap()
}

/// `census` difference `before - after`, tables with a difference only.
fn deleted(
    before: &BTreeMap<&'static str, i64>,
    after: &BTreeMap<&'static str, i64>,
) -> BTreeMap<&'static str, i64> {
    before
        .iter()
        .map(|(t, n)| (*t, n - after[t]))
        .filter(|(_, d)| *d != 0)
        .collect()
}

#[tokio::test]
async fn cleanup_deletes_exactly_the_expired_rows_of_every_kind_in_its_project_only() {
    let app = spawn_app().await;
    let a = create_project(&app, "ret-a").await;
    let b = create_project(&app, "ret-b").await;
    let n = 6;
    plant(&app, a, n).await;
    plant(&app, b, n).await;
    // B has the same retention: only the call's project is touched.
    set_retention(&app, "ret-a", every_kind(30)).await;
    set_retention(&app, "ret-b", every_kind(30)).await;
    let sql = app.sql().await;
    let (a_before, b_before) = (census(&sql, a).await, census(&sql, b).await);

    let planned = app
        .admin
        .clone()
        .cleanup(in_project(cleanup(4, true), "ret-a"))
        .await
        .unwrap()
        .into_inner();
    let done = app
        .admin
        .clone()
        .cleanup(in_project(cleanup(4, false), "ret-a"))
        .await
        .unwrap()
        .into_inner();

    let (a_after, b_after) = (census(&sql, a).await, census(&sql, b).await);
    let expected = BTreeMap::from([
        // Detached old executions, and both executions of every old run.
        ("test_executions", n + 2 * n),
        ("test_runs", n),
        ("coverage_reports", n),
        ("coverage_files", 3 * n),
        ("metric_points", n),
        ("metric_rollups", n),
        ("ingest_batches", n),
        ("ingest_marks", n),
        ("discrepancy_resolutions", n),
    ]);
    let mut got = deleted(&a_before, &a_after);
    // The Cleanup's own audit rows are new; none was deleted.
    let audit_added = got.remove("audit_events").unwrap_or(0);
    assert!(audit_added < 0, "the cleanup is audited: {audit_added}");
    assert_eq!(got, expected);
    assert_eq!(
        old_audit(&sql, a).await,
        n,
        "Cleanup never deletes audit events"
    );
    assert_eq!(b_after, b_before, "another project's rows are untouched");

    // What the reply says matches what the database lost, and the dry run
    // counted the same.
    let reported = |r: &[verdict::proto::TableCount]| -> BTreeMap<String, i64> {
        r.iter()
            .filter(|c| c.rows != 0)
            .map(|c| (c.table.clone(), c.rows))
            .collect()
    };
    let want: BTreeMap<String, i64> = expected
        .iter()
        .map(|(t, n)| ((*t).to_owned(), *n))
        .collect();
    assert_eq!(reported(&done.deleted), want);
    assert_eq!(reported(&planned.deleted), want);

    // Nothing young, and nothing old that belongs to a young session, went.
    for (check, want) in [
        (
            "SELECT count(*) FROM test_executions WHERE project_id = $1 AND session_id IS NOT NULL",
            n,
        ),
        (
            "SELECT count(*) FROM coverage_reports WHERE project_id = $1 AND session_id IS NOT NULL",
            n,
        ),
        (
            "SELECT count(*) FROM metric_points WHERE project_id = $1 \
             AND recorded_at > now() - interval '30 days'",
            n,
        ),
        (
            "SELECT count(*) FROM test_runs WHERE project_id = $1 \
             AND started_at > now() - interval '30 days'",
            n,
        ),
    ] {
        let got: i64 = sql.query_one(check, &[&a]).await.unwrap().get(0);
        assert_eq!(got, want, "{check}");
    }

    // A second run finds nothing more.
    let again = app
        .admin
        .clone()
        .cleanup(in_project(cleanup(4, false), "ret-a"))
        .await
        .unwrap()
        .into_inner();
    assert!(again.deleted.iter().all(|c| c.rows == 0), "{again:?}");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_projects_override_beats_the_gateway_default() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.retention_metric_points_days = 30;
    config.retention_ingest_days = 30;
    let app = spawn_app_with(config.clone()).await;
    let forever = create_project(&app, "keeps-forever").await;
    let inherits = create_project(&app, "inherits").await;
    let longer = create_project(&app, "keeps-longer").await;
    let shorter = create_project(&app, "keeps-shorter").await;
    for p in [forever, inherits, longer, shorter] {
        plant(&app, p, 5).await;
    }
    set_retention(
        &app,
        "keeps-forever",
        Retention {
            metric_points_days: Some(0),
            ..Default::default()
        },
    )
    .await;
    set_retention(
        &app,
        "keeps-longer",
        Retention {
            metric_points_days: Some(50),
            ..Default::default()
        },
    )
    .await;
    set_retention(
        &app,
        "keeps-shorter",
        Retention {
            metric_points_days: Some(1),
            ..Default::default()
        },
    )
    .await;
    let shown = projects(&app)
        .get_project(GetProjectRequest {
            lookup: Some(get_project_request::Lookup::Slug("keeps-longer".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap();
    let own = shown.retention.unwrap();
    let effective = shown.effective_retention.unwrap();
    assert_eq!((own.metric_points_days, own.ingest_days), (Some(50), None));
    assert_eq!(
        (
            effective.metric_points_days,
            effective.ingest_days,
            effective.sessions_days
        ),
        (Some(50), Some(30), Some(0))
    );

    let outcome = retention::run_once(&pg_of(&app), &app.db, &config.retention())
        .await
        .unwrap();
    assert!(matches!(outcome, JobOutcome::Done(_)), "{outcome:?}");
    let sql = app.sql().await;
    let points = |p: Uuid| {
        let sql = &sql;
        async move {
            let n: i64 = sql
                .query_one(
                    "SELECT count(*) FROM metric_points WHERE project_id = $1",
                    &[&p],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    assert_eq!(points(forever).await, 10, "0 keeps forever");
    assert_eq!(points(inherits).await, 5, "the default (30 days) applies");
    assert_eq!(
        points(longer).await,
        10,
        "50 days keeps the 40-day-old points"
    );
    // 1 day: the 1-day-old points (planted a moment before now - 1 day)
    // go too.
    assert_eq!(points(shorter).await, 0);
    // The ingest default applies to every project (none overrides it).
    for p in [forever, inherits, longer, shorter] {
        let n: i64 = sql
            .query_one(
                "SELECT count(*) FROM ingest_batches WHERE project_id = $1",
                &[&p],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 5);
    }

    // Clearing the overrides (an empty Retention) inherits again.
    set_retention(&app, "keeps-forever", Retention::default()).await;
    retention::run_once(&pg_of(&app), &app.db, &config.retention())
        .await
        .unwrap();
    assert_eq!(points(forever).await, 5);

    // Out-of-range values are refused, naming the field; nothing changes.
    let err = projects(&app)
        .update_project(UpdateProjectRequest {
            slug: "keeps-longer".into(),
            retention: Some(Retention {
                metric_points_days: Some(-1),
                audit_events_days: Some(36_601),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
    let fields = violated_fields(&err);
    assert!(
        fields.contains(&"retention.metric_points_days".to_owned())
            && fields.contains(&"retention.audit_events_days".to_owned()),
        "{fields:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn audit_events_are_deleted_only_by_the_periodic_job() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.retention_interval_secs = 1;
    let app = spawn_app_with(config.clone()).await;
    let a = create_project(&app, "audited").await;
    let b = create_project(&app, "audited-too").await;
    plant(&app, a, 5).await;
    plant(&app, b, 5).await;
    // Held so that the job cannot run before the Cleanup RPC has been
    // checked.
    let holder = app.sql().await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap();
    set_retention(&app, "audited", every_kind(30)).await;
    let sql = app.sql().await;
    app.admin
        .clone()
        .cleanup(in_project(cleanup(0, false), "audited"))
        .await
        .unwrap();
    assert_eq!(old_audit(&sql, a).await, 5, "Cleanup leaves audit events");
    let (a_before, b_before) = (census(&sql, a).await, census(&sql, b).await);
    // While another replica holds the lock, a run is skipped.
    let skipped = retention::run_once(&pg_of(&app), &app.db, &config.retention())
        .await
        .unwrap();
    assert_eq!(skipped, JobOutcome::Skipped);
    assert_eq!(old_audit(&sql, a).await, 5);

    // Released: the gateway's own periodic job (every second) deletes them.
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while old_audit(&sql, a).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the job did not delete old audit events"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let young: i64 = sql
        .query_one(
            "SELECT count(*) FROM audit_events WHERE project_id = $1 AND rpc = 'planted'",
            &[&a],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(young, 5, "only the expired events go");
    // The job also applied the sessions' retention (the Cleanup RPC had
    // done the other kinds): the 5 old sessions went with their results.
    let mut got = deleted(&a_before, &census(&sql, a).await);
    got.remove("audit_events");
    assert_eq!(got, BTreeMap::from([("sessions", 5), ("results", 5)]));
    assert_eq!(census(&sql, b).await, b_before);
    assert_eq!(
        old_audit(&sql, b).await,
        5,
        "B keeps its trail (no retention)"
    );
    // A plain DELETE is still refused by the database.
    let refused = sql
        .execute("DELETE FROM audit_events WHERE project_id = $1", &[&b])
        .await;
    assert!(refused.is_err());
    app.stop().await.unwrap();
}

#[tokio::test]
async fn every_batch_deletes_at_most_the_batch_size() {
    let app = spawn_app().await;
    let p = create_project(&app, "batched").await;
    let sql = app.sql().await;
    sql.batch_execute(&format!(
        "INSERT INTO metric_points (project_id, name, value, recorded_at)
         SELECT '{p}', 'm', i, now() - interval '40 days' FROM generate_series(1, 100) i;"
    ))
    .await
    .unwrap();
    set_retention(
        &app,
        "batched",
        Retention {
            metric_points_days: Some(30),
            ..Default::default()
        },
    )
    .await;
    let done = app
        .admin
        .clone()
        .cleanup(in_project(cleanup(7, false), "batched"))
        .await
        .unwrap()
        .into_inner();
    // 14 full batches of 7 and one of 2: no session batch (none is old).
    assert_eq!(done.batches, 15);
    let points = done
        .deleted
        .iter()
        .find(|c| c.table == "metric_points")
        .unwrap();
    assert_eq!(points.rows, 100);

    // The library reports the largest transaction, too.
    sql.batch_execute(&format!(
        "INSERT INTO metric_points (project_id, name, value, recorded_at)
         SELECT '{p}', 'm', i, now() - interval '40 days' FROM generate_series(1, 50) i;"
    ))
    .await
    .unwrap();
    let settings = retention::Settings {
        batch_size: 3,
        ..Default::default()
    };
    let call = verdict::call::Call::command_line("test").in_project(p);
    let mut conn = app.db.conn(&call).await.unwrap();
    let mut overrides: retention::Days = [None; 9];
    overrides[4] = Some(30);
    let report = retention::apply(
        &mut conn,
        &call,
        &settings,
        &overrides,
        chrono::Utc::now(),
        true,
        true,
    )
    .await
    .unwrap();
    assert_eq!(report.rows("metric_points"), 50);
    assert_eq!(report.largest_batch, 3);
    assert_eq!(report.batches, 17);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_cleanup_cut_short_by_a_terminated_backend_resumes_and_keeps_what_it_should() {
    let app = spawn_app().await;
    let p = create_project(&app, "terminated").await;
    let sql = app.sql().await;
    sql.batch_execute(&format!(
        "INSERT INTO metric_points (project_id, name, value, recorded_at)
         SELECT '{p}', 'old', i, now() - interval '40 days' FROM generate_series(1, 40000) i;
         INSERT INTO metric_points (project_id, name, value, recorded_at)
         SELECT '{p}', 'young', i, now() - interval '1 day' FROM generate_series(1, 5000) i;"
    ))
    .await
    .unwrap();
    set_retention(
        &app,
        "terminated",
        Retention {
            metric_points_days: Some(30),
            ..Default::default()
        },
    )
    .await;
    let mut admin = app.admin.clone();
    let running = tokio::spawn(async move {
        admin
            .cleanup(in_project(cleanup(20, false), "terminated"))
            .await
    });
    // Once some batches have committed, terminate the backend of the
    // cleanup while it deletes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let terminated = loop {
        assert!(Instant::now() < deadline, "never saw the cleanup delete");
        assert!(
            !running.is_finished(),
            "the cleanup finished before it could be terminated"
        );
        let row = sql
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'DELETE FROM metric_points%' AND pid <> pg_backend_pid() \
                 AND (SELECT count(*) FROM metric_points WHERE project_id = $1 AND name = 'old') \
                     < 39000",
                &[&p],
            )
            .await
            .unwrap();
        let n: i64 = row.get(0);
        if n > 0 {
            break n;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(terminated, 1);
    let err = running.await.unwrap().unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let count = |name: &'static str| {
        let sql = &sql;
        async move {
            let n: i64 = sql
                .query_one(
                    "SELECT count(*) FROM metric_points WHERE project_id = $1 AND name = $2",
                    &[&p, &name],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    let left = count("old").await;
    assert!(left > 0 && left < 40_000, "cut short midway: {left}");
    assert_eq!(count("young").await, 5000);
    // Committed batches stay deleted, the cut one is undone whole: what is
    // left is a whole number of batches.
    assert_eq!((40_000 - left) % 20, 0);

    let resumed = app
        .admin
        .clone()
        .cleanup(in_project(cleanup(1000, false), "terminated"))
        .await
        .unwrap()
        .into_inner();
    let points = resumed
        .deleted
        .iter()
        .find(|c| c.table == "metric_points")
        .unwrap();
    assert_eq!(points.rows, left);
    assert_eq!(count("old").await, 0);
    assert_eq!(count("young").await, 5000);
    app.stop().await.unwrap();
}

/// Latency percentile `q` (0..1) of `samples`.
fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[i]
}

/// GetSession and ListSessions p99 from 4 concurrent readers while a
/// cleanup deletes `VERDICT_RETENTION_BENCH_ROWS` metric points and as many
/// executions (60,000 each by default; the report's numbers used a
/// million each). The bound asserted here is generous (a shared 2-core CI
/// machine); the measured numbers are printed.
#[tokio::test]
async fn readers_are_not_held_up_while_a_cleanup_deletes_many_rows() {
    let rows: i64 = std::env::var("VERDICT_RETENTION_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60_000);
    let app = spawn_app().await;
    let p = create_project(&app, "bench").await;
    let sql = app.sql().await;
    let load = Instant::now();
    sql.batch_execute(&format!(
        "SET statement_timeout = 0;
         INSERT INTO metric_points (project_id, name, value, recorded_at)
         SELECT '{p}', 'm' || (i % 50), i, now() - interval '40 days' - i * interval '1 second'
         FROM generate_series(1, {rows}) i;
         INSERT INTO test_cases (project_id, id, key, name, test_type)
         VALUES ('{p}', gen_random_uuid(), 'bench', 'b', 'unit');
         INSERT INTO test_executions (project_id, id, test_case_id, status, started_at)
         SELECT '{p}', gen_random_uuid(), c.id, 'passed', now() - interval '40 days'
         FROM test_cases c, generate_series(1, {rows}) i WHERE c.project_id = '{p}';
         ANALYZE metric_points; ANALYZE test_executions;"
    ))
    .await
    .unwrap();
    eprintln!("loaded 2 x {rows} rows in {:?}", load.elapsed());
    set_retention(
        &app,
        "bench",
        Retention {
            metric_points_days: Some(30),
            executions_days: Some(30),
            ..Default::default()
        },
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let s = app
            .sessions
            .clone()
            .create_session(in_project(new_session(&format!("bench-{i}")), "bench"))
            .await
            .unwrap()
            .into_inner()
            .session
            .unwrap();
        ids.push(s.id);
    }

    // Phase 0: the readers alone (a baseline on the same machine, as
    // loaded as it is); phase 1: during the cleanup; 2: stop.
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(0u8);
    let baseline_calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    for r in 0..4 {
        let mut sessions = app.sessions.clone();
        let ids = ids.clone();
        let phase = phase_rx.clone();
        let baseline_calls = baseline_calls.clone();
        readers.push(tokio::spawn(async move {
            // [phase][get, list] latencies.
            let mut seen: [[Vec<Duration>; 2]; 2] = Default::default();
            // Bounded: at most 50,000 rounds or 20 minutes per reader.
            let stop = Instant::now() + Duration::from_secs(1200);
            let mut i = r;
            loop {
                let now = *phase.borrow();
                if now > 1 || Instant::now() > stop || seen[1][0].len() >= 50_000 {
                    break;
                }
                let t = Instant::now();
                sessions
                    .get_session(in_project(
                        GetSessionRequest {
                            lookup: Some(get_session_request::Lookup::Id(
                                ids[i % ids.len()].clone(),
                            )),
                            ..Default::default()
                        },
                        "bench",
                    ))
                    .await
                    .unwrap();
                let get = t.elapsed();
                let t = Instant::now();
                sessions
                    .list_sessions(in_project(
                        ListSessionsRequest {
                            page_size: 10,
                            ..Default::default()
                        },
                        "bench",
                    ))
                    .await
                    .unwrap();
                let list = t.elapsed();
                // A round that straddles a phase change counts for neither.
                if *phase.borrow() == now {
                    seen[now as usize][0].push(get);
                    seen[now as usize][1].push(list);
                    if now == 0 {
                        baseline_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                i += 1;
            }
            seen
        }));
    }
    // Wait (bounded) for a baseline of 2,000 rounds.
    let deadline = Instant::now() + Duration::from_secs(120);
    while baseline_calls.load(std::sync::atomic::Ordering::Relaxed) < 2_000 {
        assert!(Instant::now() < deadline, "the readers did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    phase_tx.send(1).unwrap();
    let started = Instant::now();
    let done = app
        .admin
        .clone()
        .cleanup(in_project(cleanup(1000, false), "bench"))
        .await
        .unwrap()
        .into_inner();
    let took = started.elapsed();
    phase_tx.send(2).unwrap();
    let mut seen: [[Vec<Duration>; 2]; 2] = Default::default();
    for r in readers {
        let got = r.await.unwrap();
        for (phase, calls) in got.into_iter().enumerate() {
            for (rpc, latencies) in calls.into_iter().enumerate() {
                seen[phase][rpc].extend(latencies);
            }
        }
    }
    let rows_of = |t: &str| {
        done.deleted
            .iter()
            .find(|c| c.table == t)
            .map_or(0, |c| c.rows)
    };
    assert_eq!(rows_of("metric_points"), rows);
    assert_eq!(rows_of("test_executions"), rows);
    let [[mut idle_get, mut idle_list], [mut get, mut list]] = seen;
    let (get_p99, list_p99) = (percentile(&mut get, 0.99), percentile(&mut list, 0.99));
    let (get_p50, list_p50) = (percentile(&mut get, 0.5), percentile(&mut list, 0.5));
    eprintln!(
        "baseline (no cleanup): GetSession p50 {:?} p99 {:?}, ListSessions p50 {:?} p99 {:?} \
         ({} rounds)",
        percentile(&mut idle_get, 0.5),
        percentile(&mut idle_get, 0.99),
        percentile(&mut idle_list, 0.5),
        percentile(&mut idle_list, 0.99),
        idle_get.len()
    );
    eprintln!(
        "cleanup of 2 x {rows} rows took {took:?} in {} batches; \
         GetSession p50 {get_p50:?} p99 {get_p99:?} ({} calls); \
         ListSessions p50 {list_p50:?} p99 {list_p99:?} ({} calls)",
        done.batches,
        get.len(),
        list.len()
    );
    assert!(get.len() >= 100, "the readers ran during the cleanup");
    // Generous for a shared CI machine; the target (50 ms) is measured
    // with the report's command.
    assert!(
        get_p99 < Duration::from_millis(500),
        "GetSession p99 {get_p99:?}"
    );
    assert!(
        list_p99 < Duration::from_millis(500),
        "ListSessions p99 {list_p99:?}"
    );
    app.stop().await.unwrap();
}
