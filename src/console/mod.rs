//! What browsers meet on the gRPC port, outside the gRPC-Web translation:
//! CORS for the origins of `VERDICT_CORS_ORIGINS` (preflight `OPTIONS`
//! answered here, reply headers added to calls from those origins), and the
//! read-only console's static files at `/console/` when `VERDICT_CONSOLE` is
//! on (built from `console/` by `scripts/console-build.sh`, embedded in the
//! binary).
//!
//! Native gRPC calls pay one method comparison and one header lookup here.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// The console's files: path under `/console/`, content type, bytes. The
/// page and its style are embedded from the sources; only the script is a
/// build output (scripts/console-build.sh).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_bytes!("../../console/src/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/src/app.css"),
    ),
];

/// Request headers a browser may send on a cross-origin call: what
/// gRPC-Web and Connect clients send, plus Verdict's own metadata.
const ALLOW_HEADERS: &str = "authorization, content-type, x-grpc-web, x-user-agent, grpc-timeout, \
     x-verdict-project, x-verdict-consistency-token, x-request-id, traceparent";

/// Reply headers a cross-origin page may read: the status (sent as headers
/// in a trailers-only reply) and Verdict's consistency token.
const EXPOSE_HEADERS: &str = "grpc-status, grpc-message, grpc-status-details-bin, \
     x-verdict-consistency-token";

/// Browser-facing settings: allowed origins and whether the console is on.
#[derive(Clone)]
pub struct WebLayer {
    settings: Arc<Settings>,
}

struct Settings {
    origins: Vec<HeaderValue>,
    console: bool,
}

impl WebLayer {
    /// `origins` as given in `VERDICT_CORS_ORIGINS` (exact matches, e.g.
    /// `http://localhost:5173`; a trailing `/` is ignored; `*` is refused).
    pub fn new(origins: &[String], console: bool) -> anyhow::Result<Self> {
        let mut allowed = Vec::new();
        for origin in origins {
            let origin = origin.trim().trim_end_matches('/');
            if origin.is_empty() {
                continue;
            }
            anyhow::ensure!(
                origin != "*",
                "VERDICT_CORS_ORIGINS: `*` is not accepted, name each origin (scheme://host[:port])"
            );
            anyhow::ensure!(
                (origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin["https://".len().min(origin.len())..].contains('/'),
                "VERDICT_CORS_ORIGINS: {origin:?} is not an origin (scheme://host[:port])"
            );
            allowed.push(HeaderValue::from_str(origin).map_err(|_| {
                anyhow::anyhow!("VERDICT_CORS_ORIGINS: {origin:?} is not a valid header value")
            })?);
        }
        Ok(Self {
            settings: Arc::new(Settings {
                origins: allowed,
                console,
            }),
        })
    }
}

impl<S> Layer<S> for WebLayer {
    type Service = Web<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Web {
            inner,
            settings: self.settings.clone(),
        }
    }
}

/// See [`WebLayer`].
#[derive(Clone)]
pub struct Web<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl Settings {
    /// The request's origin when it is an allowed one.
    fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        self.origins.iter().find(|o| *o == origin).cloned()
    }
}

impl<S, ReqBody> Service<Request<ReqBody>> for Web<S>
where
    S: Service<Request<ReqBody>, Response = Response<tonic::body::Body>>,
{
    type Response = Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = WebFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if req.method() == Method::POST {
            let origin = if self.settings.origins.is_empty() {
                None
            } else {
                self.settings.allowed_origin(req.headers())
            };
            return WebFuture {
                state: State::Inner {
                    future: self.inner.call(req),
                    origin,
                },
            };
        }
        let response = if req.method() == Method::OPTIONS {
            self.preflight(req.headers())
        } else if req.method() == Method::GET || req.method() == Method::HEAD {
            self.get(&req)
        } else {
            plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        };
        WebFuture {
            state: State::Ready {
                response: Some(response),
            },
        }
    }
}

