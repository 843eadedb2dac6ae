//! TLS to PostgreSQL with rustls: the one place that turns the TLS wishes of
//! a `DATABASE_URL` into the connector every connection of the gateway uses
//! (pool, migrations, LISTEN, health probe, one-shot commands).
//!
//! `sslmode` follows libpq:
//!
//! | sslmode       | encrypted            | server certificate checked          |
//! |---------------|----------------------|-------------------------------------|
//! | `disable`     | no                   | —                                   |
//! | `prefer`      | if the server offers | no                                  |
//! | `require`     | yes                  | no (as `verify-ca` with sslrootcert) |
//! | `verify-ca`   | yes                  | chain to `sslrootcert`              |
//! | `verify-full` | yes                  | chain to `sslrootcert` + host name  |
//!
//! `prefer` is the default, as in libpq. `sslrootcert=<file>` names the PEM
//! CA certificate(s) to trust; `sslrootcert=system` trusts the operating
//! system's roots; unset, `~/.postgresql/root.crt` is used when it exists
//! (libpq's default) and verification is otherwise refused at start-up.
//! `sslcert` + `sslkey` present a client certificate. Unix-socket hosts
//! never use TLS (PostgreSQL does not offer it there; libpq ignores
//! `sslmode` for them too).
//!
//! tokio-postgres 0.7 only knows `disable`/`prefer`/`require`, so the TLS
//! parameters are taken out of the string here before the rest is handed to
//! [`tokio_postgres::Config`].

use anyhow::{Context, anyhow, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres_rustls::MakeRustlsConnect;

/// A connection to PostgreSQL as the gateway makes it (maybe TLS).
pub type PgConnection = tokio_postgres::Connection<
    tokio_postgres::Socket,
    <MakeRustlsConnect as MakeTlsConnect<tokio_postgres::Socket>>::Stream,
>;

/// libpq's `sslmode` values the gateway supports (`allow` is not one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(value: &str) -> anyhow::Result<SslMode> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => bail!(
                "DATABASE_URL: sslmode={other} is not supported; use disable, prefer, require, verify-ca or verify-full"
            ),
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the server's certificate is checked against trusted roots.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }

    /// What tokio-postgres is told: whether to ask for TLS, and whether
    /// to insist. Verification is the connector's business.
    fn wire(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Wire;
        match self {
            SslMode::Disable => Wire::Disable,
            SslMode::Prefer => Wire::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Wire::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Roots {
    None,
    File(PathBuf),
    System,
}

/// The TLS side of the connection settings: the mode and the rustls
/// connector that implements it. Cheap to clone.
#[derive(Clone)]
pub struct PgTls {
    mode: SslMode,
    roots: Roots,
    connector: MakeRustlsConnect,
}

impl fmt::Debug for PgTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTls")
            .field("mode", &self.mode)
            .field("roots", &self.roots)
            .finish()
    }
}

/// The TLS parameters taken out of a connection string.
#[derive(Debug, Default, PartialEq, Eq)]
struct Wishes {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl Wishes {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.sslmode),
            "sslrootcert" => Some(&mut self.sslrootcert),
            "sslcert" => Some(&mut self.sslcert),
            "sslkey" => Some(&mut self.sslkey),
            _ => None,
        }
    }
}

