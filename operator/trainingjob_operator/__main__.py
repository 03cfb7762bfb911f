"""``python -m trainingjob_operator``: run the operator.

Kopf runs ``standalone`` (no Kopf peering objects). With ``--leader-elect``
several replicas may run: every replica watches and caches (a follower is
warm), only the holder of a ``coordination.k8s.io`` Lease reconciles (see
``leader.py``); a replica that loses the lease exits (code 1) and is restarted
as a follower. Watches every namespace by default, or only the
``--namespace`` ones (then nodes are not watched and node loss is detected
from pod conditions only, see docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import uuid

import kopf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="trainingjob-operator", description=__doc__.split("\n\n")[0])
    p.add_argument("--namespace", "-n", action="append", default=None,
                   help="watch only this namespace (repeatable); default: all namespaces "
                        "(env TJ_OPERATOR_NAMESPACES, comma-separated)")
    p.add_argument("--log-level", default=env("TJ_OPERATOR_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--metrics-port", type=int, default=int(env("TJ_OPERATOR_METRICS_PORT", "0")),
                   help="serve Prometheus metrics on this port (0: off)")
    p.add_argument("--health-port", type=int, default=int(env("TJ_OPERATOR_HEALTH_PORT", "0")),
                   help="serve Kopf's liveness endpoint http://0.0.0.0:PORT/healthz (0: off)")
    p.add_argument("--ready-port", type=int, default=int(env("TJ_OPERATOR_READY_PORT", "0")),
                   help="serve readiness http://0.0.0.0:PORT/readyz (0: off): the API server answers")
    p.add_argument("--resync-seconds", type=float,
                   default=float(env("TJ_OPERATOR_RESYNC_SECONDS")) if env("TJ_OPERATOR_RESYNC_SECONDS") else None,
                   help="look at every unfinished job this often (default 90: docs/benchmarks.md, Scale)")
    p.add_argument("--workers", type=int, default=int(env("TJ_OPERATOR_WORKERS", "4")))
    p.add_argument("--leader-elect", action="store_true",
                   default=env("TJ_OPERATOR_LEADER_ELECT", "").lower() in ("1", "true", "yes"),
                   help="hold a coordination.k8s.io Lease before reconciling (needed with more than one replica)")
    p.add_argument("--leader-election-namespace", default=env("TJ_OPERATOR_LEADER_ELECTION_NAMESPACE"),
                   help="namespace of the Lease (default: the pod's own, else 'default')")
    p.add_argument("--leader-election-name", default=env("TJ_OPERATOR_LEADER_ELECTION_NAME", "trainingjob-operator"))
    p.add_argument("--leader-identity", default=env("TJ_OPERATOR_LEADER_IDENTITY"),
                   help="this replica's holder identity (default: hostname_<random>)")
    p.add_argument("--lease-duration", type=float, default=float(env("TJ_OPERATOR_LEASE_DURATION", "15")))
    p.add_argument("--renew-deadline", type=float, default=float(env("TJ_OPERATOR_RENEW_DEADLINE", "10")))
    p.add_argument("--retry-period", type=float, default=float(env("TJ_OPERATOR_RETRY_PERIOD", "2")))
    p.add_argument("--reclaim-taints", default=env("TJ_OPERATOR_RECLAIM_TAINTS"),
                   help="node taint keys that announce a reclaim, comma-separated: a gang pod's node getting one "
                        "triggers a snapshot (default: the common cloud/autoscaler ones; empty: none; "
                        "env TJ_OPERATOR_RECLAIM_TAINTS). Needs the cluster-wide node watch")
    p.add_argument("--reclaim-pod-condition", choices=["true", "false"],
                   default=env("TJ_OPERATOR_RECLAIM_POD_CONDITION", "true").lower(),
                   help="whether the DisruptionTarget pod condition triggers a snapshot (env "
                        "TJ_OPERATOR_RECLAIM_POD_CONDITION)")
    p.add_argument("--reclaim-hold-seconds", type=int, default=int(env("TJ_OPERATOR_RECLAIM_HOLD_SECONDS", "120")),
                   help="after a reclaim snapshot the gang stops stepping for at most this long, so a kill "
                        "without SIGTERM loses no step; 0: it trains on (env TJ_OPERATOR_RECLAIM_HOLD_SECONDS)")
    args = p.parse_args(argv)
    if args.namespace is None and env("TJ_OPERATOR_NAMESPACES"):
        args.namespace = [n.strip() for n in env("TJ_OPERATOR_NAMESPACES", "").split(",") if n.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Kopf logs every handler call at INFO; ours are enqueue-only and would drown the decisions.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING if args.log_level != "DEBUG" else logging.DEBUG)
    # The S3 clients log request headers (credentials) at DEBUG: never below WARNING.
    for noisy in ("aiohttp.access", "botocore", "boto3", "s3fs", "aiobotocore", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from . import handlers, login, metrics  # noqa: F401 (login registers Kopf's login handler)
    from .leader import ElectionConfig, LeaderElector
    from .snapshot_requests import ReclaimConfig, parse_taint_list

    if args.resync_seconds is not None:
        handlers.CONTROLLER.resync_seconds = args.resync_seconds
    handlers.CONTROLLER.workers = args.workers
    handlers.CONTROLLER.reclaim = ReclaimConfig(taints=parse_taint_list(args.reclaim_taints),
                                                pod_condition=args.reclaim_pod_condition == "true",
                                                hold_seconds=max(0, args.reclaim_hold_seconds))
    stop_flag: asyncio.Event | None = None
    lost: list[bool] = []
    if args.leader_elect:
        config = ElectionConfig(
            namespace=args.leader_election_namespace or _own_namespace(), name=args.leader_election_name,
            identity=args.leader_identity or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}",
            lease_duration=args.lease_duration, renew_deadline=args.renew_deadline, retry_period=args.retry_period)
        handlers.CONTROLLER.elector = LeaderElector(kube=None, config=config)  # type: ignore[arg-type]
        stop_flag = asyncio.Event()

        def on_lost() -> None:
            lost.append(True)
            assert stop_flag is not None
            stop_flag.set()

        handlers.CONTROLLER.on_lost_lease = on_lost
    clusterwide = not args.namespace
    handlers.CONTROLLER.watch_nodes = clusterwide
    if clusterwide:
        handlers.register_node_watch()
    metrics.serve(args.metrics_port)
    metrics.serve_readiness(args.ready_port, handlers.CONTROLLER.ready)
    kopf.run(
        standalone=True,
        clusterwide=clusterwide,
        namespaces=args.namespace or (),
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        stop_flag=stop_flag,
    )
    return 1 if lost else 0


def _own_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return os.environ.get("POD_NAMESPACE", "default")


if __name__ == "__main__":
    sys.exit(main())
