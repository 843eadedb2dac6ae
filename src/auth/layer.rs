//! The tower layer that checks every call's key and scope before any
//! handler runs, and ends streams whose key is revoked or whose lifetime
//! is over.
//!
//! Order of checks, cheapest first, so that hostile traffic costs as little
//! as possible: open services pass; an absent or malformed `authorization`
//! value is refused with no database work at all; a key id the
//! verified-key cache knows is judged from memory (no database round trip:
//! see [`super::cache`] for how revocations still hold within a second);
//! only a cache miss reads the key's row, through a lookup pool and budget
//! of its own, and only while the calling peer has not spent its budget of
//! failed lookups ([`super::limiter`]).
//!
//! Unknown ids and wrong secrets get the same answer ("the API key is not
//! valid"), so a caller cannot probe which ids exist. A revoked key is
//! named as such only to a caller presenting its right secret (its
//! holder): UNAUTHENTICATED with reason `KEY_REVOKED`.
//!
//! Every call past the checks runs with the gateway's page-token key
//! current (see [`crate::pagination::with_signer`]) and carries the key's
//! [`Revocation`] signal in its extensions.

use super::Caller;
use super::cache::{KeyCache, Revocation, Verdict};
use super::keys;
use super::limiter::FailureLimiter;
use super::scopes::{self, Access};
use super::stream::{self, RequestGuard, ResponseGuard, Shape, Stop};
use crate::error::{Error, Reason, error_info};
use crate::pagination::{Signer, in_project, with_signer};
use crate::projects::{self, Directory};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic_types::StatusExt;
use tower::{Layer, Service};

/// Refuses calls without a valid key holding the RPC's scope; with
/// authentication off it only tags calls with their RPC (and still bounds
/// the lifetime of streams).
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

struct Shared {
    keys: KeyCache,
    limiter: FailureLimiter,
    required: bool,
    /// Page-token key of this gateway, made current for every call.
    signer: Signer,
    /// Resolves the project each call works in.
    projects: Directory,
    /// The streaming RPCs, whose bodies are guarded.
    streaming: HashMap<String, Shape>,
    /// The signal of calls without a key (authentication off), made once:
    /// a channel per call would cost an allocation for nothing.
    never: Revocation,
}

impl AuthLayer {
    pub fn new(keys: KeyCache, required: bool, signer: Signer, projects: Directory) -> Self {
        let settings = keys.settings().clone();
        AuthLayer {
            shared: Arc::new(Shared {
                keys,
                limiter: FailureLimiter::new(settings.failure_burst, settings.failures_per_sec),
                required,
                signer,
                projects,
                streaming: stream::streaming_rpcs(),
                never: Revocation::never(),
            }),
        }
    }
}

/// The one answer for unknown ids and wrong secrets (and for anything
/// that is not a Verdict key at all).
fn not_valid() -> Error {
    Error::Unauthenticated(
        "the API key is not valid; send `authorization: Bearer vk_…` with a key from \
         `verdict keys create`"
            .into(),
    )
}

fn rate_limited(wait: Duration) -> tonic::Status {
    let mut details = error_info(Reason::RateLimited);
    details.set_retry_info(Some(wait.max(Duration::from_millis(100))));
    tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        "too many calls with API keys that are not valid came from this address; retry later",
        details,
    )
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn reject(error: Error) -> http::Response<Body> {
    tonic::Status::from(error).into_http()
}

/// The client's address (its /64 for IPv6 is taken by the limiter).
fn peer<B>(req: &http::Request<B>) -> IpAddr {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|t| t.get_ref().remote_addr())
        })
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip())
}

/// Whether a reply is a gRPC error (trailers-only response).
fn is_error(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|s| s.as_bytes() != b"0")
}

/// Calls the handler, guarding the bodies of a streaming call.
async fn guarded<S>(
    mut inner: S,
    mut req: http::Request<Body>,
    shape: Option<Shape>,
    revocation: Option<Revocation>,
    lifetime: Duration,
    signer: Signer,
    project: uuid::Uuid,
) -> Result<http::Response<Body>, S::Error>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    let Some(shape) = shape else {
        return in_project(project, with_signer(signer, inner.call(req))).await;
    };
    let started = tokio::time::Instant::now();
    if shape.client_streaming {
        let stop = Stop::new(revocation.as_ref(), started, lifetime);
        req = req.map(|body| Body::new(RequestGuard::new(body, stop)));
    }
    let response = in_project(project, with_signer(signer, inner.call(req))).await?;
    if shape.client_streaming
        && is_error(&response)
        && let Some(status) = stream::stopped(revocation.as_ref(), started, lifetime)
    {
        // The handler failed because its stream was cut: say why.
        return Ok(status.into_http());
    }
    if shape.server_streaming && !is_error(&response) {
        let stop = Stop::new(revocation.as_ref(), started, lifetime);
        return Ok(response.map(|body| Body::new(ResponseGuard::new(body, stop))));
    }
    Ok(response)
}

