//! Project scoping of discrepancies and of the shared ingest bookkeeping:
//! two projects with the same batch ids, ingest ids and fingerprints never
//! see, count, resolve or mute each other's rows, and each keeps its own
//! idempotency.

use crate::discrepancies::item;
use crate::helpers::{TestApp, create_project, default_project, in_project, spawn_app};
use crate::sessions::new_session;
use std::collections::HashSet;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use uuid::Uuid;
use verdict::proto::{
    DiscrepancyInput, DiscrepancyServiceGetIngestStatusRequest, IngestDiscrepanciesRequest,
    IngestDiscrepanciesResponse, ListDiscrepanciesRequest, ListResolutionHistoryRequest,
    MetricPoint, RecordDiscrepanciesRequest, RecordMetricPointsRequest, Resolution,
    ResolveDiscrepancyRequest, SummarizeDiscrepanciesRequest, TimeRange,
};

/// Upper bound of every wait on observable state in this file.
const PATIENCE: Duration = Duration::from_secs(30);

/// One project of a test: its slug, its id and one session of it.
struct Team {
    slug: &'static str,
    id: Uuid,
    session: String,
}

/// Whether session request ids are unique per project (the sessions area's
/// V15) rather than globally (before it).
async fn request_ids_per_project(app: &TestApp) -> bool {
    !app.sql()
        .await
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i \
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
              WHERE i.indrelid = 'sessions'::regclass AND i.indisunique AND i.indnatts = 1 \
                AND a.attname = 'request_id')",
            &[],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
}

/// Creates the project `slug` and one session in it, through CreateSession
/// with the project header. Both projects use the same request id once
/// request ids are unique per project.
async fn team(app: &TestApp, slug: &'static str) -> Team {
    let id = create_project(app, slug).await;
    let request_id = if request_ids_per_project(app).await {
        "same-request".to_owned()
    } else {
        format!("same-request-{slug}")
    };
    let session = app
        .sessions
        .clone()
        .create_session(in_project(new_session(&request_id), slug))
        .await
        .expect("create session")
        .into_inner()
        .session
        .expect("session")
        .id;
    // Until sessions are project-scoped (V15), CreateSession puts every
    // session in `default`; place it in its project. Once they are, the
    // session already is there and this changes nothing.
    app.sql()
        .await
        .execute(
            "UPDATE sessions SET project_id = $1 WHERE id = $2::text::uuid AND project_id <> $1",
            &[&id, &session],
        )
        .await
        .unwrap();
    Team { slug, id, session }
}

async fn count(app: &TestApp, sql: &str, project: Uuid) -> i64 {
    app.sql()
        .await
        .query_one(sql, &[&project])
        .await
        .unwrap()
        .get(0)
}

async fn record(
    app: &TestApp,
    t: &Team,
    session: &str,
    batch_id: &str,
    items: Vec<DiscrepancyInput>,
) -> Result<(Vec<String>, bool), tonic::Status> {
    app.discrepancies
        .clone()
        .record_discrepancies(in_project(
            RecordDiscrepanciesRequest {
                session_id: session.into(),
                batch_id: batch_id.into(),
                items,
            },
            t.slug,
        ))
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.ids, r.replayed)
        })
}

