"""Runs the Python walk through Verdict's API against a running gateway.

    PYTHONPATH=<generated stubs> python main.py 127.0.0.1:50051

Prints one line per step and exits nonzero when a step fails.
"""

import collections
import dataclasses
import datetime
import sys
import traceback
import uuid

import discrepancies_walk
import metrics_walk
import projects_walk
import results_walk
import sessions_walk
import test_cases_walk
import test_runs_walk
from verdict_client import Verdict

# The walks in the order they run; a later service adds its module here.
# results_walk creates the session that discrepancies_walk records into (and
# deletes at its end), so they run in this order.
# Everything runs in a project of the walk's own (projects_walk).
STEPS = [
    *projects_walk.FIRST,
    *sessions_walk.STEPS,
    *results_walk.STEPS,
    *projects_walk.MIDDLE,
    *discrepancies_walk.STEPS,
    *test_cases_walk.STEPS,
    *test_runs_walk.STEPS,
    *metrics_walk.STEPS,
    *projects_walk.LAST,
]


@dataclasses.dataclass
class Walk:
    """What the steps share: the client and what earlier steps created."""

    verdict: Verdict
    # Prefix of every request_id and scope, so reruns never collide.
    run_id: str
    session_id: str = ""
    extra_session_ids: list[str] = dataclasses.field(default_factory=list)
    # The session results and discrepancies are recorded in, and its results.
    validation_session_id: str = ""
    result_ids: list[str] = dataclasses.field(default_factory=list)
    # Discrepancies stored so far, by severity, and the ids of the batch.
    discrepancy_counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    batch_ids: list[str] = dataclasses.field(default_factory=list)
    test_case_id: str = ""
    metrics_start: datetime.datetime | None = None


def main() -> int:
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    walk = Walk(verdict=Verdict(target), run_id=f"py-{uuid.uuid4().hex[:12]}")
    passed = failed = 0
    try:
        for step in STEPS:
            try:
                step(walk)
            except Exception:  # report every kind of failure the same way
                failed += 1
                print(f"python: FAILED: {step.__name__}", flush=True)
                traceback.print_exc()
                break  # later steps build on earlier ones
            passed += 1
            print(f"python: ok: {step.__name__}", flush=True)
    finally:
        walk.verdict.close()
    print(f"python: {passed} of {len(STEPS)} steps passed")
    return 0 if failed == 0 and passed == len(STEPS) else 1


if __name__ == "__main__":
    sys.exit(main())
