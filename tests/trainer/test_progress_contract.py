"""Issue 12, item 1: the progress / snapshot-request / ack objects' contract (pure, no S3)."""

from __future__ import annotations

import json

import pytest

from trainingjob_trainer import contract
from trainingjob_trainer.progress import StepRate, env_seconds, tnt_total_steps


def _progress(**kw) -> contract.Progress:
    base = dict(attempt=2, step=40, epoch=1, start_step=30, total_steps=100, wall_seconds=12.5,
                steps_per_second=3.25, window_seconds=10.0, stalled_seconds=1.5,
                first_step_at="2026-12-01T00:00:00.000Z", updated_at="2026-12-01T00:00:12.500Z")
    base.update(kw)
    return contract.Progress(**base)


def test_item1_progress_round_trips_with_camel_case_keys():
    p = _progress()
    d = json.loads(p.to_json())
    assert d == {"version": 1, "attempt": 2, "step": 40, "epoch": 1, "startStep": 30, "totalSteps": 100,
                 "wallSeconds": 12.5, "stepsPerSecond": 3.25, "windowSeconds": 10.0, "stalledSeconds": 1.5,
                 "firstStepAt": "2026-12-01T00:00:00.000Z", "updatedAt": "2026-12-01T00:00:12.500Z"}
    assert contract.Progress.from_json(p.to_json()) == p
    unknown = _progress(total_steps=None, steps_per_second=None)
    assert contract.Progress.from_json(unknown.to_json()) == unknown


@pytest.mark.parametrize("text", [None, b"", "not json", "[1]", '{"version": 99, "step": 1}',
                                  '{"version": 1, "step": "x", "attempt": 0, "wallSeconds": 1, "updatedAt": ""}',
                                  '{"version": 1, "attempt": 0}'])
def test_item1_malformed_progress_is_none(text):
    assert contract.Progress.from_json(text) is None


def test_item1_request_and_ack_round_trip_and_newness():
    req = contract.SnapshotRequest(value="v1", requested_at="2026-12-01T00:00:00Z")
    assert json.loads(req.to_json()) == {"value": "v1", "requestedAt": "2026-12-01T00:00:00Z"}
    assert contract.SnapshotRequest.from_json(req.to_json()) == req
    ack = contract.SnapshotAck(value="v1", step=7, completed_at="t", snapshot="s3://b/p/epoch_0_train_step_7",
                               attempt=1)
    assert json.loads(ack.to_json()) == {"value": "v1", "step": 7, "completedAt": "t",
                                         "snapshot": "s3://b/p/epoch_0_train_step_7", "attempt": 1}
    assert contract.SnapshotAck.from_json(ack.to_json()) == ack
    assert contract.request_is_new(req, None)
    assert not contract.request_is_new(req, ack)
    assert contract.request_is_new(contract.SnapshotRequest(value="v2", requested_at=""), ack)
    assert not contract.request_is_new(None, None)
    for bad in (None, "", "{", '{"value": ""}', '{"value": 3}', "[]"):
        assert contract.SnapshotRequest.from_json(bad) is None
    for bad in (None, "{", '{"value": "v"}', '{"value": "v", "step": "x", "completedAt": "", "snapshot": ""}'):
        assert contract.SnapshotAck.from_json(bad) is None


def test_item1_live_objects_share_the_job_roots_listing_and_are_not_snapshots():
    root = "s3://bucket/prefix/ns/job"
    for rel in (contract.PROGRESS_OBJECT, contract.SNAPSHOT_REQUEST_OBJECT, contract.SNAPSHOT_ACK_OBJECT):
        uri = contract.live_object_uri(root + "/", rel)
        assert uri.startswith(root + "/" + contract.LIVE_PREFIX + "/")
        assert contract.parse_snapshot_dir_name(rel.split("/")[0]) is None
        # Sorted before every snapshot folder: on the first page of the root's listing.
        assert rel < contract.snapshot_dir_name(0, 0)


def test_item1_live_entries_come_from_the_snapshot_listing():
    listing = {
        contract.PROGRESS_OBJECT: {"size": 300, "etag": "a"},
        contract.SNAPSHOT_ACK_OBJECT: {"size": 90, "etag": "b"},
        "epoch_0_train_step_5/" + contract.COMMIT_MARKER: {"size": 10, "etag": "c"},
        "_tj/other.json": {"size": 1, "etag": "d"},
    }
    assert contract.live_entries(listing) == {contract.PROGRESS_OBJECT: {"size": 300, "etag": "a"},
                                              contract.SNAPSHOT_ACK_OBJECT: {"size": 90, "etag": "b"}}
    assert contract.live_entries({}) == {}


def test_item2_step_rate_over_window():
    r = StepRate(window=10.0)
    assert r.rate() == (None, 0.0)
    for i in range(21):  # 2 steps/s for 10 s, then 4 steps/s for 10 s
        r.add(now=i * 0.5, step=i)
    for i in range(1, 41):
        r.add(now=10.0 + i * 0.25, step=20 + i)
    rate, window = r.rate()
    assert window == pytest.approx(10.0) and rate == pytest.approx(4.0)


def test_item2_tnt_total_steps():
    assert tnt_total_steps(max_steps=50, max_epochs=None, max_steps_per_epoch=None, dataloader=iter([])) == 50
    assert tnt_total_steps(max_steps=None, max_epochs=3, max_steps_per_epoch=None, dataloader=[0] * 10) == 30
    assert tnt_total_steps(max_steps=None, max_epochs=3, max_steps_per_epoch=4, dataloader=[0] * 10) == 12
    assert tnt_total_steps(max_steps=25, max_epochs=3, max_steps_per_epoch=None, dataloader=[0] * 10) == 25
    assert tnt_total_steps(max_steps=None, max_epochs=3, max_steps_per_epoch=None, dataloader=iter([])) is None


def test_item2_env_seconds(monkeypatch):
    monkeypatch.setenv(contract.ENV_PROGRESS_SECONDS, "0.5")
    assert env_seconds(contract.ENV_PROGRESS_SECONDS, 15.0) == 0.5
    for bad in ("", "x", "-1", "0"):
        monkeypatch.setenv(contract.ENV_PROGRESS_SECONDS, bad)
        assert env_seconds(contract.ENV_PROGRESS_SECONDS, 15.0) == 15.0