impl PgTls {
    /// TLS for `mode` with the given files (paths as in the URL).
    pub fn new(
        mode: SslMode,
        sslrootcert: Option<&str>,
        client_identity: Option<(&str, &str)>,
    ) -> anyhow::Result<PgTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match sslrootcert {
            Some("system") => Roots::System,
            Some(path) => Roots::File(PathBuf::from(path)),
            None if mode.verifies() => match default_root_file() {
                Some(path) => Roots::File(path),
                None => bail!(
                    "DATABASE_URL: sslmode={mode} needs the CA certificate(s) to trust: add sslrootcert=/path/to/ca.pem (or sslrootcert=system for the system's trusted roots)"
                ),
            },
            None => Roots::None,
        };
        // libpq: with a root certificate, `require` behaves as `verify-ca`.
        let mode = if mode == SslMode::Require && roots != Roots::None {
            SslMode::VerifyCa
        } else {
            mode
        };
        let store = match &roots {
            Roots::None => None,
            Roots::File(path) => Some(load_roots(path)?),
            Roots::System => Some(system_roots()?),
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("the TLS provider offers no safe protocol version")?;
        let builder = match (mode, store) {
            (SslMode::VerifyFull, Some(store)) => builder.with_root_certificates(store),
            (SslMode::VerifyCa, Some(store)) => {
                let full = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
                    .build()
                    .context("cannot build the certificate verifier")?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(full)))
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
        };
        let config = match client_identity {
            Some((cert, key)) => {
                let (chain, key) = load_identity(cert, key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("DATABASE_URL: sslcert and sslkey do not form a usable identity")?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(PgTls {
            mode,
            roots,
            connector: MakeRustlsConnect::new(config),
        })
    }

    /// No TLS (`sslmode=disable`).
    pub fn disabled() -> PgTls {
        PgTls::new(SslMode::Disable, None, None).expect("plain connections need no files")
    }

    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The connector to hand to tokio-postgres or deadpool.
    pub fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }

    /// Why a connection failed, in words, when TLS is the reason.
    pub fn explain(&self, error: &tokio_postgres::Error) -> Option<String> {
        let roots = match &self.roots {
            Roots::File(path) => format!("sslrootcert {}", path.display()),
            Roots::System => "the system's trusted roots".into(),
            Roots::None => "no trusted root".into(),
        };
        let mode = self.mode;
        if let Some(e) = rustls_error(error) {
            return Some(match e {
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                    "sslmode={mode}: the server's certificate is not signed by a CA in {roots}"
                ),
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                ) => format!(
                    "sslmode={mode}: the server's certificate does not name the host connected to ({e})"
                ),
                rustls::Error::InvalidCertificate(c) => {
                    format!("sslmode={mode}: the server's certificate was refused: {c:?}")
                }
                other => format!("sslmode={mode}: TLS handshake failed: {other}"),
            });
        }
        if let Some(db) = error.as_db_error()
            && db.message().contains("no encryption")
        {
            return Some(format!(
                "the server refuses unencrypted connections (sslmode={mode}); use sslmode=require or stricter"
            ));
        }
        let text = error.to_string();
        text.contains("server does not support TLS").then(|| {
            format!("sslmode={mode} needs TLS, and the server does not offer it (ssl = off)")
        })
    }
}

/// libpq's default root file, when it exists.
fn default_root_file() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("HOME")?).join(".postgresql/root.crt");
    path.is_file().then_some(path)
}

fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let pem = std::fs::read(path).map_err(|e| {
        anyhow!(
            "DATABASE_URL: sslrootcert {} cannot be read: {e}",
            path.display()
        )
    })?;
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            anyhow!(
                "DATABASE_URL: sslrootcert {} is not a PEM certificate file: {e}",
                path.display()
            )
        })?;
        store.add(cert).map_err(|e| {
            anyhow!(
                "DATABASE_URL: sslrootcert {} holds an unusable certificate: {e}",
                path.display()
            )
        })?;
    }
    if store.is_empty() {
        bail!(
            "DATABASE_URL: sslrootcert {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(store)
}

fn system_roots() -> anyhow::Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    if store.is_empty() {
        bail!(
            "DATABASE_URL: sslrootcert=system, and no trusted root certificate was found on this system ({} errors)",
            found.errors.len()
        );
    }
    Ok(store)
}

fn load_identity(
    cert: &str,
    key: &str,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow!("DATABASE_URL: sslcert {cert} cannot be used: {e}"))?;
    if chain.is_empty() {
        bail!("DATABASE_URL: sslcert {cert} holds no PEM certificate");
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow!("DATABASE_URL: sslkey {key} cannot be used: {e}"))?;
    Ok((chain, key))
}

fn rustls_error(error: &tokio_postgres::Error) -> Option<&rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(r) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(r);
        }
        current = e.source();
    }
    None
}

