//! The dashboard and alerting rules in deploy/observability use only metrics
//! and labels the gateway exports: every `rpc_*`, `db_*` and `verdict_*`
//! name in them is a metric family (or a histogram's `_bucket`/`_sum`/
//! `_count`) or a label on a sample of a running gateway's /metrics, after
//! calls, a rollup run and an integrity check.

#[path = "api/helpers.rs"]
mod helpers;

use helpers::{adopt, create_database, test_config};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verdict::proto::{CheckIntegrityRequest, CreateSessionRequest};

async fn scrape(port: u16) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// Metric names (histograms with their three series) and label names in a
/// Prometheus text exposition.
fn exported(body: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            names.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        } else if let Some((_, labels)) = line.split_once('{') {
            for pair in labels.split(',') {
                if let Some((label, _)) = pair.split_once('=') {
                    names.insert(label.trim().to_owned());
                }
            }
        }
    }
    names
}

/// The identifiers in `text` that name a gateway metric or label.
fn referenced(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| ["rpc_", "db_", "verdict_"].iter().any(|p| t.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_use_only_exported_metrics_and_labels() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.rollup_interval_secs = 1;
    let app = verdict::Application::build(config).await.unwrap();
    let port = app.metrics_port().expect("metrics enabled");
    let app = adopt(app).await;
    app.sessions
        .clone()
        .create_session(CreateSessionRequest {
            request_id: "dashboard".into(),
            source_technology: "cobol".into(),
            target_technology: "java".into(),
            validation_scope: "full".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    app.admin
        .clone()
        .check_integrity(CheckIntegrityRequest::default())
        .await
        .unwrap();
    // The first rollup run and health probe have reported.
    let body = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let body = scrape(port).await;
            if body.contains("verdict_job_runs_total{job=\"rollup\"")
                && body.contains("\nverdict_db_reachable ")
            {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a rollup run and a health probe are reported");
    let have = exported(&body);

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/observability");
    for file in ["verdict-dashboard.json", "verdict-rules.yaml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = referenced(&text);
        assert!(
            used.len() > 10,
            "{file} uses the gateway's metrics: {used:?}"
        );
        // Lost spans (incomplete traces) have a panel and an alert.
        assert!(
            used.contains("verdict_telemetry_dropped_spans_total"),
            "{file} shows the spans that never reached the collector"
        );
        let unknown: Vec<&String> = used.difference(&have).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses names /metrics does not have: {unknown:?}\n{body}"
        );
    }
    app.stop().await.unwrap();
}
