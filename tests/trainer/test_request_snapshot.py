"""Issue 12, item 3: a snapshot on request, on 2 ranks (gloo), through both APIs (real S3 server).

The test plays the operator: rank 0's process writes the control object
(as the operator relays the annotation) at a chosen step, and waits until
its poller has seen it, so the step that serves it is known in advance.
"""

from __future__ import annotations

import json
import pathlib
import threading
import time
import traceback

import pytest
import s3fs
import torch

from tests.trainer.gang import init_ranks, spawn_ranks
from tests.trainer.test_state_matrix import new_root, run_matrix
from tests.trainer.trainer_helpers import tiny_model, train_steps
from trainingjob_trainer import contract
from trainingjob_trainer.s3 import storage_options_from_env
from trainingjob_trainer.backends import TorchSnapshotSnapshotter, make_snapshotter
from trainingjob_trainer.snapshotter import PendingWrite
from trainingjob_trainer.state import ModelOptimizerState
from trainingjob_trainer.store import SnapshotStore

EVERY = 10
STEPS = 20
REQUEST_AT = 4


def _fs() -> s3fs.S3FileSystem:
    """A client of its own (the operator's), from the contract env."""
    return s3fs.S3FileSystem(**{**storage_options_from_env(None), "skip_instance_cache": True})


def _request(root: str, value: str) -> None:
    """What the operator does with a new annotation value."""
    req = contract.SnapshotRequest(value=value, requested_at="2026-12-01T00:00:00Z")
    _fs().pipe_file(contract.live_object_uri(root, contract.SNAPSHOT_REQUEST_OBJECT), req.to_json().encode())


def _ack(root: str) -> contract.SnapshotAck | None:
    try:
        return contract.SnapshotAck.from_json(_fs().cat_file(contract.live_object_uri(root, contract.SNAPSHOT_ACK_OBJECT)))
    except FileNotFoundError:
        return None


def _until(cond, *, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _request_and_wait_seen(snap, root: str, value: str) -> None:
    """Rank 0: write the request, then wait until the poller raised it (training waits here)."""
    _request(root, value)
    _until(lambda: snap._live is not None and snap._live.request_pending(), what="the poller to see the request")


def _app():
    model = tiny_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, {"train": ModelOptimizerState(model=model, optimizers=[opt])}


def _complete_steps(root: str) -> list[int]:
    return [i.step for i in SnapshotStore(root).scan() if i.complete]


#: The trainer's control-object poll and progress intervals in these tests.
FAST_POLL = {contract.ENV_CONTROL_POLL_SECONDS: "0.1", contract.ENV_PROGRESS_SECONDS: "0.2"}


@pytest.fixture
def fast_poll(monkeypatch):
    for k, v in FAST_POLL.items():
        monkeypatch.setenv(k, v)


# ------------------------------------------------------------- plain loop
def _plain_part(rank: int, root: str) -> None:
    model, opt, app = _app()
    snap = make_snapshotter(backend="torchsnapshot", uri=root, app_state=app, every_steps=EVERY)
    with snap:
        for step in range(1, STEPS + 1):
            train_steps(model, opt, start=step, stop=step + 1)
            if step == REQUEST_AT and rank == 0:
                _request_and_wait_seen(snap, root, "plain-1")
            snap.maybe_save(step)


@pytest.mark.slow
def test_item3_request_plain_loop_two_ranks_snapshot_between_periodic_ones(s3_env, gang_runs):
    s3_root = gang_runs("plain")
    assert _complete_steps(s3_root) == [REQUEST_AT, EVERY, 2 * EVERY]
    ack = _ack(s3_root)
    assert ack is not None and ack.value == "plain-1" and ack.step == REQUEST_AT and ack.attempt == 0
    assert ack.snapshot == SnapshotStore(s3_root).uri_for(epoch=0, step=REQUEST_AT) and ack.completed_at


def test_item3_served_request_survives_a_restart_and_a_new_value_is_served(s3_env, s3_root, fast_poll):
    """The ack tells a restarted trainer which value was served: only a NEW value takes a snapshot."""
    for attempt, value, expect in ((0, "v1", [2]), (1, "v1", [2]), (1, "v2", [2, 102])):
        model, opt, app = _app()
        snap = make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state=app, attempt=attempt)
        if attempt == 0 or value == "v2":
            _request(s3_root, value)
        start = 100 if attempt else 0
        with snap:
            for step in range(start + 1, start + 4):
                train_steps(model, opt, start=step, stop=step + 1)
                snap.maybe_save(step)
                if step == start + 1:  # two polls after the first boundary: read; served at the next one
                    polls = snap._live.polls
                    _until(lambda: snap._live.polls >= polls + 2, what="two polls")
                    if value == "v1" and attempt == 1:
                        assert not snap._live.request_pending()
        assert _complete_steps(s3_root) == expect, (attempt, value)
        assert _ack(s3_root).value == value


