//! TLS and mutual TLS with certificates made in the test (rcgen), and
//! certificate reloads while the server keeps serving.

use crate::helpers::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use verdict::proto::ListSessionsRequest;
use verdict::proto::session_service_client::SessionServiceClient;

/// A certificate authority of the test (also used by `pg_tls`).
pub(crate) struct Ca {
    pub(crate) issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate PEM, key PEM) for these names.
    pub(crate) fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes the server's files and returns their paths.
fn write_server_files(dir: &Path, ca: &Ca) -> (PathBuf, PathBuf) {
    let (cert, key) = ca.issue(&["localhost", "127.0.0.1"]);
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    // Key first: a watcher that sees the new certificate sees its key too.
    std::fs::write(&key_path, key).unwrap();
    std::fs::write(&cert_path, cert).unwrap();
    (cert_path, key_path)
}

struct TlsApp {
    port: u16,
    tls: verdict::tls::TlsAcceptor,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_tls_app(config: verdict::config::Config) -> TlsApp {
    let app = verdict::Application::build(config).await.expect("build");
    let port = app.port();
    let tls = app.tls().expect("TLS is configured");
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until(async {
        let _ = stop_rx.await;
    }));
    TlsApp {
        port,
        tls,
        stop: Some(stop_tx),
        handle,
    }
}

impl TlsApp {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}

/// A TLS channel trusting `ca`, optionally presenting a client identity.
async fn tls_channel(
    port: u16,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether a call over a fresh TLS connection succeeds (waits for SERVING).
async fn serves(port: u16, ca_pem: &str, identity: Option<&(String, String)>) -> bool {
    let Ok(channel) = tls_channel(port, ca_pem, identity).await else {
        return false;
    };
    wait_serving(&channel).await
}

async fn wait_serving(channel: &Channel) -> bool {
    let mut health = HealthClient::new(channel.clone());
    let Ok(response) = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
    else {
        return false;
    };
    let mut stream = response.into_inner();
    let wait = async {
        while let Ok(Some(update)) = stream.message().await {
            if update.status == 1 {
                return true;
            }
        }
        false
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or(false)
}

#[tokio::test]
async fn tls_serves_trusting_clients_refuses_plaintext_and_reloads_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (Ca::new("ca one"), Ca::new("ca two"));
    let (cert, key) = write_server_files(dir.path(), &one);
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    // Reloads here are by hand and by file change, seen at once.
    config.tls_reload_interval_ms = 20;
    let app = start_tls_app(config).await;

    let old = tls_channel(app.port, &one.pem(), None)
        .await
        .expect("TLS handshake");
    assert!(wait_serving(&old).await);
    let mut sessions = SessionServiceClient::new(old.clone());
    sessions
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("a call over TLS");
    // A client trusting another CA, and a plaintext client, get nowhere.
    assert!(!serves(app.port, &two.pem(), None).await);
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{}", app.port))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(
            SessionServiceClient::new(plain)
                .list_sessions(ListSessionsRequest::default())
                .await
                .is_err()
        );
    }

    // New files signed by the second CA: the watcher reloads them.
    let mut reloads = app.tls.reloads();
    write_server_files(dir.path(), &two);
    tokio::time::timeout(Duration::from_secs(30), reloads.wait_for(|n| *n >= 1))
        .await
        .expect("the file change was noticed")
        .unwrap();
    assert!(serves(app.port, &two.pem(), None).await);
    assert!(!serves(app.port, &one.pem(), None).await);
    // The connection made before the reload still serves calls.
    sessions
        .list_sessions(ListSessionsRequest::default())
        .await
        .expect("an old connection survives the reload");

    // A broken file is refused and the current certificate stays.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    assert!(app.tls.reload().is_err());
    assert!(serves(app.port, &two.pem(), None).await);
    app.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let stranger_ca = Ca::new("stranger ca");
    let (cert, key) = write_server_files(dir.path(), &server_ca);
    let ca_path = dir.path().join("clients.pem");
    std::fs::write(&ca_path, client_ca.pem()).unwrap();
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.tls_cert = Some(cert);
    config.tls_key = Some(key);
    config.tls_client_ca = Some(ca_path);
    let app = start_tls_app(config).await;
    assert!(app.tls.is_mutual());

    let good = client_ca.issue(&["client-a"]);
    let stranger = stranger_ca.issue(&["client-b"]);
    assert!(serves(app.port, &server_ca.pem(), Some(&good)).await);
    assert!(!serves(app.port, &server_ca.pem(), None).await);
    assert!(!serves(app.port, &server_ca.pem(), Some(&stranger)).await);
    app.stop().await;
}

#[tokio::test]
async fn unusable_tls_files_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "garbage").unwrap();
    config.tls_cert = Some(bogus.clone());
    config.tls_key = Some(bogus);
    let err = verdict::Application::build(config)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("bogus.pem"), "{err:#}");
}
