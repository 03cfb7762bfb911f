"""Issue 10, the operator's cost per job: what a steady or finished job reads, and when.

bench/scale.py measures the costs; these pin the rules behind them: a
finished job is never resynced and reads no Secret and no S3, a Secret read
is shared and cached until a listing with it fails, a steady gang's snapshot
listing is reused for its expected snapshot interval (and dropped by what
changes it; a plan that ends the job is recomputed from a fresh one), the resync spreads jobs over its period, and a steady gang asks
for no requeue of its own.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.unit.test_reconcile import job, obs, pod, reconcile, svc
from trainingjob_operator import handlers
from trainingjob_operator.kube import SecretCache
from trainingjob_operator.model import parse_spec
from trainingjob_operator.reconcile import SnapshotState
from trainingjob_operator.snapshots import S3Access, SnapshotReader
from trainingjob_operator.workqueue import WorkQueue


class FakeKube:
    def __init__(self, secrets: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.secrets = secrets
        self.gets = 0

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.gets += 1
        return self.secrets.get((namespace, name))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_issue10_secret_read_is_cached_shared_and_invalidated() -> None:
    kube, clock = FakeKube({("ml", "creds"): {"data": {}}}), Clock()
    cache = SecretCache(kube, ttl=300.0, clock=clock)  # type: ignore[arg-type]

    async def run() -> None:
        for _ in range(5):  # five jobs of the namespace, one read
            assert await cache.get("ml", "creds") == {"data": {}}
        assert kube.gets == 1
        cache.invalidate("ml", "creds")  # a listing with it failed
        await cache.get("ml", "creds")
        assert kube.gets == 2
        clock.t += 301  # a rotated Secret is seen within the ttl
        await cache.get("ml", "creds")
        assert kube.gets == 3
        assert await cache.get("ml", "absent") is None and await cache.get("ml", "absent") is None
        assert kube.gets == 5  # absence is never cached: a Secret created later is seen at once

    asyncio.run(run())


def running(attempt: int = 0, **extra: Any) -> dict[str, Any]:
    return {"phase": "Running", "attempt": attempt, "gangCreated": True, "workers": {"desired": 3, "ready": 3},
            **extra}


def test_issue10_a_plan_that_ends_the_job_is_recomputed_from_a_fresh_listing() -> None:
    b = job(status=running())
    done = [pod(b, 0, r, phase="Succeeded", ready=False, exit_code=0) for r in range(3)]
    plan = reconcile(b, obs(done, [svc(b, 0)]))
    assert handlers.ends_job(b, plan)
    assert not handlers.ends_job(job(status={**running(), "phase": "Succeeded"}), plan)  # already ended
    still = reconcile(b, obs([pod(b, 0, r) for r in range(3)], [svc(b, 0)]))
    assert not handlers.ends_job(b, still)


def test_issue10_steady_listing_reused_for_the_snapshot_interval_and_dropped_by_changes() -> None:
    reader = SnapshotReader(min_interval=3.0, steady_interval=90.0, max_interval=600.0)
    reads: list[str] = []

    async def fake_read(root: str, access: S3Access, *_: object) -> SnapshotState:
        reads.append(root)
        return SnapshotState(count=2, interval_seconds=300.0)

    reader._read = fake_read  # type: ignore[method-assign]
    body = job(status=running())
    spec = parse_spec(body["spec"])
    access = S3Access(endpoint=None, region=None, key="AKIAEXAMPLE", secret="s3cr3t-value")

    async def observe(b: dict[str, Any], *, steady: bool = True, force: bool = False, acc: S3Access = access) -> None:
        await reader.observe(b, spec, acc, steady=steady, force=force)

    async def run() -> None:
        await observe(body)
        await observe(body)
        assert len(reads) == 1  # steady: reused
        assert reader.reuse_for(phase="Running", steady=True, state=SnapshotState(interval_seconds=300.0)) == 300.0
        # A job that sets spec.snapshot.progressSeconds is listed once per that period (at most every 3 s).
        assert reader.reuse_for(phase="Running", steady=True, state=SnapshotState(interval_seconds=300.0),
                                progress_seconds=20) == 20.0
        assert reader.reuse_for(phase="Running", steady=True, state=SnapshotState(), progress_seconds=1) == 3.0
        assert reader.reuse_for(phase="Running", steady=True, state=SnapshotState(interval_seconds=5.0)) == 90.0
        assert reader.reuse_for(phase="Running", steady=True, state=SnapshotState(interval_seconds=9e9)) == 600.0
        assert reader.reuse_for(phase="Running", steady=True, state=SnapshotState(error="x")) == 3.0
        await observe(body, force=True)  # before a gang is created
        assert len(reads) == 2
        await observe(job(status=running(attempt=1)))  # a new attempt
        assert len(reads) == 3
        changed = job(status=running(attempt=1))
        changed["metadata"]["generation"] = 2  # a spec change
        await observe(changed)
        assert len(reads) == 4
        await observe(changed, acc=S3Access(endpoint=None, region=None, key="AKIAOTHER", secret="rotated-1"))
        assert len(reads) == 5  # other credentials
        reader.invalidate(("ml", "mnist"))  # an on-demand snapshot request
        await observe(changed, acc=S3Access(endpoint=None, region=None, key="AKIAOTHER", secret="rotated-1"))
        assert len(reads) == 6

    asyncio.run(run())


def test_issue10_unsteady_gang_lists_after_min_interval() -> None:
    reader = SnapshotReader(min_interval=0.0, steady_interval=90.0)
    reads: list[str] = []

    async def fake_read(root: str, access: S3Access, *_: object) -> SnapshotState:
        reads.append(root)
        return SnapshotState(count=1)

    reader._read = fake_read  # type: ignore[method-assign]
    body = job(status=running())
    spec = parse_spec(body["spec"])
    access = S3Access(endpoint=None, region=None)

    async def run() -> None:
        await reader.observe(body, spec, access, steady=False)
        await reader.observe(body, spec, access, steady=False)  # pods ending: the emergency snapshot must be seen
        assert len(reads) == 2

    asyncio.run(run())


def test_issue10_steady_gang_asks_for_no_requeue_of_its_own() -> None:
    b = job(status={"attempt": 0, "phase": "Running", "gangCreated": True})
    plan = reconcile(b, obs([pod(b, 0, r) for r in range(3)], [svc(b, 0)]))
    assert plan.status["phase"] == "Running" and plan.actions == []
    assert plan.requeue_after is None  # the resync looks at it once per period
    # ... unless the job asks for its progress that fresh.
    fresh = job(status={"attempt": 0, "phase": "Running", "gangCreated": True},
                snapshot={"uri": "s3://bucket/runs", "credentialsSecret": "s3-creds", "progressSeconds": 10})
    assert reconcile(fresh, obs([pod(fresh, 0, r) for r in range(3)], [svc(fresh, 0)])).requeue_after == 10.0


def test_issue10_resync_spreads_jobs_over_the_period() -> None:
    keys = [("ml", f"job-{i:04d}") for i in range(500)]
    slots = [handlers.resync_slot(k, 90) for k in keys]
    assert set(slots) <= set(range(90))
    per_slot = [slots.count(s) for s in range(90)]
    assert max(per_slot) <= 20, per_slot  # 500 / 90 = 5.6 on average: never a burst of hundreds
    assert handlers.resync_slot(keys[0], 90) == handlers.resync_slot(keys[0], 90)


class Phases(dict):
    """A stand-in for Kopf's tj_index: key -> the stored values (the job's phase)."""


@pytest.mark.timeout(20)
def test_issue10_resync_skips_finished_jobs() -> None:
    ctl = handlers.Controller(resync_seconds=1.0)
    idx = Phases({("ml", "running"): ["Running"], ("ml", "suspended"): ["Suspended"], ("ml", "new"): [""],
                  ("ml", "done"): ["Succeeded"], ("ml", "failed"): ["Failed"]})
    ctl.indices["tj_index"] = idx

    async def run() -> set[tuple[str, str]]:
        ctl.queue = WorkQueue()
        task = asyncio.create_task(ctl._resync())
        got: set[tuple[str, str]] = set()
        try:
            while len(got) < 3:
                got.add(await asyncio.wait_for(ctl.queue.get(), 5))
            await asyncio.sleep(1.5)  # another whole period: nothing else comes
            while (k := ctl.queue.get_nowait()) is not None:
                got.add(k)
        finally:
            task.cancel()
        return got

    assert asyncio.run(run()) == {("ml", "running"), ("ml", "suspended"), ("ml", "new")}
