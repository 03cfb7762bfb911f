"""Fixtures for the trainer tests: one SeaweedFS S3 server per session and a fresh bucket per test."""

from __future__ import annotations

import uuid

import pytest

from tests.trainer.trainer_s3server import start_s3_server


@pytest.fixture(scope="session")
def s3_server():
    """One SeaweedFS (the stand-in's S3) for the session, stopped by PID at the end."""
    server = start_s3_server()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The contract env for the server, set in this process."""
    env = s3_server.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def bucket(s3_env):
    """A new empty bucket; returns its name."""
    import s3fs

    name = f"tj-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_env["AWS_ENDPOINT_URL"], key=s3_env["AWS_ACCESS_KEY_ID"],
                           secret=s3_env["AWS_SECRET_ACCESS_KEY"], use_listings_cache=False)
    fs.mkdir(name)
    return name


@pytest.fixture
def s3_root(bucket):
    """A job snapshot root inside the test's bucket."""
    return f"s3://{bucket}/snapshots/default/job"