# ---------------------------------------------------------------- TorchTNT
def _tnt_part(rank: int, root: str) -> None:
    from torchtnt.framework.state import State
    from torchtnt.framework.train import train as tnt_train

    from tests.trainer.test_tnt_saver import Unit as PlainUnit
    from trainingjob_trainer.tnt import TorchSnapshotSaver

    holder = {}

    class Unit(PlainUnit):
        def train_step(self, state: State, data: torch.Tensor) -> None:
            super().train_step(state, data)
            if rank == 0 and self.train_progress.num_steps_completed == REQUEST_AT - 1:  # this step is REQUEST_AT
                _request_and_wait_seen(holder["saver"].snapshotter, root, "tnt-1")

    g = torch.Generator().manual_seed(0)
    loader = [torch.randn(4, 8, generator=g) for _ in range(STEPS)]
    holder["saver"] = TorchSnapshotSaver(root, backend="dcp", save_every_n_train_steps=EVERY, async_checkpoint=False)
    tnt_train(Unit(), loader, max_epochs=1, callbacks=[holder["saver"]])


@pytest.mark.slow
def test_item3_request_torchtnt_two_ranks_snapshot_between_periodic_ones(s3_env, gang_runs):
    s3_root = gang_runs("tnt")
    infos = [i for i in SnapshotStore(s3_root).scan() if i.complete]
    # The request's, the periodic ones, and on_train_end's (epoch 1).
    assert [(i.epoch, i.step) for i in infos] == [(0, REQUEST_AT), (0, EVERY), (0, 2 * EVERY), (1, 2 * EVERY)]
    ack = _ack(s3_root)
    assert ack is not None and ack.value == "tnt-1" and ack.step == REQUEST_AT
    assert ack.snapshot == infos[0].uri
    final = contract.Progress.from_json(_fs().cat_file(contract.live_object_uri(s3_root, contract.PROGRESS_OBJECT)))
    assert final.total_steps == STEPS and final.step == STEPS  # max_epochs=1 x len(loader)


# --------------------------------------------- a request during an async save
class _GatedSnapshotter(TorchSnapshotSnapshotter):
    """The real backend, but its background write reports "not done" until the
    test opens the gate: the save stays in flight for as many steps as the test
    needs (a slow upload, made deterministic)."""

    gate: threading.Event | None = None

    def _write(self, uri, app_state, *, asynchronous, prepare=None):
        handle = super()._write(uri, app_state, asynchronous=asynchronous, prepare=prepare)
        gate = self.gate
        if handle is None or gate is None:
            return handle

        def wait() -> None:
            gate.wait(15)  # bounded: without the rule under test, step 5's save would wait here
            handle.wait()

        return PendingWrite(done=lambda: gate.is_set() and handle.done(), wait=wait)


def _inflight_part(rank: int, root: str) -> None:
    model, opt, app = _app()
    snap = _GatedSnapshotter(uri=root, app_state=app, every_steps=REQUEST_AT, async_save=True)
    with snap:
        for step in range(1, 3 * REQUEST_AT + 1):
            train_steps(model, opt, start=step, stop=step + 1)
            if step == REQUEST_AT:
                snap.gate = threading.Event()  # the periodic save at this step stays in flight
            if step == REQUEST_AT + 3:
                snap.gate.set()
            snap.maybe_save(step)
            if step == REQUEST_AT and rank == 0:
                assert snap._in_flight is not None
                _request_and_wait_seen(snap, root, "during-save")


@pytest.mark.slow
def test_item3_request_during_an_in_flight_async_save_is_served_after_it(s3_env, gang_runs):
    s3_root = gang_runs("inflight")
    steps = _complete_steps(s3_root)
    ack = _ack(s3_root)
    assert ack is not None and ack.value == "during-save"
    # Steps REQUEST_AT+1 and +2 ran with the save in flight: no snapshot there; served once it committed.
    assert REQUEST_AT + 1 not in steps and REQUEST_AT + 2 not in steps, steps
    assert ack.step in (REQUEST_AT + 3, 2 * REQUEST_AT) and ack.step in steps, (ack, steps)
    assert steps[0] == REQUEST_AT


# ------------------------------------------- the three 2-rank runs, one gang
_PARTS = {"plain": _plain_part, "tnt": _tnt_part, "inflight": _inflight_part}


