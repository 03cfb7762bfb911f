"""The node agent: a kubelet (plus a trivial scheduler and node lifecycle
controller) for a few named nodes, running every container as a local process.

    python -m localcluster.nodeagent --kubeconfig K --state-dir DIR --nodes node-0,node-1,node-2

What it does, per tick (woken by a pod watch, at least every ``--interval``;
the pods come from an informer, :mod:`localcluster.informer`, not a LIST per tick):

* registers the Node objects and posts their heartbeat (Ready=True);
* binds unscheduled pods to a node that passes kube-scheduler's filters
  (resources, taints, node selector and affinity: :mod:`localcluster.scheduler`),
  fewest active pods first, via the ``binding`` subresource when the API
  server has it, else by patching ``spec.nodeName`` (the scheduler and the
  node lifecycle controller live in :mod:`localcluster.controlplane`);
* starts each bound pod's single container as a process (``command`` +
  ``args`` as argv, never a shell, the venv's ``bin`` first on PATH), in its
  own session/process group, with stdout+stderr in
  ``DIR/pods/<ns>/<pod>/<container>.log``;
* reports the pod status as the kubelet does (Pending -> Running ->
  Succeeded/Failed, ``state.terminated`` with the exit code and the
  termination message);
* honours graceful deletion: SIGTERM to the main process, SIGKILL to the whole
  process group after ``deletionGracePeriodSeconds``, final status, then
  ``DELETE`` with ``gracePeriodSeconds=0``;
* loses a node whose annotation :data:`LOST_ANNOTATION` is ``"true"``: all its
  processes are SIGKILLed at once, its pods are left as they are in the API
  (Running, as when a kubelet dies) and after ``--node-monitor-grace-seconds``
  the Node becomes Ready=Unknown (NodeStatusUnknown) and its pods Ready=False;
* partitions a node whose annotation :data:`PARTITIONED_ANNOTATION` is
  ``"true"`` (:meth:`NodeAgent.sync_partition`): as a lost node, but its
  processes keep running (and keep reaching S3); when it heals, the agent
  sees which of its pods are gone and stops their processes, as a kubelet
  that reconnects does;
* keeps ``DIR/hosts`` (an nss_wrapper hosts file) mapping every pod's and
  Service's DNS names to 127.0.0.1 (with ``--netns-index``: to the pod's own
  IP, each pod running in a network namespace of its own, :mod:`localcluster.netns`);
  every container runs with ``LD_PRELOAD=libnss_wrapper.so NSS_WRAPPER_HOSTS=DIR/hosts``.

Deviations from a kubelet are listed in ``localcluster/README.md``.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from trainingjob_trainer import contract

from localcluster.controlplane import HOSTNAME_LABEL, TERMINAL, ControlPlaneMixin, LostNode, cond, merge_conditions, now_rfc3339
from localcluster.dns import LOOPBACK, HostsFile, dns_records
from localcluster.hollow import RUNTIME_VERSION as HOLLOW_RUNTIME_VERSION
from localcluster.hollow import HollowContainer, Schedule, ScheduleError
from localcluster.imageref import IMAGE_PULL_BACKOFF_SECONDS, UNPULLABLE_REGISTRY, image_reference_valid
from localcluster.informer import Informer
from localcluster.kube import ApiError, Client, Obj
from localcluster.netns import HostNetwork, PodNetwork, PodNetworks

log = logging.getLogger("localcluster.nodeagent")

#: Set to "true" on a Node (by :func:`localcluster.control.lose_node`) to lose it.
LOST_ANNOTATION = "localcluster.trainingjob.dev/lost"
#: Set to "true" on a Node (by :func:`localcluster.control.partition_node`) to cut it
#: off the API server: no heartbeats, no pod status, its processes keep running.
PARTITIONED_ANNOTATION = "localcluster.trainingjob.dev/partitioned"
#: Written into every pod directory: pid, process start time and pod uid, so
#: ``LocalCluster.stop`` can make sure no container process outlives the agent.
PID_FILE = "container.pid"
NSS_WRAPPER_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so",
    "/usr/lib/aarch64-linux-gnu/libnss_wrapper.so",
    "/usr/lib64/libnss_wrapper.so",
    "/usr/lib/libnss_wrapper.so",
    "/usr/local/lib/libnss_wrapper.so",
)
LOG_TAIL_BYTES = 2048
LOG_TAIL_LINES = 80


class ConfigError(Exception):
    """The container cannot be created yet (kubelet keeps the pod Pending)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def find_nss_wrapper() -> str | None:
    """Path of libnss_wrapper.so, or None (``$LOCALCLUSTER_NSS_WRAPPER`` wins)."""
    env = os.environ.get("LOCALCLUSTER_NSS_WRAPPER")
    if env:
        return env if os.path.exists(env) else None
    for cand in NSS_WRAPPER_CANDIDATES:
        if os.path.exists(cand):
            return cand
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "libnss_wrapper.so" in line and "=>" in line:
            return line.split("=>", 1)[1].strip()
    return None


NSS_MISSING_MESSAGE = (
    "libnss_wrapper.so not found. The node agent needs it so that pods resolve their\n"
    "DNS names (<host>.<subdomain>.<ns>.svc.cluster.local) to 127.0.0.1.\n"
    "Install it with:  python -m localcluster.tools install   (or: apt-get install libnss-wrapper)"
)


