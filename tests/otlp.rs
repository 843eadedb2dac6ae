//! Tracing end to end: an in-test OTLP/gRPC receiver gets the RPC span and
//! its SQL child spans with their attributes, in the caller's trace; every
//! statement of a call (stream ingest included) and of a background job run
//! belongs to one trace whose root says what it was for; the call's
//! latency buckets carry exemplars leading to its trace, over OTLP and in
//! the OpenMetrics exposition of /metrics. Its own test binary, because the
//! tracing subscriber is process-global.

#[path = "api/helpers.rs"]
mod helpers;
#[path = "support/otlp_receiver.rs"]
mod otlp_receiver;

use helpers::{adopt, create_database, test_config};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use otlp_receiver::{Exemplar, Receiver, Series, attr, hex, int, text, to_hex};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use verdict::proto::{
    CreateSessionRequest, DiscrepancyInput, IngestDiscrepanciesRequest, Severity,
};

/// The roots a trace may have: a served call, or one run of a background job.
const JOB_ROOTS: [&str; 5] = [
    "rollup.run",
    "keys.recheck",
    "watch.feed.read",
    "cleanup.run",
    "integrity.check",
];

/// Attributes the conventions do not name, which tracing adds unless told
/// not to.
fn is_noise(key: &str) -> bool {
    matches!(key, "busy_ns" | "idle_ns" | "target")
        || key.starts_with("thread.")
        || key.starts_with("code.")
}

fn discrepancy(n: usize) -> DiscrepancyInput {
    DiscrepancyInput {
        kind: "precision".into(),
        severity: Severity::High as i32,
        description: format!("difference {n}"),
        source_element: format!("src.f{n}"),
        target_element: format!("tgt.f{n}"),
        recommendation: "check it".into(),
        confidence: 0.8,
        ..Default::default()
    }
}

