//! AdminService and the audit trail within projects: the statistics,
//! integrity checks, cleanup, export and audit trail of one project never
//! include another project's rows (checked against direct SQL counts), and
//! the cross-project reads (`all_projects`) are an unbound admin key's only.

use crate::admin::{count, plant_around, plant_problems};
use crate::errors::assert_reason;
use crate::helpers::*;
use crate::sessions::new_session;
use chrono::{DateTime, Utc};
use prost_types::Timestamp;
use std::collections::{BTreeMap, HashMap, HashSet};
use tonic::Code;
use uuid::Uuid;
use verdict::admin::{cleanup::CLEANED, stats::TABLES};
use verdict::proto::{
    AuditEvent, CheckIntegrityRequest, CleanupRequest, ExportSessionRequest, GetStatsRequest,
    GetStatsResponse, ListAuditEventsRequest, export_record::Record,
};

const CUTOFF: &str = "2026-01-01T00:00:00Z";
const CREATE_SESSION: &str = "/verdict.v1.SessionService/CreateSession";
const CLEANUP: &str = "/verdict.v1.AdminService/Cleanup";

fn cutoff() -> Timestamp {
    Timestamp {
        seconds: DateTime::parse_from_rfc3339(CUTOFF).unwrap().timestamp(),
        nanos: 0,
    }
}

fn cleanup_request(dry_run: bool) -> CleanupRequest {
    CleanupRequest {
        older_than: None,
        cutoff: Some(cutoff()),
        dry_run,
        batch_size: 1,
    }
}

/// Rows of `table` in `project` (every project's with `None`), counted directly.
async fn rows_in(sql: &tokio_postgres::Client, table: &str, project: Option<Uuid>) -> i64 {
    match project {
        Some(p) => {
            sql.query_one(
                &format!("SELECT count(*) FROM {table} WHERE project_id = $1"),
                &[&p],
            )
            .await
        }
        None => {
            sql.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
        }
    }
    .unwrap()
    .get(0)
}

/// Rows of `project` in every cleaned table, counted directly.
async fn cleaned_rows(sql: &tokio_postgres::Client, project: Uuid) -> BTreeMap<&'static str, i64> {
    let mut rows = BTreeMap::new();
    for table in CLEANED {
        rows.insert(*table, rows_in(sql, table, Some(project)).await);
    }
    rows
}

fn by_table(tables: &[verdict::proto::TableCount]) -> HashMap<String, i64> {
    tables.iter().map(|t| (t.table.clone(), t.rows)).collect()
}

fn same_time(ts: Option<Timestamp>, t: Option<DateTime<Utc>>) -> bool {
    let ts = ts.map(|ts| (ts.seconds, ts.nanos));
    let t = t.map(|t| (t.timestamp(), t.timestamp_subsec_nanos() as i32));
    ts == t
}

/// Checks a GetStats answer against direct counts of `project` (every
/// project's with `None`). The call's own audit row is written after it
/// counted, so the trail has one row more than it reported.
async fn assert_stats_match(
    sql: &tokio_postgres::Client,
    stats: &GetStatsResponse,
    project: Option<Uuid>,
) {
    let names: Vec<&str> = stats.tables.iter().map(|t| t.table.as_str()).collect();
    assert_eq!(names, TABLES, "every table, in order");
    for t in &stats.tables {
        let mut stored = rows_in(sql, &t.table, project).await;
        if t.table == "audit_events" {
            stored -= 1;
        }
        assert_eq!(t.rows, stored, "{project:?}: {}", t.table);
    }
    let range = match project {
        Some(p) => {
            sql.query_one(
                "SELECT min(created_at), max(created_at) FROM sessions WHERE project_id = $1",
                &[&p],
            )
            .await
        }
        None => {
            sql.query_one("SELECT min(created_at), max(created_at) FROM sessions", &[])
                .await
        }
    }
    .unwrap();
    assert!(
        same_time(stats.oldest_session_at, range.get(0)),
        "{project:?}"
    );
    assert!(
        same_time(stats.newest_session_at, range.get(1)),
        "{project:?}"
    );
}

