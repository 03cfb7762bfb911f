"""Issue 8 items 4 and 6: S3 faults on rank 0's I/O never hang the other ranks; each failure has its policy.

Also item 4's last gap ("never hang"): a synchronous save whose uploads fail
on one rank only ends on every rank within seconds, with nothing committed.

Two torchrun workers (gloo, 20 s group timeout) save and restore through the
fault proxy (tests/trainer/faults_worker.py); the test reads what each rank saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from localcluster.s3proxy import S3Proxy
from tests.trainer.gang import REPO
from trainingjob_trainer import contract
from trainingjob_trainer.store import SnapshotStore


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dcp", "torchsnapshot"])
def test_item4_storage_errors_on_rank0_or_one_rank_reach_every_rank_with_their_policy(s3_server, s3_env, s3_root, tmp_path, backend):
    proxy = S3Proxy(upstream=s3_server.endpoint, log_path=str(tmp_path / "proxy.log")).start()
    term = tmp_path / "term"
    try:
        env = {**os.environ, **s3_env, contract.ENV_S3_ENDPOINT: proxy.endpoint, contract.ENV_SNAPSHOT_URI: s3_root,
               contract.ENV_TERMINATION_MESSAGE_PATH: str(term), "TJ_TEST_PROXY_PORT": str(proxy.port),
               "TJ_TEST_UPSTREAM": s3_server.endpoint,
               "OMP_NUM_THREADS": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("PET_")}
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(REPO / "tests/trainer/faults_worker.py"), backend, str(tmp_path)],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-30000:]
    seen = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    for s in seen:
        assert s["periodic_wait"] is False and s["failed_saves"] == 1 and s["latest_after_failure"] == 1, s
        assert s["commit_failure"] is False and s["failed_saves_2"] == 2, s
        assert s["committed_despite_prune"] == 4, s
        assert (s["restored_step"], s["restored_value"]) == (5, 3.0), s
        assert s["restore_down"].startswith("RestoreFailed: finding the snapshot to restore under s3://"), s
        assert "failed after 4 tries" in s["restore_down"] and "reduce your request rate" in s["restore_down"], s
        assert s["emergency"] == 128 + 15, s
        # A synchronous save failing on rank 1 only: every rank is told in seconds (the group timeout is 20 s).
        assert s["sync_one_rank"] is None and s["sync_failed_saves"] == 1 and s["sync_one_rank_s"] < 12, s
        assert s["sync_after"] is not None, s
        assert s["sync_emergency"] == 128 + 15 and s["sync_emergency_s"] < 12, s
    msg = contract.parse_termination_message(term.read_text())
    assert msg.reason == contract.TERM_REASON_PREEMPTED_NO_SNAPSHOT and msg.step == 6, msg
    assert msg.message.startswith("emergency snapshot s3://") and "reduce your request rate" in msg.message, msg
    # The failed prune of step 4's save was retried after step 5's: only the newest is left.
    assert [i.step for i in SnapshotStore(s3_root).scan() if i.complete] == [5]
    # Neither failed synchronous save (steps 7 and 9) left a complete snapshot.
    assert [i.step for i in SnapshotStore(s3_root + "-sync").scan() if i.complete] == [8]
