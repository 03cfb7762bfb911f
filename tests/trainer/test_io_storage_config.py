"""Issue 8 item 10 (storage part): an unknown bucket or refused credentials end the pod with
``EXIT_SNAPSHOT_CONFIG_ERROR`` and a message saying what to fix, not as an ordinary failure."""

from __future__ import annotations

import os
import subprocess
import sys

from trainingjob_trainer import contract

SECRET = "wrong-secret-never-shown"


def _run_job(tmp_path, env: dict[str, str]) -> tuple[int, contract.TerminationMessage | None, str]:
    term = tmp_path / "termination-log"
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TJ_", "PET_", "AWS_"))}
    full.update({contract.PET_NPROC_PER_NODE: "2", contract.ENV_TERMINATION_MESSAGE_PATH: str(term),
                 contract.ENV_SNAPSHOT_EVERY_STEPS: "2", "OMP_NUM_THREADS": "1", **env})
    r = subprocess.run([sys.executable, "-m", "trainingjob_trainer.launch", "--standalone",
                        "-m", "trainingjob_trainer.example", "--steps", "4"],
                       env=full, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    return r.returncode, contract.parse_termination_message(term.read_text()), r.stdout + r.stderr


def test_item10_unknown_bucket_exits_with_the_config_error(s3_server, tmp_path):
    env = {**s3_server.env(), contract.ENV_SNAPSHOT_URI: "s3://no-such-bucket-tj/snapshots/default/job"}
    code, msg, out = _run_job(tmp_path, env)
    assert code == contract.EXIT_SNAPSHOT_CONFIG_ERROR, out[-4000:]
    assert msg is not None and msg.reason == contract.TERM_REASON_SNAPSHOT_CONFIG_ERROR, msg
    assert "bucket does not exist" in msg.message and "spec.snapshot.uri" in msg.message, msg


def test_item10_refused_credentials_exit_with_the_config_error(s3_server, tmp_path):
    # SeaweedFS checks signatures: a wrong secret is refused (SignatureDoesNotMatch).
    env = {**s3_server.env(), contract.SECRET_KEY_SECRET_ACCESS_KEY: SECRET,
           contract.ENV_SNAPSHOT_URI: "s3://some-bucket/snapshots/default/job"}
    code, msg, out = _run_job(tmp_path, env)
    assert code == contract.EXIT_SNAPSHOT_CONFIG_ERROR, out[-4000:]
    assert msg is not None and msg.reason == contract.TERM_REASON_SNAPSHOT_CONFIG_ERROR, msg
    assert "S3 refused access" in msg.message and "credentialsSecret" in msg.message, msg
    assert SECRET not in msg.message and SECRET not in out
