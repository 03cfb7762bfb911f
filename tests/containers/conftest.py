"""Container nodes: a stand-in whose node agent runs pods from their images under podman.

The images come from ``make images`` (``make test`` depends on it); these tests
build nothing. Without them the tests fail and say so: they are never skipped.
"""

from __future__ import annotations

from typing import Iterator

import pytest

from localcluster.cluster import LocalCluster
from localcluster.images import load_refs
from localcluster.kube import Client
from tests.conftest import fresh_namespace, running_cluster


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    refs = load_refs()
    if refs is None:
        pytest.fail("the project's images are missing: run `make images` (make test does)")
    return refs


@pytest.fixture(scope="session")
def podman_cluster(images: dict[str, str]) -> Iterator[LocalCluster]:
    with running_cluster(prefix="lcp-", nodes=("cnode-0", "cnode-1"), runtime="podman") as lc:
        yield lc


@pytest.fixture
def pkube(podman_cluster: LocalCluster) -> Client:
    return podman_cluster.client()


@pytest.fixture
def pns(pkube: Client, request: pytest.FixtureRequest) -> Iterator[str]:
    with fresh_namespace(pkube, request, prefix="c") as name:
        yield name
