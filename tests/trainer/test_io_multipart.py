"""Issue 8 item 9: multipart uploads keep a bounded number of part bytes in flight per rank, never copied."""

from __future__ import annotations

import asyncio
import hashlib
import tracemalloc

from torchsnapshot.io_types import WriteIO

from trainingjob_trainer import contract, ts_plugin


def test_item9_multipart_parts_in_flight_are_bounded_and_not_copied(s3_env, bucket, monkeypatch):
    monkeypatch.setenv(contract.ENV_S3_MAX_INFLIGHT_BYTES, str(2 * ts_plugin.PART_BYTES))
    monkeypatch.setattr(ts_plugin, "_BUDGETS", {})
    size = 6 * ts_plugin.PART_BYTES  # 96 MiB: 6 parts
    data = bytearray(hashlib.sha256(b"part").digest() * (size // 32))
    plugin = ts_plugin.S3FSStoragePlugin(f"{bucket}/mp")
    tracemalloc.start()
    try:
        asyncio.run(plugin.write(WriteIO(path="0/big", buf=memoryview(data))))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size // 4, f"{peak / 2**20:.1f} MiB allocated while uploading {size / 2**20:.0f} MiB"
    budget = ts_plugin._budget(plugin.fs.loop)
    assert budget.limit == 2 * ts_plugin.PART_BYTES and 0 < budget.peak <= budget.limit
    got = plugin.fs.cat_file(f"{bucket}/mp/0/big")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_item9_knob_default_and_floor(monkeypatch):
    monkeypatch.delenv(contract.ENV_S3_MAX_INFLIGHT_BYTES, raising=False)
    assert ts_plugin.max_inflight_bytes() == ts_plugin.MAX_INFLIGHT_BYTES == 256 << 20
    monkeypatch.setenv(contract.ENV_S3_MAX_INFLIGHT_BYTES, "1")
    assert ts_plugin.max_inflight_bytes() == ts_plugin.PART_BYTES  # one part always fits
