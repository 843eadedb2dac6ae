//! Issue 18: QueryTimeSeries over hourly aggregates, per series (V34), per
//! metric name (V38) and per metric name and label pair (V39). The
//! aggregates are kept by triggers on metric_points in the writer's
//! transaction; these tests compare what a caller sees, and the aggregate
//! rows of the three levels, with the raw points.

use crate::helpers::{
    TestApp, admin_client, create_database, create_project, default_project, in_project, spawn_app,
    spawn_app_with, terminate_lock_waiter, test_config, wait_for_lock_wait,
};
use chrono::{DateTime, TimeDelta, Utc};
use prost_types::{Duration as PbDuration, Timestamp};
use serde_json::Value;
use std::collections::HashMap;
use uuid::Uuid;
use verdict::db::Stmt;
use verdict::proto::project_service_client::ProjectServiceClient;
use verdict::proto::{
    CalendarBucket, CleanupRequest, DeleteProjectRequest, MetricPoint, QueryTimeSeriesRequest,
    QueryTimeSeriesResponse, RecordMetricPointsRequest, Retention, TimeRange, UpdateProjectRequest,
};

fn ts(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .with_timezone(&Utc)
}

fn point(name: &str, value: f64, t: DateTime<Utc>, labels: &[(&str, &str)]) -> MetricPoint {
    MetricPoint {
        name: name.into(),
        value,
        unit: "ms".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        recorded_at: Some(ts(t)),
    }
}

/// Integer values (sums exact in float8) from -500 to 1500, zeros included.
fn value(i: i64) -> f64 {
    ((i * 7919) % 2001 - 500) as f64
}

const SERIES: [&[(&str, &str)]; 3] = [
    &[("env", "prod"), ("host", "a")],
    &[("env", "prod"), ("host", "b")],
    &[("env", "dev"), ("host", "a")],
];

/// `n` points of metric `name` from `base`, 37 s apart, cycling through
/// SERIES; every 50th point sits exactly on an hour edge.
fn points(name: &str, base: DateTime<Utc>, n: i64, offset: i64) -> Vec<MetricPoint> {
    (offset..offset + n)
        .map(|i| {
            let t = if i % 50 == 0 {
                base + TimeDelta::hours(i / 50 % 48)
            } else {
                base + TimeDelta::seconds(i * 37)
            };
            point(name, value(i), t, SERIES[(i % 3) as usize])
        })
        .collect()
}

async fn record(app: &TestApp, slug: Option<&str>, batch: &str, points: Vec<MetricPoint>) {
    let req = RecordMetricPointsRequest {
        batch_id: batch.into(),
        points,
    };
    let req = match slug {
        Some(s) => in_project(req, s),
        None => tonic::Request::new(req),
    };
    app.metrics.clone().record_metric_points(req).await.unwrap();
}

fn query(
    name: &str,
    filter: &[(&str, &str)],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    width_secs: Option<i64>,
) -> QueryTimeSeriesRequest {
    QueryTimeSeriesRequest {
        name: name.into(),
        label_filter: filter
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        range: Some(TimeRange {
            start_time: Some(ts(from)),
            end_time: Some(ts(to)),
        }),
        bucket_width: width_secs.map(|s| PbDuration {
            seconds: s,
            nanos: 0,
        }),
        calendar_bucket: if width_secs.is_none() {
            CalendarBucket::Month as i32
        } else {
            0
        },
    }
}

/// Per non-empty bucket: count, sum, min, max and the nearest-rank
/// (percentile_disc) p50, p95, p99 of the raw points, computed by SQL.
type Expected = HashMap<i64, (i64, f64, f64, f64, [f64; 3])>;

async fn expected(
    sql: &tokio_postgres::Client,
    project: Uuid,
    q: &QueryTimeSeriesRequest,
) -> Expected {
    let from = q.range.as_ref().unwrap().start_time.unwrap();
    let to = q.range.as_ref().unwrap().end_time.unwrap();
    let filter = serde_json::to_value(&q.label_filter).unwrap();
    let width: f64 = q.bucket_width.map_or(0.0, |d| d.seconds as f64);
    sql.query(
        "SELECT extract(epoch FROM CASE WHEN $5::float8 = 0 THEN date_trunc('month', recorded_at) \
                     ELSE date_bin($5 * interval '1 second', recorded_at, 'epoch'::timestamptz) END)::int8 AS b, \
                count(*), sum(value), min(value), max(value), \
                percentile_disc(0.5) WITHIN GROUP (ORDER BY value), \
                percentile_disc(0.95) WITHIN GROUP (ORDER BY value), \
                percentile_disc(0.99) WITHIN GROUP (ORDER BY value) \
         FROM metric_points \
         WHERE project_id = $1 AND name = $2 AND ($3 = '{}'::jsonb OR labels @> $3) \
           AND recorded_at >= to_timestamp($4) AND recorded_at < to_timestamp($6) \
         GROUP BY 1",
        &[
            &project,
            &q.name,
            &filter,
            &(from.seconds as f64 + from.nanos as f64 / 1e9),
            &width,
            &(to.seconds as f64 + to.nanos as f64 / 1e9),
        ],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            (
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                [r.get(5), r.get(6), r.get(7)],
            ),
        )
    })
    .collect()
}

