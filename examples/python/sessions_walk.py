"""A walk through SessionService: create, log, list page by page, watch a
status change, the error codes, delete. Each step is a function of the shared
`Walk`; main.py runs STEPS in order."""

import concurrent.futures

import grpc
from google.protobuf import struct_pb2

from verdict.v1 import sessions_pb2 as pb
from verdict_client import DEADLINE_SECONDS, expect_error, field_violations


def _struct(values: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


# A config with every kind of JSON value, nested objects and lists, text
# that needs escaping and a value longer than 127 bytes (a two-byte length on
# the wire): what a session stores comes back as the same Struct.
CONFIG = {
    "threshold": 0.9,
    "rules": ["naming", "control-flow"],
    "limits": {"depth": 3, "strict": True, "skip": None, "ratio": -1.5e-7},
    "matrix": [[1, 2], [], [{"os": "linux"}, False]],
    "note": "café \"quoted\" \\ tab\t 🚀 " + "x" * 300,
    "": "empty key",
}


def _create(walk, request_id: str, scope: str) -> pb.CreateSessionResponse:
    return walk.verdict.sessions.CreateSession(
        pb.CreateSessionRequest(
            request_id=request_id,
            source_technology="cobol",
            target_technology="java",
            validation_scope=scope,
            config=_struct(CONFIG),
            metadata=_struct({"example": "python"}),
        ),
        timeout=DEADLINE_SECONDS,
    )


def create_session(walk):
    """CreateSession, then the same request_id again: the stored session comes
    back with created=false (a retry never makes a duplicate)."""
    first = _create(walk, f"{walk.run_id}-main", f"{walk.run_id}/main")
    assert first.created, "the first call did not create the session"
    assert first.session.status == pb.SESSION_STATUS_PENDING
    assert first.session.version == 1
    assert first.session.config["threshold"] == 0.9

    retry = _create(walk, f"{walk.run_id}-main", f"{walk.run_id}/main")
    assert not retry.created, "a retry with the same request_id created another session"
    assert retry.session.id == first.session.id

    got = walk.verdict.sessions.GetSession(
        pb.GetSessionRequest(request_id=f"{walk.run_id}-main"), timeout=DEADLINE_SECONDS
    )
    assert got.session.id == first.session.id
    assert got.session.config == _struct(CONFIG), "the stored config read back differently"
    assert retry.session.config == _struct(CONFIG)
    walk.session_id = first.session.id


def append_logs(walk):
    """AppendSessionLog three times, then read them back two per page."""
    messages = ["parsed 120 programs", "3 copybooks missing", "comparing outputs"]
    levels = [pb.LOG_LEVEL_INFO, pb.LOG_LEVEL_WARNING, pb.LOG_LEVEL_INFO]
    for message, level in zip(messages, levels):
        walk.verdict.sessions.AppendSessionLog(
            pb.AppendSessionLogRequest(
                session_id=walk.session_id,
                level=level,
                message=message,
                fields=_struct({"step": message.split()[0]}),
            ),
            timeout=DEADLINE_SECONDS,
        )

    seen, token = [], ""
    while True:
        page = walk.verdict.sessions.ListSessionLogs(
            pb.ListSessionLogsRequest(session_id=walk.session_id, page_size=2, page_token=token),
            timeout=DEADLINE_SECONDS,
        )
        seen += [entry.message for entry in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert seen == messages, f"log read back as {seen}"


def concurrent_appends(walk):
    """Eight threads append to one session at once (the gateway may commit
    concurrent appends of a session together): every reply names the
    position its entry is listed at, positions run 1, 2, 3, … with no gap,
    and each thread's entries keep the order it appended them in."""
    session = _create(walk, f"{walk.run_id}-concurrent", f"{walk.run_id}/concurrent").session
    walk.extra_session_ids.append(session.id)
    threads, each = 8, 20

    def writer(t):
        replies = []
        for i in range(each):
            reply = walk.verdict.sessions.AppendSessionLog(
                pb.AppendSessionLogRequest(
                    session_id=session.id, level=pb.LOG_LEVEL_INFO, message=f"w{t}-{i}"
                ),
                timeout=DEADLINE_SECONDS,
            )
            assert reply.entry.message == f"w{t}-{i}", reply
            replies.append((reply.entry.message, reply.entry.sequence))
        return replies

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        per_thread = list(pool.map(writer, range(threads)))

    listed, token = [], ""
    while True:
        page = walk.verdict.sessions.ListSessionLogs(
            pb.ListSessionLogsRequest(session_id=session.id, page_size=50, page_token=token),
            timeout=DEADLINE_SECONDS,
        )
        listed += [(entry.message, entry.sequence) for entry in page.entries]
        token = page.next_page_token
        if not token:
            break
    assert [seq for _, seq in listed] == list(range(1, threads * each + 1)), listed
    assert sorted(listed) == sorted(r for replies in per_thread for r in replies)
    for replies in per_thread:
        seqs = [seq for _, seq in replies]
        assert seqs == sorted(seqs), f"a thread's entries out of order: {replies}"


def list_sessions_by_page(walk):
    """ListSessions with a page size small enough to need several pages: every
    session comes back exactly once, newest first."""
    scope = f"{walk.run_id}/paging"
    created = [_create(walk, f"{walk.run_id}-page-{i}", scope).session.id for i in range(7)]

    seen, pages, token = [], 0, ""
    newest_first = []
    while True:
        page = walk.verdict.sessions.ListSessions(
            pb.ListSessionsRequest(validation_scope=scope, page_size=3, page_token=token),
            timeout=DEADLINE_SECONDS,
        )
        pages += 1
        seen += [s.id for s in page.sessions]
        assert all(s.config == _struct(CONFIG) for s in page.sessions), "a listed config differs"
        newest_first += [s.created_at.ToNanoseconds() for s in page.sessions]
        token = page.next_page_token
        if not token:
            break
    assert pages == 3, f"expected 3 pages of at most 3, got {pages}"
    assert len(seen) == len(set(seen)), "a session was listed twice"
    assert set(seen) == set(created), "the listed sessions differ from the created ones"
    assert newest_first == sorted(newest_first, reverse=True), "not newest first"
    walk.extra_session_ids += created


def watch_session(walk):
    """WatchSession streams the current state, then each committed change; a
    second caller moves the session to a final status, which ends the stream."""
    stream = walk.verdict.sessions.WatchSession(
        pb.WatchSessionRequest(id=walk.session_id), timeout=30
    )
    first = next(stream)
    assert first.WhichOneof("event") == "session"
    assert first.session.status == pb.SESSION_STATUS_PENDING

    def another_client():
        s = walk.verdict.sessions
        s.UpdateSessionStatus(
            pb.UpdateSessionStatusRequest(id=walk.session_id, status=pb.SESSION_STATUS_PROCESSING),
            timeout=DEADLINE_SECONDS,
        )
        s.AppendSessionLog(
            pb.AppendSessionLogRequest(
                session_id=walk.session_id, level=pb.LOG_LEVEL_INFO, message="all outputs match"
            ),
            timeout=DEADLINE_SECONDS,
        )
        s.UpdateSessionStatus(
            pb.UpdateSessionStatusRequest(id=walk.session_id, status=pb.SESSION_STATUS_COMPLETED),
            timeout=DEADLINE_SECONDS,
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        changes = pool.submit(another_client)
        events = list(stream)  # returns when the server ends the stream
        changes.result()  # re-raises a failure of the other client

    statuses = [e.session.status for e in events if e.WhichOneof("event") == "session"]
    logs = [e.log_entry.message for e in events if e.WhichOneof("event") == "log_entry"]
    assert statuses == [pb.SESSION_STATUS_PROCESSING, pb.SESSION_STATUS_COMPLETED], statuses
    assert logs == ["all outputs match"], logs
    assert stream.code() == grpc.StatusCode.OK


def error_codes(walk):
    """The status codes a client handles, and the field violations of
    INVALID_ARGUMENT."""
    s = walk.verdict.sessions
    error = expect_error(
        grpc.StatusCode.INVALID_ARGUMENT, s.CreateSession, pb.CreateSessionRequest(request_id="")
    )
    violations = field_violations(error)
    for field in ("request_id", "source_technology", "target_technology", "validation_scope"):
        assert field in violations, f"no violation for {field}: {violations}"

    # COMPLETED is final: moving it anywhere is an illegal state move.
    expect_error(
        grpc.StatusCode.FAILED_PRECONDITION,
        s.UpdateSessionStatus,
        pb.UpdateSessionStatusRequest(id=walk.session_id, status=pb.SESSION_STATUS_PROCESSING),
    )
    # A stale expected_version: someone else changed the session first.
    expect_error(
        grpc.StatusCode.ABORTED,
        s.DeleteSession,
        pb.DeleteSessionRequest(id=walk.session_id, expected_version=1),
    )


def delete_sessions(walk):
    """DeleteSession removes a session with its log; then it is NOT_FOUND."""
    s = walk.verdict.sessions
    deleted = s.DeleteSession(pb.DeleteSessionRequest(id=walk.session_id), timeout=DEADLINE_SECONDS)
    assert deleted.deleted_log_entries == 4, deleted
    for session_id in walk.extra_session_ids:
        s.DeleteSession(pb.DeleteSessionRequest(id=session_id), timeout=DEADLINE_SECONDS)
    expect_error(grpc.StatusCode.NOT_FOUND, s.GetSession, pb.GetSessionRequest(id=walk.session_id))


STEPS = [
    create_session,
    append_logs,
    concurrent_appends,
    list_sessions_by_page,
    watch_session,
    error_codes,
    delete_sessions,
]
