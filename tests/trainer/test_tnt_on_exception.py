"""Issue 8 item 7: when one rank fails, its ``on_exception`` runs no collective.

Two ranks train under TorchTNT with async torchsnapshot saves every step, so
a save is in flight when rank 1 raises in step 2. Rank 0 meanwhile sits in
its own step 2, in no collective: a collective in rank 1's error handling
(the old ``on_exception`` committed the save in flight: an all-reduce and a
broadcast) can only hang there until the group's timeout (30 s). Rank 0
waits up to 20 s for rank 1 to finish its error handling.
"""

from __future__ import annotations

import json
import pathlib
import time

import pytest

from tests.trainer.gang import init_ranks, spawn_ranks
from tests.trainer.test_state_matrix import run_matrix

HANDLED_WITHIN_S = 20


class _Boom(RuntimeError):
    pass


def _worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch
    from torchtnt.framework.train import train as tnt_train
    from torchtnt.framework.unit import TrainUnit

    from trainingjob_trainer.store import SnapshotStore
    from trainingjob_trainer.tnt import TorchSnapshotSaver

    init_ranks(rank, world, port, timeout_s=30)
    handled = pathlib.Path(out, "rank1-handled")
    result: dict = {}

    class Unit(TrainUnit):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(8, 2)
            self.optimizer = torch.optim.AdamW(self.module.parameters())

        def train_step(self, state, data) -> None:
            if self.train_progress.num_steps_completed == 1:  # step 2; the step-1 save is in flight
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
            loss = self.module(data).pow(2).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    saver = TorchSnapshotSaver(dirpath=root, save_every_n_train_steps=1, async_checkpoint=True,
                               watch_preemption=False)
    try:
        tnt_train(Unit(), [torch.ones(2, 8)] * 5, max_steps=5, callbacks=[saver])
        result["error"] = "training did not raise"
    except _Boom:
        if rank == 1:
            result["handled_s"] = time.time() - result["raised_at"]
            handled.write_text("done")
    if rank == 0:
        result["complete"] = [i.name for i in SnapshotStore(root).scan() if i.complete]
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps({"row": result}))


@pytest.mark.slow
def test_item7_on_exception_runs_no_collective(s3_server, tmp_path):
    results = run_matrix(_worker, s3_server=s3_server, out=tmp_path, name="on-exception")
    r0, r1 = results[0]["row"], results[1]["row"]
    assert "error" not in r0 and "error" not in r1, results
    assert r1["handled_s"] < HANDLED_WITHIN_S, results
    # Nobody committed the save that was in flight: committing needs every rank.
    assert r0["complete"] == [], results
