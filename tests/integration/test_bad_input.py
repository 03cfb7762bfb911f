"""Bad input: every invalid spec is rejected by the CRD schema with a message
naming the field, or accepted and then marked Failed/InvalidSpec with a message
a user can act on. The operator never crashes or loops, and a valid job
submitted afterwards still runs."""

from __future__ import annotations

import copy
import json
import time

import pytest

from localcluster.kube import ApiError

from .helpers import TJ, job_manifest, pods_of, wait_phase

pytestmark = pytest.mark.integration

OK_CODE = "print('ok')"


def _set(body, path, value):
    """Set a dotted path in the manifest (``spec.snapshot.uri``); value ``DELETE`` removes it."""
    keys = path.split(".")
    cur = body
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    if value is DELETE:
        cur.pop(keys[-1], None)
    else:
        cur[keys[-1]] = value


DELETE = object()
SNAP = {"uri": "s3://bucket/runs"}

# (id, [(path, value)...], where: "schema" | "operator", text the message must contain)
CASES = [
    ("missing-image", [("spec.image", DELETE)], "schema", "spec.image"),
    ("nodes-zero", [("spec.nodes", 0)], "schema", "spec.nodes"),
    ("nodes-million", [("spec.nodes", 10**6)], "schema", "spec.nodes"),
    ("procs-negative", [("spec.procsPerNode", -2)], "schema", "spec.procsPerNode"),
    ("uri-not-s3", [("spec.snapshot", {"uri": "http://bucket/x"})], "schema", "spec.snapshot.uri"),
    ("uri-no-bucket", [("spec.snapshot", {"uri": "s3://"})], "schema", "spec.snapshot.uri"),
    ("uri-space", [("spec.snapshot", {"uri": "s3://bucket/a b"})], "schema", "spec.snapshot.uri"),
    ("backend-unknown", [("spec.snapshot", {**SNAP, "backend": "zarr"})], "schema", "spec.snapshot.backend"),
    ("snapshot-without-uri", [("spec.snapshot", {"backend": "dcp"})], "schema", "spec.snapshot.uri"),
    ("command-shell-string", [("spec.command", ["python train.py; rm -rf /"])], "schema", "argv list"),
    ("command-empty", [("spec.command", [])], "schema", "spec.command"),
    ("restart-policy", [("spec.podTemplate", {"spec": {"restartPolicy": "Always"}})], "schema", "restartPolicy"),
    ("host-network", [("spec.podTemplate", {"spec": {"hostNetwork": True}})], "schema", "hostNetwork"),
    ("containers", [("spec.podTemplate", {"spec": {"containers": [{"name": "x"}]}})], "schema", "containers"),
    ("reserved-env", [("spec.env", [{"name": "TJ_ATTEMPT", "value": "7"}])], "schema", "reserved"),
    ("env-bad-name", [("spec.env", [{"name": "1 BAD", "value": "x"}])], "schema", "spec.env[0].name"),
    ("keep-last-zero", [("spec.snapshot", {**SNAP, "keepLast": 0})], "schema", "spec.snapshot.keepLast"),
    ("every-steps-string", [("spec.snapshot", {**SNAP, "everySteps": "ten"})], "schema", "spec.snapshot.everySteps"),
    ("grace-negative", [("spec.terminationGracePeriodSeconds", -5)], "schema", "terminationGracePeriodSeconds"),
    ("backoff-over-cap", [("spec.recovery", {"backoffSeconds": 100, "maxBackoffSeconds": 10})], "schema",
     "backoffSeconds"),
    ("reserved-label", [("spec.podTemplate", {"metadata": {"labels": {"trainingjob.dev/attempt": "9"}}})],
     "schema", "reserved"),
    ("clean-policy-enum", [("spec.cleanPodPolicy", "Sometimes")], "schema", "spec.cleanPodPolicy"),
    ("suspend-not-bool", [("spec.suspend", "yes")], "schema", "spec.suspend"),
    ("resources-object", [("spec.resources", {"limits": {"cpu": {"x": 1}}})], "schema", "spec.resources"),
    ("name-uppercase", [("metadata.name", "BadName")], "schema", "metadata.name"),
    ("name-too-long", [("metadata.name", "n" * 60)], "operator", "at most 51 characters"),
    ("name-not-dns-label", [("metadata.name", "a.b")], "operator", "DNS label"),
    ("mount-without-volume", [("spec.volumeMounts", [{"name": "data", "mountPath": "/data"}])], "operator",
     "names no volume"),
    # Accepted by the CRD and by the operator's checks, refused by the API server when the pod is created.
    ("label-value-invalid", [("spec.podTemplate", {"metadata": {"labels": {"team": "has space"}}})], "operator",
     "the API server rejected"),
]


