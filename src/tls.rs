//! TLS for the gRPC server with rustls, terminated here (not by tonic) so
//! that certificates can be replaced while the server runs: each new
//! connection is accepted with the configuration current at that moment;
//! open connections keep theirs.
//!
//! `VERDICT_TLS_CERT` + `VERDICT_TLS_KEY` turn TLS on (plaintext is then
//! refused); `VERDICT_TLS_CLIENT_CA` also requires a client certificate
//! chaining to one of its CAs (mutual TLS). The files are read again on
//! SIGHUP and when their modification time or size changes; a reload that
//! fails (a half-written file) keeps the previous configuration.

use crate::config::Config;
use crate::server::incoming::Conn;
use anyhow::Context;
use futures::Stream;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

/// The server's TLS settings, replaceable at run time; cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: Arc<Inner>,
}

struct Inner {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    current: RwLock<Arc<ServerConfig>>,
    /// Counts successful reloads, for whoever waits for one.
    generation: tokio::sync::watch::Sender<u64>,
    /// (modified, length) of each file at the last load.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl TlsAcceptor {
    /// The acceptor of the configured files; `None` when TLS is not
    /// configured. Fails when the files cannot be used.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            return Ok(None);
        };
        Self::new(cert, key, config.tls_client_ca.as_deref()).map(Some)
    }

    pub fn new(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Self> {
        let paths = [Some(cert), Some(key), client_ca];
        let stamps = paths.iter().map(|p| p.and_then(stamp)).collect();
        let config = load(cert, key, client_ca)?;
        Ok(TlsAcceptor {
            inner: Arc::new(Inner {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: client_ca.map(Path::to_owned),
                current: RwLock::new(Arc::new(config)),
                generation: tokio::sync::watch::Sender::new(0),
                stamps: Mutex::new(stamps),
            }),
        })
    }

    /// Whether client certificates are required.
    pub fn is_mutual(&self) -> bool {
        self.inner.client_ca.is_some()
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.inner
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again; on success new connections use them, on
    /// failure the previous configuration stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let i = &self.inner;
        let stamps = self.file_stamps();
        let config = load(&i.cert, &i.key, i.client_ca.as_deref())?;
        *i.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        *i.stamps.lock().unwrap_or_else(|p| p.into_inner()) = stamps;
        i.generation.send_modify(|g| *g += 1);
        tracing::info!(cert = %i.cert.display(), "TLS certificates reloaded");
        Ok(())
    }

    /// Follows successful reloads: the value is how many there were.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    fn file_stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        let i = &self.inner;
        [
            Some(i.cert.as_path()),
            Some(i.key.as_path()),
            i.client_ca.as_deref(),
        ]
        .iter()
        .map(|p| p.and_then(stamp))
        .collect()
    }

    fn changed(&self) -> bool {
        let now = self.file_stamps();
        *self.inner.stamps.lock().unwrap_or_else(|p| p.into_inner()) != now
    }

    /// Reloads on SIGHUP and whenever a file changes (checked every
    /// `interval`). Runs until dropped.
    pub async fn watch(self, interval: Duration) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let by_signal = tokio::select! {
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => None } } => true,
                _ = tick.tick() => false,
            };
            if by_signal {
                tracing::info!("SIGHUP received: reloading TLS certificates");
            } else if !self.changed() {
                continue;
            }
            if let Err(e) = self.reload() {
                tracing::error!(error = %format!("{e:#}"), "TLS reload failed; keeping the previous certificates");
                // Do not retry the same broken files every tick.
                *self.inner.stamps.lock().unwrap_or_else(|p| p.into_inner()) = self.file_stamps();
            }
        }
    }

    /// TLS connections accepted on `listener` under `limits` (see
    /// [`crate::server::incoming`]): each handshake runs on a task of its
    /// own with the configuration current at accept, within the handshake
    /// deadline. Ends when the consumer drops the stream.
    pub fn incoming(
        self,
        listener: TcpListener,
        limits: crate::server::incoming::Limits,
    ) -> impl Stream<Item = std::io::Result<Conn<TlsStream<TcpStream>>>> + Send + 'static {
        crate::server::incoming::incoming(listener, limits, move |tcp| {
            let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
            async move { acceptor.accept(tcp).await }
        })
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read the TLS certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("cannot read a PEM private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version available")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("cannot read the client CA {}", ca.display()))?
            {
                let c = c.with_context(|| format!("{} is not PEM", ca.display()))?;
                roots.add(c).with_context(|| {
                    format!("a certificate of {} is not a valid CA", ca.display())
                })?;
            }
            if roots.is_empty() {
                anyhow::bail!("{} holds no CA certificate", ca.display());
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("cannot build the client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the TLS key does not match the certificate or is not supported")?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
