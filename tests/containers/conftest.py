"""Container nodes: a stand-in whose node agent runs pods from their images under podman.

The images come from ``make images`` (``make test`` depends on it); these tests
build nothing. Without them the tests fail and say so: they are never skipped.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from localcluster.cluster import LocalCluster
from localcluster.images import load_refs
from localcluster.kube import ApiError, Client

_ns_counter = itertools.count()


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    refs = load_refs()
    if refs is None:
        pytest.fail("the project's images are missing: run `make images` (make test does)")
    return refs


@pytest.fixture(scope="session")
def podman_cluster(images: dict[str, str]) -> Iterator[LocalCluster]:
    state_dir = Path(tempfile.mkdtemp(prefix="lcp-"))
    lc = LocalCluster(state_dir, nodes=("cnode-0", "cnode-1"), runtime="podman")
    lc.start()
    try:
        yield lc
    finally:
        lc.stop()
        if not os.environ.get("LOCALCLUSTER_KEEP"):
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
def pkube(podman_cluster: LocalCluster) -> Client:
    return podman_cluster.client()


@pytest.fixture
def pns(pkube: Client, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"c{next(_ns_counter)}-" + "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())
    name = name[:55].rstrip("-")
    pkube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    try:
        pkube.delete("namespaces", name)
    except ApiError:
        pass
