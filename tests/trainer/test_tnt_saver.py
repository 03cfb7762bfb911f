"""The seed's TorchTNT snippet, verbatim, against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torchtnt.framework.state import State
import functools

from torchtnt.framework.train import train as tnt_train
from torchtnt.framework.unit import TrainUnit

from tests.trainer.trainer_helpers import assert_states_equal, tiny_model
from trainingjob_trainer import contract
from trainingjob_trainer.store import SnapshotStore
from trainingjob_trainer.tnt import TorchSnapshotSaver

STEPS_PER_EPOCH = 30


class Loader:
    """A stateful, deterministic dataloader: batch i of epoch e is seeded by (e, i).

    Like a sampler with ``set_epoch``, it takes the epoch from the unit's
    progress (TorchTNT saves the dataloader only intra-epoch).
    """

    def __init__(self, unit: "Unit") -> None:
        self.unit = unit
        self.pos = 0

    def __iter__(self):
        epoch = self.unit.train_progress.num_epochs_completed
        while self.pos < STEPS_PER_EPOCH:
            g = torch.Generator().manual_seed(epoch * 1000 + self.pos)
            self.pos += 1
            yield torch.randn(4, 8, generator=g)
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = int(sd["pos"])


class Unit(TrainUnit[torch.Tensor]):
    def __init__(self) -> None:
        super().__init__()
        self.module = tiny_model(0)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-2)

    def train_step(self, state: State, data: torch.Tensor) -> None:
        loss = self.module(data).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def _state(unit: Unit):
    return copy.deepcopy({"m": unit.module.state_dict(), "o": unit.optimizer.state_dict()})


def _seed_snippet(dirpath, unit, dataloader, latest_checkpoint_dir, max_epochs):
    train = functools.partial(tnt_train, max_epochs=max_epochs)  # the seed's epoch budget
    # --- the seed's code, verbatim ---
    tss = TorchSnapshotSaver(dirpath=dirpath, save_every_n_train_steps=100, save_every_n_epochs=2)
    if latest_checkpoint_dir:
        tss.restore_from_latest(dirpath, unit, train_dataloader=dataloader)
    train(unit, dataloader, callbacks=[tss])
    # ---------------------------------
    return tss


def test_seed_snippet_saves_to_s3_and_resumes_bit_for_bit(s3_root):
    # Reference: 6 epochs uninterrupted.
    torch.manual_seed(7)
    ref = Unit()
    tnt_train(ref, Loader(ref), max_epochs=6)

    # Run 1: 4 epochs with the saver (snapshots at step 60 (epoch 2), 100, 120 (epoch 4 / end)).
    torch.manual_seed(7)
    u1 = Unit()
    dl1 = Loader(u1)
    _seed_snippet(s3_root, u1, dl1, None, 4)
    infos = SnapshotStore(s3_root).scan()
    assert [(i.epoch, i.step) for i in infos] == [(2, 60), (3, 100), (4, 120)]
    assert all(i.complete for i in infos)
    saved = _state(u1)

    # Run 2: a fresh process's objects; resume from S3 and train to 6 epochs.
    torch.manual_seed(12345)  # a different RNG: the snapshot's rng_state must win
    u2 = Unit()
    dl2 = Loader(u2)
    with torch.no_grad():
        for p in u2.module.parameters():
            p.add_(1.0)
    assert TorchSnapshotSaver.restore_from_latest(s3_root, u2, train_dataloader=dl2)
    assert assert_states_equal(_state(u2), saved) >= 8
    assert u2.train_progress.num_steps_completed == 120
    assert u2.train_progress.num_epochs_completed == 4

    torch.manual_seed(12345)
    u3 = Unit()
    dl3 = Loader(u3)
    _seed_snippet(s3_root, u3, dl3, s3_root, 6)
    assert u3.train_progress.num_steps_completed == 180
    assert_states_equal(_state(u3), _state(ref))


def test_restore_from_latest_skips_incomplete_and_reports_none(s3_root):
    u = Unit()
    assert TorchSnapshotSaver.restore_from_latest(s3_root, u) is False
    # A folder without a commit marker is never picked.
    store = SnapshotStore(s3_root)
    store.fs.pipe_file(f"{store._root_path}/{contract.snapshot_dir_name(0, 5)}/0/x", b"junk")
    assert TorchSnapshotSaver.restore_from_latest(s3_root, u) is False


class SignalledUnit(Unit):
    """Sends itself SIGTERM during step 5."""

    def train_step(self, state: State, data: torch.Tensor) -> None:
        super().train_step(state, data)
        if self.train_progress.num_steps_completed == 4:  # counter is bumped after this call
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_takes_emergency_snapshot_and_exits_with_contract_code(s3_root, tmp_path, monkeypatch):
    import pytest

    from trainingjob_trainer.preemption import Preempted

    term = tmp_path / "termination-log"
    monkeypatch.setenv(contract.ENV_TERMINATION_MESSAGE_PATH, str(term))
    torch.manual_seed(3)
    unit = SignalledUnit()
    dl = Loader(unit)
    tss = TorchSnapshotSaver(dirpath=s3_root, save_every_n_train_steps=100)
    with pytest.raises(Preempted) as exc:
        tnt_train(unit, dl, callbacks=[tss], max_epochs=1)
    tss.snapshotter.close()
    assert exc.value.code == contract.EXIT_PREEMPTED_AFTER_SNAPSHOT and exc.value.step == 5
    msg = contract.parse_termination_message(term.read_text())
    assert (msg.reason, msg.step) == (contract.TERM_REASON_PREEMPTED, 5)
    info = SnapshotStore(s3_root).inspect(msg.snapshot)
    assert info.complete and info.marker.emergency and info.step == 5
    saved = _state(unit)

    # Attempt 1: the callback restores by itself before the first step (intra-epoch, with the dataloader).
    monkeypatch.setenv(contract.ENV_ATTEMPT, "1")
    torch.manual_seed(99)
    u2 = Unit()
    dl2 = Loader(u2)
    seen = {}

    class Probe(TorchSnapshotSaver):
        def on_train_start(self, state, unit):
            super().on_train_start(state, unit)
            seen["state"], seen["step"], seen["pos"] = _state(unit), unit.train_progress.num_steps_completed, dl2.pos

    tnt_train(u2, dl2, callbacks=[Probe(dirpath=s3_root, watch_preemption=False)], max_epochs=1)
    assert seen["step"] == 5 and seen["pos"] == 5
    assert_states_equal(seen["state"], saved)
    assert u2.train_progress.num_steps_completed == STEPS_PER_EPOCH
