"""`make demo`: the main job end to end on the local cluster stand-in.

Starts the stand-in (API server, node agent, S3), runs the operator, applies
``examples/trainingjob.yaml`` (2 nodes x 2 processes, real torchrun, real
snapshots to the local S3), preempts a worker mid-training the way the
scheduler does (``DisruptionTarget`` + graceful delete), prints a timeline of
what the operator and the trainer did, and ends with ``kubectl get tj``.
Everything it started is stopped by PID at the end, also on Ctrl-C or error.

``--mode containers`` (``make demo MODE=containers``) runs the same story on
container nodes: the operator from its image in a podman container (with the
env and securityContext the chart sets) and the job's pods from the trainer
image, both as ``make images`` built them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from localcluster import control
from localcluster.cluster import REPO_ROOT, LocalCluster
from localcluster.images import load_refs
from localcluster.kube import ApiError, Client

EXAMPLE = REPO_ROOT / "examples" / "trainingjob.yaml"
NS = "default"


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)


def kubectl(cluster: LocalCluster, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(["kubectl", "--kubeconfig", cluster.kubeconfig, *args], input=stdin, text=True,
                         capture_output=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def manifest_for(cluster: LocalCluster, image: str | None = None) -> str:
    """examples/trainingjob.yaml, pointed at the stand-in's S3 server (and at ``image``, if given)."""
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["namespace"] = NS
    if image:
        body["spec"]["image"] = image
    snap = body["spec"]["snapshot"]
    snap["endpoint"] = cluster.s3_endpoint
    snap["uri"] = f"s3://{cluster.bucket}/runs"
    # Progress every 2 s (default 15) so that a one-minute demo shows it move.
    snap["progressSeconds"] = 2
    return yaml.safe_dump(body, sort_keys=False)


def goodput_line(st: dict[str, Any]) -> str:
    """The run's goodput figure and its parts, from ``status.goodput`` (docs/architecture.md)."""
    g = st.get("goodput") or {}
    if "percent" not in g:
        return "goodput: not reported (no progress object was read)"
    return (f"goodput={g['percent']}% productive={g.get('productiveSeconds')}s lost={g.get('lostSeconds')}s "
            f"(re-done {g.get('redoneSeconds')}s + recovery {g.get('recoverySeconds')}s + "
            f"snapshot stalls {g.get('stalledSeconds')}s)")


