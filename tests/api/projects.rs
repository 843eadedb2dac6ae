//! Projects at the edge: how a call names its project, what a key bound to
//! one project may do, and page tokens bound to the project. (Each
//! service's tests check that its data stays inside its project.)

use crate::errors::assert_reason;
use crate::helpers::*;
use crate::keys::refused_within;
use crate::sessions::new_session;
use tonic::Code;
use verdict::proto::get_project_request::Lookup;
use verdict::proto::project_service_client::ProjectServiceClient;
use verdict::proto::{
    CreateProjectRequest, DeleteProjectRequest, GetProjectRequest, ListProjectsRequest,
    ListSessionsRequest, UpdateProjectRequest,
};

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

    // Another project, existing or not, and `default`: one answer, the
    // first time (slugs read from the database) and the second (slugs the
    // gateway has cached, judged without a read).
    for other in ["team-b", "no-such-team", "default"].repeat(2) {
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

fn projects(app: &TestApp) -> ProjectServiceClient<tonic::transport::Channel> {
    ProjectServiceClient::new(app.channel.clone())
}

fn new_project(slug: &str, name: &str) -> CreateProjectRequest {
    CreateProjectRequest {
        slug: slug.into(),
        display_name: name.into(),
        description: format!("{name}'s data"),
    }
}

#[tokio::test]
async fn create_project_is_idempotent_on_its_slug_and_concurrent_creates_make_one() {
    let app = spawn_app().await;
    let mut p = projects(&app);
    let first = p
        .create_project(new_project("team-a", "Team A"))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let project = first.project.unwrap();
    assert_eq!(project.slug, "team-a");
    assert_eq!(project.version, 1);
    // The same content again: the stored project, not created.
    let again = p
        .create_project(new_project("team-a", "Team A"))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.project.unwrap().id, project.id);
    // Other content under the same slug.
    let err = p
        .create_project(new_project("team-a", "Team B"))
        .await
        .unwrap_err();
    assert_reason(&err, Code::AlreadyExists, "ALREADY_EXISTS");
    // Eight concurrent creates of one new slug: one row, one `created`.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut p = p.clone();
        tasks.spawn(async move {
            p.create_project(new_project("team-c", "Team C"))
                .await
                .unwrap()
                .into_inner()
        });
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        created += usize::from(r.created);
        ids.insert(r.project.unwrap().id);
    }
    assert_eq!((created, ids.len()), (1, 1));
    let stored: i64 = app
        .sql()
        .await
        .query_one("SELECT count(*) FROM projects WHERE slug = 'team-c'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 1);
    // Bad slugs and lengths are field violations.
    for (request, field) in [
        (new_project("", "x"), "slug"),
        (new_project("Team", "x"), "slug"),
        (new_project("ok", &"n".repeat(201)), "display_name"),
    ] {
        let err = p.create_project(request).await.unwrap_err();
        assert_reason(&err, Code::InvalidArgument, "INVALID_FIELD");
        assert_eq!(violated_fields(&err), vec![field]);
    }
    app.stop().await.unwrap();
}

