"""``python -m localcluster up|down|status``: the stand-in cluster from a shell.

    python -m localcluster up [--state-dir .localcluster] [--nodes node-0,node-1,node-2] [--no-s3]
    eval "$(python -m localcluster up)"     # exports KUBECONFIG and the AWS_* variables
    python -m localcluster status
    python -m localcluster down

``up`` starts the processes detached (their PIDs are in ``<state-dir>/cluster.json``)
and returns; ``down`` stops them by PID, container processes included.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from localcluster.cluster import DEFAULT_NODES, LocalCluster


def _exports(cluster: LocalCluster) -> list[str]:
    env = {"KUBECONFIG": cluster.kubeconfig, **cluster.s3_env()}
    return [f"export {k}={shlex.quote(v)}" for k, v in env.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m localcluster", description="local Kubernetes stand-in")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start API server, CRDs, S3 and the node agent")
    up.add_argument("--nodes", default=",".join(DEFAULT_NODES))
    up.add_argument("--no-s3", action="store_true")
    up.add_argument("--node-monitor-grace-seconds", type=float, default=2.0)
    up.add_argument("--pod-eviction-seconds", type=float, default=None)
    up.add_argument("--network", choices=["host", "netns"], default=None,
                    help="netns: a network namespace and a real IP per pod (localcluster/netns.py)")
    for p in (up, sub.add_parser("down", help="stop everything by PID"), sub.add_parser("status", help="processes, nodes, pods")):
        p.add_argument("--state-dir", default=".localcluster", type=Path)
    a = ap.parse_args(argv)

    state = a.state_dir.resolve()
    if a.cmd == "up":
        if (state / "cluster.json").exists():
            old = LocalCluster.load(state)
            if any(p.alive for p in old.processes.values()):
                print(f"a cluster is already running in {state} (python -m localcluster down --state-dir {a.state_dir})", file=sys.stderr)
                return 1
        cluster = LocalCluster(
            state,
            nodes=[n for n in a.nodes.split(",") if n],
            with_s3=not a.no_s3,
            node_monitor_grace_seconds=a.node_monitor_grace_seconds,
            pod_eviction_seconds=a.pod_eviction_seconds,
            network=a.network,
        ).start()
        print("\n".join(_exports(cluster)))
        if cluster.s3:
            print(f"# S3 endpoint {cluster.s3_endpoint}, bucket s3://{cluster.bucket}")
        print(f"# API server {cluster.api_url}; logs and pod dirs in {state}; stop with: python -m localcluster down --state-dir {a.state_dir}")
        return 0
    if not (state / "cluster.json").exists():
        print(f"no cluster in {state}", file=sys.stderr)
        return 1 if a.cmd == "status" else 0
    cluster = LocalCluster.load(state)
    if a.cmd == "down":
        cluster.stop()
        print(f"stopped the cluster in {state}")
        return 0
    print(json.dumps(cluster.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
