//! Bounds of accepted data: whatever the API accepts reads back exactly and
//! every aggregate over it stays in range; what it cannot keep that promise
//! for is refused with INVALID_ARGUMENT naming the field.

use crate::helpers::{TestApp, spawn_app, violated_fields, violations};
use crate::results::new_result;
use crate::sessions::{create, new_session, set_status};
use crate::test_cases::{at, create_test_case, new_test_case, run};
use prost_types::{ListValue, Struct, Value, value::Kind};
use tonic::Code;
use verdict::proto::{
    AppendSessionLogRequest, CheckIntegrityRequest, CleanupRequest, CoverageCounters,
    CreateTestCaseRequest, ExecutionStatus, ExportSessionRequest, FileCoverage,
    GetAggregateCoverageRequest, GetResultRequest, GetSessionRequest, GetTestCaseRequest,
    ListExecutionsRequest, ListSessionLogsRequest, LogLevel, MetricPoint, QueryTimeSeriesRequest,
    RecordCoverageRequest, RecordExecutionsRequest, RecordMetricPointsRequest, SessionStatus,
    TestType, TimeRange, export_record::Record, get_session_request::Lookup, get_test_case_request,
};

/// The documented largest coverage counter (2^40).
const MAX_COUNTER: i64 = 1 << 40;
/// The documented largest metric magnitude.
const MAX_METRIC: f64 = 1e100;

/// Doubles at the edges of what a `Struct` can carry: every one must read
/// back bit for bit.
fn edge_numbers() -> Vec<(&'static str, f64)> {
    vec![
        ("max", f64::MAX),
        ("lowest", f64::MIN),
        ("smallest_normal", f64::MIN_POSITIVE),
        ("smallest_subnormal", 5e-324),
        ("negative_subnormal", -5e-324),
        ("point_three", 0.1 + 0.2),
        ("big_integer", 9_007_199_254_740_993.0),
        ("e308", 1e308),
        ("negative_zero", -0.0),
        ("third", 1.0 / 3.0),
    ]
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

/// A Struct of the edge numbers, flat, in a list and in a nested object.
fn edge_struct() -> Struct {
    let flat: Struct = Struct {
        fields: edge_numbers()
            .into_iter()
            .map(|(k, n)| (k.to_owned(), number(n)))
            .collect(),
    };
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: edge_numbers().into_iter().map(|(_, n)| number(n)).collect(),
        })),
    };
    let mut s = flat.clone();
    s.fields.insert("list".into(), list);
    s.fields.insert(
        "nested".into(),
        Value {
            kind: Some(Kind::StructValue(flat)),
        },
    );
    s
}

/// Asserts `got` holds the edge numbers exactly (bit for bit).
fn assert_edges(what: &str, got: Option<&Struct>) {
    let got = got.unwrap_or_else(|| panic!("{what}: no struct"));
    let bits = |v: Option<&Value>| match v.and_then(|v| v.kind.as_ref()) {
        Some(Kind::NumberValue(n)) => n.to_bits(),
        other => panic!("{what}: not a number: {other:?}"),
    };
    let nested = match got.fields.get("nested").and_then(|v| v.kind.as_ref()) {
        Some(Kind::StructValue(s)) => s,
        other => panic!("{what}: nested is {other:?}"),
    };
    let list = match got.fields.get("list").and_then(|v| v.kind.as_ref()) {
        Some(Kind::ListValue(l)) => l,
        other => panic!("{what}: list is {other:?}"),
    };
    for (i, (k, n)) in edge_numbers().into_iter().enumerate() {
        // -0.0 is stored as the JSON number 0 (jsonb has no signed zero).
        let want = if n == 0.0 {
            0.0f64.to_bits()
        } else {
            n.to_bits()
        };
        assert_eq!(bits(got.fields.get(k)), want, "{what}.{k}");
        assert_eq!(bits(nested.fields.get(k)), want, "{what}.nested.{k}");
        assert_eq!(bits(list.values.get(i)), want, "{what}.list[{i}]");
    }
}

