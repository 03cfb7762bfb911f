"""Issue 11 item 5: how a restore reads S3 (the restore ratio in bench/snapshot.py).

* torchsnapshot's plugin GETs run on s3fs's own loop, as its uploads do, so a
  restore has as many GETs in flight as torchsnapshot asks for; through the
  default executor it had one per executor thread (6 on 2 CPUs).
* DCP's parallel reader loads a tensor item from the fetched bytes in place
  (one copy, into the target), not through ``torch.load`` of a stream.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib

import pytest
import torch
from torchsnapshot.io_types import ReadIO

from localcluster.s3proxy import S3Proxy
from tests.trainer.trainer_helpers import TensorsState
from trainingjob_trainer import contract, s3, ts_plugin
from trainingjob_trainer.backends import make_snapshotter


@pytest.fixture
def slow_proxy(s3_server, s3_env, monkeypatch):
    """The counting proxy in front of the test server, 0.3 s added to each request; clients go through it."""
    proxy = S3Proxy(upstream=s3_server.endpoint).start()
    monkeypatch.setenv(contract.ENV_S3_ENDPOINT, proxy.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()


def test_torchsnapshot_plugin_reads_are_not_held_to_the_default_executors_threads(bucket, s3_server, slow_proxy):
    objects = {f"0/t{i}": hashlib.sha256(str(i).encode()).digest() * 1024 for i in range(10)}
    direct, _ = s3.filesystem(f"s3://{bucket}", {"endpoint_url": s3_server.endpoint})  # not through the proxy
    direct.pipe({f"{bucket}/ts/{k}": v for k, v in objects.items()})
    plugin = ts_plugin.S3FSStoragePlugin(f"{bucket}/ts")
    slow_proxy.set_faults(latency_s=0.3)
    assert slow_proxy.stats()["peak_in_flight"] <= 1

    async def read_all() -> list[ReadIO]:
        # Two executor threads: GETs that each held one could not be more than 2 at once.
        asyncio.get_running_loop().set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        reads = [ReadIO(path=k) for k in objects] + [ReadIO(path="0/t3", byte_range=(100, 300))]
        await asyncio.gather(*(plugin.read(r) for r in reads))
        return reads

    reads = asyncio.run(read_all())
    assert {r.path: r.buf.getvalue() for r in reads[:-1]} == objects
    assert reads[-1].buf.getvalue() == objects["0/t3"][100:300]
    peak = slow_proxy.stats()["peak_in_flight"]
    # botocore's pool holds 10 connections: all 11 reads could not be in flight at once.
    assert peak >= 8, f"at most {peak} GETs in flight"


def test_dcp_restore_loads_tensor_items_in_place_not_through_torch_load(s3_root, monkeypatch):
    g = torch.Generator().manual_seed(3)
    src = {"t": TensorsState({f"w{i}": torch.randn(50_000 + i, generator=g) for i in range(6)}),
           "extra": {"note": "not a tensor", "n": 7}}
    make_snapshotter(backend="dcp", uri=s3_root, app_state=src, watch_preemption=False).save(step=1)
    target = {"t": TensorsState({k: torch.zeros_like(v) for k, v in src["t"].tensors.items()}),
              "extra": {"note": "", "n": 0}}
    pointers = {k: v.data_ptr() for k, v in target["t"].tensors.items()}
    loaded: list[str] = []
    stock_load = torch.load

    def counting_load(*args, **kwargs):
        out = stock_load(*args, **kwargs)
        loaded.append(type(out).__name__)
        return out

    monkeypatch.setattr(torch, "load", counting_load)
    snap = make_snapshotter(backend="dcp", uri=s3_root, app_state=target, watch_preemption=False)
    assert s3.is_s3(s3_root) and snap.restore_latest() == 1
    for k, v in src["t"].tensors.items():
        assert torch.equal(target["t"].tensors[k], v)
        assert target["t"].tensors[k].data_ptr() == pointers[k]  # loaded into the tensor that was there
    assert target["extra"] == src["extra"]  # a BYTE_IO item: the stock path
    assert "Tensor" not in loaded, f"torch.load returned tensors: {loaded}"


def test_restore_latest_lists_the_job_once_and_restores_by_the_marker_it_found(s3_root, monkeypatch):
    """Finding the snapshot and restoring it cost one fence read and one listing: the folder
    is not inspected again between the two (it was twice, 6 more requests before the data)."""
    from trainingjob_trainer.store import SnapshotStore

    src = {"t": TensorsState({"w": torch.arange(1000.0)})}
    snap = make_snapshotter(backend="dcp", uri=s3_root, app_state=src, watch_preemption=False)
    snap.save(step=1)
    snap.save(step=2)
    calls: list[str] = []
    for name in ("_find", "read_fence"):
        stock = getattr(SnapshotStore, name)
        monkeypatch.setattr(SnapshotStore, name,
                            lambda self, *a, _stock=stock, _name=name, **k: calls.append(_name) or _stock(self, *a, **k))
    target = {"t": TensorsState({"w": torch.zeros(1000)})}
    assert make_snapshotter(backend="dcp", uri=s3_root, app_state=target,
                            watch_preemption=False).restore_latest() == 2
    assert torch.equal(target["t"].tensors["w"], src["t"].tensors["w"])
    assert sorted(calls) == ["_find", "read_fence"], calls


def test_dcp_reader_fetches_an_object_with_its_framing_as_one_get():
    """A 16 MiB object plus torch.save framing is one GET, not a 16 MiB one and a KiB
    one joined after; a large span is cut into equal GETs of about the chunk size."""
    from trainingjob_trainer.backends.dcp_read import _chunks

    mib = 1 << 20
    assert _chunks(0, 16 * mib + 3000, 16 * mib) == [(0, 16 * mib + 3000)]
    parts = _chunks(100, 100 + 40 * mib, 16 * mib)
    assert [b - a for a, b in parts] == [20 * mib, 20 * mib] and parts[0][0] == 100 and parts[-1][1] == 100 + 40 * mib
    assert _chunks(7, 7, 16 * mib) == [(7, 7)]


def test_torchsnapshot_plugin_lookup_scans_entry_points_once(s3_root):
    """torchsnapshot scanned every installed distribution's entry points for the
    ``tjs3`` plugin at each Snapshot it opened (about 11 ms, twice per restore)."""
    from torchsnapshot import storage_plugin

    state = {"t": TensorsState({"w": torch.arange(10.0)})}
    make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state=state, watch_preemption=False).save(step=1)
    assert make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state=state,
                            watch_preemption=False).restore_latest() == 1
    first = storage_plugin.entry_points(group="storage_plugins")
    assert storage_plugin.entry_points(group="storage_plugins") is first
    assert "tjs3" in {ep.name for ep in first}