def _gang_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    """One 2-rank process group runs every part in turn, each on a root of its own."""
    init_ranks(rank, world, port)
    results = {}
    for name, part in _PARTS.items():
        try:
            part(rank, f"{root}-{name}")
            results[name] = None
        except Exception:  # noqa: BLE001 - reported by the part's test
            results[name] = traceback.format_exc()[-3000:]
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def gang_runs(s3_server, tmp_path_factory):
    """``gang_runs(part)``: the part's snapshot root, once every rank ran it without an error.

    Spawning two ranks (torch, TorchTNT, torchsnapshot imports) costs seconds,
    so the three 2-rank tests share one process group (with :data:`FAST_POLL`).
    """
    root = new_root(s3_server, name="request")
    results = run_matrix(_gang_worker, s3_server=s3_server, out=tmp_path_factory.mktemp("requests"), name="request",
                         root=root, env=FAST_POLL)

    def get(part: str) -> str:
        for rank, res in results.items():
            assert res[part] is None, f"rank {rank}, {part}: {res[part]}"
        return f"{root}-{part}"

    return get
# ------------------------------------------ a request with a hold (a reclaim)
HOLD_AT = 3
GLOO_TIMEOUT = 3  # a hold longer than this inside one collective would fail the run


def _hold_request(root: str, value: str, hold: int) -> None:
    req = contract.SnapshotRequest(value=value, requested_at="2026-12-01T00:00:00Z", hold_seconds=hold)
    _fs().pipe_file(contract.live_object_uri(root, contract.SNAPSHOT_REQUEST_OBJECT), req.to_json().encode())


def _hold_worker(rank: int, world: int, port: int, root: str, workdir: str, hold: int, sigterm: bool) -> None:
    import os
    import pathlib
    import signal

    from trainingjob_trainer.preemption import Preempted

    init_ranks(rank, world, port, timeout_s=GLOO_TIMEOUT)
    model, opt, app = _app()
    snap = make_snapshotter(backend="torchsnapshot", uri=root, app_state=app, async_save=True)
    mine = pathlib.Path(workdir) / f"rank{rank}.step"
    seconds = {}

    def kill_during_hold() -> None:  # rank 0: SIGTERM once every rank has sat at HOLD_AT for 2 s
        _until(lambda: snap._live is not None and snap._live._hold_deadline is not None, what="the hold")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            assert {p.read_text() for p in pathlib.Path(workdir).glob("rank*.step")} == {str(HOLD_AT)}
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        with snap:
            for step in range(1, 2 * HOLD_AT + 1):
                train_steps(model, opt, start=step, stop=step + 1)
                mine.write_text(str(step))
                if step == HOLD_AT and rank == 0:
                    _hold_request(root, "reclaim-n1-0", hold)
                    _until(lambda: snap._live.request_pending(), what="the poller to see the request")
                    if sigterm:
                        threading.Thread(target=kill_during_hold, daemon=True).start()
                t0 = time.monotonic()
                snap.maybe_save(step)
                seconds[step] = time.monotonic() - t0
    except Preempted as e:
        assert sigterm and e.step == HOLD_AT, e
        return
    assert not sigterm, "SIGTERM during the hold did not stop the run"
    # Every rank held at HOLD_AT (rank 1 too: rank 0's release reached it), nowhere else.
    assert seconds[HOLD_AT] >= hold - 0.5, seconds
    assert all(s < hold - 0.5 for k, s in seconds.items() if k != HOLD_AT), seconds


@pytest.mark.slow
def test_issue12_hold_timeout_stops_every_rank_at_one_step_then_resumes(s3_env, s3_root, fast_poll, tmp_path):
    """A false alarm: no kill within hold_seconds; the gang resumes (longer than gloo's timeout: no collective waits)."""
    spawn_ranks(_hold_worker, s3_root, str(tmp_path), GLOO_TIMEOUT + 2, False, world=2, timeout=120)
    assert _complete_steps(s3_root) == [HOLD_AT]  # synchronous: the hold began with it committed
    assert _ack(s3_root).value == "reclaim-n1-0" and _ack(s3_root).step == HOLD_AT
    assert {p.read_text() for p in tmp_path.glob("rank*.step")} == {str(2 * HOLD_AT)}


@pytest.mark.slow
def test_issue12_hold_then_sigterm_loses_no_step_and_skips_the_emergency_save(s3_env, s3_root, fast_poll, tmp_path):
    """During the hold no rank steps past the snapshot (a kill then loses 0 steps); SIGTERM ends it as preempted."""
    spawn_ranks(_hold_worker, s3_root, str(tmp_path), 60, True, world=2, timeout=120)
    infos = [i for i in SnapshotStore(s3_root).scan() if i.complete]
    assert [i.step for i in infos] == [HOLD_AT]
    assert {p.read_text() for p in tmp_path.glob("rank*.step")} == {str(HOLD_AT)}
