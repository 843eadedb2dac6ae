//! COUNT_MODE_ESTIMATED on a million rows: the planner's estimate (an
//! EXPLAIN of the count statement with the call's bound parameters, over
//! the extended protocol) is within the bound common.proto documents —
//! within 10% unfiltered, within 2x with a range filter — and EXACT equals
//! the real count. A binary of its own: it loads 1,000,000 metric points
//! with one SQL statement.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::spawn_app;
use prost_types::Timestamp;
use std::collections::HashMap;
use std::time::Instant;
use verdict::proto::{CountMode, ListMetricPointsRequest, TimeRange};

const ROWS: i64 = 1_000_000;
/// 2026-01-01T00:00:00Z: point n is recorded n seconds after it.
const T0: i64 = 1_767_225_600;

fn at(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: T0 + seconds,
        nanos: 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimated_totals_of_a_million_rows_are_within_the_documented_bound() {
    let app = spawn_app().await;
    let sql = app.sql().await;
    let loading = Instant::now();
    // One point a second; a quarter of them labelled prod; a second
    // metric of 1,000 points the count must leave out.
    sql.batch_execute(&format!(
        "SET statement_timeout = 0; \
         INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
         SELECT (SELECT id FROM projects WHERE slug = 'default'), \
                CASE WHEN n <= {ROWS} THEN 'load' ELSE 'other' END, n, 'ms', \
                CASE WHEN n % 4 = 0 THEN '{{\"env\":\"prod\"}}'::jsonb \
                     ELSE '{{\"env\":\"ci\"}}'::jsonb END, \
                to_timestamp({T0} + n) \
         FROM generate_series(1, {ROWS} + 1000) AS n; \
         ANALYZE metric_points;"
    ))
    .await
    .unwrap();
    eprintln!("loaded {} rows in {:?}", ROWS + 1000, loading.elapsed());
    let mut client = app.metrics.clone();
    let list = |count: CountMode, range: Option<TimeRange>, labels: &[(&str, &str)]| {
        ListMetricPointsRequest {
            name: "load".into(),
            range,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>(),
            page_size: 10,
            count: count as i32,
            ..Default::default()
        }
    };

    // Unfiltered (beyond the metric name): within 10%.
    let started = Instant::now();
    let r = client
        .list_metric_points(list(CountMode::Estimated, None, &[]))
        .await
        .unwrap()
        .into_inner();
    let estimated_in = started.elapsed();
    assert_eq!(r.total_mode, CountMode::Estimated as i32);
    assert_eq!(r.points.len(), 10);
    let error = (r.total - ROWS).abs() as f64 / ROWS as f64;
    eprintln!(
        "unfiltered: estimated {} of {ROWS} ({:.2}% off) in {estimated_in:?}",
        r.total,
        error * 100.0
    );
    assert!(error <= 0.10, "estimate {} of {ROWS}", r.total);

    let started = Instant::now();
    let exact = client
        .list_metric_points(list(CountMode::Exact, None, &[]))
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "unfiltered: exact {} in {:?}",
        exact.total,
        started.elapsed()
    );
    assert_eq!(
        (exact.total, exact.total_mode),
        (ROWS, CountMode::Exact as i32)
    );

    // A range of 300,000 seconds (bound parameters the planner sees):
    // within 2x, and EXACT is exact.
    let range = Some(TimeRange {
        start_time: at(100_001),
        end_time: at(400_001),
    });
    let r = client
        .list_metric_points(list(CountMode::Estimated, range, &[]))
        .await
        .unwrap()
        .into_inner();
    eprintln!("range: estimated {} of 300000", r.total);
    assert_eq!(r.total_mode, CountMode::Estimated as i32);
    assert!(
        (150_000..=600_000).contains(&r.total),
        "estimate {} of 300000",
        r.total
    );
    let r = client
        .list_metric_points(list(CountMode::Exact, range, &[("env", "prod")]))
        .await
        .unwrap()
        .into_inner();
    let real: i64 = sql
        .query_one(
            "SELECT count(*) FROM metric_points WHERE name = 'load' \
             AND labels @> '{\"env\":\"prod\"}' \
             AND recorded_at >= to_timestamp($1::float8) AND recorded_at < to_timestamp($2::float8)",
            &[&((T0 + 100_001) as f64), &((T0 + 400_001) as f64)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(real, 75_000);
    assert_eq!((r.total, r.total_mode), (real, CountMode::Exact as i32));

    // A filter the planner estimates small (a range of 500 seconds, under
    // VERDICT_COUNT_EXACT_BELOW's default 10000) is counted exactly.
    let r = client
        .list_metric_points(list(
            CountMode::Estimated,
            Some(TimeRange {
                start_time: at(1),
                end_time: at(501),
            }),
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.total, r.total_mode), (500, CountMode::Exact as i32));
}
