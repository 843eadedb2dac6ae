//! DiscrepancyService through a real client: atomic batches, idempotent
//! replays, resumable streams, ordering, triage and summaries.

use crate::helpers::{TestApp, spawn_app, violated_fields};
use crate::results::{new_result, record};
use crate::sessions::create;
use std::collections::{HashMap, HashSet};
use tonic::Code;
use verdict::proto::{
    DiscrepancyInput, GetDiscrepancyRequest, IngestDiscrepanciesRequest,
    IngestDiscrepanciesResponse, ListDiscrepanciesRequest, ListResolutionHistoryRequest,
    RecordDiscrepanciesRequest, Resolution, ResolveDiscrepancyRequest, Severity,
    SummarizeDiscrepanciesRequest, TimeRange,
};

pub fn item(n: usize) -> DiscrepancyInput {
    DiscrepancyInput {
        result_id: String::new(),
        kind: ["precision", "rounding", "encoding"][n % 3].into(),
        severity: [
            Severity::Critical,
            Severity::High,
            Severity::Medium,
            Severity::Low,
            Severity::Info,
        ][n % 5] as i32,
        description: format!("difference {n}"),
        source_element: format!("src.f{n}"),
        target_element: format!("tgt.f{n}"),
        recommendation: "check it".into(),
        confidence: 0.8,
        fingerprint: String::new(),
    }
}

async fn count(app: &TestApp, sql: &str) -> i64 {
    app.sql().await.query_one(sql, &[]).await.unwrap().get(0)
}

async fn record_batch(
    app: &TestApp,
    session_id: &str,
    batch_id: &str,
    items: Vec<DiscrepancyInput>,
) -> Vec<String> {
    app.discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: session_id.into(),
            batch_id: batch_id.into(),
            items,
        })
        .await
        .expect("record discrepancies")
        .into_inner()
        .ids
}

#[tokio::test]
async fn listed_discrepancies_are_exactly_what_get_discrepancy_returns() {
    // ListDiscrepancies writes its items straight from the rows;
    // GetDiscrepancy replies with the generated message. Every field of every
    // shape must read back the same.
    let app = spawn_app().await;
    let session = create(&app, "discrepancies-on-the-wire").await;
    let result = record(&app, new_result(&session.id, "for-discrepancies", 0.5)).await;
    let mut with_result = item(0);
    with_result.result_id = result.id.clone();
    with_result.confidence = 1.0;
    with_result.fingerprint = "given-fingerprint".into();
    let mut bare = item(1);
    (
        bare.source_element,
        bare.target_element,
        bare.recommendation,
    ) = (String::new(), String::new(), String::new());
    bare.confidence = 0.0;
    let mut rich = item(2);
    rich.description = "précision perdue « 0,1 » 🚀 \"quoted\"".into();
    rich.kind = "编码".into();
    rich.confidence = 0.123_456_789;
    let mut long = item(3);
    long.description = "x".repeat(5_000);
    let ids = record_batch(
        &app,
        &session.id,
        "wire",
        vec![with_result, bare, rich, long, item(4)],
    )
    .await;
    app.discrepancies
        .clone()
        .resolve_discrepancy(ResolveDiscrepancyRequest {
            id: ids[2].clone(),
            resolution: Resolution::Acknowledged as i32,
            actor: "Zoë".into(),
            note: "seen, \"fine\"".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let listed = app
        .discrepancies
        .clone()
        .list_discrepancies(ListDiscrepanciesRequest {
            session_id: session.id.clone(),
            page_size: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .discrepancies;
    assert_eq!(listed.len(), 5);
    for d in listed {
        let want = app
            .discrepancies
            .clone()
            .get_discrepancy(GetDiscrepancyRequest { id: d.id.clone() })
            .await
            .unwrap()
            .into_inner()
            .discrepancy
            .unwrap();
        assert_eq!(d, want);
    }
}

#[tokio::test]
async fn a_batch_is_stored_whole_with_computed_fingerprints() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let ids = record_batch(&app, &s.id, "b1", (0..500).map(item).collect()).await;
    assert_eq!(ids.len(), 500);
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 500);
    let row = app
        .sql()
        .await
        .query_one(
            "SELECT fingerprint, resolution, kind FROM discrepancies WHERE id = $1::text::uuid",
            &[&ids[7]],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        verdict::discrepancies::fingerprint("rounding", "src.f7", "tgt.f7")
    );
    assert_eq!(row.get::<_, String>(1), "open");
}

#[tokio::test]
async fn one_bad_item_stores_nothing_and_names_its_index() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let mut items: Vec<_> = (0..100).map(item).collect();
    items[42].severity = 0;
    items[77].confidence = f64::NAN;
    let err = app
        .discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: s.id.clone(),
            batch_id: "bad".into(),
            items,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["items[42].severity", "items[77].confidence"]
    );
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 0);
    assert_eq!(count(&app, "SELECT count(*) FROM ingest_batches").await, 0);

    // A result of another session is refused the same way, after validation.
    let other = create(&app, "other").await;
    let foreign = record(&app, new_result(&other.id, "r", 0.5)).await;
    let mut items: Vec<_> = (0..10).map(item).collect();
    items[3].result_id = foreign.id.clone();
    let err = app
        .discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: s.id.clone(),
            batch_id: "foreign".into(),
            items,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["items[3].result_id"]);
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 0);
}

