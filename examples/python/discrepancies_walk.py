"""A walk through DiscrepancyService, on the session results_walk created:
ingest discrepancies through a client stream of numbered chunks (and re-send
it: every chunk is skipped; read the ingest's status), record a batch (and replay it), list page by
page, resolve one and read its history, summarize, the error codes, and
finally delete the session with everything recorded in it.

Each step is a function of the shared `Walk`; main.py runs STEPS in order."""

import grpc

from verdict.v1 import discrepancies_pb2 as pb
from verdict.v1 import results_pb2, sessions_pb2
from verdict_client import DEADLINE_SECONDS, all_pages, expect_error, field_violations

# A streamed ingest may carry any number of chunks; give it more time than a
# unary call. Each chunk holds at most 5000 discrepancies.
STREAM_DEADLINE_SECONDS = 60.0
CHUNKS = 3
PER_CHUNK = 500

SEVERITIES = [
    pb.SEVERITY_CRITICAL,
    pb.SEVERITY_HIGH,
    pb.SEVERITY_MEDIUM,
    pb.SEVERITY_LOW,
    pb.SEVERITY_INFO,
]
KINDS = ["numeric_precision", "date_format", "null_handling"]


def _discrepancy(walk, n: int) -> pb.DiscrepancyInput:
    """The n-th discrepancy the validator reports (severities and kinds vary)."""
    return pb.DiscrepancyInput(
        result_id=walk.result_ids[0],
        kind=KINDS[n % len(KINDS)],
        severity=SEVERITIES[n % len(SEVERITIES)],
        description=f"output {n} differs between source and target",
        source_element=f"{walk.run_id}/PAYROLL.cbl:{100 + n}",
        target_element=f"{walk.run_id}/Payroll.java:{200 + n}",
        recommendation="compare with an explicit rounding mode",
        confidence=0.5 + (n % 50) / 100,
    )


def _chunks(walk, ingest_id: str):
    """The stream's messages: ingest_id and session_id on the first one only,
    `sequence` 1, 2, 3... A generator, so the chunks are produced (and sent)
    one at a time, however many there are."""
    for sequence in range(1, CHUNKS + 1):
        first = sequence == 1
        start = (sequence - 1) * PER_CHUNK
        yield pb.IngestDiscrepanciesRequest(
            ingest_id=ingest_id if first else "",
            session_id=walk.validation_session_id if first else "",
            sequence=sequence,
            items=[_discrepancy(walk, n) for n in range(start, start + PER_CHUNK)],
        )


def _count(walk, items) -> None:
    walk.discrepancy_counts.update(item.severity for item in items)


def ingest_stream(walk):
    """IngestDiscrepancies: 3 chunks of 500 through one client stream. The
    reply comes once every chunk is committed."""
    reply = walk.verdict.discrepancies.IngestDiscrepancies(
        _chunks(walk, f"{walk.run_id}-ingest"), timeout=STREAM_DEADLINE_SECONDS
    )
    assert reply.committed_items == CHUNKS * PER_CHUNK, reply
    assert reply.committed_chunks == CHUNKS, reply
    assert reply.skipped_chunks == 0, reply
    assert reply.high_water_mark == CHUNKS, reply
    for chunk in _chunks(walk, ""):
        _count(walk, chunk.items)


def resend_stream(walk):
    """The same stream again (as a client does after losing the reply): every
    chunk is at or below the high-water mark, so each is skipped and nothing
    is stored twice."""
    reply = walk.verdict.discrepancies.IngestDiscrepancies(
        _chunks(walk, f"{walk.run_id}-ingest"), timeout=STREAM_DEADLINE_SECONDS
    )
    assert reply.skipped_chunks == CHUNKS, reply
    assert reply.committed_items == 0, reply
    assert reply.committed_chunks == 0, reply
    assert reply.high_water_mark == CHUNKS, reply
    # Where an ingest stands can be read without streaming (e.g. after a
    # cancelled call, to resume after the high-water mark).
    status = walk.verdict.discrepancies.GetIngestStatus(
        pb.DiscrepancyServiceGetIngestStatusRequest(ingest_id=f"{walk.run_id}-ingest"),
        timeout=DEADLINE_SECONDS,
    ).status
    assert status.high_water_mark == CHUNKS, status
    assert status.committed_items == CHUNKS * PER_CHUNK, status
    assert status.finished, status


