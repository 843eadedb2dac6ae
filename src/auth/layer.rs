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
//! Every call past the checks runs in its project with the gateway's
//! page-token key current (see [`crate::pagination::scoped`]); a streaming
//! call also carries the key's [`Revocation`] signal in its extensions (a
//! unary call is judged once, when it is admitted). A unary call whose key
//! the cache admitted (or that needs none) and whose project is known
//! without a read goes straight to the handler polled ready: no box, no
//! clone of the stack below.

use super::Caller;
use super::cache::{KeyCache, Revocation, Verdict};
use super::keys;
use super::limiter::FailureLimiter;
use super::scopes::{self, Access};
use super::stream::{self, RequestGuard, ResponseGuard, Shape, Stop};
use crate::error::{Error, Reason, error_info};
use crate::pagination::{Scoped, Signer, scoped};
use crate::projects::{self, Directory};
use futures::future::{BoxFuture, Either};
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
    /// The signal of streams without a key (authentication off), made
    /// once: a channel per stream would cost an allocation for nothing.
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
        return scoped(project, signer, inner.call(req)).await;
    };
    let started = tokio::time::Instant::now();
    if shape.client_streaming {
        let stop = Stop::new(revocation.as_ref(), started, lifetime);
        req = req.map(|body| Body::new(RequestGuard::new(body, stop)));
    }
    let response = scoped(project, signer, inner.call(req)).await?;
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

/// What a key the cache or the database judged may do in a call needing
/// `scope`: its binding, or the reply refusing it.
fn admit_key(verdict: Verdict, scope: super::Scope, id: keys::KeyId) -> Result<Admitted, Refusal> {
    match verdict {
        Verdict::Valid { scopes, project } => {
            if scopes.contains(scope) {
                Ok(project)
            } else {
                Err(Box::new(reject(Error::PermissionDenied(format!(
                    "this call needs the `{}` scope; key {id} has `{}`",
                    scope.as_str(),
                    scopes.to_list()
                )))))
            }
        }
        Verdict::Invalid => Err(Box::new(reject(not_valid()))),
        Verdict::Revoked => Err(Box::new(stream::revoked_status().into_http())),
    }
}

/// The reply refusing a call.
type Refusal = Box<http::Response<Body>>;

/// An admitted call's key binding (`None`: every project, or no key).
type Admitted = Option<uuid::Uuid>;

/// Where a call's key stands before its project is resolved.
enum Judged {
    /// Admitted (by the cache, or without a key).
    Admitted(Admitted),
    /// The key's row must be read first (the cache does not know it).
    Unread {
        id: keys::KeyId,
        check: keys::SecretCheck,
        scope: super::Scope,
    },
}

/// A reply made without calling the handler.
fn answer<E: Send + 'static>(
    response: http::Response<Body>,
) -> BoxFuture<'static, Result<http::Response<Body>, E>> {
    Box::pin(std::future::ready(Ok(response)))
}

impl<S> Service<http::Request<Body>> for Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    /// Right: a unary call whose key and project were known without a
    /// database read, handed to the ready handler as it is (no clone of
    /// the stack below, no box). Left: everything else.
    type Future =
        Either<BoxFuture<'static, Result<Self::Response, Self::Error>>, Scoped<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let (scope, rpc) = match scopes::access(req.uri().path()) {
            Access::Open => return Either::Left(Box::pin(self.inner.call(req))),
            Access::Needs { scope, rpc } => (scope, rpc),
        };
        let shape = self.shared.streaming.get(rpc).copied();
        if !self.shared.required {
            return self.call_judged(req, rpc, shape, None, Judged::Admitted(None));
        }
        let Some(presented) = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| keys::parse_authorization(v.as_bytes()))
        else {
            return Either::Left(answer(
                if req.headers().contains_key(http::header::AUTHORIZATION) {
                    reject(not_valid())
                } else {
                    reject(Error::Unauthenticated(
                        "this call needs an API key; send `authorization: Bearer vk_…` with a \
                         key from `verdict keys create`"
                            .into(),
                    ))
                },
            ));
        };
        let id = presented.id;
        // Hash now: the presented secret borrows the request's headers.
        let check = presented.checker();
        let judged = match self.shared.keys.cached(id, &check) {
            None => Judged::Unread { id, check, scope },
            Some(verdict) => match admit_key(verdict, scope, id) {
                Ok(admitted) => Judged::Admitted(admitted),
                Err(refusal) => return Either::Left(answer(*refusal)),
            },
        };
        self.call_judged(req, rpc, shape, Some(id), judged)
    }
}

