"""Runs the Python walk through Verdict's API against a running gateway.

    PYTHONPATH=<generated stubs> python main.py 127.0.0.1:50051

Prints one line per step and exits nonzero when a step fails.
"""

import dataclasses
import sys
import traceback
import uuid

import sessions_walk
from verdict_client import Verdict

# The walks in the order they run; a later service adds its module here
# (e.g. results_walk.STEPS after sessions, which creates the session they use).
STEPS = [*sessions_walk.STEPS]


@dataclasses.dataclass
class Walk:
    """What the steps share: the client and what earlier steps created."""

    verdict: Verdict
    # Prefix of every request_id and scope, so reruns never collide.
    run_id: str
    session_id: str = ""
    extra_session_ids: list[str] = dataclasses.field(default_factory=list)


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