def record_batch(walk):
    """RecordDiscrepancies stores a batch atomically; replaying its batch_id
    stores nothing and returns the same ids; reusing it for other content is
    FAILED_PRECONDITION."""
    items = [
        pb.DiscrepancyInput(
            kind="encoding",
            severity=pb.SEVERITY_CRITICAL,
            description="EBCDIC packed decimal read as text",
            source_element=f"{walk.run_id}/CUSTFILE.cpy:12",
            target_element=f"{walk.run_id}/Customer.java:40",
            confidence=0.99,
        ),
        pb.DiscrepancyInput(
            kind="date_format",
            severity=pb.SEVERITY_HIGH,
            description="two-digit years",
            confidence=0.8,
        ),
        pb.DiscrepancyInput(
            kind="whitespace",
            severity=pb.SEVERITY_LOW,
            description="trailing blanks trimmed",
            confidence=0.6,
        ),
    ]
    request = pb.RecordDiscrepanciesRequest(
        session_id=walk.validation_session_id, batch_id=f"{walk.run_id}-batch-1", items=items
    )
    d = walk.verdict.discrepancies
    first = d.RecordDiscrepancies(request, timeout=DEADLINE_SECONDS)
    assert not first.replayed
    assert len(first.ids) == 3, first
    _count(walk, items)
    walk.batch_ids = list(first.ids)

    replay = d.RecordDiscrepancies(request, timeout=DEADLINE_SECONDS)
    assert replay.replayed, "a replay of the batch was stored again"
    assert list(replay.ids) == walk.batch_ids

    del request.items[2]
    expect_error(grpc.StatusCode.FAILED_PRECONDITION, d.RecordDiscrepancies, request)


def list_by_page(walk):
    """ListDiscrepancies 500 per page: every discrepancy exactly once, most
    severe first and newest first within a severity (so the batch's critical
    one, recorded last, leads); then one filter."""
    d = walk.verdict.discrepancies
    listed, pages = all_pages(
        d.ListDiscrepancies,
        pb.ListDiscrepanciesRequest(session_id=walk.validation_session_id, page_size=500),
        "discrepancies",
    )
    total = sum(walk.discrepancy_counts.values())
    assert total == CHUNKS * PER_CHUNK + 3
    assert pages == 4, f"{total} discrepancies 500 per page make 4 pages, got {pages}"
    ids = [x.id for x in listed]
    assert len(ids) == total and len(set(ids)) == total, "missing or repeated discrepancies"

    order = [(x.severity, -x.created_at.ToNanoseconds()) for x in listed]
    assert order == sorted(order), "not most severe first, newest first within a severity"
    assert listed[0].id == walk.batch_ids[0], "the newest critical discrepancy is not first"
    assert all(x.resolution == pb.RESOLUTION_OPEN for x in listed)
    assert listed[0].fingerprint, "no fingerprint was computed"

    critical_from_result, _ = all_pages(
        d.ListDiscrepancies,
        pb.ListDiscrepanciesRequest(
            result_id=walk.result_ids[0], severities=[pb.SEVERITY_CRITICAL], page_size=1000
        ),
        "discrepancies",
    )
    # The stream's discrepancies name the result; the batch's do not.
    assert len(critical_from_result) == CHUNKS * PER_CHUNK // len(SEVERITIES)
    assert {x.kind for x in critical_from_result} == set(KINDS)


def resolve_and_history(walk):
    """Two triage decisions on one discrepancy, then its history, oldest first."""
    d = walk.verdict.discrepancies
    target = walk.batch_ids[0]
    ack = d.ResolveDiscrepancy(
        pb.ResolveDiscrepancyRequest(
            id=target, resolution=pb.RESOLUTION_ACKNOWLEDGED, actor="alice", note="reproduced"
        ),
        timeout=DEADLINE_SECONDS,
    )
    assert ack.updated_count == 1, ack
    done = d.ResolveDiscrepancy(
        pb.ResolveDiscrepancyRequest(
            id=target,
            resolution=pb.RESOLUTION_RESOLVED,
            actor="bob",
            note="fixed in the copybook mapping",
        ),
        timeout=DEADLINE_SECONDS,
    )
    assert done.discrepancy.resolution == pb.RESOLUTION_RESOLVED
    assert done.discrepancy.resolved_by == "bob"
    assert done.discrepancy.HasField("resolution_updated_at")

    history = d.ListResolutionHistory(
        pb.ListResolutionHistoryRequest(id=target), timeout=DEADLINE_SECONDS
    )
    steps = [(c.from_resolution, c.to_resolution, c.actor) for c in history.changes]
    assert steps == [
        (pb.RESOLUTION_OPEN, pb.RESOLUTION_ACKNOWLEDGED, "alice"),
        (pb.RESOLUTION_ACKNOWLEDGED, pb.RESOLUTION_RESOLVED, "bob"),
    ], steps
    assert not any(c.via_fingerprint for c in history.changes)

    resolved = d.ListDiscrepancies(
        pb.ListDiscrepanciesRequest(
            session_id=walk.validation_session_id, resolutions=[pb.RESOLUTION_RESOLVED]
        ),
        timeout=DEADLINE_SECONDS,
    )
    assert [x.id for x in resolved.discrepancies] == [target]


