"""The three consistency cases: nothing mixed or half-written is ever restored.

1. A save killed midway (SIGKILL), even into a folder that held a complete
   snapshot of the same step.
2. A folder left half-written by a fenced attempt, then written again by the
   next attempt at the same step.
3. A stale upload from the old attempt landing after the new attempt's write.
"""

from __future__ import annotations

import copy
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.trainer.trainer_helpers import assert_states_equal, tiny_model, train_steps
from trainingjob_trainer import contract
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import ModelOptimizerState, RNGState

BACKENDS = ["torchsnapshot", "dcp"]
REPO = pathlib.Path(__file__).resolve().parents[2]


def _job(seed: int = 0, lr: float = 1e-2):
    model = tiny_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt, {"train": ModelOptimizerState(model=model, optimizers=[opt]), "rng": RNGState()}


def _full(model, opt):
    return copy.deepcopy({"m": model.state_dict(), "o": opt.state_dict()})


def _state_at(step: int, lr: float = 1e-2):
    model, opt, _ = _job(lr=lr)
    train_steps(model, opt, start=1, stop=step + 1)
    return _full(model, opt)


def _restore(uri: str, backend: str):
    model, opt, app = _job(seed=123)
    snap = make_snapshotter(backend=backend, uri=uri, app_state=app, watch_preemption=False)
    return snap.restore_latest(), _full(model, opt), snap


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_killed_midway_is_never_restored(s3_root, s3_env, backend, tmp_path):
    ready = tmp_path / "ready"
    env = {**os.environ, **s3_env}
    proc = subprocess.Popen([sys.executable, "-m", "tests.trainer.killed_save", s3_root, backend, str(ready)],
                            env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, f"helper exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "helper never reached the middle of its save"
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    step, restored, snap = _restore(s3_root, backend)
    infos = {i.name: i for i in snap.store.scan()}
    # Step 20 had a complete snapshot; the re-save of step 20 went beside it
    # (issue 8 item 3: never into another save's folder), into a folder tagged
    # with its save id, and was killed there: that one is NOT complete, and the
    # first step-20 snapshot is untouched and restored.
    killed = [i for n, i in infos.items() if n.startswith(contract.snapshot_dir_name(0, 20) + "_")]
    assert len(killed) == 1 and killed[0].marker is None and not killed[0].complete
    assert infos[contract.snapshot_dir_name(0, 20)].complete
    assert step == 20
    assert_states_equal(restored, _state_at(20))


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_written_folder_rewritten_by_next_attempt(s3_root, backend):
    # Attempt 0: complete snapshot at 10, then a save at 20 that is cut off
    # (fenced): its objects are uploaded but it never commits, and one is lost.
    model, opt, app = _job()
    old = make_snapshotter(backend=backend, uri=s3_root, app_state=app, attempt=0, watch_preemption=False)
    train_steps(model, opt, start=1, stop=11)
    old.save(step=10)
    train_steps(model, opt, start=11, stop=21)
    uri20 = old.store.begin(epoch=0, step=20)
    old._write(uri20, app, asynchronous=False)
    listing = old.store.inspect(uri20).listing
    victim = sorted(listing)[0]
    old.store.fs.rm_file(f"{old.store._root_path}/{contract.snapshot_dir_name(0, 20)}/{victim}")
    old.store.fs.pipe_file(f"{old.store._root_path}/{contract.snapshot_dir_name(0, 20)}/stray.bin", b"old attempt")

    # Before the next attempt writes, the half-written folder is not restored.
    step, restored, _ = _restore(s3_root, backend)
    assert step == 10
    assert_states_equal(restored, _state_at(10))

    # Attempt 1 resumes at 10 with a different lr (so its step-20 state differs) and saves 20 again.
    model1, opt1, app1 = _job(seed=7, lr=5e-3)
    new = make_snapshotter(backend=backend, uri=s3_root, app_state=app1, attempt=1, watch_preemption=False)
    assert new.restore_latest() == 10
    train_steps(model1, opt1, start=11, stop=21)
    new.save(step=20)
    expected = _full(model1, opt1)

    # The old attempt's leftovers (its writer may still be uploading) are left
    # alone: the save goes beside them, into a folder tagged with its save id.
    assert not new.store.inspect(uri20).complete
    info = new.store.inspect(new.store.latest_complete().uri)
    assert info.step == 20 and info.complete and info.marker.attempt == 1 and info.name != contract.snapshot_dir_name(0, 20)
    assert "stray.bin" not in info.listing
    step, restored, _ = _restore(s3_root, backend)
    assert step == 20
    assert_states_equal(restored, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_upload_after_new_write_is_never_restored(s3_root, backend):
    # The old attempt's version of the step-20 objects, written aside.
    model, opt, app = _job()
    old = make_snapshotter(backend=backend, uri=s3_root + "-old", app_state=app, attempt=0, watch_preemption=False)
    train_steps(model, opt, start=1, stop=21)
    old.save(step=20)
    old_info = old.store.inspect(f"{s3_root}-old/{contract.snapshot_dir_name(0, 20)}")

    # The new attempt: complete snapshots at 10 and 20 (other initial weights -> other bytes).
    model1, opt1, app1 = _job(seed=1)
    new = make_snapshotter(backend=backend, uri=s3_root, app_state=app1, attempt=1, watch_preemption=False)
    train_steps(model1, opt1, start=1, stop=11)
    new.save(step=10)
    at10 = _full(model1, opt1)
    train_steps(model1, opt1, start=11, stop=21)
    new.save(step=20)
    info20 = new.store.inspect(f"{s3_root}/{contract.snapshot_dir_name(0, 20)}")
    assert info20.complete

    # A late upload from the fenced attempt lands on one object: same key, same size, other bytes.
    same = [k for k, v in info20.listing.items()
            if k in old_info.listing and k != contract.COMMIT_MARKER
            and old_info.listing[k]["size"] == v["size"] and old_info.listing[k]["etag"] != v["etag"]]
    assert same, "expected an object the two attempts wrote with equal size and different content"
    key = max(same, key=lambda k: info20.listing[k]["size"])
    stale = old.store.fs.cat_file(f"{old.store._root_path}/{contract.snapshot_dir_name(0, 20)}/{key}")
    new.store.fs.pipe_file(f"{new.store._root_path}/{contract.snapshot_dir_name(0, 20)}/{key}", stale)

    after = new.store.inspect(info20.uri)
    assert after.marker is not None and after.listing[key]["size"] == info20.listing[key]["size"]
    assert not after.complete  # the ETag no longer matches the marker
    step, restored, _ = _restore(s3_root, backend)
    assert step == 10
    assert_states_equal(restored, at10)