/// Every discrepancy a project lists, page by page.
async fn list_all(app: &TestApp, slug: &str, filter: ListDiscrepanciesRequest) -> Vec<String> {
    let mut client = app.discrepancies.clone();
    let mut ids = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_discrepancies(in_project(
                ListDiscrepanciesRequest {
                    page_size: 7,
                    page_token: page_token.clone(),
                    ..filter.clone()
                },
                slug,
            ))
            .await
            .expect("list")
            .into_inner();
        ids.extend(page.discrepancies.into_iter().map(|d| d.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        page_token = page.next_page_token;
    }
}

async fn ids_in(app: &TestApp, project: Uuid) -> HashSet<String> {
    app.sql()
        .await
        .query(
            "SELECT id::text FROM discrepancies WHERE project_id = $1",
            &[&project],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn summarize(
    app: &TestApp,
    slug: &str,
    session_id: &str,
) -> Result<verdict::proto::SummarizeDiscrepanciesResponse, tonic::Status> {
    app.discrepancies
        .clone()
        .summarize_discrepancies(in_project(
            SummarizeDiscrepanciesRequest {
                session_id: session_id.into(),
                sessions_created: session_id.is_empty().then(TimeRange::default),
            },
            slug,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn resolve(
    app: &TestApp,
    slug: &str,
    id: &str,
    resolution: Resolution,
    apply_to_fingerprint: bool,
) -> Result<verdict::proto::ResolveDiscrepancyResponse, tonic::Status> {
    app.discrepancies
        .clone()
        .resolve_discrepancy(in_project(
            ResolveDiscrepancyRequest {
                id: id.into(),
                resolution: resolution as i32,
                actor: format!("{slug}-lead"),
                note: String::new(),
                apply_to_fingerprint,
            },
            slug,
        ))
        .await
        .map(|r| r.into_inner())
}

async fn resolution_of(app: &TestApp, id: &str) -> String {
    app.sql()
        .await
        .query_one(
            "SELECT resolution FROM discrepancies WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn lists_summaries_and_batch_replays_stay_within_their_project() {
    let app = spawn_app().await;
    let a = team(&app, "team-a").await;
    let b = team(&app, "team-b").await;

    // The same batch id and the same items (so the same fingerprints) in
    // both projects; B's batch is a prefix of A's.
    let (ids_a, replayed) = record(&app, &a, &a.session, "batch-1", (0..23).map(item).collect())
        .await
        .unwrap();
    assert!(!replayed);
    let (ids_b, replayed) = record(&app, &b, &b.session, "batch-1", (0..9).map(item).collect())
        .await
        .unwrap();
    assert!(
        !replayed,
        "the same batch_id in another project is another batch"
    );
    let in_a = "SELECT count(*) FROM discrepancies WHERE project_id = $1";
    assert_eq!(count(&app, in_a, a.id).await, 23);
    assert_eq!(count(&app, in_a, b.id).await, 9);

    // A replay in each project answers with that project's own ids.
    assert_eq!(
        record(&app, &a, &a.session, "batch-1", (0..23).map(item).collect())
            .await
            .unwrap(),
        (ids_a.clone(), true)
    );
    assert_eq!(
        record(&app, &b, &b.session, "batch-1", (0..9).map(item).collect())
            .await
            .unwrap(),
        (ids_b.clone(), true)
    );
    let batches = "SELECT count(*) FROM ingest_batches WHERE project_id = $1";
    assert_eq!(count(&app, batches, a.id).await, 1);
    assert_eq!(count(&app, batches, b.id).await, 1);
    assert_eq!(count(&app, in_a, a.id).await, 23);

    // Lists: everything, by fingerprint, by the other project's session.
    let listed_a: HashSet<String> = list_all(&app, a.slug, Default::default())
        .await
        .into_iter()
        .collect();
    assert_eq!(listed_a, ids_in(&app, a.id).await);
    let listed_b: HashSet<String> = list_all(&app, b.slug, Default::default())
        .await
        .into_iter()
        .collect();
    assert_eq!(listed_b, ids_in(&app, b.id).await);
    assert_eq!(listed_b.len(), 9);
    let fingerprint = verdict::discrepancies::fingerprint("precision", "src.f0", "tgt.f0");
    let by_fingerprint = list_all(
        &app,
        a.slug,
        ListDiscrepanciesRequest {
            fingerprint: fingerprint.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_fingerprint, [ids_a[0].clone()]);
    let foreign_session = list_all(
        &app,
        a.slug,
        ListDiscrepanciesRequest {
            session_id: b.session.clone(),
            ..Default::default()
        },
    )
    .await;
    assert!(foreign_session.is_empty(), "{foreign_session:?}");
    assert!(
        list_all(&app, "default", Default::default())
            .await
            .is_empty()
    );

    // Summaries: of a project's sessions, of one session, of another
    // project's session (NOT_FOUND, as a session that does not exist).
    let all_a = summarize(&app, a.slug, "").await.unwrap();
    assert_eq!(all_a.total, count(&app, in_a, a.id).await);
    let all_b = summarize(&app, b.slug, "").await.unwrap();
    assert_eq!(all_b.total, 9);
    assert_eq!(
        all_b.by_kind.iter().map(|c| c.count).sum::<i64>(),
        count(&app, in_a, b.id).await
    );
    assert_eq!(summarize(&app, "default", "").await.unwrap().total, 0);
    assert_eq!(summarize(&app, a.slug, &a.session).await.unwrap().total, 23);
    let err = summarize(&app, a.slug, &b.session).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), format!("session {} not found", b.session));
}

#[tokio::test]
async fn resolving_and_muting_a_fingerprint_in_one_project_leaves_the_other_alone() {
    let app = spawn_app().await;
    let a = team(&app, "team-a").await;
    let b = team(&app, "team-b").await;
    let (ids_a, _) = record(&app, &a, &a.session, "batch-1", (0..5).map(item).collect())
        .await
        .unwrap();
    let (ids_b, _) = record(&app, &b, &b.session, "batch-1", (0..5).map(item).collect())
        .await
        .unwrap();

    // B's ids do not exist in A: resolve and history are NOT_FOUND and
    // change nothing.
    for resolution in [Resolution::Acknowledged, Resolution::Muted] {
        for by_fingerprint in [false, true] {
            let err = resolve(&app, a.slug, &ids_b[0], resolution, by_fingerprint)
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::NotFound);
            assert_eq!(err.message(), format!("discrepancy {} not found", ids_b[0]));
        }
    }
    let err = app
        .discrepancies
        .clone()
        .list_resolution_history(in_project(
            ListResolutionHistoryRequest {
                id: ids_b[0].clone(),
                ..Default::default()
            },
            a.slug,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(resolution_of(&app, &ids_b[0]).await, "open");
    let rules = "SELECT count(*) FROM fingerprint_rules WHERE project_id = $1";
    let changes = "SELECT count(*) FROM discrepancy_resolutions WHERE project_id = $1";
    assert_eq!(count(&app, rules, a.id).await, 0);
    assert_eq!(count(&app, changes, b.id).await, 0);

    // Muting item 0's fingerprint in A mutes A's rows only.
    let muted = resolve(&app, a.slug, &ids_a[0], Resolution::Muted, true)
        .await
        .unwrap();
    assert_eq!(muted.updated_count, 1);
    assert_eq!(resolution_of(&app, &ids_a[0]).await, "muted");
    assert_eq!(resolution_of(&app, &ids_b[0]).await, "open");
    assert_eq!(count(&app, rules, a.id).await, 1);
    assert_eq!(count(&app, rules, b.id).await, 0);
    assert_eq!(count(&app, changes, a.id).await, 1);
    assert_eq!(count(&app, changes, b.id).await, 0);

    // Later discrepancies with that fingerprint arrive muted in A, open in B.
    let (later_a, _) = record(&app, &a, &a.session, "batch-2", vec![item(0)])
        .await
        .unwrap();
    let (later_b, _) = record(&app, &b, &b.session, "batch-2", vec![item(0)])
        .await
        .unwrap();
    assert_eq!(resolution_of(&app, &later_a[0]).await, "muted");
    assert_eq!(resolution_of(&app, &later_b[0]).await, "open");

    // Muting it in B, then reopening it in B, lifts B's mute only.
    let muted_b = resolve(&app, b.slug, &ids_b[0], Resolution::Muted, true)
        .await
        .unwrap();
    assert_eq!(muted_b.updated_count, 2);
    let reopened = resolve(&app, b.slug, &ids_b[0], Resolution::Open, true)
        .await
        .unwrap();
    assert_eq!(reopened.updated_count, 2);
    assert_eq!(count(&app, rules, b.id).await, 0);
    assert_eq!(count(&app, rules, a.id).await, 1);
    assert_eq!(resolution_of(&app, &ids_a[0]).await, "muted");
    assert_eq!(resolution_of(&app, &later_a[0]).await, "muted");

    // A fingerprint-wide acknowledgement in B reaches B's open rows only.
    let acked = resolve(&app, b.slug, &ids_b[1], Resolution::Acknowledged, true)
        .await
        .unwrap();
    assert_eq!(acked.updated_count, 1);
    assert_eq!(resolution_of(&app, &ids_a[1]).await, "open");

    // Each history holds its own project's changes.
    let history = |slug: &'static str, id: String| {
        let mut client = app.discrepancies.clone();
        async move {
            client
                .list_resolution_history(in_project(
                    ListResolutionHistoryRequest {
                        id,
                        ..Default::default()
                    },
                    slug,
                ))
                .await
                .unwrap()
                .into_inner()
                .changes
        }
    };
    let of_a = history(a.slug, ids_a[0].clone()).await;
    assert_eq!(of_a.len(), 1);
    assert_eq!(of_a[0].actor, "team-a-lead");
    let of_b = history(b.slug, ids_b[0].clone()).await;
    assert_eq!(
        of_b.iter().map(|c| c.actor.as_str()).collect::<Vec<_>>(),
        ["team-b-lead", "team-b-lead"]
    );
    assert_eq!(count(&app, changes, a.id).await, 1);
    // B: 2 (mute) + 2 (reopen) + 1 (acknowledge).
    assert_eq!(count(&app, changes, b.id).await, 5);
}

fn chunk(
    ingest_id: &str,
    session_id: &str,
    sequence: i64,
    size: usize,
) -> IngestDiscrepanciesRequest {
    IngestDiscrepanciesRequest {
        ingest_id: ingest_id.into(),
        session_id: session_id.into(),
        sequence,
        items: (0..size)
            .map(|i| {
                let mut d = item(sequence as usize * 100_000 + i);
                d.description = format!("chunk {sequence} item {i}");
                d
            })
            .collect(),
    }
}

async fn ingest(
    app: &TestApp,
    slug: &str,
    chunks: Vec<IngestDiscrepanciesRequest>,
) -> Result<IngestDiscrepanciesResponse, tonic::Status> {
    app.discrepancies
        .clone()
        .ingest_discrepancies(in_project(futures::stream::iter(chunks), slug))
        .await
        .map(|r| r.into_inner())
}

async fn ingest_status(
    app: &TestApp,
    slug: &str,
    ingest_id: &str,
) -> Result<verdict::proto::IngestStatus, tonic::Status> {
    app.discrepancies
        .clone()
        .get_ingest_status(in_project(
            DiscrepancyServiceGetIngestStatusRequest {
                ingest_id: ingest_id.into(),
            },
            slug,
        ))
        .await
        .map(|r| r.into_inner().status.expect("status"))
}

#[tokio::test]
async fn a_session_of_another_project_takes_no_discrepancies() {
    let app = spawn_app().await;
    let a = team(&app, "team-a").await;
    let b = team(&app, "team-b").await;

    let err = record(&app, &a, &b.session, "batch-1", (0..3).map(item).collect())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), format!("session {} not found", b.session));
    let err = ingest(&app, a.slug, vec![chunk("ing", &b.session, 1, 3)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), format!("session {} not found", b.session));

    // Nothing was written anywhere, not even a claimed batch or a mark.
    let default = default_project(&app).await;
    for project in [a.id, b.id, default] {
        for table in [
            "SELECT count(*) FROM discrepancies WHERE project_id = $1",
            "SELECT count(*) FROM ingest_batches WHERE project_id = $1",
            "SELECT count(*) FROM ingest_marks WHERE project_id = $1",
        ] {
            assert_eq!(count(&app, table, project).await, 0, "{table}");
        }
    }
    // The same calls in B are fine.
    record(&app, &b, &b.session, "batch-1", (0..3).map(item).collect())
        .await
        .unwrap();
    assert_eq!(
        ingest(&app, b.slug, vec![chunk("ing", &b.session, 1, 3)])
            .await
            .unwrap()
            .committed_items,
        3
    );
}

#[tokio::test]
async fn the_same_ingest_id_streamed_at_once_in_two_projects_commits_both() {
    let app = spawn_app().await;
    let a = team(&app, "team-a").await;
    let b = team(&app, "team-b").await;
    let stream = |t: &Team| -> Vec<_> {
        (1..=4)
            .map(|seq| chunk("nightly", &t.session, seq, 3000))
            .collect()
    };

    // Both streams run at once, each committing batches while open.
    let (reply_a, reply_b) = tokio::join!(
        ingest(&app, a.slug, stream(&a)),
        ingest(&app, b.slug, stream(&b))
    );
    for reply in [reply_a.unwrap(), reply_b.unwrap()] {
        assert_eq!(reply.committed_items, 12_000);
        assert_eq!(reply.committed_chunks, 4);
        assert_eq!(reply.skipped_chunks, 0);
        assert_eq!(reply.high_water_mark, 4);
    }
    let rows = "SELECT count(*) FROM discrepancies WHERE project_id = $1";
    let marks = "SELECT count(*) FROM ingest_marks \
                 WHERE project_id = $1 AND high_water_mark = 4 AND items = 12000 AND finished";
    for t in [&a, &b] {
        assert_eq!(count(&app, rows, t.id).await, 12_000);
        assert_eq!(count(&app, marks, t.id).await, 1);
        let status = ingest_status(&app, t.slug, "nightly").await.unwrap();
        assert_eq!(status.committed_items, 12_000);
        assert_eq!(status.high_water_mark, 4);
        assert!(status.finished);
    }
    // Every row sits in its own session.
    assert_eq!(
        count(
            &app,
            "SELECT count(*) FROM discrepancies d JOIN sessions s ON s.id = d.session_id \
             WHERE d.project_id = $1 AND s.project_id <> d.project_id",
            a.id
        )
        .await,
        0
    );
    let err = ingest_status(&app, "default", "nightly").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // A resend in A is idempotent there and leaves B alone.
    let again = ingest(&app, a.slug, stream(&a)).await.unwrap();
    assert_eq!((again.committed_chunks, again.skipped_chunks), (0, 4));
    assert_eq!(count(&app, rows, a.id).await, 12_000);
    assert_eq!(count(&app, rows, b.id).await, 12_000);
}

#[tokio::test]
async fn an_ingest_cut_off_in_one_project_resumes_from_its_own_mark() {
    let app = spawn_app().await;
    let a = team(&app, "team-a").await;
    let b = team(&app, "team-b").await;
    let all = |t: &Team| -> Vec<_> {
        (1..=5)
            .map(|seq| chunk("resumable", &t.session, seq, 4000))
            .collect()
    };

    // A's stream commits chunks 1-3 (one batch) and is then abandoned.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for c in all(&a)[..3].iter().cloned() {
        tx.send(c).await.unwrap();
    }
    let mut client = app.discrepancies.clone();
    let slug = a.slug;
    let call = tokio::spawn(async move {
        client
            .ingest_discrepancies(in_project(ReceiverStream::new(rx), slug))
            .await
    });
    let sql = app.sql().await;
    tokio::time::timeout(PATIENCE, async {
        while sql
            .query_opt(
                "SELECT 1 FROM ingest_marks WHERE project_id = $1 AND high_water_mark >= 3",
                &[&a.id],
            )
            .await
            .unwrap()
            .is_none()
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("A's first batch was committed");
    call.abort();
    drop(tx);
    assert_eq!(
        ingest_status(&app, a.slug, "resumable")
            .await
            .unwrap()
            .high_water_mark,
        3
    );
    let err = ingest_status(&app, b.slug, "resumable").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // B's ingest with the same id starts from nothing: A's mark is not its.
    let reply_b = ingest(&app, b.slug, all(&b)).await.unwrap();
    assert_eq!((reply_b.committed_chunks, reply_b.skipped_chunks), (5, 0));
    assert_eq!(reply_b.committed_items, 20_000);

    // A resumes from its own mark.
    let reply_a = ingest(&app, a.slug, all(&a)).await.unwrap();
    assert_eq!((reply_a.committed_chunks, reply_a.skipped_chunks), (2, 3));
    let rows = "SELECT count(*) FROM discrepancies WHERE project_id = $1";
    let distinct = "SELECT count(DISTINCT description) FROM discrepancies WHERE project_id = $1";
    for t in [&a, &b] {
        assert_eq!(count(&app, rows, t.id).await, 20_000);
        assert_eq!(count(&app, distinct, t.id).await, 20_000);
        let status = ingest_status(&app, t.slug, "resumable").await.unwrap();
        assert_eq!(
            (status.high_water_mark, status.committed_items),
            (5, 20_000)
        );
        assert!(status.finished);
    }
}

#[tokio::test]
async fn a_batch_id_without_a_session_scope_is_per_project() {
    let app = spawn_app().await;
    let a = create_project(&app, "team-a").await;
    let b = create_project(&app, "team-b").await;
    let points = |n: usize, value: f64| -> Vec<MetricPoint> {
        (0..n)
            .map(|i| MetricPoint {
                name: "validation.duration".into(),
                value: value + i as f64,
                unit: "ms".into(),
                labels: Default::default(),
                recorded_at: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000 + i as i64,
                    nanos: 0,
                }),
            })
            .collect()
    };
    let send = |slug: &'static str, points: Vec<MetricPoint>| {
        let mut client = app.metrics.clone();
        async move {
            client
                .record_metric_points(in_project(
                    RecordMetricPointsRequest {
                        batch_id: "hourly-1".into(),
                        points,
                    },
                    slug,
                ))
                .await
                .map(|r| r.into_inner())
        }
    };
    // Other content under the same batch_id: another batch in B, not a
    // reused key.
    let first_a = send("team-a", points(4, 1.0)).await.unwrap();
    let first_b = send("team-b", points(6, 50.0)).await.unwrap();
    assert_eq!((first_a.recorded, first_a.replayed), (4, false));
    assert_eq!((first_b.recorded, first_b.replayed), (6, false));
    let again_a = send("team-a", points(4, 1.0)).await.unwrap();
    let again_b = send("team-b", points(6, 50.0)).await.unwrap();
    assert_eq!((again_a.recorded, again_a.replayed), (4, true));
    assert_eq!((again_b.recorded, again_b.replayed), (6, true));
    let reused = send("team-a", points(6, 50.0)).await.unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
    let batches = "SELECT count(*) FROM ingest_batches WHERE project_id = $1";
    assert_eq!(count(&app, batches, a).await, 1);
    assert_eq!(count(&app, batches, b).await, 1);
}
