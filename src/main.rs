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

/// The shape of the async runtime (`VERDICT_RUNTIME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The whole gateway on the main thread.
    CurrentThread,
    /// A pool of worker threads (`VERDICT_WORKER_THREADS`, default one per
    /// CPU the process may use).
    MultiThread,
}

/// The largest number of CPUs at which `auto` (the default) runs the
/// gateway on one thread.
///
/// A call is served by two tasks: its HTTP/2 connection's and the pooled
/// PostgreSQL connection's (tokio-postgres drives each connection as a task
/// of its own). On a multi-threaded runtime they usually sit on different
/// workers, so every reply from the database wakes another thread through a
/// futex, and idle workers are woken to steal work: measured from outside
/// (`../shared/bench/side-by-side.sh`, see the README's Benchmarks) that is
/// 3 to 7 times more voluntary context switches per call and the kernel's
/// task switching as the largest entry of the profile. With one CPU (a small
/// VM, or a container whose CPU quota is 1 or less, which
/// `available_parallelism` reads from the cgroup) a second worker buys
/// nothing.
const AUTO_CURRENT_THREAD_MAX_CPUS: usize = 1;

/// The largest number of CPUs at which `auto` runs the gateway on one
/// thread when its database is on the same machine ([`database_is_local`]).
///
/// Beside its database, the gateway shares its CPUs with PostgreSQL's
/// backends (and usually with its clients): a second worker thread then
/// competes for a core the database needs to answer, and every call pays the
/// cross-thread wake-ups. On two shared cores one thread spent 25–40 % less
/// CPU per call and served more calls per second (README, Benchmarks). A
/// gateway with two CPUs to itself (its database elsewhere, the usual
/// Kubernetes pod) keeps its workers.
const AUTO_CURRENT_THREAD_MAX_CPUS_BESIDE_DATABASE: usize = 2;

/// Whether the database the gateway serves runs on this machine: the
/// embedded default (no URL), a Unix socket, or a loopback address. A URL
/// that does not parse counts as remote (the gateway refuses it later, with
/// the reason).
fn database_is_local(url: Option<&str>) -> bool {
    use tokio_postgres::config::Host;
    let Some(url) = url else {
        return true;
    };
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return false;
    };
    if !config.get_hostaddrs().is_empty() {
        return config.get_hostaddrs().iter().all(|a| a.is_loopback());
    }
    // No host at all: libpq's default, the local Unix socket.
    config.get_hosts().iter().all(|host| match host {
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Host::Unix(_) => true,
    })
}

/// The runtime shape from `VERDICT_RUNTIME` (`auto`, `current_thread`,
/// `multi_thread`), whether `VERDICT_WORKER_THREADS` is set, the CPUs the
/// process may use and whether the database is on this machine. `auto` (or
/// unset): one thread on up to [`AUTO_CURRENT_THREAD_MAX_CPUS`] CPUs, or
/// [`AUTO_CURRENT_THREAD_MAX_CPUS_BESIDE_DATABASE`] beside the database,
/// workers beyond; asking for a number of workers asks for workers.
fn shape(
    runtime: Option<&str>,
    workers_set: bool,
    cpus: usize,
    database_local: bool,
) -> Result<Shape, String> {
    let one_thread_up_to = if database_local {
        AUTO_CURRENT_THREAD_MAX_CPUS_BESIDE_DATABASE
    } else {
        AUTO_CURRENT_THREAD_MAX_CPUS
    };
    match runtime.map(str::trim) {
        Some("current_thread") => Ok(Shape::CurrentThread),
        Some("multi_thread") => Ok(Shape::MultiThread),
        None | Some("" | "auto") if workers_set => Ok(Shape::MultiThread),
        None | Some("" | "auto") if cpus <= one_thread_up_to => Ok(Shape::CurrentThread),
        None | Some("" | "auto") => Ok(Shape::MultiThread),
        Some(other) => Err(format!(
            "VERDICT_RUNTIME={other:?}: expected auto, current_thread or multi_thread"
        )),
    }
}

