"""Splits rendered kustomize output for scripts/deploy-check.sh and checks
what a schema cannot: that the gateway and its database are wired together
the way deploy/README.md says.

    python check_manifests.py RENDERED.yaml OUT_DIR

Writes every manifest that kubernetes-validate has a schema for to OUT_DIR
(one file each) and skips, by name, the kinds it has none for. Exits nonzero
with a message per broken rule.
"""

import pathlib
import sys

import yaml

# Custom resources with no schema in kubernetes-validate: skipped there, and
# checked by the rules below instead.
SKIPPED_KINDS = {("postgresql.cnpg.io/v1", "Cluster")}


def main() -> int:
    rendered, out_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        key = (doc["apiVersion"], doc["kind"])
        if key in SKIPPED_KINDS:
            print(f"skipped schema validation of {doc['kind']} {doc['metadata']['name']} ({key[0]}): no schema")
            continue
        (out_dir / f"{i:02d}-{doc['kind'].lower()}.yaml").write_text(yaml.safe_dump(doc))

    problems = check_wiring(docs)
    for problem in problems:
        print(f"{rendered.name}: {problem}", file=sys.stderr)
    return 1 if problems else 0


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(found) != 1:
        raise SystemExit(f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def check_wiring(docs) -> list[str]:
    problems = []
    deployment = one(docs, "Deployment", "verdict")
    cluster = one(docs, "Cluster", "verdict-db")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "verdict")
    env = {e["name"]: e for e in container.get("env", [])}

    if cluster["spec"].get("instances") != 3:
        problems.append("the CloudNativePG Cluster must have 3 instances")

    db_secret = env.get("DATABASE_URL", {}).get("valueFrom", {}).get("secretKeyRef", {})
    if db_secret.get("name") != f"{cluster['metadata']['name']}-app" or db_secret.get("key") != "uri":
        problems.append("DATABASE_URL must come from the Cluster's app Secret (key uri: the -rw service)")

    if env.get("VERDICT_LISTEN", {}).get("value") != "0.0.0.0:50051":
        problems.append("VERDICT_LISTEN must be 0.0.0.0:50051 in a container")

    readiness = container.get("readinessProbe", {}).get("grpc", {})
    if readiness.get("service") != "verdict.v1.SessionService":
        problems.append("readiness must be the DB-aware gRPC health of verdict.v1.SessionService")
    if "grpc" not in container.get("startupProbe", {}):
        problems.append("the startup probe must be a native gRPC probe")
    if "livenessProbe" not in container:
        problems.append("no liveness probe")

    # preStop sleep + the gateway's drain must fit in the grace period.
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    drain_ms = int(env.get("VERDICT_SHUTDOWN_GRACE_MS", {}).get("value", "20000"))
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if sleep <= 0:
        problems.append("no preStop sleep: calls would reach a pod that is shutting down")
    if grace < sleep + drain_ms / 1000:
        problems.append(f"terminationGracePeriodSeconds {grace} < preStop {sleep} s + drain {drain_ms} ms")

    for kind in ("Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"):
        if not any(d["kind"] == kind for d in docs):
            problems.append(f"no {kind}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
