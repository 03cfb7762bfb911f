"""Two torchrun agents x two workers on loopback (CPU/gloo): preempt, resume, compare.

SIGTERM to ONE node's launcher -> all four ranks take the emergency snapshot
at the same step and both nodes exit with the contract's code; the next
attempt resumes from it; the final weights equal an uninterrupted run's bit
for bit. The example trains with AdamW, so a resumed run whose ``exp_avg``
came back wrong (issue 8, item 14: ``FSDP.optim_state_dict`` aliased it to
``exp_avg_sq`` with ``use_orig_params=True`` and a FULL state dict) differs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from tests.trainer.gang import REPO, dump, start_gang, wait_all, wait_for_text
from tests.trainer.trainer_helpers import assert_states_equal
from trainingjob_trainer import contract
from trainingjob_trainer.store import SnapshotStore

STEPS = 20


def _wrap_args(wrap: str) -> list[str]:
    """``fsdp-full``: FSDP with FULL state dicts; else ``--wrap`` as is."""
    return ["--wrap", "fsdp", "--fsdp-state-dict", "full"] if wrap == "fsdp-full" else ["--wrap", wrap]


def _reference(workdir, *, wrap: str) -> dict:
    """The uninterrupted run: one torchrun with all 4 workers, no snapshots at all."""
    out = workdir / f"ref-{wrap}.pt"
    env = {k: v for k, v in os.environ.items() if k != contract.ENV_SNAPSHOT_URI}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
         "-m", "trainingjob_trainer.example", "--steps", str(STEPS), *_wrap_args(wrap), "--final-weights", str(out)],
        env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(wrap)``: the uninterrupted run's final weights, computed once per kind of training.

    The weights depend on DDP vs FSDP only: the backend and async saving must
    not change them (that is what the test proves), and FSDP's state-dict type
    only changes how the state is saved (its FULL and SHARDED uninterrupted
    runs were measured bit-equal). So the DDP rows share one, the FSDP rows
    another; a resume that restored a wrong ``exp_avg`` still differs from it.
    """
    workdir = tmp_path_factory.mktemp("reference")
    cache: dict[str, dict] = {}

    def get(wrap: str) -> dict:
        training = "fsdp" if wrap.startswith("fsdp") else wrap
        if training not in cache:
            cache[training] = _reference(workdir, wrap=training)
        return cache[training]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(("wrap", "backend", "async_save"), [
    ("ddp", "torchsnapshot", False),
    # Periodic saves in the background while DDP/FSDP run their own
    # collectives: DCP's upload thread plans and commits on a group of its own.
    ("fsdp", "dcp", True),
    ("ddp", "dcp", True),
    # FULL state dicts, where FSDP.optim_state_dict got exp_avg wrong (item 14).
    ("fsdp-full", "torchsnapshot", False),
])
def test_sigterm_to_one_node_saves_all_ranks_and_resume_is_bit_exact(s3_env, s3_root, tmp_path, reference, wrap,
                                                                     backend, async_save):
    env = {**s3_env, contract.ENV_SNAPSHOT_URI: s3_root, contract.ENV_SNAPSHOT_BACKEND: backend,
           contract.ENV_SNAPSHOT_EVERY_STEPS: "4", contract.ENV_SNAPSHOT_KEEP_LAST: "2"}
    common = ["--steps", str(STEPS), *_wrap_args(wrap), *(["--async-save"] if async_save else [])]

    # Attempt 0, preempted: SIGTERM reaches only node 1's launcher (PID 1 of its pod).
    gang = start_gang(nodes=2, procs=2, env={**env, contract.ENV_ATTEMPT: "0"},
                      args=[*common, "--sleep-per-step", "0.1"], workdir=tmp_path, tag="a0")
    try:
        wait_for_text(gang, "step 6/", timeout=60)
        os.kill(gang[1].proc.pid, signal.SIGTERM)
        codes = wait_all(gang, timeout=60)
    finally:
        for n in gang:
            n.kill()
    assert codes == [contract.EXIT_PREEMPTED_AFTER_SNAPSHOT] * 2, dump(gang)
    # The URI is matched up to its folder name: print() writes the line and its
    # newline separately, so another rank's output can follow it on the same line.
    saved = re.findall(r"rank (\d+): preempted, emergency snapshot at step (\d+): (\S+?/epoch_\d+_train_step_\d+)",
                       "".join(n.output() for n in gang))
    assert sorted(int(r) for r, _, _ in saved) == [0, 1, 2, 3], dump(gang)
    assert len({(s, u) for _, s, u in saved}) == 1, saved  # all four ranks: the same step and snapshot
    step, uri = int(saved[0][1]), saved[0][2]
    assert 6 <= step < STEPS
    for n in gang:
        msg = n.message()
        assert msg is not None and msg.reason == contract.TERM_REASON_PREEMPTED, n.term.read_text()
        assert (msg.step, msg.snapshot) == (step, uri)
    info = SnapshotStore(s3_root).inspect(uri)
    assert info.complete and info.marker.emergency and info.marker.step == step and info.marker.backend == backend
    # The periodic snapshots before it (every 4 steps, the last 2 kept) were committed too.
    periodic = [i.step for i in SnapshotStore(s3_root).scan() if i.complete and not i.marker.emergency]
    assert periodic and all(s % 4 == 0 and s <= step for s in periodic), periodic

    # Attempt 1 resumes from the emergency snapshot and finishes.
    final = tmp_path / "final.pt"
    gang = start_gang(nodes=2, procs=2, env={**env, contract.ENV_ATTEMPT: "1"},
                      args=[*common, "--final-weights", str(final)], workdir=tmp_path, tag="a1")
    codes = wait_all(gang, timeout=90)
    assert codes == [0, 0], dump(gang)
    assert f"resumed_from={uri} start_step={step}" in "".join(n.output() for n in gang), dump(gang)
    assert all(n.message().reason == contract.TERM_REASON_COMPLETED for n in gang)

    assert_states_equal(torch.load(final), reference(wrap))
