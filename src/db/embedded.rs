//! The embedded default: a private PostgreSQL started from the system's
//! server binaries, with its data and unix socket in one folder, no TCP
//! (unless [`ServerOptions::tcp`] asks for 127.0.0.1, e.g. to test TLS).

use anyhow::{Context, bail};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Port number of the socket file name (`.s.PGSQL.5432`); nothing listens on
/// TCP by default.
const PORT: u16 = 5432;
/// Superuser created by initdb, used by the gateway.
pub const USER: &str = "verdict";
/// Database the gateway uses inside the embedded server.
pub const DATABASE: &str = "verdict";
/// The unprivileged account PostgreSQL runs as when the gateway runs as root.
const UNPRIVILEGED_USER: &str = "postgres";
/// Longest unix socket path the kernel accepts (sun_path minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A running embedded PostgreSQL. Stop it with [`EmbeddedPostgres::stop`];
/// dropping it asks it to stop without waiting.
pub struct EmbeddedPostgres {
    dir: PathBuf,
    bin_dir: PathBuf,
    /// The socket file's number, and the TCP port when `options.tcp`.
    port: u16,
    options: ServerOptions,
    pid: Option<i32>,
    exited: Option<tokio::sync::oneshot::Receiver<std::io::Result<ExitStatus>>>,
}

/// The account the server processes run as, when it is not our own.
#[derive(Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// Extras for [`EmbeddedPostgres::start_with`] (tests use them for TLS).
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Also listen on 127.0.0.1, at a free port ([`EmbeddedPostgres::tcp_port`]).
    pub tcp: bool,
    /// Files written into the folder before the server starts, as
    /// (file name, contents), owned by the server's account with mode 0600
    /// (as PostgreSQL wants for a private key).
    pub files: Vec<(String, Vec<u8>)>,
    /// Server settings, each passed as `-c name=value`.
    pub settings: Vec<(String, String)>,
}

