"""Issue 12, the kubectl plugin: the real ``kubectl-tj`` console script (and kubectl's
plugin discovery) against the stand-in's API server and its real S3 server.

Snapshot folders are written by the trainer's own ``SnapshotStore`` (complete,
incomplete, from two attempts); the operator runs only where its Events and
its use of ``resumeFrom`` are what the test checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import control
from localcluster.kube import wait_until
from trainingjob_operator.cli.api import ACCESS, USER_AGENT, Api, CliError
from trainingjob_operator.cli.commands import patch_resume_from
from trainingjob_trainer import contract, s3
from trainingjob_trainer.store import SnapshotStore

from .helpers import TJ, events_of, job_manifest, wait_phase, wait_status

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent  # the venv's bin: where the console script is installed
JOB = "cli-job"
# (epoch, step, attempt, how the folder is left)
FOLDERS = [(0, 10, 0, "complete"), (0, 20, 0, "complete"), (1, 30, 1, "emergency"),
           (1, 35, 1, "rewritten"), (1, 40, 1, "no-marker")]


def _env(cluster, path: str | None = None, **extra: str) -> dict[str, str]:
    """A clean environment: the user's kubeconfig, no AWS credentials unless given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(KUBECONFIG=cluster.kubeconfig, PATH=path or f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def run_cli(cluster, *args: str, kubectl: bool = False, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = ([shutil.which("kubectl") or "kubectl", "tj"] if kubectl else [str(BIN / "kubectl-tj")]) + list(args)
    return subprocess.run(argv, env=env or _env(cluster), capture_output=True, text=True, timeout=timeout)


def snapshot_spec(cluster, secret: str | None = "s3-creds", endpoint: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"uri": f"s3://{cluster.bucket}/cli", "endpoint": endpoint or cluster.s3_endpoint}
    if secret:
        spec["credentialsSecret"] = secret
    return spec


def write_folders(cluster, namespace: str, name: str = JOB) -> SnapshotStore:
    """The snapshot folders of :data:`FOLDERS`, written the way the trainer writes them."""
    root = contract.job_snapshot_root(f"s3://{cluster.bucket}/cli", namespace, name)
    store = SnapshotStore(root, storage_options=cluster.s3_storage_options())
    for epoch, step, attempt, how in FOLDERS:
        uri = store.begin(epoch=epoch, step=step)
        fs, path = s3.filesystem(uri, store.storage_options)
        for rank in range(2):
            fs.pipe_file(f"{path}/__{rank}_0.distcp", bytes([rank]) * (1000 + step))
        if how == "no-marker":
            continue  # a save killed before its commit
        store.commit(epoch=epoch, step=step, save_id=f"a{attempt}-test", attempt=attempt, backend="dcp",
                     seconds=0.5, emergency=how == "emergency")
        if how == "rewritten":
            fs.pipe_file(f"{path}/__1_0.distcp", b"late upload of a fenced attempt")
    return store


@pytest.fixture
def job(cluster, kube, namespace) -> SnapshotStore:
    cluster.create_s3_secret(namespace)
    kube.create(TJ, job_manifest(JOB, namespace, "print('ok')", nodes=1, snapshot=snapshot_spec(cluster)),
                namespace=namespace)
    return write_folders(cluster, namespace)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], proc.stderr


def assert_no_secret(cluster, *texts: str) -> None:
    for text in texts:
        for value in cluster.s3_credentials.values():
            assert value not in text


