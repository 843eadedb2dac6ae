//! Projects at the edge: how a call names its project, what a key bound to
//! one project may do, and page tokens bound to the project. (Each
//! service's tests check that its data stays inside its project.)

use crate::errors::assert_reason;
use crate::helpers::*;
use crate::sessions::new_session;
use tonic::Code;
use verdict::proto::ListSessionsRequest;

#[tokio::test]
async fn a_call_without_the_header_works_in_the_default_project_and_a_bad_header_is_refused() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    let mut s = app.sessions.clone();
    s.create_session(new_session("no-header")).await.unwrap();
    // The header names an existing project: accepted.
    s.list_sessions(in_project(ListSessionsRequest::default(), "team-a"))
        .await
        .unwrap();
    // An unknown project is NOT_FOUND, a malformed slug INVALID_ARGUMENT
    // naming the header.
    let err = s
        .list_sessions(in_project(ListSessionsRequest::default(), "no-such-team"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");
    assert!(err.message().contains("no-such-team"), "{err:?}");
    for bad in ["Team-A", "-a", "a_b", &"a".repeat(64)] {
        let err = s
            .list_sessions(in_project(ListSessionsRequest::default(), bad))
            .await
            .unwrap_err();
        assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(violated_fields(&err), vec![verdict::projects::HEADER]);
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_key_bound_to_one_project_cannot_name_another_nor_learn_that_it_exists() {
    let (app, _keys) = spawn_auth_app().await;
    create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    let config = auth_config(&app.database_url);
    let (_, a_key) = create_project_key(&config, "team a ci", "read,write", Some("team-a")).await;
    let (_, root) = create_project_key(&config, "operator", "read,write", None).await;
    let mut s = app.sessions.clone();

    // Without the header the bound key works in its own project.
    s.create_session(authed(new_session("bound-1"), &a_key))
        .await
        .unwrap();
    let mut own = authed(ListSessionsRequest::default(), &a_key);
    own = project(own, "team-a");
    s.list_sessions(own).await.unwrap();

    // Another project, existing or not, and `default`: one answer.
    for other in ["team-b", "no-such-team", "default"] {
        let err = s
            .list_sessions(project(
                authed(ListSessionsRequest::default(), &a_key),
                other,
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
        assert!(!err.message().contains("not exist"), "{err:?}");
    }
    // An operator's key (bound to none) may name any project.
    for any in ["team-a", "team-b", "default"] {
        s.list_sessions(project(authed(ListSessionsRequest::default(), &root), any))
            .await
            .unwrap();
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_page_token_of_one_project_is_refused_in_another() {
    let app = spawn_app().await;
    create_project(&app, "team-a").await;
    create_project(&app, "team-b").await;
    let mut s = app.sessions.clone();
    for n in 0..3 {
        s.create_session(in_project(new_session(&format!("tok-{n}")), "team-a"))
            .await
            .unwrap();
    }
    let page = s
        .list_sessions(in_project(
            ListSessionsRequest {
                page_size: 1,
                ..Default::default()
            },
            "team-a",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!page.next_page_token.is_empty());
    let next = ListSessionsRequest {
        page_size: 1,
        page_token: page.next_page_token.clone(),
        ..Default::default()
    };
    // The same project accepts it…
    s.list_sessions(in_project(next.clone(), "team-a"))
        .await
        .unwrap();
    // …another refuses it as a token this list did not issue.
    let err = s
        .list_sessions(in_project(next, "team-b"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    app.stop().await.unwrap();
}
