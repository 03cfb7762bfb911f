"""Issue 8 item 12: SIGTERM outside a train step still ends the run the contract's way.

* During an eval epoch under ``fit()``: the emergency snapshot is taken at
  the next eval step's end (before, only a later train step saw the flag,
  and an eval at the end of the last epoch saw it never).
* During a long restore: the rank exits at once (``PreemptedDuringRestore``,
  128+SIGTERM) with a ``PreemptedWithoutSnapshot`` message naming the
  snapshot, instead of finishing the restore first. The restore is held up
  by a read that blocks for up to 20 s, and the signal lands on another
  thread than the main one (where Python runs handlers).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
from torchtnt.framework.fit import fit
from torchtnt.framework.unit import EvalUnit, TrainUnit

from trainingjob_trainer import contract
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.preemption import Preempted, PreemptedDuringRestore
from trainingjob_trainer.state import ModelOptimizerState
from trainingjob_trainer.store import SnapshotStore
from trainingjob_trainer.tnt import TorchSnapshotSaver


class FitUnit(TrainUnit, EvalUnit):
    """Sends itself SIGTERM in its first eval step."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.Linear(8, 2)
        self.optimizer = torch.optim.AdamW(self.module.parameters())
        self.eval_steps = 0

    def train_step(self, state, data) -> None:
        loss = self.module(data).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def eval_step(self, state, data) -> None:
        self.eval_steps += 1
        if self.eval_steps == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_item12_sigterm_during_eval_under_fit_takes_the_emergency_snapshot(s3_root, tmp_path, monkeypatch):
    term = tmp_path / "termination-log"
    monkeypatch.setenv(contract.ENV_TERMINATION_MESSAGE_PATH, str(term))
    unit = FitUnit()
    saver = TorchSnapshotSaver(dirpath=s3_root, async_checkpoint=False)
    batches = [torch.ones(2, 8)] * 4
    try:
        with pytest.raises(Preempted) as exc:
            fit(unit, train_dataloader=batches, eval_dataloader=batches, max_epochs=2, evaluate_every_n_steps=2,
                callbacks=[saver])
    finally:
        saver.snapshotter.close()
    assert exc.value.step == 2 and unit.eval_steps == 1  # at the end of the signalled eval step
    msg = contract.parse_termination_message(term.read_text())
    assert (msg.reason, msg.step) == (contract.TERM_REASON_PREEMPTED, 2)
    info = SnapshotStore(s3_root).inspect(msg.snapshot)
    assert info.complete and info.marker.emergency and info.step == 2


@pytest.mark.parametrize("backend", ["torchsnapshot", "dcp"])
def test_item12_sigterm_during_a_long_restore_exits_at_once(s3_root, tmp_path, monkeypatch, backend):
    term = tmp_path / "termination-log"
    monkeypatch.setenv(contract.ENV_TERMINATION_MESSAGE_PATH, str(term))
    model = torch.nn.Linear(8, 2)
    app = {"train": ModelOptimizerState(model=model, optimizers=[torch.optim.AdamW(model.parameters())])}
    make_snapshotter(backend=backend, uri=s3_root, watch_preemption=False, app_state=app).save(step=7)

    snap = make_snapshotter(backend=backend, uri=s3_root, app_state=app)  # installs the SIGTERM watcher
    reading, never = threading.Event(), threading.Event()
    real_read = snap._read

    def slow_read(uri, state):
        reading.set()
        never.wait(20)  # a restore far longer than the time left
        real_read(uri, state)

    snap._read = slow_read

    def sigterm_once_reading() -> None:
        # Delivered to THIS thread, not the main one: the kernel may hand a
        # process-directed SIGTERM to any thread (an S3 or upload thread).
        if reading.wait(30):
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    threading.Thread(target=sigterm_once_reading, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(PreemptedDuringRestore) as exc:
            snap.restore_latest()
    finally:
        snap.close()
    assert time.monotonic() - t0 < 10
    assert exc.value.code == 128 + signal.SIGTERM
    assert snap.restored_from is None
    msg = contract.parse_termination_message(term.read_text())
    want = SnapshotStore(s3_root).uri_for(epoch=0, step=7)
    assert (msg.reason, msg.step, msg.snapshot) == (contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT, 7, want)
