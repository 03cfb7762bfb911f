"""Shared fixtures: the local cluster stand-in and the operator process.

* ``cluster``: one :class:`localcluster.cluster.LocalCluster` for the whole
  session (API server, CRDs, S3, node agent on node-0..2), stopped by PID at
  the end. Set ``LOCALCLUSTER_KEEP=1`` to keep its state dir for debugging.
* ``kube``: the cluster's API client.
* ``namespace``: a fresh namespace per test (deleted afterwards).
* ``start_operator``: a factory running ``python -m trainingjob_operator``
  (``$LOCALCLUSTER_OPERATOR_CMD`` overrides it) against the cluster, stopped
  at the end of the test; its log is ``<state_dir>/<name>.log``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from localcluster.cluster import LocalCluster, ManagedProcess
from localcluster.kube import ApiError, Client

_ns_counter = itertools.count()


@contextlib.contextmanager
def running_cluster(*, prefix: str, **kwargs: Any) -> Iterator[LocalCluster]:
    """A started :class:`LocalCluster` in a fresh temporary state dir, stopped (and removed) afterwards."""
    # A short path: AF_UNIX socket paths (torch, gloo) are limited to 108 bytes.
    state_dir = Path(tempfile.mkdtemp(prefix=prefix))
    lc = LocalCluster(state_dir, **kwargs)
    lc.start()
    try:
        yield lc
    finally:
        lc.stop()
        if not os.environ.get("LOCALCLUSTER_KEEP"):
            shutil.rmtree(state_dir, ignore_errors=True)


@contextlib.contextmanager
def fresh_namespace(kube: Client, request: pytest.FixtureRequest, *, prefix: str = "t") -> Iterator[str]:
    """A namespace named after the test (unique per session), deleted afterwards."""
    name = f"{prefix}{next(_ns_counter)}-{request.node.name.lower().replace('_', '-')}"
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)[:55].rstrip("-")
    kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    try:
        yield name
    finally:
        try:
            kube.delete("namespaces", name)
        except ApiError:
            pass


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with running_cluster(prefix="lc-") as lc:
        yield lc


@pytest.fixture(scope="session")
def kube(cluster: LocalCluster) -> Client:
    return cluster.client()


@pytest.fixture
def namespace(kube: Client, request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_namespace(kube, request) as name:
        yield name


@pytest.fixture
def start_operator(cluster: LocalCluster) -> Iterator[Callable[..., ManagedProcess]]:
    started: list[str] = []

    def start(extra_args: Sequence[str] = (), *, name: str = "operator", **kw: object) -> ManagedProcess:
        proc = cluster.start_operator(extra_args, name=name, **kw)  # type: ignore[arg-type]
        started.append(name)
        return proc

    yield start
    for name in started:
        cluster.stop_operator(name)
