"""Issue 12, item 1: the operator reads ``_tj/progress.json`` in the snapshot listing's pass,
against a real S3 server (moto) behind the counting proxy: one GET only when its ETag changed."""

from __future__ import annotations

import uuid

import pytest

from localcluster.s3proxy import S3Proxy
from tests.trainer.trainer_s3server import ACCESS_KEY, REGION, SECRET_KEY
from trainingjob_operator.snapshots import S3Access, read_snapshot_state
from trainingjob_trainer import contract


def _progress(step: int) -> str:
    return contract.Progress(attempt=0, step=step, epoch=0, start_step=0, total_steps=100, wall_seconds=float(step),
                             steps_per_second=1.0, window_seconds=float(step), stalled_seconds=0.0,
                             first_step_at="2026-11-28T12:00:00.000Z",
                             updated_at=f"2026-11-28T12:00:{step:02d}.000Z").to_json()


def _job_root(server, proxy: S3Proxy):
    """A fresh job root holding a progress object (step 10) and, as in every real job, a snapshot
    folder (listed after ``_tj/``); returns ``(fs, root, access through the proxy)``."""
    import s3fs

    bucket = f"tj-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, key=ACCESS_KEY, secret=SECRET_KEY, use_listings_cache=False)
    fs.mkdir(bucket)
    root = contract.job_snapshot_root(f"s3://{bucket}/runs", "ml", "job")
    fs.pipe_file(contract.live_object_uri(root, contract.PROGRESS_OBJECT), _progress(10).encode())
    fs.pipe_file(f"{root}/{contract.snapshot_dir_name(0, 10)}/__0_0.distcp", b"x")
    return fs, root, S3Access(endpoint=proxy.endpoint, region=REGION, key=ACCESS_KEY, secret=SECRET_KEY)


def _gets(proxy: S3Proxy) -> int:
    return int(proxy.stats()["by_method"].get("GET", 0))


def test_issue12_item1_progress_is_read_in_the_listing_pass_and_only_when_its_etag_changed(proxied_s3):
    fs, root, access = _job_root(*proxied_s3)
    progress_path = contract.live_object_uri(root, contract.PROGRESS_OBJECT)
    proxy = proxied_s3[1]

    g0 = _gets(proxy)
    first = read_snapshot_state(root, access)
    g1 = _gets(proxy)
    assert first.error is None and first.progress is not None and first.progress.step == 10
    again = read_snapshot_state(root, access, (first.progress_etag, first.progress))
    g2 = _gets(proxy)
    assert again.progress == first.progress
    # The same listing both times; the second pass makes no GET of the unchanged object.
    assert (g1 - g0) - (g2 - g1) == 1, ((g1 - g0), (g2 - g1))

    fs.pipe_file(progress_path, _progress(20).encode())
    moved = read_snapshot_state(root, access, (again.progress_etag, again.progress))
    g3 = _gets(proxy)
    assert moved.progress is not None and moved.progress.step == 20 and moved.progress_etag != first.progress_etag
    assert g3 - g2 == g1 - g0

    fs.pipe_file(progress_path, b"x" * 70_000)  # not a progress object, and too big to fetch
    big = read_snapshot_state(root, access, (moved.progress_etag, moved.progress))
    assert big.progress is None and _gets(proxy) - g3 == g2 - g1


def test_issue12_item1_a_failing_progress_get_never_fails_the_snapshot_listing(proxied_s3):
    _, root, access = _job_root(*proxied_s3)
    proxy = proxied_s3[1]
    earlier = contract.Progress.from_json(_progress(5))
    proxy.set_faults(fail="reset", methods=["GET"], path_contains="progress.json")
    try:
        st = read_snapshot_state(root, access, ("an-older-etag", earlier))
    finally:
        proxy.set_faults()
    assert st.error is None and st.progress == earlier and st.progress_etag == "an-older-etag"
    again = read_snapshot_state(root, access, (st.progress_etag, st.progress))
    assert again.progress is not None and again.progress.step == 10