/// count, sum, avg, min and max equal the raw points' exactly; percentiles
/// are within 4.5 % of the nearest-rank value when estimated.
fn assert_agrees(label: &str, got: &QueryTimeSeriesResponse, want: &Expected) {
    let mut seen = 0;
    for b in &got.buckets {
        let start = b.start_time.unwrap().seconds;
        match want.get(&start) {
            None => {
                assert_eq!(b.count, 0, "{label}: bucket {start} is empty");
                assert_eq!((b.sum, b.min, b.p50), (None, None, None), "{label}");
            }
            Some((count, sum, min, max, pct)) => {
                seen += 1;
                assert_eq!(b.count, *count, "{label}: count of {start}");
                assert_eq!(b.sum, Some(*sum), "{label}: sum of {start}");
                assert_eq!(b.avg, Some(sum / *count as f64), "{label}: avg of {start}");
                assert_eq!((b.min, b.max), (Some(*min), Some(*max)), "{label}: {start}");
                for (got, want) in [b.p50, b.p95, b.p99].iter().zip(pct) {
                    let got = got.unwrap();
                    assert!(
                        (got - want).abs() <= 0.045 * want.abs(),
                        "{label}: percentile {got} vs nearest-rank {want} in {start}"
                    );
                    assert!(*min <= got && got <= *max, "{label}");
                }
            }
        }
    }
    assert_eq!(seen, want.len(), "{label}: every non-empty bucket answered");
}

