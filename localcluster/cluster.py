"""The whole stand-in: API server + CRDs + S3 + node agent, as subprocesses.

    with LocalCluster("/tmp/lc") as cluster:
        client = cluster.client()
        op = cluster.start_operator()
        ...

Every process is started in its own session and recorded (PID) in
``<state_dir>/cluster.json``; :meth:`LocalCluster.stop` stops them by PID
(SIGTERM, wait, SIGKILL) and then kills any container process the node agent
left behind (from the ``container.pid`` files in the pod directories), so
nothing outlives the cluster. ``python -m localcluster down`` does the same
from the JSON file.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from localcluster import control
from localcluster.kube import ApiError, Client, Obj, condition, wait_until
from localcluster.netns import ClusterNetwork, NetworkNamespaces
from localcluster.nodeagent import PID_FILE, kill_group, proc_start_time
from localcluster.s3 import DEFAULT_BUCKET, S3Server, pid_alive, stop_pid

log = logging.getLogger("localcluster.cluster")

REPO_ROOT = Path(__file__).resolve().parents[1]
CRDS_DIR = REPO_ROOT / "charts" / "trainingjob-operator" / "crds"
DEFAULT_NODES = ("node-0", "node-1", "node-2")
#: Overrides the API server command (shell words; ``{state_dir}`` is substituted).
APISERVER_CMD_ENV = "LOCALCLUSTER_APISERVER_CMD"
#: Overrides the operator command (shell words) used by :meth:`LocalCluster.start_operator`.
OPERATOR_CMD_ENV = "LOCALCLUSTER_OPERATOR_CMD"
#: The default ``network`` of a LocalCluster (``host`` or ``netns``), e.g. to run a whole test layer with netns.
NETWORK_ENV = "LOCALCLUSTER_NETWORK"

# Re-exported: the disruption helpers.
preempt = control.preempt
evict = control.evict
lose_node = control.lose_node
restore_node = control.restore_node


def _spawn(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=str(REPO_ROOT),
        )


@dataclass
class ManagedProcess:
    """A subprocess started by the cluster (its own process group)."""

    name: str
    pid: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_alive(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        stop_pid(self.pid, timeout=timeout)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class LocalCluster:
    """A one-machine Kubernetes stand-in.

    Args:
        state_dir: Where everything lives (kubeconfig, logs, pod dirs, cluster.json).
        nodes: Node names the agent plays kubelet for.
        with_s3: Start an S3 server (SeaweedFS, :data:`localcluster.s3.S3Server`) and create :attr:`bucket`.
        node_monitor_grace_seconds: Lost node -> NotReady after this.
        pod_eviction_seconds: Force-delete a lost node's pods after this (None: never).
        node_config: Per node name (or ``"*"`` for all): ``{"capacity": {"cpu": "8",
            "nvidia.com/gpu": "1"}, "labels": {...}, "taints": [...]}``; the
            scheduler places pods against it (default: the machine's cpu and memory).
            ``"hollow": True`` makes that node hollow: its pods run no process
            (:mod:`localcluster.hollow`).
        apiserver_command: argv of the API server (default ``python -m
            localcluster.apiserver --state-dir DIR --port 0``, or ``$LOCALCLUSTER_APISERVER_CMD``).
        bucket: The S3 bucket to create.
        runtime: ``process`` (pods as local processes) or ``podman`` (container
            nodes: pods run from their images, see ``localcluster/containers.py``).
        hollow: Every node hollow (kubemark/KWOK-style; :mod:`localcluster.hollow`).
        network: ``host`` (every pod on the machine's network, 127.0.0.1) or
            ``netns`` (a network namespace and a real IP per pod on a subnet
            of its own; the API server and S3 listen on its gateway, see
            :mod:`localcluster.netns`). Default: ``$LOCALCLUSTER_NETWORK``, else ``host``.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        nodes: Iterable[str] = DEFAULT_NODES,
        with_s3: bool = True,
        *,
        node_monitor_grace_seconds: float = 2.0,
        pod_eviction_seconds: float | None = None,
        apiserver_command: Sequence[str] | None = None,
        bucket: str = DEFAULT_BUCKET,
        crds_dir: str | os.PathLike[str] = CRDS_DIR,
        node_config: dict[str, dict[str, Any]] | None = None,
        runtime: str = "process",
        hollow: bool = False,
        network: str | None = None,
    ) -> None:
        network = network or os.environ.get(NETWORK_ENV) or "host"
        if network not in ("host", "netns"):
            raise ValueError(f"network must be 'host' or 'netns', not {network!r}")
        self.state_dir = Path(state_dir).resolve()
        self.nodes = tuple(nodes)
        self.with_s3 = with_s3
        self.node_monitor_grace_seconds = node_monitor_grace_seconds
        self.pod_eviction_seconds = pod_eviction_seconds
        self.apiserver_command = list(apiserver_command) if apiserver_command else None
        self.bucket = bucket
        self.crds_dir = Path(crds_dir)
        self.node_config = dict(node_config or {})
        self.runtime = runtime
        self.hollow = hollow
        self.network = network
        #: The claimed subnet with ``network="netns"`` (after :meth:`start`).
        self.net: ClusterNetwork | None = None
        self.processes: dict[str, ManagedProcess] = {}
        self.api_url: str | None = None
        self.s3: S3Server | None = None
        self._client: Client | None = None

    # ------------------------------------------------------------------ props
    @property
    def host(self) -> str:
        """Where the API server and S3 listen: 127.0.0.1, or the pod subnet's gateway with ``network="netns"``."""
        return self.net.gateway if self.net else "127.0.0.1"

    def network_namespaces(self) -> NetworkNamespaces:
        """The pods' network namespaces (``network="netns"``): :meth:`NetworkNamespaces.cut_node` and friends."""
        if self.net is None:
            raise RuntimeError("this stand-in runs on the host's network (LocalCluster(network='netns') has namespaces)")
        return NetworkNamespaces(index=self.net.index, state_dir=self.state_dir)

    @property
    def kubeconfig(self) -> str:
        return str(self.state_dir / "kubeconfig")

    @property
    def s3_endpoint(self) -> str | None:
        return self.s3.endpoint if self.s3 else None

    @property
    def s3_credentials(self) -> dict[str, str]:
        return self.s3.credentials if self.s3 else {}

    def s3_storage_options(self) -> dict[str, str]:
        """s3fs options (endpoint and credentials) for the cluster's S3."""
        creds = self.s3_credentials
        return {"endpoint_url": self.s3_endpoint or "", "key": creds["AWS_ACCESS_KEY_ID"],
                "secret": creds["AWS_SECRET_ACCESS_KEY"]}

    def create_s3_secret(self, namespace: str, name: str = "s3-creds") -> Obj:
        """A Secret with the S3 credentials, as a job's ``spec.snapshot.credentialsSecret`` names it."""
        data = {k: base64.b64encode(v.encode()).decode() for k, v in self.s3_credentials.items()}
        return self.client().create("secrets", {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                                "metadata": {"name": name, "namespace": namespace}, "data": data},
                                    namespace=namespace)

    def s3_env(self) -> dict[str, str]:
        """AWS_* env for a client of the cluster's S3 (empty without S3)."""
        return self.s3.env() if self.s3 else {}

    def client(self) -> Client:
        """A (shared) API client."""
        if self._client is None:
            self._client = Client.from_kubeconfig(self.kubeconfig)
        return self._client

    def env(self) -> dict[str, str]:
        """``os.environ`` plus KUBECONFIG and the S3 variables."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig, **self.s3_env()}

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> "LocalCluster":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.network == "netns":
                self.net = ClusterNetwork.claim(state_dir=self.state_dir)
                self._save()
            self._start_apiserver(timeout)
            self.apply_crds()
            if self.with_s3:
                self.s3 = S3Server(log_path=self.state_dir / "s3.log", data_dir=self.state_dir / "s3-data",
                                   host=self.host).start()
                self.s3.create_bucket(self.bucket)
                self.processes["s3"] = ManagedProcess("s3", self.s3.pid or 0, self.state_dir / "s3.log", self.s3._proc)
                self._save()
            self._start_nodeagent(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_apiserver(self, timeout: float) -> None:
        info_path = self.state_dir / "apiserver.json"
        for stale in (info_path, Path(self.kubeconfig)):
            stale.unlink(missing_ok=True)
        argv = self.apiserver_command
        if argv is None and os.environ.get(APISERVER_CMD_ENV):
            argv = shlex.split(os.environ[APISERVER_CMD_ENV].replace("{state_dir}", str(self.state_dir)))
        if argv is None:
            argv = [sys.executable, "-m", "localcluster.apiserver", "--state-dir", str(self.state_dir), "--port", "0",
                    "--host", self.host]
        log_path = self.state_dir / "apiserver.log"
        proc = _spawn(argv, log_path)
        self.processes["apiserver"] = ManagedProcess("apiserver", proc.pid, log_path, proc)
        if self.net is not None:
            self.net.add_owner(proc.pid)
        self._save()

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"API server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            if not (info_path.exists() and Path(self.kubeconfig).exists()):
                return False
            try:
                self.api_url = json.loads(info_path.read_text())["url"]
            except (ValueError, KeyError):
                return False
            return True

        wait_until(ready, timeout=timeout, interval=0.05, what="the API server's apiserver.json")
        wait_until(lambda: self._answers(), timeout=timeout, interval=0.05, what="the API server to answer")
        self._save()

    def _answers(self) -> bool:
        try:
            self.client().list("namespaces")
            return True
        except Exception:  # noqa: BLE001
            return False

    def apply_crds(self) -> list[str]:
        """Apply every CRD of the chart; wait until each is served. Returns their names."""
        names = []
        client = self.client()
        for path in sorted(self.crds_dir.glob("*.y*ml")) if self.crds_dir.is_dir() else []:
            for doc in yaml.safe_load_all(path.read_text()):
                if not doc:
                    continue
                client.apply(doc)
                names.append(doc["metadata"]["name"])
                self._wait_crd_served(doc)
        return names

    def _wait_crd_served(self, crd: dict[str, Any], timeout: float = 15.0) -> None:
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        versions = [v["name"] for v in crd["spec"].get("versions", []) if v.get("served", True)]

        def served() -> bool:
            for v in versions:
                try:
                    self.client().request("GET", f"/apis/{group}/{v}/{plural}")
                except ApiError:
                    return False
            return True

        try:
            wait_until(served, timeout=timeout, interval=0.1, what=f"CRD {plural}.{group} to be served")
        except TimeoutError as e:
            log.warning("%s", e)

    def _start_nodeagent(self, timeout: float) -> None:
        argv = [
            sys.executable, "-m", "localcluster.nodeagent",
            "--kubeconfig", self.kubeconfig,
            "--state-dir", str(self.state_dir),
            "--nodes", ",".join(self.nodes),
            "--node-monitor-grace-seconds", str(self.node_monitor_grace_seconds),
            "--runtime", self.runtime,
        ]
        if self.pod_eviction_seconds is not None:
            argv += ["--pod-eviction-seconds", str(self.pod_eviction_seconds)]
        if self.node_config:
            argv += ["--node-config", json.dumps(self.node_config)]
        if self.hollow:
            argv.append("--hollow")
        if self.net is not None:
            argv += ["--netns-index", str(self.net.index)]
        log_path = self.state_dir / "nodeagent.log"
        proc = _spawn(argv, log_path)
        self.processes["nodeagent"] = ManagedProcess("nodeagent", proc.pid, log_path, proc)
        if self.net is not None:
            self.net.add_owner(proc.pid)
        self._save()
        client = self.client()

        def nodes_ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"node agent exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            ready = {
                n["metadata"]["name"]
                for n in client.list("nodes")
                if (condition(n, "Ready") or {}).get("status") == "True"
            }
            return set(self.nodes) <= ready

        wait_until(nodes_ready, timeout=timeout, interval=0.1, what="the nodes to be Ready")

    def start_operator(
        self,
        extra_args: Sequence[str] = (),
        *,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
        name: str = "operator",
    ) -> ManagedProcess:
        """Run the operator (default ``python -m trainingjob_operator``) against this cluster.

        Args:
            extra_args: Appended to the command.
            command: The operator argv (default ``$LOCALCLUSTER_OPERATOR_CMD`` or
                ``python -m trainingjob_operator``).
            env: Extra env vars (KUBECONFIG is always set).
            name: Key in cluster.json and log file name (``DIR/<name>.log``).
        """
        if command is None:
            if os.environ.get(OPERATOR_CMD_ENV):
                command = shlex.split(os.environ[OPERATOR_CMD_ENV])
            else:
                command = [sys.executable, "-m", "trainingjob_operator"]
        log_path = self.state_dir / f"{name}.log"
        full_env = {**self.env(), **(env or {}), "KUBECONFIG": self.kubeconfig}
        proc = _spawn([*command, *extra_args], log_path, env=full_env)
        mp = ManagedProcess(name, proc.pid, log_path, proc)
        self.processes[name] = mp
        self._save()
        return mp

    def stop_operator(self, name: str = "operator") -> None:
        mp = self.processes.pop(name, None)
        if mp:
            mp.stop()
            self._save()

    def stop(self) -> None:
        """Stop everything by PID; no container process survives."""
        order = [n for n in self.processes if n not in ("nodeagent", "s3", "apiserver")] + ["nodeagent"]
        for name in order:
            mp = self.processes.get(name)
            if mp:
                mp.stop(timeout=15 if name == "nodeagent" else 10)
        self.kill_leftover_containers()
        if self.runtime == "podman":
            from localcluster.containers import remove_containers

            remove_containers(self.state_dir)
        for name in ("s3", "apiserver"):
            mp = self.processes.get(name)
            if mp:
                mp.stop()
        if self.s3:
            self.s3.pid = None
        self.processes.clear()
        if self.net is not None:
            self.net.release()  # every pod namespace (the agent removes them too), the bridge, the claim
            self.net = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.state_dir.exists():
            self._save()

    def kill_leftover_containers(self) -> list[int]:
        """SIGKILL every container process group still alive (by its pid file)."""
        killed = []
        for pid_file in self.container_pid_files():
            try:
                info = json.loads(pid_file.read_text())
            except (OSError, ValueError):
                continue
            pid = int(info.get("pid", 0))
            if pid and proc_start_time(pid) == info.get("start"):
                kill_group(pid, 9, info.get("uid"))
                killed.append(pid)
            pid_file.unlink(missing_ok=True)
        return killed

    def container_pid_files(self) -> list[Path]:
        return sorted((self.state_dir / "pods").glob(f"*/*/{PID_FILE}"))

    # ------------------------------------------------------------------ persistence
    def _save(self) -> None:
        data = {
            "stateDir": str(self.state_dir),
            "kubeconfig": self.kubeconfig,
            "apiUrl": self.api_url,
            "nodes": list(self.nodes),
            "netnsIndex": self.net.index if self.net else None,
            "s3": ({"endpoint": self.s3.endpoint, "bucket": self.bucket, **self.s3.credentials} if self.s3 else None),
            "processes": {n: {"pid": p.pid, "log": str(p.log_path)} for n, p in self.processes.items()},
        }
        tmp = self.state_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.state_dir / "cluster.json")

    @classmethod
    def load(cls, state_dir: str | os.PathLike[str]) -> "LocalCluster":
        """A handle on a cluster started by another process (from cluster.json)."""
        state = Path(state_dir).resolve()
        data = json.loads((state / "cluster.json").read_text())
        c = cls(state, nodes=data.get("nodes") or DEFAULT_NODES, with_s3=bool(data.get("s3")))
        c.api_url = data.get("apiUrl")
        if data.get("netnsIndex") is not None:
            c.network, c.net = "netns", ClusterNetwork(index=int(data["netnsIndex"]), state_dir=state)
        if data.get("s3"):
            c.bucket = data["s3"].get("bucket", DEFAULT_BUCKET)
            c.s3 = S3Server.attach(data["s3"]["endpoint"], pid=data.get("processes", {}).get("s3", {}).get("pid", 0))
        for name, p in (data.get("processes") or {}).items():
            c.processes[name] = ManagedProcess(name, int(p["pid"]), Path(p["log"]))
        return c

    def status(self) -> dict[str, Any]:
        """Processes alive, nodes and their Ready status, pods per phase."""
        out: dict[str, Any] = {
            "stateDir": str(self.state_dir),
            "kubeconfig": self.kubeconfig,
            "apiUrl": self.api_url,
            "s3Endpoint": self.s3_endpoint,
            "processes": {n: {"pid": p.pid, "alive": p.alive} for n, p in self.processes.items()},
        }
        try:
            client = self.client()
            out["nodes"] = {
                n["metadata"]["name"]: (condition(n, "Ready") or {}).get("status", "?") for n in client.list("nodes")
            }
            phases: dict[str, int] = {}
            for p in client.list("pods"):
                ph = (p.get("status") or {}).get("phase", "?")
                phases[ph] = phases.get(ph, 0) + 1
            out["pods"] = phases
        except Exception as e:  # noqa: BLE001
            out["error"] = str(e)
        return out


def wait_pod_phase(client: Client, namespace: str, name: str, phases: Iterable[str], timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the pod's phase is one of ``phases``; return the pod."""
    want = set(phases)
    pod = client.wait_for(
        "pods", name, namespace,
        predicate=lambda p: p is not None and (p.get("status") or {}).get("phase") in want,
        timeout=timeout,
    )
    assert pod is not None
    return pod