# ---------------------------------------------------------------------------
# Container environment
# ---------------------------------------------------------------------------
_VAR_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion (``$$`` escapes; unknown refs stay as is)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_RE.sub(sub, value)


def _field_ref(pod: Obj, path: str, addresses: tuple[str, str] = (LOOPBACK, LOOPBACK)) -> str:
    md = pod.get("metadata", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": md.get("name"),
        "metadata.namespace": md.get("namespace"),
        "metadata.uid": md.get("uid"),
        "spec.nodeName": pod.get("spec", {}).get("nodeName"),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
        "status.podIP": addresses[0],
        "status.podIPs": addresses[0],
        "status.hostIP": addresses[1],
        "status.hostIPs": addresses[1],
    }
    if path not in simple:
        raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")
    return str(simple[path] or "")


class EnvResolver:
    """Builds a container's env from the pod spec, reading Secrets/ConfigMaps."""

    def __init__(self, client: Client, addresses: Callable[[Obj], tuple[str, str]] | None = None) -> None:
        self.client = client
        #: (podIP, hostIP) of a pod, for ``fieldRef`` (default: both 127.0.0.1, the host's network).
        self.addresses = addresses or (lambda _pod: (LOOPBACK, LOOPBACK))

    def _data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        resource = "secrets" if kind == "Secret" else "configmaps"
        try:
            obj = self.client.get(resource, name, namespace)
        except ApiError as e:
            if e.status == 404:
                if optional:
                    return None
                raise ConfigError("CreateContainerConfigError", f'{kind.lower()} "{name}" not found') from None
            raise
        out: dict[str, str] = {}
        for k, v in (obj.get("data") or {}).items():
            if kind == "Secret":
                try:
                    out[k] = base64.b64decode(v).decode("utf-8", "replace")
                except (ValueError, TypeError):
                    raise ConfigError("CreateContainerConfigError", f"secret {name}: key {k} is not base64") from None
            else:
                out[k] = str(v)
        for k, v in (obj.get("stringData") or {}).items():
            out.setdefault(k, str(v))
        return out

    def resolve(self, pod: Obj, container: Obj) -> dict[str, str]:
        ns = pod["metadata"].get("namespace", "default")
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                ref = src.get(key)
                if ref:
                    data = self._data(kind, ns, ref.get("name", ""), bool(ref.get("optional")))
                    for k, v in (data or {}).items():
                        env[prefix + k] = v
        for var in container.get("env") or []:
            name = var.get("name")
            if not name:
                raise ConfigError("CreateContainerConfigError", "env var without a name")
            if "value" in var:
                env[name] = expand(str(var["value"]), env)
                continue
            vf = var.get("valueFrom") or {}
            if not vf:
                env[name] = ""
            elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind, ref = ("Secret", vf["secretKeyRef"]) if "secretKeyRef" in vf else ("ConfigMap", vf["configMapKeyRef"])
                optional = bool(ref.get("optional"))
                data = self._data(kind, ns, ref.get("name", ""), optional)
                if data is None:
                    continue
                if ref.get("key") not in data:
                    if optional:
                        continue
                    raise ConfigError(
                        "CreateContainerConfigError",
                        f"couldn't find key {ref.get('key')} in {kind} {ns}/{ref.get('name')}",
                    )
                env[name] = data[ref["key"]]
            elif "fieldRef" in vf:
                env[name] = _field_ref(pod, vf["fieldRef"].get("fieldPath", ""), self.addresses(pod))
            elif "resourceFieldRef" in vf:
                res = vf["resourceFieldRef"].get("resource", "")
                kind, _, rname = res.partition(".")
                env[name] = str(((container.get("resources") or {}).get(kind) or {}).get(rname, "0"))
            else:
                raise ConfigError("CreateContainerConfigError", f"env {name}: unsupported valueFrom {sorted(vf)}")
        return env


# ---------------------------------------------------------------------------
# Running containers
# ---------------------------------------------------------------------------
def proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), to detect PID reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


#: Set in every container's environment; inherited by every process the
#: container starts (torchrun's workers run in sessions of their own), so
#: killing "the container" finds them all, as a cgroup kill would.
CONTAINER_MARK_ENV = "LOCALCLUSTER_CONTAINER"


