//! `grpc.health.v1` statuses: NOT_SERVING until the schema is migrated, then
//! following a background probe of PostgreSQL: over a connection of its own
//! (is the database there?) and through the pool (can a call get a
//! connection?). A gateway whose pool cannot open any connection — the
//! database has no slot left for it, say, because other replicas hold them
//! all — is NOT_SERVING, so a load balancer sends its calls elsewhere, and
//! SERVING again as soon as it can. A pool whose every connection is busy
//! is SERVING: its connections work, calls queue.

use crate::db::{self, Db};
use std::time::Duration;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Sets every service name's status at once.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl Health {
    pub fn new(reporter: HealthReporter, services: Vec<&'static str>) -> Self {
        Health { reporter, services }
    }

    pub async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        for s in &self.services {
            self.reporter.set_service_status(*s, status).await;
        }
    }

    /// Probes PostgreSQL every `interval` for as long as the gateway runs.
    pub async fn probe(self, db: Db, config: db::PgConfig, interval: Duration) {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut last: Option<bool> = None;
        let timeout = interval.max(Duration::from_secs(1));
        loop {
            let reachable = db.is_ready() && ping(&mut client, &config, timeout).await;
            let ok = reachable && db.can_connect(timeout).await;
            crate::observability::database_reachable(reachable, ok);
            if last != Some(ok) {
                if ok {
                    tracing::info!("PostgreSQL reachable: SERVING");
                } else if reachable {
                    tracing::warn!(
                        "the pool cannot get a PostgreSQL connection (no slot left?): NOT_SERVING"
                    );
                } else if db.is_ready() {
                    tracing::warn!("PostgreSQL unreachable: NOT_SERVING");
                }
                self.set(ok).await;
                last = Some(ok);
            }
            tokio::time::sleep(interval).await;
        }
    }
}

async fn ping(
    client: &mut Option<tokio_postgres::Client>,
    config: &db::PgConfig,
    timeout: Duration,
) -> bool {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = match tokio::time::timeout(timeout, db::connect_direct(config)).await {
            Ok(Ok(c)) => Some(c),
            _ => return false,
        };
    }
    let Some(c) = client.as_ref() else {
        return false;
    };
    let ok = matches!(
        tokio::time::timeout(timeout, c.simple_query("SELECT 1")).await,
        Ok(Ok(_))
    );
    if !ok {
        *client = None;
    }
    ok
}
