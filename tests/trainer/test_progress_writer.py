"""Issue 12, item 2: rank 0's progress object, written off the training thread (real S3 server)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import s3fs
import torch

from tests.trainer.trainer_helpers import tiny_model, train_steps
from tests.trainer.trainer_s3server import ACCESS_KEY, SECRET_KEY, start_s3_server
from trainingjob_trainer import contract
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import ModelOptimizerState

STEP_SECONDS = 0.03  # the simulated compute of one step


def _app():
    model = tiny_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, {"train": ModelOptimizerState(model=model, optimizers=[opt])}


def _fs(endpoint: str) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=endpoint, key=ACCESS_KEY, secret=SECRET_KEY, use_listings_cache=False,
                             skip_instance_cache=True)


def _progress(fs: s3fs.S3FileSystem, root: str) -> contract.Progress | None:
    try:
        return contract.Progress.from_json(fs.cat_file(contract.live_object_uri(root, contract.PROGRESS_OBJECT)))
    except FileNotFoundError:
        return None


def _wait_progress(fs, root: str, *, step: int, timeout: float = 20) -> contract.Progress:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = _progress(fs, root)
        if p is not None and p.step >= step:
            return p
        time.sleep(0.05)
    raise AssertionError(f"no progress at step {step} in {timeout}s (last: {_progress(fs, root)})")


def test_item2_progress_moves_and_its_fields_match_the_runs_own_timings(s3_env, s3_root, monkeypatch):
    monkeypatch.setenv(contract.ENV_PROGRESS_SECONDS, "0.2")
    fs = _fs(s3_env[contract.ENV_S3_ENDPOINT])
    model, opt, app = _app()
    created = time.monotonic()
    snap = make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state=app, every_steps=10, keep_last=2,
                            total_steps=60, watch_preemption=False)
    seen: list[contract.Progress] = []
    stop = threading.Event()

    def watch() -> None:  # the operator's view while the job runs
        while not stop.is_set():
            p = _progress(fs, s3_root)
            if p is not None and (not seen or p.updated_at != seen[-1].updated_at):
                seen.append(p)
            time.sleep(0.02)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    boundary: dict[int, float] = {}
    save_seconds = 0.0
    with snap:
        for step in range(1, 61):
            train_steps(model, opt, start=step, stop=step + 1)
            time.sleep(STEP_SECONDS)
            boundary[step] = time.monotonic()
            snap.maybe_save(step)
            if step % 10 == 0:
                save_seconds += time.monotonic() - boundary[step]
    ended = time.monotonic()
    stop.set()
    reader.join()
    final = _progress(fs, s3_root)

    assert final is not None and final.step == 60 and final.total_steps == 60 and final.attempt == 0
    assert final.start_step == 0 and final.epoch == 0 and final.first_step_at
    assert 0 < final.wall_seconds <= ended - created
    # The rate over the window (the whole run is shorter than the window) against the run's own clock.
    measured = (60 - 1) / (boundary[60] - boundary[1])
    assert abs(final.steps_per_second - measured) <= 0.1 * measured, (final.steps_per_second, measured)
    assert abs(final.window_seconds - (boundary[60] - boundary[1])) <= 0.1 * (boundary[60] - boundary[1])
    # Stalled = the six synchronous saves, as the loop itself timed them.
    assert abs(final.stalled_seconds - save_seconds) <= 0.2 * save_seconds + 0.05, (final.stalled_seconds,
                                                                                    save_seconds)
    # It moved while the job ran, and at most once per TJ_PROGRESS_SECONDS (close() adds one last write).
    steps = [p.step for p in seen]
    assert len(set(steps)) >= 3 and steps == sorted(steps) and steps[0] < 60, steps
    walls = [p.wall_seconds for p in seen[:-1]]
    assert all(b - a >= 0.2 * 0.9 for a, b in zip(walls, walls[1:])), walls
    # Layout: in the job root's one recursive listing, with its ETag; not a snapshot; retention left it alone.
    live = contract.live_entries(snap.store._find(snap.store._root_path))
    assert live[contract.PROGRESS_OBJECT]["etag"] and live[contract.PROGRESS_OBJECT]["size"] > 0
    assert [i.step for i in snap.store.scan()] == [50, 60]


@pytest.mark.slow
def test_item2_s3_outage_for_the_progress_writer_does_not_stop_training(bucket, monkeypatch, caplog):
    """Its own S3 server: stopped mid-run, training goes on; restarted, the writer catches up."""
    monkeypatch.setenv(contract.ENV_PROGRESS_SECONDS, "0.2")
    monkeypatch.setenv(contract.ENV_CONTROL_POLL_SECONDS, "0.2")
    server = start_s3_server()
    try:
        port = int(server.endpoint.rsplit(":", 1)[1])
        fs = _fs(server.endpoint)
        fs.mkdir(bucket)
        root = f"s3://{bucket}/snapshots/default/outage"
        opts = {"endpoint_url": server.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}
        model, opt, app = _app()
        snap = make_snapshotter(backend="torchsnapshot", uri=root, app_state=app, storage_options=opts,
                                watch_preemption=False)
        caplog.set_level(logging.WARNING, logger="trainingjob_trainer.progress")
        with snap:
            for step in range(1, 6):
                train_steps(model, opt, start=step, stop=step + 1)
                snap.maybe_save(step)
            _wait_progress(fs, root, step=5)
            server.stop()
            longest = 0.0
            deadline = time.monotonic() + 30
            step = 5
            while step < 25 or not any("tj-live" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "no tj-live failure logged during the outage"
                step += 1
                train_steps(model, opt, start=step, stop=step + 1)
                time.sleep(STEP_SECONDS)
                t0 = time.monotonic()
                snap.maybe_save(step)
                longest = max(longest, time.monotonic() - t0)
            # No step waited for S3 (a blocked write would cost a connect retry loop, seconds).
            assert longest < 0.5, longest
            server = start_s3_server(port=port)
            fs = _fs(server.endpoint)
            try:
                fs.mkdir(bucket)
            except FileExistsError:
                pass  # SeaweedFS creates a missing bucket on PUT (AWS answers NoSuchBucket): the writer's retry won
            assert _wait_progress(fs, root, step=step).step == step
    finally:
        server.stop()
