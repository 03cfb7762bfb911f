"""Defect 2: the work queue's client-go semantics, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio

import pytest

from trainingjob_operator.workqueue import ShutDown, WorkQueue


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def drain(q: WorkQueue) -> list:
    out = []
    while (k := q.get_nowait()) is not None:
        out.append(k)
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def q(clock: Clock) -> WorkQueue:
    return WorkQueue(base_delay=1.0, max_delay=8.0, clock=clock)


def test_defect2_a_key_is_queued_once(q):
    q.add("a")
    q.add("a")
    q.add("b")
    assert len(q) == 2
    assert drain(q) == ["a", "b"]


def test_defect2_never_processed_twice_at_once_and_dirty_rerun(q):
    q.add("a")
    assert q.get_nowait() == "a"
    q.add("a")  # an event during the run: dirty, not handed out
    q.add("a")
    assert q.get_nowait() is None
    assert q.processing() == {"a"}
    q.done("a")  # the run ends: the change is seen by one more run
    assert q.get_nowait() == "a"
    q.done("a")
    assert q.get_nowait() is None


def test_defect2_done_without_new_add_does_not_requeue(q):
    q.add("a")
    assert q.get_nowait() == "a"
    q.done("a")
    assert q.get_nowait() is None and len(q) == 0


def test_defect2_events_before_resyncs(q):
    for k in ("r1", "r2", "r3"):
        q.add(k, resync=True)
    q.add("ev")
    q.add("r3")  # an event for a resync-queued key promotes it
    assert drain(q) == ["ev", "r3", "r1", "r2"]


def test_defect2_resync_add_does_not_demote_an_event_key(q):
    q.add("a")
    q.add("b", resync=True)
    q.add("a", resync=True)
    assert drain(q) == ["a", "b"]


def test_defect2_promotion_while_processing_keeps_one_entry(q):
    q.add("a", resync=True)
    assert q.get_nowait() == "a"
    q.add("a", resync=True)
    q.add("a")
    q.add("b", resync=True)
    q.done("a")
    assert drain(q) == ["a", "b"]


def test_defect2_exponential_backoff_and_forget(q, clock):
    delays = []
    for _ in range(5):
        delays.append(q.add_rate_limited("a"))
        clock.advance(delays[-1])
        assert q.get_nowait() == "a"
        q.done("a")
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]  # capped at max_delay
    assert q.failures("a") == 5
    q.forget("a")
    assert q.failures("a") == 0
    assert q.add_rate_limited("a") == 1.0


def test_defect2_backoff_is_per_key(q):
    q.add_rate_limited("a")
    q.add_rate_limited("a")
    assert q.add_rate_limited("b") == 1.0


def test_defect2_delayed_add_not_before_deadline(q, clock):
    q.add_after("a", 5.0)
    clock.advance(4.9)
    assert q.get_nowait() is None
    clock.advance(0.2)
    assert q.get_nowait() == "a"


def test_defect2_delayed_add_earliest_deadline_wins(q, clock):
    q.add_after("a", 10.0)
    q.add_after("a", 3.0)
    q.add_after("a", 7.0)  # later than the pending one: ignored
    clock.advance(3.0)
    assert q.get_nowait() == "a"
    q.done("a")
    clock.advance(10.0)
    assert q.get_nowait() is None  # the superseded deadlines fire nothing
    assert q.delayed() == 0


def test_defect2_delayed_add_of_a_queued_key_is_coalesced(q, clock):
    q.add("a")
    q.add_after("a", 1.0)
    clock.advance(1.0)
    assert drain(q) == ["a"]


def test_defect2_delayed_add_while_processing_runs_after(q, clock):
    q.add("a")
    assert q.get_nowait() == "a"
    q.add_after("a", 1.0)
    clock.advance(1.0)
    assert q.get_nowait() is None  # still processing
    q.done("a")
    assert q.get_nowait() == "a"


def test_defect2_discard_delayed(q, clock):
    q.add_after("a", 1.0)
    q.discard_delayed("a")
    clock.advance(2.0)
    assert q.get_nowait() is None


def test_defect2_async_get_wakes_on_add_and_shutdown():
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        getter = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        assert not getter.done()
        q.add("a")
        assert await asyncio.wait_for(getter, 5) == "a"
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        q.shut_down()
        with pytest.raises(ShutDown):
            await asyncio.wait_for(waiter, 5)

    asyncio.run(main())


def test_defect2_async_get_wakes_at_delayed_deadline():
    async def main() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 0.01)
        assert await asyncio.wait_for(q.get(), 5) == "a"

    asyncio.run(main())


def test_defect2_concurrent_workers_never_share_a_key():
    """Four workers, many adds of few keys: no key is ever run by two workers at once, none is lost."""

    async def main() -> None:
        q: WorkQueue[int] = WorkQueue()
        running: set[int] = set()
        runs: dict[int, int] = {}
        overlap: list[int] = []

        async def worker() -> None:
            while True:
                try:
                    key = await q.get()
                except ShutDown:
                    return
                if key in running:
                    overlap.append(key)
                running.add(key)
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                running.discard(key)
                runs[key] = runs.get(key, 0) + 1
                q.done(key)

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        for i in range(200):
            q.add(i % 5, resync=i % 2 == 0)
            await asyncio.sleep(0)
        while len(q) or q.processing():
            await asyncio.sleep(0)
        q.shut_down()
        await asyncio.gather(*workers)
        assert not overlap
        assert set(runs) == set(range(5))

    asyncio.run(main())


def test_defect2_operator_event_handlers_are_async():
    """Kopf runs a plain ``def`` handler in its thread pool, off the loop that owns the queue."""
    import kopf

    from trainingjob_operator import handlers

    handlers.register_node_watch()
    registry = kopf.get_default_registry()
    fns = [h.fn for h in registry._watching.get_all_handlers()]
    names = {f.__name__ for f in fns}
    assert {"_on_job", "_on_child", "_on_node"} <= names
    assert all(asyncio.iscoroutinefunction(f) for f in fns), [f.__name__ for f in fns]