fn counters(lines_covered: i64, lines_total: i64) -> CoverageCounters {
    CoverageCounters {
        lines_covered,
        lines_total,
        ..Default::default()
    }
}

fn coverage(key: &str, totals: Option<CoverageCounters>) -> RecordCoverageRequest {
    RecordCoverageRequest {
        commit_sha: "abcdef1".into(),
        branch: "main".into(),
        subsystem: String::new(),
        session_id: String::new(),
        client_key: key.into(),
        totals,
        files: vec![],
        recorded_at: None,
        ..Default::default()
    }
}

async fn aggregate(app: &TestApp) -> Result<CoverageCounters, tonic::Status> {
    app.coverage
        .clone()
        .get_aggregate_coverage(GetAggregateCoverageRequest::default())
        .await
        .map(|r| r.into_inner().counters.expect("counters"))
}

#[tokio::test]
async fn coverage_counters_above_two_to_the_fortieth_are_refused_and_aggregates_stay_available() {
    let app = spawn_app().await;
    let huge = 1i64 << 62;
    for key in ["a", "b"] {
        let err = app
            .coverage
            .clone()
            .record_coverage(coverage(key, Some(counters(huge, huge))))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            violated_fields(&err),
            ["totals.lines_total", "totals.lines_covered"]
        );
    }
    // The same bound per file, and for totals summed from the files.
    let mut per_file = coverage("c", None);
    per_file.files = vec![FileCoverage {
        path: "a.rs".into(),
        counters: Some(counters(0, MAX_COUNTER + 1)),
    }];
    let err = app
        .coverage
        .clone()
        .record_coverage(per_file)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["files[0].counters.lines_total"]);
    let mut summed = coverage("d", None);
    summed.files = (0..2)
        .map(|i| FileCoverage {
            path: format!("{i}.rs"),
            counters: Some(counters(MAX_COUNTER, MAX_COUNTER)),
        })
        .collect();
    let err = app
        .coverage
        .clone()
        .record_coverage(summed)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["files"]);

    // The largest accepted counters, many times over, aggregate fine.
    for key in ["e", "f", "g"] {
        app.coverage
            .clone()
            .record_coverage(coverage(key, Some(counters(MAX_COUNTER, MAX_COUNTER))))
            .await
            .expect("the bound itself is accepted");
    }
    let sum = aggregate(&app).await.expect("aggregate");
    assert_eq!(sum.lines_total, 3 * MAX_COUNTER);
    assert_eq!(sum.lines_covered, 3 * MAX_COUNTER);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn coverage_sums_beyond_int64_saturate_instead_of_failing() {
    let app = spawn_app().await;
    // Rows written before the bound existed (or by hand) may hold anything
    // the column allows: the aggregate must still answer.
    let sql = app.sql().await;
    for (i, key) in ["x", "y", "z"].iter().enumerate() {
        sql.execute(
            "INSERT INTO coverage_reports (project_id, id, commit_sha, branch, client_key, \
             lines_covered, lines_total, branches_covered, branches_total, functions_covered, \
             functions_total) \
             VALUES ((SELECT id FROM projects WHERE slug = 'default'), $1, 'abcdef1', 'main', $2, \
                     $3, $3, 0, 0, 0, 0)",
            &[&uuid::Uuid::new_v4(), key, &(i64::MAX - i as i64)],
        )
        .await
        .unwrap();
    }
    let sum = aggregate(&app).await.expect("aggregate answers");
    assert_eq!(sum.lines_total, i64::MAX);
    assert_eq!(sum.lines_covered, i64::MAX);
    app.stop().await.unwrap();
}

fn point(name: &str, value: f64, second: i64) -> MetricPoint {
    MetricPoint {
        name: name.into(),
        value,
        unit: String::new(),
        labels: Default::default(),
        recorded_at: at(second),
    }
}

