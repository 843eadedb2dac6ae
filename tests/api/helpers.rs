#![allow(dead_code)] // shared by several test binaries, each using a part
//! Test harness: one PostgreSQL for the whole test run (the gateway's own
//! embedded mechanism in a temporary folder, or `TEST_DATABASE_URL`), a fresh
//! database per test, and a real gateway on 127.0.0.1:0 per test.

use std::time::Duration;
use tokio::sync::{OnceCell, oneshot};
use tokio_postgres::NoTls;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use verdict::Application;
use verdict::config::Config;
use verdict::db::embedded::EmbeddedPostgres;
use verdict::proto::admin_service_client::AdminServiceClient;
use verdict::proto::coverage_service_client::CoverageServiceClient;
use verdict::proto::discrepancy_service_client::DiscrepancyServiceClient;
use verdict::proto::metrics_service_client::MetricsServiceClient;
use verdict::proto::result_service_client::ResultServiceClient;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::test_case_service_client::TestCaseServiceClient;

/// Where test databases are created.
pub enum TestServer {
    /// A server given by `TEST_DATABASE_URL` (URL form).
    External(String),
    /// The run's own embedded server.
    Embedded(EmbeddedPostgres),
}

impl TestServer {
    /// Connection string of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        match self {
            TestServer::External(url) => {
                let (base, query) = url
                    .split_once('?')
                    .map_or((url.as_str(), ""), |(b, q)| (b, q));
                let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
                if query.is_empty() {
                    format!("{base}/{name}")
                } else {
                    format!("{base}/{name}?{query}")
                }
            }
            TestServer::Embedded(pg) => pg.database_url(name),
        }
    }
}

static SERVER: OnceCell<TestServer> = OnceCell::const_new();

/// The run's PostgreSQL, started on first use.
pub async fn test_server() -> &'static TestServer {
    SERVER
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
                return TestServer::External(url);
            }
            let dir = temp_pg_dir();
            let pg = EmbeddedPostgres::start(&dir)
                .await
                .expect("cannot start the test PostgreSQL");
            TestServer::Embedded(pg)
        })
        .await
}

/// A per-process folder for the run's PostgreSQL; folders of earlier runs
/// whose process is gone are removed.
pub fn temp_pg_dir() -> std::path::PathBuf {
    let base = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&base) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_prefix("verdict-test-pg-"))
                .and_then(|p| p.split('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            // SAFETY: signal 0 only checks the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    base.join(format!(
        "verdict-test-pg-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ))
}

/// Creates an empty database and returns its name and URL.
pub async fn create_database() -> (String, String) {
    let server = test_server().await;
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = admin_client(&server.url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create test database");
    (name.clone(), server.url(&name))
}

pub async fn admin_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to the test PostgreSQL");
    tokio::spawn(conn);
    client
}

/// A running gateway with clients and direct SQL access to its database.
pub struct TestApp {
    pub port: u16,
    pub channel: Channel,
    pub sessions: SessionServiceClient<Channel>,
    pub results: ResultServiceClient<Channel>,
    pub discrepancies: DiscrepancyServiceClient<Channel>,
    pub metrics: MetricsServiceClient<Channel>,
    pub admin: AdminServiceClient<Channel>,
    pub test_cases: TestCaseServiceClient<Channel>,
    pub coverage: CoverageServiceClient<Channel>,
    pub health: HealthClient<Channel>,
    /// The gateway's pool, to count connections calls took.
    pub db: verdict::db::Db,
    /// Connection settings of the gateway's database.
    pg: tokio_postgres::Config,
    /// The gateway's DATABASE_URL; empty on the embedded default.
    pub database_url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Settings of a test gateway on `database_url`.
pub fn test_config(database_url: &str) -> Config {
    let mut config = Config::for_database(Some(database_url.to_owned()));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.health_probe_interval_ms = 200;
    config.pool_size = 8;
    // Tests compute rollups when they mean to.
    config.rollup_interval_secs = 0;
    config
}

/// A gateway on a fresh database, SERVING.
pub async fn spawn_app() -> TestApp {
    let (_, url) = create_database().await;
    spawn_app_with(test_config(&url)).await
}

/// A gateway with the given settings; returns once it is SERVING.
pub async fn spawn_app_with(config: Config) -> TestApp {
    let app = start_app(config).await;
    app.wait_for_health("", ServingStatus::Serving).await;
    app
}

/// A gateway with the given settings, not yet waited for.
pub async fn start_app(config: Config) -> TestApp {
    let app = Application::build(config).await.expect("build the gateway");
    start(app).await
}

/// Runs a built gateway and waits until it is SERVING.
pub async fn adopt(app: Application) -> TestApp {
    let app = start(app).await;
    app.wait_for_health("", ServingStatus::Serving).await;
    app
}

async fn start(app: Application) -> TestApp {
    let port = app.port();
    let db = app.db();
    let pg = app.database_config().clone();
    let database_url = app.database_url().unwrap_or_default();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));
    let channel = connect(port).await;
    TestApp {
        port,
        sessions: SessionServiceClient::new(channel.clone()),
        results: ResultServiceClient::new(channel.clone()),
        discrepancies: DiscrepancyServiceClient::new(channel.clone()),
        metrics: MetricsServiceClient::new(channel.clone()),
        admin: AdminServiceClient::new(channel.clone()),
        test_cases: TestCaseServiceClient::new(channel.clone()),
        coverage: CoverageServiceClient::new(channel.clone()),
        health: HealthClient::new(channel.clone()),
        db,
        channel,
        pg,
        database_url,
        stop: Some(stop_tx),
        handle: Some(handle),
    }
}