/// The async runtime, in the shape [`shape`] picks from the environment.
fn runtime(database_url: Option<&str>) -> Result<(tokio::runtime::Runtime, Shape), String> {
    let workers = env_number("VERDICT_WORKER_THREADS");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chosen = shape(
        std::env::var("VERDICT_RUNTIME").ok().as_deref(),
        workers.is_some(),
        cpus,
        database_is_local(database_url),
    )?;
    let mut builder = match chosen {
        Shape::CurrentThread => tokio::runtime::Builder::new_current_thread(),
        Shape::MultiThread => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = workers {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = builder.enable_all().build().map_err(|e| e.to_string())?;
    Ok((runtime, chosen))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (runtime, shape) = match runtime(cli.config.database_url.as_deref()) {
        Ok(chosen) => chosen,
        Err(e) => {
            eprintln!("verdict: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let telemetry = verdict::telemetry::init(&cli.config)?;
        tracing::debug!(runtime = ?shape, "async runtime");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_runs_on_one_thread_on_one_cpu_and_on_workers_beyond() {
        for runtime in [None, Some("auto"), Some(""), Some(" auto ")] {
            assert_eq!(shape(runtime, false, 1, false), Ok(Shape::CurrentThread));
            assert_eq!(shape(runtime, false, 2, false), Ok(Shape::MultiThread));
            assert_eq!(shape(runtime, false, 3, false), Ok(Shape::MultiThread));
            assert_eq!(shape(runtime, false, 64, false), Ok(Shape::MultiThread));
        }
    }

    #[test]
    fn auto_beside_its_database_runs_on_one_thread_up_to_two_cpus() {
        for runtime in [None, Some("auto")] {
            assert_eq!(shape(runtime, false, 1, true), Ok(Shape::CurrentThread));
            assert_eq!(shape(runtime, false, 2, true), Ok(Shape::CurrentThread));
            assert_eq!(shape(runtime, false, 3, true), Ok(Shape::MultiThread));
            assert_eq!(shape(runtime, false, 64, true), Ok(Shape::MultiThread));
        }
        // A worker count still asks for workers.
        assert_eq!(shape(None, true, 2, true), Ok(Shape::MultiThread));
    }

    #[test]
    fn the_database_is_local_when_embedded_on_a_socket_or_on_loopback() {
        for url in [
            None,
            Some("postgres://u@127.0.0.1:5432/verdict"),
            Some("postgres://u@127.0.0.2/verdict?sslmode=disable"),
            Some("postgres://u@localhost/verdict"),
            Some("postgres://u@LocalHost:6432/verdict"),
            Some("postgres://u@[::1]:5432/verdict"),
            Some("postgres://u@%2Fvar%2Frun%2Fpostgresql/verdict"),
            Some("host=/run/postgresql dbname=verdict"),
            Some("dbname=verdict"),
            Some("host=db.example hostaddr=127.0.0.1 dbname=verdict"),
        ] {
            assert!(database_is_local(url), "{url:?}");
        }
        for url in [
            Some("postgres://u@db.example:5432/verdict"),
            Some("postgres://u@10.0.0.5/verdict"),
            Some("postgres://u@127.0.0.1,db.example/verdict"),
            Some("host=localhost hostaddr=10.0.0.5 dbname=verdict"),
            Some("not a url at all ::"),
        ] {
            assert!(!database_is_local(url), "{url:?}");
        }
    }

    #[test]
    fn an_explicit_shape_or_worker_count_wins_over_auto() {
        for local in [false, true] {
            assert_eq!(
                shape(Some("multi_thread"), false, 1, local),
                Ok(Shape::MultiThread)
            );
            assert_eq!(
                shape(Some("current_thread"), false, 64, local),
                Ok(Shape::CurrentThread)
            );
            assert_eq!(shape(None, true, 2, local), Ok(Shape::MultiThread));
            assert_eq!(shape(Some("auto"), true, 1, local), Ok(Shape::MultiThread));
            // An explicit shape wins over a worker count.
            assert_eq!(
                shape(Some("current_thread"), true, 8, local),
                Ok(Shape::CurrentThread)
            );
        }
    }

    #[test]
    fn an_unknown_shape_is_refused_with_the_accepted_names() {
        let e = shape(Some("threadpool"), false, 4, true).unwrap_err();
        assert!(e.contains("auto, current_thread or multi_thread"), "{e}");
    }
}