impl<S> Web<S> {
    /// A CORS preflight: 204 with the CORS headers for an allowed origin,
    /// 403 without any for every other request.
    fn preflight(&self, headers: &HeaderMap) -> Response<tonic::body::Body> {
        let Some(origin) = self.settings.allowed_origin(headers) else {
            return plain(StatusCode::FORBIDDEN, "origin not allowed\n");
        };
        let mut response = Response::new(tonic::body::Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOW_HEADERS),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("origin"));
        response
    }

    /// The console's files, or 404.
    fn get<B>(&self, req: &Request<B>) -> Response<tonic::body::Body> {
        let path = req.uri().path();
        if !self.settings.console {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        }
        if path == "/" || path == "/console" {
            let mut response = Response::new(tonic::body::Body::empty());
            *response.status_mut() = StatusCode::FOUND;
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/console/"));
            return response;
        }
        let Some(name) = path.strip_prefix("/console/") else {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        };
        let name = if name.is_empty() { "index.html" } else { name };
        let Some((_, content_type, bytes)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
            return plain(StatusCode::NOT_FOUND, "not found\n");
        };
        let body = if req.method() == Method::HEAD {
            tonic::body::Body::empty()
        } else {
            tonic::body::Body::new(http_body_full(bytes))
        };
        let mut response = Response::new(body);
        let h = response.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                 style-src 'self'; frame-ancestors 'none'",
            ),
        );
        response
    }
}

/// A short text reply.
fn plain(status: StatusCode, text: &'static str) -> Response<tonic::body::Body> {
    let mut response = Response::new(tonic::body::Body::new(http_body_full(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A body of one static frame.
fn http_body_full(bytes: &'static [u8]) -> StaticBody {
    StaticBody(Some(bytes::Bytes::from_static(bytes)))
}

struct StaticBody(Option<bytes::Bytes>);

impl http_body::Body for StaticBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|b| Ok(http_body::Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
    }
}

pin_project_lite::pin_project! {
    /// The reply of [`Web`]: the inner call's (with CORS headers for an
    /// allowed origin), or one made here.
    pub struct WebFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] future: F, origin: Option<HeaderValue> },
        Ready { response: Option<Response<tonic::body::Body>> },
    }
}

impl<F, E> Future for WebFuture<F>
where
    F: Future<Output = Result<Response<tonic::body::Body>, E>>,
{
    type Output = Result<Response<tonic::body::Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { future, origin } => {
                let mut response = std::task::ready!(future.poll(cx))?;
                if let Some(origin) = origin.take() {
                    let h = response.headers_mut();
                    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
                    h.insert(
                        header::ACCESS_CONTROL_EXPOSE_HEADERS,
                        HeaderValue::from_static(EXPOSE_HEADERS),
                    );
                    h.append(header::VARY, HeaderValue::from_static("origin"));
                }
                Poll::Ready(Ok(response))
            }
            StateProj::Ready { response } => Poll::Ready(Ok(response
                .take()
                .expect("WebFuture polled after completion"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn origins_are_exact_and_a_wildcard_or_a_path_is_refused() {
        let cli = crate::config::Cli::parse_from([
            "verdict",
            "--cors-origins",
            "http://localhost:5173,https://qa.example.com/",
        ]);
        let layer = WebLayer::new(&cli.config.cors_origins, false).unwrap();
        assert_eq!(
            layer.settings.origins,
            ["http://localhost:5173", "https://qa.example.com"]
        );
        assert!(WebLayer::new(&["*".into()], false).is_err());
        assert!(WebLayer::new(&["qa.example.com".into()], false).is_err());
        assert!(WebLayer::new(&["https://qa.example.com/app".into()], false).is_err());
        let none = crate::config::Cli::parse_from(["verdict"]);
        assert!(none.config.cors_origins.is_empty());
        assert!(!none.config.console);
    }
}
