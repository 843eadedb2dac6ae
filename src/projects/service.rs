//! The ProjectService: create, read, list, update and delete projects
//! (admin scope; a key bound to a project sees only its own).

use super::sql::{self, ProjectRow};
use super::{DEFAULT_SLUG, Directory, not_allowed, valid_slug};
use crate::admin::retention::{self, Days};
use crate::audit::{self, Outcome};
use crate::call::Call;
use crate::convert::timestamp;
use crate::error::{Error, Reason, Result};
use crate::pagination;
use crate::proto::{self, project_service_server::ProjectService};
use crate::rpc::{self, RpcResult};
use crate::state::AppState;
use crate::validate::Validator;
use tonic::{Request, Response};

const MAX_DISPLAY_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 4000;

/// The ProjectService implementation.
pub struct ProjectApi {
    state: AppState,
}

impl ProjectApi {
    pub fn new(state: AppState) -> Self {
        ProjectApi { state }
    }

    fn directory(&self) -> &Directory {
        &self.state.projects
    }
}

/// Retention days in `Kind::ALL` order as the proto message.
fn retention_message(d: &Days) -> proto::Retention {
    proto::Retention {
        sessions_days: d[0],
        executions_days: d[1],
        coverage_days: d[2],
        test_runs_days: d[3],
        metric_points_days: d[4],
        metric_rollups_days: d[5],
        ingest_days: d[6],
        resolutions_days: d[7],
        audit_events_days: d[8],
    }
}

/// The proto message as retention days in `Kind::ALL` order, each checked
/// to be within 0 and [`retention::MAX_DAYS`].
fn retention_days(v: &mut Validator, r: &proto::Retention) -> Days {
    let fields = [
        ("sessions_days", r.sessions_days),
        ("executions_days", r.executions_days),
        ("coverage_days", r.coverage_days),
        ("test_runs_days", r.test_runs_days),
        ("metric_points_days", r.metric_points_days),
        ("metric_rollups_days", r.metric_rollups_days),
        ("ingest_days", r.ingest_days),
        ("resolutions_days", r.resolutions_days),
        ("audit_events_days", r.audit_events_days),
    ];
    let mut days: Days = [None; 9];
    for (i, (name, value)) in fields.into_iter().enumerate() {
        if let Some(n) = value
            && !(0..=retention::MAX_DAYS).contains(&n)
        {
            v.violation(
                format!("retention.{name}"),
                "must be between 0 (keep forever) and 36600 days",
            );
        }
        days[i] = value;
    }
    days
}

/// The project as a caller sees it, with its retention in force under
/// `settings`.
fn project_message(p: ProjectRow, settings: &retention::Settings) -> proto::Project {
    let effective = settings.effective_days(&p.retention).map(Some);
    proto::Project {
        id: p.id.to_string(),
        slug: p.slug,
        display_name: p.display_name,
        description: p.description,
        created_at: Some(timestamp(p.created_at)),
        updated_at: Some(timestamp(p.updated_at)),
        version: p.version,
        retention: Some(retention_message(&p.retention)),
        effective_retention: Some(retention_message(&effective)),
    }
}

fn slug(v: &mut Validator, field: &str, value: &str) -> String {
    if value.is_empty() {
        v.violation(field, "is required");
    } else if !valid_slug(value) {
        v.violation(
            field,
            "must be 1 to 63 lowercase letters, digits and inner hyphens",
        );
    }
    value.to_owned()
}

/// The project `found` (looked up by `name`), as the caller may see it.
fn visible(call: &Call, name: &str, found: Option<ProjectRow>) -> Result<ProjectRow> {
    match (found, call.bound_project()) {
        (Some(p), Some(bound)) if p.id == bound => Ok(p),
        (_, Some(_)) => Err(not_allowed(name)),
        (Some(p), None) => Ok(p),
        (None, None) => Err(Error::NotFound(format!("no project is {name:?}"))),
    }
}

fn stale(slug: &str, current: i64, expected: i64) -> Error {
    Error::Aborted(
        Reason::VersionMismatch,
        format!("project {slug} is at version {current}, not {expected}; re-read it and retry"),
    )
}

#[derive(serde::Serialize)]
struct NoFilter;

