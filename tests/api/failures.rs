//! FailureService through a real client: error signatures computed by the
//! database on every write path, grouped and paged per project; triage per
//! signature (applied to later failures) and per execution (an override that
//! wins), with optimistic concurrency, history and refusal of bad input.

use crate::errors::assert_reason;
use crate::helpers::*;
use crate::test_cases::{new_test_case, run};
use std::collections::{BTreeMap, HashMap, HashSet};
use tonic::Code;
use tonic::transport::Channel;
use verdict::proto::failure_service_client::FailureServiceClient;
use verdict::proto::{
    Execution, ExecutionInput, ExecutionStatus, FailureSignature, FailureSignatureOrder,
    ListExecutionsRequest, ListFailureSignaturesRequest, ListTriageHistoryRequest,
    RecordExecutionsRequest, TestType, TimeRange, TriageExecutionRequest,
    TriageFailureSignatureRequest, TriageSource, TriageState,
};

fn failures(app: &TestApp) -> FailureServiceClient<Channel> {
    FailureServiceClient::new(app.channel.clone())
}

/// A failure of test case `key` with `message`, `second` seconds after T0.
fn failure(key: &str, message: &str, second: i64) -> ExecutionInput {
    let mut e = run(key, ExecutionStatus::Failed, second, 10);
    e.error_message = message.into();
    e
}

async fn create_cases(app: &TestApp, project: &str, keys: &[&str]) {
    for key in keys {
        app.test_cases
            .clone()
            .create_test_case(in_project(
                new_test_case(key, TestType::Unit, "core"),
                project,
            ))
            .await
            .unwrap();
    }
}

async fn record(
    app: &TestApp,
    project: &str,
    batch: &str,
    items: Vec<ExecutionInput>,
) -> Vec<String> {
    app.test_cases
        .clone()
        .record_executions(in_project(
            RecordExecutionsRequest {
                batch_id: batch.into(),
                items,
            },
            project,
        ))
        .await
        .unwrap()
        .into_inner()
        .ids
}

/// Every signature of the list in `project`, page by page.
async fn all_signatures(
    app: &TestApp,
    project: &str,
    mut request: ListFailureSignaturesRequest,
) -> Vec<FailureSignature> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        let page = failures(app)
            .list_failure_signatures(in_project(request.clone(), project))
            .await
            .unwrap()
            .into_inner();
        out.extend(page.signatures);
        if page.next_page_token.is_empty() {
            return out;
        }
        request.page_token = page.next_page_token;
    }
    panic!("the list did not end");
}

