"""Storage-level fencing (issue 11 item 4) and saves beside another run's folder (issue 8 item 3).

The operator writes the fence (``_tj/fence.json``) before it creates a gang;
a gang of an older attempt never commits, prunes or empties a folder after
it, and a marker it writes anyway (its commit raced the fence) is never
restored, by the trainer nor in the operator's status.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.trainer_helpers import tiny_model, train_steps
from trainingjob_trainer import contract
from trainingjob_trainer.backends import make_snapshotter
from trainingjob_trainer.state import ModelOptimizerState
from trainingjob_trainer.store import SnapshotStore

UID = "0b6c9a54-job-uid"


def _gang(root: str, *, attempt: int, backend: str = "dcp", lr: float = 1e-2, **kwargs):
    model = tiny_model(attempt)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    snap = make_snapshotter(backend=backend, uri=root, attempt=attempt, watch_preemption=False,
                            app_state={"train": ModelOptimizerState(model=model, optimizers=[opt])}, **kwargs)
    return model, opt, snap


def _complete(root: str) -> dict[str, str]:
    """Restorable snapshots as the operator sees them: folder name -> save id."""
    return {i.name: i.marker.save_id for i in SnapshotStore(root).scan() if i.complete}


@pytest.mark.parametrize("backend", ["torchsnapshot", "dcp"])
def test_issue11_item4_fenced_gang_never_commits_or_prunes(s3_root, backend, monkeypatch):
    monkeypatch.setenv(contract.ENV_JOB_UID, UID)
    m0, o0, old = _gang(s3_root, attempt=0, backend=backend, keep_last=1)
    train_steps(m0, o0, start=1, stop=11)
    old.save(step=10)
    # The node of attempt 0 is partitioned; the operator fences it and starts attempt 1.
    fence = SnapshotStore(s3_root).write_fence(attempt=1, job_uid=UID)
    assert fence.admitted == _complete(s3_root) and len(fence.admitted) == 1
    m1, o1, new = _gang(s3_root, attempt=1, backend=backend, keep_last=1)
    assert new.restore_latest() == 10
    train_steps(m1, o1, start=11, stop=21)
    new.save(step=20)
    mine = _complete(s3_root)  # attempt 1 keeps the one it restored from and its own
    assert sorted(mine) == [contract.snapshot_dir_name(0, 10), contract.snapshot_dir_name(0, 20)]

    # The old gang runs on and saves: refused (its prune would delete attempt 1's only snapshot).
    train_steps(m0, o0, start=11, stop=31)
    assert old.save(step=30) is None and old.failed_saves == 1
    assert _complete(s3_root) == mine
    assert SnapshotStore(s3_root).inspect(f"{s3_root}/{contract.snapshot_dir_name(0, 30)}") is None or \
        not SnapshotStore(s3_root).inspect(f"{s3_root}/{contract.snapshot_dir_name(0, 30)}").complete
    # Its pruning and folder clearing are refused too.
    with pytest.raises(RuntimeError, match="fenced: not pruning"):
        old.store.prune(keep_last=1)
    with pytest.raises(RuntimeError, match="fenced: not emptying"):
        old.store.begin(epoch=0, step=20)
    assert _complete(s3_root) == mine
    # A gang of another TrainingJob of the same name (re-created) is refused as well.
    monkeypatch.setenv(contract.ENV_JOB_UID, "another-uid")
    m2, o2, other = _gang(s3_root, attempt=5, backend=backend, keep_last=1)
    train_steps(m2, o2, start=1, stop=41)
    assert other.save(step=40) is None
    assert _complete(s3_root) == mine


def test_issue11_item4_commit_racing_the_fence_is_never_restored(s3_root, monkeypatch):
    """The hard case: the old gang read the fence before the operator wrote the
    new one, and its marker lands after. No listing made before the fence holds
    it, so the fence does not admit it: neither the trainer nor the operator
    ever restores it, and the new attempt's own prune clears it."""
    from trainingjob_operator.snapshots import S3Access, read_snapshot_state

    monkeypatch.setenv(contract.ENV_JOB_UID, UID)
    m0, o0, old = _gang(s3_root, attempt=0, keep_last=3)
    train_steps(m0, o0, start=1, stop=11)
    old.save(step=10)
    at10 = _complete(s3_root)
    # The old gang's check of the fence passes (it ran before the fence was written) ...
    monkeypatch.setattr(old.store, "check_fence", lambda what: None)
    SnapshotStore(s3_root).write_fence(attempt=1, job_uid=UID)
    # ... and its save at step 30 commits after the fence.
    train_steps(m0, o0, start=11, stop=31)
    late = old.save(step=30)
    assert late is not None and old.store.inspect(late).marker.attempt == 0
    info = SnapshotStore(s3_root).inspect(late)
    assert info.fenced and not info.complete
    assert _complete(s3_root) == at10
    latest = SnapshotStore(s3_root).latest_complete()
    assert latest is not None and latest.step == 10
    # The operator's status agrees (it reads through the same store).
    state = read_snapshot_state(s3_root, S3Access(endpoint=None, region=None))
    assert state.latest["step"] == 10 and state.count == 1
    # The new attempt restores 10, and its save and prune leave the late folder out.
    m1, o1, new = _gang(s3_root, attempt=1, keep_last=3)
    assert new.restore_latest() == 10
    train_steps(m1, o1, start=11, stop=21)
    new.save(step=20)
    names = [i.name for i in SnapshotStore(s3_root).scan()]
    assert late.rsplit("/", 1)[-1] not in names  # pruned as a leftover by attempt 1
    assert [n for n in _complete(s3_root)] == [contract.snapshot_dir_name(0, 10), contract.snapshot_dir_name(0, 20)]
    # The fence of attempt 1 is written once: a second write (operator restart) keeps it.
    again = SnapshotStore(s3_root).write_fence(attempt=1, job_uid=UID)
    assert again.admitted == at10


