//! Chunk sequences of client-stream ingests: a refused sequence says what
//! was expected.

use crate::discrepancies::item;
use crate::helpers::{spawn_app, violations};
use crate::sessions::create;
use tonic::Code;
use verdict::proto::IngestDiscrepanciesRequest;

fn chunk(ingest_id: &str, session_id: &str, sequence: i64) -> IngestDiscrepanciesRequest {
    IngestDiscrepanciesRequest {
        ingest_id: ingest_id.into(),
        session_id: session_id.into(),
        sequence,
        items: vec![item(sequence.unsigned_abs() as usize)],
    }
}

#[tokio::test]
async fn a_refused_chunk_sequence_says_sequences_start_at_1_and_increase() {
    let app = spawn_app().await;
    let s = create(&app, "sequences").await;
    let ingest = |sequences: Vec<i64>| {
        let mut d = app.discrepancies.clone();
        let ingest_id = format!("sequences-{sequences:?}");
        let chunks: Vec<_> = sequences
            .iter()
            .map(|n| chunk(&ingest_id, &s.id, *n))
            .collect();
        async move { d.ingest_discrepancies(futures::stream::iter(chunks)).await }
    };
    for (sequences, expected) in [
        (vec![0], "must be 1 or more"),
        (vec![-3], "must be 1 or more"),
        (vec![1, 2, 0], "must be 1 or more"),
        (
            vec![4, 4],
            "is 4 after 4; chunk sequences strictly increase along the stream (the next one must be 5 or more)",
        ),
        (
            vec![1, 5, 3],
            "is 3 after 5; chunk sequences strictly increase",
        ),
    ] {
        let err = ingest(sequences.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{sequences:?}: {err:?}");
        let v = violations(&err);
        assert_eq!(v.len(), 1, "{sequences:?}: {v:?}");
        assert_eq!(v[0].0, "sequence", "{sequences:?}");
        assert!(
            v[0].1.starts_with(expected),
            "{sequences:?}: {:?} should start with {expected:?}",
            v[0].1
        );
        assert!(!v[0].1.contains("follows"), "{:?}", v[0].1);
    }
    // Gaps are allowed: only the order is a rule.
    let ok = ingest(vec![1, 5, 9])
        .await
        .expect("1, 5, 9 is a valid stream");
    assert_eq!(ok.into_inner().committed_chunks, 3);
    let stored: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM discrepancies", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 3, "refused streams stored nothing");
}
