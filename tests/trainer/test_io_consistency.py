"""Issue 8 item 11: the consistency rule holds for objects the save did not write, and
pruning never deletes a snapshot whose marker another release wrote."""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.trainer.io_helpers import one_rank_group  # noqa: F401 - a fixture
from tests.trainer.trainer_helpers import tiny_model
from trainingjob_trainer import contract
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import ModelOptimizerState
from trainingjob_trainer.store import SnapshotStore


def _snap(backend: str, root: str, **kw):
    model = tiny_model()
    return make_snapshotter(backend=backend, uri=root, watch_preemption=False, app_state={
        "train": ModelOptimizerState(model=model, optimizers=[torch.optim.SGD(model.parameters(), lr=0.1)])}, **kw)


def _uploaded(snap) -> None:
    deadline = time.monotonic() + 30
    while not snap._in_flight.handle.done():
        assert time.monotonic() < deadline, "the async save did not finish"
        time.sleep(0.02)


@pytest.mark.parametrize("backend", ["dcp", "torchsnapshot"])
def test_item11_stray_writes_between_begin_and_commit_never_enter_the_marker(one_rank_group, s3_env, s3_root,
                                                                             backend):
    snap = _snap(backend, s3_root, async_save=True)
    fs, root = snap.store.fs, snap.store._root_path
    folder = f"{root}/{contract.snapshot_dir_name(0, 2)}"

    # Another save's object lands in the folder after the uploads, before the commit: left out.
    snap.save(step=2)
    _uploaded(snap)
    fs.pipe_file(f"{folder}/stray.distcp", b"s" * 100)
    marker = snap.wait()
    assert marker is not None and "stray.distcp" not in marker.objects, sorted(marker.objects)
    assert SnapshotStore(s3_root).inspect(snap.store.uri_for(epoch=0, step=2)).complete

    # One of the save's own objects is replaced before the commit (same size, other bytes): not committed.
    snap.save(step=4)
    _uploaded(snap)
    mine = {p.split("://", 1)[-1]: m for p, m in snap._in_flight.written.items()}
    victim = max(mine, key=lambda p: mine[p]["size"])
    fs.pipe_file(victim, b"x" * mine[victim]["size"])
    assert snap.wait() is None and snap.failed_saves == 1
    assert not SnapshotStore(s3_root).inspect(snap.store.uri_for(epoch=0, step=4)).complete
    assert SnapshotStore(s3_root).latest_complete().step == 2
    snap.close()


def test_item11_prune_keeps_snapshots_whose_marker_version_it_does_not_know(s3_env, s3_root):
    snap = _snap("dcp", s3_root, keep_last=1)
    fs, root = snap.store.fs, snap.store._root_path
    newer = f"{root}/{contract.snapshot_dir_name(0, 100)}"  # written by a newer image before a rollback
    fs.pipe_file(f"{newer}/data.bin", b"d" * 10)
    fs.pipe_file(f"{newer}/{contract.COMMIT_MARKER}", json.dumps({"version": 99, "step": 100}).encode())
    broken = f"{root}/{contract.snapshot_dir_name(0, 50)}"  # a marker that is no marker: a leftover
    fs.pipe_file(f"{broken}/data.bin", b"d" * 10)
    fs.pipe_file(f"{broken}/{contract.COMMIT_MARKER}", b"{not json")
    for step in (1, 2, 3):
        snap.save(step=step)
    infos = {i.step: i for i in SnapshotStore(s3_root).scan()}
    assert sorted(infos) == [3, 100], sorted(infos)
    assert infos[100].foreign_version == 99 and not infos[100].complete
    assert SnapshotStore(s3_root).latest_complete().step == 3  # never restored by this release
