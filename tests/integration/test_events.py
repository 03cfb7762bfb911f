"""Defect 12 (second half) and defect 15 (first half): Events, aggregated and never lost.

* The same Event again (same object, type, reason, message) is one Event
  whose ``count`` and ``lastTimestamp`` move, as client-go's correlator and the
  kubelet do; a new process posting it again (an operator restarted after a
  crash) finds it there and changes nothing.
* An operator killed right after its status write has posted the decision's
  Events anyway: a new operator process finds the decision recorded and
  the Events there, exactly once.
"""

from __future__ import annotations

import asyncio

import pytest

from trainingjob_operator.handlers import Controller
from trainingjob_operator.kube import Kube
from trainingjob_operator.kubeconfig import Config

from .helpers import TJ, events_of, job_manifest, status

pytestmark = pytest.mark.integration


def _kube(cluster) -> Kube:
    return Kube(Config(server=cluster.api_url))


@pytest.mark.timeout(60)
def test_defect12_repeated_event_is_aggregated_with_a_count(cluster, kube, namespace):
    kube.create(TJ, job_manifest("agg", namespace, "print(1)", nodes=1), namespace=namespace)
    first = kube.get(TJ, "agg", namespace=namespace)

    async def run() -> list[str]:
        k = _kube(cluster)
        out = []
        body = first
        try:
            for i in range(3):
                out.append(await k.post_event(body, "Warning", "CreateFailed", "quota exceeded",
                                              f"2030-01-01T00:00:0{i}Z"))
                # the next retry reads the job again: a newer resourceVersion
                kube.patch(TJ, "agg", {"metadata": {"annotations": {"n": str(i)}}}, namespace=namespace)
                body = kube.get(TJ, "agg", namespace=namespace)
            out.append(await k.post_event(body, "Warning", "CreateFailed", "quota exceeded", "2030-01-01T00:00:09Z"))
            out.append(await k.post_event(body, "Warning", "CreateFailed", "quota exceeded", "2030-01-01T00:00:10Z"))
        finally:
            await k.close()
        k2 = _kube(cluster)  # a new operator process: nothing in memory
        try:
            out.append(await k2.post_event(body, "Warning", "CreateFailed", "quota exceeded", "2030-01-01T00:00:11Z"))
            out.append(await k2.post_event(body, "Normal", "Other", "something else", "2030-01-01T00:00:12Z"))
        finally:
            await k2.close()
        return out

    results = asyncio.run(run())
    assert results == ["created", "counted", "counted", "counted", "counted", "exists", "created"]
    evs = [e for e in events_of(kube, namespace, "agg") if e["reason"] == "CreateFailed"]
    assert len(evs) == 1, evs
    assert evs[0]["count"] == 5
    assert evs[0]["firstTimestamp"] == "2030-01-01T00:00:00Z" and evs[0]["lastTimestamp"] == "2030-01-01T00:00:10Z"


class Killed(Exception):
    """The process died here."""


class DiesAfterStatusWrite(Kube):
    async def patch_status(self, *args, **kwargs):
        await super().patch_status(*args, **kwargs)
        raise Killed()


@pytest.mark.timeout(60)
def test_defect15_events_posted_even_if_killed_after_status_write(cluster, kube, namespace):
    # Accepted by the CRD, refused by the operator's own checks: one decision
    # (Failed, InvalidSpec) with one Warning Event.
    name = "n" * 60
    kube.create(TJ, job_manifest(name, namespace, "print(1)", nodes=1), namespace=namespace)

    async def reconcile_with(k: Kube) -> None:
        ctl = Controller()
        ctl.kube = k
        try:
            await ctl.reconcile_key((namespace, name))
        finally:
            await k.close()

    with pytest.raises(Killed):
        asyncio.run(reconcile_with(DiesAfterStatusWrite(Config(server=cluster.api_url))))
    assert status(kube, namespace, name)["reason"] == "InvalidSpec"  # the decision is recorded
    asyncio.run(reconcile_with(_kube(cluster)))  # the next operator process
    evs = [(e["type"], e["reason"], e.get("count")) for e in events_of(kube, namespace, name)]
    assert evs == [("Warning", "InvalidSpec", 1)], evs
