//! TLS between the gateway and PostgreSQL: a PostgreSQL of this module's own
//! with `ssl = on`, listening on 127.0.0.1 and refusing plaintext over TCP
//! (`hostnossl … reject`), its certificate made here with rcgen.

use crate::helpers::*;
use crate::sessions::create;
use crate::tls::Ca;
use rcgen::{CertificateParams, DnType, KeyPair};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio_postgres::NoTls;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use verdict::db::embedded::{EmbeddedPostgres, ServerOptions};
use verdict::proto::watch_session_response::Event;
use verdict::proto::{AppendSessionLogRequest, ListSessionsRequest, LogLevel, WatchSessionRequest};

/// How long a gateway that must not become SERVING is watched.
const NEVER_SERVING_WINDOW: Duration = Duration::from_secs(3);

/// The database that insists on a client certificate (`clientcert=verify-full`).
const MTLS_DATABASE: &str = "mtls";

struct TlsPostgres {
    pg: EmbeddedPostgres,
    port: u16,
    /// The CA that signed the server's certificate (for `localhost` only).
    ca: PathBuf,
    /// A CA that signed nothing of this server.
    wrong_ca: PathBuf,
    /// A client certificate and key the server accepts (CN = the user).
    client_cert: PathBuf,
    client_key: PathBuf,
}

static SERVER: OnceCell<TlsPostgres> = OnceCell::const_new();

async fn tls_postgres() -> &'static TlsPostgres {
    SERVER
        .get_or_init(|| async {
            let dir = temp_pg_dir();
            std::fs::create_dir_all(&dir).unwrap();
            let dir = dir.canonicalize().unwrap();
            let server_ca = Ca::new("pg server ca");
            let client_ca = Ca::new("pg client ca");
            let (cert, key) = server_ca.issue(&["localhost"]);
            let hba = format!(
                "local all all trust\n\
                 hostssl {MTLS_DATABASE} all 127.0.0.1/32 trust clientcert=verify-full\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostnossl all all 127.0.0.1/32 reject\n"
            );
            let path = |name: &str| dir.join(name).display().to_string();
            let options = ServerOptions {
                tcp: true,
                files: vec![
                    ("server.pem".into(), cert.into_bytes()),
                    ("server.key".into(), key.into_bytes()),
                    ("client-ca.pem".into(), client_ca.pem().into_bytes()),
                    ("hba.conf".into(), hba.into_bytes()),
                ],
                settings: vec![
                    ("ssl".into(), "on".into()),
                    ("ssl_cert_file".into(), path("server.pem")),
                    ("ssl_key_file".into(), path("server.key")),
                    ("ssl_ca_file".into(), path("client-ca.pem")),
                    ("hba_file".into(), path("hba.conf")),
                ],
            };
            let pg = EmbeddedPostgres::start_with(&dir, options)
                .await
                .expect("cannot start the TLS test PostgreSQL");
            let port = pg.tcp_port().expect("listens on TCP");

            // Files the gateway reads (the test runs as root or as the
            // folder's owner, so it can read them in the private folder).
            let write = |name: &str, text: String| {
                let p = pg.dir().join(name);
                std::fs::write(&p, text).unwrap();
                p
            };
            let ca = write("ca.pem", server_ca.pem());
            let wrong_ca = write("wrong-ca.pem", Ca::new("stranger ca").pem());
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, verdict::db::embedded::USER);
            let client_key_pair = KeyPair::generate().unwrap();
            let client = params
                .signed_by(&client_key_pair, &client_ca.issuer)
                .unwrap();
            let client_cert = write("client.pem", client.pem());
            let client_key = write("client.key", client_key_pair.serialize_pem());

            let admin = admin(&pg).await;
            admin
                .batch_execute(&format!("CREATE DATABASE {MTLS_DATABASE}"))
                .await
                .unwrap();
            TlsPostgres {
                pg,
                port,
                ca,
                wrong_ca,
                client_cert,
                client_key,
            }
        })
        .await
}