def test_issue12_snapshots_lists_complete_and_incomplete_folders_with_their_attempt(cluster, namespace, job):
    proc = run_cli(cluster, "snapshots", JOB, "-n", namespace, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    got = {r["step"]: r for r in json.loads(proc.stdout)["snapshots"]}
    assert sorted(got) == [10, 20, 30, 35, 40]
    assert {s: r["complete"] for s, r in got.items()} == {10: True, 20: True, 30: True, 35: False, 40: False}
    # The attempt comes from the commit marker; a folder without one says so.
    assert {s: r["attempt"] for s, r in got.items()} == {10: 0, 20: 0, 30: 1, 35: 1, 40: None}
    assert got[30]["emergency"] is True and got[30]["bytes"] == 2 * 1030
    assert got[40]["bytes"] == 2 * 1040 and got[40]["objects"] == 2 and got[40]["age"] is None
    assert "no commit marker" in got[40]["note"]
    assert "1 object(s) rewritten since the commit" in got[35]["note"]
    # The table, newest first, like kubectl's.
    table = run_cli(cluster, "snapshots", JOB, "-n", namespace)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["NAME", "STEP", "EPOCH", "COMPLETE", "ATTEMPT", "SIZE", "SAVE-SECONDS", "AGE", "NOTE"]
    assert [ln.split()[0] for ln in lines[1:]] == [f"epoch_{e}_train_step_{s}" for e, s, _, _ in reversed(FOLDERS)]
    assert lines[1].split()[1:5] == ["40", "1", "no", "-"]
    assert lines[3].split()[1:5] == ["30", "1", "yes", "1"] and "emergency" in lines[3]
    assert_no_secret(cluster, proc.stdout, proc.stderr, table.stdout, table.stderr)


def test_issue12_kubectl_finds_the_plugin_on_path(cluster, namespace, job):
    proc = run_cli(cluster, "snapshots", JOB, "-n", namespace, kubectl=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith("NAME") and "epoch_1_train_step_40" in proc.stdout
    listed = subprocess.run(["kubectl", "plugin", "list"], env=_env(cluster), capture_output=True, text=True,
                            timeout=30)
    assert str(BIN / "kubectl-tj") in listed.stdout
    # Without the venv's bin on PATH kubectl has no such command: discovery is by PATH alone.
    bare = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    gone = run_cli(cluster, "snapshots", JOB, "-n", namespace, kubectl=True, env=_env(cluster, path=bare))
    assert gone.returncode != 0 and "unknown command" in gone.stderr


def test_issue12_resume_refuses_an_incomplete_snapshot_and_sets_a_complete_one(cluster, kube, namespace, job):
    def uri(epoch: int, step: int) -> str:
        return job.uri_for(epoch=epoch, step=step)

    for target, why in ((uri(1, 40), "no commit marker"), (uri(1, 35), "rewritten since the commit"),
                        (uri(2, 99), "does not exist"), (job.root, "is not a snapshot folder")):
        proc = run_cli(cluster, "resume", JOB, "-n", namespace, "--from", target)
        assert_one_line_error(proc, why)
        assert "resumeFrom" not in kube.get(TJ, JOB, namespace=namespace)["spec"]["snapshot"]
    proc = run_cli(cluster, "resume", JOB, "-n", namespace, "--from", uri(0, 20))
    assert proc.returncode == 0, proc.stderr
    assert kube.get(TJ, JOB, namespace=namespace)["spec"]["snapshot"]["resumeFrom"] == uri(0, 20)
    assert "written by attempt 0" in proc.stdout and "has not been created yet: it will restore" in proc.stdout
    # Once the first gang exists, the plugin says the field no longer applies.
    kube.patch(TJ, JOB, {"status": {"attempt": 1, "phase": "Running", "snapshot": {"restoredAttempt": 1}}},
               namespace=namespace, subresource="status")
    proc = run_cli(cluster, "resume", JOB, "-n", namespace, "--from", uri(0, 10))
    assert proc.returncode == 0, proc.stderr
    assert "already started (attempt 1" in proc.stdout and "only when it creates the FIRST" in proc.stdout


def test_issue12_resume_patch_is_conditional_on_the_resource_version_read(cluster, kube, namespace, job,
                                                                          monkeypatch):
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    api = Api()
    read = api.get_job(namespace, JOB)
    kube.patch(TJ, JOB, {"metadata": {"labels": {"team": "a"}}}, namespace=namespace)  # someone else writes
    with pytest.raises(CliError, match="changed since it was read"):
        patch_resume_from(api, read, job.uri_for(epoch=0, step=20))
    assert "resumeFrom" not in kube.get(TJ, JOB, namespace=namespace)["spec"]["snapshot"]
    patch_resume_from(api, api.get_job(namespace, JOB), job.uri_for(epoch=0, step=20))  # a fresh read works
    assert kube.get(TJ, JOB, namespace=namespace)["spec"]["snapshot"]["resumeFrom"].endswith("step_20")


def _fields(out: str) -> dict[str, str]:
    """``Key: value`` lines of describe's head (before the Pods table)."""
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.split("Pods:")[0].splitlines())}


