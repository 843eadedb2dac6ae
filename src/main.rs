//! `verdict`: parse the command line, hand over to the library.

use clap::Parser;
use std::process::ExitCode;
use verdict::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
        };
        telemetry.shutdown();
        result
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verdict: {e:#}");
            ExitCode::FAILURE
        }
    }
}