impl<S> Auth<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    /// Calls the handler once the project is resolved: straight when
    /// the key is admitted and the project known without a database read
    /// (unary calls only; streams take the guarded path), else boxed.
    fn call_judged(
        &mut self,
        mut req: http::Request<Body>,
        rpc: &'static str,
        shape: Option<Shape>,
        key_id: Option<keys::KeyId>,
        judged: Judged,
    ) -> <Self as Service<http::Request<Body>>>::Future {
        let caller = move |project, bound| Caller {
            key_id,
            rpc,
            project: Some(project),
            bound,
        };
        if let (Judged::Admitted(bound), None) = (&judged, shape) {
            let named = req.headers().get(projects::HEADER).map(|v| v.as_bytes());
            match self.shared.projects.resolve_known(named, *bound) {
                Some(Ok(project)) => {
                    req.extensions_mut().insert(caller(project, *bound));
                    let signer = self.shared.signer.clone();
                    return Either::Right(scoped(project, signer, self.inner.call(req)));
                }
                Some(Err(e)) => return Either::Left(answer(reject(e))),
                None => {}
            }
        }
        let lifetime = self.shared.keys.settings().max_stream_lifetime;
        let shared = self.shared.clone();
        // The ready handler goes with the call; a clone stays for later ones.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Either::Left(Box::pin(async move {
            let bound = match judged {
                Judged::Admitted(admitted) => admitted,
                Judged::Unread { id, check, scope } => {
                    match shared.read_key(peer(&req), id, &check, scope).await {
                        Ok(admitted) => admitted,
                        Err(refusal) => return Ok(*refusal),
                    }
                }
            };
            let named = req.headers().get(projects::HEADER).map(|v| v.as_bytes());
            let project = match shared.projects.resolve(named, bound).await {
                Ok(project) => project,
                Err(e) => return Ok(reject(e)),
            };
            req.extensions_mut().insert(caller(project, bound));
            // A stream hears of its key's revocation: subscribed now that the
            // key is judged (a revocation since has fired the signal, and a
            // fired signal is kept). Without a key, the signal that never fires.
            let signal = match (shape, key_id) {
                (Some(_), Some(id)) => Some(shared.keys.subscribe(id)),
                _ => None,
            };
            if shape.is_some() {
                let heard = signal.clone().unwrap_or_else(|| shared.never.clone());
                req.extensions_mut().insert(heard);
            }
            let signer = shared.signer.clone();
            guarded(inner, req, shape, signal, lifetime, signer, project).await
        }))
    }
}

impl Shared {
    /// Reads key `id`'s row (the cache did not know it) and judges the
    /// call, within the calling peer's budget of failed lookups.
    async fn read_key(
        &self,
        peer: IpAddr,
        id: keys::KeyId,
        check: &keys::SecretCheck,
        scope: super::Scope,
    ) -> Result<Admitted, Refusal> {
        // A token of the peer's failure budget is taken only by a call
        // that reads the row itself.
        let spent = std::sync::atomic::AtomicBool::new(false);
        let admit = || {
            self.limiter.take(peer)?;
            spent.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        };
        let fetched = match self.keys.fetch(id, check, admit).await {
            Ok(fetched) => fetched,
            Err(wait) => return Err(Box::new(rate_limited(wait).into_http())),
        };
        // Only refusals spend the peer's budget (a busy or unreachable
        // database is not the caller's failure).
        if spent.load(std::sync::atomic::Ordering::Relaxed)
            && !matches!(fetched, Ok(Verdict::Invalid | Verdict::Revoked))
        {
            self.limiter.refund(peer);
        }
        match fetched {
            Ok(verdict) => admit_key(verdict, scope, id),
            Err(e) => Err(Box::new(reject(e))),
        }
    }
}
