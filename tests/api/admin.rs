//! AdminService: stats, retention, integrity, migrations, export.

use crate::helpers::{TestApp, default_project, spawn_app, violated_fields};
use crate::sessions::create;
use prost_types::{Duration as PbDuration, Timestamp};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;
use verdict::proto::{
    CheckIntegrityRequest, CleanupRequest, ExportSessionRequest, GetMigrationStatusRequest,
    GetStatsRequest, export_record::Record,
};

pub async fn exec(app: &TestApp, sql: &str) {
    app.sql().await.batch_execute(sql).await.unwrap();
}

pub async fn count(app: &TestApp, sql: &str) -> i64 {
    app.sql().await.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn stats_count_every_table_exactly_on_request() {
    let app = spawn_app().await;
    create(&app, "a").await;
    create(&app, "b").await;
    let stats = app
        .admin
        .clone()
        .get_stats(GetStatsRequest {
            exact: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let tables: HashMap<_, _> = stats
        .tables
        .iter()
        .map(|t| (t.table.as_str(), t.rows))
        .collect();
    assert_eq!(tables["sessions"], 2);
    assert_eq!(tables["discrepancies"], 0);
    assert!(stats.tables.iter().all(|t| t.exact));
    assert_eq!(
        stats.database_size_bytes, 0,
        "the database is every project's: its size is for all_projects"
    );
    assert!(stats.oldest_session_at.unwrap().seconds <= stats.newest_session_at.unwrap().seconds);
    let pool = stats.pool.unwrap();
    assert!(pool.max_size >= pool.size && pool.size >= 1);

    let estimated = app
        .admin
        .clone()
        .get_stats(GetStatsRequest {
            exact: false,
            all_projects: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(estimated.tables.iter().all(|t| !t.exact));
    assert_eq!(estimated.tables.len(), stats.tables.len());
    assert!(estimated.database_size_bytes > 0);
}

/// Sessions `{prefix}-1` … `{prefix}-5` of `project`, created around a
/// cutoff (1 and 2 before it, 3 exactly at it, 4 and 5 after), each with a
/// log, a result, a discrepancy with a resolution change, a test execution
/// and a coverage report with one file. Every row names its project (as the
/// gateway's own inserts do). Plant once per project.
pub async fn plant_around(app: &TestApp, project: Uuid, prefix: &str, cutoff: &str) {
    exec(
        app,
        &format!(
            "INSERT INTO sessions (project_id, id, request_id, source_technology, target_technology,
                 validation_scope, created_at)
             SELECT '{project}', gen_random_uuid(), '{prefix}-' || i, 'cobol', 'java', 'full',
                    TIMESTAMPTZ '{cutoff}' + (i - 3) * interval '1 microsecond'
             FROM generate_series(1, 5) i;
             INSERT INTO session_logs (project_id, session_id, level, message)
             SELECT project_id, id, 'info', 'x' FROM sessions WHERE project_id = '{project}';
             INSERT INTO results (project_id, session_id, id, request_id, result_type, overall_status,
                 fidelity_score)
             SELECT project_id, id, gen_random_uuid(), 'r', 'static', 'passed', 0.5
             FROM sessions WHERE project_id = '{project}';
             INSERT INTO discrepancies (project_id, session_id, id, kind, severity, description,
                 confidence, fingerprint)
             SELECT project_id, id, gen_random_uuid(), 'k', 2, 'd', 0.5, 'f'
             FROM sessions WHERE project_id = '{project}';
             INSERT INTO discrepancy_resolutions (project_id, session_id, discrepancy_id,
                 from_resolution, to_resolution, actor)
             SELECT project_id, session_id, id, 'open', 'acknowledged', 'ana'
             FROM discrepancies WHERE project_id = '{project}';
             INSERT INTO test_cases (project_id, id, key, name, test_type)
             VALUES ('{project}', gen_random_uuid(), '{prefix}-test', 't', 'unit');
             INSERT INTO test_executions (project_id, id, test_case_id, session_id, status, started_at)
             SELECT s.project_id, gen_random_uuid(), t.id, s.id, 'passed', now()
             FROM sessions s JOIN test_cases t ON t.project_id = s.project_id AND t.key = '{prefix}-test'
             WHERE s.project_id = '{project}';
             INSERT INTO coverage_reports (project_id, id, session_id, commit_sha, branch, client_key,
                 lines_covered, lines_total, branches_covered, branches_total, functions_covered,
                 functions_total, file_count)
             SELECT project_id, gen_random_uuid(), id, 'abcdef1', 'main', request_id, 1, 2, 1, 2, 1, 2, 1
             FROM sessions WHERE project_id = '{project}';
             INSERT INTO coverage_files (project_id, report_id, session_id, path, lines_covered,
                 lines_total, branches_covered, branches_total, functions_covered, functions_total)
             SELECT project_id, id, session_id, 'a.rs', 1, 2, 1, 2, 1, 2
             FROM coverage_reports WHERE project_id = '{project}';"
        ),
    )
    .await;
}

#[tokio::test]
async fn cleanup_respects_the_cutoff_exactly_and_leaves_no_orphans() {
    let app = spawn_app().await;
    let cutoff = "2026-01-01T00:00:00Z";
    plant_around(&app, default_project(&app).await, "old", cutoff).await;
    let t = chrono::DateTime::parse_from_rfc3339(cutoff)
        .unwrap()
        .timestamp();
    let request = |dry_run| CleanupRequest {
        older_than: None,
        cutoff: Some(Timestamp {
            seconds: t,
            nanos: 0,
        }),
        dry_run,
        batch_size: 1,
    };
    let mut client = app.admin.clone();

    let dry = client.cleanup(request(true)).await.unwrap().into_inner();
    let planned: HashMap<_, _> = dry
        .deleted
        .iter()
        .map(|c| (c.table.clone(), c.rows))
        .collect();
    // Sessions 1 and 2 are before the cutoff; 3 is exactly at it and stays.
    assert_eq!(planned["sessions"], 2);
    assert_eq!(planned["discrepancy_resolutions"], 2);
    assert_eq!(
        (
            planned["test_executions"],
            planned["coverage_reports"],
            planned["coverage_files"]
        ),
        (2, 2, 2)
    );
    assert_eq!(
        count(&app, "SELECT count(*) FROM sessions").await,
        5,
        "a dry run deletes nothing"
    );

    let done = client.cleanup(request(false)).await.unwrap().into_inner();
    assert_eq!(done.batches, 2, "one session per transaction");
    let deleted: HashMap<_, _> = done
        .deleted
        .iter()
        .map(|c| (c.table.clone(), c.rows))
        .collect();
    assert_eq!(deleted, planned);
    let left: Vec<String> = app
        .sql()
        .await
        .query("SELECT request_id FROM sessions ORDER BY created_at", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["old-3", "old-4", "old-5"]);
    for child in [
        "session_logs",
        "results",
        "discrepancies",
        "discrepancy_resolutions",
    ] {
        let orphans = count(
            &app,
            &format!("SELECT count(*) FROM {child} c WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = c.session_id)"),
        )
        .await;
        assert_eq!(orphans, 0, "{child}");
        assert_eq!(
            count(&app, &format!("SELECT count(*) FROM {child}")).await,
            3,
            "{child}"
        );
    }

    let err = client
        .cleanup(CleanupRequest {
            older_than: Some(PbDuration {
                seconds: 60,
                nanos: 0,
            }),
            cutoff: Some(Timestamp {
                seconds: t,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["older_than"]);
}

/// Rows foreign keys would refuse, planted in `project` with triggers (and
/// so FK checks) off: `n` orphan log entries, `n` orphan results, one stuck
/// session `{prefix}stuck` and one final session without completion time
/// `{prefix}unfinished`.
pub async fn plant_problems(app: &TestApp, project: Uuid, prefix: &str, n: i32) {
    exec(
        app,
        &format!(
            "SET session_replication_role = replica;
             INSERT INTO session_logs (project_id, session_id, level, message)
             SELECT '{project}', gen_random_uuid(), 'info', 'orphan' FROM generate_series(1, {n});
             INSERT INTO results (project_id, session_id, id, request_id, result_type, overall_status,
                 fidelity_score)
             SELECT '{project}', gen_random_uuid(), gen_random_uuid(), 'r', 'static', 'passed', 0.5
             FROM generate_series(1, {n});
             INSERT INTO sessions (project_id, id, request_id, source_technology, target_technology,
                 validation_scope, status, started_at)
             VALUES ('{project}', gen_random_uuid(), '{prefix}stuck', 'a', 'b', 'c', 'processing',
                     now() - interval '2 days'),
                    ('{project}', gen_random_uuid(), '{prefix}unfinished', 'a', 'b', 'c', 'completed',
                     NULL);"
        ),
    )
    .await;
}

#[tokio::test]
async fn the_integrity_check_finds_planted_problems_and_repairs_them_on_request() {
    let app = spawn_app().await;
    create(&app, "fine").await;
    plant_problems(&app, default_project(&app).await, "", 1).await;
    let mut client = app.admin.clone();
    let found = client
        .check_integrity(CheckIntegrityRequest {
            repair: false,
            stuck_after: None,
        })
        .await
        .unwrap()
        .into_inner();
    let by_check: HashMap<_, _> = found
        .findings
        .iter()
        .map(|f| (f.check.as_str(), f.count))
        .collect();
    assert_eq!(
        by_check,
        HashMap::from([
            ("orphan_session_logs", 1),
            ("orphan_results", 1),
            ("stuck_sessions", 1),
            ("final_sessions_without_completion_time", 1),
        ])
    );
    assert!(!found.repaired);
    assert_eq!(
        count(&app, "SELECT count(*) FROM session_logs").await,
        1,
        "nothing fixed without repair"
    );

    let repaired = client
        .check_integrity(CheckIntegrityRequest {
            repair: true,
            stuck_after: Some(PbDuration {
                seconds: 86_400,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(repaired.repaired);
    assert!(repaired.findings.iter().all(|f| f.repaired == f.count));
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM sessions WHERE request_id = 'stuck' AND status = 'failed'"
        )
        .await,
        1
    );
    let again = client
        .check_integrity(CheckIntegrityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(again.findings.is_empty(), "{:?}", again.findings);
}

#[tokio::test]
async fn migration_status_lists_every_known_migration_as_applied() {
    let app = spawn_app().await;
    let status = app
        .admin
        .clone()
        .get_migration_status(GetMigrationStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<i32> = status.migrations.iter().map(|m| m.version).collect();
    assert_eq!(versions, verdict::db::migrate::known_versions());
    assert!(
        status
            .migrations
            .iter()
            .all(|m| m.known && m.applied_at.is_some() && !m.checksum.is_empty())
    );
}

#[tokio::test]
async fn a_session_with_100000_discrepancies_exports_in_bounded_chunks_and_round_trips() {
    let app = spawn_app().await;
    let s = create(&app, "big").await;
    let p = default_project(&app).await;
    exec(
        &app,
        &format!(
            "SET statement_timeout = 0; -- planting, not the gateway's work
             INSERT INTO session_logs (project_id, session_id, level, message)
             SELECT '{p}', '{id}', 'info', 'step ' || i FROM generate_series(1, 1500) i;
             INSERT INTO discrepancies (project_id, session_id, id, kind, severity, description, confidence, fingerprint)
             SELECT '{p}', '{id}', gen_random_uuid(), 'k', 1 + i % 5, 'difference ' || i, 0.5, 'f' || i
             FROM generate_series(1, 100000) i;
             INSERT INTO discrepancy_resolutions (project_id, session_id, discrepancy_id, from_resolution, to_resolution, actor)
             SELECT project_id, session_id, id, 'open', 'muted', 'ana' FROM discrepancies LIMIT 2500;
             INSERT INTO test_cases (project_id, id, key, name, test_type) VALUES ('{p}', gen_random_uuid(), 'test-x', 'x', 'unit');
             INSERT INTO test_executions (project_id, id, test_case_id, session_id, status, started_at)
             SELECT '{p}', gen_random_uuid(), (SELECT id FROM test_cases), '{id}', 'passed', now() FROM generate_series(1, 3);
             INSERT INTO coverage_reports (project_id, id, session_id, commit_sha, branch, client_key, lines_covered,
                 lines_total, branches_covered, branches_total, functions_covered, functions_total, file_count)
             VALUES ('{p}', '00000000-0000-0000-0000-0000000000c1', '{id}', 'abcdef1', 'main', 'k', 3, 4, 1, 2, 1, 1, 2);
             INSERT INTO coverage_files (project_id, report_id, session_id, path, lines_covered, lines_total,
                 branches_covered, branches_total, functions_covered, functions_total) VALUES
             ('{p}', '00000000-0000-0000-0000-0000000000c1', '{id}', 'a.rs', 1, 2, 0, 1, 1, 1),
             ('{p}', '00000000-0000-0000-0000-0000000000c1', '{id}', 'b.rs', 2, 2, 1, 1, 0, 0);",
            id = s.id
        ),
    )
    .await;
    let mut stream = app
        .admin
        .clone()
        .export_session(ExportSessionRequest {
            session_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    let mut discrepancy_ids = HashSet::new();
    let mut first = None;
    let mut messages = 0;
    while let Some(chunk) = stream.message().await.unwrap() {
        messages += 1;
        assert!(chunk.records.len() <= 1000, "chunks stay bounded");
        for r in chunk.records {
            let kind = match r.record.unwrap() {
                Record::Session(x) => {
                    first.get_or_insert(x.id);
                    "session"
                }
                Record::LogEntry(_) => "log",
                Record::Result(_) => "result",
                Record::Discrepancy(d) => {
                    assert!(discrepancy_ids.insert(d.id));
                    "discrepancy"
                }
                Record::ResolutionChange(_) => "resolution",
                Record::Execution(_) => "execution",
                Record::CoverageReport(_) => "coverage_report",
                Record::CoverageFile(f) => {
                    assert_eq!(f.report_id, "00000000-0000-0000-0000-0000000000c1");
                    "coverage_file"
                }
            };
            *kinds.entry(kind).or_default() += 1;
        }
    }
    assert_eq!(first.as_deref(), Some(s.id.as_str()));
    assert_eq!(kinds["session"], 1);
    assert_eq!(kinds["log"], 1500);
    assert_eq!(kinds["discrepancy"], 100_000);
    assert_eq!(kinds["resolution"], 2500);
    assert_eq!(
        (
            kinds["execution"],
            kinds["coverage_report"],
            kinds["coverage_file"]
        ),
        (3, 1, 2)
    );
    assert!(messages >= 105);
    let stored: HashSet<String> = app
        .sql()
        .await
        .query("SELECT id::text FROM discrepancies", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(stored, discrepancy_ids);

    // The CLI writes the same aggregate as JSON lines.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(["export", &s.id])
        .env("DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1 + 1500 + 100_000 + 2500 + 3 + 1 + 2);
    assert_eq!(lines.last().unwrap()["type"], "coverage_file");
    assert_eq!(lines[0]["type"], "session");
    assert_eq!(lines[0]["id"], s.id.as_str());
    assert_eq!(lines[1]["type"], "log_entry");
}
