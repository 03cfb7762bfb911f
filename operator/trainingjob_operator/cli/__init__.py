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
    kubectl tj snapshot NAME [-n NS] [--timeout S] [--no-wait]   # on demand; waits for it

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


def _kubeconfig_path() -> str:
    return os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")


def select_context(context: str | None) -> tuple[str, str | None]:
    """Apply ``--context`` and find the default namespace, as kubectl does.

    The shared loader (:func:`trainingjob_operator.kubeconfig.load_config`) uses the
    kubeconfig's current context; for ``--context`` it is given a private
    copy (mode 0600) whose current context is the one asked for.

    Returns:
        ``(namespace, copy)``: the context's namespace (else ``default``) and
        the path of the copy to delete once the config is loaded (``None``
        without ``--context``).
    """
    import tempfile

    import yaml

    try:
        with open(_kubeconfig_path(), encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, ValueError):
        if context:
            raise CliError(f"--context {context}: cannot read the kubeconfig {_kubeconfig_path()}") from None
        return "default", None  # in-cluster, or the loader reports the problem
    name = context or cfg.get("current-context")
    ctx = next((c.get("context") or {} for c in cfg.get("contexts") or [] if c.get("name") == name), None)
    if context and ctx is None:
        raise CliError(f"context {context!r} not found in the kubeconfig {_kubeconfig_path()}")
    namespace = (ctx or {}).get("namespace") or "default"
    if not context:
        return namespace, None
    cfg["current-context"] = context
    fd, copy = tempfile.mkstemp(prefix="kubectl-tj-", suffix=".kubeconfig")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return namespace, copy


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubectl tj", description="TrainingJob snapshots, resume and timeline.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Command, help_: str, *, s3: bool) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_, description=help_)
        c.add_argument("name", metavar="NAME", help="the TrainingJob")
        c.add_argument("-n", "--namespace", default=None, help="its namespace (default: the context's, or default)")
        c.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
        c.add_argument("--context", default=None, help="kubeconfig context (default: its current-context)")
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
    req = add("snapshot", commands.snapshot,
              "Request a snapshot now (annotation trainingjob.dev/snapshot-request) and wait until the gang "
              "has committed it (status.snapshot.lastRequest).", s3=False)
    req.add_argument("--value", default=None, help="the request's value (default: cli-<UTC time>-<random>)")
    req.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    req.add_argument("--no-wait", action="store_true", help="request it and return at once")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 on success, 1 with one line on stderr on error."""
    args = parser().parse_args(argv)
    # The S3 client libraries log below WARNING only; nothing of theirs reaches the user's terminal.
    logging.basicConfig(level=logging.ERROR)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    try:
        namespace, copy = select_context(args.context)
        args.namespace = args.namespace or namespace
        try:
            if copy:
                os.environ["KUBECONFIG"] = copy
            api = Api()
        finally:
            if copy:
                os.unlink(copy)
        out = args.func(api, args)
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