#[tokio::test]
async fn a_replayed_batch_stores_nothing_new_and_answers_the_same() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let first = record_batch(&app, &s.id, "once", (0..50).map(item).collect()).await;
    let reply = app
        .discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: s.id.clone(),
            batch_id: "once".into(),
            items: (0..50).map(item).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.replayed);
    assert_eq!(reply.ids, first);
    assert_eq!(count(&app, "SELECT count(*) FROM discrepancies").await, 50);

    let reused = app
        .discrepancies
        .clone()
        .record_discrepancies(RecordDiscrepanciesRequest {
            session_id: s.id.clone(),
            batch_id: "once".into(),
            items: (0..3).map(item).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::FailedPrecondition);
}

fn chunk(
    ingest_id: &str,
    session_id: &str,
    sequence: i64,
    size: usize,
) -> IngestDiscrepanciesRequest {
    let base = (sequence as usize) * 100_000;
    IngestDiscrepanciesRequest {
        ingest_id: ingest_id.into(),
        session_id: session_id.into(),
        sequence,
        items: (0..size)
            .map(|i| {
                let mut d = item(base + i);
                d.description = format!("chunk {sequence} item {i}");
                d
            })
            .collect(),
    }
}

async fn ingest(
    app: &TestApp,
    chunks: Vec<IngestDiscrepanciesRequest>,
) -> Result<IngestDiscrepanciesResponse, tonic::Status> {
    app.discrepancies
        .clone()
        .ingest_discrepancies(futures::stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn a_stream_broken_mid_way_resumes_storing_every_item_exactly_once() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let all: Vec<_> = (1..=6)
        .map(|seq| chunk("ing-1", &s.id, seq, 5000))
        .collect();

    // Chunks 1-2 are committed while the stream is open (the test waits for
    // it); chunk 3 is still buffered when the stream breaks (a sequence going
    // backwards) and is rolled back.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for c in all[..2].iter().cloned() {
        tx.send(c).await.unwrap();
    }
    let mut client = app.discrepancies.clone();
    let call = tokio::spawn(async move {
        client
            .ingest_discrepancies(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    crate::helpers::until_ingest_committed(&app, 2).await;
    tx.send(all[2].clone()).await.unwrap();
    tx.send(chunk("ing-1", &s.id, 2, 1)).await.unwrap();
    drop(tx);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        10_000
    );
    assert_eq!(
        count(&app, "SELECT high_water_mark FROM ingest_marks").await,
        2
    );

    // Re-sending from the start skips what was committed.
    let reply = ingest(&app, all).await.unwrap();
    assert_eq!(reply.skipped_chunks, 2);
    assert_eq!(reply.committed_chunks, 4);
    assert_eq!(reply.committed_items, 20_000);
    assert_eq!(reply.high_water_mark, 6);
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        30_000
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(DISTINCT description) FROM discrepancies"
        )
        .await,
        30_000
    );
}

