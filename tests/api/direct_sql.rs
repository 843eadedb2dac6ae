//! Writers that go around the gateway with plain SQL (the benchmark harness,
//! an operator's script, a bulk load written before projects existed): rows
//! that leave `project_id` out land in `default`, log rows that leave `seq`
//! out get the next position of their session, gap-free under concurrent
//! writers, and a child still cannot land in another project than its parent.

use crate::helpers::{create_project, default_project, in_project, spawn_app};
use crate::sessions::{create, new_session};
use tokio_postgres::error::SqlState;
use verdict::proto::{
    AppendSessionLogRequest, GetSessionRequest, ListSessionLogsRequest, ListSessionsRequest,
    LogLevel, get_session_request::Lookup,
};

/// The harness's seed, verbatim but for its size.
const SEED: &str = "
INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope, status, config, input_refs, metadata, created_at)
SELECT gen_random_uuid(), 'seed-'||g, 'python_flask', 'typescript_react', 'full_system', 'processing',
       jsonb_build_object('strict', true, 'depth', g % 5), jsonb_build_object('repo', 'git://example/'||g),
       jsonb_build_object('owner', 'team-'||(g % 7)), now() - (g || ' seconds')::interval
FROM generate_series(1, 20) g";

/// The harness's append transaction (its two statements, with the session id
/// as a parameter instead of a literal).
const APPEND_LOG: &str = "INSERT INTO session_logs (session_id, level, message, fields) \
     VALUES ($1, 'info', 'bench entry', '{}') RETURNING id, seq";
const APPEND_AUDIT: &str = "INSERT INTO audit_events (key_id, rpc, target_ids, outcome, trace_id) \
     VALUES (NULL, '/verdict.v1.SessionService/AppendSessionLog', ARRAY[$1::text], 'appended', NULL)";

/// One raw append the way the harness makes it: a transaction with the log
/// row and its audit row. Returns the position the log row got.
async fn raw_append(sql: &mut tokio_postgres::Client, session: uuid::Uuid) -> i64 {
    let tx = sql.transaction().await.expect("begin");
    let seq: i64 = tx
        .query_one(APPEND_LOG, &[&session])
        .await
        .expect("a raw log row without project_id and seq is accepted")
        .get(1);
    tx.execute(APPEND_AUDIT, &[&session.to_string()])
        .await
        .expect("a raw audit row without project_id is accepted");
    tx.commit().await.expect("commit");
    seq
}

