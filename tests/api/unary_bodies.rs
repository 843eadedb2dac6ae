//! Unary requests whose bodies are not one plain message in one frame,
//! written frame by frame with a raw HTTP/2 client: the gateway reads the
//! usual unary body itself and gives every other body to tonic's codec,
//! so each of these must get the answer that codec gives (issue 13).

use crate::helpers::*;
use crate::sessions::new_session;
use bytes::Bytes;
use prost::Message;
use tokio::net::TcpStream;
use tonic::Code;
use tonic_types::StatusExt;
use verdict::proto::{CreateSessionResponse, GetSessionRequest, get_session_request::Lookup};

/// What a caller sees of a reply.
#[derive(Debug)]
struct Reply {
    status: tonic::Status,
    message: Vec<u8>,
}

/// Calls `path` on its own connection with `frames` as the request's DATA
/// frames, then `trailers` when given (else the last frame ends the
/// stream), and reads the whole reply.
async fn call_in_frames(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
    frames: Vec<Vec<u8>>,
    trailers: Option<http::HeaderMap>,
) -> Reply {
    let (client, conn) = open(app.port).await;
    let reply = send_in_frames(app.port, &client, path, headers, frames, trailers).await;
    drop(client);
    conn.abort();
    reply
}

/// A raw HTTP/2 connection to the gateway, its driver spawned.
async fn open(port: u16) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, conn)
}

/// A request's headers for `path`.
fn request(port: u16, path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut request = http::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(()).unwrap()
}

/// [`call_in_frames`] on a connection already open.
async fn send_in_frames(
    port: u16,
    client: &h2::client::SendRequest<Bytes>,
    path: &str,
    headers: &[(&str, &str)],
    frames: Vec<Vec<u8>>,
    trailers: Option<http::HeaderMap>,
) -> Reply {
    let mut client = client.clone().ready().await.unwrap();
    let ends_at_headers = frames.is_empty() && trailers.is_none();
    let (response, mut send) = client
        .send_request(request(port, path, headers), ends_at_headers)
        .unwrap();
    let last = frames.len();
    for (i, frame) in frames.into_iter().enumerate() {
        let end = i + 1 == last && trailers.is_none();
        send.send_data(Bytes::from(frame), end).unwrap();
    }
    if let Some(trailers) = trailers {
        send.send_trailers(trailers).unwrap();
    }
    let (parts, mut body) = response.await.unwrap().into_parts();
    let mut message = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        message.extend_from_slice(&chunk);
    }
    // A trailers-only reply carries its status in the headers.
    let trailers = body.trailers().await.unwrap().unwrap_or(parts.headers);
    let status = tonic::Status::from_header_map(&trailers).expect("a grpc-status");
    Reply { status, message }
}

/// Asserts the reply's status code.
fn expect(reply: &Reply, code: Code) {
    assert_eq!(reply.status.code(), code, "{:?}", reply.status);
}

/// The reason of the reply's ErrorInfo.
fn reason(reply: &Reply) -> String {
    reply
        .status
        .get_details_error_info()
        .expect("an ErrorInfo")
        .reason
}

/// `message` with its five-byte gRPC prefix.
fn framed(compressed: bool, message: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    out
}

const CREATE: &str = "/verdict.v1.SessionService/CreateSession";

async fn stored(app: &TestApp, request_id: &str) -> bool {
    app.sessions
        .clone()
        .get_session(GetSessionRequest {
            lookup: Some(Lookup::RequestId(request_id.into())),
            ..Default::default()
        })
        .await
        .is_ok()
}

#[tokio::test]
async fn a_message_in_many_frames_or_followed_by_trailers_is_one_call() {
    let app = spawn_app().await;

    // Seven bytes a frame: the prefix itself is cut in two.
    let body = framed(false, &new_session("unary-frames").encode_to_vec());
    let frames: Vec<Vec<u8>> = body.chunks(7).map(<[u8]>::to_vec).collect();
    assert!(frames.len() > 5);
    let reply = call_in_frames(&app, CREATE, &[], frames, None).await;
    expect(&reply, Code::Ok);
    let created = CreateSessionResponse::decode(&framed_message(&reply.message)[..]).unwrap();
    assert_eq!(created.session.unwrap().request_id, "unary-frames");
    assert!(stored(&app, "unary-frames").await);

    // The stream ended by trailers rather than by its last frame.
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-note", "sent last".parse().unwrap());
    let body = framed(false, &new_session("unary-trailers").encode_to_vec());
    let reply = call_in_frames(&app, CREATE, &[], vec![body], Some(trailers)).await;
    expect(&reply, Code::Ok);
    assert!(stored(&app, "unary-trailers").await);
}

/// The message of a reply holding exactly one.
fn framed_message(reply: &[u8]) -> Vec<u8> {
    assert!(reply.len() >= 5 && reply[0] == 0, "{reply:?}");
    let len = u32::from_be_bytes(reply[1..5].try_into().unwrap()) as usize;
    assert_eq!(reply.len(), 5 + len, "one message");
    reply[5..].to_vec()
}