#[tokio::test]
async fn a_client_that_vanishes_mid_stream_and_retries_stores_every_item_once() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let all: Vec<_> = (1..=5)
        .map(|seq| chunk("ing-2", &s.id, seq, 4000))
        .collect();

    // Send three chunks, then hang; the call is abandoned by the client.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for c in all[..3].iter().cloned() {
        tx.send(c).await.unwrap();
    }
    let mut client = app.discrepancies.clone();
    let call = tokio::spawn(async move {
        client
            .ingest_discrepancies(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // Chunks 1-3 (12,000 items) filled a batch; wait until it is committed.
    crate::helpers::until_ingest_committed(&app, 3).await;
    call.abort();
    drop(tx);

    let reply = ingest(&app, all).await.unwrap();
    assert_eq!(reply.high_water_mark, 5);
    assert_eq!(
        count(&app, "SELECT count(*) FROM discrepancies").await,
        20_000
    );
    assert_eq!(
        count(
            &app,
            "SELECT count(DISTINCT description) FROM discrepancies"
        )
        .await,
        20_000
    );
}

#[tokio::test]
async fn an_ingest_rejects_bad_chunks_and_foreign_ingest_ids() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    let mut bad = chunk("ing-3", &s.id, 1, 10);
    bad.items[4].kind = String::new();
    let err = ingest(&app, vec![bad]).await.unwrap_err();
    let v = crate::helpers::violations(&err);
    assert_eq!(v[0].0, "items[4].kind");
    assert!(v[0].1.contains("chunk 1"), "{v:?}");

    ingest(&app, vec![chunk("ing-3", &s.id, 1, 10)])
        .await
        .unwrap();
    let other = create(&app, "other").await;
    let err = ingest(&app, vec![chunk("ing-3", &other.id, 1, 10)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = ingest(&app, vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn lists_come_most_severe_first_then_newest_and_filter() {
    let app = spawn_app().await;
    let s = create(&app, "s").await;
    record_batch(&app, &s.id, "b1", (0..60).map(item).collect()).await;
    record_batch(&app, &s.id, "b2", (60..123).map(item).collect()).await;
    let mut client = app.discrepancies.clone();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_discrepancies(ListDiscrepanciesRequest {
                session_id: s.id.clone(),
                page_size: 20,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.discrepancies);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(all.len(), 123);
    assert_eq!(
        all.iter()
            .map(|d| d.id.clone())
            .collect::<HashSet<_>>()
            .len(),
        123
    );
    let order: Vec<_> = all
        .iter()
        .map(|d| {
            let t = d.created_at.unwrap();
            (d.severity, -t.seconds, -i64::from(t.nanos))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "severity, then newest"
    );

    let high = client
        .list_discrepancies(ListDiscrepanciesRequest {
            session_id: s.id.clone(),
            severities: vec![Severity::Critical as i32, Severity::High as i32],
            kind: "precision".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expected = (0..123).filter(|n| n % 5 < 2 && n % 3 == 0).count();
    assert_eq!(high.discrepancies.len(), expected);
}

#[tokio::test]
async fn resolving_keeps_history_and_muting_a_fingerprint_mutes_later_ones() {
    let app = spawn_app().await;
    let a = create(&app, "a").await;
    let b = create(&app, "b").await;
    let same = |n| {
        let mut d = item(n);
        d.source_element = "  Common.Field ".into();
        d.target_element = "common.field".into();
        d.kind = "precision".into();
        d
    };
    let ids_a = record_batch(&app, &a.id, "a1", vec![same(1), item(2)]).await;
    record_batch(&app, &b.id, "b1", vec![same(3)]).await;
    let mut client = app.discrepancies.clone();

    // One discrepancy, two changes, both in its history.
    for (resolution, note) in [
        (Resolution::Acknowledged, "seen"),
        (Resolution::WontFix, "legacy"),
    ] {
        client
            .resolve_discrepancy(ResolveDiscrepancyRequest {
                id: ids_a[1].clone(),
                resolution: resolution as i32,
                actor: "ana".into(),
                note: note.into(),
                apply_to_fingerprint: false,
            })
            .await
            .unwrap();
    }
    let history = client
        .list_resolution_history(ListResolutionHistoryRequest {
            id: ids_a[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let moves: Vec<_> = history
        .iter()
        .map(|c| (c.from_resolution, c.to_resolution))
        .collect();
    assert_eq!(
        moves,
        [
            (Resolution::Open as i32, Resolution::Acknowledged as i32),
            (Resolution::Acknowledged as i32, Resolution::WontFix as i32)
        ]
    );
    assert_eq!(history[1].note, "legacy");

    // Muting by fingerprint reaches the open one of the other session too.
    let muted = client
        .resolve_discrepancy(ResolveDiscrepancyRequest {
            id: ids_a[0].clone(),
            resolution: Resolution::Muted as i32,
            actor: "ana".into(),
            note: "known rounding".into(),
            apply_to_fingerprint: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(muted.updated_count, 2);
    assert_eq!(
        muted.discrepancy.unwrap().resolution,
        Resolution::Muted as i32
    );

    // A later one with the same fingerprint arrives muted.
    let c = create(&app, "c").await;
    let later = record_batch(&app, &c.id, "c1", vec![same(9), item(10)]).await;
    let resolution = |id: &str| {
        let id = id.to_string();
        let app = &app;
        async move {
            app.sql()
                .await
                .query_one(
                    "SELECT resolution FROM discrepancies WHERE id = $1::text::uuid",
                    &[&id],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(resolution(&later[0]).await, "muted");
    assert_eq!(resolution(&later[1]).await, "open");

    // Reopening by fingerprint lifts the mute.
    let reopened = client
        .resolve_discrepancy(ResolveDiscrepancyRequest {
            id: later[0].clone(),
            resolution: Resolution::Open as i32,
            actor: "bo".into(),
            note: String::new(),
            apply_to_fingerprint: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reopened.updated_count, 3);
    let d = create(&app, "d").await;
    let after = record_batch(&app, &d.id, "d1", vec![same(11)]).await;
    assert_eq!(resolution(&after[0]).await, "open");
    assert_eq!(
        count(&app, "SELECT count(*) FROM fingerprint_rules").await,
        0
    );

    let err = client
        .resolve_discrepancy(ResolveDiscrepancyRequest {
            id: ids_a[0].clone(),
            resolution: 0,
            actor: String::new(),
            note: String::new(),
            apply_to_fingerprint: false,
        })
        .await
        .unwrap_err();
    let mut fields = violated_fields(&err);
    fields.sort();
    assert_eq!(fields, ["actor", "resolution"]);
}

#[tokio::test]
async fn summaries_match_a_direct_count() {
    let app = spawn_app().await;
    let a = create(&app, "a").await;
    let b = create(&app, "b").await;
    record_batch(&app, &a.id, "a1", (0..97).map(item).collect()).await;
    record_batch(&app, &b.id, "b1", (0..31).map(item).collect()).await;
    let mut client = app.discrepancies.clone();

    let one = client
        .summarize_discrepancies(SummarizeDiscrepanciesRequest {
            session_id: a.id.clone(),
            sessions_created: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.total, 97);
    let sql = app.sql().await;
    let expected: HashMap<String, i64> = sql
        .query(
            "SELECT kind, count(*) FROM discrepancies WHERE session_id = $1::text::uuid GROUP BY kind",
            &[&a.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let got: HashMap<String, i64> = one
        .by_kind
        .iter()
        .map(|c| (c.key.clone(), c.count))
        .collect();
    assert_eq!(got, expected);
    let critical: i64 = sql
        .query_one(
            "SELECT count(*) FROM discrepancies WHERE session_id = $1::text::uuid AND severity = 1",
            &[&a.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(one.by_severity[0].key, "SEVERITY_CRITICAL");
    assert_eq!(one.by_severity[0].count, critical);
    assert_eq!(one.by_resolution[0].key, "RESOLUTION_OPEN");
    assert_eq!(one.by_resolution[0].count, 97);

    let everything = client
        .summarize_discrepancies(SummarizeDiscrepanciesRequest {
            session_id: String::new(),
            sessions_created: Some(TimeRange::default()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(everything.total, 128);
    let both = client
        .summarize_discrepancies(SummarizeDiscrepanciesRequest {
            session_id: a.id.clone(),
            sessions_created: Some(TimeRange::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&both), ["session_id"]);
}
