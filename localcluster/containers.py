"""Container nodes: the node agent runs a pod as a podman container from its image.

Chosen per stand-in (``LocalCluster(runtime="podman")``, ``nodeagent
--runtime podman``); process nodes stay the default. Kubernetes' rules, as the
kubelet applies them:

* ``command`` replaces the image's ENTRYPOINT, ``args`` its CMD (either may be
  absent); ``$(VAR)`` references are expanded from the container's env.
* ``env`` (resolved by the agent, Secrets included) reaches podman through its
  own environment and ``--env NAME``, so no value appears on a command line.
* ``securityContext`` (pod level, then container level): ``runAsUser``,
  ``runAsGroup``, ``runAsNonRoot`` (verified against the image's USER as the
  kubelet does: CreateContainerConfigError when it is root or not numeric),
  ``readOnlyRootFilesystem`` (no tmpfs is added: /tmp is read-only unless a
  volume is mounted there), ``capabilities`` drop/add,
  ``allowPrivilegeEscalation: false``.
* ``resources.limits.memory`` is a real cgroup limit on a pod cgroup the agent
  creates (``memory/localcluster/pod<uid>``, as the kubelet makes a pod
  cgroup); the container runs under it (``--cgroup-parent``). An OOM kill is
  seen through the cgroup's ``memory.oom_control`` eventfd (how containerd
  learns of OOM kills on cgroup v1; podman 4.3 with runc reports
  ``OOMKilled: false`` here) and reported as ``reason: OOMKilled``, exit 137.
  ``limits.cpu`` becomes ``--cpus``.
* ``emptyDir`` volumes are folders of the pod directory (mode 0777, as the
  kubelet makes them), ``medium: Memory`` a tmpfs; other volume kinds are a
  CreateContainerConfigError.
* ``terminationMessagePath`` is a file of the pod directory bind-mounted at
  that path, read back by the agent after exit.
* Deletion: SIGTERM to PID 1 (``podman kill --signal TERM``), SIGKILL after
  the grace period.
* The image must exist locally (no registry is reachable): otherwise the
  container waits with ``ErrImageNeverPull`` / ``ErrImagePull``.

Networking: ``--network host`` (every pod shares the machine's loopback, as
process pods do), or with ``LocalCluster(network="netns")`` the pod's own
namespace (``--network ns:/run/netns/NAME``, :mod:`localcluster.netns`); ``/etc/hosts`` is a per-pod copy of the agent's hosts file,
rewritten in place when the agent's changes, without its ``::ffff:127.0.0.1``
lines: those are for nss_wrapper, and glibc's files backend turns them into
IPv4 entries that then hide the name from AF_INET6 + AI_V4MAPPED lookups
(c10d's first lookup), which glibc answers by itself from the IPv4 lines.
Its first line is the pod's own ``<podIP> <fqdn> <hostname>``, as the kubelet
writes it, so ``socket.getfqdn()`` is the pod's name, not ``localhost``:
torchrun's c10d rendezvous tells nodes apart by ``getfqdn()`` and PID, and
every container's launcher has the same PID in its own PID namespace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from localcluster.netns import PodNetwork
from localcluster.nodeagent import PID_FILE, ConfigError, Container, expand, now_rfc3339, proc_start_time, read_termination_message

Obj = dict[str, Any]
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "localcluster"
#: Label on every container, so leftovers of a stand-in can be found and removed.
STATE_LABEL = "localcluster.trainingjob.dev/state-dir"
UID_LABEL = "localcluster.trainingjob.dev/pod-uid"
_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|m|k)?$")
_FACTORS = {None: 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5, "E": 1000**6,
            "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6, "m": 0.001}


def parse_quantity(value: object) -> float:
    """A Kubernetes quantity (``512Mi``, ``1G``, ``250m``, ``2``) as a number."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ConfigError("CreateContainerConfigError", f"invalid quantity {value!r}")
    return float(m.group(1)) * _FACTORS[m.group(2)]


def podman(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, env=dict(env) if env else None,
                          stdin=subprocess.DEVNULL, timeout=timeout)


