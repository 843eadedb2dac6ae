//! Both shapes of the binary's async runtime (`VERDICT_RUNTIME`:
//! `current_thread`, which `auto` picks on one CPU, and
//! `multi_thread`) serve concurrent callers, recover from terminated
//! database backends, and drain in-flight calls on SIGTERM without losing an
//! acknowledged write. Runs the real binary against a PostgreSQL of its own
//! on loopback.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{channel_when_serving, temp_pg_dir};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, Notify};
use tokio::task::JoinSet;
use tonic::Code;
use verdict::db::embedded::EmbeddedPostgres;
use verdict::proto::get_session_request::Lookup;
use verdict::proto::{CreateSessionRequest, GetSessionRequest};

/// One gateway process at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

fn session(request_id: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        request_id: request_id.into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        ..Default::default()
    }
}

/// The gateway process, killed if the test fails before it exits.
struct Gateway(Option<std::process::Child>);

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the binary in runtime shape `shape`, writes from 4 concurrent
/// clients (each reading back what it wrote), terminates every gateway
/// backend in PostgreSQL mid-run, then sends SIGTERM: the gateway must keep
/// serving after the terminations, exit cleanly, and have stored every
/// write it acknowledged.
async fn serves_recovers_and_drains(shape: &str) {
    let _serial = SERIAL.lock().await;
    let dir = temp_pg_dir();
    let mut pg = EmbeddedPostgres::start(&dir).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gateway = Gateway(Some(
        std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .arg("serve")
            .env("DATABASE_URL", pg.database_url("verdict"))
            .env("VERDICT_LISTEN", format!("127.0.0.1:{port}"))
            .env("VERDICT_ROLLUP_INTERVAL_SECS", "0")
            .env("VERDICT_RUNTIME", shape)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    ));
    let channel = channel_when_serving(port, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("the gateway ({shape}) serves"));

    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let terminated = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Why each writer stopped, for the failure message.
    let stopped = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (first, second) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let mut writers = JoinSet::new();
    for w in 0..4 {
        let mut client =
            verdict::proto::session_service_client::SessionServiceClient::new(channel.clone());
        let (acked, count, terminated) = (acked.clone(), count.clone(), terminated.clone());
        let stopped = stopped.clone();
        let (first, second) = (first.clone(), second.clone());
        writers.spawn(async move {
            let mut after_termination = 0usize;
            for n in 0..100_000 {
                let request_id = format!("rt-{w}-{n}");
                match client.create_session(session(&request_id)).await {
                    Ok(created) => {
                        let id = created
                            .into_inner()
                            .session
                            .expect("the created session")
                            .id;
                        let read = client
                            .get_session(GetSessionRequest {
                                lookup: Some(Lookup::Id(id.clone())),
                                ..Default::default()
                            })
                            .await;
                        // Before SIGTERM a read of an acknowledged write
                        // finds it (a terminated backend may fail it once).
                        if let Ok(found) = read {
                            assert_eq!(found.into_inner().session.map(|s| s.id), Some(id));
                        }
                        acked.lock().unwrap().push(request_id);
                    }
                    // A backend terminated under the call: UNAVAILABLE, and
                    // the next call gets a working connection.
                    Err(s)
                        if terminated.load(Ordering::SeqCst)
                            && after_termination < 50
                            && s.code() == Code::Unavailable =>
                    {
                        continue;
                    }
                    // After SIGTERM: refused or cut off, never acknowledged.
                    Err(s) => {
                        stopped.lock().unwrap().push(format!("writer {w}: {s:?}"));
                        let raced_goaway =
                            s.code() == Code::Internal && format!("{s:?}").contains("GoAway");
                        assert!(
                            raced_goaway
                                || matches!(
                                    s.code(),
                                    Code::Unavailable | Code::Cancelled | Code::Unknown
                                ),
                            "{s:?}"
                        );
                        return;
                    }
                }
                if terminated.load(Ordering::SeqCst) {
                    after_termination += 1;
                }
                match count.fetch_add(1, Ordering::SeqCst) {
                    100 => first.notify_one(),
                    300 => second.notify_one(),
                    _ => {}
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(120), first.notified())
        .await
        .expect("100 writes acknowledged");
    // Terminate every gateway connection to the database.
    let (sql, conn) = pg
        .config("verdict")
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let killed: i64 = sql
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND backend_type = 'client backend') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(killed > 0, "the gateway had backends to terminate");
    terminated.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(120), second.notified())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "200 more writes acknowledged after the backends were terminated; \
                 writers stopped: {:?}",
                stopped.lock().unwrap()
            )
        });
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(gateway.0.as_ref().unwrap().id() as i32, libc::SIGTERM) };
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert!(drained.is_ok(), "every writer stops after SIGTERM");
    let mut child = gateway.0.take().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "clean exit after draining: {status:?}");

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 300);
    let stored: Vec<String> = sql
        .query(
            "SELECT request_id FROM sessions WHERE request_id LIKE 'rt-%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &acked {
        assert!(stored.contains(id), "acknowledged {id} is stored");
    }
    pg.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_thread_runtime_serves_recovers_from_terminated_backends_and_drains_on_sigterm() {
    serves_recovers_and_drains("current_thread").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_thread_runtime_serves_recovers_from_terminated_backends_and_drains_on_sigterm() {
    serves_recovers_and_drains("multi_thread").await;
}

#[test]
fn an_unknown_runtime_shape_is_refused_at_start_with_the_accepted_names() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
        .arg("serve")
        .env("VERDICT_LISTEN", "127.0.0.1:0")
        .env("VERDICT_RUNTIME", "threadpool")
        .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("VERDICT_RUNTIME")
            && stderr.contains("auto, current_thread or multi_thread"),
        "{stderr}"
    );
}