/// The root of `span`'s trace among `spans`: the span reached by following
/// parents until one is not among them.
fn root<'a>(span: &'a Span, by_id: &HashMap<&[u8], &'a Span>) -> &'a Span {
    let mut at = span;
    for _ in 0..64 {
        match by_id.get(at.parent_span_id.as_slice()) {
            Some(parent) => at = parent,
            None => break,
        }
    }
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_statement_is_in_a_trace_rooted_at_its_call_or_job_with_current_conventions() {
    let receiver = Receiver::default();
    let collector_port = receiver.start().await;

    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.otlp_endpoint = Some(format!("http://127.0.0.1:{collector_port}"));
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    // A rollup run starts at once, then every second.
    config.rollup_interval_secs = 1;
    let telemetry = verdict::telemetry::init(&config).unwrap();
    let app = verdict::Application::build(config).await.unwrap();
    let metrics_port = app.metrics_port().expect("metrics enabled");
    let app = adopt(app).await;

    let trace_id_hex = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span_hex = "00f067aa0ba902b7";
    let secret_value = "request-id-that-must-not-appear-in-spans";
    let mut request = tonic::Request::new(CreateSessionRequest {
        request_id: secret_value.into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id_hex}-{caller_span_hex}-01")
            .parse()
            .unwrap(),
    );
    let session = app
        .sessions
        .clone()
        .create_session(request)
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();

    // A call in a trace its caller does not sample: nothing of it is
    // exported, so no exemplar may lead to it.
    let unsampled_hex = "7f0000000000000000000000000000aa";
    let mut request = tonic::Request::new(CreateSessionRequest {
        request_id: "unsampled".into(),
        source_technology: "cobol".into(),
        target_technology: "java".into(),
        validation_scope: "full".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{unsampled_hex}-{caller_span_hex}-00")
            .parse()
            .unwrap(),
    );
    app.sessions.clone().create_session(request).await.unwrap();

    // A stream ingest in a trace of its own.
    let ingest_trace_hex = "0af7651916cd43dd8448eb211c80319c";
    let chunks: Vec<IngestDiscrepanciesRequest> = (1..=3)
        .map(|seq| IngestDiscrepanciesRequest {
            ingest_id: "traced".into(),
            session_id: session.id.clone(),
            sequence: seq,
            items: (0..5).map(|i| discrepancy(seq as usize * 10 + i)).collect(),
        })
        .collect();
    let mut request = tonic::Request::new(futures::stream::iter(chunks));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{ingest_trace_hex}-{caller_span_hex}-01")
            .parse()
            .unwrap(),
    );
    let ingested = app
        .discrepancies
        .clone()
        .ingest_discrepancies(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ingested.committed_items, 15);

    telemetry.flush();
    let trace_id = hex(trace_id_hex);
    let ingest_trace = hex(ingest_trace_hex);
    receiver
        .wait_for("verdict.v1.SessionService/CreateSession", &trace_id)
        .await;
    receiver
        .wait_for(
            "verdict.v1.DiscrepancyService/IngestDiscrepancies",
            &ingest_trace,
        )
        .await;
    let spans = receiver
        .wait_until("a rollup run with its statements", |spans| {
            let runs: BTreeSet<&[u8]> = spans
                .iter()
                .filter(|s| s.name == "rollup.run")
                .map(|s| s.trace_id.as_slice())
                .collect();
            spans
                .iter()
                .any(|s| s.name == "SELECT advisory_lock" && runs.contains(s.trace_id.as_slice()))
                .then(|| spans.to_vec())
        })
        .await;
    let by_id: HashMap<&[u8], &Span> = spans.iter().map(|s| (s.span_id.as_slice(), s)).collect();

    // The RPC span: current RPC conventions.
    let rpc = spans
        .iter()
        .find(|s| s.name == "verdict.v1.SessionService/CreateSession" && s.trace_id == trace_id)
        .unwrap();
    assert_eq!(rpc.kind, SpanKind::Server as i32);
    assert_eq!(
        rpc.parent_span_id,
        hex(caller_span_hex),
        "child of the caller's span"
    );
    assert_eq!(text(rpc, "rpc.system.name"), "grpc");
    assert_eq!(
        text(rpc, "rpc.method"),
        "verdict.v1.SessionService/CreateSession"
    );
    assert_eq!(text(rpc, "rpc.response.status_code"), "OK");
    assert!(attr(rpc, "error.type").is_none());
    for old in ["rpc.system", "rpc.service", "rpc.grpc.status_code"] {
        assert!(attr(rpc, old).is_none(), "{old} is not emitted by default");
    }

    // Its statements: current database client conventions.
    let children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == trace_id && s.parent_span_id == rpc.span_id)
        .collect();
    let insert = children
        .iter()
        .find(|s| s.name == "INSERT sessions")
        .unwrap_or_else(|| panic!("no SQL span among {:?}", names(&children)));
    assert_eq!(insert.kind, SpanKind::Client as i32);
    assert_eq!(text(insert, "db.system.name"), "postgresql");
    assert_eq!(text(insert, "db.operation.name"), "INSERT");
    assert_eq!(text(insert, "db.collection.name"), "sessions");
    assert_eq!(text(insert, "db.query.summary"), "INSERT sessions");
    assert!(!text(insert, "db.namespace").is_empty());
    assert!(!text(insert, "server.address").is_empty());
    assert!(int(insert, "server.port") > 0);
    let sql = text(insert, "db.query.text");
    assert!(
        sql.contains("INSERT INTO sessions") && sql.contains("$2"),
        "{sql}"
    );
    assert_eq!(int(insert, "db.response.returned_rows"), 1);
    assert!(
        children.iter().any(|s| s.name == "db.pool.acquire"),
        "pool wait recorded: {:?}",
        names(&children)
    );

    // The ingest: one trace, every statement and pool wait inside it.
    let ingest_rpc = spans
        .iter()
        .find(|s| {
            s.name == "verdict.v1.DiscrepancyService/IngestDiscrepancies"
                && s.trace_id == ingest_trace
        })
        .unwrap();
    let in_ingest: Vec<&Span> = spans
        .iter()
        .filter(|s| s.trace_id == ingest_trace)
        .collect();
    for s in &in_ingest {
        assert_eq!(
            root(s, &by_id).span_id,
            ingest_rpc.span_id,
            "{} hangs under the ingest call",
            s.name
        );
    }
    let statements = in_ingest
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .count();
    assert!(
        statements >= 4,
        "the ingest's statements are in its trace: {:?}",
        names(&in_ingest)
    );
    assert!(in_ingest.iter().any(|s| s.name == "db.pool.acquire"));

    // Nothing anywhere is a statement or a pool wait without a call or a job
    // above it: every span without a parent (the root of its trace) is a
    // served call or a job run. (A span whose parent is still open, as in a
    // rollup run in progress, has a parent id: its parent just has not been
    // exported yet.)
    for s in spans.iter().filter(|s| s.parent_span_id.is_empty()) {
        assert!(
            s.kind == SpanKind::Server as i32 || JOB_ROOTS.contains(&s.name.as_str()),
            "{} ({:?}) is the root of a trace of its own",
            s.name,
            s.kind
        );
    }
    for s in &spans {
        let top = root(s, &by_id);
        if JOB_ROOTS.contains(&top.name.as_str()) {
            assert!(
                top.parent_span_id.is_empty(),
                "a job run is the root of its trace"
            );
        }
    }
    // One rollup run is one trace: its lock statement inside it, and the
    // lock is not a collection.
    let run = spans.iter().find(|s| s.name == "rollup.run").unwrap();
    let lock = spans
        .iter()
        .find(|s| s.name == "SELECT advisory_lock" && s.trace_id == run.trace_id)
        .unwrap();
    assert_eq!(root(lock, &by_id).span_id, run.span_id);
    assert!(
        attr(lock, "db.collection.name").is_none(),
        "a function is not a collection"
    );
    assert_eq!(
        spans
            .iter()
            .filter(|s| s.trace_id == run.trace_id && s.parent_span_id.is_empty())
            .count(),
        1,
        "one root per run"
    );

    // No noise on any span, and the process has an instance id.
    for s in &spans {
        for kv in &s.attributes {
            assert!(!is_noise(&kv.key), "{} carries {}", s.name, kv.key);
        }
    }
    let resources = receiver.resources.lock().unwrap().clone();
    let instance = resources[0]
        .get("service.instance.id")
        .expect("service.instance.id set");
    assert!(uuid::Uuid::parse_str(instance).is_ok(), "{instance}");

    // Parameter values never appear in any exported attribute.
    for span in &spans {
        for kv in &span.attributes {
            if let Some(otlp_receiver::Value::StringValue(s)) =
                kv.value.as_ref().and_then(|v| v.value.as_ref())
            {
                assert!(
                    !s.contains(secret_value),
                    "{} leaks a value in {}",
                    span.name,
                    kv.key
                );
            }
        }
    }

    // The metrics went out over OTLP with the conventions' names and
    // attributes, and /metrics carries the same names and labels.
    let expected: [(&str, &[&str]); 7] = [
        (
            "rpc.server.call.duration",
            &["rpc.system.name", "rpc.method", "rpc.response.status_code"],
        ),
        (
            "db.client.operation.duration",
            &["db.system.name", "db.operation.name", "db.collection.name"],
        ),
        (
            "db.client.connection.count",
            &[
                "db.client.connection.state",
                "db.client.connection.pool.name",
            ],
        ),
        (
            "db.client.connection.max",
            &["db.client.connection.pool.name"],
        ),
        (
            "db.client.connection.pending_requests",
            &["db.client.connection.pool.name"],
        ),
        (
            "db.client.connection.wait_time",
            &["db.client.connection.pool.name"],
        ),
        ("verdict.job.runs", &["job", "outcome"]),
    ];
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let notified = receiver.arrived.notified();
            let metrics = receiver.metrics.lock().unwrap().clone();
            if expected.iter().all(|(name, labels)| {
                metrics
                    .get(*name)
                    .is_some_and(|have| labels.iter().all(|l| have.contains(*l)))
            }) {
                return;
            }
            telemetry.flush();
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "metrics exported with their attributes: {:?}",
            receiver.metrics.lock().unwrap()
        )
    });
    let body = scrape(metrics_port, None).await;
    for (name, labels) in expected {
        let prom = prometheus_name(name);
        let labels: Vec<String> = labels
            .iter()
            .map(|l| format!("{}=", l.replace('.', "_")))
            .collect();
        assert!(
            body.lines()
                .filter(|l| l.starts_with(&prom))
                .any(|l| labels.iter().all(|label| l.contains(label.as_str()))),
            "{prom} with {labels:?} in /metrics: {body}"
        );
    }

    // Exemplars over OTLP: the CreateSession bucket of
    // rpc.server.call.duration leads to the call's span, and the INSERT
    // sessions bucket of db.client.operation.duration to a span of the
    // call's trace.
    let is_call = |(name, attrs): &Series| {
        name == "rpc.server.call.duration"
            && attrs.get("rpc.method").map(String::as_str)
                == Some("verdict.v1.SessionService/CreateSession")
    };
    let is_insert = |(name, attrs): &Series| {
        name == "db.client.operation.duration"
            && attrs.get("db.operation.name").map(String::as_str) == Some("INSERT")
            && attrs.get("db.collection.name").map(String::as_str) == Some("sessions")
    };
    let in_trace = |of: &dyn Fn(&Series) -> bool| -> Option<Exemplar> {
        receiver
            .exemplars
            .lock()
            .unwrap()
            .iter()
            .filter(|(series, _)| of(series))
            .flat_map(|(_, exemplars)| exemplars)
            .find(|e| e.trace_id == trace_id)
            .cloned()
    };
    let (call_exemplar, insert_exemplar) = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let notified = receiver.arrived.notified();
            if let (Some(call), Some(insert)) = (in_trace(&is_call), in_trace(&is_insert)) {
                return (call, insert);
            }
            telemetry.flush();
            notified.await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "exemplars in the call's trace: {:?}",
            receiver.exemplars.lock().unwrap()
        )
    });
    assert_eq!(call_exemplar.span_id, rpc.span_id, "the call's own span");
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == trace_id && s.span_id == insert_exemplar.span_id),
        "the statement's exemplar names a span of the call's trace"
    );
    for e in [&call_exemplar, &insert_exemplar] {
        assert!(e.time_unix_nano > 0);
        assert!(
            matches!(e.value, Some(otlp_receiver::ExemplarValue::AsDouble(v)) if v > 0.0),
            "{e:?}"
        );
    }

    let unsampled = hex(unsampled_hex);
    assert!(
        receiver
            .exemplars
            .lock()
            .unwrap()
            .values()
            .flatten()
            .all(|e| e.trace_id != unsampled),
        "no exemplar of an unsampled trace"
    );
    assert!(!spans.iter().any(|s| s.trace_id == unsampled));

    // Exemplars on /metrics: only in OpenMetrics, on the bucket the call
    // fell into, with the call's trace and span.
    let response = scrape(
        metrics_port,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    let (head, open_metrics) = split_response(&response);
    assert!(
        head.contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(open_metrics.ends_with("# EOF\n"), "{open_metrics}");
    let (bucket, exemplar) = open_metrics
        .lines()
        .filter(|l| {
            l.starts_with("rpc_server_call_duration_seconds_bucket{")
                && l.contains("rpc_method=\"verdict.v1.SessionService/CreateSession\"")
        })
        .find_map(|l| l.split_once(" # "))
        .unwrap_or_else(|| panic!("an exemplar on the CreateSession buckets: {open_metrics}"));
    let le: f64 = bucket
        .split("le=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .map(|le| {
            if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            }
        })
        .unwrap();
    let (labels, rest) = exemplar
        .strip_prefix('{')
        .and_then(|e| e.split_once("} "))
        .unwrap_or_else(|| panic!("OpenMetrics exemplar syntax: {exemplar}"));
    assert_eq!(
        labels,
        format!(
            "trace_id=\"{trace_id_hex}\",span_id=\"{}\"",
            to_hex(&rpc.span_id)
        )
    );
    let mut rest = rest.split(' ');
    let value: f64 = rest.next().unwrap().parse().unwrap();
    let at: f64 = rest.next().unwrap().parse().unwrap();
    assert!(value > 0.0 && value <= le, "{value} in the bucket le={le}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(at > now - 600.0 && at <= now, "exemplar time {at}");
    assert!(!open_metrics.contains(unsampled_hex));
    // Counters: the family name without _total in OpenMetrics.
    assert!(open_metrics.contains("# TYPE verdict_job_runs counter\n"));
    assert!(open_metrics.contains("\nverdict_job_runs_total{"));

    // The Prometheus text format has no exemplars and passes promtool.
    let (_, plain) = split_response(&body);
    assert!(!plain.contains(" # {"), "{plain}");
    promtool_check(plain);
    app.stop().await.unwrap();
}