def kill_group(pgid: int, sig: int, mark: str | None = None) -> None:
    """Signal a container: its process group and, with ``mark``, every process carrying it."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    if not mark:
        return
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(CONTAINER_MARK_ENV) == mark:
                proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue


@dataclass
class Container:
    """One running (or finished) container process of a pod."""

    uid: str
    namespace: str
    pod: str
    node: str
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    term_path: Path
    policy: str
    started_at: str
    pid_file: Path
    term_sent_at: float | None = None
    killed: bool = False
    exit_status: Obj | None = None  # the terminated state once exited
    running_reported: bool = False

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.exit_status is None:
            # The container stops when its main process exits: kill what is left.
            kill_group(self.proc.pid, signal.SIGKILL, self.uid)
            self.exit_status = self._terminated_state(rc)
            try:
                self.pid_file.unlink()
            except OSError:
                pass
        return rc

    def _terminated_state(self, rc: int) -> Obj:
        exit_code = rc if rc >= 0 else 128 - rc
        state: Obj = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": self.started_at,
            "finishedAt": now_rfc3339(),
            "containerID": f"localcluster://{self.proc.pid}",
        }
        if rc < 0:
            state["signal"] = -rc
        message = read_termination_message(self.term_path, self.log_path, self.policy, exit_code)
        if message:
            state["message"] = message
        return state

    def terminate(self) -> None:
        """SIGTERM to the main process only (as PID 1 of a container gets it)."""
        if self.term_sent_at is None:
            self.term_sent_at = time.monotonic()
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL every process of the container (group and marked descendants)."""
        self.killed = True
        kill_group(self.proc.pid, signal.SIGKILL, self.uid)

    @property
    def container_id(self) -> str:
        return f"localcluster://{self.proc.pid}"

    def reap(self) -> None:
        """Wait (briefly) for the killed main process and drop its pid file."""
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            self.pid_file.unlink()
        except OSError:
            pass


