//! Authentication and scopes through the real client: every boundary, the
//! CLI, revocation across replicas, and floods of keyless calls that must
//! not reach PostgreSQL.

use crate::helpers::*;
use crate::keys::refused_within;
use crate::sessions::new_session;
use std::process::Command;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use verdict::proto::session_service_client::SessionServiceClient;
use verdict::proto::{GetSessionRequest, ListAuditEventsRequest, ListSessionsRequest};

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn get(id: &str) -> GetSessionRequest {
    crate::helpers::get_session_by_id(id)
}

#[tokio::test]
async fn calls_without_a_valid_key_are_unauthenticated() {
    let (app, keys) = spawn_auth_app().await;
    let mut s = app.sessions.clone();
    let unknown = "vk_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    // Right id, wrong secret.
    let wrong_secret = format!("{}{}", &keys.read[..keys.read.len() - 1], "Z");
    let wrong_secret = if wrong_secret == keys.read {
        format!("{}{}", &keys.read[..keys.read.len() - 1], "Y")
    } else {
        wrong_secret
    };
    let err = s
        .list_sessions(ListSessionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("API key"), "{}", err.message());
    for token in ["", "nonsense", unknown, &wrong_secret, &keys.read[3..]] {
        let err = s
            .list_sessions(authed(ListSessionsRequest::default(), token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token}: {err:?}");
    }
    // A Basic scheme with a valid token is still not a bearer key.
    let mut request = tonic::Request::new(ListSessionsRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Basic {}", keys.read).parse().unwrap(),
    );
    assert_eq!(code(s.list_sessions(request).await), Code::Unauthenticated);
    // The real key works.
    assert_eq!(
        code(
            s.list_sessions(authed(ListSessionsRequest::default(), &keys.read))
                .await
        ),
        Code::Ok
    );
}

#[tokio::test]
async fn health_and_reflection_stay_open_without_a_key() {
    let (app, _) = spawn_auth_app().await;
    let status = app
        .health
        .clone()
        .check(HealthCheckRequest {
            service: "verdict.v1.SessionService".into(),
        })
        .await
        .expect("health needs no key")
        .into_inner();
    assert_eq!(status.status, 1);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection needs no key")
        .into_inner();
    let reply = replies.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "verdict.v1.AdminService")
    );
}

