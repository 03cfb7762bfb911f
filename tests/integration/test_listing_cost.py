"""Issue 10: what one operator listing of a job costs in S3 requests, counted by the proxy
in front of a real S3 server (SeaweedFS).

A job with three complete snapshots used to cost 9 requests per listing: the
LIST, a HEAD and a GET of the fence, a HEAD and a GET of each marker (s3fs's
``cat_file`` asks for the size first). Small objects are now read with one GET,
and a marker already read under the ETag the listing shows is not read again:
a steady listing is the LIST and the fence GET.
"""

from __future__ import annotations

import uuid

import pytest

from localcluster.s3proxy import S3Proxy
from tests.trainer.trainer_s3server import ACCESS_KEY, REGION, SECRET_KEY
from trainingjob_operator.snapshots import S3Access, read_snapshot_state
from trainingjob_trainer import contract, s3
from trainingjob_trainer.store import MarkerCache, SnapshotStore

pytestmark = pytest.mark.timeout(120)


def _requests(proxy: S3Proxy) -> dict[str, int]:
    return dict(proxy.stats()["by_method"])


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def test_a_steady_listing_is_one_list_and_the_fence_and_a_changed_marker_is_read_again(proxied_s3):
    server, proxy = proxied_s3
    bucket = f"tj-{uuid.uuid4().hex[:10]}"
    opts = {"endpoint_url": server.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}
    root = contract.job_snapshot_root(f"s3://{bucket}/runs", "ml", "job")
    writer = SnapshotStore(root, storage_options=opts)
    writer.fs.mkdir(bucket)
    for k in (1, 2, 3):
        uri = writer.begin(epoch=0, step=10 * k)
        fs, path = s3.filesystem(uri, opts)
        fs.pipe_file(f"{path}/__0_0.distcp", b"x" * 64)
        writer.commit(epoch=0, step=10 * k, save_id=f"a0-test-{k}", attempt=0, backend="dcp", seconds=1.0)
    writer.write_fence(attempt=0, job_uid="uid-1")
    access = S3Access(endpoint=proxy.endpoint, region=REGION, key=ACCESS_KEY, secret=SECRET_KEY)
    cache = MarkerCache()

    r0 = _requests(proxy)
    first = read_snapshot_state(root, access, marker_cache=cache)
    r1 = _requests(proxy)
    assert first.error is None and first.count == 3 and first.latest["step"] == 30
    # No HEADs; the LIST, the fence and one GET per marker.
    assert _delta(r0, r1) == {"GET": 5}, _delta(r0, r1)

    again = read_snapshot_state(root, access, marker_cache=cache)
    r2 = _requests(proxy)
    assert again.count == 3 and again.latest == first.latest
    assert _delta(r1, r2) == {"GET": 2}, _delta(r1, r2)  # the LIST and the fence: every marker is cached

    # A marker rewritten (another ETag) is read again, and what it now says is reported.
    writer.commit(epoch=0, step=30, save_id="a0-test-3", attempt=0, backend="dcp", seconds=7.0)
    changed = read_snapshot_state(root, access, marker_cache=cache)
    r3 = _requests(proxy)
    assert changed.latest["seconds"] == 7.0 and first.latest["seconds"] == 1.0
    assert _delta(r2, r3) == {"GET": 3}, _delta(r2, r3)


def test_the_marker_cache_is_bounded_and_keyed_by_etag():
    cache = MarkerCache(max_entries=2)
    cache.put("a", "e1", b"A")
    cache.put("b", "e1", b"B")
    assert cache.get("a", "e1") == b"A" and cache.get("a", "e2") is None and cache.get("a", "") is None
    cache.put("c", "e1", b"C")  # "b" was used least recently
    assert len(cache) == 2 and cache.get("b", "e1") is None and cache.get("a", "e1") == b"A"
    cache.put("d", "", b"D")  # no ETag (a local folder): never cached
    assert cache.get("d", "") is None and len(cache) == 2