impl EmbeddedPostgres {
    /// Starts (after initdb on first use) a private server in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, ServerOptions::default()).await
    }

    /// [`EmbeddedPostgres::start`] with extra files and settings, and
    /// optionally listening on TCP (loopback only).
    pub async fn start_with(dir: &Path, options: ServerOptions) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve the data folder {}", dir.display()))?;
        let port = if options.tcp {
            free_loopback_port()?
        } else {
            PORT
        };
        let socket = dir.join(format!(".s.PGSQL.{port}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "the data folder path {} is too long for a unix socket (at most {} bytes with the socket name); choose a shorter VERDICT_DATA_DIR",
                dir.display(),
                MAX_SOCKET_PATH
            );
        }
        let run_as = run_as()?;
        prepare_dir(&dir, run_as)?;
        for (name, contents) in &options.files {
            write_private(&dir.join(name), contents, run_as)?;
        }
        let pgdata = dir.join("pgdata");
        refuse_if_in_use(&pgdata)?;

        if !pgdata.join("PG_VERSION").exists() {
            tracing::info!(folder = %pgdata.display(), "initialising the embedded PostgreSQL");
            let mut initdb = Command::new(bin_dir.join("initdb"));
            initdb
                .arg("-D")
                .arg(&pgdata)
                .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-locale"])
                .stdin(Stdio::null());
            as_user(&mut initdb, run_as);
            let out = initdb.output().context("cannot run initdb")?;
            if !out.status.success() {
                bail!(
                    "initdb failed in {}: {}",
                    pgdata.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }

        let mut pg = EmbeddedPostgres {
            dir: dir.clone(),
            bin_dir,
            port,
            options,
            pid: None,
            exited: None,
        };
        pg.spawn(run_as)?;
        pg.wait_until_ready().await?;
        Ok(pg)
    }

    /// Connection settings for `database` on this server (unix socket only).
    pub fn config(&self, database: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.dir)
            .port(self.port)
            .user(USER)
            .dbname(database);
        config
    }

    /// The same as a `DATABASE_URL` value (key/value form).
    pub fn database_url(&self, database: &str) -> String {
        format!(
            "host={} port={} user={USER} dbname={database}",
            self.dir.display(),
            self.port
        )
    }

    /// The port the server listens on at 127.0.0.1, when asked to.
    pub fn tcp_port(&self) -> Option<u16> {
        self.options.tcp.then_some(self.port)
    }

    /// The folder holding the data and the socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn spawn(&mut self, run_as: Option<RunAs>) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .context("cannot open postgres.log in the data folder")?;
        if let Some(r) = run_as {
            std::os::unix::fs::chown(self.dir.join("postgres.log"), Some(r.uid), Some(r.gid))?;
        }
        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.join("pgdata"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(if self.options.tcp {
                "listen_addresses=127.0.0.1"
            } else {
                "listen_addresses="
            })
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .arg("-c")
            .arg("unix_socket_permissions=0700");
        for (name, value) in &self.options.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a terminal's Ctrl-C reaches the gateway,
            // which drains calls first and then stops the server itself.
            .process_group(0);
        as_user(&mut cmd, run_as);
        // SAFETY: prctl is async-signal-safe; it only sets a flag of the child.
        unsafe {
            cmd.pre_exec(|| {
                // If the gateway dies without stopping it, the server gets a
                // fast-shutdown request instead of living on.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                Ok(())
            });
        }

        // The parent-death signal fires when the spawning *thread* ends, so
        // spawn from a thread that lives exactly as long as the server.
        let (pid_tx, pid_rx) = std::sync::mpsc::channel();
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("embedded-postgres".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id()));
                    let _ = exit_tx.send(child.wait());
                }
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
            })?;
        let pid = pid_rx
            .recv()
            .context("the embedded-postgres thread ended early")?
            .context("cannot start postgres")?;
        self.pid = Some(pid as i32);
        self.exited = Some(exit_rx);
        Ok(())
    }

    async fn wait_until_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let admin = self.config("postgres");
        loop {
            if let Some(rx) = self.exited.as_mut()
                && let Ok(status) = rx.try_recv()
            {
                self.pid = None;
                bail!(
                    "the embedded PostgreSQL exited during start-up ({:?}); its log: {}\n{}",
                    status.ok(),
                    self.dir.join("postgres.log").display(),
                    log_tail(&self.dir.join("postgres.log"))
                );
            }
            match admin.connect(tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    let driver = tokio::spawn(connection);
                    let exists = client
                        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&DATABASE])
                        .await?
                        .is_some();
                    if !exists {
                        client
                            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
                            .await?;
                    }
                    drop(client);
                    let _ = driver.await;
                    tracing::info!(folder = %self.dir.display(), "embedded PostgreSQL is ready");
                    return Ok(());
                }
                Err(_) if started.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => bail!(
                    "the embedded PostgreSQL did not accept connections within 60 s: {e}; its log: {}",
                    self.dir.join("postgres.log").display()
                ),
            }
        }
    }

    /// Stops the server with a fast shutdown (open sessions are closed,
    /// committed data is flushed) and waits for it to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(pid) = self.pid.take() else {
            return Ok(());
        };
        signal(pid, libc::SIGINT);
        if let Some(rx) = self.exited.take() {
            match tokio::time::timeout(Duration::from_secs(30), rx).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(
                        pid,
                        "embedded PostgreSQL ignored fast shutdown; sending SIGQUIT"
                    );
                    signal(pid, libc::SIGQUIT);
                }
            }
        }
        tracing::info!("embedded PostgreSQL stopped");
        Ok(())
    }

    /// Stops the server the way a crash would (`immediate` mode), for fault tests.
    pub async fn stop_immediately(&mut self) {
        if let Some(pid) = self.pid.take() {
            signal(pid, libc::SIGQUIT);
            if let Some(rx) = self.exited.take() {
                let _ = tokio::time::timeout(Duration::from_secs(30), rx).await;
            }
        }
    }

    /// Starts the server again after a stop, on the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.spawn(run_as()?)?;
        self.wait_until_ready().await
    }
}

