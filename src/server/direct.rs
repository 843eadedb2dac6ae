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
//! on to `Routes` as before.

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
    ($($field:ident: $server:ident<$api:ident>),* $(,)?) => {
        /// Every Verdict service, ready to be called.
        #[derive(Clone)]
        pub struct Services {
            $(pub $field: $server<$api>,)*
        }

        impl Services {
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
                let service = req
                    .uri()
                    .path()
                    .strip_prefix('/')
                    .and_then(|p| p.split_once('/'))
                    .map_or("", |(service, _)| service);
                match service {
                    $(<$server<$api> as NamedService>::NAME => Either::Left(self.$field.clone().call(req)),)*
                    _ => Either::Right(rest.call(req)),
                }
            }
        }
    };
}

services!(
    sessions: SessionServiceServer<SessionApi>,
    results: ResultServiceServer<ResultApi>,
    discrepancies: DiscrepancyServiceServer<DiscrepancyApi>,
    test_cases: TestCaseServiceServer<TestCaseApi>,
    coverage: CoverageServiceServer<CoverageApi>,
    metrics: MetricsServiceServer<MetricsApi>,
    admin: AdminServiceServer<AdminApi>,
    projects: ProjectServiceServer<ProjectApi>,
    test_runs: TestRunServiceServer<TestRunApi>,
    failures: FailureServiceServer<FailureApi>,
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
