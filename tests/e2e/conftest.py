"""Fixtures shared by the e2e modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.test_recovery import example_job
from tests.integration.helpers import TJ, wait_phase


@pytest.fixture(scope="session")
def reference_weights(cluster, tmp_path_factory) -> Path:
    """Final weights of the example job run without any disruption (once per session:
    every e2e module compares with the same run)."""
    kube = cluster.client()
    ns = "e2e-reference"
    kube.create("namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    out = tmp_path_factory.mktemp("ref") / "weights.pt"
    cluster.create_s3_secret(ns)
    cluster.start_operator(name="operator-ref")
    try:
        # No sleep per step: it only gives the disrupting tests time to act; the weights do not depend on it.
        kube.create(TJ, example_job("ref", ns, cluster, out, sleep=0.0), namespace=ns)
        st = wait_phase(kube, ns, "ref", "Succeeded", timeout=240)
        assert st["restarts"] == {"preemptions": 0, "failures": 0}
        kube.delete(TJ, "ref", namespace=ns)
    finally:
        cluster.stop_operator("operator-ref")
    return out


@pytest.fixture
def s3_creds(kube, namespace, cluster) -> None:
    cluster.create_s3_secret(namespace)
