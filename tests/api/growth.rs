//! Issue 18: the discrepancy counts SummarizeDiscrepancies reads are kept at
//! write time (V27's triggers); after inserts, replays, ingests,
//! resolutions, four concurrent writers, a deleted session, a cleanup and a
//! deleted project they equal the raw computation over the stored rows, and
//! every summary answers exactly what the raw GROUPING SETS answered.

use crate::discrepancies::item;
use crate::helpers::{TestApp, create_project, default_project, in_project, spawn_app};
use crate::sessions::create;
use chrono::{DateTime, Duration, TimeZone, Utc};
use uuid::Uuid;
use verdict::proto::{
    CleanupRequest, DeleteSessionRequest, DiscrepancyInput, IngestDiscrepanciesRequest,
    RecordDiscrepanciesRequest, Resolution, ResolveDiscrepancyRequest,
    SummarizeDiscrepanciesRequest, SummarizeDiscrepanciesResponse, TimeRange,
};

/// The per-session counts as the raw rows say they are.
const RAW_SESSION_COUNTS: &str = "SELECT concat_ws('|', d.project_id, d.session_id, s.created_at, v.dimension, v.key, count(*)) \
     FROM discrepancies d JOIN sessions s ON s.project_id = d.project_id AND s.id = d.session_id \
     CROSS JOIN LATERAL (VALUES ('severity', d.severity::text), ('kind', d.kind), \
                                ('resolution', d.resolution)) AS v(dimension, key) \
     GROUP BY d.project_id, d.session_id, s.created_at, v.dimension, v.key ORDER BY 1";
const KEPT_SESSION_COUNTS: &str = "SELECT concat_ws('|', project_id, session_id, session_created_at, dimension, key, n) \
     FROM discrepancy_session_counts ORDER BY 1";
/// The per-day counts (sessions created on a UTC day) from the raw rows.
const RAW_DAY_COUNTS: &str = "SELECT concat_ws('|', d.project_id, date_trunc('day', s.created_at, 'UTC'), v.dimension, v.key, count(*)) \
     FROM discrepancies d JOIN sessions s ON s.project_id = d.project_id AND s.id = d.session_id \
     CROSS JOIN LATERAL (VALUES ('severity', d.severity::text), ('kind', d.kind), \
                                ('resolution', d.resolution)) AS v(dimension, key) \
     GROUP BY d.project_id, date_trunc('day', s.created_at, 'UTC'), v.dimension, v.key ORDER BY 1";
const KEPT_DAY_COUNTS: &str = "SELECT concat_ws('|', project_id, day, dimension, key, n) \
     FROM discrepancy_day_counts WHERE n <> 0 ORDER BY 1";
/// The summary statement before issue 18 (over the rows), for a set of
/// sessions: (dimension, key, count) in its order.
const RAW_SUMMARY: &str = "WITH scoped AS (SELECT severity, kind, resolution FROM discrepancies \
         WHERE project_id = $1 AND session_id = ANY($2)) \
     SELECT CASE WHEN GROUPING(severity) = 0 THEN 'severity' \
                 WHEN GROUPING(kind) = 0 THEN 'kind' \
                 WHEN GROUPING(resolution) = 0 THEN 'resolution' ELSE 'total' END, \
            COALESCE(severity::text, kind, resolution, ''), count(*) \
     FROM scoped GROUP BY GROUPING SETS ((severity), (kind), (resolution), ()) \
     ORDER BY 1, 3 DESC, 2";

/// An optional start and end of a range of session creation times.
type Bounds = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

