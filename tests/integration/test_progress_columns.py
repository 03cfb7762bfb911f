"""Issue 12, item 2: the printer columns, as ``kubectl get tj`` shows them from the stand-in's
server-side Tables (the CRD's additionalPrinterColumns), for a status the operator writes."""

from __future__ import annotations

import pytest

from trainingjob_operator.progress_status import update
from trainingjob_trainer import contract

from .helpers import TJ, job_manifest, kubectl_get_tj

pytestmark = pytest.mark.integration


def test_issue12_item2_step_progress_eta_in_the_default_view_goodput_in_wide(cluster, kube, namespace):
    kube.create(TJ, job_manifest("cols", namespace, "pass", nodes=1), namespace=namespace)
    status = {"attempt": 0, "phase": "Running", "restarts": {"preemptions": 0, "failures": 0}}
    update(status, progress=contract.Progress(
        attempt=0, step=41, epoch=0, start_step=0, total_steps=200, wall_seconds=40.0, steps_per_second=1.0,
        window_seconds=40.0, stalled_seconds=2.0, first_step_at="2026-11-28T12:00:00.000Z",
        updated_at="2026-11-28T12:00:40.000Z"))
    # The status subresource validates against the CRD's schema: the operator's fields are all declared.
    written = kube.patch(TJ, "cols", {"status": status}, namespace=namespace, subresource="status")["status"]
    assert written["progress"] == status["progress"] and written["goodput"] == status["goodput"]

    (row,) = kubectl_get_tj(cluster.kubeconfig, namespace)
    assert {k: row[k] for k in ("NAME", "STEP", "PROGRESS", "ETA")} == \
        {"NAME": "cols", "STEP": "41", "PROGRESS": "20.5", "ETA": "2026-11-28T12:03:19Z"}
    assert "GOODPUT" not in row
    (wide,) = kubectl_get_tj(cluster.kubeconfig, namespace, "-o", "wide")
    assert wide["GOODPUT"] == "95" and wide["STEP"] == "41"  # 38 productive s of 40

