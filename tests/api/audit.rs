//! The audit trail: one row per write or admin call, in the write's own
//! transaction, listed by AdminService.ListAuditEvents.

use crate::discrepancies::item;
use crate::helpers::*;
use crate::results::new_result;
use crate::sessions::new_session;
use tonic::Code;
use verdict::proto::{
    AppendSessionLogRequest, AuditEvent, DeleteSessionRequest, IngestDiscrepanciesRequest,
    ListAuditEventsRequest, LogLevel, RecordDiscrepanciesRequest, Resolution,
    ResolveDiscrepancyRequest, SessionStatus, UpdateSessionStatusRequest,
};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn traced<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut r = authed(message, token);
    r.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE}-00f067aa0ba902b7-01").parse().unwrap(),
    );
    r
}

fn key_id(token: &str) -> String {
    token[3..19].to_owned()
}

async fn events(app: &TestApp, token: &str, filter: ListAuditEventsRequest) -> Vec<AuditEvent> {
    app.admin
        .clone()
        .list_audit_events(authed(filter, token))
        .await
        .expect("list audit events")
        .into_inner()
        .events
}

#[tokio::test]
async fn every_write_appends_one_audit_row_with_key_rpc_targets_outcome_and_trace() {
    let (app, keys) = spawn_auth_app().await;
    let w = &keys.write;
    let mut s = app.sessions.clone();
    let session = s
        .create_session(traced(new_session("audit-1"), w))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    // A retry is audited as a replay.
    s.create_session(traced(new_session("audit-1"), w))
        .await
        .unwrap();
    s.update_session_status(traced(
        UpdateSessionStatusRequest {
            id: session.id.clone(),
            status: SessionStatus::Processing as i32,
            expected_version: None,
        },
        w,
    ))
    .await
    .unwrap();
    s.append_session_log(traced(
        AppendSessionLogRequest {
            session_id: session.id.clone(),
            level: LogLevel::Info as i32,
            message: "started".into(),
            fields: None,
        },
        w,
    ))
    .await
    .unwrap();
    let result = app
        .results
        .clone()
        .record_result(traced(new_result(&session.id, "r-1", 0.9), w))
        .await
        .unwrap()
        .into_inner()
        .result
        .unwrap();
    let mut d = app.discrepancies.clone();
    let ids = d
        .record_discrepancies(traced(
            RecordDiscrepanciesRequest {
                session_id: session.id.clone(),
                batch_id: "b-1".into(),
                items: vec![item(1), item(2)],
            },
            w,
        ))
        .await
        .unwrap()
        .into_inner()
        .ids;
    d.resolve_discrepancy(traced(
        ResolveDiscrepancyRequest {
            id: ids[0].clone(),
            resolution: Resolution::Acknowledged as i32,
            actor: "qa".into(),
            note: String::new(),
            apply_to_fingerprint: false,
        },
        w,
    ))
    .await
    .unwrap();
    let chunks: Vec<_> = (1..=2)
        .map(|n| IngestDiscrepanciesRequest {
            ingest_id: "ing-1".into(),
            session_id: session.id.clone(),
            sequence: n,
            items: vec![item(n as usize + 10)],
        })
        .collect();
    d.ingest_discrepancies(traced(futures::stream::iter(chunks), w))
        .await
        .unwrap();
    let other = s
        .create_session(traced(new_session("audit-2"), w))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    s.delete_session(traced(
        DeleteSessionRequest {
            id: other.id.clone(),
            expected_version: None,
        },
        w,
    ))
    .await
    .unwrap();

    let trail = events(
        &app,
        &keys.admin,
        ListAuditEventsRequest {
            key_id: key_id(w),
            ..Default::default()
        },
    )
    .await;
    let default = default_project(&app).await.to_string();
    let mut seen: Vec<(String, String, Vec<String>)> = trail
        .iter()
        .rev()
        .map(|e| {
            assert_eq!(e.key_id, key_id(w));
            assert_eq!(e.project_id, default, "no header, an unbound key: default");
            assert_eq!(e.trace_id, TRACE, "{e:?}");
            assert!(e.time.is_some());
            let rpc = e.rpc.rsplit('/').next().unwrap().to_owned();
            (rpc, e.outcome.clone(), e.target_ids.clone())
        })
        .collect();
    let sid = session.id.clone();
    let expected = vec![
        ("CreateSession", "created", vec![sid.clone()]),
        ("CreateSession", "replayed", vec![sid.clone()]),
        ("UpdateSessionStatus", "updated", vec![sid.clone()]),
        ("AppendSessionLog", "appended", vec![sid.clone()]),
        (
            "RecordResult",
            "created",
            vec![sid.clone(), result.id.clone()],
        ),
        ("RecordDiscrepancies", "created", vec![sid.clone()]),
        ("ResolveDiscrepancy", "updated", vec![ids[0].clone()]),
        ("IngestDiscrepancies", "appended", vec![sid.clone()]),
        ("CreateSession", "created", vec![other.id.clone()]),
        ("DeleteSession", "deleted", vec![other.id.clone()]),
    ];
    let expected: Vec<(String, String, Vec<String>)> = expected
        .into_iter()
        .map(|(r, o, t)| (r.to_owned(), o.to_owned(), t))
        .collect();
    seen.truncate(expected.len() + 1);
    assert_eq!(seen, expected);
    assert!(trail.iter().all(|e| e.rpc.starts_with("/verdict.v1.")));

    // The audit read itself is recorded, under the admin key.
    let admin_reads = events(
        &app,
        &keys.admin,
        ListAuditEventsRequest {
            key_id: key_id(&keys.admin),
            rpc: "/verdict.v1.AdminService/ListAuditEvents".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(admin_reads.len(), 1);
    assert_eq!(admin_reads[0].outcome, "read");

    // Filter by target: the deleted session's two rows.
    let by_target = events(
        &app,
        &keys.admin,
        ListAuditEventsRequest {
            target_id: other.id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_target.len(), 2);
}

#[tokio::test]
async fn a_failed_write_leaves_no_audit_row() {
    let (app, keys) = spawn_auth_app().await;
    let mut s = app.sessions.clone();
    let session = s
        .create_session(authed(new_session("fail-1"), &keys.write))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let sql = app.sql().await;
    let count = || async {
        sql.query_one("SELECT count(*) FROM audit_events", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = count().await;
    // Refused by the handler after its transaction began.
    let err = s
        .update_session_status(authed(
            UpdateSessionStatusRequest {
                id: session.id.clone(),
                status: SessionStatus::Completed as i32,
                expected_version: None,
            },
            &keys.write,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = s
        .delete_session(authed(
            DeleteSessionRequest {
                id: uuid::Uuid::new_v4().to_string(),
                expected_version: None,
            },
            &keys.write,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(count().await, before);

    // The audit row and the write share one transaction: when the audit
    // insert fails, the session is not stored either.
    sql.batch_execute(
        "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'audit refused'; END $$; \
         CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events \
         FOR EACH ROW EXECUTE FUNCTION refuse_audit();",
    )
    .await
    .unwrap();
    let err = s
        .create_session(authed(new_session("fail-2"), &keys.write))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    let stored: i64 = sql
        .query_one(
            "SELECT count(*) FROM sessions WHERE request_id = 'fail-2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "the write was committed without its audit row");
    assert_eq!(count().await, before);
}

#[tokio::test]
async fn list_audit_events_pages_with_signed_tokens_and_validates_filters() {
    let (app, keys) = spawn_auth_app().await;
    let mut s = app.sessions.clone();
    for n in 0..5 {
        s.create_session(authed(new_session(&format!("page-{n}")), &keys.write))
            .await
            .unwrap();
    }
    let filter = ListAuditEventsRequest {
        rpc: "/verdict.v1.SessionService/CreateSession".into(),
        page_size: 2,
        ..Default::default()
    };
    let mut admin = app.admin.clone();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = admin
            .list_audit_events(authed(
                ListAuditEventsRequest {
                    page_token: token.clone(),
                    ..filter.clone()
                },
                &keys.admin,
            ))
            .await
            .unwrap()
            .into_inner();
        all.extend(page.events.into_iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first: {all:?}");

    let err = admin
        .list_audit_events(authed(
            ListAuditEventsRequest {
                key_id: "NOT-A-KEY".into(),
                page_size: -1,
                ..Default::default()
            },
            &keys.admin,
        ))
        .await
        .unwrap_err();
    let mut fields = violated_fields(&err);
    fields.sort();
    assert_eq!(fields, ["key_id", "page_size"]);
}

#[tokio::test]
async fn a_cleanup_that_deletes_nothing_still_leaves_an_audit_row() {
    use verdict::proto::CleanupRequest;
    let (app, keys) = spawn_auth_app().await;
    let a = &keys.admin;
    let rpc = "/verdict.v1.AdminService/Cleanup";
    let filter = || ListAuditEventsRequest {
        rpc: rpc.into(),
        ..Default::default()
    };
    assert!(events(&app, a, filter()).await.is_empty());
    let report = app
        .admin
        .clone()
        .cleanup(traced(
            CleanupRequest {
                older_than: Some(prost_types::Duration {
                    seconds: 86_400,
                    nanos: 0,
                }),
                ..Default::default()
            },
            a,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!report.dry_run);
    assert_eq!(report.batches, 0);
    assert!(report.deleted.iter().all(|t| t.rows == 0));
    let rows = events(&app, a, filter()).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].key_id, key_id(a));
    assert_eq!(rows[0].outcome, "deleted");
    assert!(rows[0].target_ids.is_empty());
    assert_eq!(rows[0].trace_id, TRACE);
}

#[tokio::test]
async fn audit_rows_cannot_be_updated_or_deleted_except_by_the_retention_job() {
    let (app, keys) = spawn_auth_app().await;
    app.sessions
        .clone()
        .create_session(authed(new_session("kept"), &keys.write))
        .await
        .unwrap();
    let sql = app.sql().await;
    let count = async || -> i64 {
        sql.query_one("SELECT count(*) FROM audit_events", &[])
            .await
            .unwrap()
            .get(0)
    };
    let before = count().await;
    assert!(before >= 1);
    for statement in [
        "UPDATE audit_events SET outcome = 'read'",
        "UPDATE audit_events SET key_id = NULL WHERE id = (SELECT min(id) FROM audit_events)",
        "DELETE FROM audit_events",
        "DELETE FROM audit_events WHERE id = (SELECT min(id) FROM audit_events)",
        "TRUNCATE audit_events",
    ] {
        let err = sql.batch_execute(statement).await.unwrap_err();
        let db = err.as_db_error().expect("refused by the database");
        assert!(db.message().contains("append-only"), "{statement}: {db:?}");
        assert_eq!(
            db.code(),
            &tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE,
            "{statement}"
        );
    }
    // The setting must be transaction-local and set to `on`: a session-wide
    // `off`, or an update even under the setting, is still refused.
    assert!(
        sql.batch_execute(
            "BEGIN; SET LOCAL verdict.audit_retention = on; \
             UPDATE audit_events SET outcome = 'read'; COMMIT;"
        )
        .await
        .is_err()
    );
    sql.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(count().await, before);
    let outcomes: Vec<String> = sql
        .query("SELECT outcome FROM audit_events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!outcomes.iter().any(|o| o == "read"), "{outcomes:?}");

    // The retention job's way: DELETE in a transaction that says so.
    sql.batch_execute(
        "BEGIN; SET LOCAL verdict.audit_retention = on; \
         DELETE FROM audit_events WHERE at < now() + interval '1 hour'; COMMIT;",
    )
    .await
    .unwrap();
    assert_eq!(count().await, 0);
    // The setting did not outlive its transaction.
    app.sessions
        .clone()
        .create_session(authed(new_session("after"), &keys.write))
        .await
        .unwrap();
    assert!(sql.batch_execute("DELETE FROM audit_events").await.is_err());
    assert_eq!(count().await, 1);
}

mod schema {
    refinery::embed_migrations!("migrations");
}

#[tokio::test]
async fn audit_rows_stored_before_projects_belong_to_default_and_new_ones_must_name_a_project() {
    let (_, url) = create_database().await;
    let mut client = admin_client(&url).await;
    // The schema as it was before the audit trail had projects (V18 and
    // below), with a trail of two rows.
    schema::migrations::runner()
        .set_target(refinery::Target::Version(18))
        .run_async(&mut client)
        .await
        .expect("migrate to V18");
    client
        .batch_execute(
            "INSERT INTO audit_events (rpc, target_ids, outcome) VALUES \
             ('/verdict.v1.SessionService/CreateSession', '{s1}', 'created'), \
             ('cli:keys.create', '{k1}', 'created');",
        )
        .await
        .unwrap();
    // V19 gives them their project.
    schema::migrations::runner()
        .set_target(refinery::Target::Version(19))
        .run_async(&mut client)
        .await
        .expect("migrate to V19");
    let default: uuid::Uuid = client
        .query_one("SELECT id FROM projects WHERE slug = 'default'", &[])
        .await
        .unwrap()
        .get(0);
    let projects: Vec<Option<uuid::Uuid>> = client
        .query("SELECT project_id FROM audit_events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(projects, [Some(default), Some(default)]);
    // No default is left: a row that names no project is refused.
    let err = client
        .batch_execute("INSERT INTO audit_events (rpc, outcome) VALUES ('x', 'read')")
        .await
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code()),
        Some(&tokio_postgres::error::SqlState::NOT_NULL_VIOLATION),
        "{err:?}"
    );
    // No foreign key: the trail keeps the rows of a project that is gone.
    let foreign_keys: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_constraint \
             WHERE conrelid = 'audit_events'::regclass AND contype = 'f'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(foreign_keys, 0);
    // The append-only triggers still hold.
    let err = client
        .batch_execute("UPDATE audit_events SET outcome = 'read'")
        .await
        .unwrap_err();
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("append-only")),
        "{err:?}"
    );
    // The gateway's own migration run applies the rest: since V33 a row
    // written by direct SQL that names no project lands in `default`.
    verdict::db::migrate::run(&mut client)
        .await
        .expect("migrate to the end");
    let project: uuid::Uuid = client
        .query_one(
            "INSERT INTO audit_events (rpc, outcome) VALUES ('x', 'read') RETURNING project_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(project, default);
}
