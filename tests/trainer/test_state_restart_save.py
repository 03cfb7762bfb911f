"""Issue 8 item 3: a save never leaves fewer complete snapshots than before it began.

After a restore, TorchTNT's ``on_train_end`` (and a plain loop's ``save`` at
the restored step) saved again into the folder it restored from, dropping
that folder's commit marker first; with ``keep_last=1`` a kill in that window
left nothing to restore. The kill is injected right after the folder was
emptied (``SnapshotStore.begin``), where a SIGKILL would stop the save.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.test_state_matrix import _unit_class
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import ModelOptimizerState
from trainingjob_trainer.store import SnapshotStore


class Killed(BaseException):
    """Stands in for the SIGKILL that ends the process mid-save."""


def _kill_after_begin(snapshotter) -> None:
    real = snapshotter.store.begin

    def begin(**kwargs):
        real(**kwargs)
        raise Killed("killed after the folder was emptied")

    snapshotter.store.begin = begin


def _complete(root: str) -> list[tuple[str, str]]:
    return [(i.name, i.marker.save_id) for i in SnapshotStore(root).scan() if i.complete]


def _unit():
    model = torch.nn.Linear(8, 2)
    return _unit_class()(model, torch.optim.AdamW(model.parameters()))


@pytest.mark.parametrize("backend", ["torchsnapshot", "dcp"])
def test_item3_torchtnt_final_save_after_restore_keeps_the_snapshot(s3_root, backend):
    from torchtnt.framework.train import train as tnt_train

    from trainingjob_trainer.tnt import TorchSnapshotSaver

    def saver():
        return TorchSnapshotSaver(dirpath=s3_root, backend=backend, keep_last_n_checkpoints=1,
                                  async_checkpoint=False, watch_preemption=False)

    tnt_train(_unit(), [torch.ones(2, 8)] * 2, max_steps=2, callbacks=[saver()])
    before = _complete(s3_root)
    assert len(before) == 1

    # The restarted run: restores the finished run's snapshot, has no step left, ends.
    unit = _unit()
    assert TorchSnapshotSaver.restore_from_latest(s3_root, unit)
    again = saver()
    _kill_after_begin(again.snapshotter)
    tnt_train(unit, [torch.ones(2, 8)] * 2, max_steps=2, callbacks=[again])
    assert _complete(s3_root) == before


@pytest.mark.parametrize("backend", ["torchsnapshot", "dcp"])
def test_item3_plain_loop_save_at_restored_step_keeps_the_snapshot(s3_root, backend):
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.AdamW(model.parameters())
    state = {"train": ModelOptimizerState(model=model, optimizers=[opt])}
    make_snapshotter(backend=backend, uri=s3_root, keep_last=1, watch_preemption=False, app_state=state).save(step=3)
    before = _complete(s3_root)

    snap = make_snapshotter(backend=backend, uri=s3_root, keep_last=1, watch_preemption=False, app_state=state)
    assert snap.restore_latest() == 3
    _kill_after_begin(snap)
    assert snap.save(step=3) == SnapshotStore(s3_root).uri_for(epoch=0, step=3)
    assert _complete(s3_root) == before
    assert snap.last_marker is not None and snap.last_marker.save_id == before[0][1]
