"""A walk through TestRunService: two CI runs of the same pipeline, with
retries, their counts, a comparison, and finishing them; then executions
found by their labels and by words of their error messages.

Each step is a function of the shared `Walk`; main.py runs STEPS in order."""

import datetime

import grpc

from verdict.v1 import failures_pb2 as fl_pb
from verdict.v1 import failures_pb2_grpc
from verdict.v1 import test_cases_pb2 as tc_pb
from verdict.v1 import test_runs_pb2 as pb
from verdict_client import DEADLINE_SECONDS, expect_error

P, F = tc_pb.EXECUTION_STATUS_PASSED, tc_pb.EXECUTION_STATUS_FAILED
TESTS = ("checkout", "search", "login")


def _run(walk, build: str) -> pb.TestRun:
    request = pb.CreateTestRunRequest(
        client_key=f"{walk.run_id}-build-{build}",
        name="unit tests",
        build_number=build,
        commit_sha=f"c0ffee{build}",
        branch="main",
        labels={"os": "linux", "pipeline": "unit"},
    )
    first = walk.verdict.test_runs.CreateTestRun(request, timeout=DEADLINE_SECONDS)
    # A retried create (say, after a timeout) returns the same run.
    retry = walk.verdict.test_runs.CreateTestRun(request, timeout=DEADLINE_SECONDS)
    assert first.created and not retry.created and retry.run.id == first.run.id
    return first.run


