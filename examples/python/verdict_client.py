"""Connecting to Verdict from Python, and reading its error details.

The stubs (the `verdict.v1` package) are generated from proto/ with
grpcio-tools into a folder on PYTHONPATH; see examples/README.md.
"""

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from verdict.v1 import (
    discrepancies_pb2_grpc,
    metrics_pb2_grpc,
    results_pb2_grpc,
    sessions_pb2_grpc,
    test_cases_pb2_grpc,
)

# Every unary call gets a deadline: the gateway turns it into PostgreSQL's
# statement_timeout, so a slow query is cancelled rather than left running.
DEADLINE_SECONDS = 10.0


class Verdict:
    """One channel to the gateway and a stub per service."""

    def __init__(self, target: str):
        self.channel = grpc.insecure_channel(target)
        self.sessions = sessions_pb2_grpc.SessionServiceStub(self.channel)
        self.results = results_pb2_grpc.ResultServiceStub(self.channel)
        self.discrepancies = discrepancies_pb2_grpc.DiscrepancyServiceStub(self.channel)
        self.test_cases = test_cases_pb2_grpc.TestCaseServiceStub(self.channel)
        self.metrics = metrics_pb2_grpc.MetricsServiceStub(self.channel)
        # Each new service gets its stub here.

    def close(self) -> None:
        self.channel.close()


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
