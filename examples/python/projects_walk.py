"""Projects: the walk runs in a project of its own. The first step creates
it (idempotent on its slug) and makes every later call name it in the
`x-verdict-project` header; a middle step checks that what the walk stores is
invisible from the project `default`; the last step deletes the project,
which still holds data, so only with `force`."""

import grpc

from verdict.v1 import projects_pb2 as pb
from verdict.v1 import sessions_pb2
from verdict_client import DEADLINE_SECONDS, expect_error


def create_project(walk):
    """CreateProject, then again with the same content: the same project,
    created=false. Then every data call of the walk works in it."""
    request = pb.CreateProjectRequest(
        slug=walk.run_id, display_name="Python walk", description="examples/python"
    )
    first = walk.verdict.projects.CreateProject(request, timeout=DEADLINE_SECONDS)
    assert first.created and first.project.slug == walk.run_id
    retry = walk.verdict.projects.CreateProject(request, timeout=DEADLINE_SECONDS)
    assert not retry.created and retry.project.id == first.project.id
    # Other content under a taken slug is refused.
    expect_error(
        grpc.StatusCode.ALREADY_EXISTS,
        walk.verdict.projects.CreateProject,
        pb.CreateProjectRequest(slug=walk.run_id, display_name="someone else"),
    )
    walk.verdict.use_project(walk.run_id)


def project_isolation(walk):
    """The walk's session is NOT_FOUND from `default`, by id and by its
    request_id, and `default`'s lists do not show it."""
    default = walk.verdict.in_default_project()
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        default.GetSession,
        sessions_pb2.GetSessionRequest(id=walk.validation_session_id),
    )
    own = walk.verdict.sessions.GetSession(
        sessions_pb2.GetSessionRequest(id=walk.validation_session_id), timeout=DEADLINE_SECONDS
    )
    assert own.session.id == walk.validation_session_id
    listed = default.ListSessions(
        sessions_pb2.ListSessionsRequest(page_size=1000), timeout=DEADLINE_SECONDS
    )
    assert walk.validation_session_id not in {s.id for s in listed.sessions}


def delete_project(walk):
    """DeleteProject: refused while the project holds data (the metric
    points), then deleted with everything in it by `force`."""
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        walk.verdict.projects.DeleteProject,
        pb.DeleteProjectRequest(slug=walk.run_id),
    )
    walk.verdict.projects.DeleteProject(
        pb.DeleteProjectRequest(slug=walk.run_id, force=True), timeout=DEADLINE_SECONDS
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        walk.verdict.projects.GetProject,
        pb.GetProjectRequest(slug=walk.run_id),
    )


FIRST = [create_project]
MIDDLE = [project_isolation]
LAST = [delete_project]