/// Every execution of `project`, by id.
async fn executions(app: &TestApp, project: &str) -> HashMap<String, Execution> {
    let page = app
        .test_cases
        .clone()
        .list_executions(in_project(
            ListExecutionsRequest {
                page_size: 1000,
                ..Default::default()
            },
            project,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_page_token.is_empty());
    page.executions
        .into_iter()
        .map(|e| (e.id.clone(), e))
        .collect()
}

/// (hex signature, count, distinct test cases) of `project`, straight from
/// the table.
async fn sql_groups(app: &TestApp, project: uuid::Uuid) -> BTreeMap<String, (i64, i64)> {
    app.sql()
        .await
        .query(
            "SELECT encode(error_signature, 'hex'), count(*), count(DISTINCT test_case_id) \
             FROM test_executions WHERE project_id = $1 AND error_signature IS NOT NULL \
             GROUP BY 1",
            &[&project],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

fn triage(signature: &str, state: TriageState, actor: &str) -> TriageFailureSignatureRequest {
    TriageFailureSignatureRequest {
        signature: signature.into(),
        state: state as i32,
        comment: format!("{actor} looked"),
        issue_url: "https://issues.example.com/BUG-7".into(),
        actor: actor.into(),
        expected_version: None,
    }
}

#[tokio::test]
async fn signatures_group_messages_differing_only_in_masked_parts_and_separate_the_rest() {
    let app = spawn_app().await;
    let team_a = create_project(&app, "team-a").await;
    create_cases(&app, "team-a", &["t-1", "t-2", "t-3"]).await;
    // Each group: messages that differ only in what the normaliser masks,
    // and the normalised text they share.
    let groups: &[(&str, &[&str])] = &[
        (
            "Timeout after <n> ms waiting for <ip>",
            &[
                "Timeout after 3000 ms waiting for 10.0.0.12:5432",
                "Timeout after 15 ms   waiting for 192.168.1.1:80",
                "  Timeout after 7 ms\n\twaiting for 127.0.0.1 ",
            ],
        ),
        (
            "file <path> not found at <ts>",
            &[
                "file /tmp/run-123/out.log not found at 2024-05-01T10:20:30.123Z",
                "file /var/lib/x/y.txt not found at 2025-12-31 23:59:59+01:00",
                "file C:\\Users\\bob\\a.txt not found at 2026-01-02",
            ],
        ),
        (
            "row <uuid> missing in <hex>, pointer <hex>",
            &[
                "row 7f3c2a1b-1111-4222-8333-123456789abc missing in deadbeef12, pointer 0xFFEE",
                "row 00000000-0000-4000-8000-000000000001 missing in 9f86d081884c7d65, pointer 0x1",
            ],
        ),
        (
            "see <url> at <ts>",
            &[
                "see https://ci.example.com/job/42/console at 12:03:04",
                "see http://other:8080/x?y=1 at 01:02:03.456",
            ],
        ),
        // Different words: another signature, even with the same masks.
        (
            "Timeout after <n> ms waiting for lock",
            &["Timeout after 5 ms waiting for lock"],
        ),
        // Case is kept.
        (
            "timeout after <n> ms waiting for <ip>",
            &["timeout after 1 ms waiting for 10.1.1.1"],
        ),
    ];
    let mut items = Vec::new();
    let mut second = 0;
    let keys = ["t-1", "t-2", "t-3"];
    for (_, messages) in groups {
        for (i, m) in messages.iter().enumerate() {
            second += 1;
            let mut e = failure(keys[i % 3], m, second);
            if i == 1 {
                // ERROR counts as a failure too.
                e.status = ExecutionStatus::Error as i32;
            }
            items.push(e);
        }
    }
    // No signature: a pass with a message, a failure without one, a failure
    // whose message is only whitespace.
    let mut passed = run("t-1", ExecutionStatus::Passed, 100, 1);
    passed.error_message = "Timeout after 3 ms waiting for 10.0.0.1".into();
    items.push(passed);
    items.push(failure("t-1", "", 101));
    items.push(failure("t-2", " \n\t ", 102));
    let ids = record(&app, "team-a", "b-1", items).await;

    let listed = all_signatures(&app, "team-a", ListFailureSignaturesRequest::default()).await;
    assert_eq!(listed.len(), groups.len(), "{listed:#?}");
    let by_text: HashMap<&str, &FailureSignature> = listed
        .iter()
        .map(|s| (s.normalised_message.as_str(), s))
        .collect();
    for (text, messages) in groups {
        let s = by_text
            .get(text)
            .unwrap_or_else(|| panic!("no signature {text:?} in {listed:#?}"));
        assert_eq!(s.count, messages.len() as i64, "{text}");
        assert_eq!(
            s.test_cases_affected,
            messages.len().min(3) as i64,
            "{text}"
        );
        assert_eq!(s.signature.len(), 64);
        // The example is the newest failure, raw.
        assert_eq!(&s.example_message, messages.last().unwrap(), "{text}");
        assert!(
            s.first_seen.as_ref().unwrap().seconds < s.last_seen.as_ref().unwrap().seconds
                || messages.len() == 1
        );
        let triage = s.triage.as_ref().unwrap();
        assert_eq!(triage.state, TriageState::ToInvestigate as i32);
        assert_eq!(triage.source, TriageSource::Default as i32);
        assert_eq!(triage.version, 0);
    }
    // Ordered by count, largest first, ties by signature.
    let order: Vec<(i64, &str)> = listed
        .iter()
        .map(|s| (-s.count, s.signature.as_str()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    // The table agrees: counts and test cases per signature.
    let sql = sql_groups(&app, team_a).await;
    let api: BTreeMap<String, (i64, i64)> = listed
        .iter()
        .map(|s| (s.signature.clone(), (s.count, s.test_cases_affected)))
        .collect();
    assert_eq!(api, sql);
    // Executions carry their signature; non-failures carry none.
    let listed_executions = executions(&app, "team-a").await;
    let with_signature = listed_executions
        .values()
        .filter(|e| !e.error_signature.is_empty())
        .count();
    assert_eq!(with_signature, ids.len() - 3);
    for id in &ids[ids.len() - 3..] {
        let e = &listed_executions[id];
        assert!(e.error_signature.is_empty() && e.triage.is_none(), "{e:?}");
    }

    // Paged two at a time by last seen: every signature once, newest first,
    // and a token is bound to its filters and order.
    let mut request = ListFailureSignaturesRequest {
        order_by: FailureSignatureOrder::LastSeen as i32,
        page_size: 2,
        ..Default::default()
    };
    let by_last_seen = all_signatures(&app, "team-a", request.clone()).await;
    let seen: Vec<i64> = by_last_seen
        .iter()
        .map(|s| s.last_seen.as_ref().unwrap().seconds)
        .collect();
    let mut newest_first = seen.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, newest_first);
    let unique: HashSet<&str> = by_last_seen.iter().map(|s| s.signature.as_str()).collect();
    assert_eq!(unique.len(), groups.len());
    let first = failures(&app)
        .list_failure_signatures(in_project(request.clone(), "team-a"))
        .await
        .unwrap()
        .into_inner();
    request.page_token = first.next_page_token;
    request.order_by = FailureSignatureOrder::Count as i32;
    let err = failures(&app)
        .list_failure_signatures(in_project(request, "team-a"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");

    // A time range keeps the failures started in it.
    let early = all_signatures(
        &app,
        "team-a",
        ListFailureSignaturesRequest {
            started: Some(TimeRange {
                start_time: crate::test_cases::at(1),
                end_time: crate::test_cases::at(4),
            }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(early.len(), 1, "{early:#?}");
    assert_eq!(early[0].normalised_message, groups[0].0);
    assert_eq!(early[0].count, 3);
}

#[tokio::test]
async fn a_signature_triage_applies_to_later_failures_and_an_execution_override_wins() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    create_cases(&app, "team-a", &["t-1", "t-2"]).await;
    let first = record(
        &app,
        "team-a",
        "b-1",
        vec![failure("t-1", "disk /dev/sda1 full after 12 writes", 1)],
    )
    .await;
    let signature = all_signatures(&app, "team-a", Default::default()).await[0]
        .signature
        .clone();
    let mut f = failures(&app);
    let mut set = triage(&signature, TriageState::ProductBug, "ana");
    set.expected_version = Some(0);
    let stored = f
        .triage_failure_signature(in_project(set, "team-a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.failures, 1);
    let t = stored.triage.unwrap();
    assert_eq!(
        (
            t.state,
            t.version,
            t.source,
            t.actor.as_str(),
            t.issue_url.as_str()
        ),
        (
            TriageState::ProductBug as i32,
            1,
            TriageSource::Signature as i32,
            "ana",
            "https://issues.example.com/BUG-7"
        )
    );

    // Failures recorded afterwards with the same signature get the state;
    // a pass gets none.
    let mut later = vec![
        failure("t-2", "disk /dev/sdb2 full after 99 writes", 50),
        failure("t-1", "disk /mnt/data full after 1 writes", 51),
    ];
    later.push(run("t-1", ExecutionStatus::Passed, 52, 1));
    let later = record(&app, "team-a", "b-2", later).await;
    let listed = executions(&app, "team-a").await;
    for id in first.iter().chain(&later[..2]) {
        let e = &listed[id];
        assert_eq!(e.error_signature, signature);
        let t = e.triage.as_ref().unwrap();
        assert_eq!(
            (t.state, t.source, t.version),
            (
                TriageState::ProductBug as i32,
                TriageSource::Signature as i32,
                1
            ),
            "{e:?}"
        );
    }
    assert!(listed[&later[2]].triage.is_none());
    let s = &all_signatures(&app, "team-a", Default::default()).await[0];
    assert_eq!(s.count, 3);
    assert_eq!(
        s.triage.as_ref().unwrap().state,
        TriageState::ProductBug as i32
    );

    // An execution's own state wins over its signature's, also after the
    // signature changes again.
    let own = f
        .triage_execution(in_project(
            TriageExecutionRequest {
                execution_id: later[0].clone(),
                state: TriageState::AutomationBug as i32,
                comment: "flaky disk in this test only".into(),
                issue_url: String::new(),
                actor: "bo".into(),
                expected_version: Some(0),
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.error_signature, signature);
    assert_eq!(own.triage.unwrap().source, TriageSource::Execution as i32);
    let mut again = triage(&signature, TriageState::SystemIssue, "cy");
    again.expected_version = Some(1);
    f.triage_failure_signature(in_project(again, "team-a"))
        .await
        .unwrap();
    let listed = executions(&app, "team-a").await;
    let state = |id: &String| {
        let t = listed[id].triage.as_ref().unwrap();
        (
            TriageState::try_from(t.state).unwrap(),
            TriageSource::try_from(t.source).unwrap(),
        )
    };
    assert_eq!(
        state(&later[0]),
        (TriageState::AutomationBug, TriageSource::Execution)
    );
    assert_eq!(
        state(&later[1]),
        (TriageState::SystemIssue, TriageSource::Signature)
    );
    assert_eq!(
        state(&first[0]),
        (TriageState::SystemIssue, TriageSource::Signature)
    );

    // A pass cannot be triaged; an unknown execution or signature is
    // NOT_FOUND.
    let pass = TriageExecutionRequest {
        execution_id: later[2].clone(),
        state: TriageState::NoDefect as i32,
        actor: "bo".into(),
        ..Default::default()
    };
    let err = f
        .triage_execution(in_project(pass.clone(), "team-a"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "FAILED_PRECONDITION");
    let err = f
        .triage_execution(in_project(
            TriageExecutionRequest {
                execution_id: uuid::Uuid::new_v4().to_string(),
                ..pass
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    let err = f
        .triage_failure_signature(in_project(
            triage(&"ab".repeat(32), TriageState::NoDefect, "x"),
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    // History: both signature changes in order; the override's own.
    let history = f
        .list_triage_history(in_project(
            ListTriageHistoryRequest {
                signature: signature.to_uppercase(),
                page_size: 1,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.changes.len(), 1);
    assert_eq!(history.changes[0].actor, "ana");
    let rest = f
        .list_triage_history(in_project(
            ListTriageHistoryRequest {
                signature: signature.clone(),
                page_size: 1,
                page_token: history.next_page_token,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rest.changes
            .iter()
            .map(|c| (c.actor.as_str(), c.state, c.version))
            .collect::<Vec<_>>(),
        vec![("cy", TriageState::SystemIssue as i32, 2)]
    );
    let own_history = f
        .list_triage_history(in_project(
            ListTriageHistoryRequest {
                execution_id: later[0].clone(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own_history.changes.len(), 1);
    assert_eq!(
        own_history.changes[0].comment,
        "flaky disk in this test only"
    );
    // History is append-only in the database too.
    let err = app
        .sql()
        .await
        .execute("UPDATE triage_history SET actor = 'mallory'", &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"));
    // Each triage wrote one audit event.
    let audited: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM audit_events WHERE rpc LIKE '%FailureService/Triage%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 3);
}

#[tokio::test]
async fn concurrent_triage_with_the_same_expected_version_lets_exactly_one_client_win() {
    let app = spawn_app().await;
    create_cases(&app, "default", &["t-1"]).await;
    record(&app, "default", "b-1", vec![failure("t-1", "boom 1", 1)]).await;
    let signature = all_signatures(&app, "default", Default::default()).await[0]
        .signature
        .clone();
    // Round 1 races on a signature nobody triaged (version 0), round 2 on
    // the stored version 1.
    for (round, expected) in [(1, 0), (2, 1)] {
        let calls = (0..4).map(|i| {
            let mut f = failures(&app);
            let mut req = triage(
                &signature,
                TriageState::AutomationBug,
                &format!("r{round}-c{i}"),
            );
            req.expected_version = Some(expected);
            async move { f.triage_failure_signature(req).await }
        });
        let outcomes = futures::future::join_all(calls).await;
        let winners: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok())
            .map(|r| r.get_ref().triage.as_ref().unwrap().actor.clone())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        for o in &outcomes {
            if let Err(err) = o {
                assert_reason(err, Code::Aborted, "VERSION_MISMATCH");
            }
        }
        let rows = app
            .sql()
            .await
            .query(
                "SELECT actor, version FROM triage_history \
                 WHERE signature = decode($1, 'hex') ORDER BY id",
                &[&signature],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), round, "round {round}");
        let last = rows.last().unwrap();
        assert_eq!(last.get::<_, String>(0), winners[0]);
        assert_eq!(last.get::<_, i64>(1), expected + 1);
    }
}

#[tokio::test]
async fn signatures_and_their_triage_are_per_project() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    for p in ["team-a", "team-b"] {
        create_cases(&app, p, &["t-1"]).await;
    }
    let message = "connection reset by 10.0.0.1:5432";
    record(&app, "team-a", "b-1", vec![failure("t-1", message, 1)]).await;
    let b_ids = record(
        &app,
        "team-b",
        "b-1",
        vec![failure("t-1", message, 2), failure("t-1", message, 3)],
    )
    .await;
    let in_a = all_signatures(&app, "team-a", Default::default()).await;
    let in_b = all_signatures(&app, "team-b", Default::default()).await;
    assert_eq!((in_a.len(), in_b.len()), (1, 1));
    // Same message, same hash, but each project counts its own.
    assert_eq!(in_a[0].signature, in_b[0].signature);
    assert_eq!((in_a[0].count, in_b[0].count), (1, 2));
    assert_eq!(sql_groups(&app, a).await.values().next(), Some(&(1, 1)));
    assert_eq!(sql_groups(&app, b).await.values().next(), Some(&(2, 1)));
    let signature = in_a[0].signature.clone();
    let mut f = failures(&app);
    f.triage_failure_signature(in_project(
        triage(&signature, TriageState::NoDefect, "ana"),
        "team-a",
    ))
    .await
    .unwrap();
    // B's signature and executions keep their own (default) triage.
    let b_sig = &all_signatures(&app, "team-b", Default::default()).await[0];
    assert_eq!(
        b_sig.triage.as_ref().unwrap().source,
        TriageSource::Default as i32
    );
    for e in executions(&app, "team-b").await.values() {
        assert_eq!(
            e.triage.as_ref().unwrap().state,
            TriageState::ToInvestigate as i32
        );
    }
    let history_b = f
        .list_triage_history(in_project(
            ListTriageHistoryRequest {
                signature: signature.clone(),
                ..Default::default()
            },
            "team-b",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(history_b.changes.is_empty());
    // B's execution from A is NOT_FOUND, and writes nothing.
    let err = f
        .triage_execution(in_project(
            TriageExecutionRequest {
                execution_id: b_ids[0].clone(),
                state: TriageState::ProductBug as i32,
                actor: "ana".into(),
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    // A signature seen only in B is NOT_FOUND from A.
    create_cases(&app, "team-b", &["t-2"]).await;
    record(&app, "team-b", "b-2", vec![failure("t-2", "only in b", 4)]).await;
    let only_b = all_signatures(&app, "team-b", Default::default())
        .await
        .into_iter()
        .find(|s| s.normalised_message == "only in b")
        .unwrap();
    let err = f
        .triage_failure_signature(in_project(
            triage(&only_b.signature, TriageState::ProductBug, "ana"),
            "team-a",
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    let rows: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM failure_signature_triage WHERE project_id = $1) \
                  + (SELECT count(*) FROM execution_triage WHERE project_id = $1) \
                  + (SELECT count(*) FROM triage_history WHERE project_id = $1)",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn bad_triage_input_is_invalid_argument_with_field_violations_and_writes_nothing() {
    let app = spawn_app().await;
    create_cases(&app, "default", &["t-1"]).await;
    let ids = record(&app, "default", "b-1", vec![failure("t-1", "boom", 1)]).await;
    let signature = all_signatures(&app, "default", Default::default()).await[0]
        .signature
        .clone();
    let mut f = failures(&app);
    let cases: Vec<(TriageFailureSignatureRequest, &[&str])> = vec![
        (
            TriageFailureSignatureRequest {
                state: 99,
                ..triage(&signature, TriageState::ProductBug, "ana")
            },
            &["state"],
        ),
        (
            TriageFailureSignatureRequest {
                state: 0,
                ..triage(&signature, TriageState::ProductBug, "ana")
            },
            &["state"],
        ),
        (
            TriageFailureSignatureRequest {
                comment: "x".repeat(4001),
                ..triage(&signature, TriageState::ProductBug, "ana")
            },
            &["comment"],
        ),
        (
            TriageFailureSignatureRequest {
                issue_url: "jira BUG-1".into(),
                ..triage(&signature, TriageState::ProductBug, "ana")
            },
            &["issue_url"],
        ),
        (
            TriageFailureSignatureRequest {
                issue_url: "ftp://issues.example.com/1".into(),
                ..triage(&signature, TriageState::ProductBug, "ana")
            },
            &["issue_url"],
        ),
        (
            triage(&signature[..10], TriageState::ProductBug, "ana"),
            &["signature"],
        ),
        (triage(&signature, TriageState::ProductBug, ""), &["actor"]),
        (
            TriageFailureSignatureRequest {
                expected_version: Some(-1),
                ..triage(&signature, TriageState::ProductBug, "ana")
            },
            &["expected_version"],
        ),
        (
            TriageFailureSignatureRequest {
                state: 42,
                comment: "\0".into(),
                issue_url: "not a url".into(),
                ..triage("", TriageState::ProductBug, "")
            },
            &["signature", "state", "comment", "issue_url", "actor"],
        ),
    ];
    for (request, fields) in cases {
        let err = f
            .triage_failure_signature(request.clone())
            .await
            .unwrap_err();
        assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
        let mut got = violated_fields(&err);
        got.sort();
        let mut want: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "{request:?}");
        assert!(!err.message().to_lowercase().contains("sql"), "{err:?}");
    }
    let err = f
        .triage_execution(TriageExecutionRequest {
            execution_id: ids[0].clone(),
            state: 7,
            comment: "y".repeat(5000),
            issue_url: "https://".into(),
            actor: "ana".into(),
            expected_version: None,
        })
        .await
        .unwrap_err();
    let mut got = violated_fields(&err);
    got.sort();
    assert_eq!(got, vec!["comment", "issue_url", "state"]);
    let err = f
        .list_triage_history(ListTriageHistoryRequest {
            signature: signature.clone(),
            execution_id: ids[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["signature"]);
    let err = f
        .list_failure_signatures(ListFailureSignaturesRequest {
            run_id: "not-a-uuid".into(),
            order_by: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    let mut got = violated_fields(&err);
    got.sort();
    assert_eq!(got, vec!["order_by", "run_id"]);
    // Nothing was written.
    let written: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT (SELECT count(*) FROM failure_signature_triage) \
                  + (SELECT count(*) FROM execution_triage) \
                  + (SELECT count(*) FROM triage_history) \
                  + (SELECT count(*) FROM audit_events WHERE rpc LIKE '%FailureService%')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(written, 0);
}

#[tokio::test]
async fn a_triage_whose_backend_is_terminated_while_it_waits_writes_nothing_and_its_retry_wins() {
    let app = spawn_app().await;
    create_cases(&app, "default", &["t-1"]).await;
    record(
        &app,
        "default",
        "b-1",
        vec![failure("t-1", "oops at 0x7f00", 1)],
    )
    .await;
    let signature = all_signatures(&app, "default", Default::default()).await[0]
        .signature
        .clone();
    let mut f = failures(&app);
    let mut first = triage(&signature, TriageState::ProductBug, "ana");
    first.expected_version = Some(0);
    f.triage_failure_signature(first).await.unwrap();

    // Another transaction holds the signature's triage row: the change waits.
    let mut blocker = app.sql().await;
    let hold = blocker.transaction().await.unwrap();
    hold.execute(
        "SELECT 1 FROM failure_signature_triage WHERE signature = decode($1, 'hex') FOR UPDATE",
        &[&signature],
    )
    .await
    .unwrap();
    let mut change = triage(&signature, TriageState::NoDefect, "late");
    change.expected_version = Some(1);
    let waiting_call = tokio::spawn({
        let mut f = f.clone();
        let change = change.clone();
        async move { f.triage_failure_signature(change).await }
    });
    let observer = app.sql().await;
    wait_for_lock_wait(&observer, "%FROM failure_signature_triage%").await;
    terminate_lock_waiter(&observer, "%FROM failure_signature_triage%").await;
    let err = waiting_call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    hold.rollback().await.unwrap();
    // Nothing of it was written: state, history and audit as before.
    let stored = |sql: &'static str| {
        let observer = &observer;
        let signature = signature.clone();
        async move {
            observer
                .query_one(sql, &[&signature])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    const VERSION: &str =
        "SELECT version FROM failure_signature_triage WHERE signature = decode($1, 'hex')";
    const HISTORY: &str = "SELECT count(*) FROM triage_history WHERE signature = decode($1, 'hex')";
    const AUDITED: &str = "SELECT count(*) FROM audit_events \
         WHERE rpc LIKE '%TriageFailureSignature' AND $1::text IS NOT NULL";
    assert_eq!(
        (
            stored(VERSION).await,
            stored(HISTORY).await,
            stored(AUDITED).await
        ),
        (1, 1, 1)
    );
    // The retry of the same change (same expected version) succeeds once.
    let retried = f
        .triage_failure_signature(change.clone())
        .await
        .unwrap()
        .into_inner()
        .triage
        .unwrap();
    assert_eq!((retried.version, retried.actor.as_str()), (2, "late"));
    let err = f.triage_failure_signature(change).await.unwrap_err();
    assert_reason(&err, Code::Aborted, "VERSION_MISMATCH");
    assert_eq!(
        (
            stored(VERSION).await,
            stored(HISTORY).await,
            stored(AUDITED).await
        ),
        (2, 2, 2)
    );
    app.stop().await.unwrap();
}

#[tokio::test]
async fn the_normaliser_masks_each_kind_and_keeps_everything_else() {
    let app = spawn_app().await;
    let c = app.sql().await;
    let table: &[(&str, &str)] = &[
        (
            "element not visible: button.submit",
            "element not visible: button.submit",
        ),
        ("  many \t spaces\n\nand lines  ", "many spaces and lines"),
        ("expected 42 but got -3.5", "expected <n> but got -<n>"),
        ("retry 1,000 times in v1.2.3", "retry <n> times in v<n>"),
        (
            "id 7f3c2a1b-1111-4222-8333-123456789ABC gone",
            "id <uuid> gone",
        ),
        (
            "GET https://api.example.com/v2/items?id=9 failed",
            "GET <url> failed",
        ),
        (
            "open('/etc/app/conf.d/x.yaml') failed",
            "open('<path>') failed",
        ),
        ("at ./src/main.rs:12:5", "at <path>:<n>:<n>"),
        ("load ~/cache/blob", "load <path>"),
        ("copy D:\\data\\in.csv", "copy <path>"),
        ("connect 192.168.0.1:8080 refused", "connect <ip> refused"),
        ("connect [2001:db8::1]:443 refused", "connect <ip> refused"),
        ("at 2026-11-29T14:35:08.123+01:00 ok", "at <ts> ok"),
        ("on 2026-11-29 at 9:05:01", "on <ts> at <ts>"),
        (
            "segfault at 0x7ffd1234 in a1b2c3d4e5f6",
            "segfault at <hex> in <hex>",
        ),
        // Words of hex letters only and short hex words are words.
        ("deadbeef cafe", "deadbeef cafe"),
        ("Ünïcödé 7 ✓", "Ünïcödé <n> ✓"),
        ("and/or 3/4", "and/or <n>/<n>"),
    ];
    for (raw, want) in table {
        let got: String = c
            .query_one("SELECT verdict_normalise_error($1)", &[raw])
            .await
            .unwrap()
            .get(0);
        assert_eq!(&got, want, "{raw:?}");
    }
    // The signature: SHA-256 of the normalised text for failures only.
    for (status, message, signed) in [
        ("failed", "boom 1", true),
        ("error", "boom 2", true),
        ("passed", "boom 3", false),
        ("skipped", "boom 4", false),
        ("failed", "", false),
        ("failed", " \n ", false),
    ] {
        let row = c
            .query_one(
                "SELECT verdict_error_signature($1, $2), \
                        sha256(convert_to(verdict_normalise_error($2), 'UTF8'))",
                &[&status, &message],
            )
            .await
            .unwrap();
        let got: Option<Vec<u8>> = row.get(0);
        assert_eq!(got.is_some(), signed, "{status} {message:?}");
        if signed {
            assert_eq!(got.unwrap(), row.get::<_, Vec<u8>>(1));
        }
    }
}

#[tokio::test]
async fn listed_executions_are_exactly_what_get_execution_returns_in_either_view() {
    // ListExecutions writes its executions straight from their rows (with
    // the triage of failures); GetExecution replies with the generated
    // message. Every field of every shape must read back the same, page by
    // page; BASIC leaves out exactly what it says.
    use verdict::proto::{ExecutionView, GetExecutionRequest};
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    create_cases(&app, "team-a", &["t-1", "t-2"]).await;
    let to_struct = |v: serde_json::Value| verdict::convert::json_to_struct(&v);
    let mut rich = failure("t-1", "disk /dev/sda1 full after 12 writes", 1);
    rich.stack_trace = "at main.rs:1\n  at lib.rs:2 « é » 🚀".into();
    rich.environment = Some(to_struct(serde_json::json!({
        "os": "linux", "n": -1.5, "t": true, "nested": {"a": [1, "two", null]}, "empty": {}
    })));
    rich.screenshot_refs = vec!["s3://shots/1.png".into(), "s3://shots/2.png".into()];
    rich.interaction_log = vec![
        to_struct(serde_json::json!({"step": 1, "click": "#ok"})),
        to_struct(serde_json::json!({})),
        to_struct(serde_json::json!({"blob": "y".repeat(20_000)})),
    ];
    rich.performance = [("p50".to_string(), 12.5), ("zero".to_string(), 0.0)]
        .into_iter()
        .collect();
    rich.labels = [("shard", "3"), ("é", "ü")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // A session and a run of the project, for the execution that names both.
    let session = app
        .sessions
        .clone()
        .create_session(in_project(
            crate::sessions::new_session("wire-session"),
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let test_run =
        verdict::proto::test_run_service_client::TestRunServiceClient::new(app.channel.clone())
            .create_test_run(in_project(
                crate::test_runs::new_run("wire-run", "main", &[]),
                "team-a",
            ))
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
    let mut plain = run("t-2", ExecutionStatus::Passed, 2, 0);
    plain.session_id = session.id.clone();
    plain.run_id = test_run.id.clone();
    let overridden = failure("t-2", "timeout after 30 s", 3);
    let odd = failure("t-1", "disk /dev/sdb2 full after 99 writes", 4);
    let ids = record(&app, "team-a", "wire", vec![rich, plain, overridden, odd]).await;
    // A signature triage (reaches both disk failures) and an execution
    // override.
    let signature = all_signatures(&app, "team-a", Default::default())
        .await
        .into_iter()
        .find(|s| s.example_message.contains("disk"))
        .expect("the disk signature")
        .signature;
    let mut f = failures(&app);
    f.triage_failure_signature(in_project(
        triage(&signature, TriageState::ProductBug, "Zoë"),
        "team-a",
    ))
    .await
    .unwrap();
    f.triage_execution(in_project(
        TriageExecutionRequest {
            execution_id: ids[2].clone(),
            state: TriageState::AutomationBug as i32,
            comment: "retry \"fixed\" it".into(),
            actor: "ana".into(),
            ..Default::default()
        },
        "team-a",
    ))
    .await
    .unwrap();
    // Shapes only direct SQL can store: items of the interaction log that
    // are not objects, performance values that are not numbers, an
    // environment that is JSON null.
    app.sql()
        .await
        .execute(
            "UPDATE test_executions SET interaction_log = '[1, {\"a\": 2}, \"x\", null, []]', \
             performance = '{\"p\": 1.5, \"s\": \"text\", \"n\": null, \"i\": 7}', \
             environment = 'null' WHERE id = $1",
            &[&ids[3].parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap();

    let mut by_get = HashMap::new();
    for id in &ids {
        let e = app
            .test_cases
            .clone()
            .get_execution(in_project(GetExecutionRequest { id: id.clone() }, "team-a"))
            .await
            .unwrap()
            .into_inner()
            .execution
            .unwrap();
        by_get.insert(id.clone(), e);
    }
    assert!(by_get[&ids[0]].triage.is_some() && by_get[&ids[2]].triage.is_some());
    assert_eq!(
        (
            by_get[&ids[1]].session_id.as_str(),
            by_get[&ids[1]].run_id.as_str()
        ),
        (session.id.as_str(), test_run.id.as_str())
    );
    assert_eq!(by_get[&ids[3]].interaction_log.len(), 5);
    assert_eq!(by_get[&ids[3]].performance.len(), 2);
    for view in [ExecutionView::Full, ExecutionView::Basic] {
        let (mut listed, mut token, mut pages) = (Vec::<Execution>::new(), String::new(), 0);
        loop {
            let page = app
                .test_cases
                .clone()
                .list_executions(in_project(
                    ListExecutionsRequest {
                        page_size: 3,
                        page_token: token,
                        view: view as i32,
                        ..Default::default()
                    },
                    "team-a",
                ))
                .await
                .unwrap()
                .into_inner();
            pages += 1;
            listed.extend(page.executions);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(pages, 2, "{view:?}");
        let listed_ids: Vec<&str> = listed.iter().map(|e| e.id.as_str()).collect();
        let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
        assert_eq!(listed_ids, newest_first, "{view:?}: newest first");
        for e in listed {
            let mut want = by_get[&e.id].clone();
            if view == ExecutionView::Basic {
                want.environment = None;
                want.stack_trace = String::new();
                want.interaction_log = Vec::new();
                want.performance = Default::default();
            }
            assert_eq!(e, want, "{view:?}");
        }
    }
}