/// How many series-hours differ from the aggregate of the raw points (either
/// side missing, or any figure or histogram different); and how many there are.
async fn hours_vs_raw(sql: &tokio_postgres::Client) -> (i64, i64) {
    let r = sql
        .query_one(
            "WITH per_bucket AS ( \
                 SELECT p.project_id, s.id AS series_id, \
                        date_bin(interval '1 hour', p.recorded_at, 'epoch'::timestamptz) AS hour, \
                        verdict_metric_bucket(p.value) AS b, count(*)::int8 AS n, \
                        sum(p.value) AS s, min(p.value) AS mn, max(p.value) AS mx \
                 FROM metric_points p JOIN metric_series s \
                   ON s.project_id = p.project_id AND s.name = p.name AND s.labels = p.labels \
                 GROUP BY 1, 2, 3, 4), \
             raw AS ( \
                 SELECT project_id, series_id, hour, sum(n)::int8 AS count, sum(s) AS sum, \
                        min(mn) AS min, max(mx) AS max, array_agg(b ORDER BY b) AS hb, \
                        array_agg(n ORDER BY b) AS hc \
                 FROM per_bucket GROUP BY 1, 2, 3) \
             SELECT count(*) FILTER (WHERE r.count IS DISTINCT FROM h.count \
                        OR r.sum IS DISTINCT FROM h.sum OR r.min IS DISTINCT FROM h.min \
                        OR r.max IS DISTINCT FROM h.max OR r.hb IS DISTINCT FROM h.hist_buckets \
                        OR r.hc IS DISTINCT FROM h.hist_counts), \
                    count(*) \
             FROM raw r FULL JOIN metric_series_hours h USING (project_id, series_id, hour)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// The same for the per-metric hours (V38): how many (project, name, hour)
/// rows of metric_name_hours differ from the aggregate of the raw points of
/// every series (the packed histogram of V40 included); and how many there
/// are.
async fn name_hours_vs_raw(sql: &tokio_postgres::Client) -> (i64, i64) {
    let r = sql
        .query_one(
            "WITH per_bucket AS ( \
                 SELECT p.project_id, p.name, \
                        date_bin(interval '1 hour', p.recorded_at, 'epoch'::timestamptz) AS hour, \
                        verdict_metric_bucket(p.value) AS b, count(*)::int8 AS n, \
                        sum(p.value) AS s, min(p.value) AS mn, max(p.value) AS mx \
                 FROM metric_points p \
                 GROUP BY 1, 2, 3, 4), \
             raw AS ( \
                 SELECT project_id, name, hour, sum(n)::int8 AS count, sum(s) AS sum, \
                        min(mn) AS min, max(mx) AS max, array_agg(b ORDER BY b) AS hb, \
                        array_agg(n ORDER BY b) AS hc \
                 FROM per_bucket GROUP BY 1, 2, 3) \
             SELECT count(*) FILTER (WHERE r.count IS DISTINCT FROM h.count \
                        OR r.sum IS DISTINCT FROM h.sum OR r.min IS DISTINCT FROM h.min \
                        OR r.max IS DISTINCT FROM h.max OR r.hb IS DISTINCT FROM h.hist_buckets \
                        OR r.hc IS DISTINCT FROM h.hist_counts \
                        OR h.hist IS DISTINCT FROM array_send(r.hb) || array_send(r.hc)), \
                    count(*) \
             FROM raw r FULL JOIN metric_name_hours h USING (project_id, name, hour)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// The same for the per-label-pair hours (V39): how many (project, name,
/// key, value, hour) rows of metric_label_hours differ from the aggregate of
/// the raw points whose labels contain that pair (`labels @> {key: value}`,
/// a string value within the gateway's label limits; the packed histogram
/// of V40 included); and how many there are.
async fn label_hours_vs_raw(sql: &tokio_postgres::Client) -> (i64, i64) {
    let r = sql
        .query_one(
            "WITH per_bucket AS ( \
                 SELECT p.project_id, p.name, e.key AS label_key, e.value AS label_value, \
                        date_bin(interval '1 hour', p.recorded_at, 'epoch'::timestamptz) AS hour, \
                        verdict_metric_bucket(p.value) AS b, count(*)::int8 AS n, \
                        sum(p.value) AS s, min(p.value) AS mn, max(p.value) AS mx \
                 FROM metric_points p \
                 CROSS JOIN LATERAL jsonb_each_text(CASE WHEN jsonb_typeof(p.labels) = 'object' \
                                                         THEN p.labels ELSE '{}' END) e \
                 WHERE p.labels @> jsonb_build_object(e.key, e.value) \
                   AND char_length(e.key) <= 64 AND char_length(e.value) <= 256 \
                 GROUP BY 1, 2, 3, 4, 5, 6), \
             raw AS ( \
                 SELECT project_id, name, label_key, label_value, hour, sum(n)::int8 AS count, \
                        sum(s) AS sum, min(mn) AS min, max(mx) AS max, \
                        array_agg(b ORDER BY b) AS hb, array_agg(n ORDER BY b) AS hc \
                 FROM per_bucket GROUP BY 1, 2, 3, 4, 5) \
             SELECT count(*) FILTER (WHERE r.count IS DISTINCT FROM h.count \
                        OR r.sum IS DISTINCT FROM h.sum OR r.min IS DISTINCT FROM h.min \
                        OR r.max IS DISTINCT FROM h.max OR r.hb IS DISTINCT FROM h.hist_buckets \
                        OR r.hc IS DISTINCT FROM h.hist_counts \
                        OR h.hist IS DISTINCT FROM array_send(r.hb) || array_send(r.hc)), \
                    count(*) \
             FROM raw r FULL JOIN metric_label_hours h \
               USING (project_id, name, label_key, label_value, hour)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// The three aggregate levels equal the raw points exactly (integer values:
/// the sums are exact too).
async fn assert_hours_match_raw(sql: &tokio_postgres::Client, label: &str) {
    let (differ, total) = hours_vs_raw(sql).await;
    assert_eq!(
        differ, 0,
        "{label}: series-hours differing from the raw points"
    );
    assert!(total > 0, "{label}: there are series-hours to compare");
    let (differ, total) = name_hours_vs_raw(sql).await;
    assert_eq!(
        differ, 0,
        "{label}: metric name-hours differing from the raw points"
    );
    assert!(total > 0, "{label}: there are name-hours to compare");
    let (differ, total) = label_hours_vs_raw(sql).await;
    assert_eq!(
        differ, 0,
        "{label}: label-pair hours differing from the raw points"
    );
    assert!(total > 0, "{label}: there are label-pair hours to compare");
}

#[tokio::test]
async fn aggregated_series_equal_the_raw_points_across_edges_labels_and_widths() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    let sql = app.sql().await;
    sql.batch_execute("SET TIME ZONE 'UTC'").await.unwrap();
    let base = at("2026-03-30T22:00:00Z");
    // 32,000 points over ~14 days across the turn of a month, three series
    // (over 10,000 each, so a filter naming one series is estimated too).
    for k in 0..4 {
        record(
            &app,
            None,
            &format!("s{k}"),
            points("lat", base, 8000, k * 8000),
        )
        .await;
    }
    // Another metric and another project's same metric: never mixed in.
    record(&app, None, "other", points("other", base, 500, 0)).await;
    create_project(&app, "elsewhere").await;
    record(&app, Some("elsewhere"), "e", points("lat", base, 500, 0)).await;
    assert_hours_match_raw(&sql, "after the writes").await;

    let mid_from = base + TimeDelta::seconds(1234);
    let mid_to = base + TimeDelta::seconds(32_000 * 37 - 777);
    // One pair reads the label-pair hours (V39), two pairs the series-hours
    // (V34), none the name-hours (V38).
    let prod: &[(&str, &str)] = &[("env", "prod")];
    let host_a: &[(&str, &str)] = &[("host", "a")];
    let prod_a: &[(&str, &str)] = &[("env", "prod"), ("host", "a")];
    let cases: Vec<(&str, QueryTimeSeriesRequest)> = vec![
        ("1 h, all", query("lat", &[], mid_from, mid_to, Some(3600))),
        (
            "1 h, prod",
            query("lat", prod, mid_from, mid_to, Some(3600)),
        ),
        (
            "1 d, all",
            query("lat", &[], mid_from, mid_to, Some(86_400)),
        ),
        (
            "1 d, prod",
            query("lat", prod, mid_from, mid_to, Some(86_400)),
        ),
        (
            "3 h, all, whole hours",
            query("lat", &[], base, base + TimeDelta::days(9), Some(10_800)),
        ),
        (
            "1 h, host=a (two series)",
            query("lat", host_a, mid_from, mid_to, Some(3600)),
        ),
        (
            "1 h, prod and host=a",
            query("lat", prod_a, mid_from, mid_to, Some(3600)),
        ),
        (
            "6 h, host=a, whole hours",
            query("lat", host_a, base, base + TimeDelta::days(9), Some(21_600)),
        ),
        ("month, prod", query("lat", prod, mid_from, mid_to, None)),
        (
            "month, prod and host=a",
            query("lat", prod_a, mid_from, mid_to, None),
        ),
        (
            "month, all",
            query("lat", &[], base, base + TimeDelta::days(12), None),
        ),
    ];
    for (label, q) in cases {
        let want = expected(&sql, project, &q).await;
        let got = app
            .metrics
            .clone()
            .query_time_series(q)
            .await
            .unwrap()
            .into_inner();
        assert!(got.percentiles_estimated, "{label}: over 10000 points");
        assert_agrees(label, &got, &want);
    }

    // host=b is on one series only, so the one-pair filter (label-pair
    // hours) and the two-pair filter naming that series (series-hours) pick
    // the same points: both paths answer the same buckets, figure for figure.
    for width in [Some(3600), Some(86_400), None] {
        let one = query("lat", &[("host", "b")], mid_from, mid_to, width);
        let two = query(
            "lat",
            &[("env", "prod"), ("host", "b")],
            mid_from,
            mid_to,
            width,
        );
        let want = expected(&sql, project, &one).await;
        assert_eq!(want, expected(&sql, project, &two).await);
        let mut got = Vec::new();
        for q in [one, two] {
            let r = app
                .metrics
                .clone()
                .query_time_series(q)
                .await
                .unwrap()
                .into_inner();
            assert!(r.percentiles_estimated, "{width:?}: over 10000 points");
            assert_agrees(&format!("host=b, {width:?}"), &r, &want);
            got.push(r);
        }
        assert_eq!(got[0], got[1], "{width:?}: one pair and two pairs agree");
    }

    // Which rows answer which filter: a row of metric_label_hours tampered
    // with (count + 1000) shows in the one-pair answer of its hour and in
    // no other filter's.
    let hour = base + TimeDelta::hours(30);
    let tamper = "UPDATE metric_label_hours SET count = count + $1 \
                  WHERE name = 'lat' AND label_key = 'env' AND label_value = 'prod' AND hour = $2";
    assert_eq!(sql.execute(tamper, &[&1000i64, &hour]).await.unwrap(), 1);
    let count_at = |got: &QueryTimeSeriesResponse| {
        got.buckets
            .iter()
            .find(|b| b.start_time.unwrap().seconds == hour.timestamp())
            .map(|b| b.count)
            .unwrap()
    };
    for (filter, extra) in [(prod, 1000), (prod_a, 0), (&[][..], 0), (host_a, 0)] {
        let q = query("lat", filter, mid_from, mid_to, Some(3600));
        let want = expected(&sql, project, &q).await[&hour.timestamp()].0;
        let got = app
            .metrics
            .clone()
            .query_time_series(q)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(count_at(&got), want + extra, "{filter:?}");
    }
    sql.execute(tamper, &[&-1000i64, &hour]).await.unwrap();

    // A range of at most 10000 points is read point by point: exact
    // continuous percentiles, not estimated.
    let small = query(
        "lat",
        prod,
        mid_from,
        mid_from + TimeDelta::hours(20),
        Some(3600),
    );
    let got = app
        .metrics
        .clone()
        .query_time_series(small.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!got.percentiles_estimated);
    let exact: Vec<(i64, Option<f64>)> = sql
        .query(
            "SELECT extract(epoch FROM date_bin(interval '1 hour', recorded_at, 'epoch'::timestamptz))::int8, \
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY value) \
             FROM metric_points WHERE project_id = $1 AND name = 'lat' AND labels @> '{\"env\": \"prod\"}' \
               AND recorded_at >= $2 AND recorded_at < $3 GROUP BY 1 ORDER BY 1",
            &[&project, &mid_from, &(mid_from + TimeDelta::hours(20))],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let answered: Vec<(i64, Option<f64>)> = got
        .buckets
        .iter()
        .filter(|b| b.count > 0)
        .map(|b| (b.start_time.unwrap().seconds, b.p95))
        .collect();
    assert_eq!(answered, exact);
}

#[tokio::test]
async fn concurrent_writers_to_the_same_series_hours_leave_exact_aggregates() {
    let app = spawn_app().await;
    let sql = app.sql().await;
    let base = at("2026-05-01T10:00:00Z");
    let tasks: Vec<_> = (0..8i64)
        .map(|w| {
            let mut client = app.metrics.clone();
            tokio::spawn(async move {
                for b in 0..5i64 {
                    // The same three hours, in another order per writer.
                    let pts: Vec<MetricPoint> = (0..300i64)
                        .map(|i| {
                            let hour = (i + w) % 3;
                            let t = base
                                + TimeDelta::hours(if w % 2 == 0 { hour } else { 2 - hour })
                                + TimeDelta::seconds((i * 13 + w) % 3600);
                            // Two writers per series: the same series-hours
                            // and, across series, the same name-hours.
                            point(
                                "hot",
                                value(w * 10_000 + b * 1000 + i),
                                t,
                                SERIES[(w % 3) as usize],
                            )
                        })
                        .collect();
                    client
                        .record_metric_points(RecordMetricPointsRequest {
                            batch_id: format!("w{w}-b{b}"),
                            points: pts,
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let all = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        futures::future::join_all(tasks),
    )
    .await
    .expect("8 writers finish without deadlocking");
    for r in all {
        r.unwrap();
    }
    assert_hours_match_raw(&sql, "after 8 concurrent writers").await;
    let n: i64 = sql
        .query_one(
            "SELECT sum(count)::int8 FROM metric_series_hours h JOIN metric_series s ON s.id = h.series_id \
             WHERE s.name = 'hot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 8 * 5 * 300);
    let n: i64 = sql
        .query_one(
            "SELECT sum(count)::int8 FROM metric_name_hours WHERE name = 'hot'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 8 * 5 * 300);
    // Every point carries one env and one host: each key counts each once.
    for key in ["env", "host"] {
        let n: i64 = sql
            .query_one(
                "SELECT sum(count)::int8 FROM metric_label_hours WHERE name = 'hot' AND label_key = $1",
                &[&key],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 8 * 5 * 300, "{key}");
    }

    let got = app
        .metrics
        .clone()
        .query_time_series(query(
            "hot",
            &[],
            base,
            base + TimeDelta::hours(3),
            Some(3600),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.buckets.iter().map(|b| b.count).sum::<i64>(), 12_000);
    assert!(got.percentiles_estimated);
    // env=prod: the writers of SERIES 0 and 1, 6 of 8.
    let n: i64 = sql
        .query_one(
            "SELECT sum(count)::int8 FROM metric_label_hours \
             WHERE name = 'hot' AND label_key = 'env' AND label_value = 'prod'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 6 * 5 * 300);

    // Writers again, while direct SQL deletes points of the same hours and
    // moves others into a fourth hour (new name-hours, label-pair hours and
    // series-hours that the writers add to at the same time), some of them
    // to another label set (env=qa: a new series and new label pairs).
    let mut tasks: Vec<_> = (0..6i64)
        .map(|w| {
            let mut client = app.metrics.clone();
            tokio::spawn(async move {
                for b in 0..4i64 {
                    let pts: Vec<MetricPoint> = (0..600i64)
                        .map(|i| {
                            let t = base
                                + TimeDelta::hours((i + w + b) % 4)
                                + TimeDelta::seconds((i * 17 + w) % 3600);
                            point("hot", value(i + w), t, SERIES[((w + i) % 3) as usize])
                        })
                        .collect();
                    client
                        .record_metric_points(RecordMetricPointsRequest {
                            batch_id: format!("m{w}-b{b}"),
                            points: pts,
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for k in 0..2i64 {
        let mutator = app.sql().await;
        tasks.push(tokio::spawn(async move {
            for round in 0..4i64 {
                mutator
                    .execute(
                        "DELETE FROM metric_points WHERE name = 'hot' AND id % 29 = $1",
                        &[&(round * 2 + k)],
                    )
                    .await
                    .unwrap();
                mutator
                    .execute(
                        "UPDATE metric_points SET recorded_at = recorded_at + interval '1 hour', \
                                value = value + 1, \
                                labels = CASE WHEN id % 2 = 0 THEN labels \
                                              ELSE '{\"env\": \"qa\", \"host\": \"a\"}' END \
                         WHERE name = 'hot' AND id % 17 = $1 AND recorded_at < $2",
                        &[&(round * 2 + k), &(base + TimeDelta::hours(3))],
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    let all = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        futures::future::join_all(tasks),
    )
    .await
    .expect("writers and direct deletes/updates finish without deadlocking");
    for r in all {
        r.unwrap();
    }
    assert_hours_match_raw(&sql, "after writers with concurrent deletes and updates").await;
    let raw: i64 = sql
        .query_one("SELECT count(*) FROM metric_points WHERE name = 'hot'", &[])
        .await
        .unwrap()
        .get(0);
    let got = app
        .metrics
        .clone()
        .query_time_series(query(
            "hot",
            &[],
            base,
            base + TimeDelta::hours(4),
            Some(3600),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.buckets.iter().map(|b| b.count).sum::<i64>(), raw);
    assert!(raw > 10_000 && got.percentiles_estimated, "{raw} points");
    // The one-pair filter host=a (label-pair hours) against the raw points.
    let q = query(
        "hot",
        &[("host", "a")],
        base,
        base + TimeDelta::hours(4),
        Some(3600),
    );
    let want = expected(&sql, default_project(&app).await, &q).await;
    let got = app
        .metrics
        .clone()
        .query_time_series(q)
        .await
        .unwrap()
        .into_inner();
    assert!(got.percentiles_estimated);
    assert_agrees("host=a after concurrent writers and movers", &got, &want);
}

#[tokio::test]
async fn a_writer_terminated_mid_batch_leaves_no_trace_in_points_or_aggregates() {
    let app = spawn_app().await;
    let sql = app.sql().await;
    let base = at("2026-06-01T00:00:00Z");
    record(&app, None, "first", points("f", base, 900, 0)).await;
    assert_hours_match_raw(&sql, "before").await;

    // Another transaction holds one series-hour (V34), then one name-hour
    // (V38), then one label-pair hour (V39) the next batch adds to: the
    // gateway's INSERT has written its points (and, in the later rounds, the
    // series-hours and name-hours) and waits in the trigger. (Hour 28 holds
    // one earlier point, of env=dev and host=a.)
    let locks = [
        "SELECT 1 FROM metric_series_hours h JOIN metric_series s ON s.id = h.series_id \
         WHERE s.name = 'f' AND h.hour = $1 FOR UPDATE OF h",
        "SELECT 1 FROM metric_name_hours h WHERE h.name = 'f' AND h.hour = $1 FOR UPDATE",
        "SELECT 1 FROM metric_label_hours h WHERE h.name = 'f' AND h.label_key = 'host' \
           AND h.label_value = 'a' AND h.hour = $1 FOR UPDATE",
    ];
    let mut stored = 900i64;
    for (round, lock) in locks.into_iter().enumerate() {
        let offset = 900 * (round as i64 + 1);
        let holder = app.sql().await;
        holder.batch_execute("BEGIN").await.unwrap();
        let held = holder
            .execute(lock, &[&(base + TimeDelta::hours(10 + 9 * round as i64))])
            .await
            .unwrap();
        assert_eq!(held, 1, "round {round}: the hour to hold exists");
        let mut client = app.metrics.clone();
        let batch = RecordMetricPointsRequest {
            batch_id: format!("second-{round}"),
            points: points("f", base, 900, offset),
        };
        let call = tokio::spawn({
            let batch = batch.clone();
            async move { client.record_metric_points(batch).await }
        });
        let observer = app.sql().await;
        wait_for_lock_wait(&observer, "%metric_points%").await;
        terminate_lock_waiter(&observer, "%metric_points%").await;
        let status = call.await.unwrap().expect_err("the terminated call fails");
        assert_ne!(status.code(), tonic::Code::Ok);
        assert!(!status.message().contains("metric_series"), "{status:?}");
        assert!(!status.message().contains("metric_name"), "{status:?}");
        assert!(!status.message().contains("metric_label"), "{status:?}");
        holder.batch_execute("ROLLBACK").await.unwrap();

        let n: i64 = sql
            .query_one("SELECT count(*) FROM metric_points WHERE name = 'f'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, stored,
            "round {round}: none of the terminated batch's points stayed"
        );
        assert_hours_match_raw(&sql, &format!("round {round}: after the terminated batch")).await;

        // The retry writes the whole batch once.
        let again = app
            .metrics
            .clone()
            .record_metric_points(batch)
            .await
            .unwrap()
            .into_inner();
        assert_eq!((again.recorded, again.replayed), (900, false));
        stored += 900;
        assert_hours_match_raw(&sql, &format!("round {round}: after the retry")).await;
    }
}

#[tokio::test]
async fn retention_cleanup_and_direct_deletes_and_updates_keep_the_aggregates_right() {
    let app = spawn_app().await;
    create_project(&app, "kept").await;
    let project: Uuid = app
        .sql()
        .await
        .query_one("SELECT id FROM projects WHERE slug = 'kept'", &[])
        .await
        .unwrap()
        .get(0);
    let sql = app.sql().await;
    // 40 days ago to 10 days ago: a 30-day retention cuts mid-hour.
    let base = Utc::now() - TimeDelta::days(40) + TimeDelta::seconds(1111);
    for k in 0..6i64 {
        let pts: Vec<MetricPoint> = (0..5000i64)
            .map(|i| {
                let j = k * 5000 + i;
                point(
                    "ret",
                    value(j),
                    base + TimeDelta::seconds(j * 86),
                    SERIES[(j % 3) as usize],
                )
            })
            .collect();
        record(&app, Some("kept"), &format!("r{k}"), pts).await;
    }
    assert_hours_match_raw(&sql, "before the cleanup").await;

    ProjectServiceClient::new(app.channel.clone())
        .update_project(UpdateProjectRequest {
            slug: "kept".into(),
            retention: Some(Retention {
                metric_points_days: Some(30),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let done = app
        .admin
        .clone()
        .cleanup(in_project(
            CleanupRequest {
                older_than: Some(PbDuration {
                    seconds: 1000 * 86_400,
                    nanos: 0,
                }),
                cutoff: None,
                dry_run: false,
                batch_size: 777,
            },
            "kept",
        ))
        .await
        .unwrap()
        .into_inner();
    let left: i64 = sql
        .query_one(
            "SELECT count(*) FROM metric_points WHERE project_id = $1",
            &[&project],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        left > 12_000 && left < 30_000,
        "the cleanup deleted some: {done:?}"
    );
    assert_hours_match_raw(&sql, "after the cleanup").await;

    // Direct SQL: a delete of part of some hours, an update moving points
    // to other values, labels and hours.
    sql.batch_execute(
        "DELETE FROM metric_points WHERE name = 'ret' AND id % 7 = 0; \
         UPDATE metric_points SET value = value * 3 + 1, \
                labels = '{\"env\": \"qa\"}', recorded_at = recorded_at + interval '90 minutes' \
         WHERE name = 'ret' AND id % 11 = 0",
    )
    .await
    .unwrap();
    assert_hours_match_raw(&sql, "after direct deletes and updates").await;

    // Careless direct SQL: label sets the gateway never writes (not an
    // object, a number, an array, a value over 256 characters). The insert
    // succeeds; only string pairs within the limits are kept, so a one-pair
    // filter still matches what `labels @>` matches on the points.
    sql.execute(
        "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
         SELECT $1, 'ret', g, 'ms', \
                (ARRAY['[1]'::jsonb, '\"s\"'::jsonb, '{\"env\": 1}'::jsonb, '{\"env\": [\"prod\"]}'::jsonb, \
                       jsonb_build_object('env', 'prod', 'note', repeat('x', 300))])[1 + g % 5], \
                now() - interval '20 days' + g * interval '1 minute' \
         FROM generate_series(1, 500) g",
        &[&project],
    )
    .await
    .unwrap();
    assert_hours_match_raw(&sql, "after label sets the gateway never writes").await;

    for (label, filter) in [
        ("after deletes", &[][..]),
        ("after deletes, prod", &[("env", "prod")][..]),
        ("after deletes, host=a", &[("host", "a")][..]),
        (
            "after deletes, prod and host=a",
            &[("env", "prod"), ("host", "a")][..],
        ),
    ] {
        let q = query(
            "ret",
            filter,
            Utc::now() - TimeDelta::days(31),
            Utc::now(),
            Some(86_400),
        );
        let want = expected(&sql, project, &q).await;
        let got = app
            .metrics
            .clone()
            .query_time_series(in_project(q, "kept"))
            .await
            .unwrap()
            .into_inner();
        let n: i64 = want.values().map(|w| w.0).sum();
        assert_eq!(got.percentiles_estimated, n > 10_000, "{label}: {n} points");
        if got.percentiles_estimated {
            assert_agrees(label, &got, &want);
        } else {
            // Exact continuous percentiles (not comparable with the nearest
            // rank in a bucket of a few points): the other figures.
            for b in &got.buckets {
                let w = want.get(&b.start_time.unwrap().seconds);
                assert_eq!(b.count, w.map_or(0, |w| w.0), "{label}");
                assert_eq!(b.sum, w.map(|w| w.1), "{label}");
            }
        }
    }

    // The project's deletion cascades through the points' triggers: it
    // succeeds, and no aggregate of it stays.
    ProjectServiceClient::new(app.channel.clone())
        .delete_project(DeleteProjectRequest {
            slug: "kept".into(),
            force: true,
            expected_version: None,
        })
        .await
        .unwrap();
    let left: i64 = sql
        .query_one(
            "SELECT (SELECT count(*) FROM metric_name_hours WHERE project_id = $1) \
                  + (SELECT count(*) FROM metric_series_hours WHERE project_id = $1) \
                  + (SELECT count(*) FROM metric_label_hours WHERE project_id = $1)",
            &[&project],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "no aggregate of the deleted project stays");
    assert_eq!(name_hours_vs_raw(&sql).await.0, 0);
    assert_eq!(label_hours_vs_raw(&sql).await.0, 0);
}

#[tokio::test]
async fn v39_fills_the_label_pair_hours_from_the_points_stored_before_it() {
    let (_, url) = create_database().await;
    let mut old = admin_client(&url).await;
    verdict::db::migrate::run_to(&mut old, 38).await.unwrap();
    // 30,000 points of two envs and three hosts (and some with a number
    // label, which no one-pair filter matches), through V38's triggers.
    old.batch_execute(
        "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
         SELECT (SELECT id FROM projects WHERE slug = 'default'), 'old', (g * 7919) % 2001 - 500, 'ms', \
                CASE WHEN g % 7 = 0 THEN '{\"env\": 1}'::jsonb \
                     ELSE jsonb_build_object('env', (ARRAY['prod', 'dev'])[1 + g % 2], 'host', 'h' || g % 3) END, \
                timestamptz '2026-02-01' + g * interval '17 seconds' \
         FROM generate_series(1, 30000) g",
    )
    .await
    .unwrap();
    let before: Option<String> = old
        .query_one("SELECT to_regclass('metric_label_hours')::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, None, "V38 has no label-pair hours");
    drop(old);

    // The gateway migrates at start-up (V39 backfills).
    let app = spawn_app_with(test_config(&url)).await;
    let project = default_project(&app).await;
    let sql = app.sql().await;
    assert_hours_match_raw(&sql, "after V39's backfill").await;
    let from = at("2026-02-01T00:00:00Z");
    let q = query(
        "old",
        &[("env", "prod")],
        from,
        from + TimeDelta::days(6),
        Some(3600),
    );
    let want = expected(&sql, project, &q).await;
    let got = app
        .metrics
        .clone()
        .query_time_series(q)
        .await
        .unwrap()
        .into_inner();
    assert!(got.percentiles_estimated);
    assert_agrees("env=prod after the backfill", &got, &want);

    // The redefined trigger bodies add to the backfilled rows.
    let more: Vec<MetricPoint> = (0..3000i64)
        .map(|i| {
            point(
                "old",
                value(i),
                from + TimeDelta::seconds(i * 61),
                &[("env", "prod"), ("host", "h1")],
            )
        })
        .collect();
    record(&app, None, "after", more).await;
    assert_hours_match_raw(&sql, "after a write on the migrated schema").await;
}

#[tokio::test]
async fn the_sql_bucket_function_is_the_gateways_and_is_inlined() {
    let app = spawn_app().await;
    let sql = app.sql().await;
    let mut values = vec![
        0.0,
        -0.0,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::MIN_POSITIVE,
        1e100,
        -1e100,
    ];
    let mut v = 1e-300_f64;
    while v < 1e300 {
        values.extend([v, -v, v * 1.0905, -v * 1.0905]);
        v *= 1.37;
    }
    let got: Vec<Option<i32>> = sql
        .query_one(
            "SELECT array_agg(verdict_metric_bucket(v) ORDER BY i) \
             FROM unnest($1::float8[]) WITH ORDINALITY AS u(v, i)",
            &[&values],
        )
        .await
        .unwrap()
        .get(0);
    let want: Vec<Option<i32>> = values
        .iter()
        .map(|v| Some(verdict::metrics::hours::bucket_of(*v)))
        .collect();
    assert_eq!(got, want);
    let null: Option<i32> = sql
        .query_one("SELECT verdict_metric_bucket(NULL)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(null, None);
    // V39: inlined into the calling statement (no function call per point).
    let plan: String = sql
        .query(
            "EXPLAIN VERBOSE SELECT verdict_metric_bucket(value) FROM metric_points",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!plan.contains("verdict_metric_bucket"), "{plan}");
    assert!(plan.contains("CASE"), "{plan}");
}

/// Every (node type, relation, index, actual rows) of a JSON plan.
fn nodes(plan: &Value, out: &mut Vec<(String, String, String, f64)>) {
    let text = |k: &str| plan.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let rows = plan
        .get("Actual Rows")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        * plan
            .get("Actual Loops")
            .and_then(Value::as_f64)
            .unwrap_or(1.0);
    out.push((
        text("Node Type"),
        text("Relation Name"),
        text("Index Name"),
        rows,
    ));
    if let Some(children) = plan.get("Plans").and_then(Value::as_array) {
        for c in children {
            nodes(c, out);
        }
    }
}

#[tokio::test]
async fn the_gateways_series_statements_read_the_aggregates_not_the_range_of_points() {
    let app = spawn_app().await;
    let project = default_project(&app).await;
    let sql = app.sql().await;
    sql.batch_execute("SET statement_timeout = 0")
        .await
        .unwrap();
    let p = format!("'{project}'::uuid");
    // A million points, 20 names interleaved over 90 days (about 23 per
    // name and hour), through the insert trigger; then a one-statement
    // comparison says the aggregates are those of the points.
    sql.batch_execute(&format!(
        "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
         SELECT {p}, 'metric_' || (g % 20), g % 1000, 'ms', \
                jsonb_build_object('env', (ARRAY['prod', 'staging', 'dev'])[1 + (g / 20) % 3]), \
                now() - make_interval(secs => (1 - g::float8 / 1000000) * 90 * 86400) \
         FROM generate_series(0, 999999) g"
    ))
    .await
    .unwrap();
    for t in [
        "metric_points",
        "metric_series",
        "metric_series_hours",
        "metric_name_hours",
        "metric_label_hours",
    ] {
        sql.batch_execute(&format!("VACUUM ANALYZE {t}"))
            .await
            .unwrap();
    }
    assert_hours_match_raw(&sql, "a million points").await;

    sql.batch_execute("SET plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    let range = "now() - interval '90 days' - interval '17 minutes', now(), ";
    let hours = "date_trunc('hour', now() - interval '90 days') + interval '1 hour', date_trunc('hour', now())";
    let checks: Vec<(&str, &Stmt, String)> = vec![
        (
            "hours_all",
            &verdict::metrics::sql::HOURS_FIXED_ALL,
            format!("'metric_3', {range} 3600, '{{}}', {p}, {hours}"),
        ),
        (
            "hours_day",
            &verdict::metrics::sql::HOURS_FIXED_ALL,
            format!("'metric_3', {range} 86400, '{{}}', {p}, {hours}"),
        ),
        (
            "hours_labels",
            &verdict::metrics::sql::HOURS_FIXED,
            format!("'metric_3', {range} 3600, '{{\"env\": \"prod\"}}', {p}, {hours}"),
        ),
        (
            "hours_day_labels",
            &verdict::metrics::sql::HOURS_FIXED,
            format!("'metric_3', {range} 86400, '{{\"env\": \"prod\"}}', {p}, {hours}"),
        ),
        (
            "hours_month",
            &verdict::metrics::sql::HOURS_MONTH_ALL,
            format!("'metric_3', {range} '{{}}', {p}, {hours}"),
        ),
        (
            "hours_month_labels",
            &verdict::metrics::sql::HOURS_MONTH,
            format!("'metric_3', {range} '{{\"env\": \"dev\"}}', {p}, {hours}"),
        ),
        (
            "hours_label",
            &verdict::metrics::sql::HOURS_FIXED_LABEL,
            format!(
                "'metric_3', {range} 3600, '{{\"env\": \"prod\"}}', {p}, {hours}, 'env', 'prod'"
            ),
        ),
        (
            "hours_day_label",
            &verdict::metrics::sql::HOURS_FIXED_LABEL,
            format!(
                "'metric_3', {range} 86400, '{{\"env\": \"staging\"}}', {p}, {hours}, 'env', 'staging'"
            ),
        ),
        (
            "hours_month_label",
            &verdict::metrics::sql::HOURS_MONTH_LABEL,
            format!("'metric_3', {range} '{{\"env\": \"dev\"}}', {p}, {hours}, 'env', 'dev'"),
        ),
    ];
    for (name, stmt, args) in checks {
        sql.batch_execute(&format!("PREPARE {name} AS {}", stmt.sql))
            .await
            .unwrap_or_else(|e| panic!("prepare {name}: {e}"));
        let plan: Value = sql
            .query_one(
                &format!("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}({args})"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("explain {name}: {e}"))
            .get(0);
        let mut out = Vec::new();
        nodes(&plan[0]["Plan"], &mut out);
        // Without a label filter, the per-metric hours (V38), and with one
        // pair, the per-pair hours (V39): one row per hour of the name (or
        // pair), never the per-series rows; with the series statement (two
        // or more pairs), the matching series' hours.
        let (reads, not) = if name.ends_with("_labels") {
            (
                "metric_series_hours",
                ["metric_name_hours", "metric_label_hours"],
            )
        } else if name.ends_with("_label") {
            (
                "metric_label_hours",
                ["metric_name_hours", "metric_series_hours"],
            )
        } else {
            (
                "metric_name_hours",
                ["metric_series_hours", "metric_label_hours"],
            )
        };
        assert!(
            out.iter()
                .any(|(_, rel, idx, _)| rel == reads && *idx == format!("{reads}_pkey")),
            "{name} reads {reads} by its key: {out:?}"
        );
        assert!(
            !out.iter().any(|(_, rel, _, _)| not.contains(&rel.as_str())),
            "{name} does not read {not:?}: {out:?}"
        );
        let hour_rows: f64 = out
            .iter()
            .filter(|(_, rel, _, _)| rel == reads)
            .map(|(_, _, _, rows)| rows)
            .sum();
        if reads != "metric_series_hours" {
            // 90 days of whole hours, one row each (every hour of the name
            // holds points of each env).
            assert!(
                (2100.0..=2160.0).contains(&hour_rows),
                "{name}: one row per hour of the name: {hour_rows}, {out:?}"
            );
        }
        assert!(
            !out.iter()
                .any(|(t, rel, _, _)| rel == "metric_points" && t == "Seq Scan"),
            "{name} does not scan the points: {out:?}"
        );
        // Only the partial hours at the edges: about 23 points per hour of
        // one name (and 17 minutes of them at the start).
        let raw: f64 = out
            .iter()
            .filter(|(_, rel, _, _)| rel == "metric_points")
            .map(|(_, _, _, rows)| rows)
            .sum();
        assert!(
            raw <= 100.0,
            "{name} reads only the edge points of metric_points: {raw} rows, {out:?}"
        );
    }
}