async fn lines(sql: &tokio_postgres::Client, query: &str) -> Vec<String> {
    sql.query(query, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The kept counts equal the raw ones, and no row of 0 stays per session.
async fn assert_counts_match(app: &TestApp, when: &str) {
    let sql = app.sql().await;
    let raw = lines(&sql, RAW_SESSION_COUNTS).await;
    assert!(!raw.is_empty(), "{when}: there are discrepancies to count");
    assert_eq!(
        lines(&sql, KEPT_SESSION_COUNTS).await,
        raw,
        "{when}: per-session counts"
    );
    assert_eq!(
        lines(&sql, KEPT_DAY_COUNTS).await,
        lines(&sql, RAW_DAY_COUNTS).await,
        "{when}: per-day counts"
    );
}

/// A summary response as (dimension, key, count) rows in the raw order's
/// terms (severity ranks, stored resolution names).
fn as_rows(s: &SummarizeDiscrepanciesResponse) -> Vec<(String, String, i64)> {
    let mut out = vec![("total".to_owned(), String::new(), s.total)];
    for c in &s.by_severity {
        let rank = [
            "SEVERITY_CRITICAL",
            "SEVERITY_HIGH",
            "SEVERITY_MEDIUM",
            "SEVERITY_LOW",
            "SEVERITY_INFO",
        ]
        .iter()
        .position(|n| *n == c.key)
        .expect("a known severity")
            + 1;
        out.push(("severity".into(), rank.to_string(), c.count));
    }
    for c in &s.by_kind {
        out.push(("kind".into(), c.key.clone(), c.count));
    }
    for c in &s.by_resolution {
        let stored = c
            .key
            .strip_prefix("RESOLUTION_")
            .expect("a resolution name")
            .to_lowercase();
        out.push(("resolution".into(), stored, c.count));
    }
    out
}

/// The raw summary of `sessions` in the same terms; severities in rank
/// order as the response gives them, the rest in the statement's order.
async fn raw_summary(
    sql: &tokio_postgres::Client,
    project: Uuid,
    sessions: &[Uuid],
) -> Vec<(String, String, i64)> {
    let rows: Vec<(String, String, i64)> = sql
        .query(RAW_SUMMARY, &[&project, &sessions])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let pick = |d: &str| {
        rows.iter()
            .filter(|r| r.0 == d)
            .cloned()
            .collect::<Vec<_>>()
    };
    let mut severities = pick("severity");
    severities.sort_by_key(|r| r.1.parse::<i32>().unwrap());
    let mut out = pick("total");
    out.extend(severities);
    out.extend(pick("kind"));
    out.extend(pick("resolution"));
    out
}

/// Every session summary and a set of ranges (whole days, partial days at
/// either edge, within one day, open ends) answer what the raw statement
/// answers over the same sessions.
async fn assert_summaries_match(app: &TestApp, project: Uuid, slug: &str, when: &str) {
    let sql = app.sql().await;
    let sessions: Vec<(Uuid, DateTime<Utc>)> = sql
        .query(
            "SELECT id, created_at FROM sessions WHERE project_id = $1 ORDER BY created_at",
            &[&project],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut client = app.discrepancies.clone();
    for (id, _) in &sessions {
        let got = client
            .summarize_discrepancies(in_project(
                SummarizeDiscrepanciesRequest {
                    session_id: id.to_string(),
                    sessions_created: None,
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            as_rows(&got),
            raw_summary(&sql, project, &[*id]).await,
            "{when}: session {id}"
        );
    }
    let day =
        |t: DateTime<Utc>| Utc.from_utc_datetime(&t.date_naive().and_hms_opt(0, 0, 0).unwrap());
    let first = sessions.first().map(|s| s.1).unwrap_or_else(Utc::now);
    let last = sessions.last().map(|s| s.1).unwrap_or_else(Utc::now);
    let ranges: Vec<Bounds> = vec![
        (None, None),
        (Some(first), None),
        (None, Some(last)),
        (Some(day(first)), Some(day(last) + Duration::days(1))),
        (
            Some(first + Duration::hours(7)),
            Some(last - Duration::hours(5)),
        ),
        (Some(day(last)), Some(last)),
        (
            Some(last - Duration::minutes(1)),
            Some(last + Duration::seconds(1)),
        ),
        (
            Some(day(first) + Duration::hours(1)),
            Some(day(first) + Duration::hours(2)),
        ),
        (
            Some(first - Duration::days(400)),
            Some(first - Duration::days(399)),
        ),
    ];
    for (from, to) in ranges {
        if let (Some(f), Some(t)) = (from, to)
            && f >= t
        {
            continue;
        }
        let ts = |t: Option<DateTime<Utc>>| {
            t.map(|t| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: t.timestamp_subsec_nanos() as i32,
            })
        };
        let got = client
            .summarize_discrepancies(in_project(
                SummarizeDiscrepanciesRequest {
                    session_id: String::new(),
                    sessions_created: Some(TimeRange {
                        start_time: ts(from),
                        end_time: ts(to),
                    }),
                },
                slug,
            ))
            .await
            .unwrap()
            .into_inner();
        let lo = from.map(|t| t.timestamp_micros()).unwrap_or(i64::MIN);
        let hi = to.map(|t| t.timestamp_micros()).unwrap_or(i64::MAX);
        let chosen: Vec<Uuid> = sessions
            .iter()
            .filter(|(_, c)| c.timestamp_micros() >= lo && c.timestamp_micros() < hi)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(
            as_rows(&got),
            raw_summary(&sql, project, &chosen).await,
            "{when}: sessions created in [{from:?}, {to:?})"
        );
    }
}

async fn record(
    app: &TestApp,
    slug: &str,
    session: &str,
    batch: &str,
    items: Vec<DiscrepancyInput>,
) -> Vec<String> {
    app.discrepancies
        .clone()
        .record_discrepancies(in_project(
            RecordDiscrepanciesRequest {
                session_id: session.into(),
                batch_id: batch.into(),
                items,
            },
            slug,
        ))
        .await
        .expect("record discrepancies")
        .into_inner()
        .ids
}

async fn resolve(app: &TestApp, slug: &str, id: &str, to: Resolution, fingerprint: bool) {
    app.discrepancies
        .clone()
        .resolve_discrepancy(in_project(
            ResolveDiscrepancyRequest {
                id: id.into(),
                resolution: to as i32,
                actor: "growth".into(),
                note: String::new(),
                apply_to_fingerprint: fingerprint,
            },
            slug,
        ))
        .await
        .expect("resolve");
}

/// Moves a fresh session's creation back (before it has discrepancies), so
/// sessions spread over days and cleanup finds old ones.
async fn created_at(app: &TestApp, id: &str, at: DateTime<Utc>) {
    app.sql()
        .await
        .execute(
            "UPDATE sessions SET created_at = $2 WHERE id = $1::text::uuid",
            &[&id, &at],
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn kept_counts_equal_the_raw_computation_after_every_kind_of_write() {
    let app = spawn_app().await;
    let default = default_project(&app).await;
    let now = Utc::now();

    // Sessions over five days, at times that fall on either side of midnight.
    let mut ids = Vec::new();
    for (n, back) in [
        Duration::days(4) + Duration::hours(3),
        Duration::days(3) + Duration::minutes(1),
        Duration::days(3) - Duration::minutes(1),
        Duration::days(1),
        Duration::hours(2),
        Duration::zero(),
    ]
    .into_iter()
    .enumerate()
    {
        let s = create(&app, &format!("growth-{n}")).await;
        created_at(&app, &s.id, now - back).await;
        ids.push(s.id);
    }

    // Inserts, then a replayed batch (nothing new) and a twice-sent ingest.
    for (n, id) in ids.iter().enumerate() {
        record(
            &app,
            "default",
            id,
            "b1",
            (0..(7 + n * 5)).map(item).collect(),
        )
        .await;
    }
    record(&app, "default", &ids[0], "b1", (0..7).map(item).collect()).await;
    let ingest: Vec<IngestDiscrepanciesRequest> = (1..=3)
        .map(|sequence| IngestDiscrepanciesRequest {
            ingest_id: "growth-ingest".into(),
            session_id: ids[4].clone(),
            sequence,
            items: (0..40).map(|i| item(i * 3 + sequence as usize)).collect(),
        })
        .collect();
    for _ in 0..2 {
        app.discrepancies
            .clone()
            .ingest_discrepancies(futures::stream::iter(ingest.clone()))
            .await
            .expect("ingest");
    }
    assert_counts_match(&app, "after inserts, a replay and a re-sent ingest").await;

    // Resolutions: one row at a time, twice on the same row, fingerprint-wide.
    let first = record(&app, "default", &ids[2], "b2", (0..5).map(item).collect()).await;
    resolve(&app, "default", &first[0], Resolution::Acknowledged, false).await;
    resolve(&app, "default", &first[0], Resolution::WontFix, false).await;
    resolve(&app, "default", &first[1], Resolution::Muted, true).await;
    resolve(&app, "default", &first[1], Resolution::Open, false).await;
    assert_counts_match(&app, "after resolutions").await;
    assert_summaries_match(&app, default, "default", "after resolutions").await;

    // Four clients at once: two into one session, two into their own; each
    // resolving its rows (fingerprint-wide too) while the others write.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let app_discrepancies = app.discrepancies.clone();
            let session = if w < 2 {
                ids[5].clone()
            } else {
                ids[w].clone()
            };
            tokio::spawn(async move {
                let mut client = app_discrepancies;
                for round in 0..6 {
                    let ids = client
                        .record_discrepancies(RecordDiscrepanciesRequest {
                            session_id: session.clone(),
                            batch_id: format!("w{w}-{round}"),
                            items: (0..25).map(|i| item(w * 1000 + round * 50 + i)).collect(),
                        })
                        .await
                        .expect("concurrent record")
                        .into_inner()
                        .ids;
                    for (k, id) in ids.iter().take(3).enumerate() {
                        client
                            .resolve_discrepancy(ResolveDiscrepancyRequest {
                                id: id.clone(),
                                resolution: [
                                    Resolution::Resolved,
                                    Resolution::FalsePositive,
                                    Resolution::Acknowledged,
                                ][k] as i32,
                                actor: format!("writer {w}"),
                                note: String::new(),
                                apply_to_fingerprint: k == 2,
                            })
                            .await
                            .expect("concurrent resolve");
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    assert_counts_match(&app, "after four concurrent writers").await;

    // Another project with the same batch ids counts on its own.
    let team = create_project(&app, "growth-b").await;
    let b = app
        .sessions
        .clone()
        .create_session(in_project(
            crate::sessions::new_session("growth-b-0"),
            "growth-b",
        ))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    record(&app, "growth-b", &b.id, "b1", (0..11).map(item).collect()).await;
    assert_counts_match(&app, "with a second project").await;
    assert_summaries_match(&app, default, "default", "with a second project").await;
    assert_summaries_match(&app, team, "growth-b", "in the second project").await;

    // A deleted session, a cleanup of the oldest, a deleted project.
    app.sessions
        .clone()
        .delete_session(DeleteSessionRequest {
            id: ids[3].clone(),
            expected_version: None,
        })
        .await
        .expect("delete session");
    assert_counts_match(&app, "after DeleteSession").await;
    let cleaned = app
        .admin
        .clone()
        .cleanup(CleanupRequest {
            older_than: Some(prost_types::Duration {
                seconds: 2 * 86_400,
                nanos: 0,
            }),
            cutoff: None,
            dry_run: false,
            batch_size: 1,
        })
        .await
        .expect("cleanup")
        .into_inner();
    assert!(
        format!("{cleaned:?}").contains("discrepancies"),
        "the cleanup removed discrepancies: {cleaned:?}"
    );
    let sql = app.sql().await;
    let left: i64 = sql
        .query_one(
            "SELECT count(*) FROM sessions WHERE project_id = $1 AND created_at < now() - interval '2 days'",
            &[&default],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the cleanup removed the old sessions");
    assert_counts_match(&app, "after a cleanup").await;
    assert_summaries_match(&app, default, "default", "after a cleanup").await;

    sql.execute("DELETE FROM projects WHERE id = $1", &[&team])
        .await
        .expect("a project's deletion cascades through the counts");
    assert_counts_match(&app, "after a project's deletion").await;
    let stray: i64 = sql
        .query_one(
            "SELECT (SELECT count(*) FROM discrepancy_session_counts WHERE project_id = $1) \
                  + (SELECT count(*) FROM discrepancy_day_counts WHERE project_id = $1) \
                  + (SELECT count(*) FROM discrepancy_session_counts WHERE n = 0)",
            &[&team],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stray, 0, "no counts of a deleted project, no zero rows");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_terminated_writer_leaves_the_counts_as_committed() {
    let app = spawn_app().await;
    let s = create(&app, "growth-fault").await;
    record(&app, "default", &s.id, "b1", (0..20).map(item).collect()).await;
    // A statement that inserts rows and is killed before its transaction
    // commits: the rows and their counts go together.
    let writer = app.sql().await;
    let pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            "INSERT INTO discrepancies (project_id, session_id, id, kind, severity, description, \
                 confidence, fingerprint) \
             SELECT project_id, id, gen_random_uuid(), 'killed', 1, 'x', 0.5, md5(g::text) \
             FROM sessions, generate_series(1, 50) g WHERE id = $1::text::uuid",
            &[&s.id],
        )
        .await
        .unwrap();
    let killer = app.sql().await;
    let killed: bool = killer
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    assert!(writer.batch_execute("COMMIT").await.is_err());
    assert_counts_match(&app, "after a terminated writer").await;
    let summary = app
        .discrepancies
        .clone()
        .summarize_discrepancies(SummarizeDiscrepanciesRequest {
            session_id: s.id.clone(),
            sessions_created: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(summary.total, 20);
    app.stop().await.unwrap();
}
