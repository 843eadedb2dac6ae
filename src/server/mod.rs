//! The gRPC server assembled in one place: tracing layer, auth layer,
//! health, reflection (v1 and v1alpha), every Verdict service with its
//! message size limits, over plain TCP or TLS; gRPC-Web, CORS and the
//! console (crate::console) on the same port.

mod connections;
mod decode;
mod direct;
mod error_info;
pub mod health;
pub mod incoming;
mod prescan;
mod trace;
mod unary;

use crate::admin::AdminApi;
use crate::auth::{AuthLayer, AuthMode};
use crate::config::Config;
use crate::coverage::CoverageApi;
use crate::discrepancies::DiscrepancyApi;
use crate::failures::FailureApi;
use crate::metrics::MetricsApi;
use crate::projects::ProjectApi;
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::coverage_service_server::CoverageServiceServer;
use crate::proto::discrepancy_service_server::DiscrepancyServiceServer;
use crate::proto::failure_service_server::FailureServiceServer;
use crate::proto::metrics_service_server::MetricsServiceServer;
use crate::proto::project_service_server::ProjectServiceServer;
use crate::proto::result_service_server::ResultServiceServer;
use crate::proto::session_service_server::SessionServiceServer;
use crate::proto::test_case_service_server::TestCaseServiceServer;
use crate::proto::test_run_service_server::TestRunServiceServer;
use crate::results::ResultApi;
use crate::sessions::SessionApi;
use crate::state::AppState;
use crate::test_cases::TestCaseApi;
use crate::test_runs::TestRunApi;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

/// Names of the Verdict services, as health and reflection list them.
pub fn service_names() -> Vec<&'static str> {
    direct::Services::names()
}

/// Serves until `shutdown` resolves, then drains in-flight calls.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    state: AppState,
    reporter: HealthReporter,
    auth: AuthMode,
    tls: Option<crate::tls::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Every service gets the same message size limits.
    // Requests are held 2 KiB under the reply limit, so what a request
    // stores always fits a reply (with its id, times and page token).
    let limit = config.max_message_bytes;
    let request_limit = config.max_request_bytes();
    let auth = AuthLayer::new(
        state.keys.clone(),
        auth.is_required(),
        state.signer.clone(),
        state.projects.clone(),
    );

    let web = crate::console::WebLayer::new(&config.cors_origins, config.console)?;

    // Health, reflection and any path nobody serves; their router made
    // ready for serving as tonic's transport did (`Routes::prepare`, no SQL).
    let routes = Routes::new(HealthServer::new(HealthService::from_health_reporter(
        reporter,
    )))
    .add_service(reflection_v1)
    .add_service(reflection_v1alpha);
    let routes = Routes::prepare(routes);
    // Browsers: gRPC-Web over HTTP/1.1 (or HTTP/2) on this same port.
    // CORS and the console's files are answered outermost; the
    // translation comes next, so tracing, auth and every later layer
    // see a gRPC-Web call as the native call it becomes.
    let service = tower::ServiceBuilder::new()
        .layer(web)
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(trace::RpcTraceLayer)
        .layer(crate::ingest::ResetLayer)
        .layer(auth)
        .layer(prescan::PrescanLayer {
            max_message_bytes: request_limit,
        })
        .layer(crate::db::replica::ConsistencyLayer::new(
            state.db.clone(),
            request_limit,
        ))
        // Innermost: the Verdict services, found by name; health,
        // reflection and unknown paths go on to tonic's routes.
        .layer(direct::DirectLayer(direct::Services::new(
            direct::Apis {
                sessions: SessionApi::new(state.clone()),
                results: ResultApi::new(state.clone()),
                discrepancies: DiscrepancyApi::new(state.clone()),
                test_cases: TestCaseApi::new(state.clone()),
                coverage: CoverageApi::new(state.clone()),
                metrics: MetricsApi::new(state.clone()),
                admin: AdminApi::new(state.clone()),
                projects: ProjectApi::new(state.clone()),
                test_runs: TestRunApi::new(state.clone()),
                failures: FailureApi::new(state.clone()),
            },
            unary::Limits {
                decode: request_limit,
                encode: limit,
            },
        )))
        .service(routes);
    let settings = connections::Settings {
        // Advertised in SETTINGS: a client may not open more at once.
        max_concurrent_streams: config.max_streams_per_connection,
        keepalive_interval: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(10),
    };
    let limits = incoming::Limits::from_config(config);
    match tls {
        Some(tls) => {
            tracing::info!(mutual = tls.is_mutual(), "serving TLS only");
            let incoming = tls.incoming(listener, limits);
            connections::serve(incoming, service, settings, shutdown).await;
        }
        None => {
            let incoming = incoming::plain(listener, limits);
            connections::serve(incoming, service, settings, shutdown).await;
        }
    }
    Ok(())
}
