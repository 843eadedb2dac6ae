//! gRPC-Web on the gateway's own port, over plain HTTP/1.1 as a browser
//! sends it: the same answers as native gRPC (binary and base64 text
//! encodings), the same authentication and scopes, CORS only for the
//! configured origins, server streaming, and the console's files.

use crate::helpers::{
    auth_config, create_database, create_key, spawn_app, spawn_app_with, test_config,
};
use crate::sessions::{create, new_session, set_status};
use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prost::Message;
use std::time::Duration;
use verdict::proto::get_session_request::Lookup;
use verdict::proto::watch_session_response::Event;
use verdict::proto::{
    CreateSessionResponse, GetSessionRequest, GetSessionResponse, ListSessionsRequest,
    ListSessionsResponse, SessionStatus, WatchSessionRequest, WatchSessionResponse,
};

const BINARY: &str = "application/grpc-web+proto";
const TEXT: &str = "application/grpc-web-text";

/// One HTTP/1.1 request on a fresh connection; returns the response with its
/// body still streaming.
async fn http1(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> http::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("127.0.0.1:{port}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let request = request.body(Full::new(body)).unwrap();
    tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("a reply within 10 s")
        .unwrap()
}

/// `message` as a gRPC-Web request body in `content_type`'s encoding.
fn web_body(content_type: &str, message: &impl Message) -> Bytes {
    let payload = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    framed.extend_from_slice(&payload);
    if content_type == TEXT {
        Bytes::from(base64::engine::general_purpose::STANDARD.encode(framed))
    } else {
        Bytes::from(framed)
    }
}

/// Reads a gRPC-Web reply body frame by frame.
struct WebReader {
    body: Incoming,
    text: bool,
    /// Base64 characters not yet decoded (less than a quantum).
    pending: Vec<u8>,
    decoded: BytesMut,
    /// The status in the reply's headers (a trailers-only reply).
    header_status: Option<String>,
}

/// One gRPC-Web frame: a message, or the trailers.
#[derive(Debug)]
enum WebFrame {
    Message(Bytes),
    Trailers(String),
}

impl WebReader {
    fn new(response: http::Response<Incoming>) -> Self {
        let content_type = response.headers()["content-type"].to_str().unwrap();
        let text = content_type.starts_with(TEXT);
        let header_status = response
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned());
        Self {
            body: response.into_body(),
            text,
            pending: Vec::new(),
            decoded: BytesMut::new(),
            header_status,
        }
    }

    /// The next frame, None at the end of the body (bounded: 10 s).
    async fn next(&mut self) -> Option<WebFrame> {
        loop {
            if self.decoded.len() >= 5 {
                let len = u32::from_be_bytes(self.decoded[1..5].try_into().unwrap()) as usize;
                if self.decoded.len() >= 5 + len {
                    let flag = self.decoded[0];
                    self.decoded.advance(5);
                    let payload = self.decoded.split_to(len).freeze();
                    return Some(if flag & 0x80 != 0 {
                        WebFrame::Trailers(String::from_utf8(payload.to_vec()).unwrap())
                    } else {
                        WebFrame::Message(payload)
                    });
                }
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("a frame within 10 s");
            let Some(frame) = frame else {
                assert!(self.decoded.is_empty(), "a frame was cut off");
                return None;
            };
            let Ok(data) = frame.unwrap().into_data() else {
                continue;
            };
            if self.text {
                // Each 4-character quantum of base64 decodes on its own; the
                // gateway pads every chunk it encodes.
                self.pending.extend_from_slice(&data);
                let whole = self.pending.len() / 4 * 4;
                let quanta: Vec<u8> = self.pending.drain(..whole).collect();
                for quantum in quanta.chunks(4) {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(quantum)
                        .expect("base64 reply");
                    self.decoded.extend_from_slice(&bytes);
                }
            } else {
                self.decoded.extend_from_slice(&data);
            }
        }
    }

    /// Every message and the status (from the trailers frame, or from the
    /// headers of a trailers-only reply).
    async fn finish(mut self) -> (Vec<Bytes>, String) {
        let mut messages = Vec::new();
        let mut status = self.header_status.take();
        while let Some(frame) = self.next().await {
            match frame {
                WebFrame::Message(m) => messages.push(m),
                WebFrame::Trailers(t) => status = Some(grpc_status(&t)),
            }
        }
        (messages, status.expect("a grpc-status"))
    }
}

/// The value of `grpc-status` in a trailers frame.
fn grpc_status(trailers: &str) -> String {
    trailers
        .split("\r\n")
        .find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("grpc-status")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no grpc-status in {trailers:?}"))
}

/// A unary gRPC-Web call: (messages, grpc-status).
async fn unary(
    port: u16,
    method: &str,
    content_type: &str,
    message: &impl Message,
    headers: &[(&str, &str)],
) -> (Vec<Bytes>, String) {
    let mut all = vec![
        ("content-type", content_type),
        ("accept", content_type),
        ("x-grpc-web", "1"),
    ];
    all.extend_from_slice(headers);
    let response = http1(port, "POST", method, &all, web_body(content_type, message)).await;
    assert_eq!(response.status(), 200, "gRPC-Web replies are HTTP 200");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with(content_type),
        "the reply is in the request's encoding"
    );
    WebReader::new(response).finish().await
}

