"""``python -m trainingjob_operator``: run the operator.

One replica (the chart's Deployment uses the Recreate strategy), so Kopf runs
``standalone``: no peering objects, no extra RBAC. Watches every namespace by
default, or only the ``--namespace`` ones (then nodes are not watched and node
loss is detected from pod conditions only, see docs/operations.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

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
    p.add_argument("--resync-seconds", type=float, default=float(env("TJ_OPERATOR_RESYNC_SECONDS", "10")))
    p.add_argument("--workers", type=int, default=int(env("TJ_OPERATOR_WORKERS", "4")))
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
    from . import handlers, metrics

    handlers.CONTROLLER.resync_seconds = args.resync_seconds
    handlers.CONTROLLER.workers = args.workers
    clusterwide = not args.namespace
    handlers.CONTROLLER.watch_nodes = clusterwide
    if clusterwide:
        handlers.register_node_watch()
    metrics.serve(args.metrics_port)
    kopf.run(
        standalone=True,
        clusterwide=clusterwide,
        namespaces=args.namespace or (),
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