class Watcher:
    """Prints status changes and new Events of the job."""

    def __init__(self, kube: Client, name: str, tl: Timeline) -> None:
        self.kube, self.name, self.tl = kube, name, tl
        self.seen_events: set[str] = set()
        self.last: tuple[Any, ...] = ()

    def poll(self) -> dict[str, Any]:
        st = self.kube.get("trainingjobs", self.name, namespace=NS).get("status") or {}
        latest = (st.get("snapshot") or {}).get("latest") or {}
        progress = st.get("progress") or {}
        key = (st.get("phase"), st.get("attempt"), (st.get("workers") or {}).get("summary"), latest.get("step"),
               progress.get("step"), progress.get("eta"))
        if key != self.last:
            self.last = key
            self.tl.say(f"status: phase={key[0]} attempt={key[1]} ready={key[2]} latest-snapshot-step={key[3]} "
                        f"step={key[4]} progress={progress.get('percent')}% eta={key[5]}")
        events = sorted(
            (e for e in self.kube.list("events", namespace=NS)
             if (e.get("involvedObject") or {}).get("name") == self.name),
            key=lambda e: (e.get("lastTimestamp") or "", e["metadata"]["name"]))
        for e in events:
            if e["metadata"]["name"] not in self.seen_events:
                self.seen_events.add(e["metadata"]["name"])
                self.tl.say(f"event {e.get('type')}/{e.get('reason')}: {e.get('message')}")
        return st

    def until(self, pred, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.poll()
            if pred(st):
                return st
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def start_operator(cluster: LocalCluster, images: dict[str, str] | None, tl: Timeline) -> None:
    """The operator as a process, or (container mode) from its image in a podman container."""
    if images is None:
        cluster.start_operator(["--resync-seconds", "2"])
        tl.say("operator started (python -m trainingjob_operator)")
        return
    from localcluster.containers import operator_container_argv
    from localcluster.s3 import free_port

    argv = operator_container_argv(image=images["operator"], kubeconfig=cluster.kubeconfig, state_dir=cluster.state_dir,
                                   name="operator", health_port=free_port(), env={"TJ_OPERATOR_RESYNC_SECONDS": "2"})
    cluster.start_operator(command=argv)
    tl.say(f"operator started from its image {images['operator']} (podman container)")


def run(args: argparse.Namespace) -> int:
    tl = Timeline()
    images = None
    if args.mode == "containers":
        images = load_refs()
        if images is None:
            tl.say("the images are missing: run make images (make demo MODE=containers does)")
            return 1
    state_dir = Path(tempfile.mkdtemp(prefix="tj-demo-"))
    kind = "container nodes (podman)" if images else "3 nodes"
    tl.say(f"starting the local cluster stand-in in {state_dir} (API server, node agent on {kind}, S3)")
    cluster = LocalCluster(state_dir, runtime="podman" if images else "process")
    try:
        cluster.start()
        kube = cluster.client()
        tl.say(f"API server {cluster.api_url}, S3 (SeaweedFS) {cluster.s3_endpoint}")
        cluster.create_s3_secret(NS, "s3-creds")
        start_operator(cluster, images, tl)
        manifest = manifest_for(cluster, images["trainer"] if images else None)
        print(kubectl(cluster, "apply", "-f", "-", stdin=manifest).strip(), flush=True)
        name = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
        w = Watcher(kube, name, tl)
        w.until(lambda s: s.get("phase") == "Running", 120, "the gang to run")
        w.until(lambda s: ((s.get("snapshot") or {}).get("latest") or {}).get("step", 0) >= args.preempt_after_step,
                180, f"a snapshot at step >= {args.preempt_after_step}")
        victim = f"{name}-0-1"
        pod = kube.get("pods", victim, namespace=NS)
        tl.say(f">>> preempting pod {victim} on {pod['spec'].get('nodeName')} "
               "(DisruptionTarget/PreemptionByScheduler + graceful delete, as the scheduler does)")
        control.preempt(kube, NS, victim, reason="PreemptionByScheduler",
                        message="demo: a higher-priority pod needs this node")
        st = w.until(lambda s: s.get("phase") in ("Succeeded", "Failed"), 300, "the job to finish")
        # The trainer's last progress write (100%) is read on the operator's next pass.
        try:
            st = w.until(lambda s: s.get("phase") == "Failed" or (s.get("progress") or {}).get("percent") == 100.0
                         and "percent" in (s.get("goodput") or {}), 30, "the last progress")
        except TimeoutError:
            tl.say("the trainer's last progress did not reach the status within 30 s")
            st = w.poll()
        print(flush=True)
        print("$ kubectl get tj -o wide", flush=True)
        print(kubectl(cluster, "get", "tj", "-n", NS, "-o", "wide"), flush=True)
        restarts = st.get("restarts") or {}
        lost = (st.get("lostWork") or {}).get("steps")
        snap = st.get("snapshot") or {}
        print(f"phase={st.get('phase')} preemptions={restarts.get('preemptions')} failures={restarts.get('failures')} "
              f"latest-snapshot-step={(snap.get('latest') or {}).get('step')} restored-from={snap.get('restoredFrom')} "
              f"lost-steps={lost}", flush=True)
        print(goodput_line(st), flush=True)
        ok = st.get("phase") == "Succeeded" and restarts.get("preemptions") == 1 and lost == 0
        tl.say("demo " + ("succeeded" if ok else "did NOT end as expected"))
        return 0 if ok else 1
    except (ApiError, RuntimeError, TimeoutError) as e:
        tl.say(f"demo failed: {e}")
        op_log = state_dir / "operator.log"
        if op_log.exists():
            print(op_log.read_text()[-4000:], file=sys.stderr)
        return 1
    finally:
        tl.say("stopping everything the demo started")
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preempt-after-step", type=int, default=20,
                   help="preempt once a snapshot at or after this step exists")
    p.add_argument("--mode", choices=["processes", "containers"], default="processes",
                   help="containers: the operator and the job's pods run from the images make images built")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
