"""The trainer tests' S3 server: the stand-in's SeaweedFS (``localcluster/s3.py``), a real S3 server.

SeaweedFS stores on disk and checks request signatures, as AWS does; the
trainer tests start one per session (about 1 s) and give each test a bucket
of its own (``tests/trainer/conftest.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from localcluster.s3 import ACCESS_KEY_ID as ACCESS_KEY
from localcluster.s3 import REGION, SeaweedS3Server, free_port
from localcluster.s3 import SECRET_ACCESS_KEY as SECRET_KEY
from trainingjob_trainer import contract

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "S3Server", "free_port", "start_s3_server"]


@dataclass
class S3Server:
    """A running SeaweedFS.

    Attributes:
        endpoint: ``http://127.0.0.1:<port>``.
        server: The server (stopped by its PID).
    """

    endpoint: str
    server: SeaweedS3Server

    def env(self) -> dict[str, str]:
        """The contract env pointing a trainer at this server."""
        return {
            contract.ENV_S3_ENDPOINT: self.endpoint,
            contract.ENV_S3_REGION: REGION,
            contract.SECRET_KEY_ACCESS_KEY_ID: ACCESS_KEY,
            contract.SECRET_KEY_SECRET_ACCESS_KEY: SECRET_KEY,
        }

    def stop(self) -> None:
        """Stop the server by PID and remove its data."""
        self.server.stop()


def start_s3_server(*, port: int | None = None) -> S3Server:
    """Start SeaweedFS on ``port`` (default: a free loopback port) and wait until it answers."""
    server = SeaweedS3Server(port=port).start()
    return S3Server(endpoint=server.endpoint, server=server)
