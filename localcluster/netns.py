"""A network of its own for every pod: Linux network namespaces, veth pairs and a bridge.

``LocalCluster(network="netns")`` (``nodeagent --netns-index N``) gives the
stand-in a subnet ``10.244.N.0/24`` that has no route off the machine:

* a host-side bridge ``lcbrN`` holding the gateway ``10.244.N.1``; the API
  server and S3 listen on that address (not on 127.0.0.1), so the host's
  processes and every pod reach them, and nothing else does;
* per pod a namespace ``/run/netns/lcN-K`` with ``lo`` and ``eth0`` (one end
  of a veth pair, the other on the bridge) holding the pod's IP; its only
  route is the subnet's, so a pod reaches other pods, the gateway and nothing
  else (no default route: everything else is "Network is unreachable");
* the pod's processes run inside it (``nsenter --net``, or podman's
  ``--network ns:PATH``), so two gangs' rank 0 both listen on port 29400.

The subnet index N is claimed with an ``O_EXCL`` file under :data:`RUN_DIR`
naming the owner's processes; a claim whose processes are all gone is a
leftover of a crash and is removed (namespaces, bridge, claim) by
:func:`clean_leftovers`, which ``LocalCluster.start`` runs first.

:meth:`NetworkNamespaces.cut_node` is a real link cut: in each namespace of the
node's pods, ``iptables`` drops TCP to and from the API server's port on the
gateway, so the processes keep running and still reach S3 (same address,
another port) and the other pods, but not the API server.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from localcluster.dns import LOOPBACK

log = logging.getLogger("localcluster.netns")

#: The stand-in's pod network: 10.244.N.0/24 per cluster, like a CNI's default pod CIDR (flannel's 10.244.0.0/16).
SUBNET_PREFIX = "10.244"
#: Claims of subnet indices (one JSON file per index), shared by every stand-in on the machine.
RUN_DIR = Path(os.environ.get("LOCALCLUSTER_NETNS_RUN_DIR", "/run/localcluster-netns"))
NETNS_DIR = Path("/run/netns")
FIRST_INDEX, LAST_INDEX = 1, 254
FIRST_HOST, LAST_HOST = 2, 254
MISSING_MESSAGE = (
    "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 (ip), util-linux (nsenter) and "
    "iptables: install them with  python -m localcluster.tools install")


class NetnsError(RuntimeError):
    """A namespace, veth or bridge operation failed (the message says which and why)."""


def _run(argv: list[str], *, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        raise NetnsError(f"{argv[0]}: not found; {MISSING_MESSAGE}") from e
    if check and out.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()} ({MISSING_MESSAGE})")
    return out


def check_available() -> None:
    """Raise :class:`NetnsError` (loudly: never a skip) when this machine cannot make namespaces."""
    for tool in ("ip", "nsenter", "iptables"):
        if shutil.which(tool) is None:
            raise NetnsError(f"{tool}: not found; {MISSING_MESSAGE}")
    if os.geteuid() != 0:
        raise NetnsError(f"not root (uid {os.geteuid()}); {MISSING_MESSAGE}")


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owners_alive(claim: dict) -> bool:
    return any(_proc_start(int(p["pid"])) == p.get("start") for p in claim.get("owners") or [])


def netns_names(index: int) -> list[str]:
    """The namespaces of subnet ``index`` that exist now."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if re.fullmatch(rf"lc{index}-\d+", p.name))
    except FileNotFoundError:
        return []


def delete_netns(name: str) -> None:
    """Remove a namespace (its veth goes with it; the kernel frees it once its last process is gone)."""
    _run(["ip", "netns", "delete", name], check=False)


@dataclass
class ClusterNetwork:
    """One stand-in's subnet: index N, bridge ``lcbrN``, gateway ``10.244.N.1``.

    Args:
        index: The subnet index (1..254).
        state_dir: The stand-in's state folder (recorded in the claim).
    """

    index: int
    state_dir: Path

    @property
    def bridge(self) -> str:
        return f"lcbr{self.index}"

    @property
    def gateway(self) -> str:
        return f"{SUBNET_PREFIX}.{self.index}.1"

    @property
    def claim_path(self) -> Path:
        return RUN_DIR / f"{self.index}.json"

    @classmethod
    def claim(cls, *, state_dir: Path) -> "ClusterNetwork":
        """Claim a free subnet index and create its bridge and gateway address."""
        check_available()
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        clean_leftovers()
        indices = list(range(FIRST_INDEX, LAST_INDEX + 1))
        random.shuffle(indices)  # several stand-ins start at once on this machine
        for index in indices:
            net = cls(index=index, state_dir=Path(state_dir))
            try:
                fd = os.open(net.claim_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump({"stateDir": str(state_dir), "owners": [{"pid": os.getpid(), "start": _proc_start(os.getpid())}]}, fh)
            try:
                net._create_bridge()
            except BaseException:
                net.release()
                raise
            return net
        raise NetnsError(f"no free subnet index under {RUN_DIR} ({LAST_INDEX} stand-ins running?)")

    def _create_bridge(self) -> None:
        delete_link(self.bridge)  # an unclaimed leftover of the same name
        _run(["ip", "-b", "-"], stdin=(f"link add {self.bridge} type bridge\n"
                                       f"addr add {self.gateway}/24 dev {self.bridge}\n"
                                       f"link set {self.bridge} up\n"))

    def add_owner(self, pid: int) -> None:
        """Record another process (API server, node agent) whose life keeps this claim."""
        claim = json.loads(self.claim_path.read_text())
        claim["owners"].append({"pid": pid, "start": _proc_start(pid)})
        tmp = self.claim_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(claim))
        os.replace(tmp, self.claim_path)

    def release(self) -> None:
        """Remove every namespace of the subnet, the bridge, and the claim."""
        for name in netns_names(self.index):
            delete_netns(name)
        delete_link(self.bridge)
        self.claim_path.unlink(missing_ok=True)