def test_at_least_twenty_cases():
    assert len(CASES) >= 20
    assert {where for _, _, where, _ in CASES} == {"schema", "operator"}


@pytest.fixture
def operator(start_operator):
    return start_operator()


def test_invalid_specs_are_rejected_or_failed_and_valid_job_still_runs(kube, namespace, operator, cluster):
    accepted: dict[str, str] = {}
    for i, (cid, edits, where, text) in enumerate(CASES):
        body = job_manifest(f"bad-{i}", namespace, OK_CODE, nodes=1)
        body = copy.deepcopy(body)
        for path, value in edits:
            _set(body, path, value)
        name = body["metadata"]["name"]
        if where == "schema":
            with pytest.raises(ApiError) as err:
                kube.create(TJ, body, namespace=namespace)
            assert err.value.status == 422, (cid, err.value)
            assert text in str(err.value), (cid, str(err.value))
        else:
            kube.create(TJ, body, namespace=namespace)
            accepted[name] = text
    for name, text in accepted.items():
        st = wait_phase(kube, namespace, name, "Failed", timeout=30)
        assert st["reason"] == "InvalidSpec", (name, st)
        assert text in st["message"], (name, st["message"])
        assert pods_of(kube, namespace, name) == []
    # No loop: the InvalidSpec status is written once and stays put.
    before = {n: kube.get(TJ, n, namespace=namespace)["metadata"]["resourceVersion"] for n in accepted}
    time.sleep(3)
    after = {n: kube.get(TJ, n, namespace=namespace)["metadata"]["resourceVersion"] for n in accepted}
    assert before == after
    # The gang's size cannot change under a running job (a transition rule).
    kube.create(TJ, job_manifest("sized", namespace, "import time; time.sleep(30)", nodes=1), namespace=namespace)
    with pytest.raises(ApiError) as err:
        kube.patch(TJ, "sized", {"spec": {"nodes": 2}}, namespace=namespace)
    assert err.value.status == 422 and "spec.nodes cannot change" in str(err.value)
    kube.delete(TJ, "sized", namespace=namespace)
    # The operator is alive and a valid job still runs to the end.
    assert operator.alive
    kube.create(TJ, job_manifest("good", namespace, OK_CODE, nodes=2), namespace=namespace)
    assert wait_phase(kube, namespace, "good", "Succeeded", timeout=60)["workers"]["succeeded"] == 2
    assert operator.alive and "Traceback" not in operator.log_text()
    for name in [*accepted, "good"]:
        kube.delete(TJ, name, namespace=namespace)


def test_a_refused_pod_create_stops_the_gang_after_one_request(kube, namespace, operator, cluster):
    """The gang is created in slow-start batches (1, 2, 4, ...): when the API server
    refuses the first pod, the other seven are never sent (all-at-once would send 8)."""
    body = job_manifest("refused", namespace, OK_CODE, nodes=8)
    _set(body, "spec.podTemplate", {"metadata": {"labels": {"team": "has space"}}})
    kube.create(TJ, body, namespace=namespace)
    st = wait_phase(kube, namespace, "refused", "Failed", timeout=30)
    assert st["reason"] == "InvalidSpec" and "the API server rejected" in st["message"], st
    posts = []
    with open(cluster.state_dir / "api-requests.jsonl") as log:
        for line in log:
            e = json.loads(line)
            if (e["method"] == "POST" and e["resource"] == "pods" and e["namespace"] == namespace
                    and (e["user_agent"] or "").startswith("trainingjob-operator")):
                posts.append(e)
    assert len(posts) == 1 and posts[0]["status"] == 422, posts
