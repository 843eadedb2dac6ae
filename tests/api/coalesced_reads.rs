//! Reads written together share one Sync (`verdict::db::coalesce`): when
//! one of them fails in the server, the server skips the rest of its batch;
//! they are sent again, and every caller still gets its own answer.

use crate::helpers::{create_database, spawn_app_with, test_config};
use crate::sessions::create;
use crate::shared_reads::{backends_waiting_on_a_lock, hold_the_sessions_lock};
use std::time::Duration;
use tonic::Code;
use verdict::proto::GetSessionRequest;

fn get(id: &str) -> GetSessionRequest {
    crate::helpers::get_session_by_id(id)
}

/// The pid of the gateway backend waiting for a lock, once there is one.
async fn backend_waiting_on_a_lock(sql: &tokio_postgres::Client) -> i32 {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(pid) = backends_waiting_on_a_lock(sql).await.first() {
                return *pid;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("a gateway backend waits on the lock")
}

/// Cancels the statement of the gateway backend waiting on the lock.
async fn cancel_the_read_waiting_on_the_lock(sql: &tokio_postgres::Client) {
    let pid = backend_waiting_on_a_lock(sql).await;
    let cancelled: bool = sql
        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(cancelled);
}

#[tokio::test]
async fn a_read_cancelled_in_the_server_fails_alone_and_the_reads_batched_with_it_are_answered() {
    let (_, url) = create_database().await;
    let app = spawn_app_with(test_config(&url)).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(create(&app, &format!("batched-{i}")).await.id);
    }
    // A read first: the shared connection and its statement exist.
    app.sessions
        .clone()
        .get_session(get(&ids[0]))
        .await
        .unwrap();
    let sql = app.sql().await;
    let lock = hold_the_sessions_lock(&app).await;

    let (_, again_before) = verdict::observability::batched_reads();
    // Eight callers on one HTTP/2 connection: their statements go out
    // together on the shared connection, queued behind the lock.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let mut client = app.sessions.clone();
            let id = ids[i % 4].clone();
            tokio::spawn(async move { (id.clone(), client.get_session(get(&id)).await) })
        })
        .collect();
    // The statement running is cancelled: the server skips the rest of its
    // batch, and those reads go again, behind the lock once more.
    cancel_the_read_waiting_on_the_lock(&sql).await;
    backend_waiting_on_a_lock(&sql).await;
    lock.batch_execute("COMMIT").await.unwrap();

    let mut failed = 0;
    for call in calls {
        let (id, outcome) = call.await.unwrap();
        match outcome {
            Ok(got) => assert_eq!(got.into_inner().session.unwrap().id, id),
            Err(e) => {
                assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 1, "only the cancelled read fails");
    let (_, again_after) = verdict::observability::batched_reads();
    assert!(
        again_after > again_before,
        "the reads batched with the cancelled one were sent again"
    );
    // The connection still answers in order.
    for id in &ids {
        let got = app.sessions.clone().get_session(get(id)).await.unwrap();
        assert_eq!(&got.into_inner().session.unwrap().id, id);
    }
    app.stop().await.unwrap();
}

/// Sessions created in a gateway, and one connection to its database made
/// the way the gateway makes its shared read connections, with the
/// gateway's read by id prepared on it.
struct OwnConnection {
    app: crate::helpers::TestApp,
    client: tokio_postgres::Client,
    by_id: tokio_postgres::Statement,
    project: uuid::Uuid,
    ids: Vec<uuid::Uuid>,
}

impl OwnConnection {
    async fn new(label: &str, sessions: usize) -> OwnConnection {
        let (_, url) = create_database().await;
        let app = spawn_app_with(test_config(&url)).await;
        let mut ids = Vec::new();
        for i in 0..sessions {
            ids.push(create(&app, &format!("{label}-{i}")).await.id);
        }
        let project = app
            .sql()
            .await
            .query_one(
                "SELECT project_id FROM sessions WHERE id = $1::text::uuid",
                &[&ids[0]],
            )
            .await
            .unwrap()
            .get::<_, uuid::Uuid>(0);
        let pg = verdict::db::tls::PgConfig::parse(&url).unwrap();
        let mut config = pg.config().clone();
        config.application_name("verdict");
        let (client, connection) = verdict::db::coalesce::connect(&config, &pg.tls().connector())
            .await
            .expect("a configuration this connects itself")
            .expect("connected");
        tokio::spawn(connection);
        let by_id = client
            .prepare(verdict::sessions::sql::BY_ID.sql)
            .await
            .unwrap();
        let ids = ids.iter().map(|id| id.parse().unwrap()).collect();
        OwnConnection {
            app,
            client,
            by_id,
            project,
            ids,
        }
    }

    /// Session `id` by the gateway's own statement.
    async fn read(
        &self,
        id: &uuid::Uuid,
    ) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
        self.client
            .query_opt(&self.by_id, &[&self.project, id])
            .await
    }
}

/// Four reads pipelined in one write behind a lock; the first is cancelled.
#[tokio::test]
async fn reads_skipped_after_a_failure_in_their_batch_are_answered_in_order_on_the_same_connection()
{
    let own = OwnConnection::new("pipelined", 4).await;
    let sql = own.app.sql().await;
    let lock = hold_the_sessions_lock(&own.app).await;
    let (batched_before, again_before) = verdict::observability::batched_reads();
    // Polled together, the four are queued before the connection writes:
    // one write, one batch.
    let reads = futures::future::join_all(own.ids.iter().map(|id| own.read(id)));
    let release = async {
        cancel_the_read_waiting_on_the_lock(&sql).await;
        lock.batch_execute("COMMIT").await.unwrap();
    };
    let (reads, ()) = futures::join!(reads, release);
    let (batched_after, again_after) = verdict::observability::batched_reads();
    assert!(batched_after >= batched_before + 4, "one batch of four");
    assert!(again_after >= again_before + 3, "three reads sent again");

    let mut reads = reads.into_iter();
    let first = reads.next().unwrap().expect_err("the cancelled read fails");
    assert_eq!(
        first.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );
    for (read, id) in reads.zip(&own.ids[1..]) {
        let row = read.expect("a skipped read is answered").expect("its row");
        assert_eq!(row.get::<_, uuid::Uuid>("id"), *id);
    }
    // Later statements, reads and others, are answered in order.
    let again = futures::future::join_all(own.ids.iter().map(|id| own.read(id))).await;
    for (read, id) in again.into_iter().zip(&own.ids) {
        assert_eq!(read.unwrap().unwrap().get::<_, uuid::Uuid>("id"), *id);
    }
    let one: i32 = own.client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    own.app.stop().await.unwrap();
}
