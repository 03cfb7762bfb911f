"""Issue 8 items 8 and 10 (TorchTNT side): the saver reports progress and follows the contract env.

Explicit keyword arguments win, then the contract env (``TJ_SNAPSHOT_BACKEND``,
``TJ_SNAPSHOT_EVERY_STEPS``, ``TJ_SNAPSHOT_KEEP_LAST``, ``TJ_RESUME_FROM``,
also on attempt 0), then TorchTNT's defaults.
"""

from __future__ import annotations

import torch
from torchtnt.framework.train import train as tnt_train

from tests.trainer.test_state_matrix import _unit_class
from trainingjob_trainer import contract
from trainingjob_trainer.snapshotter import SnapshotNotRestorable
from trainingjob_trainer.store import SnapshotStore
from trainingjob_trainer.tnt import TorchSnapshotSaver


def _unit():
    model = torch.nn.Linear(8, 2)
    return _unit_class()(model, torch.optim.AdamW(model.parameters()))


def _complete(root):
    return [(i.step, i.epoch, i.marker.backend) for i in SnapshotStore(root).scan() if i.complete]


def test_item8_torchtnt_steps_reach_the_progress_file(s3_root, tmp_path, monkeypatch):
    progress = tmp_path / "progress"
    monkeypatch.setenv(contract.ENV_PROGRESS_FILE, str(progress))
    seen = []

    class Probe(TorchSnapshotSaver):
        def on_train_step_end(self, state, unit):
            super().on_train_step_end(state, unit)
            seen.append(progress.read_text() if progress.exists() else None)

    tnt_train(_unit(), [torch.ones(2, 8)] * 3, max_steps=3,
              callbacks=[Probe(dirpath=s3_root, async_checkpoint=False, watch_preemption=False)])
    assert seen == ["1", "2", "3"]


def test_item10_torchtnt_saver_takes_backend_every_steps_keep_last_from_env(s3_root, monkeypatch):
    monkeypatch.setenv(contract.ENV_SNAPSHOT_BACKEND, "dcp")
    monkeypatch.setenv(contract.ENV_SNAPSHOT_EVERY_STEPS, "2")
    monkeypatch.setenv(contract.ENV_SNAPSHOT_KEEP_LAST, "1")
    tnt_train(_unit(), [torch.ones(2, 8)] * 5, max_epochs=1,
              callbacks=[TorchSnapshotSaver(dirpath=s3_root, async_checkpoint=False, watch_preemption=False)])
    # Saves at steps 2, 4 and the end (epoch 1, step 5); keep-last 1 leaves the end.
    assert _complete(s3_root) == [(5, 1, "dcp")]


def test_item10_explicit_kwargs_win_over_env(s3_root, monkeypatch):
    monkeypatch.setenv(contract.ENV_SNAPSHOT_BACKEND, "dcp")
    monkeypatch.setenv(contract.ENV_SNAPSHOT_EVERY_STEPS, "1")
    monkeypatch.setenv(contract.ENV_SNAPSHOT_KEEP_LAST, "1")
    tnt_train(_unit(), [torch.ones(2, 8)] * 5, max_epochs=1,
              callbacks=[TorchSnapshotSaver(dirpath=s3_root, backend="torchsnapshot", save_every_n_train_steps=2,
                                            keep_last_n_checkpoints=2, async_checkpoint=False,
                                            watch_preemption=False)])
    assert _complete(s3_root) == [(4, 0, "torchsnapshot"), (5, 1, "torchsnapshot")]


def test_item10_resume_from_is_honoured_on_attempt_0(s3_root, monkeypatch):
    tnt_train(_unit(), [torch.ones(2, 8)] * 4, max_epochs=1,
              callbacks=[TorchSnapshotSaver(dirpath=s3_root, save_every_n_train_steps=1, async_checkpoint=False,
                                            watch_preemption=False)])
    store = SnapshotStore(s3_root)
    monkeypatch.setenv(contract.ENV_ATTEMPT, "0")
    monkeypatch.setenv(contract.ENV_RESUME_FROM, store.uri_for(epoch=0, step=2))
    started = []

    class Probe(TorchSnapshotSaver):
        def on_train_start(self, state, unit):
            super().on_train_start(state, unit)
            started.append(unit.train_progress.num_steps_completed)

    unit = _unit()
    tnt_train(unit, [torch.ones(2, 8)] * 4, max_epochs=1,
              callbacks=[Probe(dirpath=s3_root, async_checkpoint=False, watch_preemption=False)])
    assert started == [2]


def test_shape_save_every_n_eval_epochs_under_fit(s3_root):
    from torchtnt.framework.fit import fit

    from tests.trainer.test_tnt_preemption_phases import FitUnit

    class Quiet(FitUnit):
        def eval_step(self, state, data) -> None:
            self.eval_steps += 1

    batches = [torch.ones(2, 8)] * 4
    fit(Quiet(), train_dataloader=batches, eval_dataloader=batches[:2], max_epochs=1, evaluate_every_n_steps=2,
        callbacks=[TorchSnapshotSaver(dirpath=s3_root, save_every_n_eval_epochs=1, async_checkpoint=False,
                                      watch_preemption=False)])
    # Evals after train steps 2 and 4 (mid-epoch), after the epoch; then the final save (same folder).
    assert _complete(s3_root) == [(2, 0, "torchsnapshot"), (4, 0, "torchsnapshot"), (4, 1, "torchsnapshot")]


def test_shape_restore_options_strict_false_skips_entries_the_snapshot_lacks(s3_root):
    import pytest
    from torchtnt.framework.callbacks.checkpointer_types import RestoreOptions

    saved = _unit()
    tnt_train(saved, [torch.ones(2, 8)] * 2, max_steps=2,
              callbacks=[TorchSnapshotSaver(dirpath=s3_root, async_checkpoint=False, watch_preemption=False)])
    unit = _unit()
    unit.extra = torch.nn.Linear(2, 2)  # tracked by the unit, absent from the snapshot
    with pytest.raises(SnapshotNotRestorable, match="extra is absent"):  # torchsnapshot, strict by default: not retried
        TorchSnapshotSaver.restore_from_latest(s3_root, unit)
    unit = _unit()
    unit.extra = torch.nn.Linear(2, 2)
    assert TorchSnapshotSaver.restore_from_latest(s3_root, unit, restore_options=RestoreOptions(strict=False))
    assert torch.equal(unit.module.weight, saved.module.weight)
    assert unit.train_progress.num_steps_completed == 2


def test_shape_unknown_torchtnt_version_fails_at_import():
    import subprocess
    import sys

    code = "import torchtnt; torchtnt.__version__ = '0.3.0'; import trainingjob_trainer.tnt"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "ImportError: trainingjob_trainer.tnt supports torchtnt 0.2.4, found 0.3.0" in r.stderr, r.stderr[-2000:]
