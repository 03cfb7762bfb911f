"""Issue 8 item 6: a finished async save is committed at a step boundary without the SIGTERM watcher."""

from __future__ import annotations

import time

import pytest
import torch

from tests.trainer.io_helpers import one_rank_group  # noqa: F401 - a fixture
from tests.trainer.trainer_helpers import tiny_model
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import ModelOptimizerState
from trainingjob_trainer.store import SnapshotStore


@pytest.mark.parametrize("backend", ["dcp", "torchsnapshot"])
def test_item6_finished_async_save_commits_without_the_watcher(one_rank_group, s3_env, s3_root, backend):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snap = make_snapshotter(backend=backend, uri=s3_root, app_state={"train": ModelOptimizerState(
        model=model, optimizers=[opt])}, async_save=True, watch_preemption=False)
    assert snap.watcher is None and snap.async_save
    snap.save(step=2)
    step, deadline = 2, time.monotonic() + 30
    while snap.last_marker is None:  # training goes on; no further save is due
        assert time.monotonic() < deadline, "the finished async save was never committed"
        step += 1
        snap.maybe_save(step)
        time.sleep(0.02)  # a train step
    assert snap.last_marker.step == 2 and snap._in_flight is None
    latest = SnapshotStore(s3_root).latest_complete()
    assert latest is not None and latest.step == 2
    snap.close()
