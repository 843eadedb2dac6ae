//! `verdict-bench`: measures the gateway against PostgreSQL's own floor.
//!
//! Starts a private PostgreSQL (the embedded mechanism, in a temporary
//! folder) and a gateway in this process, then runs each workload twice in
//! the same run: through Verdict's gRPC API, and as the same SQL over direct
//! tokio-postgres connections. Prints throughput, latency percentiles and
//! process CPU per call side by side, with the ratio. Quote the ratios: the
//! absolute figures move with the machine's load.

use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;
use verdict::db::embedded::EmbeddedPostgres;
use verdict::discrepancies::sql::{COPY, COPY_TYPES};
use verdict::proto::discrepancy_service_client::DiscrepancyServiceClient;
use verdict::proto::metrics_service_client::MetricsServiceClient;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::{
    CreateSessionRequest, DiscrepancyInput, GetSessionRequest, IngestDiscrepanciesRequest,
    ListSessionsRequest, QueryTimeSeriesRequest, RecordDiscrepanciesRequest, Severity, TimeRange,
    get_session_request::Lookup,
};

/// Benchmarks of Verdict against direct tokio-postgres.
#[derive(Parser, Debug)]
struct Args {
    /// Rows ingested through IngestDiscrepancies (and by the direct COPY).
    #[arg(long, default_value_t = 1_000_000)]
    ingest_rows: usize,
    /// Seconds each timed workload runs per concurrency.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrencies of the request/response workloads.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Only these workloads (get, create, list, batch, series, ingest); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Instead of starting a gateway and a PostgreSQL: stream
    /// `--ingest-rows` rows through IngestDiscrepancies to the gateway at
    /// this address (e.g. `http://127.0.0.1:50051`) from this process, into
    /// `--session`, and print the rows per second (`scripts/ingest-vs-copy.sh`
    /// compares them with a COPY of the same rows from a separate process).
    #[arg(long, requires = "session")]
    gateway: Option<String>,
    /// The session the external ingest writes into (with `--gateway`).
    #[arg(long)]
    session: Option<String>,
    /// Rows per IngestDiscrepancies message (with `--gateway`).
    #[arg(long, default_value_t = 5000)]
    chunk: usize,
    /// The scale probe of issue 18 instead of the side-by-side workloads:
    /// `S` (1M discrepancies, 2M metric points, 20k coverage reports with 1M
    /// files) or `L` (five times that), loaded by SQL, then every dashboard
    /// read timed through the gRPC API (5 calls each, median).
    #[arg(long)]
    scale: Option<String>,
    /// With `--scale`: the database to load and measure (its schema is
    /// migrated by the gateway); without it a private embedded PostgreSQL.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// With `--scale` and `--database-url`: measure the rows already loaded
    /// by an earlier run instead of loading them again.
    #[arg(long)]
    skip_load: bool,
    /// With `--scale` and `--database-url`: load the rows and stop (no
    /// gateway in this process; the schema must be migrated already, e.g.
    /// by `verdict migrate` of the release being measured).
    #[arg(long, requires = "database_url", conflicts_with = "skip_load")]
    load_only: bool,
    /// With `--scale` and `--database-url`: time the calls against the
    /// gateway already serving that database at this address (e.g.
    /// `http://127.0.0.1:50051`, a release binary started by
    /// `scripts/scale.sh`) instead of one in this process.
    #[arg(long, requires = "database_url")]
    target: Option<String>,
    /// With `--scale`: also write the figures to this file, one line per
    /// call: name, median, min and max in ms (tab-separated).
    #[arg(long)]
    tsv: Option<std::path::PathBuf>,
}

/// `--gateway`: one IngestDiscrepancies stream of `rows` rows into
/// `session`, from this process; prints `rows seconds rows/s`.
async fn external_ingest(
    gateway: &str,
    session: &str,
    rows: usize,
    chunk: usize,
) -> anyhow::Result<()> {
    let channel = Endpoint::from_shared(gateway.to_owned())?.connect().await?;
    // `VERDICT_KEY`: the API key to send, when the gateway requires one.
    let auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        match std::env::var("VERDICT_KEY") {
            Ok(key) if !key.is_empty() => Some(format!("Bearer {key}").parse()?),
            _ => None,
        };
    let mut client =
        DiscrepancyServiceClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
            if let Some(value) = &auth {
                req.metadata_mut().insert("authorization", value.clone());
            }
            Ok(req)
        });
    let session = session.to_owned();
    let ingest_id = Uuid::new_v4().to_string();
    let chunk = chunk.max(1);
    let t = Instant::now();
    let chunks = futures::stream::iter((0..rows.div_ceil(chunk)).map(move |i| {
        IngestDiscrepanciesRequest {
            ingest_id: ingest_id.clone(),
            session_id: session.clone(),
            sequence: i as i64 + 1,
            items: (i * chunk..((i + 1) * chunk).min(rows))
                .map(discrepancy)
                .collect(),
        }
    }));
    let reply = client.ingest_discrepancies(chunks).await?.into_inner();
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        reply.committed_items as usize == rows,
        "the gateway committed {} of {rows} rows",
        reply.committed_items
    );
    println!("{rows} {secs:.3} {:.0}", rows as f64 / secs);
    Ok(())
}

/// What one side of a workload measured.
#[derive(Clone, Copy, Default)]
struct Figures {
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
    cpu_us_per_op: f64,
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Runs `op` from `concurrency` tasks for `seconds`; `op` gets (task, n).
async fn timed<F, Fut>(concurrency: usize, seconds: u64, op: F) -> Figures
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let cpu_before = cpu_time();
    let deadline = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    op(task, n).await;
                    latencies.push(t.elapsed().as_micros() as u64);
                    n += 1;
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("bench task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu_before).as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    Figures {
        per_second: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_us_per_op: cpu * 1e6 / all.len().max(1) as f64,
    }
}

fn print_header() {
    println!(
        "{:<26} {:>5} {:>13} {:>13} {:>6} {:>17} {:>17} {:>17}",
        "workload",
        "conc",
        "verdict /s",
        "direct /s",
        "ratio",
        "p50 ms v/d",
        "p99 ms v/d",
        "cpu us/op v/d"
    );
}

fn print_row(name: &str, conc: usize, v: Figures, d: Figures) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "{:<26} {:>5} {:>13.0} {:>13.0} {:>6.2} {:>8.2}/{:<8.2} {:>8.2}/{:<8.2} {:>8.0}/{:<8.0}",
        name,
        conc,
        v.per_second,
        d.per_second,
        v.per_second / d.per_second,
        ms(v.p50_us),
        ms(d.p50_us),
        ms(v.p99_us),
        ms(d.p99_us),
        v.cpu_us_per_op,
        d.cpu_us_per_op,
    );
}

async fn direct_client(pg: &EmbeddedPostgres) -> tokio_postgres::Client {
    let (c, conn) = pg
        .config("bench")
        .connect(tokio_postgres::NoTls)
        .await
        .expect("direct connection");
    tokio::spawn(conn);
    c
}

/// Each direct client with `statements` prepared on it once, as the gateway's
/// statement cache does.
async fn prepared(
    clients: &[Arc<tokio_postgres::Client>],
    statements: &[verdict::db::Stmt],
) -> Vec<(Arc<tokio_postgres::Client>, Vec<tokio_postgres::Statement>)> {
    let mut out = Vec::new();
    for c in clients {
        let mut stmts = Vec::new();
        for statement in statements {
            stmts.push(c.prepare(statement.sql).await.expect("prepare"));
        }
        out.push((c.clone(), stmts));
    }
    out
}

async fn direct_clients(pg: &EmbeddedPostgres, n: usize) -> Vec<Arc<tokio_postgres::Client>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Arc::new(direct_client(pg).await));
    }
    out
}

