"""Issue 11 item 2: a pod on a container node runs its image under podman with Kubernetes' rules.

Plain Pods against the podman stand-in (no operator): command/args vs
ENTRYPOINT/CMD, env, securityContext, emptyDir, terminationMessagePath,
runAsNonRoot verification, SIGTERM to PID 1 then SIGKILL after the grace period.
"""

from __future__ import annotations

import textwrap

import pytest

from localcluster.kube import Client, wait_until

pytestmark = [pytest.mark.slow]

# Runs as PID 1 of the trainer image: checks what the container got, then
# writes its termination message and exits 3.
CHECKS = textwrap.dedent("""
    import os, sys
    assert os.getpid() == 1, os.getpid()
    assert os.getuid() == 10001 and os.getgid() == 10001, (os.getuid(), os.getgid())
    assert os.environ["GREETING"] == "hello" and os.environ["ECHO"] == "hello!", dict(os.environ)
    open("/scratch/x", "w").write("ok")
    try:
        open("/etc/should-fail", "w")
        sys.exit("root filesystem is writable")
    except OSError as e:
        assert e.errno == 30, e  # EROFS
    cap_eff = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
    assert int(cap_eff, 16) == 0, cap_eff
    open("/dev/termination-log", "w").write("checked " + sys.argv[1])
    sys.exit(3)
""")


def pod(name: str, image: str, **container: object) -> dict:
    ctr = {"name": "main", "image": image, "terminationMessagePath": "/dev/termination-log", **container}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [ctr]}}


def terminated(kube: Client, ns: str, name: str, timeout: float = 90) -> dict:
    def done() -> dict | None:
        st = kube.get("pods", name, ns).get("status") or {}
        if st.get("phase") in ("Succeeded", "Failed"):
            return st["containerStatuses"][0]["state"]["terminated"]
        return None

    return wait_until(done, timeout=timeout, interval=0.2, what=f"pod {name} to terminate")


def test_issue11_item2_command_env_security_emptydir_termination_message(pkube, pns, images):
    body = pod("checks", images["trainer"], command=["python", "-c", CHECKS], args=["$(GREETING)"],
               env=[{"name": "GREETING", "value": "hello"}, {"name": "ECHO", "value": "$(GREETING)!"}],
               volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
               securityContext={"runAsUser": 10001, "runAsGroup": 10001, "runAsNonRoot": True,
                                "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}})
    body["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    pkube.create("pods", body, pns)
    state = terminated(pkube, pns, "checks")
    assert state["exitCode"] == 3, state
    assert state["reason"] == "Error" and state["message"] == "checked hello", state
    assert state["containerID"].startswith("podman://")


def test_issue11_item2_args_alone_replace_cmd_and_keep_entrypoint(pkube, pns, podman_cluster, images):
    pkube.create("pods", pod("help", images["operator"], args=["--help"]), pns)
    state = terminated(pkube, pns, "help")
    assert state["exitCode"] == 0, state
    log = (podman_cluster.state_dir / "pods" / pns / "help" / "main.log").read_text()
    assert "usage" in log.lower() and "trainingjob" in log.lower(), log[-2000:]


def test_issue11_item2_run_as_non_root_refuses_a_root_image(pkube, pns, images):
    pkube.create("pods", pod("rooty", images["python"], command=["true"], securityContext={"runAsNonRoot": True}), pns)

    def waiting() -> dict | None:
        for cs in (pkube.get("pods", "rooty", pns).get("status") or {}).get("containerStatuses") or []:
            return (cs.get("state") or {}).get("waiting")
        return None

    state = wait_until(waiting, timeout=30, what="a waiting reason")
    assert state["reason"] == "CreateContainerConfigError"
    assert "image will run as root" in state["message"]


@pytest.mark.parametrize("handles_term,exit_code", [(True, 0), (False, 137)])
def test_issue11_item2_sigterm_to_pid1_then_sigkill_after_grace(pkube, pns, podman_cluster, images, handles_term, exit_code):
    code = ("import signal, sys, time\n"
            + ("signal.signal(signal.SIGTERM, lambda *a: (print('TERM at PID', __import__('os').getpid(), flush=True), sys.exit(0)))\n"
               if handles_term else "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n")
            + "print('ready', flush=True)\ntime.sleep(300)\n")
    body = pod("sleeper", images["trainer"], command=["python", "-c", code])
    body["spec"]["terminationGracePeriodSeconds"] = 2
    pkube.create("pods", body, pns)
    log_path = podman_cluster.state_dir / "pods" / pns / "sleeper" / "main.log"
    wait_until(lambda: log_path.exists() and "ready" in log_path.read_text(), timeout=60, what="the container to start")
    pkube.delete("pods", "sleeper", pns)
    wait_until(lambda: not [p for p in pkube.list("pods", namespace=pns)], timeout=60, what="the pod to be gone")
    text = log_path.read_text()
    if handles_term:
        assert "TERM at PID 1" in text, text
    else:
        assert "TERM" not in text
    # The agent logged the container's terminated state before deleting the pod.
    agent_log = (podman_cluster.state_dir / "nodeagent.log").read_text()
    assert f"{pns}/sleeper exited: {{'exitCode': {exit_code}" in agent_log, agent_log[-3000:]