pub async fn connect(port: u16) -> Channel {
    Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to the gateway")
}

impl TestApp {
    /// A direct connection to the gateway's database, to check stored rows.
    pub async fn sql(&self) -> tokio_postgres::Client {
        let (client, conn) = self
            .pg
            .connect(NoTls)
            .await
            .expect("connect to the gateway's database");
        tokio::spawn(conn);
        client
    }

    /// Waits (by the health Watch stream, no polling) until `service` has `status`.
    pub async fn wait_for_health(&self, service: &str, status: ServingStatus) {
        let mut health = self.health.clone();
        let mut stream = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health watch")
            .into_inner();
        let wait = async {
            while let Some(update) = stream.message().await.expect("health stream") {
                if update.status == status as i32 {
                    return;
                }
            }
            panic!("health stream ended before {status:?}");
        };
        tokio::time::timeout(Duration::from_secs(30), wait)
            .await
            .unwrap_or_else(|_| panic!("{service:?} did not become {status:?} within 30 s"));
    }

    pub async fn health_check(&self, service: &str) -> Result<HealthCheckResponse, tonic::Status> {
        self.health
            .clone()
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Stops the gateway gracefully and returns how its run ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.handle
            .take()
            .expect("running")
            .await
            .expect("join the gateway task")
    }

    /// Waits for the gateway's run to end by itself (e.g. a refused start).
    pub async fn outcome(mut self) -> anyhow::Result<()> {
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("the gateway did not stop within 30 s")
            .expect("join the gateway task")
    }
}

/// Field violations of an INVALID_ARGUMENT status, as (field, description).
pub fn violations(status: &tonic::Status) -> Vec<(String, String)> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    status
        .get_details_bad_request()
        .expect("INVALID_ARGUMENT carries a google.rpc.BadRequest")
        .field_violations
        .into_iter()
        .map(|v| (v.field, v.description))
        .collect()
}

/// The fields named by the violations of a status.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    violations(status).into_iter().map(|(f, _)| f).collect()
}

/// Settings of a test gateway on `database_url` that requires API keys
/// although it listens on loopback (`--require-auth`).
pub fn auth_config(database_url: &str) -> Config {
    let mut config = test_config(database_url);
    config.require_auth = true;
    config
}

/// Tokens of keys with each scope, and one with all three.
pub struct Keys {
    pub read: String,
    pub write: String,
    pub admin: String,
    pub all: String,
}

/// Creates a key as `verdict keys create` does; returns (id, token).
pub async fn create_key(config: &Config, name: &str, scopes: &str) -> (String, String) {
    create_project_key(config, name, scopes, None).await
}

/// A key bound to the project `project` (a slug), or to every project.
pub async fn create_project_key(
    config: &Config,
    name: &str,
    scopes: &str,
    project: Option<&str>,
) -> (String, String) {
    let scopes = verdict::auth::ScopeSet::parse_list(scopes).unwrap();
    let key = verdict::create_key(config, name, scopes, project)
        .await
        .expect("create a key");
    (key.id.to_string(), key.token)
}

/// A gateway requiring keys on a fresh database, with a key per scope.
pub async fn spawn_auth_app() -> (TestApp, Keys) {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let keys = Keys {
        read: create_key(&config, "reader", "read").await.1,
        write: create_key(&config, "writer", "write").await.1,
        admin: create_key(&config, "admin", "admin").await.1,
        all: create_key(&config, "root", "read,write,admin").await.1,
    };
    (spawn_app_with(config).await, keys)
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    request
}