def read_termination_message(term_path: Path, log_path: Path, policy: str, exit_code: int) -> str:
    """The kubelet's rule: the file (<= 4096 bytes), else the log tail on error."""
    try:
        with open(term_path, "rb") as fh:
            data = fh.read(contract.TERMINATION_MESSAGE_MAX_BYTES)
    except OSError:
        data = b""
    text = data.decode("utf-8", "replace")
    if text.strip() or policy != "FallbackToLogsOnError" or exit_code == 0:
        return text
    try:
        with open(log_path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            tail = fh.read()
    except OSError:
        return ""
    lines = tail.decode("utf-8", "replace").splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------
@dataclass
class AgentConfig:
    kubeconfig: str
    state_dir: Path
    nodes: tuple[str, ...]
    node_monitor_grace_seconds: float = 2.0
    pod_eviction_seconds: float | None = None
    interval: float = 0.25
    #: The kubelet's nodeStatusUpdateFrequency (10 s); the nodes' heartbeats are spread over it.
    heartbeat_seconds: float = 10.0
    #: Every node hollow (pods run no process: :mod:`localcluster.hollow`); per node: ``node_config[n]["hollow"]``.
    hollow: bool = False
    pass_env: tuple[str, ...] = ("PYTHONPATH", "LANG", "LC_ALL", "TZ")
    nss_wrapper: str | None = None
    #: Per node name (or ``"*"``): ``{"capacity": {...}, "labels": {...}, "taints": [...]}``.
    node_config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: "process" (the default: a local process per container) or "podman"
    #: (container nodes: the pod's image under podman, see localcluster/containers.py).
    runtime: str = "process"
    #: With a subnet index: a network namespace per pod (:mod:`localcluster.netns`); None: the host's network.
    netns_index: int | None = None


class NodeAgent(ControlPlaneMixin):
    """The kubelet stand-in for ``config.nodes``. Call :meth:`run`; :meth:`stop` ends it."""

    def __init__(self, config: AgentConfig, client: Client | None = None) -> None:
        self.cfg = config
        self.client = client or Client.from_kubeconfig(config.kubeconfig)
        self.env_resolver = EnvResolver(self.client, self._addresses)
        self.state_dir = config.state_dir
        self.pods_dir = self.state_dir / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.hosts = HostsFile(self.state_dir / "hosts")
        self.containers: dict[str, Container | HollowContainer] = {}  # by pod uid
        self.lost: dict[str, LostNode] = {}
        #: Partitioned nodes (also in :attr:`lost`: judged as lost), whose processes run on.
        self.partitioned: set[str] = set()
        self.ready_nodes: set[str] = set()
        self._next_heartbeat: dict[str, float] = {}  # node -> time.monotonic() its next heartbeat is due
        self._heartbeat_epoch = time.monotonic()
        self._binding_supported: bool | None = None
        self._nodes_cache: dict[str, Obj] = {}
        self._config_errors: dict[str, str] = {}  # pod uid -> last reported message
        self._pull_failed: dict[str, float] = {}  # pod uid -> when its image pull first failed
        #: Pod uids whose final status this agent wrote: the informer may still hold the pod as
        #: it was before (Running), which must not read as "ran under a previous agent".
        self._finished: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.venv_bin = os.path.dirname(os.path.abspath(sys.executable))
        #: The pods' network: the machine's, or a namespace per pod (:mod:`localcluster.netns`).
        self.network: HostNetwork = (HostNetwork() if config.netns_index is None
                                     else PodNetworks(index=config.netns_index, state_dir=self.state_dir))
        self._dns_input: tuple[list[Obj], list[Obj]] = ([], [])
        self.runtime: Any = None
        if config.runtime == "podman":
            from localcluster.containers import PodmanRuntime

            self.runtime = PodmanRuntime(state_dir=self.state_dir, hosts_path=self.hosts.path)
        #: Every pod, from one LIST and then a WATCH (a pass reads it, it does not LIST).
        self.pods = Informer(client=self._own_client(), resource="pods", on_event=self._wake.set)

    # -------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self) -> None:
        threading.Thread(target=self.pods.run, args=(self._stop,), name="pod-informer", daemon=True).start()
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - the agent never dies of one bad tick
                    log.exception("tick failed")
                self._wake.wait(self.cfg.interval)
                self._wake.clear()
        finally:
            self.kill_all()
            self.network.remove_all()

    def kill_all(self) -> None:
        """SIGKILL every container process group this agent started."""
        self._kill_and_reap(list(self.containers.values()))

    @staticmethod
    def _kill_and_reap(victims: list[Container | HollowContainer]) -> None:
        for c in victims:
            c.kill()
        for c in victims:
            c.reap()

    def _own_client(self) -> Client:
        """A client of its own for a thread: a requests.Session is not shared across threads."""
        return Client(self.client.server, verify=self.client.session.verify, cert=self.client.session.cert,  # type: ignore[arg-type]
                      token=(self.client.session.headers.get("Authorization") or "").removeprefix("Bearer ") or None)

    # -------------------------------------------------------------- one pass
    def tick(self) -> None:
        self.sync_nodes()
        if not self.pods.synced.is_set():
            return  # an empty cache is not "every pod is gone"
        pods = self.pods.items()
        try:
            services = self.client.list("services")
        except ApiError:
            services = []
        self._dns_input = (pods, services)
        self._update_hosts()
        self.schedule(pods)
        seen: set[str] = set()
        for pod in pods:
            uid = pod["metadata"].get("uid", "")
            seen.add(uid)
            node = (pod.get("spec") or {}).get("nodeName")
            if node not in self.cfg.nodes or node in self.lost:
                continue
            try:
                self.sync_pod(pod)
            except ApiError as e:
                log.warning("pod %s/%s: %s", pod["metadata"].get("namespace"), pod["metadata"].get("name"), e)
            except Exception:  # noqa: BLE001
                log.exception("pod %s/%s", pod["metadata"].get("namespace"), pod["metadata"].get("name"))
        self._finished &= seen
        for uid in set(self._pull_failed) - seen:
            del self._pull_failed[uid]
        # Pods that vanished from the API (force-deleted): stop their processes.
        for uid, c in list(self.containers.items()):
            if uid not in seen and c.node not in self.partitioned:  # a partitioned kubelet does not know
                if c.poll() is None:
                    if c.term_sent_at is None:
                        c.terminate()
                    elif time.monotonic() - c.term_sent_at > 30:
                        c.kill()
                    continue
                del self.containers[uid]
        # A pod's namespace goes once the pod is gone or terminal and its container stopped.
        active = seen - {p["metadata"].get("uid", "") for p in pods if (p.get("status") or {}).get("phase") in TERMINAL}
        self.network.prune(keep=set(self.containers) | (active - self._finished))
        self.sync_lost_nodes(pods)

    # -------------------------------------------------------------- pod networks
    def _addresses(self, pod: Obj) -> tuple[str, str]:
        """(podIP, hostIP): 127.0.0.1 twice on the host's network; the pod's own and the gateway with netns."""
        return self.network.ip(pod) or "", self.network.gateway

    def _update_hosts(self) -> None:
        pods, services = self._dns_input
        self.hosts.update(dns_records(pods, services, pod_ip=self.network.ip,
                                      service_fallback=self.network.service_fallback))

    def _pod_network(self, pod: Obj) -> PodNetwork | None:
        """The pod's namespace (made on first use, its name in the hosts file at once), or None."""
        net, created = self.network.ensure(pod)
        if created:
            self._update_hosts()  # the pod's own name before its process looks it up
        return net

    # -------------------------------------------------------------- nodes
    def _node_config(self, name: str) -> Mapping[str, Any]:
        cfg = self.cfg.node_config
        return cfg.get(name) or cfg.get("*") or {}

    def is_hollow(self, name: str) -> bool:
        """Pods of this node run no process (``--hollow`` or ``node_config[name]["hollow"]``)."""
        return self.cfg.hollow or bool(self._node_config(name).get("hollow"))

    def _node_resources(self, name: str) -> dict[str, str]:
        """Capacity (= allocatable): the machine's, unless ``node_config`` says otherwise."""
        try:
            mem = f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 1024}Ki"
        except (ValueError, OSError):
            mem = "8Gi"
        resources = {"cpu": str(os.cpu_count() or 1), "memory": mem, "pods": "110", "ephemeral-storage": "100Gi"}
        resources.update({k: str(v) for k, v in (self._node_config(name).get("capacity") or {}).items()})
        return resources

    def _node_status(self, name: str, ready: str, reason: str, message: str) -> Obj:
        now = now_rfc3339()
        resources = self._node_resources(name)
        return {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": self.network.gateway}, {"type": "Hostname", "address": name}],
            "conditions": [
                {
                    "type": "Ready",
                    "status": ready,
                    "reason": reason,
                    "message": message,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.33.0-localcluster",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": HOLLOW_RUNTIME_VERSION if self.is_hollow(name) else "localcluster://process",
                "osImage": "localcluster",
                "kernelVersion": os.uname().release,
                "machineID": name,
                "systemUUID": name,
                "bootID": name,
                "kubeProxyVersion": "",
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }

    def _patch_node_ready(self, node: Obj, ready: str, reason: str, message: str) -> None:
        name = node["metadata"]["name"]
        status = self._node_status(name, ready, reason, message)
        old = {c.get("type"): c for c in (node.get("status") or {}).get("conditions") or []}.get("Ready")
        if old and old.get("status") == ready and old.get("lastTransitionTime"):
            status["conditions"][0]["lastTransitionTime"] = old["lastTransitionTime"]
        self.client.patch("nodes", name, {"status": status}, subresource="status")

    def _heartbeat_posted(self, name: str) -> None:
        """Schedule the node's next heartbeat in its own slot of the period.

        Node ``i`` of ``n`` posts at ``epoch + period * (i/n + k)``, so the
        heartbeats stay spread over the period (kubelets do not post in
        lockstep), and a node that posted late (after a slow pass) goes back
        to its slot instead of joining everyone else's.
        """
        nodes, period = self.cfg.nodes, self.cfg.heartbeat_seconds
        slot = self._heartbeat_epoch + period * (nodes.index(name) if name in nodes else 0) / max(1, len(nodes))
        now = time.monotonic()
        self._next_heartbeat[name] = slot + (math.floor((now - slot) / period) + 1) * period

    def sync_nodes(self) -> None:
        existing = {n["metadata"]["name"]: n for n in self.client.list("nodes")}
        now = time.monotonic()
        for name in self.cfg.nodes:
            node = existing.get(name)
            if node is None:
                body = {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": {
                            HOSTNAME_LABEL: name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            "node.kubernetes.io/instance-type": "localcluster",
                            **(self._node_config(name).get("labels") or {}),
                        },
                    },
                    "spec": {"taints": list(self._node_config(name).get("taints") or [])} if self._node_config(name).get("taints") else {},
                    "status": self._node_status(name, "True", "KubeletReady", "kubelet is posting ready status"),
                }
                try:
                    node = self.client.create("nodes", body)
                except ApiError as e:
                    if e.status != 409:
                        raise
                    node = self.client.get("nodes", name)
                self._patch_node_ready(node, "True", "KubeletReady", "kubelet is posting ready status")
                self._heartbeat_posted(name)
                self.ready_nodes.add(name)
                continue
            annotations = node["metadata"].get("annotations") or {}
            lost = annotations.get(LOST_ANNOTATION) == "true"
            if self.sync_partition(node, annotations.get(PARTITIONED_ANNOTATION) == "true" and not lost):
                continue
            if lost and name not in self.lost:
                self.lose(name)
            elif not lost and name in self.lost:
                self.recover(node)
            elif not lost and now >= self._next_heartbeat.get(name, 0):
                self._patch_node_ready(node, "True", "KubeletReady", "kubelet is posting ready status")
                self._heartbeat_posted(name)
                self.ready_nodes.add(name)
            if lost:
                self.ready_nodes.discard(name)
        self._nodes_cache = existing

    def sync_partition(self, node: Obj, wanted: bool) -> bool:
        """Cut or heal ``node``'s link to the API server; returns whether it is cut.

        The agent's side: no heartbeat (the node lifecycle controller judges
        it as a lost node: NotReady after the grace, taints, taint eviction),
        no status write for its pods, no reaction to their deletion; its
        processes run on and still reach S3. With a network per pod
        (``--netns-index``) the link is really cut as well: the node's pods
        cannot reach the API server either (:meth:`PodNetworks.cut_node`).
        """
        name = node["metadata"]["name"]
        if wanted and name not in self.partitioned:
            log.warning("node %s partitioned: no heartbeats or pod status; its processes keep running", name)
            self.network.cut_node(name)
            self.partitioned.add(name)
            self.lost.setdefault(name, LostNode(since=time.monotonic()))
            self.ready_nodes.discard(name)
        elif not wanted and name in self.partitioned:
            self.network.restore_node(name)
            self.partitioned.discard(name)
            if name in self.lost:
                self.recover(node)  # the next pass stops the processes of pods deleted meanwhile
        return wanted

    # -------------------------------------------------------------- pods
    def _write_status(self, pod: Obj, build: Callable[[Obj], Obj], *, only_if_changed: bool = False) -> Obj | None:
        """Merge-patch ``status`` from ``build(pod)``; on a 409 re-read and retry."""
        md = pod["metadata"]
        for _ in range(5):
            status = build(pod)
            if only_if_changed and all((pod.get("status") or {}).get(k) == v for k, v in status.items()):
                return pod
            patch = {"metadata": {"resourceVersion": pod["metadata"].get("resourceVersion")}, "status": status}
            try:
                return self.client.patch("pods", md["name"], patch, md.get("namespace"), subresource="status")
            except ApiError as e:
                if e.status != 409:
                    raise
            pod = self.client.get("pods", md["name"], md.get("namespace"))
            if pod["metadata"].get("uid") != md.get("uid"):
                return None
        return None

    def _pod_dir(self, pod: Obj) -> Path:
        md = pod["metadata"]
        return self.pods_dir / md.get("namespace", "default") / md["name"]

    def sync_pod(self, pod: Obj) -> None:
        md, status = pod["metadata"], pod.get("status") or {}
        uid = md.get("uid", "")
        c = self.containers.get(uid)
        if md.get("deletionTimestamp"):
            self._sync_deleting(pod, c)
            return
        if c is None:
            if status.get("phase") in TERMINAL or uid in self._finished:
                return
            if any("running" in (cs.get("state") or {}) for cs in status.get("containerStatuses") or []):
                # It ran under a previous incarnation of this kubelet (or a lost node came back).
                self._report_unknown(pod)
                return
            self.start(pod)
            return
        if c.poll() is not None:
            if self._report_terminated(pod, c):
                self._finished.add(uid)
                del self.containers[uid]
        elif not c.running_reported:
            self._report_running(pod, c)

    def _sync_deleting(self, pod: Obj, c: Container | HollowContainer | None) -> None:
        md = pod["metadata"]
        if c is not None and c.poll() is None:
            c.terminate()
            grace = md.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            assert c.term_sent_at is not None
            if not c.killed and time.monotonic() - c.term_sent_at >= float(grace):
                c.kill()
            return
        if c is not None:
            if not self._report_terminated(pod, c):
                return
            del self.containers[c.uid]
        try:
            self.client.delete("pods", md["name"], md.get("namespace"), grace_period=0, uid=md.get("uid"))
        except ApiError as e:
            if e.status not in (404, 409):
                raise

    def _base_status(self, pod: Obj) -> Obj:
        status = pod.get("status") or {}
        pod_ip, host_ip = self._addresses(pod)
        base: Obj = {"hostIP": host_ip, "hostIPs": [{"ip": host_ip}]}
        if pod_ip:  # a pod without a network yet (a hollow pod with netns) has no podIP, as with the kubelet
            base.update({"podIP": pod_ip, "podIPs": [{"ip": pod_ip}]})
        base["startTime"] = status.get("startTime") or now_rfc3339()
        base["qosClass"] = status.get("qosClass") or "BestEffort"
        return base

    def _container_status(self, pod: Obj, state: Obj, ready: bool, container_id: str | None = None) -> list[Obj]:
        containers = (pod.get("spec") or {}).get("containers") or [{}]
        ctr = containers[0]
        cs: Obj = {
            "name": ctr.get("name", "main"),
            "image": ctr.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": 0,
            "state": state,
            "lastState": {},
        }
        cid = container_id or next((v.get("containerID") for v in state.values() if isinstance(v, dict) and v.get("containerID")), None)
        if cid:
            cs["containerID"] = cid
        return [cs]

    def _report_config_error(self, pod: Obj, reason: str, message: str) -> None:
        uid = pod["metadata"].get("uid", "")
        if self._config_errors.get(uid) == f"{reason}:{message}":
            return
        log.warning("pod %s: %s: %s", pod["metadata"]["name"], reason, message)

        def build(p: Obj) -> Obj:
            st = self._base_status(p)
            st["phase"] = "Pending"
            st["containerStatuses"] = self._container_status(p, {"waiting": {"reason": reason, "message": message}}, False)
            st["conditions"] = merge_conditions(
                (p.get("status") or {}).get("conditions") or [],
                [cond("Initialized", True), cond("Ready", False, "ContainersNotReady", f"containers with unready status: [{st['containerStatuses'][0]['name']}]"),
                 cond("ContainersReady", False, "ContainersNotReady", f"containers with unready status: [{st['containerStatuses'][0]['name']}]")],
            )
            return st

        if self._write_status(pod, build) is not None:
            self._config_errors[uid] = f"{reason}:{message}"

    def start(self, pod: Obj) -> None:
        md, spec = pod["metadata"], pod.get("spec") or {}
        containers = spec.get("containers") or []
        if len(containers) != 1:
            self._report_config_error(pod, "CreateContainerError", f"localcluster runs exactly one container per pod, got {len(containers)}")
            return
        ctr = containers[0]
        if self.runtime is not None:
            self._start_in_runtime(pod, ctr)
            return
        cname = ctr.get("name") or "main"
        argv = [str(a) for a in (ctr.get("command") or [])] + [str(a) for a in (ctr.get("args") or [])]
        if not ctr.get("command"):
            self._report_config_error(pod, "CreateContainerError", "localcluster cannot run images: the container needs a command")
            return
        if not self._image_pulled(pod, str(ctr.get("image") or "")):
            return
        if self.is_hollow(spec["nodeName"]):
            self._start_hollow(pod)
            return
        try:
            net = self._pod_network(pod)
            pod_env = self.env_resolver.resolve(pod, ctr)
        except ConfigError as e:
            self._report_config_error(pod, e.reason, e.message)
            return
        pod_dir = self._pod_dir(pod)
        self._prepare_pod_dir(pod_dir, md.get("uid", ""))
        log_path = pod_dir / f"{cname}.log"
        term_path = pod_dir / f"{cname}.termination-log"
        term_path.write_bytes(b"")
        hostname = spec.get("hostname") or md["name"]
        env = self._container_env(pod_dir, hostname, pod_env, term_path)
        env[CONTAINER_MARK_ENV] = md.get("uid", "")
        argv = [expand(a, env) for a in argv]
        cwd = self._working_dir(pod_dir, ctr.get("workingDir"))
        policy = ctr.get("terminationMessagePolicy") or "File"
        started = now_rfc3339()
        try:
            if net is not None and shutil.which(argv[0], path=env["PATH"]) is None and not os.access(argv[0], os.X_OK):
                # nsenter would exec it and exit 127; the kubelet's runtime fails the start itself.
                raise FileNotFoundError(2, "No such file or directory")
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen(
                    (net.exec_prefix() if net is not None else []) + argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as e:
            self._report_start_error(pod, cname, f"failed to start container {cname!r}: exec {argv[0]!r}: {e.strerror or e}")
            return
        pid_file = pod_dir / PID_FILE
        pid_file.write_text(json.dumps({"pid": proc.pid, "start": proc_start_time(proc.pid), "uid": md.get("uid")}))
        c = Container(
            uid=md.get("uid", ""), namespace=md.get("namespace", "default"), pod=md["name"], node=spec["nodeName"],
            name=cname, proc=proc, log_path=log_path, term_path=term_path, policy=policy, started_at=started, pid_file=pid_file,
        )
        self._adopt(pod, c, argv)

    def _adopt(self, pod: Obj, c: Container, argv: list[str]) -> None:
        self.containers[c.uid] = c
        self._config_errors.pop(c.uid, None)
        log.info("started %s/%s on %s: pid %d %s", c.namespace, c.pod, c.node, c.proc.pid, argv)
        self._report_running(pod, c)

    def _start_hollow(self, pod: Obj) -> None:
        """Start a container of a hollow node: no process, a schedule (:mod:`localcluster.hollow`)."""
        try:
            schedule = Schedule.from_pod(pod)
        except ScheduleError as e:
            self._report_config_error(pod, "CreateContainerConfigError", str(e))
            return
        c = HollowContainer.start(pod=pod, schedule=schedule)
        self.containers[c.uid] = c
        self._config_errors.pop(c.uid, None)
        self._report_running(pod, c)

    def _image_pulled(self, pod: Obj, image: str) -> bool:
        """The kubelet's image step: False (and a waiting reason reported) when the pull fails."""
        if not image_reference_valid(image):
            self._report_config_error(pod, "InvalidImageName", f'Failed to apply default image tag "{image}": '
                                      f'couldn\'t parse image name "{image}": invalid reference format')
            return False
        if not image.startswith(UNPULLABLE_REGISTRY):
            return True
        uid = pod["metadata"].get("uid", "")
        first = self._pull_failed.setdefault(uid, time.monotonic())
        if time.monotonic() - first < IMAGE_PULL_BACKOFF_SECONDS:
            ref = image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
            self._report_config_error(pod, "ErrImagePull", (
                f'failed to pull and unpack image "{ref}": failed to resolve reference "{ref}": '
                f"{ref}: not found"))
        else:
            self._report_config_error(pod, "ImagePullBackOff", f'Back-off pulling image "{image}"')
        return False

    def _start_in_runtime(self, pod: Obj, ctr: Obj) -> None:
        """Container nodes: the runtime (podman) runs the pod's image."""
        try:
            net = self._pod_network(pod)
            pod_env = self.env_resolver.resolve(pod, ctr)
            pod_dir = self._pod_dir(pod)
            self._prepare_pod_dir(pod_dir, pod["metadata"].get("uid", ""))
            c = self.runtime.start(pod=pod, ctr=ctr, pod_env=pod_env, pod_dir=pod_dir, pod_net=net)
        except ConfigError as e:
            self._report_config_error(pod, e.reason, e.message)
            return
        except OSError as e:
            self._report_start_error(pod, ctr.get("name") or "main", f"failed to start container: {e.strerror or e}")
            return
        self._adopt(pod, c, [str(a) for a in (ctr.get("command") or []) + (ctr.get("args") or [])])

    def _prepare_pod_dir(self, pod_dir: Path, uid: str) -> None:
        uid_file = pod_dir / "uid"
        if pod_dir.exists():
            old = uid_file.read_text().strip() if uid_file.exists() else ""
            if old != uid:
                # A new pod with the same name: keep the old one's files aside.
                dest = pod_dir.parent / ".old" / f"{pod_dir.name}-{old[:8] or int(time.time())}"
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(pod_dir, dest)
        for sub in ("", "home", "tmp", "work"):
            (pod_dir / sub).mkdir(parents=True, exist_ok=True)
        uid_file.write_text(uid)

    def _working_dir(self, pod_dir: Path, working_dir: str | None) -> str:
        if not working_dir:
            return str(pod_dir / "work")
        if os.path.isabs(working_dir) and os.path.isdir(working_dir):
            return working_dir
        path = pod_dir / "rootfs" / working_dir.lstrip("/")
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def _container_env(self, pod_dir: Path, hostname: str, pod_env: Mapping[str, str], term_path: Path) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": os.pathsep.join([self.venv_bin, os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")]),
            "HOME": str(pod_dir / "home"),
            "TMPDIR": str(pod_dir / "tmp"),
            "HOSTNAME": hostname,
        }
        for name in self.cfg.pass_env:
            if os.environ.get(name):
                env[name] = os.environ[name]
        env.update(pod_env)
        # DNS via nss_wrapper (after the pod env: a pod cannot switch it off by accident).
        preload = [p for p in (self.cfg.nss_wrapper, env.get("LD_PRELOAD")) if p]
        env["LD_PRELOAD"] = " ".join(preload)
        env["NSS_WRAPPER_HOSTS"] = str(self.hosts.path)
        env["NSS_WRAPPER_HOSTNAME"] = hostname
        # The agent cannot mount a file at terminationMessagePath: the process
        # writes its private file instead (see README).
        env[contract.ENV_TERMINATION_MESSAGE_PATH] = str(term_path)
        return env

    def _report_running(self, pod: Obj, c: Container | HollowContainer) -> None:
        def build(p: Obj) -> Obj:
            st = self._base_status(p)
            st["phase"] = "Running"
            st["containerStatuses"] = self._container_status(
                p, {"running": {"startedAt": c.started_at}}, True, c.container_id)
            st["conditions"] = merge_conditions(
                (p.get("status") or {}).get("conditions") or [],
                [cond("PodScheduled", True), cond("Initialized", True), cond("ContainersReady", True), cond("Ready", True)],
            )
            return st

        if self._write_status(pod, build) is not None:
            c.running_reported = True

    def _terminal_build(self, state: Obj, pod_reason: str | None = None, pod_message: str | None = None) -> Callable[[Obj], Obj]:
        exit_code = next(iter(state.values())).get("exitCode", 1)

        def build(p: Obj) -> Obj:
            st = self._base_status(p)
            st["phase"] = "Succeeded" if exit_code == 0 else "Failed"
            st["containerStatuses"] = self._container_status(p, state, False)
            reason = "PodCompleted" if exit_code == 0 else "PodFailed"
            st["conditions"] = merge_conditions(
                (p.get("status") or {}).get("conditions") or [],
                [cond("Initialized", True, reason), cond("Ready", False, reason),
                 cond("ContainersReady", False, reason)],
            )
            if pod_reason:
                st["reason"] = pod_reason
            if pod_message:
                st["message"] = pod_message
            return st

        return build

    def _report_terminated(self, pod: Obj, c: Container | HollowContainer) -> bool:
        assert c.exit_status is not None
        log.info("%s/%s exited: %s", c.namespace, c.pod, {k: v for k, v in c.exit_status.items() if k != "message"})
        try:
            return self._write_status(pod, self._terminal_build({"terminated": c.exit_status})) is not None
        except ApiError as e:
            if e.status == 404:
                return True
            raise

    def _report_start_error(self, pod: Obj, cname: str, message: str) -> None:
        now = now_rfc3339()
        state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message, "startedAt": now, "finishedAt": now}}
        log.warning("pod %s: %s", pod["metadata"]["name"], message)
        self._write_status(pod, self._terminal_build(state))

    def _report_unknown(self, pod: Obj) -> None:
        now = now_rfc3339()
        state = {"terminated": {
            "exitCode": 137, "reason": "ContainerStatusUnknown",
            "message": "The container could not be located when the pod was terminated",
            "startedAt": now, "finishedAt": now,
        }}
        self._write_status(pod, self._terminal_build(state))


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> AgentConfig:
    ap = argparse.ArgumentParser(prog="python -m localcluster.nodeagent", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required=not os.environ.get("KUBECONFIG"))
    ap.add_argument("--state-dir", required=True, type=Path)
    ap.add_argument("--nodes", default="node-0,node-1,node-2", help="comma-separated node names")
    ap.add_argument("--node-monitor-grace-seconds", type=float, default=2.0)
    ap.add_argument("--pod-eviction-seconds", type=float, default=None, help="evict pods of a lost node after this (default: never)")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between passes when no pod event wakes the agent")
    ap.add_argument("--heartbeat-seconds", type=float, default=10.0, help="seconds between a node's status heartbeats")
    ap.add_argument("--hollow", action="store_true", help="every node hollow: pods run no process (localcluster.hollow)")
    ap.add_argument("--pass-env", default="PYTHONPATH,LANG,LC_ALL,TZ", help="agent env vars passed into every container")
    ap.add_argument("--node-config", default="{}",
                    help='JSON: per node name or "*": {"capacity": {...}, "labels": {...}, "taints": [...], "hollow": true}')
    ap.add_argument("--runtime", choices=["process", "podman"], default="process",
                    help="process: containers as local processes; podman: the pod's image in a container")
    ap.add_argument("--netns-index", type=int, default=None,
                    help="a network namespace per pod on subnet 10.244.N.0/24 (localcluster.netns); default: the host's network")
    a = ap.parse_args(argv)
    return AgentConfig(
        kubeconfig=a.kubeconfig,
        state_dir=a.state_dir.resolve(),
        nodes=tuple(n for n in a.nodes.split(",") if n),
        node_monitor_grace_seconds=a.node_monitor_grace_seconds,
        pod_eviction_seconds=a.pod_eviction_seconds,
        interval=a.interval,
        heartbeat_seconds=a.heartbeat_seconds,
        hollow=a.hollow,
        pass_env=tuple(n for n in a.pass_env.split(",") if n),
        node_config=json.loads(a.node_config),
        runtime=a.runtime,
        netns_index=a.netns_index,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    cfg.nss_wrapper = find_nss_wrapper()
    if not cfg.nss_wrapper:
        print(f"localcluster.nodeagent: {NSS_MISSING_MESSAGE}", file=sys.stderr)
        return 2
    agent = NodeAgent(cfg)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: killing all containers and exiting", signum)
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy: localcluster.containers
    # raises localcluster.nodeagent.ConfigError, which must be the class caught here.
    from localcluster.nodeagent import main as _main

    sys.exit(_main())
