//! MetricsService: time series against SQL computed in the test, rollups
//! against hand-computed expectations.

use crate::helpers::{TestApp, default_project, spawn_app, violated_fields};
use prost_types::{Duration as PbDuration, Timestamp};
use std::collections::HashMap;
use verdict::proto::{
    CalendarBucket, ComputeRollupsRequest, GetTechnologyUsageRequest, ListRollupsRequest,
    MetricPoint, QueryTimeSeriesRequest, RecordMetricPointsRequest, Rollup, RollupPeriod,
    TimeRange,
};

fn ts(rfc3339: &str) -> Timestamp {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap();
    Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

fn range(from: &str, to: &str) -> Option<TimeRange> {
    Some(TimeRange {
        start_time: Some(ts(from)),
        end_time: Some(ts(to)),
    })
}

fn point(name: &str, value: f64, at: Timestamp, host: &str) -> MetricPoint {
    MetricPoint {
        name: name.into(),
        value,
        unit: "ms".into(),
        labels: [("host".to_string(), host.to_string())].into(),
        recorded_at: Some(at),
    }
}

#[tokio::test]
async fn metric_batches_are_atomic_and_idempotent() {
    let app = spawn_app().await;
    let mut client = app.metrics.clone();
    let points: Vec<_> = (0..100)
        .map(|i| point("latency", f64::from(i), ts("2026-01-01T00:00:00Z"), "a"))
        .collect();
    let req = RecordMetricPointsRequest {
        batch_id: "m1".into(),
        points: points.clone(),
    };
    let first = client
        .record_metric_points(req.clone())
        .await
        .unwrap()
        .into_inner();
    let again = client.record_metric_points(req).await.unwrap().into_inner();
    assert_eq!((first.recorded, first.replayed), (100, false));
    assert_eq!((again.recorded, again.replayed), (100, true));
    let stored: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM metric_points", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 100);

    let mut bad = points;
    bad[3].value = f64::INFINITY;
    bad[5].recorded_at = None;
    bad[7].name = String::new();
    let err = client
        .record_metric_points(RecordMetricPointsRequest {
            batch_id: "m2".into(),
            points: bad,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["points[3].value", "points[5].recorded_at", "points[7].name"]
    );
    let stored: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM metric_points", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 100);
}

#[tokio::test]
async fn time_series_buckets_match_sql_and_include_empty_buckets() {
    let app = spawn_app().await;
    let mut client = app.metrics.clone();
    // One point every 3 s for an hour on host a; a few on host b.
    let start = chrono::DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
        .unwrap()
        .timestamp();
    let points: Vec<_> = (0..1200)
        .map(|i| {
            let value = ((i * 37) % 1000) as f64 / 10.0;
            point(
                "latency",
                value,
                Timestamp {
                    seconds: start + i * 3,
                    nanos: 0,
                },
                if i % 10 == 0 { "b" } else { "a" },
            )
        })
        .collect();
    client
        .record_metric_points(RecordMetricPointsRequest {
            batch_id: "series".into(),
            points,
        })
        .await
        .unwrap();

    let reply = client
        .query_time_series(QueryTimeSeriesRequest {
            name: "latency".into(),
            label_filter: [("host".to_string(), "a".to_string())].into(),
            range: range("2026-03-01T10:00:00Z", "2026-03-01T12:00:00Z"),
            bucket_width: Some(PbDuration {
                seconds: 600,
                nanos: 0,
            }),
            calendar_bucket: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.buckets.len(), 12);
    let sql = app.sql().await;
    let expected = sql
        .query(
            "SELECT date_bin('10 minutes', recorded_at, 'epoch'), count(*), sum(value), min(value), max(value),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY value),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY value),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY value)
             FROM metric_points WHERE labels->>'host' = 'a' GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(expected.len(), 6);
    for (bucket, row) in reply.buckets.iter().zip(&expected) {
        let start: chrono::DateTime<chrono::Utc> = row.get(0);
        assert_eq!(
            bucket.start_time.as_ref().unwrap().seconds,
            start.timestamp()
        );
        assert_eq!(bucket.count, row.get::<_, i64>(1));
        assert_eq!(bucket.sum, Some(row.get(2)));
        assert_eq!(bucket.min, Some(row.get(3)));
        assert_eq!(bucket.max, Some(row.get(4)));
        assert_eq!(bucket.p50, Some(row.get(5)));
        assert_eq!(bucket.p95, Some(row.get(6)));
        assert_eq!(bucket.p99, Some(row.get(7)));
    }
    for empty in &reply.buckets[6..] {
        assert_eq!(empty.count, 0);
        assert_eq!((empty.avg, empty.p95), (None, None));
    }

    let months = client
        .query_time_series(QueryTimeSeriesRequest {
            name: "latency".into(),
            label_filter: HashMap::new(),
            range: range("2026-01-15T00:00:00Z", "2026-05-01T00:00:00Z"),
            bucket_width: None,
            calendar_bucket: CalendarBucket::Month as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let counts: Vec<i64> = months.buckets.iter().map(|b| b.count).collect();
    assert_eq!(counts, [0, 0, 1200, 0]);

    let err = client
        .query_time_series(QueryTimeSeriesRequest {
            name: "latency".into(),
            range: range("2020-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
            bucket_width: Some(PbDuration {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["range"]);
}

/// Two days of sessions, results and discrepancies with known figures, in
/// the project `default`.
async fn plant_two_days(app: &TestApp) {
    let project = default_project(app).await;
    plant_two_days_in(app, project, 0).await;
}

/// The same two days in `project`: the same figures and technologies in
/// every project; `tag` (0..=9) keeps the row ids, request ids and keys
/// apart.
pub async fn plant_two_days_in(app: &TestApp, project: uuid::Uuid, tag: u8) {
    assert!(tag <= 9);
    let sql = "INSERT INTO sessions (project_id, id, request_id, source_technology, target_technology,
                                   validation_scope, status, created_at, started_at, completed_at) VALUES
             ('{P}', '00000000-0000-0000-000{N}-000000000001', 's1-{N}', 'cobol', 'java', 'full', 'completed',
              '2026-01-10 09:00Z', '2026-01-10 10:00:00Z', '2026-01-10 10:00:02Z'),
             ('{P}', '00000000-0000-0000-000{N}-000000000002', 's2-{N}', 'cobol', 'java', 'full', 'failed',
              '2026-01-10 09:30Z', '2026-01-10 11:00:00Z', '2026-01-10 11:00:04Z'),
             ('{P}', '00000000-0000-0000-000{N}-000000000003', 's3-{N}', 'pl1', 'java', 'full', 'pending',
              '2026-01-10 23:59Z', NULL, NULL),
             ('{P}', '00000000-0000-0000-000{N}-000000000004', 's4-{N}', 'cobol', 'java', 'full', 'completed',
              '2026-01-11 08:00Z', '2026-01-11 08:00:00Z', '2026-01-11 08:00:01Z');
             INSERT INTO results (project_id, session_id, id, request_id, result_type, overall_status, fidelity_score, created_at) VALUES
             ('{P}', '00000000-0000-0000-000{N}-000000000001', gen_random_uuid(), 'r1', 'static', 'passed', 0.8, '2026-01-10 12:00Z'),
             ('{P}', '00000000-0000-0000-000{N}-000000000001', gen_random_uuid(), 'r2', 'static', 'passed', 1.0, '2026-01-10 13:00Z'),
             ('{P}', '00000000-0000-0000-000{N}-000000000004', gen_random_uuid(), 'r3', 'static', 'failed', 0.5, '2026-01-11 12:00Z');
             INSERT INTO discrepancies (project_id, session_id, id, kind, severity, description, confidence, fingerprint, created_at) VALUES
             ('{P}', '00000000-0000-0000-000{N}-000000000001', gen_random_uuid(), 'k', 1, 'd', 1, 'f1', '2026-01-10 12:00Z'),
             ('{P}', '00000000-0000-0000-000{N}-000000000001', gen_random_uuid(), 'k', 1, 'd', 1, 'f2', '2026-01-10 12:00Z'),
             ('{P}', '00000000-0000-0000-000{N}-000000000001', gen_random_uuid(), 'k', 4, 'd', 1, 'f3', '2026-01-10 12:00Z');
             INSERT INTO test_cases (project_id, id, key, name, test_type) VALUES
             ('{P}', '00000000-0000-0000-000{N}-0000000000aa', 'test-001-{N}', 'login', 'unit');
             INSERT INTO test_executions (project_id, id, test_case_id, status, started_at, created_at) VALUES
             ('{P}', gen_random_uuid(), '00000000-0000-0000-000{N}-0000000000aa', 'passed', '2026-01-10 01:00Z', '2026-01-10 01:00Z'),
             ('{P}', gen_random_uuid(), '00000000-0000-0000-000{N}-0000000000aa', 'passed', '2026-01-10 02:00Z', '2026-01-10 02:00Z'),
             ('{P}', gen_random_uuid(), '00000000-0000-0000-000{N}-0000000000aa', 'failed', '2026-01-10 03:00Z', '2026-01-10 03:00Z'),
             ('{P}', gen_random_uuid(), '00000000-0000-0000-000{N}-0000000000aa', 'skipped', '2026-01-10 04:00Z', '2026-01-10 04:00Z'),
             ('{P}', gen_random_uuid(), '00000000-0000-0000-000{N}-0000000000aa', 'error', '2026-01-11 01:00Z', '2026-01-11 01:00Z');
             UPDATE sessions SET updated_at = created_at WHERE project_id = '{P}';
             -- The per-day execution rollup (V25) the gateway keeps on its
             -- own writes, rebuilt for these raw rows as the scale loader does.
             INSERT INTO test_execution_days (project_id, test_case_id, day, total, passed, failed,
                                              skipped, error, duration_ms, hist_buckets, hist_counts)
             SELECT a.* FROM (SELECT array_agg(project_id) AS p, array_agg(test_case_id) AS t,
                                     array_agg(day) AS d
                              FROM (SELECT DISTINCT project_id, test_case_id,
                                           (started_at AT TIME ZONE 'UTC')::date AS day
                                    FROM test_executions WHERE project_id = '{P}') k) k,
                  verdict_execution_days_of(k.p, k.t, k.d) a;"
        .replace("{P}", &project.to_string())
        .replace("{N}", &tag.to_string());
    app.sql().await.batch_execute(&sql).await.unwrap();
}

async fn rollups(app: &TestApp) -> Vec<Rollup> {
    app.metrics
        .clone()
        .list_rollups(ListRollupsRequest {
            period: RollupPeriod::Day as i32,
            range: None,
            page_size: 100,
            page_token: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rollups
}

async fn compute(app: &TestApp, full: bool) -> Vec<i64> {
    app.metrics
        .clone()
        .compute_rollups(ComputeRollupsRequest {
            period: RollupPeriod::Day as i32,
            range: range("2026-01-10T00:00:00Z", "2026-01-13T00:00:00Z"),
            full_recompute: full,
        })
        .await
        .unwrap()
        .into_inner()
        .period_starts
        .iter()
        .map(|t| t.seconds)
        .collect()
}

fn without_computed_at(mut rows: Vec<Rollup>) -> Vec<Rollup> {
    for r in &mut rows {
        r.computed_at = None;
    }
    rows
}

#[tokio::test]
async fn daily_rollups_match_hand_computed_figures_and_recompute_idempotently() {
    let app = spawn_app().await;
    plant_two_days(&app).await;
    let day1 = ts("2026-01-10T00:00:00Z").seconds;
    let day2 = ts("2026-01-11T00:00:00Z").seconds;
    let day3 = ts("2026-01-12T00:00:00Z").seconds;
    assert_eq!(compute(&app, true).await, [day1, day2, day3]);

    let rows = rollups(&app).await;
    assert_eq!(rows.len(), 3);
    let d1 = &rows[0];
    assert_eq!(
        (
            d1.sessions_total,
            d1.sessions_pending,
            d1.sessions_completed,
            d1.sessions_failed
        ),
        (3, 1, 1, 1)
    );
    assert!((d1.completion_rate.unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert!((d1.avg_fidelity.unwrap() - 0.9).abs() < 1e-12);
    assert!((d1.p95_fidelity.unwrap() - 0.99).abs() < 1e-12);
    assert_eq!(
        (
            d1.discrepancies_critical,
            d1.discrepancies_low,
            d1.discrepancies_high
        ),
        (2, 1, 0)
    );
    assert!((d1.avg_session_duration_ms.unwrap() - 3000.0).abs() < 1e-6);
    // 2 passed of 3 that ran to a verdict (the skipped one does not count).
    assert_eq!(d1.test_executions, 4);
    assert!((d1.test_pass_rate.unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(
        d1.technology_pairs,
        HashMap::from([("cobol->java".to_string(), 2), ("pl1->java".to_string(), 1)])
    );
    let d2 = &rows[1];
    assert_eq!((d2.sessions_total, d2.sessions_completed), (1, 1));
    assert_eq!(d2.completion_rate, Some(1.0));
    assert_eq!((d2.avg_fidelity, d2.p95_fidelity), (Some(0.5), Some(0.5)));
    assert!((d2.avg_session_duration_ms.unwrap() - 1000.0).abs() < 1e-6);
    assert_eq!((d2.test_executions, d2.test_pass_rate), (1, Some(0.0)));
    let d3 = &rows[2];
    assert_eq!(
        (d3.sessions_total, d3.completion_rate, d3.avg_fidelity),
        (0, None, None)
    );

    // Running it again gives the same rows.
    compute(&app, true).await;
    assert_eq!(
        without_computed_at(rollups(&app).await),
        without_computed_at(rows)
    );
}

#[tokio::test]
async fn incremental_rollups_recompute_only_touched_days() {
    let app = spawn_app().await;
    plant_two_days(&app).await;
    let day1 = ts("2026-01-10T00:00:00Z").seconds;
    let day2 = ts("2026-01-11T00:00:00Z").seconds;
    // No watermark yet: every day with data is touched.
    assert_eq!(compute(&app, false).await, [day1, day2]);
    let before = rollups(&app).await;

    // A change to a day-2 session and a new day-2 session touch day 2 only.
    app.sql()
        .await
        .batch_execute(
            "UPDATE sessions SET updated_at = now()
             WHERE project_id = (SELECT id FROM projects WHERE slug = 'default') AND request_id = 's4-0';
             INSERT INTO sessions (project_id, id, request_id, source_technology, target_technology,
                                   validation_scope, status, created_at)
             VALUES ((SELECT id FROM projects WHERE slug = 'default'), gen_random_uuid(), 's5',
                     'cobol', 'java', 'full', 'cancelled', '2026-01-11 09:00Z');",
        )
        .await
        .unwrap();
    assert_eq!(compute(&app, false).await, [day2]);
    let after = rollups(&app).await;
    assert_eq!(after[1].sessions_total, 2);
    assert_eq!(after[1].sessions_cancelled, 1);
    assert_eq!(
        without_computed_at(vec![after[0].clone()]),
        without_computed_at(vec![before[0].clone()])
    );
}

#[tokio::test]
async fn technology_usage_counts_pairs_and_success() {
    let app = spawn_app().await;
    plant_two_days(&app).await;
    let usage = app
        .metrics
        .clone()
        .get_technology_usage(GetTechnologyUsageRequest { range: None })
        .await
        .unwrap()
        .into_inner()
        .pairs;
    assert_eq!(usage.len(), 2);
    let cobol = &usage[0];
    assert_eq!(
        (
            cobol.source_technology.as_str(),
            cobol.sessions,
            cobol.completed,
            cobol.finished
        ),
        ("cobol", 3, 2, 3)
    );
    assert!((cobol.success_rate.unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(usage[1].success_rate, None);
}