#[tokio::test]
async fn raw_inserts_without_project_id_land_in_default_and_the_gateway_serves_them() {
    let app = spawn_app().await;
    let default = default_project(&app).await;
    let mut sql = app.sql().await;
    assert_eq!(sql.execute(SEED, &[]).await.expect("the seed runs"), 20);
    let (id, project): (uuid::Uuid, uuid::Uuid) = {
        let row = sql
            .query_one(
                "SELECT id, project_id FROM sessions WHERE request_id = 'seed-10'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(project, default, "a raw session lands in default");

    // The raw rows are the gateway's rows: a call that names no project reads them.
    let got = app
        .sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::Id(id.to_string())),
            ..Default::default()
        })
        .await
        .expect("GetSession finds a raw session")
        .into_inner()
        .session
        .expect("session");
    assert_eq!(got.request_id, "seed-10");
    let page = app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest {
            page_size: 50,
            ..Default::default()
        })
        .await
        .expect("ListSessions")
        .into_inner();
    assert_eq!(page.sessions.len(), 20);

    // Raw appends get positions 1 and 2, the gateway's next append 3, the
    // raw one after it 4: one sequence whoever writes.
    assert_eq!(raw_append(&mut sql, id).await, 1);
    assert_eq!(raw_append(&mut sql, id).await, 2);
    let entry = app
        .sessions
        .clone()
        .append_session_log(AppendSessionLogRequest {
            session_id: id.to_string(),
            level: LogLevel::Info as i32,
            message: "through the gateway".into(),
            fields: None,
        })
        .await
        .expect("append through the gateway")
        .into_inner()
        .entry
        .expect("entry");
    assert_eq!(entry.sequence, 3);
    assert_eq!(raw_append(&mut sql, id).await, 4);

    let logs = sql
        .query(
            "SELECT project_id, seq FROM session_logs WHERE session_id = $1 ORDER BY seq",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(
        logs.iter()
            .map(|r| (r.get::<_, uuid::Uuid>(0), r.get::<_, i64>(1)))
            .collect::<Vec<_>>(),
        (1..=4).map(|n| (default, n)).collect::<Vec<_>>()
    );
    let log_seq: i64 = sql
        .query_one("SELECT log_seq FROM sessions WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(log_seq, 4, "the session's counter moved with every raw row");
    let raw_audit: Vec<uuid::Uuid> = sql
        .query(
            "SELECT project_id FROM audit_events WHERE key_id IS NULL AND outcome = 'appended' \
             AND target_ids = ARRAY[$1::text] AND rpc LIKE '%AppendSessionLog'",
            &[&id.to_string()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(raw_audit.len(), 4, "three raw audit rows and the gateway's");
    assert!(raw_audit.iter().all(|p| *p == default), "{raw_audit:?}");

    // ListSessionLogs serves them in order.
    let listed = app
        .sessions
        .clone()
        .list_session_logs(ListSessionLogsRequest {
            session_id: id.to_string(),
            page_size: 10,
            ..Default::default()
        })
        .await
        .expect("ListSessionLogs")
        .into_inner();
    assert_eq!(
        listed
            .entries
            .iter()
            .map(|e| e.sequence)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
}

#[tokio::test]
async fn four_concurrent_raw_writers_and_the_gateway_keep_the_log_sequence_gap_free() {
    const PER_WRITER: i64 = 40;
    let app = spawn_app().await;
    let session: uuid::Uuid = create(&app, "direct-sql-concurrent")
        .await
        .id
        .parse()
        .unwrap();
    let mut writers = Vec::new();
    for _ in 0..4 {
        let mut sql = app.sql().await;
        writers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for n in 0..PER_WRITER {
                if n % 10 == 9 {
                    // A rolled-back raw append leaves no gap behind.
                    let tx = sql.transaction().await.unwrap();
                    tx.query_one(APPEND_LOG, &[&session]).await.unwrap();
                    tx.rollback().await.unwrap();
                }
                seen.push(raw_append(&mut sql, session).await);
            }
            seen
        }));
    }
    // The gateway appends at the same time, with its own positions.
    let mut client = app.sessions.clone();
    let gateway = tokio::spawn(async move {
        let mut seen = Vec::new();
        for n in 0..PER_WRITER {
            let entry = client
                .append_session_log(AppendSessionLogRequest {
                    session_id: session.to_string(),
                    level: LogLevel::Info as i32,
                    message: format!("gateway {n}"),
                    fields: None,
                })
                .await
                .expect("append")
                .into_inner()
                .entry
                .expect("entry");
            seen.push(entry.sequence);
        }
        seen
    });
    let mut all = gateway.await.unwrap();
    assert!(all.windows(2).all(|w| w[0] < w[1]), "{all:?}");
    for w in writers {
        let seen = w.await.unwrap();
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "one writer's positions rise: {seen:?}"
        );
        all.extend(seen);
    }
    all.sort_unstable();
    let total = 5 * PER_WRITER;
    assert_eq!(all, (1..=total).collect::<Vec<_>>(), "every position once");

    let sql = app.sql().await;
    let stored: Vec<i64> = sql
        .query(
            "SELECT seq FROM session_logs WHERE session_id = $1 ORDER BY seq",
            &[&session],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, (1..=total).collect::<Vec<_>>());
    let log_seq: i64 = sql
        .query_one("SELECT log_seq FROM sessions WHERE id = $1", &[&session])
        .await
        .unwrap()
        .get(0);
    assert_eq!(log_seq, total);
}

#[tokio::test]
async fn a_raw_log_row_without_project_id_for_another_projects_session_is_refused() {
    let app = spawn_app().await;
    let team_a = create_project(&app, "team-a").await;
    let theirs = app
        .sessions
        .clone()
        .create_session(in_project(new_session("theirs"), "team-a"))
        .await
        .expect("create in team-a")
        .into_inner()
        .session
        .expect("session");
    let id: uuid::Uuid = theirs.id.parse().unwrap();
    let mut sql = app.sql().await;

    // `default` is not the session's project: the composite key refuses it.
    let tx = sql.transaction().await.unwrap();
    let err = tx
        .query_one(APPEND_LOG, &[&id])
        .await
        .expect_err("a log row cannot land in default for a team-a session");
    assert_eq!(err.code(), Some(&SqlState::FOREIGN_KEY_VIOLATION), "{err}");
    drop(tx);

    // Naming the project works, and numbers from the session's own counter.
    let seq: i64 = sql
        .query_one(
            "INSERT INTO session_logs (project_id, session_id, level, message, fields) \
             VALUES ($1, $2, 'info', 'named', '{}') RETURNING seq",
            &[&team_a, &id],
        )
        .await
        .expect("a raw log row naming its project")
        .get(0);
    assert_eq!(seq, 1, "the refused row took no position");
    let row = sql
        .query_one(
            "SELECT log_seq, (SELECT count(*) FROM session_logs WHERE session_id = $1) \
             FROM sessions WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1, 1));

    // A raw session in default with the same request id is default's own.
    sql.execute(
        "INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope) \
         VALUES (gen_random_uuid(), 'theirs', 'a', 'b', 'c')",
        &[],
    )
    .await
    .expect("request ids are unique per project");
    let projects: Vec<uuid::Uuid> = sql
        .query(
            "SELECT project_id FROM sessions WHERE request_id = 'theirs' ORDER BY project_id = $1",
            &[&team_a],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(projects, vec![default_project(&app).await, team_a]);
}
