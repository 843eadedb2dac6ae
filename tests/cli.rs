//! The operator commands of the real `verdict` binary, run as processes:
//! `stats`, `check` and `health`, their exit codes and their `--json`
//! output (parsed with serde_json), against a real PostgreSQL and a real
//! gateway on 127.0.0.1.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{create_database, test_config};
use serde_json::Value;
use std::process::{Command, Stdio};

/// What a finished command left: exit code, stdout, stderr.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} / {}", self.stdout, self.stderr))
    }
}

/// Runs `verdict ARGS` (on `database_url` when given) off the runtime's
/// threads, bounded by the commands' own timeouts.
async fn verdict(database_url: Option<&str>, args: &[&str]) -> Ran {
    let mut command = Command::new(env!("CARGO_BIN_EXE_verdict"));
    command
        .args(args)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    if let Some(url) = database_url {
        command.env("DATABASE_URL", url);
    }
    let out = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    Ran {
        code: out.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn sql(url: &str) -> tokio_postgres::Client {
    helpers::admin_client(url).await
}

#[tokio::test]
async fn stats_counts_one_project_or_every_project_as_json() {
    let (_, url) = create_database().await;
    // The first command migrates the database.
    let empty = verdict(Some(&url), &["stats", "--json"]).await;
    assert_eq!(empty.code, 0, "{}", empty.stderr);
    assert_eq!(empty.json()["tables"]["sessions"], 0);
    let db = sql(&url).await;
    db.batch_execute(
        "INSERT INTO projects (slug) VALUES ('other');
         INSERT INTO sessions (project_id, id, request_id, source_technology, target_technology,
             validation_scope)
         SELECT p.id, gen_random_uuid(), p.slug || i, 'cobol', 'java', 'full'
         FROM projects p, generate_series(1, 3) i WHERE p.slug = 'default'
         UNION ALL
         SELECT p.id, gen_random_uuid(), p.slug || i, 'cobol', 'java', 'full'
         FROM projects p, generate_series(1, 2) i WHERE p.slug = 'other';",
    )
    .await
    .unwrap();

    let other = verdict(Some(&url), &["stats", "--project", "other", "--json"]).await;
    assert_eq!(other.code, 0, "{}", other.stderr);
    let other = other.json();
    assert_eq!(other["project"], "other");
    assert_eq!(other["exact"], true);
    assert_eq!(other["tables"]["sessions"], 2);
    assert!(other["oldest_session"].is_string());

    let all = verdict(
        Some(&url),
        &["stats", "--all-projects", "--exact", "--json"],
    )
    .await;
    assert_eq!(all.code, 0, "{}", all.stderr);
    let all = all.json();
    assert_eq!(all["project"], Value::Null);
    assert_eq!(all["tables"]["sessions"], 5);
    assert!(all["database_bytes"].as_i64().unwrap() > 0);

    let text = verdict(Some(&url), &["stats"]).await;
    assert_eq!(text.code, 0);
    assert!(text.stdout.contains("sessions"), "{}", text.stdout);

    let unknown = verdict(Some(&url), &["stats", "--project", "nope", "--json"]).await;
    assert_eq!(unknown.code, 1);
    assert!(
        unknown.stderr.contains("no project has slug"),
        "{}",
        unknown.stderr
    );
    assert!(unknown.stdout.is_empty());
}

#[tokio::test]
async fn check_exits_non_zero_on_findings_and_zero_once_repaired() {
    let (_, url) = create_database().await;
    let clean = verdict(Some(&url), &["check", "--json"]).await;
    assert_eq!(clean.code, 0, "{}", clean.stderr);
    let clean = clean.json();
    assert_eq!(clean["total"], 0);
    assert_eq!(clean["findings"].as_array().unwrap().len(), 0);

    // A session stuck in PROCESSING in `default`, another in `other`.
    sql(&url)
        .await
        .batch_execute(
            "INSERT INTO projects (slug) VALUES ('other');
             INSERT INTO sessions (project_id, id, request_id, source_technology,
                 target_technology, validation_scope, status, started_at)
             SELECT id, gen_random_uuid(), 'stuck', 'cobol', 'java', 'full', 'processing',
                    now() - interval '2 days'
             FROM projects;",
        )
        .await
        .unwrap();
    let found = verdict(Some(&url), &["check", "--json"]).await;
    assert_eq!(found.code, 2, "{}", found.stderr);
    let found = found.json();
    assert_eq!(found["total"], 1);
    let stuck = &found["findings"][0];
    assert_eq!(stuck["check"], "stuck_sessions");
    assert_eq!(stuck["count"], 1);
    assert_eq!(stuck["repaired"], 0);
    assert_eq!(stuck["sample_ids"].as_array().unwrap().len(), 1);

    // A longer threshold finds nothing.
    let patient = verdict(Some(&url), &["check", "--stuck-after", "3d", "--json"]).await;
    assert_eq!(patient.code, 0, "{}", patient.stderr);

    let repaired = verdict(Some(&url), &["check", "--repair", "--json"]).await;
    assert_eq!(repaired.code, 2, "what was found is still reported");
    assert_eq!(repaired.json()["findings"][0]["repaired"], 1);
    let again = verdict(Some(&url), &["check"]).await;
    assert_eq!(again.code, 0, "{}", again.stdout);
    assert!(again.stdout.contains("no findings"));

    // The other project's stuck session was neither repaired nor counted.
    let other = verdict(Some(&url), &["check", "--project", "other", "--json"]).await;
    assert_eq!(other.code, 2);
    assert_eq!(other.json()["total"], 1);

    let bad = verdict(Some(&url), &["check", "--stuck-after", "soon"]).await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("--stuck-after"), "{}", bad.stderr);
}

#[tokio::test]
async fn health_says_serving_for_a_running_gateway_and_fails_on_a_closed_port() {
    let (_, url) = create_database().await;
    let app = helpers::spawn_app_with(test_config(&url)).await;
    let addr = format!("127.0.0.1:{}", app.port);

    let serving = verdict(None, &["health", "--addr", &addr, "--json"]).await;
    assert_eq!(serving.code, 0, "{}", serving.stderr);
    let serving = serving.json();
    assert_eq!(serving["status"], "SERVING");
    assert_eq!(serving["error"], Value::Null);
    assert_eq!(serving["addr"], format!("http://{addr}"));

    let plain = verdict(None, &["health", "--addr", &format!("http://{addr}")]).await;
    assert_eq!((plain.code, plain.stdout.trim()), (0, "SERVING"));

    let unknown = verdict(
        None,
        &[
            "health",
            "--addr",
            &addr,
            "--service",
            "verdict.v1.NoSuchService",
            "--json",
        ],
    )
    .await;
    assert_eq!(unknown.code, 2, "{}", unknown.stderr);
    assert_eq!(unknown.json()["status"], "SERVICE_UNKNOWN");

    // A port nobody listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = verdict(
        None,
        &[
            "health",
            "--addr",
            &format!("127.0.0.1:{closed}"),
            "--timeout",
            "2s",
            "--json",
        ],
    )
    .await;
    assert_eq!(down.code, 1, "{}", down.stderr);
    let down = down.json();
    assert_eq!(down["status"], "UNREACHABLE");
    assert!(down["error"].as_str().unwrap().contains("cannot connect"));

    app.stop().await.unwrap();
}
