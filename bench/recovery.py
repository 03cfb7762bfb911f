"""Recovery latency: from a preemption reaching the API to training again.

Runs the example job (2 nodes x 2 processes, real torchrun, real S3) on the
local cluster stand-in with the real operator, preempts a worker N times, and
measures each recovery from the API server's request log (every request, with
its time) and the new gang's log:

* disruption: the scheduler's PATCH adding ``DisruptionTarget`` to the pod;
* fencing starts: the operator's first DELETE of a pod of the ended attempt;
* new gang created: the operator's first pod POST for the next attempt;
* first step: the new rank 0 prints its first training step after restoring
  (the trainer reports how long the restore itself took).

Everything is measured in this one run; the operator's own reaction target
is <= 1 s. Usage: ``python bench/recovery.py [--preemptions 3]``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from localcluster import control
from localcluster.cluster import LocalCluster

NS = "default"
JOB = "bench"
OPERATOR_UA = "trainingjob-operator"


def requests_log(cluster: LocalCluster) -> list[dict]:
    path = Path(cluster.state_dir) / "api-requests.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def status(kube) -> dict:
    return kube.get("trainingjobs", JOB, namespace=NS).get("status") or {}


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise TimeoutError(what)


def first_step_time(log_paths: list[Path], timeout: float) -> tuple[float, float]:
    """Wall time the first training step appeared, and the restore time the trainer reports.

    Global rank 0 (which prints) can be on any pod: c10d assigns ranks at rendezvous.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in log_paths:
            text = path.read_text() if path.exists() else ""
            m = re.search(r"restore_seconds=([0-9.]+)", text)
            if m and re.search(r"\[example\] step \d+/", text[m.end():]):
                return time.time(), float(m.group(1))
        time.sleep(0.01)
    raise TimeoutError(f"no training step in {log_paths}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preemptions", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256, help="model width (state size)")
    args = p.parse_args(argv)
    state_dir = Path(tempfile.mkdtemp(prefix="tj-bench-"))
    cluster = LocalCluster(state_dir)
    rows = []
    try:
        cluster.start()
        kube = cluster.client()
        cluster.create_s3_secret(NS)
        cluster.start_operator()  # default resync (10 s): reactions must come from watch events
        steps = 400
        kube.create("trainingjobs", {
            "apiVersion": "trainingjob.dev/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": JOB, "namespace": NS},
            "spec": {
                "image": "local/trainer:dev",
                "command": [sys.executable, "-m", "trainingjob_trainer.launch", "-m", "trainingjob_trainer.example"],
                "args": ["--steps", str(steps), "--sleep-per-step", "0.1", "--hidden", str(args.hidden)],
                "nodes": 2, "procsPerNode": 2,
                "snapshot": {"uri": f"s3://{cluster.bucket}/bench", "endpoint": cluster.s3_endpoint,
                             "everySteps": 20, "credentialsSecret": "s3-creds"},
                "recovery": {"maxPreemptions": 100},
                "terminationGracePeriodSeconds": 60,
            }}, namespace=NS)
        for n in range(args.preemptions):
            wait(lambda n=n: status(kube).get("attempt") == n and status(kube).get("phase") == "Running", 240,
                 f"attempt {n} running")
            logs = [state_dir / "pods" / NS / f"{JOB}-{n}-{r}" / "trainer.log" for r in range(2)]
            first_step_time(logs, 240)  # the gang is training
            time.sleep(1.0)
            mark = len(requests_log(cluster))
            victim = f"{JOB}-{n}-1"
            control.preempt(kube, NS, victim, reason="PreemptionByScheduler", message="bench")
            wait(lambda n=n: status(kube).get("attempt") == n + 1 and status(kube).get("gangCreated"), 240,
                 f"attempt {n + 1} created")
            new_logs = [state_dir / "pods" / NS / f"{JOB}-{n + 1}-{r}" / "trainer.log" for r in range(2)]
            t_step, restore_s = first_step_time(new_logs, 240)
            reqs = requests_log(cluster)[mark:]
            t_disrupt = next(r["ts"] for r in reqs if r["method"] == "PATCH" and r["resource"] == "pods"
                             and r.get("name") == victim)
            ops = [r for r in reqs if r["user_agent"].startswith(OPERATOR_UA) and r["resource"] == "pods"]
            t_fence = next(r["ts"] for r in ops if r["method"] == "DELETE" and f"{JOB}-{n}-" in (r.get("name") or ""))
            t_created = next(r["ts"] for r in ops if r["method"] == "POST" and r["ts"] > t_fence)
            rows.append({
                "fence": t_fence - t_disrupt,
                "created": t_created - t_disrupt,
                "first_step": t_step - t_disrupt,
                "restore": restore_s,
            })
            r = rows[-1]
            print(f"preemption {n + 1}: fencing starts {r['fence']:.3f}s, new gang {r['created']:.2f}s, "
                  f"first step {r['first_step']:.2f}s (restore {r['restore']:.2f}s)", flush=True)
    finally:
        cluster.stop()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print()
    print(f"Recovery after a preemption, {len(rows)} preemptions, example job 2x2, hidden={args.hidden}, "
          "local stand-in (median)")
    print("| interval (from DisruptionTarget reaching the API) | median s | share of time to first step |")
    print("|---|---|---|")
    total = med["first_step"]
    print(f"| operator starts fencing | {med['fence']:.3f} | {med['fence'] / total:.3f} |")
    print(f"| new gang created (old gang gone, emergency snapshot saved) | {med['created']:.2f} | "
          f"{med['created'] / total:.2f} |")
    print(f"| first training step after restore | {med['first_step']:.2f} | 1.00 |")
    print(f"| of which: restore itself | {med['restore']:.2f} | {med['restore'] / total:.2f} |")
    ok = med["fence"] <= 1.0
    print(f"\noperator reaction {med['fence']:.3f}s vs target 1 s: {'met' if ok else 'MISSED'} "
          f"({med['fence'] / 1.0:.2f}x of the target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
