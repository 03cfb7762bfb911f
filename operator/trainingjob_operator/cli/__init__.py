"""``kubectl-tj``: a kubectl plugin for TrainingJobs.

Installed with the package as the console script ``kubectl-tj``; with it on
PATH, ``kubectl tj ...`` runs it (kubectl's plugin discovery). It uses the
user's own kube identity (``$KUBECONFIG`` or ``~/.kube/config``) and reads S3
with the job's credentials Secret, or with ``--local-credentials`` the local
AWS env/config. It never prints a credential.

Commands::

    kubectl tj snapshots NAME [-n NS] [-o table|json]
    kubectl tj describe NAME [-n NS]
    kubectl tj resume NAME --from s3://.../epoch_E_train_step_S [-n NS]
    kubectl tj snapshot NAME [-n NS]      # on-demand: needs an operator that serves it

Errors (a missing job or Secret, S3 or the API unreachable) are one line on
stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from .. import kube
from . import commands
from .api import Api, CliError

Command = Callable[[Api, argparse.Namespace], str]


def _default_namespace() -> str:
    """The kubeconfig context's namespace, else ``default`` (as kubectl)."""
    try:
        import yaml

        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        ctx = next((c.get("context") or {} for c in cfg.get("contexts") or []
                    if c.get("name") == cfg.get("current-context")), {})
        return ctx.get("namespace") or "default"
    except (OSError, ValueError, AttributeError, ImportError):
        return "default"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl tj", description="TrainingJob snapshots, resume and timeline.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help_: str, *, s3: bool) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("name", metavar="NAME", help="the TrainingJob")
        c.add_argument("-n", "--namespace", default=None, help="its namespace (default: the context's, or default)")
        c.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
        if s3:
            c.add_argument("--local-credentials", action="store_true",
                           help="read S3 with the local AWS env/config instead of the job's credentials Secret")
            c.add_argument("--s3-endpoint", default=None,
                           help="S3 endpoint to use instead of spec.snapshot.endpoint (one reachable from here)")
        c.set_defaults(func=fn)
        return c

    snaps = add("snapshots", commands.snapshots,
                "List the job's snapshot folders, complete and incomplete, with step, size, age and attempt.", s3=True)
    snaps.add_argument("-o", "--output", choices=("table", "json"), default="table")
    add("describe", commands.describe,
        "The job's timeline: attempts, restarts, last disruption, lost work, snapshots, conditions, Events.",
        s3=False)
    res = add("resume", commands.resume,
              "Set spec.snapshot.resumeFrom, after checking that the snapshot is complete.", s3=True)
    res.add_argument("--from", dest="source", required=True, metavar="URI", help="the snapshot folder's s3:// URI")
    add("snapshot", commands.snapshot, "Request a snapshot now (needs an operator version that serves it).",
        s3=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 1 with one line on stderr on error."""
    args = parser().parse_args(argv)
    # The S3 client libraries log below WARNING only; nothing of theirs reaches the user's terminal.
    logging.basicConfig(level=logging.ERROR)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    args.namespace = args.namespace or _default_namespace()
    try:
        out = args.func(Api(), args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except kube.ApiError as e:
        print(f"error: the Kubernetes API refused a request: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