/// `prefer` / `require` (libpq): encrypted, but any certificate is taken.
/// The handshake signatures are still checked, so the session is bound to
/// the certificate the server sent.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not
/// checked. The webpki verifier checks the name last, after the chain, so a
/// name mismatch means the chain was good.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Connection settings plus the TLS that goes with them: what every
/// connection of the gateway is made from.
#[derive(Clone, Debug)]
pub struct PgConfig {
    config: tokio_postgres::Config,
    tls: PgTls,
}

impl PgConfig {
    /// Settings connecting with `tls`. On unix-socket hosts TLS is off.
    pub fn new(mut config: tokio_postgres::Config, tls: PgTls) -> PgConfig {
        let unix_only = !config.get_hosts().is_empty()
            && config.get_hostaddrs().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|h| !matches!(h, Host::Tcp(_)));
        config.ssl_mode(if unix_only {
            tokio_postgres::config::SslMode::Disable
        } else {
            tls.mode.wire()
        });
        PgConfig { config, tls }
    }

    /// Parses a `DATABASE_URL`, URL (`postgres://…?sslmode=…`) or key/value
    /// (`host=… sslmode=…`) form, with the TLS parameters of this module.
    pub fn parse(url: &str) -> anyhow::Result<PgConfig> {
        let (rest, wishes) = take_tls_params(url);
        let config = rest.parse::<tokio_postgres::Config>().map_err(|e| {
            anyhow!("DATABASE_URL is not a valid PostgreSQL connection string: {e}")
        })?;
        let mode = match wishes.sslmode.as_deref() {
            Some(m) => SslMode::parse(m)?,
            None => SslMode::Prefer,
        };
        let identity = match (wishes.sslcert.as_deref(), wishes.sslkey.as_deref()) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => bail!("DATABASE_URL: sslcert and sslkey go together; give both or neither"),
        };
        let tls = PgTls::new(mode, wishes.sslrootcert.as_deref(), identity)?;
        Ok(PgConfig::new(config, tls))
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    /// The same TLS with changed connection settings (TLS mode kept).
    pub fn map_config(
        self,
        change: impl FnOnce(tokio_postgres::Config) -> tokio_postgres::Config,
    ) -> PgConfig {
        let mode = self.config.get_ssl_mode();
        let mut config = change(self.config);
        config.ssl_mode(mode);
        PgConfig {
            config,
            tls: self.tls,
        }
    }

    /// One connection; drive the returned connection on a task.
    pub async fn connect(
        &self,
    ) -> Result<(tokio_postgres::Client, PgConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.connector()).await
    }
}

/// TLS as tokio-postgres understood it: `disable`, `prefer` or `require`
/// (unverified).
impl From<tokio_postgres::Config> for PgConfig {
    fn from(config: tokio_postgres::Config) -> PgConfig {
        let mode = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        let tls = PgTls::new(mode, None, None).expect("unverified TLS needs no files");
        PgConfig::new(config, tls)
    }
}

/// Splits the TLS parameters off a connection string; the rest is returned
/// for tokio-postgres. A string this cannot read is returned whole, for
/// tokio-postgres to report.
fn take_tls_params(s: &str) -> (String, Wishes) {
    let url_body = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| s.strip_prefix(p));
    let taken = match url_body {
        Some(_) => take_from_url(s),
        None => take_from_key_values(s),
    };
    taken.unwrap_or_else(|| (s.to_owned(), Wishes::default()))
}

fn take_from_url(s: &str) -> Option<(String, Wishes)> {
    // Credentials end at the first '@' (as tokio-postgres reads them); the
    // query starts at the first '?' after that.
    let from = s.find('@').unwrap_or(0);
    let Some(q) = s[from..].find('?').map(|i| i + from) else {
        return Some((s.to_owned(), Wishes::default()));
    };
    let mut wishes = Wishes::default();
    let mut kept = Vec::new();
    for pair in s[q + 1..].split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match wishes.slot(&percent_decode(key)?) {
            Some(slot) => *slot = Some(percent_decode(value)?),
            None => kept.push(pair),
        }
    }
    let mut rest = s[..q].to_owned();
    if !kept.is_empty() {
        rest.push('?');
        rest.push_str(&kept.join("&"));
    }
    Some((rest, wishes))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Key/value form, read as tokio-postgres reads it: `key = value`, values
