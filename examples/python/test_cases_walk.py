"""A short walk through TestCaseService: create a test case (and retry the
create), record a batch of its executions (and replay it), read its
statistics, and delete it with its executions.

Each step is a function of the shared `Walk`; main.py runs STEPS in order."""

import datetime

import grpc

from verdict.v1 import test_cases_pb2 as pb
from verdict_client import DEADLINE_SECONDS, expect_error, field_violations

P, F, S = pb.EXECUTION_STATUS_PASSED, pb.EXECUTION_STATUS_FAILED, pb.EXECUTION_STATUS_SKIPPED
# Six runs, oldest first: pass, fail, pass, pass, fail, and one skipped.
RUNS = [(P, 100), (F, 200), (P, 300), (P, 400), (F, 500), (S, 0)]


def create_test_case(walk):
    """CreateTestCase is idempotent on its key: a retry returns the stored one."""
    request = pb.CreateTestCaseRequest(
        key=f"{walk.run_id}-login",
        name="login keeps the session cookie",
        test_type=pb.TEST_TYPE_BEHAVIORAL,
        target_subsystem=f"{walk.run_id}-auth",
        tags=["smoke", "auth", "smoke"],
    )
    first = walk.verdict.test_cases.CreateTestCase(request, timeout=DEADLINE_SECONDS)
    assert first.created
    assert first.test_case.version == 1
    assert list(first.test_case.tags) == ["auth", "smoke"], "tags are stored sorted, once each"
    retry = walk.verdict.test_cases.CreateTestCase(request, timeout=DEADLINE_SECONDS)
    assert not retry.created and retry.test_case.id == first.test_case.id
    walk.test_case_id = first.test_case.id


def record_executions(walk):
    """RecordExecutions stores a batch atomically (by test case key here);
    replaying its batch_id stores nothing. An invalid item fails the whole
    batch with `items[i].field`."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    start = now - datetime.timedelta(hours=1)
    items = []
    for i, (status, duration_ms) in enumerate(RUNS):
        item = pb.ExecutionInput(
            test_case_key=f"{walk.run_id}-login", status=status, duration_ms=duration_ms
        )
        item.started_at.FromDatetime(start + datetime.timedelta(minutes=i))
        if status == F:
            item.error_message = "expected cookie SESSION, got none"
        item.performance["p99_latency_ms"] = 12.5 + i
        items.append(item)
    request = pb.RecordExecutionsRequest(batch_id=f"{walk.run_id}-executions-1", items=items)
    tc = walk.verdict.test_cases
    first = tc.RecordExecutions(request, timeout=DEADLINE_SECONDS)
    assert not first.replayed and len(first.ids) == len(RUNS), first
    replay = tc.RecordExecutions(request, timeout=DEADLINE_SECONDS)
    assert replay.replayed and list(replay.ids) == list(first.ids)

    bad = pb.RecordExecutionsRequest(
        batch_id=f"{walk.run_id}-executions-bad", items=[items[0], pb.ExecutionInput()]
    )
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, tc.RecordExecutions, bad)
    violations = field_violations(error)
    for field in ("items[1].test_case", "items[1].status", "items[1].started_at"):
        assert field in violations, f"no violation for {field}: {violations}"


def test_statistics(walk):
    """GetTestStatistics of the test case: counts by status, pass rate
    (skipped runs do not count), duration percentiles and flakiness."""
    stats = walk.verdict.test_cases.GetTestStatistics(
        pb.GetTestStatisticsRequest(test_case_key=f"{walk.run_id}-login"), timeout=DEADLINE_SECONDS
    )
    assert stats.total_executions == len(RUNS), stats
    by_status = {c.status: c.count for c in stats.by_status}
    assert by_status == {P: 3, F: 2, S: 1, pb.EXECUTION_STATUS_ERROR: 0}, by_status
    assert abs(stats.pass_rate - 3 / 5) < 1e-9, stats.pass_rate
    assert stats.duration_p50_ms == 300, stats.duration_p50_ms  # of the five that ran
    # pass, fail, pass, pass, fail: three flips over five runs.
    assert stats.flaky_test_count == 1, stats
    flaky = stats.flaky_tests[0]
    assert flaky.test_case_key == f"{walk.run_id}-login"
    assert (flaky.flips, flaky.executions_considered) == (3, 5), flaky
    assert abs(flaky.flip_rate - 3 / 4) < 1e-9, flaky


def delete_test_case(walk):
    """A test case with executions is deleted only with `force`."""
    tc = walk.verdict.test_cases
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        tc.DeleteTestCase,
        pb.DeleteTestCaseRequest(id=walk.test_case_id),
    )
    deleted = tc.DeleteTestCase(
        pb.DeleteTestCaseRequest(id=walk.test_case_id, force=True), timeout=DEADLINE_SECONDS
    )
    assert deleted.deleted_executions == len(RUNS), deleted
    expect_error(
        grpc.StatusCode.NOT_FOUND, tc.GetTestCase, pb.GetTestCaseRequest(id=walk.test_case_id)
    )


STEPS = [
    create_test_case,
    record_executions,
    test_statistics,
    delete_test_case,
]