#[tokio::test]
async fn projects_are_read_listed_and_updated_with_versions() {
    let app = spawn_app().await;
    let mut p = projects(&app);
    for n in 0..5 {
        p.create_project(new_project(&format!("list-{n}"), "L"))
            .await
            .unwrap();
    }
    // Paged by slug, two at a time: default and the five, each once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = p
            .list_projects(ListProjectsRequest {
                page_size: 2,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.projects.into_iter().map(|p| p.slug));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(
        seen,
        ["default", "list-0", "list-1", "list-2", "list-3", "list-4"]
    );
    let by_slug = p
        .get_project(GetProjectRequest {
            lookup: Some(Lookup::Slug("list-3".into())),
        })
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap();
    let by_id = p
        .get_project(GetProjectRequest {
            lookup: Some(Lookup::Id(by_slug.id.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap();
    assert_eq!(by_slug, by_id);
    let err = p
        .get_project(GetProjectRequest {
            lookup: Some(Lookup::Slug("nope".into())),
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::NotFound, "NOT_FOUND");

    let updated = p
        .update_project(UpdateProjectRequest {
            slug: "list-3".into(),
            display_name: Some("Renamed".into()),
            description: None,
            expected_version: Some(1),
            retention: None,
        })
        .await
        .unwrap()
        .into_inner()
        .project
        .unwrap();
    assert_eq!(
        (updated.display_name.as_str(), updated.version),
        ("Renamed", 2)
    );
    assert_eq!(updated.description, by_slug.description);
    let err = p
        .update_project(UpdateProjectRequest {
            slug: "list-3".into(),
            display_name: Some("Again".into()),
            description: None,
            expected_version: Some(1),
            retention: None,
        })
        .await
        .unwrap_err();
    assert_reason(&err, Code::Aborted, "VERSION_MISMATCH");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn a_bound_admin_key_sees_and_manages_only_its_own_project() {
    let (app, keys) = spawn_auth_app().await;
    let mut p = projects(&app);
    for slug in ["team-a", "team-b"] {
        p.create_project(authed(new_project(slug, slug), &keys.admin))
            .await
            .unwrap();
    }
    let config = auth_config(&app.database_url);
    let (_, a_admin) = create_project_key(&config, "a admin", "admin", Some("team-a")).await;
    let listed = p
        .list_projects(authed(ListProjectsRequest::default(), &a_admin))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .projects
            .iter()
            .map(|p| p.slug.as_str())
            .collect::<Vec<_>>(),
        ["team-a"]
    );
    p.get_project(authed(
        GetProjectRequest {
            lookup: Some(Lookup::Slug("team-a".into())),
        },
        &a_admin,
    ))
    .await
    .unwrap();
    for other in ["team-b", "nope"] {
        let err = p
            .get_project(authed(
                GetProjectRequest {
                    lookup: Some(Lookup::Slug(other.into())),
                },
                &a_admin,
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
        let err = p
            .delete_project(authed(
                DeleteProjectRequest {
                    slug: other.into(),
                    force: true,
                    expected_version: None,
                },
                &a_admin,
            ))
            .await
            .unwrap_err();
        assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    }
    let err = p
        .create_project(authed(new_project("team-z", "Z"), &a_admin))
        .await
        .unwrap_err();
    assert_reason(&err, Code::PermissionDenied, "PROJECT_NOT_ALLOWED");
    // Without `admin`, no project call at all.
    let err = p
        .list_projects(authed(ListProjectsRequest::default(), &keys.read))
        .await
        .unwrap_err();
    assert_reason(&err, Code::PermissionDenied, "MISSING_SCOPE");
    app.stop().await.unwrap();
}

#[tokio::test]
async fn delete_project_keeps_data_unless_forced_then_removes_everything_and_its_keys() {
    let (app, keys) = spawn_auth_app().await;
    let mut p = projects(&app);
    p.create_project(authed(new_project("doomed", "Doomed"), &keys.admin))
        .await
        .unwrap();
    p.create_project(authed(new_project("empty", "Empty"), &keys.admin))
        .await
        .unwrap();
    let config = auth_config(&app.database_url);
    let (_, doomed_key) =
        create_project_key(&config, "doomed ci", "read,write", Some("doomed")).await;
    let mut s = app.sessions.clone();
    for n in 0..3 {
        s.create_session(authed(new_session(&format!("d-{n}")), &doomed_key))
            .await
            .unwrap();
    }
    // A session of the same request id in `default` must survive.
    s.create_session(authed(new_session("d-0"), &keys.write))
        .await
        .unwrap();

    // `default` can never go; an empty project goes without force.
    let err = p
        .delete_project(authed(
            DeleteProjectRequest {
                slug: "default".into(),
                force: true,
                expected_version: None,
            },
            &keys.admin,
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "FAILED_PRECONDITION");
    p.delete_project(authed(
        DeleteProjectRequest {
            slug: "empty".into(),
            force: false,
            expected_version: None,
        },
        &keys.admin,
    ))
    .await
    .unwrap();
    let err = p
        .delete_project(authed(
            DeleteProjectRequest {
                slug: "doomed".into(),
                force: false,
                expected_version: None,
            },
            &keys.admin,
        ))
        .await
        .unwrap_err();
    assert_reason(&err, Code::FailedPrecondition, "PROJECT_HAS_DATA");
    let gone = p
        .delete_project(authed(
            DeleteProjectRequest {
                slug: "doomed".into(),
                force: true,
                expected_version: None,
            },
            &keys.admin,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.deleted_sessions, 3);
    let sql = app.sql().await;
    let left: i64 = sql
        .query_one(
            "SELECT count(*) FROM sessions WHERE request_id LIKE 'd-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1, "only default's d-0 is left");
    let keys_left: i64 = sql
        .query_one(
            "SELECT count(*) FROM api_keys WHERE name = 'doomed ci'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(keys_left, 0);
    // The deleted project's key is refused within about a second (its
    // row's deletion notifies every replica's key cache).
    let err = refused_within(&app, &doomed_key, std::time::Duration::from_secs(3)).await;
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    app.stop().await.unwrap();
}
