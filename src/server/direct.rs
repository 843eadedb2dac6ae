//! The Verdict services called straight by the service part of the path
//! (issue 13).
//!
//! tonic's `Routes` finds a service through an axum router: per call it
//! matches the path in a route tree, stores the (empty) path parameters in
//! the request's extensions, clones the route's boxed service, and wraps
//! the request body and then the reply body in one more box each, which
//! every frame of the call is then polled through. For the gateway's own
//! services none of that is needed: the service's name is the path up to
//! its second `/`, and the generated server matches the method itself. A
//! call to any other path (health, reflection, a path nobody serves) goes
//! on to `Routes` as before. A unary method is then called straight
//! ([`super::unary`]); a streaming one through its tonic server.

use super::unary::{self, Limits};
use super::{
    AdminApi, AdminServiceServer, CoverageApi, CoverageServiceServer, DiscrepancyApi,
    DiscrepancyServiceServer, FailureApi, FailureServiceServer, MetricsApi, MetricsServiceServer,
    ProjectApi, ProjectServiceServer, ResultApi, ResultServiceServer, SessionApi,
    SessionServiceServer, TestCaseApi, TestCaseServiceServer, TestRunApi, TestRunServiceServer,
};
use futures::future::{BoxFuture, Either};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use tonic::server::NamedService;
use tower::{Layer, Service};

type Reply = http::Response<tonic::body::Body>;

/// Declares [`Services`] and its dispatch by name from one list.
macro_rules! services {
    ($($field:ident: $server:ident<$api:ident> by $unary:ident),* $(,)?) => {
        /// The implementation of every Verdict service.
        pub struct Apis {
            $(pub $field: $api,)*
        }

        /// Every Verdict service, ready to be called: its implementation,
        /// called straight for a unary method ([`super::unary`]), and its
        /// tonic server for the rest.
        #[derive(Clone)]
        pub struct Services {
            $($field: (Arc<$api>, $server<$api>),)*
            limits: Limits,
        }

        impl Services {
            /// Every service with the same message size limits.
            pub fn new(apis: Apis, limits: Limits) -> Self {
                Services {
                    $($field: {
                        let api = Arc::new(apis.$field);
                        let server = $server::from_arc(api.clone())
                            .max_decoding_message_size(limits.decode)
                            .max_encoding_message_size(limits.encode);
                        (api, server)
                    },)*
                    limits,
                }
            }

            /// Their names, as health and reflection list them.
            pub fn names() -> Vec<&'static str> {
                vec![$(<$server<$api> as NamedService>::NAME,)*]
            }

            /// The call to the Verdict service `req`'s path names, or to
            /// `rest` when it names none.
            fn call<S>(
                &self,
                req: http::Request<tonic::body::Body>,
                rest: &mut S,
            ) -> Either<BoxFuture<'static, Result<Reply, Infallible>>, S::Future>
            where
                S: Service<http::Request<tonic::body::Body>>,
            {
                let (service, _) = unary::service_and_method(req.uri().path());
                // A compressed request is tonic's to refuse or decode.
                let plain = !req.headers().contains_key("grpc-encoding");
                match service {
                    $(<$server<$api> as NamedService>::NAME => {
                        let (api, server) = &self.$field;
                        let req = if plain {
                            match unary::$unary(api, server, req, self.limits) {
                                Ok(call) => return Either::Left(call),
                                Err(req) => req,
                            }
                        } else {
                            req
                        };
                        Either::Left(server.clone().call(req))
                    })*
                    _ => Either::Right(rest.call(req)),
                }
            }
        }
    };
}

services!(
    sessions: SessionServiceServer<SessionApi> by session_service,
    results: ResultServiceServer<ResultApi> by result_service,
    discrepancies: DiscrepancyServiceServer<DiscrepancyApi> by discrepancy_service,
    test_cases: TestCaseServiceServer<TestCaseApi> by test_case_service,
    coverage: CoverageServiceServer<CoverageApi> by coverage_service,
    metrics: MetricsServiceServer<MetricsApi> by metrics_service,
    admin: AdminServiceServer<AdminApi> by admin_service,
    projects: ProjectServiceServer<ProjectApi> by project_service,
    test_runs: TestRunServiceServer<TestRunApi> by test_run_service,
    failures: FailureServiceServer<FailureApi> by failure_service,
);

/// The innermost layer: [`Services`] in front of `Routes`.
#[derive(Clone)]
pub struct DirectLayer(pub Services);

impl<S> Layer<S> for DirectLayer {
    type Service = Direct<S>;

    fn layer(&self, rest: S) -> Self::Service {
        Direct {
            services: Arc::new(self.0.clone()),
            rest,
        }
    }
}

#[derive(Clone)]
pub struct Direct<S> {
    /// Shared: the HTTP server clones the whole stack for every call, and
    /// the auth layer's boxed path clones the stack below it.
    services: Arc<Services>,
    /// Whatever is not a Verdict service.
    rest: S,
}

impl<S> Service<http::Request<tonic::body::Body>> for Direct<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = Reply, Error = Infallible>,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = Either<BoxFuture<'static, Result<Reply, Infallible>>, S::Future>;

    /// The generated servers are always ready; `Routes` says for itself.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.rest.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        self.services.call(req, &mut self.rest)
    }
}