#[tonic::async_trait]
impl ProjectService for ProjectApi {
    async fn create_project(
        &self,
        request: Request<proto::CreateProjectRequest>,
    ) -> RpcResult<proto::CreateProjectResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let slug = slug(&mut v, "slug", &req.slug);
        v.optional_text("display_name", &req.display_name, MAX_DISPLAY_NAME);
        v.optional_message("description", &req.description, MAX_DESCRIPTION);
        v.finish()?;
        if call.bound_project().is_some() {
            return Err(not_allowed(&slug).into());
        }
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let created = sql::insert(&tx, &slug, &req.display_name, &req.description).await?;
        let (project, created) = match created {
            Some(p) => {
                audit::record(&tx, &call, &[p.id.to_string()], Outcome::Created).await?;
                (p, true)
            }
            None => {
                let stored = sql::by_slug(&tx, &slug).await?.ok_or_else(|| {
                    Error::Aborted(
                        Reason::ConcurrentChange,
                        format!("project {slug} was deleted meanwhile; retry"),
                    )
                })?;
                if stored.display_name != req.display_name || stored.description != req.description
                {
                    return Err(Error::AlreadyExists(format!(
                        "project {slug} exists with another display name or description"
                    ))
                    .into());
                }
                (stored, false)
            }
        };
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::CreateProjectResponse {
            project: Some(project_message(project, &self.state.retention)),
            created,
        }))
    }

    async fn get_project(
        &self,
        request: Request<proto::GetProjectRequest>,
    ) -> RpcResult<proto::GetProjectResponse> {
        use proto::get_project_request::Lookup;
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let lookup = match req.lookup {
            Some(Lookup::Id(id)) => Some(Ok(v.uuid("id", &id))),
            Some(Lookup::Slug(s)) => Some(Err(slug(&mut v, "slug", &s))),
            None => {
                v.violation("lookup", "give the project's id or slug");
                None
            }
        };
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let c = conn.client().await?;
        let (name, found) = match lookup {
            Some(Ok(id)) => (id.to_string(), sql::by_id(c, id).await?),
            Some(Err(slug)) => {
                let found = sql::by_slug(c, &slug).await?;
                (slug, found)
            }
            None => return Err(Error::invalid("lookup", "give the project's id or slug").into()),
        };
        let project = visible(&call, &name, found)?;
        Ok(Response::new(proto::GetProjectResponse {
            project: Some(project_message(project, &self.state.retention)),
        }))
    }

    async fn list_projects(
        &self,
        request: Request<proto::ListProjectsRequest>,
    ) -> RpcResult<proto::ListProjectsResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let page_size = v.page_size("page_size", req.page_size);
        v.finish()?;
        let count = crate::totals::requested(req.count)?;
        let fingerprint = pagination::fingerprint("projects", &NoFilter);
        let after: Option<String> =
            pagination::decode("page_token", &req.page_token, &fingerprint)?;
        let mut conn = self.state.db.conn(&call).await?;
        let rows = sql::list(
            conn.client().await?,
            after.as_deref(),
            call.bound_project(),
            page_size + 1,
        )
        .await?;
        let (projects, next_page_token) = pagination::page(
            rows,
            page_size,
            self.state.max_message_bytes,
            &fingerprint,
            |last| last.slug.clone(),
            |p| project_message(p, &self.state.retention),
        )?;
        let (total, total_mode) = sql::count(
            conn.client().await?,
            call.bound_project(),
            count,
            self.state.count_exact_below,
        )
        .await?
        .wire();
        Ok(Response::new(proto::ListProjectsResponse {
            projects,
            next_page_token,
            total,
            total_mode,
        }))
    }

    async fn update_project(
        &self,
        request: Request<proto::UpdateProjectRequest>,
    ) -> RpcResult<proto::UpdateProjectResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let slug = slug(&mut v, "slug", &req.slug);
        if let Some(name) = &req.display_name {
            v.optional_text("display_name", name, MAX_DISPLAY_NAME);
        }
        if let Some(description) = &req.description {
            v.optional_message("description", description, MAX_DESCRIPTION);
        }
        let retention = req.retention.as_ref().map(|r| retention_days(&mut v, r));
        let expected = v.expected_version("expected_version", req.expected_version);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = visible(&call, &slug, sql::lock(&tx, &slug).await?)?;
        if let Some(expected) = expected
            && expected != current.version
        {
            return Err(stale(&slug, current.version, expected).into());
        }
        let updated = sql::update(
            &tx,
            current.id,
            req.display_name.as_deref(),
            req.description.as_deref(),
            retention.as_ref(),
        )
        .await?;
        audit::record(&tx, &call, &[current.id.to_string()], Outcome::Updated).await?;
        tx.commit().await.map_err(Error::from)?;
        Ok(Response::new(proto::UpdateProjectResponse {
            project: Some(project_message(updated, &self.state.retention)),
        }))
    }

    async fn delete_project(
        &self,
        request: Request<proto::DeleteProjectRequest>,
    ) -> RpcResult<proto::DeleteProjectResponse> {
        let (call, req) = rpc::split(request);
        let mut v = Validator::new();
        let slug = slug(&mut v, "slug", &req.slug);
        let expected = v.expected_version("expected_version", req.expected_version);
        v.finish()?;
        let mut conn = self.state.db.conn(&call).await?;
        let tx = conn.begin().await?;
        let current = visible(&call, &slug, sql::lock(&tx, &slug).await?)?;
        if slug == DEFAULT_SLUG {
            return Err(Error::FailedPrecondition(
                Reason::FailedPrecondition,
                "the project `default` cannot be deleted".into(),
            )
            .into());
        }
        if let Some(expected) = expected
            && expected != current.version
        {
            return Err(stale(&slug, current.version, expected).into());
        }
        let (sessions, test_cases, holds_data) = sql::holdings(&tx, current.id).await?;
        if holds_data && !req.force {
            return Err(Error::FailedPrecondition(
                Reason::ProjectHasData,
                format!(
                    "project {slug} holds {sessions} sessions, {test_cases} test cases and \
                     possibly coverage reports or metric points; send force to delete them too"
                ),
            )
            .into());
        }
        sql::delete(&tx, current.id).await?;
        audit::record(&tx, &call, &[current.id.to_string()], Outcome::Deleted).await?;
        tx.commit().await.map_err(Error::from)?;
        self.directory().forget(&slug);
        let (deleted_sessions, deleted_test_cases) = if req.force {
            (sessions, test_cases)
        } else {
            (0, 0)
        };
        Ok(Response::new(proto::DeleteProjectResponse {
            deleted_sessions,
            deleted_test_cases,
        }))
    }
}