def test_issue12_describe_shows_the_timeline_and_resume_wins_for_the_first_attempt_only(
        cluster, kube, namespace, job, start_operator):
    # Attempt 0 runs until it is preempted; attempt 1 exits 0.
    code = "import os, time; time.sleep(60 if os.environ['TJ_ATTEMPT'] == '0' else 0)"
    store = write_folders(cluster, namespace, "timeline")
    kube.create(TJ, job_manifest("timeline", namespace, code, nodes=1, snapshot=snapshot_spec(cluster),
                                 terminationGracePeriodSeconds=2), namespace=namespace)
    target = store.uri_for(epoch=0, step=20)  # not the latest (30): only resumeFrom makes a gang start there
    assert run_cli(cluster, "resume", "timeline", "-n", namespace, "--from", target).returncode == 0
    start_operator(["--resync-seconds", "1"])
    wait_status(kube, namespace, "timeline", lambda s: s.get("phase") == "Running", timeout=60, what="attempt 0 running")
    first = _fields(run_cli(cluster, "describe", "timeline", "-n", namespace).stdout)
    assert first["Attempt"] == "0" and first["Restored from"] == target
    control.preempt(kube, namespace, "timeline-0-0", grace_period=1)
    wait_phase(kube, namespace, "timeline", "Succeeded", timeout=60)
    proc = run_cli(cluster, "describe", "timeline", "-n", namespace)
    assert proc.returncode == 0, proc.stderr
    out, fields = proc.stdout, _fields(proc.stdout)
    assert fields["Phase"] == "Succeeded (AllWorkersSucceeded)" and fields["Attempt"] == "1"
    assert fields["Restarts"].startswith("1 preemption(s) (max 100), 0 failure(s)")
    assert fields["What"].startswith("Preemption PreemptionByScheduler: pod timeline-0-0 on node node-")
    assert fields["Lost work"] == "0 step(s), 0 s (cumulative)"
    # The later attempt resumed from the job's latest snapshot, not from spec.snapshot.resumeFrom.
    latest = store.uri_for(epoch=1, step=30)
    assert fields["Restored from"] == latest and fields["For attempt"] == "1" and fields["Restored step"] == "30"
    assert fields["Resume from (spec)"] == target and fields["Latest"] == latest and fields["Complete"] == "3"
    assert "Progress:" not in out and "Goodput:" not in out  # not in this operator's status
    pods = out.split("Pods:", 1)[1].split("Conditions:", 1)[0].strip().splitlines()
    assert pods[0].split() == ["NAME", "ATTEMPT", "RANK", "PHASE", "NODE", "AGE"]
    assert pods[1].split()[:4] == ["timeline-1-0", "1", "0", "Succeeded"] and pods[1].split()[4].startswith("node-")
    conditions, events = out.split("Conditions:", 1)[1].split("Events:", 1)
    assert "Succeeded" in conditions and "AllWorkersSucceeded" in conditions
    rows = events.strip().splitlines()[1:]
    reasons = [ln.split()[3] for ln in rows]
    timeline = [r for r in reasons if r in ("GangCreated", "Preempted", "FencingPreviousAttempt",
                                            "AllWorkersSucceeded")]
    assert timeline == ["GangCreated", "Preempted", "FencingPreviousAttempt", "GangCreated",
                        "AllWorkersSucceeded"], reasons  # oldest first
    gangs = [ln for ln in rows if ln.split()[3] == "GangCreated"]
    assert target in gangs[0] and "attempt 0" in gangs[0] and latest in gangs[1] and "attempt 1" in gangs[1]
    # The snapshot list marks what the status names.
    snaps = json.loads(run_cli(cluster, "snapshots", "timeline", "-n", namespace, "-o", "json").stdout)["snapshots"]
    notes = {r["step"]: r["note"] for r in snaps}
    assert "latest" in notes[30] and "restored by the current attempt" in notes[30] and "latest" not in notes[20]
    assert_no_secret(cluster, out, proc.stderr)


def test_issue12_errors_are_one_line_with_exit_code_1(cluster, kube, namespace, job, tmp_path):
    assert_one_line_error(run_cli(cluster, "describe", "nope", "-n", namespace),
                          f"trainingjob {namespace}/nope not found")
    nowhere = tmp_path / "kubeconfig"
    nowhere.write_text(Path(cluster.kubeconfig).read_text().replace(cluster.client().server, "http://127.0.0.1:9"))
    assert_one_line_error(run_cli(cluster, "describe", JOB, "-n", namespace, "--kubeconfig", str(nowhere)),
                          "cannot reach the Kubernetes API at http://127.0.0.1:9")
    kube.create(TJ, job_manifest("nosecret", namespace, "print(1)", nodes=1,
                                 snapshot=snapshot_spec(cluster, secret="absent")), namespace=namespace)
    proc = run_cli(cluster, "snapshots", "nosecret", "-n", namespace)
    assert_one_line_error(proc, f"credentials Secret {namespace}/absent not found", "--local-credentials")
    # With --local-credentials the local AWS identity reads the (empty) folder.
    local = run_cli(cluster, "snapshots", "nosecret", "-n", namespace, "--local-credentials",
                    env=_env(cluster, **cluster.s3_env()))
    assert local.returncode == 0 and local.stdout.startswith("No snapshot folders under s3://"), local.stderr
    kube.create(TJ, job_manifest("nos3", namespace, "print(1)", nodes=1,
                                 snapshot=snapshot_spec(cluster, endpoint="http://127.0.0.1:9")), namespace=namespace)
    down = run_cli(cluster, "snapshots", "nos3", "-n", namespace)
    assert_one_line_error(down, "cannot list s3://", "127.0.0.1:9")
    # --s3-endpoint reaches the store the spec's endpoint does not.
    there = run_cli(cluster, "snapshots", "nos3", "-n", namespace, "--s3-endpoint", cluster.s3_endpoint)
    assert there.returncode == 0, there.stderr
    assert_no_secret(cluster, proc.stderr, local.stdout, down.stderr, there.stdout)


