"""Issue 8 item 1: an emergency snapshot longer than torchrun's default 30 s is not killed.

The launcher runs the example job (1 node x 2 workers, DDP) against the real
test S3 server through the fault proxy, whose bandwidth cap makes the
emergency save take about a minute inside a 150 s grace period. Without the
launcher's shutdown timeout, torchrun SIGKILLs the workers 30 s after SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from localcluster.s3proxy import S3Proxy
from tests.trainer.gang import dump, start_gang, wait_all, wait_for_text
from trainingjob_trainer import contract, launch
from trainingjob_trainer.store import SnapshotStore

GRACE_S = 150
HIDDEN = 512  # the example's state: ~3.3 MB (weights + AdamW moments), written once by DCP
SAVE_TARGET_S = 60


def _state_bytes(hidden: int) -> int:
    params = 16 * hidden + hidden + hidden * hidden + hidden + 4 * hidden + 4
    return 3 * 4 * params  # fp32 weights, exp_avg, exp_avg_sq


def test_item1_shutdown_timeout_follows_the_grace_period():
    assert launch.shutdown_timeout(150) == 150 - launch.EXIT_MARGIN_SECONDS
    assert launch.shutdown_timeout(12) == 6  # short grace: half of it
    assert launch.shutdown_timeout(None) is None
    env = launch.torchrun_env(["-m", "x"], {contract.ENV_GRACE_PERIOD_SECONDS: "150"})
    assert env[launch.TORCHRUN_SHUTDOWN_ENV] == str(150 - launch.EXIT_MARGIN_SECONDS)
    # A timeout the user set wins.
    assert launch.TORCHRUN_SHUTDOWN_ENV not in launch.torchrun_env(
        ["--shutdown-timeout=5", "-m", "x"], {contract.ENV_GRACE_PERIOD_SECONDS: "150"})
    assert launch.torchrun_env([], {contract.ENV_GRACE_PERIOD_SECONDS: "150", "PET_SHUTDOWN_TIMEOUT": "7"}) \
        .get(launch.TORCHRUN_SHUTDOWN_ENV) is None


@pytest.mark.slow
def test_item1_emergency_save_of_a_minute_commits_within_a_150s_grace(s3_server, s3_env, s3_root, tmp_path):
    proxy = S3Proxy(upstream=s3_server.endpoint, log_path=str(tmp_path / "proxy.log")).start()
    try:
        proxy.set_faults(bandwidth_bps=_state_bytes(HIDDEN) / SAVE_TARGET_S)
        env = {**s3_env, contract.ENV_S3_ENDPOINT: proxy.endpoint, contract.ENV_SNAPSHOT_URI: s3_root,
               contract.ENV_SNAPSHOT_BACKEND: "dcp", contract.ENV_ATTEMPT: "0",
               contract.ENV_GRACE_PERIOD_SECONDS: str(GRACE_S)}
        gang = start_gang(nodes=1, procs=2, env=env, workdir=tmp_path, tag="grace",
                          args=["--steps", "100000", "--hidden", str(HIDDEN), "--sleep-per-step", "0.05"])
        try:
            wait_for_text(gang, "step 5/", timeout=90)
            os.kill(gang[0].proc.pid, signal.SIGTERM)  # what the kubelet does at the start of the grace period
            codes = wait_all(gang, timeout=GRACE_S)
        finally:
            for n in gang:
                n.kill()
    finally:
        proxy.stop()
    out = gang[0].output()
    assert codes == [contract.EXIT_PREEMPTED_AFTER_SNAPSHOT], dump(gang)
    msg = gang[0].message()
    assert msg is not None and msg.reason == contract.TERM_REASON_PREEMPTED, gang[0].term.read_text()
    assert msg.save_seconds is not None and 40 <= msg.save_seconds <= 90, msg  # longer than torchrun's 30 s default
    info = SnapshotStore(s3_root).inspect(msg.snapshot)  # straight to the server, not through the proxy
    assert info is not None and info.complete and info.marker.emergency, info
    assert info.marker.total_bytes >= _state_bytes(HIDDEN)
    last_step = max(int(s) for s in re.findall(r"\[example\] step (\d+)/", out))
    assert info.marker.step == msg.step == last_step  # lost work: 0 steps