#[tokio::test]
async fn each_scope_opens_its_own_rpcs_and_only_those() {
    let (app, keys) = spawn_auth_app().await;
    let mut s = app.sessions.clone();
    let mut admin = app.admin.clone();
    let missing = uuid::Uuid::new_v4().to_string();

    // read: reads pass (NOT_FOUND is a reply from the handler), writes and admin do not.
    assert_eq!(
        code(s.get_session(authed(get(&missing), &keys.read)).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            s.create_session(authed(new_session("r-1"), &keys.read))
                .await
        ),
        Code::PermissionDenied
    );
    let denied = admin
        .list_audit_events(authed(ListAuditEventsRequest::default(), &keys.read))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("`admin`"), "{}", denied.message());

    // write: writes pass, reads and admin do not.
    assert_eq!(
        code(
            s.create_session(authed(new_session("w-1"), &keys.write))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(s.get_session(authed(get(&missing), &keys.write)).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            admin
                .list_audit_events(authed(ListAuditEventsRequest::default(), &keys.write))
                .await
        ),
        Code::PermissionDenied
    );

    // admin: AdminService only.
    assert_eq!(
        code(
            admin
                .list_audit_events(authed(ListAuditEventsRequest::default(), &keys.admin))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            s.create_session(authed(new_session("a-1"), &keys.admin))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(s.get_session(authed(get(&missing), &keys.admin)).await),
        Code::PermissionDenied
    );

    // all three.
    assert_eq!(
        code(
            s.create_session(authed(new_session("x-1"), &keys.all))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(s.get_session(authed(get(&missing), &keys.all)).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_within_two_seconds_on_every_replica() {
    let (_, url) = create_database().await;
    let config = auth_config(&url);
    let (id, token) = create_key(&config, "replicated", "read").await;
    let one = spawn_app_with(auth_config(&url)).await;
    let two = spawn_app_with(auth_config(&url)).await;
    for app in [&one, &two] {
        assert_eq!(
            code(
                app.sessions
                    .clone()
                    .list_sessions(authed(ListSessionsRequest::default(), &token))
                    .await
            ),
            Code::Ok
        );
    }
    verdict::revoke_key(&config, &id).await.expect("revoke");
    // Each replica caches the key it verified; the revocation's
    // notification reaches both within a second or two.
    for app in [&one, &two] {
        let err = refused_within(app, &token, std::time::Duration::from_secs(2)).await;
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(err.message().contains("revoked"), "{}", err.message());
    }
    // Revoking twice is refused; unknown ids are NOT_FOUND.
    assert!(verdict::revoke_key(&config, &id).await.is_err());
    assert!(
        verdict::revoke_key(&config, "0000000000000000")
            .await
            .is_err()
    );
}

fn verdict_cli(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_verdict"))
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("run the verdict binary")
}

#[tokio::test]
async fn the_keys_cli_creates_lists_and_revokes_keys_and_stores_only_hashes() {
    let (_, url) = create_database().await;
    let created = verdict_cli(
        &url,
        &["keys", "create", "--name", "ci", "--scopes", "read,write"],
    );
    assert!(created.status.success(), "{created:?}");
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("vk_"), "{token}");
    let id = token[3..19].to_owned();

    let listed = verdict_cli(&url, &["keys", "list"]);
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(listed.contains(&id) && listed.contains("read,write") && listed.contains("active"));
    assert!(!listed.contains(&token[20..]), "the list shows no secret");

    let app = spawn_app_with(auth_config(&url)).await;
    // Only the hash is stored.
    let sql = app.sql().await;
    let row = sql
        .query_one(
            "SELECT secret_hash, name FROM api_keys WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    let hash: Vec<u8> = row.get(0);
    assert_eq!(hash.len(), 32);
    let dump: String = sql
        .query_one("SELECT string_agg(t::text, ' ') FROM api_keys t", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!dump.contains(&token[20..]));

    let mut s = app.sessions.clone();
    assert_eq!(
        code(s.create_session(authed(new_session("cli-1"), &token)).await),
        Code::Ok
    );
    let revoked = verdict_cli(&url, &["keys", "revoke", &id]);
    assert!(revoked.status.success(), "{revoked:?}");
    refused_within(&app, &token, std::time::Duration::from_secs(2)).await;
    assert_eq!(
        code(s.create_session(authed(new_session("cli-2"), &token)).await),
        Code::Unauthenticated
    );
    let listed = String::from_utf8(verdict_cli(&url, &["keys", "list"]).stdout).unwrap();
    assert!(listed.contains("revoked"), "{listed}");

    let bad = verdict_cli(&url, &["keys", "create", "--name", "x", "--scopes", "root"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scope"));
}

#[tokio::test]
async fn ten_thousand_concurrent_keyless_calls_are_refused_without_touching_postgresql() {
    let (app, keys) = spawn_auth_app().await;
    let before = app.db.connections_acquired();
    let channels: Vec<_> = futures::future::join_all((0..8).map(|_| connect(app.port))).await;
    let calls = (0..10_000).map(|i| {
        let mut client = SessionServiceClient::new(channels[i % channels.len()].clone());
        async move {
            let request = match i % 4 {
                0 => tonic::Request::new(ListSessionsRequest::default()),
                1 => authed(ListSessionsRequest::default(), "garbage"),
                2 => authed(ListSessionsRequest::default(), &"vk_".repeat(21)),
                _ => {
                    let mut r = tonic::Request::new(ListSessionsRequest::default());
                    r.metadata_mut()
                        .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
                    r
                }
            };
            client.list_sessions(request).await.unwrap_err().code()
        }
    });
    let codes = futures::future::join_all(calls).await;
    assert_eq!(codes.len(), 10_000);
    assert!(codes.iter().all(|c| *c == Code::Unauthenticated));
    assert_eq!(
        app.db.connections_acquired(),
        before,
        "a keyless call took a database connection"
    );

    // A well-formed but unknown key is read through the key lookup pool,
    // never the request pool (and then remembered as unknown).
    let unknown = "vk_fedcba9876543210_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let mut s = app.sessions.clone();
    for _ in 0..100 {
        let err = s
            .list_sessions(authed(ListSessionsRequest::default(), unknown))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert_eq!(app.db.connections_acquired(), before);

    // A refused scope costs no handler work either.
    let denied = s
        .create_session(authed(new_session("denied"), &keys.read))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(app.db.connections_acquired(), before);
}

#[tokio::test]
async fn contradictory_auth_flags_refuse_to_start() {
    let (_, url) = create_database().await;
    let mut config = auth_config(&url);
    config.insecure_no_auth = true;
    let err = verdict::Application::build(config)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("--insecure-no-auth"), "{err:#}");
}

#[tokio::test]
async fn loopback_defaults_to_no_auth_and_any_other_address_requires_it() {
    use verdict::auth::AuthMode;
    let (_, url) = create_database().await;
    let app = verdict::Application::build(test_config(&url))
        .await
        .unwrap();
    assert_eq!(app.auth_mode(), AuthMode::OffOnLoopback);
    let app = verdict::Application::build(auth_config(&url))
        .await
        .unwrap();
    assert_eq!(app.auth_mode(), AuthMode::Required);
    // The same settings on a routable address (decided without binding it).
    let mut config = test_config(&url);
    config.listen = "0.0.0.0:50051".parse().unwrap();
    assert_eq!(config.auth_mode().unwrap(), AuthMode::Required);
    config.insecure_no_auth = true;
    assert_eq!(config.auth_mode().unwrap(), AuthMode::OffByFlag);
}
