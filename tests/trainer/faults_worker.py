"""One torchrun worker of tests/trainer/test_faults_rank0.py: snapshot I/O under proxy faults, 2 ranks.

Rank 0 switches the proxy's faults between phases (barriers keep the ranks
in step); each rank records what it saw in ``<out>/rank<R>.json``. The gloo
group timeout is short, so a rank left waiting in a collective fails the
run instead of hanging it.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from localcluster.s3proxy import S3Proxy
from trainingjob_trainer import _dist, contract
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.preemption import PreemptionWatcher
from trainingjob_trainer import snapshotter

# SystemExit before issue 8 (item 4), so that the run shows the old behaviour rather than an ImportError.
EmergencySnapshotFailed = getattr(snapshotter, "EmergencySnapshotFailed", SystemExit)

#: Few retries of botocore and s3fs, so an injected fault fails an operation in a second or two.
FAST_FAIL = {"config_kwargs": {"retries": {"total_max_attempts": 2, "mode": "standard"}}}
#: s3fs's own retry loop (5 tries, 1.9 s of sleeps per call on a 503) has no
#: storage option, only this class attribute: 2 tries keep one retry per call.
#: The policies under test (the snapshotter's tries and backoff) are unchanged.
S3FS_RETRIES = 2


class State:
    def __init__(self) -> None:
        self.w = torch.zeros(1024)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, sd):
        self.w.copy_(sd["w"])


class RankState(State):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.key = f"w_rank{rank}"

    def state_dict(self):
        return {self.key: self.w}

    def load_state_dict(self, sd):
        self.w.copy_(sd[self.key])


def sync_save_failing_on_rank1(backend: str, *, rank: int, faults, seen: dict) -> None:
    """Synchronous saves whose uploads fail on rank 1 only: rank 0 talks to the S3 server
    directly, rank 1 through the proxy. Every rank must return (periodic) or raise
    (emergency) within seconds, far below the 20 s group timeout."""
    endpoint = os.environ["TJ_TEST_UPSTREAM"] if rank == 0 else os.environ[contract.ENV_S3_ENDPOINT]
    # A key per rank, so that rank 1 writes data of its own on either backend (DCP writes a key
    # that every rank holds alike from rank 0 only).
    state = RankState(rank)
    snap = make_snapshotter(backend=backend, uri=os.environ[contract.ENV_SNAPSHOT_URI] + "-sync", app_state={"s": state},
                            storage_options={**FAST_FAIL, "endpoint_url": endpoint}, async_save=False,
                            watcher=PreemptionWatcher(install=False))
    faults(fail="503", methods=["PUT"])
    t0 = time.monotonic()
    seen["sync_one_rank"] = snap.save(step=7)
    seen["sync_one_rank_s"] = time.monotonic() - t0
    seen["sync_failed_saves"] = snap.failed_saves
    faults()
    seen["sync_after"] = snap.save(step=8)  # training goes on; the next save commits
    faults(fail="503", methods=["PUT"])
    if rank == 1:
        snap.watcher.trigger()
    t0 = time.monotonic()
    try:
        snap.maybe_save(9)
        seen["sync_emergency"] = "no exit"
    except EmergencySnapshotFailed as e:
        seen["sync_emergency"] = e.code
    seen["sync_emergency_s"] = time.monotonic() - t0
    faults()


def main() -> int:
    import s3fs

    s3fs.S3FileSystem.retries = S3FS_RETRIES
    backend, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    proxy = S3Proxy.__new__(S3Proxy)
    proxy.port = int(os.environ["TJ_TEST_PROXY_PORT"])
    seen: dict = {}

    def faults(**f):
        dist.barrier()
        if rank == 0:
            proxy.set_faults(**f)
        dist.barrier()

    state = State()
    snap = make_snapshotter(backend=backend, uri=os.environ[contract.ENV_SNAPSHOT_URI], app_state={"s": state},
                            keep_last=1, storage_options=FAST_FAIL, async_save=True,
                            watcher=PreemptionWatcher(install=False))
    snap.restore_backoff_s = 0.5
    state.w.fill_(1)
    assert snap.save(step=1) and snap.wait() is not None

    # A periodic save whose uploads fail: logged, counted, training goes on, step 1 stays the latest.
    faults(fail="503", methods=["PUT"])
    state.w.fill_(2)
    started = snap.save(step=2)
    seen["periodic_wait"] = snap.wait() is not None if started else "not started"
    seen["failed_saves"] = snap.failed_saves
    seen["latest_after_failure"] = snap.last_marker.step

    # Data written, then the commit (rank 0's marker PUT) fails: every rank learns it.
    faults()
    state.w.fill_(3)
    snap.save(step=3)
    while _dist.all_reduce_max([int(not snap._in_flight.handle.done())])[0]:
        time.sleep(0.05)
    faults(fail="503", methods=["PUT"])
    seen["commit_failure"] = snap.wait() is not None
    seen["failed_saves_2"] = snap.failed_saves

    # Pruning step 1 fails (its DELETEs get 503): the save is committed anyway; the next save prunes.
    faults(fail="503", methods=["DELETE"], path_contains="epoch_0_train_step_1/")
    snap.save(step=4)
    seen["committed_despite_prune"] = snap.wait().step
    faults()
    snap.save(step=5)
    snap.wait()

    # Restore through a 3 s window of connection resets: retried with backoff, then succeeds.
    state.w.fill_(0)
    faults(fail="reset", fail_for_s=3.0)
    t0 = time.monotonic()
    seen["restored_step"] = snap.restore_latest()
    seen["restored_value"] = float(state.w[0])
    seen["restore_seconds"] = time.monotonic() - t0

    # Restore against a store that stays down: a clear error on every rank.
    faults(fail="503")
    try:
        snap.restore_latest()
        seen["restore_down"] = "no error"
    except Exception as e:  # noqa: BLE001
        seen["restore_down"] = f"{type(e).__name__}: {e}"

    sync_save_failing_on_rank1(backend, rank=rank, faults=faults, seen=seen)

    # The emergency save fails: PreemptedWithoutSnapshot naming the error, on every rank.
    faults(fail="503", methods=["PUT"])
    if rank == 1:
        snap.watcher.trigger()
    try:
        snap.maybe_save(6)
        seen["emergency"] = "no exit"
    except EmergencySnapshotFailed as e:
        seen["emergency"] = e.code
    faults()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