def test_issue8_item3_save_never_overwrites_another_runs_complete_folder(s3_root):
    """A job re-created with resumeFrom=step 10 of the first run reaches step 20,
    where the first run has a complete snapshot: its save goes beside it."""
    m0, o0, first = _gang(s3_root, attempt=0, keep_last=5)
    train_steps(m0, o0, start=1, stop=21)
    first.save(step=10)
    first.save(step=20)
    before = _complete(s3_root)
    listing20 = SnapshotStore(s3_root).inspect(f"{s3_root}/{contract.snapshot_dir_name(0, 20)}").listing

    m1, o1, second = _gang(s3_root, attempt=0, lr=5e-3, keep_last=5,
                           resume_from=f"{s3_root}/{contract.snapshot_dir_name(0, 10)}")
    assert second.restore_latest() == 10
    train_steps(m1, o1, start=11, stop=21)
    uri = second.save(step=20)
    assert uri is not None and uri.rsplit("/", 1)[-1].startswith(contract.snapshot_dir_name(0, 20) + "_a0-")
    now = _complete(s3_root)
    # The first run's step-20 snapshot is untouched, and the second's is complete beside it.
    assert {k: now[k] for k in before} == before
    assert SnapshotStore(s3_root).inspect(f"{s3_root}/{contract.snapshot_dir_name(0, 20)}").listing == listing20
    assert now[uri.rsplit("/", 1)[-1]] == second.last_marker.save_id
    # Two snapshots of step 20: the later save is the latest.
    assert SnapshotStore(s3_root).latest_complete().uri == uri


def test_issue11_item4_operator_writes_the_fence_once_per_attempt_and_reports_failures(s3_root, s3_env):
    import asyncio

    from trainingjob_operator.snapshots import FenceWriter, S3Access

    access = S3Access(endpoint=s3_env["AWS_ENDPOINT_URL"], region=None, key=s3_env["AWS_ACCESS_KEY_ID"],
                      secret=s3_env["AWS_SECRET_ACCESS_KEY"])
    writer, key = FenceWriter(), ("default", "job")
    assert asyncio.run(writer.ensure(key, job_uid=UID, attempt=2)) is None  # no target yet: nothing to fence
    writer.targets[key] = (s3_root, access)
    assert asyncio.run(writer.ensure(key, job_uid=UID, attempt=2)) is None
    fence = SnapshotStore(s3_root).read_fence()
    assert fence is not None and (fence.attempt, fence.job_uid) == (2, UID)
    # A lower attempt never moves the fence back.
    assert asyncio.run(writer.ensure(key, job_uid=UID, attempt=1)) is None
    assert SnapshotStore(s3_root).read_fence() == fence
    # S3 refusing the operator is reported (the handler then holds back attempt > 0's pods).
    writer.targets[key] = (s3_root, S3Access(endpoint="http://127.0.0.1:9", region=None))
    problem = asyncio.run(writer.ensure(key, job_uid=UID, attempt=3))
    assert problem is not None and contract.FENCE_OBJECT in problem
