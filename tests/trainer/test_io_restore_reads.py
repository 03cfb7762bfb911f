"""Issue 11 item 5: how a restore reads S3 (the restore ratio in bench/snapshot.py).

* torchsnapshot's plugin GETs run on s3fs's own loop, as its uploads do, so a
  restore has as many GETs in flight as torchsnapshot asks for; through the
  default executor it had one per executor thread (6 on 2 CPUs).
* DCP's parallel reader streams each GET body into the target tensors'
  memory (one copy, from the socket's chunks; backends/stream_read.py), checks
  each routing with torch's own zip reader, and loads what it cannot route in
  place from a buffer, not through ``torch.load`` of a stream.
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


def _mixed_state(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors whose items are larger and smaller than the routed head, of several dtypes."""
    return {"big": torch.randn(300_000, generator=g), "half": torch.randn(70_000, generator=g).to(torch.bfloat16),
            "ints": torch.randint(0, 1 << 40, (17,), generator=g), "scalar": torch.tensor(3.25),
            "mask": torch.rand(5000, generator=g) > 0.5, "grid": torch.randn(300, 400, generator=g)}


class _Counts:
    """How the DCP reader committed each item: streamed, fetched again, or loaded from a buffer."""

    def __init__(self, monkeypatch) -> None:
        from trainingjob_trainer.backends import dcp_read, stream_read

        self.streamed = self.not_verified = self.from_buffer = 0
        verify, in_place = stream_read.Item.verify, dcp_read._tensor_in_place

        def counting_verify(item, *a, **k):
            out = verify(item, *a, **k)
            if out is None:
                self.not_verified += 1
            else:
                self.streamed += 1
            return out

        def counting_in_place(*a, **k):
            self.from_buffer += 1
            return in_place(*a, **k)

        monkeypatch.setattr(stream_read.Item, "verify", counting_verify)
        monkeypatch.setattr(dcp_read, "_tensor_in_place", counting_in_place)


def _restore_mixed(s3_root: str, *, transposed: bool = False) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(11)
    src = {"t": TensorsState(_mixed_state(g)), "extra": {"note": "not a tensor"}}
    make_snapshotter(backend="dcp", uri=s3_root, app_state=src, watch_preemption=False).save(step=1)
    tensors = {k: torch.zeros_like(v) for k, v in src["t"].tensors.items()}
    if transposed:  # a target that is a view with other strides: it cannot be streamed into
        tensors["grid"] = torch.zeros(400, 300).t()
    target = {"t": TensorsState(tensors), "extra": {"note": ""}}
    pointers = {k: v.data_ptr() for k, v in tensors.items()}
    assert make_snapshotter(backend="dcp", uri=s3_root, app_state=target, watch_preemption=False).restore_latest() == 1
    for k, v in src["t"].tensors.items():
        assert torch.equal(tensors[k], v), k
        assert tensors[k].data_ptr() == pointers[k], k
    assert target["extra"] == src["extra"]
    return src, target, pointers


@pytest.mark.parametrize("chunk_bytes", [None, 70_001], ids=["one-get-per-object", "gets-cut-mid-item"])
def test_dcp_restore_streams_each_tensor_item_into_its_target(s3_root, monkeypatch, chunk_bytes):
    """Every tensor item of a contiguous target is streamed into it and checked;
    none is assembled in a buffer first. With GETs cut every 70 KB, GETs that start
    inside an item wait for its head, held by another GET, and land in the right place."""
    from trainingjob_trainer.backends import dcp_read

    if chunk_bytes:
        monkeypatch.setattr(dcp_read, "DCP_READ_CHUNK_BYTES", chunk_bytes)
    counts = _Counts(monkeypatch)
    _restore_mixed(s3_root)
    assert (counts.streamed, counts.not_verified, counts.from_buffer) == (6, 0, 0)


def test_dcp_restore_loads_a_target_it_cannot_stream_into_from_a_buffer(s3_root, monkeypatch):
    counts = _Counts(monkeypatch)
    _restore_mixed(s3_root, transposed=True)
    assert (counts.streamed, counts.not_verified, counts.from_buffer) == (5, 0, 1)


def test_dcp_restore_fetches_an_item_again_when_its_routing_check_fails(s3_root, monkeypatch):
    """A routing guess that torch's zip reader does not confirm (here: the data record
    guessed 64 bytes later than it is) costs a second GET of the item, never a wrong tensor."""
    from trainingjob_trainer.backends import stream_read

    start = stream_read._data_start
    monkeypatch.setattr(stream_read, "_data_start", lambda head: None if start(head) is None else start(head) + 64)
    counts = _Counts(monkeypatch)
    _restore_mixed(s3_root)
    assert counts.streamed == 0 and counts.not_verified == 6 and counts.from_buffer == 6


def test_dcp_restore_resumes_a_download_cut_halfway_from_its_first_missing_byte(s3_root, slow_proxy, monkeypatch):
    """Every GET of a data object is cut after 400 KB (the connection closed): each
    retry asks for the bytes still missing, so every GET completes in a few tries.
    Fetched from the start each time (s3fs's own retry of ``cat_file``), it never did."""
    from trainingjob_trainer.backends import dcp_read

    monkeypatch.setattr(dcp_read, "DCP_READ_CHUNK_BYTES", 1 << 20)
    slow_proxy.set_faults(fail="cut", cut_after_bytes=400_000, methods=["GET"], path_contains=".distcp")
    _restore_mixed(s3_root)
    stats = slow_proxy.stats()
    assert stats["failed_cut"] >= 2, stats