const GET_SESSION: &str = "/verdict.v1.SessionService/GetSession";
const CREATE_SESSION: &str = "/verdict.v1.SessionService/CreateSession";

#[tokio::test]
async fn grpc_web_binary_and_text_get_the_same_answers_as_native_grpc() {
    let app = spawn_app().await;
    // Written over gRPC-Web, read back natively.
    let (messages, status) = unary(
        app.port,
        CREATE_SESSION,
        BINARY,
        &new_session("web-created"),
        &[],
    )
    .await;
    assert_eq!(status, "0");
    let created = CreateSessionResponse::decode(messages[0].clone())
        .unwrap()
        .session
        .unwrap();
    let get = GetSessionRequest {
        lookup: Some(Lookup::Id(created.id.clone())),
        ..Default::default()
    };
    let native = app
        .sessions
        .clone()
        .get_session(get.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(native.session.as_ref(), Some(&created));

    // Several browsers at once, in both encodings: each gets the native answer.
    let calls = (0..8).map(|i| {
        let get = get.clone();
        let content_type = if i % 2 == 0 { BINARY } else { TEXT };
        async move { unary(app.port, GET_SESSION, content_type, &get, &[]).await }
    });
    for (messages, status) in futures::future::join_all(calls).await {
        assert_eq!(status, "0");
        assert_eq!(messages.len(), 1);
        assert_eq!(
            GetSessionResponse::decode(messages[0].clone()).unwrap(),
            native
        );
    }

    // A list is the same list.
    create(&app, "native-created").await;
    let list = ListSessionsRequest::default();
    let native = app
        .sessions
        .clone()
        .list_sessions(list.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(native.sessions.len(), 2);
    let (messages, status) = unary(
        app.port,
        "/verdict.v1.SessionService/ListSessions",
        TEXT,
        &list,
        &[],
    )
    .await;
    assert_eq!(status, "0");
    assert_eq!(
        ListSessionsResponse::decode(messages[0].clone()).unwrap(),
        native
    );

    // An error is the same error: NOT_FOUND with its ErrorInfo.
    let missing = GetSessionRequest {
        lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
        ..Default::default()
    };
    let (messages, status) = unary(app.port, GET_SESSION, BINARY, &missing, &[]).await;
    assert!(messages.is_empty());
    assert_eq!(status, "5", "NOT_FOUND");
}

#[tokio::test]
async fn grpc_web_calls_pass_the_same_authentication_and_scopes_as_native_calls() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let read = create_key(&config, "reader", "read").await.1;
    let write = create_key(&config, "writer", "write").await.1;
    let app = spawn_app_with(config).await;
    let read = format!("Bearer {read}");
    let write = format!("Bearer {write}");
    let get = GetSessionRequest {
        lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
        ..Default::default()
    };

    for content_type in [BINARY, TEXT] {
        // No key: UNAUTHENTICATED, and the handler never ran.
        let (messages, status) = unary(app.port, GET_SESSION, content_type, &get, &[]).await;
        assert!(messages.is_empty());
        assert_eq!(status, "16", "UNAUTHENTICATED without a key");
        // A made-up key: UNAUTHENTICATED.
        let (_, status) = unary(
            app.port,
            GET_SESSION,
            content_type,
            &get,
            &[("authorization", "Bearer vk_0123456789abcdef_forged")],
        )
        .await;
        assert_eq!(status, "16", "UNAUTHENTICATED with a forged key");
        // A read key reads (NOT_FOUND comes from the handler) but cannot write.
        let (_, status) = unary(
            app.port,
            GET_SESSION,
            content_type,
            &get,
            &[("authorization", &read)],
        )
        .await;
        assert_eq!(status, "5", "the read key reached the handler");
        let (_, status) = unary(
            app.port,
            CREATE_SESSION,
            content_type,
            &new_session("by-reader"),
            &[("authorization", &read)],
        )
        .await;
        assert_eq!(status, "7", "PERMISSION_DENIED: a read key cannot write");
        // A write key cannot read.
        let (_, status) = unary(
            app.port,
            GET_SESSION,
            content_type,
            &get,
            &[("authorization", &write)],
        )
        .await;
        assert_eq!(status, "7", "PERMISSION_DENIED: a write key cannot read");
    }
    // Nothing was written by the refused calls.
    let rows: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn cors_headers_go_only_to_the_configured_origins() {
    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.cors_origins = vec!["http://console.test:8080".into(), "https://qa.test/".into()];
    let app = spawn_app_with(config).await;
    let preflight = |origin: &'static str| async move {
        http1(
            app.port,
            "OPTIONS",
            GET_SESSION,
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,content-type,x-grpc-web,x-verdict-project",
                ),
            ],
            Bytes::new(),
        )
        .await
    };

    for origin in ["http://console.test:8080", "https://qa.test"] {
        let allowed = preflight(origin).await;
        assert_eq!(allowed.status(), 204);
        let h = allowed.headers();
        assert_eq!(h["access-control-allow-origin"], origin);
        assert!(
            h["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains("POST")
        );
        let allow_headers = h["access-control-allow-headers"].to_str().unwrap();
        for name in [
            "authorization",
            "content-type",
            "x-grpc-web",
            "x-verdict-project",
        ] {
            assert!(
                allow_headers.contains(name),
                "{name} allowed: {allow_headers}"
            );
        }
    }
    for origin in [
        "http://evil.test",
        "http://console.test",
        "https://qa.test.evil.test",
    ] {
        let refused = preflight(origin).await;
        assert_eq!(refused.status(), 403, "{origin}");
        assert!(
            !refused
                .headers()
                .contains_key("access-control-allow-origin")
        );
    }

    // An actual call from an allowed origin can read its status; from
    // another origin the reply carries no CORS header (the browser hides it).
    let get = GetSessionRequest {
        lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
        ..Default::default()
    };
    let body = web_body(BINARY, &get);
    let call = |origin: &'static str| {
        let body = body.clone();
        async move {
            http1(
                app.port,
                "POST",
                GET_SESSION,
                &[
                    ("content-type", BINARY),
                    ("x-grpc-web", "1"),
                    ("origin", origin),
                ],
                body,
            )
            .await
        }
    };
    let allowed = call("http://console.test:8080").await;
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "http://console.test:8080"
    );
    let exposed = allowed.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(exposed.contains("grpc-status") && exposed.contains("grpc-message"));
    assert_eq!(WebReader::new(allowed).finish().await.1, "5");
    let other = call("http://evil.test").await;
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    assert!(
        !other
            .headers()
            .contains_key("access-control-expose-headers")
    );
}