def discrepancy_errors(walk):
    """A batch with bad items fails whole, each violation naming its item as
    `items[i].field`; a bad chunk fails the stream the same way, naming the
    chunk; a stream must say which ingest and session it is."""
    d = walk.verdict.discrepancies
    good = pb.DiscrepancyInput(
        kind="encoding", severity=pb.SEVERITY_LOW, description="ok", confidence=1
    )
    error = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        d.RecordDiscrepancies,
        pb.RecordDiscrepanciesRequest(
            session_id=walk.validation_session_id,
            batch_id=f"{walk.run_id}-batch-bad",
            items=[
                good,
                pb.DiscrepancyInput(kind="encoding", description="no severity", confidence=0.5),
                pb.DiscrepancyInput(kind="encoding", severity=pb.SEVERITY_LOW, confidence=2.0),
            ],
        ),
    )
    violations = field_violations(error)
    expected = {"items[1].severity", "items[2].description", "items[2].confidence"}
    assert set(violations) == expected, violations

    def bad_stream():
        yield pb.IngestDiscrepanciesRequest(
            ingest_id=f"{walk.run_id}-ingest-bad",
            session_id=walk.validation_session_id,
            sequence=1,
            items=[good, pb.DiscrepancyInput(severity=pb.SEVERITY_LOW, description="no kind")],
        )

    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, d.IngestDiscrepancies, bad_stream())
    violations = field_violations(error)
    assert "items[1].kind" in violations, violations
    assert "(chunk 1)" in violations["items[1].kind"], violations

    error = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        d.IngestDiscrepancies,
        iter([pb.IngestDiscrepanciesRequest(sequence=1, items=[good])]),
    )
    assert {"ingest_id", "session_id"} <= set(field_violations(error)), field_violations(error)

    error = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT,
        d.ResolveDiscrepancy,
        pb.ResolveDiscrepancyRequest(id=walk.batch_ids[1], resolution=pb.RESOLUTION_WONT_FIX),
    )
    assert "actor" in field_violations(error)


def summarize(walk):
    """SummarizeDiscrepancies counts what was stored: the streamed chunks once
    (not the re-sent stream), the batch once (not its replay), none of the
    refused items."""
    summary = walk.verdict.discrepancies.SummarizeDiscrepancies(
        pb.SummarizeDiscrepanciesRequest(session_id=walk.validation_session_id),
        timeout=DEADLINE_SECONDS,
    )
    expected_total = sum(walk.discrepancy_counts.values())
    assert summary.total == expected_total == CHUNKS * PER_CHUNK + 3, summary.total

    by_severity = [(c.key, c.count) for c in summary.by_severity]
    expected = [
        (pb.Severity.Name(s), walk.discrepancy_counts[s])
        for s in SEVERITIES
        if walk.discrepancy_counts[s]
    ]
    assert by_severity == expected, by_severity  # most severe first

    kinds = {c.key: c.count for c in summary.by_kind}
    assert sum(kinds.values()) == summary.total, kinds
    assert kinds["encoding"] == 1, kinds
    counts = [c.count for c in summary.by_kind]
    assert counts == sorted(counts, reverse=True), "by_kind is not largest first"

    by_resolution = {c.key: c.count for c in summary.by_resolution}
    expected = {"RESOLUTION_OPEN": summary.total - 1, "RESOLUTION_RESOLVED": 1}
    assert by_resolution == expected, by_resolution


def delete_validation_session(walk):
    """Deleting the session deletes its results and discrepancies with it."""
    walk.verdict.sessions.DeleteSession(
        sessions_pb2.DeleteSessionRequest(id=walk.validation_session_id), timeout=DEADLINE_SECONDS
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        walk.verdict.results.GetResult,
        results_pb2.GetResultRequest(id=walk.result_ids[0]),
    )
    expect_error(
        grpc.StatusCode.NOT_FOUND,
        walk.verdict.discrepancies.SummarizeDiscrepancies,
        pb.SummarizeDiscrepanciesRequest(session_id=walk.validation_session_id),
    )
    left = walk.verdict.discrepancies.ListDiscrepancies(
        pb.ListDiscrepanciesRequest(session_id=walk.validation_session_id), timeout=DEADLINE_SECONDS
    )
    assert len(left.discrepancies) == 0


STEPS = [
    ingest_stream,
    resend_stream,
    record_batch,
    list_by_page,
    resolve_and_history,
    discrepancy_errors,
    summarize,
    delete_validation_session,
]