/// Resolves once some ingest has committed through chunk `mark` (bounded:
/// at most 20 s), polling the marks table directly.
pub async fn until_ingest_committed(app: &TestApp, mark: i64) {
    let sql = app.sql().await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while sql
            .query_opt(
                "SELECT 1 FROM ingest_marks WHERE high_water_mark >= $1",
                &[&mark],
            )
            .await
            .unwrap()
            .is_none()
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first batch was committed");
}

/// Creates the project `slug` straight in the database (the ProjectService
/// has its own tests) and returns its id.
pub async fn create_project(app: &TestApp, slug: &str) -> uuid::Uuid {
    app.sql()
        .await
        .query_one(
            "INSERT INTO projects (slug, display_name) VALUES ($1, $1) RETURNING id",
            &[&slug],
        )
        .await
        .expect("insert a project")
        .get(0)
}

/// The id of the project `default`.
pub async fn default_project(app: &TestApp) -> uuid::Uuid {
    app.sql()
        .await
        .query_one("SELECT id FROM projects WHERE slug = 'default'", &[])
        .await
        .expect("the default project")
        .get(0)
}

/// `message` as a request in the project `slug` (`x-verdict-project`).
pub fn in_project<T>(message: T, slug: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        verdict::projects::HEADER,
        slug.parse().expect("an ascii slug"),
    );
    request
}

/// Adds `x-verdict-project: slug` to a request.
pub fn project<T>(mut request: tonic::Request<T>, slug: &str) -> tonic::Request<T> {
    request.metadata_mut().insert(
        verdict::projects::HEADER,
        slug.parse().expect("an ascii slug"),
    );
    request
}

/// Waits (at most 30 s) until a gateway backend waits on a row lock while
/// running a statement that matches `query_like` (a LIKE pattern).
pub async fn wait_for_lock_wait(observer: &tokio_postgres::Client, query_like: &str) {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock' \
                       AND query LIKE $1",
                    &[&query_like],
                )
                .await
                .unwrap()
                .get(0);
            if n >= 1 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!("a gateway backend waits on a lock running {query_like} within 30 s")
    });
}

/// Terminates the gateway backends waiting on a lock while running a
/// statement that matches `query_like`; asserts one was.
pub async fn terminate_lock_waiter(observer: &tokio_postgres::Client, query_like: &str) {
    let killed: Option<bool> = observer
        .query_one(
            "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'verdict' AND datname = current_database() AND wait_event_type = 'Lock' \
               AND query LIKE $1",
            &[&query_like],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        killed,
        Some(true),
        "a backend running {query_like} was terminated"
    );
}

/// A channel to a gateway process listening on 127.0.0.1:`port`, once its
/// overall health is SERVING; None when it is not within `within`.
pub async fn channel_when_serving(port: u16, within: Duration) -> Option<Channel> {
    tokio::time::timeout(within, async {
        loop {
            if let Ok(ch) = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
                .unwrap()
                .connect()
                .await
            {
                let mut health = HealthClient::new(ch.clone());
                if let Ok(r) = health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    && r.into_inner().status == ServingStatus::Serving as i32
                {
                    return ch;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .ok()
}

/// Every item of a list, page by page: `page(token)` asks for one page and
/// gives its items and next token. A page refused UNAVAILABLE (its backend
/// was just terminated) is asked for again; any other error fails the test.
pub async fn walk_pages<T, F, Fut>(mut page: F) -> Vec<T>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = match page(token.clone()).await {
            Ok(page) => page,
            Err(e) if e.code() == tonic::Code::Unavailable => continue,
            Err(e) => panic!("a page failed: {e:?}"),
        };
        seen.extend(items);
        if next.is_empty() {
            return seen;
        }
        token = next;
    }
}

/// Terminates every backend the gateway holds in the test's database.
pub async fn terminate_gateway_backends(sql: &tokio_postgres::Client) {
    sql.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'verdict' AND datname = current_database() \
           AND pid <> pg_backend_pid()",
        &[],
    )
    .await
    .unwrap();
}

/// GetSession of session `id`.
pub fn get_session_by_id(id: &str) -> verdict::proto::GetSessionRequest {
    verdict::proto::GetSessionRequest {
        lookup: Some(verdict::proto::get_session_request::Lookup::Id(id.into())),
        ..Default::default()
    }
}