/// What promtool's linter says of `db_client_connection_count`: the name the
/// OpenTelemetry-to-Prometheus translation gives the semantic conventions'
/// `db.client.connection.count` gauge, kept for the same names on OTLP and
/// Prometheus.
const ACCEPTED_LINT: &str = "db_client_connection_count non-histogram and non-summary metrics should not have \"_count\" suffix";

/// `promtool check metrics` parses `text` and finds nothing to lint but
/// [`ACCEPTED_LINT`] (when promtool is installed: deploy-check installs
/// it, from the Debian package prometheus).
fn promtool_check(text: &str) {
    use std::io::Write as _;
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool is not installed: the exposition is not linted");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let findings = String::from_utf8_lossy(&out.stdout);
    // Exit code 3: lint findings only (a parse error is 1).
    let only_accepted = out.status.code() == Some(3)
        && findings
            .lines()
            .filter(|l| !l.trim().is_empty())
            .all(|l| l.trim() == ACCEPTED_LINT);
    assert!(
        out.status.success() || only_accepted,
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The head and the body of an HTTP response.
fn split_response(response: &str) -> (&str, &str) {
    response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("an HTTP response: {response}"))
}

/// The Prometheus name of an OTLP metric, as the OpenTelemetry translation
/// forms it: dots to underscores, `_seconds` for a unit of seconds, `_total`
/// on counters.
fn prometheus_name(otlp: &str) -> String {
    let base = otlp.replace('.', "_");
    match otlp {
        "rpc.server.call.duration"
        | "db.client.operation.duration"
        | "db.client.connection.wait_time" => {
            format!("{base}_seconds_bucket")
        }
        "verdict.job.runs" => format!("{base}_total"),
        _ => base,
    }
}

async fn scrape(port: u16, accept: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let accept = accept.map_or_else(String::new, |a| format!("Accept: {a}\r\n"));
    stream
        .write_all(format!("GET /metrics HTTP/1.1\r\nhost: x\r\n{accept}\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

fn names(spans: &[&Span]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}