def test_issue12_context_and_namespace_come_from_the_kubeconfig_as_in_kubectl(cluster, namespace, job, tmp_path):
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    good = cfg["contexts"][0]
    cfg["clusters"].append({"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}})
    cfg["contexts"] = [{"name": "work", "context": {**good["context"], "namespace": namespace}},
                       {"name": "broken", "context": {**good["context"], "cluster": "gone"}}]
    cfg["current-context"] = "broken"
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    env = _env(cluster, KUBECONFIG=str(path))
    assert_one_line_error(run_cli(cluster, "describe", JOB, env=env), "cannot reach the Kubernetes API")
    ok = run_cli(cluster, "describe", JOB, "--context", "work", env=env)  # no -n: the context's namespace
    assert ok.returncode == 0 and f"Namespace:            {namespace}" in ok.stdout, ok.stderr
    assert_one_line_error(run_cli(cluster, "describe", JOB, "--context", "nope", env=env),
                          "context 'nope' not found")
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("kubectl-tj-*.kubeconfig"))  # the copy is gone


def test_issue12_plugin_makes_exactly_the_api_calls_its_rbac_lists(cluster, namespace, job):
    log = Path(cluster.state_dir) / "api-requests.jsonl"
    t0 = time.time()
    complete = job.uri_for(epoch=0, step=20)
    for args in (("snapshots", JOB), ("describe", JOB), ("resume", JOB, "--from", complete),
                 ("snapshot", JOB, "--no-wait")):
        run_cli(cluster, *args, "-n", namespace)
    entries = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    used = {(e["api_group"] or "", e["resource"], e["verb"]) for e in entries
            if e["user_agent"] == USER_AGENT and e["ts"] >= t0}
    assert used == set(ACCESS)
    docs = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    rows = {tuple(c.strip().strip("`").split("`")[0] for c in ln.split("|")[1:4])
            for ln in docs.split("RBAC a user of the plugin needs", 1)[1].split("**`resume`**", 1)[0].splitlines()
            if ln.startswith("| `")}
    assert {("" if g == '""' else g, r, v) for g, r, v in rows} == set(ACCESS)  # the docs list the same calls


EXEC_PLUGIN = """\
import json, os, sys
with open(sys.argv[1], "a") as f:
    f.write(os.environ["KUBERNETES_EXEC_INFO"] + "\\n")
if sys.argv[2] == "fail":
    sys.exit("token service unavailable")
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": sys.argv[2], "expirationTimestamp": "2999-01-01T00:00:00Z"}}))
"""


def _exec_kubeconfig(cluster, tmp_path: Path, token: str) -> tuple[Path, Path]:
    """The user's kubeconfig with an ``exec`` credential plugin (as EKS, GKE and AKS write them)."""
    script, calls = tmp_path / "plugin.py", tmp_path / "plugin-calls.jsonl"
    script.write_text(EXEC_PLUGIN)
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    cfg["users"] = [{"name": cfg["contexts"][0]["context"]["user"], "user": {"exec": {
        "apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
        "args": [str(script), str(calls), token], "interactiveMode": "Never"}}}]
    path = tmp_path / "exec-kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    return path, calls


def test_real_clusters_exec_credential_plugin_logs_the_plugin_in_as_its_identity(cluster, kube, namespace, job,
                                                                                 tmp_path):
    """EKS/GKE/AKS kubeconfigs log in through an exec plugin: its token is the identity used."""
    kube.create("serviceaccounts", {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}},
                namespace=namespace)
    grant = kube.create("serviceaccounts", {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                                            "metadata": {"name": "robot"}, "spec": {}},
                        namespace=namespace, subresource="token")
    path, calls = _exec_kubeconfig(cluster, tmp_path, grant["status"]["token"])
    proc = run_cli(cluster, "describe", JOB, "-n", namespace, env=_env(cluster, KUBECONFIG=str(path)))
    # The robot has no role: the API server refuses it by name (without the plugin, the request
    # would go out with no token, as the stand-in's loopback admin, and succeed).
    assert_one_line_error(proc, "403", f"system:serviceaccount:{namespace}:robot")
    info = json.loads(calls.read_text().splitlines()[0])
    assert info["kind"] == "ExecCredential" and info["spec"]["interactive"] is False
    failing, _ = _exec_kubeconfig(cluster, tmp_path, "fail")
    proc = run_cli(cluster, "describe", JOB, "-n", namespace, env=_env(cluster, KUBECONFIG=str(failing)))
    assert_one_line_error(proc, "exec plugin", "exited with 1", "token service unavailable")
