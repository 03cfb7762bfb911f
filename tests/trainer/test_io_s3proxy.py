"""The fault-injecting S3 proxy (localcluster/s3proxy.py) against the real test S3 server."""

from __future__ import annotations

import hashlib
import time
import urllib.error
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from localcluster.s3proxy import S3Proxy
from tests.trainer.trainer_s3server import ACCESS_KEY, REGION, SECRET_KEY


@pytest.fixture
def proxy(s3_server):
    p = S3Proxy(upstream=s3_server.endpoint).start()
    yield p
    p.stop()


def _client(endpoint: str, *, retries: int = 0):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                        region_name=REGION,
                        config=Config(retries={"total_max_attempts": retries + 1, "mode": "standard"},
                                      connect_timeout=5, read_timeout=30))


@pytest.fixture
def bucket_name(proxy):
    name = f"px-{uuid.uuid4().hex[:10]}"
    _client(proxy.endpoint).create_bucket(Bucket=name)
    return name


def test_proxy_carries_large_objects_both_ways_unchanged(proxy, bucket_name):
    """A 96 MiB multipart upload (boto3: Expect 100-continue, 8 MiB parts) and a ranged GET go through intact."""
    import io

    c = _client(proxy.endpoint)
    data = hashlib.sha256(b"seed").digest() * (96 * 1024 * 1024 // 32)
    c.upload_fileobj(io.BytesIO(data), bucket_name, "big")
    got = c.get_object(Bucket=bucket_name, Key="big")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    part = c.get_object(Bucket=bucket_name, Key="big", Range="bytes=1000-1999")["Body"].read()
    assert part == data[1000:2000]
    assert c.head_object(Bucket=bucket_name, Key="big")["ContentLength"] == len(data)
    stats = proxy.stats()
    assert stats["bytes_up"] >= len(data) and stats["bytes_down"] >= len(data) + 1000
    assert stats["by_method"]["PUT"] >= 12  # the parts


def test_proxy_503_slowdown_for_a_window_then_passes(proxy, bucket_name):
    c = _client(proxy.endpoint)
    proxy.set_faults(fail="503", fail_for_s=1.0, methods=["PUT"])
    with pytest.raises(ClientError) as e:
        c.put_object(Bucket=bucket_name, Key="k", Body=b"x" * 4096)
    assert e.value.response["Error"]["Code"] == "SlowDown"
    assert c.list_objects_v2(Bucket=bucket_name).get("KeyCount") == 0  # GET not matched, the PUT never landed
    deadline = time.monotonic() + 10
    while True:
        try:
            c.put_object(Bucket=bucket_name, Key="k", Body=b"x" * 4096)
            break
        except ClientError:
            assert time.monotonic() < deadline, "the 503 window did not end"
            time.sleep(0.1)
    assert c.get_object(Bucket=bucket_name, Key="k")["Body"].read() == b"x" * 4096
    assert proxy.stats()["failed_503"] >= 1


def test_proxy_resets_connections_and_share_picks_some_requests(proxy, bucket_name):
    c = _client(proxy.endpoint)
    c.put_object(Bucket=bucket_name, Key="k", Body=b"hello")
    proxy.set_faults(fail="reset")
    with pytest.raises(Exception) as e:  # noqa: B017 - botocore wraps the reset in several ways
        c.get_object(Bucket=bucket_name, Key="k")["Body"].read()
    assert not isinstance(e.value, ClientError)  # a transport error, not an HTTP answer
    assert proxy.stats()["failed_reset"] >= 1  # urllib3 retries once on a reused connection
    proxy.set_faults(fail="503", fail_share=0.5, seed=7)
    outcomes = []
    for _ in range(40):
        try:
            c.head_object(Bucket=bucket_name, Key="k")
            outcomes.append(True)
        except ClientError:
            outcomes.append(False)
    assert 5 < outcomes.count(False) < 35, outcomes
    proxy.set_faults()
    assert c.get_object(Bucket=bucket_name, Key="k")["Body"].read() == b"hello"


def test_proxy_cuts_a_download_after_its_first_bytes(proxy, bucket_name):
    """``fail="cut"``: the answer's head and its first ``cut_after_bytes`` body bytes
    arrive, then the connection is closed: a client reads them all, then a body that ended early."""
    c = _client(proxy.endpoint)
    data = bytes(range(256)) * 4096  # 1 MiB
    c.put_object(Bucket=bucket_name, Key="k", Body=data)
    proxy.set_faults(fail="cut", cut_after_bytes=100_000, methods=["GET"])
    body = c.get_object(Bucket=bucket_name, Key="k")["Body"]  # the head came: 200, Content-Length 1 MiB
    got = b""
    with pytest.raises(Exception) as e:  # noqa: B017 - urllib3 or botocore, by where the read stood
        while chunk := body.read(8192):
            got += chunk
    assert not isinstance(e.value, ClientError)
    assert got == data[:100_000]
    assert proxy.stats()["failed_cut"] == 1
    proxy.set_faults()
    assert c.get_object(Bucket=bucket_name, Key="k")["Body"].read() == data


def test_proxy_caps_bandwidth_and_adds_latency(proxy, bucket_name):
    """Lower bounds only (a cap can only make a transfer slower): 1 MiB at 512 KiB/s takes >= ~2 s."""
    c = _client(proxy.endpoint)
    proxy.set_faults(bandwidth_bps=512 * 1024)
    t0 = time.monotonic()
    c.put_object(Bucket=bucket_name, Key="k", Body=b"y" * (1 << 20))
    assert time.monotonic() - t0 >= 1.5
    t0 = time.monotonic()
    assert len(c.get_object(Bucket=bucket_name, Key="k")["Body"].read()) == 1 << 20
    assert time.monotonic() - t0 >= 1.5
    proxy.set_faults(latency_s=0.3)
    t0 = time.monotonic()
    c.head_object(Bucket=bucket_name, Key="k")
    assert time.monotonic() - t0 >= 0.3


def test_proxy_rejects_bad_fault_settings(proxy):
    with pytest.raises(urllib.error.HTTPError) as e:
        proxy.set_faults(fail="explode")
    assert e.value.code == 400
    with pytest.raises(urllib.error.HTTPError):
        proxy.set_faults(bandwidth=5)
    assert proxy.stats()["requests"] == 0
