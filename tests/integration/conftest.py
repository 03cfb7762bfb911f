"""Integration tests run the operator as the chart's ServiceAccount, under the chart's RBAC.

The session's API server enforces RBAC for token holders. This overrides the
shared ``start_operator`` fixture: unless a test passes its own ``command``,
the operator runs with a token of the ServiceAccount the chart renders
(cluster-wide mode, release ``tj``, ``fullnameOverride=tj-tests`` so that
its cluster-scoped objects never clash with the ones ``test_rbac.py``
installs and removes), so every integration test also proves the chart's
rules are enough for what it exercises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import pytest

from localcluster.cluster import ManagedProcess
from localcluster.s3proxy import S3Proxy
from tests.chart.render import RELEASE_NAMESPACE, render
from tests.trainer.trainer_s3server import start_s3_server

from .identity import apply_rbac, operator_command, operator_kubeconfig

SESSION_FULLNAME = "tj-tests"


@pytest.fixture(scope="session")
def chart_identity_kubeconfig(cluster, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("chart-identity")
    objs = render({"fullnameOverride": SESSION_FULLNAME}, tmp_dir=tmp)
    kube = cluster.client()
    apply_rbac(kube, objs, RELEASE_NAMESPACE)  # lives as long as the session's API server
    return operator_kubeconfig(kube, cluster.api_url, RELEASE_NAMESPACE, SESSION_FULLNAME, tmp / "kubeconfig")


@pytest.fixture
def start_operator(start_operator, chart_identity_kubeconfig) -> Callable[..., ManagedProcess]:
    """The shared fixture (tests/conftest.py), with the chart's identity unless ``command`` is given."""

    def start(extra_args: Sequence[str] = (), **kw: object) -> ManagedProcess:
        kw.setdefault("command", operator_command(chart_identity_kubeconfig))
        return start_operator(extra_args, **kw)

    return start

@pytest.fixture(scope="module")
def proxied_s3():
    """A real S3 server (SeaweedFS) with the counting proxy in front: ``(server, proxy)``."""
    server = start_s3_server()
    proxy = S3Proxy(upstream=server.endpoint).start()
    try:
        yield server, proxy
    finally:
        proxy.stop()
        server.stop()