async fn series(app: &TestApp, name: &str) -> Result<Vec<(i64, f64, f64)>, tonic::Status> {
    let r = app
        .metrics
        .clone()
        .query_time_series(QueryTimeSeriesRequest {
            name: name.into(),
            label_filter: Default::default(),
            range: Some(TimeRange {
                start_time: at(0),
                end_time: at(3600),
            }),
            bucket_width: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            calendar_bucket: 0,
        })
        .await?;
    Ok(r.into_inner()
        .buckets
        .into_iter()
        .map(|b| (b.count, b.sum.unwrap_or(0.0), b.avg.unwrap_or(0.0)))
        .collect())
}

#[tokio::test]
async fn metric_values_beyond_1e100_are_refused_so_time_series_sums_stay_finite() {
    let app = spawn_app().await;
    let err = app
        .metrics
        .clone()
        .record_metric_points(RecordMetricPointsRequest {
            batch_id: "huge".into(),
            points: vec![point("m", 1e308, 1), point("m", -1e308, 2)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        violated_fields(&err),
        ["points[0].value", "points[1].value"]
    );
    assert_eq!(series(&app, "m").await.unwrap(), [(0, 0.0, 0.0)]);

    // The bound itself, many times, sums and averages in range.
    app.metrics
        .clone()
        .record_metric_points(RecordMetricPointsRequest {
            batch_id: "edge".into(),
            points: (0..100).map(|i| point("m", MAX_METRIC, i)).collect(),
        })
        .await
        .expect("the bound itself is accepted");
    let got = series(&app, "m").await.expect("series");
    assert_eq!(got.len(), 1);
    let (count, sum, avg) = got[0];
    assert_eq!(count, 100);
    assert!(sum.is_finite() && (sum / (100.0 * MAX_METRIC) - 1.0).abs() < 1e-9);
    assert!((avg / MAX_METRIC - 1.0).abs() < 1e-9);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn executions_with_edge_doubles_list_and_export_exactly() {
    let app = spawn_app().await;
    let session = create(&app, "edge-exec").await;
    let tc = create_test_case(&app, new_test_case("edge", TestType::Unit, "core")).await;
    let mut item = run("edge", ExecutionStatus::Passed, 1, 5);
    item.session_id = session.id.clone();
    item.environment = Some(edge_struct().into());
    item.performance = edge_numbers()
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
    item.interaction_log = vec![edge_struct().into()];
    app.test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "edge".into(),
            items: vec![item],
        })
        .await
        .expect("record");

    let filters = [
        ListExecutionsRequest {
            test_case_id: tc.id.clone(),
            ..Default::default()
        },
        ListExecutionsRequest {
            session_id: session.id.clone(),
            ..Default::default()
        },
        ListExecutionsRequest::default(),
    ];
    for filter in filters {
        let listed = app
            .test_cases
            .clone()
            .list_executions(filter.clone())
            .await
            .unwrap_or_else(|e| panic!("{filter:?}: {e:?}"))
            .into_inner()
            .executions;
        assert_eq!(listed.len(), 1);
        let e = &listed[0];
        assert_edges("environment", e.environment.as_deref());
        assert_edges(
            "interaction_log[0]",
            e.interaction_log.first().map(|v| &**v),
        );
        for (k, n) in edge_numbers() {
            let want = if n == 0.0 { 0.0 } else { n };
            assert_eq!(
                e.performance[k].to_bits(),
                want.to_bits(),
                "performance[{k}]"
            );
        }
    }

    let mut stream = app
        .admin
        .clone()
        .export_session(ExportSessionRequest {
            session_id: session.id.clone(),
        })
        .await
        .expect("export")
        .into_inner();
    let mut exported = 0;
    while let Some(chunk) = stream.message().await.expect("export chunk") {
        for r in chunk.records {
            if let Some(Record::Execution(e)) = r.record {
                assert_edges("exported environment", e.environment.as_deref());
                exported += 1;
            }
        }
    }
    assert_eq!(exported, 1);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn every_struct_field_keeps_edge_doubles_exactly() {
    let app = spawn_app().await;
    let mut req = new_session("edge-session");
    req.config = Some(edge_struct().into());
    req.input_refs = Some(edge_struct().into());
    req.metadata = Some(edge_struct().into());
    let created = app
        .sessions
        .clone()
        .create_session(req)
        .await
        .expect("create session")
        .into_inner()
        .session
        .unwrap();
    let got = app
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(created.id.clone())),
            ..Default::default()
        })
        .await
        .expect("get session")
        .into_inner()
        .session
        .unwrap();
    for s in [&created, &got] {
        assert_edges("config", s.config.as_deref());
        assert_edges("input_refs", s.input_refs.as_deref());
        assert_edges("metadata", s.metadata.as_deref());
    }

    app.sessions
        .clone()
        .append_session_log(AppendSessionLogRequest {
            session_id: created.id.clone(),
            level: LogLevel::Info as i32,
            message: "edges".into(),
            fields: Some(edge_struct().into()),
        })
        .await
        .expect("append log");
    let logs = app
        .sessions
        .clone()
        .list_session_logs(ListSessionLogsRequest {
            session_id: created.id.clone(),
            ..Default::default()
        })
        .await
        .expect("list logs")
        .into_inner()
        .entries;
    assert_edges("fields", logs[0].fields.as_deref());

    set_status(&app, &created.id, SessionStatus::Processing)
        .await
        .unwrap();
    let mut result = new_result(&created.id, "edge-result", 0.5);
    result.source_representation = Some(edge_struct().into());
    result.target_representation = Some(edge_struct().into());
    let recorded = app
        .results
        .clone()
        .record_result(result)
        .await
        .expect("record result")
        .into_inner()
        .result
        .unwrap();
    let got = app
        .results
        .clone()
        .get_result(GetResultRequest {
            id: recorded.id.clone(),
        })
        .await
        .expect("get result")
        .into_inner()
        .result
        .unwrap();
    assert_edges(
        "source_representation",
        got.source_representation.as_deref(),
    );
    assert_edges(
        "target_representation",
        got.target_representation.as_deref(),
    );

    let tc = CreateTestCaseRequest {
        required_hardware: Some(edge_struct().into()),
        ..new_test_case("edge-hw", TestType::Unit, "core")
    };
    let created = create_test_case(&app, tc).await;
    let got = app
        .test_cases
        .clone()
        .get_test_case(GetTestCaseRequest {
            lookup: Some(get_test_case_request::Lookup::Id(created.id)),
        })
        .await
        .expect("get test case")
        .into_inner()
        .test_case
        .unwrap();
    assert_edges("required_hardware", got.required_hardware.as_deref());
    app.stop().await.unwrap();
}