#[tokio::test]
async fn without_cors_origins_no_origin_gets_cors_headers() {
    let app = spawn_app().await;
    let refused = http1(
        app.port,
        "OPTIONS",
        GET_SESSION,
        &[
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "POST"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(refused.status(), 403);
    assert!(
        !refused
            .headers()
            .contains_key("access-control-allow-origin")
    );
    let get = GetSessionRequest {
        lookup: Some(Lookup::Id(uuid::Uuid::new_v4().to_string())),
        ..Default::default()
    };
    let response = http1(
        app.port,
        "POST",
        GET_SESSION,
        &[
            ("content-type", BINARY),
            ("origin", "http://localhost:3000"),
        ],
        web_body(BINARY, &get),
    )
    .await;
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
}

#[tokio::test]
async fn watch_session_streams_over_grpc_web_until_the_final_status() {
    let app = spawn_app().await;
    let session = create(&app, "watched-from-a-browser").await;
    for content_type in [BINARY, TEXT] {
        let response = http1(
            app.port,
            "POST",
            "/verdict.v1.SessionService/WatchSession",
            &[
                ("content-type", content_type),
                ("accept", content_type),
                ("x-grpc-web", "1"),
            ],
            web_body(
                content_type,
                &WatchSessionRequest {
                    id: session.id.clone(),
                    ..Default::default()
                },
            ),
        )
        .await;
        assert_eq!(response.status(), 200);
        let mut reader = WebReader::new(response);
        let status_of = |frame: Option<WebFrame>| match frame {
            Some(WebFrame::Message(m)) => match WatchSessionResponse::decode(m).unwrap().event {
                Some(Event::Session(s)) => SessionStatus::try_from(s.status).unwrap(),
                other => panic!("expected a session state, got {other:?}"),
            },
            other => panic!("expected a message, got {other:?}"),
        };
        if content_type == BINARY {
            assert_eq!(status_of(reader.next().await), SessionStatus::Pending);
            // Changes made natively while the browser watches reach it.
            set_status(&app, &session.id, SessionStatus::Processing)
                .await
                .unwrap();
            assert_eq!(status_of(reader.next().await), SessionStatus::Processing);
            set_status(&app, &session.id, SessionStatus::Completed)
                .await
                .unwrap();
            assert_eq!(status_of(reader.next().await), SessionStatus::Completed);
        } else {
            // A watch of a finished session: its final state, then OK.
            assert_eq!(status_of(reader.next().await), SessionStatus::Completed);
        }
        match reader.next().await {
            Some(WebFrame::Trailers(t)) => assert_eq!(grpc_status(&t), "0", "{t}"),
            other => panic!("expected the trailers, got {other:?}"),
        }
        assert!(
            reader.next().await.is_none(),
            "the body ends after the trailers"
        );
    }
}

#[tokio::test]
async fn the_console_is_off_by_default_and_served_from_the_binary_when_on() {
    let app = spawn_app().await;
    let off = http1(app.port, "GET", "/console/", &[], Bytes::new()).await;
    assert_eq!(off.status(), 404);

    let (_, url) = create_database().await;
    let mut config = test_config(&url);
    config.console = true;
    let app = spawn_app_with(config).await;
    let page = http1(app.port, "GET", "/console/", &[], Bytes::new()).await;
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(
        page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    let html = page.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        html,
        Bytes::from_static(include_bytes!("../../console/src/index.html"))
    );
    let js = http1(app.port, "GET", "/console/app.js", &[], Bytes::new()).await;
    assert_eq!(js.status(), 200);
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    for missing in ["/console/../Cargo.toml", "/console/nope.js", "/metrics"] {
        let r = http1(app.port, "GET", missing, &[], Bytes::new()).await;
        assert_eq!(r.status(), 404, "{missing}");
    }
    let redirect = http1(app.port, "GET", "/console", &[], Bytes::new()).await;
    assert_eq!(redirect.status(), 302);
    assert_eq!(redirect.headers()["location"], "/console/");
    // Native gRPC on the same port is unaffected.
    create(&app, "still-native").await;
}

#[tokio::test]
async fn careless_grpc_web_requests_get_errors_and_leave_the_gateway_serving() {
    let app = spawn_app().await;
    let call = |content_type: &'static str, body: Bytes| async move {
        http1(
            app.port,
            "POST",
            CREATE_SESSION,
            &[("content-type", content_type), ("x-grpc-web", "1")],
            body,
        )
        .await
    };
    // Text that is not base64.
    let response = call(TEXT, Bytes::from_static(b"!!not base64 at all!!")).await;
    let status = if response.status() == 200 {
        WebReader::new(response).finish().await.1
    } else {
        assert!(response.status().is_client_error(), "{}", response.status());
        "http".into()
    };
    assert_ne!(status, "0", "malformed text is refused");
    // A frame that claims more than the message limit.
    let mut huge = vec![0u8];
    huge.extend_from_slice(&(64u32 << 20).to_be_bytes());
    huge.extend_from_slice(&[0u8; 64]);
    let (messages, status) = WebReader::new(call(BINARY, Bytes::from(huge)).await)
        .finish()
        .await;
    assert!(messages.is_empty());
    assert_eq!(status, "8", "RESOURCE_EXHAUSTED for a frame over the limit");
    // Bytes that are not the request message.
    let mut junk = vec![0u8];
    junk.extend_from_slice(&4u32.to_be_bytes());
    junk.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    let (_, status) = WebReader::new(call(BINARY, Bytes::from(junk)).await)
        .finish()
        .await;
    assert_eq!(
        status, "3",
        "INVALID_ARGUMENT for bytes that are not the message"
    );
    // A GET of an RPC path is a plain 404.
    let get = http1(app.port, "GET", CREATE_SESSION, &[], Bytes::new()).await;
    assert_eq!(get.status(), 404);
    // Nothing was written, and the gateway still serves.
    let rows: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM sessions", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
    let (_, status) = unary(
        app.port,
        CREATE_SESSION,
        BINARY,
        &new_session("after-the-junk"),
        &[],
    )
    .await;
    assert_eq!(status, "0");
}