def test_torchsnapshot_restore_streams_buffer_protocol_tensors_into_their_targets(s3_root, monkeypatch):
    """Slabs of small tensors and tensors of their own, of several dtypes, are streamed
    into the targets (their memory kept); what cannot be (a transposed target) takes
    torchsnapshot's own consumer, and the result is the same."""
    from torchsnapshot.io_preparers.tensor import TensorBufferConsumer

    from trainingjob_trainer.backends import ts_stream

    g = torch.Generator().manual_seed(5)
    tensors = {**_mixed_state(g), "large": torch.randn(3_000_000, generator=g)}  # 12 MB: larger than a slab
    src = {"t": TensorsState(tensors)}
    make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state=src, watch_preemption=False).save(step=1)
    streamed, stock = [], []
    items, consume = ts_stream._items, TensorBufferConsumer.consume_buffer
    monkeypatch.setattr(ts_stream, "_items", lambda req, start: streamed.extend(out := items(req, start) or []) or out)

    async def counting_consume(self, buf, executor=None):
        stock.append(tuple(self.tensor.shape))
        return await consume(self, buf, executor)

    monkeypatch.setattr(TensorBufferConsumer, "consume_buffer", counting_consume)
    for transposed in (False, True):
        streamed.clear(), stock.clear()
        out = {k: torch.zeros_like(v) for k, v in tensors.items()}
        if transposed:
            out["grid"] = torch.zeros(400, 300).t()
        pointers = {k: v.data_ptr() for k, v in out.items()}
        target = {"t": TensorsState(out)}
        assert make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state=target,
                                watch_preemption=False).restore_latest() == 1
        for k, v in tensors.items():
            assert torch.equal(out[k], v), k
            assert out[k].data_ptr() == pointers[k], k
        if transposed:  # its slab goes the stock way, with every tensor in it
            assert (300, 400) in stock and len(streamed) + len(stock) == len(tensors), (len(streamed), stock)
        else:
            assert len(streamed) == len(tensors) and not stock, (len(streamed), stock)


def test_streamed_whole_object_read_checks_the_objects_size(bucket, s3_env):
    """A request for a whole object (no byte range) is streamed as a ranged GET of the
    size its tensor needs: an object of another size is an error, not a short tensor."""
    from trainingjob_trainer.backends import stream_read

    fs, _ = s3.filesystem(f"s3://{bucket}")
    fs.pipe(f"{bucket}/obj", bytes(range(256)) * 64)  # 16 KiB
    target = torch.zeros(1024, dtype=torch.float32)  # 4 KiB
    item = stream_read.Item(0, target.nbytes, target, raw=True)
    with pytest.raises(ValueError, match="16384 bytes, not the 4096"):
        asyncio.run_coroutine_threadsafe(stream_read.get_into(fs, f"{bucket}/obj", 0, 4096, [item], object_size=4096),
                                         fs.loop).result()
    item = stream_read.Item(0, 16384, torch.zeros(4096, dtype=torch.float32), raw=True)
    asyncio.run_coroutine_threadsafe(stream_read.get_into(fs, f"{bucket}/obj", 0, 16384, [item], object_size=16384),
                                     fs.loop).result()
    assert bytes(item.data) == bytes(range(256)) * 64


class _MixedState:
    """A Stateful whose state has every kind of manifest entry: tensors, primitives, lists, dicts."""

    def __init__(self, sd: dict) -> None:
        self.sd = sd

    def state_dict(self) -> dict:
        return self.sd

    def load_state_dict(self, sd: dict) -> None:
        self.sd = sd


def test_torchsnapshot_manifest_is_read_as_json_and_a_yaml_one_still_reads(s3_root, monkeypatch):
    """torchsnapshot writes its manifest with json.dumps; a restore reads it with json
    (PyYAML's resolver was a third of a 256-tensor restore's profile), gets every entry
    back as written, and a manifest written as YAML is still read by PyYAML."""
    import dataclasses
    import json

    import yaml
    from torchsnapshot import manifest as ts_manifest

    g = torch.Generator().manual_seed(9)
    sd = {"w": torch.randn(64, 8, generator=g), "step": 7, "lr": 1e-05, "name": "run-ä", "flag": True,
          "nested": {"a": [1, 2.5, "x"], "b": torch.arange(5)}}
    make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state={"m": _MixedState(sd)},
                     watch_preemption=False).save(step=1)
    real_load = yaml.load
    yaml_reads = []
    monkeypatch.setattr(yaml, "load", lambda *a, **kw: yaml_reads.append(1) or real_load(*a, **kw))
    target = _MixedState({})
    assert make_snapshotter(backend="torchsnapshot", uri=s3_root, app_state={"m": target},
                            watch_preemption=False).restore_latest() == 1
    assert not yaml_reads, "the JSON manifest went through PyYAML"
    got = target.sd
    assert torch.equal(got["w"], sd["w"]) and torch.equal(got["nested"]["b"], sd["nested"]["b"])
    assert (got["step"], got["lr"], got["name"], got["flag"]) == (7, 1e-05, "run-ä", True)
    assert got["nested"]["a"] == [1, 2.5, "x"]

    # The same manifest written as YAML (not JSON) reads through PyYAML, to the same entries.
    fs, path = s3.filesystem(s3_root)
    text = next(fs.cat_file(p).decode() for p in fs.find(path) if p.endswith("/.snapshot_metadata"))
    meta = ts_manifest.SnapshotMetadata.from_yaml(text)
    as_yaml = yaml.safe_dump(dataclasses.asdict(meta))
    with pytest.raises(ValueError):
        json.loads(as_yaml)
    again = ts_manifest.SnapshotMetadata.from_yaml(as_yaml)
    assert yaml_reads and again == meta
