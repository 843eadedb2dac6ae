//! The admin calls that scan whole tables (GetStats exact, CheckIntegrity,
//! Cleanup's dry run; issue 18) are bounded by the call's deadline: a
//! short deadline ends them DEADLINE_EXCEEDED while their scan waits, the
//! statement is cancelled in PostgreSQL (no backend left behind), and
//! nothing is half-done (a repair cut by its deadline repairs nothing).

use crate::errors::assert_reason;
use crate::helpers::*;
use crate::sessions::create;
use std::time::{Duration, Instant};
use tonic::{Code, Request};
use verdict::proto::{CheckIntegrityRequest, CleanupRequest, GetStatsRequest};

/// A request with a deadline.
fn within<T>(message: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(deadline);
    r
}

/// Waits (at most 10 s) until no gateway backend of this test's database
/// waits on a lock: the statement the deadline ended was cancelled in
/// PostgreSQL, not left queued behind the lock.
async fn no_backend_left_waiting(observer: &tokio_postgres::Client) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'verdict' AND datname = current_database() \
                   AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{waiting} gateway backends still wait on the lock 10 s after the deadline"
        );
        tokio::task::yield_now().await;
    }
}

/// Each full-table admin call, started while another connection holds
/// the discrepancies table, is seen waiting in its scan, ends at its
/// deadline with DEADLINE_EXCEEDED, and leaves no statement behind; the
/// same calls answer once the table is free.
#[tokio::test]
async fn full_table_admin_calls_end_at_their_deadline_and_leave_no_statement_behind() {
    let app = spawn_app().await;
    let old = create(&app, "admin-deadline-old").await;
    let sql = app.sql().await;
    sql.execute(
        "UPDATE sessions SET created_at = now() - interval '10 days' WHERE id = $1::text::uuid",
        &[&old.id],
    )
    .await
    .unwrap();
    let sessions_before: i64 = sql
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    let older_than = Some(prost_types::Duration {
        seconds: 86_400,
        nanos: 0,
    });

    let mut blocker = admin_client(&app.database_url).await;
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE discrepancies IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let short = Duration::from_millis(1500);
    let mut admin = app.admin.clone();

    let (stats, ()) = tokio::join!(
        admin.get_stats(within(
            GetStatsRequest {
                exact: true,
                all_projects: false,
            },
            short
        )),
        wait_for_lock_wait(&sql, "%discrepancies%")
    );
    assert_reason(
        &stats.unwrap_err(),
        Code::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
    );
    no_backend_left_waiting(&sql).await;

    let (integrity, ()) = tokio::join!(
        admin.check_integrity(within(
            CheckIntegrityRequest {
                repair: false,
                stuck_after: None,
            },
            short
        )),
        wait_for_lock_wait(&sql, "%discrepancies%")
    );
    assert_reason(
        &integrity.unwrap_err(),
        Code::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
    );
    no_backend_left_waiting(&sql).await;

    let (cleanup, ()) = tokio::join!(
        admin.cleanup(within(
            CleanupRequest {
                older_than,
                cutoff: None,
                dry_run: true,
                batch_size: 0,
            },
            short
        )),
        wait_for_lock_wait(&sql, "%discrepancies%")
    );
    assert_reason(
        &cleanup.unwrap_err(),
        Code::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
    );
    no_backend_left_waiting(&sql).await;

    tx.rollback().await.unwrap();
    // The table free again, the same calls answer (the gateway's
    // connections came back usable), and the dry run deleted nothing.
    let stats = admin
        .get_stats(within(
            GetStatsRequest {
                exact: true,
                all_projects: false,
            },
            Duration::from_secs(30),
        ))
        .await
        .unwrap()
        .into_inner();
    let sessions = stats.tables.iter().find(|t| t.table == "sessions").unwrap();
    assert_eq!(sessions.rows, sessions_before);
    assert!(sessions.exact);
    admin
        .check_integrity(within(
            CheckIntegrityRequest {
                repair: false,
                stuck_after: None,
            },
            Duration::from_secs(30),
        ))
        .await
        .unwrap();
    let dry = admin
        .cleanup(within(
            CleanupRequest {
                older_than,
                cutoff: None,
                dry_run: true,
                batch_size: 0,
            },
            Duration::from_secs(30),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run);
    let counted = dry.deleted.iter().find(|t| t.table == "sessions").unwrap();
    assert_eq!(counted.rows, 1, "the dry run counts the one old session");
    let sessions_after: i64 = sql
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sessions_after, sessions_before, "a dry run deletes nothing");
}

/// The status of the stuck session, and whether the unfinished one still
/// has no completion time.
async fn state(sql: &tokio_postgres::Client, stuck: &str, unfinished: &str) -> (String, bool) {
    let row = sql
        .query_one(
            "SELECT (SELECT status FROM sessions WHERE id = $1::text::uuid), \
                    (SELECT completed_at IS NULL FROM sessions WHERE id = $2::text::uuid)",
            &[&stuck, &unfinished],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// A repair cut by its deadline repairs nothing: the stuck session is
/// repaired first, then the repair of a final session without completion
/// time waits on that session's row lock until the deadline; the whole
/// repair rolls back (the stuck session is still PROCESSING), and a repair
/// with time enough fixes both.
#[tokio::test]
async fn an_integrity_repair_cut_by_its_deadline_repairs_nothing() {
    let app = spawn_app().await;
    let stuck = create(&app, "admin-deadline-stuck").await;
    let unfinished = create(&app, "admin-deadline-unfinished").await;
    let sql = app.sql().await;
    sql.execute(
        "UPDATE sessions SET status = 'processing', started_at = now() - interval '2 hours', \
                updated_at = now() - interval '2 hours' WHERE id = $1::text::uuid",
        &[&stuck.id],
    )
    .await
    .unwrap();
    sql.execute(
        "UPDATE sessions SET status = 'completed', completed_at = NULL WHERE id = $1::text::uuid",
        &[&unfinished.id],
    )
    .await
    .unwrap();
    let stuck_after = Some(prost_types::Duration {
        seconds: 60,
        nanos: 0,
    });

    let mut blocker = admin_client(&app.database_url).await;
    let tx = blocker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM sessions WHERE id = $1::text::uuid FOR UPDATE",
        &[&unfinished.id],
    )
    .await
    .unwrap();
    let mut admin = app.admin.clone();
    let (cut, ()) = tokio::join!(
        admin.check_integrity(within(
            CheckIntegrityRequest {
                repair: true,
                stuck_after,
            },
            Duration::from_millis(1500)
        )),
        wait_for_lock_wait(&sql, "UPDATE sessions SET completed_at%")
    );
    assert_reason(
        &cut.unwrap_err(),
        Code::DeadlineExceeded,
        "DEADLINE_EXCEEDED",
    );
    no_backend_left_waiting(&sql).await;
    tx.rollback().await.unwrap();
    assert_eq!(
        state(&sql, &stuck.id, &unfinished.id).await,
        ("processing".to_owned(), true),
        "the repair cut by its deadline left both sessions as they were"
    );

    let done = app
        .admin
        .clone()
        .check_integrity(within(
            CheckIntegrityRequest {
                repair: true,
                stuck_after,
            },
            Duration::from_secs(30),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(done.repaired);
    for check in ["stuck_sessions", "final_sessions_without_completion_time"] {
        let f = done.findings.iter().find(|f| f.check == check).unwrap();
        assert_eq!((f.count, f.repaired), (1, 1), "{check}");
    }
    assert_eq!(
        state(&sql, &stuck.id, &unfinished.id).await,
        ("failed".to_owned(), false)
    );
}