def delete_link(name: str) -> None:
    """Remove a network interface (a bridge) if it exists."""
    _run(["ip", "link", "delete", name], check=False)


def clean_leftovers() -> list[int]:
    """Release every claimed subnet whose owners are all dead (a crashed stand-in). Returns their indices."""
    cleaned = []
    for path in sorted(RUN_DIR.glob("*.json")) if RUN_DIR.is_dir() else []:
        try:
            claim = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written right now
        if _owners_alive(claim):
            continue
        index = int(path.stem)
        log.warning("removing the network of a dead stand-in: subnet %d (%s)", index, claim.get("stateDir"))
        ClusterNetwork(index=index, state_dir=Path(claim.get("stateDir") or ".")).release()
        cleaned.append(index)
    return cleaned


@dataclass(frozen=True)
class PodNetwork:
    """A pod's namespace: its name, path and IP."""

    name: str
    ip: str
    node: str
    uid: str

    @property
    def path(self) -> str:
        return str(NETNS_DIR / self.name)

    def exec_prefix(self) -> list[str]:
        """argv prefix running a command inside the namespace (network only; same PID, via exec)."""
        return ["nsenter", f"--net={self.path}", "--"]


class NetworkNamespaces:
    """The pod namespaces of one stand-in's subnet (the node agent creates them; anyone can cut a node).

    Args:
        index: The subnet index (``ClusterNetwork.index``).
        state_dir: The stand-in's state folder: ``netns/<name>.json`` records
            each namespace's node and IP, ``netns/cut-<node>`` a cut node, and
            ``apiserver.json`` says which port a cut drops.
    """

    def __init__(self, *, index: int, state_dir: str | os.PathLike[str]) -> None:
        self.index = index
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / "netns"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._counter = 0
        self._next_host = FIRST_HOST

    @property
    def gateway(self) -> str:
        return f"{SUBNET_PREFIX}.{self.index}.1"

    def pods(self) -> list[PodNetwork]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(PodNetwork(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def _free_ip(self) -> str:
        used = {p.ip for p in self.pods()}
        span = LAST_HOST - FIRST_HOST + 1
        # Round robin: an address is reused as late as possible (a namespace is freed
        # asynchronously, once its last process is gone).
        for k in range(span):
            host = FIRST_HOST + (self._next_host - FIRST_HOST + k) % span
            ip = f"{SUBNET_PREFIX}.{self.index}.{host}"
            if ip not in used:
                self._next_host = host + 1
                return ip
        raise NetnsError(f"subnet {SUBNET_PREFIX}.{self.index}.0/24 is full ({span} pods)")

    def remove_all(self) -> None:
        """Remove every pod namespace of the subnet (an agent that starts owns none yet)."""
        for name in netns_names(self.index):
            delete_netns(name)
        for path in self.dir.glob("*.json"):
            path.unlink(missing_ok=True)

    def create(self, *, uid: str, node: str) -> PodNetwork:
        """A new namespace for a pod: veth to the bridge, an IP, loopback up, the node's cut if it is cut."""
        self._counter += 1
        name = f"lc{self.index}-{os.getpid() % 100000}{self._counter}"
        veth = f"lv{os.urandom(5).hex()}"  # host side; unique even while an old namespace is being freed
        pod = PodNetwork(name=name, ip=self._free_ip(), node=node, uid=uid)
        _run(["ip", "netns", "add", name])
        try:
            _run(["ip", "-b", "-"], stdin=(f"link add {veth} type veth peer name eth0 netns {name}\n"
                                           f"link set {veth} master lcbr{self.index} up\n"))
            _run(["ip", "-n", name, "-b", "-"], stdin=(f"addr add {pod.ip}/24 dev eth0\n"
                                                       "link set eth0 up\nlink set lo up\n"))
            (self.dir / f"{name}.json").write_text(json.dumps(pod.__dict__))
            if self.is_cut(node):
                self._apply_cut(pod, cut=True)
        except BaseException:
            self.remove(pod)
            raise
        return pod

    def remove(self, pod: PodNetwork) -> None:
        """Remove a pod's namespace and its record."""
        delete_netns(pod.name)
        (self.dir / f"{pod.name}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ link cuts
    def _api_port(self) -> int:
        url = json.loads((self.state_dir / "apiserver.json").read_text())["url"]
        return int(url.rsplit(":", 1)[1].split("/", 1)[0])

    def is_cut(self, node: str) -> bool:
        return (self.dir / f"cut-{node}").exists()

    def _apply_cut(self, pod: PodNetwork, *, cut: bool) -> None:
        port, gw = self._api_port(), self.gateway
        action = "-I" if cut else "-D"
        for rule in (["OUTPUT", "-d", gw, "-p", "tcp", "--dport", str(port)],
                     ["INPUT", "-s", gw, "-p", "tcp", "--sport", str(port)]):
            # Restoring a namespace cut twice or never cut: iptables -D fails, nothing to undo.
            _run([*pod.exec_prefix(), "iptables", "-w", action, *rule, "-j", "DROP"], check=cut)

    def cut_node(self, node: str) -> list[str]:
        """Partition ``node``: its pods lose the API server (S3 and the other pods stay reachable).

        New pods of the node start cut too, until :meth:`restore_node`.
        Returns the namespaces cut.
        """
        (self.dir / f"cut-{node}").write_text("")
        return self._set_cut(node, cut=True)

    def restore_node(self, node: str) -> list[str]:
        """Undo :meth:`cut_node`. Returns the namespaces restored."""
        (self.dir / f"cut-{node}").unlink(missing_ok=True)
        return self._set_cut(node, cut=False)

    def _set_cut(self, node: str, *, cut: bool) -> list[str]:
        done = []
        for pod in self._of_node(node):
            if (NETNS_DIR / pod.name).exists():
                self._apply_cut(pod, cut=cut)
                done.append(pod.name)
        return done

    def _of_node(self, node: str) -> Iterable[PodNetwork]:
        return [p for p in self.pods() if p.node == node]


class HostNetwork:
    """Every pod on the machine's network (``network="host"``, the default): 127.0.0.1, no namespace."""

    gateway = LOOPBACK
    #: A Service that publishes no pod still resolves (to the shared loopback).
    service_fallback: str | None = LOOPBACK

    def ip(self, pod: dict) -> str | None:
        return LOOPBACK

    def ensure(self, pod: dict) -> tuple[PodNetwork | None, bool]:
        return None, False

    def prune(self, *, keep: set[str]) -> None:
        pass

    def remove_all(self) -> None:
        pass

    def cut_node(self, node: str) -> None:
        """No link to cut on the shared network: a partition there is the agent's side only."""

    def restore_node(self, node: str) -> None:
        """See :meth:`cut_node`."""


class PodNetworks(HostNetwork):
    """The node agent's pod namespaces by pod uid: made on first use, removed with the pod.

    Args:
        index: The subnet index.
        state_dir: The stand-in's state folder.
    """

    service_fallback = None  # a headless Service without endpoints has no record

    def __init__(self, *, index: int, state_dir: str | os.PathLike[str]) -> None:
        self.namespaces = NetworkNamespaces(index=index, state_dir=state_dir)
        self.by_uid: dict[str, PodNetwork] = {}
        self.namespaces.remove_all()  # an agent that starts runs no pod yet: what is there is a previous agent's

    @property  # type: ignore[override]
    def gateway(self) -> str:
        return self.namespaces.gateway

    def ip(self, pod: dict) -> str | None:
        """The pod's address: its namespace's, else the one its status reports (a finished pod), else None."""
        net = self.by_uid.get(pod["metadata"].get("uid", ""))
        return net.ip if net else (pod.get("status") or {}).get("podIP")

    def ensure(self, pod: dict) -> tuple[PodNetwork | None, bool]:
        """The pod's namespace, and whether it was made just now."""
        uid = pod["metadata"].get("uid", "")
        if uid in self.by_uid:
            return self.by_uid[uid], False
        self.by_uid[uid] = self.namespaces.create(uid=uid, node=pod["spec"]["nodeName"])
        return self.by_uid[uid], True

    def prune(self, *, keep: set[str]) -> None:
        """Remove the namespaces of every pod uid not in ``keep``."""
        for uid in [u for u in self.by_uid if u not in keep]:
            self.namespaces.remove(self.by_uid.pop(uid))

    def remove_all(self) -> None:
        self.by_uid.clear()
        self.namespaces.remove_all()

    def cut_node(self, node: str) -> None:
        """Drop the node's pods' traffic to the API server (S3 and other pods stay reachable)."""
        self.namespaces.cut_node(node)

    def restore_node(self, node: str) -> None:
        self.namespaces.restore_node(node)