/// A Struct nested `levels` objects deep (the outer one included).
fn nested(levels: usize) -> Struct {
    let mut s = Struct::default();
    s.fields.insert("leaf".into(), number(1.0));
    for _ in 1..levels {
        let mut outer = Struct::default();
        outer.fields.insert(
            "k".into(),
            Value {
                kind: Some(Kind::StructValue(s)),
            },
        );
        s = outer;
    }
    s
}

#[tokio::test]
async fn structs_nest_32_levels_and_no_deeper() {
    let app = spawn_app().await;
    let mut ok = new_session("deep-ok");
    ok.config = Some(nested(32).into());
    app.sessions
        .clone()
        .create_session(ok)
        .await
        .expect("32 levels are accepted");

    let mut deep = new_session("deep-33");
    deep.config = Some(nested(33).into());
    let err = app.sessions.clone().create_session(deep).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let v = violations(&err);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].0, "config");
    assert!(v[0].1.contains("at most 32 levels"), "{v:?}");

    // Far deeper than the decoder's own limit: refused, never a crash.
    let mut abyss = new_session("deep-abyss");
    abyss.config = Some(nested(200).into());
    let err = app
        .sessions
        .clone()
        .create_session(abyss)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        app.sessions
            .clone()
            .create_session(new_session("after"))
            .await
            .is_ok()
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn non_finite_numbers_are_refused_with_their_path_inside_the_struct() {
    let app = spawn_app().await;
    let mut s = Struct::default();
    s.fields.insert(
        "list".into(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![number(1.0), number(f64::NAN)],
            })),
        },
    );
    let mut req = new_session("nan");
    req.metadata = Some(s.into());
    let err = app.sessions.clone().create_session(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&err),
        ["metadata.fields[\"list\"].list_value.values[1]"]
    );

    let mut item = run("nope", ExecutionStatus::Passed, 1, 5);
    item.performance.insert("x".into(), f64::INFINITY);
    let mut env = Struct::default();
    env.fields.insert("y".into(), number(f64::NEG_INFINITY));
    item.environment = Some(env.into());
    let err = app
        .test_cases
        .clone()
        .record_executions(RecordExecutionsRequest {
            batch_id: "nan".into(),
            items: vec![run("nope", ExecutionStatus::Passed, 1, 5), item],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let fields = violated_fields(&err);
    assert!(
        fields.contains(&"items[1].environment.fields[\"y\"]".to_owned()),
        "{fields:?}"
    );
    assert!(
        fields.contains(&"items[1].performance[\"x\"]".to_owned()),
        "{fields:?}"
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn cleanup_refuses_an_age_under_one_second() {
    let app = spawn_app().await;
    for (seconds, nanos) in [(0, 500_000_000), (0, 999_999_999), (0, 1)] {
        let err = app
            .admin
            .clone()
            .cleanup(CleanupRequest {
                older_than: Some(prost_types::Duration { seconds, nanos }),
                dry_run: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{seconds}s {nanos}ns");
        let v = violations(&err);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].0, "older_than");
        assert!(v[0].1.contains("at least 1 second"), "{v:?}");
    }
    app.admin
        .clone()
        .cleanup(CleanupRequest {
            older_than: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            dry_run: true,
            ..Default::default()
        })
        .await
        .expect("one second is accepted");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn check_integrity_takes_a_zero_stuck_after_as_the_documented_default() {
    let app = spawn_app().await;
    let check = |seconds, nanos| {
        let mut admin = app.admin.clone();
        async move {
            admin
                .check_integrity(CheckIntegrityRequest {
                    repair: false,
                    stuck_after: Some(prost_types::Duration { seconds, nanos }),
                })
                .await
        }
    };
    check(0, 0).await.expect("0 means 24 hours");
    check(60, 0).await.expect("a minute");
    for (seconds, nanos) in [
        (-1, 0),
        (0, -1),
        (0, 1_000_000_000),
        (100 * 366 * 86_400 + 1, 0),
    ] {
        let err = check(seconds, nanos).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{seconds}s {nanos}ns");
        assert_eq!(violated_fields(&err), ["stuck_after"]);
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn time_series_over_stored_extreme_values_answer_instead_of_failing() {
    let app = spawn_app().await;
    // Rows stored before the 1e100 bound existed (or by hand).
    let sql = app.sql().await;
    let t0 = verdict::convert::from_timestamp(&at(1).unwrap()).unwrap();
    for v in [1e308, 1.7e308, -1e308, 1.7e308] {
        sql.execute(
            "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
             VALUES ((SELECT id FROM projects WHERE slug = 'default'), 'legacy', $1, '', '{}', $2)",
            &[&v, &t0],
        )
        .await
        .unwrap();
    }
    let got = series(&app, "legacy").await.expect("series answers");
    assert_eq!(got.len(), 1);
    let (count, sum, avg) = got[0];
    assert_eq!(count, 4);
    // Each counts as +-1e100 in the sum and the mean.
    assert!((sum / 2e100 - 1.0).abs() < 1e-12, "{sum}");
    assert!((avg / 0.5e100 - 1.0).abs() < 1e-12, "{avg}");
    app.stop().await.unwrap();
}
