//! `verdict`: parse the command line, hand over to the library.

use clap::Parser;
use std::process::ExitCode;
use verdict::config::{Cli, Command};

/// mimalloc instead of the C library's allocator: a call allocates and frees
/// hundreds of small blocks (rows, strings, protobuf values, HTTP/2 frames)
/// across the runtime's threads, where glibc's arenas spent about a fifth of
/// the gateway's CPU (ListSessions profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A positive number from the environment variable `name`, if set.
fn env_number(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|n| *n > 0)
}

/// The async runtime. `VERDICT_WORKER_THREADS` sets the number of worker
/// threads (default: one per CPU); `VERDICT_RUNTIME=current_thread` runs
/// everything on the main thread, which spends the least CPU per call when
/// the gateway shares a few cores with its database and clients (no task
/// crosses threads, no worker is woken to steal), at the price of using
/// one core at most.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if std::env::var("VERDICT_RUNTIME").is_ok_and(|v| v == "current_thread") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = env_number("VERDICT_WORKER_THREADS") {
            b.worker_threads(n);
        }
        b
    };
    builder.enable_all().build()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("verdict: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let telemetry = verdict::telemetry::init(&cli.config)?;
        let result = match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => {
                tracing::debug!(config = ?cli.config, "starting");
                let app = verdict::Application::build(cli.config).await?;
                app.run_until_stopped().await
            }
            Command::Migrate { status } => verdict::migrate_command(&cli.config, status).await,
            Command::Cleanup {
                older_than,
                dry_run,
                project,
            } => verdict::cleanup_command(&cli.config, &older_than, dry_run, &project).await,
            Command::Export {
                session_id,
                project,
            } => verdict::export_command(&cli.config, &session_id, &project).await,
            Command::Keys { action } => verdict::keys_command(&cli.config, action).await,
            Command::Stats {
                project,
                all_projects,
                exact,
                json,
            } => verdict::stats_command(&cli.config, &project, all_projects, exact, json).await,
            Command::Check {
                project,
                stuck_after,
                repair,
                json,
            } => verdict::check_command(&cli.config, &project, &stuck_after, repair, json).await,
            Command::Health {
                addr,
                service,
                ca_cert,
                timeout,
                json,
            } => {
                verdict::health_command(
                    &cli.config,
                    addr.as_deref(),
                    &service,
                    ca_cert.as_deref(),
                    timeout,
                    json,
                )
                .await
            }
        };
        // Flushing the exporters blocks: off the runtime's threads, so that
        // the exporters' own tasks still run (on a current-thread runtime
        // nothing else could drive them).
        let flushed = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        if let Err(e) = flushed {
            eprintln!("verdict: flushing telemetry failed: {e}");
        }
        result
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        // A command that ran and says "not all good" (integrity findings,
        // a gateway not SERVING): its own exit code.
        Err(e) if e.downcast_ref::<verdict::ExitStatus>().is_some() => {
            let status = e.downcast_ref::<verdict::ExitStatus>().expect("checked");
            eprintln!("verdict: {status}");
            ExitCode::from(status.code)
        }
        Err(e) => {
            eprintln!("verdict: {e:#}");
            ExitCode::FAILURE
        }
    }
}