def _record(walk, run_id: str, batch: str, outcomes):
    """outcomes: (test, attempt, status) triples."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    items = []
    for test, attempt, status in outcomes:
        item = tc_pb.ExecutionInput(
            test_case_key=f"{walk.run_id}-{test}",
            status=status,
            duration_ms=100 * attempt,
            run_id=run_id,
            attempt=attempt,
        )
        item.started_at.FromDatetime(now)
        items.append(item)
    walk.verdict.test_cases.RecordExecutions(
        tc_pb.RecordExecutionsRequest(batch_id=f"{walk.run_id}-{batch}", items=items),
        timeout=DEADLINE_SECONDS,
    )


def runs_with_retries(walk):
    """Build 1: everything passes except `search`. Build 2: `search` is
    fixed, `login` fails once and passes on its retry, `checkout` fails."""
    for test in TESTS:
        walk.verdict.test_cases.CreateTestCase(
            tc_pb.CreateTestCaseRequest(
                key=f"{walk.run_id}-{test}", name=test, test_type=tc_pb.TEST_TYPE_UNIT
            ),
            timeout=DEADLINE_SECONDS,
        )
    base, head = _run(walk, "1"), _run(walk, "2")
    _record(walk, base.id, "build-1", [("checkout", 1, P), ("search", 1, F), ("login", 1, P)])
    _record(
        walk,
        head.id,
        "build-2",
        [("checkout", 1, F), ("search", 1, P), ("login", 1, F), ("login", 2, P)],
    )
    counts = walk.verdict.test_runs.GetTestRun(
        pb.GetTestRunRequest(id=head.id), timeout=DEADLINE_SECONDS
    ).run.counts
    # The last attempt of each test decides: 2 passed (one on retry), 1 failed.
    assert (counts.tests, counts.passed, counts.failed) == (3, 2, 1), counts
    assert counts.passed_on_retry == 1 and counts.executions == 4, counts
    assert abs(counts.pass_rate - 2 / 3) < 1e-9, counts.pass_rate

    comparison = walk.verdict.test_runs.CompareTestRuns(
        pb.CompareTestRunsRequest(base_run_id=base.id, head_run_id=head.id),
        timeout=DEADLINE_SECONDS,
    )
    keys = lambda tests: [t.test_case_key for t in tests]  # noqa: E731
    assert keys(comparison.new_failures) == [f"{walk.run_id}-checkout"], comparison
    assert keys(comparison.fixed) == [f"{walk.run_id}-search"], comparison
    assert not comparison.still_failing and not comparison.new_tests, comparison

    listed = walk.verdict.test_runs.ListTestRuns(
        pb.ListTestRunsRequest(branch="main", labels={"pipeline": "unit"}),
        timeout=DEADLINE_SECONDS,
    )
    assert {r.id for r in listed.runs} == {base.id, head.id}, listed

    # Finishing derives the status from the last attempts; a finished run
    # takes no more executions and cannot be finished again.
    for run, status in ((base, pb.TEST_RUN_STATUS_FAILED), (head, pb.TEST_RUN_STATUS_FAILED)):
        done = walk.verdict.test_runs.FinishTestRun(
            pb.FinishTestRunRequest(id=run.id), timeout=DEADLINE_SECONDS
        )
        assert done.run.status == status, done.run
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        walk.verdict.test_runs.FinishTestRun,
        pb.FinishTestRunRequest(id=head.id),
    )


def failure_triage(walk):
    """Build 3 fails twice with one error that differs only in numbers and
    addresses: one error signature. Triaging it as a product bug applies to
    both failures; a second triage based on the same version is refused."""
    failures = failures_pb2_grpc.FailureServiceStub(walk.verdict.channel)
    run = _run(walk, "3")
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    items = []
    for test, message in (
        ("checkout", "Timeout after 3000 ms connecting to 10.0.0.7:5432"),
        ("search", "Timeout after 45 ms connecting to 10.0.0.9:6543"),
    ):
        item = tc_pb.ExecutionInput(
            test_case_key=f"{walk.run_id}-{test}",
            status=F,
            error_message=message,
            run_id=run.id,
            attempt=1,
        )
        item.started_at.FromDatetime(now)
        items.append(item)
    walk.verdict.test_cases.RecordExecutions(
        tc_pb.RecordExecutionsRequest(batch_id=f"{walk.run_id}-build-3", items=items),
        timeout=DEADLINE_SECONDS,
    )
    listed = failures.ListFailureSignatures(
        fl_pb.ListFailureSignaturesRequest(run_id=run.id), timeout=DEADLINE_SECONDS
    )
    assert len(listed.signatures) == 1, listed
    signature = listed.signatures[0]
    assert signature.count == 2 and signature.test_cases_affected == 2, signature
    assert signature.normalised_message == "Timeout after <n> ms connecting to <ip>", signature
    assert signature.triage.state == fl_pb.TRIAGE_STATE_TO_INVESTIGATE, signature

    request = fl_pb.TriageFailureSignatureRequest(
        signature=signature.signature,
        state=fl_pb.TRIAGE_STATE_PRODUCT_BUG,
        comment="the pool times out under load",
        issue_url="https://issues.example.com/BUG-42",
        actor="python-walk",
        expected_version=signature.triage.version,
    )
    done = failures.TriageFailureSignature(request, timeout=DEADLINE_SECONDS)
    # failures counts the whole project (a rerun of the walk adds its own).
    assert done.triage.version == signature.triage.version + 1 and done.failures >= 2, done
    # Someone else's change based on the same version is refused.
    expect_error(grpc.StatusCode.ABORTED, failures.TriageFailureSignature, request)
    executions = walk.verdict.test_cases.ListExecutions(
        tc_pb.ListExecutionsRequest(run_id=run.id), timeout=DEADLINE_SECONDS
    ).executions
    assert len(executions) == 2, executions
    for e in executions:
        assert e.error_signature == signature.signature, e
        assert e.triage.state == fl_pb.TRIAGE_STATE_PRODUCT_BUG, e
        assert e.triage.source == fl_pb.TRIAGE_SOURCE_SIGNATURE, e
    walk.verdict.test_runs.FinishTestRun(
        pb.FinishTestRunRequest(id=run.id), timeout=DEADLINE_SECONDS
    )


def labels_and_search(walk):
    """Executions carry labels (filtered by value or by key) and are found
    by words of their error messages (`query`, in list order)."""
    key = f"{walk.run_id}-flaky-io"
    walk.verdict.test_cases.CreateTestCase(
        tc_pb.CreateTestCaseRequest(key=key, name="flaky io", test_type=tc_pb.TEST_TYPE_UNIT),
        timeout=DEADLINE_SECONDS,
    )
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    messages = [
        "connection refused by db-primary",
        "timeout waiting for lock",
        "Connection reset by peer",
        "",
    ]
    items = []
    for n, message in enumerate(messages):
        item = tc_pb.ExecutionInput(
            test_case_key=key,
            status=F if message else P,
            error_message=message,
            # The walk's id keeps this walk's executions apart from others'.
            labels={"walk": walk.run_id, "shard": str(n % 2)},
        )
        item.started_at.FromDatetime(now + datetime.timedelta(seconds=n))
        items.append(item)
    walk.verdict.test_cases.RecordExecutions(
        tc_pb.RecordExecutionsRequest(batch_id=f"{walk.run_id}-labelled", items=items),
        timeout=DEADLINE_SECONDS,
    )
    listed = walk.verdict.test_cases.ListExecutions(
        tc_pb.ListExecutionsRequest(labels={"walk": walk.run_id, "shard": "0"}),
        timeout=DEADLINE_SECONDS,
    )
    assert [e.error_message for e in listed.executions] == [messages[2], messages[0]], listed
    assert all(e.labels["shard"] == "0" for e in listed.executions), listed

    # Words, any case, newest first, one per page; the token is bound to
    # the query (and the labels).
    request = tc_pb.ListExecutionsRequest(
        labels={"walk": walk.run_id}, query="connection", page_size=1
    )
    first = walk.verdict.test_cases.ListExecutions(request, timeout=DEADLINE_SECONDS)
    found = [e.error_message for e in first.executions]
    request.page_token = first.next_page_token
    while request.page_token:
        page = walk.verdict.test_cases.ListExecutions(request, timeout=DEADLINE_SECONDS)
        found += [e.error_message for e in page.executions]
        request.page_token = page.next_page_token
    assert found == [messages[2], messages[0]], found
    expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        walk.verdict.test_cases.ListExecutions,
        tc_pb.ListExecutionsRequest(
            labels={"walk": walk.run_id}, query="timeout", page_token=first.next_page_token
        ),
    )
    # Web-search syntax: a phrase, and exclusion.
    phrase = walk.verdict.test_cases.ListExecutions(
        tc_pb.ListExecutionsRequest(
            labels={"walk": walk.run_id}, query='"connection refused" or timeout -lock'
        ),
        timeout=DEADLINE_SECONDS,
    )
    assert [e.error_message for e in phrase.executions] == [messages[0]], phrase


STEPS = [runs_with_retries, failure_triage, labels_and_search]
