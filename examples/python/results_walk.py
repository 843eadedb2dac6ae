"""A walk through ResultService: record a session's validation results (and a
retried record), read one back, list them page by page and filtered, and the
error codes. The session it creates is the one discrepancies_walk uses too;
that walk deletes it at the end.

Each step is a function of the shared `Walk`; main.py runs STEPS in order."""

import uuid

import grpc
from google.protobuf import struct_pb2

from verdict.v1 import results_pb2 as pb
from verdict.v1 import sessions_pb2
from verdict_client import DEADLINE_SECONDS, all_pages, expect_error, field_violations


def _struct(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _record(walk, request_id: str, status, fidelity: float, **extra) -> pb.RecordResultResponse:
    return walk.verdict.results.RecordResult(
        pb.RecordResultRequest(
            session_id=walk.validation_session_id,
            request_id=request_id,
            result_type=pb.RESULT_TYPE_BEHAVIORAL,
            overall_status=status,
            fidelity_score=fidelity,
            **extra,
        ),
        timeout=DEADLINE_SECONDS,
    )


def record_result(walk):
    """A session to validate, then RecordResult and its retry: the same
    (session_id, request_id) returns the stored result with created=false."""
    created = walk.verdict.sessions.CreateSession(
        sessions_pb2.CreateSessionRequest(
            request_id=f"{walk.run_id}-validation",
            source_technology="cobol",
            target_technology="java",
            validation_scope=f"{walk.run_id}/validation",
        ),
        timeout=DEADLINE_SECONDS,
    )
    walk.validation_session_id = created.session.id

    details = dict(
        summary="outputs match except for rounding in 3 reports",
        execution_time_ms=48_250,
        source_representation=_struct({"programs": 120, "entry": "PAYROLL"}),
        target_representation=_struct({"classes": 310, "entry": "Payroll.main"}),
    )
    first = _record(walk, f"{walk.run_id}-result-0", pb.OVERALL_STATUS_WARNING, 0.97, **details)
    assert first.created, "the first call did not store the result"
    result = first.result
    assert result.session_id == walk.validation_session_id
    assert result.overall_status == pb.OVERALL_STATUS_WARNING
    assert result.fidelity_score == 0.97
    assert result.execution_time_ms == 48_250
    assert result.source_representation["entry"] == "PAYROLL"

    # A retry (say, after a timeout) with the same request_id stores nothing.
    retry = _record(walk, f"{walk.run_id}-result-0", pb.OVERALL_STATUS_WARNING, 0.97, **details)
    assert not retry.created, "a retry with the same request_id stored another result"
    assert retry.result.id == result.id

    got = walk.verdict.results.GetResult(pb.GetResultRequest(id=result.id), timeout=DEADLINE_SECONDS)
    assert got.result.summary == details["summary"]
    walk.result_ids.append(result.id)


def list_results_by_page(walk):
    """Four more results, then ListResults two per page (newest first, each
    once) and with filters on the verdict and the fidelity."""
    verdicts = [
        (pb.OVERALL_STATUS_PASSED, 1.0),
        (pb.OVERALL_STATUS_FAILED, 0.62),
        (pb.OVERALL_STATUS_PASSED, 0.99),
        (pb.OVERALL_STATUS_FAILED, 0.41),
    ]
    for i, (status, fidelity) in enumerate(verdicts, start=1):
        response = _record(walk, f"{walk.run_id}-result-{i}", status, fidelity)
        assert response.created
        walk.result_ids.append(response.result.id)

    results, pages = all_pages(
        walk.verdict.results.ListResults,
        pb.ListResultsRequest(session_id=walk.validation_session_id, page_size=2),
        "results",
    )
    assert pages == 3, f"five results two per page make 3 pages, got {pages}"
    ids = [r.id for r in results]
    assert len(ids) == len(set(ids)), "a result was listed twice"
    assert set(ids) == set(walk.result_ids), "the listed results differ from the recorded ones"
    times = [r.created_at.ToNanoseconds() for r in results]
    assert times == sorted(times, reverse=True), "not newest first"

    # Filters combine: failed results with a fidelity of at least 0.5.
    failed = walk.verdict.results.ListResults(
        pb.ListResultsRequest(
            session_id=walk.validation_session_id,
            overall_statuses=[pb.OVERALL_STATUS_FAILED],
            min_fidelity=0.5,
        ),
        timeout=DEADLINE_SECONDS,
    )
    assert [r.fidelity_score for r in failed.results] == [0.62], failed
    assert failed.next_page_token == ""


def result_errors(walk):
    """INVALID_ARGUMENT names every bad field; an unknown session or result is
    NOT_FOUND."""
    results = walk.verdict.results
    error = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        results.RecordResult,
        pb.RecordResultRequest(
            session_id=walk.validation_session_id,
            request_id="",
            result_type=pb.RESULT_TYPE_STATIC,
            overall_status=pb.OVERALL_STATUS_UNSPECIFIED,
            fidelity_score=1.5,
            execution_time_ms=-1,
        ),
    )
    violations = field_violations(error)
    for field in ("request_id", "overall_status", "fidelity_score", "execution_time_ms"):
        assert field in violations, f"no violation for {field}: {violations}"
    assert "result_type" not in violations, violations

    missing = str(uuid.uuid4())
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        results.RecordResult,
        pb.RecordResultRequest(
            session_id=missing,
            request_id=f"{walk.run_id}-orphan",
            result_type=pb.RESULT_TYPE_STATIC,
            overall_status=pb.OVERALL_STATUS_PASSED,
            fidelity_score=1.0,
        ),
    )
    expect_error(grpc.StatusCode.NOT_FOUND, results.GetResult, pb.GetResultRequest(id=missing))


STEPS = [
    record_result,
    list_results_by_page,
    result_errors,
]
