//! ResultService through a real client.

use crate::helpers::{TestApp, spawn_app, violated_fields};
use crate::sessions::{create, set_status};
use std::collections::HashSet;
use tonic::Code;
use verdict::proto::{
    GetResultRequest, ListResultsRequest, OverallStatus, RecordResultRequest, ResultType,
    ResultView, SessionStatus, ValidationResult,
};

pub fn new_result(session_id: &str, request_id: &str, fidelity: f64) -> RecordResultRequest {
    RecordResultRequest {
        session_id: session_id.into(),
        request_id: request_id.into(),
        result_type: ResultType::Static as i32,
        overall_status: OverallStatus::Passed as i32,
        fidelity_score: fidelity,
        summary: "all good".into(),
        execution_time_ms: 1200,
        source_representation: None,
        target_representation: None,
    }
}

pub async fn record(app: &TestApp, req: RecordResultRequest) -> ValidationResult {
    app.results
        .clone()
        .record_result(req)
        .await
        .expect("record result")
        .into_inner()
        .result
        .expect("result")
}

#[tokio::test]
async fn listed_results_are_exactly_what_recording_them_returned_in_either_view() {
    // ListResults writes its results straight from the rows; RecordResult
    // replies with the generated message. Every field of every shape must
    // read back the same, in every view.
    let app = spawn_app().await;
    let session = create(&app, "results-on-the-wire").await;
    let doc = |json: serde_json::Value| Some(verdict::convert::json_to_struct(&json));
    let shapes = vec![
        // Zero fidelity and time (left out on the wire), no representations.
        RecordResultRequest {
            fidelity_score: 0.0,
            execution_time_ms: 0,
            ..new_result(&session.id, "zeros", 0.0)
        },
        RecordResultRequest {
            result_type: ResultType::Hybrid as i32,
            overall_status: OverallStatus::Warning as i32,
            summary: "résumé \"quoted\" 🚀".into(),
            execution_time_ms: i64::from(i32::MAX) * 4,
            source_representation: doc(serde_json::json!({
                "n": -1.5, "t": true, "null": null, "list": [1, "two", [3], {"four": 4}],
                "nested": {"a": {"b": {"c": [null, {}]}}}, "long": "x".repeat(300),
            })),
            target_representation: doc(serde_json::json!({"blob": "y".repeat(20_000)})),
            ..new_result(&session.id, "rich", 0.123_456_789)
        },
        RecordResultRequest {
            result_type: ResultType::Behavioral as i32,
            overall_status: OverallStatus::Failed as i32,
            source_representation: doc(serde_json::json!({})),
            ..new_result(&session.id, "perfect", 1.0)
        },
    ];
    let mut written = std::collections::HashMap::new();
    for request in shapes {
        let result = record(&app, request).await;
        written.insert(result.id.clone(), result);
    }
    // A representation stored as JSON null (by SQL; the gateway stores
    // `{}` for a missing one) reads as unset, as GetResult reads it.
    app.sql()
        .await
        .execute(
            "UPDATE results SET source_representation = 'null' WHERE request_id = 'perfect'",
            &[],
        )
        .await
        .unwrap();
    let perfect = written
        .values_mut()
        .find(|r| r.request_id == "perfect")
        .unwrap();
    perfect.source_representation = None;
    let got = app
        .results
        .clone()
        .get_result(GetResultRequest {
            id: perfect.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.result.as_ref(), Some(&*perfect));
    for view in [ResultView::Unspecified, ResultView::Full, ResultView::Basic] {
        let listed = app
            .results
            .clone()
            .list_results(ListResultsRequest {
                session_id: session.id.clone(),
                page_size: 50,
                view: view as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(listed.len(), 3, "{view:?}");
        for result in listed {
            let mut want = written[&result.id].clone();
            if view == ResultView::Basic {
                (want.source_representation, want.target_representation) = (None, None);
            }
            assert_eq!(result, want, "{view:?}");
        }
    }
}

#[tokio::test]
async fn record_result_stores_it_once_per_request_id() {
    let app = spawn_app().await;
    let s = create(&app, "r").await;
    let mut client = app.results.clone();
    let first = client
        .record_result(new_result(&s.id, "res-1", 0.93))
        .await
        .unwrap()
        .into_inner();
    let again = client
        .record_result(new_result(&s.id, "res-1", 0.93))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created && !again.created);
    assert_eq!(first.result, again.result);
    // The same key with other content is refused.
    let refused = client
        .record_result(new_result(&s.id, "res-1", 0.10))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let stored: f64 = app
        .sql()
        .await
        .query_one("SELECT fidelity_score FROM results", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0.93);
    let got = client
        .get_result(GetResultRequest {
            id: first.result.as_ref().unwrap().id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.result, first.result);
    // Representations the request left out are stored as empty objects
    // and read back as empty Structs (set: only a BASIC list leaves them
    // unset) from every full read.
    let stored_kind: String = app
        .sql()
        .await
        .query_one(
            "SELECT jsonb_typeof(source_representation) FROM results",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored_kind, "object");
    let empty = Some(verdict::structs::Struct::default());
    let got = got.result.unwrap();
    assert_eq!(got.source_representation, empty);
    assert_eq!(got.target_representation, empty);
    let listed = client
        .list_results(ListResultsRequest {
            session_id: s.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.results.len(), 1);
    assert_eq!(listed.results[0].source_representation, empty);
    assert_eq!(listed.results[0].target_representation, empty);
}

#[tokio::test]
async fn record_result_needs_a_session_that_accepts_results() {
    let app = spawn_app().await;
    let mut client = app.results.clone();
    let missing = client
        .record_result(new_result(&uuid::Uuid::new_v4().to_string(), "x", 0.5))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    let s = create(&app, "cancelled").await;
    set_status(&app, &s.id, SessionStatus::Cancelled)
        .await
        .unwrap();
    let refused = client
        .record_result(new_result(&s.id, "x", 0.5))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);

    let done = create(&app, "completed").await;
    set_status(&app, &done.id, SessionStatus::Processing)
        .await
        .unwrap();
    set_status(&app, &done.id, SessionStatus::Completed)
        .await
        .unwrap();
    client
        .record_result(new_result(&done.id, "x", 0.5))
        .await
        .unwrap();
}

#[tokio::test]
async fn record_result_reports_every_bad_field() {
    let app = spawn_app().await;
    let s = create(&app, "bad").await;
    let mut client = app.results.clone();
    for score in [f64::NAN, f64::INFINITY, 1.5, -0.1] {
        let err = client
            .record_result(new_result(&s.id, "x", score))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["fidelity_score"], "score {score}");
    }
    let err = client
        .record_result(RecordResultRequest {
            session_id: "nope".into(),
            request_id: String::new(),
            result_type: 9,
            overall_status: 0,
            fidelity_score: 0.5,
            execution_time_ms: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let mut fields = violated_fields(&err);
    fields.sort();
    assert_eq!(
        fields,
        [
            "execution_time_ms",
            "overall_status",
            "request_id",
            "result_type",
            "session_id"
        ]
    );
    let err = client
        .get_result(GetResultRequest {
            id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn list_results_filters_and_pages_through_every_result() {
    let app = spawn_app().await;
    let a = create(&app, "a").await;
    let b = create(&app, "b").await;
    for i in 0..30 {
        let mut req = new_result(&a.id, &format!("a{i}"), f64::from(i) / 30.0);
        if i % 3 == 0 {
            req.overall_status = OverallStatus::Failed as i32;
            req.result_type = ResultType::Behavioral as i32;
        }
        record(&app, req).await;
    }
    record(&app, new_result(&b.id, "b0", 0.99)).await;
    let mut client = app.results.clone();

    let mut seen = HashSet::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_results(ListResultsRequest {
                session_id: a.id.clone(),
                page_size: 7,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in page.results {
            assert_eq!(r.session_id, a.id);
            assert!(seen.insert(r.id));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 30);

    let failed = client
        .list_results(ListResultsRequest {
            overall_statuses: vec![OverallStatus::Failed as i32],
            result_types: vec![ResultType::Behavioral as i32],
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.results.len(), 10);

    let high = client
        .list_results(ListResultsRequest {
            min_fidelity: Some(0.9),
            page_size: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // 27/30, 28/30, 29/30 of session a and 0.99 of session b.
    assert_eq!(high.results.len(), 4);

    let err = client
        .list_results(ListResultsRequest {
            min_fidelity: Some(0.8),
            max_fidelity: Some(0.2),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["min_fidelity"]);
}
