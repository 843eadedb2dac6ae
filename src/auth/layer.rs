//! The tower layer that checks every call's key and scope before any
//! handler runs.
//!
//! Order of checks, cheapest first, so that hostile traffic costs as little
//! as possible: open services pass; an absent or malformed `authorization`
//! value is refused with no database work at all; a key id known (on this
//! replica) to be unknown or revoked is refused from a small bounded cache;
//! only then is the key's row read — one indexed point read per call, no
//! cache of valid keys, so a revocation holds from the next call on every
//! replica. Every call past the checks runs with the gateway's page-token
//! key current (see [`crate::pagination::with_signer`]).

use super::keys::{self, KeyId};
use super::scopes::{self, Access};
use super::{Caller, ScopeSet};
use crate::call::Call;
use crate::db::Db;
use crate::error::Error;
use crate::pagination::{Signer, with_signer};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

/// How long a key id that matched no row is refused without a lookup. Ids
/// are 64 random bits: no one presents a key's id before it exists, so this
/// can only shield the database from repeated bad ids.
const UNKNOWN_TTL: Duration = Duration::from_secs(60);
/// Most ids remembered; the cache is emptied when full.
const NEGATIVE_CAPACITY: usize = 10_000;

/// Refuses calls without a valid key holding the RPC's scope; with
/// authentication off it only tags calls with their RPC.
#[derive(Clone)]
pub struct AuthLayer {
    shared: Arc<Shared>,
}

struct Shared {
    db: Db,
    required: bool,
    /// Page-token key of this gateway, made current for every call.
    signer: Signer,
    /// Key ids refused recently: unknown (until the instant) or revoked
    /// (`None`: revocation is final).
    refused: Mutex<HashMap<KeyId, Option<Instant>>>,
}

impl AuthLayer {
    pub fn new(db: Db, required: bool, signer: Signer) -> Self {
        AuthLayer {
            shared: Arc::new(Shared {
                db,
                required,
                signer,
                refused: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl Shared {
    fn recently_refused(&self, id: KeyId) -> bool {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match refused.get(&id) {
            Some(None) => true,
            Some(Some(until)) if *until > Instant::now() => true,
            Some(Some(_)) => {
                refused.remove(&id);
                false
            }
            None => false,
        }
    }

    fn refuse(&self, id: KeyId, until: Option<Instant>) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if refused.len() >= NEGATIVE_CAPACITY {
            refused.clear();
        }
        refused.insert(id, until);
    }

    /// The key's scopes when the presented token is valid.
    async fn authenticate(
        &self,
        id: KeyId,
        secret_hash_ok: impl Fn(&[u8]) -> bool,
    ) -> Result<ScopeSet, Error> {
        let mut conn = self.db.conn(&Call::default()).await?;
        let state = keys::lookup(conn.client().await?, id).await?;
        drop(conn);
        match state {
            None => {
                self.refuse(id, Some(Instant::now() + UNKNOWN_TTL));
                Err(unauthenticated("the API key is not known"))
            }
            Some(s) if s.revoked => {
                self.refuse(id, None);
                Err(unauthenticated("the API key was revoked"))
            }
            Some(s) if !secret_hash_ok(&s.secret_hash) => {
                Err(unauthenticated("the API key is not valid"))
            }
            Some(s) => Ok(s.scopes),
        }
    }
}

fn unauthenticated(why: &str) -> Error {
    Error::Unauthenticated(format!(
        "{why}; send `authorization: Bearer vk_…` with a key from `verdict keys create`"
    ))
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

fn reject(error: Error) -> http::Response<tonic::body::Body> {
    tonic::Status::from(error).into_http()
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Auth<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);

        let (scope, rpc) = match scopes::access(req.uri().path()) {
            Access::Open => return Box::pin(inner.call(req)),
            Access::Needs { scope, rpc } => (scope, rpc),
        };
        if !self.shared.required {
            req.extensions_mut().insert(Caller { key_id: None, rpc });
            return Box::pin(with_signer(self.shared.signer.clone(), inner.call(req)));
        }
        let Some(presented) = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| keys::parse_authorization(v.as_bytes()))
        else {
            let missing = !req.headers().contains_key(http::header::AUTHORIZATION);
            let why = if missing {
                "this call needs an API key"
            } else {
                "the authorization value is not a Verdict API key"
            };
            let response = reject(unauthenticated(why));
            return Box::pin(async move { Ok(response) });
        };
        let id = presented.id;
        if self.shared.recently_refused(id) {
            let response = reject(unauthenticated("the API key is not known or was revoked"));
            return Box::pin(async move { Ok(response) });
        }
        // Hash now: the presented secret borrows the request's headers.
        let check = presented.checker();
        let shared = self.shared.clone();
        Box::pin(async move {
            let scopes = match shared
                .authenticate(id, |stored| check.matches(stored))
                .await
            {
                Ok(scopes) => scopes,
                Err(e) => return Ok(reject(e)),
            };
            if !scopes.contains(scope) {
                return Ok(reject(Error::PermissionDenied(format!(
                    "this call needs the `{}` scope; key {id} has `{}`",
                    scope.as_str(),
                    scopes.to_list()
                ))));
            }
            req.extensions_mut().insert(Caller {
                key_id: Some(id),
                rpc,
            });
            with_signer(shared.signer.clone(), inner.call(req)).await
        })
    }
}