/// A superuser connection over the unix socket (no TLS there).
async fn admin(pg: &EmbeddedPostgres) -> tokio_postgres::Client {
    let (client, conn) = pg.config("postgres").connect(NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// A fresh database on the TLS server; returns its name.
async fn tls_database(server: &TlsPostgres) -> String {
    let name = format!("t_{}", uuid::Uuid::new_v4().simple());
    admin(&server.pg)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    name
}

/// Asserts the gateway says NOT_SERVING and does not turn SERVING within
/// the window (watched on the health stream, no polling).
async fn assert_never_serves(app: &TestApp) {
    let mut stream = app
        .health
        .clone()
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health watch")
        .into_inner();
    let first = stream
        .message()
        .await
        .expect("health stream")
        .expect("a first status");
    assert_eq!(first.status, ServingStatus::NotServing as i32);
    let serving = tokio::time::timeout(NEVER_SERVING_WINDOW, async {
        while let Ok(Some(update)) = stream.message().await {
            if update.status == ServingStatus::Serving as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        !matches!(serving, Ok(true)),
        "the gateway became SERVING over a connection it must refuse"
    );
}

/// The gateway's connections to `database` as (ssl, last query).
async fn gateway_connections(server: &TlsPostgres, database: &str) -> Vec<(bool, String)> {
    admin(&server.pg)
        .await
        .query(
            "SELECT s.ssl, a.query FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = $1 AND a.application_name = 'verdict'",
            &[&database],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn sslmode_require_encrypts_every_connection_of_the_gateway() {
    let server = tls_postgres().await;
    let database = tls_database(server).await;
    let url = format!(
        "postgres://verdict@127.0.0.1:{}/{database}?sslmode=require",
        server.port
    );
    let config = test_config(&url);
    // A one-shot command (it migrates first) over TLS.
    create_key(&config, "over tls", "read").await;

    let app = spawn_app_with(config).await;
    app.sessions
        .clone()
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("a call over a TLS pool connection");
    // A change reaches a watcher: the LISTEN connection is up.
    let session = create(&app, "tls-watched").await;
    let mut stream = app
        .sessions
        .clone()
        .watch_session(WatchSessionRequest {
            id: session.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let next = async |stream: &mut tonic::Streaming<_>| {
        tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("no watch event within 10 s")
            .expect("watch stream")
            .and_then(|m: verdict::proto::WatchSessionResponse| m.event)
    };
    assert!(matches!(next(&mut stream).await, Some(Event::Session(_))));
    app.sessions
        .clone()
        .append_session_log(AppendSessionLogRequest {
            session_id: session.id.clone(),
            level: LogLevel::Info as i32,
            message: "over tls".into(),
            fields: None,
        })
        .await
        .unwrap();
    assert!(matches!(
        next(&mut stream).await,
        Some(Event::LogEntry(e)) if e.message == "over tls"
    ));
    // Concurrent reads by key share a connection, and a Sync, over TLS.
    let (batched_before, _) = verdict::observability::batched_reads();
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let mut client = app.sessions.clone();
            let id = session.id.clone();
            async move { client.get_session(get_session_by_id(&id)).await }
        })
        .collect();
    for read in futures::future::join_all(reads).await {
        assert_eq!(read.unwrap().into_inner().session.unwrap().id, session.id);
    }
    let (batched_after, _) = verdict::observability::batched_reads();
    assert!(batched_after > batched_before, "reads were batched");

    let connections = gateway_connections(server, &database).await;
    assert!(
        connections.len() >= 3,
        "pool, health probe and listener: {connections:?}"
    );
    assert!(
        connections.iter().all(|(ssl, _)| *ssl),
        "every gateway connection is encrypted: {connections:?}"
    );
    assert!(
        connections
            .iter()
            .any(|(_, query)| query.starts_with("LISTEN")),
        "the listener is among them: {connections:?}"
    );
    drop(stream);
    app.stop().await.unwrap();
}

#[tokio::test]
async fn verify_full_checks_the_ca_and_the_host_name_and_verify_ca_only_the_ca() {
    let server = tls_postgres().await;
    let database = tls_database(server).await;
    // URL form, the name in the certificate: served.
    let full = format!(
        "postgres://verdict@localhost:{}/{database}?sslmode=verify-full&sslrootcert={}",
        server.port,
        server.ca.display()
    );
    let app = spawn_app_with(test_config(&full)).await;
    app.sessions
        .clone()
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("a call over verified TLS");
    assert!(
        gateway_connections(server, &database)
            .await
            .iter()
            .all(|(ssl, _)| *ssl)
    );
    app.stop().await.unwrap();

    // Key/value form, by address: the certificate does not name 127.0.0.1,
    // which verify-ca does not mind …
    let by_address = |mode: &str| {
        format!(
            "host=127.0.0.1 port={} user=verdict dbname={database} sslmode={mode} sslrootcert='{}'",
            server.port,
            server.ca.display()
        )
    };
    let app = spawn_app_with(test_config(&by_address("verify-ca"))).await;
    app.stop().await.unwrap();

    // … and verify-full does.
    let config = test_config(&by_address("verify-full"));
    let err = verdict::migrate_command(&config, true)
        .await
        .expect_err("the host name does not match");
    assert!(
        format!("{err:#}").contains("the server's certificate does not name the host"),
        "{err:#}"
    );
    let app = start_app(config).await;
    assert_never_serves(&app).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn verify_full_with_a_wrong_ca_never_serves_and_plaintext_is_refused_by_the_server() {
    let server = tls_postgres().await;
    let database = tls_database(server).await;
    let wrong = test_config(&format!(
        "postgres://verdict@localhost:{}/{database}?sslmode=verify-full&sslrootcert={}",
        server.port,
        server.wrong_ca.display()
    ));
    let err = verdict::migrate_command(&wrong, true)
        .await
        .expect_err("the CA does not match");
    assert!(
        format!("{err:#}").contains(&format!(
            "sslmode=verify-full: the server's certificate is not signed by a CA in sslrootcert {}",
            server.wrong_ca.display()
        )),
        "{err:#}"
    );
    let plain_url = format!(
        "postgres://verdict@127.0.0.1:{}/{database}?sslmode=disable",
        server.port
    );
    let (wrong_app, plain_app) = tokio::join!(start_app(wrong), start_app(test_config(&plain_url)));
    tokio::join!(
        assert_never_serves(&wrong_app),
        assert_never_serves(&plain_app)
    );
    // The calls are refused while the gateway is not connected.
    let status = wrong_app
        .sessions
        .clone()
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect_err("not connected");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    wrong_app.stop().await.unwrap();
    plain_app.stop().await.unwrap();

    // Plaintext is the server's refusal, not a client-side failure.
    let err = tokio_postgres::connect(&plain_url, NoTls)
        .await
        .err()
        .expect("plaintext refused");
    let db = err.as_db_error().expect("refused by the server");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
    );
    assert!(db.message().contains("no encryption"), "{}", db.message());
    assert!(
        gateway_connections(server, &database).await.is_empty(),
        "no gateway connection got in"
    );
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_configured() {
    let server = tls_postgres().await;
    let url = |identity: &str| {
        format!(
            "host=localhost port={} user=verdict dbname={MTLS_DATABASE} sslmode=verify-full sslrootcert={}{identity}",
            server.port,
            server.ca.display()
        )
    };
    let without = test_config(&url(""));
    let err = verdict::migrate_command(&without, true)
        .await
        .expect_err("the server wants a client certificate");
    assert!(format!("{err:#}").contains("certificate"), "{err:#}");
    let with = test_config(&url(&format!(
        " sslcert={} sslkey={}",
        server.client_cert.display(),
        server.client_key.display()
    )));
    let app = spawn_app_with(with).await;
    app.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreadable_sslrootcert_refuses_to_start() {
    let config = test_config(
        "postgres://verdict@localhost:1/verdict?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    let err = verdict::Application::build(config)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        format!("{err:#}"),
        "DATABASE_URL: sslrootcert /nonexistent/ca.pem cannot be read: No such file or directory (os error 2)"
    );
}