impl EmbeddedPostgres {
    /// Starts a streaming standby of `primary` in `dir` (tests of replicas
    /// and failover): a base backup taken with `pg_basebackup -R` (WAL
    /// streamed, so the copy is consistent; `standby.signal` and
    /// `primary_conninfo` written) on first use, then a hot standby on it,
    /// with the primary's extra files and settings. It follows the primary
    /// over the primary's unix socket (initdb's `pg_hba.conf` trusts local
    /// replication connections, and PostgreSQL's defaults, `wal_level =
    /// replica` and `max_wal_senders = 10`, allow them).
    pub async fn start_standby(dir: &Path, primary: &EmbeddedPostgres) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data folder {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("cannot resolve the data folder {}", dir.display()))?;
        let run_as = run_as()?;
        prepare_dir(&dir, run_as)?;
        let pgdata = dir.join("pgdata");
        if !pgdata.join("PG_VERSION").exists() {
            let mut backup = Command::new(client_tool(&bin_dir, "pg_basebackup"));
            backup
                .arg("-D")
                .arg(&pgdata)
                .arg("-h")
                .arg(&primary.dir)
                .arg("-p")
                .arg(primary.port.to_string())
                .args(["-U", USER, "-R", "-X", "stream", "-c", "fast"])
                .stdin(Stdio::null());
            as_user(&mut backup, run_as);
            let out = tokio::task::spawn_blocking(move || backup.output())
                .await?
                .context("cannot run pg_basebackup")?;
            if !out.status.success() {
                bail!(
                    "pg_basebackup into {} failed: {}",
                    pgdata.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Self::start_with(&dir, primary.options.clone()).await
    }

    /// Promotes a standby to a primary (`pg_ctl promote`, waiting until it
    /// accepts writes).
    pub async fn promote(&self) -> anyhow::Result<()> {
        let mut cmd = Command::new(client_tool(&self.bin_dir, "pg_ctl"));
        cmd.arg("promote")
            .arg("-w")
            .arg("-t")
            .arg("60")
            .arg("-D")
            .arg(self.dir.join("pgdata"))
            .stdin(Stdio::null());
        as_user(&mut cmd, run_as()?);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await?
            .context("cannot run pg_ctl promote")?;
        if !out.status.success() {
            bail!(
                "pg_ctl promote failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The port number of its socket (and TCP port, when listening on TCP).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            signal(pid, libc::SIGINT);
        }
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn as_user(cmd: &mut Command, run_as: Option<RunAs>) {
    if let Some(r) = run_as {
        cmd.uid(r.uid).gid(r.gid);
    }
}

/// PostgreSQL refuses to run as root: then run it as the `postgres` account.
fn run_as() -> anyhow::Result<Option<RunAs>> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new(UNPRIVILEGED_USER)?;
    // SAFETY: getpwnam returns null or a pointer to static storage, read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!(
            "running as root, and PostgreSQL refuses to run as root: create an unprivileged '{UNPRIVILEGED_USER}' account (installing the postgresql package does) or run the gateway as a normal user"
        );
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some(RunAs { uid, gid }))
}

/// Makes the folder private to the account the server runs as, and checks
/// that account can reach it.
fn prepare_dir(dir: &Path, run_as: Option<RunAs>) -> anyhow::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let Some(r) = run_as else {
        return Ok(());
    };
    std::os::unix::fs::chown(dir, Some(r.uid), Some(r.gid))?;
    for ancestor in dir.ancestors().skip(1) {
        let meta = std::fs::metadata(ancestor)?;
        let reachable = meta.mode() & 0o001 != 0 || meta.uid() == r.uid;
        if !reachable {
            bail!(
                "PostgreSQL runs as '{UNPRIVILEGED_USER}' here (the gateway is root), and that account cannot enter {}; choose a VERDICT_DATA_DIR outside it (e.g. under /var/lib or /tmp)",
                ancestor.display()
            );
        }
    }
    Ok(())
}

fn refuse_if_in_use(pgdata: &Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else {
        return Ok(());
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return Ok(());
    };
    // SAFETY: signal 0 only checks that the process exists.
    let alive = pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM));
    if alive {
        bail!(
            "the data folder {} is in use by another running PostgreSQL server (pid {pid}); stop that server or set VERDICT_DATA_DIR to another folder",
            pgdata.parent().unwrap_or(pgdata).display()
        );
    }
    Ok(())
}

/// Finds a folder holding `postgres`, `initdb` and `pg_ctl`: on PATH, then
/// `pg_config --bindir`, then `/usr/lib/postgresql/*/bin`, newest first.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let has_server = |d: &Path| ["postgres", "initdb"].iter().all(|b| d.join(b).is_file());
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_server(&d) {
                return Ok(d);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&d) {
            return Ok(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, d)| has_server(d))
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    if let Some((_, d)) = versions.into_iter().next() {
        return Ok(d);
    }
    bail!(
        "no PostgreSQL server binaries found (looked for postgres and initdb on PATH, in `pg_config --bindir` and in /usr/lib/postgresql/*/bin). Install them (Debian/Ubuntu: `apt-get install postgresql`) or set DATABASE_URL to an existing PostgreSQL server"
    )
}

/// A server tool (`pg_ctl`, `pg_basebackup`): next to `postgres`, else in
/// `/usr/lib/postgresql/*/bin` (newest first), else by name on PATH.
fn client_tool(bin_dir: &Path, name: &str) -> PathBuf {
    if bin_dir.join(name).is_file() {
        return bin_dir.join(name);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, e.path().join("bin").join(name)))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.0));
    versions
        .into_iter()
        .next()
        .map_or_else(|| PathBuf::from(name), |(_, p)| p)
}

/// A port free on 127.0.0.1 right now (the server binds it moments later).
fn free_loopback_port() -> anyhow::Result<u16> {
    let probe = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("cannot find a free port on 127.0.0.1")?;
    Ok(probe.local_addr()?.port())
}

/// Writes a file only the server's account can read.
fn write_private(path: &Path, contents: &[u8], run_as: Option<RunAs>) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents)?;
    if let Some(r) = run_as {
        std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))?;
    }
    Ok(())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