#[tokio::test]
async fn bodies_that_are_not_one_plain_message_get_the_codecs_answers_and_write_nothing_wrong() {
    let app = spawn_app().await;
    let session = |id: &str| new_session(id).encode_to_vec();

    // No message at all.
    let reply = call_in_frames(&app, CREATE, &[], Vec::new(), None).await;
    expect(&reply, Code::Internal);
    assert_eq!(reply.status.message(), "Missing request message.");

    // A message cut short: the prefix promises more than arrives.
    let mut cut = framed(false, &session("unary-cut"));
    cut.truncate(cut.len() - 3);
    let reply = call_in_frames(&app, CREATE, &[], vec![cut], None).await;
    expect(&reply, Code::Internal);
    assert_eq!(reply.status.message(), "Unexpected EOF decoding stream.");
    assert!(!stored(&app, "unary-cut").await);

    // The compressed flag without a grpc-encoding: INTERNAL, as the gRPC
    // compression spec requires.
    let reply = call_in_frames(
        &app,
        CREATE,
        &[],
        vec![framed(true, &session("unary-flag"))],
        None,
    )
    .await;
    expect(&reply, Code::Internal);
    assert!(
        reply.status.message().contains("compressed-flag"),
        "{:?}",
        reply.status
    );
    assert!(!stored(&app, "unary-flag").await);

    // An encoding the gateway does not accept.
    let reply = call_in_frames(
        &app,
        CREATE,
        &[("grpc-encoding", "gzip")],
        vec![framed(true, &session("unary-gzip"))],
        None,
    )
    .await;
    expect(&reply, Code::Unimplemented);
    assert!(
        reply.status.message().contains("gzip"),
        "{:?}",
        reply.status
    );
    assert!(!stored(&app, "unary-gzip").await);

    // Bytes that are no message of this RPC, arriving in pieces.
    let garbage = framed(false, &[0xff; 64]);
    let frames = garbage.chunks(10).map(<[u8]>::to_vec).collect();
    let reply = call_in_frames(&app, CREATE, &[], frames, None).await;
    expect(&reply, Code::InvalidArgument);
    assert_eq!(reason(&reply), "MALFORMED_MESSAGE");

    // Two messages in a unary call: the codec takes the first and reads
    // past the second.
    let two = [
        framed(false, &session("unary-first")),
        framed(false, &session("unary-second")),
    ];
    let reply = call_in_frames(&app, CREATE, &[], two.to_vec(), None).await;
    expect(&reply, Code::Ok);
    assert!(stored(&app, "unary-first").await);
    assert!(!stored(&app, "unary-second").await);

    // A message declared over the limit is refused before its bytes come.
    let limit = test_config(&app.database_url).max_request_bytes();
    let mut huge = vec![0u8];
    huge.extend_from_slice(&(limit as u32 + 1).to_be_bytes());
    huge.extend_from_slice(&[0x0a; 16]);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-note", "never all sent".parse().unwrap());
    let reply = call_in_frames(&app, CREATE, &[], vec![huge], Some(trailers)).await;
    expect(&reply, Code::ResourceExhausted);
    assert_eq!(reason(&reply), "MESSAGE_TOO_LARGE");

    // A path that only starts with a method's name is no method.
    let reply = call_in_frames(
        &app,
        "/verdict.v1.SessionService/CreateSession/More",
        &[],
        vec![framed(false, &session("unary-path"))],
        None,
    )
    .await;
    expect(&reply, Code::Unimplemented);
    assert!(!stored(&app, "unary-path").await);
}

#[tokio::test]
async fn concurrent_callers_some_cancelling_mid_message_store_exactly_the_whole_messages() {
    let app = spawn_app().await;
    let mut callers = Vec::new();
    for i in 0..8 {
        let port = app.port;
        callers.push(tokio::spawn(async move {
            let (client, conn) = open(port).await;
            let whole = framed(
                false,
                &new_session(&format!("unary-whole-{i}")).encode_to_vec(),
            );
            if i % 2 == 0 {
                // The whole message, seven bytes a frame.
                let frames = whole.chunks(7).map(<[u8]>::to_vec).collect();
                let reply = send_in_frames(port, &client, CREATE, &[], frames, None).await;
                expect(&reply, Code::Ok);
            } else {
                // Half a message, then the stream is cancelled...
                let cut = framed(
                    false,
                    &new_session(&format!("unary-cancelled-{i}")).encode_to_vec(),
                );
                let mut sender = client.clone().ready().await.unwrap();
                let (response, mut send) = sender
                    .send_request(request(port, CREATE, &[]), false)
                    .unwrap();
                send.send_data(Bytes::copy_from_slice(&cut[..cut.len() / 2]), false)
                    .unwrap();
                send.send_reset(h2::Reason::CANCEL);
                assert!(response.await.is_err(), "a cancelled stream gets no reply");
                // ...and the same connection serves the next call whole.
                let reply = send_in_frames(port, &client, CREATE, &[], vec![whole], None).await;
                expect(&reply, Code::Ok);
            }
            drop(client);
            conn.abort();
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    for i in 0..8 {
        assert!(
            stored(&app, &format!("unary-whole-{i}")).await,
            "unary-whole-{i}"
        );
    }
    let n: i64 = app
        .sql()
        .await
        .query_one(
            "SELECT count(*) FROM sessions WHERE request_id LIKE 'unary-cancelled-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "no cancelled message was stored");
}