#[tokio::test]
async fn the_stats_of_a_project_count_exactly_its_own_rows_and_all_projects_counts_every_row() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    plant_around(&app, a, "a", CUTOFF).await;
    plant_around(&app, b, "b", CUTOFF).await;
    // B holds more than A in every table that A has rows in.
    plant_problems(&app, b, "b-", 2).await;
    app.sessions
        .clone()
        .create_session(in_project(new_session("b-api"), "team-b"))
        .await
        .unwrap();
    let sql = app.sql().await;
    let mut admin = app.admin.clone();
    for (slug, project) in [("team-a", a), ("team-b", b)] {
        // Estimates are per table, not per project: within one, every count
        // is exact whatever the request says.
        for exact in [false, true] {
            let stats = admin
                .get_stats(in_project(
                    GetStatsRequest {
                        exact,
                        all_projects: false,
                    },
                    slug,
                ))
                .await
                .unwrap()
                .into_inner();
            assert!(stats.tables.iter().all(|t| t.exact), "{slug}");
            assert_eq!(stats.database_size_bytes, 0, "{slug}: a shared statistic");
            assert!(stats.pool.is_some());
            assert_stats_match(&sql, &stats, Some(project)).await;
        }
    }
    let a_stats = by_table(
        &admin
            .get_stats(in_project(GetStatsRequest::default(), "team-a"))
            .await
            .unwrap()
            .into_inner()
            .tables,
    );
    assert_eq!(a_stats["sessions"], 5, "none of B's 8 sessions");

    // The operator's view: every project, exact on request, estimated else.
    let all = admin
        .get_stats(GetStatsRequest {
            exact: true,
            all_projects: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(all.tables.iter().all(|t| t.exact));
    assert!(all.database_size_bytes > 0);
    assert_stats_match(&sql, &all, None).await;
    assert_eq!(by_table(&all.tables)["sessions"], 5 + 8);
    let estimated = admin
        .get_stats(GetStatsRequest {
            exact: false,
            all_projects: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(estimated.tables.iter().all(|t| !t.exact));
    app.stop().await.unwrap();
}

/// `request`, naming the project `slug` when there is one.
fn naming<T>(slug: Option<&str>, request: tonic::Request<T>) -> tonic::Request<T> {
    match slug {
        Some(slug) => project(request, slug),
        None => request,
    }
}

#[tokio::test]
async fn all_projects_reads_are_for_an_unbound_admin_key_and_refused_to_a_bound_one() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let app = spawn_app_with(config.clone()).await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    let (_, operator) = create_key(&config, "operator", "admin").await;
    let (a_admin_id, a_admin) =
        create_project_key(&config, "a-admin", "admin,write", Some("team-a")).await;
    let (_, b_writer) = create_project_key(&config, "b-writer", "write", Some("team-b")).await;
    let mut sessions = app.sessions.clone();
    sessions
        .create_session(authed(new_session("a-1"), &a_admin))
        .await
        .unwrap();
    for id in ["b-1", "b-2"] {
        sessions
            .create_session(authed(new_session(id), &b_writer))
            .await
            .unwrap();
    }
    let sql = app.sql().await;
    let mut admin = app.admin.clone();

    // A bound key asks for every project: refused, even naming its own.
    for named in [None, Some("team-a")] {
        let err = admin
            .get_stats(naming(
                named,
                authed(
                    GetStatsRequest {
                        exact: true,
                        all_projects: true,
                    },
                    &a_admin,
                ),
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
        let err = admin
            .list_audit_events(naming(
                named,
                authed(
                    ListAuditEventsRequest {
                        all_projects: true,
                        ..Default::default()
                    },
                    &a_admin,
                ),
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    }

    // Its own project: A's rows only; `api_keys` counts the keys bound to A.
    let stats = admin
        .get_stats(authed(GetStatsRequest::default(), &a_admin))
        .await
        .unwrap()
        .into_inner();
    assert_stats_match(&sql, &stats, Some(a)).await;
    assert_eq!(by_table(&stats.tables)["api_keys"], 1, "a-admin only");
    let trail = admin
        .list_audit_events(authed(ListAuditEventsRequest::default(), &a_admin))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        trail.iter().all(|e| e.project_id == a.to_string()),
        "{trail:?}"
    );
    // The trail of A holds the creation of its key (the command line
    // records it in the key's project), its session and the GetStats.
    let rpcs: Vec<&str> = trail.iter().rev().map(|e| e.rpc.as_str()).collect();
    assert_eq!(
        rpcs,
        [
            "cli:keys.create",
            CREATE_SESSION,
            "/verdict.v1.AdminService/GetStats"
        ]
    );
    assert_eq!(trail.last().unwrap().target_ids, [a_admin_id]);
    assert_eq!(
        trail.len() as i64,
        rows_in(&sql, "audit_events", Some(a)).await - 1,
        "the listing is recorded after it read"
    );

    // The operator: every project, each event naming its own.
    let all = admin
        .get_stats(authed(
            GetStatsRequest {
                exact: true,
                all_projects: true,
            },
            &operator,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_stats_match(&sql, &all, None).await;
    assert_eq!(by_table(&all.tables)["api_keys"], 3);
    let every = admin
        .list_audit_events(authed(
            ListAuditEventsRequest {
                rpc: CREATE_SESSION.into(),
                all_projects: true,
                ..Default::default()
            },
            &operator,
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    let mut per_project: HashMap<String, usize> = HashMap::new();
    for e in &every {
        *per_project.entry(e.project_id.clone()).or_default() += 1;
    }
    assert_eq!(
        per_project,
        HashMap::from([(a.to_string(), 1), (b.to_string(), 2)])
    );
    // Without all_projects the operator reads the project it names.
    let in_b = admin
        .list_audit_events(project(
            authed(
                ListAuditEventsRequest {
                    rpc: CREATE_SESSION.into(),
                    ..Default::default()
                },
                &operator,
            ),
            "team-b",
        ))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(in_b.len(), 2);
    assert!(in_b.iter().all(|e| e.project_id == b.to_string()));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn cleanups_of_two_projects_at_once_delete_only_their_own_sessions_and_leave_a_third_intact()
{
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    let c = create_project(&app, "team-c").await;
    for (project, prefix) in [(a, "a"), (b, "b"), (c, "c")] {
        plant_around(&app, project, prefix, CUTOFF).await;
    }
    let sql = app.sql().await;
    let old_of = async |project: Uuid| -> HashSet<String> {
        sql.query(
            "SELECT id::text FROM sessions WHERE project_id = $1 AND created_at < $2",
            &[&project, &DateTime::parse_from_rfc3339(CUTOFF).unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let (old_a, old_b) = (old_of(a).await, old_of(b).await);
    assert_eq!((old_a.len(), old_b.len()), (2, 2));
    let before = [
        cleaned_rows(&sql, a).await,
        cleaned_rows(&sql, b).await,
        cleaned_rows(&sql, c).await,
    ];

    // A dry run in A counts A's old sessions and their rows, nothing of B
    // or C (which have as many), and deletes nothing.
    let dry = app
        .admin
        .clone()
        .cleanup(in_project(cleanup_request(true), "team-a"))
        .await
        .unwrap()
        .into_inner();
    let planned = by_table(&dry.deleted);
    assert_eq!(planned.len(), CLEANED.len());
    assert!(planned.values().all(|n| *n == 2), "{planned:?}");
    assert_eq!(cleaned_rows(&sql, a).await, before[0]);

    // A and B clean at the same time, one session per transaction.
    let (mut admin_a, mut admin_b) = (app.admin.clone(), app.admin.clone());
    // Bounded: a cleanup that picked another project's sessions (and may not
    // delete them) would pick them again and again.
    let (done_a, done_b) = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        tokio::join!(
            admin_a.cleanup(in_project(cleanup_request(false), "team-a")),
            admin_b.cleanup(in_project(cleanup_request(false), "team-b")),
        )
    })
    .await
    .expect("both cleanups end");
    for done in [done_a.unwrap().into_inner(), done_b.unwrap().into_inner()] {
        assert_eq!(by_table(&done.deleted), planned);
        assert_eq!(done.batches, 2);
    }
    for (i, project) in [a, b].into_iter().enumerate() {
        let after = cleaned_rows(&sql, project).await;
        for (table, n) in &after {
            assert_eq!(*n, before[i][table] - 2, "{project}: {table}");
        }
    }
    assert_eq!(cleaned_rows(&sql, c).await, before[2], "C untouched");
    let left_a: Vec<String> = sql
        .query(
            "SELECT request_id FROM sessions WHERE project_id = $1 ORDER BY created_at",
            &[&a],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left_a, ["a-3", "a-4", "a-5"]);

    // Each project's trail names exactly its own deleted sessions.
    for (project, old) in [(a, &old_a), (b, &old_b)] {
        let targets: HashSet<String> = sql
            .query(
                "SELECT unnest(target_ids) FROM audit_events WHERE project_id = $1 AND rpc = $2",
                &[&project, &CLEANUP],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(&targets, old, "{project}");
    }
    assert_eq!(
        count(
            &app,
            &format!("SELECT count(*) FROM audit_events WHERE project_id = '{c}'")
        )
        .await,
        0
    );

    // The command line cleans the project it names, and only that one.
    let cli = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .arg("cleanup")
            .args(args)
            .env("DATABASE_URL", &app.database_url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let printed = |out: &std::process::Output| -> HashMap<String, i64> {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let n = words.get(words.len().checked_sub(2)?)?.parse().ok()?;
                Some((words.last()?.to_string(), n))
            })
            .collect()
    };
    let would = printed(&cli(&[
        "--older-than",
        "1d",
        "--project",
        "team-c",
        "--dry-run",
    ]));
    assert_eq!(would["sessions"], 5, "{would:?}");
    assert_eq!(would["coverage_files"], 5, "{would:?}");
    let (a_now, b_now) = (cleaned_rows(&sql, a).await, cleaned_rows(&sql, b).await);
    let deleted = printed(&cli(&["--older-than", "1d", "--project", "team-c"]));
    assert_eq!(deleted, would);
    assert!(cleaned_rows(&sql, c).await.values().all(|n| *n == 0));
    assert_eq!(cleaned_rows(&sql, a).await, a_now);
    assert_eq!(cleaned_rows(&sql, b).await, b_now);
    assert_eq!(
        count(
            &app,
            &format!(
                "SELECT count(*) FROM audit_events WHERE project_id = '{c}' AND rpc = 'cli:cleanup'"
            )
        )
        .await,
        1,
        "one row for its one batch, in C's trail"
    );
    let unknown = cli(&["--older-than", "1d", "--project", "no-such-team"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no-such-team"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    assert_eq!(cleaned_rows(&sql, a).await, a_now);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn integrity_checks_find_and_repair_only_the_calling_projects_problems() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    plant_problems(&app, a, "a-", 1).await;
    plant_problems(&app, b, "b-", 3).await;
    let sql = app.sql().await;
    let ids = async |sql_text: &str, project: Uuid| -> HashSet<String> {
        sql.query(sql_text, &[&project])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let a_logs = ids("SELECT id::text FROM session_logs WHERE project_id = $1", a).await;
    let a_stuck = ids(
        "SELECT id::text FROM sessions WHERE project_id = $1 AND request_id = 'a-stuck'",
        a,
    )
    .await;
    let mut admin = app.admin.clone();
    let mut check = async |slug: &str, repair: bool| {
        admin
            .check_integrity(in_project(
                CheckIntegrityRequest {
                    repair,
                    stuck_after: None,
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner()
    };
    let counts = |found: &verdict::proto::CheckIntegrityResponse| -> HashMap<String, i64> {
        found
            .findings
            .iter()
            .map(|f| (f.check.clone(), f.count))
            .collect()
    };
    let expected = |n: i64| {
        HashMap::from([
            ("orphan_session_logs".to_owned(), n),
            ("orphan_results".to_owned(), n),
            ("stuck_sessions".to_owned(), 1),
            ("final_sessions_without_completion_time".to_owned(), 1),
        ])
    };
    let found_a = check("team-a", false).await;
    assert_eq!(counts(&found_a), expected(1));
    for f in &found_a.findings {
        match f.check.as_str() {
            "orphan_session_logs" => {
                assert_eq!(f.sample_ids.iter().cloned().collect::<HashSet<_>>(), a_logs)
            }
            "stuck_sessions" => {
                assert_eq!(
                    f.sample_ids.iter().cloned().collect::<HashSet<_>>(),
                    a_stuck
                )
            }
            _ => assert_eq!(f.sample_ids.len(), 1, "{f:?}"),
        }
    }
    let found_b = check("team-b", false).await;
    assert_eq!(counts(&found_b), expected(3));
    // Nothing of either in the default project.
    assert!(check("default", false).await.findings.is_empty());

    let b_before = [
        rows_in(&sql, "session_logs", Some(b)).await,
        rows_in(&sql, "results", Some(b)).await,
    ];
    let repaired = check("team-a", true).await;
    assert!(repaired.repaired);
    assert!(repaired.findings.iter().all(|f| f.repaired == f.count));
    assert_eq!(rows_in(&sql, "session_logs", Some(a)).await, 0);
    assert_eq!(
        [
            rows_in(&sql, "session_logs", Some(b)).await,
            rows_in(&sql, "results", Some(b)).await,
        ],
        b_before,
        "B's orphans are B's to repair"
    );
    assert_eq!(
        count(
            &app,
            &format!(
                "SELECT count(*) FROM sessions WHERE project_id = '{b}' AND status = 'processing'"
            )
        )
        .await,
        1
    );
    assert!(check("team-a", false).await.findings.is_empty());
    assert_eq!(counts(&check("team-b", false).await), expected(3));
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_session_of_another_project_is_not_found_for_export_and_its_own_project_exports_it() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    plant_around(&app, a, "a", CUTOFF).await;
    plant_around(&app, b, "b", CUTOFF).await;
    let sql = app.sql().await;
    let b_session: String = sql
        .query_one(
            "SELECT id::text FROM sessions WHERE project_id = $1 AND request_id = 'b-1'",
            &[&b],
        )
        .await
        .unwrap()
        .get(0);
    let mut admin = app.admin.clone();
    let request = || ExportSessionRequest {
        session_id: b_session.clone(),
    };
    for slug in ["team-a", "default"] {
        let err = admin
            .export_session(in_project(request(), slug))
            .await
            .unwrap_err();
        assert_reason(&err, Code::NotFound, "NOT_FOUND");
    }
    let mut stream = admin
        .export_session(in_project(request(), "team-b"))
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        for r in chunk.records {
            kinds.push(match r.record.unwrap() {
                Record::Session(s) => {
                    assert_eq!(s.id, b_session);
                    "session"
                }
                Record::LogEntry(l) => {
                    assert_eq!(l.session_id, b_session);
                    "log"
                }
                Record::Result(x) => {
                    assert_eq!(x.session_id, b_session);
                    "result"
                }
                Record::Discrepancy(d) => {
                    assert_eq!(d.session_id, b_session);
                    "discrepancy"
                }
                Record::ResolutionChange(_) => "resolution",
                Record::Execution(e) => {
                    assert_eq!(e.session_id, b_session);
                    "execution"
                }
                Record::CoverageReport(r) => {
                    assert_eq!(r.session_id, b_session);
                    "coverage_report"
                }
                Record::CoverageFile(_) => "coverage_file",
            });
        }
    }
    assert_eq!(
        kinds,
        [
            "session",
            "log",
            "result",
            "discrepancy",
            "resolution",
            "execution",
            "coverage_report",
            "coverage_file"
        ]
    );

    // The command line: the same rule with --project.
    let cli = |slug: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .args(["export", &b_session, "--project", slug])
            .env("DATABASE_URL", &app.database_url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap()
    };
    let refused = cli("team-a");
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = cli("team-b");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    assert_eq!(lines.count(), kinds.len());
    app.stop().await.unwrap();
}

async fn list(app: &TestApp, request: tonic::Request<ListAuditEventsRequest>) -> Vec<AuditEvent> {
    app.admin
        .clone()
        .list_audit_events(request)
        .await
        .expect("list audit events")
        .into_inner()
        .events
}

#[tokio::test]
async fn the_audit_trail_of_a_project_lists_only_its_calls_and_outlives_the_project() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    let default = default_project(&app).await;
    // Concurrent writers in both projects and the default one: every write
    // has its row, in the project it worked in.
    let mut writers = tokio::task::JoinSet::new();
    for n in 0..12 {
        let mut sessions = app.sessions.clone();
        let slug = ["team-a", "team-b", "default"][n % 3];
        writers.spawn(async move {
            let session = sessions
                .create_session(in_project(new_session(&format!("{slug}-{n}")), slug))
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap();
            (slug, session.id)
        });
    }
    let mut created: HashMap<&str, Vec<String>> = HashMap::new();
    while let Some(done) = writers.join_next().await {
        let (slug, id) = done.unwrap();
        created.entry(slug).or_default().push(id);
    }
    let sql = app.sql().await;
    let by_rpc = || ListAuditEventsRequest {
        rpc: CREATE_SESSION.into(),
        ..Default::default()
    };
    for (slug, project) in [("team-a", a), ("team-b", b), ("default", default)] {
        let events = list(&app, in_project(by_rpc(), slug)).await;
        let listed: HashSet<i64> = events.iter().map(|e| e.id).collect();
        let stored: HashSet<i64> = sql
            .query(
                "SELECT id FROM audit_events WHERE project_id = $1 AND rpc = $2",
                &[&project, &CREATE_SESSION],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(listed, stored, "{slug}");
        assert_eq!(listed.len(), 4, "{slug}");
        assert!(events.iter().all(|e| e.project_id == project.to_string()));
        let targets: HashSet<String> = events.iter().flat_map(|e| e.target_ids.clone()).collect();
        assert_eq!(
            targets,
            created[slug].iter().cloned().collect::<HashSet<_>>()
        );
    }
    // B's session named as a target from A: nothing.
    let b_target = || ListAuditEventsRequest {
        target_id: created["team-b"][0].clone(),
        ..Default::default()
    };
    assert!(
        list(&app, in_project(b_target(), "team-a"))
            .await
            .is_empty()
    );
    assert_eq!(list(&app, in_project(b_target(), "team-b")).await.len(), 1);

    // A page token of A is no token in B, nor for every project.
    let first = app
        .admin
        .clone()
        .list_audit_events(in_project(
            ListAuditEventsRequest {
                page_size: 1,
                ..by_rpc()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    for (slug, all_projects) in [("team-b", false), ("team-a", true)] {
        let err = app
            .admin
            .clone()
            .list_audit_events(in_project(
                ListAuditEventsRequest {
                    page_size: 1,
                    page_token: first.next_page_token.clone(),
                    all_projects,
                    ..by_rpc()
                },
                slug,
            ))
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["page_token"], "{slug}");
    }

    // Every project's trail (authentication is off: no key is bound).
    let every = list(
        &app,
        tonic::Request::new(ListAuditEventsRequest {
            all_projects: true,
            ..by_rpc()
        }),
    )
    .await;
    assert_eq!(every.len(), 12);

    // Deleting B deletes its data but not its trail.
    let b_rows = rows_in(&sql, "audit_events", Some(b)).await;
    sql.execute("DELETE FROM projects WHERE id = $1", &[&b])
        .await
        .unwrap();
    assert_eq!(rows_in(&sql, "sessions", Some(b)).await, 0);
    assert_eq!(rows_in(&sql, "audit_events", Some(b)).await, b_rows);
    let every = list(
        &app,
        tonic::Request::new(ListAuditEventsRequest {
            all_projects: true,
            ..by_rpc()
        }),
    )
    .await;
    assert_eq!(
        every
            .iter()
            .filter(|e| e.project_id == b.to_string())
            .count(),
        4
    );
    app.stop().await.unwrap();
}