def _read_request(fs, path: str) -> contract.SnapshotRequest | None:
    try:
        return contract.SnapshotRequest.from_json(fs.cat_file(path))
    except FileNotFoundError:
        return None


def test_issue12_snapshot_command_requests_one_and_waits_and_a_reclaim_taint_requests_one(
        cluster, kube, namespace, start_operator):
    """``kubectl tj snapshot``: the annotation, relayed by the real operator into S3 once, the
    ack (written here as the trainer's rank 0 writes it) copied into status.snapshot.lastRequest."""
    cluster.create_s3_secret(namespace)
    kube.create(TJ, job_manifest("req", namespace, "import time; time.sleep(120)", nodes=1,
                                 snapshot=snapshot_spec(cluster)), namespace=namespace)
    op = start_operator(["--resync-seconds", "1"])
    wait_status(kube, namespace, "req", lambda s: s.get("phase") == "Running", timeout=60, what="Running")
    root = contract.job_snapshot_root(f"s3://{cluster.bucket}/cli", namespace, "req")
    fs, path = s3.filesystem(contract.live_object_uri(root, contract.SNAPSHOT_REQUEST_OBJECT),
                             cluster.s3_storage_options())
    cli = subprocess.Popen([str(BIN / "kubectl-tj"), "snapshot", "req", "-n", namespace, "--value", "v1",
                            "--timeout", "60"], env=_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    request = wait_until(lambda: _read_request(fs, path), timeout=30, what="the operator to write the request object")
    assert request.value == "v1"
    assert cli.poll() is None, "the plugin returned before the snapshot was taken"
    ack = contract.SnapshotAck(value="v1", step=17, completed_at="2026-12-01T10:00:00.123Z",
                               snapshot=f"{root}/epoch_0_train_step_17", attempt=0)
    fs.pipe_file(path.replace(contract.SNAPSHOT_REQUEST_OBJECT, contract.SNAPSHOT_ACK_OBJECT), ack.to_json().encode())
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert out.strip() == f"snapshot v1 complete at step 17 (2026-12-01T10:00:00.123Z): {root}/epoch_0_train_step_17"
    st = kube.get(TJ, "req", namespace=namespace)["status"]["snapshot"]
    assert st["lastRequest"] == {"value": "v1", "step": 17, "completedAt": "2026-12-01T10:00:00.123Z",
                                 "snapshot": f"{root}/epoch_0_train_step_17"}
    assert st["request"]["value"] == "v1" and st["request"]["reason"] == "Annotation"
    # Relayed once, however many reconciles ran (resync 1 s) since.
    written = Path(op.log_path).read_text().count("snapshot request 'v1' written")
    assert written == 1, written
    reasons = [e["reason"] for e in events_of(kube, namespace, "req")]
    assert reasons.count("SnapshotRequested") == 1 and reasons.count("SnapshotRequestServed") == 1

    # Issue 12 item 2 on the same job: a reclaim taint on the pod's node asks for one at once.
    node = kube.get("pods", "req-0-0", namespace=namespace)["spec"]["nodeName"]
    taint = {"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}
    kube.patch("nodes", node, {"spec": {"taints": [taint]}})
    try:
        request = wait_until(lambda: (r := _read_request(fs, path)) and r.value != "v1" and r, timeout=30,
                             what="a request other than v1")
    finally:
        kube.patch("nodes", node, {"spec": {"taints": None}})
    assert request.value == f"reclaim-{node}-0"
    warned = [e["message"] for e in events_of(kube, namespace, "req") if e["reason"] == "ReclaimWarning"]
    assert warned == [f"node {node} (pod req-0-0) has a reclaim warning: taint karpenter.sh/disrupted:NoSchedule; "
                      f"requested snapshot reclaim-{node}-0"], warned
