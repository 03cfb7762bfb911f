"""Secrets never appear in status, Events or the operator's logs."""

from __future__ import annotations

import base64
import json

import pytest

from .helpers import TJ, events_of, job_manifest, status, wait_phase, wait_status

pytestmark = pytest.mark.integration

KEY_ID = "AKIAMARKERKEYID0123"
SECRET = "s3cr3t/MARKER+value=xyz"


def test_credentials_never_leak_into_status_events_or_logs(kube, namespace, start_operator):
    op = start_operator(["--resync-seconds", "1"])
    # Pods get the keys by secretKeyRef; the operator reads them to list S3,
    # here an endpoint that refuses connections, so its errors are exercised too.
    code = ("import os; assert os.environ['AWS_ACCESS_KEY_ID'] == %r; "
            "assert os.environ['AWS_SECRET_ACCESS_KEY'] == %r" % (KEY_ID, SECRET))
    spec = {"snapshot": {"uri": "s3://bucket/runs", "endpoint": "http://127.0.0.1:9", "credentialsSecret": "creds"}}
    kube.create(TJ, job_manifest("quiet", namespace, code, nodes=2, **spec), namespace=namespace)
    # Without the Secret the job waits, says why, and creates no pod.
    st = wait_status(kube, namespace, "quiet", lambda s: s.get("reason") == "CredentialsSecretNotReady",
                     timeout=30, what="missing-secret status")
    assert "creds" in st["message"] and "AWS_ACCESS_KEY_ID" in st["message"]
    kube.create("secrets", {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                            "data": {"AWS_ACCESS_KEY_ID": base64.b64encode(KEY_ID.encode()).decode(),
                                     "AWS_SECRET_ACCESS_KEY": base64.b64encode(SECRET.encode()).decode()}},
                namespace=namespace)
    st = wait_phase(kube, namespace, "quiet", "Succeeded", timeout=60)
    assert "lastError" in st.get("snapshot", {})  # the S3 listing failed and was reported
    # A trainer that prints its credentials and fails: its log tail becomes the
    # termination message (FallbackToLogsOnError), which the operator masks.
    leak = "import os, sys; print('key', os.environ['AWS_SECRET_ACCESS_KEY']); sys.exit(5)"
    kube.create(TJ, job_manifest("leaky", namespace, leak, nodes=1, recovery={"maxFailures": 0}, **spec),
                namespace=namespace)
    st = wait_phase(kube, namespace, "leaky", "Failed", timeout=60)
    assert "exited with code 5" in st["message"] and "key ***" in st["message"]
    texts = [json.dumps(status(kube, namespace, "quiet")), json.dumps(events_of(kube, namespace, "quiet")),
             json.dumps(st), json.dumps(events_of(kube, namespace, "leaky")), op.log_text()]
    for text in texts:
        for needle in (KEY_ID, SECRET, base64.b64encode(SECRET.encode()).decode()):
            assert needle not in text
    kube.delete(TJ, "quiet", namespace=namespace)
    kube.delete(TJ, "leaky", namespace=namespace)