impl<S> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);

        let (scope, rpc) = match scopes::access(req.uri().path()) {
            Access::Open => {
                let mut inner = inner;
                return Box::pin(inner.call(req));
            }
            Access::Needs { scope, rpc } => (scope, rpc),
        };
        let shape = self.shared.streaming.get(rpc).copied();
        let lifetime = self.shared.keys.settings().max_stream_lifetime;
        let signer = self.shared.signer.clone();
        let named = req.headers().get(projects::HEADER).cloned();
        if !self.shared.required {
            let shared = self.shared.clone();
            return Box::pin(async move {
                let project = match shared
                    .projects
                    .resolve(named.as_ref().map(|v| v.as_bytes()), None)
                    .await
                {
                    Ok(project) => project,
                    Err(e) => return Ok(reject(e)),
                };
                req.extensions_mut().insert(Caller {
                    key_id: None,
                    rpc,
                    project: Some(project),
                    bound: None,
                });
                req.extensions_mut().insert(shared.never.clone());
                guarded(inner, req, shape, None, lifetime, signer, project).await
            });
        }
        let Some(presented) = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| keys::parse_authorization(v.as_bytes()))
        else {
            let response = if req.headers().contains_key(http::header::AUTHORIZATION) {
                reject(not_valid())
            } else {
                reject(Error::Unauthenticated(
                    "this call needs an API key; send `authorization: Bearer vk_…` with a key \
                     from `verdict keys create`"
                        .into(),
                ))
            };
            return Box::pin(async move { Ok(response) });
        };
        let id = presented.id;
        // Hash now: the presented secret borrows the request's headers.
        let check = presented.checker();
        let cached = self.shared.keys.cached(id, &check);
        let shared = self.shared.clone();
        Box::pin(async move {
            let verdict = match cached {
                Some(verdict) => verdict,
                None => {
                    let peer = peer(&req);
                    // A token of the peer's failure budget is taken only by
                    // a call that reads the row itself.
                    let spent = std::sync::atomic::AtomicBool::new(false);
                    let admit = || {
                        shared.limiter.take(peer)?;
                        spent.store(true, std::sync::atomic::Ordering::Relaxed);
                        Ok(())
                    };
                    let fetched = match shared.keys.fetch(id, &check, admit).await {
                        Ok(fetched) => fetched,
                        Err(wait) => return Ok(rate_limited(wait).into_http()),
                    };
                    // Only refusals spend the peer's budget (a busy or
                    // unreachable database is not the caller's failure).
                    if spent.load(std::sync::atomic::Ordering::Relaxed)
                        && !matches!(fetched, Ok(Verdict::Invalid | Verdict::Revoked))
                    {
                        shared.limiter.refund(peer);
                    }
                    match fetched {
                        Ok(verdict) => verdict,
                        Err(e) => return Ok(reject(e)),
                    }
                }
            };
            let (scopes, bound, revocation) = match verdict {
                Verdict::Valid {
                    scopes,
                    project,
                    revocation,
                } => (scopes, project, revocation),
                Verdict::Invalid => return Ok(reject(not_valid())),
                Verdict::Revoked => return Ok(stream::revoked_status().into_http()),
            };
            if !scopes.contains(scope) {
                return Ok(reject(Error::PermissionDenied(format!(
                    "this call needs the `{}` scope; key {id} has `{}`",
                    scope.as_str(),
                    scopes.to_list()
                ))));
            }
            let project = match shared
                .projects
                .resolve(named.as_ref().map(|v| v.as_bytes()), bound)
                .await
            {
                Ok(project) => project,
                Err(e) => return Ok(reject(e)),
            };
            req.extensions_mut().insert(Caller {
                key_id: Some(id),
                rpc,
                project: Some(project),
                bound,
            });
            req.extensions_mut().insert(revocation.clone());
            guarded(
                inner,
                req,
                shape,
                Some(revocation),
                lifetime,
                signer,
                project,
            )
            .await
        })
    }
}