fn discrepancy(n: usize) -> DiscrepancyInput {
    DiscrepancyInput {
        result_id: String::new(),
        kind: ["precision", "rounding", "encoding"][n % 3].into(),
        severity: [Severity::High, Severity::Medium, Severity::Low][n % 3] as i32,
        description: format!("value differs in record {n}"),
        source_element: format!("PAYROLL.CALC-NET.{}", n % 997),
        target_element: format!("payroll.CalcNet.field{}", n % 997),
        recommendation: "use BigDecimal with HALF_EVEN rounding".into(),
        confidence: 0.9,
        fingerprint: String::new(),
    }
}

/// The same rows the gateway writes, by a direct binary COPY per transaction.
async fn direct_copy(
    client: &mut tokio_postgres::Client,
    (project, session): (Uuid, Uuid),
    from: usize,
    rows: usize,
) {
    let tx = client.transaction().await.expect("begin");
    let sink = tx.copy_in(COPY.sql).await.expect("copy in");
    let writer = BinaryCopyInWriter::new(sink, &COPY_TYPES);
    futures::pin_mut!(writer);
    let none_uuid: Option<Uuid> = None;
    let none_time: Option<chrono::DateTime<chrono::Utc>> = None;
    let none_text: Option<String> = None;
    let none_pos: Option<i32> = None;
    for n in from..from + rows {
        let d = discrepancy(n);
        let fp = verdict::discrepancies::fingerprint(&d.kind, &d.source_element, &d.target_element);
        let row: [&(dyn ToSql + Sync); 18] = [
            &project,
            &session,
            &Uuid::now_v7(),
            &none_uuid,
            &d.kind,
            &(d.severity as i16),
            &d.description,
            &d.source_element,
            &d.target_element,
            &d.recommendation,
            &d.confidence,
            &fp,
            &"open",
            &"",
            &"",
            &none_time,
            &none_text,
            &none_pos,
        ];
        writer.as_mut().write(&row).await.expect("copy row");
    }
    writer.finish().await.expect("copy finish");
    tx.commit().await.expect("commit");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(gateway), Some(session)) = (&args.gateway, &args.session) {
        return external_ingest(gateway, session, args.ingest_rows, args.chunk).await;
    }
    if let Some(scale) = &args.scale {
        return scale::run(scale::Options {
            scale: scale.clone(),
            database_url: args.database_url.clone(),
            skip_load: args.skip_load,
            load_only: args.load_only,
            target: args.target.clone(),
            tsv: args.tsv.clone(),
        })
        .await;
    }
    let wants = |w: &str| args.only.is_empty() || args.only.iter().any(|o| o == w);
    let dir = std::env::temp_dir().join(format!("verdict-bench-{}", std::process::id()));
    let mut pg = EmbeddedPostgres::start(&dir).await?;
    let (admin, conn) = pg.config("postgres").connect(tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(conn);
    admin.batch_execute("DROP DATABASE IF EXISTS bench").await?;
    admin.batch_execute("CREATE DATABASE bench").await?;
    drop(admin);
    let _ = driver.await;

    let mut config = verdict::config::Config::for_database(Some(pg.database_url("bench")));
    config.listen = "127.0.0.1:0".parse()?;
    config.log_filter = "warn".into();
    config.pool_size = 32;
    let app = verdict::Application::build(config).await?;
    let port = app.port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));
    let channels: Vec<Channel> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(
                Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
                    .connect()
                    .await?,
            );
        }
        v
    };
    // Wait until migrated (creating a session succeeds).
    let mut sessions = SessionServiceClient::new(channels[0].clone());
    let seed = loop {
        match sessions
            .create_session(CreateSessionRequest {
                request_id: "bench-seed".into(),
                source_technology: "cobol".into(),
                target_technology: "java".into(),
                validation_scope: "full".into(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => break r.into_inner().session.expect("session"),
            Err(s) if s.code() == tonic::Code::Unavailable => tokio::task::yield_now().await,
            Err(s) => anyhow::bail!("seed session: {s}"),
        }
    };
    let seed_id: Uuid = seed.id.parse()?;
    let max_conc = args.concurrency.iter().copied().max().unwrap_or(1);
    let direct = direct_clients(&pg, max_conc).await;
    // The seed session's project: direct COPYs write into it, as the gateway does.
    let seed_project: Uuid = direct[0]
        .query_one("SELECT project_id FROM sessions WHERE id = $1", &[&seed_id])
        .await?
        .get(0);
    // Enough sessions for list pages to be full.
    direct[0]
        .batch_execute(
            "INSERT INTO sessions (id, request_id, source_technology, target_technology, validation_scope, project_id)
             SELECT gen_random_uuid(), 'bench-fill-' || i, 'cobol', 'java', 'full',
                    (SELECT id FROM projects WHERE slug = 'default')
               FROM generate_series(1, 5000) i",
        )
        .await?;
    // The gateway's calls name no project: they work in `default`.
    let project: Uuid = direct[0]
        .query_one("SELECT id FROM projects WHERE slug = 'default'", &[])
        .await?
        .get(0);

    println!(
        "verdict-bench: gateway and load generator share this process; PostgreSQL is local (unix socket)"
    );
    print_header();

    if wants("get") {
        for &c in &args.concurrency {
            let chans = channels.clone();
            let id = seed.id.clone();
            let v = timed(c, args.seconds, move |task, _| {
                let mut client = SessionServiceClient::new(chans[task % chans.len()].clone());
                let id = id.clone();
                async move {
                    client
                        .get_session(GetSessionRequest {
                            lookup: Some(Lookup::Id(id)),
                            ..Default::default()
                        })
                        .await
                        .expect("get session");
                }
            })
            .await;
            let clients = direct.clone();
            let d = timed(c, args.seconds, move |task, _| {
                let client = clients[task].clone();
                async move {
                    let stmt = client
                        .prepare(verdict::sessions::sql::BY_ID.sql)
                        .await
                        .expect("prepare");
                    client
                        .query_opt(&stmt, &[&project, &seed_id])
                        .await
                        .expect("select");
                }
            })
            .await;
            print_row("GetSession", c, v, d);
        }
    }

    if wants("create") {
        for &c in &args.concurrency {
            let chans = channels.clone();
            let run = Uuid::new_v4().simple().to_string();
            let v = timed(c, args.seconds, move |task, n| {
                let mut client = SessionServiceClient::new(chans[task % chans.len()].clone());
                let request_id = format!("v-{run}-{task}-{n}");
                async move {
                    client
                        .create_session(CreateSessionRequest {
                            request_id,
                            source_technology: "cobol".into(),
                            target_technology: "java".into(),
                            validation_scope: "full".into(),
                            ..Default::default()
                        })
                        .await
                        .expect("create session");
                }
            })
            .await;
            let clients = Arc::new(
                prepared(
                    &direct,
                    &[verdict::sessions::sql::INSERT, verdict::audit::INSERT],
                )
                .await,
            );
            let run = Uuid::new_v4().simple().to_string();
            let d = timed(c, args.seconds, move |task, n| {
                let clients = clients.clone();
                let request_id = format!("d-{run}-{task}-{n}");
                async move {
                    // The same work as CreateSession: the insert and its audit
                    // row in one transaction.
                    let (client, stmts) = &clients[task];
                    let empty = serde_json::json!({});
                    let id = Uuid::now_v7();
                    client.batch_execute("BEGIN").await.expect("begin");
                    let stmt = &stmts[0];
                    client
                        .query_opt(
                            stmt,
                            &[
                                &id,
                                &request_id,
                                &"cobol",
                                &"java",
                                &"full",
                                &empty,
                                &empty,
                                &empty,
                                // A content digest's size (the gateway's is SHA-256).
                                &[0u8; 32].as_slice(),
                                &project,
                                // No labels.
                                &empty,
                            ],
                        )
                        .await
                        .expect("insert");
                    let none: Option<&str> = None;
                    let targets = vec![id.to_string()];
                    let stmt = &stmts[1];
                    client
                        .execute(
                            stmt,
                            &[
                                &none,
                                &"/verdict.v1.SessionService/CreateSession",
                                &targets,
                                &"created",
                                &none,
                                &project,
                            ],
                        )
                        .await
                        .expect("audit");
                    client.batch_execute("COMMIT").await.expect("commit");
                }
            })
            .await;
            print_row("CreateSession", c, v, d);
        }
    }

    if wants("list") {
        for &c in &args.concurrency {
            let chans = channels.clone();
            let v = timed(c, args.seconds, move |task, _| {
                let mut client = SessionServiceClient::new(chans[task % chans.len()].clone());
                async move {
                    let page = client
                        .list_sessions(ListSessionsRequest {
                            page_size: 50,
                            ..Default::default()
                        })
                        .await
                        .expect("list sessions")
                        .into_inner();
                    assert_eq!(page.sessions.len(), 50);
                }
            })
            .await;
            let clients = direct.clone();
            let d = timed(c, args.seconds, move |task, _| {
                let client = clients[task].clone();
                async move {
                    let stmt = client
                        .prepare(verdict::sessions::sql::LIST.sql)
                        .await
                        .expect("prepare");
                    let none_text: Option<&str> = None;
                    let none_texts: Option<Vec<&str>> = None;
                    let none_time: Option<chrono::DateTime<chrono::Utc>> = None;
                    let none_id: Option<Uuid> = None;
                    let none_json: Option<serde_json::Value> = None;
                    client
                        .query(
                            &stmt,
                            &[
                                &project,
                                &none_texts,
                                &none_text,
                                &none_text,
                                &none_text,
                                &none_time,
                                &none_time,
                                &none_time,
                                &none_id,
                                &51i64,
                                // No label filters.
                                &none_json,
                                &none_texts,
                                // The reply limit: the FULL view's byte cut.
                                &(4i64 * 1024 * 1024),
                            ],
                        )
                        .await
                        .expect("list");
                }
            })
            .await;
            print_row("ListSessions page 50", c, v, d);
        }
    }

    if wants("batch") {
        let items: Arc<Vec<DiscrepancyInput>> = Arc::new((0..1000).map(discrepancy).collect());
        for &c in &args.concurrency {
            let chans = channels.clone();
            let items = items.clone();
            let run = Uuid::new_v4().simple().to_string();
            let sid = seed.id.clone();
            let v = timed(c, args.seconds, move |task, n| {
                let mut client = DiscrepancyServiceClient::new(chans[task % chans.len()].clone());
                let req = RecordDiscrepanciesRequest {
                    session_id: sid.clone(),
                    batch_id: format!("{run}-{task}-{n}"),
                    items: items.as_ref().clone(),
                };
                async move {
                    client
                        .record_discrepancies(req)
                        .await
                        .expect("record discrepancies");
                }
            })
            .await;
            let mut own = Vec::new();
            for _ in 0..c {
                own.push(Arc::new(tokio::sync::Mutex::new(direct_client(&pg).await)));
            }
            let d = timed(c, args.seconds, move |task, _| {
                let client = own[task].clone();
                async move {
                    let mut client = client.lock().await;
                    direct_copy(&mut client, (seed_project, seed_id), 0, 1000).await;
                }
            })
            .await;
            print_row("RecordDiscrepancies x1000", c, v, d);
        }
    }

    if wants("series") {
        // 1,000,000 points over 10 days, then 10-day queries in hourly buckets.
        direct[0]
            .batch_execute(
                "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at)
                 SELECT (SELECT id FROM projects WHERE slug = 'default'), 'latency', (i % 1000) / 10.0, 'ms', jsonb_build_object('host', 'h' || (i % 4)),
                        TIMESTAMPTZ '2026-01-01' + (i * interval '864 milliseconds')
                 FROM generate_series(1, 1000000) i;
                 ANALYZE metric_points;",
            )
            .await?;
        // The gateway's calls name no project: they read `default`.
        let project: Uuid = direct[0]
            .query_one("SELECT id FROM projects WHERE slug = 'default'", &[])
            .await?
            .get(0);
        let from = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")?.to_utc();
        let to = from + chrono::Duration::days(10);
        let ts = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        };
        for &c in &args.concurrency {
            let chans = channels.clone();
            let v = timed(c, args.seconds, move |task, _| {
                let mut client = MetricsServiceClient::new(chans[task % chans.len()].clone());
                async move {
                    let reply = client
                        .query_time_series(QueryTimeSeriesRequest {
                            name: "latency".into(),
                            label_filter: [("host".to_string(), "h1".to_string())].into(),
                            range: Some(TimeRange {
                                start_time: Some(ts(from)),
                                end_time: Some(ts(to)),
                            }),
                            bucket_width: Some(prost_types::Duration {
                                seconds: 3600,
                                nanos: 0,
                            }),
                            calendar_bucket: 0,
                        })
                        .await
                        .expect("query time series")
                        .into_inner();
                    assert_eq!(reply.buckets.len(), 240);
                }
            })
            .await;
            let clients = Arc::new(prepared(&direct, &[verdict::metrics::sql::SERIES_FIXED]).await);
            let d = timed(c, args.seconds, move |task, _| {
                let clients = clients.clone();
                async move {
                    let (client, stmts) = &clients[task];
                    let stmt = &stmts[0];
                    let labels = serde_json::json!({"host": "h1"});
                    let rows = client
                        .query(
                            stmt,
                            &[&"latency", &from, &to, &3600.0f64, &labels, &project],
                        )
                        .await
                        .expect("series");
                    assert_eq!(rows.len(), 240);
                }
            })
            .await;
            print_row("QueryTimeSeries 1M pts", c, v, d);
        }
    }

    if wants("ingest") && args.ingest_rows > 0 {
        let rows = args.ingest_rows;
        let chunk = 5000;
        let mut client = DiscrepancyServiceClient::new(channels[1].clone());
        let sid = seed.id.clone();
        let ingest_id = Uuid::new_v4().to_string();
        let cpu0 = cpu_time();
        let t = Instant::now();
        let chunks = futures::stream::iter((0..rows.div_ceil(chunk)).map(move |i| {
            IngestDiscrepanciesRequest {
                ingest_id: ingest_id.clone(),
                session_id: sid.clone(),
                sequence: i as i64 + 1,
                items: (i * chunk..((i + 1) * chunk).min(rows))
                    .map(discrepancy)
                    .collect(),
            }
        }));
        let reply = client.ingest_discrepancies(chunks).await?.into_inner();
        assert_eq!(reply.committed_items as usize, rows);
        let v_secs = t.elapsed().as_secs_f64();
        let v_cpu = (cpu_time() - cpu0).as_secs_f64();

        let mut c = direct_client(&pg).await;
        let cpu0 = cpu_time();
        let t = Instant::now();
        let mut done = 0;
        while done < rows {
            let n = 10_000.min(rows - done);
            direct_copy(&mut c, (seed_project, seed_id), done, n).await;
            done += n;
        }
        let d_secs = t.elapsed().as_secs_f64();
        let d_cpu = (cpu_time() - cpu0).as_secs_f64();
        let fig = |secs: f64, cpu: f64| Figures {
            per_second: rows as f64 / secs,
            p50_us: 0,
            p99_us: 0,
            cpu_us_per_op: cpu * 1e6 / rows as f64,
        };
        print_row(
            "IngestDiscrepancies rows",
            1,
            fig(v_secs, v_cpu),
            fig(d_secs, d_cpu),
        );
        println!(
            "  ingest of {rows} rows: verdict {v_secs:.2} s (stream of {chunk}-item chunks, 10k-row commits), direct COPY {d_secs:.2} s (10k-row transactions)"
        );
    }

    let _ = stop_tx.send(());
    let _ = gateway.await;
    pg.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `--scale S|L`: the scale probe of issue 18.
mod scale {
    use std::future::Future;
    use std::time::{Duration, Instant};
    use tonic::transport::{Channel, Endpoint};
    use uuid::Uuid;
    use verdict::db::embedded::EmbeddedPostgres;
    use verdict::proto;
    use verdict::proto::admin_service_client::AdminServiceClient;
    use verdict::proto::coverage_service_client::CoverageServiceClient;
    use verdict::proto::discrepancy_service_client::DiscrepancyServiceClient;
    use verdict::proto::metrics_service_client::MetricsServiceClient;
    use verdict::proto::test_case_service_client::TestCaseServiceClient;

    /// Sessions at S (five times at L), spread over 90 days.
    const SESSIONS: i64 = 16_800;
    /// Discrepancies per session (1M at S).
    const PER_SESSION: i32 = 60;
    /// Metric points at S, of 20 names interleaved.
    const POINTS: i64 = 2_000_000;
    /// Coverage reports at S, 50 files each.
    const REPORTS: i64 = 20_000;
    /// Test executions at S (bench/scale/executions.sql).
    const EXECUTIONS: i64 = 1_000_000;
    /// Rows per loading statement.
    const CHUNK: i64 = 1_000_000;

    const SESSIONS_SQL: &str = "INSERT INTO sessions (project_id, id, request_id, source_technology, \
             target_technology, validation_scope, status, created_at, updated_at, started_at, completed_at) \
         SELECT $1, gen_random_uuid(), 'scale-' || g, \
                (ARRAY['cobol', 'pl1', 'rpg', 'natural'])[1 + g % 4], \
                (ARRAY['java', 'csharp', 'python'])[1 + (g / 4) % 3], 'full', st, t, t, \
                t + interval '1 minute', \
                CASE WHEN st IN ('completed', 'failed') THEN t + interval '10 minutes' END \
         FROM generate_series(0, $2::int8 - 1) g, \
              LATERAL (SELECT now() - make_interval(secs => (1 - g::float8 / $2::int8) * 90 * 86400) AS t, \
                              (ARRAY['completed', 'completed', 'completed', 'failed', 'processing'])[1 + g % 5] AS st) x";

    const DISCREPANCIES_SQL: &str = "INSERT INTO discrepancies (project_id, session_id, id, kind, severity, \
             description, source_element, target_element, confidence, fingerprint, resolution, created_at) \
         SELECT s.project_id, s.id, gen_random_uuid(), \
                (ARRAY['precision', 'rounding', 'encoding', 'truncation', 'null_handling', 'ordering'])[1 + (i + g) % 6], \
                (1 + (i * 7 + g) % 5)::int2, 'value differs in record ' || i, \
                'PAYROLL.CALC-NET.' || (i % 97), 'payroll.CalcNet.field' || (i % 97), 0.9, \
                md5((i % 97)::text || '/' || ((i + g) % 6)::text), \
                CASE WHEN (i + g) % 10 = 0 THEN 'resolved' WHEN (i + g) % 17 = 0 THEN 'acknowledged' ELSE 'open' END, \
                s.created_at + make_interval(secs => i * 5) \
         FROM generate_series($2::int8, $3::int8) g \
         JOIN sessions s ON s.project_id = $1 AND s.request_id = 'scale-' || g \
         CROSS JOIN generate_series(1, $4::int4) i";

    const POINTS_SQL: &str = "INSERT INTO metric_points (project_id, name, value, unit, labels, recorded_at) \
         SELECT $1, 'metric_' || (g % 20), ((g * 7919) % 10007)::float8 / 10, 'ms', \
                jsonb_build_object('env', (ARRAY['prod', 'staging', 'dev'])[1 + (g / 20) % 3], \
                                   'region', 'r' || ((g / 60) % 4)), \
                now() - make_interval(secs => (1 - g::float8 / $4::int8) * 90 * 86400) \
         FROM generate_series($2::int8, $3::int8) g";

    const REPORTS_SQL: &str = "INSERT INTO coverage_reports (project_id, id, commit_sha, branch, subsystem, \
             client_key, lines_covered, lines_total, branches_covered, branches_total, functions_covered, \
             functions_total, file_count, recorded_at) \
         SELECT $1, gen_random_uuid(), md5('c' || (g / 30)) || substr(md5('d' || (g / 30)), 1, 8), \
                (ARRAY['main', 'develop', 'release'])[1 + (g / 10) % 3], 'sub' || (g % 10), 'scale-' || g, \
                5000 + g % 5000, 10000, 500 + g % 500, 1000, 50 + g % 50, 100, 50, \
                now() - make_interval(secs => (1 - g::float8 / $2::int8) * 90 * 86400) \
         FROM generate_series(0, $2::int8 - 1) g";

    const FILES_SQL: &str = "INSERT INTO coverage_files (project_id, report_id, path, lines_covered, \
             lines_total, branches_covered, branches_total, functions_covered, functions_total) \
         SELECT r.project_id, r.id, 'src/module' || i || '/file.rs', 100 + i, 200, 10, 20, 1, 2 \
         FROM coverage_reports r CROSS JOIN generate_series(1, 50) i \
         WHERE r.project_id = $1 AND r.client_key LIKE 'scale-%'";

    /// `bench/scale/executions.sql` with its psql variables (`:project`,
    /// `:'project'`, `:rows`, `:days`, `:test_cases`) replaced by their values.
    fn substitute(text: &str, vars: &[(&str, String)]) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'outer: while let Some(at) = rest.find(':') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let prev_colon = out.ends_with(':');
            if !prev_colon && !after.starts_with(':') {
                for (name, value) in vars {
                    let quoted = format!("'{name}'");
                    if let Some(tail) = after.strip_prefix(quoted.as_str()) {
                        out.push('\'');
                        out.push_str(&value.replace('\'', "''"));
                        out.push('\'');
                        rest = tail;
                        continue 'outer;
                    }
                    if let Some(tail) = after.strip_prefix(name)
                        && !tail.starts_with(|c: char| c.is_alphanumeric() || c == '_')
                    {
                        out.push_str(value);
                        rest = tail;
                        continue 'outer;
                    }
                }
            }
            out.push(':');
            rest = after;
        }
        out.push_str(rest);
        out
    }

    /// Session settings of the loading connection: commits do not wait for
    /// the WAL flush (a crash loses at most the last commits of a bench
    /// load, never consistency) and index builds get memory and workers.
    const LOAD_SETTINGS: &str = "SET synchronous_commit = off; \
         SET maintenance_work_mem = '512MB'; \
         SET max_parallel_maintenance_workers = 2; \
         SET work_mem = '128MB'";

    /// Names the tables whose secondary indexes the next `DROP_INDEXES`
    /// drops (comma-separated), for this transaction only.
    const SET_TABLES: &str = "SELECT set_config('verdict_scale.tables', $1, true)";

    /// Saves the definitions (`pg_get_indexdef`) of the secondary indexes
    /// of the tables named by `SET_TABLES` in a temporary table and drops
    /// them, inside the loading transaction. Indexes that back a
    /// constraint (primary keys, unique constraints, the keys foreign keys
    /// point at) and unique indexes stay: the load checks them as the
    /// gateway would. `REBUILD_INDEXES` recreates the others from their
    /// saved definitions before the commit, so the schema measured is
    /// exactly the migrated one (a failed load rolls the drop back).
    const DROP_INDEXES: &str = "DO $$ \
         DECLARE r record; \
         BEGIN \
             CREATE TEMP TABLE verdict_scale_indexes ON COMMIT DROP AS \
             SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def \
             FROM pg_index i \
             WHERE i.indrelid = ANY (string_to_array(current_setting('verdict_scale.tables'), ',')::regclass[]) \
               AND NOT i.indisunique \
               AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid); \
             FOR r IN SELECT name FROM verdict_scale_indexes LOOP \
                 EXECUTE 'DROP INDEX ' || r.name; \
             END LOOP; \
         END $$";

    /// Recreates the indexes `DROP_INDEXES` dropped, from their saved
    /// definitions.
    const REBUILD_INDEXES: &str = "DO $$ \
         DECLARE r record; \
         BEGIN \
             FOR r IN SELECT def FROM verdict_scale_indexes LOOP \
                 EXECUTE r.def; \
             END LOOP; \
         END $$";

    /// The dropped indexes (name, definition).
    const DROPPED: &str = "SELECT name, def FROM verdict_scale_indexes ORDER BY name";

    /// The INSERT triggers of the named tables (comma-separated), but the
    /// internal ones of foreign keys.
    const INSERT_TRIGGERS: &str = "SELECT coalesce(array_agg(tgname::text ORDER BY tgname), '{}') \
         FROM pg_trigger \
         WHERE tgrelid = ANY (string_to_array($1, ',')::regclass[]) AND NOT tgisinternal \
           AND tgtype & 4 <> 0";

    /// Whether the loading role may skip triggers.
    const SUPERUSER: &str = "SELECT rolsuper FROM pg_roles WHERE rolname = current_user";

    /// Triggers and foreign-key checks off for this transaction.
    const REPLICA: &str = "SET LOCAL session_replication_role = replica";

    /// The counts of V27's triggers rebuilt from the stored discrepancies:
    /// the very backfill of migration V29.
    const DISCREPANCY_COUNTS: &str =
        include_str!("../../migrations/V29__discrepancy_counts_backfill.sql");

    /// Problems after a discrepancy load without triggers: rows whose
    /// session is missing, and rows the counts of V27 do not hold (per
    /// session, and per day), for each dimension.
    const VERIFY_DISCREPANCIES: &str = "SELECT \
         (SELECT count(*) FROM discrepancies d WHERE d.project_id = $1 AND NOT EXISTS \
             (SELECT 1 FROM sessions s WHERE s.project_id = d.project_id AND s.id = d.session_id)) \
         + (SELECT count(*) FROM (SELECT v.dimension, count(*) AS n \
               FROM discrepancies d CROSS JOIN (VALUES ('severity'), ('kind'), ('resolution')) v(dimension) \
               WHERE d.project_id = $1 GROUP BY 1) r \
             FULL JOIN (SELECT dimension, sum(n) AS n FROM discrepancy_session_counts \
                        WHERE project_id = $1 GROUP BY 1) c USING (dimension) \
             FULL JOIN (SELECT dimension, sum(n) AS n FROM discrepancy_day_counts \
                        WHERE project_id = $1 GROUP BY 1) k USING (dimension) \
             WHERE r.n IS DISTINCT FROM c.n OR r.n IS DISTINCT FROM k.n)";

    /// Problems after a coverage load without foreign-key checks: files of
    /// a missing report.
    const VERIFY_COVERAGE: &str = "SELECT count(*) FROM coverage_files f WHERE f.project_id = $1 \
         AND NOT EXISTS (SELECT 1 FROM coverage_reports r \
                         WHERE r.project_id = f.project_id AND r.id = f.report_id)";

    /// Problems after an execution load without foreign-key checks:
    /// executions of a missing test case or run.
    const VERIFY_EXECUTIONS: &str = "SELECT \
         (SELECT count(*) FROM test_executions e WHERE e.project_id = $1 AND NOT EXISTS \
             (SELECT 1 FROM test_cases t WHERE t.project_id = e.project_id AND t.id = e.test_case_id)) \
         + (SELECT count(*) FROM test_executions e WHERE e.project_id = $1 AND e.run_id IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM test_runs r WHERE r.id = e.run_id))";

    /// Problems after a metric load without foreign-key checks: none can
    /// be (the only reference is the project, checked when loading starts).
    const VERIFY_NOTHING: &str = "SELECT count(*) FROM projects WHERE id = $1 AND false";

    /// How one table is loaded.
    struct Bulk {
        /// The tables whose secondary indexes are dropped and rebuilt.
        indexed: &'static str,
        /// Every table the load writes (their INSERT triggers decide).
        written: &'static str,
        /// The INSERT triggers the load may skip: each has its table
        /// rebuilt afterwards (`recount_discrepancies`).
        known: &'static [&'static str],
        /// Rebuilds what the skipped triggers maintain: the counts of
        /// V27 (`DISCREPANCY_COUNTS`).
        recount_discrepancies: bool,
        /// Counts problems of the loaded rows (foreign keys, maintained
        /// counts); must be 0 before the commit.
        verify: Verify,
    }

    /// The check of a loaded table (one constant statement each).
    #[derive(Clone, Copy)]
    enum Verify {
        Nothing,
        Discrepancies,
        Coverage,
        Executions,
    }

    /// Problems of the rows `verify` checks.
    async fn problems(
        c: &tokio_postgres::Client,
        verify: Verify,
        project: Uuid,
    ) -> anyhow::Result<i64> {
        let row = match verify {
            Verify::Nothing => c.query_one(VERIFY_NOTHING, &[&project]).await?,
            Verify::Discrepancies => c.query_one(VERIFY_DISCREPANCIES, &[&project]).await?,
            Verify::Coverage => c.query_one(VERIFY_COVERAGE, &[&project]).await?,
            Verify::Executions => c.query_one(VERIFY_EXECUTIONS, &[&project]).await?,
        };
        Ok(row.get(0))
    }

    /// Opens the transaction of one table's load and drops the secondary
    /// indexes. When the role may, and every INSERT trigger of the written
    /// tables is one the load knows how to recompute, triggers and
    /// foreign-key checks are off for the transaction (the rows reference
    /// only rows the loader made, checked by `verify` before the commit);
    /// any other trigger (a newer schema's) keeps them all on. Returns
    /// whether they are off.
    async fn begin_bulk(c: &tokio_postgres::Client, bulk: &Bulk) -> anyhow::Result<bool> {
        let superuser: bool = c.query_one(SUPERUSER, &[]).await?.get(0);
        let triggers: Vec<String> = c.query_one(INSERT_TRIGGERS, &[&bulk.written]).await?.get(0);
        let replica = superuser && triggers.iter().all(|t| bulk.known.contains(&t.as_str()));
        c.batch_execute("BEGIN").await?;
        if replica {
            c.batch_execute(REPLICA).await?;
        } else {
            println!(
                "  {}: triggers and foreign keys stay on (superuser {superuser}, INSERT triggers {triggers:?})",
                bulk.indexed
            );
        }
        c.query_one(SET_TABLES, &[&bulk.indexed]).await?;
        c.batch_execute(DROP_INDEXES).await?;
        Ok(replica)
    }

    /// Recomputes what skipped triggers maintain, rebuilds the dropped
    /// indexes, verifies and commits; prints the times.
    async fn end_bulk(
        c: &tokio_postgres::Client,
        bulk: &Bulk,
        replica: bool,
        project: Uuid,
        what: &str,
        loaded: Instant,
    ) -> anyhow::Result<()> {
        let inserted = loaded.elapsed().as_secs_f64();
        let t = Instant::now();
        if replica && bulk.recount_discrepancies {
            // A migration of this repository (not request text).
            c.batch_execute(DISCREPANCY_COUNTS).await?;
        }
        let recomputed = t.elapsed().as_secs_f64();
        let dropped = c.query(DROPPED, &[]).await?;
        let t = Instant::now();
        c.batch_execute(REBUILD_INDEXES).await?;
        let rebuilt = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let problems = problems(c, bulk.verify, project).await?;
        let verified = t.elapsed().as_secs_f64();
        if problems != 0 {
            c.batch_execute("ROLLBACK").await?;
            anyhow::bail!("{what}: {problems} problems after the load (rolled back)");
        }
        let t = Instant::now();
        c.batch_execute("COMMIT").await?;
        let names: Vec<String> = dropped.iter().map(|r| r.get(0)).collect();
        println!(
            "  loaded {what}: rows {inserted:.1} s (triggers {}), recompute {recomputed:.1} s, {} indexes rebuilt {rebuilt:.1} s ({}), verified {verified:.1} s, commit {:.1} s, total {:.1} s",
            if replica { "off" } else { "on" },
            names.len(),
            names.join(" "),
            t.elapsed().as_secs_f64(),
            loaded.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// `bench/scale/executions.sql` as plain SQL: its psql commands (the
    /// defaults, and the `\gset` probes) left out, its variables filled in.
    /// The probe of the rollup table (V25) holds in every schema measured;
    /// the block under `\if :has_scope_rollup` (V35's tables) is kept only
    /// when `has_scope_rollup` (the schema of the gateway loading it).
    fn executions_sql(text: &str, project: Uuid, rows: i64, has_scope_rollup: bool) -> String {
        let mut open: Vec<bool> = Vec::new();
        let mut plain: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(cond) = line.strip_prefix("\\if ") {
                open.push(cond.trim() != ":has_scope_rollup" || has_scope_rollup);
            } else if line.starts_with("\\endif") {
                open.pop();
            } else if !line.starts_with('\\')
                && !line.ends_with("\\gset")
                && open.iter().all(|kept| *kept)
            {
                plain.push(line);
            }
        }
        let vars = [
            ("project", project.to_string()),
            ("rows", rows.to_string()),
            ("days", "90".to_owned()),
            ("test_cases", "2000".to_owned()),
        ];
        substitute(&plain.join("\n"), &vars)
    }

    /// The sessions (none of their rows reference another).
    async fn load_sessions(
        c: &tokio_postgres::Client,
        project: Uuid,
        factor: i64,
    ) -> anyhow::Result<()> {
        let sessions = SESSIONS * factor;
        if !c.query_one("SELECT EXISTS (SELECT 1 FROM sessions WHERE project_id = $1 AND request_id = 'scale-0')", &[&project])
            .await?
            .get::<_, bool>(0) {
            let t = Instant::now();
            let bulk = Bulk {
                indexed: "sessions",
                written: "sessions",
                known: &[],
                recount_discrepancies: false,
                verify: Verify::Nothing,
            };
            let replica = begin_bulk(c, &bulk).await?;
            c.execute(SESSIONS_SQL, &[&project, &sessions]).await?;
            end_bulk(c, &bulk, replica, project, &format!("{sessions} sessions"), t).await?;
        }
        Ok(())
    }

    /// The discrepancies of the loaded sessions, 60 each.
    async fn load_discrepancies(
        c: &tokio_postgres::Client,
        project: Uuid,
        factor: i64,
    ) -> anyhow::Result<()> {
        let sessions = SESSIONS * factor;
        if !c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM discrepancies d JOIN sessions s \
                 ON s.project_id = d.project_id AND s.id = d.session_id \
             WHERE d.project_id = $1 AND s.request_id LIKE 'scale-%')",
                &[&project],
            )
            .await?
            .get::<_, bool>(0)
        {
            let t = Instant::now();
            let bulk = Bulk {
                indexed: "discrepancies",
                written: "discrepancies,discrepancy_session_counts,discrepancy_day_counts",
                known: &["discrepancy_counts_insert"],
                recount_discrepancies: true,
                verify: Verify::Discrepancies,
            };
            let replica = begin_bulk(c, &bulk).await?;
            let per_chunk = CHUNK / i64::from(PER_SESSION);
            let mut lo = 0;
            while lo < sessions {
                let hi = (lo + per_chunk).min(sessions) - 1;
                c.execute(DISCREPANCIES_SQL, &[&project, &lo, &hi, &PER_SESSION])
                    .await?;
                lo = hi + 1;
            }
            end_bulk(
                c,
                &bulk,
                replica,
                project,
                &format!("{} discrepancies", sessions * i64::from(PER_SESSION)),
                t,
            )
            .await?;
        }
        Ok(())
    }

    /// The metric points.
    async fn load_points(
        c: &tokio_postgres::Client,
        project: Uuid,
        factor: i64,
    ) -> anyhow::Result<()> {
        let points = POINTS * factor;
        if !c.query_one("SELECT EXISTS (SELECT 1 FROM metric_points WHERE project_id = $1 AND name = 'metric_0')", &[&project])
            .await?
            .get::<_, bool>(0) {
            let t = Instant::now();
            let bulk = Bulk {
                indexed: "metric_points",
                written: "metric_points",
                known: &[],
                recount_discrepancies: false,
                verify: Verify::Nothing,
            };
            let replica = begin_bulk(c, &bulk).await?;
            let mut lo = 0;
            while lo < points {
                let hi = (lo + CHUNK).min(points) - 1;
                c.execute(POINTS_SQL, &[&project, &lo, &hi, &points])
                    .await?;
                lo = hi + 1;
            }
            end_bulk(c, &bulk, replica, project, &format!("{points} metric points"), t).await?;
        }
        Ok(())
    }

    /// The coverage reports and their files.
    async fn load_coverage(
        c: &tokio_postgres::Client,
        project: Uuid,
        factor: i64,
    ) -> anyhow::Result<()> {
        let reports = REPORTS * factor;
        if !c.query_one("SELECT EXISTS (SELECT 1 FROM coverage_reports WHERE project_id = $1 AND client_key LIKE 'scale-%')", &[&project])
            .await?
            .get::<_, bool>(0) {
            let t = Instant::now();
            let bulk = Bulk {
                indexed: "coverage_reports,coverage_files",
                written: "coverage_reports,coverage_files",
                known: &[],
                recount_discrepancies: false,
                verify: Verify::Coverage,
            };
            let replica = begin_bulk(c, &bulk).await?;
            c.execute(REPORTS_SQL, &[&project, &reports]).await?;
            c.execute(FILES_SQL, &[&project]).await?;
            end_bulk(
                c,
                &bulk,
                replica,
                project,
                &format!("{reports} coverage reports, {} files", reports * 50),
                t,
            )
            .await?;
        }
        Ok(())
    }

    /// The test cases, runs and executions (bench/scale/executions.sql).
    async fn load_executions(
        c: &tokio_postgres::Client,
        project: Uuid,
        factor: i64,
    ) -> anyhow::Result<()> {
        let executions = EXECUTIONS * factor;
        if !c.query_one("SELECT EXISTS (SELECT 1 FROM test_cases WHERE project_id = $1 AND key = 'scale-0')", &[&project])
            .await?
            .get::<_, bool>(0)
        {
            let file =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/scale/executions.sql");
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let has_scope_rollup: bool = c
                .query_one(
                    "SELECT to_regclass('test_execution_scope_days') IS NOT NULL",
                    &[],
                )
                .await?
                .get(0);
            let sql = executions_sql(&text, project, executions, has_scope_rollup);
            let t = Instant::now();
            // The file rebuilds the rollup (test_execution_days) itself.
            let bulk = Bulk {
                indexed: "test_runs,test_executions",
                written: "test_cases,test_runs,test_executions,test_execution_days",
                known: &[],
                recount_discrepancies: false,
                verify: Verify::Executions,
            };
            let replica = begin_bulk(c, &bulk).await?;
            // A file of this repository, run as written (not request text).
            c.batch_execute(&sql).await?;
            end_bulk(
                c,
                &bulk,
                replica,
                project,
                &format!(
                    "{executions} test executions (bench/scale/executions.sql, with the rollup)"
                ),
                t,
            )
            .await?;
        }
        Ok(())
    }

    /// A loading connection.
    async fn loader(url: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.batch_execute(LOAD_SETTINGS).await?;
        Ok(c)
    }

    /// Loads every table at `factor` (1 = S, 5 = L), on two connections at
    /// once (PostgreSQL runs a statement on one core): the sessions, then
    /// their discrepancies and the coverage on one, the executions and the
    /// metric points on the other. Each table is one transaction: its
    /// secondary indexes dropped, its rows inserted by a few `INSERT …
    /// SELECT generate_series` statements, what skipped triggers maintain
    /// recomputed, its indexes rebuilt, the rows verified, committed (see
    /// `begin_bulk`). A table that an earlier run loaded is skipped (an
    /// interrupted run resumes at the first table it did not commit).
    async fn load(url: &str, project: Uuid, factor: i64) -> anyhow::Result<()> {
        let (a, b) = (loader(url).await?, loader(url).await?);
        load_sessions(&a, project, factor).await?;
        let (left, right) = tokio::join!(
            async {
                load_discrepancies(&a, project, factor).await?;
                load_coverage(&a, project, factor).await
            },
            async {
                load_executions(&b, project, factor).await?;
                load_points(&b, project, factor).await
            }
        );
        left?;
        right?;
        let c = a;
        let t = Instant::now();
        c.batch_execute("VACUUM (ANALYZE)").await?;
        println!(
            "  VACUUM (ANALYZE) (visibility maps for index-only scans): {:.1} s",
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Median, min and max of the timed calls, in ms (or the error).
    struct Timing {
        name: String,
        result: Result<(f64, f64, f64), String>,
    }

    /// Calls `op` until 5 timed calls are done: one untimed call first, and
    /// when it was fast, 9 more untimed ones, so each of the 2 pooled
    /// connections has run the statement past PostgreSQL's 5 custom plans
    /// (when it chooses a generic plan, the timed calls get it).
    async fn time5<F, Fut, T>(name: &str, mut op: F) -> Timing
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let t = Instant::now();
        if let Err(s) = op().await {
            return Timing {
                name: name.into(),
                result: Err(format!("{:?}: {}", s.code(), s.message())),
            };
        }
        if t.elapsed() < Duration::from_millis(500) {
            for _ in 0..9 {
                let _ = op().await;
            }
        }
        let mut ms = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            if let Err(s) = op().await {
                return Timing {
                    name: name.into(),
                    result: Err(format!("{:?}: {}", s.code(), s.message())),
                };
            }
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        let timing = Timing {
            name: name.into(),
            result: Ok((ms[2], ms[0], ms[4])),
        };
        if let Ok((median, min, max)) = timing.result {
            eprintln!("  {name}: median {median:.1} ms (min {min:.1}, max {max:.1})");
        }
        timing
    }

    fn req<T>(message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(Duration::from_secs(300));
        r
    }

    fn ts(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        }
    }

    fn range(
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> proto::TimeRange {
        proto::TimeRange {
            start_time: Some(ts(from)),
            end_time: Some(ts(to)),
        }
    }

    async fn measure(
        channel: Channel,
        c: &tokio_postgres::Client,
        project: Uuid,
    ) -> anyhow::Result<Vec<Timing>> {
        let now = chrono::Utc::now();
        let days = chrono::Duration::days;
        let mut out = Vec::new();
        let disc = DiscrepancyServiceClient::new(channel.clone());
        let session: Uuid = c
            .query_one(
                "SELECT id FROM sessions WHERE project_id = $1 AND request_id = 'scale-1000'",
                &[&project],
            )
            .await?
            .get(0);
        out.push(
            time5("SummarizeDiscrepancies, one session", || {
                let mut disc = disc.clone();
                let r = req(proto::SummarizeDiscrepanciesRequest {
                    session_id: session.to_string(),
                    sessions_created: None,
                });
                async move { disc.summarize_discrepancies(r).await }
            })
            .await,
        );
        out.push(
            time5("SummarizeDiscrepancies, sessions of the last 30 d", || {
                let mut disc = disc.clone();
                let r = req(proto::SummarizeDiscrepanciesRequest {
                    session_id: String::new(),
                    sessions_created: Some(range(now - days(30), now)),
                });
                async move { disc.summarize_discrepancies(r).await }
            })
            .await,
        );
        let metrics = MetricsServiceClient::new(channel.clone());
        for (width, label) in [(3600, "1 h"), (86_400, "1 d")] {
            for filter in [false, true] {
                let name = format!(
                    "QueryTimeSeries, 90 d, {label} buckets, {}",
                    if filter {
                        "label filter env=prod"
                    } else {
                        "no label filter"
                    }
                );
                out.push(
                    time5(&name, || {
                        let mut metrics = metrics.clone();
                        let r = req(proto::QueryTimeSeriesRequest {
                            name: "metric_3".into(),
                            label_filter: if filter {
                                [("env".to_owned(), "prod".to_owned())].into()
                            } else {
                                Default::default()
                            },
                            range: Some(range(now - days(90), now)),
                            bucket_width: Some(prost_types::Duration {
                                seconds: width,
                                nanos: 0,
                            }),
                            calendar_bucket: 0,
                        });
                        async move { metrics.query_time_series(r).await }
                    })
                    .await,
                );
            }
        }
        let coverage = CoverageServiceClient::new(channel.clone());
        for (branch, subsystem, label) in [
            ("", "", "no filter"),
            ("main", "sub3", "one branch and subsystem"),
        ] {
            out.push(
                time5(&format!("GetCoverageTrend, 90 d, {label}"), || {
                    let mut coverage = coverage.clone();
                    let r = req(proto::GetCoverageTrendRequest {
                        branch: branch.into(),
                        subsystem: subsystem.into(),
                        interval: proto::TrendInterval::Daily as i32,
                        days: 90,
                        end_time: None,
                        ..Default::default()
                    });
                    async move { coverage.get_coverage_trend(r).await }
                })
                .await,
            );
            out.push(
                time5(&format!("GetAggregateCoverage, {label}"), || {
                    let mut coverage = coverage.clone();
                    let r = req(proto::GetAggregateCoverageRequest {
                        branch: branch.into(),
                        subsystem: subsystem.into(),
                        recorded: None,
                        latest_per_subsystem: false,
                        ..Default::default()
                    });
                    async move { coverage.get_aggregate_coverage(r).await }
                })
                .await,
            );
        }
        out.push(
            time5("GetTechnologyUsage, last 30 d", || {
                let mut metrics = metrics.clone();
                let r = req(proto::GetTechnologyUsageRequest {
                    range: Some(range(now - days(30), now)),
                });
                async move { metrics.get_technology_usage(r).await }
            })
            .await,
        );
        out.push(
            time5("ComputeRollups, full recompute, 91 days", || {
                let mut metrics = metrics.clone();
                let r = req(proto::ComputeRollupsRequest {
                    period: proto::RollupPeriod::Day as i32,
                    range: Some(range(now - days(91), now)),
                    full_recompute: true,
                });
                async move { metrics.compute_rollups(r).await }
            })
            .await,
        );
        let executions: i64 = c
            .query_one(
                "SELECT count(*) FROM (SELECT 1 FROM test_executions WHERE project_id = $1 LIMIT 1) x",
                &[&project],
            )
            .await?
            .get(0);
        if executions > 0 {
            let tests = TestCaseServiceClient::new(channel.clone());
            let (case, subsystem): (Uuid, String) = {
                let row = c
                    .query_one(
                        "SELECT t.id, t.target_subsystem FROM test_cases t \
                         WHERE t.project_id = $1 AND EXISTS (SELECT 1 FROM test_executions e \
                             WHERE e.project_id = $1 AND e.test_case_id = t.id) LIMIT 1",
                        &[&project],
                    )
                    .await?;
                (row.get(0), row.get(1))
            };
            let window = Some(range(now - days(30), now));
            out.push(
                time5("GetTestStatistics, one test case, 30 d", || {
                    let mut tests = tests.clone();
                    let r = req(proto::GetTestStatisticsRequest {
                        test_case_id: case.to_string(),
                        window,
                        ..Default::default()
                    });
                    async move { tests.get_test_statistics(r).await }
                })
                .await,
            );
            out.push(
                time5("GetTestStatistics, global, 30 d", || {
                    let mut tests = tests.clone();
                    let r = req(proto::GetTestStatisticsRequest {
                        window,
                        ..Default::default()
                    });
                    async move { tests.get_test_statistics(r).await }
                })
                .await,
            );
            out.push(
                time5("GetTestStatistics, per subsystem, 30 d", || {
                    let mut tests = tests.clone();
                    let r = req(proto::GetTestStatisticsRequest {
                        target_subsystem: subsystem.clone(),
                        window,
                        ..Default::default()
                    });
                    async move { tests.get_test_statistics(r).await }
                })
                .await,
            );
        }
        let admin = AdminServiceClient::new(channel);
        out.push(
            time5("GetStats exact (admin, scans)", || {
                let mut admin = admin.clone();
                let r = req(proto::GetStatsRequest {
                    exact: true,
                    all_projects: false,
                });
                async move { admin.get_stats(r).await }
            })
            .await,
        );
        out.push(
            time5("CheckIntegrity (admin, scans)", || {
                let mut admin = admin.clone();
                let r = req(proto::CheckIntegrityRequest {
                    repair: false,
                    stuck_after: None,
                });
                async move { admin.check_integrity(r).await }
            })
            .await,
        );
        out.push(
            time5("Cleanup dry run, older than 60 d (admin, scans)", || {
                let mut admin = admin.clone();
                let r = req(proto::CleanupRequest {
                    older_than: Some(prost_types::Duration {
                        seconds: 60 * 86_400,
                        nanos: 0,
                    }),
                    cutoff: None,
                    dry_run: true,
                    batch_size: 0,
                });
                async move { admin.cleanup(r).await }
            })
            .await,
        );
        Ok(out)
    }

    /// What `--scale` was asked to do.
    pub struct Options {
        /// `S` or `L`.
        pub scale: String,
        /// The database; `None`: a private embedded PostgreSQL.
        pub database_url: Option<String>,
        /// Measure only (the rows of an earlier run).
        pub skip_load: bool,
        /// Load only (no gateway, no calls).
        pub load_only: bool,
        /// A gateway already serving `database_url`.
        pub target: Option<String>,
        /// Where to write the figures as tab-separated lines.
        pub tsv: Option<std::path::PathBuf>,
    }

    /// The default project of the database (created by the migrations).
    async fn default_project(c: &tokio_postgres::Client) -> anyhow::Result<Uuid> {
        let row = c
            .query_opt("SELECT id FROM projects WHERE slug = 'default'", &[])
            .await?;
        row.map(|r| r.get(0))
            .ok_or_else(|| anyhow::anyhow!("no default project: migrate the database first"))
    }

    /// A channel to the gateway at `address`, once it answers (a gateway
    /// still migrating answers UNAVAILABLE or not at all).
    async fn ready_channel(address: String) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(address)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok(channel) = endpoint.connect().await {
                let mut probe = DiscrepancyServiceClient::new(channel.clone());
                let answer = probe
                    .summarize_discrepancies(req(proto::SummarizeDiscrepanciesRequest {
                        session_id: Uuid::nil().to_string(),
                        sessions_created: None,
                    }))
                    .await;
                match answer {
                    Err(s) if s.code() == tonic::Code::Unavailable => {}
                    _ => return Ok(channel),
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the gateway did not answer within 10 minutes"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Prints the figures as a markdown table (and writes them to `tsv`).
    fn report(
        scale: &str,
        timings: &[Timing],
        tsv: Option<&std::path::Path>,
    ) -> anyhow::Result<()> {
        println!("\n| call | {scale} median ms | min | max |\n| --- | --- | --- | --- |");
        let mut lines = String::new();
        for t in timings {
            match &t.result {
                Ok((median, min, max)) => {
                    println!("| {} | {median:.1} | {min:.1} | {max:.1} |", t.name);
                    lines.push_str(&format!("{}\t{median:.1}\t{min:.1}\t{max:.1}\n", t.name));
                }
                Err(e) => {
                    println!("| {} | error: {e} | | |", t.name);
                    lines.push_str(&format!("{}\terror: {e}\t\t\n", t.name));
                }
            }
        }
        if let Some(path) = tsv {
            std::fs::write(path, lines)?;
        }
        Ok(())
    }

    pub async fn run(o: Options) -> anyhow::Result<()> {
        let factor = match o.scale.as_str() {
            "S" | "s" => 1,
            "L" | "l" => 5,
            other => anyhow::bail!("--scale is S or L, not {other}"),
        };
        let scale = o.scale.to_uppercase();
        // An external database with --load-only or --target: no gateway in
        // this process (its migrations are not applied here either, so the
        // schema loaded and measured is the one of the release under test).
        if o.load_only || o.target.is_some() {
            let url = o
                .database_url
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--load-only and --target need --database-url"))?;
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let project = default_project(&c).await?;
            if !o.skip_load {
                println!("verdict-bench --scale {scale}: loading {url}");
                let t = Instant::now();
                load(&url, project, factor).await?;
                println!("  loaded in {:.0} s", t.elapsed().as_secs_f64());
            }
            if let Some(target) = o.target {
                let channel = ready_channel(target.clone()).await?;
                println!("verdict-bench --scale {scale}: measuring {target}");
                let timings = measure(channel, &c, project).await?;
                report(&scale, &timings, o.tsv.as_deref())?;
            }
            return Ok(());
        }
        let dir = std::env::temp_dir().join(format!("verdict-scale-{}", std::process::id()));
        let mut embedded = None;
        let url = match o.database_url {
            Some(url) => url,
            None => {
                let pg = EmbeddedPostgres::start(&dir).await?;
                let (admin, conn) = pg.config("postgres").connect(tokio_postgres::NoTls).await?;
                let driver = tokio::spawn(conn);
                admin.batch_execute("CREATE DATABASE scale").await?;
                drop(admin);
                let _ = driver.await;
                let url = pg.database_url("scale");
                embedded = Some(pg);
                url
            }
        };
        let mut config = verdict::config::Config::for_database(Some(url.clone()));
        config.listen = "127.0.0.1:0".parse()?;
        config.log_filter = "warn".into();
        config.pool_size = 2;
        config.max_statement_timeout_ms = 300_000;
        let app = verdict::Application::build(config).await?;
        let port = app.port();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let gateway = tokio::spawn(app.run_until(async {
            let _ = stop_rx.await;
        }));
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        // The gateway migrates before it serves: wait until it answers.
        let channel = ready_channel(format!("http://127.0.0.1:{port}")).await?;
        let project = default_project(&c).await?;
        println!("verdict-bench --scale {scale}: {url}");
        if !o.skip_load {
            let t = Instant::now();
            load(&url, project, factor).await?;
            println!("  loaded in {:.0} s", t.elapsed().as_secs_f64());
        }
        let timings = measure(channel, &c, project).await?;
        report(&scale, &timings, o.tsv.as_deref())?;
        let _ = stop_tx.send(());
        let _ = gateway.await;
        if let Some(mut pg) = embedded {
            pg.stop().await?;
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(())
    }
}
