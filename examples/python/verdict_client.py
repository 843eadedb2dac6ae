"""Connecting to Verdict from Python, and reading its error details.

The stubs (the `verdict.v1` package) are generated from proto/ with
grpcio-tools into a folder on PYTHONPATH; see examples/README.md.
"""

import collections

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from verdict.v1 import (
    discrepancies_pb2_grpc,
    metrics_pb2_grpc,
    projects_pb2_grpc,
    results_pb2_grpc,
    sessions_pb2_grpc,
    test_cases_pb2_grpc,
    test_runs_pb2_grpc,
)

# Every unary call gets a deadline: the gateway turns it into PostgreSQL's
# statement_timeout, so a slow query is cancelled rather than left running.
DEADLINE_SECONDS = 10.0


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _ProjectHeader(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `x-verdict-project: <slug>` to every call of a channel: the one
    rule by which a call names its project."""

    def __init__(self, slug: str):
        self._pair = ("x-verdict-project", slug)

    def _with_header(self, details):
        metadata = list(details.metadata or []) + [self._pair]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_header(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_header(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_header(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_header(details), request_iterator)


class Verdict:
    """One channel to the gateway and a stub per service, working in one
    project (`default` until `use_project`)."""

    def __init__(self, target: str):
        self.base = grpc.insecure_channel(target)
        self.projects = projects_pb2_grpc.ProjectServiceStub(self.base)
        self._stubs(self.base)

    def use_project(self, slug: str) -> None:
        """Every later call of the data services works in project `slug`."""
        self._stubs(grpc.intercept_channel(self.base, _ProjectHeader(slug)))

    def _stubs(self, channel) -> None:
        self.channel = channel
        self.sessions = sessions_pb2_grpc.SessionServiceStub(channel)
        self.results = results_pb2_grpc.ResultServiceStub(channel)
        self.discrepancies = discrepancies_pb2_grpc.DiscrepancyServiceStub(channel)
        self.test_cases = test_cases_pb2_grpc.TestCaseServiceStub(channel)
        self.test_runs = test_runs_pb2_grpc.TestRunServiceStub(channel)
        self.metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        # Each new service gets its stub here.

    def in_default_project(self):
        """A SessionService stub working in the project `default`."""
        return sessions_pb2_grpc.SessionServiceStub(
            grpc.intercept_channel(self.base, _ProjectHeader("default"))
        )

    def close(self) -> None:
        self.base.close()


def field_violations(error: grpc.RpcError) -> dict[str, str]:
    """Maps field -> description from the google.rpc.BadRequest that an
    INVALID_ARGUMENT reply carries in its `grpc-status-details-bin` trailer."""
    status = rpc_status.from_call(error)
    if status is None:
        return {}
    violations = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                violations[violation.field] = violation.description
    return violations


def expect_error(code: grpc.StatusCode, call, *args, **kwargs) -> grpc.RpcError:
    """Makes a call that must fail with `code`, and returns its error."""
    try:
        call(*args, timeout=DEADLINE_SECONDS, **kwargs)
    except grpc.RpcError as error:
        if error.code() != code:
            raise AssertionError(f"expected {code.name}, got {error.code().name}: {error.details()}")
        return error
    raise AssertionError(f"expected {code.name}, but the call succeeded")


def all_pages(call, request, field: str) -> tuple[list, int]:
    """Calls a List method page after page (following `next_page_token` with
    the same filters) and returns every item of `field` and the page count."""
    items, pages = [], 0
    while True:
        page = call(request, timeout=DEADLINE_SECONDS)
        pages += 1
        items += getattr(page, field)
        if not page.next_page_token:
            return items, pages
        request.page_token = page.next_page_token