# ---------------------------------------------------------------------------
# The pod cgroup and its OOM notification
# ---------------------------------------------------------------------------
class PodCgroup:
    """``memory/localcluster/pod<uid>``: the pod's memory limit and an OOM-kill eventfd."""

    def __init__(self, uid: str, limit_bytes: int | None) -> None:
        self.name = f"pod{uid}"
        self.parent = f"/{CGROUP_PARENT}/{self.name}"
        self.memory_dir = CGROUP_ROOT / "memory" / CGROUP_PARENT / self.name
        self._efd: int | None = None
        self._ofd: int | None = None
        self.oom_kills = 0
        self.memory_dir.mkdir(parents=True, exist_ok=True)
        if limit_bytes:
            (self.memory_dir / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ofd = os.open(self.memory_dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        (self.memory_dir / "cgroup.event_control").write_text(f"{self._efd} {self._ofd}")

    def poll_oom(self) -> int:
        """OOM kills in the pod cgroup so far."""
        if self._efd is not None:
            try:
                self.oom_kills += os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
        return self.oom_kills

    def remove(self) -> None:
        """Close the eventfd and remove the pod cgroup in every controller (bottom-up)."""
        self.poll_oom()
        for fd in (self._efd, self._ofd):
            if fd is not None:
                os.close(fd)
        self._efd = self._ofd = None
        remove_pod_cgroups(self.name)


def remove_pod_cgroups(name: str) -> None:
    """rmdir ``localcluster/<name>`` and what podman made below it, in every controller (bottom-up)."""
    for controller in CGROUP_ROOT.iterdir():
        top = controller / CGROUP_PARENT / name
        if not top.is_dir():
            continue
        for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir(d)
        _rmdir(top)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# ---------------------------------------------------------------------------
# The pod's podman run
# ---------------------------------------------------------------------------
def pod_hosts(text: bytes, own: bytes) -> bytes:
    """The pod's /etc/hosts: its own line first, then the agent's file without the v4-mapped lines
    (nss_wrapper needs them, glibc chokes on them)."""
    return own + b"".join(line for line in text.splitlines(keepends=True) if not line.startswith(b"::ffff:"))


def own_hosts_line(pod: Obj, ip: str = "127.0.0.1") -> bytes:
    """``<podIP> <hostname>.<subdomain>.<ns>.svc.cluster.local <hostname>`` (the kubelet's line for the pod)."""
    md, spec = pod["metadata"], pod.get("spec") or {}
    hostname = spec.get("hostname") or md["name"]
    names = [hostname]
    if spec.get("subdomain"):
        names.insert(0, f"{hostname}.{spec['subdomain']}.{md.get('namespace', 'default')}.svc.cluster.local")
    return f"{ip} {' '.join(names)}\n".encode()


def _security(pod_spec: Obj, ctr: Obj) -> Obj:
    merged = dict(pod_spec.get("securityContext") or {})
    merged.update(ctr.get("securityContext") or {})
    return merged


def image_user(image: str) -> str:
    out = podman("image", "inspect", "--format", "{{.Config.User}}", image)
    return out.stdout.strip() if out.returncode == 0 else ""


def check_non_root(sc: Obj, image: str) -> None:
    """The kubelet's runAsNonRoot verification."""
    if not sc.get("runAsNonRoot"):
        return
    if sc.get("runAsUser") is not None:
        if int(sc["runAsUser"]) == 0:
            raise ConfigError("CreateContainerConfigError", "container's runAsUser breaks non-root policy")
        return
    user = image_user(image).split(":")[0]
    if not user or user in ("0", "root"):
        raise ConfigError("CreateContainerConfigError", "container has runAsNonRoot and image will run as root")
    if not user.isdigit():
        raise ConfigError("CreateContainerConfigError",
                          f"container has runAsNonRoot and image has non-numeric user ({user}), cannot verify user is non-root")


def security_flags(sc: Obj) -> list[str]:
    flags: list[str] = []
    if sc.get("runAsUser") is not None:
        group = sc.get("runAsGroup")
        flags += ["--user", f"{int(sc['runAsUser'])}" + (f":{int(group)}" if group is not None else "")]
    if sc.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.get("capabilities") or {}
    flags += [f"--cap-drop={c}" for c in caps.get("drop") or []]
    flags += [f"--cap-add={c}" for c in caps.get("add") or []]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    return flags


def volume_flags(pod_spec: Obj, ctr: Obj, pod_dir: Path) -> list[str]:
    """emptyDir volumes as pod-directory folders (or tmpfs) at each volumeMount."""
    volumes = {v.get("name"): v for v in pod_spec.get("volumes") or []}
    flags: list[str] = []
    for mount in ctr.get("volumeMounts") or []:
        vol = volumes.get(mount.get("name"))
        if vol is None:
            raise ConfigError("CreateContainerConfigError", f"volumeMount {mount.get('name')!r} names no volume")
        if "emptyDir" not in vol:
            kinds = sorted(k for k in vol if k != "name")
            raise ConfigError("CreateContainerConfigError",
                              f"localcluster container nodes support emptyDir volumes only, {vol['name']!r} is {kinds}")
        ro = ",ro" if mount.get("readOnly") else ""
        if (vol["emptyDir"] or {}).get("medium") == "Memory":
            flags += ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-mode=1777"]
            continue
        host = pod_dir / "volumes" / vol["name"]
        host.mkdir(parents=True, exist_ok=True)
        host.chmod(0o777)
        flags += ["--mount", f"type=bind,source={host},destination={mount['mountPath']}{ro}"]
    return flags


def resource_flags(ctr: Obj) -> tuple[list[str], int | None]:
    """``--cpus`` from limits.cpu, and limits.memory in bytes (set on the pod cgroup)."""
    limits = (ctr.get("resources") or {}).get("limits") or {}
    flags = [f"--cpus={parse_quantity(limits['cpu']):g}"] if "cpu" in limits else []
    memory = int(parse_quantity(limits["memory"])) if "memory" in limits else None
    return flags, memory


def entrypoint_flags(ctr: Obj, env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(``--entrypoint`` flag, trailing argv): command replaces ENTRYPOINT, args replace CMD."""
    command = [expand(str(a), env) for a in ctr.get("command") or []]
    args = [expand(str(a), env) for a in ctr.get("args") or []]
    flags = ["--entrypoint", json.dumps(command)] if command else []
    return flags, args


@dataclass
class PodmanContainer(Container):
    """A pod's container run by ``podman run`` (attached: ``proc`` is the podman client)."""

    cname: str = ""
    cgroup: PodCgroup | None = None
    hosts_src: Path | None = None
    hosts_dst: Path | None = None
    hosts_own: bytes = b""
    _hosts_mtime: float = field(default=0.0)

    def poll(self) -> int | None:
        self.sync_hosts()
        return super().poll()

    def sync_hosts(self) -> None:
        """Copy the agent's hosts file into the pod's, in place (the bind mount keeps its inode)."""
        if self.hosts_src is None or self.hosts_dst is None:
            return
        try:
            mtime = self.hosts_src.stat().st_mtime
            if mtime != self._hosts_mtime:
                data = pod_hosts(self.hosts_src.read_bytes(), self.hosts_own)
                with open(self.hosts_dst, "r+b") as fh:
                    fh.write(data)
                    fh.truncate()
                self._hosts_mtime = mtime
        except OSError:
            pass

    def _terminated_state(self, rc: int) -> Obj:
        info = podman("inspect", "--format", "{{json .State}}", self.cname)
        state_info: Obj = json.loads(info.stdout) if info.returncode == 0 and info.stdout.strip() else {}
        exit_code = int(state_info.get("ExitCode", rc if rc >= 0 else 128 - rc))
        oom = bool(self.cgroup and self.cgroup.poll_oom()) or bool(state_info.get("OOMKilled"))
        reason = "OOMKilled" if oom else ("Completed" if exit_code == 0 else "Error")
        cid = podman("inspect", "--format", "{{.Id}}", self.cname).stdout.strip()
        state: Obj = {"exitCode": exit_code, "reason": reason, "startedAt": self.started_at,
                      "finishedAt": now_rfc3339(), "containerID": f"podman://{cid or self.cname}"}
        message = read_termination_message(self.term_path, self.log_path, self.policy, exit_code)
        if message:
            state["message"] = message
        podman("rm", "--force", "--ignore", self.cname)
        if self.cgroup is not None:
            self.cgroup.remove()
        return state

    def terminate(self) -> None:
        """SIGTERM to the container's PID 1."""
        if self.term_sent_at is None:
            self.term_sent_at = time.monotonic()
            podman("kill", "--signal", "TERM", self.cname)

    def kill(self) -> None:
        """SIGKILL the container (all of its processes: the runtime kills its cgroup)."""
        self.killed = True
        podman("kill", "--signal", "KILL", self.cname)
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)


@dataclass
class PodmanRuntime:
    """Starts pods as podman containers for one node agent.

    Args:
        state_dir: The stand-in's state folder (labels the containers for cleanup).
        hosts_path: The agent's hosts file (copied into each pod's /etc/hosts).
    """

    state_dir: Path
    hosts_path: Path

    def start(self, *, pod: Obj, ctr: Obj, pod_env: Mapping[str, str], pod_dir: Path,
              pod_net: PodNetwork | None = None) -> PodmanContainer:
        """``podman run`` the pod's container; raises ConfigError for a pod it cannot run.

        With ``pod_net`` the container joins the pod's network namespace
        (``--network ns:/run/netns/NAME``), else the host's network.
        """
        md, spec = pod["metadata"], pod.get("spec") or {}
        uid, image = md.get("uid", ""), ctr.get("image") or ""
        if podman("image", "exists", image).returncode != 0:
            reason = "ErrImageNeverPull" if ctr.get("imagePullPolicy") == "Never" else "ErrImagePull"
            raise ConfigError(reason, f"image {image!r} is not present on the node and no registry is reachable")
        cname = ctr.get("name") or "main"
        hostname = spec.get("hostname") or md["name"]
        env = {**pod_env, "HOSTNAME": hostname}
        sc = _security(spec, ctr)
        check_non_root(sc, image)
        entry, args = entrypoint_flags(ctr, env)
        res, memory = resource_flags(ctr)
        flags = security_flags(sc) + volume_flags(spec, ctr, pod_dir) + res + entry
        log_path, term_path, hosts = pod_dir / f"{cname}.log", pod_dir / f"{cname}.termination-log", pod_dir / "hosts"
        term_path.write_bytes(b"")
        term_path.chmod(0o666)
        own = own_hosts_line(pod, pod_net.ip) if pod_net else own_hosts_line(pod)
        hosts.write_bytes(pod_hosts(self.hosts_path.read_bytes(), own))
        term_dest = ctr.get("terminationMessagePath") or "/dev/termination-log"
        name = f"lc-{uid}"
        podman("rm", "--force", "--ignore", name)
        cgroup = PodCgroup(uid, memory)
        network = f"--network=ns:{pod_net.path}" if pod_net else "--network=host"
        argv = ["podman", "run", "--name", name, "--pull=never", network, "--hostname", hostname,
                "--cgroup-parent", cgroup.parent, "--label", f"{STATE_LABEL}={self.state_dir}",
                "--label", f"{UID_LABEL}={uid}", "--mount", f"type=bind,source={hosts},destination=/etc/hosts,ro",
                "--mount", f"type=bind,source={term_path},destination={term_dest}",
                *[f"--env={k}" for k in env], *(["--workdir", ctr["workingDir"]] if ctr.get("workingDir") else []),
                *flags, image, *args]
        started = now_rfc3339()
        try:
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        except OSError:
            cgroup.remove()
            raise
        pid_file = pod_dir / PID_FILE
        pid_file.write_text(json.dumps({"pid": proc.pid, "start": proc_start_time(proc.pid), "uid": uid, "podman": name}))
        return PodmanContainer(
            uid=uid, namespace=md.get("namespace", "default"), pod=md["name"], node=spec["nodeName"], name=cname,
            proc=proc, log_path=log_path, term_path=term_path, policy=ctr.get("terminationMessagePolicy") or "File",
            started_at=started, pid_file=pid_file, cname=name, cgroup=cgroup, hosts_src=self.hosts_path, hosts_dst=hosts,
            hosts_own=own,
        )


def remove_containers(state_dir: Path) -> list[str]:
    """Force-remove every container a stand-in at ``state_dir`` left (by label), and its pods' cgroups."""
    if not shutil.which("podman"):
        return []
    out = podman("ps", "--all", "--filter", f"label={STATE_LABEL}={state_dir}", "--format", "{{.Names}}")
    names = [n for n in out.stdout.split() if n]
    if names:
        podman("rm", "--force", "--time", "0", *names)
    # Pod cgroups of containers the agent killed on its way out (no exit was reported for them).
    for uid_file in (state_dir / "pods").glob("*/*/uid"):
        uid = uid_file.read_text().strip()
        if uid:
            remove_pod_cgroups(f"pod{uid}")
    return names


def operator_container_argv(*, image: str, kubeconfig: str | os.PathLike[str], state_dir: Path, name: str,
                            health_port: int, env: Mapping[str, str] | None = None) -> list[str]:
    """``podman run`` of the operator image as the chart runs it, against the stand-in.

    The chart's settings as env (``TJ_OPERATOR_*``), its securityContext (UID
    65532, read-only root filesystem with /tmp a writable volume, no
    capabilities), the kubeconfig mounted read-only (a kubeconfig instead of a
    service account: the stand-in's API serves no in-cluster token). The host's
    network, like every container node here; ``health_port`` must be free.
    Extra args (appended after this argv) replace the image's CMD.
    """
    conf = state_dir / f"{name}.kubeconfig"
    shutil.copyfile(kubeconfig, conf)
    conf.chmod(0o644)
    settings = {"KUBECONFIG": "/etc/trainingjob/kubeconfig", "TJ_OPERATOR_LOG_LEVEL": "INFO",
                "TJ_OPERATOR_METRICS_PORT": "0", "TJ_OPERATOR_HEALTH_PORT": str(health_port), **(env or {})}
    return ["podman", "run", "--rm", "--name", f"lc-{name}-{os.getpid()}", "--pull=never", "--network=host",
            "--label", f"{STATE_LABEL}={state_dir}", "--user", "65532:65532", "--read-only", "--read-only-tmpfs=false",
            "--mount", "type=tmpfs,destination=/tmp,tmpfs-size=64m", "--cap-drop=ALL",
            "--security-opt", "no-new-privileges",
            "--mount", f"type=bind,source={conf},destination=/etc/trainingjob/kubeconfig,ro",
            *[f"--env={k}={v}" for k, v in settings.items()], image]