/// optionally in single quotes, backslash escaping the next character.
fn take_from_key_values(s: &str) -> Option<(String, Wishes)> {
    let mut wishes = Wishes::default();
    let mut kept = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.push(chars.next()?);
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        match wishes.slot(&key) {
            Some(slot) => *slot = Some(value),
            None => kept.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            )),
        }
    }
    Some((kept.join(" "), wishes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(s: &str) -> (String, Wishes) {
        take_tls_params(s)
    }

    #[test]
    fn url_form_loses_its_tls_parameters_and_keeps_the_rest() {
        let (rest, w) = taken(
            "postgres://u:p%3Fw@db.example:5433/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20file.pem&connect_timeout=3",
        );
        assert_eq!(
            rest,
            "postgres://u:p%3Fw@db.example:5433/app?application_name=x&connect_timeout=3"
        );
        assert_eq!(w.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(w.sslrootcert.as_deref(), Some("/etc/ca file.pem"));
        let (rest, w) = taken("postgresql://h/d?sslmode=require");
        assert_eq!(rest, "postgresql://h/d");
        assert_eq!(w.sslmode.as_deref(), Some("require"));
        assert_eq!(taken("postgres://h/d").0, "postgres://h/d");
    }

    #[test]
    fn key_value_form_loses_its_tls_parameters_and_keeps_the_rest() {
        let (rest, w) = taken(
            "host=db.example  port = 5433 sslmode=verify-ca user=u password='it''s' sslrootcert='/a b/c\\'d.pem' dbname=app",
        );
        // The doubled quote is not an escape (libpq does not know it either):
        // the string is unreadable, returned whole for tokio-postgres to report.
        assert!(rest.contains("sslmode"), "{rest}");
        assert_eq!(w, Wishes::default());

        let (rest, w) = taken(
            "host=db.example  port = 5433 sslmode=verify-ca user=u password='it\\'s' sslrootcert='/a b/c\\'d.pem' dbname=app",
        );
        assert_eq!(
            rest,
            "host='db.example' port='5433' user='u' password='it\\'s' dbname='app'"
        );
        assert_eq!(w.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(w.sslrootcert.as_deref(), Some("/a b/c'd.pem"));
        let config: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(config.get_password(), Some(&b"it's"[..]));
        assert_eq!(config.get_ports(), &[5433]);
    }

    #[test]
    fn modes_map_to_what_tokio_postgres_is_told() {
        let pg = PgConfig::parse("postgres://h/d?sslmode=disable").unwrap();
        assert_eq!(pg.tls().mode(), SslMode::Disable);
        assert_eq!(
            pg.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        let pg = PgConfig::parse("host=h dbname=d").unwrap();
        assert_eq!(pg.tls().mode(), SslMode::Prefer);
        let pg = PgConfig::parse("host=h sslmode=require").unwrap();
        assert_eq!(
            pg.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        // A unix socket never does TLS, whatever the mode.
        let pg = PgConfig::parse("host=/run/postgresql sslmode=require").unwrap();
        assert_eq!(
            pg.config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn bad_tls_settings_are_refused_with_a_reason() {
        let e =
            PgConfig::parse("postgres://h/d?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
                .unwrap_err();
        assert_eq!(
            e.to_string(),
            "DATABASE_URL: sslrootcert /nonexistent/ca.pem cannot be read: No such file or directory (os error 2)"
        );
        let e = PgConfig::parse("host=h sslmode=allow").unwrap_err();
        assert!(
            e.to_string().contains("sslmode=allow is not supported"),
            "{e}"
        );
        let e = PgConfig::parse("host=h sslcert=/a.pem").unwrap_err();
        assert!(e.to_string().contains("give both or neither"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = PgConfig::parse(&format!(
            "host=h sslmode=verify-ca sslrootcert={}",
            empty.display()
        ))
        .unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
    }
}
