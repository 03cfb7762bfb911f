"""Issue 8 item 7: when one rank fails, its error handling runs no collective.

Two ranks train with async torchsnapshot saves every step, under TorchTNT
(``on_exception``) or in a plain loop (``with snapshotter:``), so a save is
in flight when rank 1 raises in step 2. Rank 0 meanwhile sits in
its own step 2, in no collective: a collective in rank 1's error handling
(the old ``on_exception`` committed the save in flight: an all-reduce and a
broadcast) can only hang there until the group's timeout (30 s). Rank 0
waits up to 20 s for rank 1 to finish its error handling.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time

import pytest

from tests.trainer.gang import init_ranks, spawn_ranks
from tests.trainer.test_state_matrix import run_matrix

HANDLED_WITHIN_S = 20


class _Boom(RuntimeError):
    pass


def _plain_loop(*, root: str, step_fn) -> None:
    import torch

    from trainingjob_trainer.backends import make_snapshotter
    from trainingjob_trainer.state import ModelOptimizerState

    model = torch.nn.Linear(8, 2)
    opt = torch.optim.AdamW(model.parameters())
    snap = make_snapshotter(backend="torchsnapshot", uri=root, every_steps=1, async_save=True,
                            watch_preemption=False,
                            app_state={"train": ModelOptimizerState(model=model, optimizers=[opt])})
    with snap:
        for step in range(1, 6):
            step_fn(step - 1, model, opt)
            snap.maybe_save(step)


def _worker(rank: int, world: int, port: int, root: str, out: str, api: str) -> None:
    import torch
    from torchtnt.framework.train import train as tnt_train
    from torchtnt.framework.unit import TrainUnit

    from trainingjob_trainer.store import SnapshotStore
    from trainingjob_trainer.tnt import TorchSnapshotSaver

    init_ranks(rank, world, port, timeout_s=30)
    handled = pathlib.Path(out, "rank1-handled")
    result: dict = {}

    def step_fn(done: int, module, optimizer) -> None:
        if done == 1:  # step 2; the step-1 save is in flight
            if rank == 1:
                result["raised_at"] = time.time()
                raise _Boom("rank 1 fails in step 2")
            deadline = time.monotonic() + HANDLED_WITHIN_S
            while not handled.exists():
                if time.monotonic() > deadline:
                    result["error"] = f"rank 1 still in its error handling after {HANDLED_WITHIN_S}s"
                    break
                time.sleep(0.05)
            raise _Boom("rank 0 gives up on its peer")
        loss = module(torch.ones(2, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    class Unit(TrainUnit):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(8, 2)
            self.optimizer = torch.optim.AdamW(self.module.parameters())

        def train_step(self, state, data) -> None:
            step_fn(self.train_progress.num_steps_completed, self.module, self.optimizer)

    try:
        if api == "tnt":
            saver = TorchSnapshotSaver(dirpath=root, save_every_n_train_steps=1, async_checkpoint=True,
                                       watch_preemption=False)
            tnt_train(Unit(), [torch.ones(2, 8)] * 5, max_steps=5, callbacks=[saver])
        else:
            _plain_loop(root=root, step_fn=step_fn)
        result["error"] = "training did not raise"
    except _Boom:
        if rank == 1:
            result["handled_s"] = time.time() - result["raised_at"]
            handled.write_text("done")
    if rank == 0:
        result["complete"] = [i.name for i in SnapshotStore(root).scan() if i.complete]
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps({"row": result}))


@pytest.mark.slow
@pytest.mark.parametrize("api", ["tnt", "plain"])
def test_item7_error_handling_runs_no_collective(s3_server, tmp_path, api):
    results = run_matrix(functools.partial(_worker, api=api), s3_server=s3_server, out=tmp_path,
                         name=f"on-exception-{api}")
    r0, r1 = results[0]["row"], results[1]["row"]
    assert "error" not in r0 and "error" not in r1, results
    assert r1["handled_s"] < HANDLED_WITHIN_S, results
    # Nobody committed the save that was in flight: committing needs every rank.
    assert r0["complete"] == [], results
